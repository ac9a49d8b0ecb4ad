//! The module layout's rules (docs/architecture.md, "How the code is laid out"), checked on
//! the source so they cannot drift: the stages form no import cycle, nothing imports the app
//! wiring back, the leaf modules import no stage, and the controller names no mesh type (the
//! router owns its mesh objects).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module -> the top-level modules its files (the module and its submodules) name
/// through `crate::`. A submodule naming its own parent is not an edge.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, text) in sources() {
        let top = module.split('/').next().unwrap().to_string();
        let deps = graph.entry(top.clone()).or_default();
        for (at, _) in text.match_indices("crate::") {
            let name: String = text[at + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(
                !name.is_empty(),
                "{module}: a `crate::` path this test cannot read (grouped import?)"
            );
            if name != top {
                deps.insert(name);
            }
        }
    }
    graph
}

/// (module path without `.rs`, e.g. `controller/events`, source text) for every file under src/.
fn sources() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = Vec::new();
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let module = path.strip_prefix(&root).unwrap().with_extension("");
                let module = module.to_str().unwrap().replace('\\', "/");
                out.push((module, std::fs::read_to_string(&path).unwrap()));
            }
        }
    }
    assert!(
        out.len() > 20,
        "found only {} source files under {}",
        out.len(),
        root.display()
    );
    out
}

/// The app wiring: the command line builds every stage and starts the roles.
const APP_WIRING: &[&str] = &["cli", "main", "lib"];

#[test]
fn no_module_imports_the_app_wiring() {
    for (module, deps) in imports() {
        if APP_WIRING.contains(&module.as_str()) {
            continue;
        }
        for wiring in APP_WIRING {
            assert!(
                !deps.contains(*wiring),
                "{module} imports the app wiring `{wiring}`"
            );
        }
    }
}

#[test]
fn the_agent_role_is_imported_only_by_the_commands_that_run_it() {
    // `watch` runs the agent's stages in the foreground to show them; no stage imports the role.
    for (module, deps) in imports() {
        if deps.contains("agent") {
            assert!(
                ["cli", "watch"].contains(&module.as_str()),
                "{module} imports the agent role"
            );
        }
    }
}

#[test]
fn leaf_modules_import_no_stage() {
    let graph = imports();
    let allowed: &[(&str, &[&str])] = &[
        ("clock", &[]),
        ("shutdown", &[]),
        ("workload", &[]),
        ("config", &[]),
        ("parse", &[]),
        ("placement", &["shutdown", "workload"]),
        ("telemetry", &["clock", "shutdown"]),
    ];
    for (leaf, may) in allowed {
        let deps = &graph[*leaf];
        let extra: Vec<_> = deps.iter().filter(|d| !may.contains(&d.as_str())).collect();
        assert!(
            extra.is_empty(),
            "{leaf} is a leaf module but imports {extra:?}"
        );
    }
}

#[test]
fn the_modules_form_no_import_cycle() {
    let graph = imports();
    // Depth-first search; `path` is the chain from the root to the module being visited.
    fn visit<'a>(
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        module: &'a str,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) {
        if let Some(at) = path.iter().position(|m| *m == module) {
            panic!("import cycle: {} -> {module}", path[at..].join(" -> "));
        }
        if !done.insert(module) {
            return;
        }
        path.push(module);
        for dep in graph.get(module).into_iter().flatten() {
            visit(graph, dep, path, done);
        }
        path.pop();
    }
    let mut done = BTreeSet::new();
    for module in graph.keys() {
        visit(&graph, module, &mut Vec::new(), &mut done);
    }
}

#[test]
fn the_controller_names_no_mesh_type() {
    let mesh_words = [
        "appmesh",
        "app_mesh",
        "AppMesh",
        "VirtualRouter",
        "VirtualNode",
        "VirtualService",
    ];
    for (module, text) in sources() {
        if module != "controller" && !module.starts_with("controller/") {
            continue;
        }
        for word in mesh_words {
            assert!(
                !text.contains(word),
                "src/{module}.rs names the mesh type `{word}`; the router owns it"
            );
        }
    }
}

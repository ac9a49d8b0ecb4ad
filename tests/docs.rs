//! The README's reference tables and the architecture page must match the code.

use std::path::Path;

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

/// The text between `<!-- NAME:begin -->` and `<!-- NAME:end -->`.
fn block<'a>(text: &'a str, name: &str) -> &'a str {
    let begin = format!("<!-- {name}:begin -->\n");
    let end = format!("<!-- {name}:end -->");
    let start = text.find(&begin).unwrap_or_else(|| panic!("no {begin}")) + begin.len();
    let stop = text[start..]
        .find(&end)
        .unwrap_or_else(|| panic!("no {end}"))
        + start;
    &text[start..stop]
}

#[test]
fn readme_metrics_table_matches_the_registered_metrics() {
    let want = meshcanary::cli::metrics_table();
    assert_eq!(
        block(&read("docs/reference.md"), "metrics"),
        want,
        "docs/reference.md metrics table is stale: paste `meshcanary docs metrics` between the markers"
    );
}

#[test]
fn readme_flags_table_matches_the_cli() {
    assert_eq!(
        block(&read("docs/reference.md"), "flags"),
        meshcanary::cli::flags_table(),
        "docs/reference.md flags table is stale: paste `meshcanary docs flags` between the markers"
    );
}

#[test]
fn controller_flags_table_matches_the_cli() {
    assert_eq!(
        block(&read("docs/reference.md"), "controller-flags"),
        meshcanary::cli::controller_flags_table(),
        "docs/reference.md controller flags table is stale: paste `meshcanary docs controller-flags` between the markers"
    );
}

#[test]
fn readme_annotations_table_matches_the_parser() {
    assert_eq!(
        block(&read("docs/reference.md"), "annotations"),
        meshcanary::annotations::reference_table(),
        "docs/reference.md annotations table is stale: paste `meshcanary docs annotations` between the markers"
    );
}

/// The failure-modes page names only metrics the agent registers, and every test it cites
/// by function name exists.
#[test]
fn failure_modes_name_real_metrics_and_tests() {
    let page = read("docs/failure-modes.md");
    let registered = meshcanary::cli::metrics_table();
    let mut named = 0;
    for (i, _) in page.match_indices("meshcanary_") {
        let name: String = page[i..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_' || c.is_ascii_digit())
            .collect();
        assert!(
            registered.contains(&format!("`{name}`")),
            "docs/failure-modes.md names {name}, which the agent does not register"
        );
        named += 1;
    }
    assert!(named > 10, "{named} metrics named");
    let mut sources = String::new();
    for dir in ["src", "tests"] {
        let mut stack = vec![support_repo().join(dir)];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    sources.push_str(&std::fs::read_to_string(&p).unwrap());
                }
            }
        }
    }
    for cited in page.split('`').skip(1).step_by(2) {
        let last = cited.rsplit("::").next().unwrap_or(cited);
        let looks_like_test = last.len() > 20
            && !last.starts_with("meshcanary_")
            && last
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit());
        if looks_like_test {
            assert!(
                sources.contains(&format!("fn {last}(")),
                "docs/failure-modes.md cites a test `{last}` that does not exist"
            );
        }
    }
    for scenario in page.split("lab `").skip(1) {
        let file = scenario.split('`').next().unwrap();
        assert!(
            support_repo().join("lab").join(file).exists(),
            "docs/failure-modes.md cites lab/{file}"
        );
    }
}

fn support_repo() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn reference_limits_table_matches_the_constants() {
    assert_eq!(
        block(&read("docs/reference.md"), "limits"),
        meshcanary::cli::limits_table(),
        "docs/reference.md limits table is stale: paste `meshcanary docs limits` between the markers"
    );
}

#[test]
fn architecture_names_every_module_and_only_existing_files() {
    let arch = read("docs/architecture.md");
    for entry in std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("src")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".rs") && name != "lib.rs" && name != "main.rs" {
            assert!(
                arch.contains(&format!("`src/{name}`")),
                "docs/architecture.md does not mention src/{name}"
            );
        }
    }
    for word in arch
        .split('`')
        .filter(|w| w.starts_with("src/") && w.ends_with(".rs"))
    {
        assert!(
            Path::new(env!("CARGO_MANIFEST_DIR")).join(word).exists(),
            "{word} is named but missing"
        );
    }
}

fn yaml(path: &str) -> serde_json::Value {
    serde_norway::from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The queue's cap sits under the queue volume's size with room for what the cap lets
/// through (the segment being written and one batch): at the volume's limit the kubelet
/// evicts the pod and the queue is lost.
#[test]
fn the_queue_cap_fits_its_volume() {
    use clap::CommandFactory as _;
    let ds = yaml("manifests/daemonset.yaml");
    let pod = &ds["spec"]["template"]["spec"];
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "queue")
        .expect("a queue volume");
    let size = volume["emptyDir"]["sizeLimit"].as_str().unwrap();
    let volume_bytes: u64 = match size.strip_suffix("Gi") {
        Some(g) => g.parse::<u64>().unwrap() << 30,
        None => size.strip_suffix("Mi").unwrap().parse::<u64>().unwrap() << 20,
    };
    let args = pod["containers"][0]["args"].as_array().unwrap();
    assert!(
        !args
            .iter()
            .any(|a| a.as_str().unwrap_or("").contains("max-disk")),
        "the manifests use the default cap"
    );
    let cmd = meshcanary::cli::Cli::command();
    let agent = cmd.find_subcommand("agent").expect("agent subcommand");
    let default = agent
        .get_arguments()
        .find(|a| a.get_id() == "remote_write_max_disk")
        .and_then(|a| a.get_default_values().first().cloned())
        .expect("a default for --remote-write-max-disk");
    let cap = meshcanary::config::parse_bytes(default.to_str().unwrap()).unwrap() as u64;
    let overshoot = meshcanary::remote_write::queue::SEGMENT_BYTES
        + meshcanary::remote_write::MAX_BATCH_BYTES as u64;
    assert!(
        cap + overshoot + (64 << 20) <= volume_bytes,
        "--remote-write-max-disk {cap} (+{overshoot} overshoot, +64 MiB margin) must fit the {size} queue volume"
    );
}

/// No Docker engine here: the image recipe is checked against the manifests that run it
/// (user, ports, entrypoint, image name), and its build command is the one CI runs.
#[test]
fn dockerfile_and_manifests_agree() {
    let dockerfile = read("Dockerfile");
    let ds = yaml("manifests/daemonset.yaml");
    let pod = &ds["spec"]["template"];
    let c = &pod["spec"]["containers"][0];
    let image = c["image"].as_str().unwrap();
    assert!(image.starts_with("meshcanary/meshcanary:"), "{image}");
    assert!(dockerfile.contains(&format!(
        "names {}",
        &image["meshcanary/meshcanary:".len()..]
    )));
    assert!(
        read("README.md").contains(image),
        "README names the image {image}"
    );
    let uid = pod["spec"]["securityContext"]["runAsUser"]
        .as_u64()
        .unwrap();
    assert!(
        dockerfile.contains(&format!("\nUSER {uid}:{uid}\n")),
        "the image runs as {uid}"
    );
    assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"], true);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    let ports: Vec<String> = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let port = p["containerPort"].as_u64().unwrap();
            match p["protocol"].as_str() {
                Some("UDP") => format!("{port}/udp"),
                _ => port.to_string(),
            }
        })
        .collect();
    let exposed = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("EXPOSE "))
        .unwrap();
    assert_eq!(exposed, ports.join(" "));
    // The image ships the profile the resource benchmark measures.
    assert!(dockerfile.contains("cargo build --profile dist --locked --bin meshcanary"));
    assert!(dockerfile.contains("/src/target/dist/meshcanary /usr/local/bin/meshcanary"));
    let bench = read("scripts/bench-peers.sh");
    assert!(bench.contains("cargo build --profile dist --locked --bin meshcanary"));
    assert!(bench.contains("target/dist/meshcanary agent"));
    assert!(dockerfile.contains(r#"CMD ["agent"]"#));
    assert_eq!(c["args"][0], "agent");
    // The queue is the only writable path, and it is a volume.
    assert_eq!(c["volumeMounts"][0]["mountPath"], "/var/lib/meshcanary");
    // Own metrics: the scrape annotations and the PodMonitor point at the metrics port.
    let metrics_port = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "metrics")
        .unwrap()["containerPort"]
        .as_u64()
        .unwrap();
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], metrics_port.to_string());
    let pm = yaml("manifests/monitoring/podmonitor.yaml");
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["port"], "metrics");
    for (k, v) in pm["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(
            &pod["metadata"]["labels"][k], v,
            "the PodMonitor selects the agents"
        );
    }
}

/// Every error reason a `reason()`/`result()` method in the code can put on a metric label is
/// explained in docs/troubleshooting.md.
#[test]
fn troubleshooting_explains_every_error_reason() {
    let page = read("docs/troubleshooting.md");
    let mut reasons = Vec::new();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![src.clone()];
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for head in [
            "fn reason(&self) -> &'static str {",
            "fn result(&self) -> &'static str {",
        ] {
            for (at, _) in text.match_indices(head) {
                let body = &text[at..];
                let body = &body[..body.find("\n    }\n").unwrap_or(body.len())];
                for arm in body.split("=>").skip(1) {
                    let arm = arm.trim_start().trim_start_matches('{').trim_start();
                    if let Some(rest) = arm.strip_prefix('"') {
                        reasons.push(rest[..rest.find('"').unwrap()].to_owned());
                    }
                }
            }
        }
    }
    assert!(reasons.len() > 20, "found only {reasons:?}");
    for r in reasons {
        assert!(
            page.contains(&format!("`{r}`")) || page.contains(&format!("\"{r}\"")),
            "docs/troubleshooting.md does not explain reason {r:?}"
        );
    }
}

/// The README's links into the repository point at files that exist.
#[test]
fn readme_links_resolve() {
    let readme = read("README.md");
    let mut n = 0;
    for (at, _) in readme.match_indices("](") {
        let target = &readme[at + 2..];
        let target = &target[..target.find(')').unwrap()];
        if target.starts_with("http") {
            continue;
        }
        let path = target.split('#').next().unwrap();
        assert!(
            Path::new(env!("CARGO_MANIFEST_DIR")).join(path).exists(),
            "README links to {target}, which does not exist"
        );
        n += 1;
    }
    assert!(n >= 6, "README links to {n} files");
}

/// The migration guide names every Canary field meshcanary knows, in one of its tables
/// (honoured, honoured differently, not honoured), so a field added to `src/canary.rs`
/// cannot be left out of it.
#[test]
fn the_flagger_guide_names_every_canary_field() {
    let guide = read("docs/migrating-from-flagger.md");
    for (path, _) in meshcanary::canary::known_fields() {
        let last = path.rsplit('.').next().unwrap().trim_end_matches("[]");
        let dotted = path.replace("[]", "");
        assert!(
            guide.contains(&format!("`{last}`"))
                || guide.contains(&format!("`spec.{dotted}"))
                || guide.contains(&format!(".{last}`"))
                || guide.contains(&format!("`{last}.")),
            "docs/migrating-from-flagger.md does not name the Canary field spec.{path}"
        );
    }
}

//! The README's reference tables and the architecture page must match the code.

use std::path::Path;

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

/// The text between `<!-- NAME:begin -->` and `<!-- NAME:end -->`.
fn block<'a>(text: &'a str, name: &str) -> &'a str {
    let begin = format!("<!-- {name}:begin -->\n");
    let end = format!("<!-- {name}:end -->");
    let start = text
        .find(&begin)
        .unwrap_or_else(|| panic!("README has no {begin}"))
        + begin.len();
    let stop = text[start..]
        .find(&end)
        .unwrap_or_else(|| panic!("README has no {end}"))
        + start;
    &text[start..stop]
}

#[test]
fn readme_metrics_table_matches_the_registered_metrics() {
    let want = meshcanary::telemetry::Metrics::new().reference_table();
    assert_eq!(
        block(&read("README.md"), "metrics"),
        want,
        "README metrics table is stale: paste `meshcanary docs metrics` between the markers"
    );
}

#[test]
fn readme_flags_table_matches_the_cli() {
    assert_eq!(
        block(&read("README.md"), "flags"),
        meshcanary::cli::flags_table(),
        "README flags table is stale: paste `meshcanary docs flags` between the markers"
    );
}

#[test]
fn readme_annotations_table_matches_the_parser() {
    assert_eq!(
        block(&read("README.md"), "annotations"),
        meshcanary::annotations::reference_table(),
        "README annotations table is stale: paste `meshcanary docs annotations` between the markers"
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
    let ports: Vec<u64> = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["containerPort"].as_u64().unwrap())
        .collect();
    let exposed = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("EXPOSE "))
        .unwrap();
    assert_eq!(
        exposed,
        ports
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    );
    assert!(dockerfile.contains("cargo build --release --locked --bin meshcanary"));
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

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

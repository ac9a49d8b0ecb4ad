//! The parser on real Envoy 1.40 captures, against an independent parser, and on generated
//! input (render then parse back).

mod support;

use std::collections::BTreeMap;
use std::process::Command;

use meshcanary::parse::{render_sample, Parser};
use proptest::prelude::*;
use support::repo;

const FIXTURES: [&str; 3] = [
    "tests/fixtures/envoy-1.40-1-clusters.prom",
    "tests/fixtures/envoy-1.40-10-clusters.prom",
    "tests/fixtures/envoy-1.40-50-clusters.prom",
];

type Row = (String, BTreeMap<String, String>, u64, Option<i64>);

fn canonical(value: f64) -> u64 {
    if value.is_nan() {
        f64::NAN.to_bits()
    } else {
        value.to_bits()
    }
}

fn python() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("PYTHON_BIN") {
        return p.into();
    }
    let home = std::env::var_os("HOME").expect("HOME is set");
    let p = std::path::Path::new(&home).join(".cache/meshcanary/venv/bin/python");
    assert!(
        p.exists(),
        "the test virtualenv is missing: run scripts/testenv.sh"
    );
    p
}

#[test]
fn every_line_of_the_real_captures_parses() {
    for f in FIXTURES {
        let body = std::fs::read(repo().join(f)).unwrap();
        let text = std::str::from_utf8(&body).unwrap();
        let expected = text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .count();
        let samples: Vec<_> = Parser::new(&body).collect::<Result<_, _>>().unwrap();
        assert_eq!(samples.len(), expected, "{f}");
        let empty_braces = text.lines().filter(|l| l.contains("{} ")).count();
        assert!(empty_braces > 0, "{f} has name{{}} lines");
        assert_eq!(
            samples.iter().filter(|s| s.labels.is_empty()).count(),
            empty_braces
                + text
                    .lines()
                    .filter(|l| !l.starts_with('#') && !l.contains('{') && !l.is_empty())
                    .count()
        );
    }
}

#[test]
fn meshcanary_parse_reads_what_python_prometheus_client_reads() {
    for f in FIXTURES {
        let path = repo().join(f);
        let ours = Command::new(env!("CARGO_BIN_EXE_meshcanary"))
            .arg("parse")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            ours.status.success(),
            "meshcanary parse {f}: {}",
            String::from_utf8_lossy(&ours.stderr)
        );
        let theirs = Command::new(python())
            .arg(repo().join("tests/prom_client_dump.py"))
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            theirs.status.success(),
            "python: {}",
            String::from_utf8_lossy(&theirs.stderr)
        );

        let mut a: Vec<Row> = String::from_utf8(ours.stdout)
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                let value = match &v["value"] {
                    serde_json::Value::Number(n) => n.as_f64().unwrap(),
                    serde_json::Value::String(s) => match s.as_str() {
                        "NaN" => f64::NAN,
                        "+Inf" => f64::INFINITY,
                        "-Inf" => f64::NEG_INFINITY,
                        other => panic!("unexpected value string {other}"),
                    },
                    other => panic!("unexpected value {other}"),
                };
                (
                    v["name"].as_str().unwrap().to_owned(),
                    serde_json::from_value(v["labels"].clone()).unwrap(),
                    canonical(value),
                    v["timestamp_ms"].as_i64(),
                )
            })
            .collect();
        let mut b: Vec<Row> = String::from_utf8(theirs.stdout)
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                let value: f64 = v["value"].as_str().unwrap().parse().unwrap();
                (
                    v["name"].as_str().unwrap().to_owned(),
                    serde_json::from_value(v["labels"].clone()).unwrap(),
                    canonical(value),
                    v["timestamp"].as_f64().map(|t| (t * 1000.0).round() as i64),
                )
            })
            .collect();
        assert!(a.len() > 1000, "{f}: only {} samples", a.len());
        a.sort();
        b.sort();
        if a != b {
            let only_ours: Vec<_> = a.iter().filter(|r| !b.contains(r)).take(5).collect();
            let only_theirs: Vec<_> = b.iter().filter(|r| !a.contains(r)).take(5).collect();
            panic!(
            "{f}: {} vs {} samples; only meshcanary: {only_ours:?}; only prometheus_client: {only_theirs:?}",
                a.len(),
                b.len()
            );
        }
    }
}

fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z_:][a-zA-Z0-9_:]{0,20}"
}

fn label_name() -> impl Strategy<Value = String> {
    "[a-zA-Z_][a-zA-Z0-9_]{0,12}"
}

fn value() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<f64>(),
        (0u64..1_000_000_000).prop_map(|n| n as f64),
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Generated samples, rendered in the text format, parse back equal.
    #[test]
    fn rendered_samples_parse_back_equal(
        samples in prop::collection::vec((
            name(),
            prop::collection::btree_map(label_name(), "(?s).{0,16}", 0..5),
            value(),
            prop::option::of(any::<i64>()),
        ), 1..20)
    ) {
        let mut text = String::new();
        for (n, labels, v, ts) in &samples {
            let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            render_sample(&mut text, n, &labels, *v, *ts);
        }
        let parsed: Vec<_> = Parser::from_text(&text).collect::<Result<_, _>>().map_err(|e| TestCaseError::fail(format!("{e} in {text:?}")))?;
        prop_assert_eq!(parsed.len(), samples.len());
        for (p, (n, labels, v, ts)) in parsed.iter().zip(&samples) {
            prop_assert_eq!(p.name, n.as_str());
            let got: BTreeMap<String, String> = p.labels.iter().map(|l| (l.name.to_owned(), l.value().into_owned())).collect();
            prop_assert_eq!(&got, labels);
            prop_assert_eq!(canonical(p.value), canonical(*v));
            prop_assert_eq!(p.timestamp_ms, *ts);
        }
    }

    /// Arbitrary bytes never panic and every line yields at most one result.
    #[test]
    fn arbitrary_input_never_panics(body in prop::collection::vec(any::<u8>(), 0..512)) {
        let lines = body.split(|&b| b == b'\n').count();
        prop_assert!(Parser::new(&body).count() <= lines);
    }
}

//! The Grafana dashboard cannot rot: every metric any of its queries names is exported by a
//! running agent (read from its live `/metrics`) or by the controller (its registry, encoded
//! as its `/metrics` does), and it has the variables it promises.

mod support;

use std::collections::BTreeSet;

fn exprs(dashboard: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.push(target["expr"].as_str().expect("a PromQL expr").to_owned());
        }
    }
    for a in dashboard["annotations"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        out.extend(a["expr"].as_str().map(str::to_owned));
    }
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        out.extend(v["query"]["query"].as_str().map(str::to_owned));
    }
    out
}

#[tokio::test]
async fn every_metric_the_dashboard_queries_is_exported_by_an_agent_or_the_controller() {
    let path = support::repo().join("manifests/grafana/meshcanary.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).expect("valid JSON");
    let agent = support::RunningAgent::start(&[], 1 << 20).await;
    support::wait_ok(
        &format!("http://{}/healthz", agent.listen),
        std::time::Duration::from_secs(10),
        "the agent",
    )
    .await;
    let live = agent.metrics().await;
    let controller = meshcanary::cli::ControllerProcessMetrics::new()
        .registry
        .encode();
    let families: BTreeSet<&str> = live
        .lines()
        .chain(controller.lines())
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let name = regex::Regex::new(r"meshcanary_[a-z0-9_]+").unwrap();
    let mut named = BTreeSet::new();
    for expr in exprs(&dashboard) {
        for m in name.find_iter(&expr) {
            let metric = m.as_str();
            // A family is exposed once; its series add _total, _bucket, _sum, _count.
            let exported = ["", "_total", "_bucket", "_sum", "_count"]
                .iter()
                .any(|suffix| {
                    metric
                        .strip_suffix(suffix)
                        .is_some_and(|family| families.contains(family))
                });
            assert!(
                exported,
                "{metric} (in `{expr}`) is exported by neither the agent nor the controller"
            );
            named.insert(metric.to_owned());
        }
    }
    assert!(named.len() >= 20, "the dashboard names only {named:?}");
    // Importable anywhere: a data source variable every query uses, and the two filters.
    let vars: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(vars, ["datasource", "namespace", "workload"]);
    for panel in dashboard["panels"].as_array().unwrap() {
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "panel {} has a fixed data source",
            panel["title"]
        );
    }
    agent.shutdown().await;
}

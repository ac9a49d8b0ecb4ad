//! The lab as a program (`tests/support/lab.rs` describes it): a real control plane with
//! two nodes, the primary and canary pods as test apps behind real Envoy sidecars, a
//! gateway Envoy that follows the VirtualRouter, one `meshcanary agent` per node and two
//! `meshcanary controller` replicas.
//!
//! With `--scenario FILE` (see `tests/support/scenario.rs` and `lab/*.yaml`) it runs the
//! scenario, prints the event stream and one line per rollout, writes the measurements as
//! JSON lines to `--results FILE` if given, and exits (status 1 if a rollout did not end as
//! expected). `scripts/demo.sh` and `scripts/bench-ttr.sh` run it this way.
//!
//! Without a scenario it prints `KEY=value` lines once ready (KUBECONFIG, APEX, CANARY,
//! GATEWAY_ADMIN, LAB_DIR, AGENT_<NODE>) and runs until SIGTERM or Ctrl-C, for poking at
//! by hand with kubectl, hey and curl.
//!
//! With `--router gateway-api` the lab is Istio's and the Gateway API's shape instead of App
//! Mesh's: Istio-shaped sidecars, an HTTPRoute the gateway follows (see `tests/support/lab.rs`).
//! With `--statsd` the sidecars send per-request latency to their node's agent through
//! Envoy's DogStatsD sink. `--envoy-flush` sets the sidecars' stats flush (when their
//! Prometheus histograms move): 1 s by default here, Envoy's own default is 5 s.
//!
//! `lab [--scenario FILE [--runs N] [--results FILE]] [--router app-mesh|gateway-api] [--statsd] [--envoy-flush 1s] [--meshcanary PATH] [--net 127.0.0] [--dir DIR] [--window 30s]`

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::time::Duration;

fn secs(s: &str) -> Duration {
    let n = s.trim_end_matches('s');
    Duration::from_secs(
        n.parse()
            .unwrap_or_else(|_| panic!("{s:?}: expected seconds, e.g. 30s")),
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let here = std::env::current_exe().expect("own path");
    // target/<profile>/examples/lab -> target/<profile>/meshcanary
    let default_bin = here
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("meshcanary"))
        .unwrap_or_else(|| PathBuf::from("meshcanary"));
    let mut options = support::lab::LabOptions::new(default_bin);
    options.net = "127.0.0".into();
    options.window = Duration::from_secs(30);
    let (mut scenario, mut results, mut runs) = (None, None, None);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--scenario" => scenario = Some(PathBuf::from(value())),
            "--results" => results = Some(PathBuf::from(value())),
            "--runs" => runs = Some(value().parse::<usize>().expect("--runs N")),
            "--meshcanary" => options.meshcanary = value().into(),
            "--net" => options.net = value(),
            "--dir" => options.dir = Some(value().into()),
            "--window" => options.window = secs(&value()),
            "--statsd" => options.statsd = true,
            "--envoy-flush" => options.envoy_flush = value(),
            "--router" => {
                options.router = value()
                    .parse()
                    .unwrap_or_else(|e| panic!("--router: {e}"));
            }
            other => panic!(
                "unknown argument {other:?}; usage: lab [--scenario FILE [--runs N] [--results FILE]] [--router app-mesh|gateway-api] [--statsd] [--envoy-flush 1s] [--meshcanary PATH] [--net 127.0.0] [--dir DIR] [--window 30s]"
            ),
        }
    }
    let scenario = scenario.map(|path| {
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let mut s = support::scenario::Scenario::parse(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        s.runs = runs.unwrap_or(s.runs);
        s
    });
    let mut lab = support::lab::Lab::start(options).await;
    if let Some(scenario) = scenario {
        println!(
            "lab: scenario {} ({} run(s), router {}); {}",
            scenario.name,
            scenario.runs,
            lab.options.router,
            scenario.description.trim()
        );
        let out = support::scenario::run(&mut lab, &scenario, |line| println!("{line}")).await;
        if let Some(path) = results {
            let lines: String = out
                .iter()
                .map(|r| {
                    format!(
                        "{}\n",
                        serde_json::json!({
                            "scenario": scenario.name,
                            "run": r.run,
                            "image": r.image,
                            "expect": format!("{:?}", r.expect).to_lowercase(),
                            "outcome": format!("{:?}", r.outcome).to_lowercase(),
                            "seconds": r.seconds,
                            "ttr_router": r.ttr_router,
                            "ttr_gateway": r.ttr_gateway,
                            "false_rollback": r.false_rollback(),
                        })
                    )
                })
                .collect();
            std::fs::write(&path, lines)
                .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        }
        println!();
        for r in &out {
            println!("summary: {}", r.summary());
        }
        let ok = out.iter().all(|r| r.as_expected());
        if let Some(p) = &lab.prometheus {
            // Prometheus's data goes with the lab; its log stays with the agents'.
            let _ = std::fs::copy(
                p.dir.path.join("prometheus.log"),
                lab.dir.join("prometheus.log"),
            );
        }
        drop(lab);
        std::process::exit(i32::from(!ok));
    }
    println!("KUBECONFIG={}", lab.cp.kubeconfig.display());
    println!("APEX={}", lab.apex_url());
    println!("CANARY={}", lab.canary.sidecar.ingress_url());
    println!(
        "CANARY_APP_ADMIN=http://127.0.0.1:{}/admin/fault",
        lab.canary.app.port
    );
    println!("GATEWAY_ADMIN=http://127.0.0.1:{}", lab.gateway.admin_port);
    println!("LAB_DIR={}", lab.dir.display());
    println!("ENVOY_ADMIN_PORT={}", lab.admin_port);
    if let Some(p) = &lab.prometheus {
        println!(
            "PROMETHEUS=http://127.0.0.1:{} (log in {})",
            p.port,
            p.dir.path.display()
        );
    }
    for a in lab.agents.values() {
        println!(
            "AGENT_{}=http://{}:9102",
            a.node.replace('-', "_").to_uppercase(),
            a.ip
        );
    }
    for c in lab.controllers.values() {
        println!(
            "CONTROLLER_{}=http://{}:9102",
            c.pod.rsplit('-').next().unwrap_or_default(),
            c.ip
        );
    }
    println!("READY=1");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    drop(lab);
}

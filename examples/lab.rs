//! The lab as a program (`tests/support/lab.rs` describes it): a real control plane with
//! two nodes, the primary and canary pods as test apps behind real Envoy sidecars, a
//! gateway Envoy that follows the VirtualRouter, and one `meshcanary agent` per node.
//!
//! Prints `KEY=value` lines once ready (KUBECONFIG, APEX, CANARY, GATEWAY_ADMIN, LAB_DIR,
//! AGENT_<NODE>), then runs until SIGTERM or Ctrl-C and stops everything it started.
//! `scripts/demo.sh` and `scripts/bench-ttr.sh` drive it with kubectl, hey and curl.
//!
//! `lab [--meshcanary PATH] [--net 127.0.0] [--dir DIR] [--window 30s]`

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
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--meshcanary" => options.meshcanary = value().into(),
            "--net" => options.net = value(),
            "--dir" => options.dir = Some(value().into()),
            "--window" => options.window = secs(&value()),
            other => panic!(
                "unknown argument {other:?}; usage: lab [--meshcanary PATH] [--net 127.0.0] [--dir DIR] [--window 30s]"
            ),
        }
    }
    let lab = support::lab::Lab::start(options).await;
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
    for a in lab.agents.values() {
        println!(
            "AGENT_{}=http://{}:9102",
            a.node.replace('-', "_").to_uppercase(),
            a.ip
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

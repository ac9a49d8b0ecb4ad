//! A local Kubernetes for the demo: etcd, kube-apiserver and kube-controller-manager (the
//! binaries from `scripts/testenv.sh --kube`), App Mesh's CRDs (the tests' minimal ones), a
//! mesh namespace `test`, and the kubelet stand-in of the tests, which binds every pod to
//! `demo-node` and gives it a loopback pod IP: `--primary-ip` for pods of `*-primary`
//! Deployments, `--canary-ip` for the others (where the demo's Envoy sidecars listen).
//!
//! Prints `KUBECONFIG=<path>` once ready, then runs until SIGTERM or Ctrl-C and stops every
//! process it started.
//!
//! `lab --primary-ip 127.0.0.2 --canary-ip 127.0.0.3`

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (mut primary_ip, mut canary_ip) = ("127.0.0.2".to_owned(), "127.0.0.3".to_owned());
    while let Some(a) = args.next() {
        match a.as_str() {
            "--primary-ip" => primary_ip = args.next().expect("--primary-ip IP"),
            "--canary-ip" => canary_ip = args.next().expect("--canary-ip IP"),
            other => {
                panic!("unknown argument {other:?}; usage: lab [--primary-ip IP] [--canary-ip IP]")
            }
        }
    }
    let cp = support::kube::ControlPlane::start().await;
    cp.mesh_namespace("test").await;
    let placement: support::kube::Placement = Arc::new(move |pod| {
        let rs = pod
            .metadata
            .owner_references
            .as_ref()
            .and_then(|o| o.first())
            .map(|o| o.name.clone())
            .unwrap_or_default();
        let primary = rs.contains("-primary-");
        (
            "demo-node".to_owned(),
            if primary {
                primary_ip.clone()
            } else {
                canary_ip.clone()
            },
        )
    });
    let kubelet = support::kube::Kubelet::start(cp.client().await, placement);
    println!("KUBECONFIG={}", cp.kubeconfig.display());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    drop(kubelet);
    drop(cp);
}

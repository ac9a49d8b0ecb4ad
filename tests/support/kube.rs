//! A real Kubernetes control plane for the tests: etcd, kube-apiserver and
//! kube-controller-manager (deployment, replicaset, serviceaccount and garbage-collector
//! controllers) on loopback, plus a kubelet stand-in that binds pods to named nodes and
//! marks them Running and Ready through the status subresource. The binaries come from
//! `scripts/testenv.sh --kube` (KUBEBUILDER_ASSETS or the cached build of Debian's source).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use super::{free_port, TempDir};

const TOKEN: &str = "meshcanary-test-admin-token";

fn bin(var: &str, name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(var) {
        return p.into();
    }
    let home = std::env::var_os("HOME").expect("HOME is set");
    let p = Path::new(&home)
        .join(".cache/meshcanary/kube/bin")
        .join(name);
    assert!(
        p.exists(),
        "{name} not found: run scripts/testenv.sh --kube (or set {var})"
    );
    p
}

fn spawn(cmd: &mut Command, log: &Path) -> Child {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    let err = out.try_clone().expect("log file");
    cmd.stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"))
}

/// etcd + kube-apiserver + kube-controller-manager, stopped on drop.
pub struct ControlPlane {
    pub dir: TempDir,
    pub kubeconfig: PathBuf,
    pub port: u16,
    etcd: Option<Child>,
    apiserver: Option<Child>,
    kcm: Option<Child>,
    etcd_port: u16,
}

impl ControlPlane {
    pub async fn start() -> ControlPlane {
        let dir = TempDir::new("kube");
        let d = dir.path.clone();
        let (etcd_port, peer_port, port) = (free_port(), free_port(), free_port());
        let etcd = spawn(
            Command::new(std::env::var_os("ETCD_BIN").unwrap_or_else(|| "etcd".into()))
                .arg("--data-dir")
                .arg(d.join("etcd"))
                .arg(format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"))
                .arg(format!(
                    "--advertise-client-urls=http://127.0.0.1:{etcd_port}"
                ))
                .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"))
                .arg(format!(
                    "--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"
                ))
                .arg(format!(
                    "--initial-cluster=default=http://127.0.0.1:{peer_port}"
                )),
            &d.join("etcd.log"),
        );
        let key = d.join("sa.key");
        let ok = Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&key)
            .arg("2048")
            .stderr(Stdio::null())
            .status()
            .expect("openssl");
        assert!(ok.success());
        std::fs::write(
            d.join("tokens.csv"),
            format!("{TOKEN},admin,admin,system:masters\n"),
        )
        .unwrap();
        let kubeconfig = d.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- cluster: {{server: \"https://127.0.0.1:{port}\", insecure-skip-tls-verify: true}}\n  name: local\nusers:\n- name: admin\n  user: {{token: {TOKEN}}}\ncontexts:\n- context: {{cluster: local, user: admin}}\n  name: local\ncurrent-context: local\n"
            ),
        )
        .unwrap();
        let mut cp = ControlPlane {
            dir,
            kubeconfig,
            port,
            etcd: Some(etcd),
            apiserver: None,
            kcm: None,
            etcd_port,
        };
        cp.start_apiserver().await;
        let d = cp.dir.path.clone();
        cp.kcm = Some(spawn(
            Command::new(bin(
                "KUBE_CONTROLLER_MANAGER_BIN",
                "kube-controller-manager",
            ))
            .arg(format!("--kubeconfig={}", cp.kubeconfig.display()))
            .arg("--controllers=deployment,replicaset,serviceaccount,garbagecollector")
            .args([
                "--leader-elect=false",
                "--port=0",
                "--secure-port=0",
                "--bind-address=127.0.0.1",
            ])
            .args([
                "--use-service-account-credentials=false",
                "--concurrent-gc-syncs=5",
            ]),
            &d.join("kcm.log"),
        ));
        cp.kubectl(&[
            "apply",
            "-f",
            super::repo()
                .join("tests/fixtures/appmesh-crds.yaml")
                .to_str()
                .unwrap(),
        ]);
        // The Gateway API's HTTPRoute, as the kube-rs project's gateway-api crate generates it.
        let crd = d.join("httproute-crd.json");
        std::fs::write(&crd, http_route_crd()).expect("writing the HTTPRoute CRD");
        cp.kubectl(&["apply", "-f", crd.to_str().unwrap()]);
        let client = cp.client().await;
        // CRDs take a moment to be served.
        let deadline = Instant::now() + Duration::from_secs(30);
        for ar in [
            meshcanary::router::appmesh::resource("VirtualRouter"),
            meshcanary::router::gatewayapi::resource("v1"),
        ] {
            loop {
                let api: Api<kube::api::DynamicObject> = Api::all_with(client.clone(), &ar);
                if api.list(&ListParams::default()).await.is_ok() {
                    break;
                }
                assert!(Instant::now() < deadline, "{} never served", ar.kind);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        cp
    }

    /// Start the apiserver (again) on its port and etcd, and wait until it is ready.
    pub async fn start_apiserver(&mut self) {
        let d = self.dir.path.clone();
        let port = self.port;
        self.apiserver = Some(spawn(
            Command::new(bin("KUBE_APISERVER_BIN", "kube-apiserver"))
                .arg(format!(
                    "--etcd-servers=http://127.0.0.1:{}",
                    self.etcd_port
                ))
                .arg("--bind-address=127.0.0.1")
                .arg("--advertise-address=127.0.0.1")
                .arg(format!("--secure-port={port}"))
                .arg(format!("--cert-dir={}", d.join("certs").display()))
                .arg(format!(
                    "--token-auth-file={}",
                    d.join("tokens.csv").display()
                ))
                .arg("--authorization-mode=RBAC")
                .arg(format!(
                    "--service-account-key-file={}",
                    d.join("sa.key").display()
                ))
                .arg(format!(
                    "--service-account-signing-key-file={}",
                    d.join("sa.key").display()
                ))
                .arg("--service-account-issuer=https://kubernetes.default.svc")
                .arg("--disable-admission-plugins=ServiceAccount")
                .arg("--service-cluster-ip-range=10.96.0.0/16"),
            &d.join("apiserver.log"),
        ));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ok = Command::new("curl")
                .args(["-skf", "-o", "/dev/null", "-H"])
                .arg(format!("Authorization: Bearer {TOKEN}"))
                .arg(format!("https://127.0.0.1:{port}/readyz"))
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "kube-apiserver not ready; see {}",
                d.display()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stop the apiserver (SIGKILL) and start it again on the same port and etcd.
    pub async fn restart_apiserver(&mut self) {
        self.stop_apiserver();
        self.start_apiserver().await;
    }

    /// Stop the apiserver (SIGKILL); [`Self::start_apiserver`] brings it back.
    pub fn stop_apiserver(&mut self) {
        if let Some(mut c) = self.apiserver.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub async fn client(&self) -> Client {
        let kc = Kubeconfig::read_from(&self.kubeconfig).expect("kubeconfig");
        let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .expect("kube config");
        Client::try_from(config).expect("kube client")
    }

    /// The kubeconfig of a ServiceAccount of `manifests/` in namespace `meshcanary`
    /// (impersonated), so its RBAC is exercised by every call the code makes.
    pub fn account_kubeconfig(&self, account: &str) -> Kubeconfig {
        let mut kc = Kubeconfig::read_from(&self.kubeconfig).expect("kubeconfig");
        for user in &mut kc.auth_infos {
            if let Some(auth) = user.auth_info.as_mut() {
                auth.impersonate = Some(format!("system:serviceaccount:meshcanary:{account}"));
                auth.impersonate_groups = Some(vec![
                    "system:serviceaccounts".into(),
                    "system:serviceaccounts:meshcanary".into(),
                    "system:authenticated".into(),
                ]);
            }
        }
        kc
    }

    /// The agents' ServiceAccount (read-only).
    pub fn agent_kubeconfig(&self) -> Kubeconfig {
        self.account_kubeconfig("meshcanary")
    }

    /// The controller's ServiceAccount (the write verbs).
    pub fn controller_kubeconfig(&self) -> Kubeconfig {
        self.account_kubeconfig("meshcanary-controller")
    }

    async fn client_of(kc: Kubeconfig) -> Client {
        let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .expect("kube config");
        Client::try_from(config).expect("kube client")
    }

    /// A client that acts as the agents' ServiceAccount.
    pub async fn agent_client(&self) -> Client {
        Self::client_of(self.agent_kubeconfig()).await
    }

    /// A client that acts as the controller's ServiceAccount.
    pub async fn controller_client(&self) -> Client {
        Self::client_of(self.controller_kubeconfig()).await
    }

    /// Whether `account` (in namespace `meshcanary`) may `verb` `resource` in `namespace`,
    /// as `kubectl auth can-i --as=system:serviceaccount:meshcanary:ACCOUNT` answers it.
    /// `resource` may name a subresource: `canaries.flagger.app/status`.
    pub fn can_i(&self, account: &str, verb: &str, resource: &str, namespace: &str) -> bool {
        let (resource, subresource) = resource.split_once('/').unwrap_or((resource, ""));
        let out = Command::new("kubectl")
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(["auth", "can-i", verb, resource, "-n", namespace])
            .arg(format!("--subresource={subresource}"))
            .arg(format!("--as=system:serviceaccount:meshcanary:{account}"))
            .output()
            .expect("kubectl");
        let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        match answer.as_str() {
            "yes" => true,
            "no" => false,
            _ => panic!(
                "kubectl auth can-i {verb} {resource}: {answer} {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }

    /// Run kubectl against this control plane; panics with its output if it fails.
    pub fn kubectl(&self, args: &[&str]) -> String {
        let out = Command::new("kubectl")
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(args)
            .output()
            .expect("kubectl");
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A namespace that App Mesh's sidecar injector would serve.
    pub async fn mesh_namespace(&self, name: &str) {
        let api: Api<Namespace> = Api::all(self.client().await);
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"appmesh.k8s.aws/sidecarInjectorWebhook": "enabled"}}
        }))
        .unwrap();
        match api.create(&PostParams::default(), &ns).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.is_already_exists() => {}
            Err(e) => panic!("creating namespace {name}: {e}"),
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for c in [&mut self.kcm, &mut self.apiserver, &mut self.etcd]
            .into_iter()
            .flatten()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Where the kubelet stand-in puts a pod: its node, and the pod IP it reports.
pub type Placement = std::sync::Arc<dyn Fn(&Pod) -> (String, String) + Send + Sync>;

/// The kubelet stand-in: every 200 ms, bind unbound pods (placement decides node and IP)
/// and mark bound pods Running and Ready. Stops when dropped.
pub struct Kubelet {
    task: tokio::task::JoinHandle<()>,
}

impl Kubelet {
    pub fn start(client: Client, placement: Placement) -> Kubelet {
        let task = tokio::spawn(async move {
            let pods: Api<Pod> = Api::all(client.clone());
            loop {
                if let Ok(list) = pods.list(&ListParams::default()).await {
                    for pod in list {
                        let _ = Self::visit(&client, &pod, &placement).await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Kubelet { task }
    }

    async fn visit(client: &Client, pod: &Pod, placement: &Placement) -> Result<(), kube::Error> {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        if pod.metadata.deletion_timestamp.is_some() {
            // No containers to stop: finish the deletion the kubelet would do.
            let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
            let dp = kube::api::DeleteParams {
                grace_period_seconds: Some(0),
                ..Default::default()
            };
            api.delete(&name, &dp).await?;
            return Ok(());
        }
        let (node, ip) = placement(pod);
        let bound = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        if bound.is_none() {
            let binding = serde_json::json!({
                "apiVersion": "v1", "kind": "Binding",
                "metadata": {"name": name, "namespace": ns},
                "target": {"apiVersion": "v1", "kind": "Node", "name": node},
            });
            let req = http::Request::post(format!("/api/v1/namespaces/{ns}/pods/{name}/binding"))
                .header("content-type", "application/json")
                .body(serde_json::to_vec(&binding).unwrap())
                .unwrap();
            client.request_text(req).await?;
            return Ok(());
        }
        let running = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Running");
        if !running {
            let now = k8s_openapi::jiff::Timestamp::now().to_string();
            let status = serde_json::json!({"status": {
                "phase": "Running",
                "podIP": ip,
                "podIPs": [{"ip": ip}],
                "hostIP": "127.0.0.1",
                "startTime": now,
                "conditions": [
                    {"type": "Ready", "status": "True", "lastTransitionTime": now},
                    {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
                    {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                ],
            }});
            let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
            api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                .await?;
        }
        Ok(())
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The HTTPRoute CustomResourceDefinition (JSON) of the gateway-api crate, with two changes
/// for this apiserver (v1.20): the approval annotation every CRD of a `*.k8s.io` group needs
/// (the crate's generated CRD lacks it; the upstream manifests carry it), and no `null` in
/// `enum` lists (the schema's `nullable: true` already admits null, and v1.20 rejects a
/// schema whose enum holds it with a misleading "identical per-version schemas" error).
pub fn http_route_crd() -> String {
    use kube_gateway::CustomResourceExt as _;
    fn no_null_in_enums(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, child) in map.iter_mut() {
                    if k == "enum" {
                        if let Some(values) = child.as_array_mut() {
                            values.retain(|x| !x.is_null());
                        }
                    } else {
                        no_null_in_enums(child);
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(no_null_in_enums),
            _ => {}
        }
    }
    let mut crd = serde_json::to_value(gateway_api::httproutes::HttpRoute::crd())
        .expect("the HTTPRoute CRD serializes");
    no_null_in_enums(&mut crd);
    crd["metadata"]["annotations"] = serde_json::json!({
        "api-approved.kubernetes.io": "https://github.com/kubernetes-sigs/gateway-api/pull/1538"
    });
    serde_json::to_string_pretty(&crd).expect("the HTTPRoute CRD serializes")
}

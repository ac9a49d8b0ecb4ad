//! The controller: the elected leader's loop that runs rollouts of opted-in Deployments.
//!
//! It keeps a cache of Deployments (a kube-runtime reflector) and, once per decision tick
//! while it holds the Lease, reconciles each opted-in one: parse its annotations
//! ([`crate::annotations`]), read what the cluster and the judge say into a
//! [`rollout::Observed`], call the pure [`rollout::step`], write the new status (guarded by
//! `resourceVersion`), then carry out the actions: bootstrap objects by server-side apply
//! (field manager `meshcanary`), scale, promote, set weights through the [`Router`], and
//! publish Events in Flagger's words. Every write first checks the leader flag, so losing
//! the Lease stops writes at once. A failed API call is logged, counted in
//! `meshcanary_controller_errors_total` and retried at the next tick; nothing is half-applied
//! because the status is the desired state and every tick converges to it.
//!
//! Leader election: `kube-lease-manager` (maintained, kube 5, server-side apply on a
//! `coordination.k8s.io/v1` Lease, tolerant of clock skew; a dropped manager releases the
//! Lease so a graceful stop hands over at once, while a crash hands over after the lease
//! duration).

pub mod alerts;
pub mod events;
pub mod hooks;
pub mod metrics;
pub mod objects;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{FutureExt as _, StreamExt as _};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ObjectReference, Service};
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt as _};
use kube::{Client, Resource as _, ResourceExt as _};
use tokio::sync::watch;

use crate::analysis::{Analysis, Judgements};

/// While some rollback test has come this far towards its boundary (e-value over boundary),
/// the controller looks again after [`LOOK_SOONER_SPLIT`]-th of a decision interval. Under a
/// healthy canary e-values hover around 1, some hundredths of their boundaries at most.
pub const LOOK_SOONER_PROGRESS: f64 = 0.01;
pub const LOOK_SOONER_SPLIT: u32 = 4;
use crate::annotations::{self, RolloutPolicy};
use crate::canary::{self, CanaryWorkload, Taking};
use crate::judge::Judgement;
use crate::rollout::{self, Action, DeploymentState, Observed, Phase, Severity, Status};
use crate::router::{Foreign, Router};
use crate::window::{Summary, WindowSource};
use crate::workload::WorkloadId;
use metrics::{ControllerMetrics, DecisionLabels, JudgeLabels, OperationLabels, PhaseLabels};
use objects::{template_hash, Plan};

pub use crate::router::FIELD_MANAGER;

/// How often, by default, the objects of a workload past bootstrap are checked for owners
/// and drift (`--resync-interval`).
pub const RESYNC: Duration = Duration::from_secs(60);

/// How often a workload held back by objects someone else owns is checked again.
pub const CONFLICT_RECHECK: Duration = Duration::from_secs(10);

/// Workloads whose owners and drift are re-checked in one decision tick, at most: the
/// others that are due wait for the next tick, so a burst of re-checks (workloads created
/// together) never makes a tick late for the rollouts it decides.
pub const RECHECKS_PER_TICK: usize = 4;

/// How the controller runs.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// How often every rollout is reconciled and judged.
    pub decision_interval: Duration,
    /// `None` runs without election (one agent, or tests).
    pub lease: Option<LeaseConfig>,
    /// Name of the Envoy sidecar container.
    pub envoy_container: String,
    /// The router of a workload without `meshcanary.io/router`.
    pub router: crate::router::RouterKind,
    /// Which Flagger Canaries it runs.
    pub canaries: crate::canary::Taking,
    /// This agent's identity (pod or node name): Lease holder and Event reporter instance.
    pub identity: String,
    /// `/healthz` fails once the loop has not run for this long (the kubelet then restarts
    /// the pod): ten decision ticks, and at least 30 s.
    pub liveness_bound: Duration,
    /// How often a workload's objects are checked for owners and re-applied ([`RESYNC`]).
    pub resync: Duration,
}

impl ControllerConfig {
    /// The liveness bound for a decision interval: ten ticks, at least 30 s.
    pub fn liveness_bound_for(decision_interval: Duration) -> Duration {
        (decision_interval * 10).max(Duration::from_secs(30))
    }
}

#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    pub duration: Duration,
}

/// Errors of one reconcile, by operation; each is retried at the next tick.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("{op} {what}: {source}")]
    Api {
        op: &'static str,
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    Router(#[from] crate::router::RouterError),
    #[error("lost the Lease; not writing")]
    NotLeader,
}

impl ReconcileError {
    fn labels(&self) -> OperationLabels {
        match self {
            ReconcileError::Api { op, source, .. } => OperationLabels {
                operation: op,
                reason: match source {
                    kube::Error::Api(s) if s.is_conflict() => "conflict",
                    kube::Error::Api(s) if s.is_forbidden() => "forbidden",
                    kube::Error::Api(s) if s.is_not_found() => "not_found",
                    kube::Error::Api(_) => "rejected",
                    _ => "unreachable",
                },
            },
            ReconcileError::Router(e) => OperationLabels {
                operation: "setting weights",
                reason: e.reason(),
            },
            ReconcileError::NotLeader => OperationLabels {
                operation: "writing",
                reason: "not_leader",
            },
        }
    }
}

fn api_error(
    op: &'static str,
    what: impl Into<String>,
) -> impl FnOnce(kube::Error) -> ReconcileError {
    let what = what.into();
    move |source| ReconcileError::Api { op, what, source }
}

/// Who asks for a workload's rollout: its Events go there, and it owns what meshcanary
/// creates for it.
#[derive(Clone, Copy)]
enum Source<'a> {
    /// The Deployment's own `meshcanary.io/*` annotations.
    Annotations,
    /// A Flagger Canary, already read.
    Canary(&'a DynamicObject, &'a CanaryWorkload),
}

impl Source<'_> {
    fn subject(&self, dep: &Deployment) -> ObjectReference {
        match self {
            Source::Annotations => dep.object_ref(&()),
            Source::Canary(canary, _) => canary.object_ref(&canary::api_resource()),
        }
    }
}

/// The rollout controller of one agent.
pub struct Controller<R, W> {
    client: Client,
    router: R,
    windows: W,
    config: ControllerConfig,
    metrics: ControllerMetrics,
    events: events::Events,
    /// The analysis: judge state per workload, reset when an analysis starts, and the
    /// published verdicts. A new leader starts without evidence, which can only delay a
    /// rollback, never cause one.
    analysis: Analysis,
    /// The last invalid-configuration message per workload, so the Warning Event is sent
    /// once per distinct problem rather than once per tick.
    invalid: HashMap<WorkloadId, String>,
    /// The last reconcile error per workload, to log each distinct one once.
    failing: HashMap<WorkloadId, String>,
    /// Per workload: when its objects are next checked for owners and drift, and the
    /// ownership conflict last reported.
    synced: HashMap<WorkloadId, Instant>,
    conflicts: HashMap<WorkloadId, String>,
    /// Per workload, the refusal of its route last reported (a route its parents do not
    /// accept halts the rollout; one Warning per distinct refusal).
    refused: HashMap<WorkloadId, String>,
    /// Per workload, the pods without inbound-cluster stats last reported.
    no_inbound: HashMap<WorkloadId, Vec<String>>,
    /// Per workload, the nodes without an answering agent last logged.
    unobserved: HashMap<WorkloadId, Vec<String>>,
    /// Workloads whose gauges are exported, to drop them when the workload goes.
    exported: Vec<WorkloadId>,
    /// Periodic re-checks still allowed in this tick ([`RECHECKS_PER_TICK`]).
    rechecks_left: usize,
    /// Calls Canaries' webhooks and keeps their answers.
    hooks: hooks::HookRunner,
    /// Sends Canaries' alerts.
    alerts: alerts::AlertSender,
    /// Beaten every loop iteration, for `/healthz`.
    heartbeat: crate::telemetry::Heartbeat,
    /// Set once the Deployment cache has synced, for `/readyz`.
    ready: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl<R: Router, W: WindowSource> Controller<R, W> {
    pub fn new(
        client: Client,
        router: R,
        windows: W,
        config: ControllerConfig,
        metrics: ControllerMetrics,
    ) -> Self {
        let events = events::Events::new(client.clone(), config.identity.clone());
        let hooks = hooks::HookRunner::new(metrics.webhook_calls.clone());
        let alerts = alerts::AlertSender::new(client.clone(), metrics.alerts.clone());
        Controller {
            hooks,
            alerts,
            client,
            router,
            windows,
            config,
            metrics,
            events,
            analysis: Analysis::default(),
            invalid: HashMap::new(),
            exported: Vec::new(),
            rechecks_left: RECHECKS_PER_TICK,
            unobserved: HashMap::new(),
            synced: HashMap::new(),
            conflicts: HashMap::new(),
            refused: HashMap::new(),
            no_inbound: HashMap::new(),
            failing: HashMap::new(),
            heartbeat: crate::telemetry::Heartbeat::default(),
            ready: None,
        }
    }

    /// Set `ready` once the Deployment cache has synced (`/readyz`).
    #[must_use]
    pub fn with_ready(mut self, ready: Arc<std::sync::atomic::AtomicBool>) -> Self {
        self.ready = Some(ready);
        self
    }

    /// Beat `heartbeat` every loop iteration (the agent's `/healthz` watches it).
    pub fn with_heartbeat(mut self, heartbeat: crate::telemetry::Heartbeat) -> Self {
        self.heartbeat = heartbeat;
        self
    }

    /// Publish verdicts into `judgements` (for `/metrics`).
    #[must_use]
    pub fn publish_judgements(mut self, judgements: Judgements) -> Self {
        self.analysis = self.analysis.publishing(judgements);
        self
    }

    /// Run until `shutdown`: keep the Deployment cache, take part in the election, and
    /// reconcile every tick while leading.
    ///
    /// ### Errors
    /// None today: the election and API errors are retried with backoff. (The signature
    /// keeps room for a fatal setup error.)
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let (store, writer) = reflector::store::<Deployment>();
        let deployments: Api<Deployment> = Api::all(self.client.clone());
        let stream = reflector::reflector(writer, watcher(deployments, watcher::Config::default()))
            .default_backoff()
            .applied_objects();
        let cache = tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(item) = stream.next().await {
                if let Err(error) = item {
                    tracing::warn!(%error, "Watching Deployments failed; retrying");
                }
            }
        });
        let canaries = (self.config.canaries != Taking::Off).then(|| self.watch_canaries());
        // Joined lazily and again whenever it stops: an apiserver that is down when the
        // pod starts, or a Lease task that fails later, must not end the controller.
        let mut lease: Option<(watch::Receiver<bool>, tokio::task::JoinHandle<_>)> = None;
        let always = watch::channel(true).1;
        let mut retry_at = Instant::now();
        let mut backoff = Duration::from_secs(1);
        self.heartbeat
            .arm(self.config.liveness_bound, crate::clock::unix_ms());
        let mut tick = tokio::time::interval(self.config.decision_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut was_leader = false;
        // An extra look before the next tick while a rollback test is building up evidence.
        let mut sooner: Option<tokio::time::Instant> = None;
        loop {
            let extra = async {
                match sooner {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = crate::shutdown::stopping(&mut shutdown) => break,
                _ = tick.tick() => {}
                () = extra => {
                    self.metrics.sooner_ticks.inc();
                }
            }
            sooner = None;
            self.heartbeat.beat(crate::clock::unix_ms());
            if let Some(cfg) = &self.config.lease {
                if lease.as_ref().is_some_and(|(_, task)| task.is_finished()) {
                    tracing::warn!("The Lease manager stopped; not leading until it is back");
                    lease = None;
                }
                if lease.is_none() && Instant::now() >= retry_at {
                    match tokio::time::timeout(Duration::from_secs(5), self.join_election(cfg))
                        .await
                    {
                        Ok(Ok(manager)) => {
                            lease = Some(manager.watch().await);
                            backoff = Duration::from_secs(1);
                            tracing::info!(identity = %self.config.identity, "Joined the leader election");
                        }
                        failed => {
                            let error = match failed {
                                Ok(Err(e)) => e.to_string(),
                                _ => "no answer within 5 s".to_owned(),
                            };
                            tracing::warn!(%error, retry_in = ?backoff, "Joining the leader election failed (is the apiserver up?); retrying");
                            retry_at = Instant::now() + backoff;
                            backoff = (backoff * 2).min(Duration::from_secs(30));
                        }
                    }
                }
            }
            let leader = match (&self.config.lease, &lease) {
                (None, _) => &always,
                (Some(_), Some((rx, _))) => rx,
                (Some(_), None) => {
                    self.metrics.leader.set(0);
                    was_leader = false;
                    continue;
                }
            };
            let is_leader = *leader.borrow();
            self.metrics.leader.set(i64::from(is_leader));
            if is_leader != was_leader {
                tracing::info!(identity = %self.config.identity, leader = is_leader, "Leadership changed");
                was_leader = is_leader;
            }
            // The first sync of the Deployment cache may wait for the apiserver: within the
            // tick, so the loop (and its heartbeat) goes on.
            let synced =
                tokio::time::timeout(self.config.decision_interval, store.wait_until_ready()).await;
            if !matches!(synced, Ok(Ok(()))) {
                continue;
            }
            if let Some(ready) = &self.ready {
                ready.store(true, std::sync::atomic::Ordering::Release);
            }
            if !is_leader {
                continue;
            }
            let leader = leader.clone();
            let started = Instant::now();
            let canaries = canaries.as_ref().map(|(store, _)| store);
            self.tick(&store, canaries, &leader).await;
            self.metrics.tick.observe(started.elapsed().as_secs_f64());
            // The sequential tests are anytime-valid: looking more often costs them nothing,
            // and while one of them is on its way a decision is due sooner than a tick.
            if self.analysis.take_progress() >= LOOK_SOONER_PROGRESS {
                sooner = Some(
                    tokio::time::Instant::now() + self.config.decision_interval / LOOK_SOONER_SPLIT,
                );
            }
        }
        cache.abort();
        if let Some((_, task)) = &canaries {
            task.abort();
        }
        // Dropping the receiver makes the manager release the Lease: a graceful handover.
        if let Some((rx, task)) = lease {
            drop(rx);
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
        Ok(())
    }

    async fn join_election(
        &self,
        lease: &LeaseConfig,
    ) -> Result<kube_lease_manager::LeaseManager, kube_lease_manager::LeaseManagerError> {
        let secs = lease.duration.as_secs().max(2);
        kube_lease_manager::LeaseManagerBuilder::new(self.client.clone(), &lease.name)
            .with_namespace(&lease.namespace)
            .with_identity(&self.config.identity)
            .with_duration(secs)
            .with_grace((secs / 3).max(1))
            .with_field_manager(FIELD_MANAGER)
            .build()
            .await
    }

    /// Keep a cache of Flagger Canaries. Without the CRD (no Flagger, and
    /// `manifests/canary-crd/` not applied) the watch fails and retries with backoff; that
    /// is said once at warn level, and every annotated Deployment runs as before.
    fn watch_canaries(&self) -> (Store<DynamicObject>, tokio::task::JoinHandle<()>) {
        let ar = canary::api_resource();
        let writer = reflector::store::Writer::<DynamicObject>::new(ar.clone());
        let store = writer.as_reader();
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &ar);
        let stream = reflector::reflector(writer, watcher(api, watcher::Config::default()))
            .default_backoff()
            .applied_objects();
        let task = tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            let mut said = false;
            while let Some(item) = stream.next().await {
                match item {
                    Err(error) if !said => {
                        tracing::warn!(%error, "Watching Flagger Canaries failed (is the canaries.flagger.app CRD installed? manifests/canary-crd/); retrying, Deployments run meanwhile");
                        said = true;
                    }
                    Err(error) => tracing::debug!(%error, "Watching Flagger Canaries failed again"),
                    Ok(_) => said = false,
                }
            }
        });
        (store, task)
    }

    /// Reconcile every opted-in Deployment and every Canary meshcanary runs once.
    async fn tick(
        &mut self,
        store: &Store<Deployment>,
        canaries: Option<&Store<DynamicObject>>,
        leader: &watch::Receiver<bool>,
    ) {
        let all = store.state();
        // The Canaries meshcanary runs; `None` until their cache has synced (until then a
        // Deployment marked for a Canary is neither run nor let go).
        let canaries: Option<Vec<Arc<DynamicObject>>> = match canaries {
            None => Some(Vec::new()),
            Some(s) => s
                .wait_until_ready()
                .now_or_never()
                .is_some_and(|r| r.is_ok())
                .then(|| s.state()),
        };
        let canaries: Option<Vec<Arc<DynamicObject>>> = canaries.map(|cs| {
            cs.into_iter()
                .filter(|c| self.config.canaries.takes(c.annotations()))
                .collect()
        });
        // The Deployments those Canaries target: (namespace, name).
        let targeted: std::collections::HashSet<(String, String)> = canaries
            .iter()
            .flatten()
            .map(|c| (c.namespace().unwrap_or_default(), canary_target(c)))
            .collect();
        let analysis: Vec<WorkloadId> = all
            .iter()
            .filter(|d| annotations::managed(d.annotations()))
            .filter(|d| {
                read_status(d)
                    .ok()
                    .flatten()
                    .is_some_and(|s| s.phase == Phase::Progressing && s.analysing)
            })
            .map(|d| WorkloadId::new(d.namespace().unwrap_or_default(), d.name_any()))
            .collect();
        self.windows.refresh(analysis).await;
        self.rechecks_left = RECHECKS_PER_TICK;
        let mut seen = Vec::new();
        for dep in &all {
            let key = (dep.namespace().unwrap_or_default(), dep.name_any());
            if targeted.contains(&key) && !annotations::enabled(dep.annotations()) {
                // Run for its Canary, below.
                continue;
            }
            if !annotations::enabled(dep.annotations()) {
                let marked = dep.annotations().contains_key(annotations::CANARY);
                if marked && canaries.is_none() {
                    continue;
                }
                if dep.annotations().contains_key(annotations::STATUS) {
                    // Opted out: if an analysis was running, its canary still has traffic.
                    let status = read_status(dep).ok().flatten();
                    let why = if marked {
                        "no Canary that meshcanary runs targets it any more".to_owned()
                    } else {
                        format!("{} is no longer \"true\"", annotations::ENABLED)
                    };
                    let released = self
                        .let_go(dep, Source::Annotations, status.as_ref(), &why, leader)
                        .await;
                    let released = match released {
                        Ok(()) if marked => self.unmark(dep, leader).await,
                        other => other,
                    };
                    if let Err(error) = released {
                        self.count_error(&error);
                        tracing::warn!(namespace = %key.0, workload = %key.1, %error, "Routing an opted-out canary's traffic to the primary failed; retrying at the next tick");
                    }
                }
                continue;
            }
            let id = WorkloadId::new(key.0, key.1);
            seen.push(id.clone());
            let result = self
                .reconcile(dep, Source::Annotations, store, leader)
                .await;
            self.reconciled(&id, result);
        }
        for canary in canaries.iter().flatten() {
            self.run_canary(canary, store, &mut seen, leader).await;
        }
        self.analysis.retain(|id| seen.contains(id));
        self.invalid.retain(|k, _| seen.contains(k));
        self.failing.retain(|k, _| seen.contains(k));
        self.unobserved.retain(|k, _| seen.contains(k));
        self.synced.retain(|k, _| seen.contains(k));
        self.conflicts.retain(|k, _| seen.contains(k));
        self.refused.retain(|k, _| seen.contains(k));
        self.no_inbound.retain(|k, _| seen.contains(k));
        self.hooks.retain(|k| seen.contains(k));
        for id in std::mem::take(&mut self.exported) {
            if !seen.contains(&id) {
                self.forget(JudgeLabels::from(&id));
            }
        }
        self.exported = seen;
    }

    /// Run one Canary: read its spec, and reconcile its target Deployment as an annotated
    /// one would be, with the Canary as the subject of Events and the owner of the objects.
    /// A Canary that cannot run as written gets one Warning Event per distinct problem and
    /// is left alone (a canary that had traffic is first routed back to the primary).
    async fn run_canary(
        &mut self,
        canary: &DynamicObject,
        store: &Store<Deployment>,
        seen: &mut Vec<WorkloadId>,
        leader: &watch::Receiver<bool>,
    ) {
        let namespace = canary.namespace().unwrap_or_default();
        let name = canary.name_any();
        let subject = canary.object_ref(&canary::api_resource());
        let id = WorkloadId::new(&*namespace, canary_target(canary));
        if seen.contains(&id) {
            let problem = format!(
                "Deployment {namespace}/{} is already run by meshcanary (its own {} annotation, or another Canary)",
                id.name,
                annotations::ENABLED
            );
            // Keyed by the Canary, not the Deployment someone else runs.
            let key = WorkloadId::new(&*namespace, format!("canary/{name}"));
            let message = format!("{problem}; meshcanary leaves Canary {name}.{namespace} alone");
            self.warn_once(&subject, &key, "OwnershipConflict", problem, message)
                .await;
            seen.push(key);
            return;
        }
        seen.push(id.clone());
        let dep = store.get(&ObjectRef::new(&id.name).within(&namespace));
        let labels = JudgeLabels::from(&id);
        let read = canary::read(canary.annotations(), &canary.data["spec"]);
        let result = match (&read, &dep) {
            (Err(e), _) => {
                self.metrics.rollout_invalid.get_or_create(&labels).set(1);
                let released = match &dep {
                    Some(dep) => {
                        let status = read_status(dep).ok().flatten();
                        let why = "its Canary is not one meshcanary runs as written";
                        self.let_go(dep, Source::Annotations, status.as_ref(), why, leader)
                            .await
                    }
                    None => Ok(()),
                };
                let message = format!("{e}; meshcanary leaves Canary {name}.{namespace} alone");
                self.warn_once(&subject, &id, e.reason(), e.to_string(), message)
                    .await;
                released
            }
            (Ok(_), None) => {
                self.metrics.rollout_invalid.get_or_create(&labels).set(1);
                let problem = format!(
                    "spec.targetRef: Deployment {namespace}/{} does not exist",
                    id.name
                );
                let message = format!("{problem}; meshcanary waits for it");
                self.warn_once(&subject, &id, "TargetNotFound", problem, message)
                    .await;
                Ok(())
            }
            // Suspended: nothing is done until it is resumed (Flagger's `suspend`).
            (Ok(read), Some(_)) if read.suspend => Ok(()),
            (Ok(read), Some(dep)) => {
                self.reconcile(dep, Source::Canary(canary, read), store, leader)
                    .await
            }
        };
        self.reconciled(&id, result);
    }

    /// Log and count what a reconcile returned: each distinct error once, not once a tick.
    fn reconciled(&mut self, id: &WorkloadId, result: Result<(), ReconcileError>) {
        let error = match result {
            Ok(()) => {
                self.failing.remove(id);
                return;
            }
            Err(error) => error,
        };
        self.count_error(&error);
        let message = error.to_string();
        let conflict = matches!(&error, ReconcileError::Api { source: kube::Error::Api(s), .. } if s.is_conflict());
        if conflict {
            // The cache was a moment behind the API; the next tick decides again.
            tracing::debug!(namespace = %id.namespace, workload = %id.name, %error, "Stale read; deciding again at the next tick");
        } else if self.failing.get(id) != Some(&message) {
            tracing::warn!(namespace = %id.namespace, workload = %id.name, %error, "Reconcile failed; retrying at every tick");
            self.failing.insert(id.clone(), message);
        } else {
            tracing::debug!(namespace = %id.namespace, workload = %id.name, %error, "Reconcile failed again");
        }
    }

    /// Show the rollout on its Canary in Flagger's shape (`status`, through the status
    /// subresource), when what the Canary shows differs.
    async fn show_on_canary(
        &self,
        canary: &DynamicObject,
        status: &Status,
        leader: &watch::Receiver<bool>,
    ) -> Result<(), ReconcileError> {
        let desired = canary::flagger_status(status);
        let current = &canary.data["status"];
        // Compared on the fields every version of Flagger's CRD keeps (a CRD that prunes
        // one of the others must not make this a write at every tick).
        let shown = canary::SHOWN_FIELDS
            .iter()
            .all(|k| current.get(*k) == desired.get(*k));
        if shown {
            return Ok(());
        }
        self.ensure_leader(leader)?;
        let (namespace, name) = (canary.namespace().unwrap_or_default(), canary.name_any());
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &namespace, &canary::api_resource());
        api.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "status": desired })),
        )
        .await
        .map_err(api_error(
            "writing the status of",
            format!("Canary {namespace}/{name}"),
        ))?;
        Ok(())
    }

    /// Take a Deployment's Canary mark off once its canary has no traffic: the agents stop
    /// scraping it.
    async fn unmark(
        &self,
        dep: &Deployment,
        leader: &watch::Receiver<bool>,
    ) -> Result<(), ReconcileError> {
        self.ensure_leader(leader)?;
        let (namespace, name) = (dep.namespace().unwrap_or_default(), dep.name_any());
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), &namespace);
        let patch = serde_json::json!({"metadata": {"annotations": {annotations::CANARY: null}}});
        api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(api_error(
                "unmarking",
                format!("Deployment {namespace}/{name}"),
            ))?;
        tracing::info!(namespace = %namespace, workload = %name, "No Canary meshcanary runs targets the Deployment any more; let go");
        Ok(())
    }

    /// A Warning Event for a configuration problem, once per distinct problem rather than
    /// once per tick.
    async fn warn_once(
        &mut self,
        subject: &ObjectReference,
        id: &WorkloadId,
        reason: &'static str,
        problem: String,
        message: String,
    ) {
        if self.invalid.get(id) == Some(&problem) {
            return;
        }
        tracing::warn!(%problem, reason, "{message}");
        self.event(subject, Severity::Warning, reason, message)
            .await;
        self.invalid.insert(id.clone(), problem);
    }

    /// A Warning Event when sidecars of the workload export no stats of their inbound
    /// cluster (their requests are not counted), once per distinct set of pods.
    async fn warn_no_inbound(
        &mut self,
        subject: &ObjectReference,
        id: &WorkloadId,
        pods: Vec<String>,
    ) {
        if pods.is_empty() {
            if self.no_inbound.remove(id).is_some() {
                tracing::info!(
                    "Every sidecar of the workload exports its inbound cluster's stats again"
                );
            }
            return;
        }
        if self.no_inbound.get(id) == Some(&pods) {
            return;
        }
        let message = format!(
            "the sidecars of {} export no stats of their inbound cluster, so their requests are not counted: with Istio, add the proxy.istio.io/config proxyStatsMatcher annotation (docs/quickstart.md); otherwise check --cluster-regex or meshcanary.io/cluster-regex",
            pods.join(", ")
        );
        tracing::warn!(reason = "NoInboundStats", "{message}");
        self.event(subject, Severity::Warning, "NoInboundStats", message)
            .await;
        self.no_inbound.insert(id.clone(), pods);
    }

    fn count_error(&self, error: &ReconcileError) {
        self.metrics.errors.get_or_create(&error.labels()).inc();
    }

    /// A workload meshcanary no longer runs (opted out, or its annotations do not parse)
    /// whose canary may still have traffic: route everything to the primary, verified, and
    /// record a status that starts a new analysis if it is handed back.
    async fn let_go(
        &mut self,
        dep: &Deployment,
        source: Source<'_>,
        status: Option<&Status>,
        why: &str,
        leader: &watch::Receiver<bool>,
    ) -> Result<(), ReconcileError> {
        let active = status.is_some_and(|s| {
            s.canary_weight > 0
                || matches!(
                    s.phase,
                    Phase::Progressing | Phase::Promoting | Phase::Finalising
                )
        });
        if !active {
            return Ok(());
        }
        let decided = Instant::now();
        let (namespace, name) = (dep.namespace().unwrap_or_default(), dep.name_any());
        let target =
            annotations::target_of(dep.annotations(), &namespace, &name, self.config.router);
        let weight = match self.router.canary_weight(&target).await {
            Ok(w) | Err(crate::router::RouterError::NotAccepted { weight: w, .. }) => Some(w),
            // No routing object: nothing can send the canary traffic.
            Err(crate::router::RouterError::NotFound { .. }) => Some(0),
            Err(error) => return Err(error.into()),
        };
        let who = rollout::Workload {
            name: &name,
            namespace: &namespace,
        };
        let Some(tr) = rollout::release(status, weight, &who, why, crate::clock::unix_ms()) else {
            return Ok(());
        };
        if status != Some(&tr.status) {
            self.write_status(dep, source, &tr.status, leader).await?;
        }
        let subject = source.subject(dep);
        for action in tr.actions {
            self.ensure_leader(leader)?;
            match action {
                Action::SetWeight(w) => self.set_weight(&target, w, decided).await?,
                Action::Event {
                    severity,
                    reason,
                    message,
                } => {
                    tracing::warn!(namespace = %namespace, workload = %name, reason, "{message}");
                    self.event(&subject, severity, reason, message).await;
                }
                _ => {}
            }
        }
        Ok(())
    }

    async fn set_weight(
        &self,
        target: &crate::router::Target,
        weight: u8,
        decided: Instant,
    ) -> Result<(), ReconcileError> {
        self.router.set_canary_weight(target, weight).await?;
        self.metrics
            .weight_applied
            .observe(decided.elapsed().as_secs_f64());
        tracing::info!(
            weight,
            elapsed_ms = decided.elapsed().as_millis() as u64,
            "Canary weight set and verified"
        );
        Ok(())
    }

    /// Drop the gauges of a workload that is gone or no longer opted in.
    fn forget(&self, labels: JudgeLabels) {
        let m = &self.metrics;
        for family in [
            &m.rollout_weight,
            &m.rollout_failed_checks,
            &m.rollout_threshold,
            &m.rollout_invalid,
        ] {
            family.remove(&labels);
        }
        for family in [
            &m.rollout_success_rate,
            &m.rollout_success_rate_min,
            &m.rollout_p99,
            &m.rollout_p99_max,
        ] {
            family.remove(&labels);
        }
        for phase in Phase::ALL {
            m.rollout_phase.remove(&PhaseLabels {
                namespace: labels.namespace.clone(),
                workload: labels.workload.clone(),
                phase: phase.as_str(),
            });
        }
    }

    #[tracing::instrument(skip_all, fields(namespace = dep.namespace().unwrap_or_default(), workload = dep.name_any()))]
    async fn reconcile(
        &mut self,
        dep: &Deployment,
        source: Source<'_>,
        store: &Store<Deployment>,
        leader: &watch::Receiver<bool>,
    ) -> Result<(), ReconcileError> {
        let decided = Instant::now();
        let namespace = dep.namespace().unwrap_or_default();
        let name = dep.name_any();
        let id = WorkloadId::new(&*namespace, &*name);
        let labels = JudgeLabels {
            namespace: namespace.clone(),
            workload: name.clone(),
        };
        let now_ms = crate::clock::unix_ms();
        let subject = source.subject(dep);
        // The stored status is outside input too: one that does not parse or holds numbers
        // no step writes is reported and replaced by a fresh start, never computed with.
        let status = match read_status(dep).map_err(|e| e.to_string()).and_then(|s| {
            s.map(|s| s.validate(now_ms).map(|()| s).map_err(|e| e.to_string()))
                .transpose()
        }) {
            Ok(status) => status,
            Err(problem) => {
                let problem = format!(
                    "annotation {} is not a status meshcanary wrote ({problem})",
                    annotations::STATUS
                );
                let message = format!(
                    "{problem}; meshcanary starts {name}.{namespace} over from the primary's revision"
                );
                self.warn_once(&subject, &id, "InvalidStatus", problem, message)
                    .await;
                None
            }
        };
        // Configuration first: a problem is reported once and the workload left untouched,
        // except that a canary with traffic is first routed back to the primary.
        let policy = match source {
            Source::Annotations => annotations::parse(dep.annotations()),
            Source::Canary(_, read) => Ok(read.policy.clone()),
        };
        let checked = policy.map_err(|e| e.to_string()).and_then(|policy| {
            let routing = policy
                .routing
                .resolve(self.config.router)
                .map_err(|e| e.to_string())?;
            Plan::new(dep, policy.port, &self.config.envoy_container)
                .map(|plan| match source {
                    Source::Annotations => plan,
                    Source::Canary(canary, read) => {
                        plan.for_canary(canary, &read.port_name, read.autoscaler.clone())
                    }
                })
                .map(|plan| (policy, plan.routed(routing)))
                .map_err(|e| format!("Deployment {namespace}/{name}: {e}"))
        });
        let (policy, plan) = match checked {
            Ok(ok) => ok,
            Err(problem) => {
                self.metrics.rollout_invalid.get_or_create(&labels).set(1);
                self.let_go(
                    dep,
                    source,
                    status.as_ref(),
                    "its configuration is invalid",
                    leader,
                )
                .await?;
                let message = format!("{problem}; meshcanary leaves {name}.{namespace} untouched");
                self.warn_once(&subject, &id, "InvalidConfiguration", problem, message)
                    .await;
                return Ok(());
            }
        };
        self.metrics.rollout_invalid.remove(&labels);
        if status.is_some() {
            self.invalid.remove(&id);
        }
        // Objects NAME needs that someone else owns are not taken over: checked before
        // bootstrap, and with the drift re-apply every `resync` after it.
        let bootstrapping = status
            .as_ref()
            .is_none_or(|s| s.phase == Phase::Initializing);
        let conflicted = self.conflicts.contains_key(&id);
        let mut due = self.synced.get(&id).is_none_or(|at| Instant::now() >= *at);
        if due && !bootstrapping {
            // A running rollout's re-check is housekeeping: within the tick's budget.
            due = self.rechecks_left > 0;
            self.rechecks_left = self.rechecks_left.saturating_sub(1);
        }
        if bootstrapping && conflicted && !due {
            return Ok(());
        }
        if bootstrapping || due {
            let mut foreign = self.foreign(&plan, store).await?;
            if policy.adopt && !foreign.is_empty() && foreign.iter().all(|f| f.orphan) {
                self.adopt(&plan, &foreign).await?;
                foreign = self.foreign(&plan, store).await?;
                // The primary in the cache may still show no owner: the next check sees it.
                foreign.retain(|f| !(f.orphan && f.kind == "Deployment"));
            }
            if foreign.is_empty() {
                if self.conflicts.remove(&id).is_some() {
                    tracing::info!("No object of the workload is someone else's any more");
                }
                if !bootstrapping {
                    self.resync(&plan).await?;
                }
                // Spread over time: workloads bootstrapped together must not all re-check
                // in the same tick.
                let next = self.config.resync.mul_f64(0.75 + fastrand::f64() / 2.0);
                self.synced.insert(id.clone(), Instant::now() + next);
            } else {
                let names: Vec<String> = foreign.iter().map(ToString::to_string).collect();
                let problem = format!(
                    "{} already exist and are not owned by Deployment {namespace}/{name}",
                    names.join(", ")
                );
                if self.conflicts.get(&id) != Some(&problem) {
                    let orphans = if foreign.iter().all(|f| f.orphan) {
                        ", or set meshcanary.io/adopt: \"true\" to take over these orphans"
                    } else {
                        ""
                    };
                    let message = if bootstrapping {
                        format!("{problem}; meshcanary does not take them over and leaves {name}.{namespace} alone (delete or rename them{orphans})")
                    } else {
                        format!("{problem}; meshcanary no longer re-applies them (delete them to let it recreate its own)")
                    };
                    tracing::warn!(objects = ?names, "{message}");
                    self.event(&subject, Severity::Warning, "OwnershipConflict", message)
                        .await;
                    self.conflicts.insert(id.clone(), problem);
                }
                let next = CONFLICT_RECHECK.min(self.config.resync);
                self.synced.insert(id.clone(), Instant::now() + next);
                if bootstrapping {
                    self.metrics.rollout_invalid.get_or_create(&labels).set(1);
                    return Ok(());
                }
            }
        }

        let primary = store
            .get(&ObjectRef::new(&plan.primary_name()).within(&namespace))
            .map(|p| deployment_state(&p, true));
        let target = plan.target();
        let mut refused = false;
        let weight = match self.router.canary_weight(&target).await {
            Err(error @ crate::router::RouterError::NotAccepted { weight, .. }) => {
                let problem = error.to_string();
                self.count_error(&ReconcileError::Router(error));
                if self.refused.get(&id) != Some(&problem) {
                    let message = format!(
                        "{problem}; meshcanary halts {name}.{namespace} until it is accepted (no analysis step while it is refused; progress-deadline still applies)"
                    );
                    tracing::warn!(reason = "RouteNotAccepted", "{message}");
                    self.event(&subject, Severity::Warning, "RouteNotAccepted", message)
                        .await;
                    self.refused.insert(id.clone(), problem);
                }
                // Its weights move no traffic, so nothing the windows say is about them: the
                // analysis sees no data (a halt, bounded by progress-deadline like any other),
                // and everything else goes on, weight writes included.
                refused = true;
                Some(weight)
            }
            Ok(w) => {
                if self.refused.remove(&id).is_some() {
                    tracing::info!("The route is accepted again; the rollout goes on");
                }
                Some(w)
            }
            Err(crate::router::RouterError::NotFound { .. }) => None,
            Err(error) => {
                tracing::debug!(%error, "Router not readable");
                None
            }
        };
        let (judgement, analysed) = match &status {
            Some(s) if s.phase == Phase::Progressing && s.analysing && refused => {
                let verdict = crate::judge::Verdict::NoData {
                    reason: "route_not_accepted",
                };
                let evidence = crate::judge::Evidence::default();
                (Some(Judgement { verdict, evidence }), None)
            }
            Some(s) if s.phase == Phase::Progressing && s.analysing => {
                let started = s.step_started_ms;
                let (j, canary, no_inbound) = self.judge(&id, &policy, now_ms, started);
                self.warn_no_inbound(&subject, &id, no_inbound).await;
                (Some(j), canary)
            }
            _ => (None, None),
        };
        let observed = Observed {
            canary: deployment_state(dep, false),
            primary,
            weight,
            judgement: judgement.clone(),
            hooks: self.hooks.answers(&id),
        };
        let who = rollout::Workload {
            name: &name,
            namespace: &namespace,
        };
        let tr = rollout::step(status.as_ref(), &observed, &policy, &who, now_ms);
        if status.as_ref() != Some(&tr.status) {
            self.write_status(dep, source, &tr.status, leader).await?;
        }
        if let Source::Canary(canary, _) = source {
            self.show_on_canary(canary, &tr.status, leader).await?;
        }
        self.export(&labels, &tr.status, &policy, analysed.as_ref());
        for (hook, kind, error) in self.hooks.new_failures(&id) {
            let message = format!("Webhook {hook} ({kind}) of {name}.{namespace} failed: {error}");
            tracing::warn!(reason = "WebhookFailed", "{message}");
            self.event(&subject, Severity::Warning, "WebhookFailed", message)
                .await;
        }
        let payload =
            |hook: &crate::webhook::Webhook,
             metadata: Option<std::collections::BTreeMap<String, String>>| {
                crate::webhook::Payload {
                    name: subject.name.clone().unwrap_or_default(),
                    namespace: namespace.clone(),
                    phase: tr.status.flagger_phase().to_owned(),
                    checksum: tr.status.revision.clone(),
                    metadata: metadata.unwrap_or_else(|| hook.metadata.clone()),
                }
            };
        for problem in self.alerts.failures(&id) {
            let message = format!("Sending an alert about {name}.{namespace} failed: {problem}");
            tracing::warn!(reason = "AlertFailed", "{message}");
            self.event(&subject, Severity::Warning, "AlertFailed", message)
                .await;
        }
        let mut calls = Vec::new();
        let mut notes = Vec::new();
        let mut alerts = Vec::new();
        for action in &tr.actions {
            match action {
                Action::Alert(alert) if !policy.alerts.is_empty() => alerts.push(alert.clone()),
                Action::CallHook { name, after_ms } => {
                    if let Some(hook) = policy.webhooks.iter().find(|h| &h.name == name) {
                        calls.push((hook, payload(hook, None), *after_ms));
                    }
                }
                Action::Event {
                    severity, message, ..
                } => {
                    let warning = *severity == Severity::Warning;
                    for hook in policy
                        .webhooks
                        .iter()
                        .filter(|h| h.kind == crate::webhook::HookKind::Event)
                    {
                        let metadata = crate::webhook::event_metadata(message, warning, now_ms);
                        notes.push((hook, payload(hook, Some(metadata))));
                    }
                }
                _ => {}
            }
        }
        // Told as soon as decided (the status is written), so a router write that fails
        // below does not lose a rollback's alert or an Event's webhook.
        self.ensure_leader(leader)?;
        for (hook, payload, after_ms) in calls {
            self.hooks.call(&id, hook, payload, after_ms, now_ms);
        }
        for (hook, payload) in notes {
            self.hooks.notify(hook, payload);
        }
        let who = subject.name.clone().unwrap_or_default();
        for alert in &alerts {
            self.alerts.send(&id, &who, &policy.alerts, alert);
        }
        for action in tr.actions {
            self.ensure_leader(leader)?;
            match action {
                Action::Bootstrap => self.bootstrap(dep, &plan, store).await?,
                Action::ScaleCanary(n) => self.scale(&namespace, &name, n).await?,
                Action::Promote => {
                    // `step` promotes only the analysed revision; this copy is of the same
                    // snapshot, so it holds here too. Checked again because a wrong copy
                    // is the one mistake a rollout cannot take back.
                    if observed.canary.template_hash != tr.status.revision {
                        tracing::warn!(analysed = %tr.status.revision, current = %observed.canary.template_hash, "Not promoting: the template is not the analysed revision");
                        continue;
                    }
                    let replicas = observed.primary.as_ref().map_or(1, |p| p.replicas);
                    let primary = plan.primary(dep, replicas);
                    self.apply::<Deployment>(&namespace, &plan.primary_name(), &primary)
                        .await?;
                }
                Action::SetWeight(w) => self.set_weight(&target, w, decided).await?,
                Action::ResetJudge => {
                    self.analysis.reset(&id, &policy.judge);
                }
                // Carried out above.
                Action::CallHook { .. } | Action::Alert(_) => {}
                Action::Decision(d) => {
                    self.metrics
                        .decisions
                        .get_or_create(&DecisionLabels {
                            namespace: namespace.clone(),
                            workload: name.clone(),
                            kind: d.as_str(),
                        })
                        .inc();
                }
                Action::Event {
                    severity,
                    reason,
                    message,
                } => {
                    match severity {
                        Severity::Warning => tracing::warn!(reason, "{message}"),
                        Severity::Normal => tracing::info!(reason, "{message}"),
                    }
                    self.event(&subject, severity, reason, message).await;
                }
            }
        }
        Ok(())
    }

    /// The judge's verdict on a workload under analysis (published for `/metrics`), and the
    /// canary window it analysed.
    fn judge(
        &mut self,
        id: &WorkloadId,
        policy: &RolloutPolicy,
        now_ms: u64,
        step_started_ms: u64,
    ) -> (Judgement, Option<Summary>, Vec<String>) {
        let unobserved = self.windows.uncovered(&id.namespace, &id.name);
        if unobserved.is_empty() {
            self.unobserved.remove(id);
        } else if self.unobserved.get(id) != Some(&unobserved) {
            tracing::warn!(namespace = %id.namespace, workload = %id.name, nodes = ?unobserved, "No meshcanary agent answers on nodes that run the workload's pods; its analysis halts until one does (is the DaemonSet's pod there and Running?)");
            self.unobserved.insert(id.clone(), unobserved);
        }
        let (judgement, pair) =
            self.analysis
                .judge(&self.windows, id, &policy.judge, now_ms, step_started_ms);
        let no_inbound = pair
            .as_ref()
            .map(|p| p.no_inbound.clone())
            .unwrap_or_default();
        (judgement, pair.map(|p| p.canary), no_inbound)
    }

    fn export(
        &self,
        labels: &JudgeLabels,
        status: &Status,
        policy: &RolloutPolicy,
        analysed: Option<&Summary>,
    ) {
        let m = &self.metrics;
        m.rollout_weight
            .get_or_create(labels)
            .set(i64::from(status.canary_weight));
        for phase in Phase::ALL {
            let l = PhaseLabels {
                namespace: labels.namespace.clone(),
                workload: labels.workload.clone(),
                phase: phase.as_str(),
            };
            m.rollout_phase
                .get_or_create(&l)
                .set(i64::from(phase == status.phase));
        }
        m.rollout_failed_checks
            .get_or_create(labels)
            .set(i64::from(status.failed_checks));
        m.rollout_threshold
            .get_or_create(labels)
            .set(i64::from(policy.threshold));
        m.rollout_success_rate_min
            .get_or_create(labels)
            .set(policy.judge.success_rate_min);
        if let Some(max) = policy.judge.latency_p99_max_ms {
            m.rollout_p99_max.get_or_create(labels).set(max / 1000.0);
        }
        if let Some(canary) = analysed {
            if let Some(sr) = canary.success_rate {
                m.rollout_success_rate.get_or_create(labels).set(sr);
            }
            if let Some(p99) = canary.p99_ms {
                m.rollout_p99.get_or_create(labels).set(p99 / 1000.0);
            }
        }
    }

    fn ensure_leader(&self, leader: &watch::Receiver<bool>) -> Result<(), ReconcileError> {
        if *leader.borrow() {
            Ok(())
        } else {
            Err(ReconcileError::NotLeader)
        }
    }

    /// Write the status annotation, guarded by the resourceVersion the decision was made on.
    /// A Canary's Deployment is marked with it ([`annotations::CANARY`]), so the agents
    /// scrape its pods.
    async fn write_status(
        &self,
        dep: &Deployment,
        source: Source<'_>,
        status: &Status,
        leader: &watch::Receiver<bool>,
    ) -> Result<(), ReconcileError> {
        self.ensure_leader(leader)?;
        let (namespace, name) = (dep.namespace().unwrap_or_default(), dep.name_any());
        let value = serde_json::to_string(status).unwrap_or_default();
        let mut patch = serde_json::json!({
            "metadata": {
                "resourceVersion": dep.resource_version(),
                "annotations": { annotations::STATUS: value },
            }
        });
        if let Source::Canary(canary, _) = source {
            patch["metadata"]["annotations"][annotations::CANARY] = canary.name_any().into();
        }
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), &namespace);
        api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(api_error(
                "writing the status of",
                format!("Deployment {namespace}/{name}"),
            ))?;
        Ok(())
    }

    /// Create what is missing: the primary (only if absent: applying it again would promote
    /// an unanalysed template), the Services (applied), and the router's objects.
    async fn bootstrap(
        &self,
        dep: &Deployment,
        plan: &Plan,
        store: &Store<Deployment>,
    ) -> Result<(), ReconcileError> {
        let ns = &plan.namespace;
        if store
            .get(&ObjectRef::new(&plan.primary_name()).within(ns))
            .is_none()
        {
            let replicas = dep.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
            self.apply::<Deployment>(ns, &plan.primary_name(), &plan.primary(dep, replicas))
                .await?;
        }
        self.resync(plan).await
    }

    /// Re-apply the Services and the router's objects: whatever drifted is put back, and
    /// fields other managers own are kept (server-side apply).
    async fn resync(&self, plan: &Plan) -> Result<(), ReconcileError> {
        // The objects are independent: one round trip, not one per object.
        let services = plan.services();
        let applies = services
            .iter()
            .map(|(name, svc)| self.apply::<Service>(&plan.namespace, name, svc));
        let routes = plan.routes();
        let (services, routes, autoscaler) = futures_util::join!(
            futures_util::future::try_join_all(applies),
            self.router.ensure_routes(&routes),
            self.primary_autoscaler(plan)
        );
        services?;
        routes?;
        autoscaler
    }

    /// Copy a Canary's HorizontalPodAutoscaler for `NAME-primary` (server-side apply, so
    /// the copy follows the canary's at every resync). A missing one is an error retried
    /// at every tick: the primary is not left without the scaling the Canary asks for.
    async fn primary_autoscaler(&self, plan: &Plan) -> Result<(), ReconcileError> {
        let Some(a) = &plan.autoscaler else {
            return Ok(());
        };
        let ns = &plan.namespace;
        let ar = a.api_resource();
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), ns, &ar);
        let what = |name: &str| format!("HorizontalPodAutoscaler {ns}/{name}");
        let source = api
            .get(&a.name)
            .await
            .map_err(api_error("reading the canary's", what(&a.name)))?;
        let body = plan.primary_autoscaler(&source);
        api.patch(
            &plan.primary_name(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .map_err(api_error("applying", what(&plan.primary_name())))?;
        Ok(())
    }

    /// The objects `NAME` needs that exist and are not `NAME`'s (its owner reference):
    /// `NAME-primary`, the Services and the router's objects. Read concurrently.
    async fn foreign(
        &self,
        plan: &Plan,
        store: &Store<Deployment>,
    ) -> Result<Vec<Foreign>, ReconcileError> {
        let ns = &plan.namespace;
        let uid = plan.owner_uid();
        let mut foreign = Vec::new();
        if let Some(p) = store.get(&ObjectRef::new(&plan.primary_name()).within(ns)) {
            foreign.extend(Foreign::of(
                "Deployment",
                ns,
                &plan.primary_name(),
                &p.metadata,
                uid,
            ));
        }
        let api: Api<Service> = Api::namespaced(self.client.clone(), ns);
        let names: Vec<String> = plan.services().into_iter().map(|(name, _)| name).collect();
        let reads = names.iter().map(|name| {
            let api = &api;
            async move {
                api.get_opt(name)
                    .await
                    .map_err(api_error("reading", format!("Service {ns}/{name}")))
            }
        });
        let routes = plan.routes();
        let (services, routes) = futures_util::join!(
            futures_util::future::try_join_all(reads),
            self.router.foreign_routes(&routes)
        );
        for (name, found) in names.iter().zip(services?) {
            if let Some(s) = found {
                foreign.extend(Foreign::of("Service", ns, name, &s.metadata, uid));
            }
        }
        foreign.extend(routes?);
        Ok(foreign)
    }

    /// Make `NAME` the owner of its objects that have no controlling owner (the user asked
    /// with `meshcanary.io/adopt`).
    async fn adopt(&self, plan: &Plan, foreign: &[Foreign]) -> Result<(), ReconcileError> {
        let ns = &plan.namespace;
        let patch = crate::router::adoption(&plan.routes());
        let deployments: Api<Deployment> = Api::namespaced(self.client.clone(), ns);
        let services: Api<Service> = Api::namespaced(self.client.clone(), ns);
        for f in foreign.iter().filter(|f| f.orphan) {
            if f.kind == "Deployment" && f.name == plan.primary_name() {
                deployments
                    .patch(
                        &plan.primary_name(),
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await
                    .map_err(api_error("adopting", f.to_string()))?;
            } else if f.kind == "Service" {
                services
                    .patch(&f.name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map_err(api_error("adopting", f.to_string()))?;
            }
        }
        self.router.adopt_routes(&plan.routes()).await?;
        tracing::info!(objects = ?foreign.iter().map(ToString::to_string).collect::<Vec<_>>(), "Adopted objects without an owner (meshcanary.io/adopt)");
        Ok(())
    }

    async fn apply<K>(
        &self,
        namespace: &str,
        name: &str,
        body: &serde_json::Value,
    ) -> Result<(), ReconcileError>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        let api: Api<K> = Api::namespaced(self.client.clone(), namespace);
        api.patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(body),
        )
        .await
        .map_err(api_error(
            "applying",
            format!("{} {namespace}/{name}", K::kind(&K::DynamicType::default())),
        ))?;
        Ok(())
    }

    /// Set the canary Deployment's replicas (a merge patch, so the user's other fields and
    /// field ownership stay as they are).
    async fn scale(
        &self,
        namespace: &str,
        name: &str,
        replicas: i32,
    ) -> Result<(), ReconcileError> {
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), namespace);
        let patch = serde_json::json!({"spec": {"replicas": replicas}});
        api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(api_error(
                "scaling",
                format!("Deployment {namespace}/{name}"),
            ))?;
        Ok(())
    }

    /// Publish an Event on `subject` (the Deployment, or its Canary); a failure is logged
    /// and counted, never fatal.
    async fn event(
        &self,
        subject: &ObjectReference,
        severity: Severity,
        reason: &str,
        message: String,
    ) {
        if let Err(error) = self
            .events
            .publish(subject, severity, reason, &message)
            .await
        {
            self.metrics
                .errors
                .get_or_create(&OperationLabels {
                    operation: "publishing an event",
                    reason: "api",
                })
                .inc();
            tracing::warn!(%error, "Publishing an Event failed");
        }
    }
}

/// The Deployment a Canary targets, read leniently (a Canary whose spec does not parse is
/// still known by it, else by its own name, as Flagger's usually are).
fn canary_target(canary: &DynamicObject) -> String {
    canary.data["spec"]["targetRef"]["name"]
        .as_str()
        .filter(|n| !n.is_empty())
        .map_or_else(|| canary.name_any(), str::to_owned)
}

/// The stored status, `Ok(None)` when there is none yet.
fn read_status(dep: &Deployment) -> Result<Option<Status>, serde_json::Error> {
    dep.annotations()
        .get(annotations::STATUS)
        .map(|s| serde_json::from_str(s))
        .transpose()
}

/// A Deployment's size, readiness and revision. For the primary the revision is the one it
/// was copied from (its annotation), since its own template carries primary labels.
pub fn deployment_state(dep: &Deployment, primary: bool) -> DeploymentState {
    let spec_replicas = dep.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let st = dep.status.clone().unwrap_or_default();
    let generation = dep.metadata.generation.unwrap_or(0);
    let settled = st.observed_generation.unwrap_or(0) >= generation;
    let ready = settled
        && st.updated_replicas.unwrap_or(0) == spec_replicas
        && st.available_replicas.unwrap_or(0) == spec_replicas
        && st.replicas.unwrap_or(0) == spec_replicas;
    let template_hash = if primary {
        dep.annotations()
            .get(annotations::REVISION)
            .cloned()
            .unwrap_or_default()
    } else {
        template_hash(dep.spec.as_ref().map(|s| &s.template))
    };
    DeploymentState {
        replicas: spec_replicas,
        ready,
        settled,
        template_hash,
    }
}

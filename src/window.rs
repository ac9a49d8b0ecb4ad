//! Stage 4, window: rolling per-(namespace, workload, role) windows of inbound traffic.
//!
//! A [`Window`] is a fixed ring of time slots (1 s by default). Each slot is stamped with the
//! absolute slot number it holds, so reading skips slots left over from an earlier lap without
//! a clearing pass, and a gap in scraping simply reads as slots with no data. Deltas from
//! [`inbound::PodCounters`] of every pod of the same workload and role fold into the same slot.
//!
//! Derived values ([`Summary`]) are `None` below a minimum request count: a window with three
//! requests has no meaningful success rate, and saying "100 %" would be a lie the judge could
//! act on. Latency quantiles use only histogram deltas, which arrive at Envoy's stats flush
//! (every 5 s by default), and interpolate linearly inside a bucket as PromQL's
//! `histogram_quantile` does. Time is always an argument (`now_ms`, unix milliseconds), so all
//! of this is tested without clocks.

pub mod inbound;
pub mod metrics;

use std::collections::{BTreeMap, HashMap};
use std::fmt;

pub use inbound::{Delta, InboundSnapshot, PodCounters};

/// Which side of the rollout a pod serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Primary,
    Canary,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Canary => "canary",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "primary" => Ok(Role::Primary),
            "canary" => Ok(Role::Canary),
            other => Err(format!("role must be 'primary' or 'canary', got '{other}'")),
        }
    }
}

/// What a window is kept for: one role of one workload.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WindowKey {
    pub namespace: String,
    pub workload: String,
    pub role: Role,
}

impl fmt::Display for WindowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{}",
            self.namespace,
            self.workload,
            self.role.as_str()
        )
    }
}

/// Shape of every window: slot width, number of slots, minimum requests for derived values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowConfig {
    pub slot_ms: u64,
    pub slots: usize,
    pub min_requests: u64,
}

impl Default for WindowConfig {
    fn default() -> Self {
        WindowConfig {
            slot_ms: 1_000,
            slots: 30,
            min_requests: 10,
        }
    }
}

/// One time slot's totals.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Slot {
    /// Absolute slot number (`unix_ms / slot_ms`) these counts belong to.
    pub index: u64,
    pub requests: u64,
    pub errors: u64,
    /// Per-bucket latency counts, aligned with the window's edges.
    pub buckets: Vec<u64>,
    /// Earliest start (unix ms) of the intervals folded into this slot; `u64::MAX` if none.
    pub since_ms: u64,
}

impl Slot {
    fn clear(&mut self, index: u64) {
        self.index = index;
        self.since_ms = u64::MAX;
        self.requests = 0;
        self.errors = 0;
        self.buckets.iter_mut().for_each(|b| *b = 0);
    }
}

/// Values derived from a window at one instant.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Summary {
    pub requests: u64,
    pub errors: u64,
    /// Latency observations in the window (histogram deltas).
    pub latency_count: u64,
    pub rps: Option<f64>,
    /// Fraction of non-5xx responses, in 0..=1.
    pub success_rate: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Time since the window last received data from any pod.
    pub age_ms: Option<u64>,
}

/// Monotone totals of one window since it was created: requests, 5xx, and latency
/// observations per histogram bucket (aligned with the window's edges plus `+Inf`). The
/// judge differences consecutive totals; they never go down.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Totals {
    pub requests: u64,
    pub errors: u64,
    pub buckets: Vec<u64>,
}

impl Totals {
    /// Observations slower than `edges[k]` (in buckets above it).
    pub fn slower_than(&self, k: usize) -> u64 {
        saturating_sum(self.buckets.iter().skip(k + 1))
    }

    pub fn latency_count(&self) -> u64 {
        saturating_sum(self.buckets.iter())
    }
}

/// A sum that stops at `u64::MAX` instead of wrapping: counts come from sidecars and
/// peers, and a broken one can send the largest numbers there are.
pub fn saturating_sum<'a>(values: impl Iterator<Item = &'a u64>) -> u64 {
    values.fold(0u64, |acc, v| acc.saturating_add(*v))
}

/// One workload's canary and primary windows as the judge reads them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WindowPair {
    pub canary: Summary,
    pub canary_totals: Totals,
    pub primary_totals: Totals,
    /// Histogram edges shared by both arms (empty when they differ).
    pub edges_ms: Vec<f64>,
    /// Why the pair cannot be vouched for, `None` when both arms are current.
    pub stale: Option<Stale>,
    /// Pods of either arm whose sidecar's stats have no inbound cluster at all (their
    /// requests are not counted), sorted.
    pub no_inbound: Vec<String>,
}

/// How long a pod reported without an inbound cluster stays reported (a pod that went
/// away, or whose stats came back, drops out after it).
pub const NO_INBOUND_FRESH_MS: u64 = 5_000;

/// The most pods a window reports without an inbound cluster (a peer's list is checked
/// against it).
pub const MAX_NO_INBOUND_PODS: usize = 256;

impl WindowPair {
    /// Both arms had data within the staleness limit and every observer answered.
    pub fn fresh(&self) -> bool {
        self.stale.is_none()
    }
}

/// Why a window pair is stale. The difference matters to the rollout: a blind observer is
/// nobody's fault (halt and wait), a canary whose own sidecar went silent while everything
/// else answers is a canary that died (a failed check, as Flagger counts "no values").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stale {
    /// An agent that may scrape the workload's pods did not answer.
    Observer,
    /// The primary's sidecars sent nothing within the limit (the canary's may have).
    Primary,
    /// Only the canary's sidecars sent nothing within the limit; every observer answered.
    Canary,
    /// A node that runs one of the workload's pods has no agent answering (deleted, not
    /// scheduled yet, or failing): that node is unobserved.
    NoAgent,
}

impl Stale {
    /// From each arm's age (time since its last data) and the limit.
    pub fn of_ages(
        canary_age_ms: Option<u64>,
        primary_age_ms: Option<u64>,
        limit_ms: u64,
    ) -> Option<Stale> {
        let current = |age: Option<u64>| age.is_some_and(|a| a <= limit_ms);
        match (current(canary_age_ms), current(primary_age_ms)) {
            (true, true) => None,
            (_, false) => Some(Stale::Primary),
            (false, true) => Some(Stale::Canary),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Stale::Observer => "observer",
            Stale::Primary => "primary",
            Stale::Canary => "canary",
            Stale::NoAgent => "no_agent",
        }
    }
}

/// Where the controller gets windows from: this node's windows now, every node's merged
/// windows once peers exchange them. A source that cannot vouch for its data says so with
/// `fresh: false`, never with empty "healthy" windows.
pub trait WindowSource: Send + Sync + 'static {
    /// The canary and primary windows of `namespace/workload` at `now_ms`, if both exist.
    fn pair(&self, namespace: &str, workload: &str, now_ms: u64) -> Option<WindowPair>;

    /// Bring the windows of the workloads under `analysis` up to date before a decision
    /// tick (the merged source polls the agents here; a node-local source is always
    /// current).
    fn refresh(
        &self,
        analysis: Vec<crate::workload::WorkloadId>,
    ) -> impl std::future::Future<Output = ()> + Send {
        let _ = analysis;
        async {}
    }

    /// The nodes that run pods of the workload but whose agent did not answer at the last
    /// refresh (a source that does not know where pods run says none).
    fn uncovered(&self, _namespace: &str, _workload: &str) -> Vec<String> {
        Vec::new()
    }
}

impl<T: WindowSource> WindowSource for std::sync::Arc<T> {
    fn pair(&self, namespace: &str, workload: &str, now_ms: u64) -> Option<WindowPair> {
        (**self).pair(namespace, workload, now_ms)
    }

    fn refresh(
        &self,
        analysis: Vec<crate::workload::WorkloadId>,
    ) -> impl std::future::Future<Output = ()> + Send {
        (**self).refresh(analysis)
    }

    fn uncovered(&self, namespace: &str, workload: &str) -> Vec<String> {
        (**self).uncovered(namespace, workload)
    }
}

/// A ring of slots for one [`WindowKey`].
#[derive(Clone, Debug)]
pub struct Window {
    config: WindowConfig,
    ring: Vec<Slot>,
    edges_ms: Vec<f64>,
    last_update_ms: Option<u64>,
    totals: Totals,
    /// Pods whose stats lack the inbound cluster, with when that was last seen.
    no_inbound: BTreeMap<String, u64>,
}

impl Window {
    pub fn new(config: WindowConfig) -> Self {
        Window {
            config,
            ring: vec![Slot::default(); config.slots.max(1)],
            edges_ms: Vec::new(),
            last_update_ms: None,
            totals: Totals::default(),
            no_inbound: BTreeMap::new(),
        }
    }

    /// Record whether `pod`'s stats have the inbound cluster, as scraped at `now_ms`.
    pub fn mark_inbound(&mut self, pod: &str, present: bool, now_ms: u64) {
        if present {
            self.no_inbound.remove(pod);
        } else if self.no_inbound.len() < MAX_NO_INBOUND_PODS || self.no_inbound.contains_key(pod) {
            self.no_inbound.insert(pod.to_owned(), now_ms);
        }
    }

    /// The pods reported without an inbound cluster within [`NO_INBOUND_FRESH_MS`].
    pub fn no_inbound(&self, now_ms: u64) -> Vec<String> {
        self.no_inbound
            .iter()
            .filter(|(_, &t)| now_ms.saturating_sub(t) <= NO_INBOUND_FRESH_MS)
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// Replace the pods without an inbound cluster with a peer's list, seen at `now_ms`.
    pub fn restore_no_inbound(&mut self, pods: Vec<String>, now_ms: u64) {
        self.no_inbound = pods.into_iter().map(|p| (p, now_ms)).collect();
    }

    /// Length of the window in milliseconds.
    pub fn span_ms(&self) -> u64 {
        self.config.slot_ms * self.ring.len() as u64
    }

    /// Record that a pod was scraped at `now_ms` (even with no traffic): data is fresh.
    pub fn touch(&mut self, now_ms: u64) {
        self.last_update_ms = Some(self.last_update_ms.map_or(now_ms, |t| t.max(now_ms)));
    }

    /// Fold one pod's delta, observed at `now_ms`, into the slot of `now_ms`.
    pub fn record(&mut self, delta: &Delta, now_ms: u64) {
        self.touch(now_ms);
        if let Some(latency) = &delta.latency {
            self.record_latency(latency, &delta.edges_ms, now_ms);
        }
        self.totals.requests = self.totals.requests.saturating_add(delta.requests);
        self.totals.errors = self.totals.errors.saturating_add(delta.errors);
        let slot = self.slot_mut(now_ms);
        slot.since_ms = slot.since_ms.min(delta.since_ms);
        slot.requests = slot.requests.saturating_add(delta.requests);
        slot.errors = slot.errors.saturating_add(delta.errors);
    }

    /// Fold per-bucket latency counts (over `edges_ms` plus `+Inf`) into the slot of
    /// `now_ms`, without marking the window fresh: per-request latency from a statsd sink
    /// arrives between scrapes, and only scrapes say a pod is alive.
    pub fn record_latency(&mut self, latency: &[u64], edges_ms: &[f64], now_ms: u64) {
        if self.edges_ms != edges_ms {
            // First histogram, or Envoy's buckets changed: older slots cannot be summed
            // with the new layout, so latency restarts (requests are unaffected).
            self.edges_ms = edges_ms.to_vec();
            for slot in &mut self.ring {
                slot.buckets = vec![0; latency.len()];
            }
            self.totals.buckets = vec![0; latency.len()];
        }
        for (t, d) in self.totals.buckets.iter_mut().zip(latency) {
            *t = t.saturating_add(*d);
        }
        let slot = self.slot_mut(now_ms);
        if slot.buckets.len() != latency.len() {
            slot.buckets = vec![0; latency.len()];
        }
        for (b, d) in slot.buckets.iter_mut().zip(latency) {
            *b = b.saturating_add(*d);
        }
    }

    fn slot_mut(&mut self, now_ms: u64) -> &mut Slot {
        let index = now_ms / self.config.slot_ms;
        let len = self.ring.len() as u64;
        let slot = &mut self.ring[(index % len) as usize];
        if slot.index != index {
            slot.clear(index);
        }
        slot
    }

    /// Forget everything, e.g. when a rollout step starts and only new traffic may count.
    pub fn reset(&mut self) {
        for slot in &mut self.ring {
            slot.clear(0);
        }
    }

    /// The slots inside the window at `now_ms`, in ring order (not time order). Slot number 0
    /// marks a cleared slot; no real instant maps to it.
    pub fn live_slots(&self, now_ms: u64) -> impl Iterator<Item = &Slot> {
        let newest = now_ms / self.config.slot_ms;
        let oldest = newest
            .saturating_add(1)
            .saturating_sub(self.ring.len() as u64)
            .max(1);
        self.ring
            .iter()
            .filter(move |s| s.index >= oldest && s.index <= newest)
    }

    /// Running totals since the window was created (never reset, never down).
    pub fn totals(&self) -> &Totals {
        &self.totals
    }

    /// Bucket upper bounds (ms) of the latency histogram, empty before the first flush.
    pub fn edges_ms(&self) -> &[f64] {
        &self.edges_ms
    }

    /// Every slot that holds data, in ring order.
    pub fn slots(&self) -> impl Iterator<Item = &Slot> {
        self.ring.iter().filter(|s| s.index != 0)
    }

    /// When a pod of this window was last scraped.
    pub fn last_update_ms(&self) -> Option<u64> {
        self.last_update_ms
    }

    /// Make this window a copy of a peer's, slot by slot: `slot` replaces what the ring
    /// holds at its position unless that is newer. Used by the leader's replica of a peer.
    pub fn restore(&mut self, slot: Slot) {
        let len = self.ring.len() as u64;
        let at = &mut self.ring[(slot.index % len) as usize];
        if at.index <= slot.index {
            *at = slot;
        }
    }

    /// Set what a peer reported besides slots: its histogram edges, last update and totals.
    pub fn restore_state(
        &mut self,
        edges_ms: Vec<f64>,
        last_update_ms: Option<u64>,
        totals: Totals,
    ) {
        self.edges_ms = edges_ms;
        self.last_update_ms = last_update_ms;
        self.totals = totals;
    }

    /// Add another window of the same key (another node's pods) into this one. Latency is
    /// added only where both use the same histogram edges.
    pub fn merge(&mut self, other: &Window) {
        if self.edges_ms.is_empty() && !other.edges_ms.is_empty() {
            self.edges_ms.clone_from(&other.edges_ms);
            for slot in &mut self.ring {
                slot.buckets = vec![0; other.edges_ms.len() + 1];
            }
            self.totals.buckets = vec![0; other.edges_ms.len() + 1];
        }
        let same_edges = self.edges_ms == other.edges_ms;
        for (pod, &t) in &other.no_inbound {
            let seen = self.no_inbound.entry(pod.clone()).or_insert(t);
            *seen = (*seen).max(t);
        }
        if let Some(t) = other.last_update_ms {
            self.touch(t);
        }
        self.totals.requests = self.totals.requests.saturating_add(other.totals.requests);
        self.totals.errors = self.totals.errors.saturating_add(other.totals.errors);
        if same_edges {
            for (t, o) in self.totals.buckets.iter_mut().zip(&other.totals.buckets) {
                *t = t.saturating_add(*o);
            }
        }
        let len = self.ring.len() as u64;
        for o in other.slots() {
            let slot = &mut self.ring[(o.index % len) as usize];
            if slot.index > o.index {
                continue; // ours is newer: theirs fell out of the window
            }
            if slot.index < o.index {
                slot.clear(o.index);
            }
            slot.since_ms = slot.since_ms.min(o.since_ms);
            slot.requests = slot.requests.saturating_add(o.requests);
            slot.errors = slot.errors.saturating_add(o.errors);
            if same_edges {
                for (b, d) in slot.buckets.iter_mut().zip(&o.buckets) {
                    *b = b.saturating_add(*d);
                }
            }
        }
    }

    /// Derived values at `now_ms`.
    pub fn summary(&self, now_ms: u64) -> Summary {
        let mut requests = 0u64;
        let mut errors = 0u64;
        let mut buckets = vec![0u64; self.edges_ms.len() + 1];
        let mut since_ms = u64::MAX;
        for slot in self.live_slots(now_ms) {
            since_ms = since_ms.min(slot.since_ms);
            requests = requests.saturating_add(slot.requests);
            errors = errors.saturating_add(slot.errors);
            for (b, d) in buckets.iter_mut().zip(&slot.buckets) {
                *b = b.saturating_add(*d);
            }
        }
        let latency_count = saturating_sum(buckets.iter());
        let min = self.config.min_requests.max(1);
        let enough = requests >= min;
        // The rate divides by the time the counted deltas really cover: from the start of the
        // oldest one to the last scrape. Dividing by the window's span instead would understate
        // it while the newest slot is still filling, or while the window is young.
        let covered_ms = (since_ms != u64::MAX).then(|| {
            let end = self.last_update_ms.unwrap_or(now_ms).min(now_ms);
            end.saturating_sub(since_ms)
                .clamp(self.config.slot_ms, self.span_ms() + self.config.slot_ms)
        });
        let quantile = |q| {
            (latency_count >= min)
                .then(|| histogram_quantile(q, &self.edges_ms, &buckets))
                .flatten()
        };
        Summary {
            requests,
            errors,
            latency_count,
            rps: covered_ms.map(|ms| requests as f64 * 1000.0 / ms as f64),
            success_rate: enough.then(|| 1.0 - errors.min(requests) as f64 / requests as f64),
            p50_ms: quantile(0.50),
            p90_ms: quantile(0.90),
            p99_ms: quantile(0.99),
            age_ms: self.last_update_ms.map(|t| now_ms.saturating_sub(t)),
        }
    }
}

/// The `q`-quantile of per-bucket counts with upper bounds `edges` (plus a final `+Inf`
/// bucket), interpolated linearly inside the bucket as PromQL's `histogram_quantile` does:
/// the first bucket starts at 0, and a rank in the `+Inf` bucket answers the highest finite
/// bound. `None` with no observations.
pub fn histogram_quantile(q: f64, edges: &[f64], counts: &[u64]) -> Option<f64> {
    let total = saturating_sum(counts.iter());
    if total == 0 || edges.is_empty() || !(0.0..=1.0).contains(&q) {
        return None;
    }
    let rank = q * total as f64;
    let mut below = 0u64;
    for (i, &n) in counts.iter().enumerate() {
        if n > 0 && below.saturating_add(n) as f64 >= rank {
            let Some(&upper) = edges.get(i) else {
                return edges.last().copied(); // the +Inf bucket
            };
            let lower = if i == 0 {
                0.0_f64.min(upper)
            } else {
                edges[i - 1]
            };
            return Some(lower + (upper - lower) * (rank - below as f64) / n as f64);
        }
        below = below.saturating_add(n);
    }
    edges.last().copied()
}

/// All windows of this agent, keyed by workload and role.
#[derive(Debug)]
pub struct Windows {
    config: WindowConfig,
    by_key: HashMap<WindowKey, Window>,
}

impl Windows {
    /// The canary and primary windows of one workload, stale unless both had data within
    /// `stale_after_ms`.
    pub fn pair(
        &self,
        namespace: &str,
        workload: &str,
        now_ms: u64,
        stale_after_ms: u64,
    ) -> Option<WindowPair> {
        let key = |role| WindowKey {
            namespace: namespace.to_owned(),
            workload: workload.to_owned(),
            role,
        };
        let canary = self.get(&key(Role::Canary))?;
        let primary = self.get(&key(Role::Primary))?;
        let (cs, ps) = (canary.summary(now_ms), primary.summary(now_ms));
        let stale = Stale::of_ages(cs.age_ms, ps.age_ms, stale_after_ms);
        let edges_ms = if canary.edges_ms() == primary.edges_ms() {
            canary.edges_ms().to_vec()
        } else {
            Vec::new()
        };
        let mut no_inbound = canary.no_inbound(now_ms);
        no_inbound.extend(primary.no_inbound(now_ms));
        no_inbound.sort();
        no_inbound.dedup();
        Some(WindowPair {
            canary: cs,
            canary_totals: canary.totals().clone(),
            primary_totals: primary.totals().clone(),
            edges_ms,
            stale,
            no_inbound,
        })
    }

    pub fn new(config: WindowConfig) -> Self {
        Windows {
            config,
            by_key: HashMap::new(),
        }
    }

    pub fn config(&self) -> WindowConfig {
        self.config
    }

    /// The window for `key`, created empty on first use.
    pub fn entry(&mut self, key: &WindowKey) -> &mut Window {
        if !self.by_key.contains_key(key) {
            self.by_key.insert(key.clone(), Window::new(self.config));
        }
        self.by_key.get_mut(key).expect("inserted above")
    }

    pub fn get(&self, key: &WindowKey) -> Option<&Window> {
        self.by_key.get(key)
    }

    /// The window for `key` if it exists (never creates one).
    pub fn get_mut(&mut self, key: &WindowKey) -> Option<&mut Window> {
        self.by_key.get_mut(key)
    }

    /// Drop the window of a workload role that has no targets left.
    pub fn remove(&mut self, key: &WindowKey) {
        self.by_key.remove(key);
    }

    /// The keys of every window, sorted.
    pub fn keys(&self) -> Vec<&WindowKey> {
        let mut keys: Vec<&WindowKey> = self.by_key.keys().collect();
        keys.sort();
        keys
    }

    /// Every window's summary at `now_ms`, sorted by key.
    pub fn summaries(&self, now_ms: u64) -> Vec<(WindowKey, Summary)> {
        let mut out: Vec<_> = self
            .by_key
            .iter()
            .map(|(k, w)| (k.clone(), w.summary(now_ms)))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EDGES: [f64; 4] = [10.0, 100.0, 250.0, 500.0];

    fn cfg() -> WindowConfig {
        WindowConfig {
            slot_ms: 1_000,
            slots: 10,
            min_requests: 10,
        }
    }

    fn delta(requests: u64, errors: u64, since_ms: u64) -> Delta {
        Delta {
            requests,
            errors,
            since_ms,
            ..Delta::default()
        }
    }

    #[test]
    fn sums_slots_inside_the_window_only() {
        let mut w = Window::new(cfg());
        for t in 0..20u64 {
            w.record(&delta(10, 1, t * 1_000 + 1_000), t * 1_000 + 2_000);
        }
        let s = w.summary(21_000);
        assert_eq!(
            (s.requests, s.errors),
            (100, 10),
            "10 slots of the last 10 s"
        );
        assert_eq!(s.success_rate, Some(0.9));
        assert_eq!(s.rps, Some(10.0));
        // 25 s of silence later everything has aged out.
        let s = w.summary(46_000);
        assert_eq!((s.requests, s.success_rate), (0, None));
        assert_eq!(s.age_ms, Some(25_000));
    }

    #[test]
    fn below_the_minimum_nothing_is_derived() {
        let mut w = Window::new(cfg());
        w.record(&delta(9, 0, 1_000), 2_000);
        let s = w.summary(2_500);
        assert_eq!(s.requests, 9);
        assert_eq!(s.success_rate, None);
        assert_eq!(s.p99_ms, None);
    }

    #[test]
    fn rps_over_a_young_window_uses_the_covered_time() {
        let mut w = Window::new(cfg());
        w.record(&delta(20, 0, 1_000), 2_000);
        w.record(&delta(20, 0, 2_000), 3_000);
        assert_eq!(w.summary(3_000).rps, Some(20.0));
    }

    #[test]
    fn rps_is_exact_while_the_newest_slot_fills() {
        // 20 requests per second, scraped at x.5 s; read at x.9 s, the rate is still 20.
        let mut w = Window::new(cfg());
        for t in 1..=30u64 {
            w.record(&delta(20, 0, t * 1_000 - 500), t * 1_000 + 500);
        }
        assert_eq!(w.summary(30_900).rps, Some(20.0));
    }

    #[test]
    fn quantiles_interpolate_like_promql() {
        // 100 observations: 50 in (0,10], 40 in (10,100], 9 in (100,250], 1 in (250,500].
        let counts = [50, 40, 9, 1, 0];
        assert_eq!(histogram_quantile(0.5, &EDGES, &counts), Some(10.0));
        assert_eq!(histogram_quantile(0.9, &EDGES, &counts), Some(100.0));
        let p99 = histogram_quantile(0.99, &EDGES, &counts).unwrap();
        assert!((p99 - 250.0).abs() < 1e-9, "{p99}");
        assert_eq!(histogram_quantile(0.25, &EDGES, &counts), Some(5.0));
        // All in +Inf: PromQL answers the highest finite bound.
        assert_eq!(
            histogram_quantile(0.5, &EDGES, &[0, 0, 0, 0, 7]),
            Some(500.0)
        );
        assert_eq!(histogram_quantile(0.5, &EDGES, &[0; 5]), None);
    }

    #[test]
    fn latency_comes_from_histogram_deltas() {
        let mut w = Window::new(cfg());
        let mut d = delta(100, 0, 1_000);
        d.latency = Some(vec![0, 0, 0, 100, 0]);
        d.edges_ms = EDGES.to_vec();
        w.record(&d, 2_000);
        let s = w.summary(2_000);
        assert_eq!(s.latency_count, 100);
        assert_eq!(s.p99_ms, Some(497.5));
        assert_eq!(s.p50_ms, Some(375.0));
    }

    #[test]
    fn reset_forgets_old_slots() {
        let mut w = Window::new(cfg());
        w.record(&delta(50, 50, 1_000), 2_000);
        w.reset();
        w.record(&delta(10, 0, 2_500), 3_000);
        let s = w.summary(3_000);
        assert_eq!((s.requests, s.errors), (10, 0));
    }

    #[test]
    fn windows_are_kept_per_key() {
        let mut ws = Windows::new(cfg());
        let key = |role| WindowKey {
            namespace: "test".into(),
            workload: "podinfo".into(),
            role,
        };
        ws.entry(&key(Role::Primary))
            .record(&delta(10, 0, 0), 1_000);
        ws.entry(&key(Role::Canary)).record(&delta(10, 5, 0), 1_000);
        let all = ws.summaries(1_000);
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].0.role, Role::Primary);
        assert_eq!(all[1].1.success_rate, Some(0.5));
        ws.remove(&key(Role::Canary));
        assert_eq!(ws.summaries(1_000).len(), 1);
    }
}

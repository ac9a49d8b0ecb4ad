//! Opt-in and policy: the `meshcanary.io/*` annotations of a Deployment, parsed once into a
//! typed [`RolloutPolicy`].
//!
//! Every key lives in one table, [`KEYS`], with its default and what it expects. The parser
//! reads defaults through the same value parsers as user input, and the README's reference
//! table is rendered from the same table ([`reference_table`]), so the three cannot drift. A
//! bad value yields an [`AnnotationError`] naming the key, the value and what was expected;
//! the controller turns it into a Warning Event and leaves the workload untouched.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use crate::config::parse_duration;
use crate::judge::{Mode, Policy};
use crate::router::{GatewayRef, HttpRouteRef, RouterKind, Target};

/// Prefix of every key.
pub const PREFIX: &str = "meshcanary.io/";
/// The key a workload opts in with.
pub const ENABLED: &str = "meshcanary.io/enabled";
/// Where the controller keeps a rollout's state (written by meshcanary, not by users).
pub const STATUS: &str = "meshcanary.io/status";
/// On a Deployment a Flagger Canary targets: the Canary meshcanary runs it for (written by
/// meshcanary with the status; the agents count the Deployment in, as if opted in).
pub const CANARY: &str = "meshcanary.io/canary";
/// On the primary Deployment: the template hash it was copied from.
pub const REVISION: &str = "meshcanary.io/revision";
/// How long a canary may go without progress.
pub const PROGRESS_DEADLINE: &str = "meshcanary.io/progress-deadline";
/// Which router carries the workload's weights.
pub const ROUTER: &str = "meshcanary.io/router";
/// The user's HTTPRoute that carries the weights (Gateway API).
pub const ROUTE: &str = "meshcanary.io/route";
/// The Gateway meshcanary's own HTTPRoute attaches to (Gateway API).
pub const GATEWAY: &str = "meshcanary.io/gateway";
/// Pod annotation: the Envoy admin port, when it is not the default.
pub const ENVOY_ADMIN_PORT: &str = "meshcanary.io/envoy-admin-port";
/// Pod annotation: the kind of Envoy sidecar (`app-mesh`, `istio`, `envoy`).
pub const DATA_PLANE: &str = "meshcanary.io/data-plane";
/// Pod annotation: the inbound cluster regex of an `envoy` data plane.
pub const CLUSTER_REGEX: &str = "meshcanary.io/cluster-regex";
/// Envoy's admin port in App Mesh's sidecar.
pub const DEFAULT_ENVOY_ADMIN_PORT: u16 = 9901;

/// One documented key.
pub struct Key {
    pub name: &'static str,
    /// The object the key goes on.
    pub on: &'static str,
    /// The default, written as a user would write it (`""` when there is none).
    pub default: &'static str,
    pub expected: &'static str,
    pub meaning: &'static str,
}

/// Every key meshcanary reads, in reference-table order.
pub const KEYS: &[Key] = &[
    Key { name: ENABLED, on: "Deployment", default: "false", expected: "true or false", meaning: "Opt the Deployment in: meshcanary bootstraps it and runs a canary analysis for every new revision." },
    Key { name: "meshcanary.io/port", on: "Deployment", default: "", expected: "a port number from 1 to 65535", meaning: "The port the Services, App Mesh listeners and HTTPRoute backendRefs use. Default: the first containerPort of the first container that is not the Envoy sidecar." },
    Key { name: "meshcanary.io/step-weights", on: "Deployment", default: "2,5,10,20,30,50", expected: "increasing whole percentages from 1 to 99, comma separated", meaning: "The canary weights the analysis steps through before promotion." },
    Key { name: "meshcanary.io/max-weight", on: "Deployment", default: "50", expected: "a whole percentage from 1 to 99", meaning: "The highest canary weight; no step may exceed it." },
    Key { name: "meshcanary.io/interval", on: "Deployment", default: "30s", expected: "a duration such as 30s or 1m", meaning: "Minimum time at each step before it may advance." },
    Key { name: PROGRESS_DEADLINE, on: "Deployment", default: "10m", expected: "a duration longer than meshcanary.io/interval", meaning: "Longest a canary may take to become ready, or stay at one step without advancing (no traffic at all, an agent silent throughout), before it is rolled back (Flagger's progressDeadlineSeconds)." },
    Key { name: "meshcanary.io/threshold", on: "Deployment", default: "5", expected: "a whole number from 1 to 1000", meaning: "Failed checks before rolling back (Flagger semantics: the window is checked every decision tick, a failing one halts at once, and at most one failed check counts per interval). A canary Deployment that is not ready, or whose sidecars stop answering while the agents answer, fails a check too." },
    Key { name: "meshcanary.io/success-rate-min", on: "Deployment", default: "99", expected: "a percentage from 0 to 100", meaning: "Lowest acceptable canary success rate (non-5xx share) over the window." },
    Key { name: "meshcanary.io/latency-p99-max", on: "Deployment", default: "500ms", expected: "a duration such as 500ms, or off", meaning: "Highest acceptable canary p99 over the window; off disables latency checks." },
    Key { name: "meshcanary.io/min-requests", on: "Deployment", default: "10", expected: "a whole number", meaning: "Canary requests the window needs before the threshold checks run; with fewer, the checks judge everything since the step began, and with fewer than that it is \"no data\" (halt, up to progress-deadline)." },
    Key { name: "meshcanary.io/judge", on: "Deployment", default: "both", expected: "threshold, sequential or both", meaning: "Which checks may fail a step: Flagger-style thresholds, the anytime-valid sequential tests, or both." },
    Key { name: "meshcanary.io/alpha", on: "Deployment", default: "0.01", expected: "a number between 0 and 1", meaning: "False-rollback budget of the sequential tests over a whole rollout." },
    Key { name: "meshcanary.io/advance-early", on: "Deployment", default: "false", expected: "true or false", meaning: "Advance before the interval ends when the sequential evidence shows the canary within the SLO." },
    Key { name: "meshcanary.io/adopt", on: "Deployment", default: "false", expected: "true or false", meaning: "Take over NAME-primary, the Services and the routing objects if they exist without a controlling owner (left by Flagger after `kubectl delete canary --cascade=orphan`): meshcanary makes NAME their owner. Objects another controller owns are never taken over." },
    Key { name: ROUTER, on: "Deployment", default: "", expected: "app-mesh or gateway-api", meaning: "Which router carries the canary's weights: an App Mesh VirtualRouter, or a Gateway API HTTPRoute's backendRefs. Default: the controller's --router (app-mesh unless set)." },
    Key { name: ROUTE, on: "Deployment", default: "", expected: "the name of an HTTPRoute in the Deployment's namespace", meaning: "Gateway API: use this existing HTTPRoute. meshcanary changes only the weights of its backendRefs to the Services NAME-primary and NAME-canary, in every rule that has both, and leaves every other rule, match, filter and backend as written. Without it meshcanary creates the HTTPRoute NAME." },
    Key { name: GATEWAY, on: "Deployment", default: "", expected: "[namespace/]name of a Gateway", meaning: "Gateway API, without meshcanary.io/route: attach the HTTPRoute NAME meshcanary creates to this Gateway (north-south traffic). Without it the route attaches to the Service NAME (GAMMA, east-west mesh traffic)." },
    Key { name: ENVOY_ADMIN_PORT, on: "Pod", default: "9901", expected: "a port number from 1 to 65535", meaning: "The port the agent scrapes /stats/prometheus on: the Envoy admin port (App Mesh and plain Envoy), or Istio's merged stats port (default 15090 for the istio data plane)." },
    Key { name: DATA_PLANE, on: "Pod", default: "", expected: "app-mesh, istio or envoy", meaning: "The kind of Envoy sidecar, when it is not what the agent detects (an istio-proxy container is istio; the --envoy-container container is app-mesh). envoy: any other Envoy, scraped on meshcanary.io/envoy-admin-port with meshcanary.io/cluster-regex." },
    Key { name: CLUSTER_REGEX, on: "Pod", default: "", expected: "a regex", meaning: "For the envoy data plane: the regex selecting the inbound cluster by name (default: the agent's --cluster-regex)." },
    Key { name: STATUS, on: "Deployment", default: "", expected: "written by meshcanary", meaning: "The rollout's state (phase, weight, failed checks, revisions); do not edit." },
    Key { name: CANARY, on: "Deployment", default: "", expected: "written by meshcanary", meaning: "The Flagger Canary meshcanary runs this Deployment for (docs/migrating-from-flagger.md); the agents scrape its pods as if it were opted in. Do not edit." },
    Key { name: REVISION, on: "Deployment (primary)", default: "", expected: "written by meshcanary", meaning: "The template hash the primary was copied from." },
];

/// A workload's validated rollout settings.
#[derive(Clone, Debug, PartialEq)]
pub struct RolloutPolicy {
    /// `None`: take it from the pod template (see [`KEYS`]).
    pub port: Option<u16>,
    pub step_weights: Vec<u8>,
    pub max_weight: u8,
    pub interval: Duration,
    pub threshold: u32,
    /// Longest time at one step without advancing.
    pub progress_deadline: Duration,
    /// Longest wait for a ready canary: `progress_deadline` for an annotated Deployment, a
    /// Canary's `progressDeadlineSeconds` (read by the canary module).
    pub ready_deadline: Duration,
    /// Take over existing objects that have no controlling owner.
    pub adopt: bool,
    pub judge: Policy,
    pub routing: Routing,
    /// Promote a ready canary without analysing it (a Canary's `skipAnalysis`).
    pub skip_analysis: bool,
    /// Blue/Green: analyse this many intervals at weight 0, then promote (a Canary's
    /// `iterations`); `None`: step through `step_weights`.
    pub iterations: Option<u32>,
    /// A Canary's webhooks (none for an annotated Deployment).
    pub webhooks: Vec<crate::webhook::Webhook>,
    /// A Canary's alerts (none for an annotated Deployment).
    pub alerts: Vec<crate::alert::AlertRef>,
}

/// The routing keys as written: the router (`None`: the controller's default) and, for the
/// Gateway API, the user's route or the Gateway meshcanary's own route attaches to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Routing {
    pub router: Option<RouterKind>,
    pub route: Option<String>,
    pub gateway: Option<GatewayRef>,
}

impl Routing {
    /// The router and route with the controller's `default` router filled in.
    ///
    /// ### Errors
    /// A Gateway API key on a workload whose router is App Mesh.
    pub fn resolve(
        &self,
        default: RouterKind,
    ) -> Result<(RouterKind, HttpRouteRef), AnnotationError> {
        let router = self.router.unwrap_or(default);
        if router == RouterKind::AppMesh {
            let given = [
                (ROUTE, self.route.clone()),
                (GATEWAY, self.gateway.as_ref().map(|g| g.name.clone())),
            ];
            if let Some((key, Some(value))) = given.into_iter().find(|(_, v)| v.is_some()) {
                let whose = if self.router.is_some() {
                    ""
                } else {
                    " (the controller's --router)"
                };
                return Err(AnnotationError {
                    key: key.into(),
                    value,
                    expected: format!("no Gateway API key while {ROUTER} is app-mesh{whose}; set {ROUTER}: gateway-api"),
                });
            }
        }
        let route = match &self.route {
            Some(r) => HttpRouteRef::Existing(r.clone()),
            None => HttpRouteRef::Own {
                gateway: self.gateway.clone(),
            },
        };
        Ok((router, route))
    }
}

/// Where a Deployment's weights live, read leniently (a key that does not parse is taken
/// as absent): what letting go of a workload whose annotations are invalid needs.
pub fn target_of(
    annotations: &BTreeMap<String, String>,
    namespace: &str,
    name: &str,
    default: RouterKind,
) -> Target {
    let router = annotations
        .get(ROUTER)
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default);
    let route = match annotations
        .get(ROUTE)
        .map(|v| v.trim())
        .filter(|v| valid_name(v))
    {
        Some(r) => HttpRouteRef::Existing(r.to_owned()),
        None => HttpRouteRef::Own { gateway: None },
    };
    Target::new(router, namespace, name, &route)
}

/// A Kubernetes object name (DNS subdomain).
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// A value that does not parse, or a key that does not exist.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct AnnotationError {
    pub key: String,
    pub value: String,
    pub expected: String,
}

impl fmt::Display for AnnotationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "annotation {} has value {:?}: expected {}",
            self.key, self.value, self.expected
        )
    }
}

/// Is the Deployment opted in? Anything but a clear `"true"` is no.
pub fn enabled(annotations: &BTreeMap<String, String>) -> bool {
    annotations.get(ENABLED).is_some_and(|v| v == "true")
}

/// Does meshcanary run the Deployment, opted in itself or for a Flagger Canary?
pub fn managed(annotations: &BTreeMap<String, String>) -> bool {
    enabled(annotations) || annotations.contains_key(CANARY)
}

/// Parse every `meshcanary.io/` key of a Deployment into a policy.
///
/// ### Errors
/// The first key that is unknown or whose value does not parse, or a combination that
/// contradicts itself (a step above `max-weight`).
pub fn parse(annotations: &BTreeMap<String, String>) -> Result<RolloutPolicy, AnnotationError> {
    for key in annotations.keys().filter(|k| k.starts_with(PREFIX)) {
        if !KEYS
            .iter()
            .any(|k| k.name == key && k.on.starts_with("Deployment"))
        {
            return Err(AnnotationError {
                key: key.clone(),
                value: annotations[key].clone(),
                expected: "a known key (see the annotation reference)".into(),
            });
        }
    }
    let get = |name: &str| -> (&str, bool) {
        match annotations.get(name) {
            Some(v) => (v.as_str(), true),
            None => (default_of(name), false),
        }
    };
    // Parse every key through one helper so the error always names key, value and expectation.
    fn one<T>(
        name: &str,
        value: &str,
        f: impl FnOnce(&str) -> Option<T>,
    ) -> Result<T, AnnotationError> {
        f(value.trim()).ok_or_else(|| error(name, value))
    }
    let (v, _) = get(ENABLED);
    one(ENABLED, v, parse_bool)?;
    let (v, given) = get("meshcanary.io/port");
    let port = if given {
        Some(one("meshcanary.io/port", v, parse_port)?)
    } else {
        None
    };
    let (max_v, _) = get("meshcanary.io/max-weight");
    let max_weight = one("meshcanary.io/max-weight", max_v, |s| {
        s.parse::<u8>().ok().filter(|w| (1..=99).contains(w))
    })?;
    let (v, given) = get("meshcanary.io/step-weights");
    let step_weights = one("meshcanary.io/step-weights", v, parse_weights)?;
    if let Some(&w) = step_weights.iter().find(|&&w| w > max_weight) {
        // Name the key the user wrote: max-weight, when the steps are the default.
        return Err(if given {
            AnnotationError {
                key: "meshcanary.io/step-weights".into(),
                value: v.into(),
                expected: format!("no step above meshcanary.io/max-weight ({max_weight}); {w} is"),
            }
        } else {
            AnnotationError {
                key: "meshcanary.io/max-weight".into(),
                value: max_v.into(),
                expected: format!(
                    "at least the largest step of meshcanary.io/step-weights ({v} by default), or steps of your own"
                ),
            }
        });
    }
    let (v, _) = get("meshcanary.io/interval");
    let interval = one("meshcanary.io/interval", v, |s| {
        parse_duration(s).ok().filter(|d| !d.is_zero())
    })?;
    let (v, given) = get(PROGRESS_DEADLINE);
    let progress_deadline = one(PROGRESS_DEADLINE, v, |s| parse_duration(s).ok())?;
    if progress_deadline <= interval {
        // Name the key the user wrote: the interval, when the deadline is the default.
        let (key, value, expected) = if given {
            (
                PROGRESS_DEADLINE,
                v,
                "a duration longer than meshcanary.io/interval".to_owned(),
            )
        } else {
            let (iv, _) = get("meshcanary.io/interval");
            (
                "meshcanary.io/interval",
                iv,
                format!("a duration shorter than {PROGRESS_DEADLINE} ({v} by default)"),
            )
        };
        return Err(AnnotationError {
            key: key.into(),
            value: value.into(),
            expected,
        });
    }
    let (v, _) = get("meshcanary.io/threshold");
    let threshold = one("meshcanary.io/threshold", v, |s| {
        s.parse::<u32>().ok().filter(|t| (1..=1000).contains(t))
    })?;
    let (v, _) = get("meshcanary.io/success-rate-min");
    let success_rate_min = one("meshcanary.io/success-rate-min", v, |s| {
        s.parse::<f64>().ok().filter(|p| (0.0..=100.0).contains(p))
    })? / 100.0;
    let (v, _) = get("meshcanary.io/latency-p99-max");
    let latency_p99_max_ms = one("meshcanary.io/latency-p99-max", v, |s| match s {
        "off" => Some(None),
        s => parse_duration(s)
            .ok()
            .filter(|d| !d.is_zero())
            .map(|d| Some(d.as_secs_f64() * 1000.0)),
    })?;
    let (v, _) = get("meshcanary.io/min-requests");
    let min_requests = one("meshcanary.io/min-requests", v, |s| s.parse::<u64>().ok())?;
    let (v, _) = get("meshcanary.io/judge");
    let mode = one("meshcanary.io/judge", v, |s| s.parse::<Mode>().ok())?;
    let (v, _) = get("meshcanary.io/alpha");
    let alpha = one("meshcanary.io/alpha", v, |s| {
        s.parse::<f64>().ok().filter(|a| *a > 0.0 && *a < 1.0)
    })?;
    let (v, _) = get("meshcanary.io/advance-early");
    let advance_early = one("meshcanary.io/advance-early", v, parse_bool)?;
    let (v, _) = get("meshcanary.io/adopt");
    let adopt = one("meshcanary.io/adopt", v, parse_bool)?;
    let optional = |key: &str| annotations.get(key).map(|v| v.as_str());
    let routing = Routing {
        router: optional(ROUTER)
            .map(|v| one(ROUTER, v, |s| s.parse().ok()))
            .transpose()?,
        route: optional(ROUTE)
            .map(|v| one(ROUTE, v, |s| valid_name(s).then(|| s.to_owned())))
            .transpose()?,
        gateway: optional(GATEWAY)
            .map(|v| one(GATEWAY, v, |s| s.parse().ok()))
            .transpose()?,
    };
    if let (Some(_), Some(v)) = (&routing.route, optional(GATEWAY)) {
        return Err(AnnotationError {
            key: GATEWAY.into(),
            value: v.into(),
            expected: format!("no {GATEWAY} with {ROUTE}: the route's own parentRefs attach it"),
        });
    }
    Ok(RolloutPolicy {
        port,
        step_weights,
        max_weight,
        interval,
        threshold,
        progress_deadline,
        ready_deadline: progress_deadline,
        adopt,
        judge: Policy {
            mode,
            success_rate_min,
            latency_p99_max_ms,
            min_requests,
            alpha,
            advance_early,
        },
        routing,
        skip_analysis: false,
        iterations: None,
        webhooks: Vec::new(),
        alerts: Vec::new(),
    })
}

/// The stats port a pod's annotations ask for, `default` when they do not.
///
/// ### Errors
/// A value that is not a port number.
pub fn envoy_admin_port(
    pod_annotations: &BTreeMap<String, String>,
    default: u16,
) -> Result<u16, AnnotationError> {
    match pod_annotations.get(ENVOY_ADMIN_PORT) {
        None => Ok(default),
        Some(v) => parse_port(v.trim()).ok_or_else(|| error(ENVOY_ADMIN_PORT, v)),
    }
}

fn default_of(name: &str) -> &'static str {
    KEYS.iter()
        .find(|k| k.name == name)
        .map_or("", |k| k.default)
}

fn error(name: &str, value: &str) -> AnnotationError {
    AnnotationError {
        key: name.into(),
        value: value.into(),
        expected: KEYS
            .iter()
            .find(|k| k.name == name)
            .map_or("a valid value", |k| k.expected)
            .into(),
    }
}

fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

fn parse_port(s: &str) -> Option<u16> {
    s.parse::<u16>().ok().filter(|p| *p > 0)
}

fn parse_weights(s: &str) -> Option<Vec<u8>> {
    let weights: Vec<u8> = s
        .split(',')
        .map(|w| w.trim().parse::<u8>().ok().filter(|w| (1..=99).contains(w)))
        .collect::<Option<_>>()?;
    let increasing = weights.windows(2).all(|w| w[0] < w[1]);
    (!weights.is_empty() && increasing).then_some(weights)
}

/// The README's annotation reference table (Markdown), rendered from [`KEYS`].
pub fn reference_table() -> String {
    let mut out =
        String::from("| annotation | on | default | expects | meaning |\n|---|---|---|---|---|\n");
    for k in KEYS {
        let default = if k.default.is_empty() {
            "-".to_owned()
        } else {
            format!("`{}`", k.default)
        };
        out.push_str(&format!(
            "| `{}` | {} | {} | {} | {} |\n",
            k.name, k.on, default, k.expected, k.meaning
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_parse_into_the_documented_policy() {
        let p = parse(&ann(&[(ENABLED, "true")])).unwrap();
        assert_eq!(p.step_weights, vec![2, 5, 10, 20, 30, 50]);
        assert_eq!(p.max_weight, 50);
        assert_eq!(p.interval, Duration::from_secs(30));
        assert_eq!(p.threshold, 5);
        assert_eq!(p.port, None);
        assert_eq!(p.judge, Policy::default());
    }

    #[test]
    fn every_key_is_read() {
        let p = parse(&ann(&[
            (ENABLED, "true"),
            ("meshcanary.io/port", "9898"),
            ("meshcanary.io/step-weights", "5, 10,20"),
            ("meshcanary.io/max-weight", "20"),
            ("meshcanary.io/interval", "1m"),
            ("meshcanary.io/threshold", "3"),
            ("meshcanary.io/success-rate-min", "99.5"),
            ("meshcanary.io/latency-p99-max", "off"),
            ("meshcanary.io/min-requests", "50"),
            ("meshcanary.io/judge", "threshold"),
            ("meshcanary.io/alpha", "0.05"),
            ("meshcanary.io/advance-early", "true"),
        ]))
        .unwrap();
        assert_eq!(p.port, Some(9898));
        assert_eq!(p.step_weights, vec![5, 10, 20]);
        assert_eq!(p.interval, Duration::from_secs(60));
        assert_eq!(p.threshold, 3);
        assert!((p.judge.success_rate_min - 0.995).abs() < 1e-12);
        assert_eq!(p.judge.latency_p99_max_ms, None);
        assert_eq!(p.judge.min_requests, 50);
        assert_eq!(p.judge.mode, Mode::Threshold);
        assert!(p.judge.advance_early);
    }

    #[test]
    fn bad_values_name_the_key_the_value_and_the_expectation() {
        let cases = [
            ("meshcanary.io/threshold", "five", "whole number"),
            ("meshcanary.io/threshold", "0", "whole number"),
            ("meshcanary.io/step-weights", "10,5", "increasing"),
            ("meshcanary.io/step-weights", "", "increasing"),
            ("meshcanary.io/step-weights", "2,5,100", "increasing"),
            ("meshcanary.io/step-weights", "20,60", "max-weight (50); 60"),
            ("meshcanary.io/interval", "30", "duration"),
            ("meshcanary.io/interval", "0", "duration"),
            ("meshcanary.io/success-rate-min", "101", "percentage"),
            ("meshcanary.io/latency-p99-max", "fast", "or off"),
            (
                "meshcanary.io/judge",
                "strict",
                "threshold, sequential or both",
            ),
            ("meshcanary.io/alpha", "1", "between 0 and 1"),
            ("meshcanary.io/port", "http", "port number"),
            ("meshcanary.io/enabled", "yes", "true or false"),
            ("meshcanary.io/stepweights", "2,5", "known key"),
            (ROUTER, "istio", "app-mesh or gateway-api"),
            (ROUTE, "My_Route", "name of an HTTPRoute"),
            (GATEWAY, "a/b/c", "[namespace/]name"),
        ];
        for (key, value, expected) in cases {
            let mut a = ann(&[(ENABLED, "true")]);
            a.insert(key.into(), value.into());
            let e = parse(&a).unwrap_err();
            assert_eq!(e.key, key, "{key}={value}");
            assert_eq!(e.value, value);
            assert!(
                e.expected.contains(expected),
                "{key}={value}: {}",
                e.expected
            );
            assert!(e
                .to_string()
                .starts_with(&format!("annotation {key} has value")));
        }
    }

    #[test]
    fn routing_keys_resolve_against_the_controllers_default() {
        let routing = |pairs: &[(&str, &str)]| {
            let mut a = ann(&[(ENABLED, "true")]);
            a.extend(ann(pairs));
            parse(&a).map(|p| p.routing)
        };
        let none = routing(&[]).unwrap();
        assert_eq!(
            none.resolve(RouterKind::AppMesh),
            Ok((RouterKind::AppMesh, HttpRouteRef::Own { gateway: None }))
        );
        assert_eq!(
            none.resolve(RouterKind::GatewayApi).unwrap().0,
            RouterKind::GatewayApi
        );
        let users = routing(&[(ROUTER, "gateway-api"), (ROUTE, "podinfo-web")]).unwrap();
        assert_eq!(
            users.resolve(RouterKind::AppMesh),
            Ok((
                RouterKind::GatewayApi,
                HttpRouteRef::Existing("podinfo-web".into())
            ))
        );
        let north = routing(&[(GATEWAY, "gateways/public")]).unwrap();
        let (router, route) = north.resolve(RouterKind::GatewayApi).unwrap();
        assert_eq!(router, RouterKind::GatewayApi);
        assert_eq!(
            route,
            HttpRouteRef::Own {
                gateway: Some(GatewayRef {
                    namespace: Some("gateways".into()),
                    name: "public".into()
                })
            }
        );
        // A Gateway API key on an App Mesh workload is a mistake, named.
        let e = north.resolve(RouterKind::AppMesh).unwrap_err();
        assert_eq!(e.key, GATEWAY);
        assert!(e.expected.contains("--router"), "{e}");
        let e = routing(&[(ROUTE, "r"), (GATEWAY, "g")]).unwrap_err();
        assert_eq!(e.key, GATEWAY);
        // Letting go reads leniently: a bad router is the default.
        let t = target_of(
            &ann(&[(ROUTER, "nope"), (ROUTE, "web")]),
            "ns",
            "podinfo",
            RouterKind::GatewayApi,
        );
        assert_eq!(
            (t.router, t.route.as_str()),
            (RouterKind::GatewayApi, "web")
        );
        let t = target_of(
            &ann(&[(ROUTE, "web")]),
            "ns",
            "podinfo",
            RouterKind::AppMesh,
        );
        assert_eq!(
            t.route, "podinfo",
            "App Mesh weights live in VirtualRouter NAME"
        );
    }

    #[test]
    fn opt_in_needs_a_clear_true() {
        assert!(enabled(&ann(&[(ENABLED, "true")])));
        assert!(!enabled(&ann(&[(ENABLED, "True")])));
        assert!(!enabled(&ann(&[])));
    }

    #[test]
    fn envoy_admin_port_defaults_and_validates() {
        assert_eq!(envoy_admin_port(&ann(&[]), 9901), Ok(9901));
        assert_eq!(envoy_admin_port(&ann(&[]), 15090), Ok(15090));
        assert_eq!(
            envoy_admin_port(&ann(&[(ENVOY_ADMIN_PORT, "15000")]), 9901),
            Ok(15000)
        );
        assert!(envoy_admin_port(&ann(&[(ENVOY_ADMIN_PORT, "0")]), 9901).is_err());
    }

    #[test]
    fn every_default_parses() {
        for k in KEYS.iter().filter(|k| !k.default.is_empty()) {
            let a = ann(&[(k.name, k.default)]);
            if k.on == "Deployment" {
                assert!(parse(&a).is_ok(), "default of {}", k.name);
            }
        }
    }
}

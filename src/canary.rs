//! Flagger's `Canary` resources (`flagger.app/v1beta1`), read as they are: a Canary's spec
//! is validated once into the same [`RolloutPolicy`] an annotated Deployment gets, so the
//! controller runs both the same way.
//!
//! Pure: [`read`] takes the Canary's annotations and spec and returns the workload or the
//! first field it cannot honour. Every field of the spec is either honoured, honoured
//! differently (written down in `docs/migrating-from-flagger.md`), or refused by name: a
//! field meshcanary would silently ignore (a webhook, a mirror, session affinity) would
//! half-apply the Canary, so the controller leaves such a Canary alone with a Warning Event
//! that names the field. A field present with its "off" value (`false`, `0`, an empty list)
//! asks for nothing and is accepted.
//!
//! The numbers go through [`annotations::parse`], so a Canary and an annotated Deployment
//! share one set of value checks; an error names the Canary's field, not the annotation.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde_json::{json, Value};

use crate::alert::{AlertRef, Severity};
use crate::annotations::{self, RolloutPolicy};
use crate::rollout::{Phase, Status};
use crate::webhook::{HookKind, Webhook};

pub const GROUP: &str = "flagger.app";
pub const VERSION: &str = "v1beta1";
pub const KIND: &str = "Canary";
pub const PLURAL: &str = "canaries";

/// The Kubernetes resource, for a dynamic API.
pub fn api_resource() -> kube::discovery::ApiResource {
    kube::discovery::ApiResource {
        group: GROUP.into(),
        version: VERSION.into(),
        api_version: format!("{GROUP}/{VERSION}"),
        kind: KIND.into(),
        plural: PLURAL.into(),
    }
}

/// Which Canaries the controller takes (`--canaries`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Taking {
    /// None: the controller does not watch Canaries.
    Off,
    /// Those with the annotation `meshcanary.io/enabled: "true"` (Flagger keeps the rest).
    #[default]
    OptedIn,
    /// Every Canary (no Flagger runs in the cluster).
    All,
}

impl Taking {
    /// Does the controller run a Canary with these annotations?
    pub fn takes(self, annotations: &BTreeMap<String, String>) -> bool {
        match self {
            Taking::Off => false,
            Taking::OptedIn => annotations::enabled(annotations),
            Taking::All => true,
        }
    }
}

/// What a Canary asks meshcanary to run.
#[derive(Clone, Debug, PartialEq)]
pub struct CanaryWorkload {
    /// `spec.targetRef.name`: the Deployment that is the canary's template (`NAME`).
    pub target: String,
    pub policy: RolloutPolicy,
    /// `spec.service.portName` (Flagger's default `http`).
    pub port_name: String,
    /// `spec.suspend`: nothing is done until it is false again.
    pub suspend: bool,
    /// `spec.autoscalerRef`: the canary's HorizontalPodAutoscaler, copied for the primary.
    pub autoscaler: Option<AutoscalerRef>,
}

/// A HorizontalPodAutoscaler of the canary (`spec.autoscalerRef`), in the API version the
/// Canary names (`autoscaling/v2`, or `v2beta2` on clusters before 1.23).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AutoscalerRef {
    pub api_version: String,
    pub name: String,
}

impl AutoscalerRef {
    pub fn api_resource(&self) -> kube::discovery::ApiResource {
        let (group, version) = self
            .api_version
            .split_once('/')
            .unwrap_or(("autoscaling", "v2"));
        kube::discovery::ApiResource {
            group: group.into(),
            version: version.into(),
            api_version: self.api_version.clone(),
            kind: "HorizontalPodAutoscaler".into(),
            plural: "horizontalpodautoscalers".into(),
        }
    }
}

/// A Canary meshcanary does not run as written.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CanaryError {
    /// A field meshcanary does not honour (yet): the Canary is left alone.
    Unsupported { field: String, why: String },
    /// A field whose value is not one meshcanary (or Flagger) takes.
    Invalid {
        field: String,
        value: String,
        expected: String,
    },
}

impl fmt::Display for CanaryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CanaryError::Unsupported { field, why } => {
                write!(f, "Canary field {field} is not honoured by meshcanary ({why}; docs/migrating-from-flagger.md)")
            }
            CanaryError::Invalid {
                field,
                value,
                expected,
            } => write!(
                f,
                "Canary field {field} has value {value}: expected {expected}"
            ),
        }
    }
}

impl CanaryError {
    /// The Event reason: `UnsupportedField` or `InvalidConfiguration`.
    pub fn reason(&self) -> &'static str {
        match self {
            CanaryError::Unsupported { .. } => "UnsupportedField",
            CanaryError::Invalid { .. } => "InvalidConfiguration",
        }
    }
}

fn unsupported(field: &str, why: &str) -> CanaryError {
    CanaryError::Unsupported {
        field: field.into(),
        why: why.into(),
    }
}

fn invalid(field: &str, value: &Value, expected: &str) -> CanaryError {
    CanaryError::Invalid {
        field: field.into(),
        value: value.to_string(),
        expected: expected.into(),
    }
}

/// How a spec field is treated.
enum Field {
    /// Read by [`read`].
    Honoured,
    /// Read by [`read`], and its keys are the user's (a webhook's `metadata`).
    Free,
    /// Refused unless it has its "off" value; the reason is said in the Event.
    Refused(&'static str),
}

/// Every field of `spec` (dotted paths; `[]` for list items) and how it is treated. A path
/// not listed is refused too, as a field this version does not know.
const FIELDS: &[(&str, Field)] = &[
    ("provider", Field::Honoured),
    ("targetRef", Field::Honoured),
    ("targetRef.apiVersion", Field::Honoured),
    ("targetRef.kind", Field::Honoured),
    ("targetRef.name", Field::Honoured),
    ("progressDeadlineSeconds", Field::Honoured),
    ("suspend", Field::Honoured),
    ("skipAnalysis", Field::Honoured),
    ("revertOnDeletion", Field::Refused("meshcanary does not revert on deletion")),
    ("autoscalerRef", Field::Honoured),
    ("autoscalerRef.apiVersion", Field::Honoured),
    ("autoscalerRef.kind", Field::Honoured),
    ("autoscalerRef.name", Field::Honoured),
    ("autoscalerRef.primaryScalerQueries", Field::Refused("only HorizontalPodAutoscalers are copied")),
    ("autoscalerRef.primaryScalerReplicas", Field::Refused("the primary's HorizontalPodAutoscaler is a copy of the canary's")),
    ("ingressRef", Field::Refused("meshcanary routes with App Mesh or the Gateway API, not Ingress")),
    ("upstreamRef", Field::Refused("meshcanary routes with App Mesh or the Gateway API only")),
    ("routeRef", Field::Refused("meshcanary routes with App Mesh or the Gateway API only")),
    ("service", Field::Honoured),
    ("service.port", Field::Honoured),
    ("service.name", Field::Honoured),
    ("service.portName", Field::Honoured),
    ("service.targetPort", Field::Honoured),
    ("service.gatewayRefs", Field::Honoured),
    ("service.gatewayRefs[]", Field::Honoured),
    ("service.gatewayRefs[].name", Field::Honoured),
    ("service.gatewayRefs[].namespace", Field::Honoured),
    ("service.gatewayRefs[].group", Field::Honoured),
    ("service.gatewayRefs[].kind", Field::Honoured),
    ("service.portDiscovery", Field::Refused("only the one service port is routed")),
    ("service.appProtocol", Field::Refused("the Services are plain HTTP")),
    ("service.hosts", Field::Refused("host names on the route are not set")),
    ("service.gateways", Field::Refused("Istio gateways are not a router meshcanary has")),
    ("service.match", Field::Refused("route matches are not set")),
    ("service.rewrite", Field::Refused("route rewrites are not set")),
    ("service.retries", Field::Refused("route retries are not set")),
    ("service.timeout", Field::Refused("route timeouts are not set")),
    ("service.headers", Field::Refused("header changes are not set")),
    ("service.corsPolicy", Field::Refused("CORS policies are not set")),
    ("service.trafficPolicy", Field::Refused("Istio traffic policies are not set")),
    ("service.backends", Field::Refused("App Mesh backends of the virtual nodes are not set")),
    ("service.meshName", Field::Refused("the mesh is the namespace's")),
    ("service.apex", Field::Refused("apex Service labels and annotations are not set")),
    ("service.primary", Field::Refused("primary Service labels and annotations are not set")),
    ("service.canary", Field::Refused("canary Service labels and annotations are not set")),
    ("service.delegation", Field::Refused("Istio delegation is not a router meshcanary has")),
    ("service.mirror", Field::Refused("traffic mirroring is not set")),
    ("analysis", Field::Honoured),
    ("analysis.interval", Field::Honoured),
    ("analysis.threshold", Field::Honoured),
    ("analysis.maxWeight", Field::Honoured),
    ("analysis.stepWeight", Field::Honoured),
    ("analysis.stepWeights", Field::Honoured),
    ("analysis.stepWeightPromotion", Field::Honoured),
    ("analysis.metrics", Field::Honoured),
    ("analysis.metrics[]", Field::Honoured),
    ("analysis.metrics[].name", Field::Honoured),
    ("analysis.metrics[].thresholdRange", Field::Honoured),
    ("analysis.metrics[].thresholdRange.min", Field::Honoured),
    ("analysis.metrics[].thresholdRange.max", Field::Honoured),
    ("analysis.metrics[].interval", Field::Honoured),
    ("analysis.metrics[].templateRef", Field::Refused("only the builtin metrics request-success-rate and request-duration, read from Envoy, are judged")),
    ("analysis.metrics[].templateVariables", Field::Refused("only the builtin metrics are judged")),
    ("analysis.metrics[].query", Field::Refused("only the builtin metrics are judged")),
    ("analysis.iterations", Field::Honoured),
    ("analysis.match", Field::Refused("A/B testing by header or cookie is not implemented")),
    ("analysis.mirror", Field::Refused("traffic mirroring is not implemented")),
    ("analysis.mirrorWeight", Field::Refused("traffic mirroring is not implemented")),
    ("analysis.primaryReadyThreshold", Field::Refused("readiness is the Deployment's own")),
    ("analysis.canaryReadyThreshold", Field::Refused("readiness is the Deployment's own")),
    ("analysis.sessionAffinity", Field::Refused("session affinity is not implemented")),
    ("analysis.webhooks", Field::Honoured),
    ("analysis.webhooks[]", Field::Honoured),
    ("analysis.webhooks[].name", Field::Honoured),
    ("analysis.webhooks[].type", Field::Honoured),
    ("analysis.webhooks[].url", Field::Honoured),
    ("analysis.webhooks[].timeout", Field::Honoured),
    ("analysis.webhooks[].retries", Field::Honoured),
    ("analysis.webhooks[].metadata", Field::Free),
    ("analysis.webhooks[].muteAlert", Field::Honoured),
    ("analysis.alerts", Field::Honoured),
    ("analysis.alerts[]", Field::Honoured),
    ("analysis.alerts[].name", Field::Honoured),
    ("analysis.alerts[].severity", Field::Honoured),
    ("analysis.alerts[].providerRef", Field::Honoured),
    ("analysis.alerts[].providerRef.name", Field::Honoured),
    ("analysis.alerts[].providerRef.namespace", Field::Honoured),
];

/// Every spec field this version knows (dotted paths, `[]` for list items), and whether it
/// is honoured (else refused unless off), for the migration guide's check.
pub fn known_fields() -> impl Iterator<Item = (&'static str, bool)> {
    FIELDS
        .iter()
        .map(|(path, f)| (*path, !matches!(f, Field::Refused(_))))
}

/// A value that asks for nothing.
fn is_off(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.values().all(is_off),
    }
}

/// The first field of `v` (at `path`) that is refused or unknown and not off.
fn check_fields(path: &str, v: &Value) -> Result<(), CanaryError> {
    let children: Vec<(String, &Value)> = match v {
        Value::Object(o) => o
            .iter()
            .map(|(k, v)| {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                (p, v)
            })
            .collect(),
        // Lists of numbers or strings (stepWeights) have no fields of their own.
        Value::Array(a) => a
            .iter()
            .filter(|v| v.is_object())
            .map(|v| (format!("{path}[]"), v))
            .collect(),
        _ => return Ok(()),
    };
    for (p, child) in children {
        match FIELDS.iter().find(|(name, _)| *name == p) {
            Some((_, Field::Honoured)) => check_fields(&p, child)?,
            Some((_, Field::Free)) => {}
            Some((_, Field::Refused(why))) if !is_off(child) => {
                return Err(unsupported(&format!("spec.{p}"), why));
            }
            Some((_, Field::Refused(_))) => {}
            None if is_off(child) => {}
            None => {
                return Err(unsupported(
                    &format!("spec.{p}"),
                    "this version of meshcanary does not know the field",
                ))
            }
        }
    }
    Ok(())
}

/// The annotation each Canary field becomes, and the field an annotation's error names.
const AS_ANNOTATION: &[(&str, &str)] = &[
    ("meshcanary.io/port", "spec.service.port"),
    ("meshcanary.io/step-weights", "spec.analysis.stepWeights"),
    ("meshcanary.io/max-weight", "spec.analysis.maxWeight"),
    ("meshcanary.io/interval", "spec.analysis.interval"),
    ("meshcanary.io/threshold", "spec.analysis.threshold"),
    (
        "meshcanary.io/success-rate-min",
        "spec.analysis.metrics[request-success-rate].thresholdRange.min",
    ),
    (
        "meshcanary.io/latency-p99-max",
        "spec.analysis.metrics[request-duration].thresholdRange.max",
    ),
    (
        annotations::PROGRESS_DEADLINE,
        "spec.progressDeadlineSeconds",
    ),
    (annotations::ROUTER, "spec.provider"),
    (annotations::GATEWAY, "spec.service.gatewayRefs"),
    (annotations::ROUTE, "spec.service"),
];

/// Flagger's defaults: an `interval` of one minute, a `threshold` of one failed check.
pub const DEFAULT_INTERVAL: &str = "1m";
pub const DEFAULT_THRESHOLD: u64 = 1;
/// Flagger's `progressDeadlineSeconds` default.
pub const DEFAULT_PROGRESS_DEADLINE_S: u64 = 600;

/// Read a Canary's annotations and spec into what meshcanary runs.
///
/// The `meshcanary.io/*` annotations a Canary has no field for (`judge`, `alpha`,
/// `advance-early`, `min-requests`, `adopt`) may be set on the Canary itself; one that a
/// field covers is refused, so the two cannot disagree.
///
/// ### Errors
/// The first field that is refused, unknown, or has a value that does not parse.
pub fn read(
    canary_annotations: &BTreeMap<String, String>,
    spec: &Value,
) -> Result<CanaryWorkload, CanaryError> {
    if !spec.is_object() {
        return Err(invalid("spec", spec, "an object"));
    }
    check_fields("", spec)?;
    let mut map: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in canary_annotations {
        if !k.starts_with(annotations::PREFIX) || k == annotations::ENABLED {
            continue;
        }
        if let Some((_, field)) = AS_ANNOTATION.iter().find(|(a, _)| a == k) {
            return Err(CanaryError::Invalid {
                field: format!("metadata.annotations[{k}]"),
                value: format!("{v:?}"),
                expected: format!("no such annotation on a Canary: set {field} instead"),
            });
        }
        map.insert(k.clone(), v.clone());
    }

    let target_ref = &spec["targetRef"];
    let kind = target_ref["kind"].as_str().unwrap_or("Deployment");
    if kind != "Deployment" {
        return Err(unsupported(
            "spec.targetRef.kind",
            "only Deployments are canaries here (not DaemonSets or Services)",
        ));
    }
    let target = match target_ref["name"].as_str() {
        Some(n) if !n.is_empty() => n.to_owned(),
        _ => {
            return Err(invalid(
                "spec.targetRef.name",
                &target_ref["name"],
                "the name of a Deployment",
            ))
        }
    };

    let service = &spec["service"];
    match &service["port"] {
        Value::Number(n) => {
            map.insert("meshcanary.io/port".into(), n.to_string());
        }
        other => return Err(invalid("spec.service.port", other, "a port number")),
    }
    if let Some(name) = service["name"].as_str().filter(|n| *n != target) {
        return Err(unsupported(
            "spec.service.name",
            &format!("the Services are named after the target Deployment ({target}), not {name:?}"),
        ));
    }
    match &service["targetPort"] {
        Value::Null => {}
        v if v == &service["port"] => {}
        v if v
            .as_str()
            .is_some_and(|s| s.parse::<u64>().ok() == service["port"].as_u64()) => {}
        _ => {
            return Err(unsupported(
                "spec.service.targetPort",
                "the Services send to the container port equal to spec.service.port",
            ))
        }
    }
    let port_name = match &service["portName"] {
        Value::Null => "http".to_owned(),
        Value::String(s) if valid_port_name(s) => s.clone(),
        other => {
            return Err(invalid(
                "spec.service.portName",
                other,
                "a port name (lowercase letters, digits and '-', at most 15)",
            ))
        }
    };

    match &spec["provider"] {
        Value::Null => {}
        Value::String(p) => {
            let router = match p.as_str() {
                "appmesh" | "appmesh:v1beta2" => "app-mesh",
                "gatewayapi" | "gatewayapi:v1" | "gatewayapi:v1beta1" => "gateway-api",
                _ => {
                    return Err(unsupported(
                        "spec.provider",
                        &format!("{p:?} is not a router meshcanary has (appmesh, appmesh:v1beta2, gatewayapi:v1)"),
                    ))
                }
            };
            map.insert(annotations::ROUTER.into(), router.into());
        }
        other => return Err(invalid("spec.provider", other, "a provider name")),
    }
    match &service["gatewayRefs"] {
        Value::Null => {}
        Value::Array(refs) if refs.is_empty() => {}
        Value::Array(refs) if refs.len() == 1 => {
            let r = &refs[0];
            let name = r["name"].as_str().unwrap_or_default();
            let gateway = match r["namespace"].as_str() {
                Some(ns) => format!("{ns}/{name}"),
                None => name.to_owned(),
            };
            map.insert(annotations::GATEWAY.into(), gateway);
        }
        _ => {
            return Err(unsupported(
                "spec.service.gatewayRefs",
                "the created HTTPRoute attaches to one Gateway",
            ))
        }
    }

    let analysis = &spec["analysis"];
    let interval = match &analysis["interval"] {
        Value::Null => DEFAULT_INTERVAL.to_owned(),
        Value::String(s) => s.clone(),
        other => {
            return Err(invalid(
                "spec.analysis.interval",
                other,
                "a duration such as 1m",
            ))
        }
    };
    map.insert("meshcanary.io/interval".into(), interval.clone());
    let threshold = match &analysis["threshold"] {
        Value::Null => DEFAULT_THRESHOLD,
        v => v
            .as_u64()
            .filter(|t| *t > 0)
            .ok_or_else(|| invalid("spec.analysis.threshold", v, "a whole number from 1"))?,
    };
    map.insert("meshcanary.io/threshold".into(), threshold.to_string());
    let weight = |field: &str, v: &Value| {
        v.as_u64()
            .filter(|w| (1..=100).contains(w))
            .ok_or_else(|| invalid(field, v, "a whole percentage from 1 to 100"))
    };
    // meshcanary keeps 1 % on the primary at the last step, so the two arms can still be
    // compared: a step of 100 runs at 99.
    let capped = |w: u64| w.min(99);
    // Blue/Green: `iterations` intervals at weight 0, no steps.
    let iterations = match &analysis["iterations"] {
        Value::Null => None,
        v => match v.as_u64() {
            Some(0) => None,
            Some(n) => Some(
                u32::try_from(n)
                    .ok()
                    .filter(|n| *n <= 1000)
                    .ok_or_else(|| {
                        invalid(
                            "spec.analysis.iterations",
                            v,
                            "a whole number from 0 to 1000",
                        )
                    })?,
            ),
            None => return Err(invalid("spec.analysis.iterations", v, "a whole number")),
        },
    };
    let stepped = !analysis["stepWeight"].is_null()
        || analysis["stepWeights"]
            .as_array()
            .is_some_and(|a| !a.is_empty());
    if iterations.is_some() && stepped {
        return Err(invalid(
            "spec.analysis.iterations",
            &analysis["iterations"],
            "no iterations beside spec.analysis.stepWeight(s): one is Blue/Green, the other a canary",
        ));
    }
    let steps: Vec<u64> =
        match (&analysis["stepWeights"], &analysis["stepWeight"]) {
            _ if iterations.is_some() => vec![50],
            (Value::Array(ws), _) if !ws.is_empty() => ws
                .iter()
                .map(|w| weight("spec.analysis.stepWeights", w))
                .collect::<Result<_, _>>()?,
            (Value::Null | Value::Array(_), Value::Null) => return Err(invalid(
                "spec.analysis.stepWeight",
                &Value::Null,
                "spec.analysis.stepWeight, spec.analysis.stepWeights or spec.analysis.iterations",
            )),
            (_, sw) => {
                let step = weight("spec.analysis.stepWeight", sw)?;
                let max = match &analysis["maxWeight"] {
                    Value::Null => 100,
                    v => weight("spec.analysis.maxWeight", v)?,
                };
                // Flagger: step, 2 x step, ... and the last one at maxWeight.
                let mut out: Vec<u64> = (1..).map(|i| i * step).take_while(|w| *w < max).collect();
                out.push(max);
                out
            }
        };
    let mut steps: Vec<u64> = steps.into_iter().map(capped).collect();
    steps.dedup();
    let max_weight = steps.last().copied().unwrap_or(50);
    if !analysis["stepWeights"].is_null() {
        if let Some(m) = analysis["maxWeight"].as_u64() {
            // Flagger takes the last of stepWeights as the maximum; a different maxWeight
            // beside them would mean two things.
            if capped(m) < max_weight {
                return Err(invalid(
                    "spec.analysis.maxWeight",
                    &analysis["maxWeight"],
                    "at least the last of spec.analysis.stepWeights",
                ));
            }
        }
    }
    let steps: Vec<String> = steps.iter().map(u64::to_string).collect();
    map.insert("meshcanary.io/step-weights".into(), steps.join(","));
    map.insert("meshcanary.io/max-weight".into(), max_weight.to_string());
    if let Some(v) = analysis.get("stepWeightPromotion").filter(|v| !v.is_null()) {
        weight("spec.analysis.stepWeightPromotion", v)?;
    }

    // Without a builtin metric Flagger runs no check of it: no minimum, no latency limit.
    map.insert("meshcanary.io/success-rate-min".into(), "0".into());
    map.insert("meshcanary.io/latency-p99-max".into(), "off".into());
    if let Some(metrics) = analysis["metrics"].as_array() {
        for m in metrics {
            let name = m["name"].as_str().unwrap_or_default();
            let range = &m["thresholdRange"];
            if let Some(interval) = m.get("interval").filter(|v| !v.is_null()) {
                let ok = interval
                    .as_str()
                    .is_some_and(|s| crate::config::parse_duration(s).is_ok());
                if !ok {
                    return Err(invalid(
                        &format!("spec.analysis.metrics[{name}].interval"),
                        interval,
                        "a duration such as 1m",
                    ));
                }
            }
            let (key, bound, other) = match name {
                "request-success-rate" => ("meshcanary.io/success-rate-min", "min", "max"),
                "request-duration" => ("meshcanary.io/latency-p99-max", "max", "min"),
                _ => {
                    return Err(unsupported(
                        &format!("spec.analysis.metrics[{name}]"),
                        "only the builtin metrics request-success-rate and request-duration, read from Envoy, are judged",
                    ))
                }
            };
            if !range[other].is_null() {
                return Err(unsupported(
                    &format!("spec.analysis.metrics[{name}].thresholdRange.{other}"),
                    "only a minimum success rate and a maximum duration are judged",
                ));
            }
            let value = match (&range[bound], bound) {
                (Value::Number(n), "min") => n.to_string(),
                // Flagger's request-duration is in milliseconds.
                (Value::Number(n), _) => format!("{n}ms"),
                // No bound: Flagger checks nothing for it.
                (Value::Null, _) => continue,
                (other, _) => {
                    return Err(invalid(
                        &format!("spec.analysis.metrics[{name}].thresholdRange.{bound}"),
                        other,
                        "a number",
                    ))
                }
            };
            map.insert(key.into(), value);
        }
    }

    // progressDeadlineSeconds is Flagger's time for the canary to become ready. A step that
    // gets no data at all ends one interval after Flagger's "no values found" checks would
    // have rolled it back (threshold x interval), or at the deadline if that is later.
    let deadline_s = match &spec["progressDeadlineSeconds"] {
        Value::Null => DEFAULT_PROGRESS_DEADLINE_S,
        v => v.as_u64().filter(|s| *s > 0).ok_or_else(|| {
            invalid(
                "spec.progressDeadlineSeconds",
                v,
                "a whole number of seconds",
            )
        })?,
    };
    let ready_deadline = Duration::from_secs(deadline_s);
    let interval_d = crate::config::parse_duration(&interval)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            invalid(
                "spec.analysis.interval",
                &analysis["interval"],
                "a duration such as 1m",
            )
        })?;
    let step_deadline = ready_deadline.max(
        interval_d
            * u32::try_from(threshold)
                .unwrap_or(u32::MAX)
                .saturating_add(1),
    );
    map.insert(
        annotations::PROGRESS_DEADLINE.into(),
        format!("{}ms", step_deadline.as_millis()),
    );

    let webhooks = match &analysis["webhooks"] {
        Value::Null => Vec::new(),
        Value::Array(hooks) => hooks.iter().map(webhook).collect::<Result<Vec<_>, _>>()?,
        other => return Err(invalid("spec.analysis.webhooks", other, "a list")),
    };
    for (i, h) in webhooks.iter().enumerate() {
        if webhooks[..i].iter().any(|o| o.name == h.name) {
            return Err(CanaryError::Invalid {
                field: format!("spec.analysis.webhooks[{}].name", h.name),
                value: format!("{:?}", h.name),
                expected: "a name no other webhook of the Canary has".into(),
            });
        }
    }

    let alerts = match &analysis["alerts"] {
        Value::Null => Vec::new(),
        Value::Array(list) => list.iter().map(alert).collect::<Result<Vec<_>, _>>()?,
        other => return Err(invalid("spec.analysis.alerts", other, "a list")),
    };

    let mut policy = annotations::parse(&map).map_err(|e| {
        let field = AS_ANNOTATION.iter().find(|(a, _)| *a == e.key).map_or_else(
            || format!("metadata.annotations[{}]", e.key),
            |(_, f)| (*f).to_owned(),
        );
        CanaryError::Invalid {
            field,
            value: format!("{:?}", e.value),
            expected: e.expected,
        }
    })?;
    policy.ready_deadline = ready_deadline;
    policy.webhooks = webhooks;
    policy.alerts = alerts;
    policy.iterations = iterations;
    policy.skip_analysis = spec["skipAnalysis"].as_bool().unwrap_or(false);
    let autoscaler = match &spec["autoscalerRef"] {
        Value::Null => None,
        a => {
            let kind = a["kind"].as_str().unwrap_or("HorizontalPodAutoscaler");
            if kind != "HorizontalPodAutoscaler" {
                return Err(unsupported(
                    "spec.autoscalerRef.kind",
                    "only HorizontalPodAutoscalers are copied for the primary (not KEDA ScaledObjects)",
                ));
            }
            let api_version = a["apiVersion"].as_str().unwrap_or("autoscaling/v2");
            if !matches!(
                api_version,
                "autoscaling/v2" | "autoscaling/v2beta2" | "autoscaling/v2beta1"
            ) {
                return Err(invalid(
                    "spec.autoscalerRef.apiVersion",
                    &a["apiVersion"],
                    "autoscaling/v2 (or v2beta2, v2beta1)",
                ));
            }
            let name = a["name"]
                .as_str()
                .filter(|n| !n.is_empty())
                .ok_or_else(|| invalid("spec.autoscalerRef.name", &a["name"], "a name"))?;
            Some(AutoscalerRef {
                api_version: api_version.to_owned(),
                name: name.to_owned(),
            })
        }
    };
    Ok(CanaryWorkload {
        target,
        policy,
        port_name,
        suspend: spec["suspend"].as_bool().unwrap_or(false),
        autoscaler,
    })
}

/// One of `analysis.webhooks`, with Flagger's defaults (type `rollout`, timeout 10 s).
fn webhook(v: &Value) -> Result<Webhook, CanaryError> {
    let name = match v["name"].as_str() {
        Some(n) if !n.is_empty() => n.to_owned(),
        _ => {
            return Err(invalid(
                "spec.analysis.webhooks[].name",
                &v["name"],
                "a name",
            ))
        }
    };
    let field = |f: &str| format!("spec.analysis.webhooks[{name}].{f}");
    let kind = match &v["type"] {
        Value::Null => HookKind::Rollout,
        Value::String(s) => HookKind::parse(s).ok_or_else(|| {
            let kinds: Vec<&str> = HookKind::ALL.iter().map(|k| k.as_str()).collect();
            invalid(
                &field("type"),
                &v["type"],
                &format!("one of {}", kinds.join(", ")),
            )
        })?,
        other => return Err(invalid(&field("type"), other, "a webhook type")),
    };
    let url = v["url"]
        .as_str()
        .and_then(|u| u.parse::<http::Uri>().ok())
        .filter(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.authority().is_some())
        .ok_or_else(|| invalid(&field("url"), &v["url"], "an http:// or https:// URL"))?;
    let timeout = match &v["timeout"] {
        Value::Null => crate::webhook::DEFAULT_TIMEOUT,
        t => t
            .as_str()
            .and_then(|s| crate::config::parse_duration(s).ok())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| invalid(&field("timeout"), t, "a duration such as 10s"))?,
    };
    let retries = match &v["retries"] {
        Value::Null => 0,
        r => r
            .as_u64()
            .and_then(|r| u32::try_from(r).ok())
            .filter(|r| *r <= 10)
            .ok_or_else(|| invalid(&field("retries"), r, "a whole number from 0 to 10"))?,
    };
    let metadata = match &v["metadata"] {
        Value::Null => BTreeMap::new(),
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k.clone(), s.clone())),
                other => Err(invalid(&field(&format!("metadata.{k}")), other, "a string")),
            })
            .collect::<Result<_, _>>()?,
        other => return Err(invalid(&field("metadata"), other, "a map of strings")),
    };
    Ok(Webhook {
        name,
        kind,
        url,
        timeout,
        retries,
        metadata,
        mute_alert: v["muteAlert"].as_bool().unwrap_or(false),
    })
}

/// One of `analysis.alerts`: Flagger's default severity is `info` (every alert).
fn alert(v: &Value) -> Result<AlertRef, CanaryError> {
    let name = match v["name"].as_str() {
        Some(n) if !n.is_empty() => n.to_owned(),
        _ => return Err(invalid("spec.analysis.alerts[].name", &v["name"], "a name")),
    };
    let field = |f: &str| format!("spec.analysis.alerts[{name}].{f}");
    let severity = match &v["severity"] {
        Value::Null => Severity::Info,
        s => s
            .as_str()
            .and_then(Severity::parse)
            .ok_or_else(|| invalid(&field("severity"), s, "info, warn or error"))?,
    };
    let provider = v["providerRef"]["name"]
        .as_str()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            invalid(
                &field("providerRef.name"),
                &v["providerRef"]["name"],
                "the name of an AlertProvider",
            )
        })?
        .to_owned();
    Ok(AlertRef {
        name,
        severity,
        provider_namespace: v["providerRef"]["namespace"].as_str().map(str::to_owned),
        provider,
    })
}

/// A Service port name (IANA service name: at most 15 of a-z, 0-9, '-').
fn valid_port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// The status fields every version of Flagger's CRD keeps, which say whether the Canary
/// shows the rollout as it is.
pub const SHOWN_FIELDS: [&str; 5] = [
    "phase",
    "canaryWeight",
    "failedChecks",
    "iterations",
    "lastTransitionTime",
];

/// The Canary's `status` as Flagger writes it, derived from meshcanary's rollout status (so
/// `kubectl get canaries` and dashboards built on Flagger's fields keep working). The
/// revisions are meshcanary's template hashes: `lastAppliedSpec` the one under analysis (or
/// last analysed), `lastPromotedSpec` the one the primary runs.
pub fn flagger_status(s: &Status) -> Value {
    let at = rfc3339(s.last_transition_ms);
    let waiting = "Waiting for approval (a confirm webhook).";
    let (promoted, reason, message) = match s.phase {
        Phase::Progressing
            if s.gate
                .is_some_and(|g| g != crate::webhook::HookKind::ConfirmTrafficIncrease) =>
        {
            ("Unknown", "Waiting", waiting)
        }
        Phase::Initializing => (
            "Unknown",
            "Initializing",
            "New Deployment detected, starting initialization.",
        ),
        Phase::Initialized => (
            "True",
            "Initialized",
            "Deployment initialization completed.",
        ),
        Phase::Progressing => (
            "Unknown",
            "Progressing",
            "New revision detected, progressing canary analysis.",
        ),
        Phase::Promoting | Phase::Finalising => (
            "Unknown",
            "Progressing",
            "Canary analysis completed, starting primary rolling update.",
        ),
        Phase::Succeeded => (
            "True",
            "Succeeded",
            "Canary analysis completed successfully, promotion finished.",
        ),
        Phase::Failed => (
            "False",
            "Failed",
            "Canary analysis failed, Deployment scaled to zero.",
        ),
    };
    json!({
        "phase": s.flagger_phase(),
        "canaryWeight": s.canary_weight,
        "failedChecks": s.failed_checks,
        "iterations": s.iterations,
        "lastAppliedSpec": s.revision,
        "lastPromotedSpec": s.last_applied,
        "lastTransitionTime": at,
        "conditions": [{
            "type": "Promoted",
            "status": promoted,
            "reason": reason,
            "message": message,
            "lastUpdateTime": at,
            "lastTransitionTime": at,
        }],
    })
}

/// Unix milliseconds as RFC 3339 in UTC, to the second (as Kubernetes writes times).
fn rfc3339(ms: u64) -> String {
    let secs = i64::try_from(ms / 1000).unwrap_or(i64::MAX);
    k8s_openapi::jiff::Timestamp::from_second(secs)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference walkthrough's Canary (the "Done when").
    fn walkthrough() -> Value {
        json!({
            "provider": "appmesh:v1beta2",
            "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "podinfo"},
            "progressDeadlineSeconds": 60,
            "service": {"port": 9898},
            "analysis": {
                "interval": "1m",
                "threshold": 5,
                "stepWeights": [2, 5, 10, 20, 30, 50],
                "metrics": [{"name": "request-success-rate", "thresholdRange": {"min": 99}, "interval": "1m"}],
            },
        })
    }

    fn opted_in() -> BTreeMap<String, String> {
        BTreeMap::from([(annotations::ENABLED.to_owned(), "true".to_owned())])
    }

    #[test]
    fn the_walkthrough_canary_reads_into_the_policy_its_annotations_would_give() {
        let w = read(&opted_in(), &walkthrough()).unwrap();
        assert_eq!(w.target, "podinfo");
        assert_eq!(w.port_name, "http");
        assert!(!w.suspend);
        let p = &w.policy;
        assert_eq!(p.port, Some(9898));
        assert_eq!(p.step_weights, vec![2, 5, 10, 20, 30, 50]);
        assert_eq!(p.max_weight, 50);
        assert_eq!(p.interval, Duration::from_secs(60));
        assert_eq!(p.threshold, 5);
        assert!((p.judge.success_rate_min - 0.99).abs() < 1e-9);
        // No request-duration metric: Flagger checks no latency, nor does meshcanary.
        assert_eq!(p.judge.latency_p99_max_ms, None);
        assert_eq!(p.routing.router, Some(crate::router::RouterKind::AppMesh));
        // Ready within 60 s; a step without data ends after (threshold + 1) intervals.
        assert_eq!(p.ready_deadline, Duration::from_secs(60));
        assert_eq!(p.progress_deadline, Duration::from_secs(360));
        // The rest as for an annotated Deployment with no other keys.
        let defaults = annotations::parse(&opted_in()).unwrap();
        assert_eq!(p.judge.mode, defaults.judge.mode);
        assert_eq!(p.judge.alpha, defaults.judge.alpha);
        assert_eq!(p.judge.min_requests, defaults.judge.min_requests);
    }

    #[test]
    fn step_weight_and_max_weight_step_as_flagger_does() {
        let mut spec = walkthrough();
        spec["analysis"] = json!({"stepWeight": 20, "maxWeight": 50});
        let p = read(&opted_in(), &spec).unwrap().policy;
        assert_eq!(p.step_weights, vec![20, 40, 50]);
        assert_eq!(p.max_weight, 50);
        // Without maxWeight Flagger goes to 100; meshcanary's last step keeps 1 % on the primary.
        spec["analysis"] = json!({"stepWeight": 25});
        let p = read(&opted_in(), &spec).unwrap().policy;
        assert_eq!(p.step_weights, vec![25, 50, 75, 99]);
        // Flagger's defaults: interval 1m, threshold 1.
        assert_eq!(p.interval, Duration::from_secs(60));
        assert_eq!(p.threshold, 1);
    }

    #[test]
    fn request_duration_is_the_p99_limit_in_milliseconds() {
        let mut spec = walkthrough();
        spec["analysis"]["metrics"].as_array_mut().unwrap().push(
            json!({"name": "request-duration", "thresholdRange": {"max": 500}, "interval": "30s"}),
        );
        let p = read(&opted_in(), &spec).unwrap().policy;
        assert_eq!(p.judge.latency_p99_max_ms, Some(500.0));
    }

    #[test]
    fn a_field_not_honoured_is_named_and_an_off_one_is_accepted() {
        let cases = [
            (
                "/analysis/match",
                json!([{"headers": {"x-canary": {"exact": "insider"}}}]),
                "spec.analysis.match",
            ),
            ("/analysis/mirror", json!(true), "spec.analysis.mirror"),
            (
                "/analysis/sessionAffinity",
                json!({"cookieName": "c"}),
                "spec.analysis.sessionAffinity",
            ),
            ("/service/timeout", json!("15s"), "spec.service.timeout"),
            ("/revertOnDeletion", json!(true), "spec.revertOnDeletion"),
            ("/somethingNew", json!(1), "spec.somethingNew"),
            ("/provider", json!("istio"), "spec.provider"),
            ("/targetRef/kind", json!("DaemonSet"), "spec.targetRef.kind"),
            (
                "/autoscalerRef",
                json!({"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "name": "podinfo"}),
                "spec.autoscalerRef.kind",
            ),
        ];
        for (at, value, field) in cases {
            let mut spec = walkthrough();
            *spec
                .pointer_mut(at.rsplit_once('/').unwrap().0)
                .unwrap()
                .as_object_mut()
                .unwrap()
                .entry(at.rsplit_once('/').unwrap().1)
                .or_insert(Value::Null) = value;
            match read(&opted_in(), &spec) {
                Err(CanaryError::Unsupported { field: f, .. }) => assert_eq!(f, field, "{at}"),
                other => panic!("{at}: {other:?}"),
            }
        }
        let mut templated = walkthrough();
        templated["analysis"]["metrics"][0] = json!({"name": "error-rate", "templateRef": {"name": "error-rate"}, "thresholdRange": {"max": 1}});
        let e = read(&opted_in(), &templated).unwrap_err();
        assert!(
            e.to_string()
                .contains("spec.analysis.metrics[].templateRef"),
            "{e}"
        );
        let mut off = walkthrough();
        off["skipAnalysis"] = json!(false);
        off["analysis"]["webhooks"] = json!([]);
        off["analysis"]["mirror"] = json!(false);
        off["revertOnDeletion"] = json!(false);
        assert!(read(&opted_in(), &off).is_ok());
    }

    #[test]
    fn webhooks_read_with_flaggers_defaults() {
        let mut spec = walkthrough();
        spec["analysis"]["webhooks"] = json!([
            {"name": "load-test", "url": "http://flagger-loadtester.test/", "timeout": "5s",
             "metadata": {"cmd": "hey -z 1m -q 10 -c 2 http://podinfo-canary.test:9898/"}},
            {"name": "gate", "type": "confirm-promotion", "url": "https://gate.example/approve",
             "retries": 2, "muteAlert": true},
        ]);
        let hooks = read(&opted_in(), &spec).unwrap().policy.webhooks;
        assert_eq!(hooks.len(), 2);
        assert_eq!(hooks[0].kind, HookKind::Rollout, "Flagger's default type");
        assert_eq!(hooks[0].timeout, Duration::from_secs(5));
        assert_eq!(
            hooks[0].metadata["cmd"],
            "hey -z 1m -q 10 -c 2 http://podinfo-canary.test:9898/"
        );
        assert_eq!(hooks[1].kind, HookKind::ConfirmPromotion);
        assert_eq!(hooks[1].timeout, crate::webhook::DEFAULT_TIMEOUT);
        assert_eq!((hooks[1].retries, hooks[1].mute_alert), (2, true));
        for (hook, field) in [
            (
                json!({"name": "x", "type": "pre_rollout", "url": "http://a/"}),
                "spec.analysis.webhooks[x].type",
            ),
            (
                json!({"name": "x", "url": "ftp://a/"}),
                "spec.analysis.webhooks[x].url",
            ),
            (
                json!({"name": "x", "url": "http://a/", "timeout": "soon"}),
                "spec.analysis.webhooks[x].timeout",
            ),
            (
                json!({"name": "x", "url": "http://a/", "metadata": {"n": 1}}),
                "spec.analysis.webhooks[x].metadata.n",
            ),
            (json!({"url": "http://a/"}), "spec.analysis.webhooks[].name"),
        ] {
            spec["analysis"]["webhooks"] = json!([hook]);
            let e = read(&opted_in(), &spec).unwrap_err();
            assert!(e.to_string().contains(field), "{field}: {e}");
        }
        spec["analysis"]["webhooks"] =
            json!([{"name": "x", "url": "http://a/"}, {"name": "x", "url": "http://b/"}]);
        let e = read(&opted_in(), &spec).unwrap_err();
        assert!(e.to_string().contains("no other webhook"), "{e}");
    }

    #[test]
    fn alerts_read_with_flaggers_default_severity() {
        let mut spec = walkthrough();
        spec["analysis"]["alerts"] = json!([
            {"name": "on-call", "severity": "error", "providerRef": {"name": "pager", "namespace": "ops"}},
            {"name": "team", "providerRef": {"name": "slack"}},
        ]);
        let alerts = read(&opted_in(), &spec).unwrap().policy.alerts;
        assert_eq!(alerts[0].severity, Severity::Error);
        assert_eq!(alerts[0].provider_namespace.as_deref(), Some("ops"));
        assert_eq!(
            (alerts[1].severity, alerts[1].provider.as_str()),
            (Severity::Info, "slack")
        );
        spec["analysis"]["alerts"] =
            json!([{"name": "x", "severity": "fatal", "providerRef": {"name": "p"}}]);
        let e = read(&opted_in(), &spec).unwrap_err();
        assert!(
            e.to_string().contains("spec.analysis.alerts[x].severity"),
            "{e}"
        );
        spec["analysis"]["alerts"] = json!([{"name": "x"}]);
        let e = read(&opted_in(), &spec).unwrap_err();
        assert!(e.to_string().contains("providerRef.name"), "{e}");
    }

    #[test]
    fn blue_green_and_skip_analysis_read_as_flagger() {
        let mut spec = walkthrough();
        spec["analysis"] = json!({"interval": "1m", "threshold": 2, "iterations": 10,
            "metrics": [{"name": "request-success-rate", "thresholdRange": {"min": 99}}]});
        spec["skipAnalysis"] = json!(true);
        let p = read(&opted_in(), &spec).unwrap().policy;
        assert_eq!(p.iterations, Some(10));
        assert!(p.skip_analysis);
        spec["analysis"]["stepWeight"] = json!(10);
        let e = read(&opted_in(), &spec).unwrap_err();
        assert!(e.to_string().contains("spec.analysis.iterations"), "{e}");
        spec["analysis"]["iterations"] = json!(0);
        assert_eq!(read(&opted_in(), &spec).unwrap().policy.iterations, None);
    }

    #[test]
    fn a_bad_value_names_the_canary_field() {
        let mut spec = walkthrough();
        spec["analysis"]["interval"] = json!("soon");
        let e = read(&opted_in(), &spec).unwrap_err();
        assert!(e.to_string().contains("spec.analysis.interval"), "{e}");
        let mut spec = walkthrough();
        spec["analysis"]["metrics"][0]["thresholdRange"]["min"] = json!(120);
        let e = read(&opted_in(), &spec).unwrap_err();
        assert!(
            e.to_string()
                .contains("spec.analysis.metrics[request-success-rate].thresholdRange.min"),
            "{e}"
        );
        let mut spec = walkthrough();
        spec["analysis"]["stepWeights"] = json!([5, 2]);
        let e = read(&opted_in(), &spec).unwrap_err();
        assert!(e.to_string().contains("spec.analysis.stepWeights"), "{e}");
        let mut spec = walkthrough();
        spec["service"] = json!({});
        let e = read(&opted_in(), &spec).unwrap_err();
        assert!(e.to_string().contains("spec.service.port"), "{e}");
    }

    #[test]
    fn annotations_a_field_covers_are_refused_and_the_others_apply() {
        let mut a = opted_in();
        a.insert("meshcanary.io/alpha".into(), "0.05".into());
        a.insert("meshcanary.io/advance-early".into(), "true".into());
        let p = read(&a, &walkthrough()).unwrap().policy;
        assert!((p.judge.alpha - 0.05).abs() < 1e-12);
        assert!(p.judge.advance_early);
        a.insert("meshcanary.io/interval".into(), "5s".into());
        let e = read(&a, &walkthrough()).unwrap_err();
        assert!(
            e.to_string().contains("spec.analysis.interval instead"),
            "{e}"
        );
    }

    #[test]
    fn who_takes_a_canary() {
        let none = BTreeMap::new();
        assert!(!Taking::OptedIn.takes(&none));
        assert!(Taking::OptedIn.takes(&opted_in()));
        let no = BTreeMap::from([(annotations::ENABLED.to_owned(), "yes".to_owned())]);
        assert!(!Taking::OptedIn.takes(&no));
        assert!(Taking::All.takes(&none));
        assert!(!Taking::Off.takes(&opted_in()));
    }

    #[test]
    fn the_status_has_flaggers_shape() {
        let s = Status {
            phase: Phase::Failed,
            canary_weight: 0,
            failed_checks: 5,
            last_applied: "aaa".into(),
            revision: "bbb".into(),
            analysing: false,
            step_started_ms: 0,
            last_transition_ms: 1_764_806_400_000,
            halted: false,
            last_failed_check_ms: 0,
            not_ready_since_ms: 0,
            iterations: 0,
            gate: None,
            gate_since_ms: 0,
        };
        let v = flagger_status(&s);
        assert_eq!(v["phase"], "Failed");
        assert_eq!(v["failedChecks"], 5);
        assert_eq!(v["lastAppliedSpec"], "bbb");
        assert_eq!(v["lastPromotedSpec"], "aaa");
        assert_eq!(v["lastTransitionTime"], "2025-12-04T00:00:00Z");
        assert_eq!(v["conditions"][0]["type"], "Promoted");
        assert_eq!(v["conditions"][0]["status"], "False");
        assert_eq!(v["conditions"][0]["reason"], "Failed");
    }
}

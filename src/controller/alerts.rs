//! Sends a Canary's alerts off the decision loop: each alert is one task that reads the
//! `AlertProvider` (and its Secret's `address` when it has a `secretRef`) and posts the
//! provider's body. A provider that is missing, of a type meshcanary cannot post to, or that
//! does not answer 2xx is reported back for one Warning Event (`AlertFailed`) per distinct
//! problem; the rollout never waits for an alert. The address is never logged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DynamicObject};
use kube::Client;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use super::metrics::AlertLabels;
use crate::alert::{Alert, AlertRef};
use crate::webhook::Caller;
use crate::workload::WorkloadId;

/// How long an alert's POST may take.
pub const ALERT_TIMEOUT: Duration = Duration::from_secs(10);

/// The `AlertProvider` resource (`flagger.app/v1beta1`).
pub fn provider_resource() -> kube::discovery::ApiResource {
    kube::discovery::ApiResource {
        group: crate::canary::GROUP.into(),
        version: crate::canary::VERSION.into(),
        api_version: format!("{}/{}", crate::canary::GROUP, crate::canary::VERSION),
        kind: "AlertProvider".into(),
        plural: "alertproviders".into(),
    }
}

type Failures = Arc<Mutex<HashMap<WorkloadId, Vec<String>>>>;

#[derive(Clone)]
pub struct AlertSender {
    client: Client,
    caller: Caller,
    sent: Family<AlertLabels, Counter>,
    failures: Failures,
}

impl AlertSender {
    pub fn new(client: Client, sent: Family<AlertLabels, Counter>) -> Self {
        AlertSender {
            client,
            caller: Caller::default(),
            sent,
            failures: Failures::default(),
        }
    }

    /// Send `alert` about `workload` (the Canary's name) to every one of `refs` whose
    /// severity it reaches.
    pub fn send(&self, id: &WorkloadId, workload: &str, refs: &[AlertRef], alert: &Alert) {
        for r in refs.iter().filter(|r| alert.severity >= r.severity) {
            let (sender, id, r, alert) = (self.clone(), id.clone(), r.clone(), alert.clone());
            let workload = workload.to_owned();
            tokio::spawn(async move {
                let result = sender.post(&id, &workload, &r, &alert).await;
                let outcome = match &result {
                    Ok(()) => "ok",
                    Err((reason, _)) => reason,
                };
                sender
                    .sent
                    .get_or_create(&AlertLabels {
                        severity: alert.severity.as_str(),
                        result: outcome,
                    })
                    .inc();
                if let Err((_, problem)) = result {
                    let message = format!("alert {} (provider {}): {problem}", r.name, r.provider);
                    sender
                        .failures
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .entry(id)
                        .or_default()
                        .push(message);
                }
            });
        }
    }

    async fn post(
        &self,
        id: &WorkloadId,
        workload: &str,
        r: &AlertRef,
        alert: &Alert,
    ) -> Result<(), (&'static str, String)> {
        let ns = r.provider_namespace.as_deref().unwrap_or(&id.namespace);
        let providers: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), ns, &provider_resource());
        let found = providers
            .get_opt(&r.provider)
            .await
            .map_err(|e| {
                (
                    "api",
                    format!("reading AlertProvider {ns}/{}: {e}", r.provider),
                )
            })?
            .ok_or_else(|| {
                (
                    "not_found",
                    format!("AlertProvider {ns}/{} does not exist", r.provider),
                )
            })?;
        let (mut provider, secret) = crate::alert::provider_spec(&found.data["spec"])
            .map_err(|e| ("invalid", format!("AlertProvider {ns}/{}: {e}", r.provider)))?;
        if let Some(secret) = secret {
            provider.address = self.secret_address(ns, &secret).await?;
        }
        let url: http::Uri = provider.url().parse().map_err(|_| {
            (
                "invalid",
                format!(
                    "AlertProvider {ns}/{}: the address is not a URL",
                    r.provider
                ),
            )
        })?;
        let body = provider.body(workload, &id.namespace, alert);
        self.caller
            .post_json(url, &body, ALERT_TIMEOUT)
            .await
            .map_err(|e| (e.reason(), e.to_string()))
    }

    /// The `address` key of a provider's Secret.
    async fn secret_address(&self, ns: &str, name: &str) -> Result<String, (&'static str, String)> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        let secret = secrets
            .get_opt(name)
            .await
            .map_err(|e| ("api", format!("reading Secret {ns}/{name}: {e}")))?
            .ok_or_else(|| ("not_found", format!("Secret {ns}/{name} does not exist")))?;
        secret
            .data
            .as_ref()
            .and_then(|d| d.get("address"))
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
            .map(|a| a.trim().to_owned())
            .filter(|a| !a.is_empty())
            .ok_or_else(|| ("invalid", format!("Secret {ns}/{name} has no key address")))
    }

    /// Failures of the workload's alerts since the last look.
    pub fn failures(&self, id: &WorkloadId) -> Vec<String> {
        self.failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(id)
            .unwrap_or_default()
    }
}

//! Flagger's webhooks: what a Canary's `analysis.webhooks` say, the payload Flagger posts,
//! and the one HTTP POST that calls a hook (with its timeout and retries).
//!
//! The rollout decides when hooks of each [`HookKind`] are due and what their answers do
//! (the rollout stage); the controller runs the calls off its loop, so a hook that hangs
//! holds up nothing but itself. A call succeeds on HTTP 200 to 202, as Flagger's does;
//! anything else (another status, a refused connection, no answer within the timeout, a URL
//! that does not parse) is a failure whose message says which, with the first bytes of the
//! answer's body, as Flagger puts the body in its failed-check events.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};

/// When a hook runs, and what its answer does (Flagger's `type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HookKind {
    /// Before the canary is scaled up; the rollout waits until it answers 2xx.
    ConfirmRollout,
    /// Before the canary gets traffic; a failure is a failed check.
    PreRollout,
    /// Once per interval during the analysis; a failure is a failed check. Flagger's default.
    Rollout,
    /// Before each weight increase; the rollout waits until it answers 2xx.
    ConfirmTrafficIncrease,
    /// Before the promotion; the rollout waits (analysing on) until it answers 2xx.
    ConfirmPromotion,
    /// After a promotion or a rollback; a failure is logged.
    PostRollout,
    /// Polled while the rollout analyses or waits; a 2xx rolls the canary back.
    Rollback,
    /// Told every Event the rollout publishes.
    Event,
}

impl HookKind {
    pub const ALL: [HookKind; 8] = [
        HookKind::ConfirmRollout,
        HookKind::PreRollout,
        HookKind::Rollout,
        HookKind::ConfirmTrafficIncrease,
        HookKind::ConfirmPromotion,
        HookKind::PostRollout,
        HookKind::Rollback,
        HookKind::Event,
    ];

    /// Flagger's name of the type.
    pub fn as_str(self) -> &'static str {
        match self {
            HookKind::ConfirmRollout => "confirm-rollout",
            HookKind::PreRollout => "pre-rollout",
            HookKind::Rollout => "rollout",
            HookKind::ConfirmTrafficIncrease => "confirm-traffic-increase",
            HookKind::ConfirmPromotion => "confirm-promotion",
            HookKind::PostRollout => "post-rollout",
            HookKind::Rollback => "rollback",
            HookKind::Event => "event",
        }
    }

    pub fn parse(s: &str) -> Option<HookKind> {
        HookKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// A gate: the rollout waits at it until every hook of the kind answers 2xx.
    pub fn is_gate(self) -> bool {
        matches!(
            self,
            HookKind::ConfirmRollout
                | HookKind::ConfirmTrafficIncrease
                | HookKind::ConfirmPromotion
        )
    }
}

impl fmt::Display for HookKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Flagger's default webhook timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between a failed attempt and the next, when the hook has `retries`.
pub const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// The longest part of an answer's body a failure message quotes.
pub const BODY_QUOTE: usize = 256;
/// The most of an answer's body read (the rest is dropped with the connection).
pub const BODY_READ: usize = 64 * 1024;

/// One webhook of a Canary. Its URL (a Slack-style URL holds a token in its path) and its
/// metadata values (a gate's token) are never printed: `Debug` shows the URL's host and
/// the metadata's keys only.
#[derive(Clone, PartialEq, Eq)]
pub struct Webhook {
    pub name: String,
    pub kind: HookKind,
    pub url: http::Uri,
    pub timeout: Duration,
    /// Attempts after the first that fails.
    pub retries: u32,
    /// Posted as the payload's `metadata` (the load tester's `cmd`, a gate's token).
    pub metadata: BTreeMap<String, String>,
    /// Flagger's `muteAlert`: a failure of this hook sends no alert.
    pub mute_alert: bool,
}

impl fmt::Debug for Webhook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Webhook")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("host", &self.url.host())
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .field("metadata_keys", &self.metadata.keys().collect::<Vec<_>>())
            .field("mute_alert", &self.mute_alert)
            .finish()
    }
}

/// The latest answer of one hook, as the rollout sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// When the call that answered began, unix ms: an answer counts for a question asked
    /// at or before that.
    pub started_ms: u64,
    /// `None`: it answered 2xx.
    pub error: Option<String>,
}

/// What Flagger posts to a hook.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Payload {
    pub name: String,
    pub namespace: String,
    pub phase: String,
    /// The revision under analysis (Flagger: a checksum of the canary's spec).
    pub checksum: String,
    pub metadata: BTreeMap<String, String>,
}

/// The payload of an `event` hook: Flagger's metadata keys.
pub fn event_metadata(message: &str, warning: bool, now_ms: u64) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("eventMessage".to_owned(), message.to_owned()),
        (
            "eventType".to_owned(),
            if warning { "Warning" } else { "Normal" }.to_owned(),
        ),
        ("timestamp".to_owned(), now_ms.to_string()),
    ])
}

/// Why a call failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HookError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("answered HTTP {status}{}", quote(body))]
    Status { status: u16, body: String },
    #[error("unreachable: {0}")]
    Unreachable(String),
}

impl HookError {
    /// A fixed label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            HookError::Timeout(_) => "timeout",
            HookError::Status { .. } => "status",
            HookError::Unreachable(_) => "unreachable",
        }
    }
}

fn quote(body: &str) -> String {
    if body.is_empty() {
        String::new()
    } else {
        format!(": {body:?}")
    }
}

/// The first [`BODY_QUOTE`] bytes of `body` as text (cut at a character boundary).
fn quoted(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(BODY_QUOTE)]);
    text.trim().to_owned()
}

/// Calls webhooks: one keep-alive client, http or https.
#[derive(Clone, Debug)]
pub struct Caller {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl Default for Caller {
    fn default() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        Caller {
            client: Client::builder(TokioExecutor::new()).build(https),
        }
    }
}

impl Caller {
    /// POST `payload` to the hook, retrying `retries` times after a failure.
    ///
    /// ### Errors
    /// The last attempt's failure.
    pub async fn call(&self, hook: &Webhook, payload: &Payload) -> Result<(), HookError> {
        let body = Bytes::from(serde_json::to_vec(payload).unwrap_or_default());
        let mut attempt = 0;
        loop {
            let result = self.once(hook, body.clone()).await;
            if result.is_ok() || attempt >= hook.retries {
                return result;
            }
            attempt += 1;
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    async fn once(&self, hook: &Webhook, body: Bytes) -> Result<(), HookError> {
        self.post(hook.url.clone(), body, hook.timeout).await
    }

    /// POST `body` as JSON to `url` once (an alert).
    ///
    /// ### Errors
    /// Not HTTP 200 to 202, no answer within `timeout`, or no connection.
    pub async fn post_json(
        &self,
        url: http::Uri,
        body: &serde_json::Value,
        timeout: Duration,
    ) -> Result<(), HookError> {
        let body = Bytes::from(serde_json::to_vec(body).unwrap_or_default());
        self.post(url, body, timeout).await
    }

    async fn post(&self, url: http::Uri, body: Bytes, timeout: Duration) -> Result<(), HookError> {
        let request = http::Request::post(url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(
                http::header::USER_AGENT,
                concat!("meshcanary/", env!("CARGO_PKG_VERSION")),
            )
            .body(Full::new(body))
            .map_err(|e| HookError::Unreachable(e.to_string()))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| HookError::Unreachable(error_chain(&e)))?;
            let status = response.status().as_u16();
            if (200..=202).contains(&status) {
                return Ok(());
            }
            let body = Limited::new(response.into_body(), BODY_READ)
                .collect()
                .await
                .map(|b| quoted(&b.to_bytes()))
                .unwrap_or_default();
            Err(HookError::Status { status, body })
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or(Err(HookError::Timeout(timeout)))
    }
}

/// An error and its sources, on one line ("connection refused" is in the source).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_flaggers_name() {
        for k in HookKind::ALL {
            assert_eq!(HookKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(HookKind::parse("pre_rollout"), None);
        let gates: Vec<_> = HookKind::ALL.into_iter().filter(|k| k.is_gate()).collect();
        assert_eq!(
            gates,
            [
                HookKind::ConfirmRollout,
                HookKind::ConfirmTrafficIncrease,
                HookKind::ConfirmPromotion
            ]
        );
    }

    #[test]
    fn a_failure_quotes_the_start_of_the_body() {
        let long = "x".repeat(1000);
        let e = HookError::Status {
            status: 500,
            body: quoted(long.as_bytes()),
        };
        let text = e.to_string();
        assert!(text.starts_with("answered HTTP 500: \"xxx"), "{text}");
        assert!(text.len() < BODY_QUOTE + 40, "{text}");
        let e = HookError::Status {
            status: 403,
            body: quoted(b""),
        };
        assert_eq!(e.to_string(), "answered HTTP 403");
        // Not UTF-8: replaced, never a panic.
        assert_eq!(quoted(&[0xff, b'a']), "\u{fffd}a");
    }

    #[test]
    fn debug_never_shows_the_url_path_or_metadata_values() {
        let hook = Webhook {
            name: "slack".into(),
            kind: HookKind::Event,
            url: "https://hooks.example.com/services/T000/B000/SECRETTOKEN"
                .parse()
                .unwrap(),
            timeout: DEFAULT_TIMEOUT,
            retries: 0,
            metadata: BTreeMap::from([("token".to_owned(), "s3cr3t".to_owned())]),
            mute_alert: false,
        };
        let shown = format!("{hook:?}");
        assert!(
            !shown.contains("SECRETTOKEN") && !shown.contains("s3cr3t"),
            "{shown}"
        );
        assert!(
            shown.contains("hooks.example.com") && shown.contains("token"),
            "{shown}"
        );
    }

    #[test]
    fn the_payload_is_flaggers() {
        let p = Payload {
            name: "podinfo".into(),
            namespace: "test".into(),
            phase: "Progressing".into(),
            checksum: "abc".into(),
            metadata: BTreeMap::from([("cmd".to_owned(), "hey -z 1m".to_owned())]),
        };
        assert_eq!(
            serde_json::to_value(&p).unwrap(),
            serde_json::json!({"name": "podinfo", "namespace": "test", "phase": "Progressing",
                               "checksum": "abc", "metadata": {"cmd": "hey -z 1m"}})
        );
        let m = event_metadata("Advance podinfo.test canary weight 5", false, 42);
        assert_eq!(m["eventType"], "Normal");
        assert_eq!(m["timestamp"], "42");
    }
}

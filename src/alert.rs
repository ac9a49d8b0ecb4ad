//! Flagger's alerts: a Canary's `analysis.alerts` name `AlertProvider`s (Slack, Microsoft
//! Teams, Discord, Rocket.Chat, or a generic JSON receiver), and the rollout tells them of
//! a new revision, a halt, a promotion and a rollback.
//!
//! Pure: the message bodies each provider type takes, built from an [`Alert`]. The
//! controller reads the `AlertProvider` (and its Secret's `address`, when it has a
//! `secretRef`) and posts the body with the webhooks' client. An address is a credential
//! (Slack's and Discord's hold a token in their path): it is never logged.

use std::fmt;

use serde_json::{json, Value};

/// How serious an alert is; an alert reference receives its own severity and worse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    Info,
    Warn,
    Error,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warn => "warn",
            Severity::Error => "error",
        }
    }

    pub fn parse(s: &str) -> Option<Severity> {
        [Severity::Info, Severity::Warn, Severity::Error]
            .into_iter()
            .find(|v| v.as_str() == s)
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One of a Canary's `analysis.alerts`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlertRef {
    pub name: String,
    /// The least severity it receives (Flagger's default `info`: everything).
    pub severity: Severity,
    /// The `AlertProvider`: namespace (the Canary's when not given) and name.
    pub provider_namespace: Option<String>,
    pub provider: String,
}

/// The provider types meshcanary can post to, and the body each takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProviderKind {
    Slack,
    /// Slack's body at the Discord webhook's `/slack` path, as Flagger does.
    Discord,
    /// Slack's body.
    Rocket,
    MsTeams,
    /// meshcanary's plain JSON: workload, namespace, severity, message and fields.
    Generic,
}

impl ProviderKind {
    pub fn parse(s: &str) -> Option<ProviderKind> {
        Some(match s {
            "slack" => ProviderKind::Slack,
            "discord" => ProviderKind::Discord,
            "rocket" => ProviderKind::Rocket,
            "msteams" => ProviderKind::MsTeams,
            "generic" => ProviderKind::Generic,
            _ => return None,
        })
    }
}

/// What the rollout tells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alert {
    pub severity: Severity,
    pub message: String,
    /// Extra name/value facts (the reason of a rollback, the target).
    pub fields: Vec<(String, String)>,
}

/// An `AlertProvider`'s settings as meshcanary uses them.
#[derive(Clone, PartialEq, Eq)]
pub struct Provider {
    pub kind: ProviderKind,
    pub address: String,
    pub channel: String,
    pub username: String,
}

/// The address is a credential: `Debug` leaves it out.
impl fmt::Debug for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Provider")
            .field("kind", &self.kind)
            .field("channel", &self.channel)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl Provider {
    /// Where the body goes: the address, or for Discord its Slack-compatible path.
    pub fn url(&self) -> String {
        match self.kind {
            ProviderKind::Discord if !self.address.ends_with("/slack") => {
                format!("{}/slack", self.address.trim_end_matches('/'))
            }
            _ => self.address.clone(),
        }
    }

    /// The body for `alert` about `workload` in `namespace`.
    pub fn body(&self, workload: &str, namespace: &str, alert: &Alert) -> Value {
        let who = format!("{workload}.{namespace}");
        match self.kind {
            ProviderKind::Slack | ProviderKind::Discord | ProviderKind::Rocket => {
                let fields: Vec<Value> = alert
                    .fields
                    .iter()
                    .map(|(t, v)| json!({"title": t, "value": v, "short": false}))
                    .collect();
                json!({
                    "channel": self.channel,
                    "username": self.username,
                    "icon_emoji": ":rocket:",
                    "attachments": [{
                        "color": if alert.severity == Severity::Error { "danger" } else { "good" },
                        "author_name": who,
                        "text": alert.message,
                        "mrkdwn_in": ["text"],
                        "fields": fields,
                    }],
                })
            }
            ProviderKind::MsTeams => {
                let facts: Vec<Value> = alert
                    .fields
                    .iter()
                    .map(|(n, v)| json!({"name": n, "value": v}))
                    .collect();
                json!({
                    "@type": "MessageCard",
                    "@context": "http://schema.org/extensions",
                    "themeColor": if alert.severity == Severity::Error { "FF0000" } else { "0076D7" },
                    "summary": who,
                    "sections": [{
                        "activityTitle": alert.message,
                        "activitySubtitle": who,
                        "facts": facts,
                    }],
                })
            }
            ProviderKind::Generic => {
                let fields: serde_json::Map<String, Value> = alert
                    .fields
                    .iter()
                    .map(|(n, v)| (n.clone(), Value::String(v.clone())))
                    .collect();
                json!({
                    "name": workload,
                    "namespace": namespace,
                    "severity": alert.severity.as_str(),
                    "message": alert.message,
                    "fields": fields,
                })
            }
        }
    }
}

/// What an `AlertProvider`'s spec asks for, before its Secret is read: the provider with
/// the address it names inline (empty when it names a Secret), and the Secret's name.
///
/// ### Errors
/// A type meshcanary cannot post to, a `proxy`, or neither an address nor a Secret.
pub fn provider_spec(spec: &Value) -> Result<(Provider, Option<String>), String> {
    let kind_name = spec["type"].as_str().unwrap_or_default();
    let kind = ProviderKind::parse(kind_name).ok_or_else(|| {
        format!("type {kind_name:?} is not one meshcanary posts to (slack, msteams, discord, rocket, generic)")
    })?;
    if spec["proxy"].as_str().is_some_and(|p| !p.is_empty()) {
        // Posting around a proxy the user asked for could send the alert where it must
        // not go: refused, said in the AlertFailed Warning.
        return Err(
            "proxy is not supported by meshcanary (the alert is not sent around it)".into(),
        );
    }
    let secret = spec["secretRef"]["name"].as_str().map(str::to_owned);
    let address = spec["address"].as_str().unwrap_or_default().to_owned();
    if address.is_empty() && secret.is_none() {
        return Err("neither an address nor a secretRef".into());
    }
    let text = |k: &str, default: &str| spec[k].as_str().unwrap_or(default).to_owned();
    Ok((
        Provider {
            kind,
            address,
            channel: text("channel", ""),
            username: text("username", "meshcanary"),
        },
        secret,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(kind: ProviderKind) -> Provider {
        Provider {
            kind,
            address: "https://hooks.example.com/services/T0/B0/TOKEN".into(),
            channel: "deploys".into(),
            username: "meshcanary".into(),
        }
    }

    fn rollback() -> Alert {
        Alert {
            severity: Severity::Error,
            message: "Canary analysis failed, Deployment scaled to zero.".into(),
            fields: vec![("Reason".into(), "failed checks threshold reached 5".into())],
        }
    }

    #[test]
    fn slack_discord_and_rocket_take_slacks_attachment() {
        for kind in [
            ProviderKind::Slack,
            ProviderKind::Discord,
            ProviderKind::Rocket,
        ] {
            let b = provider(kind).body("podinfo", "test", &rollback());
            assert_eq!(b["channel"], "deploys");
            assert_eq!(b["username"], "meshcanary");
            let a = &b["attachments"][0];
            assert_eq!(a["color"], "danger");
            assert_eq!(a["author_name"], "podinfo.test");
            assert_eq!(
                a["text"],
                "Canary analysis failed, Deployment scaled to zero."
            );
            assert_eq!(a["fields"][0]["title"], "Reason");
        }
        assert_eq!(
            provider(ProviderKind::Discord).url(),
            "https://hooks.example.com/services/T0/B0/TOKEN/slack"
        );
        assert_eq!(
            provider(ProviderKind::Slack).url(),
            "https://hooks.example.com/services/T0/B0/TOKEN"
        );
        let ok = Alert {
            severity: Severity::Info,
            ..rollback()
        };
        let b = provider(ProviderKind::Slack).body("podinfo", "test", &ok);
        assert_eq!(b["attachments"][0]["color"], "good");
    }

    #[test]
    fn a_provider_spec_reads_as_flaggers() {
        let (p, secret) =
            provider_spec(&json!({"type": "slack", "channel": "c", "address": "https://h/x"}))
                .unwrap();
        assert_eq!(
            (
                p.kind,
                p.channel.as_str(),
                p.username.as_str(),
                p.address.as_str()
            ),
            (ProviderKind::Slack, "c", "meshcanary", "https://h/x")
        );
        assert_eq!(secret, None);
        let (p, secret) =
            provider_spec(&json!({"type": "msteams", "secretRef": {"name": "teams-url"}})).unwrap();
        assert_eq!(
            (p.kind, secret.as_deref()),
            (ProviderKind::MsTeams, Some("teams-url"))
        );
        assert!(
            provider_spec(&json!({"type": "gchat", "address": "https://h"}))
                .unwrap_err()
                .contains("gchat")
        );
        assert!(provider_spec(&json!({"type": "slack"}))
            .unwrap_err()
            .contains("neither"));
        let proxied = json!({"type": "slack", "address": "https://h", "proxy": "http://p:3128"});
        assert!(provider_spec(&proxied).unwrap_err().contains("proxy"));
    }

    #[test]
    fn teams_takes_a_message_card() {
        let b = provider(ProviderKind::MsTeams).body("podinfo", "test", &rollback());
        assert_eq!(b["@type"], "MessageCard");
        assert_eq!(b["themeColor"], "FF0000");
        assert_eq!(b["summary"], "podinfo.test");
        assert_eq!(b["sections"][0]["facts"][0]["name"], "Reason");
    }

    #[test]
    fn generic_is_plain_json_and_debug_hides_the_address() {
        let b = provider(ProviderKind::Generic).body("podinfo", "test", &rollback());
        assert_eq!(b["severity"], "error");
        assert_eq!(b["fields"]["Reason"], "failed checks threshold reached 5");
        let shown = format!("{:?}", provider(ProviderKind::Slack));
        assert!(!shown.contains("TOKEN"), "{shown}");
        assert!(Severity::Warn > Severity::Info && Severity::Error > Severity::Warn);
        assert_eq!(ProviderKind::parse("gchat"), None);
    }
}

//! Kubernetes Events on the Deployment, in Flagger's words (`events.k8s.io/v1`).
//!
//! kube-runtime's `Recorder` folds every event with the same reason and action into one
//! series whatever its message says, so "Advance ... weight 5" would vanish into "Advance
//! ... weight 2". Flagger's story is told by the messages, so this publisher folds only
//! identical messages (same object, type, reason and note) seen within six minutes, as
//! client-go's event correlator does, and creates a new Event otherwise.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::Client;
use tokio::sync::Mutex;

use crate::rollout::Severity;

/// How long identical events fold into one series.
const FOLD_FOR: Duration = Duration::from_secs(360);

type Key = (String, &'static str, String, String);

/// Publishes Events as `reportingController: meshcanary`, `reportingInstance: <identity>`.
pub struct Events {
    client: Client,
    instance: String,
    seen: Mutex<HashMap<Key, (String, i32, Instant)>>,
}

impl Events {
    pub fn new(client: Client, instance: String) -> Self {
        Events {
            client,
            instance,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Publish one event about `regarding`.
    ///
    /// ### Errors
    /// The API refused or could not be reached.
    pub async fn publish(
        &self,
        regarding: &ObjectReference,
        severity: Severity,
        reason: &str,
        note: &str,
    ) -> Result<(), kube::Error> {
        let namespace = regarding
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let api: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
        let type_ = match severity {
            Severity::Normal => "Normal",
            Severity::Warning => "Warning",
        };
        let key: Key = (
            regarding.uid.clone().unwrap_or_default(),
            type_,
            reason.to_owned(),
            note.to_owned(),
        );
        let mut seen = self.seen.lock().await;
        seen.retain(|_, (_, _, at)| at.elapsed() < FOLD_FOR);
        let now = Timestamp::now();
        if let Some((name, count, at)) = seen.get_mut(&key) {
            *count += 1;
            let patch = serde_json::json!({"series": EventSeries { count: *count, last_observed_time: MicroTime(now) }});
            api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            *at = Instant::now();
            return Ok(());
        }
        let name = format!(
            "{}.{:x}",
            regarding.name.as_deref().unwrap_or("meshcanary"),
            now.as_nanosecond()
        );
        let event = Event {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(now)),
            action: Some("Reconcile".into()),
            reason: Some(reason.into()),
            note: Some(note.into()),
            type_: Some(type_.into()),
            regarding: Some(regarding.clone()),
            reporting_controller: Some("meshcanary".into()),
            reporting_instance: Some(self.instance.clone()),
            ..Event::default()
        };
        api.create(&PostParams::default(), &event).await?;
        seen.insert(key, (name, 1, Instant::now()));
        Ok(())
    }
}

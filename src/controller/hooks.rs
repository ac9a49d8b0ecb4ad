//! Runs Canaries' webhooks off the decision loop: each call is its own task, so a hook that
//! hangs delays nothing but its own answer (until its timeout). The rollout asks for calls
//! ([`crate::rollout::Action::CallHook`]) and reads the latest answers back, at every tick.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use super::metrics::WebhookLabels;
use crate::webhook::{Answer, Caller, HookKind, Payload, Webhook};
use crate::workload::WorkloadId;

/// One hook of one workload.
#[derive(Debug, Default)]
struct Slot {
    /// A call is under way (begun at this time, unix ms).
    running: Option<u64>,
    answer: Option<Answer>,
    /// A failure not yet reported (taken by [`HookRunner::new_failures`]).
    unreported: Option<(HookKind, String)>,
    /// The last failure reported, to report each distinct one once.
    reported: Option<String>,
}

type Slots = Arc<Mutex<HashMap<(WorkloadId, String), Slot>>>;

/// Calls webhooks and keeps their latest answers.
#[derive(Clone)]
pub struct HookRunner {
    caller: Caller,
    slots: Slots,
    calls: Family<WebhookLabels, Counter>,
}

impl HookRunner {
    pub fn new(calls: Family<WebhookLabels, Counter>) -> Self {
        HookRunner {
            caller: Caller::default(),
            slots: Slots::default(),
            calls,
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<(WorkloadId, String), Slot>> {
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The latest answer of each of the workload's hooks, by name.
    pub fn answers(&self, id: &WorkloadId) -> BTreeMap<String, Answer> {
        self.slots()
            .iter()
            .filter(|((w, _), _)| w == id)
            .filter_map(|((_, name), slot)| Some((name.clone(), slot.answer.clone()?)))
            .collect()
    }

    /// Failures of the workload's hooks since the last look, each distinct one once (for a
    /// Warning Event): (hook name, kind, what went wrong).
    pub fn new_failures(&self, id: &WorkloadId) -> Vec<(String, HookKind, String)> {
        let mut out = Vec::new();
        for ((w, name), slot) in self.slots().iter_mut() {
            if w != id {
                continue;
            }
            if let Some((kind, error)) = slot.unreported.take() {
                if slot.reported.as_ref() != Some(&error) {
                    slot.reported = Some(error.clone());
                    out.push((name.clone(), kind, error));
                }
            }
            if slot.answer.as_ref().is_some_and(|a| a.error.is_none()) {
                slot.reported = None;
            }
        }
        out.sort();
        out
    }

    /// Call `hook` for the workload unless a call begun at or after `after_ms` is under way
    /// or answered, or `after_ms` has not come yet.
    pub fn call(
        &self,
        id: &WorkloadId,
        hook: &Webhook,
        payload: Payload,
        after_ms: u64,
        now_ms: u64,
    ) {
        if now_ms < after_ms {
            return;
        }
        {
            let mut slots = self.slots();
            let slot = slots.entry((id.clone(), hook.name.clone())).or_default();
            if slot.running.is_some()
                || slot
                    .answer
                    .as_ref()
                    .is_some_and(|a| a.started_ms >= after_ms)
            {
                return;
            }
            slot.running = Some(now_ms);
        }
        let (runner, id, hook) = (self.clone(), id.clone(), hook.clone());
        tokio::spawn(async move {
            let result = runner.caller.call(&hook, &payload).await;
            runner.count(hook.kind, &result);
            let mut slots = runner.slots();
            let slot = slots.entry((id, hook.name.clone())).or_default();
            slot.running = None;
            let error = result.err().map(|e| e.to_string());
            if let Some(e) = &error {
                slot.unreported = Some((hook.kind, e.clone()));
            }
            slot.answer = Some(Answer {
                started_ms: now_ms,
                error,
            });
        });
    }

    /// Post to `hook` and forget it (`event` hooks): a failure is counted and logged.
    pub fn notify(&self, hook: &Webhook, payload: Payload) {
        let runner = self.clone();
        let hook = hook.clone();
        tokio::spawn(async move {
            let result = runner.caller.call(&hook, &payload).await;
            runner.count(hook.kind, &result);
            if let Err(error) = result {
                tracing::debug!(hook = %hook.name, %error, "An event webhook failed");
            }
        });
    }

    fn count(&self, kind: HookKind, result: &Result<(), crate::webhook::HookError>) {
        let result = match result {
            Ok(()) => "ok",
            Err(e) => e.reason(),
        };
        self.calls
            .get_or_create(&WebhookLabels {
                kind: kind.as_str(),
                result,
            })
            .inc();
    }

    /// Forget the hooks of workloads that are gone.
    pub fn retain(&self, keep: impl Fn(&WorkloadId) -> bool) {
        self.slots()
            .retain(|(id, _), slot| keep(id) || slot.running.is_some());
    }
}

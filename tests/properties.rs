//! Property runs over every input that comes from outside the process besides Envoy's text
//! (the parser has its own fuzz target and property tests): a peer's wire answers, the
//! `meshcanary.io/*` annotations, the status annotation read back, and the queue's records
//! on disk. Each property runs a fixed number of cases on the stable toolchain, so
//! `scripts/test.sh` (and CI) runs them every time in bounded time; a failure prints the
//! smallest input that breaks it.

use std::collections::BTreeMap;

use meshcanary::judge::{JudgeState, Observation, Policy};
use meshcanary::peers::{CountsMsg, Merged, Replica, SlotMsg, WindowMsg, WindowsReply};
use meshcanary::rollout::{self, DeploymentState, Observed, Status};
use meshcanary::window::{WindowConfig, WindowSource as _};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use prost::Message as _;

const NOW: u64 = 1_700_000_000_000;

/// Numbers a hostile or broken peer might send: small, huge, and the edges.
fn number() -> impl Strategy<Value = u64> {
    prop_oneof![0..1000u64, Just(u64::MAX), Just(u64::MAX - 1), any::<u64>()]
}

fn counts(buckets: usize) -> impl Strategy<Value = CountsMsg> {
    (
        number(),
        number(),
        prop_oneof![9 => vec(number(), buckets..=buckets), 1 => vec(number(), 0..24)],
    )
        .prop_map(|(requests, errors, buckets)| CountsMsg {
            requests,
            errors,
            buckets,
        })
}

/// Mostly windows that pass the checks (so the numbers reach the merge and the judge),
/// sometimes ones that do not: NaN or descending edges, a slot from the far future.
fn window() -> impl Strategy<Value = WindowMsg> {
    (0usize..6)
        .prop_flat_map(|k| {
            let edges = prop_oneof![
                9 => vec(1.0..1000.0f64, k..=k).prop_map(|steps| {
                    steps.iter().scan(0.0, |acc, s| { *acc += s; Some(*acc) }).collect::<Vec<f64>>()
                }),
                1 => vec(prop_oneof![Just(f64::NAN), Just(f64::INFINITY), -10.0..10.0f64], 0..8),
            ];
            let slot = (
                prop_oneof![9 => (NOW / 1000 - 40)..(NOW / 1000 + 2), 1 => number()],
                number(),
                proptest::option::of(counts(k + 1)),
            )
                .prop_map(|(index, since_ms, counts)| SlotMsg {
                    index,
                    since_ms,
                    counts,
                });
            (
                prop_oneof![Just("canary"), Just("primary"), Just("other")],
                edges,
                proptest::option::of(number()),
                proptest::option::of(counts(k + 1)),
                vec(slot, 0..40),
                vec("[a-z0-9-]{0,12}", 0..3),
            )
        })
        .prop_map(
            |(role, edges_ms, last_update_ms, totals, slots, no_inbound_pods)| WindowMsg {
                namespace: "test".into(),
                workload: "podinfo".into(),
                role: role.into(),
                edges_ms,
                last_update_ms,
                totals,
                slots,
                no_inbound_pods,
            },
        )
}

fn reply() -> impl Strategy<Value = WindowsReply> {
    (number(), vec(window(), 0..4)).prop_map(|(cursor, windows)| WindowsReply {
        cursor,
        node: "node-b".into(),
        windows,
    })
}

/// A reply through the leader's whole read path: the replica, the merge with another
/// node, the pair and the judge. Nothing may panic, and a role's merged totals never go
/// down while the peer keeps answering with a valid window of it (a window the peer no
/// longer has is dropped, so one that comes back starts from zero: the judge re-bases on
/// it and loses that one interval).
fn through_the_leader(replies: Vec<WindowsReply>) {
    let config = WindowConfig::default();
    let merged = Merged::new(config, 3_000);
    let mut judge = JudgeState::new(&Policy::default());
    let mut last = (0u64, 0u64);
    for (i, reply) in replies.into_iter().enumerate() {
        let now = NOW + i as u64 * 1000;
        let has = |role: &str| reply.windows.iter().any(|w| w.role == role);
        let (canary, primary) = (has("canary"), has("primary"));
        let invalid = {
            let mut peers = merged.peers.lock().unwrap();
            peers
                .entry("b".into())
                .or_insert_with(|| Replica::new(config))
                .apply(reply, now)
        };
        if !canary || !invalid.is_empty() {
            last.0 = 0;
        }
        if !primary || !invalid.is_empty() {
            last.1 = 0;
        }
        if let Some(pair) = merged.pair("test", "podinfo", now) {
            let j = judge.judge(
                &Observation::of(&pair, now).in_step(NOW),
                &Policy::default(),
            );
            let _ = j.verdict.as_str();
            let t = (pair.canary_totals.requests, pair.primary_totals.requests);
            assert!(
                t.0 >= last.0 && t.1 >= last.1,
                "totals went down: {last:?} -> {t:?}"
            );
            last = t;
            assert!(pair
                .canary
                .success_rate
                .is_none_or(|s| (0.0..=1.0).contains(&s)));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_on_the_peer_port(bytes in vec(any::<u8>(), 0..4096)) {
        if let Ok(reply) = WindowsReply::decode(&bytes[..]) {
            through_the_leader(vec![reply]);
        }
    }

    #[test]
    fn peer_answers_with_extreme_numbers(replies in vec(reply(), 1..5)) {
        through_the_leader(replies);
    }

    #[test]
    fn annotations_parse_or_say_which_key(map in btree_map(
        prop_oneof![
            Just("meshcanary.io/enabled"), Just("meshcanary.io/step-weights"),
            Just("meshcanary.io/max-weight"), Just("meshcanary.io/interval"),
            Just("meshcanary.io/threshold"), Just("meshcanary.io/progress-deadline"),
            Just("meshcanary.io/success-rate-min"), Just("meshcanary.io/latency-p99-max"),
            Just("meshcanary.io/min-requests"), Just("meshcanary.io/alpha"),
            Just("meshcanary.io/judge"), Just("meshcanary.io/port"), Just("meshcanary.io/typo"),
        ].prop_map(str::to_owned),
        prop_oneof![
            "[0-9,]{0,12}", "[0-9]{1,3}(ms|s|m|h)", "-?[0-9.e]{1,8}", ".{0,12}",
            Just("true".to_owned()), Just("18446744073709551616".to_owned()),
            Just("99999999999h".to_owned()), Just("NaN".to_owned()),
        ],
        0..8,
    )) {
        match meshcanary::annotations::parse(&map) {
            Ok(p) => {
                prop_assert!(p.step_weights.windows(2).all(|w| w[0] < w[1]));
                prop_assert!(p.step_weights.iter().all(|w| *w >= 1 && *w <= p.max_weight && *w <= 99));
                prop_assert!(p.interval < p.progress_deadline);
                prop_assert!(p.threshold >= 1);
                prop_assert!((0.0..=1.0).contains(&p.judge.success_rate_min));
                prop_assert!(p.judge.alpha > 0.0 && p.judge.alpha < 1.0);
            }
            Err(e) => {
                prop_assert!(map.contains_key(&e.key), "the error names a key that was given: {e}");
            }
        }
    }

    #[test]
    fn a_status_read_back_is_used_only_if_it_is_sane(
        text in prop_oneof![
            ".{0,64}".boxed(),
            (number(), number(), number(), 0u8..=255, any::<u32>(), any::<bool>()).prop_map(
                |(a, b, c, w, f, an)| format!(
                    r#"{{"phase":"Progressing","canaryWeight":{w},"failedChecks":{f},"lastApplied":"v1","revision":"v2","analysing":{an},"stepStartedMs":{a},"lastTransitionMs":{b},"lastFailedCheckMs":{c}}}"#
                )
            ).boxed(),
        ],
        ready in any::<bool>(),
        weight in proptest::option::of(0u8..=255),
    ) {
        let Ok(status) = serde_json::from_str::<Status>(&text) else { return Ok(()) };
        if status.validate(NOW).is_err() {
            return Ok(());
        }
        let mut a = BTreeMap::new();
        a.insert("meshcanary.io/enabled".to_owned(), "true".to_owned());
        let policy = meshcanary::annotations::parse(&a).unwrap();
        let obs = Observed {
            canary: DeploymentState { replicas: 1, ready, settled: true, template_hash: "v2".into() },
            primary: Some(DeploymentState { replicas: 1, ready: true, settled: true, template_hash: "v1".into() }),
            weight,
            judgement: None,
            hooks: BTreeMap::new(),
        };
        let who = rollout::Workload { name: "podinfo", namespace: "test" };
        let tr = rollout::step(Some(&status), &obs, &policy, &who, NOW);
        prop_assert!(tr.status.canary_weight <= 100);
        prop_assert!(tr.actions.iter().all(|a| !matches!(a, rollout::Action::SetWeight(w) if *w > 100)));
        let _ = rollout::release(Some(&status), weight, &who, "opted out", NOW);
    }

    #[test]
    fn the_queue_reader_survives_any_damage(
        payloads in vec(vec(any::<u8>(), 0..300), 1..12),
        damage in vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        use meshcanary::remote_write::queue::Queue;
        let dir = std::env::temp_dir().join(format!(
            "meshcanary-prop-queue-{}-{}", std::process::id(), fastrand::u64(..)
        ));
        {
            let q = Queue::open(&dir, 1 << 30).unwrap();
            for (i, p) in payloads.iter().enumerate() {
                q.append(p, i as u32, 0).unwrap();
            }
        }
        let seg = std::fs::read_dir(&dir).unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "seg"))
            .unwrap();
        let mut bytes = std::fs::read(&seg).unwrap();
        for (at, b) in &damage {
            let i = at.index(bytes.len());
            bytes[i] ^= b | 1;
        }
        if let Some(at) = cut {
            bytes.truncate(at.index(bytes.len() + 1));
        }
        std::fs::write(&seg, &bytes).unwrap();
        let q = Queue::open(&dir, 1 << 30).unwrap();
        // A later segment, as after a restart: the reader must get past any damage.
        q.append(b"after", 99, 0).unwrap();
        let mut cursor = q.ack_cursor();
        let mut read = Vec::new();
        for _ in 0..payloads.len() + 2 {
            let (next, _) = q.next(cursor).unwrap();
            let Some((record, after)) = next else { break };
            read.push(record.payload);
            cursor = after;
        }
        // Only whole records come back, in order, and the one after the damage arrives.
        prop_assert_eq!(read.last().map(Vec::as_slice), Some(&b"after"[..]));
        let mut from = 0;
        for r in &read[..read.len() - 1] {
            let at = payloads[from..].iter().position(|p| p == r);
            prop_assert!(at.is_some(), "a record that was never written came back");
            from += at.unwrap() + 1;
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

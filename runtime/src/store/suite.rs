//! The store conformance suite: what every [`Store`] implementation must do, run the same way
//! on the embedded SQLite store and on PostgreSQL (`tests/store.rs`).
//!
//! [`run`] takes a function that opens the store under test: a fresh, empty store on the first
//! call, and the same store again on later calls (a restart, or a second host of a fleet).

use super::{
    Feedback, FeedbackSource, LineageRow, NewTicket, Reserved, Retention, Store, TicketState, VersionRecord,
};
use crate::manifest::{Architecture, Manifest, VersionId};
use std::collections::HashSet;
use std::sync::Arc;

/// Opens the store under test.
pub type Open<'a> = dyn Fn() -> Arc<dyn Store> + 'a;

/// Runs every check; panics (with the check's name) on the first that fails.
pub fn run(open: &Open<'_>) {
    let store = open();
    registry_and_routes(store.as_ref());
    lineage(store.as_ref());
    review_queue(store.as_ref());
    api_keys(store.as_ref());
    budgets(store.as_ref());
    claims_never_collide(open);
    budgets_are_never_overspent(open);
    survives_a_restart(store, open);
}

fn manifest(name: &str) -> Manifest {
    Manifest {
        name: name.to_string(),
        architecture: Architecture::Mlp,
        weights: "model.safetensors".into(),
        config: None,
        tokenizer: None,
        max_tokens: None,
        features: vec!["x".into()],
        labels: vec!["a".into(), "b".into()],
        files: Vec::new(),
        sections: Default::default(),
    }
}

fn id(digit: char) -> VersionId {
    VersionId::parse(&digit.to_string().repeat(64)).expect("64 hex digits")
}

fn registry_and_routes(store: &dyn Store) {
    let v = VersionRecord {
        name: "suite".into(),
        id: id('a'),
        path: "/models/a".into(),
        weights: "f32".into(),
        retain_input: true,
        manifest: manifest("suite"),
        registered_ms: 1000,
    };
    assert!(store.register(&v).unwrap(), "registry: a new version is recorded");
    assert!(
        !store.register(&v).unwrap(),
        "registry: registering twice changes nothing"
    );
    assert_eq!(
        store.version("suite", &id('a')).unwrap().as_ref(),
        Some(&v),
        "registry: read back"
    );
    assert!(store.version("suite", &id('b')).unwrap().is_none());
    assert_eq!(store.versions().unwrap(), vec![v]);

    let before = store.routes_version().unwrap();
    let (routes, events) = store
        .update_routes("suite", &mut |r, _| {
            r.aliases.insert("production".into(), id('a'));
            Ok("first release".into())
        })
        .unwrap()
        .unwrap();
    assert_eq!(routes.aliases.get("production"), Some(&id('a')));
    assert_eq!(events.len(), 1, "routes: one alias moved");
    assert_eq!(events[0].reason, "first release");
    assert!(
        store.routes_version().unwrap() > before,
        "routes: the version counter moves"
    );
    let refused = store
        .update_routes("suite", &mut |r, _| {
            r.aliases.clear();
            Err("no".into())
        })
        .unwrap();
    assert_eq!(refused.unwrap_err(), "no");
    assert_eq!(
        store.routes("suite").unwrap(),
        routes,
        "routes: a refused change changes nothing"
    );
    assert_eq!(store.history("suite").unwrap(), events);
}

fn lineage(store: &dyn Store) {
    let rows: Vec<LineageRow> = (0..10)
        .map(|i| LineageRow {
            request_id: format!("r{i}"),
            time_ms: 1000 + i,
            record: format!("{{\"i\":{i}}}"),
        })
        .collect();
    store.append_lineage(&rows).unwrap();
    assert_eq!(store.lineage_count().unwrap(), 10);
    assert_eq!(store.lineage("r3").unwrap().as_ref(), Some(&rows[3]));
    let recent: Vec<_> = store
        .recent_lineage(2)
        .unwrap()
        .into_iter()
        .map(|r| r.request_id)
        .collect();
    assert_eq!(recent, ["r9", "r8"], "lineage: newest first");
    let keep = Retention {
        max_records: Some(6),
        max_age_ms: None,
    };
    assert_eq!(
        store.prune_lineage(&keep, 0).unwrap(),
        4,
        "lineage: pruned by count"
    );
    assert!(store.lineage("r3").unwrap().is_none());
    let age = Retention {
        max_age_ms: Some(3),
        max_records: None,
    };
    assert_eq!(
        store.prune_lineage(&age, 1010).unwrap(),
        3,
        "lineage: pruned by age"
    );
    assert_eq!(store.lineage_count().unwrap(), 3);
}

fn ticket(request: &str, created_ms: i64) -> NewTicket {
    NewTicket {
        request_id: request.to_string(),
        model: "suite".into(),
        version: id('a').to_string(),
        decision: "review".into(),
        reasons: r#"["confidence < 0.9"]"#.into(),
        input: r#"{"x":1}"#.into(),
        output: r#"{"class":"a"}"#.into(),
        created_ms,
    }
}

fn review_queue(store: &dyn Store) {
    let first = store.enqueue_review(&ticket("q1", 100)).unwrap();
    assert_eq!(
        store.enqueue_review(&ticket("q1", 100)).unwrap(),
        first,
        "review: one ticket per request"
    );
    let second = store.enqueue_review(&ticket("q2", 200)).unwrap();
    let third = store.enqueue_review(&ticket("q3", 300)).unwrap();
    let pending = store.tickets(Some(TicketState::Pending), 10, 1000).unwrap();
    assert_eq!(
        pending.iter().map(|t| t.id).collect::<Vec<_>>(),
        [first, second, third]
    );
    assert_eq!(pending[0].ticket, ticket("q1", 100), "review: read back");

    // A claim takes the oldest; its lease runs out and the ticket is pending again.
    let claimed = store.claim_review("ana", 500, 1000).unwrap().unwrap();
    assert_eq!((claimed.id, claimed.state), (first, TicketState::Claimed));
    assert_eq!(claimed.lease_until_ms, Some(1500));
    assert_eq!(store.claim_review("bo", 500, 1001).unwrap().unwrap().id, second);
    let during = store.tickets(Some(TicketState::Pending), 10, 1499).unwrap();
    assert_eq!(during.iter().map(|t| t.id).collect::<Vec<_>>(), [third]);
    let after = store.tickets(Some(TicketState::Pending), 10, 1500).unwrap();
    assert_eq!(
        after.iter().map(|t| t.id).collect::<Vec<_>>(),
        [first, third],
        "review: a lapsed lease returns the ticket"
    );
    assert_eq!(after[0].reviewer, None);

    // Resolving: refused while another reviewer's lease runs, then by anyone once it lapsed.
    let refused = store.resolve_review(second, "ana", "b", None, 1200).unwrap();
    assert!(
        refused.unwrap_err().contains("claimed by bo"),
        "review: another's claim is kept"
    );
    let resolved = store
        .resolve_review(second, "bo", "b", Some("clear case"), 1300)
        .unwrap()
        .unwrap();
    assert_eq!(resolved.state, TicketState::Resolved);
    assert_eq!(
        (resolved.label.as_deref(), resolved.closed_ms),
        (Some("b"), Some(1300))
    );
    assert!(
        store
            .resolve_review(second, "bo", "a", None, 1400)
            .unwrap()
            .is_err(),
        "review: resolved once"
    );
    assert!(store
        .resolve_review(999_999, "bo", "a", None, 1400)
        .unwrap()
        .is_err());
    store
        .resolve_review(first, "cy", "a", None, 1600)
        .unwrap()
        .unwrap();

    // Expiry closes what nobody took in time.
    assert_eq!(
        store.expire_reviews(350, 2000).unwrap(),
        1,
        "review: the old pending ticket expires"
    );
    assert_eq!(
        store.ticket(third, 2000).unwrap().unwrap().state,
        TicketState::Expired
    );
    assert!(store.claim_review("ana", 500, 2000).unwrap().is_none());

    // Labels: the two resolutions, then ground truth, in order.
    store
        .add_feedback(&Feedback {
            request_id: "q3".into(),
            label: "a".into(),
            source: FeedbackSource::GroundTruth,
            reviewer: None,
            comment: None,
            ticket: None,
            time_ms: 2100,
        })
        .unwrap();
    let labels: Vec<_> = store
        .feedback()
        .unwrap()
        .into_iter()
        .map(|f| (f.request_id, f.label, f.source, f.ticket))
        .collect();
    assert_eq!(
        labels,
        [
            (
                "q2".to_string(),
                "b".to_string(),
                FeedbackSource::Review,
                Some(second)
            ),
            ("q1".into(), "a".into(), FeedbackSource::Review, Some(first)),
            ("q3".into(), "a".into(), FeedbackSource::GroundTruth, None),
        ]
    );
}

/// Eight reviewers, each on a connection of its own, claim 64 tickets at once: each ticket goes
/// to exactly one of them.
fn api_keys(store: &dyn Store) {
    let key = |name: &str, hash: &str| super::ApiKey {
        name: name.into(),
        hash: hash.into(),
        scopes: vec!["infer".into(), "review".into()],
        tenant: Some("tenant-7".into()),
        created_ms: 1,
        revoked_ms: None,
    };
    store.add_key(&key("app", "aa")).unwrap().unwrap();
    store.add_key(&key("ops", "bb")).unwrap().unwrap();
    assert!(store
        .add_key(&key("app", "cc"))
        .unwrap()
        .unwrap_err()
        .contains("exists"));
    assert_eq!(store.key_by_hash("aa").unwrap(), Some(key("app", "aa")));
    assert_eq!(store.key_by_hash("zz").unwrap(), None);
    assert!(store.revoke_key("app", 5).unwrap());
    assert!(!store.revoke_key("app", 6).unwrap(), "revoked once");
    assert!(!store.revoke_key("nobody", 6).unwrap());
    let keys = store.keys().unwrap();
    assert_eq!(
        keys.iter().map(|k| k.name.as_str()).collect::<Vec<_>>(),
        ["app", "ops"]
    );
    assert_eq!((keys[0].revoked_ms, keys[1].revoked_ms), (Some(5), None));
}

fn claims_never_collide(open: &Open<'_>) {
    let store = open();
    let ids: HashSet<i64> = (0..64)
        .map(|i| {
            store
                .enqueue_review(&ticket(&format!("c{i}"), 10_000 + i))
                .unwrap()
        })
        .collect();
    let reviewers: Vec<_> = (0..8).map(|_| open()).collect();
    let claimed: Vec<i64> = std::thread::scope(|s| {
        let workers: Vec<_> = reviewers
            .iter()
            .enumerate()
            .map(|(r, store)| {
                s.spawn(move || {
                    let mut mine = Vec::new();
                    while let Some(t) = store.claim_review(&format!("r{r}"), 60_000, 20_000).unwrap() {
                        mine.push(t.id);
                    }
                    mine
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap()).collect()
    });
    let unique: HashSet<i64> = claimed.iter().copied().collect();
    assert_eq!(claimed.len(), unique.len(), "review: a ticket was claimed twice");
    assert_eq!(unique, ids, "review: every ticket was claimed once");
}

fn budgets(store: &dyn Store) {
    assert_eq!(
        store.reserve_budget("nobody", 5, 0).unwrap(),
        Reserved::NoBudget,
        "budgets: a key without one is not held"
    );
    // 10 per period of 1000 ms, from t = 0.
    store.set_budget("k", 10, Some(1000), None, 0).unwrap();
    assert_eq!(store.reserve_budget("k", 6, 10).unwrap(), Reserved::Held);
    let Reserved::Short(row) = store.reserve_budget("k", 5, 20).unwrap() else {
        panic!("budgets: 6 of 10 held, 5 more must be refused");
    };
    assert_eq!((row.limit, row.reserved, row.left()), (10, 6, 4));
    store.release_budget("k", 6, 3).unwrap();
    let row = &store.budget_rows(Some("k")).unwrap()[0];
    assert_eq!(
        (row.spent, row.reserved),
        (3, 0),
        "budgets: charged 3, released the rest"
    );
    // Replaced: the new limit and downgrade apply, what was spent stays.
    store.set_budget("k", 8, Some(1000), Some("cheap"), 500).unwrap();
    let row = &store.budget_rows(Some("k")).unwrap()[0];
    assert_eq!((row.limit, row.spent, row.period_start_ms), (8, 3, 0));
    assert_eq!(row.downgrade_to.as_deref(), Some("cheap"));
    assert!(matches!(
        store.reserve_budget("k", 6, 600).unwrap(),
        Reserved::Short(_)
    ));
    // The next period (t = 2500 is in the one starting at 2000) starts with nothing spent.
    assert_eq!(store.reserve_budget("k", 8, 2500).unwrap(), Reserved::Held);
    let row = &store.budget_rows(Some("k")).unwrap()[0];
    assert_eq!((row.period_start_ms, row.spent, row.reserved), (2000, 0, 8));
    store.release_budget("k", 8, 8).unwrap();
    assert_eq!(store.budget_rows(None).unwrap().len(), 1);
}

/// Many hosts reserving at once against one budget: exactly what it pays for is held.
fn budgets_are_never_overspent(open: &Open<'_>) {
    open().set_budget("shared", 100, None, None, 0).unwrap();
    let hosts: Vec<_> = (0..8).map(|_| open()).collect();
    let held: usize = std::thread::scope(|s| {
        let workers: Vec<_> = hosts
            .iter()
            .map(|store| {
                s.spawn(move || {
                    (0..40)
                        .filter(|_| match store.reserve_budget("shared", 3, 1).unwrap() {
                            Reserved::Held => true,
                            // A refusal reports the row it was decided on: too little left.
                            Reserved::Short(row) => {
                                assert!(row.left() < 3, "budgets: refused with {} left", row.left());
                                false
                            }
                            Reserved::NoBudget => panic!("budgets: the budget is gone"),
                        })
                        .count()
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    });
    assert_eq!(held, 33, "budgets: 100 pays for exactly 33 holds of 3");
    let row = &open().budget_rows(Some("shared")).unwrap()[0];
    assert_eq!((row.reserved, row.left()), (99, 1));
}

/// What was written is there after the store is opened again.
fn survives_a_restart(before: Arc<dyn Store>, open: &Open<'_>) {
    let tickets = before.tickets(None, 1000, 30_000).unwrap();
    let feedback = before.feedback().unwrap();
    let lineage = before.recent_lineage(100).unwrap();
    drop(before);
    let after = open();
    assert_eq!(
        after.tickets(None, 1000, 30_000).unwrap(),
        tickets,
        "restart: the queue is whole"
    );
    assert_eq!(
        after.feedback().unwrap(),
        feedback,
        "restart: the labels are whole"
    );
    assert_eq!(
        after.recent_lineage(100).unwrap(),
        lineage,
        "restart: the lineage is whole"
    );
}

//! State-machine tests: every message order and crash point of one replica,
//! and a property test of random transaction sequences on several replicas
//! with commits delivered out of order, checked against a `BTreeMap` model.

use super::*;
use crate::types::Condition;
use proptest::prelude::*;

/// A replica with its applied data in a BTreeMap: the sled store's stand-in.
#[derive(Default)]
struct Sim {
    core: ReplicaCore,
    data: BTreeMap<Key, Versioned>,
    wal: BTreeMap<TxnId, PreparedRecord>,
}

impl Sim {
    fn prepare(&mut self, txn: &Txn, attempt: u64) -> PrepareStep {
        let data = &self.data;
        let step = self.core.prepare(txn, attempt, |k| Ok(data.get(k).cloned())).unwrap();
        if let PrepareStep::Persist(rec) = &step {
            self.wal.insert(rec.txn_id, rec.clone());
            assert_eq!(self.core.logged(&[rec.txn_id]), vec![], "nothing can abort it in between here");
        }
        step
    }

    fn apply_ready(&mut self) {
        let batch = self.core.next_apply();
        let Some(last) = batch.last().map(|e| e.index) else {
            return;
        };
        for e in batch {
            for w in e.writes.iter().cloned() {
                match w {
                    Write::Put(k, v) => {
                        self.data.insert(k, Versioned { value: v, version: e.index });
                    }
                    Write::Delete(k) => {
                        self.data.remove(&k);
                    }
                }
            }
            self.wal.remove(&e.txn_id);
        }
        self.core.applied(last);
    }

    /// kill -9 and restart: memory is lost, data and WAL survive.
    fn crash_and_recover(&mut self) {
        let applied = self.core.applied_index();
        self.core = ReplicaCore::recover(applied, self.wal.values().cloned().collect());
    }
}

fn k(s: &str) -> Key {
    s.as_bytes().to_vec()
}

fn put(key: &str, v: &str) -> Write {
    Write::Put(k(key), v.as_bytes().to_vec())
}

fn txn(id: u128, conditions: Vec<Condition>, writes: Vec<Write>) -> Txn {
    Txn { id: TxnId(id), conditions, writes }
}

#[test]
fn prepare_then_commit_applies_and_unlocks() {
    let mut s = Sim::default();
    let t = txn(1, vec![Condition::Missing(k("a"))], vec![put("a", "1")]);
    assert!(matches!(s.prepare(&t, 1), PrepareStep::Persist(_)));
    assert_eq!(s.core.holder(b"a"), Some(TxnId(1)));
    assert_eq!(s.core.commit(TxnId(1), 1, None).unwrap(), CommitStep::Queued);
    s.apply_ready();
    assert_eq!(s.data[&k("a")], Versioned { value: b"1".to_vec(), version: 1 });
    assert_eq!(s.core.holder(b"a"), None);
    assert!(s.wal.is_empty());
    assert_eq!(s.core.commit(TxnId(1), 1, None).unwrap(), CommitStep::AlreadyApplied, "duplicate COMMIT");
}

#[test]
fn a_range_is_held_while_any_key_in_it_is_prepared() {
    let mut s = Sim::default();
    s.prepare(&txn(1, vec![], vec![put("b/2", "1"), put("d", "1")]), 1);
    assert_eq!(s.core.holder_in(b"b/", Some(b"b0")), Some(TxnId(1)));
    assert_eq!(s.core.holder_in(b"b/2", Some(b"b/3")), Some(TxnId(1)), "start is inclusive");
    assert_eq!(s.core.holder_in(b"a", Some(b"b/2")), None, "end is exclusive");
    assert_eq!(s.core.holder_in(b"b/3", Some(b"d")), None);
    assert_eq!(s.core.holder_in(b"", None), Some(TxnId(1)), "everything");
    assert_eq!(s.core.holder_in(b"d", None), Some(TxnId(1)));
    assert_eq!(s.core.holder_in(b"e", Some(b"a")), None, "an empty range holds nothing");
    assert_eq!(s.core.committed_at(TxnId(1)), None, "undecided");
    s.core.commit(TxnId(1), 1, None).unwrap();
    assert_eq!(s.core.committed_at(TxnId(1)), Some(1), "decided, not applied: still held");
    assert_eq!(s.core.holder_in(b"d", None), Some(TxnId(1)));
    s.apply_ready();
    assert_eq!(s.core.holder_in(b"", None), None, "released by the apply");
}

#[test]
fn a_record_that_outlived_its_apply_is_retired_when_the_commit_is_told_again() {
    let mut s = Sim::default();
    let t = txn(1, vec![], vec![put("a", "1")]);
    s.prepare(&t, 1);
    s.core.commit(TxnId(1), 1, None).unwrap();
    // Crash between apply's two writes: data and applied index written,
    // the WAL record not yet removed.
    let batch = s.core.next_apply();
    for e in &batch {
        for w in e.writes.iter() {
            if let Write::Put(key, v) = w {
                s.data.insert(key.clone(), Versioned { value: v.clone(), version: e.index });
            }
        }
    }
    s.core = ReplicaCore::recover(1, s.wal.values().cloned().collect());
    assert_eq!(s.core.holder(b"a"), Some(TxnId(1)), "in doubt after the restart");
    assert_eq!(s.core.in_doubt(0), vec![(TxnId(1), 1)]);
    // The coordinator answers "committed at 1": nothing to apply, the lock goes.
    assert_eq!(s.core.commit(TxnId(1), 1, None).unwrap(), CommitStep::Retired);
    assert_eq!(s.core.holder(b"a"), None);
    assert!(s.core.in_doubt(0).is_empty());
    assert!(s.core.next_apply().is_empty(), "applied once only");
    assert_eq!(s.core.commit(TxnId(1), 1, None).unwrap(), CommitStep::AlreadyApplied);
    // A transaction decided at a later index is untouched by the rule.
    let t2 = txn(2, vec![], vec![put("a", "2")]);
    assert!(matches!(s.prepare(&t2, 1), PrepareStep::Persist(_)));
    assert_eq!(s.core.commit(TxnId(2), 2, None).unwrap(), CommitStep::Queued);
    // One prepared since the restart is never retired by an old index.
    let t3 = txn(3, vec![], vec![put("c", "3")]);
    assert!(matches!(s.prepare(&t3, 1), PrepareStep::Persist(_)));
    assert_eq!(s.core.commit(TxnId(3), 1, None).unwrap(), CommitStep::AlreadyApplied);
    assert_eq!(s.core.holder(b"c"), Some(TxnId(3)));
}

#[test]
fn failing_condition_votes_no_and_locks_nothing() {
    let mut s = Sim::default();
    let t = txn(1, vec![Condition::ValueEquals(k("a"), b"x".to_vec())], vec![put("a", "1")]);
    match s.prepare(&t, 1) {
        PrepareStep::VoteNo(reason) => assert_eq!(reason, "a = x (found missing)"),
        other => panic!("expected NO, got {other:?}"),
    }
    assert_eq!(s.core.holder(b"a"), None);
    assert!(s.wal.is_empty());
}

#[test]
fn conflicting_prepare_blocks_until_the_holder_applies_then_sees_its_write() {
    let mut s = Sim::default();
    let t1 = txn(1, vec![], vec![put("a", "1")]);
    let t2 = txn(2, vec![Condition::ValueEquals(k("a"), b"1".to_vec())], vec![put("a", "2")]);
    assert!(matches!(s.prepare(&t1, 1), PrepareStep::Persist(_)));
    assert_eq!(s.prepare(&t2, 1), PrepareStep::Blocked(TxnId(1)));
    s.core.commit(TxnId(1), 1, None).unwrap();
    s.apply_ready();
    assert!(matches!(s.prepare(&t2, 1), PrepareStep::Persist(_)), "judged against applied state");
}

#[test]
fn commits_apply_in_index_order_whatever_order_they_arrive() {
    let mut s = Sim::default();
    let t1 = txn(1, vec![], vec![put("a", "1")]);
    let t2 = txn(2, vec![], vec![put("b", "2")]);
    s.prepare(&t1, 1);
    s.prepare(&t2, 1);
    assert_eq!(s.core.commit(TxnId(2), 2, None).unwrap(), CommitStep::Queued);
    s.apply_ready();
    assert!(s.data.is_empty(), "index 2 must wait for index 1");
    assert_eq!(s.core.queued(), 1);
    s.core.commit(TxnId(1), 1, None).unwrap();
    s.apply_ready();
    assert_eq!(s.core.applied_index(), 2);
    assert_eq!(s.data.len(), 2);
}

#[test]
fn abort_releases_locks_and_a_late_prepare_of_that_attempt_votes_no() {
    let mut s = Sim::default();
    let t1 = txn(1, vec![], vec![put("a", "1")]);
    s.prepare(&t1, 7);
    assert!(s.core.abort(TxnId(1), 7).unwrap());
    assert_eq!(s.core.holder(b"a"), None);
    // ABORT overtaking its PREPARE: the PREPARE must not lock anything.
    let t2 = txn(2, vec![], vec![put("a", "2")]);
    assert!(!s.core.abort(TxnId(2), 3).unwrap());
    assert!(matches!(s.prepare(&t2, 3), PrepareStep::VoteNo(_)));
    assert_eq!(s.core.holder(b"a"), None);
    // A retry of the same transaction id is a new attempt and may prepare.
    assert!(matches!(s.prepare(&t2, 4), PrepareStep::Persist(_)));
}

#[test]
fn an_abort_while_the_record_is_being_written_waits_for_the_write() {
    let mut core = ReplicaCore::default();
    let read = |_: &[u8]| Ok(None);
    let t1 = txn(1, vec![], vec![put("a", "1")]);
    let t2 = txn(2, vec![], vec![put("a", "2")]);
    assert!(matches!(core.prepare(&t1, 1, read), Ok(PrepareStep::Persist(_))));
    // The ABORT (the coordinator timed the batch out) comes before the
    // participant has written the record: the keys stay locked...
    assert_eq!(core.abort(TxnId(1), 1), Ok(false), "nothing written yet, nothing to drop");
    assert_eq!(core.prepare(&t2, 1, read), Ok(PrepareStep::Blocked(TxnId(1))));
    // ... so no later record can claim the key before the dead one is
    // written; once it is, the abort is done and the record dropped.
    assert_eq!(core.logged(&[TxnId(1)]), vec![TxnId(1)]);
    assert!(matches!(core.prepare(&t2, 1, read), Ok(PrepareStep::Persist(_))));
    assert_eq!(core.logged(&[TxnId(2)]), vec![]);
    assert_eq!(core.prepared_count(), 1);
    // A late PREPARE of the aborted attempt votes NO.
    assert!(matches!(core.prepare(&t1, 1, read), Ok(PrepareStep::VoteNo(_))));
}

#[test]
fn a_second_prepare_of_a_record_being_written_waits_for_it() {
    let mut core = ReplicaCore::default();
    let read = |_: &[u8]| Ok(None);
    let t = txn(1, vec![], vec![put("a", "1")]);
    assert!(matches!(core.prepare(&t, 1, read), Ok(PrepareStep::Persist(_))));
    // A retry arriving in another batch must not vote YES on a record that
    // is not written yet.
    assert_eq!(core.prepare(&t, 2, read), Ok(PrepareStep::Blocked(TxnId(1))));
    // An abort of the first attempt meanwhile, then the retry adopts the
    // record once it is written: the abort no longer applies.
    assert_eq!(core.abort(TxnId(1), 1), Ok(false));
    assert_eq!(core.logged(&[TxnId(1)]), vec![TxnId(1)], "the first attempt's abort is done");
    assert!(matches!(core.prepare(&t, 2, read), Ok(PrepareStep::Persist(_))), "prepared afresh");
    assert_eq!(core.logged(&[TxnId(1)]), vec![]);
    assert_eq!(core.prepare(&t, 3, read), Ok(PrepareStep::AlreadyPrepared));
    assert_eq!(core.abort(TxnId(1), 2), Ok(false), "an older attempt's abort does not undo the adoption");
    assert_eq!(core.prepared_count(), 1);
}

#[test]
fn an_abort_for_an_older_attempt_does_not_undo_a_retry() {
    let mut s = Sim::default();
    let t = txn(1, vec![], vec![put("a", "1")]);
    s.prepare(&t, 1);
    assert_eq!(s.prepare(&t, 2), PrepareStep::AlreadyPrepared);
    assert!(!s.core.abort(TxnId(1), 1).unwrap());
    assert_eq!(s.core.holder(b"a"), Some(TxnId(1)));
}

#[test]
fn contradicting_messages_are_refused_and_change_nothing() {
    let mut s = Sim::default();
    s.prepare(&txn(1, vec![], vec![put("a", "1")]), 1);
    s.prepare(&txn(2, vec![], vec![put("b", "2")]), 1);
    s.core.commit(TxnId(1), 5, None).unwrap();
    // An abort of a committed transaction: refused, still committed.
    let e = s.core.abort(TxnId(1), 1).unwrap_err().to_string();
    assert!(e.contains("committed at index 5"), "{e}");
    // A second index for the same transaction, a second transaction at one index.
    assert!(s.core.commit(TxnId(1), 1005, None).unwrap_err().to_string().contains("already committed at index 5"));
    assert!(s.core.commit(TxnId(2), 5, None).unwrap_err().to_string().contains("already committed at that index"));
    assert!(s.core.commit(TxnId(2), 0, None).is_err());
    // The real history still applies.
    for i in 1..5 {
        s.core.commit(TxnId(100 + i as u128), i, Some(vec![put("x", "x")].into())).unwrap();
    }
    s.apply_ready();
    assert_eq!(s.data[&k("a")].version, 5);
    assert_eq!(s.core.holder(b"b"), Some(TxnId(2)));
    s.core.commit(TxnId(2), 6, None).unwrap();
    s.apply_ready();
    assert_eq!(s.core.applied_index(), 6);
    assert_eq!(s.core.prepared_count(), 0);
}

#[test]
fn commit_of_an_unknown_transaction_asks_for_the_log() {
    let mut s = Sim::default();
    assert_eq!(s.core.commit(TxnId(9), 1, None).unwrap(), CommitStep::Unknown);
    assert_eq!(s.core.commit(TxnId(9), 1, Some(vec![put("z", "9")].into())).unwrap(), CommitStep::Queued);
    s.apply_ready();
    assert_eq!(s.data[&k("z")].version, 1);
}

#[test]
fn crash_after_prepare_durable_keeps_locks_until_the_outcome_is_known() {
    let mut s = Sim::default();
    s.prepare(&txn(1, vec![], vec![put("a", "1")]), 1);
    s.crash_and_recover();
    assert_eq!(s.core.holder(b"a"), Some(TxnId(1)), "recovered prepare still locks");
    assert_eq!(s.core.in_doubt(1), vec![], "too young to ask about");
    s.core.tick();
    assert_eq!(s.core.in_doubt(1), vec![(TxnId(1), 1)]);
    s.core.commit(TxnId(1), 1, None).unwrap();
    s.apply_ready();
    assert_eq!(s.data[&k("a")].value, b"1");
}

#[test]
fn crash_between_commit_arrival_and_apply_reapplies_from_the_wal() {
    let mut s = Sim::default();
    s.prepare(&txn(1, vec![], vec![put("a", "1")]), 1);
    s.core.commit(TxnId(1), 1, None).unwrap();
    s.crash_and_recover(); // the COMMIT was only in memory
    assert_eq!(s.core.applied_index(), 0);
    assert_eq!(s.core.in_doubt(0), vec![(TxnId(1), 1)], "asks the coordinator again");
    s.core.commit(TxnId(1), 1, None).unwrap();
    s.apply_ready();
    assert_eq!(s.core.applied_index(), 1);
}

#[test]
fn crash_after_apply_does_not_apply_twice() {
    let mut s = Sim::default();
    s.prepare(&txn(1, vec![], vec![put("a", "1")]), 1);
    s.core.commit(TxnId(1), 1, None).unwrap();
    s.apply_ready();
    s.crash_and_recover();
    assert_eq!(s.core.commit(TxnId(1), 1, None).unwrap(), CommitStep::AlreadyApplied);
    assert_eq!(s.core.prepared_count(), 0);
}

// ---- property test: random transactions, several replicas, random orders ----

#[derive(Clone, Debug)]
enum Op {
    Put(u8, u8),
    Del(u8),
    IfEq(u8, u8),
    IfMissing(u8),
    IfVersion(u8, u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..5, 0u8..3).prop_map(|(k, v)| Op::Put(k, v)),
        (0u8..5).prop_map(Op::Del),
        (0u8..5, 0u8..3).prop_map(|(k, v)| Op::IfEq(k, v)),
        (0u8..5).prop_map(Op::IfMissing),
        (0u8..5, 0u64..6).prop_map(|(k, v)| Op::IfVersion(k, v)),
    ]
}

fn build(id: u128, ops: &[Op]) -> Txn {
    let mut conditions = vec![];
    let mut writes = vec![];
    let mut written = BTreeSet::new();
    for o in ops {
        match o {
            Op::Put(k, v) if written.insert(*k) => writes.push(Write::Put(vec![*k], vec![*v])),
            Op::Del(k) if written.insert(*k) => writes.push(Write::Delete(vec![*k])),
            Op::IfEq(k, v) => conditions.push(Condition::ValueEquals(vec![*k], vec![*v])),
            Op::IfMissing(k) => conditions.push(Condition::Missing(vec![*k])),
            Op::IfVersion(k, n) => conditions.push(Condition::VersionEquals(vec![*k], *n)),
            _ => {}
        }
    }
    if writes.is_empty() {
        writes.push(Write::Put(vec![9], vec![id as u8]));
    }
    Txn { id: TxnId(id), conditions, writes }
}

proptest! {
    /// Transactions run one after another through a simulated coordinator
    /// (which holds key locks until the decision, so conflicting ones are
    /// prepared only after earlier ones are decided). COMMITs reach each
    /// replica in a random order and replicas crash at random points. At the
    /// end every replica equals the model, a BTreeMap that applies committed
    /// transactions serially, and every vote was unanimous.
    #[test]
    fn replicas_match_a_serial_model(
        txns in proptest::collection::vec(proptest::collection::vec(op(), 1..4), 1..25),
        shuffle_seed in any::<u64>(),
        crashes in proptest::collection::vec((0usize..3, 0usize..25), 0..4),
    ) {
        let mut replicas: Vec<Sim> = (0..3).map(|_| Sim::default()).collect();
        let mut model: BTreeMap<Key, Versioned> = BTreeMap::new();
        let mut next_index = 0u64;
        let mut undelivered: Vec<Vec<(TxnId, u64)>> = vec![vec![]; 3];
        let mut rng = shuffle_seed;
        let log = model_log(&txns);
        let mut rand = move |n: usize| { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; (rng % n as u64) as usize };

        for (i, ops) in txns.iter().enumerate() {
            let t = build(i as u128 + 1, ops);
            // Deliver pending commits until no replica is blocked on this txn.
            let mut votes = vec![];
            for r in 0..3 {
                loop {
                    match replicas[r].prepare(&t, 1) {
                        PrepareStep::Blocked(_) => {
                            prop_assert!(!undelivered[r].is_empty(), "blocked with nothing to deliver");
                            let j = rand(undelivered[r].len());
                            let (id, idx) = undelivered[r].remove(j);
                            replicas[r].core.commit(id, idx, None).unwrap();
                            replicas[r].apply_ready();
                        }
                        PrepareStep::Persist(_) | PrepareStep::AlreadyPrepared => { votes.push(true); break; }
                        PrepareStep::VoteNo(_) => { votes.push(false); break; }
                    }
                }
            }
            prop_assert!(votes.iter().all(|v| *v == votes[0]), "replicas disagreed: {:?}", votes);
            let model_ok = t.conditions.iter().all(|c| c.holds(model.get(c.key())));
            prop_assert_eq!(votes[0], model_ok);
            if votes[0] {
                next_index += 1;
                for w in &t.writes {
                    match w {
                        Write::Put(k, v) => { model.insert(k.clone(), Versioned { value: v.clone(), version: next_index }); }
                        Write::Delete(k) => { model.remove(k); }
                    }
                }
                for u in undelivered.iter_mut() { u.push((t.id, next_index)); }
            }
            for (r, at) in &crashes {
                if *at == i {
                    replicas[*r].crash_and_recover();
                    // Recovery re-learns the outcomes of everything in doubt,
                    // including commits that were received but not applied.
                    let applied = replicas[*r].core.applied_index();
                    undelivered[*r] = log
                        .range(applied + 1..next_index + 1)
                        .map(|(idx, id)| (*id, *idx))
                        .collect();
                }
            }
        }
        for r in 0..3 {
            while !undelivered[r].is_empty() {
                let j = rand(undelivered[r].len());
                let (id, idx) = undelivered[r].remove(j);
                replicas[r].core.commit(id, idx, None).unwrap();
                replicas[r].apply_ready();
            }
            prop_assert_eq!(&replicas[r].data, &model, "replica {} diverged", r);
            prop_assert_eq!(replicas[r].core.applied_index(), next_index);
            prop_assert!(replicas[r].wal.is_empty());
        }
    }
}

/// Replays the transaction list against a model and returns, for each commit
/// index, the committing transaction's id.
fn model_log(txns: &[Vec<Op>]) -> BTreeMap<u64, TxnId> {
    let mut model: BTreeMap<Key, Versioned> = BTreeMap::new();
    let mut log = BTreeMap::new();
    let mut next = 0;
    for (i, ops) in txns.iter().enumerate() {
        let t = build(i as u128 + 1, ops);
        if t.conditions.iter().all(|c| c.holds(model.get(c.key()))) {
            next += 1;
            for w in &t.writes {
                match w {
                    Write::Put(k, v) => {
                        model.insert(k.clone(), Versioned { value: v.clone(), version: next });
                    }
                    Write::Delete(k) => {
                        model.remove(k);
                    }
                }
            }
            log.insert(next, t.id);
        }
    }
    log
}

// ---- hostile inputs: whatever arrives, the replica neither panics nor breaks ----

#[derive(Clone, Debug)]
enum Msg {
    Prepare { id: u8, attempt: u8, ops: Vec<Op> },
    Commit { id: u8, index: u64, with_writes: bool },
    Abort { id: u8, attempt: u8 },
    Apply,
    Tick,
    Crash,
}

fn msg() -> impl Strategy<Value = Msg> {
    prop_oneof![
        (0u8..6, 0u8..3, proptest::collection::vec(op(), 1..4)).prop_map(|(id, attempt, ops)| Msg::Prepare {
            id,
            attempt,
            ops
        }),
        (0u8..6, prop_oneof![0u64..8, Just(u64::MAX), 1000u64..1010], any::<bool>())
            .prop_map(|(id, index, with_writes)| Msg::Commit { id, index, with_writes }),
        (0u8..6, 0u8..3).prop_map(|(id, attempt)| Msg::Abort { id, attempt }),
        Just(Msg::Apply),
        Just(Msg::Tick),
        Just(Msg::Crash),
    ]
}

impl Sim {
    /// The invariants that must hold whatever messages arrived.
    fn check(&self, applied_before: u64) {
        let core = &self.core;
        assert!(core.applied_index >= applied_before, "applied index went back");
        assert!(core.handed_out >= core.applied_index);
        for (key, holder) in &core.locks {
            let p = core.prepared.get(holder).unwrap_or_else(|| panic!("lock on {key:?} held by a stranger"));
            assert!(p.keys.contains(key));
        }
        for (id, p) in &core.prepared {
            for key in &p.keys {
                assert_eq!(core.locks.get(key), Some(id), "prepared key not locked by its holder");
            }
            if let Some(i) = p.decided {
                let queued = core.queue.get(&i).is_some_and(|(t, _)| t == id);
                assert!(queued || core.applying.get(&i) == Some(id), "decided but neither queued nor applying");
            }
        }
        for (index, (id, writes)) in &core.queue {
            assert!(*index > core.handed_out);
            assert!(writes.is_some() || core.prepared.contains_key(id), "queued commit without its writes");
        }
        assert_eq!(self.wal.len(), core.prepared.len(), "WAL and memory disagree on what is prepared");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]
    /// Random and hostile message sequences (commits at indexes nobody
    /// decided, aborts of committed transactions, duplicates, crashes in
    /// between): the replica answers each with a step or an error, never
    /// panics, and keeps its invariants.
    #[test]
    fn hostile_message_sequences_never_break_a_replica(msgs in proptest::collection::vec(msg(), 1..60)) {
        let mut s = Sim::default();
        for m in msgs {
            let before = s.core.applied_index();
            match m {
                Msg::Prepare { id, attempt, ops } => {
                    let t = build(id as u128, &ops);
                    s.prepare(&t, attempt as u64);
                }
                Msg::Commit { id, index, with_writes } => {
                    let writes = with_writes.then(|| vec![Write::Put(vec![id], vec![0])].into());
                    if let Ok(CommitStep::Retired) = s.core.commit(TxnId(id as u128), index, writes) {
                        s.wal.remove(&TxnId(id as u128));
                    }
                }
                Msg::Abort { id, attempt } => {
                    if let Ok(true) = s.core.abort(TxnId(id as u128), attempt as u64) {
                        s.wal.remove(&TxnId(id as u128));
                    }
                }
                Msg::Apply => s.apply_ready(),
                Msg::Tick => s.core.tick(),
                Msg::Crash => s.crash_and_recover(),
            }
            s.check(before);
        }
    }
}

/// Found by `hostile_message_sequences_never_break_a_replica`: a commit
/// with its writes queued at one index, then a PREPARE of the same
/// transaction and its COMMIT at a second index. Accepting the second left a
/// queued commit whose record the first apply ended (the applier would have
/// panicked on it); it is refused.
#[test]
fn a_commit_at_a_second_index_is_refused_even_when_the_first_came_with_its_writes() {
    let mut s = Sim::default();
    let writes: Writes = Arc::new(vec![Write::Put(vec![5], vec![0])]);
    assert_eq!(s.core.commit(TxnId(5), 1, Some(writes)), Ok(CommitStep::Queued));
    let t = Txn { id: TxnId(5), conditions: vec![], writes: vec![Write::Put(vec![0], vec![0])] };
    assert!(matches!(s.prepare(&t, 0), PrepareStep::Persist(_)));
    let refused = s.core.commit(TxnId(5), 3, None).unwrap_err().to_string();
    assert!(refused.contains("already committed at index 1"), "{refused}");
    s.apply_ready();
    s.check(0);
    assert_eq!(s.core.applied_index(), 1);
}

#[test]
fn a_skipped_index_applies_as_a_commit_without_writes_and_keeps_the_order() {
    let mut s = Sim::default();
    let t = Txn { id: TxnId(2), conditions: vec![], writes: vec![Write::Put(b"mine".to_vec(), b"v".to_vec())] };
    assert!(matches!(s.prepare(&t, 1), PrepareStep::Persist(_)));
    // Index 2 is this replica's; index 1 touched none of its keys.
    assert_eq!(s.core.commit(TxnId(2), 2, None), Ok(CommitStep::Queued));
    s.apply_ready();
    assert_eq!(s.core.applied_index(), 0, "index 2 waits for index 1");
    assert_eq!(s.core.commit(TxnId(1), 1, Some(Arc::new(vec![]))), Ok(CommitStep::Queued));
    s.apply_ready();
    assert_eq!(s.core.applied_index(), 2);
    assert_eq!(s.data.keys().collect::<Vec<_>>(), vec![&b"mine".to_vec()]);
    assert_eq!(s.core.holder(b"mine"), None, "the lock went with the apply");
}

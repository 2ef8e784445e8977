//! The coordinator core in microseconds: step by step, as a property test of
//! "persist before you speak", and as a deterministic simulation of a whole
//! cluster (one coordinator, five participants built on [`ReplicaCore`]) with
//! delays, loss, reordering and crashes, checked for atomicity, replica
//! agreement and serializability.

use super::*;
use crate::protocol::Placement;
use crate::protocol::{CommitStep, MembershipConfig, PrepareStep, ReplicaCore};
use crate::types::{Condition, Write};
use proptest::prelude::*;

const INC: Incarnation = Incarnation { generation: 1, nonce: 7 };

/// Participants `1..=n` at placeholder addresses.
fn roster(n: u64) -> crate::protocol::Roster {
    crate::protocol::Roster::initial(&(1..=n).map(|i| format!("p{i}")).collect::<Vec<_>>())
}

fn r(id: u64) -> u64 {
    100 + id
}

/// A core over `n` bound members, not yet verified.
fn fresh(n: u64) -> CoordinatorCore {
    let mut view = View::initial(n);
    view.replicas = (1..=n).map(|id| (id, r(id))).collect();
    let membership =
        Membership::new(view, roster(n), MembershipConfig { min_replicas: n.min(3) as usize, ..Default::default() }, 0);
    let history = [(INC.generation, INC.nonce)].into();
    CoordinatorCore::new(CoreConfig::new(n as usize, n.min(3) as usize), INC, history, membership, 0)
}

/// Every participant checks in (and answers a ping) at `now`.
fn heartbeat(c: &mut CoordinatorCore, n: u64, now: u64, except: &[u64]) {
    for id in 1..=n {
        if !except.contains(&id) {
            c.on_ping(id, Some(r(id)), now);
            c.on_sync(id, r(id), Some(INC), 0, 0, 0, 0, now).expect("check-in accepted");
        }
    }
}

/// A verified core over `n` members.
fn core(n: u64) -> CoordinatorCore {
    let mut c = fresh(n);
    heartbeat(&mut c, n, 0, &[]);
    assert!(c.take_actions().is_empty());
    c
}

fn put(id: u128, key: &str) -> Txn {
    Txn { id: TxnId(id), conditions: vec![], writes: vec![Write::Put(key.as_bytes().to_vec(), b"v".to_vec())] }
}

fn prepares(actions: &[Action]) -> Vec<(u64, u64, Vec<TxnId>)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Prepare { to, batch, items, .. } => Some((*to, *batch, items.iter().map(|i| i.txn.id).collect())),
            _ => None,
        })
        .collect()
}

fn replies(actions: &[Action]) -> Vec<(TxnId, Result<Committed, Error>)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Reply { txn, result } => Some((*txn, result.clone())),
            _ => None,
        })
        .collect()
}

/// Answers every PREPARE in `actions` with YES.
fn all_yes(c: &mut CoordinatorCore, actions: &[Action], now: u64) {
    for (to, batch, txns) in prepares(actions) {
        c.prepared(to, batch, Ok(vec![Ok(Vote::Yes); txns.len()]), now);
    }
}

#[test]
fn a_commit_is_told_only_after_its_decision_is_durable() {
    let mut c = core(3);
    c.submit(put(1, "a"), 10);
    let a = c.take_actions();
    assert_eq!(prepares(&a).len(), 3, "one PREPARE per member");
    all_yes(&mut c, &a, 11);
    let a = c.take_actions();
    assert!(replies(&a).is_empty(), "answered before the decision was durable");
    assert!(!a.iter().any(|x| matches!(x, Action::Decide { commits, .. } if !commits.is_empty())));
    let [Action::Persist { commits, aborts }] = &a[..] else { panic!("expected one Persist: {a:?}") };
    assert_eq!((commits.len(), commits[0].index, aborts.len()), (1, 1, 0));
    assert_eq!(c.last_index(), 0);
    c.persisted(12);
    let a = c.take_actions();
    assert_eq!(replies(&a), vec![(TxnId(1), Ok(Committed { index: 1 }))]);
    let decides =
        a.iter().filter(|x| matches!(x, Action::Decide { commits, .. } if commits == &[(TxnId(1), 1)])).count();
    assert_eq!(decides, 3);
    assert_eq!(c.last_index(), 1);
}

#[test]
fn transactions_arriving_while_a_batch_is_out_share_the_next_batch() {
    let mut c = core(3);
    c.submit(put(1, "k1"), 0);
    let first = c.take_actions();
    for i in 2..=10 {
        c.submit(put(i, &format!("k{i}")), 1);
    }
    assert!(prepares(&c.take_actions()).is_empty(), "a second batch left while one is out");
    let (to, batch, _) = prepares(&first)[0].clone();
    c.prepared(to, batch, Ok(vec![Ok(Vote::Yes)]), 2);
    let next = prepares(&c.take_actions());
    assert_eq!(next.len(), 1);
    assert_eq!((next[0].0, next[0].2.len()), (to, 9), "the nine waiting ones in one batch");
}

#[test]
fn a_failed_condition_is_durable_before_its_answer_and_aborts_leave_at_once() {
    let mut c = core(3);
    let t = Txn {
        id: TxnId(1),
        conditions: vec![Condition::Missing(b"a".to_vec())],
        writes: vec![Write::Delete(b"a".to_vec())],
    };
    c.submit(t, 0);
    let a = c.take_actions();
    for (i, (to, batch, _)) in prepares(&a).into_iter().enumerate() {
        let vote = if i == 0 { Vote::No("a missing (found value 1)".into()) } else { Vote::Yes };
        c.prepared(to, batch, Ok(vec![Ok(vote)]), 1);
    }
    let a = c.take_actions();
    let aborts = a.iter().filter(|x| matches!(x, Action::Decide { aborts, .. } if aborts.len() == 1)).count();
    assert_eq!(aborts, 3, "every member hears the abort at once (presumed abort)");
    assert!(replies(&a).is_empty(), "a failed condition answered before it was durable");
    assert!(a.iter().any(|x| matches!(x, Action::Persist { aborts, .. } if aborts.len() == 1)));
    c.persisted(2);
    let r = replies(&c.take_actions());
    assert!(matches!(&r[..], [(TxnId(1), Err(Error::ConditionFailed(m)))] if m.contains("found value 1")));
}

#[test]
fn conflicting_transactions_prepare_in_turn_after_the_durable_decision() {
    let mut c = core(3);
    c.submit(put(1, "k"), 0);
    c.submit(put(2, "k"), 0);
    let a = c.take_actions();
    assert!(prepares(&a).iter().all(|p| p.2 == vec![TxnId(1)]));
    all_yes(&mut c, &a, 1);
    let _persist = c.take_actions();
    assert!(prepares(&c.take_actions()).is_empty());
    c.persisted(2);
    let a = c.take_actions();
    assert_eq!(replies(&a).len(), 1);
    assert!(prepares(&a).iter().all(|p| p.2 == vec![TxnId(2)]), "the second one prepares once the first is durable");
}

#[test]
fn nothing_is_decided_before_the_start_is_verified() {
    let mut c = fresh(5);
    c.submit(put(1, "a"), 0);
    assert!(c.take_actions().is_empty(), "prepared before verification");
    assert_eq!(c.outcome_without_record(TxnId(99)).unwrap(), Outcome::Pending, "presumed abort before verification");
    // n - min + 1 = 3 check-ins verify.
    heartbeat(&mut c, 5, 10, &[4, 5, 3]);
    assert!(prepares(&c.take_actions()).is_empty());
    heartbeat(&mut c, 5, 20, &[4, 5]);
    assert_eq!(prepares(&c.take_actions()).len(), 5);
    assert_eq!(c.outcome_without_record(TxnId(99)).unwrap(), Outcome::Aborted);
}

#[test]
fn evidence_of_a_newer_log_fences_the_coordinator_for_good() {
    let mut c = fresh(3);
    c.submit(put(1, "a"), 0);
    let e = c.on_sync(2, r(2), Some(INC), 17, 0, 17, 0, 5).unwrap_err();
    assert!(
        matches!(&e, Error::Fenced(m) if m.contains("seen commit index 17") && m.contains("ends at index 0")),
        "{e}"
    );
    assert!(matches!(&replies(&c.take_actions())[..], [(TxnId(1), Err(Error::Fenced(_)))]));
    c.submit(put(2, "b"), 6);
    assert!(matches!(&replies(&c.take_actions())[..], [(TxnId(2), Err(Error::Fenced(_)))]));
    assert!(c.on_sync(1, r(1), Some(INC), 0, 0, 0, 0, 7).is_err(), "stays fenced");
    // An unknown incarnation alone is no evidence; with undecided
    // transactions it is, while the start is being verified (5 members,
    // minimum 3: three check-ins verify).
    let mut c = fresh(5);
    let other = Incarnation { generation: 5, nonce: 1 };
    c.on_sync(1, r(1), Some(other), 0, 0, 0, 0, 1).expect("harmless");
    let e = c.on_sync(2, r(2), Some(other), 0, 2, 0, 0, 1).unwrap_err();
    assert!(e.to_string().contains("may have committed them"), "{e}");
    // After verification it is not: a commit would have shown already.
    let mut c = fresh(5);
    heartbeat(&mut c, 5, 1, &[4, 5]);
    c.on_sync(4, r(4), Some(other), 0, 2, 0, 0, 2).expect("late participant with undecided transactions");
    assert_eq!(c.outcome_without_record(TxnId(42)).unwrap(), Outcome::Aborted);
}

#[test]
fn a_member_that_stops_answering_is_retried_then_excluded_and_writes_go_on() {
    // Four members, at least three: one may be excluded.
    let mut c = core(4);
    let mut now = 0;
    c.submit(put(1, "a"), now);
    let mut pending = c.take_actions();
    let committed_at = loop {
        // Participants 1 and 2 vote YES; participant 3 is gone.
        for (to, batch, txns) in prepares(&pending) {
            let answer = if to == 3 {
                Err(Error::Unavailable("participant 3 unreachable".into()))
            } else {
                Ok(vec![Ok(Vote::Yes); txns.len()])
            };
            c.prepared(to, batch, answer, now);
        }
        now += 100;
        heartbeat(&mut c, 4, now, &[3]);
        c.tick(now);
        pending = c.take_actions();
        for a in &pending {
            if let Action::PersistView(v, _) = a {
                assert!(!v.members.contains(&3));
                c.view_persisted(now);
            }
            if let Action::Persist { .. } = a {
                c.persisted(now);
            }
        }
        pending.extend(c.take_actions());
        if let Some((_, result)) = replies(&pending).pop() {
            assert_eq!(result, Ok(Committed { index: 1 }));
            break now;
        }
        assert!(now < 10_000, "never committed");
    };
    // Excluded only after its lease (2 s from the last check-in at 0) + 0.2 s.
    assert!((2200..=3300).contains(&committed_at), "committed at {committed_at} ms");
}

#[test]
fn a_transaction_waiting_too_long_for_its_locks_is_told_to_retry() {
    let mut c = core(3);
    c.submit(put(1, "k"), 0);
    c.submit(put(2, "k"), 0);
    // The first is decided but its decision never becomes durable.
    let a = c.take_actions();
    all_yes(&mut c, &a, 1);
    c.take_actions();
    heartbeat(&mut c, 3, 9000, &[]);
    c.tick(9000);
    let r = replies(&c.take_actions());
    assert!(matches!(&r[..], [(TxnId(2), Err(Error::Conflict(_)))]), "{r:?}");
}

proptest! {
    /// Random schedules of submissions (on a few keys, with conditions),
    /// votes (yes, no, failures), persistence and time: nothing about a
    /// commit is told before it is durable, indexes are assigned once and
    /// in order, and once everyone answers, every submission is answered
    /// exactly once.
    #[test]
    fn nothing_is_told_before_it_is_durable(ops in proptest::collection::vec((0u8..6, 0u8..4, 0u8..8), 1..120)) {
        let mut c = core(3);
        let mut now = 0;
        let mut out: VecDeque<Action> = VecDeque::new();
        let mut persisting = false;
        let mut submitted = BTreeSet::new();
        let mut answered = BTreeMap::new();
        let mut indexes = BTreeSet::new();
        let mut next_id = 1u128;
        let check = |a: &Action, durable: u64, indexes: &mut BTreeSet<u64>| {
            match a {
                Action::Reply { result: Ok(Committed { index }), .. } => assert!(*index <= durable, "told {index} > durable {durable}"),
                Action::Decide { commits, .. } => for (_, i) in commits { assert!(*i <= durable) },
                Action::Persist { commits, .. } => for e in commits { assert!(indexes.insert(e.index), "index {} twice", e.index) },
                _ => {}
            }
        };
        let mut drive = |c: &mut CoordinatorCore, out: &mut VecDeque<Action>| {
            for a in c.take_actions() { check(&a, c.last_index(), &mut indexes); out.push_back(a); }
        };
        for (kind, key, choice) in ops {
            now += 7;
            match kind {
                0 | 1 => {
                    let mut t = put(next_id, &format!("k{key}"));
                    if choice % 3 == 0 { t.conditions.push(Condition::Exists(format!("k{key}").into_bytes())); }
                    submitted.insert(t.id);
                    next_id += 1;
                    c.submit(t, now);
                }
                2 | 3 => {
                    // Answer the oldest outstanding action.
                    if let Some(a) = out.pop_front() {
                        match a {
                            Action::Prepare { to, batch, items, .. } => {
                                let answer = match choice {
                                    0 => Err(Error::Unavailable("down".into())),
                                    1 => Ok(items.iter().map(|_| Ok(Vote::No("no".into()))).collect()),
                                    _ => Ok(vec![Ok(Vote::Yes); items.len()]),
                                };
                                c.prepared(to, batch, answer, now);
                            }
                            Action::Persist { .. } => { persisting = true; }
                            Action::PersistView(..) => c.view_persisted(now),
                            Action::PersistPlacement(..) => c.placement_persisted(now),
                            Action::Reply { txn, result } => { assert!(answered.insert(txn, result).is_none(), "answered twice"); }
                            Action::Decide { .. } => {}
                        }
                    }
                }
                4 => if persisting { persisting = false; c.persisted(now); },
                _ => { now += 100 * choice as u64; heartbeat(&mut c, 3, now, &[]); c.tick(now); }
            }
            drive(&mut c, &mut out);
        }
        // Everyone answers YES from now on, and time passes: all finish.
        for _ in 0..10_000 {
            if answered.len() == submitted.len() && out.is_empty() { break; }
            match out.pop_front() {
                Some(Action::Prepare { to, batch, items, .. }) => c.prepared(to, batch, Ok(vec![Ok(Vote::Yes); items.len()]), now),
                Some(Action::Persist { .. }) => c.persisted(now),
                Some(Action::PersistView(..)) => c.view_persisted(now),
                Some(Action::PersistPlacement(..)) => c.placement_persisted(now),
                Some(Action::Reply { txn, result }) => { assert!(answered.insert(txn, result).is_none(), "answered twice"); }
                Some(Action::Decide { .. }) => {}
                None => {
                    if persisting { persisting = false; c.persisted(now); }
                    now += 100; heartbeat(&mut c, 3, now, &[]); c.tick(now);
                }
            }
            drive(&mut c, &mut out);
        }
        prop_assert_eq!(answered.len(), submitted.len(), "some submissions were never answered");
        let committed: Vec<u64> = answered.values().filter_map(|r| r.as_ref().ok().map(|c| c.index)).collect();
        let mut sorted = committed.clone();
        sorted.sort();
        prop_assert_eq!(sorted, (1..=committed.len() as u64).collect::<Vec<_>>(), "commit indexes are 1..=n without gaps");
    }
}

// ---------------------------------------------------------------------------
// The simulation: a whole cluster in one process, time and faults seeded.

/// A deterministic random source (xorshift).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

enum Msg {
    /// coordinator -> participant
    /// `work`: the participant's progress through it once it has started
    /// (a blocked batch waits where it is, then fails).
    Prepare {
        inc: Incarnation,
        batch: u64,
        epoch: u64,
        items: Vec<PrepareItem>,
        work: Option<Work>,
    },
    /// participant -> itself: the batch's records are written now (the
    /// write takes a while, and outcomes may arrive meanwhile), then the
    /// votes leave.
    Logged {
        inc: Incarnation,
        batch: u64,
        boot: u64,
        records: Vec<crate::protocol::PreparedRecord>,
        votes: Vec<Result<Vote, Error>>,
    },
    Decide {
        inc: Incarnation,
        commits: Vec<(TxnId, u64)>,
        aborts: Vec<(TxnId, u64)>,
    },
    /// participant -> coordinator
    Votes {
        inc: Incarnation,
        batch: u64,
        votes: Result<Vec<Result<Vote, Error>>, Error>,
    },
}

/// A PREPARE batch in progress on a participant, as the real one keeps it
/// across its waits: the votes so far and the records handed out, not yet
/// written.
struct Work {
    since: u64,
    /// The participant process that started it ([`SimParticipant::boot`]).
    boot: u64,
    votes: Vec<Result<Vote, Error>>,
    records: Vec<crate::protocol::PreparedRecord>,
}

/// One simulated participant: the real replica state machine over maps.
struct SimParticipant {
    core: ReplicaCore,
    data: BTreeMap<Vec<u8>, crate::types::Versioned>,
    wal: BTreeMap<TxnId, crate::protocol::PreparedRecord>,
    following: Option<Incarnation>,
    /// Highest commit index heard of (applied, or announced at check-in).
    seen: u64,
    epoch: u64,
    up: bool,
    /// Crash in the next apply, between its data write and the WAL removal.
    torn_apply: bool,
    /// Counts the process's starts: work begun by an earlier one is gone.
    boot: u64,
}

impl SimParticipant {
    fn new() -> Self {
        SimParticipant {
            core: ReplicaCore::default(),
            data: BTreeMap::new(),
            wal: BTreeMap::new(),
            following: None,
            seen: 0,
            epoch: 0,
            up: true,
            torn_apply: false,
            boot: 0,
        }
    }

    fn apply(&mut self) {
        let batch = self.core.next_apply();
        let Some(last) = batch.last().map(|e| e.index) else { return };
        for e in batch {
            for w in e.writes.iter().cloned() {
                match w {
                    Write::Put(k, v) => {
                        self.data.insert(k, crate::types::Versioned { value: v, version: e.index });
                    }
                    Write::Delete(k) => {
                        self.data.remove(&k);
                    }
                }
            }
            if !self.torn_apply {
                self.wal.remove(&e.txn_id);
            }
        }
        if std::mem::take(&mut self.torn_apply) {
            // The data and applied index are written, the records not removed.
            self.core = ReplicaCore::recover(last, self.wal.values().cloned().collect());
            self.up = false;
            self.boot += 1;
            return;
        }
        self.core.applied(last);
    }

    /// A commit told (or fetched), with its writes when fetched from the log.
    fn commit(&mut self, t: TxnId, i: u64, writes: Option<Vec<Write>>) -> Result<CommitStep, Error> {
        let step = self.core.commit(t, i, writes.map(Into::into));
        if let Ok(CommitStep::Retired) = step {
            self.wal.remove(&t);
        }
        step
    }

    fn crash(&mut self) {
        self.core = ReplicaCore::recover(self.core.applied_index(), self.wal.values().cloned().collect());
        self.up = false;
        self.boot += 1;
    }

    /// Goes on with a PREPARE batch from its next item. `Ok(false)`: an
    /// item is blocked (behind a decided transaction not yet applied here,
    /// or its own record still being written by another batch); the real
    /// participant waits (up to 2 s). `Ok(true)`: every item has its vote,
    /// and the records handed out are to be written.
    fn prepare(
        &mut self,
        inc: Incarnation,
        epoch: u64,
        items: &[PrepareItem],
        may_wait: bool,
        work: &mut Work,
    ) -> Result<bool, Error> {
        if self.following != Some(inc) {
            return Err(Error::NotReady("not following that incarnation".into()));
        }
        if epoch < self.epoch {
            return Err(Error::Conflict("old epoch".into()));
        }
        self.epoch = epoch;
        let data = &self.data;
        for item in &items[work.votes.len()..] {
            let step = self.core.prepare(&item.txn, item.attempt, |k| Ok(data.get(k).cloned()));
            work.votes.push(match step {
                Ok(PrepareStep::Persist(rec)) => {
                    work.records.push(rec);
                    Ok(Vote::Yes)
                }
                Ok(PrepareStep::AlreadyPrepared) => Ok(Vote::Yes),
                Ok(PrepareStep::VoteNo(reason)) => Ok(Vote::No(reason)),
                Ok(PrepareStep::Blocked(_)) if may_wait => return Ok(false),
                Ok(PrepareStep::Blocked(_)) => Err(Error::Conflict("blocked for 2 s".into())),
                Err(e) => Err(e),
            });
        }
        Ok(true)
    }

    /// The batch's records are written; those aborted meanwhile are
    /// dropped again (`ReplicaCore::logged`).
    fn logged(&mut self, records: Vec<crate::protocol::PreparedRecord>) {
        let txns: Vec<TxnId> = records.iter().map(|r| r.txn_id).collect();
        for r in records {
            self.wal.insert(r.txn_id, r);
        }
        for t in self.core.logged(&txns) {
            self.wal.remove(&t);
        }
    }

    fn decide(&mut self, commits: &[(TxnId, u64)], aborts: &[(TxnId, u64)], log: &BTreeMap<u64, LogEntry>) {
        for (t, i) in commits {
            if let Ok(CommitStep::Unknown) = self.commit(*t, *i, None) {
                // Catch up from the (durable) log, as fetch_log does.
                if let Some(e) = log.get(i) {
                    let _ = self.commit(e.txn_id, e.index, Some(e.writes.clone()));
                }
            }
        }
        for (t, a) in aborts {
            if let Ok(true) = self.core.abort(*t, *a) {
                self.wal.remove(t);
            }
        }
        self.apply();
    }
}

/// The coordinator's durable state, which survives its crashes.
#[derive(Default, Clone)]
struct Durable {
    log: BTreeMap<u64, LogEntry>,
    decided: BTreeMap<TxnId, Result<u64, String>>,
    view: Option<View>,
    history: BTreeMap<u64, u64>,
}

struct Sim {
    rng: Rng,
    now: u64,
    core: CoordinatorCore,
    inc: Incarnation,
    durable: Durable,
    /// A Persist handed out and not yet durable (lost on a crash).
    persisting: Option<Decisions>,
    view_persisting: Option<View>,
    parts: Vec<SimParticipant>,
    /// (deliver at, to: 0 = coordinator, from/to participant id, message)
    net: Vec<(u64, u64, u64, Msg)>,
    /// What clients were told.
    told: BTreeMap<TxnId, Result<Committed, Error>>,
    txns: BTreeMap<TxnId, Txn>,
    coordinator_up: bool,
    loss: u64,
    /// A copy of the coordinator's data taken while it was stopped.
    backup: Option<Durable>,
    /// The data the coordinator had before an old backup was restored over
    /// it (the operator's way out of the fence).
    newest: Option<Durable>,
    /// Times an old copy was restored, and times it was fenced.
    restores: u32,
    fenced: u32,
}

const N: u64 = 5;

impl Sim {
    fn new(seed: u64, loss: u64) -> Sim {
        let mut durable = Durable::default();
        let inc = Incarnation { generation: 1, nonce: seed };
        durable.history.insert(1, seed);
        let mut view = View::initial(N);
        view.replicas = (1..=N).map(|id| (id, r(id))).collect();
        durable.view = Some(view.clone());
        let core = Sim::boot(&durable, inc, 0);
        Sim {
            rng: Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1),
            now: 0,
            core,
            inc,
            durable,
            persisting: None,
            view_persisting: None,
            parts: (0..N).map(|_| SimParticipant::new()).collect(),
            net: Vec::new(),
            told: BTreeMap::new(),
            txns: BTreeMap::new(),
            coordinator_up: true,
            loss,
            backup: None,
            newest: None,
            restores: 0,
            fenced: 0,
        }
    }

    fn boot(d: &Durable, inc: Incarnation, now: u64) -> CoordinatorCore {
        let view = d.view.clone().expect("view");
        let membership = Membership::new(view, roster(N), MembershipConfig::default(), now);
        let last = d.log.keys().next_back().copied().unwrap_or(0);
        CoordinatorCore::new(CoreConfig::new(N as usize, 3), inc, d.history.clone(), membership, last)
    }

    /// Sends with a random delay. A lost message is a broken connection:
    /// a PREPARE or its votes fail back to the coordinator (as a transport
    /// error would), an outcome is simply gone (the participant asks later).
    fn send(&mut self, to: u64, from: u64, msg: Msg) {
        let at = self.now + 1 + self.rng.below(20);
        if self.rng.chance(self.loss) {
            let failed =
                |inc, batch| Msg::Votes { inc, batch, votes: Err(Error::Unavailable("connection lost".into())) };
            match msg {
                Msg::Prepare { inc, batch, .. } => self.net.push((at, 0, to, failed(inc, batch))),
                Msg::Votes { inc, batch, .. } => self.net.push((at, 0, from, failed(inc, batch))),
                Msg::Decide { .. } | Msg::Logged { .. } => {}
            }
            return;
        }
        self.net.push((at, to, from, msg));
    }

    /// Carries out the core's actions.
    fn run_actions(&mut self) {
        for a in self.core.take_actions() {
            match a {
                Action::Prepare { to, batch, epoch, items, .. } => {
                    self.send(to, 0, Msg::Prepare { inc: self.inc, batch, epoch, items, work: None })
                }
                Action::Decide { to, commits, aborts, skips } => {
                    assert!(skips.is_empty(), "with full copies nobody skips a commit");
                    for (_, i) in &commits {
                        assert!(self.durable.log.contains_key(i), "COMMIT {i} sent before it was durable");
                    }
                    self.send(to, 0, Msg::Decide { inc: self.inc, commits, aborts })
                }
                Action::Persist { commits, aborts } => {
                    assert!(self.persisting.is_none(), "two Persists outstanding");
                    // 2PC safety: every member holds the PREPARE of what commits.
                    for e in &commits {
                        for m in &self.core.membership().view().members {
                            let p = &self.parts[*m as usize - 1];
                            assert!(
                                p.wal.contains_key(&e.txn_id),
                                "index {} decided without a durable PREPARE on member {m}",
                                e.index
                            );
                        }
                    }
                    self.persisting = Some((commits, aborts));
                }
                Action::PersistView(v, _) => self.view_persisting = Some(v),
                Action::PersistPlacement(_) => unreachable!("full copies never move partitions"),
                Action::Reply { txn, result } => {
                    if let Ok(c) = &result {
                        assert_eq!(
                            self.durable.log.get(&c.index).map(|e| e.txn_id),
                            Some(txn),
                            "told a commit not in the log"
                        );
                    }
                    self.told.insert(txn, result);
                }
            }
        }
    }

    /// What the driver answers a check-in: outcomes from the durable log.
    fn check_in(&mut self, id: u64) {
        let p = &self.parts[id as usize - 1];
        let in_doubt = p.core.in_doubt(0);
        let seen = p.seen.max(p.core.applied_index());
        let result =
            self.core.on_sync(id, r(id), p.following, seen, in_doubt.len() as u64, seen, in_doubt.len(), self.now);
        self.core.on_ping(id, Some(r(id)), self.now);
        let Ok(_) = result else { return };
        let mut outcomes = Vec::new();
        for (t, attempt) in in_doubt {
            let o = if self.core.is_running(t) {
                None
            } else {
                match self.durable.decided.get(&t) {
                    Some(Ok(i)) => Some(Ok((t, *i))),
                    Some(Err(_)) => Some(Err((t, attempt))),
                    None => match self.core.outcome_without_record(t) {
                        Ok(Outcome::Aborted) => Some(Err((t, attempt))),
                        _ => None,
                    },
                }
            };
            if let Some(o) = o {
                outcomes.push(o);
            }
        }
        let p = &mut self.parts[id as usize - 1];
        p.following = Some(self.inc);
        p.seen = p.seen.max(self.core.last_index());
        let commits: Vec<(TxnId, u64)> = outcomes.iter().filter_map(|o| o.ok()).collect();
        let aborts: Vec<(TxnId, u64)> = outcomes.iter().filter_map(|o| o.err()).collect();
        p.decide(&commits, &aborts, &self.durable.log);
        // Catch up on anything missed.
        let applied = p.core.applied_index();
        for e in self.durable.log.range(applied + 1..) {
            if p.commit(e.1.txn_id, e.1.index, Some(e.1.writes.clone())).is_err() {
                break;
            }
        }
        p.apply();
    }

    fn deliver(&mut self, to: u64, from: u64, msg: Msg) {
        match msg {
            Msg::Prepare { inc, batch, epoch, items, work } => {
                let p = &mut self.parts[to as usize - 1];
                let lost = work.as_ref().is_some_and(|w| w.boot != p.boot);
                if !p.up || lost {
                    let failed = Err(Error::Unavailable(format!("participant {to} unreachable")));
                    self.net.push((self.now + 1, 0, to, Msg::Votes { inc, batch, votes: failed }));
                    return;
                }
                let mut work =
                    work.unwrap_or(Work { since: self.now, boot: p.boot, votes: Vec::new(), records: Vec::new() });
                match p.prepare(inc, epoch, &items, self.now < work.since + 2000, &mut work) {
                    Ok(false) => self.net.push((
                        self.now + 5,
                        to,
                        from,
                        Msg::Prepare { inc, batch, epoch, items, work: Some(work) },
                    )),
                    Ok(true) => {
                        // Writing the records takes a while (a slow disk, a
                        // stalled process): outcomes and other batches may
                        // come first.
                        let at = self.now + if self.rng.chance(10) { self.rng.below(3000) } else { 0 };
                        let (boot, records, votes) = (work.boot, work.records, work.votes);
                        self.net.push((at, to, to, Msg::Logged { inc, batch, boot, records, votes }));
                    }
                    Err(e) => {
                        // Records handed out before the error are still written.
                        let records = std::mem::take(&mut work.records);
                        p.logged(records);
                        self.send(0, to, Msg::Votes { inc, batch, votes: Err(e) })
                    }
                }
            }
            Msg::Logged { inc, batch, boot, records, votes } => {
                let p = &mut self.parts[to as usize - 1];
                if !p.up || p.boot != boot {
                    return; // the process that held them died: nothing was written, no answer
                }
                p.logged(records);
                self.send(0, to, Msg::Votes { inc, batch, votes: Ok(votes) });
            }
            Msg::Decide { inc, commits, aborts } => {
                let log = &self.durable.log;
                let p = &mut self.parts[to as usize - 1];
                if p.up && p.following == Some(inc) {
                    p.decide(&commits, &aborts, log);
                }
            }
            Msg::Votes { inc, batch, votes } => {
                if self.coordinator_up && inc == self.inc {
                    self.core.prepared(from, batch, votes, self.now);
                }
            }
        }
    }

    fn step(&mut self, faults: bool) {
        self.now += 1;
        // Deliver what is due, in a seeded order.
        let mut due = Vec::new();
        let mut i = 0;
        while i < self.net.len() {
            if self.net[i].0 <= self.now {
                due.push(self.net.swap_remove(i));
            } else {
                i += 1;
            }
        }
        while !due.is_empty() {
            let (_, to, from, msg) = due.swap_remove(self.rng.below(due.len() as u64) as usize);
            self.deliver(to, from, msg);
            self.run_actions();
        }
        if !self.coordinator_up {
            if self.rng.chance(2) {
                self.restart_coordinator();
            }
            return;
        }
        // Persistence completes after a while.
        if self.persisting.is_some() && self.rng.chance(30) {
            let (commits, aborts) = self.persisting.take().expect("checked");
            for e in commits {
                self.durable.decided.insert(e.txn_id, Ok(e.index));
                self.durable.log.insert(e.index, e);
            }
            for (t, reason) in aborts {
                self.durable.decided.insert(t, Err(reason));
            }
            self.core.persisted(self.now);
            self.run_actions();
        }
        if let Some(v) = self.view_persisting.take() {
            self.durable.view = Some(v);
            self.core.view_persisted(self.now);
            self.run_actions();
        }
        if self.now.is_multiple_of(100) {
            // A fenced coordinator gets its newest data back from the operator.
            if self.core.is_fenced() {
                self.fenced += 1;
                self.trace(&format!(
                    "fenced: {:?}",
                    self.core.fence_status().map(|s| s.chars().take(120).collect::<String>())
                ));
                let newest = self
                    .newest
                    .take()
                    .unwrap_or_else(|| panic!("fenced without an old copy restored: {:?}", self.core.fence_status()));
                self.durable = newest;
                self.restart_coordinator();
                return;
            }
            for id in 1..=N {
                if self.parts[id as usize - 1].up {
                    self.check_in(id);
                }
            }
            self.core.tick(self.now);
            self.run_actions();
        }
        if faults {
            if self.rng.chance(1) && self.rng.chance(2) {
                // The coordinator crashes: memory and anything not durable is lost.
                self.coordinator_up = false;
                self.trace("coordinator crashes");
                self.persisting = None;
                self.view_persisting = None;
                self.net.retain(|m| m.1 != 0);
                return;
            }
            let id = 1 + self.rng.below(N) as usize;
            if self.rng.chance(1) && self.rng.chance(5) {
                let p = &mut self.parts[id - 1];
                if p.up && self.rng.chance(50) {
                    p.torn_apply = true;
                    self.trace(&format!("participant {id} will crash in the middle of its next apply"));
                    return;
                }
                if p.up {
                    p.crash();
                } else {
                    p.up = true;
                }
                let (up, held) = (self.parts[id - 1].up, self.parts[id - 1].wal.len());
                self.trace(&format!(
                    "participant {id} {} (holds {held} prepared)",
                    if up { "restarts" } else { "crashes" }
                ));
            }
        }
    }

    fn trace(&self, what: &str) {
        if std::env::var_os("TREATY_SIM_TRACE").is_some() {
            let last = self.durable.log.keys().next_back().copied().unwrap_or(0);
            eprintln!(
                "{:>6} ms  {what}  (log ends at {last}, history {:?})",
                self.now,
                self.durable.history.keys().collect::<Vec<_>>()
            );
        }
    }

    fn restart_coordinator(&mut self) {
        // The operator's copies: taken of the stopped coordinator; now and
        // then the old one is restored instead of its current data.
        if self.backup.is_none() || self.rng.chance(20) {
            self.backup = Some(self.durable.clone());
        } else if self.newest.is_none() && self.rng.chance(50) {
            if let Some(old) = self.backup.clone() {
                self.newest = Some(std::mem::replace(&mut self.durable, old));
                self.restores += 1;
                self.trace("operator restores the old copy");
            }
        }
        let generation = self.durable.history.keys().next_back().copied().unwrap_or(0) + 1;
        self.inc = Incarnation { generation, nonce: self.rng.next() };
        self.durable.history.insert(generation, self.inc.nonce);
        self.core = Sim::boot(&self.durable, self.inc, self.now);
        self.coordinator_up = true;
        self.trace(&format!("coordinator starts as {}", self.inc));
        // Clients whose answers were lost resubmit (the driver would look
        // the id up in the log first).
        let open: Vec<TxnId> = self.txns.keys().filter(|t| !self.told.contains_key(t)).copied().collect();
        for t in open {
            match self.durable.decided.get(&t) {
                Some(Ok(i)) => {
                    self.told.insert(t, Ok(Committed { index: *i }));
                }
                Some(Err(reason)) => {
                    self.told.insert(t, Err(Error::ConditionFailed(reason.clone())));
                }
                None => {
                    let txn = self.txns[&t].clone();
                    self.core.submit(txn, self.now);
                }
            }
        }
        self.run_actions();
    }

    fn submit(&mut self, id: u128) {
        let key = |k: u64| format!("k{k}").into_bytes();
        let a = self.rng.below(20);
        let b = (a + 1 + self.rng.below(19)) % 20;
        let mut t = Txn {
            id: TxnId(id),
            conditions: vec![],
            writes: vec![Write::Put(key(a), id.to_be_bytes().to_vec()), Write::Put(key(b), id.to_be_bytes().to_vec())],
        };
        if self.rng.chance(30) {
            t.conditions.push(Condition::Exists(key(self.rng.below(20))));
        }
        self.txns.insert(t.id, t.clone());
        if self.coordinator_up {
            self.core.submit(t, self.now);
            self.run_actions();
        }
    }
}

impl Sim {
    /// Submits a new transaction with chance 1/8 per step until `until`.
    fn load_until(&mut self, until: u64, faults: bool, next: &mut u128) {
        while self.now < until {
            if self.rng.chance(8) {
                self.submit(*next);
                *next += 1;
            }
            self.step(faults);
        }
    }
}

/// Runs one seeded simulation and checks it; returns (committed, told).
fn simulate(seed: u64) -> (usize, usize, u64, u32, u32) {
    let mut sim = Sim::new(seed, 5);
    let mut next = 1u128;
    // 4 s of load and faults, then healing.
    sim.load_until(4000, true, &mut next);
    sim.loss = 0;
    if !sim.coordinator_up {
        sim.restart_coordinator();
    }
    // An old copy restored and not (yet) revealed stays; it is fenced as
    // soon as a participant shows evidence, and the operator then puts the
    // newest data back. Running on it until then must be safe.
    for p in sim.parts.iter_mut() {
        p.up = true;
        p.torn_apply = false;
    }
    // Clients that got an error retry under the same id, as `Client` does.
    let retry: Vec<TxnId> =
        sim.told.iter().filter(|(_, r)| matches!(r, Err(e) if e.is_retryable())).map(|(t, _)| *t).collect();
    for t in retry {
        sim.told.remove(&t);
        let txn = sim.txns[&t].clone();
        if sim.durable.decided.contains_key(&t) {
            continue;
        }
        sim.core.submit(txn, sim.now);
        sim.run_actions();
    }
    let deadline = sim.now + 60_000;
    while sim.now < deadline {
        sim.step(false);
        let all_told = sim.txns.keys().all(|t| sim.told.contains_key(t) || sim.durable.decided.contains_key(t));
        let last = sim.durable.log.keys().next_back().copied().unwrap_or(0);
        let caught_up = sim.parts.iter().all(|p| p.core.applied_index() == last && p.core.prepared_count() == 0);
        if all_told && caught_up && sim.core.running() == 0 {
            break;
        }
    }
    let last = sim.durable.log.keys().next_back().copied().unwrap_or(0);
    // Atomicity and agreement: every replica applied the whole log, and
    // holds exactly what applying the log in index order gives.
    let mut model: BTreeMap<Vec<u8>, crate::types::Versioned> = BTreeMap::new();
    assert_eq!(sim.durable.log.len() as u64, last, "seed {seed}: gaps in the log");
    let mut seen = BTreeSet::new();
    for (i, e) in &sim.durable.log {
        assert!(seen.insert(e.txn_id), "seed {seed}: {} committed twice", e.txn_id);
        // Serializability: each commit's conditions held at its turn.
        for c in &sim.txns[&e.txn_id].conditions {
            assert!(c.holds(model.get(c.key())), "seed {seed}: index {i} committed with {c} not holding");
        }
        for w in &e.writes {
            match w {
                Write::Put(k, v) => {
                    model.insert(k.clone(), crate::types::Versioned { value: v.clone(), version: *i });
                }
                Write::Delete(k) => {
                    model.remove(k);
                }
            }
        }
    }
    for (n, p) in sim.parts.iter().enumerate() {
        assert_eq!(p.core.applied_index(), last, "seed {seed}: participant {} did not catch up", n + 1);
        assert_eq!(p.data, model, "seed {seed}: participant {} diverged", n + 1);
        assert_eq!(p.core.prepared_count(), 0, "seed {seed}: participant {} holds undecided transactions", n + 1);
    }
    // No acknowledged write is lost, and nobody was told a wrong outcome.
    for (t, result) in &sim.told {
        match result {
            Ok(c) => assert_eq!(sim.durable.decided.get(t), Some(&Ok(c.index)), "seed {seed}: acknowledged {t} lost"),
            Err(Error::ConditionFailed(_)) => match sim.durable.decided.get(t) {
                Some(Err(_)) => {}
                Some(Ok(i)) => panic!("seed {seed}: {t} was told its condition failed, but committed at {i}"),
                // An old copy restored and never revealed (aborts leave no
                // trace on participants, so nothing can reveal them) has no
                // record of a failure answered after the copy was taken; it
                // answers "aborted" for the id, which agrees (docs/security.md).
                None => assert!(sim.newest.is_some(), "seed {seed}: the failure told for {t} is not durable"),
            },
            Err(_) => {}
        }
    }
    (sim.durable.log.len(), sim.told.len(), sim.now, sim.restores, sim.fenced)
}

/// Thousands of seeded runs; a failure names its seed. Replay one with
/// `TREATY_SIM_SEED=N cargo test -p treaty-core simulation`; run
/// `TREATY_SIM_RUNS` seeds (default 1000) from `TREATY_SIM_FROM` (default 1).
#[test]
fn simulation_of_a_cluster_under_faults() {
    let env = |name: &str| std::env::var(name).ok().map(|n| n.parse::<u64>().expect("a number"));
    let seeds: Vec<u64> = match env("TREATY_SIM_SEED") {
        Some(seed) => vec![seed],
        None => {
            let from = env("TREATY_SIM_FROM").unwrap_or(1);
            (from..from + env("TREATY_SIM_RUNS").unwrap_or(1000)).collect()
        }
    };
    let (mut committed, mut restores, mut fenced) = (0, 0, 0);
    for seed in seeds {
        let result = std::panic::catch_unwind(|| simulate(seed));
        match result {
            Ok((c, _, _, r, f)) => {
                committed += c;
                restores += r;
                fenced += f;
            }
            Err(e) => {
                let msg =
                    e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()));
                panic!(
                    "simulation seed {seed} failed: {}\nreplay: TREATY_SIM_SEED={seed} cargo test -p treaty-core simulation",
                    msg.unwrap_or_default()
                );
            }
        }
    }
    assert!(committed > 0, "nothing committed in any run");
    eprintln!(
        "simulation: {committed} commits; old coordinator copies restored {restores} times, fenced {fenced} times"
    );
}

#[test]
#[ignore]
fn simulation_cost() {
    for seed in 1..=5 {
        let t0 = std::time::Instant::now();
        let (c, told, ms, _, _) = simulate(seed);
        eprintln!("seed {seed}: {c} committed, {told} told, {ms} ms simulated, {:?} real", t0.elapsed());
        let mut sim = Sim::new(seed, 5);
        sim.load_until(4000, true, &mut 1);
        let mut calm = Sim::new(seed, 0);
        let mut n2 = 1u128;
        calm.load_until(4000, false, &mut n2);
        eprintln!(
            "  without faults: {} submitted, {} told, {} running, log {}",
            n2 - 1,
            calm.told.len(),
            calm.core.running(),
            calm.durable.log.len()
        );
        let mut kinds = BTreeMap::new();
        for r in sim.told.values() {
            let k = match r {
                Ok(_) => "ok".to_string(),
                Err(e) => e.to_string().chars().take(60).collect(),
            };
            *kinds.entry(k).or_insert(0) += 1;
        }
        eprintln!("  during faults: {kinds:?}");
    }
}

/// A verified core over five members with each key on three of them.
fn partitioned_core() -> CoordinatorCore {
    verified_partitioned_core(5, 5)
}

/// A verified core whose roster has `n` active members, over the base
/// placement of participants `1..=placed` (each key on 3 of 64 partitions).
fn verified_partitioned_core(n: u64, placed: u64) -> CoordinatorCore {
    let mut view = View::initial(n);
    view.replicas = (1..=n).map(|id| (id, r(id))).collect();
    let membership = Membership::new(view, roster(n), MembershipConfig { min_replicas: 3, ..Default::default() }, 0);
    let history = [(INC.generation, INC.nonce)].into();
    let placement = Placement::new((1..=placed).collect(), 3, 64);
    let mut c = CoordinatorCore::new(CoreConfig::partitioned(placement, 3), INC, history, membership, 0);
    heartbeat(&mut c, n, 0, &[]);
    assert!(c.take_actions().is_empty());
    c
}

#[test]
fn a_partitioned_write_prepares_on_its_replicas_and_the_others_skip_its_index() {
    let mut c = partitioned_core();
    let holders: BTreeSet<u64> = c.placement().replicas_of(b"a").iter().copied().collect();
    assert_eq!(holders.len(), 3);
    c.submit(put(1, "a"), 10);
    let a = c.take_actions();
    let asked: BTreeSet<u64> = prepares(&a).iter().map(|p| p.0).collect();
    assert_eq!(asked, holders, "PREPARE goes to the key's replicas only");
    all_yes(&mut c, &a, 11);
    let _persist = c.take_actions();
    c.persisted(12);
    let a = c.take_actions();
    assert_eq!(replies(&a), vec![(TxnId(1), Ok(Committed { index: 1 }))]);
    for to in 1..=5 {
        let decide = a.iter().find_map(|x| match x {
            Action::Decide { to: t, commits, skips, .. } if *t == to => Some((commits.clone(), skips.clone())),
            _ => None,
        });
        let expected =
            if holders.contains(&to) { (vec![(TxnId(1), 1)], vec![]) } else { (vec![], vec![(TxnId(1), 1)]) };
        assert_eq!(decide, Some(expected), "participant {to}");
    }
}

#[test]
fn a_transaction_across_partitions_prepares_on_every_replica_it_touches() {
    let mut c = partitioned_core();
    let p = c.placement().clone();
    // Two keys whose replica sets differ.
    let (k1, k2) = (0..1000)
        .map(|i| format!("k{i}"))
        .collect::<Vec<_>>()
        .windows(2)
        .map(|w| (w[0].clone(), w[1].clone()))
        .find(|(a, b)| p.replicas_of(a.as_bytes()) != p.replicas_of(b.as_bytes()))
        .expect("keys on different replica sets");
    let t = Txn {
        id: TxnId(1),
        conditions: vec![Condition::Exists(k1.as_bytes().to_vec())],
        writes: vec![Write::Put(k2.as_bytes().to_vec(), b"v".to_vec())],
    };
    c.submit(t, 0);
    let asked: BTreeSet<u64> = prepares(&c.take_actions()).iter().map(|p| p.0).collect();
    let expected: BTreeSet<u64> =
        p.replicas_of(k1.as_bytes()).iter().chain(p.replicas_of(k2.as_bytes())).copied().collect();
    assert_eq!(asked, expected, "the condition's replicas judge it, the write's replicas apply it");
}

#[test]
fn a_partition_without_enough_replicas_refuses_writes_and_others_go_on() {
    let mut c = partitioned_core();
    let p = c.placement().clone();
    let down = p.replicas_of(b"a")[0];
    // Exclude one member: its partitions keep only two of their three replicas.
    let mut now = 0;
    while c.membership().view().members.contains(&down) {
        now += 100;
        heartbeat(&mut c, 5, now, &[down]);
        c.tick(now);
        for a in c.take_actions() {
            if let Action::PersistView(..) = a {
                c.view_persisted(now);
            }
        }
        assert!(now < 10_000, "never excluded");
    }
    c.submit(put(1, "a"), now);
    let a = c.take_actions();
    assert!(prepares(&a).is_empty());
    let [(_, Err(Error::Unavailable(why)))] = &replies(&a)[..] else { panic!("expected a refusal: {a:?}") };
    assert!(why.starts_with(&format!("partition {} (participants ", p.partition(b"a"))), "{why}");
    assert!(why.contains("other partitions keep working"), "{why}");
    // A key none of whose replicas is the excluded member still commits.
    let other = (0..1000).map(|i| format!("o{i}")).find(|k| !p.replicas_of(k.as_bytes()).contains(&down)).unwrap();
    c.submit(put(2, &other), now);
    let a = c.take_actions();
    assert_eq!(prepares(&a).len(), 3);
    all_yes(&mut c, &a, now);
    let _persist = c.take_actions();
    c.persisted(now);
    assert_eq!(replies(&c.take_actions()), vec![(TxnId(2), Ok(Committed { index: 1 }))]);
}

/// A verified core whose roster has six active members while the placement
/// is still the base table of participants 1..=5 (each key on 3 of 64
/// partitions): participant 6 was just admitted.
fn six_on_a_placement_of_five() -> CoordinatorCore {
    verified_partitioned_core(6, 5)
}

/// A key of a partition `pick` accepts.
fn key_where(c: &CoordinatorCore, pick: impl Fn(u32) -> bool) -> String {
    (0..10_000).map(|i| format!("k{i}")).find(|k| pick(c.placement().partition(k.as_bytes()))).expect("a key")
}

fn asked(actions: &[Action]) -> BTreeSet<u64> {
    prepares(actions).iter().map(|p| p.0).collect()
}

#[test]
fn a_rebalance_step_holds_back_only_its_partitions_copies_them_then_switches() {
    let mut c = six_on_a_placement_of_five();
    let before = c.placement().clone();
    let targets: BTreeSet<u64> = (1..=6).collect();
    let moves = before.plan_moves(&targets, |_| true, |_| true, c.config.move_batch);
    assert!(!moves.is_empty() && moves.values().all(|to| to.contains(&6)), "copies go to the new participant");
    let moving = key_where(&c, |p| moves.contains_key(&p));
    let staying = key_where(&c, |p| !moves.contains_key(&p));

    // A write to a moving partition is in flight when the step begins.
    c.submit(put(1, &moving), 10);
    let first = c.take_actions();
    assert_eq!(asked(&first), before.replicas_of(moving.as_bytes()).iter().copied().collect());
    c.tick(100);
    assert!(c.rebalance_status().unwrap().contains("waiting for their writes in flight"), "{:?}", c.rebalance_status());
    assert_eq!(c.install_for(6), None, "nothing to copy while a write to it is in flight");
    // New writes to moving partitions wait; others go on.
    c.submit(put(2, &moving), 110);
    c.submit(put(3, &staying), 110);
    let mut a = c.take_actions();
    all_yes(&mut c, &first, 120);
    a.extend(c.take_actions());
    assert_eq!(prepares(&a).iter().filter(|p| p.2.contains(&TxnId(2))).count(), 0, "held back");
    assert_eq!(prepares(&a).iter().filter(|p| p.2.contains(&TxnId(3))).count(), 3, "not held back");
    all_yes(&mut c, &a, 120);
    let _persist = c.take_actions();
    c.persisted(130);
    let _persist = c.take_actions();
    c.persisted(140);
    let _ = c.take_actions();
    c.tick(200);
    let ins = c.install_for(6).expect("participant 6 copies now");
    assert_eq!(ins.as_of, 2, "both commits are durable");
    assert_eq!(ins.version, 1);
    assert_eq!(ins.step, (INC.generation << 32) + 1);
    assert_eq!(ins.partitions.len(), moves.len());
    for (p, sources) in &ins.partitions {
        assert_eq!(sources, &before.replicas(*p).to_vec(), "copied from its replicas");
    }
    assert_eq!(c.install_for(3), None, "only gainers copy");

    // Not switched until the copy is reported, and only by the replica bound to 6.
    c.tick(300);
    assert!(c.take_actions().is_empty());
    c.installed(6, 999, ins.step);
    c.tick(400);
    assert!(c.take_actions().is_empty(), "another replica's word does not count");
    c.installed(6, r(6), ins.step + 1);
    c.tick(450);
    assert!(c.take_actions().is_empty(), "another step's copy does not count");
    c.installed(6, r(6), ins.step);
    c.tick(500);
    let a = c.take_actions();
    let [Action::PersistPlacement(spec)] = &a[..] else { panic!("expected the switch: {a:?}") };
    assert_eq!(spec.version, 1);
    assert_eq!(c.placement().spec().version, 0, "not before it is durable");
    c.placement_persisted(600);
    let after = c.placement().clone();
    assert_eq!(after.spec().version, 1);
    assert!(after.replicas_of(moving.as_bytes()).contains(&6));
    // The held-back write prepares now, on the new replicas and, for a
    // lease time, on the old ones too.
    let a = c.take_actions();
    let expected: BTreeSet<u64> =
        after.replicas_of(moving.as_bytes()).iter().chain(before.replicas_of(moving.as_bytes())).copied().collect();
    assert_eq!(asked(&a), expected);
    assert!(
        a.iter().all(|x| !matches!(x, Action::Prepare { placement_version, .. } if *placement_version != 1)),
        "PREPAREs carry the new version"
    );
    all_yes(&mut c, &a, 700);
    let _ = c.take_actions();
    c.persisted(710);
    assert_eq!(replies(&c.take_actions()), vec![(TxnId(2), Ok(Committed { index: 3 }))]);
    // After the lease time, only the new replicas.
    let late = 600 + 2_000 + 200;
    heartbeat(&mut c, 6, late, &[]);
    c.submit(put(4, &moving), late);
    let a = c.take_actions();
    assert_eq!(asked(&a), after.replicas_of(moving.as_bytes()).iter().copied().collect());
}

#[test]
fn a_step_whose_copy_never_arrives_is_given_up_and_its_writes_go_on() {
    let mut c = six_on_a_placement_of_five();
    c.tick(100);
    c.tick(200);
    let ins = c.install_for(6).expect("a step copies to 6");
    let moving = key_where(&c, |p| ins.partitions.iter().any(|(q, _)| *q == p));
    c.submit(put(1, &moving), 300);
    assert!(prepares(&c.take_actions()).is_empty(), "held back");
    let mut now = 300;
    while c.rebalance_status().is_some_and(|s| s.starts_with("moving")) {
        now += 500;
        heartbeat(&mut c, 6, now, &[]);
        c.tick(now);
        assert!(now < 30_000, "never given up");
    }
    assert!(now >= 100 + c.config.move_timeout_ms);
    assert_eq!(c.placement().spec().version, 0, "nothing moved");
    assert_eq!(prepares(&c.take_actions()).len(), 3, "the write goes on under the old placement");
}

/// Check-ins of participants `ids` (removed ones refused), copies reported
/// as soon as asked, and durable writes done at once, until `done`.
fn run_membership(c: &mut CoordinatorCore, ids: &[u64], mut now: u64, done: impl Fn(&CoordinatorCore) -> bool) -> u64 {
    while !done(c) {
        now += 100;
        assert!(now < 200_000, "never done: {:?}", c.rebalance_status());
        for &id in ids {
            c.on_ping(id, Some(r(id)), now);
            let _ = c.on_sync(id, r(id), Some(INC), 0, 0, 0, 0, now);
            if let Some(ins) = c.install_for(id) {
                c.installed(id, r(id), ins.step);
            }
        }
        c.tick(now);
        for a in c.take_actions() {
            match a {
                Action::PersistView(view, _) => {
                    for id in ids {
                        if !view.members.contains(id)
                            && c.membership().roster().state(*id) == Some(RosterState::Leaving)
                        {
                            assert!(c.placement().partitions_of(*id).is_empty(), "{id} left holding partitions");
                        }
                    }
                    c.view_persisted(now)
                }
                Action::PersistPlacement(_) => c.placement_persisted(now),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    now
}

#[test]
fn adding_rebalances_to_within_one_and_removing_moves_every_copy_away_before_the_member_leaves() {
    let mut c = six_on_a_placement_of_five();
    let now = run_membership(&mut c, &[1, 2, 3, 4, 5, 6], 0, |c| c.rebalance_status().is_none());
    for id in 1..=6 {
        assert_eq!(c.placement().partitions_of(id).len(), 32, "64 x 3 / 6 each");
    }
    assert_eq!(c.placement().spec().version, 1, "32 copies: one step");
    // A removal that would leave fewer participants than copies is refused.
    c.change_members(&MemberChange::Remove { id: 2 }).unwrap();
    let now = run_membership(&mut c, &[1, 2, 3, 4, 5, 6], now, |c| {
        c.membership().roster().state(2) == Some(RosterState::Removed)
    });
    assert!(c.placement().partitions_of(2).is_empty());
    let loads: Vec<usize> = [1, 3, 4, 5, 6].iter().map(|id| c.placement().partitions_of(*id).len()).collect();
    assert!(loads.iter().all(|l| (38..=39).contains(l)), "{loads:?}");
    for id in [3, 4] {
        c.change_members(&MemberChange::Remove { id }).unwrap();
        run_membership(&mut c, &[1, 3, 4, 5, 6], now, |c| {
            c.membership().roster().state(id) == Some(RosterState::Removed)
        });
    }
    let e = c.change_members(&MemberChange::Remove { id: 5 }).unwrap_err();
    assert!(e.to_string().contains("would leave 2 participant(s) to hold 3 copies"), "{e}");
}

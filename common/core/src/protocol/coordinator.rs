//! The coordinator's 2PC protocol as a pure state machine.
//!
//! The I/O layer (`treaty-coordinator`) feeds [`CoordinatorCore`] inputs, each
//! with the current time in milliseconds, and then carries out the
//! [`Action`]s it takes from [`CoordinatorCore::take_actions`]:
//!
//! | input | when |
//! |-------|------|
//! | [`submit`](CoordinatorCore::submit) | a client (or participant) submits a transaction not yet decided |
//! | [`prepared`](CoordinatorCore::prepared) | a PREPARE batch was answered, or failed |
//! | [`persisted`](CoordinatorCore::persisted) | the last [`Action::Persist`] is durable |
//! | [`view_persisted`](CoordinatorCore::view_persisted) | the last [`Action::PersistView`] is durable |
//! | [`tick`](CoordinatorCore::tick) | time passed (every 100 ms or so) |
//! | [`on_sync`](CoordinatorCore::on_sync), [`on_ping`](CoordinatorCore::on_ping) | a participant checked in, a ping came back |
//!
//! ## The write path
//! A submitted transaction takes its key locks (FIFO per key, in key order,
//! [`LockTable`]), then joins the *outbox* of every member of the view that
//! holds one of its keys (every member, with full copies; see [`Placement`]). Each
//! participant has at most [`CoreConfig::max_in_flight`] PREPARE batches
//! outstanding; whatever accumulates meanwhile leaves as the next batch, so
//! under load one message (one WAL write, one sync on the participant)
//! carries many transactions. When every member has voted YES the
//! transaction gets the next commit index and joins the next
//! [`Action::Persist`] (one durable write for all decisions ready then).
//!
//! ## Invariants
//! * **Persist before you speak.** A commit is told to anyone (the client's
//!   [`Action::Reply`], the participants' [`Action::Decide`]) only from
//!   [`CoordinatorCore::persisted`], for indexes the I/O layer has made
//!   durable; so is a failed condition's answer (a resubmission must get
//!   the same one after a crash). Aborts after failures are presumed and
//!   leave at once.
//! * One [`Action::Persist`] is outstanding at a time, and indexes are
//!   assigned without gaps in the order decisions are made.
//! * Key locks are released when the decision is durable (or the
//!   transaction gave up); conflicting transactions therefore reach the
//!   participants in decision order.
//! * **Views change with nothing in flight.** A proposed view change stops
//!   new PREPAREs; it is applied once no transaction is preparing or
//!   deciding, made durable ([`Action::PersistView`]), and only then do
//!   parked transactions prepare under the new view.
//! * **Moves hold back only their partitions.** A rebalance step (new
//!   replica sets for a few partitions, [`Placement::plan_moves`]) parks new
//!   transactions touching those partitions, waits for the ones in flight,
//!   and notes the durable index as `as_of`. The members gaining a copy
//!   install it from an old replica that has applied `as_of` and say so at
//!   a check-in; then the new placement is made durable
//!   ([`Action::PersistPlacement`]) and the parked transactions go on under
//!   it. For a lease time after the switch, the old replicas of the moved
//!   partitions still prepare their writes: one of them may serve a read
//!   under a lease granted before it learned of the move.
//! * **Fencing.** After a start nothing is decided until `verify_quorum`
//!   participants checked in without showing that this coordinator's data
//!   is behind the cluster's; if one does, the coordinator is fenced for
//!   good (see [`CoordinatorCore::on_sync`]).
//!
//! Time is an input and attempts are numbered from the incarnation, so every
//! run is reproducible (see the simulation test in `tests`).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use crate::error::Error;
use crate::messages::MemberChange;
use crate::messages::{Incarnation, LogEntry, Outcome, PartitionInstall, PrepareItem, Vote};
use crate::protocol::membership::{Roster, RosterState};
use crate::protocol::{Grant, LockTable, Membership, Placement, View, ViewChange};
use crate::types::{Committed, Txn, TxnId};

/// Timing and size limits of the core (milliseconds and counts).
#[derive(Clone, Debug)]
pub struct CoreConfig {
    /// A PREPARE batch unanswered this long counts as failed.
    pub prepare_timeout_ms: u64,
    /// Longest wait for key locks before answering "conflict".
    pub lock_timeout_ms: u64,
    /// After a transient failure (a member unreachable), retry this soon,
    /// or at once when the view changes.
    pub retry_ms: u64,
    /// PREPARE batches outstanding per participant.
    pub max_in_flight: usize,
    /// Most transactions in one PREPARE batch.
    pub max_batch: usize,
    /// Check-ins needed after a start before deciding anything.
    pub verify_quorum: usize,
    /// Which participants hold which keys.
    pub placement: Placement,
    /// Fewest replicas of a partition in the view that still take writes
    /// (`min(--min-replicas, replication)`).
    pub min_partition_replicas: usize,
    /// Most partition copies one rebalance step moves (their writes wait
    /// while they are copied).
    pub move_batch: usize,
    /// A rebalance step not done in this long is given up (its partitions
    /// take writes again) and planned afresh a little later.
    pub move_timeout_ms: u64,
}

impl CoreConfig {
    /// Defaults for a cluster of `n` participants (ids 1..=n), each holding
    /// every key, needing `min_replicas`.
    pub fn new(n: usize, min_replicas: usize) -> Self {
        Self::partitioned(Placement::full((1..=n as u64).collect()), min_replicas)
    }

    /// Defaults for a cluster placed by `placement`, needing
    /// `min(min_replicas, replication)` replicas of a partition to write to it.
    pub fn partitioned(placement: Placement, min_replicas: usize) -> Self {
        let n = placement.spec().participants.len();
        let min_partition_replicas = min_replicas.min(placement.replication()).max(1);
        CoreConfig {
            prepare_timeout_ms: 3000,
            lock_timeout_ms: 8000,
            retry_ms: 250,
            max_in_flight: 1,
            max_batch: 1024,
            // A commit was voted by at least `min_partition_replicas`
            // participants: this many check-ins include one of them.
            verify_quorum: (n + 1).saturating_sub(min_partition_replicas).max(1),
            placement,
            min_partition_replicas,
            move_batch: 32,
            move_timeout_ms: 20_000,
        }
    }
}

/// A batch of decisions to make durable: commits with their writes, and
/// failed conditions with their reason.
pub type Decisions = (Vec<LogEntry>, Vec<(TxnId, String)>);

/// Outcomes for one participant: commits as (txn, index), aborts as (txn,
/// attempt), skips (commits touching none of its keys) as (txn, index).
pub type Outcomes = (u64, Vec<(TxnId, u64)>, Vec<(TxnId, u64)>, Vec<(TxnId, u64)>);

/// What the I/O layer must do.
#[derive(Debug)]
pub enum Action {
    /// Send one PREPARE batch to participant `to`, then report the answer
    /// (one vote per item, in order) or the failure through
    /// [`CoordinatorCore::prepared`] with the same `batch`.
    Prepare {
        to: u64,
        batch: u64,
        epoch: u64,
        replica: u64,
        min_applied: u64,
        placement_version: u64,
        items: Vec<PrepareItem>,
    },
    /// Write these decisions (commits with their writes, and failed
    /// conditions with their reason), make them durable, then call
    /// [`CoordinatorCore::persisted`].
    Persist { commits: Vec<LogEntry>, aborts: Vec<(TxnId, String)> },
    /// Tell participant `to` these outcomes; fire and forget (a participant
    /// that misses them asks on its next check-in). `skips` are commits that
    /// touch none of `to`'s partitions: it passes over their indexes.
    Decide { to: u64, commits: Vec<(TxnId, u64)>, aborts: Vec<(TxnId, u64)>, skips: Vec<(TxnId, u64)> },
    /// Answer everyone waiting for transaction `txn`.
    Reply { txn: TxnId, result: Result<Committed, Error> },
    /// Make this view and roster durable (in one write), then call
    /// [`CoordinatorCore::view_persisted`].
    PersistView(View, Roster),
    /// Make this placement durable, then call
    /// [`CoordinatorCore::placement_persisted`].
    PersistPlacement(crate::protocol::PlacementSpec),
}

#[derive(Debug)]
enum State {
    /// Queued for its key locks since `since`.
    Locking { since: u64 },
    /// Parked until the start's verification or a view change is done.
    Parked,
    /// PREPAREs of `attempt` sent to `members` (under `epoch`).
    Preparing { attempt: u64, members: BTreeSet<u64>, votes: BTreeMap<u64, Result<Vote, Error>> },
    /// A transient failure; prepare again at `at` (or on a view change).
    Retrying { at: u64, errors: Vec<Error> },
    /// Decided; waiting for the decision to be durable.
    Deciding,
}

#[derive(Debug)]
enum Decided {
    Commit { index: u64, members: BTreeSet<u64> },
    ConditionFailed(String),
}

#[derive(Debug)]
struct Entry {
    txn: Arc<Txn>,
    state: State,
    /// When it was submitted: transient failures are retried until
    /// `started + stall_budget`.
    started: u64,
}

/// Fencing state (see the module docs).
#[derive(Debug, Default)]
struct Fence {
    fenced: Option<String>,
    verified: BTreeSet<u64>,
}

/// One step of a rebalance (see the module docs).
#[derive(Debug)]
struct Rebalance {
    /// Its name in [`PartitionInstall::step`].
    step: u64,
    /// New replica sets, by partition.
    moves: BTreeMap<u32, Vec<u64>>,
    /// The placement once the step is done.
    next: Placement,
    /// Members gaining a copy.
    gainers: BTreeSet<u64>,
    /// Writes to the moving partitions are held back since this durable
    /// index (`None`: some are still in flight).
    as_of: Option<u64>,
    /// Gainers that installed their copies, with the replica that said so.
    installed: BTreeMap<u64, u64>,
    started: u64,
    persisting: bool,
}

/// A pending decision in the persist queue.
#[derive(Debug)]
struct Pending {
    txn: TxnId,
    decision: Decided,
}

#[derive(Debug)]
pub struct CoordinatorCore {
    config: CoreConfig,
    incarnation: Incarnation,
    /// Every incarnation this data has run as (generation -> nonce).
    history: BTreeMap<u64, u64>,
    membership: Membership,
    locks: LockTable,
    txns: BTreeMap<TxnId, Entry>,
    /// Transactions waiting to be prepared (verification, view change).
    parked: VecDeque<TxnId>,
    next_attempt: u64,
    next_batch: u64,
    /// Per participant: items waiting to leave, and batches outstanding
    /// (batch id -> (sent at, txns)).
    outbox: BTreeMap<u64, Vec<PrepareItem>>,
    outstanding: BTreeMap<u64, BTreeMap<u64, (u64, Vec<TxnId>)>>,
    /// Highest durable commit index.
    durable: u64,
    /// Highest assigned commit index (durable or being made durable).
    assigned: u64,
    /// Decided, not yet handed out for persisting.
    to_persist: Vec<Pending>,
    /// Handed out in the outstanding [`Action::Persist`].
    persisting: Vec<Pending>,
    /// A view change waiting for in-flight transactions to finish.
    view_change: Option<ViewChange>,
    view_persisting: bool,
    fence: Fence,
    actions: Vec<Action>,
    /// Transactions that found a key locked and queued for it (for metrics).
    lock_waits: u64,
    /// The rebalance step in progress.
    rebalance: Option<Rebalance>,
    /// Transactions held back by the rebalance step.
    frozen: VecDeque<TxnId>,
    /// Until `window_until`, the replicas partitions had before the last
    /// move still prepare their writes (see the module docs).
    window: BTreeMap<u32, Vec<u64>>,
    window_until: u64,
    /// No rebalance step is planned before this time.
    next_rebalance_at: u64,
    /// Per partition, the placement version that last changed its replicas
    /// (since this start: the current version for all of them at first).
    /// A PREPARE batch carries the highest of its transactions' partitions,
    /// so that only a move a batch depends on makes a participant that has
    /// not heard of it check in first.
    changed_at: Vec<u64>,
    /// The next step's name: the generation, then a count.
    next_step: u64,
}

/// The longest a transaction keeps retrying after transient failures: a
/// dead member stalls writes at most until it is excluded (detection plus
/// its lease plus margin), then they resume.
fn stall_budget(m: &Membership) -> u64 {
    let c = m.config();
    c.detect_ms + c.lease_ms + c.drift_margin_ms + 1500
}

impl CoordinatorCore {
    /// A core for a coordinator that starts as `incarnation` over durable
    /// state: the last commit index in its log, its view and its history.
    /// Time starts at 0: the replicas of the last move's partitions before
    /// it prepare their writes for a lease time (a previous run may have
    /// switched just before it stopped).
    pub fn new(
        config: CoreConfig,
        incarnation: Incarnation,
        history: BTreeMap<u64, u64>,
        membership: Membership,
        last_index: u64,
    ) -> Self {
        CoordinatorCore {
            config,
            next_attempt: incarnation.generation << 32,
            incarnation,
            history,
            membership,
            locks: LockTable::new(),
            txns: BTreeMap::new(),
            parked: VecDeque::new(),
            next_batch: 1,
            outbox: BTreeMap::new(),
            outstanding: BTreeMap::new(),
            durable: last_index,
            assigned: last_index,
            to_persist: Vec::new(),
            persisting: Vec::new(),
            view_change: None,
            view_persisting: false,
            fence: Fence::default(),
            actions: Vec::new(),
            lock_waits: 0,
            rebalance: None,
            frozen: VecDeque::new(),
            window: BTreeMap::new(),
            window_until: 0,
            next_rebalance_at: 0,
            next_step: (incarnation.generation << 32) + 1,
            changed_at: Vec::new(),
        }
        .started()
    }

    fn started(mut self) -> Self {
        let c = self.membership.config();
        self.window = self.config.placement.spec().previous.clone();
        self.window_until = c.lease_ms + c.drift_margin_ms;
        let spec = self.config.placement.spec();
        self.changed_at = vec![spec.version; spec.partitions as usize];
        self.refresh_placement();
        self
    }

    /// The placement version a PREPARE batch of `items` depends on.
    fn batch_version(&self, items: &[PrepareItem]) -> u64 {
        if self.config.placement.is_full() {
            return self.config.placement.spec().version;
        }
        let mut version = 0;
        for item in items {
            let t = &item.txn;
            for k in t.conditions.iter().map(|c| c.key()).chain(t.writes.iter().map(|w| w.key())) {
                version = version.max(self.changed_at[self.config.placement.partition(k) as usize]);
            }
        }
        version
    }

    /// The actions the inputs so far asked for, in order, with the
    /// outcomes for one participant merged into one [`Action::Decide`].
    pub fn take_actions(&mut self) -> Vec<Action> {
        let mut out: Vec<Action> = Vec::with_capacity(self.actions.len());
        let mut decide_at: BTreeMap<u64, usize> = BTreeMap::new();
        for a in self.actions.drain(..) {
            match a {
                Action::Decide { to, commits, aborts, skips } => match decide_at.get(&to) {
                    Some(&i) => {
                        if let Action::Decide { commits: c, aborts: ab, skips: sk, .. } = &mut out[i] {
                            c.extend(commits);
                            ab.extend(aborts);
                            sk.extend(skips);
                        }
                    }
                    None => {
                        decide_at.insert(to, out.len());
                        out.push(Action::Decide { to, commits, aborts, skips });
                    }
                },
                other => out.push(other),
            }
        }
        out
    }

    pub fn incarnation(&self) -> Incarnation {
        self.incarnation
    }

    pub fn placement(&self) -> &Placement {
        &self.config.placement
    }

    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// Highest durable commit index.
    pub fn last_index(&self) -> u64 {
        self.durable
    }

    /// Whether the transaction is running here (submitted, not answered).
    pub fn is_running(&self, txn: TxnId) -> bool {
        self.txns.contains_key(&txn)
    }

    /// Transactions running.
    pub fn running(&self) -> usize {
        self.txns.len()
    }

    /// Why this coordinator refuses to decide: fenced, or still verifying
    /// after a start (`Ok(false)`); `Ok(true)` when it may decide.
    pub fn check_fence(&self) -> Result<bool, Error> {
        if let Some(why) = &self.fence.fenced {
            return Err(Error::Fenced(why.clone()));
        }
        Ok(self.fence.verified.len() >= self.config.verify_quorum)
    }

    /// The status line of the fence: why it is fenced, or how far its
    /// verification after a start has come; `None` when neither applies.
    pub fn fence_status(&self) -> Option<String> {
        self.fence.fenced.clone().or_else(|| {
            (self.fence.verified.len() < self.config.verify_quorum).then(|| {
                format!(
                    "verifying its log after a start: heard from {} of the {} participants it needs",
                    self.fence.verified.len(),
                    self.config.verify_quorum
                )
            })
        })
    }

    /// What to answer about a transaction that has no durable decision in
    /// the log (the I/O layer checks the log first).
    pub fn outcome_without_record(&self, txn: TxnId) -> Result<Outcome, Error> {
        let verified = self.check_fence()?;
        Ok(if self.txns.contains_key(&txn) || !verified { Outcome::Pending } else { Outcome::Aborted })
    }

    // -----------------------------------------------------------------
    // Submitting and preparing

    /// A transaction to run. The I/O layer has validated it and checked
    /// that no durable decision exists for its id; a second submission of
    /// an id still running joins the first (one [`Action::Reply`] answers
    /// every waiter).
    pub fn submit(&mut self, txn: Txn, now: u64) {
        if self.txns.contains_key(&txn.id) {
            return;
        }
        if let Err(e) = self.check_fence() {
            self.actions.push(Action::Reply { txn: txn.id, result: Err(e) });
            return;
        }
        let id = txn.id;
        let keys = txn.keys();
        self.txns.insert(id, Entry { txn: Arc::new(txn), state: State::Locking { since: now }, started: now });
        if self.locks.acquire(id, keys) {
            self.locked(id, now);
        } else {
            self.lock_waits += 1;
        }
    }

    /// Transactions so far that queued for a key another one held.
    pub fn lock_waits(&self) -> u64 {
        self.lock_waits
    }

    /// `id` holds all its keys: prepare it, or park it if the start's
    /// verification or a view change is in progress.
    fn locked(&mut self, id: TxnId, now: u64) {
        let verified = self.fence.verified.len() >= self.config.verify_quorum;
        if !verified || self.view_change.is_some() || self.view_persisting {
            if let Some(e) = self.txns.get_mut(&id) {
                e.state = State::Parked;
            }
            self.parked.push_back(id);
            return;
        }
        self.start_prepare(id, now);
    }

    fn start_prepare(&mut self, id: TxnId, now: u64) {
        let Some(entry) = self.txns.get(&id) else { return };
        if self.held_back(&entry.txn) {
            if let Some(e) = self.txns.get_mut(&id) {
                e.state = State::Parked;
            }
            self.frozen.push_back(id);
            return;
        }
        let members = match self.involved(&entry.txn, now) {
            Ok(members) => members,
            Err(why) => {
                self.finish(id, Err(Error::Unavailable(why)), now);
                return;
            }
        };
        let attempt = self.next_attempt;
        self.next_attempt += 1;
        let Some(entry) = self.txns.get_mut(&id) else { return };
        for m in &members {
            self.outbox.entry(*m).or_default().push(PrepareItem { attempt, txn: entry.txn.clone() });
        }
        entry.state = State::Preparing { attempt, members, votes: BTreeMap::new() };
        self.flush(now);
    }

    /// The members of the view that must prepare `txn`: those holding a key
    /// it reads or writes. Refused when a partition it touches has fewer
    /// than `min_partition_replicas` replicas in the view (with full copies:
    /// fewer than `--min-replicas` members).
    fn involved(&self, txn: &Txn, now: u64) -> Result<BTreeSet<u64>, String> {
        let view = self.membership.view();
        let placement = &self.config.placement;
        if placement.is_full() {
            self.membership.check_writable()?;
            return Ok(view.members.clone());
        }
        let keys = txn.keys();
        let mut members = BTreeSet::new();
        for part in placement.partitions_for(keys.iter().map(|k| k.as_slice())) {
            let replicas = placement.replicas(part);
            let live: Vec<u64> = replicas.iter().copied().filter(|r| view.members.contains(r)).collect();
            if live.len() < self.config.min_partition_replicas {
                let list = |ids: &[u64]| ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
                return Err(format!(
                    "partition {part} (participants {}) has {} of its replicas in the view (epoch {}, minimum {}): \
                     writes to its keys are refused until they return, other partitions keep working; \
                     `treaty status` shows which are down",
                    list(replicas),
                    if live.is_empty() { "none".to_string() } else { format!("only {}", list(&live)) },
                    view.epoch,
                    self.config.min_partition_replicas
                ));
            }
            members.extend(live);
            if now < self.window_until {
                if let Some(before) = self.window.get(&part) {
                    members.extend(before.iter().copied().filter(|r| view.members.contains(r)));
                }
            }
        }
        Ok(members)
    }

    /// Whether `txn` touches a partition the rebalance step is moving (and
    /// so waits for it, or is waited for when already running).
    fn held_back(&self, txn: &Txn) -> bool {
        let Some(r) = &self.rebalance else { return false };
        let keys = txn.keys();
        self.config.placement.partitions_for(keys.iter().map(|k| k.as_slice())).iter().any(|p| r.moves.contains_key(p))
    }

    /// Sends what waits in the outboxes, as far as the in-flight limit allows.
    fn flush(&mut self, now: u64) {
        let epoch = self.membership.view().epoch;
        let ids: Vec<u64> = self.outbox.keys().copied().collect();
        for to in ids {
            loop {
                let outstanding = self.outstanding.get(&to).map_or(0, |o| o.len());
                let queue = self.outbox.get_mut(&to).expect("listed");
                if queue.is_empty() || outstanding >= self.config.max_in_flight {
                    break;
                }
                let take = queue.len().min(self.config.max_batch);
                let items: Vec<PrepareItem> = queue.drain(..take).collect();
                let batch = self.next_batch;
                self.next_batch += 1;
                self.outstanding.entry(to).or_default().insert(batch, (now, items.iter().map(|i| i.txn.id).collect()));
                self.actions.push(Action::Prepare {
                    to,
                    batch,
                    epoch,
                    replica: self.membership.bound_replica(to),
                    min_applied: self.membership.min_applied(to),
                    placement_version: self.batch_version(&items),
                    items,
                });
            }
        }
    }

    /// Participant `from` answered PREPARE batch `batch`: one vote per item,
    /// in order, or an error for the whole batch.
    pub fn prepared(&mut self, from: u64, batch: u64, answer: Result<Vec<Result<Vote, Error>>, Error>, now: u64) {
        let Some((_, txns)) = self.outstanding.get_mut(&from).and_then(|o| o.remove(&batch)) else {
            return; // timed out already
        };
        let votes: Vec<Result<Vote, Error>> = match answer {
            Ok(v) if v.len() == txns.len() => v,
            Ok(v) => {
                let e = Error::Unavailable(format!(
                    "participant {from} answered {} votes for {} transactions",
                    v.len(),
                    txns.len()
                ));
                vec![Err(e); txns.len()]
            }
            Err(e) => vec![Err(e); txns.len()],
        };
        for (id, vote) in txns.into_iter().zip(votes) {
            self.vote(id, from, vote, now);
        }
        self.flush(now);
        self.maybe_persist();
    }

    fn vote(&mut self, id: TxnId, from: u64, vote: Result<Vote, Error>, now: u64) {
        let Some(entry) = self.txns.get_mut(&id) else { return };
        let State::Preparing { members, votes, .. } = &mut entry.state else { return };
        if !members.contains(&from) {
            return;
        }
        votes.insert(from, vote);
        if votes.len() == members.len() {
            self.tally(id, now);
        }
    }

    /// Every member voted: decide, retry, or give up.
    fn tally(&mut self, id: TxnId, now: u64) {
        let budget = stall_budget(&self.membership);
        let entry = self.txns.get_mut(&id).expect("tallied txn exists");
        let State::Preparing { attempt, members, votes } = std::mem::replace(&mut entry.state, State::Parked) else {
            unreachable!("tally only while preparing")
        };
        let yes = votes.values().filter(|v| matches!(v, Ok(Vote::Yes))).count();
        if yes == members.len() {
            self.assigned += 1;
            let decision = Decided::Commit { index: self.assigned, members };
            entry.state = State::Deciding;
            self.to_persist.push(Pending { txn: id, decision });
            return;
        }
        // Not unanimous: this attempt is over on every member.
        for m in &members {
            self.actions.push(Action::Decide { to: *m, commits: vec![], aborts: vec![(id, attempt)], skips: vec![] });
        }
        let mut no_reason = None;
        let mut failures = Vec::new();
        for v in votes.into_values() {
            match v {
                Ok(Vote::Yes) => {}
                Ok(Vote::No(reason)) => {
                    no_reason.get_or_insert(reason);
                }
                Err(e) => failures.push(e),
            }
        }
        if let Some(reason) = no_reason.clone() {
            if failures.is_empty() {
                // Durable before the answer: a resubmission must get it too.
                entry.state = State::Deciding;
                self.to_persist.push(Pending { txn: id, decision: Decided::ConditionFailed(reason) });
                return;
            }
        }
        let transient =
            failures.iter().all(|e| matches!(e, Error::Unavailable(_) | Error::NotReady(_) | Error::Conflict(_)));
        if transient && now < entry.started + budget {
            entry.state = State::Retrying { at: now + self.config.retry_ms, errors: failures };
            return;
        }
        // Report unavailability first: it names the node to fix.
        failures.sort_by_key(|e| !matches!(e, Error::Unavailable(_)));
        self.finish(id, Err(merge_errors(failures)), now);
    }

    /// Hands the next batch of decisions to the I/O layer, one at a time.
    fn maybe_persist(&mut self) {
        if !self.persisting.is_empty() || self.to_persist.is_empty() {
            return;
        }
        self.persisting = std::mem::take(&mut self.to_persist);
        let mut commits = Vec::new();
        let mut aborts = Vec::new();
        for p in &self.persisting {
            match &p.decision {
                Decided::Commit { index, .. } => {
                    let writes = self.txns.get(&p.txn).map(|e| e.txn.writes.clone()).unwrap_or_default();
                    commits.push(LogEntry { index: *index, txn_id: p.txn, writes });
                }
                Decided::ConditionFailed(reason) => aborts.push((p.txn, reason.clone())),
            }
        }
        self.actions.push(Action::Persist { commits, aborts });
    }

    /// The last [`Action::Persist`] is durable: answer, tell the
    /// participants, release the locks.
    pub fn persisted(&mut self, now: u64) {
        let done = std::mem::take(&mut self.persisting);
        // Members not involved in a commit pass over its index (views do not
        // change while anything is deciding, so this is the view it ran in).
        let view: BTreeSet<u64> = self.membership.view().members.clone();
        // Per member: (commits, skips), each as (txn, index).
        type Told = (Vec<(TxnId, u64)>, Vec<(TxnId, u64)>);
        let mut decide: BTreeMap<u64, Told> = BTreeMap::new();
        for p in &done {
            if let Decided::Commit { index, members } = &p.decision {
                self.durable = self.durable.max(*index);
                for m in &view {
                    let (commits, skips) = decide.entry(*m).or_default();
                    if members.contains(m) { commits } else { skips }.push((p.txn, *index));
                }
            }
        }
        for (to, (commits, skips)) in decide {
            self.actions.push(Action::Decide { to, commits, aborts: vec![], skips });
        }
        for p in done {
            let result = match p.decision {
                Decided::Commit { index, .. } => Ok(Committed { index }),
                Decided::ConditionFailed(reason) => Err(Error::ConditionFailed(reason)),
            };
            self.finish(p.txn, result, now);
        }
        self.maybe_change_view(now);
        self.maybe_persist();
    }

    /// Answers `id`, forgets it and releases its locks; whoever waited for
    /// them goes on.
    fn finish(&mut self, id: TxnId, result: Result<Committed, Error>, now: u64) {
        if self.txns.remove(&id).is_none() {
            return;
        }
        self.parked.retain(|t| *t != id);
        self.frozen.retain(|t| *t != id);
        self.actions.push(Action::Reply { txn: id, result });
        for g in self.locks.release(id) {
            self.locked(g, now);
        }
    }

    fn park(&mut self, id: TxnId) {
        if let Some(e) = self.txns.get_mut(&id) {
            e.state = State::Parked;
            self.parked.push_back(id);
        }
    }

    // -----------------------------------------------------------------
    // Time

    /// Time passed: lock and prepare timeouts, retries, verification
    /// deadlines, failure detection and view changes.
    pub fn tick(&mut self, now: u64) {
        let budget = stall_budget(&self.membership);
        // Batches nobody answered.
        let deadline = self.config.prepare_timeout_ms + 1000;
        let mut late = Vec::new();
        for (to, batches) in &self.outstanding {
            for (batch, (sent, _)) in batches {
                if now >= sent + deadline {
                    late.push((*to, *batch));
                }
            }
        }
        for (to, batch) in late {
            let e = Error::Unavailable(format!("participant {to} did not answer a PREPARE in time"));
            self.prepared(to, batch, Err(e), now);
        }
        let mut expired = Vec::new();
        let mut retry = Vec::new();
        let verified = self.check_fence();
        for (id, e) in &self.txns {
            match &e.state {
                State::Locking { since } if now >= since + self.config.lock_timeout_ms => expired.push((
                    *id,
                    Error::Conflict(format!(
                        "waited {} ms for keys held by other transactions; retry",
                        self.config.lock_timeout_ms
                    )),
                )),
                State::Retrying { at, .. } if now >= *at => retry.push(*id),
                State::Parked if now >= e.started + budget => match &verified {
                    Err(f) => expired.push((*id, f.clone())),
                    Ok(false) => expired.push((
                        *id,
                        Error::Unavailable(format!(
                            "the coordinator is checking its log against the participants after a start and has \
                             heard from {} of the {} it needs; retry shortly (`treaty status` shows who is down)",
                            self.fence.verified.len(),
                            self.config.verify_quorum
                        )),
                    )),
                    Ok(true) => {}
                },
                _ => {}
            }
        }
        for (id, e) in expired {
            self.finish(id, Err(e), now);
        }
        for id in retry {
            self.retry(id, now);
        }
        if let Some(change) = self.membership.tick(now, self.assigned) {
            if self.view_change.is_none() && !self.view_persisting {
                self.view_change = Some(change);
            }
        }
        self.maybe_change_view(now);
        self.unpark(now);
        self.drive_rebalance(now);
        self.maybe_persist();
    }

    fn retry(&mut self, id: TxnId, now: u64) {
        let budget = stall_budget(&self.membership);
        let Some(entry) = self.txns.get_mut(&id) else { return };
        let State::Retrying { errors, .. } = &mut entry.state else { return };
        if now >= entry.started + budget {
            let mut errors = std::mem::take(errors);
            errors.sort_by_key(|e| !matches!(e, Error::Unavailable(_)));
            self.finish(id, Err(merge_errors(errors)), now);
        } else if self.view_change.is_some() || self.view_persisting {
            self.park(id);
        } else {
            self.start_prepare(id, now);
        }
    }

    /// Prepares parked transactions once nothing holds them back.
    fn unpark(&mut self, now: u64) {
        if self.view_change.is_some() || self.view_persisting || self.check_fence() != Ok(true) {
            return;
        }
        while let Some(id) = self.parked.pop_front() {
            if self.txns.get(&id).is_some_and(|e| matches!(e.state, State::Parked)) {
                self.start_prepare(id, now);
            }
        }
    }

    /// Applies a proposed view change once no transaction is preparing or
    /// deciding; re-checked at that moment ([`Membership::apply`]).
    fn maybe_change_view(&mut self, now: u64) {
        let Some(change) = self.view_change else { return };
        let busy = self.txns.values().any(|e| matches!(e.state, State::Preparing { .. } | State::Deciding));
        if busy || !self.persisting.is_empty() {
            return;
        }
        self.view_change = None;
        match self.membership.apply(change, self.durable, now) {
            Some(view) => {
                self.view_persisting = true;
                self.refresh_placement();
                self.actions.push(Action::PersistView(view, self.membership.roster().clone()));
            }
            None => self.unpark(now),
        }
        // Retrying transactions wait for the new view instead of their timer.
        let waiting: Vec<TxnId> =
            self.txns.iter().filter(|(_, e)| matches!(e.state, State::Retrying { .. })).map(|(id, _)| *id).collect();
        for id in waiting {
            self.park(id);
        }
    }

    /// With full copies the placement is every participant of the roster.
    /// The check-ins needed after a start count the roster's participants
    /// (see [`CoreConfig::partitioned`]), and a leaving member still
    /// holding partitions stays until they have moved away.
    fn refresh_placement(&mut self) {
        let ids: Vec<u64> = self.membership.participants().into_keys().collect();
        let n = ids.len();
        if self.config.placement.is_full() {
            if ids != self.config.placement.spec().participants {
                self.config.placement = Placement::new(ids, n, self.config.placement.partitions());
            }
            self.config.min_partition_replicas = self.membership.config().min_replicas.min(n).max(1);
        }
        self.config.verify_quorum = (n + 1).saturating_sub(self.config.min_partition_replicas).max(1);
        let holding = if self.config.placement.is_full() {
            BTreeSet::new()
        } else {
            self.config.placement.holders().into_iter().collect()
        };
        self.membership.set_holding(holding);
    }

    // -----------------------------------------------------------------
    // Moving partitions

    /// The participants that should hold data: those of the roster that
    /// are neither joining nor leaving.
    fn targets(&self) -> BTreeSet<u64> {
        self.membership
            .roster()
            .nodes
            .iter()
            .filter(|(_, e)| e.state == RosterState::Active)
            .map(|(id, _)| *id)
            .collect()
    }

    /// The next rebalance step from the current placement (empty: none is
    /// needed, or none can be made now). Copies go only to members that
    /// are not suspected, and only partitions with a replica in the view
    /// to copy from move.
    fn plan(&self, max: usize) -> BTreeMap<u32, Vec<u64>> {
        let view = &self.membership.view().members;
        let placement = &self.config.placement;
        placement.plan_moves(
            &self.targets(),
            |id| view.contains(&id) && !self.membership.is_suspected(id),
            |p| placement.replicas(p).iter().any(|r| view.contains(r)),
            max,
        )
    }

    /// Starts, advances or gives up the rebalance step (every tick).
    fn drive_rebalance(&mut self, now: u64) {
        if self.config.placement.is_full() || self.check_fence() != Ok(true) {
            return;
        }
        let Some(r) = &self.rebalance else {
            if now < self.next_rebalance_at || !self.view_settled() {
                return;
            }
            let moves = self.plan(self.config.move_batch);
            if moves.is_empty() {
                return;
            }
            let placement = &self.config.placement;
            let gainers = moves
                .iter()
                .flat_map(|(p, to)| to.iter().copied().filter(|id| !placement.replicas(*p).contains(id)))
                .collect();
            let next = placement.with_moves(&moves);
            let step = self.next_step;
            self.next_step += 1;
            self.rebalance = Some(Rebalance {
                step,
                moves,
                next,
                gainers,
                as_of: None,
                installed: BTreeMap::new(),
                started: now,
                persisting: false,
            });
            return;
        };
        if r.persisting {
            return;
        }
        let view = &self.membership.view().members;
        if now >= r.started + self.config.move_timeout_ms || !r.gainers.is_subset(view) {
            self.abandon_rebalance(now);
            return;
        }
        if r.as_of.is_none() {
            let busy = self
                .txns
                .values()
                .any(|e| matches!(e.state, State::Preparing { .. } | State::Deciding) && self.held_back(&e.txn));
            if !busy {
                let durable = self.durable;
                self.rebalance.as_mut().expect("present").as_of = Some(durable);
            }
            return;
        }
        let done =
            r.gainers.iter().all(|g| r.installed.get(g).is_some_and(|rep| *rep == self.membership.bound_replica(*g)));
        if done {
            let spec = r.next.spec().clone();
            self.rebalance.as_mut().expect("present").persisting = true;
            self.actions.push(Action::PersistPlacement(spec));
        }
    }

    /// Gives the rebalance step up: its partitions take writes again under
    /// the current placement; a new step is planned a little later.
    fn abandon_rebalance(&mut self, now: u64) {
        self.rebalance = None;
        self.next_rebalance_at = now + 2_000;
        self.thaw(now);
    }

    /// Transactions held back by a rebalance step prepare now.
    fn thaw(&mut self, now: u64) {
        let frozen: Vec<TxnId> = self.frozen.drain(..).collect();
        for id in frozen.into_iter().rev() {
            self.parked.push_front(id);
        }
        self.unpark(now);
    }

    /// The last [`Action::PersistPlacement`] is durable: the step's
    /// partitions are where it put them, and their writes go on.
    pub fn placement_persisted(&mut self, now: u64) {
        let Some(r) = self.rebalance.take() else { return };
        let c = self.membership.config();
        self.window = r.next.spec().previous.clone();
        self.window_until = now + c.lease_ms + c.drift_margin_ms;
        for p in r.moves.keys() {
            self.changed_at[*p as usize] = r.next.spec().version;
        }
        self.config.placement = r.next;
        self.refresh_placement();
        self.next_rebalance_at = now;
        self.thaw(now);
    }

    /// What participant `id` is to copy for the rebalance step (`None`:
    /// nothing now). Sources are the partitions' current replicas in the view.
    pub fn install_for(&self, id: u64) -> Option<PartitionInstall> {
        let r = self.rebalance.as_ref()?;
        let as_of = r.as_of?;
        if !r.gainers.contains(&id) {
            return None;
        }
        let view = &self.membership.view().members;
        let partitions = r
            .moves
            .iter()
            .filter(|(p, to)| to.contains(&id) && !self.config.placement.replicas(**p).contains(&id))
            .map(|(p, _)| {
                let sources = self.config.placement.replicas(*p).iter().copied().filter(|s| view.contains(s)).collect();
                (*p, sources)
            })
            .collect();
        Some(PartitionInstall { step: r.step, version: r.next.spec().version, as_of, partitions })
    }

    /// Participant `id`, checking in as `replica`, has durably installed
    /// the copies of rebalance step `step`.
    pub fn installed(&mut self, id: u64, replica: u64, step: u64) {
        if let Some(r) = &mut self.rebalance {
            if r.as_of.is_some() && r.gainers.contains(&id) && r.step == step {
                r.installed.insert(id, replica);
            }
        }
    }

    /// How many copies `moves` makes on participants that lack them now.
    fn new_copies(&self, moves: &BTreeMap<u32, Vec<u64>>) -> usize {
        moves
            .iter()
            .map(|(p, to)| to.iter().filter(|id| !self.config.placement.replicas(*p).contains(id)).count())
            .sum()
    }

    /// Partitions moving between participants, in words (`None`: the
    /// placement is where it should be).
    pub fn rebalance_status(&self) -> Option<String> {
        if let Some(r) = &self.rebalance {
            let copies = self.new_copies(&r.moves);
            let to: Vec<String> = r.gainers.iter().map(u64::to_string).collect();
            let phase = match r.as_of {
                None => "waiting for their writes in flight".to_string(),
                Some(i) => format!("copying as of index {i}, {} of {} done", r.installed.len(), r.gainers.len()),
            };
            return Some(format!(
                "moving {copies} partition copies to participant(s) {} (placement version {}): {phase}",
                to.join(", "),
                r.next.spec().version
            ));
        }
        if self.config.placement.is_full() {
            return None;
        }
        let left = self.new_copies(&self.plan(usize::MAX));
        let leaving = self
            .membership
            .roster()
            .nodes
            .iter()
            .any(|(id, e)| e.state == RosterState::Leaving && self.config.placement.holders().contains(id));
        match left {
            0 if leaving => {
                Some("a leaving participant still holds partitions: waiting for a member to copy them to".into())
            }
            0 => None,
            n => Some(format!(
                "{n} partition copies to move (placement version {})",
                self.config.placement.spec().version
            )),
        }
    }

    /// An operator adds or removes a participant. Checked and queued here;
    /// made durable by a later view change (poll
    /// [`Membership::request_pending`] and [`CoordinatorCore::view_settled`]).
    pub fn change_members(&mut self, change: &MemberChange) -> Result<(), Error> {
        self.check_fence()?;
        let placement = &self.config.placement;
        if let (MemberChange::Remove { id }, false) = (change, placement.is_full()) {
            let staying = self.targets().into_iter().filter(|t| t != id).count();
            let active = self.membership.roster().state(*id) == Some(RosterState::Active);
            if active && staying < placement.replication() {
                return Err(Error::Invalid(format!(
                    "removing participant {id} would leave {staying} participant(s) to hold {} copies of every key \
                     (this cluster's replication): add one first (`treaty member add ADDR`)",
                    placement.replication()
                )));
            }
        }
        match change {
            MemberChange::Add { id, addr } => self.membership.request_add(*id, addr),
            MemberChange::Remove { id } => self.membership.request_remove(*id),
        }
        .map_err(Error::Invalid)
    }

    /// The log was compacted through `index` (see [`Membership::set_log_start`]).
    pub fn log_compacted(&mut self, index: u64) {
        self.membership.set_log_start(index);
    }

    /// What participant `id` said at its check-in about a snapshot install.
    pub fn set_installing(&mut self, id: u64, installing: bool) {
        self.membership.set_installing(id, installing);
    }

    /// No view change is proposed or being made durable right now.
    pub fn view_settled(&self) -> bool {
        self.view_change.is_none() && !self.view_persisting
    }

    /// The last [`Action::PersistView`] is durable: resume.
    pub fn view_persisted(&mut self, now: u64) {
        self.view_persisting = false;
        self.unpark(now);
    }

    // -----------------------------------------------------------------
    // Participants checking in

    /// A participant checked in. Verifies its evidence against this
    /// coordinator's data first (fencing: a commit index beyond the log, or
    /// undecided transactions from an incarnation this data has no record
    /// of), then grants membership and a lease. `Err` is the answer.
    #[allow(clippy::too_many_arguments)]
    pub fn on_sync(
        &mut self,
        id: u64,
        replica: u64,
        follows: Option<Incarnation>,
        seen_index: u64,
        undecided: u64,
        applied: u64,
        in_doubt: usize,
        now: u64,
    ) -> Result<Grant, Error> {
        match self.membership.roster().state(id) {
            Some(RosterState::Removed) => {
                return Err(Error::Identity(format!(
                    "participant {id} was removed from this cluster (`treaty member remove {id}`) and cannot rejoin: \
                     its data is no longer kept up to date. To use this machine again, give it an empty data dir \
                     and a new id, and admit it with `treaty member add ADDR`"
                )))
            }
            None => {
                // Not counted towards the start's check-ins, but evidence of
                // commits beyond this log still fences it.
                self.verify(id, follows, seen_index, undecided, false, now)?;
                return Err(Error::NotMember(format!(
                    "participant {id} is not in this cluster: admit it with `treaty member add ADDR` (ADDR: the \
                     address the coordinator reaches it at); it keeps waiting until then"
                )));
            }
            Some(_) => {}
        }
        self.verify(id, follows, seen_index, undecided, true, now)?;
        self.membership.on_sync(id, replica, applied, in_doubt, now).map_err(Error::Identity)
    }

    #[allow(clippy::too_many_arguments)]
    fn verify(
        &mut self,
        id: u64,
        follows: Option<Incarnation>,
        seen_index: u64,
        undecided: u64,
        counts: bool,
        now: u64,
    ) -> Result<(), Error> {
        if let Some(why) = &self.fence.fenced {
            return Err(Error::Fenced(why.clone()));
        }
        let last = self.durable;
        let unknown =
            follows.filter(|inc| *inc != self.incarnation && self.history.get(&inc.generation) != Some(&inc.nonce));
        let evidence = match unknown {
            _ if seen_index > last => Some(format!(
                "participant {id} has seen commit index {seen_index}, but this coordinator's log ends at index {last}"
            )),
            // Once a quorum verified the log, every commit beyond it would
            // have shown in one of their check-ins (each was prepared on at
            // least `min_replicas` participants): what a late participant
            // holds from an unknown incarnation was never committed.
            Some(inc) if undecided > 0 && self.fence.verified.len() < self.config.verify_quorum => Some(format!(
                "participant {id} holds {undecided} prepared transaction(s) from coordinator {inc}, of which this \
                 coordinator's data dir has no record (it is {}): that incarnation may have committed them",
                self.incarnation
            )),
            _ => None,
        };
        if let Some(evidence) = evidence {
            let why = format!(
                "{evidence}: this coordinator's data dir is older than the cluster (restored from an old copy, or \
                 damaged), and deciding anything could contradict commits already made. It refuses every write \
                 until it is replaced. Way out: stop it and restore the newest copy of its data dir (README: \
                 Operations, Backup and restore); the participants keep every commit they applied"
            );
            self.fence.fenced = Some(why.clone());
            let parked: Vec<TxnId> = self.parked.drain(..).collect();
            for t in parked {
                self.finish(t, Err(Error::Fenced(why.clone())), now);
            }
            return Err(Error::Fenced(why));
        }
        if !counts {
            return Ok(());
        }
        let before = self.fence.verified.len();
        self.fence.verified.insert(id);
        if before < self.config.verify_quorum && self.fence.verified.len() >= self.config.verify_quorum {
            self.unpark(now);
        }
        Ok(())
    }

    /// Whether this check-in just fenced the coordinator (for logging).
    pub fn is_fenced(&self) -> bool {
        self.fence.fenced.is_some()
    }

    /// Participants verified since start.
    pub fn verified(&self) -> &BTreeSet<u64> {
        &self.fence.verified
    }

    /// The coordinator's ping to participant `id` was answered by `replica`
    /// (`None`: it failed).
    pub fn on_ping(&mut self, id: u64, replica: Option<u64>, now: u64) {
        self.membership.on_ping(id, replica, now);
    }
}

fn merge_errors(errors: Vec<Error>) -> Error {
    let mut iter = errors.into_iter();
    let first = iter.next().unwrap_or_else(|| Error::Unavailable("no participants answered".into()));
    let rest: Vec<String> = iter.map(|e| e.to_string()).collect();
    if rest.is_empty() {
        return first;
    }
    let more = format!(" (also: {})", rest.join("; "));
    match first {
        Error::Unavailable(m) => Error::Unavailable(m + &more),
        Error::Conflict(m) => Error::Conflict(m + &more),
        Error::NotReady(m) => Error::NotReady(m + &more),
        other => other,
    }
}

#[cfg(test)]
mod tests;

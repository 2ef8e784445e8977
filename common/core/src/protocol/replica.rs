//! One participant's 2PC state.
//!
//! Invariants (checked by the tests below and by `tests/`):
//! * A key is locked by at most one prepared transaction. Locks are taken when
//!   a PREPARE passes its conditions and released only when the transaction is
//!   applied or aborted.
//! * Conditions are judged against *applied* state only. A PREPARE that
//!   touches a locked key is [`PrepareStep::Blocked`] until the holder is
//!   applied or aborted. Since every committed transaction was prepared on
//!   every replica of the keys it touches before it was decided, all
//!   replicas of a key judge a condition on it against the same state and
//!   vote the same way. (With partitioned keys the I/O layer hands this core
//!   only the transaction's part on its own keys, and commits that touch
//!   none of them arrive as commits without writes: the commit-index order
//!   stays gapless on every replica.)
//! * The I/O layer votes YES only after the [`PreparedRecord`] returned by
//!   [`PrepareStep::Persist`] is durable ("persist before you speak"), and
//!   tells [`ReplicaCore::logged`] once it is written (or will never be).
//!   Until then the record is *being logged*: an ABORT of it waits (its keys
//!   stay locked), so no later record can lock a key that a dead record
//!   written after it would claim too; and a second PREPARE of the same
//!   transaction waits ([`PrepareStep::Blocked`] on itself), so its YES
//!   cannot leave before the record it relies on is written.
//! * Commits are applied strictly in commit-index order, with no gaps:
//!   [`ReplicaCore::next_apply`] hands out the contiguous run after the last
//!   applied index, and [`ReplicaCore::applied`] is told when the I/O layer has
//!   applied it (atomically with the applied index).
//! * A decided transaction is never aborted, and a transaction is decided at
//!   one index only. Messages that would break this (an ABORT of a decided
//!   transaction, a second index for one transaction, two transactions at
//!   one index) come from outside and are refused with an error, changing
//!   nothing; only this replica's own state being inconsistent panics.
//!
//! Time is an input: [`ReplicaCore::tick`] ages prepared transactions so the
//! I/O layer can ask the coordinator about those in doubt for too long.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::types::{escape, Key, Txn, TxnId, Versioned, Write};

/// A transaction's writes, shared between its WAL record, the lock table and
/// the apply (serialized as a plain list).
pub type Writes = Arc<Vec<Write>>;

/// The WAL record of a prepared transaction: what to apply if it commits.
/// Durable before the YES vote leaves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparedRecord {
    pub txn_id: TxnId,
    /// The coordinator's attempt that prepared it (a retry of the same
    /// transaction id is a new attempt); aborts name the attempt they end.
    pub attempt: u64,
    /// Shared with the replica's lock table and the apply that follows (one
    /// copy per prepare; the bytes on disk are those of a plain list).
    pub writes: Writes,
}

/// What the I/O layer must do with a PREPARE.
#[derive(Debug, PartialEq, Eq)]
pub enum PrepareStep {
    /// A key is locked by this other prepared transaction: wait until it is
    /// applied or aborted, then call [`ReplicaCore::prepare`] again. Blocked
    /// on the transaction itself: its record is still being written (see
    /// [`ReplicaCore::logged`]); wait for that.
    Blocked(TxnId),
    /// A duplicate PREPARE: vote YES once the earlier record is durable.
    AlreadyPrepared,
    /// A condition does not hold (or the attempt was already aborted): vote
    /// NO with this reason. Nothing was locked or recorded.
    VoteNo(String),
    /// The keys are now locked: make this record durable, then vote YES.
    Persist(PreparedRecord),
}

/// What happened to a COMMIT.
#[derive(Debug, PartialEq, Eq)]
pub enum CommitStep {
    /// At or below what is applied or being applied: nothing to do.
    AlreadyApplied,
    /// Already applied, but its PREPARED record outlived the apply (a crash
    /// between the apply's data write and the record's removal). The lock
    /// is released here; the I/O layer drops the record.
    Retired,
    /// Queued; [`ReplicaCore::next_apply`] will hand it out in order.
    Queued,
    /// A commit of a transaction this replica never prepared, without its
    /// writes: fetch the entry from the coordinator's log.
    Unknown,
}

/// One committed transaction to apply, in index order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApplyEntry {
    pub index: u64,
    pub txn_id: TxnId,
    pub writes: Writes,
}

#[derive(Debug)]
struct Prepared {
    attempt: u64,
    writes: Writes,
    keys: Vec<Key>,
    /// The commit index, once the COMMIT has arrived.
    decided: Option<u64>,
    /// Ticks since prepared.
    age: u64,
    /// Loaded from the WAL at a restart whose applied index was this: only
    /// such a record can have outlived its own apply (see [`CommitStep::Retired`]).
    recovered_at: Option<u64>,
    /// Handed out by [`PrepareStep::Persist`], not yet reported written by
    /// [`ReplicaCore::logged`].
    logging: bool,
    /// An ABORT of this attempt arrived while `logging`; `logged` does it.
    abort_pending: bool,
}

/// How many aborted attempts to remember, so that a PREPARE overtaken by its
/// own ABORT votes NO instead of locking keys forever.
const ABORTED_MEMORY: usize = 4096;

#[derive(Debug, Default)]
pub struct ReplicaCore {
    applied_index: u64,
    /// Highest index handed to the I/O layer by `next_apply`.
    handed_out: u64,
    locks: BTreeMap<Key, TxnId>,
    prepared: BTreeMap<TxnId, Prepared>,
    /// Decided commits not yet handed out, by index. `Some(writes)` for log
    /// entries of transactions never prepared here.
    queue: BTreeMap<u64, (TxnId, Option<Writes>)>,
    /// Handed out, not yet applied: index -> txn.
    applying: BTreeMap<u64, TxnId>,
    aborted: BTreeSet<(TxnId, u64)>,
    aborted_order: VecDeque<(TxnId, u64)>,
}

impl ReplicaCore {
    /// Rebuilds the state after a restart: the applied index from the data
    /// store, and the prepared records from the WAL (which lock their keys
    /// again until their outcome is known).
    pub fn recover(applied_index: u64, records: Vec<PreparedRecord>) -> Self {
        let mut core = ReplicaCore { applied_index, handed_out: applied_index, ..Default::default() };
        for rec in records {
            core.lock_and_insert(rec.txn_id, rec.attempt, rec.writes);
            core.prepared.get_mut(&rec.txn_id).expect("just inserted").recovered_at = Some(applied_index);
        }
        core
    }

    fn lock_and_insert(&mut self, txn_id: TxnId, attempt: u64, writes: Writes) {
        let mut keys: Vec<Key> = writes.iter().map(|w| w.key().to_vec()).collect();
        keys.sort();
        keys.dedup();
        for k in &keys {
            let prev = self.locks.insert(k.clone(), txn_id);
            assert!(prev.is_none() || prev == Some(txn_id), "key locked twice: {prev:?} and {txn_id:?}");
        }
        self.prepared.insert(
            txn_id,
            Prepared {
                attempt,
                writes,
                keys,
                decided: None,
                age: 0,
                recovered_at: None,
                logging: false,
                abort_pending: false,
            },
        );
    }

    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    /// Handles a PREPARE. `read` returns the applied entry of a key.
    pub fn prepare(
        &mut self,
        txn: &Txn,
        attempt: u64,
        mut read: impl FnMut(&[u8]) -> Result<Option<Versioned>, Error>,
    ) -> Result<PrepareStep, Error> {
        if let Some(p) = self.prepared.get_mut(&txn.id) {
            if p.logging {
                // Its record is not written yet: a YES now could leave first.
                return Ok(PrepareStep::Blocked(txn.id));
            }
            // A retry of the same transaction by a newer attempt adopts the
            // existing record; aborts for the older attempt no longer apply.
            p.attempt = attempt;
            return Ok(PrepareStep::AlreadyPrepared);
        }
        if self.aborted.contains(&(txn.id, attempt)) {
            return Ok(PrepareStep::VoteNo("transaction attempt was already aborted".into()));
        }
        // Only writes lock: a condition-only key is read, and must not be
        // changed under us, so it blocks on a holder too.
        for key in txn.keys() {
            if let Some(holder) = self.locks.get(&key) {
                if *holder != txn.id {
                    return Ok(PrepareStep::Blocked(*holder));
                }
            }
        }
        for c in &txn.conditions {
            let current = read(c.key())?;
            if !c.holds(current.as_ref()) {
                let found = match &current {
                    None => "missing".to_string(),
                    Some(v) => format!("value {} at version {}", escape(&v.value), v.version),
                };
                return Ok(PrepareStep::VoteNo(format!("{c} (found {found})")));
            }
        }
        let writes = Arc::new(txn.writes.clone());
        self.lock_and_insert(txn.id, attempt, writes.clone());
        self.prepared.get_mut(&txn.id).expect("just inserted").logging = true;
        Ok(PrepareStep::Persist(PreparedRecord { txn_id: txn.id, attempt, writes }))
    }

    /// The records of these transactions (handed out by
    /// [`PrepareStep::Persist`]) are written to the WAL, or never will be
    /// (the PREPARE was dropped). Returns those aborted meanwhile: they are
    /// aborted now, and their records, if written, must be dropped.
    pub fn logged(&mut self, txns: &[TxnId]) -> Vec<TxnId> {
        let mut ended = Vec::new();
        for t in txns {
            let Some(p) = self.prepared.get_mut(t).filter(|p| p.logging) else { continue };
            p.logging = false;
            if std::mem::take(&mut p.abort_pending) {
                let p = self.prepared.remove(t).expect("checked above");
                self.unlock(*t, &p.keys);
                ended.push(*t);
            }
        }
        ended
    }

    /// Handles a COMMIT (`writes` is `None`) or a log entry fetched during
    /// catch-up (`writes` is `Some`). A COMMIT that contradicts one already
    /// received is refused and changes nothing.
    pub fn commit(&mut self, txn_id: TxnId, index: u64, writes: Option<Writes>) -> Result<CommitStep, Error> {
        if index == 0 {
            return Err(Error::Invalid(format!("COMMIT of {txn_id} at index 0: commit indexes start at 1")));
        }
        if index <= self.handed_out {
            // A record recovered at a restart, undecided, whose commit index
            // was applied before that restart: the apply was its own and the
            // record a leftover of a crash in mid-apply. (A record prepared
            // since the restart is never retired by an old index.)
            let leftover = |p: &Prepared| p.decided.is_none() && p.recovered_at.is_some_and(|a| index <= a);
            if self.prepared.get(&txn_id).is_some_and(leftover) {
                let p = self.prepared.remove(&txn_id).expect("checked above");
                self.unlock(txn_id, &p.keys);
                return Ok(CommitStep::Retired);
            }
            return Ok(CommitStep::AlreadyApplied);
        }
        if let Some((queued, _)) = self.queue.get(&index) {
            if *queued != txn_id {
                return Err(Error::Invalid(format!(
                    "COMMIT of {txn_id} at index {index}, but {queued} was already committed at that index: refused"
                )));
            }
            return Ok(CommitStep::Queued);
        }
        if let Some(p) = self.prepared.get(&txn_id) {
            // Committed before: through its record, or (a hostile sequence)
            // with its writes at another index, queued or being applied, whose
            // apply will end this record.
            let elsewhere = || {
                let queued = self.queue.iter().find(|(_, (t, _))| *t == txn_id).map(|(i, _)| *i);
                queued.or_else(|| self.applying.iter().find(|(_, t)| **t == txn_id).map(|(i, _)| *i))
            };
            if let Some(prev) = p.decided.or_else(elsewhere) {
                return Err(Error::Invalid(format!(
                    "COMMIT of {txn_id} at index {index}, but it was already committed at index {prev}: refused"
                )));
            }
            let p = self.prepared.get_mut(&txn_id).expect("checked above");
            p.decided = Some(index);
            self.queue.insert(index, (txn_id, None));
            return Ok(CommitStep::Queued);
        }
        Ok(match writes {
            Some(w) => {
                self.queue.insert(index, (txn_id, Some(w)));
                CommitStep::Queued
            }
            None => CommitStep::Unknown,
        })
    }

    /// The next contiguous run of commits to apply, in index order. The I/O
    /// layer applies them atomically with the applied index and then calls
    /// [`ReplicaCore::applied`].
    pub fn next_apply(&mut self) -> Vec<ApplyEntry> {
        let mut out = Vec::new();
        while let Some((txn_id, writes)) = self.queue.remove(&(self.handed_out + 1)) {
            let index = self.handed_out + 1;
            let writes = match writes {
                Some(w) => w,
                None => self.prepared.get(&txn_id).expect("queued commit lost its prepare").writes.clone(),
            };
            self.applying.insert(index, txn_id);
            out.push(ApplyEntry { index, txn_id, writes });
            self.handed_out = index;
        }
        out
    }

    /// Everything through `index` is applied: release the locks of those
    /// transactions.
    pub fn applied(&mut self, index: u64) {
        assert!(index <= self.handed_out, "applied {index} beyond handed out {}", self.handed_out);
        while let Some(entry) = self.applying.first_entry() {
            if *entry.key() > index {
                break;
            }
            let txn_id = entry.remove();
            if let Some(p) = self.prepared.remove(&txn_id) {
                self.unlock(txn_id, &p.keys);
            }
        }
        self.applied_index = self.applied_index.max(index);
    }

    fn unlock(&mut self, txn_id: TxnId, keys: &[Key]) {
        for k in keys {
            if self.locks.get(k) == Some(&txn_id) {
                self.locks.remove(k);
            }
        }
    }

    /// Handles an ABORT of one attempt, or an abort outcome learned from the
    /// coordinator for the attempt we asked about. Returns true if a prepared
    /// record must be deleted from the WAL. An abort of a transaction already
    /// committed here is refused and changes nothing.
    pub fn abort(&mut self, txn_id: TxnId, attempt: u64) -> Result<bool, Error> {
        let Some(p) = self.prepared.get(&txn_id).filter(|p| p.attempt == attempt) else {
            self.remember_abort(txn_id, attempt);
            return Ok(false);
        };
        if let Some(index) = p.decided {
            return Err(Error::Invalid(format!(
                "ABORT of {txn_id}, which was committed at index {index}: refused (a decision is final)"
            )));
        }
        if p.logging {
            // Done by `logged`, after the record is written.
            self.prepared.get_mut(&txn_id).expect("checked above").abort_pending = true;
            self.remember_abort(txn_id, attempt);
            return Ok(false);
        }
        let p = self.prepared.remove(&txn_id).expect("checked above");
        self.unlock(txn_id, &p.keys);
        self.remember_abort(txn_id, attempt);
        Ok(true)
    }

    fn remember_abort(&mut self, txn_id: TxnId, attempt: u64) {
        if self.aborted.insert((txn_id, attempt)) {
            self.aborted_order.push_back((txn_id, attempt));
            if self.aborted_order.len() > ABORTED_MEMORY {
                let old = self.aborted_order.pop_front().expect("non-empty");
                self.aborted.remove(&old);
            }
        }
    }

    /// The prepared transaction holding `key`, if any.
    pub fn holder(&self, key: &[u8]) -> Option<TxnId> {
        self.locks.get(key).copied()
    }

    /// The commit index of a prepared transaction already decided here but
    /// not yet applied (`None`: undecided, or not prepared here).
    pub fn committed_at(&self, txn: TxnId) -> Option<u64> {
        self.prepared.get(&txn).and_then(|p| p.decided)
    }

    /// A prepared transaction holding some key in `[start, end)`, if any
    /// (what a linearizable range read waits for, like a `get` for its key).
    pub fn holder_in(&self, start: &[u8], end: Option<&[u8]>) -> Option<TxnId> {
        use std::ops::Bound::{Excluded, Included, Unbounded};
        if end.is_some_and(|e| e <= start) {
            return None;
        }
        let upper = end.map_or(Unbounded, Excluded);
        self.locks.range::<[u8], _>((Included(start), upper)).next().map(|(_, t)| *t)
    }

    /// Advances time by one tick.
    pub fn tick(&mut self) {
        for p in self.prepared.values_mut() {
            p.age += 1;
        }
    }

    /// Prepared, undecided transactions at least `min_age` ticks old, with
    /// the attempt that prepared them.
    pub fn in_doubt(&self, min_age: u64) -> Vec<(TxnId, u64)> {
        self.prepared
            .iter()
            .filter(|(_, p)| p.decided.is_none() && p.age >= min_age)
            .map(|(t, p)| (*t, p.attempt))
            .collect()
    }

    /// Every undecided prepared transaction with its age in ticks.
    pub fn in_doubt_ages(&self) -> Vec<(TxnId, u64)> {
        self.prepared.iter().filter(|(_, p)| p.decided.is_none()).map(|(t, p)| (*t, p.age)).collect()
    }

    /// Number of prepared transactions not yet applied or aborted.
    pub fn prepared_count(&self) -> usize {
        self.prepared.len()
    }

    /// Commits received but not yet applied (waiting for an earlier index).
    pub fn queued(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests;

//! The coordinator's key lock table.
//!
//! Invariants:
//! * Each key has a FIFO queue of transaction ids; the front holds the key.
//! * A transaction acquires its (sorted, unique) keys one at a time in key
//!   order and only queues on key `k[i+1]` once it holds `k[i]`. Since every
//!   transaction climbs the same global order, a waits-for cycle is impossible.
//! * A transaction is *granted* once it holds all its keys.

use std::collections::{BTreeMap, VecDeque};

use crate::types::{Key, TxnId};

#[derive(Debug)]
struct Request {
    keys: Vec<Key>,
    /// Keys `keys[..held]` are held; if `held < keys.len()` the transaction
    /// is queued on `keys[held]`.
    held: usize,
}

#[derive(Debug, Default)]
pub struct LockTable {
    queues: BTreeMap<Key, VecDeque<TxnId>>,
    requests: BTreeMap<TxnId, Request>,
}

impl LockTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests `keys` (must be sorted and unique) for `txn`. Returns true if
    /// all are granted at once; otherwise the transaction waits and shows up
    /// in the return value of a later [`LockTable::release`].
    pub fn acquire(&mut self, txn: TxnId, keys: Vec<Key>) -> bool {
        debug_assert!(keys.windows(2).all(|w| w[0] < w[1]), "keys must be sorted and unique");
        assert!(!self.requests.contains_key(&txn), "{txn:?} requested locks twice");
        self.requests.insert(txn, Request { keys, held: 0 });
        self.advance(txn)
    }

    /// Climbs as far as possible; true when everything is held.
    fn advance(&mut self, txn: TxnId) -> bool {
        let req = self.requests.get_mut(&txn).expect("advance of unknown txn");
        while req.held < req.keys.len() {
            let queue = self.queues.entry(req.keys[req.held].clone()).or_default();
            if !queue.contains(&txn) {
                queue.push_back(txn);
            }
            if queue.front() != Some(&txn) {
                return false;
            }
            req.held += 1;
        }
        true
    }

    /// Releases everything `txn` holds or waits for (also how a waiter that
    /// gave up cancels). Returns the transactions that became fully granted.
    pub fn release(&mut self, txn: TxnId) -> Vec<TxnId> {
        let Some(req) = self.requests.remove(&txn) else {
            return vec![];
        };
        let mut next_fronts = Vec::new();
        let touched = req.held + usize::from(req.held < req.keys.len());
        for key in &req.keys[..touched] {
            let queue = self.queues.get_mut(key).expect("queue of a held key");
            let was_front = queue.front() == Some(&txn);
            queue.retain(|t| *t != txn);
            if was_front {
                if let Some(&front) = queue.front() {
                    next_fronts.push(front);
                }
            }
            if queue.is_empty() {
                self.queues.remove(key);
            }
        }
        let mut granted = Vec::new();
        for t in next_fronts {
            if self.requests.get(&t).is_some_and(|r| r.held < r.keys.len()) && self.advance(t) {
                granted.push(t);
            }
        }
        granted.sort();
        granted.dedup();
        granted
    }

    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn k(s: &str) -> Key {
        s.as_bytes().to_vec()
    }

    #[test]
    fn conflicting_transactions_queue_in_fifo_order() {
        let mut t = LockTable::new();
        assert!(t.acquire(TxnId(1), vec![k("a"), k("b")]));
        assert!(!t.acquire(TxnId(2), vec![k("b")]));
        assert!(!t.acquire(TxnId(3), vec![k("b"), k("c")]));
        assert!(t.acquire(TxnId(4), vec![k("c")]), "c is free: 3 has not reached it");
        assert_eq!(t.release(TxnId(1)), vec![TxnId(2)]);
        assert_eq!(t.release(TxnId(2)), vec![], "3 now holds b but waits for c");
        assert_eq!(t.release(TxnId(4)), vec![TxnId(3)]);
        assert_eq!(t.release(TxnId(3)), vec![]);
        assert!(t.is_empty() && t.queues.is_empty());
    }

    #[test]
    fn a_cancelled_waiter_leaves_no_trace() {
        let mut t = LockTable::new();
        assert!(t.acquire(TxnId(1), vec![k("a")]));
        assert!(!t.acquire(TxnId(2), vec![k("a"), k("b")]));
        assert!(!t.acquire(TxnId(3), vec![k("a")]));
        assert_eq!(t.release(TxnId(2)), vec![]);
        assert_eq!(t.release(TxnId(1)), vec![TxnId(3)]);
        assert!(t.acquire(TxnId(5), vec![k("b")]), "b was never held by the cancelled txn");
    }

    proptest! {
        /// Random acquire/release schedules: no two granted transactions
        /// share a key, and releasing everything always drains the table
        /// (no deadlock: every waiter is eventually granted).
        #[test]
        fn granted_sets_are_disjoint_and_everyone_finishes(
            txns in proptest::collection::vec(proptest::collection::btree_set(0u8..6, 1..4), 1..12),
            order in proptest::collection::vec(any::<prop::sample::Index>(), 0..40),
        ) {
            let mut t = LockTable::new();
            let mut granted: Vec<TxnId> = Vec::new();
            let mut keys_of = BTreeMap::new();
            for (i, set) in txns.iter().enumerate() {
                let keys: Vec<Key> = set.iter().map(|b| vec![*b]).collect();
                keys_of.insert(TxnId(i as u128), keys.clone());
                if t.acquire(TxnId(i as u128), keys) { granted.push(TxnId(i as u128)); }
            }
            let check = |granted: &Vec<TxnId>| {
                let mut seen = std::collections::BTreeSet::new();
                for g in granted { for key in &keys_of[g] { assert!(seen.insert(key.clone()), "key {key:?} granted twice"); } }
            };
            check(&granted);
            let mut done = 0;
            for idx in order {
                if granted.is_empty() { break; }
                let victim = granted.remove(idx.index(granted.len()));
                granted.extend(t.release(victim));
                done += 1;
                check(&granted);
            }
            while let Some(victim) = granted.pop() {
                granted.extend(t.release(victim));
                done += 1;
                check(&granted);
            }
            prop_assert_eq!(done, txns.len());
            prop_assert!(t.is_empty());
        }
    }
}

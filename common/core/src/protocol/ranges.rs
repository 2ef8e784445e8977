//! Range reads over partitioned keys: which participants serve which
//! partitions, how a part proves it shows one moment, and how parts merge.
//!
//! With full copies a range is read from one replica. With partitions, keys
//! of a range live on many participants, and a page is put together from
//! the *parts* of a *cover*: a list of participants that together hold
//! every partition; each partition is served by the first participant of the
//! cover that holds it, so every key comes from exactly one part.
//!
//! ## One moment for the whole page
//! Every replica applies the same global sequence of commit indexes (commits
//! to other partitions arrive as skips), so "the state at index C" means the
//! same on every replica. A part is asked for its keys *as of* C: it waits
//! until it has applied C, reads its page at its applied index `i >= C`, and
//! checks in its [`RecentWrites`] that no commit in `(C, i]` wrote a key the
//! page covers. If none did, the page equals its state at C; otherwise it
//! answers "changed" with `i`, and the whole page is asked again as of the
//! highest index seen. Pages that all hold at one C merge into the state at
//! C, so a transaction across partitions is seen whole or not at all.
//!
//! Linearizable parts also wait out their lease and prepared locks first,
//! so each part includes every commit acknowledged before the read began;
//! one that committed after C would have been a write in `(C, i]` and
//! failed the check. So the merged page includes them too.
//!
//! Invariants (tested below): a cover holds every partition; every key is
//! served by exactly one member; a merged page has no key twice, is sorted,
//! and never extends past a part that was cut short.

use std::collections::VecDeque;

use crate::protocol::Placement;
use crate::types::{Key, RangePage, RANGE_PAGE_BYTES};

/// A cover of every partition from `candidates`, taken in order (a
/// candidate is added only if it holds a partition not covered yet).
/// `Err(partition)`: no candidate holds that partition.
pub fn cover(placement: &Placement, candidates: &[u64]) -> Result<Vec<u64>, u32> {
    let mut covered = vec![false; placement.partitions() as usize];
    let mut chosen = Vec::new();
    for &c in candidates {
        let mut adds = false;
        for p in placement.partitions_of(c) {
            if !covered[p as usize] {
                covered[p as usize] = true;
                adds = true;
            }
        }
        if adds {
            chosen.push(c);
        }
    }
    match covered.iter().position(|c| !c) {
        Some(p) => Err(p as u32),
        None => Ok(chosen),
    }
}

/// Whether `me` serves `key` for a page read through `cover`: it is the
/// first member of the cover holding the key.
pub fn serves(placement: &Placement, cover: &[u64], me: u64, key: &[u8]) -> bool {
    let replicas = placement.replicas_of(key);
    cover.iter().find(|c| replicas.contains(c)) == Some(&me)
}

/// Merges parts' pages (each sorted, each possibly cut short at its `next`)
/// into one page of at most `limit` entries and about [`RANGE_PAGE_BYTES`],
/// as of `index`. The page ends where the shortest part ended: beyond it,
/// that part's keys are unknown.
pub fn merge(parts: Vec<RangePage>, limit: u32, index: u64) -> RangePage {
    let bound: Option<Key> = parts.iter().filter_map(|p| p.next.clone()).min();
    let mut entries: Vec<_> =
        parts.into_iter().flat_map(|p| p.entries).filter(|e| bound.as_ref().is_none_or(|b| e.key < *b)).collect();
    entries.sort_by(|a, b| a.key.cmp(&b.key));
    entries.dedup_by(|a, b| a.key == b.key);
    let mut bytes = 0;
    let mut keep = 0;
    for e in &entries {
        let size = e.key.len() + e.value.as_ref().map_or(8, Vec::len);
        if keep >= limit as usize || (keep > 0 && bytes + size > RANGE_PAGE_BYTES) {
            break;
        }
        bytes += size;
        keep += 1;
    }
    let next = if keep < entries.len() { Some(entries[keep].key.clone()) } else { bound };
    entries.truncate(keep);
    RangePage { entries, next, index }
}

/// The keys written by the most recently applied commits of one replica
/// (at most `capacity` keys), so that a range part can tell whether its
/// keys changed between two indexes. Older writes are forgotten: a question
/// reaching back before them is answered "changed" (conservative).
#[derive(Debug)]
pub struct RecentWrites {
    keys: VecDeque<(u64, Key)>,
    capacity: usize,
    /// Writes at or below this index may have been forgotten.
    floor: u64,
}

impl RecentWrites {
    pub fn new(capacity: usize, applied: u64) -> Self {
        RecentWrites { keys: VecDeque::new(), capacity: capacity.max(1), floor: applied }
    }

    /// Records the keys commit `index` writes here; call before the commit
    /// is visible to readers, in index order.
    pub fn record<'a>(&mut self, index: u64, keys: impl IntoIterator<Item = &'a [u8]>) {
        for key in keys {
            if self.keys.len() == self.capacity {
                let (forgotten, _) = self.keys.pop_front().expect("full");
                self.floor = self.floor.max(forgotten);
            }
            self.keys.push_back((index, key.to_vec()));
        }
    }

    /// Forgets everything up to `index` (commits applied without being
    /// recorded, while keys were not partitioned or not known to be).
    pub fn forget_through(&mut self, index: u64) {
        self.floor = self.floor.max(index);
        self.keys.clear();
    }

    /// Whether no commit in `(from, to]` wrote a key `covered` accepts;
    /// `false` also when writes after `from` may have been forgotten.
    pub fn unchanged(&self, from: u64, to: u64, covered: impl Fn(&[u8]) -> bool) -> bool {
        if from < self.floor {
            return false;
        }
        !self.keys.iter().rev().take_while(|(i, _)| *i > from).any(|(i, k)| *i <= to && covered(k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::RangeEntry;
    use proptest::prelude::*;

    fn page(keys: &[&str], next: Option<&str>) -> RangePage {
        RangePage {
            entries: keys
                .iter()
                .map(|k| RangeEntry { key: k.as_bytes().to_vec(), version: 1, value: Some(b"v".to_vec()) })
                .collect(),
            next: next.map(|n| n.as_bytes().to_vec()),
            index: 0,
        }
    }

    fn keys(p: &RangePage) -> Vec<&str> {
        p.entries.iter().map(|e| std::str::from_utf8(&e.key).unwrap()).collect()
    }

    #[test]
    fn a_merged_page_stops_where_the_shortest_part_stopped() {
        let merged = merge(vec![page(&["a", "c", "e"], Some("f")), page(&["b", "d", "g"], None)], 100, 7);
        assert_eq!(keys(&merged), ["a", "b", "c", "d", "e"]);
        assert_eq!(merged.next.as_deref(), Some(b"f".as_slice()));
        assert_eq!(merged.index, 7);
        // Cut by the limit: the next page starts at the first key left out.
        let merged = merge(vec![page(&["a", "c"], None), page(&["b", "d"], None)], 3, 7);
        assert_eq!((keys(&merged), merged.next.as_deref()), (vec!["a", "b", "c"], Some(b"d".as_slice())));
        // Everything fits and no part was cut: the range is done.
        let merged = merge(vec![page(&["a"], None), page(&[], None)], 3, 7);
        assert_eq!((keys(&merged), merged.next.clone()), (vec!["a"], None));
    }

    #[test]
    fn recent_writes_answer_changed_when_they_cannot_tell() {
        let mut recent = RecentWrites::new(3, 10);
        recent.record(11, [b"a".as_slice()]);
        recent.record(12, [b"b".as_slice(), b"c".as_slice()]);
        assert!(recent.unchanged(10, 12, |k| k == b"z"));
        assert!(!recent.unchanged(10, 12, |k| k == b"b"));
        assert!(recent.unchanged(11, 11, |k| k == b"b"), "index 12 is after the page was read");
        assert!(recent.unchanged(12, 20, |_| true));
        assert!(!recent.unchanged(9, 12, |_| false), "writes at or before 10 are unknown");
        recent.record(13, [b"d".as_slice()]);
        // "a" at 11 was forgotten: from 10 nothing can be told any more.
        assert!(!recent.unchanged(10, 13, |_| false));
        assert!(recent.unchanged(11, 13, |k| k == b"a"));
    }

    proptest! {
        #[test]
        fn a_cover_holds_every_partition_and_serves_each_key_once(
            n in 2u64..8,
            r in 1usize..8,
            start in 0u64..8,
            key in proptest::collection::vec(any::<u8>(), 0..8),
        ) {
            let r = r.min(n as usize);
            let placement = Placement::new((1..=n).collect(), r, 64);
            let candidates: Vec<u64> = (0..n).map(|i| (start + i) % n + 1).collect();
            let chosen = cover(&placement, &candidates).expect("all participants cover everything");
            // Any n - r + 1 participants hold every partition.
            prop_assert!(chosen.len() <= n as usize - r + 1);
            prop_assert_eq!(chosen[0], candidates[0]);
            for p in 0..64 {
                prop_assert!(placement.replicas(p).iter().any(|c| chosen.contains(c)));
            }
            let serving: Vec<u64> = chosen.iter().copied().filter(|c| serves(&placement, &chosen, *c, &key)).collect();
            prop_assert_eq!(serving.len(), 1);
            prop_assert!(placement.holds(serving[0], &key));
        }

        #[test]
        fn merged_pages_are_sorted_unique_and_within_the_parts(
            parts in proptest::collection::vec(
                (proptest::collection::btree_set(0u8..50, 0..10), proptest::option::of(0u8..60)), 1..4),
            limit in 1u32..12,
        ) {
            let pages: Vec<RangePage> = parts
                .iter()
                .map(|(set, next)| {
                    let keys: Vec<Vec<u8>> = set.iter().filter(|k| next.is_none_or(|n| **k < n)).map(|k| vec![*k]).collect();
                    RangePage {
                        entries: keys.into_iter().map(|key| RangeEntry { key, version: 1, value: None }).collect(),
                        next: next.map(|n| vec![n]),
                        index: 0,
                    }
                })
                .collect();
            let bound = pages.iter().filter_map(|p| p.next.clone()).min();
            let all: std::collections::BTreeSet<Vec<u8>> = pages
                .iter()
                .flat_map(|p| p.entries.iter().map(|e| e.key.clone()))
                .filter(|k| bound.as_ref().is_none_or(|b| k < b))
                .collect();
            let merged = merge(pages, limit, 3);
            let got: Vec<Vec<u8>> = merged.entries.iter().map(|e| e.key.clone()).collect();
            // The first `limit` keys below the bound, in order, once each.
            let want: Vec<Vec<u8>> = all.iter().take(limit as usize).cloned().collect();
            prop_assert_eq!(&got, &want);
            // Whatever was left out starts at or after `next`.
            match &merged.next {
                Some(n) => prop_assert!(all.iter().skip(got.len()).all(|k| k >= n) && got.iter().all(|k| k < n)),
                None => prop_assert_eq!(got.len(), all.len()),
            }
        }
    }
}

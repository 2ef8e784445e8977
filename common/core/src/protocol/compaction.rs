//! How far the coordinator compacts its decision log, and how a replica
//! that fell behind the compacted log is re-seeded from snapshots.
//!
//! The log serves two readers: replicas catching up (`fetch_log`) and
//! retries and outcome lookups (the decisions kept beside it). Compaction
//! removes a prefix of both ([`Retention::cutoff`]). Invariants:
//! * The last entry stays (the log's end is the coordinator's last index,
//!   which fencing compares with what participants have seen).
//! * Nothing above what a member of the view has applied goes: a member
//!   always catches up from the log, and a transaction a member holds in
//!   doubt either committed above its applied index (its entry and
//!   decision are still there) or is no longer held by anything that
//!   counts (committed at or below it, already applied: the presumed
//!   abort answer only drops a leftover record).
//! * The decisions of the newest `keep_commits` commits, and of every commit
//!   younger than `keep_ms`, stay: a client retrying a transaction id
//!   within that window gets its first outcome, never a second run.
//!
//! A replica that is not a member (down, excluded) may fall behind the
//! compacted log. It then installs a *snapshot* ([`snapshot_plan`]): its
//! partitions' keys, copied in chunks from live replicas, each chunk one
//! consistent state of its source at some applied index. The chunks are
//! read at different indexes, so the copy is no single state; replaying
//! the log from the lowest chunk index on brings every key to its newest
//! value (a write replayed over a newer copy is overwritten again when the
//! replay reaches the newer write), and from the highest chunk index on
//! the replica shows one state of the cluster again.

use std::collections::{BTreeMap, VecDeque};

use super::Placement;

/// The coordinator's retention rule (see the module docs).
#[derive(Clone, Debug)]
pub struct Retention {
    keep_commits: u64,
    keep_ms: u64,
    /// `(now, last index)` when the last index changed, oldest first; only
    /// the newest one at least `keep_ms` old is kept of the old ones.
    samples: VecDeque<(u64, u64)>,
}

impl Retention {
    pub fn new(keep_commits: u64, keep_ms: u64) -> Self {
        Retention { keep_commits: keep_commits.max(1), keep_ms, samples: VecDeque::new() }
    }

    /// Notes the durable last index at `now` (ms; called every tick).
    pub fn observe(&mut self, now: u64, last: u64) {
        if self.samples.back().is_none_or(|&(_, l)| l != last) {
            self.samples.push_back((now, last));
        }
        while self.samples.len() > 1 && now.saturating_sub(self.samples[1].0) >= self.keep_ms {
            self.samples.pop_front();
        }
    }

    /// The index the log may be compacted through at `now`, with durable
    /// last index `last` and `floor` the lowest index a member has applied.
    pub fn cutoff(&self, now: u64, last: u64, floor: u64) -> u64 {
        // The last index as of `keep_ms` ago (0 if the record is younger).
        let aged = match self.samples.front() {
            Some(&(t, l)) if now.saturating_sub(t) >= self.keep_ms => l,
            _ => 0,
        };
        last.saturating_sub(self.keep_commits).min(aged).min(floor)
    }
}

/// One group of a snapshot plan: the keys of `partitions` (`None`: every
/// key), read from any one of `sources`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotGroup {
    pub partitions: Option<Vec<u32>>,
    pub sources: Vec<u64>,
}

impl SnapshotGroup {
    /// Whether `key` is this group's.
    pub fn keeps(&self, placement: &Placement, key: &[u8]) -> bool {
        match &self.partitions {
            None => true,
            Some(ps) => ps.binary_search(&placement.partition(key)).is_ok(),
        }
    }
}

/// How participant `me` copies its keys: with full copies, one group read
/// from any other participant; with partitions, one group per set of other
/// replicas, holding the partitions those replicas share with `me`. The
/// plan depends only on the placement, so an install resumed after a crash
/// follows the same one. Partitions `me` holds alone (replication 1) have
/// no source and are left out: nothing can re-seed them.
pub fn snapshot_plan(placement: &Placement, me: u64, participants: &[u64]) -> Vec<SnapshotGroup> {
    if placement.is_full() {
        let sources: Vec<u64> = participants.iter().copied().filter(|&p| p != me).collect();
        return if sources.is_empty() { vec![] } else { vec![SnapshotGroup { partitions: None, sources }] };
    }
    let parts: Vec<(u32, Vec<u64>)> = placement
        .partitions_of(me)
        .into_iter()
        .map(|p| (p, placement.replicas(p).iter().copied().filter(|&r| r != me).collect()))
        .collect();
    copy_groups(&parts, false)
}

/// Groups partitions to copy, each given with the replicas it can be copied
/// from (ascending), so that each group is read from one source in one pass
/// over that source's keys. `fewest: false`: one group per set of sources,
/// which any of them can send. `fewest: true`: as few groups as a greedy
/// cover gives (the source holding most of the partitions left, again and
/// again), each from the sources holding all of its partitions; fewer passes
/// over the sources' keys, but a group may have a single source. Partitions
/// without a source are left out. Deterministic.
pub fn copy_groups(parts: &[(u32, Vec<u64>)], fewest: bool) -> Vec<SnapshotGroup> {
    let mut left: BTreeMap<u32, &Vec<u64>> =
        parts.iter().filter(|(_, s)| !s.is_empty()).map(|(p, s)| (*p, s)).collect();
    let mut groups = Vec::new();
    while let Some((_, first)) = left.first_key_value() {
        let around: Vec<u64> = if fewest {
            let mut count: BTreeMap<u64, usize> = BTreeMap::new();
            for id in left.values().flat_map(|s| s.iter()) {
                *count.entry(*id).or_default() += 1;
            }
            let best = count.iter().max_by_key(|(id, c)| (**c, std::cmp::Reverse(**id))).map(|(id, _)| *id);
            best.into_iter().collect()
        } else {
            first.to_vec()
        };
        let partitions: Vec<u32> = left
            .iter()
            .filter(|(_, s)| if fewest { around.iter().all(|id| s.contains(id)) } else { ***s == around })
            .map(|(p, _)| *p)
            .collect();
        let mut sources = left[&partitions[0]].clone();
        for p in &partitions {
            sources.retain(|id| left[p].contains(id));
        }
        for p in &partitions {
            left.remove(p);
        }
        groups.push(SnapshotGroup { partitions: Some(partitions), sources });
    }
    if !fewest {
        // In the order of their sources (an install resumed after a crash
        // counts groups in this order).
        groups.sort_by(|a, b| a.sources.cmp(&b.sources));
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn the_cutoff_keeps_the_newest_commits_the_young_ones_and_what_members_lack() {
        let mut r = Retention::new(100, 60_000);
        r.observe(0, 1_000);
        // Too young: nothing goes before keep_ms has passed.
        assert_eq!(r.cutoff(30_000, 5_000, 5_000), 0);
        r.observe(30_000, 5_000);
        r.observe(61_000, 9_000);
        // As of 60 s ago the log ended at 1000.
        assert_eq!(r.cutoff(61_000, 9_000, 9_000), 1_000);
        // 95 s: the 30 s sample is old enough.
        r.observe(95_000, 9_050);
        assert_eq!(r.cutoff(95_000, 9_050, 9_050), 5_000);
        // A lagging member holds it back ...
        assert_eq!(r.cutoff(95_000, 9_050, 4_000), 4_000);
        // ... and so does the commit window.
        let mut r = Retention::new(100, 0);
        r.observe(0, 150);
        assert_eq!(r.cutoff(0, 150, 150), 50);
        assert_eq!(r.cutoff(0, 80, 80), 0);
    }

    #[test]
    fn the_last_entry_always_stays() {
        let mut r = Retention::new(0, 0);
        r.observe(5, 10);
        assert_eq!(r.cutoff(5, 10, 10), 9);
    }

    #[test]
    fn a_snapshot_plan_covers_each_held_partition_once_from_its_other_replicas() {
        let all: Vec<u64> = (1..=5).collect();
        let full = Placement::full(all.clone());
        assert_eq!(snapshot_plan(&full, 2, &all), vec![SnapshotGroup { partitions: None, sources: vec![1, 3, 4, 5] }]);
        let placement = Placement::new(all.clone(), 3, 256);
        for me in 1..=5 {
            let plan = snapshot_plan(&placement, me, &all);
            let mut covered = BTreeSet::new();
            for g in &plan {
                assert!(!g.sources.contains(&me));
                for &p in g.partitions.as_ref().unwrap() {
                    assert!(covered.insert(p), "partition {p} twice");
                    let mut want: Vec<u64> = placement.replicas(p).iter().copied().filter(|&r| r != me).collect();
                    want.sort_unstable();
                    let mut have = g.sources.clone();
                    have.sort_unstable();
                    assert_eq!(have, want);
                }
            }
            assert_eq!(covered, placement.partitions_of(me).into_iter().collect::<BTreeSet<_>>());
        }
        // Replication 1: nobody else holds the keys.
        assert!(snapshot_plan(&Placement::new(all.clone(), 1, 16), 1, &all).is_empty());
    }

    #[test]
    fn the_fewest_copy_groups_cover_each_partition_once_from_sources_holding_it() {
        // The first step of adding a sixth participant to five at replication 3.
        let placement = Placement::new((1..=5).collect(), 3, 256);
        let targets: BTreeSet<u64> = (1..=6).collect();
        let moves = placement.plan_moves(&targets, |_| true, |_| true, 32);
        let parts: Vec<(u32, Vec<u64>)> = moves.keys().map(|p| (*p, placement.replicas(*p).to_vec())).collect();
        let by_set = copy_groups(&parts, false);
        let fewest = copy_groups(&parts, true);
        for groups in [&by_set, &fewest] {
            let mut covered = BTreeSet::new();
            for g in groups.iter() {
                assert!(!g.sources.is_empty());
                for p in g.partitions.as_ref().unwrap() {
                    assert!(covered.insert(*p), "partition {p} twice");
                    assert!(g.sources.iter().all(|s| placement.replicas(*p).contains(s)), "{g:?}");
                }
            }
            assert_eq!(covered, moves.keys().copied().collect::<BTreeSet<_>>());
        }
        assert!(fewest.len() <= 3, "{} groups: {fewest:?}", fewest.len());
        assert!(by_set.len() > fewest.len(), "{} groups by set, {} fewest", by_set.len(), fewest.len());
        assert!(copy_groups(&[(1, vec![])], true).is_empty(), "no source, no group");
    }
}

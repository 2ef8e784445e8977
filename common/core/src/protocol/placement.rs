//! Where keys live: a fixed number of partitions, each on `replication`
//! distinct participants.
//!
//! A key's partition is the FNV-1a hash of its bytes modulo the partition
//! count; both the hash and the count are fixed when the cluster is created,
//! so a key never changes partition. Partitions are placed in order, each on
//! the `replication` participants holding the fewest partitions so far, ties
//! broken by a hash of partition and participant id (so replica sets differ
//! from partition to partition rather than rotating through neighbours).
//!
//! Invariants (property-tested below):
//! * every partition is on exactly `replication` distinct participants;
//! * every participant holds `floor` or `ceil` of
//!   `partitions * replication / participants` partitions (picking the
//!   least loaded keeps all loads within one of each other);
//! * the placement is a pure function of (participants, replication,
//!   partitions): every node computes the same one, before and after a
//!   restart.
//!
//! With `replication` equal to the number of participants every partition
//! is everywhere, which is exactly a cluster of full copies.
//!
//! ## Moves
//! Participants come and go in a partitioned cluster, so the computed table
//! is only the *base*: [`PlacementSpec::moved`] lists the partitions placed
//! elsewhere since, and every change of it raises [`PlacementSpec::version`].
//! [`Placement::plan_moves`] derives the next step of a rebalance from the
//! current table (never from scratch): first the copies on participants
//! that are leaving, then from the most to the least loaded participant
//! until every load is within one of every other. Each step changes at most
//! a given number of copies, and each move takes a copy from one
//! participant to one that did not hold the partition, so every partition
//! keeps exactly `replication` distinct replicas throughout. The protocol
//! that carries out a step is in `coordinator.rs` (see docs/membership.md).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// Partitions of a new cluster.
pub const DEFAULT_PARTITIONS: u32 = 256;

/// What a placement is computed from; this is what travels and is stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementSpec {
    /// Participant ids the base table is computed from, ascending (the
    /// cluster's first participants; with full copies, every participant).
    pub participants: Vec<u64>,
    pub replication: usize,
    pub partitions: u32,
    /// Partitions moved since the cluster was created, with their replicas
    /// now (ascending); the rest are where the base table puts them.
    #[serde(default)]
    pub moved: BTreeMap<u32, Vec<u64>>,
    /// Raised by every move: PREPAREs carry it, and a participant that
    /// knows an older one checks in before voting.
    #[serde(default)]
    pub version: u64,
    /// The replicas the last move took partitions from, by partition: the
    /// coordinator keeps them in those partitions' writes until any read
    /// lease granted before the move has run out.
    #[serde(default)]
    pub previous: BTreeMap<u32, Vec<u64>>,
}

/// The placement computed from a [`PlacementSpec`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "PlacementSpec", into = "PlacementSpec")]
pub struct Placement {
    spec: PlacementSpec,
    /// Replicas of each partition, ascending.
    table: Vec<Vec<u64>>,
}

impl PlacementSpec {
    /// Whether every participant holds every key.
    pub fn is_full(&self) -> bool {
        self.replication >= self.participants.len()
    }
}

impl From<Placement> for PlacementSpec {
    fn from(p: Placement) -> Self {
        p.spec
    }
}

impl From<PlacementSpec> for Placement {
    fn from(spec: PlacementSpec) -> Self {
        let mut p = Placement::new(spec.participants, spec.replication, spec.partitions);
        for (part, replicas) in &spec.moved {
            if let Some(slot) = p.table.get_mut(*part as usize) {
                slot.clone_from(replicas);
            }
        }
        p.spec.moved = spec.moved;
        p.spec.version = spec.version;
        p.spec.previous = spec.previous;
        p
    }
}

/// FNV-1a, 64 bits, fed in pieces: stable across versions and platforms by
/// definition (partitions of keys, snapshot chunk checksums).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Fnv1a(u64);

impl Fnv1a {
    pub(crate) const fn new() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }

    pub(crate) fn eat(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    pub(crate) fn finish(self) -> u64 {
        self.0
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h = Fnv1a::new();
    h.eat(bytes);
    h.finish()
}

/// splitmix64's finalizer: a well-mixed score for (partition, participant).
fn score(partition: u32, participant: u64) -> u64 {
    let mut z = (u64::from(partition) << 32 ^ participant).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Placement {
    /// Places `partitions` partitions on `replication` of `participants`
    /// each. `replication` is clamped to 1..=participants and `partitions`
    /// to at least 1 (callers validate user input before).
    pub fn new(mut participants: Vec<u64>, replication: usize, partitions: u32) -> Self {
        participants.sort_unstable();
        participants.dedup();
        let n = participants.len();
        let replication = replication.clamp(1, n.max(1)).min(n);
        let partitions = partitions.max(1);
        let mut load = vec![0usize; n];
        let mut table = Vec::with_capacity(partitions as usize);
        for p in 0..partitions {
            let mut ranked: Vec<usize> = (0..n).collect();
            ranked.sort_by_key(|&i| (load[i], std::cmp::Reverse(score(p, participants[i]))));
            let chosen = &ranked[..replication];
            for &i in chosen {
                load[i] += 1;
            }
            let mut ids: Vec<u64> = chosen.iter().map(|&i| participants[i]).collect();
            ids.sort_unstable();
            table.push(ids);
        }
        let spec = PlacementSpec {
            participants,
            replication,
            partitions,
            moved: BTreeMap::new(),
            version: 0,
            previous: BTreeMap::new(),
        };
        Placement { spec, table }
    }

    /// Every key on every participant.
    pub fn full(participants: Vec<u64>) -> Self {
        let n = participants.len();
        Placement::new(participants, n, 1)
    }

    pub fn spec(&self) -> &PlacementSpec {
        &self.spec
    }

    pub fn replication(&self) -> usize {
        self.spec.replication
    }

    pub fn partitions(&self) -> u32 {
        self.spec.partitions
    }

    /// Whether every participant holds every key.
    pub fn is_full(&self) -> bool {
        self.spec.is_full()
    }

    /// The partition of `key`.
    pub fn partition(&self, key: &[u8]) -> u32 {
        (fnv1a(key) % u64::from(self.spec.partitions)) as u32
    }

    /// The participants holding `partition`, ascending.
    pub fn replicas(&self, partition: u32) -> &[u64] {
        &self.table[partition as usize]
    }

    /// The participants holding `key`, ascending.
    pub fn replicas_of(&self, key: &[u8]) -> &[u64] {
        self.replicas(self.partition(key))
    }

    /// Whether `participant` holds `key`.
    pub fn holds(&self, participant: u64, key: &[u8]) -> bool {
        self.is_full() || self.replicas_of(key).contains(&participant)
    }

    /// The partitions `participant` holds, ascending.
    pub fn partitions_of(&self, participant: u64) -> Vec<u32> {
        (0..self.spec.partitions).filter(|p| self.table[*p as usize].contains(&participant)).collect()
    }

    /// Every participant holding at least one partition, ascending.
    pub fn holders(&self) -> Vec<u64> {
        let all: BTreeSet<u64> = self.table.iter().flatten().copied().collect();
        all.into_iter().collect()
    }

    /// Partitions held by each of `ids` (0 for one holding none).
    pub fn loads(&self, ids: &BTreeSet<u64>) -> BTreeMap<u64, usize> {
        let mut loads: BTreeMap<u64, usize> = ids.iter().map(|id| (*id, 0)).collect();
        for replicas in &self.table {
            for r in replicas {
                if let Some(l) = loads.get_mut(r) {
                    *l += 1;
                }
            }
        }
        loads
    }

    /// The next step of a rebalance towards `targets` (the participants
    /// that should hold data): new replica sets for at most `max` copies,
    /// by partition; empty when nothing needs to or can move. Copies on
    /// participants outside `targets` move first, then copies from the most
    /// to the least loaded target until loads are within one. A copy only
    /// goes to a participant `can_gain` accepts, and only partitions
    /// `can_move` accepts change. Deterministic.
    pub fn plan_moves(
        &self,
        targets: &BTreeSet<u64>,
        can_gain: impl Fn(u64) -> bool,
        can_move: impl Fn(u32) -> bool,
        max: usize,
    ) -> BTreeMap<u32, Vec<u64>> {
        let mut moves: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        if self.is_full() || targets.len() < self.spec.replication {
            return moves;
        }
        let mut load = self.loads(targets);
        let mut copies = 0;
        // 1. Copies on participants that are leaving (or gone).
        for part in 0..self.spec.partitions {
            if copies >= max {
                break;
            }
            if !can_move(part) {
                continue;
            }
            let mut replicas = self.table[part as usize].clone();
            for slot in 0..replicas.len() {
                if targets.contains(&replicas[slot]) || copies >= max {
                    continue;
                }
                let gainer = targets
                    .iter()
                    .copied()
                    .filter(|t| can_gain(*t) && !replicas.contains(t))
                    .min_by_key(|t| (load[t], std::cmp::Reverse(score(part, *t))));
                if let Some(g) = gainer {
                    replicas[slot] = g;
                    *load.get_mut(&g).expect("a target") += 1;
                    copies += 1;
                }
            }
            if replicas != self.table[part as usize] {
                replicas.sort_unstable();
                moves.insert(part, replicas);
            }
        }
        // 2. From the most to the least loaded, one copy at a time.
        while copies < max {
            let Some((&most, &high)) = load.iter().max_by_key(|(id, l)| (**l, std::cmp::Reverse(**id))) else {
                break;
            };
            let Some((&least, &low)) = load.iter().filter(|(id, _)| can_gain(**id)).min_by_key(|(id, l)| (**l, **id))
            else {
                break;
            };
            if high <= low + 1 {
                break;
            }
            let current = |p: u32| moves.get(&p).unwrap_or(&self.table[p as usize]);
            let pick = (0..self.spec.partitions)
                .filter(|p| !moves.contains_key(p) && can_move(*p))
                .filter(|p| current(*p).contains(&most) && !current(*p).contains(&least))
                .max_by_key(|p| score(*p, least));
            let Some(part) = pick else { break };
            let mut replicas: Vec<u64> = current(part).iter().map(|r| if *r == most { least } else { *r }).collect();
            replicas.sort_unstable();
            moves.insert(part, replicas);
            *load.get_mut(&most).expect("a target") -= 1;
            *load.get_mut(&least).expect("a target") += 1;
            copies += 1;
        }
        moves
    }

    /// This placement with `moves` (new replica sets by partition) made,
    /// one version later, remembering where the moved partitions were.
    pub fn with_moves(&self, moves: &BTreeMap<u32, Vec<u64>>) -> Placement {
        let base = Placement::new(self.spec.participants.clone(), self.spec.replication, self.spec.partitions);
        let mut spec = self.spec.clone();
        spec.previous = moves.keys().map(|p| (*p, self.table[*p as usize].clone())).collect();
        for (part, replicas) in moves {
            if base.table[*part as usize] == *replicas {
                spec.moved.remove(part);
            } else {
                spec.moved.insert(*part, replicas.clone());
            }
        }
        spec.version += 1;
        spec.into()
    }

    /// The distinct partitions of `keys`, ascending.
    pub fn partitions_for<'a>(&self, keys: impl IntoIterator<Item = &'a [u8]>) -> BTreeSet<u32> {
        keys.into_iter().map(|k| self.partition(k)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn loads(p: &Placement) -> Vec<usize> {
        p.spec.participants.iter().map(|id| p.partitions_of(*id).len()).collect()
    }

    #[test]
    fn five_participants_three_replicas_are_balanced_to_within_one() {
        let p = Placement::new(vec![1, 2, 3, 4, 5], 3, DEFAULT_PARTITIONS);
        // 256 * 3 / 5 = 153.6
        for l in loads(&p) {
            assert!((153..=154).contains(&l), "{:?}", loads(&p));
        }
        assert_eq!(p.replicas_of(b"k").len(), 3);
    }

    #[test]
    fn full_copies_put_every_key_everywhere() {
        let p = Placement::new(vec![3, 1, 2], 3, 16);
        assert!(p.is_full());
        assert_eq!(p.replicas_of(b"anything"), &[1, 2, 3]);
        assert!(p.holds(2, b"x"));
    }

    #[test]
    fn the_hash_is_fnv1a() {
        // Published FNV-1a 64 test vectors: the partition of a key must
        // never change between versions.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn travels_as_its_spec() {
        let p = Placement::new(vec![1, 2, 3, 4, 5], 3, 64);
        let json = serde_json::to_string(&p).unwrap();
        assert!(!json.contains("table"), "{json}");
        let back: Placement = serde_json::from_str(&json).unwrap();
        assert_eq!(back, p);
    }

    /// Runs rebalance steps of at most `max` copies until none is left;
    /// returns the final placement and the copies moved.
    fn rebalance(mut p: Placement, targets: &BTreeSet<u64>, max: usize) -> (Placement, usize) {
        let mut copies = 0;
        for _ in 0..10_000 {
            let moves = p.plan_moves(targets, |_| true, |_| true, max);
            if moves.is_empty() {
                return (p, copies);
            }
            let step: usize =
                moves.iter().map(|(part, to)| to.iter().filter(|id| !p.replicas(*part).contains(id)).count()).sum();
            assert!(step <= max, "a step moved {step} copies, more than {max}");
            copies += step;
            p = p.with_moves(&moves);
        }
        panic!("the rebalance never ended");
    }

    #[test]
    fn adding_a_sixth_participant_moves_only_its_share() {
        let p = Placement::new(vec![1, 2, 3, 4, 5], 3, DEFAULT_PARTITIONS);
        let targets: BTreeSet<u64> = (1..=6).collect();
        let (after, copies) = rebalance(p.clone(), &targets, 32);
        // 768 copies over 6 participants: 128 each, all of them new to 6.
        assert_eq!(copies, 128);
        assert_eq!(after.partitions_of(6).len(), 128);
        assert_eq!(after.spec().version, 4, "four steps of 32");
        for id in 1..=6 {
            assert_eq!(after.partitions_of(id).len(), 128, "participant {id}");
        }
        // It travels as its spec, moves included.
        let back: Placement = serde_json::from_str(&serde_json::to_string(&after).unwrap()).unwrap();
        assert_eq!(back, after);
    }

    #[test]
    fn a_leaving_participant_gives_every_copy_away_first() {
        let p = Placement::new(vec![1, 2, 3, 4, 5], 3, 64);
        let held = p.partitions_of(2).len();
        let targets: BTreeSet<u64> = [1, 3, 4, 5].into();
        let first = p.plan_moves(&targets, |_| true, |_| true, 8);
        assert!(first.values().all(|to| !to.contains(&2)), "the first moves take copies off 2: {first:?}");
        let (after, copies) = rebalance(p, &targets, 8);
        assert_eq!(copies, held, "only participant 2's copies move");
        assert!(after.partitions_of(2).is_empty());
        assert_eq!(after.holders(), vec![1, 3, 4, 5]);
    }

    #[test]
    fn a_move_back_to_the_base_table_is_forgotten() {
        let p = Placement::new(vec![1, 2, 3, 4, 5], 3, 64);
        let base = p.replicas(0).to_vec();
        let away = (1..=5).find(|id| !base.contains(id)).unwrap();
        let moved = p.with_moves(
            &[(0, vec![base[0], base[1], away].into_iter().collect::<BTreeSet<_>>().into_iter().collect())].into(),
        );
        assert_eq!(moved.spec().moved.len(), 1);
        assert_eq!(moved.spec().previous, [(0, base.clone())].into());
        assert!(moved.replicas(0).contains(&away));
        let back = moved.with_moves(&[(0, base.clone())].into());
        assert!(back.spec().moved.is_empty());
        assert_eq!(back.replicas(0), &base[..]);
        assert_eq!(back.spec().version, 2);
    }

    #[test]
    fn only_members_that_can_gain_receive_copies() {
        let p = Placement::new(vec![1, 2, 3, 4, 5], 3, 64);
        let targets: BTreeSet<u64> = (1..=6).collect();
        assert!(p.plan_moves(&targets, |id| id != 6, |_| true, 100).is_empty(), "nothing to do without 6");
        assert!(p.plan_moves(&targets, |_| true, |_| false, 100).is_empty(), "nothing may move");
    }

    proptest! {
        #[test]
        fn rebalancing_keeps_every_partition_on_delta_distinct_participants_and_ends_balanced(
            n in 2usize..8,
            delta_seed in 0usize..100,
            partitions in 1u32..200,
            remove in proptest::collection::btree_set(1u64..10, 0..3),
            add in 0u64..3,
            max in 1usize..40,
        ) {
            let ids: Vec<u64> = (1..=n as u64).collect();
            let delta = 1 + delta_seed % n;
            let p = Placement::new(ids.clone(), delta, partitions);
            let mut targets: BTreeSet<u64> = ids.iter().copied().filter(|i| !remove.contains(i)).collect();
            targets.extend((1..=add).map(|i| 100 + i));
            prop_assume!(!p.is_full() && targets.len() >= delta);
            let (after, _) = rebalance(p, &targets, max);
            for part in 0..partitions {
                let r = after.replicas(part);
                prop_assert_eq!(r.len(), delta);
                prop_assert!(r.windows(2).all(|w| w[0] < w[1]), "sorted and distinct: {:?}", r);
                prop_assert!(r.iter().all(|id| targets.contains(id)), "{:?} outside {:?}", r, targets);
            }
            let loads = after.loads(&targets);
            let (lo, hi) = (loads.values().min().unwrap(), loads.values().max().unwrap());
            prop_assert!(hi - lo <= 1, "loads {:?}", loads);
        }

        #[test]
        fn every_partition_on_exactly_delta_distinct_participants_balanced_and_stable(
            n in 1usize..12,
            delta_seed in 0usize..100,
            partitions in 1u32..600,
            offset in 0u64..50,
        ) {
            let ids: Vec<u64> = (1..=n as u64).map(|i| i * 7 + offset).collect();
            let delta = 1 + delta_seed % n;
            let p = Placement::new(ids.clone(), delta, partitions);
            for part in 0..partitions {
                let r = p.replicas(part);
                prop_assert_eq!(r.len(), delta);
                prop_assert!(r.windows(2).all(|w| w[0] < w[1]), "sorted and distinct: {:?}", r);
                prop_assert!(r.iter().all(|id| ids.contains(id)));
            }
            let total = partitions as usize * delta;
            let (lo, hi) = (total / n, total.div_ceil(n));
            for l in loads(&p) {
                prop_assert!(l >= lo && l <= hi, "loads {:?} outside [{}, {}]", loads(&p), lo, hi);
            }
            // The same inputs in another order give the same placement.
            let mut shuffled = ids.clone();
            shuffled.reverse();
            prop_assert_eq!(Placement::new(shuffled, delta, partitions), p);
        }
    }
}

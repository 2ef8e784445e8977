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

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// Partitions of a new cluster.
pub const DEFAULT_PARTITIONS: u32 = 256;

/// What a placement is computed from; this is what travels and is stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementSpec {
    /// Participant ids, ascending.
    pub participants: Vec<u64>,
    pub replication: usize,
    pub partitions: u32,
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
        Placement::new(spec.participants, spec.replication, spec.partitions)
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
        Placement { spec: PlacementSpec { participants, replication, partitions }, table }
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

    proptest! {
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

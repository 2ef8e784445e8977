//! The data log and its checkpoints against a model (a `BTreeMap`): random
//! changes, checkpoints (explicit and in the background, with applies
//! going on) and restarts, and damaged checkpoint files.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use treaty_core::protocol::ApplyEntry;
use treaty_core::types::{RangeEntry, RangeRequest, TxnId, Versioned, Write};

use crate::ReplicaStore;

type Model = BTreeMap<Vec<u8>, (u64, Vec<u8>)>;

#[derive(Clone, Debug)]
enum Op {
    /// A run of commits: per commit, (key, value or delete).
    Apply(Vec<Vec<(u8, Option<u8>)>>),
    /// `replace_range` over keys [lo, hi) with the given entries.
    Replace(u8, u8, Vec<(u8, u8)>),
    /// `delete_where` from `start`, dropping odd keys, looking at `max`.
    DeleteOdd(u8, usize),
    Checkpoint,
    Restart,
}

fn key(k: u8) -> Vec<u8> {
    vec![b'k', k % 16]
}

fn op() -> impl Strategy<Value = Op> {
    let write = (any::<u8>(), prop::option::weighted(0.8, any::<u8>()));
    prop_oneof![
        6 => prop::collection::vec(prop::collection::vec(write, 1..4), 1..5).prop_map(Op::Apply),
        1 => (any::<u8>(), any::<u8>(), prop::collection::vec((any::<u8>(), any::<u8>()), 0..4))
            .prop_map(|(a, b, e)| Op::Replace(a % 16, b % 16, e)),
        1 => (any::<u8>(), 1..8usize).prop_map(|(s, m)| Op::DeleteOdd(s % 16, m)),
        1 => Just(Op::Checkpoint),
        1 => Just(Op::Restart),
    ]
}

fn reopen(dir: &Path) -> ReplicaStore {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match ReplicaStore::open(dir, 1) {
            Err(e) if e.to_string().contains("could not acquire lock") && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            r => return r.unwrap(),
        }
    }
}

fn everything(s: &ReplicaStore) -> Model {
    let page = s.range(&RangeRequest { limit: u32::MAX, ..RangeRequest::prefix(b"") }).unwrap();
    assert_eq!(page.next, None);
    page.entries.into_iter().map(|e| (e.key, (e.version, e.value.unwrap()))).collect()
}

fn check(s: &ReplicaStore, model: &Model, applied: u64) {
    assert_eq!(&everything(s), model);
    assert_eq!(s.key_count(), model.len() as u64);
    assert_eq!(s.applied_index().unwrap(), applied);
    for (k, (version, value)) in model {
        assert_eq!(s.get(k).unwrap(), Some(Versioned { value: value.clone(), version: *version }));
    }
    let bytes: usize = model.iter().map(|(k, (_, v))| k.len() + v.len()).sum();
    assert_eq!(s.read_state().bytes, bytes as u64);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Whatever the changes, checkpoints and restarts, the store holds what
    /// the model does, and a restart gives back exactly the same data.
    #[test]
    fn the_data_survives_any_mix_of_changes_checkpoints_and_restarts(
        ops in prop::collection::vec(op(), 1..40),
        background in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut s = ReplicaStore::open(dir.path(), 1).unwrap();
        // With a tiny threshold checkpoints start in the background as changes go on.
        let min = if background { 1 } else { u64::MAX };
        s.write_state().checkpoint_min = min;
        let mut model = Model::new();
        let (mut index, mut applied) = (0u64, 0u64);
        for op in ops {
            match op {
                Op::Apply(run) => {
                    let entries: Vec<ApplyEntry> = run.iter().map(|commit| {
                        index += 1;
                        let writes: Vec<Write> = commit.iter().map(|(k, v)| match v {
                            Some(v) => Write::Put(key(*k), vec![*v; *v as usize % 5 + 1]),
                            None => Write::Delete(key(*k)),
                        }).collect();
                        for w in &writes {
                            match w {
                                Write::Put(k, v) => { model.insert(k.clone(), (index, v.clone())); }
                                Write::Delete(k) => { model.remove(k); }
                            }
                        }
                        ApplyEntry { index, txn_id: TxnId(index.into()), writes: writes.into() }
                    }).collect();
                    applied = index;
                    s.apply(&entries).unwrap();
                }
                Op::Replace(lo, hi, incoming) => {
                    let (lo, hi) = (key(lo.min(hi)), key(lo.max(hi)));
                    let entries: Vec<RangeEntry> = incoming.iter()
                        .map(|(k, v)| RangeEntry { key: key(*k), version: *v as u64, value: Some(vec![*v]) })
                        .filter(|e| e.key >= lo && e.key < hi)
                        .map(|e| (e.key.clone(), e))
                        .collect::<BTreeMap<_, _>>().into_values().collect();
                    model.retain(|k, _| !(k >= &lo && k < &hi));
                    for e in &entries {
                        model.insert(e.key.clone(), (e.version, e.value.clone().unwrap()));
                    }
                    s.replace_range(&lo, Some(&hi), &entries, |_| true).unwrap();
                }
                Op::DeleteOdd(start, max) => {
                    let start = key(start);
                    let seen: Vec<Vec<u8>> = model.range(start.clone()..).map(|(k, _)| k.clone()).take(max).collect();
                    let (deleted, _) = s.delete_where(&start, max, |k| k[1] % 2 == 1).unwrap();
                    let dropped: Vec<&Vec<u8>> = seen.iter().filter(|k| k[1] % 2 == 1).collect();
                    prop_assert_eq!(deleted, dropped.len() as u64);
                    for k in dropped {
                        model.remove(k);
                    }
                }
                Op::Checkpoint => {
                    s.checkpoint().unwrap();
                }
                Op::Restart => {
                    s.flush().unwrap();
                    drop(s);
                    s = reopen(dir.path());
                    s.write_state().checkpoint_min = min;
                }
            }
            check(&s, &model, applied);
        }
        s.flush().unwrap();
        drop(s);
        let s = reopen(dir.path());
        check(&s, &model, applied);
    }
}

/// Checkpoints written while a writer applies without pause (the scan is
/// fuzzy) still give back exactly the data after a restart, and remove the
/// log records they cover.
#[test]
fn checkpoints_taken_during_applies_give_back_exactly_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let s = ReplicaStore::open(dir.path(), 1).unwrap();
    let writer = {
        let s = s.clone();
        std::thread::spawn(move || {
            for index in 1..=3000u64 {
                let k = format!("key/{:04}", index * 7919 % 1000).into_bytes();
                let mut writes = vec![Write::Put(k, index.to_be_bytes().to_vec())];
                if index % 5 == 0 {
                    writes.push(Write::Delete(format!("key/{:04}", index * 31 % 1000).into_bytes()));
                }
                s.apply(&[ApplyEntry { index, txn_id: TxnId(index.into()), writes: writes.into() }]).unwrap();
            }
        })
    };
    let mut checkpoints = 0;
    while !writer.is_finished() || checkpoints < 2 {
        s.checkpoint().unwrap();
        checkpoints += 1;
    }
    writer.join().unwrap();
    let before = everything(&s);
    assert!(before.len() > 500, "{} keys", before.len());
    assert!(s.datalog.len() < 3000, "a checkpoint removes the records it covers ({} left)", s.datalog.len());
    s.flush().unwrap();
    drop(s);
    let s = reopen(dir.path());
    assert_eq!(everything(&s), before);
    assert_eq!(s.applied_index().unwrap(), 3000);
}

/// A checkpoint that is not what was written (a flipped byte, a cut tail)
/// stops the node with a message that says what to do; nothing is changed.
#[test]
fn a_damaged_checkpoint_is_refused_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = ReplicaStore::open(dir.path(), 1).unwrap();
        let writes = vec![Write::Put(b"k".to_vec(), vec![7; 100])];
        s.apply(&[ApplyEntry { index: 1, txn_id: TxnId(1), writes: writes.into() }]).unwrap();
        s.checkpoint().unwrap();
    }
    let path = dir.path().join(super::CHECKPOINT);
    let good = std::fs::read(&path).unwrap();
    let mut flipped = good.clone();
    flipped[40] ^= 1;
    for (bad, why) in [(flipped, "checksum mismatch"), (good[..good.len() - 3].to_vec(), "cut short")] {
        std::fs::write(&path, &bad).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let err = loop {
            match ReplicaStore::open(dir.path(), 1) {
                Err(e) if e.to_string().contains("could not acquire lock") && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                r => break r.err().expect("a damaged checkpoint must be refused").to_string(),
            }
        };
        assert!(err.contains(why) && err.contains("seeded again"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), bad, "the file is left as it was");
    }
    std::fs::write(&path, &good).unwrap();
    let s = reopen(dir.path());
    assert_eq!(s.get(b"k").unwrap().unwrap().value, vec![7; 100]);
}

/// The log record's two forms (written borrowing, read owning) encode the same.
#[test]
fn a_record_reads_back_as_written() {
    let writes = [Write::Put(b"a".to_vec(), b"1".to_vec()), Write::Delete(b"b".to_vec())];
    let mut data = super::Data::new(0, 0);
    data.put(b"b", 1, b"old");
    data.replay(&super::RecordOut::Apply { last: 9, runs: &[(9, &writes[..])] }.encode()).unwrap();
    assert_eq!(data.map, Model::from([(b"a".to_vec(), (9, b"1".to_vec()))]));
    assert_eq!(data.applied, 9);
    let removed = [super::Key(b"a".to_vec())];
    let stored = [RangeEntry { key: b"c".to_vec(), version: 4, value: Some(b"x".to_vec()) }];
    data.replay(&super::RecordOut::Replace { removed: &removed, stored: &stored }.encode()).unwrap();
    data.replay(&super::RecordOut::Applied(2).encode()).unwrap();
    assert_eq!(data.map, Model::from([(b"c".to_vec(), (4, b"x".to_vec()))]));
    assert_eq!((data.applied, data.bytes), (2, 2));
}

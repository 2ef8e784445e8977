//! The coordinator's log is compacted, and replicas behind it are re-seeded
//! from snapshots, with real processes: one killed and left behind while
//! keys are deleted and overwritten, one wiped, then both restarted under
//! write load; an install killed (-9) half way and resumed, at replication
//! 3 of 5 (several snapshot groups); a participant with bloated sled files
//! killed (-9) before and after switching to their fresh copy. Every
//! replica's own sled files must end up identical (full copies) or hold
//! exactly their keys (partitioned).

use std::time::{Duration, Instant};

use treaty_client::{Error, Outcome, ReadMode, Txn, Write};
use treaty_common::protocol::{Placement, DEFAULT_PARTITIONS};
use treaty_tests::{stored, Cluster, Data};

const N: usize = 5;

async fn start(args: &[&str]) -> Cluster {
    let mut c = Cluster::new(N);
    c.coordinator_args = args.iter().map(|s| s.to_string()).collect();
    for i in 0..=N {
        c.spawn(i, &[]);
    }
    c.wait_ready(Duration::from_secs(20)).await;
    c
}

fn puts(keys: impl IntoIterator<Item = String>, value: &[u8]) -> Txn {
    Txn::new(vec![], keys.into_iter().map(|k| Write::Put(k.into_bytes(), value.to_vec())).collect())
}

/// Waits until the coordinator has compacted its log past `index`.
async fn wait_compacted_past(c: &Cluster, index: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = c.client().cluster_status().await.unwrap();
        if s.coordinator.compacted > index {
            return s.coordinator.compacted;
        }
        assert!(Instant::now() < deadline, "the log was not compacted past {index}: {:?}", s.coordinator);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_behind_the_compacted_log_are_reseeded_from_snapshots_while_writes_go_on() {
    let mut c = start(&["--retain-commits", "50", "--retain-secs", "0"]).await;
    let client = c.client();
    let first = Txn::new(vec![], vec![Write::Put(b"first".to_vec(), b"1".to_vec())]);
    client.commit(first.clone()).await.unwrap();
    for t in 0..30 {
        client.commit(puts((0..10).map(|j| format!("key/{:03}", t * 10 + j)), b"v1")).await.unwrap();
    }
    // Participant 3 stops behind; participant 4 loses its data for good.
    let behind = c.status(3).await.unwrap().applied_index;
    c.kill(3);
    c.kill(4);
    std::fs::remove_dir_all(c.data_dir(4)).unwrap();
    // Meanwhile: deletes, overwrites, and well over 50 more commits.
    for i in 0..50 {
        client.delete(format!("key/{i:03}").as_bytes()).await.unwrap();
    }
    for t in 5..10 {
        client.commit(puts((0..10).map(|j| format!("key/{:03}", t * 10 + j)), b"v2")).await.unwrap();
    }
    for i in 0..100 {
        client.put(format!("more/{i:03}").as_bytes(), b"x").await.unwrap();
    }
    let compacted = wait_compacted_past(&c, behind).await;
    // An id whose decision is gone: the outcome says so instead of guessing.
    match client.outcome(first.id).await.unwrap() {
        Outcome::Forgotten(through) => assert!(through >= 1),
        other => panic!("outcome of a compacted transaction: {other}"),
    }
    let out = c.cli().args(["--endpoints", &c.addr(1), "outcome", &first.id.to_string()]).output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success() && said.contains("have been compacted"), "{said}");

    // Both come back while a writer keeps going.
    let writer = {
        let client = c.client();
        tokio::spawn(async move {
            for i in 0..300 {
                client.put(format!("load/{i:03}").as_bytes(), b"y").await.unwrap();
            }
        })
    };
    c.spawn(3, &[]);
    c.spawn(4, &[]);
    writer.await.unwrap();
    c.wait_ready(Duration::from_secs(40)).await;
    for i in [3, 4] {
        assert!(c.log(i).contains("installed a snapshot"), "participant {i} did not install a snapshot");
    }
    // A stale read through a re-seeded replica sees the deletes.
    let r3 = c.client_for(3);
    assert_eq!(r3.get_with(b"key/007", ReadMode::Stale).await.unwrap(), None);
    assert_eq!(r3.get_with(b"key/077", ReadMode::Stale).await.unwrap().unwrap().value, b"v2");

    // The log holds about the retained window, not every commit.
    let s = client.cluster_status().await.unwrap().coordinator;
    assert!(
        s.compacted >= compacted && s.log_entries < 200,
        "log {} entries, compacted through {}",
        s.log_entries,
        s.compacted
    );

    assert!(c.wait_applied(Duration::from_secs(10)).await);
    for i in 0..=N {
        c.stop(i);
    }
    let one = stored(&c, 1);
    assert_eq!(one.len(), 1 + 300 - 50 + 100 + 300);
    assert!(!one.contains_key(b"key/000".as_slice()));
    for i in 2..=N {
        assert!(stored(&c, i) == one, "participant {i}'s files differ from participant 1's");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_install_killed_half_way_resumes_and_holds_exactly_its_partitions() {
    let mut c =
        start(&["--replication", "3", "--min-replicas", "2", "--retain-commits", "20", "--retain-secs", "0"]).await;
    let client = c.client();
    // About 2.4 MB: participant 2's share needs more than one 1 MiB chunk.
    let value = vec![b'v'; 300];
    for t in 0..80 {
        client.commit(puts((0..100).map(|j| format!("bulk/{:05}", t * 100 + j)), &value)).await.unwrap();
    }
    c.kill(2);
    std::fs::remove_dir_all(c.data_dir(2)).unwrap();
    for i in 0..60 {
        client.put(format!("after/{i:03}").as_bytes(), b"z").await.unwrap();
    }
    wait_compacted_past(&c, 0).await;

    // The install stops after its first chunk; reads through it are refused.
    c.spawn(2, &[("TREATY_FAILPOINTS", "participant::mid_install=pause")]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match c.status(2).await {
            Some(s) if s.installing.is_some_and(|k| k > 0) => break,
            _ => assert!(Instant::now() < deadline, "participant 2 never started installing:\n{}", c.log(2)),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused = c.client_for(2).get_with(b"bulk/00001", ReadMode::Stale).await.unwrap_err();
    assert!(matches!(&refused, Error::NotReady(m) if m.contains("snapshot")), "{refused}");
    let table = c.cli().args(["--endpoints", &c.addr(1), "status"]).output().unwrap();
    assert!(String::from_utf8_lossy(&table.stdout).contains("INSTALLING A SNAPSHOT"));

    // kill -9 in the middle, restart: it resumes where it stopped.
    c.kill(2);
    c.spawn(2, &[]);
    c.wait_ready(Duration::from_secs(40)).await;
    assert!(c.log(2).contains("resuming a snapshot install"), "{}", c.log(2));
    for i in 0..=N {
        c.stop(i);
    }
    let placement = Placement::new((1..=N as u64).collect(), 3, DEFAULT_PARTITIONS);
    let mine = stored(&c, 2);
    let mut want = Data::new();
    for i in [1, 3, 4, 5] {
        for (k, v) in stored(&c, i) {
            if placement.holds(2, &k) {
                if let Some(old) = want.insert(k.clone(), v.clone()) {
                    assert_eq!(old, v, "replicas disagree on {:?}", String::from_utf8_lossy(&k));
                }
            }
        }
    }
    assert!(mine.keys().all(|k| placement.holds(2, k)), "participant 2 stores keys not placed on it");
    assert_eq!(mine.len(), want.len());
    assert!(mine == want, "participant 2 differs from the other replicas of its partitions");
}

/// Churns a scratch tree in a stopped participant's own sled files (about
/// 48 MB written, then the tree dropped): the files bloat as overwrites
/// bloat them, and the participant's data is untouched.
fn bloat(dir: &std::path::Path) -> u64 {
    let files = treaty_storage::files::resolve(dir).unwrap();
    let db = sled::Config::new().path(&files).open().unwrap();
    let scratch = db.open_tree("scratch").unwrap();
    for round in 0..3u8 {
        for chunk in 0..16u32 {
            let mut b = sled::Batch::default();
            for k in 0..1_000u32 {
                b.insert(format!("{chunk:02}/{k:04}").as_bytes(), vec![round; 1_000]);
            }
            scratch.apply_batch(b).unwrap();
        }
        db.flush().unwrap();
    }
    drop(scratch);
    assert!(db.drop_tree("scratch").unwrap());
    db.flush().unwrap();
    drop(db);
    treaty_storage::files::file_bytes(&files)
}

/// A participant whose sled files have bloated copies them into fresh ones
/// when it starts. Killed (-9 at a failpoint) just before switching to the
/// copy, and again just after, it still comes back holding exactly what the
/// other replicas hold, in files a fraction of the size, and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bloated_participant_gives_its_space_back_at_a_restart_even_when_killed_during_it() {
    let mut c = start(&[]).await;
    let client = c.client();
    for t in 0..20 {
        client.commit(puts((0..50).map(|j| format!("key/{t:02}/{j:02}")), b"v1")).await.unwrap();
    }
    assert!(c.wait_applied(Duration::from_secs(10)).await);
    c.stop(3);
    let dir = c.data_dir(3);
    let bloated = bloat(&dir);
    assert!(bloated > 32 << 20, "the scratch churn left only {bloated} bytes: no bloat to test with");

    for (failpoint, files_after) in
        [("storage::rewrite_before_switch", None), ("storage::rewrite_after_switch", Some("store-1"))]
    {
        c.spawn(3, &[("TREATY_FAILPOINTS", &format!("{failpoint}=return"))]);
        assert!(c.wait_exit(3, Duration::from_secs(30)), "participant 3 did not die at {failpoint}");
        assert!(c.log(3).contains(&format!("failpoint {failpoint} hit")), "{}", c.log(3));
        // The copy is made; the switch to it happened only in the second case.
        let current = std::fs::read_to_string(dir.join("CURRENT")).ok();
        assert_eq!(current.as_deref().map(str::trim), files_after, "CURRENT after a kill at {failpoint}");
        assert!(dir.join("store-1").is_dir() && dir.join("db").is_file(), "after a kill at {failpoint}");
    }
    // Killed just after the switch: the old files are still there until
    // the next start removes them.
    c.spawn(3, &[]);
    c.wait_ready(Duration::from_secs(30)).await;
    assert!(c.log(3).contains("removing what an interrupted storage rewrite left"), "{}", c.log(3));
    client.put(b"after", b"restart").await.unwrap();
    let r3 = c.client_for(3);
    assert_eq!(r3.get(b"after").await.unwrap().unwrap().value, b"restart");
    assert_eq!(r3.get_with(b"key/19/49", ReadMode::Stale).await.unwrap().unwrap().value, b"v1");

    assert!(c.wait_applied(Duration::from_secs(10)).await);
    for i in 0..=N {
        c.stop(i);
    }
    let mut names: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["CURRENT", "store-1"], "participant 3's data dir");
    let now = treaty_storage::files::file_bytes(&dir.join("store-1"));
    assert!(now * 4 < bloated, "{bloated} bytes of files became {now}");
    let one = stored(&c, 1);
    assert_eq!(one.len(), 1_001);
    assert!(stored(&c, 3) == one, "participant 3's files differ from participant 1's");
}

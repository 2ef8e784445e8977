//! Partitions moving between participants (`--replication 3`), with real
//! processes and the `treaty member` CLI: a sixth participant added under
//! write load takes its share of the partitions, a member removed under load
//! gives every copy away before it leaves, and afterwards each participant's
//! own sled files hold exactly the keys the new placement puts on it. Then
//! the same with the coordinator killed (-9) around the switch to a new
//! placement and the receiving participant killed in the middle of a copy.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use treaty_client::{RangeRequest, ReadMode, Txn, Write};
use treaty_common::protocol::{Placement, RosterState};
use treaty_tests::{stored, Cluster};

const N: usize = 5;

/// Five participants, each key on three; the log is compacted almost at
/// once, so a new participant installs a snapshot (of nothing: it holds no
/// partition yet) instead of replaying the log.
async fn start() -> Cluster {
    let mut c = Cluster::new(N);
    c.coordinator_args =
        ["--replication", "3", "--retain-commits", "50", "--retain-secs", "0"].map(String::from).to_vec();
    for i in 0..=N {
        c.spawn(i, &[]);
    }
    c.wait_ready(Duration::from_secs(20)).await;
    c
}

/// `txns` transactions of 100 keys each (every one across partitions).
async fn fill(c: &Cluster, txns: usize) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let client = c.client();
    let mut want = BTreeMap::new();
    for t in 0..txns {
        let writes: Vec<Write> = (0..100)
            .map(|j| {
                let (k, v) = (format!("bulk/{:05}", t * 100 + j).into_bytes(), format!("v{t}").into_bytes());
                want.insert(k.clone(), v.clone());
                Write::Put(k, v)
            })
            .collect();
        client.commit(Txn::new(vec![], writes)).await.unwrap();
    }
    want
}

/// Writes `load/N` keys one after another until `stop` (at most 5,000);
/// returns the keys written (all acknowledged) and the slowest write.
fn writer(c: &Cluster, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(Vec<Vec<u8>>, Duration)> {
    let client = c.client();
    tokio::spawn(async move {
        let (mut keys, mut slowest) = (Vec::new(), Duration::ZERO);
        for i in 0..5_000 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let key = format!("load/{i:05}").into_bytes();
            let t0 = Instant::now();
            client.put(&key, b"w").await.unwrap_or_else(|e| panic!("write {i} failed: {e}"));
            slowest = slowest.max(t0.elapsed());
            keys.push(key);
        }
        (keys, slowest)
    })
}

/// Runs the CLI against every participant not removed; returns (success,
/// stdout, stderr).
fn cli(c: &Cluster, args: &[&str]) -> (bool, String, String) {
    let out = c.cli().args(["--endpoints", &c.participant_addrs().join(",")]).args(args).output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

/// Waits until node `i`'s log shows `text`.
async fn wait_log(c: &Cluster, i: usize, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !c.log(i).contains(text) {
        assert!(Instant::now() < deadline, "node {i} never logged {text:?}:\n{}", c.log(i));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn placement(c: &Cluster) -> Placement {
    Placement::from(c.client().cluster_status().await.unwrap().placement)
}

/// Reads every key of `want` through participant `door` and pages through
/// all of them there.
async fn check_reads(c: &Cluster, door: usize, want: &BTreeMap<Vec<u8>, Vec<u8>>) {
    let client = c.client_for(door);
    for (k, v) in want.iter().step_by(7) {
        let got = client.get_with(k, ReadMode::Linearizable).await.unwrap().map(|x| x.value);
        assert_eq!(got.as_ref(), Some(v), "{} through participant {door}", String::from_utf8_lossy(k));
    }
    let mut pages = client.range(RangeRequest { limit: 500, ..RangeRequest::prefix(b"") }, None);
    let mut scanned = BTreeMap::new();
    while let Some(page) = pages.next().await {
        scanned.extend(page.unwrap().entries.into_iter().map(|e| (e.key, e.value.unwrap())));
    }
    assert!(scanned == *want, "a scan through participant {door} shows {} keys of {}", scanned.len(), want.len());
}

/// Stops every node, then checks each live participant's files: exactly
/// the keys `placement` puts on it, with their last values.
fn check_files(c: &mut Cluster, placement: &Placement, want: &BTreeMap<Vec<u8>, Vec<u8>>) {
    for i in 0..=c.n() {
        c.stop(i);
    }
    for i in c.live() {
        let data = stored(c, i);
        let mine: BTreeMap<&Vec<u8>, &Vec<u8>> = want.iter().filter(|(k, _)| placement.holds(i as u64, k)).collect();
        for (k, v) in &mine {
            assert_eq!(data.get(*k).map(|(v, _)| v), Some(*v), "participant {i} lacks {}", String::from_utf8_lossy(k));
        }
        let foreign: Vec<String> = data
            .keys()
            .filter(|k| !placement.holds(i as u64, k))
            .take(3)
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect();
        assert!(foreign.is_empty(), "participant {i} still stores keys placed elsewhere: {foreign:?}");
        assert_eq!(data.len(), mine.len(), "participant {i}");
        println!("participant {i}: {} partitions, {} keys", placement.partitions_of(i as u64).len(), data.len());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_move_to_an_added_participant_and_away_from_a_removed_one_under_write_load() {
    let mut c = start().await;
    let mut want = fill(&c, 30).await;
    for i in 0..1_100 {
        let k = format!("small/{i:04}").into_bytes();
        c.client().put(&k, b"s").await.unwrap();
        want.insert(k, b"s".to_vec());
    }
    let before = placement(&c).await;
    assert_eq!(before.spec().version, 0);

    let stop = Arc::new(AtomicBool::new(false));
    let load = writer(&c, stop.clone());
    let six = c.add_node();
    c.spawn(six, &[]);
    wait_log(&c, six, "waiting to be admitted").await;
    let t0 = Instant::now();
    let (ok, out, err) = cli(&c, &["member", "add", &c.addr(six), "--wait", "--timeout", "120"]);
    assert!(ok, "member add failed: {out}{err}\n{}", c.log(0));
    assert!(out.contains("participant 6 is active and in the view"), "{out}");
    println!("added participant 6 and moved its share in {} ms", t0.elapsed().as_millis());
    assert!(c.log(six).contains("installed a snapshot"), "{}", c.log(six));
    assert!(c.log(six).contains("copied partitions moving here"), "{}", c.log(six));
    let added = placement(&c).await;
    assert!(added.spec().version >= 1);
    for id in 1..=6 {
        assert_eq!(added.partitions_of(id).len(), 128, "768 copies over 6 participants: participant {id}");
    }
    let (_, table, _) = cli(&c, &["status"]);
    assert!(!table.contains("REBALANCING"), "{table}");
    assert!(table.contains("replication 3 of 6"), "{table}");

    let t0 = Instant::now();
    let (ok, out, err) = cli(&c, &["member", "remove", "2", "--wait", "--timeout", "120"]);
    assert!(ok, "member remove failed: {out}{err}\n{}", c.log(0));
    assert!(out.contains("participant 2 is removed for good"), "{out}");
    println!("moved participant 2's partitions away and removed it in {} ms", t0.elapsed().as_millis());
    assert!(c.wait_exit(2, Duration::from_secs(15)), "participant 2 still runs after its removal");
    c.mark_removed(2);
    let after = placement(&c).await;
    assert!(after.partitions_of(2).is_empty());
    assert_eq!(after.holders(), vec![1, 3, 4, 5, 6]);

    stop.store(true, Ordering::Relaxed);
    let (keys, slowest) = load.await.unwrap();
    println!("{} writes during the changes, slowest {} ms", keys.len(), slowest.as_millis());
    assert!(!keys.is_empty());
    want.extend(keys.into_iter().map(|k| (k, b"w".to_vec())));
    for door in [1, 6] {
        check_reads(&c, door, &want).await;
    }
    assert!(c.wait_applied(Duration::from_secs(20)).await);
    check_files(&mut c, &after, &want);
}

/// Waits until the coordinator answers and has verified its log.
async fn wait_coordinator(c: &Cluster) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(s) = c.client().cluster_status().await {
            if s.coordinator.fenced.is_none() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "the coordinator never became ready:\n{}", c.log(0));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_survives_kill_9_of_the_coordinator_around_the_switch_and_of_the_copying_participant() {
    let mut c = start().await;
    let want = fill(&c, 20).await;
    let arm = |name: &str| format!("{name}=return");

    // The coordinator will die with the first copies made but the new
    // placement not written; the new participant in the middle of its copy.
    c.stop(0);
    c.spawn(0, &[("TREATY_FAILPOINTS", &arm("coordinator::before_placement_switch"))]);
    wait_coordinator(&c).await;
    let six = c.add_node();
    c.spawn(six, &[("TREATY_FAILPOINTS", &arm("participant::mid_partition_copy"))]);
    wait_log(&c, six, "waiting to be admitted").await;
    let (ok, out, err) = cli(&c, &["member", "add", &c.addr(six)]);
    assert!(ok, "member add failed: {out}{err}");
    assert!(c.wait_exit(six, Duration::from_secs(30)), "participant 6 never hit its failpoint:\n{}", c.log(six));
    assert!(c.log(six).contains("mid_partition_copy"), "{}", c.log(six));
    c.spawn(six, &[]);
    assert!(c.wait_exit(0, Duration::from_secs(60)), "the coordinator never reached the switch:\n{}", c.log(0));
    assert!(c.log(0).contains("failpoint hit"), "{}", c.log(0));

    // Then with the new placement written and synced, not yet in effect.
    c.spawn(0, &[("TREATY_FAILPOINTS", &arm("coordinator::after_placement_switch"))]);
    assert!(c.wait_exit(0, Duration::from_secs(60)), "the coordinator never reached the switch:\n{}", c.log(0));
    c.spawn(0, &[]);
    wait_coordinator(&c).await;
    assert!(placement(&c).await.spec().version >= 1, "the switch written before the kill is kept");

    let deadline = Instant::now() + Duration::from_secs(120);
    while c.client().cluster_status().await.unwrap().rebalance.is_some() {
        assert!(Instant::now() < deadline, "the rebalance never finished:\n{}", c.log(0));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let done = placement(&c).await;
    assert_eq!(done.partitions_of(6).len(), 128);
    let roster = c.client().cluster_status().await.unwrap().roster;
    assert_eq!(roster.iter().find(|(id, _)| *id == 6).map(|(_, s)| *s), Some(RosterState::Active));
    c.wait_ready(Duration::from_secs(30)).await;
    check_reads(&c, 6, &want).await;
    assert!(c.wait_applied(Duration::from_secs(20)).await);
    check_files(&mut c, &done, &want);
}

/// Transfers between 16 accounts run while participant 6 is added and
/// participant 2 removed (partitions move both times), and range reads
/// through the participants check that the total never changes: a page read
/// across partitions shows a transaction whole or not at all, also while
/// the partitions it reads are moving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_reads_never_show_half_a_transaction_while_partitions_move() {
    let mut c = start().await;
    let stop = Arc::new(AtomicBool::new(false));
    let writers = treaty_tests::transfers(Arc::new(c.client()), 16, 3, stop.clone(), 60).await;
    let six = c.add_node();
    c.spawn(six, &[]);
    wait_log(&c, six, "waiting to be admitted").await;
    let (addr, endpoints) = (c.addr(six), c.participant_addrs().join(","));
    let (mut add, mut remove) = (c.cli(), c.cli());
    let changes = tokio::task::spawn_blocking(move || {
        let run = |cmd: &mut std::process::Command, args: &[&str]| {
            let out = cmd.args(["--endpoints", &endpoints]).args(args).output().unwrap();
            assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        run(&mut add, &["member", "add", &addr, "--wait", "--timeout", "120"]);
        run(&mut remove, &["member", "remove", "2", "--wait", "--timeout", "120"]);
    });
    let (mut scans, mut retries) = (0, 0);
    while !changes.is_finished() {
        for door in [1, 3, 4, 5] {
            for stale in [false, true] {
                match treaty_tests::account_total(&c.client_for(door), 16, stale).await {
                    Some(total) => {
                        assert_eq!(total, 1600, "a range read through participant {door} saw a transfer half done");
                        scans += 1;
                    }
                    None => retries += 1,
                }
            }
        }
    }
    changes.await.unwrap();
    stop.store(true, Ordering::Relaxed);
    let mut transfers = 0;
    for w in writers {
        transfers += w.await.unwrap();
    }
    c.mark_removed(2);
    let moved = placement(&c).await;
    assert!(moved.spec().version >= 5, "partitions moved in both changes: version {}", moved.spec().version);
    assert!(transfers >= 20, "only {transfers} transfers committed");
    assert!(scans >= 20 && retries <= scans, "{scans} scans, {retries} gave up");
    println!("{transfers} transfers, {scans} consistent scans, {retries} retry answers");
}

//! Kill -9 at every named protocol step, restart, and check the data.
//!
//! Each case arms one failpoint (through `TREATY_FAILPOINTS`) on one node,
//! which makes that node `abort()` the moment it reaches the step. The
//! transaction that triggered it either committed or not, but afterwards:
//! every replica holds identical data, the transaction is all there or not at
//! all, a commit the client was told about is present, and resubmitting the
//! same transaction id never applies it twice.
//!
//! Every case runs twice: on 3 participants with full copies, and on 5
//! participants with each key on 3 (`--replication 3`), where the
//! transaction spans two partitions and a crashing participant holds one of
//! them and not the other.

use std::time::Duration;

use treaty_client::{Condition, Error, ReadMode, Txn, Write};
use treaty_common::protocol::{Placement, DEFAULT_PARTITIONS};
use treaty_tests::Cluster;

const N: usize = 3;

fn keys() -> Vec<Vec<u8>> {
    vec![b"base".to_vec(), b"t/a".to_vec(), b"t/b".to_vec()]
}

/// The cluster a case runs on and the keys its transaction uses (a
/// condition key, then the two keys it writes).
struct Layout {
    n: usize,
    replication: Option<usize>,
    keys: Vec<Vec<u8>>,
}

impl Layout {
    fn full() -> Layout {
        Layout { n: N, replication: None, keys: keys() }
    }

    /// 5 participants, each key on 3; the written keys are in different
    /// partitions, and participant `node` (if one) holds the first and not
    /// the second.
    fn partitioned(node: usize) -> Layout {
        let p = Placement::new((1..=5).collect(), 3, DEFAULT_PARTITIONS);
        let me = node as u64;
        let find = |prefix: &str, want: &dyn Fn(&[u64]) -> bool| {
            (0..10_000).map(|i| format!("{prefix}{i}").into_bytes()).find(|k| want(p.replicas_of(k))).unwrap()
        };
        let a = find("t/a", &|r| me == 0 || r.contains(&me));
        let b = find("t/b", &|r| (me == 0 || !r.contains(&me)) && r != p.replicas_of(&a));
        Layout { n: 5, replication: Some(3), keys: vec![b"base".to_vec(), a, b] }
    }

    async fn start(&self) -> Cluster {
        let mut c = Cluster::new(self.n);
        if let Some(r) = self.replication {
            c.coordinator_args.extend(["--replication".to_string(), r.to_string()]);
        }
        for i in 0..=self.n {
            c.spawn(i, &[]);
        }
        c.wait_ready(Duration::from_secs(20)).await;
        c
    }
}

/// Runs one transaction with `failpoint` armed on `node`, then recovers.
async fn crash_case(layout: Layout, node: usize, failpoint: &str, must_commit: Option<bool>) {
    let mut c = layout.start().await;
    let [base, ka, kb] = [&layout.keys[0], &layout.keys[1], &layout.keys[2]];
    let client = c.client_for(if node == 1 { 2 } else { 1 });
    client.put(base, b"0").await.unwrap();
    c.wait_ready(Duration::from_secs(10)).await;

    // Re-arm the node with the failpoint (a clean stop, so that recovery
    // itself does not run into an apply failpoint).
    c.stop(node);
    let spec = format!("{failpoint}=return");
    c.spawn(node, &[("TREATY_FAILPOINTS", spec.as_str())]);
    c.wait_ready(Duration::from_secs(20)).await;

    let txn = Txn::new(
        vec![Condition::Missing(ka.clone()), Condition::ValueEquals(base.clone(), b"0".to_vec())],
        vec![Write::Put(ka.clone(), b"A".to_vec()), Write::Put(kb.clone(), b"B".to_vec())],
    );
    let first = client.commit(txn.clone()).await;
    assert!(c.wait_exit(node, Duration::from_secs(10)), "node {node} did not crash at {failpoint}; first = {first:?}");
    assert!(c.log(node).contains(&format!("failpoint {failpoint} hit")), "crash was not at {failpoint}");

    // Restart without the failpoint and let the cluster converge.
    c.spawn(node, &[]);
    let last = c.wait_ready(Duration::from_secs(30)).await;
    let values = c.assert_replicas_identical(&layout.keys).await;
    let (a, b) = (&values[1], &values[2]);
    assert_eq!(a.is_some(), b.is_some(), "half-applied transaction after crash at {failpoint}: {values:?}");
    if let (Some(a), Some(b)) = (a, b) {
        assert_eq!(a.1, b.1, "both writes carry the same commit index");
        assert_eq!((a.0.as_slice(), b.0.as_slice()), (&b"A"[..], &b"B"[..]));
    }
    if let Some(expected) = must_commit {
        assert_eq!(
            a.is_some(),
            expected,
            "after a crash at {failpoint} the transaction must be {}",
            if expected { "committed" } else { "aborted" }
        );
    }
    if let Ok(committed) = &first {
        assert_eq!(a.as_ref().map(|a| a.1), Some(committed.index), "acknowledged commit lost at {failpoint}");
    }

    // A retry with the same id returns the first outcome or, if the first
    // attempt never committed, commits now; never twice.
    let retry = client.commit(txn.clone()).await;
    match (a, &retry) {
        (Some(a), Ok(r)) => assert_eq!(r.index, a.1, "retry of a committed transaction must return its index"),
        (Some(_), Err(e)) => panic!("retry of a committed transaction failed: {e}"),
        (None, Ok(r)) => assert_eq!(r.index, last + 1),
        (None, Err(e)) => panic!("retry after an aborted attempt should commit: {e}"),
    }
    let again = client.commit(txn).await.unwrap();
    assert_eq!(Ok(again), retry, "third submission differs");
    c.wait_ready(Duration::from_secs(10)).await;
    let after = c.assert_replicas_identical(&layout.keys).await;
    assert!(after[1].is_some() && after[2].is_some());
    let status = c.client().cluster_status().await.unwrap();
    assert_eq!(status.coordinator.applied_index, after[1].as_ref().unwrap().1, "the transaction was applied twice");
}

macro_rules! crash_tests {
    ($($name:ident: $node:expr, $fp:expr, $must:expr;)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                crash_case(Layout::full(), $node, $fp, $must).await;
            }
        )*
        mod partitioned {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    crash_case(Layout::partitioned($node), $node, $fp, $must).await;
                }
            )*
        }
    };
}

crash_tests! {
    // A participant that dies before its YES leaves makes the attempt abort.
    participant_crash_before_prepare_log: 2, "participant::before_prepare_log", Some(false);
    participant_crash_before_prepare_sync: 2, "participant::before_prepare_sync", Some(false);
    participant_crash_after_prepare_sync_before_vote: 2, "participant::after_prepare_sync", Some(false);
    participant_one_crash_after_prepare_sync: 1, "participant::after_prepare_sync", Some(false);
    // One that dies after voting must still end up with the commit.
    participant_crash_before_apply: 2, "participant::before_apply", Some(true);
    participant_crash_after_apply: 2, "participant::after_apply", Some(true);
    // Between the apply's data write and its WAL removal: the leftover
    // record must be retired, not stay in doubt (the node would never be ready).
    participant_crash_mid_apply: 2, "participant::mid_apply", Some(true);
    // In the middle of the apply's data writes (part of the transaction
    // written, the applied index not): applied again, whole, after the restart.
    participant_crash_mid_apply_data: 2, "storage::mid_apply_data", Some(true);
    coordinator_crash_before_prepare: 0, "coordinator::before_prepare", Some(false);
    coordinator_crash_before_decision: 0, "coordinator::before_decision", Some(false);
    // Written but not synced: a killed process may or may not have left it.
    coordinator_crash_before_decision_sync: 0, "coordinator::before_decision_sync", None;
    // Durable decision: committed on every replica even though nobody heard.
    coordinator_crash_after_decision_sync: 0, "coordinator::after_decision_sync", Some(true);
    coordinator_crash_after_first_commit: 0, "coordinator::after_first_commit", Some(true);
}

/// What a client was told committed: key and commit index.
type Acked = Vec<(Vec<u8>, u64)>;

/// Four clients writing distinct keys through different endpoints until
/// stopped, retrying what the faults make fail; each keeps what was
/// acknowledged (key, commit index).
struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    writers: Vec<tokio::task::JoinHandle<Acked>>,
}

impl Load {
    fn start(c: &Cluster) -> Load {
        let endpoints = c.participant_addrs();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut writers = Vec::new();
        for w in 0..4 {
            let eps: Vec<String> = endpoints.iter().cycle().skip(w).take(endpoints.len()).cloned().collect();
            let stop = stop.clone();
            let client = c.client_with(eps).with_timeout(Duration::from_secs(5));
            writers.push(tokio::spawn(async move {
                let mut acked = Vec::new();
                for i in 0..400u32 {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let key = format!("w{w}/{i}").into_bytes();
                    match client.put(&key, &i.to_be_bytes()).await {
                        Ok(c) => acked.push((key, c.index)),
                        Err(Error::Unavailable(_))
                        | Err(Error::NotCommitted(_))
                        | Err(Error::NotReady(_))
                        | Err(Error::Conflict(_))
                        | Err(Error::InDoubt(_)) => tokio::time::sleep(Duration::from_millis(20)).await,
                        Err(e) => panic!("unexpected error: {e}"),
                    }
                }
                acked
            }));
        }
        Load { stop, writers }
    }

    /// Stops the clients; checks that every acknowledged write is on every
    /// replica, with its commit index as its version, and readable
    /// linearizably through every endpoint.
    async fn stop_and_check(self, c: &Cluster) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut acked = Vec::new();
        for w in self.writers {
            acked.extend(w.await.unwrap());
        }
        assert!(acked.len() > 20, "load made too little progress: {} writes", acked.len());
        c.wait_ready(Duration::from_secs(30)).await;
        let keys: Vec<Vec<u8>> = acked.iter().map(|(k, _)| k.clone()).collect();
        let values = c.assert_replicas_identical(&keys).await;
        for ((k, index), v) in acked.iter().zip(values) {
            let v = v.unwrap_or_else(|| panic!("acknowledged write {} lost", String::from_utf8_lossy(k)));
            assert_eq!(v.1, *index, "version of {} is not its commit index", String::from_utf8_lossy(k));
        }
        for i in c.live() {
            let v = c.client_for(i).get_with(&keys[0], ReadMode::Linearizable).await.unwrap();
            assert!(v.is_some());
        }
    }
}

/// kill -9 a participant and then the coordinator in the middle of a
/// concurrent load; every acknowledged write survives on every replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nodes_under_load_loses_no_acknowledged_write() {
    let mut c = Cluster::start(5).await;
    let load = Load::start(&c);
    tokio::time::sleep(Duration::from_millis(400)).await;
    c.kill(3);
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.spawn(3, &[]);
    tokio::time::sleep(Duration::from_millis(400)).await;
    c.kill(0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.spawn(0, &[]);
    tokio::time::sleep(Duration::from_millis(600)).await;
    load.stop_and_check(&c).await;
}

/// kill -9 participants while they write checkpoints of their data (here
/// one every 2 KiB of data log, so during every apply burst) and restart
/// them from their checkpoint and log: every acknowledged write survives on
/// every replica, and the checkpoints were really written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_participants_while_they_checkpoint_loses_no_acknowledged_write() {
    let mut c = Cluster::new(5);
    let env = [("TREATY_CHECKPOINT_BYTES", "2048")];
    for i in 0..=5 {
        c.spawn(i, &env);
    }
    c.wait_ready(Duration::from_secs(20)).await;
    let load = Load::start(&c);
    for victim in [2, 4, 2, 5] {
        tokio::time::sleep(Duration::from_millis(350)).await;
        c.kill(victim);
        tokio::time::sleep(Duration::from_millis(150)).await;
        c.spawn(victim, &env);
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    load.stop_and_check(&c).await;
    for i in 1..=5 {
        let checkpoint = c.data_dir(i).join("data.checkpoint");
        assert!(checkpoint.exists(), "participant {i} wrote no checkpoint ({})", checkpoint.display());
    }
}

/// A failed condition is a final answer for that transaction id, even if
/// the coordinator is killed right after giving it: a resubmission after the
/// restart gets the same answer, not a fresh evaluation that could commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_condition_survives_a_coordinator_kill() {
    let mut c = Cluster::start(N).await;
    let client = c.client();
    client.put(b"base", b"0").await.unwrap();
    let txn = Txn::new(
        vec![Condition::ValueEquals(b"base".to_vec(), b"1".to_vec())],
        vec![Write::Put(b"t/a".to_vec(), b"A".to_vec())],
    );
    let first = client.commit(txn.clone()).await.unwrap_err();
    assert!(matches!(first, Error::ConditionFailed(_)), "{first}");
    c.kill(0);
    c.spawn(0, &[]);
    c.wait_ready(Duration::from_secs(20)).await;
    // Now the condition would hold; the same id must still be refused.
    client.put(b"base", b"1").await.unwrap();
    assert_eq!(client.commit(txn).await.unwrap_err(), first, "re-evaluated after the crash");
    c.wait_ready(Duration::from_secs(10)).await;
    assert_eq!(c.assert_replicas_identical(&keys()).await[1], None, "t/a was written");
}

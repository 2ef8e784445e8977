//! Participants added and removed while the cluster runs, with real
//! processes and the `treaty member` CLI: a sixth participant added under
//! write load copies a snapshot and ends up holding exactly what the others
//! hold; a member removed under load leaves, exits, and is refused when it
//! comes back; the coordinator killed (-9) right after each change was
//! recorded, and the joining participant killed half way through its
//! snapshot, still end in the intended cluster.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use treaty_client::{Error, ReadMode, Txn, Write};
use treaty_common::protocol::RosterState;
use treaty_tests::{stored, Cluster, Data};

const N: usize = 5;

/// A cluster whose log is compacted almost at once, so that a new
/// participant can only catch up from a snapshot.
async fn start() -> Cluster {
    let mut c = Cluster::new(N);
    c.coordinator_args.extend(["--retain-commits", "50", "--retain-secs", "0"].map(String::from));
    for i in 0..=N {
        c.spawn(i, &[]);
    }
    c.wait_ready(Duration::from_secs(20)).await;
    c
}

/// `txns` transactions of 100 keys with 300-byte values: about 30 KB each.
async fn fill(c: &Cluster, txns: usize) {
    let client = c.client();
    for t in 0..txns {
        let writes = (0..100).map(|j| Write::Put(format!("bulk/{:05}", t * 100 + j).into_bytes(), vec![b'v'; 300]));
        client.commit(Txn::new(vec![], writes.collect())).await.unwrap();
    }
}

/// What a background writer saw: the keys it wrote (all acknowledged) and
/// its slowest write.
struct Written {
    keys: Vec<String>,
    slowest: Duration,
}

/// Writes `load/N` keys one after another until `stop` (at most 5,000).
fn writer(c: &Cluster, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Written> {
    let client = c.client();
    tokio::spawn(async move {
        let mut w = Written { keys: Vec::new(), slowest: Duration::ZERO };
        for i in 0..5_000 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let key = format!("load/{i:05}");
            let t0 = Instant::now();
            client.put(key.as_bytes(), b"w").await.unwrap_or_else(|e| panic!("write {key} failed: {e}"));
            w.slowest = w.slowest.max(t0.elapsed());
            w.keys.push(key);
        }
        w
    })
}

/// Runs the CLI with every participant not removed as an endpoint;
/// returns (success, stdout, stderr).
fn cli(c: &Cluster, args: &[&str]) -> (bool, String, String) {
    let out = c.cli().args(["--endpoints", &c.participant_addrs().join(",")]).args(args).output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

async fn roster_state(c: &Cluster, id: u64) -> Option<RosterState> {
    let s = c.client().cluster_status().await.ok()?;
    s.roster.iter().find(|(i, _)| *i == id).map(|(_, st)| *st)
}

/// Waits until the coordinator records participant `id` as `want`.
async fn wait_roster(c: &Cluster, id: u64, want: RosterState, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let now = roster_state(c, id).await;
        if now == Some(want) {
            return;
        }
        assert!(Instant::now() < deadline, "participant {id} is {now:?}, not {want:?}, after {timeout:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until node `i`'s log shows `text`.
async fn wait_log(c: &Cluster, i: usize, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !c.log(i).contains(text) {
        assert!(Instant::now() < deadline, "node {i} never logged {text:?}:\n{}", c.log(i));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Stops every running node and checks that the live participants' files
/// are identical; returns participant 1's data.
fn stop_and_compare(c: &mut Cluster) -> Data {
    for i in 0..=c.n() {
        c.stop(i);
    }
    let live = c.live();
    let first = stored(c, live[0]);
    for &i in &live[1..] {
        let other = stored(c, i);
        assert_eq!(other.len(), first.len(), "participant {i} holds a different number of keys");
        assert!(other == first, "participant {i}'s files differ from participant {}'s", live[0]);
    }
    first
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_added_and_one_removed_under_write_load() {
    let mut c = start().await;
    fill(&c, 30).await;

    // A sixth participant started before it is added waits; it does not exit.
    let six = c.add_node();
    c.spawn(six, &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let load = writer(&c, stop.clone());
    assert!(!c.wait_exit(six, Duration::from_secs(2)), "participant 6 exited before being added:\n{}", c.log(six));
    assert!(c.log(six).contains("waiting to be admitted"), "{}", c.log(six));

    let t0 = Instant::now();
    let (ok, out, err) = cli(&c, &["member", "add", &c.addr(six), "--wait", "--timeout", "90"]);
    assert!(ok, "member add failed: {out}{err}");
    assert!(out.contains(&format!("participant 6 at {} added", c.addr(six))), "{out}");
    assert!(out.contains("participant 6 is active and in the view"), "{out}");
    println!("added participant 6 under write load in {} ms", t0.elapsed().as_millis());
    assert!(c.log(six).contains("installed a snapshot"), "participant 6 did not copy a snapshot:\n{}", c.log(six));
    assert_eq!(roster_state(&c, 6).await, Some(RosterState::Active));

    // Participant 2 removed under load: it leaves the view, then exits.
    let t0 = Instant::now();
    let (ok, out, err) = cli(&c, &["member", "remove", "2", "--wait"]);
    assert!(ok, "member remove failed: {out}{err}");
    assert!(out.contains("participant 2 is removed for good"), "{out}");
    println!("removed participant 2 under write load in {} ms", t0.elapsed().as_millis());
    assert!(c.wait_exit(2, Duration::from_secs(15)), "participant 2 still runs after its removal");
    assert!(c.log(2).contains("was removed from this cluster"), "{}", c.log(2));
    c.mark_removed(2);
    let status = c.client_for(1).cluster_status().await.unwrap();
    assert_eq!(status.members, vec![1, 3, 4, 5, 6]);
    let (_, table, _) = cli(&c, &["status"]);
    assert!(table.contains("removed for good: participant 2"), "{table}");

    stop.store(true, Ordering::Relaxed);
    let written = load.await.unwrap();
    println!("{} writes during the changes, slowest {} ms", written.keys.len(), written.slowest.as_millis());
    assert!(!written.keys.is_empty());

    // It stays out: restarted, it is refused and exits; its id is not reused.
    c.spawn(2, &[]);
    assert!(c.wait_exit(2, Duration::from_secs(15)), "a removed participant was let back in");
    let (ok, _, err) = cli(&c, &["member", "add", &c.addr(2), "--id", "2"]);
    assert!(!ok && err.contains("ids are never reused"), "{err}");
    // Removing below the minimum is refused with what to do.
    let (ok, _, err) = cli(&c, &["member", "remove", "1"]);
    assert!(ok, "removing one of five is fine: {err}");
    let (ok, _, err) = cli(&c, &["member", "remove", "3"]);
    assert!(ok, "{err}");
    let (ok, _, err) = cli(&c, &["member", "remove", "4"]);
    assert!(!ok && err.contains("fewer than the minimum of 3"), "{err}");
    for i in [1, 3] {
        assert!(c.wait_exit(i, Duration::from_secs(15)), "participant {i} still runs after its removal");
        c.mark_removed(i);
    }

    // Every acknowledged write is on every remaining replica, the new one included.
    c.client().put(b"last", b"1").await.unwrap();
    assert!(c.wait_applied(Duration::from_secs(20)).await);
    let data = stop_and_compare(&mut c);
    assert_eq!(data.len(), 30 * 100 + written.keys.len() + 1);
    for k in &written.keys {
        assert_eq!(data.get(k.as_bytes()).map(|(v, _)| v.as_slice()), Some(&b"w"[..]), "{k} lost");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_changes_survive_kill_9_of_the_coordinator_and_of_the_joining_node() {
    let mut c = start().await;
    // About 1.2 MB: more than one snapshot chunk; then enough commits that
    // the log no longer starts at the beginning.
    fill(&c, 40).await;
    let client = c.client();
    for i in 0..100 {
        client.put(format!("small/{i:03}").as_bytes(), b"s").await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.cluster_status().await.unwrap().coordinator.compacted == 0 {
        assert!(Instant::now() < deadline, "the log was never compacted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Added, then the coordinator is killed before the node is admitted.
    let six = c.add_node();
    c.spawn(six, &[("TREATY_FAILPOINTS", "participant::mid_install=pause")]);
    wait_log(&c, six, "waiting to be admitted").await;
    let (ok, out, err) = cli(&c, &["member", "add", &c.addr(six)]);
    assert!(ok, "member add failed: {out}{err}");
    assert!(out.contains("it is joining"), "{out}");
    c.kill(0);
    c.spawn(0, &[]);
    wait_roster(&c, 6, RosterState::Joining, Duration::from_secs(20)).await;

    // The joining node killed half way through its snapshot resumes it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match c.status(six).await {
            Some(s) if s.installing.is_some_and(|k| k > 0) => break,
            _ => assert!(Instant::now() < deadline, "participant 6 never started installing:\n{}", c.log(six)),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused = c.client_for(six).get_with(b"bulk/00001", ReadMode::Stale).await.unwrap_err();
    assert!(matches!(&refused, Error::NotReady(m) if m.contains("snapshot")), "{refused}");
    c.kill(six);
    c.spawn(six, &[]);
    wait_roster(&c, 6, RosterState::Active, Duration::from_secs(60)).await;
    c.wait_ready(Duration::from_secs(30)).await;
    assert!(c.log(six).contains("resuming a snapshot install"), "{}", c.log(six));

    // Removed, then the coordinator is killed while the member is leaving.
    let (ok, out, err) = cli(&c, &["member", "remove", "3"]);
    assert!(ok, "member remove failed: {out}{err}");
    assert!(out.contains("it is leaving"), "{out}");
    c.kill(0);
    c.spawn(0, &[]);
    wait_roster(&c, 3, RosterState::Removed, Duration::from_secs(30)).await;
    assert!(c.wait_exit(3, Duration::from_secs(15)), "participant 3 still runs after its removal");
    c.mark_removed(3);

    // The cluster goes on with 1, 2, 4, 5 and 6.
    for i in 0..50 {
        c.client().put(format!("after/{i:02}").as_bytes(), b"a").await.unwrap();
    }
    c.wait_ready(Duration::from_secs(30)).await;
    assert_eq!(c.client_for(1).cluster_status().await.unwrap().members, vec![1, 2, 4, 5, 6]);
    let data = stop_and_compare(&mut c);
    assert_eq!(data.len(), 40 * 100 + 100 + 50);
}

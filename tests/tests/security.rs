//! The attacks and operator mistakes of the hardening issue, done for real
//! against real processes: strangers and wrong identities on the ports,
//! hostile messages, a duplicated participant, an old coordinator copy, a
//! damaged coordinator directory, connection floods, slow frames and
//! descriptor exhaustion. Each test checks the data is intact afterwards.

use std::io::Write as _;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use treaty_client::{Condition, Error, Identity, ReadMode, Security, Txn, Write};
use treaty_common::rpc::{
    ClusterId, CoordinatorServiceClient, Incarnation, ParticipantServiceClient, PrepareBatch, PrepareItem, SyncRequest,
    Vote,
};
use treaty_common::tls::Expect;
use treaty_tests::{binary, cpu_ms, open_fds, raw_peer, rss_kib, set_fd_limit, Cluster};

/// A PREPARE batch of one transaction, as a hand-made peer would send it.
fn prepare_one(
    cluster: ClusterId,
    coordinator: Incarnation,
    replica: u64,
    to: u64,
    txn: Txn,
    attempt: u64,
) -> PrepareBatch {
    let items = vec![PrepareItem { attempt, txn: std::sync::Arc::new(txn) }];
    PrepareBatch { cluster, coordinator, replica, to, epoch: 1, min_applied: 0, placement_version: 0, items }
}

fn txn(key: &str, value: &str) -> Txn {
    Txn::new(vec![], vec![Write::Put(key.as_bytes().to_vec(), value.as_bytes().to_vec())])
}

/// The credentials of `who` in cluster `c`'s certificates directory.
fn as_identity(c: &Cluster, who: Identity) -> Security {
    Security::tls(&c.certs_dir(), who).unwrap()
}

/// Writes go through quickly and every replica holds the same data.
async fn cluster_is_healthy(c: &Cluster, key: &str, value: &str) {
    let t0 = Instant::now();
    c.client().put(key.as_bytes(), value.as_bytes()).await.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(2), "a put took {:?}", t0.elapsed());
    let v = c.assert_replicas_identical(&[key.as_bytes().to_vec()]).await;
    assert_eq!(v[0].as_ref().unwrap().0, value.as_bytes());
}

/// Rows 1, 2 and 11: nobody without the cluster's certificates gets a word
/// in: no certificate, plaintext, or a certificate from another cluster's CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_without_the_clusters_certificates_are_refused() {
    let c = Cluster::start(5).await;
    c.client().put(b"k", b"real").await.unwrap();
    let p4 = c.addr(4);

    // Plaintext, as the unauthenticated peer of row 1 would speak.
    let e = raw_peer::<ParticipantServiceClient>(&p4, &Security::Insecure, Expect::AnyNode).await.unwrap();
    let req = prepare_one(ClusterId(0), Incarnation { generation: 1, nonce: 0 }, 0, 4, txn("k", "injected"), 1);
    let r = e.prepare(treaty_common::rpc::deadline(Duration::from_secs(2)), req).await;
    assert!(r.is_err(), "a plaintext PREPARE got an answer: {r:?}");
    // What the server told it, in words.
    let mut raw = TcpStream::connect(&p4).unwrap();
    raw.write_all(&[0, 0, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
    let mut reply = String::new();
    std::io::Read::read_to_string(&mut raw, &mut reply).unwrap();
    assert!(reply.contains("requires TLS"), "{reply}");

    // The CLI insisting on plaintext is told why, and knows nothing committed.
    let out =
        c.cli().env_remove("TREATY_CERTS").args(["--insecure", "--endpoints", &p4, "put", "k", "x"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("requires TLS") && err.contains("retrying is safe"), "{err}");
    assert!(!err.contains("may or may not"), "{err}");

    // Another cluster's CA, even with a "coordinator" certificate.
    let other = tempfile::tempdir().unwrap();
    treaty_common::tls::create(other.path(), 5).unwrap();
    let foreign = Security::tls(other.path(), Identity::Coordinator).unwrap();
    let Err(e) = raw_peer::<ParticipantServiceClient>(&p4, &foreign, Expect::AnyNode).await else {
        panic!("a certificate from another CA was accepted");
    };
    assert!(e.to_string().contains("another CA"), "{e}");
    let e = raw_peer::<CoordinatorServiceClient>(&c.addr(0), &foreign, Expect::Coordinator).await.err().unwrap();
    assert!(e.to_string().contains("another CA"), "{e}");
    // The CLI says the same in words, and exits 3.
    let out = c.cli().env("TREATY_CERTS", other.path()).args(["--endpoints", &p4, "get", "k"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("another CA"), "{err}");

    // 40 rogue PREPAREs over plaintext (row 11): nothing is locked.
    for _ in 0..40 {
        let _ = TcpStream::connect(&p4).and_then(|mut s| s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0]));
    }
    cluster_is_healthy(&c, "k", "after").await;
    assert_eq!(c.client_for(4).get(b"k").await.unwrap().unwrap().value, b"after");
}

/// Rows 1, 9 and 11 with real credentials of the wrong kind: a client
/// certificate cannot act as the coordinator or a participant, and one
/// participant cannot speak for another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_or_participant_certificate_cannot_act_as_another_node() {
    let c = Cluster::start(5).await;
    c.client().put(b"secret", b"deleted later").await.unwrap();
    c.client().delete(b"secret").await.unwrap();
    let client = as_identity(&c, Identity::Client("admin".into()));
    let ctx = || treaty_common::rpc::deadline(Duration::from_secs(2));
    let status = c.status(4).await.unwrap();
    let me = status.coordinator.unwrap();

    let p4: ParticipantServiceClient = raw_peer(&c.addr(4), &client, Expect::AnyNode).await.unwrap();
    let injected = txn("k", "injected");
    let id = injected.id;
    let req = prepare_one(status.cluster.unwrap(), me, status.replica, 4, injected, 1);
    for _ in 0..40 {
        let e = p4.prepare(ctx(), req.clone()).await.unwrap().unwrap_err();
        assert!(matches!(&e, Error::Denied(m) if m.contains("PREPARE is only for the coordinator")), "{e}");
    }
    let e = p4.decide(ctx(), req.cluster, me, vec![(id, 1000)], vec![], vec![]).await.unwrap().unwrap_err();
    assert!(matches!(e, Error::Denied(_)), "{e}");
    let e = p4.decide(ctx(), req.cluster, me, vec![], vec![(id, 1)], vec![]).await.unwrap().unwrap_err();
    assert!(matches!(e, Error::Denied(_)), "{e}");

    // The decision log (history, deleted values included) is for participants.
    let coord: CoordinatorServiceClient = raw_peer(&c.addr(0), &client, Expect::Coordinator).await.unwrap();
    let e = coord.fetch_log(ctx(), req.cluster, 1, 100, 0).await.unwrap().unwrap_err();
    assert!(matches!(&e, Error::Denied(m) if m.contains("only for participants")), "{e}");
    let sync = |node_id| SyncRequest {
        node_id,
        replica: 1,
        cluster: Some(req.cluster),
        coordinator: Some(me),
        seen_index: 0,
        undecided: 0,
        applied_index: 0,
        in_doubt: vec![],
        installing: false,
        installed: 0,
    };
    assert!(matches!(coord.sync(ctx(), sync(2)).await.unwrap(), Err(Error::Denied(_))));

    // Participant 2's certificate may check in only as participant 2, and
    // may not prepare on participant 4.
    let p2 = as_identity(&c, Identity::Participant(2));
    let as_p2: CoordinatorServiceClient = raw_peer(&c.addr(0), &p2, Expect::Coordinator).await.unwrap();
    let e = as_p2.sync(ctx(), sync(3)).await.unwrap().unwrap_err();
    assert!(matches!(&e, Error::Denied(m) if m.contains("authenticated as participant 2")), "{e}");
    let p4_as_p2: ParticipantServiceClient = raw_peer(&c.addr(4), &p2, Expect::AnyNode).await.unwrap();
    assert!(matches!(p4_as_p2.prepare(ctx(), req.clone()).await.unwrap(), Err(Error::Denied(_))));
    // A peer may ask for snapshot chunks, but not of partitions that do not exist.
    let e = p4_as_p2.snapshot(ctx(), req.cluster, Some(vec![u32::MAX]), vec![], 0).await.unwrap().unwrap_err();
    assert!(matches!(&e, Error::Invalid(m) if m.contains("there is no partition")), "{e}");
    // A node certificate is pinned to its identity: participant 2's
    // certificate at participant 4's address is refused by the coordinator.
    let coord_as_p2 = as_identity(&c, Identity::Participant(2));
    let e = raw_peer::<ParticipantServiceClient>(&c.addr(4), &coord_as_p2, Expect::Participant(3)).await.err();
    assert!(e.unwrap().to_string().contains("is participant 4, not participant 3"));

    cluster_is_healthy(&c, "k", "real").await;
    for i in 1..=5 {
        assert_eq!(c.client_for(i).get(b"k").await.unwrap().unwrap().value, b"real");
    }
}

/// Rows 2 and 3: even messages that carry the coordinator's identity (a
/// buggy or compromised coordinator) are validated and answered with an
/// error; the participant never exits or panics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_messages_in_the_coordinators_name_never_crash_a_participant() {
    let mut c = Cluster::start(5).await;
    let last = c.client().put(b"k", b"1").await.unwrap().index;
    c.wait_ready(Duration::from_secs(10)).await;
    let coord = as_identity(&c, Identity::Coordinator);
    let ctx = || treaty_common::rpc::deadline(Duration::from_secs(3));
    let st = c.status(4).await.unwrap();
    let (cluster, me) = (st.cluster.unwrap(), st.coordinator.unwrap());
    let p4: ParticipantServiceClient = raw_peer(&c.addr(4), &coord, Expect::Participant(4)).await.unwrap();
    let prepare =
        |to, coordinator, replica, txn: Txn, attempt| prepare_one(cluster, coordinator, replica, to, txn, attempt);
    // One vote, or the batch's error.
    let vote = |r: Result<Vec<Result<Vote, Error>>, Error>| r.and_then(|mut v| v.pop().expect("one vote"));
    // Row 2: a PREPARE for participant 9999. Five of them.
    for _ in 0..5 {
        let r = vote(p4.prepare(ctx(), prepare(9999, me, st.replica, txn("x", "1"), 1)).await.unwrap());
        assert!(matches!(&r, Err(Error::Identity(m)) if m.contains("participant 9999")), "{r:?}");
    }
    // An older incarnation is refused for good; the same generation with
    // another nonce (a restored newest copy reuses the generation of the run
    // after the copy) only has to check in first. Then the wrong replica, an
    // invalid txn.
    let old = Incarnation { generation: me.generation - 1, nonce: me.nonce };
    assert!(matches!(
        vote(p4.prepare(ctx(), prepare(4, old, st.replica, txn("x", "1"), 1)).await.unwrap()),
        Err(Error::Fenced(_))
    ));
    let twin = Incarnation { generation: me.generation, nonce: me.nonce ^ 1 };
    let r = vote(p4.prepare(ctx(), prepare(4, twin, st.replica, txn("x", "1"), 1)).await.unwrap());
    assert!(matches!(&r, Err(Error::NotReady(m)) if m.contains("not checked in")), "{r:?}");
    assert!(matches!(
        vote(p4.prepare(ctx(), prepare(4, me, 42, txn("x", "1"), 1)).await.unwrap()),
        Err(Error::NotReady(_))
    ));
    let empty = Txn::new(vec![], vec![]);
    assert!(matches!(
        vote(p4.prepare(ctx(), prepare(4, me, st.replica, empty, 1)).await.unwrap()),
        Err(Error::Invalid(_))
    ));
    // Row 3: prepare, commit far ahead, then abort the same attempt.
    let t = txn("hostile", "1");
    let v = vote(p4.prepare(ctx(), prepare(4, me, st.replica, t.clone(), 7)).await.unwrap()).unwrap();
    assert_eq!(v, Vote::Yes);
    p4.decide(ctx(), cluster, me, vec![(t.id, last + 1000)], vec![], vec![]).await.unwrap().unwrap();
    let e = p4.decide(ctx(), cluster, me, vec![], vec![(t.id, 7)], vec![]).await.unwrap().unwrap_err();
    assert!(e.to_string().contains("committed at index"), "{e}");
    let e = p4.decide(ctx(), cluster, me, vec![(t.id, last + 1)], vec![], vec![]).await.unwrap().unwrap_err();
    assert!(e.to_string().contains("already committed"), "{e}");
    assert!(p4.decide(ctx(), cluster, me, vec![(t.id, 0)], vec![], vec![]).await.unwrap().is_err());
    // A burst of random messages.
    let mut rng = 0x9e3779b97f4a7c15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for _ in 0..200 {
        let id = treaty_client::TxnId(u128::from(next() % 8));
        let _ = match next() % 3 {
            // Far from the indexes the real cluster reaches during this test.
            0 => p4.decide(ctx(), cluster, me, vec![(id, 1_000_000 + next() % 2000)], vec![], vec![]).await,
            1 => p4.decide(ctx(), cluster, me, vec![], vec![(id, next() % 3)], vec![]).await,
            _ => {
                let mut t = txn(&format!("r{}", next() % 4), "v");
                t.id = id;
                p4.prepare(ctx(), prepare(4, me, st.replica, t, next() % 3)).await.map(|r| r.map(|_| ()))
            }
        };
    }
    // Still alive, and the cluster's real work goes on.
    assert!(c.status(4).await.is_some(), "participant 4 died");
    assert!(!c.wait_exit(4, Duration::from_millis(100)), "participant 4 exited");
    assert!(!c.log(4).contains("panicked"), "participant 4 panicked");
    let v = c.client().put(b"k", b"2").await.unwrap();
    assert_eq!(c.client_for(4).get(b"k").await.unwrap().unwrap().version, v.index);
}

/// Row 5: a second `treaty-participant --id 2` (its own data dir and port)
/// while participant 2 runs is refused and exits; it never serves a read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_claiming_a_live_participant_id_is_refused() {
    let c = Cluster::start(5).await;
    c.client().put(b"k", b"val2").await.unwrap();
    let port = treaty_tests::free_ports(1)[0];
    let dup_dir = c.dir.path().join("duplicate");
    let dup = std::process::Command::new(binary("treaty-participant"))
        .args(["--id", "2", "--listen", &format!("127.0.0.1:{port}"), "--coordinator", &c.addr(0), "--data-dir"])
        .arg(&dup_dir)
        .args(c.security_args())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut dup = KillOnDrop(Some(dup));
    // While it runs, it serves no linearizable read and the cluster moves on.
    let dup_client = c.client_with(vec![format!("127.0.0.1:{port}")]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = dup.0.as_mut().unwrap().try_wait().unwrap() {
            break s;
        }
        c.client().put(b"k", b"val4").await.unwrap();
        if let Ok(v) = dup_client.get(b"k").await {
            panic!("the duplicate served a linearizable read: {v:?}");
        }
        assert!(Instant::now() < deadline, "the duplicate was not refused within 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let out = dup.0.take().unwrap().wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("already running") && err.contains("claims the same id"), "{err}");
    // The real participant 2 kept its place.
    let s = c.client().cluster_status().await.unwrap();
    assert_eq!(s.members, vec![1, 2, 3, 4, 5]);
    assert_eq!(c.client_for(2).get(b"k").await.unwrap().unwrap().value, b"val4");
    cluster_is_healthy(&c, "k", "val5").await;
}

/// Row 4: the README's backup advice followed with an old copy. The
/// restored coordinator is fenced: it refuses writes with the participant
/// and both indexes named; nothing is lost; the newest copy then works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restoring_an_old_coordinator_copy_is_fenced_and_loses_nothing() {
    let mut c = Cluster::start(3).await;
    c.client().put(b"a", b"1").await.unwrap();
    c.stop(0);
    let old = c.dir.path().join("coordinator-old");
    copy_dir(&c.data_dir(0), &old);
    c.spawn(0, &[]);
    c.wait_ready(Duration::from_secs(20)).await;
    let mut last = 0;
    for i in 0..5 {
        last = c.client().put(b"a", format!("v{i}").as_bytes()).await.unwrap().index;
    }
    c.wait_applied(Duration::from_secs(10)).await;
    c.stop(0);
    let newest = c.dir.path().join("coordinator-newest");
    copy_dir(&c.data_dir(0), &newest);
    // As `cluster.sh backup` does: start again after the copy (a new
    // incarnation the copy knows nothing of, which decides nothing), stop.
    c.spawn(0, &[]);
    c.wait_ready(Duration::from_secs(20)).await;
    c.stop(0);
    // Restore the old copy and start it.
    std::fs::remove_dir_all(c.data_dir(0)).unwrap();
    copy_dir(&old, &c.data_dir(0));
    c.spawn(0, &[]);
    let client = c.client();
    let deadline = Instant::now() + Duration::from_secs(10);
    let e = loop {
        match client.put(b"a", b"overwrite").await {
            Err(e @ Error::Fenced(_)) => break e,
            Ok(r) => panic!("the old coordinator accepted a write at index {}", r.index),
            Err(e) => assert!(Instant::now() < deadline, "not fenced within 10 s: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let msg = e.to_string();
    assert!(msg.contains("participant") && msg.contains("restore the newest copy"), "{msg}");
    assert!(msg.contains(&format!("{last}")) || msg.contains("no record"), "names the index or incarnation: {msg}");
    // `treaty status` says it too; outcome lookups are refused.
    let out = c.cli().args(["--endpoints", &c.participant_addrs().join(","), "status"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("COORDINATOR: "), "{out:?}");
    assert!(matches!(client.outcome(treaty_client::TxnId(7)).await, Err(Error::Fenced(_))));
    // Nothing changed on the replicas.
    for i in 1..=3 {
        let v = c.client_for(i).get_with(b"a", ReadMode::Stale).await.unwrap().unwrap();
        assert_eq!((v.value.as_slice(), v.version), (&b"v4"[..], last), "participant {i}");
    }
    // The way out: the newest copy. It starts as the generation the run
    // after the copy also had (with another nonce). Participant 1 is paused
    // meanwhile, so it still follows that run when the first PREPARE comes:
    // it must ask to check in (retryable), not refuse the newest copy.
    c.kill(0);
    std::fs::remove_dir_all(c.data_dir(0)).unwrap();
    copy_dir(&newest, &c.data_dir(0));
    let p1 = c.pid(1).unwrap() as i32;
    unsafe { libc::kill(p1, libc::SIGSTOP) };
    c.spawn(0, &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.client_for(2).cluster_status().await.is_err() {
        assert!(Instant::now() < deadline, "the newest copy never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Participants 2 and 3 check in every 200 ms (one is a verification
    // quorum here); participant 1 must not stay away long enough for its
    // lease to run out, or it is excluded and never sees the PREPARE.
    tokio::time::sleep(Duration::from_millis(300)).await;
    unsafe { libc::kill(p1, libc::SIGCONT) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let r = loop {
        match c.client().put(b"a", b"after").await {
            Ok(r) => break r,
            Err(e @ Error::Fenced(_)) => panic!("the newest copy was refused: {e}"),
            Err(e) => assert!(Instant::now() < deadline, "the newest copy takes no write: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(r.index, last + 1);
    c.assert_replicas_identical(&[b"a".to_vec()]).await;
}

/// The subtle case of row 4: a coordinator incarnation that ran after the
/// copy decided a transaction and died before telling anyone. The
/// participants hold it prepared, with no index to show for it. The restored
/// copy must not presume it aborted: it is fenced, and the real data then
/// commits it everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_that_missed_a_decision_nobody_heard_of_is_fenced() {
    let mut c = Cluster::start(3).await;
    c.client().put(b"k", b"before").await.unwrap();
    c.wait_applied(Duration::from_secs(10)).await;
    c.stop(0);
    let copy = c.dir.path().join("coordinator-copy");
    copy_dir(&c.data_dir(0), &copy);
    // Decides, makes the decision durable, dies before anyone hears.
    c.spawn(0, &[("TREATY_FAILPOINTS", "coordinator::after_decision_sync=return")]);
    c.wait_ready(Duration::from_secs(20)).await;
    let t = txn("k", "decided");
    let _ = c.client().with_timeout(Duration::from_secs(3)).commit(t.clone()).await;
    assert!(c.wait_exit(0, Duration::from_secs(10)), "the coordinator did not stop at the failpoint");
    let real = c.dir.path().join("coordinator-real");
    copy_dir(&c.data_dir(0), &real);
    std::fs::remove_dir_all(c.data_dir(0)).unwrap();
    copy_dir(&copy, &c.data_dir(0));
    c.spawn(0, &[]);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match c.client().put(b"other", b"x").await {
            Err(Error::Fenced(m)) => {
                assert!(m.contains("may have committed them"), "{m}");
                break;
            }
            Ok(r) => panic!("the copy accepted a write at index {}", r.index),
            Err(e) => assert!(Instant::now() < deadline, "not fenced: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Still prepared on every replica: neither applied nor dropped.
    for i in 1..=3 {
        let v = c.client_for(i).get_with(b"k", ReadMode::Stale).await.unwrap().unwrap();
        assert_eq!(v.value, b"before", "participant {i}");
        assert_eq!(c.status(i).await.unwrap().in_doubt.len(), 1, "participant {i}");
    }
    // The real data: the decision stands, everywhere.
    c.kill(0);
    std::fs::remove_dir_all(c.data_dir(0)).unwrap();
    copy_dir(&real, &c.data_dir(0));
    c.spawn(0, &[]);
    c.wait_ready(Duration::from_secs(20)).await;
    let v = c.assert_replicas_identical(&[b"k".to_vec()]).await;
    assert_eq!(v[0].as_ref().unwrap().0, b"decided");
    assert!(matches!(c.client().outcome(t.id).await.unwrap(), treaty_client::Outcome::Committed(_)));
}

/// Row 10: a coordinator whose database was truncated (or lost its recent
/// tail) never starts a new cluster over it, and never reuses an index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_coordinator_dir_never_becomes_a_new_cluster() {
    let mut c = Cluster::start(3).await;
    for i in 0..20 {
        c.client().put(format!("k{i}").as_bytes(), b"v").await.unwrap();
    }
    c.wait_applied(Duration::from_secs(10)).await;
    c.stop(0);
    // Truncate sled's data file and remove its snapshots.
    let dir = c.data_dir(0);
    for entry in std::fs::read_dir(&dir).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with("snap.") {
            std::fs::remove_file(&p).unwrap();
        }
    }
    std::fs::OpenOptions::new().write(true).open(dir.join("db")).unwrap().set_len(0).unwrap();
    let mut cmd = c.command(0);
    let out = tokio::time::timeout(Duration::from_secs(20), tokio::task::spawn_blocking(move || cmd.output()))
        .await
        .expect("the damaged coordinator started instead of refusing")
        .unwrap()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("damaged") && err.contains("backup"), "{err}");
    // The participants never joined anything else: their data is there.
    for i in 1..=3 {
        let s = c.status(i).await.unwrap();
        assert_eq!(s.applied_index, 20, "participant {i}");
    }
}

/// A child process that is killed if the test fails before reaping it.
struct KillOnDrop(Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Row 6: 1,000 connections that send one byte and close, on the
/// coordinator and on a participant, with TLS and without: every socket is
/// closed at once and the process does not spin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_half_open_connections_leave_nothing_behind() {
    for insecure in [false, true] {
        let mut c = Cluster::new(1);
        c.insecure = insecure;
        for i in 0..=1 {
            c.spawn(i, &[]);
        }
        c.wait_ready(Duration::from_secs(20)).await;
        for node in [0, 1] {
            let pid = c.pid(node).unwrap();
            let fds_before = open_fds(pid);
            let addr = c.addr(node);
            tokio::task::spawn_blocking(move || {
                for _ in 0..1000 {
                    if let Ok(mut s) = TcpStream::connect(&addr) {
                        let _ = s.write_all(&[0]);
                    }
                }
            })
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(500)).await;
            let cpu0 = cpu_ms(pid);
            tokio::time::sleep(Duration::from_secs(2)).await;
            let busy = cpu_ms(pid) - cpu0;
            let fds = open_fds(pid);
            assert!(fds <= fds_before + 10, "node {node} (insecure {insecure}): {fds_before} fds before, {fds} after");
            assert!(busy < 300, "node {node} (insecure {insecure}) used {busy} ms of CPU in 2 s while idle");
        }
        cluster_is_healthy(&c, "k", if insecure { "plain" } else { "tls" }).await;
    }
}

/// Row 7: slow and oversized frames. An announced frame over the limit is
/// refused at once; frames sent slowly are cut off at the frame timeout;
/// memory grows with bytes received, not with bytes announced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_oversized_frames_are_cut_off_and_memory_stays_bounded() {
    let mut c = Cluster::new(1);
    c.coordinator_args.extend(["--frame-timeout-ms".into(), "3000".into()]);
    for i in 0..=1 {
        c.spawn(i, &[]);
    }
    c.wait_ready(Duration::from_secs(20)).await;
    let pid = c.pid(0).unwrap();
    let rss_before = rss_kib(pid);
    let client = as_identity(&c, Identity::Client("admin".into()));
    // 200 authenticated connections, each announcing an 8 MiB frame, then a
    // slow trickle of a just-allowed 5 MiB one.
    let mut conns = Vec::new();
    for i in 0..200 {
        let mut io = treaty_common::net::connect(&c.addr(0), &client, &Expect::Coordinator, Duration::from_secs(5))
            .await
            .unwrap();
        use tokio::io::AsyncWriteExt;
        let len: u32 = if i % 2 == 0 { 8 << 20 } else { treaty_common::net::MAX_FRAME as u32 };
        io.write_all(&len.to_be_bytes()).await.unwrap();
        io.write_all(&[0u8; 4096]).await.unwrap();
        conns.push(io);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_during = rss_kib(pid);
    assert!(
        rss_during < rss_before + 100 * 1024,
        "RSS grew from {rss_before} KiB to {rss_during} KiB for 200 announced frames"
    );
    // Past the frame timeout the server has closed every one of them.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut closed = 0;
    for io in conns.iter_mut() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let _ = io.write_all(&[0u8; 16]).await;
        let mut buf = [0u8; 16];
        match tokio::time::timeout(Duration::from_secs(2), io.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => closed += 1,
            _ => {}
        }
    }
    assert_eq!(closed, 200, "connections left open past the frame timeout");
    drop(conns);
    // Unauthenticated connections that never finish a handshake go too.
    let fds_before = open_fds(pid);
    let idle: Vec<TcpStream> = (0..100).filter_map(|_| TcpStream::connect(c.addr(0)).ok()).collect();
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert!(open_fds(pid) <= fds_before + 10, "handshake-less connections still open");
    drop(idle);
    cluster_is_healthy(&c, "k", "v").await;
}

/// Row 8: a node whose file descriptors run out keeps serving: connections
/// past its limit are refused with a message, running out of descriptors
/// outright pauses accepting, and writes (which sync to disk) go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_file_descriptors_refuses_connections_but_keeps_serving() {
    let c = Cluster::start(3).await;
    c.client().put(b"k", b"before").await.unwrap();
    for node in [3, 0] {
        let pid = c.pid(node).unwrap();
        // Leave only 20 descriptors free, then flood with idle connections.
        set_fd_limit(pid, open_fds(pid) as u64 + 20);
        let addr = c.addr(node);
        let flood: Vec<TcpStream> = (0..200).filter_map(|_| TcpStream::connect(&addr).ok()).collect();
        assert!(!flood.is_empty());
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Writes still commit: the coordinator and participant 3 keep their
        // connections to each other, and their syncs still work.
        let value = format!("during-{node}");
        let t0 = Instant::now();
        let r = c.client_for(1).put(b"k", value.as_bytes()).await.unwrap();
        assert!(t0.elapsed() < Duration::from_secs(3), "a write took {:?}", t0.elapsed());
        assert!(c.pid(node).is_some() && open_fds(pid) > 0, "node {node} died");
        drop(flood);
        // Once the flood is gone (handshakes time out), new connections work.
        set_fd_limit(pid, 4096);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let v = c.client_for(3).get(b"k").await.unwrap().unwrap();
        assert_eq!((v.value, v.version), (value.into_bytes(), r.index));
        let log = c.log(node);
        assert!(
            log.contains("out of file descriptors") || log.contains("connection limit reached"),
            "node {node} logged nothing about the flood"
        );
        assert!(log.matches("out of file descriptors").count() <= 3, "logged once per interval, not per connection");
    }
    c.assert_replicas_identical(&[b"k".to_vec()]).await;
}

/// The connection cap: past `--max-connections`, a client is told so in words.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_connection_limit_a_client_is_told_why() {
    let mut c = Cluster::new(1);
    for i in 0..=1 {
        c.spawn(i, &[("TREATY_MAX_CONNECTIONS", "10")]);
    }
    c.wait_ready(Duration::from_secs(20)).await;
    // Let the harness's own status connections close, then fill every slot.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut idle = Vec::new();
    loop {
        let mut s = TcpStream::connect(c.addr(1)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        let mut reply = String::new();
        let refused = std::io::Read::read_to_string(&mut s, &mut reply).is_ok();
        if refused {
            assert!(reply.contains("connection limit (10)"), "{reply}");
            break;
        }
        idle.push(s);
        assert!(idle.len() <= 10, "more than 10 connections accepted");
    }
    let out = c.cli().args(["--endpoints", &c.addr(1), "get", "k"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("connection limit (10)") && err.contains("--max-connections"), "{err}");
    drop(idle);
    tokio::time::sleep(Duration::from_secs(6)).await;
    cluster_is_healthy(&c, "k", "v").await;
}

/// Row 13: a write while the coordinator is down provably never reached it:
/// "not committed, retry is safe", exit 3, and indeed nothing committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_never_reached_the_coordinator_is_reported_as_not_committed() {
    let mut c = Cluster::start(3).await;
    let before = c.client().put(b"k", b"before").await.unwrap().index;
    c.kill(0);
    let eps = c.participant_addrs().join(",");
    for _ in 0..5 {
        let out = c.cli().args(["--endpoints", &eps, "put", "k", "lost?"]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{err}");
        assert!(err.contains("not committed") && err.contains("retrying is safe"), "{err}");
        assert!(!err.contains("may or may not"), "{err}");
    }
    c.spawn(0, &[]);
    c.wait_ready(Duration::from_secs(20)).await;
    let v = c.client().get(b"k").await.unwrap().unwrap();
    assert_eq!((v.value.as_slice(), v.version), (&b"before"[..], before));
}

/// Item 2 of the issue: security is on by default; `--insecure` is refused
/// off loopback, and a node without credentials says what to do.
#[test]
fn a_node_without_credentials_or_insecure_off_loopback_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(binary("treaty-coordinator"))
            .args(args)
            .arg("--data-dir")
            .arg(dir.path())
            .env_remove("TREATY_CERTS")
            .env_remove("TREATY_INSECURE")
            .output()
            .unwrap()
    };
    let out = run(&["--listen", "127.0.0.1:0", "--participants", "127.0.0.1:1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no TLS credentials: pass --certs DIR"));
    let out = run(&["--listen", "0.0.0.0:0", "--participants", "127.0.0.1:1", "--insecure"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a loopback address"));
    let out = std::process::Command::new(binary("treaty-participant"))
        .args(["--id", "3", "--listen", "127.0.0.1:0", "--certs"])
        .arg(dir.path())
        .arg("--data-dir")
        .arg(dir.path().join("p"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ca.pem"), "{out:?}");
}

/// Item 6: `put KEY --file F` and `put KEY -` take values of any bytes up to
/// the limit; over it, a clear error and nothing stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_from_files_and_stdin_up_to_the_limit() {
    let c = Cluster::start(3).await;
    let eps = c.participant_addrs().join(",");
    let big: Vec<u8> = (0..treaty_common::types::MAX_VALUE_LEN).map(|i| (i * 7 % 256) as u8).collect();
    let file = c.dir.path().join("value.bin");
    std::fs::write(&file, &big).unwrap();
    let out = c.cli().args(["--endpoints", &eps, "put", "big", "--file"]).arg(&file).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("\u{0}"), "the value was echoed");
    assert_eq!(c.client().get(b"big").await.unwrap().unwrap().value, big);
    let mut child = c
        .cli()
        .args(["--endpoints", &eps, "put", "piped", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"\xff\x00bytes\n").unwrap();
    assert!(child.wait_with_output().unwrap().status.success());
    assert_eq!(c.client().get(b"piped").await.unwrap().unwrap().value, b"\xff\x00bytes\n");
    std::fs::write(&file, vec![0u8; treaty_common::types::MAX_VALUE_LEN + 1]).unwrap();
    let out = c.cli().args(["--endpoints", &eps, "put", "toobig", "--file"]).arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("1 MiB limit"));
    assert_eq!(c.client().get(b"toobig").await.unwrap(), None);
    // A conditional write still works through the same credentials.
    let t = Txn::new(vec![Condition::Exists(b"big".to_vec())], vec![Write::Delete(b"big".to_vec())]);
    c.client().commit(t).await.unwrap();
}

/// `treaty demo` whose coordinator cannot start (here its data dir is a
/// file) says so with the coordinator's own message, as soon as it exits,
/// rather than only that the cluster did not become ready.
#[test]
fn the_demo_says_why_a_node_would_not_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("coordinator"), "not a directory").unwrap();
    let port = treaty_tests::free_ports(6)[0];
    let out = std::process::Command::new(binary("treaty"))
        .args(["demo", "--no-repl", "--no-redis", "--no-metrics", "--port", &port.to_string(), "--data-dir"])
        .arg(dir.path())
        .env_remove("TREATY_REPLICATION")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("error: coordinator exited (exit status: 1)"), "{stderr}");
    assert!(stderr.contains("cannot read data dir") && stderr.contains("Not a directory"), "{stderr}");
}

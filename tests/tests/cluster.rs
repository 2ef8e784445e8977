//! End-to-end behaviour of a real cluster: one coordinator and five
//! participants as processes on loopback.

use std::io::{Read, Write as _};
use std::process::Command;
use std::time::{Duration, Instant};

use treaty_client::{Condition, Error, Outcome, ReadMode, Txn, Write};
use treaty_tests::{binary, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_one_replica_are_read_from_all_five() {
    let c = Cluster::start(5).await;
    let via1 = c.client_for(1);
    let put = via1.put(b"greeting", b"hello").await.unwrap();
    for i in 1..=5 {
        let v = c.client_for(i).get(b"greeting").await.unwrap().expect("present");
        assert_eq!((v.value.as_slice(), v.version), (&b"hello"[..], put.index), "participant {i}");
    }
    // Delete; a missing key is None, an empty value is Some(empty).
    via1.put(b"empty", b"").await.unwrap();
    via1.delete(b"greeting").await.unwrap();
    for i in 1..=5 {
        let client = c.client_for(i);
        assert_eq!(client.get(b"greeting").await.unwrap(), None);
        assert_eq!(client.get(b"empty").await.unwrap().unwrap().value, b"");
    }
    let applied = c.wait_ready(Duration::from_secs(5)).await;
    assert_eq!(applied, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditions_decide_and_aborts_name_the_failing_condition() {
    let c = Cluster::start(3).await;
    let client = c.client();
    let v1 = client.put(b"acct/a", b"100").await.unwrap().index;
    // Transfer with balance conditions: all or nothing.
    let ok = client
        .txn()
        .when(Condition::ValueEquals(b"acct/a".to_vec(), b"100".to_vec()))
        .when(Condition::Missing(b"acct/b".to_vec()))
        .when(Condition::VersionEquals(b"acct/a".to_vec(), v1))
        .put(b"acct/a", b"60")
        .put(b"acct/b", b"40")
        .commit()
        .await
        .unwrap();
    let err = client
        .txn()
        .when(Condition::ValueEquals(b"acct/a".to_vec(), b"100".to_vec()))
        .put(b"acct/a", b"0")
        .put(b"acct/c", b"100")
        .commit()
        .await
        .unwrap_err();
    assert_eq!(err, Error::ConditionFailed(format!("acct/a = 100 (found value 60 at version {})", ok.index)));
    let err = client.txn().when(Condition::Exists(b"nope".to_vec())).delete(b"acct/a").commit().await.unwrap_err();
    assert!(err.to_string().contains("nope exists (found missing)"), "{err}");
    let values = c.assert_replicas_identical(&[b"acct/a".to_vec(), b"acct/b".to_vec(), b"acct/c".to_vec()]).await;
    assert_eq!(values[0], Some((b"60".to_vec(), ok.index)));
    assert_eq!(values[1], Some((b"40".to_vec(), ok.index)));
    assert_eq!(values[2], None, "aborted write is not visible");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubmitting_a_transaction_id_returns_the_first_outcome() {
    let c = Cluster::start(3).await;
    let client = c.client();
    let txn = Txn::new(vec![], vec![Write::Put(b"once".to_vec(), b"1".to_vec())]);
    let first = client.commit(txn.clone()).await.unwrap();
    client.put(b"other", b"x").await.unwrap();
    let again = client.commit(txn.clone()).await.unwrap();
    assert_eq!(first, again);
    assert_eq!(c.client().get(b"once").await.unwrap().unwrap().version, first.index, "applied once");
    // A failed condition is a final outcome too.
    let cas = Txn::new(vec![Condition::Missing(b"once".to_vec())], vec![Write::Put(b"once".to_vec(), b"2".to_vec())]);
    let e1 = client.commit(cas.clone()).await.unwrap_err();
    client.delete(b"once").await.unwrap();
    assert_eq!(client.commit(cas).await.unwrap_err(), e1, "retry must not re-evaluate");
    assert_eq!(client.get(b"once").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_compare_and_swap_increments_are_serializable() {
    let c = Cluster::start(3).await;
    c.client().put(b"counter", b"0").await.unwrap();
    let mut tasks = Vec::new();
    for w in 0..6 {
        let client = c.client_with(c.participant_addrs().into_iter().cycle().skip(w).take(3).collect());
        tasks.push(tokio::spawn(async move {
            let mut wins = 0u64;
            for _ in 0..15 {
                let cur = client.get(b"counter").await.unwrap().unwrap();
                let n: u64 = String::from_utf8(cur.value.clone()).unwrap().parse().unwrap();
                let txn = Txn::new(
                    vec![Condition::VersionEquals(b"counter".to_vec(), cur.version)],
                    vec![Write::Put(b"counter".to_vec(), (n + 1).to_string().into_bytes())],
                );
                match client.commit(txn).await {
                    Ok(_) => wins += 1,
                    Err(Error::ConditionFailed(_)) => {}
                    Err(e) => panic!("unexpected: {e}"),
                }
            }
            wins
        }));
    }
    let mut wins = 0;
    for t in tasks {
        wins += t.await.unwrap();
    }
    assert!(wins > 0);
    let v = c.assert_replicas_identical(&[b"counter".to_vec()]).await;
    assert_eq!(v[0].as_ref().unwrap().0, wins.to_string().into_bytes(), "lost update: {wins} successful increments");
}

/// Concurrent writes share PREPARE batches, syncs and outcome messages:
/// unbatched, every commit costs each participant one PREPARE and one
/// outcome RPC and one sync. The counters are the ones `treaty status` shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_share_prepare_batches_syncs_and_outcome_messages() {
    let c = Cluster::start(3).await;
    let before = c.client().cluster_status().await.unwrap();
    let clients: Vec<_> = (0..4).map(|_| std::sync::Arc::new(c.client())).collect();
    for round in 0..3 {
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let client = clients[i % clients.len()].clone();
                tokio::spawn(async move { client.put(format!("k{round}-{i}").as_bytes(), b"v").await.unwrap() })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    }
    assert!(c.wait_applied(Duration::from_secs(10)).await);
    let after = c.client().cluster_status().await.unwrap();
    let commits = after.coordinator.commits - before.coordinator.commits;
    assert_eq!(commits, 192);
    let coordinator_rpcs = after.coordinator.rpcs - before.coordinator.rpcs;
    // 192 submits plus, unbatched, 2 x 3 x 192 PREPAREs and outcomes.
    assert!(coordinator_rpcs < 192 + 3 * 192, "coordinator: {coordinator_rpcs} RPCs for {commits} commits");
    for ((id, _, b), (_, _, a)) in before.participants.iter().zip(&after.participants) {
        let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
        let (rpcs, syncs) = (a.rpcs - b.rpcs, a.syncs - b.syncs);
        assert!(rpcs < commits, "participant {id}: {rpcs} RPCs for {commits} commits (unbatched: {})", 2 * commits);
        assert!(syncs < commits / 2, "participant {id}: {syncs} syncs for {commits} commits");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_limit_input_gets_a_clear_error_and_stores_nothing() {
    let c = Cluster::start(3).await;
    let client = c.client();
    client.put(b"keep", b"safe").await.unwrap();
    let e = client.put(&vec![b'k'; 1025], b"v").await.unwrap_err();
    assert!(matches!(&e, Error::Invalid(m) if m.contains("1025 bytes") && m.contains("1 KiB")), "{e}");
    let e = client.put(b"big", &vec![0u8; 1024 * 1024 + 1]).await.unwrap_err();
    assert!(matches!(&e, Error::Invalid(m) if m.contains("1 MiB")), "{e}");
    let writes = (0..5).map(|i| Write::Put(vec![b'w', i], vec![1u8; 1024 * 1024])).collect();
    let e = client.commit(Txn::new(vec![], writes)).await.unwrap_err();
    assert!(e.to_string().contains("4 MiB"), "{e}");
    // Exactly at the limits is fine (1 MiB value through the whole path).
    let at_limit = client.put(&vec![b'k'; 1024], &vec![7u8; 1024 * 1024]).await.unwrap();
    let got = client.get(&vec![b'k'; 1024]).await.unwrap().unwrap();
    assert_eq!((got.value.len(), got.version), (1024 * 1024, at_limit.index));
    let v = c.assert_replicas_identical(&[b"keep".to_vec(), b"big".to_vec()]).await;
    assert_eq!(v[0].as_ref().unwrap().0, b"safe");
    assert_eq!(v[1], None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_any_port_is_rejected_and_everyone_else_is_served() {
    let c = Cluster::start(3).await;
    c.client().put(b"k", b"v").await.unwrap();
    for i in [0, 1, 2] {
        // Text: told what the port is, then closed.
        let mut s = std::net::TcpStream::connect(c.addr(i)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut reply = String::new();
        let _ = s.read_to_string(&mut reply);
        assert!(reply.contains("Treaty's RPC protocol"), "node {i} replied {reply:?}");
        // A plausible header with an undecodable body: the connection closes.
        let mut s = std::net::TcpStream::connect(c.addr(i)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&[0, 0, 0, 8, 0xff, 0xfe, 0xfd, 0xfc, 1, 2, 3, 4]).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
    }
    let client = c.client();
    client.put(b"k2", b"v2").await.unwrap();
    assert_eq!(client.get(b"k").await.unwrap().unwrap().value, b"v");
    c.assert_replicas_identical(&[b"k".to_vec(), b"k2".to_vec()]).await;
}

/// Five replicas, one dies: writes stall until its lease has expired, then
/// continue without it; it is readmitted when it comes back and catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_participant_is_excluded_after_its_lease_and_readmitted_later() {
    let mut c = Cluster::start(5).await;
    let client = c.client_for(1);
    client.put(b"before", b"1").await.unwrap();
    c.kill(3);
    let t0 = Instant::now();
    let during = client.put(b"during", b"2").await.unwrap();
    let stall = t0.elapsed();
    // Detection 1 s + lease 2 s + margin 0.2 s, plus a retry tick.
    assert!(stall <= Duration::from_millis(3200 + 800), "stalled {stall:?}");
    assert!(stall >= Duration::from_millis(2000), "excluded before its lease could expire: {stall:?}");
    let s = c.client().cluster_status().await.unwrap();
    assert_eq!(s.members, vec![1, 2, 4, 5]);
    assert_eq!(s.coordinator.epoch, 2);
    // Reads keep working on the others; writes no longer wait.
    assert_eq!(client.get(b"before").await.unwrap().unwrap().value, b"1");
    let t1 = Instant::now();
    client.put(b"fast", b"3").await.unwrap();
    assert!(t1.elapsed() < Duration::from_secs(1));
    c.spawn(3, &[]);
    c.wait_ready(Duration::from_secs(20)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = c.client().cluster_status().await.unwrap();
        if s.members == vec![1, 2, 3, 4, 5] {
            assert_eq!(s.coordinator.epoch, 3);
            break;
        }
        assert!(Instant::now() < deadline, "participant 3 not readmitted: {:?}", s.members);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    client.put(b"after", b"4").await.unwrap();
    c.wait_ready(Duration::from_secs(10)).await;
    let v = c.assert_replicas_identical(&[b"before".to_vec(), b"during".to_vec(), b"after".to_vec()]).await;
    assert_eq!(v[1].as_ref().unwrap().1, during.index);
    // Readmitted with a lease: it serves linearizable reads again.
    assert_eq!(c.client_for(3).get(b"after").await.unwrap().unwrap().value, b"4");
}

/// With three replicas and a minimum of three, losing one refuses writes
/// with an error that says why, instead of under-replicating.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_minimum_writes_are_refused_with_a_clear_error() {
    let mut c = Cluster::start(3).await;
    let client = c.client_for(1);
    client.put(b"k", b"1").await.unwrap();
    c.kill(3);
    let t0 = Instant::now();
    let e = client.put(b"k", b"2").await.unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(6), "took {:?}", t0.elapsed());
    match &e {
        Error::Unavailable(m) => assert!(
            m.contains(&format!("participant 3 at {} is not running or not reachable", c.addr(3)))
                || m.contains("only 2 of 3 replicas"),
            "{m}"
        ),
        other => panic!("expected unavailable, got {other}"),
    }
    // Once excluded, the refusal is immediate and names the minimum.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let e = client.put(b"k", b"3").await.unwrap_err();
    assert!(
        e.to_string().contains("only 2 of 3 replicas are in the view") && e.to_string().contains("minimum 3"),
        "{e}"
    );
    assert_eq!(client.get(b"k").await.unwrap().unwrap().value, b"1");
    c.spawn(3, &[]);
    c.wait_ready(Duration::from_secs(20)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.put(b"k", b"4").await.is_err() {
        assert!(Instant::now() < deadline, "writes did not resume");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.assert_replicas_identical(&[b"k".to_vec()]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_of_a_key_in_doubt_waits_then_says_so_and_resolves_after_restart() {
    let mut c = Cluster::start(3).await;
    c.client().put(b"k", b"old").await.unwrap();
    c.stop(0);
    // The coordinator hangs after collecting YES votes: the key stays locked.
    c.spawn(0, &[("TREATY_FAILPOINTS", "coordinator::before_decision=pause")]);
    c.wait_ready(Duration::from_secs(10)).await;
    let writer = {
        let client = c.client();
        tokio::spawn(async move { client.put(b"k", b"new").await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = Instant::now();
    let e = c.client_for(2).get(b"k").await.unwrap_err();
    assert!(matches!(&e, Error::InDoubt(m) if m.contains("--stale")), "{e}");
    assert!(t0.elapsed() >= Duration::from_millis(1500), "waited only {:?}", t0.elapsed());
    let stale = c.client_for(2).get_with(b"k", ReadMode::Stale).await.unwrap().unwrap();
    assert_eq!(stale.value, b"old");
    c.kill(0);
    assert!(writer.await.unwrap().is_err(), "the write was never decided");
    c.spawn(0, &[]);
    c.wait_ready(Duration::from_secs(20)).await;
    // Presumed abort: no decision record, so every replica drops it.
    for i in 1..=3 {
        assert_eq!(c.client_for(i).get(b"k").await.unwrap().unwrap().value, b"old");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_of_another_node_or_cluster_is_refused_untouched() {
    let mut c = Cluster::start(3).await;
    c.client().put(b"k", b"v").await.unwrap();
    c.stop(2);
    // Participant 3's process pointed at participant 2's directory.
    let out = Command::new(binary("treaty-participant"))
        .args(["--id", "3", "--listen", "127.0.0.1:0", "--coordinator", &c.addr(0), "--data-dir"])
        .arg(c.data_dir(2))
        .args(c.security_args())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(msg.contains("belongs to participant 2") && msg.contains("started as participant 3"), "{msg}");
    // The right participant against a different cluster's coordinator.
    let other = Cluster::start(2).await;
    let mut cmd = Command::new(binary("treaty-participant"));
    cmd.args(["--id", "2", "--listen", "127.0.0.1:0", "--coordinator", &other.addr(0), "--data-dir"])
        .arg(c.data_dir(2))
        .args(other.security_args());
    let out = tokio::time::timeout(Duration::from_secs(10), tokio::task::spawn_blocking(move || cmd.output()))
        .await
        .expect("refused within 10 s")
        .unwrap()
        .unwrap();
    let msg = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{msg}");
    assert!(msg.contains("has data from cluster"), "{msg}");
    // A coordinator restarted with a different participant list.
    c.stop(0);
    let out = Command::new(binary("treaty-coordinator"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--participants",
            "127.0.0.1:1,127.0.0.1:2",
            "--min-replicas",
            "1",
            "--data-dir",
        ])
        .arg(c.data_dir(0))
        .args(c.security_args())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("was created for participants"));
    // Nothing was touched: the original nodes come back with the data.
    c.spawn(0, &[]);
    c.spawn(2, &[]);
    c.wait_ready(Duration::from_secs(20)).await;
    let v = c.assert_replicas_identical(&[b"k".to_vec()]).await;
    assert_eq!(v[0].as_ref().unwrap().0, b"v");
}

fn treaty(c: &Cluster, args: &[&str]) -> std::process::Output {
    c.cli().args(args).output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_reports_outcomes_with_exit_codes() {
    let c = Cluster::start(3).await;
    let eps = c.participant_addrs().join(",");
    let out = treaty(&c, &["--endpoints", &eps, "put", "name", "treaty"]);
    assert!(out.status.success(), "{out:?}");
    let out = treaty(&c, &["--endpoints", &eps, "get", "name"]);
    assert_eq!((out.status.code(), out.stdout.as_slice()), (Some(0), &b"treaty\n"[..]));
    let out = treaty(&c, &["--endpoints", &eps, "get", "missing"]);
    assert_eq!((out.status.code(), out.stdout.len()), (Some(4), 0), "missing key: exit 4, nothing on stdout");
    let out = treaty(&c, &["--endpoints", &eps, "cas", "name", "wrong", "x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("condition failed: name = wrong"));
    let out = treaty(&c, &["--endpoints", &eps, "frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Usage"));
    let out = treaty(&c, &["--endpoints", &eps, "status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert_eq!(text.matches(" up ").count(), 4, "{text}");
    let out = treaty(&c, &["--endpoints", "127.0.0.1:1", "put", "a", "b"]);
    assert_eq!(out.status.code(), Some(3), "unreachable cluster");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "not committed: endpoint 127.0.0.1:1 is not running or not reachable: nothing listens on 127.0.0.1:1"
        ),
        "{err}"
    );
    assert!(err.contains("retrying is safe"), "{err}");
    assert!(!err.contains("may or may not have committed"), "nothing was sent, so nothing is in doubt: {err}");
}

/// A commit decision is written before it is synced; until the sync, no
/// client, participant or log fetch may learn of it, or a crash in between
/// could take back what they were told.
/// The one JSON object a command printed.
fn json_of(out: &std::process::Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), 1, "one line: {text}; stderr: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_output_carries_ids_values_and_every_nodes_state() {
    use serde_json::json;
    let mut c = Cluster::start(3).await;
    let eps = c.participant_addrs().join(",");
    let out = treaty(&c, &["--endpoints", &eps, "-o", "json", "put", "name", "treaty"]);
    let put = json_of(&out);
    assert_eq!((put["status"].as_str(), put["index"].as_u64()), (Some("committed"), Some(1)), "{put}");
    let id = put["txn"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 32, "{put}");
    // The id is the transaction's: outcome finds it.
    let out = treaty(&c, &["--endpoints", &eps, "outcome", &id, "--json"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(json_of(&out), json!({"txn": id, "outcome": "committed", "index": 1}));
    let out = treaty(&c, &["--endpoints", &eps, "get", "name", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(json_of(&out), json!({"key": "name", "found": true, "value": "treaty", "version": 1, "stale": false}));
    let out = treaty(&c, &["--endpoints", &eps, "--json", "get", "nothing", "--stale"]);
    assert_eq!(out.status.code(), Some(4), "missing key");
    assert_eq!(json_of(&out), json!({"key": "nothing", "found": false, "stale": true}));
    let out = treaty(&c, &["--endpoints", &eps, "cas", "name", "wrong", "x", "-o", "json"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty() && String::from_utf8_lossy(&out.stderr).contains("condition failed"), "{out:?}");
    let out = treaty(&c, &["--endpoints", &eps, "status", "-o", "json"]);
    assert_eq!(out.status.code(), Some(0));
    let s = json_of(&out);
    assert_eq!(s["last_commit_index"], 1, "{s}");
    assert_eq!(s["members"], json!([1, 2, 3]), "{s}");
    for (i, p) in s["participants"].as_array().unwrap().iter().enumerate() {
        assert_eq!((&p["id"], &p["state"], &p["applied_index"]), (&json!(i + 1), &json!("up"), &json!(1)), "{p}");
        assert_eq!(p["addr"], c.addr(i + 1), "{p}");
    }
    assert_eq!(s["coordinator"]["addr"], c.addr(0), "{s}");
    // A killed participant shows as down, with the reason in plain words.
    c.kill(3);
    let out = treaty(&c, &["--endpoints", &eps, "status", "-o", "json"]);
    assert_eq!(out.status.code(), Some(3));
    let p3 = json_of(&out)["participants"][2].clone();
    assert_eq!(p3["state"], "down", "{p3}");
    let why = p3["error"].as_str().unwrap();
    assert!(why.contains(&format!("participant 3 at {} is not running or not reachable", c.addr(3))), "{why}");
    // Without the coordinator: what each endpoint says about itself.
    c.kill(0);
    let out = treaty(&c, &["--endpoints", &eps, "status", "-o", "json"]);
    assert_eq!(out.status.code(), Some(3));
    let s = json_of(&out);
    assert!(s["coordinator"].is_null() && s["error"].as_str().unwrap().contains("coordinator"), "{s}");
    let states: Vec<&str> = s["endpoints"].as_array().unwrap().iter().map(|e| e["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["up", "up", "down"], "{s}");
    assert_eq!(s["endpoints"][0]["applied_index"], 1, "{s}");
    let out = treaty(&c, &["--endpoints", &eps, "status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("the coordinator is unreachable through every endpoint"), "{text}");
    assert_eq!(text.matches(" up ").count(), 2, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_is_told_to_nobody_before_it_is_durable() {
    let mut c = Cluster::start(3).await;
    c.client().put(b"k", b"old").await.unwrap();
    c.stop(0);
    // The decider stalls for 3 s between recording a decision and syncing it.
    c.spawn(0, &[("TREATY_FAILPOINTS", "coordinator::before_decision_sync=sleep(3000)")]);
    let before = c.wait_ready(Duration::from_secs(10)).await;
    let txn = Txn::new(vec![], vec![Write::Put(b"k".to_vec(), b"new".to_vec())]);
    let id = txn.id;
    let started = Instant::now();
    let writer = {
        let client = c.client();
        tokio::spawn(async move { client.commit(txn).await })
    };
    // Prepare takes milliseconds; from then on the decision is recorded.
    for at in [800, 1600] {
        tokio::time::sleep_until((started + Duration::from_millis(at)).into()).await;
        assert_eq!(c.client().outcome(id).await.unwrap(), Outcome::Pending, "an unsynced commit was told");
        let s = c.client().cluster_status().await.unwrap();
        assert_eq!(s.coordinator.applied_index, before, "an unsynced commit counts as the last index");
        for i in 1..=3 {
            let st = c.status(i).await.unwrap();
            assert_eq!(st.applied_index, before, "participant {i} applied an unsynced commit");
        }
        let stale = c.client_for(2).get_with(b"k", ReadMode::Stale).await.unwrap().unwrap();
        assert_eq!(stale.value, b"old");
    }
    let committed = writer.await.unwrap().unwrap();
    assert!(started.elapsed() >= Duration::from_secs(3), "the decider did not stall before its sync");
    assert_eq!(c.client().outcome(id).await.unwrap(), Outcome::Committed(committed.index));
    assert_eq!(committed.index, before + 1);
    let values = c.assert_replicas_identical(&[b"k".to_vec()]).await;
    assert_eq!(values[0], Some((b"new".to_vec(), committed.index)));
}

/// A write whose fate is open (the coordinator died after its decision was
/// durable, before anyone heard) is reported with its id, and `treaty
/// outcome ID` tells what happened once the coordinator is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ambiguous_write_names_its_id_and_outcome_tells_what_happened() {
    let mut c = Cluster::start(3).await;
    let eps = c.participant_addrs().join(",");
    c.client().put(b"base", b"0").await.unwrap();
    c.stop(0);
    c.spawn(0, &[("TREATY_FAILPOINTS", "coordinator::after_decision_sync=return")]);
    c.wait_ready(Duration::from_secs(10)).await;

    let out = treaty(&c, &["--endpoints", &eps, "put", "fate", "sealed"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(c.wait_exit(0, Duration::from_secs(10)), "the coordinator did not crash: {err}");
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("may or may not have committed"), "{err}");
    let id = err
        .split("treaty outcome ")
        .nth(1)
        .and_then(|rest| rest.get(..32))
        .unwrap_or_else(|| panic!("no transaction id in: {err}"))
        .to_string();
    // Still unknown while the coordinator is down.
    let out = treaty(&c, &["--endpoints", &eps, "outcome", &id]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");

    c.spawn(0, &[]);
    let last = c.wait_ready(Duration::from_secs(20)).await;
    let out = treaty(&c, &["--endpoints", &eps, "outcome", &id]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("committed at index {last}"));
    let v = c.client().get(b"fate").await.unwrap().unwrap();
    assert_eq!((v.value.as_slice(), v.version), (&b"sealed"[..], last));
    c.assert_replicas_identical(&[b"fate".to_vec()]).await;

    // An id nobody ever sent, and one that is not an id.
    let out = treaty(&c, &["--endpoints", &eps, "outcome", &"0".repeat(32)]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("not committed"));
    let out = treaty(&c, &["--endpoints", &eps, "outcome", "nonsense"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a transaction id"));
}

/// While the coordinator is down, linearizable reads go on until the
/// replicas' leases expire, then fail with the reason; stale reads go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_survive_a_coordinator_outage_until_leases_expire() {
    let mut c = Cluster::start(3).await;
    c.client().put(b"k", b"v").await.unwrap();
    // Let every replica apply it first: COMMIT messages go out after the
    // client's answer, and a replica still holding the write prepared when
    // the coordinator dies must wait for it (tested separately).
    c.wait_ready(Duration::from_secs(10)).await;
    c.kill(0);
    let down = Instant::now();
    let replica = c.client_for(2);
    assert_eq!(replica.get(b"k").await.unwrap().unwrap().value, b"v", "lease still valid right after the crash");
    let e = loop {
        match replica.get(b"k").await {
            Ok(_) => {
                assert!(down.elapsed() < Duration::from_millis(2100), "served past its lease: {:?}", down.elapsed());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => break e,
        }
    };
    assert!(down.elapsed() >= Duration::from_millis(1500), "lease dropped early: {:?}", down.elapsed());
    assert!(matches!(&e, Error::NotReady(m) if m.contains("no read lease") && m.contains("--stale")), "{e}");
    let stale = replica.get_with(b"k", ReadMode::Stale).await.unwrap().unwrap();
    assert_eq!(stale.value, b"v");
    c.spawn(0, &[]);
    c.wait_ready(Duration::from_secs(20)).await;
    assert_eq!(replica.get(b"k").await.unwrap().unwrap().value, b"v");
    let s = c.client().cluster_status().await.unwrap();
    assert_eq!(s.members, vec![1, 2, 3], "the restored view keeps every member");
}

//! What operators see: every node's Prometheus metrics moving with commits,
//! aborts and a killed participant, and the coordinator's status page in a
//! real headless browser (Debian's chromium) turning a killed participant
//! down.

use std::process::Command;
use std::time::{Duration, Instant};

use treaty_client::Condition;
use treaty_tests::{chromium, metric, Cluster};

async fn cluster() -> Cluster {
    let mut c = Cluster::new(5);
    c.enable_metrics();
    for i in 0..=5 {
        c.spawn(i, &[]);
    }
    c.wait_ready(Duration::from_secs(20)).await;
    c
}

/// Polls `check` on node `i`'s metrics until it holds, for up to `within`.
async fn eventually(c: &Cluster, i: usize, within: Duration, what: &str, check: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + within;
    loop {
        let text = c.scrape(i).unwrap_or_default();
        if check(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "node {i}: {what} within {within:?}; metrics:\n{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_serves_metrics_that_move_with_commits_aborts_and_a_kill() {
    let mut c = cluster().await;
    let before: Vec<String> = (0..=5).map(|i| c.scrape(i).expect("every node serves /metrics")).collect();
    let commits0 = metric(&before[0], "treaty_commits_total").unwrap_or(0.0);
    let client = c.client();
    for i in 0..20 {
        client.put(format!("m/{i}").as_bytes(), b"v").await.unwrap();
    }
    for _ in 0..3 {
        let failed = client.txn().when(Condition::ValueEquals(b"m/0".to_vec(), b"other".to_vec())).put(b"m/0", b"x");
        assert!(failed.commit().await.is_err());
    }
    client.get(b"m/1").await.unwrap();
    let coord = c.scrape(0).unwrap();
    assert_eq!(metric(&coord, "treaty_commits_total"), Some(commits0 + 20.0), "{coord}");
    assert_eq!(metric(&coord, "treaty_aborts_total{reason=\"condition_failed\"}"), Some(3.0), "{coord}");
    assert!(metric(&coord, "treaty_commit_seconds_count").unwrap() >= 23.0);
    assert!(metric(&coord, "treaty_decision_sync_seconds_count").unwrap() >= 1.0);
    assert!(metric(&coord, "treaty_prepare_seconds_bucket{le=\"+Inf\"}").unwrap() >= 5.0);
    for i in 1..=5 {
        // The lease gauge is what the last check-in left: a check-in
        // answered late on a loaded machine may leave a member without a
        // lease for a moment, so it is awaited like the applied count.
        let p = eventually(&c, i, Duration::from_secs(5), "applied everything, holding a lease", |t| {
            metric(t, "treaty_applied_total").unwrap_or(0.0) >= 20.0
                && metric(t, "treaty_lease_seconds").unwrap_or(0.0) > 0.0
        })
        .await;
        assert!(metric(&p, "treaty_votes_total{vote=\"yes\"}").unwrap() >= 20.0, "{p}");
        assert_eq!(metric(&p, "treaty_member"), Some(1.0), "{p}");
    }
    let reads: f64 = (1..=5)
        .map(|i| metric(&c.scrape(i).unwrap(), "treaty_reads_total{mode=\"linearizable\"}").unwrap_or(0.0))
        .sum();
    assert!(reads >= 1.0, "the get was counted where it was served");

    c.kill(4);
    let coord = eventually(&c, 0, Duration::from_secs(10), "participant 4 out of the view", |t| {
        metric(t, "treaty_participant_member{participant=\"4\"}") == Some(0.0)
    })
    .await;
    assert_eq!(metric(&coord, "treaty_view_members"), Some(4.0));
    assert!(metric(&coord, "treaty_view_epoch").unwrap() >= 2.0);
    assert!(c.log(0).contains("peer unreachable"), "the coordinator says once that participant 4 is gone");
    c.spawn(4, &[]);
    eventually(&c, 0, Duration::from_secs(20), "participant 4 back in the view", |t| {
        metric(t, "treaty_participant_member{participant=\"4\"}") == Some(1.0)
    })
    .await;
}

/// The page's participant rows (`data-participant` and `data-state`), as a
/// headless chromium renders them after the page's script ran.
fn rendered_states(url: &str) -> Vec<(u64, String)> {
    let out = Command::new(chromium())
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=3000", "--dump-dom", url])
        .output()
        .expect("running chromium");
    let dom = String::from_utf8_lossy(&out.stdout);
    let mut rows = Vec::new();
    for part in dom.split("data-participant=\"").skip(1) {
        let id = part.split('"').next().unwrap().parse().unwrap();
        let state = part.split("data-state=\"").nth(1).and_then(|s| s.split('"').next()).unwrap_or("").to_string();
        rows.push((id, state));
    }
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_renders_in_a_browser_and_turns_a_killed_participant_down() {
    let mut c = cluster().await;
    let url = format!("http://127.0.0.1:{}/", c.metrics_ports[0]);
    let rows = rendered_states(&url);
    assert_eq!(rows, (1..=5).map(|i| (i, "serving".to_string())).collect::<Vec<_>>(), "five participants, serving");
    c.kill(2);
    let killed = Instant::now();
    loop {
        let rows = rendered_states(&url);
        if rows.iter().any(|(id, state)| *id == 2 && state == "down") {
            assert_eq!(rows.len(), 5, "{rows:?}");
            assert!(rows.iter().filter(|(id, _)| *id != 2).all(|(_, s)| s == "serving"), "{rows:?}");
            println!("participant 2 shown down {:?} after the kill", killed.elapsed());
            break;
        }
        assert!(killed.elapsed() < Duration::from_secs(10), "participant 2 still shown as {rows:?}");
    }
    // A screenshot for people (TREATY_TEST_SCREENSHOT=path.png).
    if let Some(path) = std::env::var_os("TREATY_TEST_SCREENSHOT") {
        let mut shot = std::ffi::OsString::from("--screenshot=");
        shot.push(&path);
        let _ = Command::new(chromium())
            .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,720"])
            .args(["--virtual-time-budget=3000"])
            .arg(shot)
            .arg(&url)
            .output();
    }
}

/// The steps `node` took for the transaction, in order.
fn steps(events: &[treaty_client::TraceEvent], node: &str) -> Vec<String> {
    events.iter().filter(|e| e.node == node).map(|e| e.step.clone()).collect()
}

/// Polls the trace until every participant has taken its last step.
async fn trace_until(c: &Cluster, id: treaty_client::TxnId, last: &str) -> Vec<treaty_client::TraceEvent> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events = c.client().trace(id).await.unwrap();
        if (1..=5).all(|i| steps(&events, &format!("participant {i}")).last().is_some_and(|s| s == last)) {
            return events;
        }
        assert!(Instant::now() < deadline, "not every participant reached {last}: {events:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_shows_every_step_of_a_commit_and_of_an_abort_in_order() {
    let c = cluster().await;
    let client = c.client();
    let txn = treaty_client::Txn::new(vec![], vec![treaty_client::Write::Put(b"t/k".to_vec(), b"v".to_vec())]);
    let id = txn.id;
    let index = client.commit(txn).await.unwrap().index;
    let events = trace_until(&c, id, "applied").await;
    let at = |node: &str, step: &str| {
        events.iter().filter(|e| e.node == node && e.step == step).map(|e| e.at_us).collect::<Vec<_>>()
    };
    let mut want = vec!["submitted"];
    want.extend(["prepare sent"; 5]);
    want.extend(["vote received"; 5]);
    want.extend(["decided", "decision durable", "answered", "COMMIT sent"]);
    assert_eq!(steps(&events, "coordinator"), want, "{events:#?}");
    for i in 1..=5 {
        let p = format!("participant {i}");
        assert_eq!(steps(&events, &p), ["prepare received", "voted", "record durable", "COMMIT received", "applied"]);
        // Across nodes (one machine, one clock): sent before received, and
        // every vote durable before the decision.
        assert!(at("coordinator", "prepare sent")[0] <= at(&p, "prepare received")[0]);
        assert!(at(&p, "record durable")[0] <= at("coordinator", "decided")[0]);
        assert!(at("coordinator", "decision durable")[0] <= at(&p, "COMMIT received")[0], "persist before you speak");
    }
    let answered = events.iter().find(|e| e.step == "answered").unwrap();
    assert_eq!(answered.detail, format!("committed at index {index}"));

    // An abort: a condition that does not hold.
    let txn = treaty_client::Txn::new(
        vec![Condition::ValueEquals(b"t/k".to_vec(), b"other".to_vec())],
        vec![treaty_client::Write::Put(b"t/k".to_vec(), b"w".to_vec())],
    );
    let id = txn.id;
    assert!(client.commit(txn).await.is_err());
    let events = trace_until(&c, id, "ABORT received").await;
    let mut want = vec!["submitted"];
    want.extend(["prepare sent"; 5]);
    want.extend(["vote received"; 5]);
    // The attempt is aborted on every member at once (presumed abort);
    // the failed condition is made durable before the client hears it.
    want.extend(["ABORT sent"; 5]);
    want.extend(["decided", "decision durable", "answered"]);
    assert_eq!(steps(&events, "coordinator"), want, "{events:#?}");
    for i in 1..=5 {
        let p = format!("participant {i}");
        assert_eq!(steps(&events, &p), ["prepare received", "voted", "ABORT received"]);
        let voted = events.iter().find(|e| e.node == p && e.step == "voted").unwrap();
        assert!(voted.detail.starts_with("no: t/k = other"), "{}", voted.detail);
    }
    // The CLI prints the same timeline, and lists the slowest.
    let out =
        c.cli().args(["--endpoints", &c.participant_addrs().join(","), "trace", &id.to_string()]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.lines().count() == 1 + 19 + 15, "{text}");
    assert!(text.contains("aborted: condition failed"), "{text}");
    let out =
        c.cli().args(["--endpoints", &c.participant_addrs().join(","), "trace", "--last-slow", "5"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2, "the two transactions");
}

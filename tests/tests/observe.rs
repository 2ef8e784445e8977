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
        let p = eventually(&c, i, Duration::from_secs(5), "applied everything", |t| {
            metric(t, "treaty_applied_total").unwrap_or(0.0) >= 20.0
        })
        .await;
        assert!(metric(&p, "treaty_votes_total{vote=\"yes\"}").unwrap() >= 20.0, "{p}");
        assert_eq!(metric(&p, "treaty_member"), Some(1.0));
        assert!(metric(&p, "treaty_lease_seconds").unwrap() > 0.0, "a member holds a lease");
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

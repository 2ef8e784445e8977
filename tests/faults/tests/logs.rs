//! Expected faults are logged once per change, not once per request: a
//! participant cut off from the coordinator for 5 s (both directions
//! blackholed while a client writes) yields a handful of lines on either
//! side, none at ERROR. The nodes log JSON (`--log-format json`), one object
//! per line, which this test parses.

use std::time::Duration;

use treaty_faults::proxy::{Mode, Proxy};
use treaty_tests::Cluster;

/// The node's log lines, each parsed as a JSON object.
fn json_lines(c: &Cluster, i: usize) -> Vec<serde_json::Value> {
    c.log(i)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("node {i} logged a line that is not JSON ({e}): {l}"))
        })
        .collect()
}

fn show(lines: &[serde_json::Value]) -> String {
    lines
        .iter()
        .map(|l| format!("  {} {}", l["level"].as_str().unwrap_or("?"), l["message"].as_str().unwrap_or("?")))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_five_second_partition_is_logged_in_a_few_lines() {
    let mut c = Cluster::new(5);
    let to_participant = Proxy::start(c.addr(3)).await;
    let to_coordinator = Proxy::start(c.addr(0)).await;
    let mut routes: Vec<String> = (1..=5).map(|i| c.addr(i)).collect();
    routes[2] = to_participant.addr.clone();
    c.route_to_participant = Some(routes);
    let mut back: Vec<String> = (1..=5).map(|_| c.addr(0)).collect();
    back[2] = to_coordinator.addr.clone();
    c.route_to_coordinator = Some(back);
    for i in 0..=5 {
        c.spawn(i, &[("TREATY_LOG_FORMAT", "json")]);
    }
    c.wait_ready(Duration::from_secs(20)).await;
    let (before_c, before_p) = (json_lines(&c, 0).len(), json_lines(&c, 3).len());
    let writer = c.client_with(vec![c.addr(1), c.addr(2)]);
    let writes = tokio::spawn(async move {
        let mut ok = 0;
        for i in 0..400 {
            if writer.put(format!("log/{i}").as_bytes(), b"v").await.is_ok() {
                ok += 1;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ok
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    to_participant.set(Mode::Blackhole);
    to_coordinator.set(Mode::Blackhole);
    tokio::time::sleep(Duration::from_secs(5)).await;
    to_participant.set(Mode::Pass);
    to_coordinator.set(Mode::Pass);
    let healed = std::time::Instant::now();
    let ok = writes.await.unwrap();
    assert!(ok > 300, "writes went on through the partition: {ok} of 400");
    c.wait_ready(Duration::from_secs(20)).await;
    println!("writes done and participant 3 back {:?} after the partition healed", healed.elapsed());
    let coordinator = json_lines(&c, 0).split_off(before_c);
    let cut_off = json_lines(&c, 3).split_off(before_p);
    println!("coordinator, {} lines:\n{}", coordinator.len(), show(&coordinator));
    println!("participant 3, {} lines:\n{}", cut_off.len(), show(&cut_off));
    for (who, lines) in [("coordinator", &coordinator), ("participant 3", &cut_off)] {
        assert!(lines.len() <= 12, "{who} logged {} lines for one partition", lines.len());
        assert!(lines.iter().all(|l| l["level"] != "ERROR"), "{who} logged an expected fault at ERROR");
    }
    assert!(coordinator.iter().any(|l| l["message"] == "peer unreachable; retrying quietly until it answers"));
    assert!(coordinator.iter().any(|l| l["message"] == "peer reachable again"));
}

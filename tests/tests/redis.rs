//! The Redis-protocol doors against clients nobody here wrote: Debian's
//! redis-cli (an interactive session on a real terminal, and `--pipe`),
//! redis-benchmark, and PyPI's redis-py; then a participant killed with
//! SIGKILL under a client's increments. Every node runs with TLS; the
//! clients present the cluster's `admin` client certificate.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rexpect::session::spawn_command;
use treaty_tests::{redis_py, redis_tools, Cluster};

async fn cluster() -> Cluster {
    redis_tools();
    let mut c = Cluster::new(5);
    c.enable_redis();
    for i in 0..=5 {
        c.spawn(i, &[]);
    }
    c.wait_ready(Duration::from_secs(20)).await;
    c
}

/// redis-cli or redis-benchmark for participant `i`'s door, with the TLS flags.
fn tool(c: &Cluster, program: &str, i: usize) -> Command {
    let certs = c.certs_dir();
    let mut cmd = Command::new(program);
    cmd.arg("-p").arg(c.redis_ports[i - 1].to_string()).arg("--tls");
    cmd.arg("--cacert").arg(certs.join("ca.pem"));
    cmd.arg("--cert").arg(certs.join("client-admin.pem"));
    cmd.arg("--key").arg(certs.join("client-admin.key"));
    cmd
}

async fn value(c: &Cluster, key: &str) -> Option<Vec<u8>> {
    c.client().get(key.as_bytes()).await.unwrap().map(|v| v.value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_interactive_session_and_pipe_bulk_load() {
    let c = cluster().await;
    let port = c.redis_ports[0];
    let mut cmd = tool(&c, "redis-cli", 1);
    cmd.env("TERM", "dumb").env("HOME", c.dir.path());
    let mut s = spawn_command(cmd, Some(15_000)).expect("spawn redis-cli");
    // The prompt reads `127.0.0.1:PORT>`, or `127.0.0.1:PORT(TX)>` inside MULTI.
    let prompt = format!("127.0.0.1:{port}");
    s.exp_string(&prompt).unwrap();
    for (line, answer) in [
        ("SET greeting hello", "OK"),
        ("GET greeting", "\"hello\""),
        ("INCR visits", "(integer) 1"),
        ("MULTI", "OK"),
        ("SET inside yes", "QUEUED"),
        ("INCR visits", "QUEUED"),
        ("EXEC", "2) (integer) 2"),
        ("GET nothing", "(nil)"),
        ("SET k v EX 10", "(error) ERR Treaty keys do not expire"),
        ("FLUSHALL", "(error) ERR unknown command 'FLUSHALL'"),
    ] {
        s.send_line(line).unwrap();
        s.exp_string(answer).unwrap_or_else(|e| panic!("{line}: {e}"));
        s.exp_string(&prompt).unwrap();
    }
    s.send_line("QUIT").unwrap();
    s.exp_eof().unwrap();
    assert_eq!(value(&c, "inside").await.as_deref(), Some(&b"yes"[..]), "EXEC committed through Treaty");
    // Participants count their keys at most every 2 s.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let size = tool(&c, "redis-cli", 1).arg("DBSIZE").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&size.stdout).trim(), "3", "greeting, visits, inside");

    // Bulk load: redis-cli --pipe sends raw protocol and counts the replies.
    let mut input = Vec::new();
    for i in 0..2000 {
        let (k, v) = (format!("bulk:{i:05}"), format!("value {i}"));
        input.extend(format!("*3\r\n$3\r\nSET\r\n${}\r\n{k}\r\n${}\r\n{v}\r\n", k.len(), v.len()).as_bytes());
    }
    let mut pipe = tool(&c, "redis-cli", 2);
    pipe.arg("--pipe").stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = pipe.spawn().unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), &input).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("errors: 0, replies: 2000"), "{text}");
    // Every key, read back through Treaty's own client from every participant.
    for endpoint in c.participant_addrs() {
        let client = c.client_with(vec![endpoint.clone()]);
        for i in [0, 999, 1999] {
            let got = client.get(format!("bulk:{i:05}").as_bytes()).await.unwrap().map(|v| v.value);
            assert_eq!(got, Some(format!("value {i}").into_bytes()), "bulk:{i:05} through {endpoint}");
        }
    }
    let listed = tool(&c, "redis-cli", 3).args(["--scan", "--pattern", "bulk:*"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&listed.stdout).lines().count(), 2000, "SCAN lists every loaded key once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_benchmark_runs_without_errors_and_incr_counts_exactly() {
    let c = cluster().await;
    let n = 1600;
    let out = tool(&c, "redis-benchmark", 1)
        .args(["-t", "set,get,incr,mset", "-P", "16", "-c", "8", "-n", &n.to_string(), "--csv"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "redis-benchmark failed");
    for test in ["\"SET\"", "\"GET\"", "\"INCR\"", "\"MSET (10 keys)\""] {
        assert!(text.lines().any(|l| l.starts_with(test)), "no {test} row: {text}");
    }
    assert!(!text.to_lowercase().contains("error"), "{text}");
    // Without -r every INCR hits one key: 16 pipelined by each of 8 clients
    // at once, all through one door. Each must count exactly once.
    assert_eq!(value(&c, "counter:__rand_int__").await, Some(n.to_string().into_bytes()));
    // SET and MSET wrote their 3 random bytes (redis-benchmark's -d 3).
    assert_eq!(value(&c, "key:__rand_int__").await.map(|v| v.len()), Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_py_commands_pipelines_and_a_conserving_bank_across_doors() {
    let c = cluster().await;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("resp/redis_py_check.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(c.certs_dir())
        .args(c.redis_ports.iter().map(|p| p.to_string()))
        .env("PYTHONPATH", redis_py())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("ALL OK"), "redis-py checks failed");
    // The bank's total, checked once more outside Python, on every replica.
    for endpoint in c.participant_addrs() {
        let client = c.client_with(vec![endpoint]);
        let mut total = 0;
        for i in 0..6 {
            let v = client.get(format!("py:acct:{i}").as_bytes()).await.unwrap().unwrap();
            total += String::from_utf8(v.value).unwrap().parse::<i64>().unwrap();
        }
        assert_eq!(total, 600);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn increments_through_a_door_stay_exact_when_a_participant_is_killed() {
    let mut c = cluster().await;
    // redis-cli in a loop would start a process per command: a long
    // redis-benchmark run of INCRs instead, with a participant killed
    // (SIGKILL) in the middle of it and restarted after.
    let n = 3000;
    let bench = tool(&c, "redis-benchmark", 1)
        .args(["-t", "incr", "-c", "4", "-n", &n.to_string(), "--csv"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(800)).await;
    c.kill(4);
    tokio::time::sleep(Duration::from_secs(4)).await;
    c.spawn(4, &[]);
    let out = tokio::task::spawn_blocking(move || bench.wait_with_output()).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text} ({:?})", started.elapsed());
    let errors = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !text.to_lowercase().contains("error") && !errors.contains("rror"),
        "{text}{errors}"
    );
    c.wait_ready(Duration::from_secs(30)).await;
    // Every INCR that answered counted once, on every replica, the killed one included.
    for endpoint in c.participant_addrs() {
        let v = c.client_with(vec![endpoint.clone()]).get(b"counter:__rand_int__").await.unwrap().unwrap();
        assert_eq!(v.value, n.to_string().into_bytes(), "through {endpoint}");
    }
}

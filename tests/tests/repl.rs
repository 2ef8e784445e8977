//! The REPL driven through a real pseudo-terminal, against a real cluster.

use std::time::Duration;

use rexpect::session::{spawn_command, PtySession};
use treaty_tests::Cluster;

fn shell(c: &Cluster, endpoints: &[String], history: &std::path::Path) -> PtySession {
    shell_with(c, endpoints, history, false)
}

fn shell_with(c: &Cluster, endpoints: &[String], history: &std::path::Path, color: bool) -> PtySession {
    let mut cmd = c.cli();
    cmd.args(["--endpoints", &endpoints.join(","), "repl"]).env("TREATY_HISTORY", history).env("TERM", "xterm");
    if color {
        cmd.env_remove("NO_COLOR");
    } else {
        cmd.env("NO_COLOR", "1");
    }
    let mut s = spawn_command(cmd, Some(15_000)).expect("spawn treaty repl");
    s.exp_string("Treaty shell").unwrap();
    s
}

async fn value(c: &Cluster, key: &[u8]) -> Option<Vec<u8>> {
    c.client().get(key).await.unwrap().map(|v| v.value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_history_and_the_transaction_flow() {
    let c = Cluster::start(3).await;
    let dir = tempfile::tempdir().unwrap();
    let hist = dir.path().join("history");
    let eps = c.participant_addrs();
    {
        let mut s = shell_with(&c, &eps, &hist, true);
        // Tab completes the command: we type only "pu<TAB>".
        s.send("pu").unwrap();
        s.send("\t").unwrap();
        s.send_line("k v").unwrap();
        // On a terminal without NO_COLOR, success is green.
        s.exp_string("\x1b[32mOK (commit index 1)").unwrap();
        s.send_line("put hist 1").unwrap();
        s.exp_string("OK (commit index 2)").unwrap();
        // A transaction: reads record versions, writes are buffered.
        s.send_line("begin").unwrap();
        s.exp_string("transaction open").unwrap();
        s.exp_string("txn> ").unwrap();
        s.send_line("get k").unwrap();
        s.exp_string("(version 1)").unwrap();
        s.send_line("put k2 \"two words\"").unwrap();
        s.exp_string("buffered").unwrap();
        s.send_line("get k2").unwrap();
        s.exp_string("(written in this transaction)").unwrap();
        s.send_line("show").unwrap();
        s.exp_string("read  k at version 1").unwrap();
        s.exp_string("put   k2 \"two words\"").unwrap();
        assert_eq!(value(&c, b"k2").await, None, "nothing is sent before commit");
        s.send_line("commit").unwrap();
        s.exp_string("OK (commit index 3)").unwrap();
        s.send_line("timing on").unwrap();
        s.send_line("get k2").unwrap();
        s.exp_regex(r"\(\d+\.\d\d ms\)").unwrap();
        // A stale read, from the endpoint that has just served k2 linearizably.
        s.send_line("get k2 --stale").unwrap();
        s.exp_string("two words").unwrap();
        s.exp_string("(version 3, stale read)").unwrap();
        // Bad input is explained and runs nothing.
        s.send_line("put k \"open").unwrap();
        s.exp_string("column 7: unterminated quoted string").unwrap();
        s.send_line("frob").unwrap();
        s.exp_string("unknown command `frob`").unwrap();
        s.send_line("help if").unwrap();
        s.exp_string("example: if balance/alice = 100").unwrap();
        s.send_line(&format!("outcome {}", "0".repeat(32))).unwrap();
        s.exp_string("not committed").unwrap();
        s.send_line("put hist 1").unwrap();
        s.exp_string("OK (commit index 4)").unwrap();
        s.send_control('d').unwrap();
        s.exp_eof().unwrap();
    }
    assert_eq!(value(&c, b"k").await.unwrap(), b"v");
    assert_eq!(value(&c, b"k2").await.unwrap(), b"two words");
    // History survives a restart: Up arrow recalls the last command.
    c.client().delete(b"hist").await.unwrap();
    let mut s = shell(&c, &eps, &hist);
    s.send("\x1b[A").unwrap(); // the last line of the previous session
    s.send_line("").unwrap();
    s.exp_string("OK (commit index").unwrap();
    s.send_control('d').unwrap();
    s.exp_eof().unwrap();
    assert_eq!(value(&c, b"hist").await.unwrap(), b"1", "history recalled `put hist 1`");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_writers_in_two_shells_second_commit_aborts() {
    let c = Cluster::start(3).await;
    c.client().put(b"x", b"0").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let eps = c.participant_addrs();
    let mut a = shell(&c, &eps, &dir.path().join("a"));
    let mut b = shell(&c, &eps[1..], &dir.path().join("b"));
    for s in [&mut a, &mut b] {
        s.send_line("begin").unwrap();
        s.exp_string("transaction open").unwrap();
        s.send_line("get x").unwrap();
        s.exp_string("0  (version 1)").unwrap();
    }
    a.send_line("put x from-a").unwrap();
    a.exp_string("buffered").unwrap();
    b.send_line("put x from-b").unwrap();
    b.exp_string("buffered").unwrap();
    b.send_line("put y from-b").unwrap();
    b.exp_string("buffered").unwrap();
    b.send_line("commit").unwrap();
    b.exp_string("OK (commit index 2)").unwrap();
    a.send_line("commit").unwrap();
    a.exp_string("aborted: x changed since this transaction read it").unwrap();
    a.exp_string("nothing was applied").unwrap();
    assert_eq!(value(&c, b"x").await.unwrap(), b"from-b");
    assert_eq!(value(&c, b"y").await.unwrap(), b"from-b");
    // Ctrl-C with an open transaction asks before discarding it.
    a.send_line("begin").unwrap();
    a.exp_string("transaction open").unwrap();
    a.send_line("put z 1").unwrap();
    a.exp_string("buffered").unwrap();
    // Wait for the next prompt: the line editor is in raw mode by then.
    a.exp_string("txn> ").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    a.send_control('c').unwrap();
    a.exp_string("discard the open transaction? [y/N]").unwrap();
    a.send_line("y").unwrap();
    a.exp_string("transaction discarded").unwrap();
    a.send_line("commit").unwrap();
    a.exp_string("no transaction is open").unwrap();
    assert_eq!(value(&c, b"z").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_endpoint_is_replaced_and_the_shell_says_so() {
    let mut c = Cluster::start(3).await;
    c.client().put(b"k", b"v").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut s = shell(&c, &c.participant_addrs(), &dir.path().join("h"));
    s.send_line("get k").unwrap();
    s.exp_string("v  (version 1)").unwrap();
    c.kill(1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.send_line("get k").unwrap();
    s.exp_string(&format!("lost {}; reconnected to {}", c.addr(1), c.addr(2))).unwrap();
    s.exp_string(&format!("treaty {}> ", c.addr(2))).unwrap();
    s.send_line("exit").unwrap();
    s.exp_eof().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_key_completion_and_psql_habits() {
    let c = Cluster::start(3).await;
    for k in ["user/ada", "user/alan", "user/grace"] {
        c.client().put(k.as_bytes(), b"x").await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let mut s = shell(&c, &c.participant_addrs(), &dir.path().join("h"));
    s.send_line("scan user/ --limit 2").unwrap();
    s.exp_string("user/ada = x  (version 1)").unwrap();
    s.exp_string("user/alan = x  (version 2)").unwrap();
    s.exp_string("(2 keys, as of index 3; more with: scan user/ --from user/grace --limit 2)").unwrap();
    s.send_line("range user/b --keys-only --stale").unwrap();
    s.exp_string("user/grace  (version 3)").unwrap();
    s.exp_string("(1 key, as of index 3, stale read)").unwrap();
    // Tab completes a key from the store: one candidate is filled in...
    // (keys typed before the editor is back in raw mode would be lost)
    let prompt = |s: &mut PtySession| {
        s.exp_string(&format!("treaty {}> ", c.addr(1))).unwrap();
        std::thread::sleep(Duration::from_millis(300));
    };
    prompt(&mut s);
    s.send("get user/g").unwrap();
    s.send("\t").unwrap();
    s.send_line("").unwrap();
    s.exp_string("x  (version 3)").unwrap();
    // ... several are listed.
    prompt(&mut s);
    s.send("del user/a").unwrap();
    s.send("\t").unwrap();
    s.send("\t").unwrap();
    s.flush().unwrap();
    s.exp_regex(r"user/ada\s+user/alan").unwrap();
    s.send("da").unwrap();
    s.send_line("").unwrap();
    s.exp_string("OK (commit index 4)").unwrap();
    assert_eq!(value(&c, b"user/ada").await, None, "completion typed `del user/ada`");
    s.send_line("\\?").unwrap();
    s.exp_string("scan PREFIX [--from KEY]").unwrap();
    s.send_line("\\timing").unwrap();
    s.exp_string("timing on").unwrap();
    s.send_line("\\q").unwrap();
    s.exp_eof().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_mode_and_status_without_a_coordinator() {
    let mut c = Cluster::start(3).await;
    c.client().put(b"k", b"v1").await.unwrap();
    c.wait_ready(Duration::from_secs(10)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut s = shell(&c, &c.participant_addrs(), &dir.path().join("h"));
    s.send_line("status").unwrap();
    s.exp_regex(r"participant 3 +\S+ +up +1 ").unwrap();
    // The coordinator dies: status falls back to the endpoints, and once the
    // replicas' read leases run out only stale reads are served.
    c.kill(0);
    s.send_line("status").unwrap();
    s.exp_string("the coordinator is unreachable through every endpoint").unwrap();
    s.exp_regex(r"\S+ +participant 2 +up +1 ").unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    s.send_line("get k").unwrap();
    s.exp_string("no read lease").unwrap();
    s.send_line("stale on").unwrap();
    s.exp_string("stale reads on").unwrap();
    s.exp_string(&format!("treaty {} stale> ", c.addr(1))).unwrap();
    s.send_line("get k").unwrap();
    s.exp_string("v1  (version 1, stale read)").unwrap();
    s.send_line("scan \"\"").unwrap();
    s.exp_string("(1 key, as of index 1, stale read)").unwrap();
    s.send_line("stale").unwrap();
    s.exp_string("stale reads off: reads are linearizable").unwrap();
    s.send_line("get k").unwrap();
    s.exp_string("no read lease").unwrap();
    // With the coordinator back, linearizable reads are served again.
    c.spawn(0, &[]);
    c.wait_ready(Duration::from_secs(20)).await;
    s.send_line("get k").unwrap();
    s.exp_string("v1  (version 1)").unwrap();
    s.send_line("help stale").unwrap();
    s.exp_string("example: stale on").unwrap();
    s.send_line("exit").unwrap();
    s.exp_eof().unwrap();
}

/// On a terminal, `treaty run` shows how far it is (percentage, ETA) while
/// it works, then clears the bar for the summary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_shows_progress_on_a_terminal() {
    let c = Cluster::start(3).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("load.treaty");
    let body: String = (0..1500).map(|i| format!("put p/{i} {i}\n")).collect();
    std::fs::write(&file, body).unwrap();
    let mut cmd = c.cli();
    cmd.args(["--endpoints", &c.participant_addrs().join(","), "run", "--pipeline", "4"]).arg(&file);
    let mut s = spawn_command(cmd, Some(60_000)).expect("spawn treaty run");
    s.exp_regex(r"\d+/1500 commands \(\d+%\)  \d+ committed, \d+ txn/s  ETA \d+s").unwrap();
    s.exp_string("summary: 1500 committed, 0 aborted, 0 failed").unwrap();
    s.exp_eof().unwrap();
    assert_eq!(value(&c, b"p/1499").await.as_deref(), Some(&b"1499"[..]));
}

//! The batch runner: golden outputs, a bad-input corpus that must run
//! nothing, `--atomic`, `--keep-going` and standard input.
//!
//! Regenerate the golden files with `UPDATE_GOLDEN=1 cargo test -p treaty-tests --test batch`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use treaty_tests::Cluster;

fn run(c: &Cluster, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut cmd = c.cli();
    cmd.arg("--endpoints").arg(c.participant_addrs().join(",")).arg("run").args(args);
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(bytes) = stdin {
        input.write_all(bytes).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn here() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn golden(c: &Cluster, file: &Path, extra: &[&str], suffix: &str) {
    let mut args = vec!["--pipeline", "1"];
    args.extend_from_slice(extra);
    let rel = file.strip_prefix(here()).unwrap().display().to_string();
    args.push(&rel);
    let mut cmd = c.cli();
    cmd.current_dir(here()).arg("--endpoints").arg(c.participant_addrs().join(",")).arg("run").args(&args);
    let out = cmd.output().unwrap();
    let stdout = ids_replaced(&String::from_utf8_lossy(&out.stdout));
    let actual = format!("# exit {}\n{stdout}", out.status.code().unwrap());
    let expected_path = file.with_extension(suffix);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&expected_path, &actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&expected_path)
        .unwrap_or_else(|_| panic!("{} missing: run with UPDATE_GOLDEN=1", expected_path.display()));
    assert_eq!(actual, expected, "golden mismatch for {rel}; stderr: {}", String::from_utf8_lossy(&out.stderr));
}

/// Transaction ids are random: each `"txn":"<32 hex digits>"` becomes
/// `"txn":"<id N>"`, N counting distinct ids in order of appearance, so the
/// golden files still say which lines share a transaction.
fn ids_replaced(text: &str) -> String {
    const FIELD: &str = "\"txn\":\"";
    let mut seen: Vec<String> = Vec::new();
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find(FIELD) {
        let (head, tail) = rest.split_at(at + FIELD.len());
        out.push_str(head);
        let id = &tail[..tail.find('"').expect("closing quote")];
        assert!(id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()), "not a transaction id: {id}");
        let n = seen.iter().position(|s| s == id).unwrap_or_else(|| {
            seen.push(id.to_string());
            seen.len() - 1
        });
        out.push_str(&format!("<id {}>", n + 1));
        rest = &tail[id.len()..];
    }
    out.push_str(rest);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_outputs() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(here().join("golden"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "treaty"))
        .collect();
    files.sort();
    assert!(files.len() >= 3);
    for file in files {
        // A fresh cluster per file keeps commit indexes deterministic.
        let c = Cluster::start(3).await;
        golden(&c, &file, &[], "out");
        let c = Cluster::start(3).await;
        golden(&c, &file, &["--json", "--keep-going"], "json");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_runs_nothing_and_says_where() {
    let c = Cluster::start(3).await;
    let sentinel = c.client().put(b"sentinel", b"intact").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let big_value = dir.path().join("over-limit-value.treaty");
    std::fs::write(&big_value, format!("put a 1\nput big x'{}'\n", "00".repeat(1024 * 1024 + 1))).unwrap();
    let big_key = dir.path().join("over-limit-key.treaty");
    std::fs::write(&big_key, format!("put {} v\n", "k".repeat(1025))).unwrap();
    let too_many = dir.path().join("too-many-ops.treaty");
    let mut body = String::from("begin\n");
    for i in 0..1025 {
        body.push_str(&format!("put k{i} v\n"));
    }
    body.push_str("commit\n");
    std::fs::write(&too_many, body).unwrap();
    let corpus = here().join("bad-input");
    let cases: Vec<(PathBuf, &str, &str)> = vec![
        (corpus.join("unterminated-quote.treaty"), ":1:7:", "unterminated quoted string"),
        (corpus.join("unknown-command.treaty"), ":2:1:", "unknown command `frobnicate`"),
        (corpus.join("commit-without-begin.treaty"), ":2:1:", "`commit` without `begin`"),
        (corpus.join("nested-begin.treaty"), ":3:1:", "nested begin"),
        (corpus.join("invalid-hex.treaty"), ":1:9:", "invalid hex digit"),
        (corpus.join("empty.treaty"), ":1:1:", "no commands in the file"),
        (corpus.join("only-comments.treaty"), ":", "no commands in the file"),
        (corpus.join("missing-commit.treaty"), ":1:1:", "has no `commit`"),
        (corpus.join("if-outside-block.treaty"), ":1:1:", "`if` only works inside begin"),
        (corpus.join("shell-only-command.treaty"), ":1:1:", "for the interactive shell"),
        (corpus.join("scan-inside-transaction.treaty"), ":4:1:", "cannot be part of a transaction"),
        (big_value.clone(), ":2:9:", "1 MiB"),
        (big_key, ":1:5:", "1 KiB"),
        (too_many, ":1026:1:", "more than 1024 operations"),
        (dir.path().join("does-not-exist.treaty"), "does-not-exist.treaty: cannot read", "No such file"),
    ];
    for (file, location, message) in &cases {
        let out = run(&c, &[file.to_str().unwrap()], None);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{}: {err}", file.display());
        assert!(
            err.contains(location) && err.contains(message),
            "{}: expected {location} {message}: {err}",
            file.display()
        );
        assert!(out.stdout.is_empty(), "{} printed output", file.display());
    }
    // The same through standard input.
    let out = run(&c, &["-"], Some(b"put a 1\nput b \"x\n"));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("<stdin>:2:7: unterminated quoted string"));
    // Nothing ran: no commit since the sentinel, and it is intact everywhere.
    let status = c.client().cluster_status().await.unwrap();
    assert_eq!(status.coordinator.applied_index, sentinel.index, "a bad batch committed something");
    let v = c.assert_replicas_identical(&[b"sentinel".to_vec(), b"a".to_vec()]).await;
    assert_eq!(v[0], Some((b"intact".to_vec(), sentinel.index)));
    assert_eq!(v[1], None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn atomic_runs_the_file_as_one_transaction() {
    let c = Cluster::start(3).await;
    c.client().put(b"gate", b"closed").await.unwrap();
    let file = b"put a 1\nput b 2\nif gate = open\nput c 3\n";
    let out = run(&c, &["--atomic", "-"], Some(file));
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let v = c.assert_replicas_identical(&[b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]).await;
    assert!(v.iter().all(|x| x.is_none()), "a failed --atomic run applied something: {v:?}");
    c.client().put(b"gate", b"open").await.unwrap();
    let out = run(&c, &["--atomic", "-"], Some(file));
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let v = c.assert_replicas_identical(&[b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]).await;
    let index = v[0].as_ref().unwrap().1;
    assert!(v.iter().all(|x| x.as_ref().unwrap().1 == index), "one transaction, one index: {v:?}");
    let out = run(&c, &["--atomic", "-"], Some(b"begin\nput a 1\ncommit\n"));
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_at_first_failure_or_keep_going_and_pipelined_order_holds() {
    let c = Cluster::start(3).await;
    let mut file = String::new();
    for i in 0..300 {
        file.push_str(&format!("put k{} {i}\n", i % 50)); // rewrites: order matters
        if i == 150 {
            file.push_str("cas k0 wrong x\n");
        }
    }
    // Without --keep-going: stops at the cas (line 152), nothing after it ran.
    let out = run(&c, &["-"], Some(file.as_bytes()));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("stopped at the first failure") && err.contains("line 152"), "{err}");
    assert!(err.contains("summary: 151 committed, 1 aborted"), "{err}");
    let v = c.client().get(b"k1").await.unwrap().unwrap();
    assert_eq!(v.value, b"101", "the put on line 153 (k1 151) must not have run");
    // --keep-going: everything else commits, and the last write to each key wins.
    let out = run(&c, &["--keep-going", "-"], Some(file.as_bytes()));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("summary: 300 committed, 1 aborted"), "{err}");
    for k in 0..50 {
        let v = c.client().get(format!("k{k}").as_bytes()).await.unwrap().unwrap();
        assert_eq!(v.value, format!("{}", 250 + k).into_bytes(), "k{k}: pipelining reordered writes");
    }
}

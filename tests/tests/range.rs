//! Range reads (`scan`, `range`) against real clusters: the CLI's output,
//! a linearizable listing on a replica that is behind, listings under
//! concurrent multi-key commits, and a large listing in bounded memory.

use std::process::Stdio;
use std::time::{Duration, Instant};

use treaty_client::{RangeRequest, Txn, Write};
use treaty_tests::{rss_kib, Cluster};

fn cli(c: &Cluster, args: &[&str]) -> (i32, String, String) {
    let out = c.cli().arg("--endpoints").arg(c.participant_addrs().join(",")).args(args).output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap(), text(&out.stdout), text(&out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_lists_prefixes_and_ranges_in_pages_and_as_json() {
    let c = Cluster::start(3).await;
    let client = c.client();
    for (k, v) in [("user/1", "ada"), ("user/2", "alan"), ("user/3", "grace"), ("userx", "no"), ("z", "last")] {
        client.put(k.as_bytes(), v.as_bytes()).await.unwrap();
    }
    client.put(b"user/bin", &[0xff, 0x00]).await.unwrap();

    assert_eq!(
        cli(&c, &["scan", "user/"]),
        (0, "user/1 = ada\nuser/2 = alan\nuser/3 = grace\nuser/bin = \\xff\\x00\n".into(), String::new())
    );
    // Cut short by --limit: the rest is one command away.
    let (code, out, err) = cli(&c, &["scan", "user/", "--limit", "2", "--keys-only"]);
    assert_eq!((code, out.as_str()), (0, "user/1\nuser/2\n"));
    assert_eq!(err, "(more: continue with `treaty scan user/ --from user/3 --limit 2 --keys-only`)\n");
    let (_, out, _) = cli(&c, &["scan", "user/", "--from", "user/3", "--limit", "2", "--keys-only"]);
    assert_eq!(out, "user/3\nuser/bin\n");
    // Ranges: start inclusive, end exclusive, open-ended without an end.
    assert_eq!(cli(&c, &["range", "user/2", "userx"]).1, "user/2 = alan\nuser/3 = grace\nuser/bin = \\xff\\x00\n");
    assert_eq!(cli(&c, &["range", "userx"]).1, "userx = no\nz = last\n");
    // JSON lines, bytes that are not UTF-8 in base64, and where to go on.
    let (code, out, _) = cli(&c, &["scan", "user/", "--json", "--limit", "1", "--from", "user/bin"]);
    assert_eq!(code, 0);
    assert_eq!(out, "{\"key\":\"user/bin\",\"value_base64\":\"/wA=\",\"version\":6}\n");
    let (_, out, _) = cli(&c, &["range", "user/", "--json", "--limit", "1", "--stale"]);
    assert_eq!(
        out,
        "{\"key\":\"user/1\",\"value\":\"ada\",\"version\":1}\n{\"next\":\"user/2\",\"status\":\"more\"}\n"
    );
    // Nothing there, and bad bounds: a clear word, nothing changed.
    assert_eq!(cli(&c, &["scan", "nobody/"]), (0, String::new(), "(no keys)\n".into()));
    let (code, _, err) = cli(&c, &["range", "z", "a"]);
    assert_eq!(code, 2);
    assert!(err.contains("range end a sorts before its start z: swap them"), "{err}");
    let (code, _, err) = cli(&c, &["scan", "u", "--limit", "0"]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(cli(&c, &["scan", ""]).1.lines().count(), 6, "every key, and no internal one");
}

/// A replica that has been told a commit but not applied it yet still holds
/// the keys: a linearizable listing there must wait and show the commit
/// (the client was answered before the apply), a stale one may not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_on_a_replica_behind_waits_for_the_commit_it_owes() {
    let mut c = Cluster::start(3).await;
    c.stop(2);
    c.spawn(2, &[("TREATY_FAILPOINTS", "participant::before_apply=sleep(1000)")]);
    c.wait_ready(Duration::from_secs(20)).await;
    let writes = vec![Write::Put(b"t/a".to_vec(), b"A".to_vec()), Write::Put(b"t/b".to_vec(), b"B".to_vec())];
    let committed = c.client_for(1).commit(Txn::new(vec![], writes)).await.unwrap();
    let lagging = c.client_for(2);
    // Keys no prepared transaction holds are served at once, at the old index.
    let other = lagging.range_page(&RangeRequest::prefix(b"u/")).await.unwrap();
    assert!(other.index < committed.index, "a listing of other keys waited for the apply");
    let stale = lagging.range_page(&RangeRequest { stale: true, ..RangeRequest::prefix(b"t/") }).await.unwrap();
    assert!(stale.index < committed.index, "replica 2 should still be applying; its page is at {}", stale.index);
    assert!(stale.entries.is_empty(), "a stale page shows no part of an unapplied commit: {stale:?}");
    let page = lagging.range_page(&RangeRequest::prefix(b"t/")).await.unwrap();
    let keys: Vec<_> = page.entries.iter().map(|e| (e.key.as_slice(), e.version)).collect();
    assert_eq!(keys, [(&b"t/a"[..], committed.index), (&b"t/b"[..], committed.index)]);
    assert!(page.index >= committed.index);

    // An apply slower than the lock wait (2 s): the read gives up, and says
    // that the transaction committed and this replica is behind, not that
    // the coordinator may be down.
    c.stop(2);
    c.spawn(2, &[("TREATY_FAILPOINTS", "participant::before_apply=sleep(3000)")]);
    c.wait_ready(Duration::from_secs(30)).await;
    let slow = c.client_for(1).put(b"t/c", b"C").await.unwrap();
    let err = c.client_for(2).range_page(&RangeRequest::prefix(b"t/")).await.unwrap_err().to_string();
    assert!(err.contains(&format!("committed at index {} but not yet applied by participant 2", slow.index)), "{err}");
    assert!(!err.contains("coordinator down"), "{err}");
}

/// Writers commit transactions that set all of `acct/0..8` to one number;
/// listings on every replica, linearizable and stale, must always see the
/// eight equal, and a linearizable one never less than what was acknowledged
/// before it started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_never_show_half_a_transaction_under_concurrent_commits() {
    let c = Cluster::start(3).await;
    let keys: Vec<Vec<u8>> = (0..8).map(|i| format!("acct/{i}").into_bytes()).collect();
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let (client, keys, acked) = (c.client(), keys.clone(), acked.clone());
            tokio::spawn(async move {
                for round in 0..60u64 {
                    let n = round * 2 + w + 1;
                    let writes = keys.iter().map(|k| Write::Put(k.clone(), n.to_string().into_bytes())).collect();
                    let done = client.commit(Txn::new(vec![], writes)).await.unwrap();
                    acked.fetch_max(done.index, std::sync::atomic::Ordering::SeqCst);
                }
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut pages, mut nonempty) = (0, 0);
    while writers.iter().any(|w| !w.is_finished()) && Instant::now() < deadline {
        for i in 1..=3 {
            for stale in [false, true] {
                let floor = acked.load(std::sync::atomic::Ordering::SeqCst);
                let page = c
                    .client_for(i)
                    .range_page(&RangeRequest { stale, ..RangeRequest::prefix(b"acct/") })
                    .await
                    .unwrap();
                pages += 1;
                if !stale {
                    assert!(page.index >= floor, "replica {i}: page at {} after {floor} was acknowledged", page.index);
                }
                if page.entries.is_empty() {
                    continue;
                }
                nonempty += 1;
                assert_eq!(page.entries.len(), 8, "replica {i} (stale {stale}): {page:?}");
                let first = &page.entries[0];
                assert!(
                    page.entries.iter().all(|e| e.value == first.value && e.version == first.version),
                    "replica {i} (stale {stale}) shows half a transaction: {:?}",
                    page.entries
                );
            }
        }
    }
    for w in writers {
        w.await.unwrap();
    }
    assert!(nonempty > 10, "only {nonempty} of {pages} listings saw data: the test checked too little");
}

/// 100,000 keys (`TREATY_LISTING_KEYS` to change it; the closing note of
/// the client work quotes a 1,000,000-key run) listed through the CLI: the
/// output is complete and in order, and neither the CLI nor the replica
/// serving it grows with the range (both work one page at a time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_listing_streams_in_bounded_memory() {
    let keys: usize = std::env::var("TREATY_LISTING_KEYS").map_or(100_000, |v| v.parse().expect("a number"));
    assert!(keys.is_multiple_of(1000) && keys < 10_000_000, "TREATY_LISTING_KEYS: a multiple of 1000 below 10 million");
    let c = Cluster::start(3).await;
    let client = c.client();
    let value = vec![b'v'; 200];
    for chunk in 0..keys / 1000 {
        let writes =
            (0..1000).map(|i| Write::Put(format!("k/{:07}", chunk * 1000 + i).into_bytes(), value.clone())).collect();
        client.commit(Txn::new(vec![], writes)).await.unwrap();
    }
    c.wait_applied(Duration::from_secs(30)).await;
    let server = c.pid(1).unwrap();
    // The first pass also brings the data into sled's page cache, which
    // grows with the data read (up to its capacity), not with the range;
    // the second pass shows what serving one listing costs.
    for pass in ["first", "second"] {
        let server_before = rss_kib(server);
        let (lines, peak_cli, peak_server) = list_through_cli(&c, server);
        assert_eq!(lines, keys);
        eprintln!(
            "listing {keys} keys, {pass} pass: CLI peak RSS {peak_cli} KiB; replica {server_before} -> peak \
             {peak_server} KiB"
        );
        // 100k keys are about 23 MB of text; one page is about 1 MB.
        assert!(peak_cli < 32 * 1024, "the CLI grew to {peak_cli} KiB while listing");
        if pass == "second" {
            assert!(
                peak_server < server_before + 16 * 1024,
                "the replica grew from {server_before} to {peak_server} KiB while serving the listing"
            );
        }
    }
}

/// `treaty scan k/` against participant 1 (process `server`): the lines
/// (checked in order), and the peak RSS of the CLI and of the replica.
fn list_through_cli(c: &Cluster, server: u32) -> (usize, u64, u64) {
    let mut cmd = c.cli();
    cmd.args(["--endpoints", &c.addr(1), "scan", "k/"]).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let pid = child.id();
    let mut stdout = child.stdout.take().unwrap();
    let (mut lines, mut peak_cli, mut peak_server, mut last) = (0usize, 0, 0, Vec::new());
    let mut buf = vec![0u8; 1 << 16];
    let mut partial = Vec::new();
    loop {
        let n = std::io::Read::read(&mut stdout, &mut buf).unwrap();
        if n == 0 {
            break;
        }
        peak_cli = peak_cli.max(rss_kib(pid));
        peak_server = peak_server.max(rss_kib(server));
        partial.extend_from_slice(&buf[..n]);
        while let Some(nl) = partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = partial.drain(..=nl).collect();
            let key = line.split(|b| *b == b' ').next().unwrap().to_vec();
            assert!(key > last, "out of order or repeated: {:?} after {:?}", key, last);
            last = key;
            lines += 1;
        }
    }
    assert!(child.wait().unwrap().success());
    (lines, peak_cli, peak_server)
}

//! Partitioned keys (`--replication 3` on 5 participants), with real
//! processes: where keys are stored (checked in each participant's own sled
//! files), reads through every participant, range reads that never show
//! half of a transaction, and per-partition availability after kill -9.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use treaty_client::{Condition, Error, RangeRequest, ReadMode};
use treaty_common::protocol::{Placement, DEFAULT_PARTITIONS};
use treaty_tests::Cluster;

const N: usize = 5;
const R: usize = 3;

fn placement() -> Placement {
    Placement::new((1..=N as u64).collect(), R, DEFAULT_PARTITIONS)
}

async fn start(min_replicas: usize) -> Cluster {
    let mut c = Cluster::new(N);
    c.coordinator_args = ["--replication", "3", "--min-replicas", &min_replicas.to_string()].map(String::from).to_vec();
    for i in 0..=N {
        c.spawn(i, &[]);
    }
    c.wait_ready(Duration::from_secs(20)).await;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_stored_on_exactly_their_replicas_and_read_through_every_participant() {
    let mut c = start(3).await;
    let client = c.client();
    let keys: Vec<Vec<u8>> = (0..60).map(|i| format!("user/{i:03}").into_bytes()).collect();
    for k in &keys {
        client.put(k, &[k.as_slice(), b"=v"].concat()).await.unwrap();
    }
    // A transaction across partitions commits on all of them.
    let (a, b) = (b"user/000".to_vec(), b"user/001".to_vec());
    assert_ne!(placement().partition(&a), placement().partition(&b));
    client
        .txn()
        .when(Condition::ValueEquals(a.clone(), b"user/000=v".to_vec()))
        .put(&a, b"moved")
        .delete(&b)
        .commit()
        .await
        .unwrap();
    let expect = |k: &[u8]| match k {
        k if k == a.as_slice() => Some(b"moved".to_vec()),
        k if k == b.as_slice() => None,
        k => Some([k, b"=v"].concat()),
    };

    // The CLI names the replicas the placement gives.
    let out = c.cli().arg("--endpoints").arg(c.addr(2)).args(["placement", "user/007"]).output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    let replicas = placement().replicas_of(b"user/007").to_vec();
    let ids = replicas.iter().map(u64::to_string).collect::<Vec<_>>().join(", ");
    assert!(out.status.success() && said.contains(&format!("on participants {ids}")), "{said}");

    // Every key reads the same through every participant, held there or
    // not, linearizable and stale; and a scan through each sees them all.
    for i in 1..=N {
        let door = c.client_for(i);
        for k in &keys {
            for mode in [ReadMode::Linearizable, ReadMode::Stale] {
                let got = door.get_with(k, mode).await.unwrap().map(|v| v.value);
                assert_eq!(got, expect(k), "key {:?} through participant {i} ({mode:?})", String::from_utf8_lossy(k));
            }
        }
        let mut pages = door.range(RangeRequest { limit: 7, ..RangeRequest::prefix(b"user/") }, None);
        let mut scanned = Vec::new();
        while let Some(page) = pages.next().await {
            scanned.extend(page.unwrap().entries.into_iter().map(|e| (e.key, e.value.unwrap())));
        }
        let want: Vec<(Vec<u8>, Vec<u8>)> = keys.iter().filter_map(|k| expect(k).map(|v| (k.clone(), v))).collect();
        assert_eq!(scanned, want, "scan through participant {i}");
    }
    let status = client.cluster_status().await.unwrap();
    assert_eq!((status.placement.replication, status.placement.partitions), (R, DEFAULT_PARTITIONS));

    // Each participant's own files hold exactly the keys placed on it.
    c.wait_applied(Duration::from_secs(10)).await;
    for i in 0..=N {
        c.stop(i);
    }
    for i in 1..=N as u64 {
        let store = treaty_storage::ReplicaStore::open(&c.data_dir(i as usize), i).unwrap();
        let mut held = 0;
        for k in &keys {
            let local = store.get(k).unwrap().map(|v| v.value);
            if placement().holds(i, k) {
                assert_eq!(local, expect(k), "participant {i} holds {:?}", String::from_utf8_lossy(k));
                held += 1;
            } else {
                assert_eq!(local, None, "participant {i} stores {:?}, not placed on it", String::from_utf8_lossy(k));
            }
        }
        // Roughly its share (3 of 5 of 60), as the placement spreads partitions.
        assert!((20..=52).contains(&held), "participant {i} holds {held} of 60 keys");
    }
}

/// Transfers between accounts in different partitions run while range
/// reads through every participant check that the total never changes: a
/// page read across partitions shows a transaction whole or not at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_reads_across_partitions_never_show_half_a_transaction() {
    let c = start(3).await;
    let client = Arc::new(c.client());
    let accounts: Vec<Vec<u8>> = (0..8).map(|i| format!("acct/{i}").into_bytes()).collect();
    let partitions: std::collections::BTreeSet<u32> = accounts.iter().map(|a| placement().partition(a)).collect();
    assert!(partitions.len() >= 4, "accounts spread over partitions: {partitions:?}");
    let stop = Arc::new(AtomicBool::new(false));
    let writers = treaty_tests::transfers(client.clone(), 8, 4, stop.clone(), 6).await;
    let mut scans = 0;
    let mut retries = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        for i in 1..=N {
            for stale in [false, true] {
                match treaty_tests::account_total(&c.client_for(i), 8, stale).await {
                    Some(total) => {
                        assert_eq!(total, 800, "a range read through participant {i} saw a transfer half done");
                        scans += 1;
                    }
                    None => retries += 1,
                }
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut transfers = 0;
    for w in writers {
        transfers += w.await.unwrap();
    }
    assert!(transfers >= 20, "only {transfers} transfers committed");
    assert!(scans >= 20 && retries <= scans, "{scans} scans, {retries} gave up");
    eprintln!("{transfers} transfers, {scans} consistent scans, {retries} retry answers");
}

/// kill -9 two of a partition's three replicas: writes to its keys are
/// refused with an error naming it, while a partition whose replicas all
/// live keeps committing and every key stays readable where a replica lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_two_replicas_of_a_partition_refuses_its_writes_and_others_go_on() {
    let mut c = start(2).await;
    let p = placement();
    // A key whose replicas include 4 and 5, and one on 1, 2, 3 only.
    let find = |want: &dyn Fn(&[u64]) -> bool| {
        (0..10_000).map(|i| format!("k/{i}").into_bytes()).find(|k| want(p.replicas_of(k))).unwrap()
    };
    let hit = find(&|r| r.contains(&4) && r.contains(&5));
    let safe = find(&|r| r == [1, 2, 3]);
    let client = c.client_with((1..=3).map(|i| c.addr(i)).collect());
    client.put(&hit, b"before").await.unwrap();
    client.put(&safe, b"before").await.unwrap();
    c.kill(4);
    c.kill(5);
    // The survivors are excluded from the view within detect + lease.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = client.cluster_status().await.unwrap();
        if s.members == [1, 2, 3] {
            break;
        }
        assert!(Instant::now() < deadline, "4 and 5 still in the view: {:?}", s.members);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let partition = p.partition(&hit);
    match client.put(&hit, b"after").await {
        Err(Error::Unavailable(m)) => {
            assert!(m.contains(&format!("partition {partition}")), "{m}");
            assert!(m.contains("other partitions keep working"), "{m}");
        }
        other => panic!("a write to partition {partition} with one live replica of three: {other:?}"),
    }
    for i in 0..5 {
        client.put(&safe, format!("after {i}").as_bytes()).await.unwrap();
    }
    assert_eq!(client.get(&safe).await.unwrap().unwrap().value, b"after 4");
    // The refused key is unchanged where its last replica lives.
    assert_eq!(client.get(&hit).await.unwrap().unwrap().value, b"before");
    // Back: the partition takes writes again.
    c.spawn(4, &[]);
    c.spawn(5, &[]);
    c.wait_ready(Duration::from_secs(30)).await;
    client.put(&hit, b"again").await.unwrap();
    let all = c.client();
    assert_eq!(all.get(&hit).await.unwrap().unwrap().value, b"again");
    let by_key: BTreeMap<_, _> = [(hit.clone(), b"again".to_vec()), (safe.clone(), b"after 4".to_vec())].into();
    for i in 1..=N {
        for (k, v) in &by_key {
            let got = c.client_for(i).get_with(k, ReadMode::Stale).await.unwrap().unwrap().value;
            assert_eq!(&got, v, "participant {i} after readmission");
        }
    }
}

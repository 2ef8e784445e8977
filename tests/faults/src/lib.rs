//! Treaty's fault-injection harness.
//!
//! A campaign starts a real cluster (one coordinator, five participants) with
//! a fault proxy on every coordinator<->participant path, runs a concurrent
//! workload while injecting faults, records every operation with call and
//! return times from one monotonic clock, and checks the history for
//! linearizability per key group ([`checker`]).
//!
//! Workload: clients pick a key group (three keys) and do a linearizable
//! get, a put, a delete, or a transaction with a condition on one key of the
//! group and writes to two. Values are unique per write.
//!
//! Faults (one at a time, chosen by the seed): `kill -9` and restart of a
//! participant or the coordinator, SIGSTOP/SIGCONT of either, and a
//! partition between the coordinator and one participant (connections
//! dropped, or silently blackholed); and, only when asked for
//! (`--faults replace-participant`, alone or among the others), a membership
//! change: a new participant added (`treaty member add`) and a random one
//! removed for good.

pub mod checker;
pub mod proxy;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use treaty_client::{Client, Condition, Error, MemberChange, Txn, TxnId, Write};
use treaty_common::rpc::Outcome;
use treaty_tests::Cluster;

use checker::{Call, Cond, Op, Ret, Verdict};
use proxy::{Mode, Proxy};

/// The kinds of fault a campaign injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum FaultKind {
    /// `kill -9` a participant, restart it after the hold time.
    KillParticipant,
    /// `kill -9` the coordinator, restart it after the hold time.
    KillCoordinator,
    /// SIGSTOP a participant, SIGCONT after the hold time.
    PauseParticipant,
    /// SIGSTOP the coordinator, SIGCONT after the hold time.
    PauseCoordinator,
    /// Cut one participant off from the coordinator: connections refused/reset.
    PartitionDrop,
    /// Cut one participant off silently: bytes are swallowed, nothing answers.
    PartitionBlackhole,
    /// Add a new participant (the next id) and remove a random one for good.
    /// Not among the default kinds (so that every seed keeps its faults).
    ReplaceParticipant,
}

impl FaultKind {
    pub const ALL: [FaultKind; 6] = [
        FaultKind::KillParticipant,
        FaultKind::KillCoordinator,
        FaultKind::PauseParticipant,
        FaultKind::PauseCoordinator,
        FaultKind::PartitionDrop,
        FaultKind::PartitionBlackhole,
    ];
}

#[derive(Clone, Debug)]
pub struct CampaignConfig {
    pub seed: u64,
    /// How long the workload runs.
    pub duration: Duration,
    pub clients: usize,
    pub groups: usize,
    pub faults: bool,
    /// Which faults to inject (all of them unless narrowed).
    pub kinds: Vec<FaultKind>,
    /// Run a deliberately broken build: reads skip the wait for prepared
    /// writes (and applies are slowed to widen the window). The checker must
    /// reject the history.
    pub broken: bool,
    /// `--replication` for the coordinator (`None`: full copies). Key groups
    /// then span partitions, and forwarded reads cross the fault proxies.
    pub replication: Option<usize>,
}

impl CampaignConfig {
    pub fn new(seed: u64) -> Self {
        CampaignConfig {
            seed,
            duration: Duration::from_secs(8),
            clients: 6,
            groups: 4,
            faults: true,
            kinds: FaultKind::ALL.to_vec(),
            broken: false,
            replication: None,
        }
    }
}

#[derive(Debug)]
pub struct Report {
    pub seed: u64,
    pub ops: usize,
    pub committed: usize,
    pub aborted: usize,
    pub unknown: usize,
    pub reads: usize,
    pub faults: Vec<String>,
    /// Longest time a write that committed took (a stall, under faults).
    pub worst_write_ms: u64,
    /// Writes whose outcome the client did not learn, resolved afterwards
    /// from the coordinator's record (committed ones stay open-ended).
    pub resolved: usize,
    pub verdicts: BTreeMap<usize, Verdict>,
}

impl Report {
    pub fn linearizable(&self) -> bool {
        self.verdicts.values().all(|v| *v == Verdict::Linearizable)
    }

    pub fn summary(&self) -> String {
        let bad: Vec<String> = self
            .verdicts
            .iter()
            .filter(|(_, v)| **v != Verdict::Linearizable)
            .map(|(g, v)| format!("group {g}: {v:?}"))
            .collect();
        format!(
            "seed {}: {} ops ({} committed, {} aborted, {} reads; {} with an outcome unknown to the client, resolved afterwards), worst committed write {} ms, faults [{}]: {}",
            self.seed,
            self.ops,
            self.committed,
            self.aborted,
            self.reads,
            self.resolved,
            self.worst_write_ms,
            self.faults.join(", "),
            if bad.is_empty() { "LINEARIZABLE".to_string() } else { format!("VIOLATION {}", bad.join("; ")) }
        )
    }
}

fn key(group: usize, k: usize) -> String {
    format!("g{group}/k{k}")
}

/// One client's loop: returns its operations tagged with their group.
async fn client_loop(
    id: usize,
    client: Client,
    groups: usize,
    seed: u64,
    clock: Instant,
    stop: Arc<AtomicBool>,
) -> Vec<(usize, Op, Option<TxnId>, Option<u64>, String)> {
    let mut rng = StdRng::seed_from_u64(seed ^ (id as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut ops = Vec::new();
    let mut seq = 0u64;
    let mut last_seen: BTreeMap<String, Option<String>> = BTreeMap::new();
    let now = || clock.elapsed().as_nanos() as u64;
    while !stop.load(Ordering::Relaxed) {
        let g = rng.gen_range(0..groups);
        let k = key(g, rng.gen_range(0..3));
        seq += 1;
        let value = format!("c{id}-{seq}");
        let roll = rng.gen_range(0..100);
        let invoked = now();
        let mut txn_id = None;
        let mut index = None;
        let (call, ret) = if roll < 40 {
            match client.get(k.as_bytes()).await {
                Ok(v) => {
                    let v = v.map(|v| String::from_utf8(v.value).expect("utf8 values"));
                    last_seen.insert(k.clone(), v.clone());
                    (Call::Get(k), Ret::Value(v))
                }
                // A failed read had no effect: nothing to record.
                Err(_) => continue,
            }
        } else {
            let (call, txn) = if roll < 65 {
                let txn = Txn::new(vec![], vec![Write::Put(k.clone().into_bytes(), value.clone().into_bytes())]);
                (Call::Put(k, value), txn)
            } else if roll < 70 {
                (Call::Del(k.clone()), Txn::new(vec![], vec![Write::Delete(k.into_bytes())]))
            } else {
                let other = key(g, rng.gen_range(0..3));
                let cond = match last_seen.get(&k).cloned().flatten() {
                    Some(v) if rng.gen_bool(0.8) => Cond::Equals(k.clone(), v),
                    _ => Cond::Missing(k.clone()),
                };
                let mut writes = vec![(k.clone(), Some(value.clone()))];
                if other != k {
                    writes.push((other.clone(), if rng.gen_bool(0.8) { Some(format!("{value}b")) } else { None }));
                }
                let txn = Txn::new(
                    vec![match &cond {
                        Cond::Equals(k, v) => Condition::ValueEquals(k.clone().into_bytes(), v.clone().into_bytes()),
                        Cond::Missing(k) => Condition::Missing(k.clone().into_bytes()),
                    }],
                    writes
                        .iter()
                        .map(|(k, v)| match v {
                            Some(v) => Write::Put(k.clone().into_bytes(), v.clone().into_bytes()),
                            None => Write::Delete(k.clone().into_bytes()),
                        })
                        .collect(),
                );
                (Call::Txn(vec![cond], writes), txn)
            };
            txn_id = Some(txn.id);
            let r = client.commit(txn).await;
            index = r.as_ref().ok().map(|c| c.index);
            (call, write_ret(r.map(|_| ())))
        };
        let returned = if ret == Ret::Unknown { u64::MAX } else { now() };
        ops.push((g, Op { client: id, call, ret, invoked, returned }, txn_id, index, client.endpoint().to_string()));
    }
    ops
}

fn write_ret(r: Result<(), Error>) -> Ret {
    match r {
        Ok(()) => Ret::Committed,
        Err(Error::ConditionFailed(_)) => Ret::Aborted,
        // Anything else may or may not have happened.
        Err(_) => Ret::Unknown,
    }
}

/// Sends a signal to a node's process.
fn signal(cluster: &Cluster, node: usize, sig: i32) {
    if let Some(pid) = cluster.pid(node) {
        unsafe {
            libc::kill(pid as i32, sig);
        }
    }
}

async fn inject_faults(
    cluster: &mut Cluster,
    to_participant: &[Proxy],
    to_coordinator: &[Proxy],
    rng: &mut StdRng,
    kinds: &[FaultKind],
    clock: Instant,
    until: Instant,
) -> Vec<String> {
    let mut log = Vec::new();
    let n = cluster.n();
    while Instant::now() + Duration::from_millis(2500) < until {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(300..1200))).await;
        let hold = Duration::from_millis(rng.gen_range(300..2500));
        let live = cluster.live();
        // The draw every seed has always used while the participants are the first `n`.
        let first_n = live.iter().copied().eq(1..=n);
        let target = if first_n { rng.gen_range(1..=n) } else { live[rng.gen_range(0..live.len())] };
        let kind = if kinds == FaultKind::ALL {
            // The draw every seed has always used (partitions twice as likely).
            match rng.gen_range(0..6) {
                0 => FaultKind::KillParticipant,
                1 => FaultKind::KillCoordinator,
                2 => FaultKind::PauseParticipant,
                3 => FaultKind::PauseCoordinator,
                _ if rng.gen_bool(0.5) => FaultKind::PartitionDrop,
                _ => FaultKind::PartitionBlackhole,
            }
        } else {
            kinds[rng.gen_range(0..kinds.len())]
        };
        let at = clock.elapsed().as_millis();
        let before = log.len();
        match kind {
            FaultKind::KillParticipant => {
                log.push(format!("kill -9 participant {target} for {} ms", hold.as_millis()));
                cluster.kill(target);
                tokio::time::sleep(hold).await;
                cluster.spawn(target, &[]);
            }
            FaultKind::KillCoordinator => {
                log.push(format!("kill -9 coordinator for {} ms", hold.as_millis()));
                cluster.kill(0);
                tokio::time::sleep(hold).await;
                cluster.spawn(0, &[]);
            }
            FaultKind::PauseParticipant => {
                log.push(format!("SIGSTOP participant {target} for {} ms", hold.as_millis()));
                signal(cluster, target, libc::SIGSTOP);
                tokio::time::sleep(hold).await;
                signal(cluster, target, libc::SIGCONT);
            }
            FaultKind::PauseCoordinator => {
                log.push(format!("SIGSTOP coordinator for {} ms", hold.as_millis()));
                signal(cluster, 0, libc::SIGSTOP);
                tokio::time::sleep(hold).await;
                signal(cluster, 0, libc::SIGCONT);
            }
            FaultKind::ReplaceParticipant => {
                let new = replace_participant(cluster, target).await;
                log.push(format!("participant {new} added, participant {target} removed"));
            }
            // Participants added later have no proxy: a partition cuts one
            // of the first ones.
            FaultKind::PartitionDrop | FaultKind::PartitionBlackhole => {
                let target = if target <= to_participant.len() {
                    target
                } else {
                    *live.iter().find(|i| **i <= to_participant.len()).expect("a proxied participant")
                };
                let mode = if kind == FaultKind::PartitionDrop { Mode::Drop } else { Mode::Blackhole };
                log.push(format!("partition participant {target} ({mode:?}) for {} ms", hold.as_millis()));
                to_participant[target - 1].set(mode);
                to_coordinator[target - 1].set(mode);
                tokio::time::sleep(hold).await;
                to_participant[target - 1].set(Mode::Pass);
                to_coordinator[target - 1].set(Mode::Pass);
            }
        }
        if let Some(last) = log.get_mut(before) {
            last.push_str(&format!(" (at {at}..{} ms)", clock.elapsed().as_millis()));
        }
    }
    log
}

/// Adds a new participant (started, then admitted with `treaty member add`)
/// and removes `target` for good; returns the new id. Writes go on
/// throughout; the removed process exits by itself once it is out.
async fn replace_participant(cluster: &mut Cluster, target: usize) -> usize {
    let new = cluster.add_node();
    cluster.spawn(new, &[]);
    let client = cluster.client();
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster.status(new).await.is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let add = MemberChange::Add { id: new as u64, addr: cluster.addr(new) };
    let remove = MemberChange::Remove { id: target as u64 };
    for change in [add, remove] {
        // Asking again is safe: a change already made is not an error. A
        // coordinator restarting after the previous fault may not answer yet.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match client.change_members(change.clone()).await {
                Ok(_) => break,
                Err(e) if e.is_retryable() && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(e) => panic!("{change:?}: {e}"),
            }
        }
    }
    cluster.mark_removed(target);
    new
}

/// Runs one campaign and checks its history.
pub async fn run(cfg: CampaignConfig) -> anyhow::Result<Report> {
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut cluster = Cluster::new(5);
    if let Some(r) = cfg.replication {
        cluster.coordinator_args.extend(["--replication".to_string(), r.to_string()]);
    }
    let mut to_participant = Vec::new();
    let mut to_coordinator = Vec::new();
    for i in 1..=5 {
        to_participant.push(Proxy::start(cluster.addr(i)).await);
        to_coordinator.push(Proxy::start(cluster.addr(0)).await);
    }
    cluster.route_to_participant = Some(to_participant.iter().map(|p| p.addr.clone()).collect());
    cluster.route_to_coordinator = Some(to_coordinator.iter().map(|p| p.addr.clone()).collect());
    let broken_env = [("TREATY_FAILPOINTS", "participant::skip_read_wait=return;participant::before_apply=sleep(40)")];
    for i in 0..=5 {
        cluster.spawn(i, if cfg.broken && i > 0 { &broken_env } else { &[] });
    }
    cluster.wait_ready(Duration::from_secs(30)).await;

    let clock = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let endpoints = cluster.participant_addrs();
    let mut clients = Vec::new();
    for id in 0..cfg.clients {
        let mut eps = endpoints.clone();
        let len = eps.len();
        eps.rotate_left(id % len);
        let client = cluster.client_with(eps);
        clients.push(tokio::spawn(client_loop(id, client, cfg.groups, cfg.seed, clock, stop.clone())));
    }
    let until = Instant::now() + cfg.duration;
    let faults = if cfg.faults {
        inject_faults(&mut cluster, &to_participant, &to_coordinator, &mut rng, &cfg.kinds, clock, until).await
    } else {
        Vec::new()
    };
    tokio::time::sleep_until(until.into()).await;
    stop.store(true, Ordering::Relaxed);
    let mut recorded = Vec::new();
    for c in clients {
        recorded.extend(c.await?);
    }
    // Heal, converge, and read every key once more from one replica: the
    // final state is part of the history.
    for p in to_participant.iter().chain(&to_coordinator) {
        p.set(Mode::Pass);
    }
    cluster.wait_ready(Duration::from_secs(60)).await;
    let final_client = cluster.client_for(cluster.live()[0]);
    // Writes whose outcome the client never learned: ask the coordinator's
    // durable record. Never committed means it never took effect (drop it);
    // committed means it took effect at some unknown time after its call.
    let mut history: BTreeMap<usize, Vec<Op>> = BTreeMap::new();
    // Per group, a line per operation for `TREATY_FAULTS_DUMP`.
    let mut dump: BTreeMap<usize, Vec<(u64, String)>> = BTreeMap::new();
    let mut worst_write_ms = 0;
    let mut resolved = 0;
    for (g, mut op, txn_id, mut index, endpoint) in recorded {
        let client_ret = op.ret.clone();
        if op.ret == Ret::Unknown {
            let id = txn_id.expect("writes carry their id");
            let deadline = Instant::now() + Duration::from_secs(30);
            let outcome = loop {
                match final_client.outcome(id).await {
                    Ok(Outcome::Pending) | Err(_) if Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(200)).await
                    }
                    other => break other?,
                }
            };
            match outcome {
                Outcome::Committed(i) => {
                    op.ret = Ret::Committed;
                    index = Some(i);
                }
                Outcome::Aborted => {
                    resolved += 1;
                    dump.entry(g)
                        .or_default()
                        .push((op.invoked, format!("{op:?} txn {txn_id:?} DROPPED (never committed)")));
                    continue;
                }
                Outcome::Forgotten(i) => {
                    anyhow::bail!("transaction {id}'s decision was compacted (through index {i}) before it was checked")
                }
                Outcome::Pending => {
                    let log = cluster.log(0);
                    let tail: Vec<&str> = log.lines().rev().take(40).collect();
                    let tail: Vec<&str> = tail.into_iter().rev().collect();
                    anyhow::bail!("transaction {id} still pending after healing; coordinator log:\n{}", tail.join("\n"))
                }
            }
            resolved += 1;
        } else if op.ret == Ret::Committed {
            worst_write_ms = worst_write_ms.max((op.returned - op.invoked) / 1_000_000);
        }
        dump.entry(g).or_default().push((
            op.invoked,
            format!("{op:?} txn {txn_id:?} index {index:?} (client saw {client_ret:?} via {endpoint})"),
        ));
        history.entry(g).or_default().push(op);
    }
    if let (Ok(dir), Some(_)) = (std::env::var("TREATY_FAULTS_DUMP"), std::env::var_os("TREATY_FAULTS_DUMP_ALL")) {
        for i in 0..=cluster.n() {
            std::fs::write(std::path::Path::new(&dir).join(format!("seed{}-node{i}.log", cfg.seed)), cluster.log(i))?;
        }
    }
    let all_keys: Vec<Vec<u8>> = (0..cfg.groups).flat_map(|g| (0..3).map(move |k| key(g, k).into_bytes())).collect();
    cluster.assert_replicas_identical(&all_keys).await;
    for g in 0..cfg.groups {
        for k in 0..3 {
            let invoked = clock.elapsed().as_nanos() as u64;
            let v = final_client.get(key(g, k).as_bytes()).await?;
            let returned = clock.elapsed().as_nanos() as u64;
            let v = v.map(|v| String::from_utf8(v.value).expect("utf8"));
            dump.entry(g).or_default().push((invoked, format!("FINAL READ {} = {v:?}", key(g, k))));
            history.entry(g).or_default().push(Op {
                client: usize::MAX,
                call: Call::Get(key(g, k)),
                ret: Ret::Value(v),
                invoked,
                returned,
            });
        }
    }
    let mut report = Report {
        seed: cfg.seed,
        ops: 0,
        committed: 0,
        aborted: 0,
        unknown: 0,
        reads: 0,
        faults,
        worst_write_ms,
        resolved,
        verdicts: BTreeMap::new(),
    };
    let verdicts = Arc::new(Mutex::new(BTreeMap::new()));
    for (g, ops) in history {
        for op in &ops {
            report.ops += 1;
            match op.ret {
                Ret::Committed => report.committed += 1,
                Ret::Aborted => report.aborted += 1,
                Ret::Unknown => report.unknown += 1,
                Ret::Value(_) => report.reads += 1,
            }
        }
        let verdict = tokio::task::spawn_blocking(move || checker::check(&ops, 2_000_000)).await?;
        if verdict != Verdict::Linearizable || std::env::var_os("TREATY_FAULTS_DUMP_ALL").is_some() {
            if let Ok(dir) = std::env::var("TREATY_FAULTS_DUMP") {
                let mut lines = dump.remove(&g).unwrap_or_default();
                lines.sort();
                let text: Vec<String> = lines.into_iter().map(|(_, l)| l).collect();
                let path = std::path::Path::new(&dir).join(format!("seed{}-group{g}.txt", cfg.seed));
                std::fs::write(&path, text.join("\n"))?;
                eprintln!("history of group {g} written to {}", path.display());
            }
        }
        verdicts.lock().unwrap().insert(g, verdict);
    }
    report.verdicts = Arc::try_unwrap(verdicts).unwrap().into_inner().unwrap();
    Ok(report)
}

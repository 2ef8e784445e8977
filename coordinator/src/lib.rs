//! `treaty-coordinator`: runs two-phase commit for every transaction.
//!
//! For each submitted transaction:
//! 1. Deduplicate: a transaction id with a recorded decision returns it; one
//!    still in flight is joined rather than run twice.
//! 2. Lock every key it touches in the [`LockTable`] (FIFO per key, in key
//!    order), so conflicting transactions queue instead of aborting.
//! 3. PREPARE on every participant in parallel, under a fresh attempt id.
//! 4. All YES: the *decider* task assigns the next commit index and makes the
//!    decision (with the writes, as a log entry) durable, sharing one sync
//!    among all decisions waiting (group commit). Only then is the client
//!    answered and COMMIT sent. Key locks are released once the decision is
//!    durable.
//!    Any NO or failure: ABORT. Nothing is forced to disk (presumed abort:
//!    no decision record means abort).
//!
//! Participants pull what they miss (outcomes of transactions in doubt, log
//! entries) through `sync` and `fetch_log`, so COMMIT and ABORT messages are
//! fire-and-forget and a restarted coordinator needs no resend loop: its
//! durable log is the truth.
//!
//! Failpoints, in protocol order: `coordinator::before_prepare`,
//! `coordinator::before_decision`, `coordinator::before_decision_sync`,
//! `coordinator::after_decision_sync` (durable, nobody told),
//! `coordinator::after_first_commit` (participant 1 told, the rest not).

pub mod cli;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tarpc::context::Context;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

use treaty_common::crash_point;
use treaty_common::protocol::{LockTable, Membership, MembershipConfig, View, ViewChange};
use treaty_common::rpc::{
    self, ClusterId, ClusterStatus, CoordinatorService, LogEntry, NodeStatus, Outcome, ParticipantServiceClient, Peer,
    PrepareRequest, SyncReply, SyncRequest, Vote,
};
use treaty_common::storage::{CoordinatorStore, Decision, GroupSync};
use treaty_common::{Committed, Error, Result, Txn, TxnId, Write};

/// How the coordinator is configured (flags / `TREATY_*` variables).
#[derive(Clone, Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    /// Participant addresses; participant ids are 1-based positions here.
    pub participants: Vec<String>,
    /// Longest wait for a PREPARE vote.
    pub prepare_timeout: Duration,
    /// Longest wait in the key lock queue before answering "conflict".
    pub lock_timeout: Duration,
    /// Failure detection, leases and the minimum view size.
    pub membership: MembershipConfig,
}

impl Config {
    pub fn new(data_dir: PathBuf, participants: Vec<String>) -> Self {
        Config {
            data_dir,
            participants,
            prepare_timeout: Duration::from_secs(3),
            lock_timeout: Duration::from_secs(8),
            membership: MembershipConfig::default(),
        }
    }
}

type Waiters = HashMap<TxnId, Vec<oneshot::Sender<Result<Committed>>>>;

#[derive(Default)]
struct Locks {
    table: LockTable,
    waiting: HashMap<TxnId, oneshot::Sender<()>>,
}

impl Locks {
    fn wake(&mut self, granted: Vec<TxnId>) {
        for t in granted {
            if let Some(tx) = self.waiting.remove(&t) {
                let _ = tx.send(());
            }
        }
    }
}

struct DecideRequest {
    txn_id: TxnId,
    writes: Vec<Write>,
    reply: oneshot::Sender<u64>,
}

struct Coordinator {
    cluster: ClusterId,
    addr: String,
    store: CoordinatorStore,
    peers: Vec<Arc<Peer<ParticipantServiceClient>>>,
    locks: Mutex<Locks>,
    inflight: Mutex<Waiters>,
    decider: mpsc::UnboundedSender<DecideRequest>,
    last_index: Arc<AtomicU64>,
    committed: Arc<AtomicU64>,
    sync: GroupSync,
    config: Config,
    membership: Mutex<Membership>,
    /// Held shared by each transaction from choosing its view to its
    /// decision; held exclusively by a view change.
    gate: tokio::sync::RwLock<()>,
    epoch_tx: tokio::sync::watch::Sender<u64>,
    clock: Instant,
}

/// Releases a transaction's key locks when dropped.
struct LockGuard<'a> {
    coord: &'a Coordinator,
    txn_id: TxnId,
}

impl Drop for LockGuard<'_> {
    fn drop(&mut self) {
        let mut locks = self.coord.locks.lock().unwrap();
        let granted = locks.table.release(self.txn_id);
        locks.waiting.remove(&self.txn_id);
        locks.wake(granted);
    }
}

fn fatal_storage(what: &str, e: Error) -> ! {
    error!(error = %e, "storage failure while {what}; aborting");
    eprintln!("treaty-coordinator: storage failure while {what}: {e}");
    std::process::abort()
}

impl Coordinator {
    /// A transaction's decision as far as anyone may be told. A commit is
    /// recorded before its sync and is readable at once; it counts only
    /// once durable (its index at or below `last_index`), or a crash in
    /// between could take back what a participant or client was told. Until
    /// then the transaction is still in `inflight`, so it reads as running.
    fn durable_decision(&self, txn_id: TxnId) -> Result<Option<Decision>> {
        Ok(match self.store.decision(txn_id)? {
            Some(Decision::Committed(i)) if i > self.last_index.load(Ordering::Acquire) => None,
            d => d,
        })
    }

    async fn submit(&self, txn: Txn) -> Result<Committed> {
        txn.validate()?;
        if let Some(d) = self.durable_decision(txn.id)? {
            return decision_result(d);
        }
        let joined = {
            let mut inflight = self.inflight.lock().unwrap();
            match inflight.get_mut(&txn.id) {
                Some(waiters) => {
                    let (tx, rx) = oneshot::channel();
                    waiters.push(tx);
                    Some(rx)
                }
                None => {
                    inflight.insert(txn.id, Vec::new());
                    None
                }
            }
        };
        if let Some(rx) = joined {
            return rx.await.unwrap_or_else(|_| Err(Error::InDoubt("the first submission was dropped; retry".into())));
        }
        // A run of the same id may have finished between the lookup and the
        // insert: its decision is recorded before it leaves `inflight`.
        let result = match self.durable_decision(txn.id)? {
            Some(d) => decision_result(d),
            None => self.execute(&txn).await,
        };
        let waiters = self.inflight.lock().unwrap().remove(&txn.id).unwrap_or_default();
        for w in waiters {
            let _ = w.send(result.clone());
        }
        result
    }

    async fn lock(&self, txn: &Txn) -> Result<LockGuard<'_>> {
        let rx = {
            let mut locks = self.locks.lock().unwrap();
            if locks.table.acquire(txn.id, txn.keys()) {
                None
            } else {
                let (tx, rx) = oneshot::channel();
                locks.waiting.insert(txn.id, tx);
                Some(rx)
            }
        };
        let guard = LockGuard { coord: self, txn_id: txn.id };
        if let Some(rx) = rx {
            if tokio::time::timeout(self.config.lock_timeout, rx).await.is_err() {
                return Err(Error::Conflict(format!(
                    "waited {:?} for keys held by other transactions; retry",
                    self.config.lock_timeout
                )));
            }
        }
        Ok(guard)
    }

    #[tracing::instrument(skip_all, fields(txn = %txn.id))]
    async fn execute(&self, txn: &Txn) -> Result<Committed> {
        let guard = self.lock(txn).await?;
        let started = Instant::now();
        let cfg = self.config.membership;
        // A dead member stalls writes until it is excluded: at most the
        // detection time plus its lease (plus margin); then they resume.
        let stall_budget = Duration::from_millis(cfg.detect_ms + cfg.lease_ms + cfg.drift_margin_ms + 1500);
        loop {
            let gate = self.gate.read().await;
            let (epoch, members) = {
                let m = self.membership.lock().unwrap();
                m.check_writable().map_err(Error::Unavailable)?;
                let members: Vec<(u64, u64)> = m.view().members.iter().map(|id| (*id, m.min_applied(*id))).collect();
                (m.view().epoch, members)
            };
            let attempt: u64 = rand::random();
            crash_point!("coordinator::before_prepare");
            let timeout = self.config.prepare_timeout;
            let votes = futures::future::join_all(members.iter().map(|(id, min_applied)| {
                let req = PrepareRequest {
                    cluster: self.cluster,
                    to: *id,
                    epoch,
                    min_applied: *min_applied,
                    attempt,
                    txn: txn.clone(),
                };
                let p = &self.peers[*id as usize - 1];
                async move {
                    p.call(|c: ParticipantServiceClient| {
                        let req = req.clone();
                        async move { c.prepare(rpc::deadline(timeout), req).await }
                    })
                    .await
                }
            }))
            .await;
            let member_ids: Vec<u64> = members.iter().map(|(id, _)| *id).collect();
            let yes = votes.iter().filter(|v| matches!(v, Ok(Vote::Yes))).count();
            if yes == members.len() {
                crash_point!("coordinator::before_decision");
                let (tx, rx) = oneshot::channel();
                self.decider
                    .send(DecideRequest { txn_id: txn.id, writes: txn.writes.clone(), reply: tx })
                    .map_err(|_| Error::Unavailable("coordinator is shutting down".into()))?;
                let index = rx.await.map_err(|_| Error::Unavailable("coordinator is shutting down".into()))?;
                drop(gate);
                drop(guard);
                debug!(index, epoch, "committed");
                self.send_commits(txn.id, index, member_ids);
                return Ok(Committed { index });
            }
            drop(gate);
            self.send_aborts(txn.id, attempt, member_ids);
            let mut no_reason = None;
            let mut failures = Vec::new();
            for v in votes {
                match v {
                    Ok(Vote::Yes) => {}
                    Ok(Vote::No(reason)) => {
                        no_reason.get_or_insert(reason);
                    }
                    Err(e) => failures.push(e),
                }
            }
            if let Some(reason) = no_reason {
                if yes > 0 {
                    error!(yes, reason = %reason, "BUG: replicas voted differently on a condition");
                }
                if failures.is_empty() {
                    // Durable before the answer, like a commit: a resubmission
                    // of this id must get the same answer even after a crash,
                    // not a fresh evaluation that might commit.
                    match self.store.record_abort(txn.id, &reason) {
                        Ok(()) => self.sync.sync().await.unwrap_or_else(|e| fatal_storage("syncing an abort", e)),
                        Err(e) => warn!(error = %e, "could not record the abort"),
                    }
                    return Err(Error::ConditionFailed(reason));
                }
            }
            let transient =
                failures.iter().all(|e| matches!(e, Error::Unavailable(_) | Error::NotReady(_) | Error::Conflict(_)));
            let left = stall_budget.saturating_sub(started.elapsed());
            if transient && !left.is_zero() {
                // Wait for the view to change (the member excluded) or retry
                // shortly (it may be back).
                let mut epochs = self.epoch_tx.subscribe();
                let _ =
                    tokio::time::timeout(left.min(Duration::from_millis(250)), epochs.wait_for(|e| *e != epoch)).await;
                continue;
            }
            // Report unavailability first: it names the node to fix.
            failures.sort_by_key(|e| !matches!(e, Error::Unavailable(_)));
            return Err(merge_errors(failures));
        }
    }

    fn send_commits(&self, txn_id: TxnId, index: u64, members: Vec<u64>) {
        let peers: Vec<_> = members.iter().map(|id| self.peers[*id as usize - 1].clone()).collect();
        let cluster = self.cluster;
        tokio::spawn(async move {
            let commit = |p: Arc<Peer<ParticipantServiceClient>>| async move {
                let r = p
                    .call(|c: ParticipantServiceClient| async move {
                        c.commit(rpc::deadline(Duration::from_secs(2)), cluster, txn_id, index).await
                    })
                    .await;
                if let Err(e) = r {
                    debug!(error = %e, peer = %p.name, "COMMIT not delivered; the participant will fetch it");
                }
            };
            let mut rest = peers.into_iter();
            if let Some(first) = rest.next() {
                commit(first).await;
            }
            crash_point!("coordinator::after_first_commit");
            futures::future::join_all(rest.map(commit)).await;
        });
    }

    fn send_aborts(&self, txn_id: TxnId, attempt: u64, members: Vec<u64>) {
        let peers: Vec<_> = members.iter().map(|id| self.peers[*id as usize - 1].clone()).collect();
        let cluster = self.cluster;
        tokio::spawn(async move {
            futures::future::join_all(peers.into_iter().map(|p| async move {
                let _ = p
                    .call(|c: ParticipantServiceClient| async move {
                        c.abort(rpc::deadline(Duration::from_secs(2)), cluster, txn_id, attempt).await
                    })
                    .await;
            }))
            .await;
        });
    }

    fn sync(&self, req: SyncRequest) -> Result<SyncReply> {
        let n = self.peers.len() as u64;
        if req.node_id == 0 || req.node_id > n {
            return Err(Error::Identity(format!(
                "this cluster has participants 1..={n}; there is no participant {}: check --id",
                req.node_id
            )));
        }
        if let Some(c) = req.cluster {
            if c != self.cluster {
                return Err(Error::Identity(format!(
                    "participant {} has data from cluster {c}, but this coordinator leads cluster {}: \
                     point it at its own cluster's coordinator, or give it an empty data dir to re-seed it",
                    req.node_id, self.cluster
                )));
            }
        }
        let inflight = self.inflight.lock().unwrap();
        let mut outcomes = Vec::with_capacity(req.in_doubt.len());
        for (txn_id, attempt) in req.in_doubt {
            let outcome = match self.durable_decision(txn_id)? {
                Some(Decision::Committed(i)) => Outcome::Committed(i),
                Some(Decision::Aborted(_)) => Outcome::Aborted,
                None if inflight.contains_key(&txn_id) => Outcome::Pending,
                None => Outcome::Aborted,
            };
            outcomes.push((txn_id, attempt, outcome));
        }
        drop(inflight);
        let mut m = self.membership.lock().unwrap();
        let grant = m.on_sync(req.node_id, req.applied_index, outcomes.len(), self.now_ms());
        Ok(SyncReply {
            cluster: self.cluster,
            last_index: self.last_index.load(Ordering::Acquire),
            outcomes,
            epoch: m.view().epoch,
            member: grant.member,
            lease_ms: grant.lease_ms,
            min_applied: grant.min_applied,
        })
    }

    fn now_ms(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    /// Failure detection: pings every participant each tick and carries out
    /// the view changes the membership state machine asks for.
    async fn monitor(self: Arc<Self>) {
        let tick = Duration::from_millis(100);
        let pinging: Arc<Vec<std::sync::atomic::AtomicBool>> =
            Arc::new((0..self.peers.len()).map(|_| std::sync::atomic::AtomicBool::new(false)).collect());
        loop {
            tokio::time::sleep(tick).await;
            for (i, p) in self.peers.iter().enumerate() {
                if pinging[i].swap(true, Ordering::AcqRel) {
                    continue;
                }
                let (me, p, pinging) = (self.clone(), p.clone(), pinging.clone());
                tokio::spawn(async move {
                    let ok = p
                        .call_raw(|c: ParticipantServiceClient| async move {
                            c.node_status(rpc::deadline(Duration::from_millis(500))).await
                        })
                        .await
                        .is_ok();
                    let now = me.now_ms();
                    me.membership.lock().unwrap().on_ping(i as u64 + 1, ok, now);
                    pinging[i].store(false, Ordering::Release);
                });
            }
            let change = {
                let now = self.now_ms();
                self.membership.lock().unwrap().tick(now, self.last_index.load(Ordering::Acquire))
            };
            if let Some(change) = change {
                self.change_view(change).await;
            }
        }
    }

    /// Makes a view change durable with no transaction in flight: the write
    /// gate waits for running ones to decide and holds new ones back.
    async fn change_view(&self, change: ViewChange) {
        let t0 = Instant::now();
        let _gate = self.gate.write().await;
        let last = self.last_index.load(Ordering::Acquire);
        let now = self.now_ms();
        // Re-checked now that no transaction is in flight: the node may have
        // come back (and got a fresh lease) while the gate drained.
        let Some(view) = self.membership.lock().unwrap().apply(change, last, now) else {
            info!(?change, "view change no longer due; skipped");
            return;
        };
        if let Err(e) = self.store.set_view(&view) {
            fatal_storage("recording a view change", e);
        }
        let _ = self.epoch_tx.send(view.epoch);
        let pause_ms = t0.elapsed().as_secs_f64() * 1000.0;
        match change {
            ViewChange::Exclude(id) => warn!(
                participant = id, epoch = view.epoch, members = ?view.members, pause_ms,
                "participant excluded from the view: silent past detection time and lease; writes continue without it"
            ),
            ViewChange::Admit(id) => info!(
                participant = id, epoch = view.epoch, members = ?view.members, join_index = last, pause_ms,
                "participant readmitted to the view"
            ),
        }
    }

    fn node_status(&self) -> NodeStatus {
        let (writable, epoch) = {
            let m = self.membership.lock().unwrap();
            (m.check_writable().is_ok(), m.view().epoch)
        };
        NodeStatus {
            id: 0,
            role: "coordinator".into(),
            addr: self.addr.clone(),
            cluster: Some(self.cluster),
            applied_index: self.last_index.load(Ordering::Acquire),
            ready: writable,
            prepared: self.inflight.lock().unwrap().len() as u64,
            syncs: self.sync.count(),
            commits: self.committed.load(Ordering::Relaxed),
            epoch,
            member: true,
            lease_ms: None,
            in_doubt: Vec::new(),
        }
    }

    async fn status(&self) -> ClusterStatus {
        let statuses = futures::future::join_all(self.peers.iter().map(|p| async move {
            p.call_infallible(|c: ParticipantServiceClient| async move {
                c.node_status(rpc::deadline(Duration::from_secs(1))).await
            })
            .await
        }))
        .await;
        let (members, min_replicas) = {
            let m = self.membership.lock().unwrap();
            (m.view().members.iter().copied().collect(), m.config().min_replicas as u64)
        };
        ClusterStatus {
            coordinator: self.node_status(),
            members,
            min_replicas,
            participants: self
                .peers
                .iter()
                .zip(statuses)
                .enumerate()
                .map(|(i, (p, s))| (i as u64 + 1, p.addr.clone(), s.map_err(|e| e.to_string())))
                .collect(),
        }
    }
}

fn decision_result(d: Decision) -> Result<Committed> {
    match d {
        Decision::Committed(index) => Ok(Committed { index }),
        Decision::Aborted(reason) => Err(Error::ConditionFailed(reason)),
    }
}

fn merge_errors(errors: Vec<Error>) -> Error {
    let mut iter = errors.into_iter();
    let first = iter.next().unwrap_or_else(|| Error::Unavailable("no participants answered".into()));
    let rest: Vec<String> = iter.map(|e| e.to_string()).collect();
    if rest.is_empty() {
        return first;
    }
    let more = format!(" (also: {})", rest.join("; "));
    match first {
        Error::Unavailable(m) => Error::Unavailable(m + &more),
        Error::Conflict(m) => Error::Conflict(m + &more),
        Error::NotReady(m) => Error::NotReady(m + &more),
        other => other,
    }
}

/// The decider: assigns commit indexes in order and makes each batch of
/// decisions durable with one sync before answering any of them.
async fn decider(
    store: CoordinatorStore,
    sync: GroupSync,
    mut rx: mpsc::UnboundedReceiver<DecideRequest>,
    last_index: Arc<AtomicU64>,
    committed: Arc<AtomicU64>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < 1024 {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let base = last_index.load(Ordering::Acquire);
        let entries: Vec<LogEntry> = batch
            .iter_mut()
            .enumerate()
            .map(|(i, r)| LogEntry {
                index: base + 1 + i as u64,
                txn_id: r.txn_id,
                writes: std::mem::take(&mut r.writes),
            })
            .collect();
        store.record_commits(&entries).unwrap_or_else(|e| fatal_storage("recording decisions", e));
        crash_point!("coordinator::before_decision_sync");
        sync.sync().await.unwrap_or_else(|e| fatal_storage("syncing decisions", e));
        crash_point!("coordinator::after_decision_sync");
        last_index.store(base + batch.len() as u64, Ordering::Release);
        committed.fetch_add(batch.len() as u64, Ordering::Relaxed);
        for (r, e) in batch.into_iter().zip(entries) {
            let _ = r.reply.send(e.index);
        }
    }
}

#[derive(Clone)]
struct Server(Arc<Coordinator>);

impl CoordinatorService for Server {
    async fn submit(self, _: Context, txn: Txn) -> Result<Committed> {
        // Run the transaction on its own task: if the client's deadline
        // passes, tarpc drops this future, but a transaction half way through
        // 2PC must still reach its decision (or abort) and clean up.
        let coord = self.0.clone();
        tokio::spawn(async move { coord.submit(txn).await })
            .await
            .unwrap_or_else(|e| Err(Error::InDoubt(format!("the coordinator task failed: {e}; retry"))))
    }

    async fn sync(self, _: Context, req: SyncRequest) -> Result<SyncReply> {
        self.0.sync(req)
    }

    async fn fetch_log(self, _: Context, cluster: ClusterId, from: u64, max: u64) -> Result<Vec<LogEntry>> {
        if cluster != self.0.cluster {
            return Err(Error::Identity(format!("asked for the log of cluster {cluster}; this is {}", self.0.cluster)));
        }
        // Only durable entries: one recorded but not yet synced could be
        // lost to a crash and its index reused.
        let last = self.0.last_index.load(Ordering::Acquire);
        if from > last {
            return Ok(Vec::new());
        }
        self.0.store.entries(from, max.min(4096).min(last - from + 1), 4 * 1024 * 1024)
    }

    async fn status(self, _: Context) -> ClusterStatus {
        self.0.status().await
    }

    async fn node_status(self, _: Context) -> NodeStatus {
        self.0.node_status()
    }

    async fn outcome(self, _: Context, txn_id: TxnId) -> Result<Outcome> {
        // In-flight first: a run that finishes in between has recorded its
        // decision before leaving `inflight`, so the lookup below sees it.
        let inflight = self.0.inflight.lock().unwrap().contains_key(&txn_id);
        Ok(match self.0.durable_decision(txn_id)? {
            Some(Decision::Committed(i)) => Outcome::Committed(i),
            _ if inflight => Outcome::Pending,
            _ => Outcome::Aborted,
        })
    }
}

/// Runs the coordinator on `listener` until `shutdown` resolves.
pub async fn run(listener: TcpListener, config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    if config.participants.is_empty() {
        anyhow::bail!("no participants given: pass --participants HOST:PORT,HOST:PORT,...");
    }
    let mut seen = std::collections::HashSet::new();
    for p in &config.participants {
        if !seen.insert(p) {
            anyhow::bail!("participant {p} is listed twice in --participants: each replica needs its own address");
        }
    }
    let addr = listener.local_addr()?.to_string();
    let (store, cluster) = CoordinatorStore::open(&config.data_dir, &config.participants)?;
    let last = store.last_index()?;
    info!(%addr, %cluster, last_index = last, participants = ?config.participants, "coordinator starting");
    let sync = GroupSync::start(store.durability()?);
    // What a killed process left written but unsynced is in the file now and
    // is about to be served as durable: make it so.
    sync.sync().await?;
    let last_index = Arc::new(AtomicU64::new(last));
    let committed = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(decider(store.clone(), sync.clone(), rx, last_index.clone(), committed.clone()));
    let peers = config
        .participants
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let max_call = config.prepare_timeout.max(Duration::from_secs(2)) + Duration::from_secs(1);
            Arc::new(Peer::new(format!("participant {} at {a}", i + 1), a.clone()).with_max_call(max_call))
        })
        .collect();
    let n = config.participants.len() as u64;
    let view = match store.view()? {
        Some(v) => v,
        None => {
            let v = View { epoch: 1, members: (1..=n).collect(), joined_at: Default::default() };
            store.set_view(&v)?;
            v
        }
    };
    info!(epoch = view.epoch, members = ?view.members, "view restored");
    let clock = Instant::now();
    let (epoch_tx, _) = tokio::sync::watch::channel(view.epoch);
    let membership = Mutex::new(Membership::new(view, n, config.membership, 0));
    let coord = Arc::new(Coordinator {
        cluster,
        addr,
        store,
        peers,
        locks: Mutex::new(Locks::default()),
        inflight: Mutex::new(HashMap::new()),
        decider: tx,
        last_index,
        committed,
        sync,
        config,
        membership,
        gate: tokio::sync::RwLock::new(()),
        epoch_tx,
        clock,
    });
    tokio::spawn(coord.clone().monitor());
    let server = Server(coord.clone());
    rpc::serve(
        listener,
        move |transport| {
            let service = server.clone().serve();
            treaty_common::execute_channel!(transport, service)
        },
        shutdown,
    )
    .await;
    coord.store.flush()?;
    info!("coordinator stopped");
    Ok(())
}

//! `treaty-participant`: one replica. It votes in 2PC, keeps its data and
//! write-ahead log in sled, applies commits in index order, and serves reads.
//!
//! The protocol decisions live in [`treaty_common::protocol::ReplicaCore`];
//! this crate is the I/O around it:
//! * RPC handlers feed PREPARE / COMMIT / ABORT into the core and carry out
//!   what it returns: log the PREPARED record, wait for the group sync, vote.
//! * The *applier* task applies the runs of commits the core hands out, one
//!   sled transaction per run, then tells the core to release their locks.
//! * The *sync loop* checks in with the coordinator every tick: it learns the
//!   cluster id, resolves transactions in doubt, and fetches log entries it
//!   missed. Until it has caught up once, the replica neither votes nor
//!   serves linearizable reads (it says so).
//!
//! Failpoints (see `treaty_common::crash_point!`), in protocol order:
//! `participant::before_prepare_log`, `participant::before_prepare_sync`,
//! `participant::after_prepare_sync` (durable, vote not sent),
//! `participant::before_apply`, `participant::after_apply`.

pub mod cli;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tarpc::context::Context;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Notify};
use tracing::{debug, error, info, warn};

use treaty_common::crash_point;
use treaty_common::protocol::{CommitStep, PrepareStep, ReplicaCore};
use treaty_common::rpc::{
    self, ClusterId, ClusterStatus, CoordinatorServiceClient, NodeStatus, Outcome, ParticipantService, Peer,
    PrepareRequest, SyncRequest, Vote,
};
use treaty_common::storage::{GroupSync, ReplicaStore};
use treaty_common::{Committed, Error, Key, Result, Txn, TxnId, Versioned};

/// How a participant is configured (flags / `TREATY_*` variables).
#[derive(Clone, Debug)]
pub struct Config {
    /// 1..=N: this replica's position in the coordinator's `--participants`.
    pub id: u64,
    pub data_dir: PathBuf,
    /// The coordinator's address.
    pub coordinator: String,
    /// How long a PREPARE or a read waits for a key held by a prepared
    /// transaction before giving up.
    pub lock_wait: Duration,
    /// How often the replica checks in with the coordinator.
    pub tick: Duration,
}

impl Config {
    pub fn new(id: u64, data_dir: PathBuf, coordinator: String) -> Self {
        Config { id, data_dir, coordinator, lock_wait: Duration::from_secs(2), tick: Duration::from_millis(200) }
    }
}

/// Ask the coordinator about a prepared transaction after this many ticks.
const IN_DOUBT_TICKS: u64 = 5;
/// A non-member this close to the log's end counts as recovered (it still
/// applies up to its join index before voting or serving reads).
const JOIN_GAP: u64 = 128;
/// A replica that never joined gives up on an unreachable coordinator after this.
const NEVER_JOINED_GIVE_UP: Duration = Duration::from_secs(15);
/// Fetch missed log entries after being behind without progress this long.
const STUCK_TICKS: u64 = 3;

struct Node {
    id: u64,
    addr: String,
    store: ReplicaStore,
    core: Mutex<ReplicaCore>,
    cluster: Mutex<Option<ClusterId>>,
    /// Caught up with the coordinator since start: may vote and serve reads.
    ready: AtomicBool,
    /// Bumped whenever locks are released or the applied index moves.
    changed: watch::Sender<u64>,
    apply_wake: Notify,
    catch_up: Notify,
    sync: GroupSync,
    coordinator: Peer<CoordinatorServiceClient>,
    applied_count: AtomicU64,
    /// The coordinator's last index as of the latest check-in.
    cluster_last: AtomicU64,
    /// The highest view epoch heard of, and whether this node is in it.
    epoch: AtomicU64,
    member: AtomicBool,
    /// Apply up to here before voting or serving linearizable reads.
    min_applied: AtomicU64,
    /// Linearizable reads are served only before this instant.
    lease_until: Mutex<Option<Instant>>,
    /// When the coordinator last answered a check-in.
    last_contact: Mutex<Option<Instant>>,
    tick: Duration,
    fatal: mpsc::UnboundedSender<String>,
    lock_wait: Duration,
}

/// Crashes the process on a storage failure while holding protocol state:
/// continuing could diverge from the other replicas; restarting recovers.
fn fatal_storage(what: &str, e: Error) -> ! {
    error!(error = %e, "storage failure while {what}; aborting so that recovery can restore a consistent state");
    eprintln!("treaty-participant: storage failure while {what}: {e}");
    std::process::abort()
}

impl Node {
    fn check_cluster(&self, cluster: ClusterId) -> Result<()> {
        match *self.cluster.lock().unwrap() {
            Some(mine) if mine == cluster => Ok(()),
            Some(mine) => {
                Err(Error::Identity(format!("participant {} belongs to cluster {mine}, not {cluster}", self.id)))
            }
            None => Err(Error::NotReady(format!(
                "participant {} has not joined the cluster yet (waiting for the coordinator)",
                self.id
            ))),
        }
    }

    fn not_ready(&self) -> Error {
        let applied = self.core.lock().unwrap().applied_index();
        Error::NotReady(format!(
            "participant {} at {} is catching up (applied {applied} of {}); retry shortly, use another endpoint, or read with --stale",
            self.id,
            self.addr,
            self.cluster_last.load(Ordering::Relaxed)
        ))
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    async fn prepare(&self, req: PrepareRequest) -> Result<Vote> {
        self.check_cluster(req.cluster)?;
        if req.to != self.id {
            let msg = format!(
                "this participant was started with id {}, but the coordinator reached it as participant {}: \
                 ids are positions in the coordinator's --participants list; fix --id (TREATY_ID)",
                self.id, req.to
            );
            let _ = self.fatal.send(msg.clone());
            return Err(Error::Identity(msg));
        }
        if !self.ready.load(Ordering::Acquire) {
            return Err(self.not_ready());
        }
        req.txn.validate()?;
        let known = self.epoch.fetch_max(req.epoch, Ordering::AcqRel);
        if req.epoch < known {
            return Err(Error::Conflict(format!(
                "participant {}: PREPARE from view epoch {} but epoch {known} is current; retry",
                self.id, req.epoch
            )));
        }
        self.member.store(true, Ordering::Release);
        let give_up = Instant::now() + self.lock_wait;
        // A readmitted replica first applies everything decided before it
        // rejoined: it never prepared those, so its locks cannot cover them.
        while self.core.lock().unwrap().applied_index() < req.min_applied {
            let mut changed = self.changed.subscribe();
            self.catch_up.notify_one();
            let wait = give_up.saturating_duration_since(Instant::now());
            if self.core.lock().unwrap().applied_index() >= req.min_applied {
                break;
            }
            if tokio::time::timeout(wait, changed.changed()).await.is_err() {
                return Err(Error::NotReady(format!(
                    "participant {} is still catching up to index {} after rejoining; retry",
                    self.id, req.min_applied
                )));
            }
        }
        loop {
            let mut changed = self.changed.subscribe();
            let step = {
                let mut core = self.core.lock().unwrap();
                core.prepare(&req.txn, req.attempt, |k| self.store.get(k))
            }?;
            match step {
                PrepareStep::Blocked(holder) => {
                    let wait = give_up.saturating_duration_since(Instant::now());
                    if tokio::time::timeout(wait, changed.changed()).await.is_err() {
                        return Err(Error::Conflict(format!(
                            "participant {}: a key is held by prepared transaction {holder} for over {:?}; retry",
                            self.id, self.lock_wait
                        )));
                    }
                }
                PrepareStep::AlreadyPrepared => {
                    self.sync.sync().await.unwrap_or_else(|e| fatal_storage("syncing the WAL", e));
                    return Ok(Vote::Yes);
                }
                PrepareStep::VoteNo(reason) => return Ok(Vote::No(reason)),
                PrepareStep::Persist(record) => {
                    crash_point!("participant::before_prepare_log");
                    self.store.log_prepared(&record).unwrap_or_else(|e| fatal_storage("logging a PREPARED record", e));
                    crash_point!("participant::before_prepare_sync");
                    self.sync.sync().await.unwrap_or_else(|e| fatal_storage("syncing the WAL", e));
                    crash_point!("participant::after_prepare_sync");
                    debug!(txn = %req.txn.id, attempt = req.attempt, "prepared");
                    return Ok(Vote::Yes);
                }
            }
        }
    }

    fn commit(&self, txn_id: TxnId, index: u64) {
        let step = self.core.lock().unwrap().commit(txn_id, index, None);
        match step {
            CommitStep::Queued => self.apply_wake.notify_one(),
            CommitStep::AlreadyApplied => {}
            CommitStep::Unknown => {
                warn!(txn = %txn_id, index, "commit of a transaction not prepared here; fetching the log");
                self.catch_up.notify_one();
            }
        }
    }

    fn abort(&self, txn_id: TxnId, attempt: u64) {
        let forget = self.core.lock().unwrap().abort(txn_id, attempt);
        if forget {
            self.store.forget_prepared(txn_id).unwrap_or_else(|e| fatal_storage("dropping a PREPARED record", e));
            self.bump();
            debug!(txn = %txn_id, attempt, "aborted");
        }
    }

    async fn get(&self, key: Key, stale: bool) -> Result<Option<Versioned>> {
        treaty_common::types::check_key(&key)?;
        if stale {
            return self.store.get(&key);
        }
        if !self.ready.load(Ordering::Acquire) {
            return Err(self.not_ready());
        }
        self.check_lease()?;
        let give_up = Instant::now() + self.lock_wait;
        loop {
            let mut changed = self.changed.subscribe();
            let holder = self.core.lock().unwrap().holder(&key);
            // Test-only: a deliberately broken build that skips the wait for
            // prepared writes, so the linearizability checker can prove it
            // catches stale reads.
            let holder = (|| {
                fail::fail_point!("participant::skip_read_wait", |_| None);
                holder
            })();
            let Some(holder) = holder else {
                return self.store.get(&key);
            };
            let wait = give_up.saturating_duration_since(Instant::now());
            if tokio::time::timeout(wait, changed.changed()).await.is_err() {
                return Err(Error::InDoubt(format!(
                    "key {} is held by prepared transaction {holder}, whose outcome is still unknown after {:?} \
                     (is the coordinator down?); retry, or read with --stale",
                    treaty_common::types::escape(&key),
                    self.lock_wait
                )));
            }
        }
    }

    /// Linearizable reads need a valid lease: proof that the coordinator
    /// will not commit anything without this replica until it expires.
    fn check_lease(&self) -> Result<()> {
        let until = *self.lease_until.lock().unwrap();
        if until.is_some_and(|u| Instant::now() < u) {
            return Ok(());
        }
        let why = if !self.member.load(Ordering::Acquire) {
            format!(
                "it is not in the current view (epoch {}) and is catching up to rejoin",
                self.epoch.load(Ordering::Acquire)
            )
        } else {
            match *self.last_contact.lock().unwrap() {
                Some(t) if t.elapsed() < Duration::from_secs(1) => format!(
                    "the coordinator at {} has not granted one yet (it was just readmitted, or is still applying \
                     up to its join index {})",
                    self.coordinator.addr,
                    self.min_applied.load(Ordering::Acquire)
                ),
                Some(t) => format!(
                    "the coordinator at {} has not renewed it for {:.1} s",
                    self.coordinator.addr,
                    t.elapsed().as_secs_f64()
                ),
                None => format!("the coordinator at {} has not granted one yet", self.coordinator.addr),
            }
        };
        Err(Error::NotReady(format!(
            "participant {} holds no read lease: {why}; retry another endpoint, or read with --stale for local (possibly stale) data",
            self.id
        )))
    }

    fn status(&self) -> NodeStatus {
        let lease_ms = self
            .lease_until
            .lock()
            .unwrap()
            .and_then(|u| u.checked_duration_since(Instant::now()))
            .map(|d| d.as_millis() as u64);
        let core = self.core.lock().unwrap();
        let tick_ms = self.tick.as_millis() as u64;
        NodeStatus {
            id: self.id,
            role: "participant".into(),
            addr: self.addr.clone(),
            cluster: *self.cluster.lock().unwrap(),
            applied_index: core.applied_index(),
            ready: self.ready.load(Ordering::Acquire),
            prepared: core.prepared_count() as u64,
            syncs: self.sync.count(),
            commits: self.applied_count.load(Ordering::Relaxed),
            epoch: self.epoch.load(Ordering::Acquire),
            member: self.member.load(Ordering::Acquire),
            lease_ms,
            in_doubt: core.in_doubt_ages().into_iter().map(|(t, age)| (t, age * tick_ms)).collect(),
        }
    }

    /// Applies the runs of commits the core hands out, in index order.
    async fn applier(self: Arc<Self>) {
        loop {
            self.apply_wake.notified().await;
            loop {
                let batch = self.core.lock().unwrap().next_apply();
                let Some(last) = batch.last().map(|e| e.index) else {
                    break;
                };
                crash_point!("participant::before_apply");
                let store = self.store.clone();
                let (store_result, batch) = tokio::task::spawn_blocking(move || (store.apply(&batch), batch))
                    .await
                    .expect("apply task panicked");
                store_result.unwrap_or_else(|e| fatal_storage("applying commits", e));
                crash_point!("participant::after_apply");
                self.core.lock().unwrap().applied(last);
                self.applied_count.fetch_add(batch.len() as u64, Ordering::Relaxed);
                debug!(through = last, count = batch.len(), "applied");
                self.bump();
            }
        }
    }

    /// Checks in with the coordinator every tick (see module docs).
    async fn sync_loop(self: Arc<Self>, tick: Duration) {
        let mut behind_ticks = 0u64;
        let mut last_applied = 0u64;
        let mut warned = false;
        let mut unreachable_since: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = self.catch_up.notified() => { behind_ticks = STUCK_TICKS; }
            }
            let ready = self.ready.load(Ordering::Acquire);
            let (applied, in_doubt) = {
                let mut core = self.core.lock().unwrap();
                core.tick();
                (core.applied_index(), core.in_doubt(if ready { IN_DOUBT_TICKS } else { 0 }))
            };
            let sent = Instant::now();
            let req = SyncRequest {
                node_id: self.id,
                cluster: *self.cluster.lock().unwrap(),
                applied_index: applied,
                in_doubt,
            };
            let reply = self
                .coordinator
                .call(|c: CoordinatorServiceClient| {
                    let req = req.clone();
                    async move { c.sync(rpc::deadline(Duration::from_secs(2)), req).await }
                })
                .await;
            let reply = match reply {
                Ok(r) => {
                    unreachable_since = None;
                    if warned {
                        info!("coordinator reachable again");
                        warned = false;
                    }
                    r
                }
                Err(Error::Identity(msg)) => {
                    let _ = self.fatal.send(msg);
                    return;
                }
                Err(e) => {
                    if !warned {
                        warn!(error = %e, "cannot reach the coordinator; will keep trying");
                        warned = true;
                    }
                    // A replica that never joined and cannot reach its
                    // coordinator is most likely misconfigured: say so and
                    // exit rather than wait silently forever.
                    unreachable_since.get_or_insert_with(Instant::now);
                    let never_joined = self.cluster.lock().unwrap().is_none();
                    if never_joined && unreachable_since.is_some_and(|t| t.elapsed() >= NEVER_JOINED_GIVE_UP) {
                        let _ = self.fatal.send(format!(
                            "cannot reach the coordinator at {} for {:?} and this replica never joined a cluster: \
                             check --coordinator (TREATY_COORDINATOR); last error: {e}",
                            self.coordinator.addr, NEVER_JOINED_GIVE_UP
                        ));
                        return;
                    }
                    continue;
                }
            };
            {
                let mut cluster = self.cluster.lock().unwrap();
                match *cluster {
                    None => {
                        if let Err(e) = self.store.set_cluster(reply.cluster) {
                            fatal_storage("recording the cluster id", e);
                        }
                        info!(cluster = %reply.cluster, "joined cluster");
                        *cluster = Some(reply.cluster);
                    }
                    Some(c) if c != reply.cluster => {
                        let _ = self.fatal.send(format!(
                            "this replica's data dir belongs to cluster {c}, but the coordinator at {} leads cluster {}: \
                             point --coordinator at this replica's own cluster, or use an empty data dir",
                            self.coordinator.addr, reply.cluster
                        ));
                        return;
                    }
                    Some(_) => {}
                }
            }
            self.cluster_last.store(reply.last_index, Ordering::Relaxed);
            *self.last_contact.lock().unwrap() = Some(Instant::now());
            self.epoch.fetch_max(reply.epoch, Ordering::AcqRel);
            if reply.epoch >= self.epoch.load(Ordering::Acquire) {
                self.member.store(reply.member, Ordering::Release);
            }
            self.min_applied.fetch_max(reply.min_applied, Ordering::AcqRel);
            // The lease counts from when the request left, shortened by 10%
            // for clock-rate drift, so it ends before the coordinator's count.
            *self.lease_until.lock().unwrap() = reply.lease_ms.map(|ms| sent + Duration::from_millis(ms * 9 / 10));
            for (txn_id, attempt, outcome) in reply.outcomes {
                match outcome {
                    Outcome::Committed(index) => self.commit(txn_id, index),
                    Outcome::Aborted => self.abort(txn_id, attempt),
                    Outcome::Pending => {}
                }
            }
            if reply.last_index > applied {
                if applied == last_applied {
                    behind_ticks += 1;
                } else {
                    behind_ticks = 0;
                }
                if !ready || behind_ticks >= STUCK_TICKS {
                    if let Err(e) = self.fetch_missing(applied).await {
                        warn!(error = %e, "catching up failed; will retry");
                    }
                }
            } else {
                behind_ticks = 0;
            }
            last_applied = applied;
            if !ready {
                let core = self.core.lock().unwrap();
                let applied = core.applied_index();
                let close_enough = applied >= reply.last_index
                    || (!self.member.load(Ordering::Acquire) && applied + JOIN_GAP >= reply.last_index);
                if close_enough && core.in_doubt(0).is_empty() {
                    self.ready.store(true, Ordering::Release);
                    info!(applied = core.applied_index(), "caught up: voting and serving reads");
                }
            }
        }
    }

    /// Fetches and applies missed log entries, batch after batch, for up
    /// to about two seconds (the sync loop calls again if still behind).
    async fn fetch_missing(&self, applied: u64) -> Result<()> {
        let cluster = self.cluster.lock().unwrap().expect("joined before fetching");
        let started = Instant::now();
        let mut from = applied + 1;
        let mut fetched = 0u64;
        loop {
            let entries = self
                .coordinator
                .call(|c: CoordinatorServiceClient| async move {
                    c.fetch_log(rpc::deadline(Duration::from_secs(5)), cluster, from, 1024).await
                })
                .await?;
            let Some(last) = entries.last().map(|e| e.index) else { break };
            let full = entries.len() == 1024;
            fetched += entries.len() as u64;
            {
                let mut core = self.core.lock().unwrap();
                for e in entries {
                    core.commit(e.txn_id, e.index, Some(e.writes));
                }
            }
            self.apply_wake.notify_one();
            // Let the applier finish this batch before asking for the next.
            while self.core.lock().unwrap().applied_index() < last {
                let mut changed = self.changed.subscribe();
                if self.core.lock().unwrap().applied_index() >= last {
                    break;
                }
                if tokio::time::timeout(Duration::from_secs(2), changed.changed()).await.is_err() {
                    break;
                }
            }
            from = last + 1;
            if !full || started.elapsed() > Duration::from_secs(2) {
                break;
            }
        }
        if fetched > 0 {
            info!(
                from = applied + 1,
                to = from - 1,
                entries = fetched,
                "applied missed commits from the coordinator's log"
            );
        }
        Ok(())
    }
}

#[derive(Clone)]
struct Server(Arc<Node>);

impl ParticipantService for Server {
    async fn prepare(self, _: Context, req: PrepareRequest) -> Result<Vote> {
        self.0.prepare(req).await
    }

    async fn commit(self, _: Context, cluster: ClusterId, txn_id: TxnId, index: u64) -> Result<()> {
        self.0.check_cluster(cluster)?;
        self.0.commit(txn_id, index);
        Ok(())
    }

    async fn abort(self, _: Context, cluster: ClusterId, txn_id: TxnId, attempt: u64) -> Result<()> {
        self.0.check_cluster(cluster)?;
        self.0.abort(txn_id, attempt);
        Ok(())
    }

    async fn get(self, _: Context, key: Key, stale: bool) -> Result<Option<Versioned>> {
        self.0.get(key, stale).await
    }

    async fn submit(self, _: Context, txn: Txn) -> Result<Committed> {
        txn.validate()?;
        self.0
            .coordinator
            .call(|c: CoordinatorServiceClient| {
                let txn = txn.clone();
                async move { c.submit(rpc::deadline(Duration::from_secs(20)), txn).await }
            })
            .await
    }

    async fn node_status(self, _: Context) -> NodeStatus {
        self.0.status()
    }

    async fn txn_outcome(self, _: Context, txn_id: TxnId) -> Result<Outcome> {
        self.0
            .coordinator
            .call(|c: CoordinatorServiceClient| async move {
                c.outcome(rpc::deadline(Duration::from_secs(5)), txn_id).await
            })
            .await
    }

    async fn cluster_status(self, _: Context) -> Result<ClusterStatus> {
        self.0
            .coordinator
            .call_infallible(|c: CoordinatorServiceClient| async move {
                c.status(rpc::deadline(Duration::from_secs(5))).await
            })
            .await
    }
}

/// Runs a participant on `listener` until `shutdown` resolves. Returns an
/// error if the data directory or the cluster identity is wrong.
pub async fn run(listener: TcpListener, config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let addr = listener.local_addr()?.to_string();
    let store = ReplicaStore::open(&config.data_dir, config.id)?;
    let applied = store.applied_index()?;
    let prepared = store.prepared()?;
    let cluster = store.cluster()?;
    info!(id = config.id, %addr, applied, in_doubt = prepared.len(), data_dir = %config.data_dir.display(), "participant starting");
    let core = ReplicaCore::recover(applied, prepared);
    let sync = GroupSync::start(store.durability().context("opening the data file for syncing")?);
    let (fatal_tx, mut fatal_rx) = mpsc::unbounded_channel();
    let node = Arc::new(Node {
        id: config.id,
        addr: addr.clone(),
        store,
        core: Mutex::new(core),
        cluster: Mutex::new(cluster),
        ready: AtomicBool::new(false),
        changed: watch::channel(0).0,
        apply_wake: Notify::new(),
        catch_up: Notify::new(),
        sync,
        coordinator: Peer::new(format!("coordinator at {}", config.coordinator), config.coordinator.clone())
            .with_max_call(Duration::from_secs(21)),
        applied_count: AtomicU64::new(0),
        cluster_last: AtomicU64::new(0),
        epoch: AtomicU64::new(0),
        member: AtomicBool::new(false),
        min_applied: AtomicU64::new(0),
        lease_until: Mutex::new(None),
        last_contact: Mutex::new(None),
        tick: config.tick,
        fatal: fatal_tx,
        lock_wait: config.lock_wait,
    });
    tokio::spawn(node.clone().applier());
    tokio::spawn(node.clone().sync_loop(config.tick));
    let server = Server(node.clone());
    let accept = rpc::serve(
        listener,
        move |transport| {
            let service = server.clone().serve();
            treaty_common::execute_channel!(transport, service)
        },
        shutdown,
    );
    let result = tokio::select! {
        _ = accept => Ok(()),
        Some(msg) = fatal_rx.recv() => Err(anyhow::anyhow!(msg)),
    };
    node.store.flush()?;
    info!(id = config.id, "participant stopped");
    result
}

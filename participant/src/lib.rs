//! `treaty-participant`: one replica. It votes in 2PC, keeps its data and
//! write-ahead log in sled, applies commits in index order, and serves reads.
//!
//! The protocol decisions live in two pure state machines:
//! [`ReplicaCore`] (its transactions: key locks, the WAL's contents, commits
//! waiting for their turn) and [`ParticipantCore`] (its standing: cluster,
//! incarnation followed, epoch, membership, lease, readiness). This crate is
//! the I/O around them:
//! * RPC handlers feed PREPARE / COMMIT / ABORT into the core and carry out
//!   what it returns: log the PREPARED record, wait for the group sync, vote.
//! * The *applier* task applies the runs of commits the core hands out, one
//!   sled transaction per run, then tells the core to release their locks.
//! * The *sync loop* checks in with the coordinator every tick: it learns the
//!   cluster id, resolves transactions in doubt, and fetches log entries it
//!   missed. Until it has caught up once, the replica neither votes nor
//!   serves linearizable reads (it says so).
//! * When the entries it needs were compacted away (it was down a long
//!   time, or its data was wiped), the sync loop installs a *snapshot*
//!   instead: its keys copied in checksummed chunks from live replicas
//!   (`snapshot` RPC), then the log from the lowest chunk's index on (see
//!   `treaty_core::protocol::compaction`). Meanwhile it votes on nothing,
//!   applies nothing and refuses every read, stale ones too; a crash
//!   resumes the install at the last chunk written.
//!
//! Whom it listens to: PREPARE, COMMIT and ABORT only from the coordinator's
//! certificate, and only from the coordinator incarnation it follows (see
//! [`ParticipantCore`] and the coordinator's "Fencing"); a PREPARE must also name this replica
//! (its data directory's id). A message that fails any check, or that
//! contradicts what this replica already knows, is answered with an error
//! and changes nothing.
//!
//! Failpoints (see `treaty_common::crash_point!`), in protocol order:
//! `participant::before_prepare_log`, `participant::before_prepare_sync`,
//! `participant::after_prepare_sync` (durable, vote not sent),
//! `participant::before_apply`, `participant::after_apply`; while copying
//! partitions that move here, `participant::mid_partition_copy` (see `moves`).

pub mod cli;
mod moves;

use std::collections::BTreeMap;
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
use treaty_common::net::{self, Caller, ServeConfig};
use treaty_common::protocol::ranges::{self, RecentWrites};
use treaty_common::protocol::{
    snapshot_plan, CommitStep, ParticipantCore, Placement, PrepareStep, PreparedRecord, ReplicaCore, SnapshotGroup,
    Writes,
};
use treaty_common::rpc::{
    self, ClusterId, ClusterStatus, CoordinatorServiceClient, Incarnation, NodeStatus, Outcome, ParticipantService,
    ParticipantServiceClient, PartitionInstall, Peer, PrepareBatch, RangePart, SnapshotChunk, SyncRequest, TraceEvent,
    Vote,
};
use treaty_common::tls::{Expect, Security};
use treaty_common::trace::{Detail, TraceRing};
use treaty_common::types::{escape, RangePage, RangeRequest};
use treaty_common::{Committed, Error, Key, Result, Txn, TxnId, Versioned};
use treaty_storage::{GroupSync, ReplicaStore};

/// How a participant is configured (flags / `TREATY_*` variables).
#[derive(Clone, Debug)]
pub struct Config {
    /// This replica's id: its position in the coordinator's `--participants`, or the id
    /// it was added under (`treaty member add`).
    pub id: u64,
    pub data_dir: PathBuf,
    /// The coordinator's address.
    pub coordinator: String,
    /// How long a PREPARE or a read waits for a key held by a prepared
    /// transaction before giving up.
    pub lock_wait: Duration,
    /// How often the replica checks in with the coordinator.
    pub tick: Duration,
    /// TLS identity (this participant's certificate), or insecure.
    pub security: Security,
    /// Most connections this node accepts at once.
    pub max_connections: usize,
    /// How long one frame may take to arrive (see `treaty_common::net`).
    pub frame_timeout: Duration,
    /// Where the Redis-protocol front door listens (`--redis`), if anywhere
    /// (see `treaty_resp`).
    pub redis: Option<String>,
    /// Where Prometheus metrics are served (`--metrics`), if anywhere.
    pub metrics: Option<String>,
    /// Data log bytes that start a checkpoint of the data (or the data's
    /// size, if larger; see `treaty_storage::DEFAULT_CHECKPOINT_BYTES`).
    pub checkpoint_bytes: u64,
}

impl Config {
    pub fn new(id: u64, data_dir: PathBuf, coordinator: String, security: Security) -> Self {
        Config {
            id,
            data_dir,
            coordinator,
            lock_wait: Duration::from_secs(2),
            tick: Duration::from_millis(200),
            security,
            max_connections: net::DEFAULT_MAX_CONNECTIONS,
            frame_timeout: net::FRAME_TIMEOUT,
            redis: None,
            metrics: None,
            checkpoint_bytes: treaty_storage::DEFAULT_CHECKPOINT_BYTES,
        }
    }
}

/// Ask the coordinator about a prepared transaction after this many ticks.
const IN_DOUBT_TICKS: u64 = 5;
/// A replica that never joined gives up on an unreachable coordinator after this.
const NEVER_JOINED_GIVE_UP: Duration = Duration::from_secs(15);
/// Fetch missed log entries after being behind without progress this long.
const STUCK_TICKS: u64 = 3;
/// Keys of recent commits kept for range reads across partitions (see
/// [`RecentWrites`]): enough for a few seconds of writes at full speed.
const RECENT_WRITES: usize = 1 << 16;
/// A range page across partitions is asked as of a newer index at most this
/// many times before the read gives up (its keys keep changing).
const RANGE_ROUNDS: usize = 8;
/// An empty replica more than this many commits behind installs a snapshot
/// instead of replaying the log.
const SNAPSHOT_WHEN_EMPTY: u64 = 1_000;
/// Keys per snapshot chunk at most (and about `RANGE_PAGE_BYTES`).
const SNAPSHOT_CHUNK_KEYS: u32 = 10_000;
/// In the refusals of an asker that knows another placement version.
const MOVED: &str = "partitions moved";
/// A run of at most [`INLINE_APPLY_MAX_COMMITS`] commits, or of commits
/// writing at most [`INLINE_APPLY_MAX_WRITES`] keys (a run's worth at 64
/// clients), is applied on the worker itself; a longer one on the blocking
/// pool, so that the node's one worker keeps serving meanwhile. Handing a run over costs two context switches
/// per apply, which is more than a short run's writes.
///
/// A single large transaction stays on the worker, as it always did: sent
/// to the pool, 1,000-key transactions made a participant miss its lease
/// in two of five runs of `range.rs` on a loaded debug build (see
/// docs/decisions.md, "Less CPU per commit").
const INLINE_APPLY_MAX_COMMITS: usize = 8;
const INLINE_APPLY_MAX_WRITES: usize = 128;

struct Node {
    id: u64,
    addr: String,
    /// This data directory's random id (see `SyncRequest::replica`).
    replica: u64,
    /// Cluster, incarnation followed, epoch, membership, lease, readiness
    /// (see its docs). Lock order: `standing` before `core`.
    standing: Mutex<ParticipantCore>,
    /// Milliseconds for `standing` count from here.
    origin: Instant,
    store: ReplicaStore,
    core: Mutex<ReplicaCore>,
    /// Bumped whenever locks are released or the applied index moves.
    changed: watch::Sender<u64>,
    apply_wake: Notify,
    catch_up: Notify,
    /// Check in now (a message came from an incarnation not yet followed).
    check_in: Notify,
    sync: GroupSync,
    coordinator: Peer<CoordinatorServiceClient>,
    /// The other participants, in id order, as the coordinator last named
    /// them: reads of keys this replica does not hold go to their replicas.
    peers: Mutex<BTreeMap<u64, Arc<Peer<ParticipantServiceClient>>>>,
    security: Security,
    /// Keys written by recent commits (kept while keys are partitioned).
    recent: Mutex<RecentWrites>,
    applied_count: AtomicU64,
    /// Write-path RPCs (see [`NodeStatus::rpcs`]).
    rpcs: AtomicU64,
    tick: Duration,
    fatal: mpsc::UnboundedSender<String>,
    lock_wait: Duration,
    /// A snapshot install is under way (see the module docs): the data is
    /// no state of the cluster.
    installing: AtomicBool,
    /// Keys copied by the install under way (for status).
    install_keys: AtomicU64,
    /// Local reads show one state of the cluster from this applied index
    /// on (after an install: its newest chunk's index).
    consistent_from: AtomicU64,
    /// Held by the applier around each batch, and by an install throughout.
    applying: tokio::sync::Mutex<()>,
    /// Recent transactions' steps here, for `treaty trace`.
    trace: TraceRing,
    /// Partitions to copy here before they move to this replica, as the
    /// coordinator last said (see `moves`). Lock order: after `standing`.
    pending_install: Mutex<Option<PartitionInstall>>,
    /// The step of the last partition copy finished here, durably.
    installed_step: AtomicU64,
    /// Wakes the task that copies moving partitions and drops moved ones.
    moves_wake: Notify,
}

/// Crashes the process on a storage failure while holding protocol state:
/// continuing could diverge from the other replicas; restarting recovers.
fn fatal_storage(what: &str, e: Error) -> ! {
    error!(error = %e, "storage failure while {what}; aborting so that recovery can restore a consistent state");
    eprintln!("treaty-participant: storage failure while {what}: {e}");
    std::process::abort()
}

impl Node {
    /// Milliseconds since `origin`: the time `standing` works in.
    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// "Still catching up", for a replica whose standing is `standing`.
    fn not_ready(&self, standing: &ParticipantCore) -> Error {
        let applied = self.core.lock().unwrap().applied_index();
        Error::NotReady(format!(
            "participant {} at {} is catching up (applied {applied} of {}); retry shortly, use another endpoint, or read with --stale",
            self.id,
            self.addr,
            standing.cluster_last()
        ))
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// A refusal that asks for a check-in (a message from an incarnation
    /// not followed yet) gets one at once.
    fn checked(&self, r: Result<()>) -> Result<()> {
        if matches!(r, Err(Error::NotReady(_))) {
            self.check_in.notify_one();
        }
        r
    }

    /// PREPARE for a batch: checks that concern the whole batch first (who
    /// sent it, to whom, under which view), then each transaction in order;
    /// every record to log is written as one WAL entry and made durable by
    /// one sync before any vote leaves. The core is told when the records
    /// are written (or, if this request is dropped, that they never will
    /// be): see [`Logging`].
    async fn prepare(&self, req: PrepareBatch) -> Result<Vec<Result<Vote>>> {
        let started = Instant::now();
        let (checked, placement) = {
            let mut standing = self.standing.lock().unwrap();
            let checked = standing
                .check_prepare(req.cluster, req.to, req.coordinator, req.replica, req.epoch, |st| self.not_ready(st))
                .and_then(|()| {
                    let known = standing.placement().map_or(0, |p| p.spec().version);
                    if known < req.placement_version {
                        return Err(Error::NotReady(format!(
                            "participant {} knows placement version {known}, the PREPARE was planned with {}: \
                             {MOVED}; it checks in and votes on the retry",
                            self.id, req.placement_version
                        )));
                    }
                    Ok(())
                });
            (checked, standing.placement())
        };
        self.checked(checked)?;
        let placement = placement.filter(|p| !p.is_full());
        let give_up = Instant::now() + self.lock_wait;
        // A readmitted replica first applies everything decided before it
        // rejoined: it never prepared those, so its locks cannot cover them.
        if !self.wait_applied(req.min_applied, give_up).await {
            return Err(Error::NotReady(format!(
                "participant {} is still catching up to index {} after rejoining; retry",
                self.id, req.min_applied
            )));
        }
        self.trace.record_all(
            req.items.iter().map(|i| i.txn.id),
            "prepare received",
            format!("in a batch of {}", req.items.len()),
        );
        let mut votes = Vec::with_capacity(req.items.len());
        let mut sync_needed = false;
        let mut logging = Logging { node: self, records: Vec::new(), written: false, reported: false };
        for item in &req.items {
            if let Err(e) = item.txn.validate() {
                votes.push(Err(e));
                continue;
            }
            let mine;
            let txn = match placement.as_deref() {
                Some(p) => {
                    mine = self.my_part(p, &item.txn);
                    &mine
                }
                None => &*item.txn,
            };
            let vote = self.prepare_one(txn, item.attempt, give_up, &mut logging.records, &mut sync_needed).await;
            match &vote {
                Ok(Vote::Yes) => treaty_metrics::hot::votes_yes(),
                Ok(Vote::No(_)) => treaty_metrics::hot::votes_no(),
                Err(_) => treaty_metrics::hot::votes_error(),
            }
            .increment(1);
            let detail = match &vote {
                Ok(Vote::No(why)) => Detail::from(format!("no: {why}")),
                Err(e) => format!("error: {e}").into(),
                _ => "yes".into(),
            };
            self.trace.record(item.txn.id, "voted", detail);
            votes.push(vote);
        }
        let count = logging.records.len();
        if count > 0 {
            crash_point!("participant::before_prepare_log");
            self.store.log_prepared(&logging.records).unwrap_or_else(|e| fatal_storage("logging PREPARED records", e));
            logging.written = true;
            logging.finish();
            crash_point!("participant::before_prepare_sync");
        }
        if sync_needed || count > 0 {
            self.sync.sync().await.unwrap_or_else(|e| fatal_storage("syncing the WAL", e));
        }
        if count > 0 {
            crash_point!("participant::after_prepare_sync");
            debug!(count, "prepared");
            let detail = format!(
                "PREPARED record written and synced; votes leave ({:.2} ms after arrival)",
                started.elapsed().as_secs_f64() * 1000.0
            );
            self.trace.record_all(logging.records.iter().map(|r| r.txn_id), "record durable", detail);
        }
        treaty_metrics::hot::vote_seconds().record(started.elapsed().as_secs_f64());
        Ok(votes)
    }

    /// The part of `txn` this participant judges and applies: conditions on
    /// and writes to the keys it holds (the other replicas judge the rest).
    fn my_part(&self, placement: &Placement, txn: &Txn) -> Txn {
        Txn {
            id: txn.id,
            conditions: txn.conditions.iter().filter(|c| placement.holds(self.id, c.key())).cloned().collect(),
            writes: txn.writes.iter().filter(|w| placement.holds(self.id, w.key())).cloned().collect(),
        }
    }

    /// One transaction of a PREPARE batch: its vote, with the record to log
    /// (or the need to sync an earlier one) added for the batch.
    async fn prepare_one(
        &self,
        txn: &Txn,
        attempt: u64,
        give_up: Instant,
        records: &mut Vec<PreparedRecord>,
        sync_needed: &mut bool,
    ) -> Result<Vote> {
        loop {
            let mut changed = self.changed.subscribe();
            let step = {
                let mut core = self.core.lock().unwrap();
                core.prepare(txn, attempt, |k| self.store.get(k))
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
                    *sync_needed = true;
                    return Ok(Vote::Yes);
                }
                PrepareStep::VoteNo(reason) => return Ok(Vote::No(reason)),
                PrepareStep::Persist(record) => {
                    records.push(record);
                    return Ok(Vote::Yes);
                }
            }
        }
    }

    /// Outcomes from the coordinator: commits queue for the applier (one
    /// wake-up for all), aborts drop their records (one sled batch). A
    /// skipped commit applies as one without writes here.
    fn decide(&self, commits: Vec<(TxnId, u64)>, aborts: Vec<(TxnId, u64)>, skips: Vec<(TxnId, u64)>) -> Result<()> {
        let mut first_error = None;
        let mut queued = false;
        let mut forget = Vec::new();
        {
            let mut core = self.core.lock().unwrap();
            let nothing: Writes = Arc::new(Vec::new());
            let all =
                commits.into_iter().map(|c| (c, None)).chain(skips.into_iter().map(|c| (c, Some(nothing.clone()))));
            for ((txn_id, index), writes) in all {
                let step = if writes.is_some() { "skip received" } else { "COMMIT received" };
                self.trace.record(txn_id, step, Detail::Indexed("index ", index));
                match core.commit(txn_id, index, writes) {
                    Ok(CommitStep::Queued) => queued = true,
                    Ok(CommitStep::AlreadyApplied) => {}
                    Ok(CommitStep::Retired) => forget.push(txn_id),
                    Ok(CommitStep::Unknown) => {
                        warn!(txn = %txn_id, index, "commit of a transaction not prepared here; fetching the log");
                        self.catch_up.notify_one();
                    }
                    Err(e) => {
                        error!(txn = %txn_id, index, error = %e, "refused a COMMIT that contradicts what this replica knows");
                        first_error.get_or_insert(e);
                    }
                }
            }
            for (txn_id, attempt) in aborts {
                self.trace.record(txn_id, "ABORT received", format!("attempt {attempt}"));
                match core.abort(txn_id, attempt) {
                    Ok(true) => forget.push(txn_id),
                    Ok(false) => {}
                    Err(e) => {
                        error!(txn = %txn_id, attempt, error = %e, "refused an ABORT of a committed transaction");
                        first_error.get_or_insert(e);
                    }
                }
            }
        }
        if queued {
            self.apply_wake.notify_one();
        }
        if !forget.is_empty() {
            self.store.forget_prepared(&forget).unwrap_or_else(|e| fatal_storage("dropping PREPARED records", e));
            self.bump();
            debug!(count = forget.len(), "aborted");
        }
        first_error.map_or(Ok(()), Err)
    }

    fn commit(&self, txn_id: TxnId, index: u64) -> Result<()> {
        let step = self.core.lock().unwrap().commit(txn_id, index, None).inspect_err(|e| {
            error!(txn = %txn_id, index, error = %e, "refused a COMMIT that contradicts what this replica knows");
        })?;
        match step {
            CommitStep::Queued => self.apply_wake.notify_one(),
            CommitStep::AlreadyApplied => {}
            CommitStep::Retired => self.retire(txn_id),
            CommitStep::Unknown => {
                warn!(txn = %txn_id, index, "commit of a transaction not prepared here; fetching the log");
                self.catch_up.notify_one();
            }
        }
        Ok(())
    }

    /// Drops the PREPARED record of a transaction applied before a crash
    /// that came between the apply's two writes (see `CommitStep::Retired`).
    fn retire(&self, txn_id: TxnId) {
        self.store.forget_prepared(&[txn_id]).unwrap_or_else(|e| fatal_storage("dropping a PREPARED record", e));
        self.bump();
        info!(txn = %txn_id, "dropped the record of a transaction applied before a crash");
    }

    fn abort(&self, txn_id: TxnId, attempt: u64) -> Result<()> {
        let forget = self.core.lock().unwrap().abort(txn_id, attempt).inspect_err(|e| {
            error!(txn = %txn_id, attempt, error = %e, "refused an ABORT of a committed transaction");
        })?;
        if forget {
            self.store.forget_prepared(&[txn_id]).unwrap_or_else(|e| fatal_storage("dropping a PREPARED record", e));
            self.bump();
            debug!(txn = %txn_id, attempt, "aborted");
        }
        Ok(())
    }

    /// Waits until this replica has applied `index` (asking for a catch-up
    /// if needed); `false` if it has not by `give_up`.
    async fn wait_applied(&self, index: u64, give_up: Instant) -> bool {
        loop {
            let mut changed = self.changed.subscribe();
            if self.core.lock().unwrap().applied_index() >= index {
                return true;
            }
            self.catch_up.notify_one();
            let wait = give_up.saturating_duration_since(Instant::now());
            if tokio::time::timeout(wait, changed.changed()).await.is_err() {
                return false;
            }
        }
    }

    /// The placement, when keys are partitioned (`None`: full copies, or
    /// not known yet).
    fn partitioned(&self) -> Option<Arc<Placement>> {
        self.standing.lock().unwrap().placement().filter(|p| !p.is_full())
    }

    /// The connection to participant `id`, once the coordinator named it.
    fn peer(&self, id: u64) -> Option<Arc<Peer<ParticipantServiceClient>>> {
        self.peers.lock().unwrap().get(&id).cloned()
    }

    /// Connects to the participants at `addrs` unless it already does (and
    /// drops removed ones).
    fn set_peers(&self, addrs: &BTreeMap<u64, String>) {
        let mut peers = self.peers.lock().unwrap();
        if peers.iter().map(|(id, p)| (id, &p.addr)).eq(addrs.iter()) {
            return;
        }
        *peers = addrs
            .iter()
            .map(|(&id, addr)| {
                let peer = Peer::new(
                    format!("participant {id} at {addr}"),
                    addr.clone(),
                    self.security.clone(),
                    Expect::Participant(id),
                );
                (id, Arc::new(peer.with_max_call(self.lock_wait + Duration::from_secs(3))))
            })
            .collect();
    }

    async fn get(&self, key: Key, stale: bool) -> Result<Option<Versioned>> {
        treaty_common::types::check_key(&key)?;
        if let Some(placement) = self.partitioned().filter(|p| !p.holds(self.id, &key)) {
            treaty_metrics::hot::reads_forwarded().increment(1);
            return self.forward_get(&placement, key, stale).await;
        }
        if stale { treaty_metrics::hot::reads_stale() } else { treaty_metrics::hot::reads_linearizable() }.increment(1);
        if !stale {
            self.wait_unheld(|| format!("key {}", escape(&key)), |core| core.holder(&key)).await?;
            self.store.get(&key)
        } else {
            self.check_consistent()?;
            self.store.get(&key)
        }
    }

    /// PREPARE and COMMIT are refused while an install runs (a member has
    /// applied past any install's newest chunk, so this is all they need).
    fn refuse_while_installing(&self) -> Result<()> {
        if self.installing.load(Ordering::Acquire) {
            return Err(Error::NotReady(format!("participant {} is installing a snapshot", self.id)));
        }
        Ok(())
    }

    /// Whether local data shows one state of the cluster (not during a
    /// snapshot install, nor before the replay after one has passed the
    /// newest chunk). Linearizable reads need a lease, which such a replica
    /// never has; stale reads check this.
    fn check_consistent(&self) -> Result<()> {
        let applied = self.core.lock().unwrap().applied_index();
        if self.installing.load(Ordering::Acquire) || applied < self.consistent_from.load(Ordering::Acquire) {
            return Err(Error::NotReady(format!(
                "participant {} at {} is re-seeding its data from a snapshot of the other replicas (applied {applied}); \
                 read through another participant, or retry shortly",
                self.id, self.addr
            )));
        }
        Ok(())
    }

    /// A read of a key this replica does not hold: asked of the replicas
    /// that do, one after another (starting at a different one from each
    /// participant, to spread the load), each serving it as its own read
    /// (under its own lease when linearizable).
    async fn forward_get(&self, placement: &Placement, key: Key, stale: bool) -> Result<Option<Versioned>> {
        let partition = placement.partition(&key);
        let replicas = placement.replicas(partition);
        let first = self.id as usize % replicas.len();
        let mut last_error = None;
        for i in 0..replicas.len() {
            let id = replicas[(first + i) % replicas.len()];
            let Some(peer) = self.peer(id) else { continue };
            let timeout = self.lock_wait + Duration::from_secs(2);
            let answer = peer
                .call_raw(|c: ParticipantServiceClient| {
                    let key = key.clone();
                    async move { c.get(rpc::deadline(timeout), key, stale).await }
                })
                .await;
            match answer {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(e @ Error::NotReady(_))) | Err(e) => last_error = Some(e),
                Ok(Err(e)) => return Err(e),
            }
        }
        Err(Error::Unavailable(format!(
            "key {} is held by participants {} (partition {partition}), and none of them could serve the read \
             ({}); retry shortly",
            escape(&key),
            list(replicas),
            last_error.map_or("their addresses are not known yet".to_string(), |e| e.to_string())
        )))
    }

    /// One page of a range read. With full copies it is read here; a
    /// linearizable one first waits until no prepared transaction holds a
    /// key in the range, like a `get`. With partitioned keys it is merged
    /// from a cover of the participants (see [`Node::range_across`]).
    async fn range(&self, req: RangeRequest) -> Result<RangePage> {
        req.check()?;
        let mut tries = 0;
        while let Some(placement) = self.partitioned() {
            match self.range_across(&placement, req.clone()).await {
                // Planned across a move some part had not heard of (or
                // this one): once everyone has checked in, plan again.
                Err(e) if tries < 3 && e.to_string().contains(MOVED) => {
                    tries += 1;
                    tokio::time::sleep(self.tick + self.tick / 2).await;
                }
                r => return r,
            }
        }
        self.wait_range_unheld(&req).await?;
        self.store.range(&req)
    }

    /// A linearizable range read's wait (a stale one does not wait).
    async fn wait_range_unheld(&self, req: &RangeRequest) -> Result<()> {
        if req.stale {
            return self.check_consistent();
        }
        let what = || match &req.end {
            Some(end) => format!("range [{}, {})", escape(&req.start), escape(end)),
            None => format!("range [{}, end)", escape(&req.start)),
        };
        self.wait_unheld(what, |core| core.holder_in(&req.start, req.end.as_deref())).await
    }

    /// A range page across partitions (see `treaty_core::protocol::ranges`):
    /// every part is asked as of one commit index, starting from this
    /// replica's applied index, and again as of the highest index a part
    /// saw while any part's keys changed after the one asked for. A part
    /// that cannot answer (down, behind) is replaced by other replicas of
    /// its partitions.
    async fn range_across(&self, placement: &Placement, req: RangeRequest) -> Result<RangePage> {
        let holders = placement.holders();
        let n = holders.len();
        let me = holders.iter().position(|id| *id >= self.id).unwrap_or(0);
        let mut as_of = self.core.lock().unwrap().applied_index();
        let mut failed: Vec<u64> = Vec::new();
        let mut last_error = None;
        for _ in 0..RANGE_ROUNDS + n {
            // This replica first, then the others from the next id on.
            let candidates: Vec<u64> =
                (0..n).map(|i| holders[(me + i) % n]).filter(|id| !failed.contains(id)).collect();
            let cover = ranges::cover(placement, &candidates).map_err(|partition| {
                Error::Unavailable(format!(
                    "partition {partition} (participants {}) has no replica that can serve reads ({}); retry shortly",
                    list(placement.replicas(partition)),
                    last_error.as_ref().map_or("none answered".to_string(), Error::to_string)
                ))
            })?;
            let parts =
                futures::future::join_all(cover.iter().map(|&id| self.part(placement, id, &req, &cover, as_of))).await;
            let mut pages = Vec::with_capacity(parts.len());
            let mut newest = as_of;
            for (&id, part) in cover.iter().zip(parts) {
                match part {
                    Ok(part) => {
                        newest = newest.max(part.page.index);
                        if part.unchanged {
                            pages.push(part.page);
                        }
                    }
                    Err(e @ (Error::NotReady(_) | Error::Unavailable(_))) => {
                        failed.push(id);
                        last_error = Some(e);
                    }
                    Err(e) => return Err(e),
                }
            }
            if pages.len() == cover.len() {
                return Ok(ranges::merge(pages, req.limit, as_of));
            }
            as_of = newest;
        }
        Err(Error::Conflict(format!(
            "the keys of this range kept changing while it was read across partitions ({RANGE_ROUNDS} tries); \
             retry, or read fewer keys per page (--limit)"
        )))
    }

    /// Participant `id`'s part of a range page: this replica's own, or asked over the wire.
    async fn part(
        &self,
        placement: &Placement,
        id: u64,
        req: &RangeRequest,
        cover: &[u64],
        as_of: u64,
    ) -> Result<RangePart> {
        let version = placement.spec().version;
        if id == self.id {
            return self.range_part(req.clone(), cover.to_vec(), as_of, version).await;
        }
        let peer =
            self.peer(id).ok_or_else(|| Error::Unavailable(format!("participant {id}'s address is not known yet")))?;
        let timeout = self.lock_wait + Duration::from_secs(2);
        peer.call(|c: ParticipantServiceClient| {
            let (req, cover) = (req.clone(), cover.to_vec());
            async move { c.range_part(rpc::deadline(timeout), req, cover, as_of, version).await }
        })
        .await
    }

    /// This replica's part of a range page read through `cover`: the keys
    /// it serves, as of `as_of` if no later commit changed them (see
    /// [`RangePart`]).
    async fn range_part(
        &self,
        req: RangeRequest,
        cover: Vec<u64>,
        as_of: u64,
        placement_version: u64,
    ) -> Result<RangePart> {
        req.check()?;
        let placement = self.partitioned().ok_or_else(|| {
            Error::NotReady(format!("participant {} has not learned where keys live yet; retry shortly", self.id))
        })?;
        if placement.spec().version != placement_version {
            self.check_in.notify_one();
            return Err(Error::NotReady(format!(
                "participant {} knows placement version {}, the read was planned with {placement_version}: \
                 {MOVED}; retry",
                self.id,
                placement.spec().version
            )));
        }
        if !self.wait_applied(as_of, Instant::now() + self.lock_wait).await {
            return Err(Error::NotReady(format!(
                "participant {} has not applied index {as_of} after {:?} (it is behind); another replica will be asked",
                self.id, self.lock_wait
            )));
        }
        self.wait_range_unheld(&req).await?;
        let serves = |key: &[u8]| ranges::serves(&placement, &cover, self.id, key);
        let mut page = self.store.range_where(&req, serves)?;
        let covered =
            |key: &[u8]| req.contains(key) && page.next.as_deref().is_none_or(|next| key < next) && serves(key);
        let unchanged = self.recent.lock().unwrap().unchanged(as_of, page.index, covered);
        if !unchanged {
            page.entries.clear();
            page.next = None;
        }
        Ok(RangePart { page, unchanged })
    }

    /// The wait of a linearizable read: the lease must be valid, then
    /// `held` must find no prepared transaction (its outcome could change
    /// what the read returns); gives up after the lock wait, naming what
    /// was read with `what` (only built then).
    async fn wait_unheld(
        &self,
        what: impl FnOnce() -> String,
        held: impl Fn(&ReplicaCore) -> Option<TxnId>,
    ) -> Result<()> {
        {
            let standing = self.standing.lock().unwrap();
            standing.check_read(self.now_ms(), &self.coordinator.addr, |st| self.not_ready(st))?;
        }
        let give_up = Instant::now() + self.lock_wait;
        loop {
            let mut changed = self.changed.subscribe();
            let holder = held(&self.core.lock().unwrap());
            // Test-only: a deliberately broken build that skips the wait for
            // prepared writes, so the linearizability checker can prove it
            // catches stale reads.
            let holder = (|| {
                fail::fail_point!("participant::skip_read_wait", |_| None);
                holder
            })();
            let Some(holder) = holder else {
                return Ok(());
            };
            let wait = give_up.saturating_duration_since(Instant::now());
            if tokio::time::timeout(wait, changed.changed()).await.is_err() {
                let committed = self.core.lock().unwrap().committed_at(holder);
                let what = what();
                return Err(Error::InDoubt(match committed {
                    Some(index) => format!(
                        "{what} is held by transaction {holder}, committed at index {index} but not yet applied by \
                         participant {} after {:?} (it is busy or behind); retry, use another endpoint, or read with --stale",
                        self.id, self.lock_wait
                    ),
                    None => format!(
                        "{what} is held by prepared transaction {holder}, whose outcome is still unknown after {:?} \
                         (is the coordinator down?); retry, or read with --stale",
                        self.lock_wait
                    ),
                }));
            }
        }
    }

    /// This node's status.
    fn status(&self) -> NodeStatus {
        let keys = self.store.key_count();
        let standing = self.standing.lock().unwrap();
        let core = self.core.lock().unwrap();
        let tick_ms = self.tick.as_millis() as u64;
        NodeStatus {
            id: self.id,
            role: "participant".into(),
            addr: self.addr.clone(),
            replica: self.replica,
            fenced: None,
            coordinator: standing.following(),
            cluster: standing.cluster(),
            applied_index: core.applied_index(),
            ready: standing.ready(),
            prepared: core.prepared_count() as u64,
            syncs: self.sync.count(),
            commits: self.applied_count.load(Ordering::Relaxed),
            rpcs: self.rpcs.load(Ordering::Relaxed),
            epoch: standing.epoch(),
            member: standing.member(),
            lease_ms: standing.lease_ms(self.now_ms()),
            in_doubt: core.in_doubt_ages().into_iter().map(|(t, age)| (t, age * tick_ms)).collect(),
            keys,
            partitions: standing.placement().map_or(0, |p| p.partitions_of(self.id).len() as u64),
            compacted: 0,
            log_entries: 0,
            installing: self.installing.load(Ordering::Acquire).then(|| self.install_keys.load(Ordering::Relaxed)),
        }
    }

    /// Applies the runs of commits the core hands out, in index order.
    async fn applier(self: Arc<Self>) {
        loop {
            self.apply_wake.notified().await;
            loop {
                let _applying = self.applying.lock().await;
                if self.installing.load(Ordering::Acquire) {
                    break;
                }
                let batch = self.core.lock().unwrap().next_apply();
                let Some(last) = batch.last().map(|e| e.index) else {
                    break;
                };
                let placement = self.partitioned();
                let batch = match &placement {
                    Some(p) => moves::only_held(p, self.id, batch),
                    None => batch,
                };
                // Before readers can see the batch (see `range_part`).
                {
                    let partitioned = placement.is_some();
                    let mut recent = self.recent.lock().unwrap();
                    if partitioned {
                        for e in &batch {
                            recent.record(e.index, e.writes.iter().map(|w| w.key()));
                        }
                    } else {
                        recent.forget_through(last);
                    }
                }
                crash_point!("participant::before_apply");
                let apply_started = Instant::now();
                let store = self.store.clone();
                let inline = batch.len() <= INLINE_APPLY_MAX_COMMITS
                    || batch.iter().map(|e| e.writes.len()).sum::<usize>() <= INLINE_APPLY_MAX_WRITES;
                let apply = move || {
                    let r = store.apply_data(&batch).and_then(|()| {
                        // Test-only: a crash between the two writes of an apply.
                        crash_point!("participant::mid_apply", {
                            let _ = store.flush();
                        });
                        store.retire(&batch)
                    });
                    (r, batch)
                };
                let (store_result, batch) = if inline {
                    apply()
                } else {
                    tokio::task::spawn_blocking(apply).await.expect("apply task panicked")
                };
                store_result.unwrap_or_else(|e| fatal_storage("applying commits", e));
                crash_point!("participant::after_apply");
                self.core.lock().unwrap().applied(last);
                self.applied_count.fetch_add(batch.len() as u64, Ordering::Relaxed);
                treaty_metrics::hot::applied().increment(batch.len() as u64);
                for e in &batch {
                    self.trace.record(e.txn_id, "applied", Detail::Applied { index: e.index, run: batch.len() });
                }
                treaty_metrics::hot::apply_seconds().record(apply_started.elapsed().as_secs_f64());
                debug!(through = last, count = batch.len(), "applied");
                self.bump();
            }
        }
    }

    /// Refreshes this participant's gauges (every check-in tick, and after
    /// each answer).
    fn update_gauges(&self) {
        use treaty_metrics as m;
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        {
            let standing = self.standing.lock().unwrap();
            let lease = standing.lease_ms(self.now_ms()).unwrap_or(0);
            metrics::gauge!(m::LEASE_SECONDS).set(lease as f64 / 1000.0);
            metrics::gauge!(m::MEMBER).set(flag(standing.member()));
            metrics::gauge!(m::READY).set(flag(standing.ready()));
        }
        {
            let core = self.core.lock().unwrap();
            metrics::gauge!(m::APPLIED_INDEX).set(core.applied_index() as f64);
            metrics::gauge!(m::PREPARED).set(core.prepared_count() as f64);
            metrics::gauge!(m::IN_DOUBT).set(core.in_doubt_ages().len() as f64);
        }
        metrics::gauge!(m::INSTALLING).set(flag(self.installing.load(Ordering::Acquire)));
        metrics::gauge!(m::INSTALL_KEYS).set(self.install_keys.load(Ordering::Relaxed) as f64);
        metrics::counter!(m::SYNCS).absolute(self.sync.count());
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
                _ = self.check_in.notified() => {}
            }
            self.update_gauges();
            let (ready, cluster, following, seen_index) = {
                let st = self.standing.lock().unwrap();
                (st.ready(), st.cluster(), st.following(), st.seen_index())
            };
            let (applied, in_doubt, undecided) = {
                let mut core = self.core.lock().unwrap();
                core.tick();
                let undecided = core.in_doubt(0).len() as u64;
                (core.applied_index(), core.in_doubt(if ready { IN_DOUBT_TICKS } else { 0 }), undecided)
            };
            let sent = self.now_ms();
            let req = SyncRequest {
                node_id: self.id,
                replica: self.replica,
                cluster,
                coordinator: following,
                seen_index: seen_index.max(applied),
                undecided,
                applied_index: applied,
                in_doubt,
                installing: self.installing.load(Ordering::Acquire),
                installed: self.installed_step.load(Ordering::Acquire),
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
                Err(e @ Error::NotMember(_)) => {
                    // Started before `treaty member add`: wait for it.
                    unreachable_since = None;
                    if !warned {
                        warn!(error = %e, "waiting to be admitted");
                        warned = true;
                    }
                    continue;
                }
                Err(e @ (Error::Fenced(_) | Error::Denied(_))) => {
                    // Not this replica's fault: keep its data, keep asking.
                    if !warned {
                        error!(error = %e, "the coordinator cannot be followed; waiting for an operator to fix it");
                        warned = true;
                    }
                    continue;
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
                    let never_joined = cluster.is_none();
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
            self.set_peers(&reply.participants);
            // Persisted under the lock: nothing acts on the new standing
            // (a PREPARE from the incarnation now followed) before it is.
            {
                let mut standing = self.standing.lock().unwrap();
                let persist = match standing.on_reply(&reply, sent, self.now_ms()) {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = self.fatal.send(format!("{e} (the coordinator at {})", self.coordinator.addr));
                        return;
                    }
                };
                if let Some(c) = persist.cluster {
                    self.store.set_cluster(c).unwrap_or_else(|e| fatal_storage("recording the cluster id", e));
                    info!(cluster = %c, "joined cluster");
                }
                if let Some((previous, now)) = persist.following {
                    self.store
                        .set_following(now)
                        .unwrap_or_else(|e| fatal_storage("recording the coordinator incarnation", e));
                    info!(coordinator = %now, ?previous, "following coordinator");
                }
                if let Some(i) = persist.seen_index {
                    self.store.set_seen_index(i).unwrap_or_else(|e| fatal_storage("recording the seen index", e));
                }
                // Under the standing lock: the moves task reads the
                // placement and this together.
                *self.pending_install.lock().unwrap() = reply.install.clone();
            }
            self.moves_wake.notify_one();
            // The gauges show the standing this answer left (a lease just
            // granted or renewed), not only what the tick began with.
            self.update_gauges();
            if self.installing.load(Ordering::Acquire) {
                // This answer's outcomes concern the core the install replaces:
                // the next check-in asks again.
                if let Err(e) = self.install_snapshot().await {
                    warn!(error = %e, "installing a snapshot failed; will resume where it stopped");
                }
                continue;
            }
            for (txn_id, attempt, outcome) in reply.outcomes {
                // Refusals are logged where they happen; the rest proceeds.
                let _ = match outcome {
                    Outcome::Committed(index) => self.commit(txn_id, index),
                    Outcome::Aborted => self.abort(txn_id, attempt),
                    Outcome::Pending | Outcome::Forgotten(_) => Ok(()),
                };
            }
            if reply.last_index > applied {
                if applied == last_applied {
                    behind_ticks += 1;
                } else {
                    behind_ticks = 0;
                }
                if applied == 0 && reply.last_index > SNAPSHOT_WHEN_EMPTY && !self.installing.load(Ordering::Acquire) {
                    // A new (or wiped) replica far behind: a snapshot of the
                    // data, not a replay of all history.
                    info!(
                        last_index = reply.last_index,
                        "this replica is empty: installing a snapshot from the others"
                    );
                    self.installing.store(true, Ordering::Release);
                    self.catch_up.notify_one();
                } else if !ready || behind_ticks >= STUCK_TICKS {
                    match self.fetch_missing(applied).await {
                        Err(Error::Compacted(through)) => {
                            warn!(
                                applied,
                                compacted_through = through,
                                "the log entries this replica misses were compacted: installing a snapshot from the \
                                 other replicas"
                            );
                            self.installing.store(true, Ordering::Release);
                            self.catch_up.notify_one();
                        }
                        Err(e) => warn!(error = %e, "catching up failed; will retry"),
                        Ok(()) => {}
                    }
                }
            } else {
                behind_ticks = 0;
            }
            last_applied = applied;
            if !ready && !self.installing.load(Ordering::Acquire) {
                let mut standing = self.standing.lock().unwrap();
                let (applied, in_doubt) = {
                    let core = self.core.lock().unwrap();
                    (core.applied_index(), core.in_doubt(0).len())
                };
                if standing.maybe_ready(applied, in_doubt) {
                    info!(applied, "caught up: voting and serving reads");
                }
            }
        }
    }

    /// Fetches and applies missed log entries, batch after batch, for up
    /// to about two seconds (the sync loop calls again if still behind).
    async fn fetch_missing(&self, applied: u64) -> Result<()> {
        let (cluster, placement) = {
            let standing = self.standing.lock().unwrap();
            (standing.cluster().expect("joined before fetching"), standing.placement())
        };
        let version = placement.as_ref().map_or(0, |p| p.spec().version);
        let partitioned = placement.filter(|p| !p.is_full());
        let started = Instant::now();
        let mut from = applied + 1;
        let mut fetched = 0u64;
        loop {
            let entries = self
                .coordinator
                .call(|c: CoordinatorServiceClient| async move {
                    c.fetch_log(rpc::deadline(Duration::from_secs(5)), cluster, from, 1024, version).await
                })
                .await;
            if let Err(Error::NotReady(_)) = &entries {
                self.check_in.notify_one();
            }
            let entries = entries?;
            let Some(last) = entries.last().map(|e| e.index) else { break };
            let full = entries.len() == 1024;
            fetched += entries.len() as u64;
            metrics::counter!(treaty_metrics::CATCH_UP_ENTRIES).increment(entries.len() as u64);
            let mut retired = Vec::new();
            {
                let mut core = self.core.lock().unwrap();
                for mut e in entries {
                    // Only the writes to keys this participant holds.
                    if let Some(p) = partitioned.as_deref() {
                        e.writes.retain(|w| p.holds(self.id, w.key()));
                    }
                    match core.commit(e.txn_id, e.index, Some(e.writes.into())) {
                        Ok(CommitStep::Retired) => retired.push(e.txn_id),
                        Ok(_) => {}
                        Err(err) => error!(error = %err, "the coordinator's log contradicts this replica"),
                    }
                }
            }
            for txn_id in retired {
                self.retire(txn_id);
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

impl Node {
    /// Serves one snapshot chunk to a replica re-seeding itself (see
    /// [`SnapshotChunk`]): only while this replica is caught up.
    async fn snapshot(
        &self,
        cluster: ClusterId,
        partitions: Option<Vec<u32>>,
        start: Key,
        placement_version: u64,
    ) -> Result<SnapshotChunk> {
        if !start.is_empty() {
            treaty_common::types::check_key(&start)?;
        }
        let placement = {
            let standing = self.standing.lock().unwrap();
            if standing.cluster() != Some(cluster) {
                return Err(Error::Identity(format!(
                    "a snapshot of cluster {cluster} was asked of participant {}, which is in another cluster",
                    self.id
                )));
            }
            if !standing.ready() {
                return Err(self.not_ready(&standing));
            }
            standing.placement()
        };
        self.check_consistent()?;
        let group = SnapshotGroup { partitions, sources: Vec::new() };
        let placement = match (&group.partitions, placement) {
            (None, _) => None,
            (Some(_), Some(p)) => Some(p),
            (Some(_), None) => return Err(Error::NotReady("this replica does not know the placement yet".into())),
        };
        if let (Some(p), Some(parts)) = (&placement, &group.partitions) {
            // A replica that gave a partition up may have dropped its keys.
            if p.spec().version != placement_version {
                return Err(Error::NotReady(format!(
                    "participant {} knows placement version {}, the copy was planned with {placement_version}: \
                     {MOVED}; plan again after a check-in",
                    self.id,
                    p.spec().version
                )));
            }
            if let Some(part) = parts.iter().find(|part| **part >= p.partitions()) {
                return Err(Error::Invalid(format!(
                    "there is no partition {part}: this cluster has {}",
                    p.partitions()
                )));
            }
            if let Some(part) = parts.iter().find(|part| !p.replicas(**part).contains(&self.id)) {
                return Err(Error::NotReady(format!("participant {} does not hold partition {part}", self.id)));
            }
        }
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let req = RangeRequest { start, end: None, limit: SNAPSHOT_CHUNK_KEYS, keys_only: false, stale: true };
            let page = match &placement {
                Some(p) => store.range_where(&req, |k| group.keeps(p, k)),
                None => store.range(&req),
            }?;
            Ok(SnapshotChunk::new(page.index, page.entries, page.next))
        })
        .await
        .expect("snapshot task panicked")
    }

    /// One chunk of `group` from `start` on, from the first of its sources
    /// that can send it (a different first one per chunk, spreading the
    /// load), its checksum verified.
    async fn snapshot_chunk(
        &self,
        cluster: ClusterId,
        group: &SnapshotGroup,
        start: &[u8],
        turn: usize,
        placement_version: u64,
    ) -> Result<SnapshotChunk> {
        let mut failures = Vec::new();
        for i in 0..group.sources.len() {
            let id = group.sources[(turn + i) % group.sources.len()];
            let Some(peer) = self.peer(id) else {
                failures.push(format!("participant {id}: address not known yet"));
                continue;
            };
            let answer = peer
                .call(|c: ParticipantServiceClient| {
                    let (partitions, start) = (group.partitions.clone(), start.to_vec());
                    async move {
                        c.snapshot(
                            rpc::deadline(Duration::from_secs(10)),
                            cluster,
                            partitions,
                            start,
                            placement_version,
                        )
                        .await
                    }
                })
                .await;
            match answer {
                Ok(chunk) if chunk.digest() == chunk.checksum => return Ok(chunk),
                Ok(_) => failures.push(format!("participant {id}: the chunk's checksum does not match")),
                Err(e) => failures.push(format!("participant {id}: {e}")),
            }
        }
        Err(Error::Unavailable(format!(
            "no replica could send a snapshot chunk ({}); the install resumes when one can",
            failures.join("; ")
        )))
    }

    /// Installs (or resumes installing) a snapshot of this replica's keys
    /// (see the module docs); afterwards the core starts over at the
    /// snapshot's index and the log replay goes on from there.
    async fn install_snapshot(&self) -> Result<()> {
        let (cluster, placement) = {
            let standing = self.standing.lock().unwrap();
            (standing.cluster(), standing.placement())
        };
        let (Some(cluster), Some(placement)) = (cluster, placement) else {
            return Err(Error::NotReady("the cluster and placement are not known yet".into()));
        };
        let participants: Vec<u64> = self.peers.lock().unwrap().keys().copied().collect();
        let plan = snapshot_plan(&placement, self.id, &participants);
        // No apply may run over the copy (see `applier`).
        let _applying = self.applying.lock().await;
        self.installing.store(true, Ordering::Release);
        let store = self.store.clone();
        let mut at = match store.install()? {
            Some(at) => {
                info!(group = at.group, of = plan.len(), "resuming a snapshot install");
                at
            }
            None => store.begin_install()?,
        };
        let started = Instant::now();
        let mut turn = self.id as usize;
        while at.group < plan.len() {
            let group = &plan[at.group];
            let chunk = self.snapshot_chunk(cluster, group, &at.next, turn, placement.spec().version).await?;
            turn += 1;
            let mut next = at.clone();
            next.low = next.low.min(chunk.index);
            next.high = next.high.max(chunk.index);
            match &chunk.next {
                Some(key) => next.next = key.clone(),
                None => {
                    next.group += 1;
                    next.next = Vec::new();
                }
            }
            let (store, placement, group, start) = (store.clone(), placement.clone(), group.clone(), at.next.clone());
            let n = chunk.entries.len() as u64;
            let progress = next.clone();
            tokio::task::spawn_blocking(move || {
                let keep = |k: &[u8]| group.keeps(&placement, k);
                store.install_chunk(&start, chunk.next.as_deref(), &chunk.entries, keep, &progress)
            })
            .await
            .expect("install task panicked")?;
            self.install_keys.fetch_add(n, Ordering::Relaxed);
            crash_point!("participant::mid_install");
            at = next;
        }
        if plan.is_empty() {
            // Nothing to copy (no partitions here yet, in a partitioned
            // cluster): an empty replica is every index's state.
            let last = self.standing.lock().unwrap().cluster_last();
            at.low = at.low.min(last);
            at.high = at.high.max(last);
        }
        store.finish_install(&at)?;
        let low = store.applied_index()?;
        let prepared = store.prepared()?;
        *self.core.lock().unwrap() = ReplicaCore::recover(low, prepared);
        *self.recent.lock().unwrap() = RecentWrites::new(RECENT_WRITES, low);
        self.consistent_from.store(store.consistent_from()?, Ordering::Release);
        self.installing.store(false, Ordering::Release);
        info!(
            keys = self.install_keys.swap(0, Ordering::Relaxed),
            groups = plan.len(),
            from_index = low,
            consistent_at = at.high,
            ms = started.elapsed().as_millis() as u64,
            "installed a snapshot; replaying the log from its index"
        );
        self.bump();
        self.catch_up.notify_one();
        Ok(())
    }
}

/// Participant ids as a list for messages: `1, 3, 4`.
fn list(ids: &[u64]) -> String {
    ids.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
}

/// One connection's view of the participant: who is calling decides what it
/// may do (see `treaty_common::rpc`).
#[derive(Clone)]
struct Server {
    node: Arc<Node>,
    caller: Caller,
}

impl ParticipantService for Server {
    async fn prepare(self, _: Context, batch: PrepareBatch) -> Result<Vec<Result<Vote>>> {
        self.caller.require_coordinator("PREPARE")?;
        self.node.rpcs.fetch_add(1, Ordering::Relaxed);
        treaty_metrics::hot::messages().increment(1);
        self.node.refuse_while_installing()?;
        self.node.prepare(batch).await
    }

    async fn decide(
        self,
        _: Context,
        cluster: ClusterId,
        from: Incarnation,
        commits: Vec<(TxnId, u64)>,
        aborts: Vec<(TxnId, u64)>,
        skips: Vec<(TxnId, u64)>,
    ) -> Result<()> {
        self.caller.require_coordinator("COMMIT and ABORT")?;
        self.node.rpcs.fetch_add(1, Ordering::Relaxed);
        treaty_metrics::hot::messages().increment(1);
        self.node.refuse_while_installing()?;
        let checked = self.node.standing.lock().unwrap().check_decide(cluster, from);
        self.node.checked(checked)?;
        self.node.decide(commits, aborts, skips)
    }

    async fn coordinator_addr(self, _: Context) -> String {
        self.node.coordinator.addr.clone()
    }

    async fn get(self, _: Context, key: Key, stale: bool) -> Result<Option<Versioned>> {
        self.node.get(key, stale).await
    }

    async fn range(self, _: Context, req: RangeRequest) -> Result<RangePage> {
        self.node.range(req).await
    }

    async fn range_part(
        self,
        _: Context,
        req: RangeRequest,
        cover: Vec<u64>,
        as_of: u64,
        placement_version: u64,
    ) -> Result<RangePart> {
        self.caller.require_participant("a part of a range read across partitions")?;
        self.node.range_part(req, cover, as_of, placement_version).await
    }

    async fn snapshot(
        self,
        _: Context,
        cluster: ClusterId,
        partitions: Option<Vec<u32>>,
        start: Key,
        placement_version: u64,
    ) -> Result<SnapshotChunk> {
        self.caller.require_participant("a snapshot chunk")?;
        self.node.snapshot(cluster, partitions, start, placement_version).await
    }

    async fn submit(self, _: Context, txn: Txn) -> Result<Committed> {
        self.node.rpcs.fetch_add(1, Ordering::Relaxed);
        treaty_metrics::hot::messages().increment(1);
        txn.validate()?;
        let (result, sent) = self
            .node
            .coordinator
            .call_raw_sent(|c: CoordinatorServiceClient| {
                let txn = txn.clone();
                async move { c.submit(rpc::deadline(Duration::from_secs(20)), txn).await }
            })
            .await;
        match result {
            Ok(answer) => answer,
            // No connection to the coordinator could be opened: nothing
            // reached it, so nothing can have been committed.
            Err(Error::Unavailable(why)) if !sent => Err(Error::NotCommitted(format!(
                "{why}; the write never reached the coordinator, so it did not commit: retrying is safe"
            ))),
            Err(e) => Err(e),
        }
    }

    async fn trace(self, _: Context, txn_id: TxnId) -> Vec<TraceEvent> {
        self.node.trace.events(txn_id)
    }

    async fn ping(self, _: Context) -> u64 {
        self.node.replica
    }

    async fn node_status(self, _: Context) -> NodeStatus {
        self.node.status()
    }

    async fn txn_outcome(self, _: Context, txn_id: TxnId) -> Result<Outcome> {
        self.node
            .coordinator
            .call(|c: CoordinatorServiceClient| async move {
                c.outcome(rpc::deadline(Duration::from_secs(5)), txn_id).await
            })
            .await
    }

    async fn cluster_status(self, _: Context) -> Result<ClusterStatus> {
        let mut status = self
            .node
            .coordinator
            .call_infallible(|c: CoordinatorServiceClient| async move {
                c.status(rpc::deadline(Duration::from_secs(5))).await
            })
            .await?;
        // A coordinator listening on every interface reports 0.0.0.0:PORT,
        // which nobody can dial: show the address this participant uses.
        if status.coordinator.addr.parse::<std::net::SocketAddr>().is_ok_and(|a| a.ip().is_unspecified()) {
            status.coordinator.addr = self.node.coordinator.addr.clone();
        }
        Ok(status)
    }
}

/// The records of one PREPARE batch handed out by the core and not yet
/// reported written ([`ReplicaCore::logged`]). Reported once they are, or
/// when the request is dropped before (tarpc drops a request whose caller
/// gave up), so that an ABORT held back meanwhile is done either way.
struct Logging<'a> {
    node: &'a Node,
    records: Vec<PreparedRecord>,
    /// The records are in the WAL (those aborted meanwhile must be dropped).
    written: bool,
    /// The core has been told.
    reported: bool,
}

impl Logging<'_> {
    fn finish(&mut self) {
        if self.reported || self.records.is_empty() {
            return;
        }
        self.reported = true;
        let txns: Vec<TxnId> = self.records.iter().map(|r| r.txn_id).collect();
        let ended = self.node.core.lock().unwrap().logged(&txns);
        if !ended.is_empty() && self.written {
            self.node.store.forget_prepared(&ended).unwrap_or_else(|e| fatal_storage("dropping PREPARED records", e));
            debug!(count = ended.len(), "aborted while being logged");
        }
        // A PREPARE of the same transaction may be waiting for this.
        self.node.bump();
    }
}

impl Drop for Logging<'_> {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Runs a participant on `listener` until `shutdown` resolves. Returns an
/// error if the data directory or the cluster identity is wrong.
pub async fn run(listener: TcpListener, config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    if config.metrics.is_some() {
        // Before anything records (see `treaty_metrics::hot`).
        treaty_metrics::install();
    }
    let addr = listener.local_addr()?.to_string();
    let store = ReplicaStore::open(&config.data_dir, config.id)?;
    store.set_checkpoint_bytes(config.checkpoint_bytes);
    let applied = store.applied_index()?;
    let prepared = store.prepared()?;
    let cluster = store.cluster()?;
    let replica = store.replica_id()?;
    let following = store.following()?;
    let seen_index = store.seen_index()?;
    let installing = store.install()?.is_some();
    let consistent_from = store.consistent_from()?;
    if installing {
        warn!("a snapshot install was under way when this replica stopped: it resumes once the coordinator answers");
    }
    info!(
        id = config.id, %addr, applied, in_doubt = prepared.len(), data_dir = %config.data_dir.display(),
        replica = %format!("{replica:016x}"), "participant starting"
    );
    let core = ReplicaCore::recover(applied, prepared);
    let sync = GroupSync::start(store.durability().context("opening the data file for syncing")?);
    let (fatal_tx, mut fatal_rx) = mpsc::unbounded_channel();
    let node = Arc::new(Node {
        id: config.id,
        addr: addr.clone(),
        replica,
        standing: Mutex::new(ParticipantCore::new(
            config.id,
            replica,
            config.data_dir.display().to_string(),
            cluster,
            following,
            seen_index,
        )),
        origin: Instant::now(),
        store,
        core: Mutex::new(core),
        changed: watch::channel(0).0,
        apply_wake: Notify::new(),
        catch_up: Notify::new(),
        check_in: Notify::new(),
        sync,
        coordinator: Peer::new(
            format!("coordinator at {}", config.coordinator),
            config.coordinator.clone(),
            config.security.clone(),
            Expect::Coordinator,
        )
        .with_max_call(Duration::from_secs(21)),
        peers: Mutex::new(BTreeMap::new()),
        security: config.security.clone(),
        recent: Mutex::new(RecentWrites::new(RECENT_WRITES, applied)),
        applied_count: AtomicU64::new(0),
        rpcs: AtomicU64::new(0),
        tick: config.tick,
        fatal: fatal_tx,
        lock_wait: config.lock_wait,
        installing: AtomicBool::new(installing),
        install_keys: AtomicU64::new(0),
        consistent_from: AtomicU64::new(consistent_from),
        applying: tokio::sync::Mutex::new(()),
        trace: TraceRing::new(format!("participant {}", config.id)),
        pending_install: Mutex::new(None),
        installed_step: AtomicU64::new(0),
        moves_wake: Notify::new(),
    });
    tokio::spawn(node.clone().applier());
    tokio::spawn(node.clone().moves());
    tokio::spawn(node.clone().sync_loop(config.tick));
    let serve_config = ServeConfig {
        max_connections: config.max_connections,
        frame_timeout: config.frame_timeout,
        ..ServeConfig::new(config.security.clone(), format!("participant {} at {addr}", config.id))
    };
    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(metrics_addr) = &config.metrics {
        let listener = TcpListener::bind(metrics_addr)
            .await
            .with_context(|| format!("cannot serve metrics on {metrics_addr} (--metrics)"))?;
        info!(addr = %listener.local_addr()?, "serving metrics at /metrics");
        tokio::spawn(treaty_metrics::serve(listener, Default::default(), async move {
            let _ = metrics_stopped.await;
        }));
    }
    let (stop_redis, redis_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(redis_addr) = &config.redis {
        let redis = TcpListener::bind(redis_addr)
            .await
            .with_context(|| format!("cannot listen for Redis clients on {redis_addr} (--redis)"))?;
        info!(addr = %redis.local_addr()?, "serving the Redis protocol");
        // The door reaches the cluster as this participant, through itself
        // first and then the participants the coordinator named.
        let door_node = node.clone();
        let door = Arc::new(treaty_resp::Door::new(
            format!("participant {} at {addr}", config.id),
            config.security.clone(),
            move || {
                let mut endpoints = vec![door_node.addr.clone()];
                endpoints.extend(door_node.peers.lock().unwrap().values().map(|p| p.addr.clone()));
                endpoints
            },
        ));
        let cfg = ServeConfig {
            role: format!("the Redis door of participant {} at {}", config.id, redis.local_addr()?),
            ..serve_config.clone()
        };
        tokio::spawn(treaty_resp::serve(redis, door, cfg, async move {
            let _ = redis_stopped.await;
        }));
    }
    let server_node = node.clone();
    let accept = net::serve(
        listener,
        serve_config,
        move |io, caller| {
            let service = Server { node: server_node.clone(), caller }.serve();
            treaty_common::execute_channel!(io, service)
        },
        shutdown,
    );
    let result = tokio::select! {
        _ = accept => Ok(()),
        Some(msg) = fatal_rx.recv() => Err(anyhow::anyhow!(msg)),
    };
    let _ = stop_redis.send(());
    let _ = stop_metrics.send(());
    node.store.flush()?;
    info!(id = config.id, "participant stopped");
    result
}

//! `treaty-coordinator`: runs two-phase commit for every transaction.
//!
//! The protocol is [`CoordinatorCore`], a pure state machine (locks,
//! batched PREPAREs, votes, decisions, retries, view changes, fencing; see
//! its module docs). This crate is the I/O around it:
//!
//! * RPC handlers and timers feed the core inputs under one mutex
//!   ([`Coordinator::step`]) and carry out the actions it returns once the
//!   lock is released: PREPARE batches and outcomes go to participants on
//!   their own tasks, answers go to waiting submitters.
//! * The *persister* task writes each batch of decisions (log entries with
//!   their writes, and failed conditions) and makes it durable with one
//!   group sync before telling the core, which only then answers clients
//!   and sends COMMITs: persist before you speak.
//! * The *monitor* task ticks the core every 100 ms and pings participants.
//!
//! Participants pull what they miss (outcomes of transactions in doubt, log
//! entries) through `sync` and `fetch_log`, so outcome messages are
//! fire-and-forget and a restarted coordinator needs no resend loop: its
//! durable log is the truth.
//!
//! ## Fencing: a coordinator never contradicts the cluster
//! Each start is a new [`Incarnation`] (generation + 1, durable, with a
//! random nonce). Participants follow one incarnation and move to another
//! only through a check-in it verified; every PREPARE and COMMIT names its
//! incarnation. A check-in proves the coordinator's data is behind the
//! cluster's when the participant has seen a commit index beyond its log,
//! or holds undecided transactions prepared under an incarnation this
//! coordinator has no record of (which may have committed them): it was
//! restored from an old copy or damaged. It is then *fenced*: it refuses
//! writes, outcome lookups and log fetches, and says why and what to do.
//! After a start it decides nothing (writes wait; transactions in doubt are
//! "pending", never presumed aborted) until `n - min_replicas + 1`
//! participants have checked in without showing that: every commit was
//! prepared on at least `min_replicas` participants, so at least one of them
//! would have.
//!
//! Failpoints, in protocol order: `coordinator::before_prepare`,
//! `coordinator::before_decision`, `coordinator::before_decision_sync`,
//! `coordinator::after_decision_sync` (durable, nobody told),
//! `coordinator::after_first_commit` (participant 1 told, the rest not).
//! Moving partitions: `coordinator::before_placement_switch` (copies made,
//! the new placement not written), `coordinator::after_placement_switch`
//! (written and synced, not yet in effect).

pub mod cli;
mod observe;

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tarpc::context::Context;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use treaty_common::crash_point;
use treaty_common::net::{self, Caller, ServeConfig};
use treaty_common::protocol::{
    Action, CoordinatorCore, CoreConfig, Decisions, Membership, MembershipConfig, Outcomes, Placement, Retention,
    Roster, View, DEFAULT_PARTITIONS,
};
use treaty_common::rpc::{
    self, ClusterId, ClusterStatus, CoordinatorService, Incarnation, LogEntry, MemberChange, NodeStatus, Outcome,
    ParticipantServiceClient, Peer, PrepareBatch, SyncReply, SyncRequest, TraceEvent, TraceSummary,
};
use treaty_common::tls::{Expect, Security};
use treaty_common::trace::{Detail, TraceRing};
use treaty_common::{Committed, Error, Result, Txn, TxnId};
use treaty_storage::{CoordinatorStore, Decision, Durability};

/// Default of [`Config::retain_commits`].
pub const DEFAULT_RETAIN_COMMITS: u64 = 100_000;
/// Default of [`Config::retain_for`].
pub const DEFAULT_RETAIN_FOR: Duration = Duration::from_secs(10);

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
    /// PREPARE batches in flight per participant.
    pub prepare_pipeline: usize,
    /// Failure detection, leases and the minimum view size.
    pub membership: MembershipConfig,
    /// How many participants hold each key; `None`: as recorded when the
    /// cluster was created (a new cluster: every participant).
    pub replication: Option<usize>,
    /// The log keeps at least the newest this many commits' entries and
    /// decisions (see `treaty_core::protocol::Retention`) ...
    pub retain_commits: u64,
    /// ... and every commit younger than this.
    pub retain_for: Duration,
    /// TLS identity (the coordinator's certificate), or insecure.
    pub security: Security,
    /// Most connections this node accepts at once.
    pub max_connections: usize,
    /// How long one frame may take to arrive (see `treaty_common::net`).
    pub frame_timeout: Duration,
    /// Where Prometheus metrics and the status page are served
    /// (`--metrics`), if anywhere.
    pub metrics: Option<String>,
}

impl Config {
    pub fn new(data_dir: PathBuf, participants: Vec<String>, security: Security) -> Self {
        Config {
            data_dir,
            participants,
            prepare_timeout: Duration::from_secs(3),
            lock_timeout: Duration::from_secs(8),
            prepare_pipeline: 1,
            membership: MembershipConfig::default(),
            replication: None,
            retain_commits: DEFAULT_RETAIN_COMMITS,
            retain_for: DEFAULT_RETAIN_FOR,
            security,
            max_connections: net::DEFAULT_MAX_CONNECTIONS,
            frame_timeout: net::FRAME_TIMEOUT,
            metrics: None,
        }
    }
}

/// What the mutex guards: the protocol and who waits for its answers.
/// Both change together, so that a submission either joins a running
/// transaction or finds its durable decision in the store, never neither.
struct Protocol {
    core: CoordinatorCore,
    waiters: HashMap<TxnId, Vec<oneshot::Sender<Result<Committed>>>>,
}

struct Coordinator {
    cluster: ClusterId,
    /// This run (also in the core; kept here to name it without the lock).
    incarnation: Incarnation,
    addr: String,
    store: CoordinatorStore,
    /// Connections to the participants of the roster (removed ones
    /// dropped), by id.
    peers: RwLock<BTreeMap<u64, Arc<Peer<ParticipantServiceClient>>>>,
    /// The protocol (lock order: this before nothing else).
    protocol: Mutex<Protocol>,
    /// Decision batches for the persister task.
    persist: mpsc::UnboundedSender<Decisions>,
    /// Highest durable commit index (the core's, readable without its lock).
    last_index: AtomicU64,
    /// Transactions committed since start.
    committed: AtomicU64,
    /// Write-path RPCs (see [`NodeStatus::rpcs`]).
    rpcs: AtomicU64,
    /// Decision syncs since start (the persister's).
    syncs: AtomicU64,
    /// How far the log may be compacted, and how far it is.
    retention: Mutex<Retention>,
    compacted: AtomicU64,
    config: Config,
    clock: Instant,
    /// Recent traffic for the status page (see `observe`).
    observe: observe::Observer,
    /// Recent transactions' steps here, for `treaty trace`.
    trace: TraceRing,
}

fn fatal_storage(what: &str, e: Error) -> ! {
    error!(error = %e, "storage failure while {what}; aborting");
    eprintln!("treaty-coordinator: storage failure while {what}: {e}");
    std::process::abort()
}

impl Coordinator {
    fn now_ms(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    /// Feeds the core one input and carries out what it asks for.
    fn step<R>(self: &Arc<Self>, input: impl FnOnce(&mut CoordinatorCore, u64) -> R) -> R {
        let (result, actions, replies) = {
            let mut p = self.protocol.lock().unwrap();
            let now = self.now_ms();
            let result = input(&mut p.core, now);
            // Answers are matched with their waiters under the lock (see `Protocol`).
            let mut actions = Vec::new();
            let mut replies = Vec::new();
            for a in p.core.take_actions() {
                match a {
                    Action::Reply { txn, result } => {
                        let detail = match &result {
                            Ok(c) => Detail::Indexed("committed at index ", c.index),
                            Err(e) => e.to_string().into(),
                        };
                        self.trace.record(txn, "answered", detail);
                        replies.push((result, p.waiters.remove(&txn).unwrap_or_default()))
                    }
                    other => actions.push(other),
                }
            }
            (result, actions, replies)
        };
        for (result, waiters) in replies {
            if result.is_ok() {
                self.committed.fetch_add(1, Ordering::Relaxed);
            }
            observe::count(&result);
            for w in waiters {
                let _ = w.send(result.clone());
            }
        }
        self.execute(actions);
        result
    }

    fn execute(self: &Arc<Self>, actions: Vec<Action>) {
        // Every PREPARE of this step is traced before any is sent, so a
        // vote that comes back at once (on the other worker thread) never
        // appears before a prepare this step sends after it.
        for action in &actions {
            if let Action::Prepare { to, batch, items, .. } = action {
                let detail = format!("to participant {to} (batch {batch}, {} transaction(s))", items.len());
                self.trace.record_all(items.iter().map(|i| i.txn.id), "prepare sent", detail);
            }
        }
        let mut commits = Vec::new();
        for action in actions {
            match action {
                Action::Prepare { to, batch, epoch, replica, min_applied, placement_version, items } => {
                    let ids: Vec<TxnId> = items.iter().map(|i| i.txn.id).collect();
                    let req = PrepareBatch {
                        cluster: self.cluster,
                        coordinator: self.incarnation,
                        replica,
                        to,
                        epoch,
                        min_applied,
                        placement_version,
                        items,
                    };
                    self.rpcs.fetch_add(1, Ordering::Relaxed);
                    treaty_metrics::hot::messages().increment(1);
                    let me = self.clone();
                    tokio::spawn(async move {
                        crash_point!("coordinator::before_prepare");
                        let sent = Instant::now();
                        let timeout = me.config.prepare_timeout;
                        let answer = match me.peer(to) {
                            Some(peer) => {
                                peer.call(|c: ParticipantServiceClient| {
                                    let req = req.clone();
                                    async move { c.prepare(rpc::deadline(timeout), req).await }
                                })
                                .await
                            }
                            None => Err(Error::Unavailable(format!("participant {to} is no longer in the cluster"))),
                        };
                        let took = sent.elapsed();
                        treaty_metrics::hot::prepare_seconds().record(took.as_secs_f64());
                        let ms = took.as_secs_f64() * 1000.0;
                        match &answer {
                            Ok(votes) => {
                                let text = |v: &str| Detail::from(format!("participant {to}: {v}, {ms:.2} ms"));
                                // One shared text for the batch's YES votes.
                                let mut yes: Option<Detail> = None;
                                for (id, vote) in ids.iter().zip(votes) {
                                    let detail = match vote {
                                        Ok(treaty_common::rpc::Vote::Yes) => {
                                            yes.get_or_insert_with(|| text("yes")).clone()
                                        }
                                        Ok(treaty_common::rpc::Vote::No(why)) => text(&format!("no ({why})")),
                                        Err(e) => text(&format!("error ({e})")),
                                    };
                                    me.trace.record(*id, "vote received", detail);
                                }
                            }
                            Err(e) => me.trace.record_all(
                                ids.iter().copied(),
                                "vote received",
                                format!("participant {to}: failed after {ms:.2} ms ({e})"),
                            ),
                        }
                        me.step(|core, now| core.prepared(to, batch, answer, now));
                    });
                }
                Action::Persist { commits, aborts } => {
                    for e in &commits {
                        self.trace.record(e.txn_id, "decided", Detail::Indexed("commit at index ", e.index));
                    }
                    for (txn, reason) in &aborts {
                        self.trace.record(*txn, "decided", format!("abort: {reason}"));
                    }
                    if self.persist.send((commits, aborts)).is_err() {
                        warn!("the persister stopped; decisions are not being made durable");
                    }
                }
                Action::Decide { to, commits: c, aborts, skips } if !c.is_empty() || !skips.is_empty() => {
                    commits.push((to, c, aborts, skips))
                }
                Action::Decide { to, commits: _, aborts, skips: _ } => {
                    self.send_decide(vec![(to, vec![], aborts, vec![])], false)
                }
                Action::PersistView(view, roster) => {
                    let me = self.clone();
                    tokio::spawn(async move {
                        let t0 = Instant::now();
                        let store = me.store.clone();
                        let (v, r) = (view.clone(), roster.clone());
                        let r = tokio::task::spawn_blocking(move || store.set_membership(&v, &r))
                            .await
                            .expect("set_membership task");
                        if let Err(e) = r {
                            fatal_storage("recording a view change", e);
                        }
                        me.set_peers(&roster);
                        info!(
                            epoch = view.epoch, members = ?view.members, replicas = view.replicas.len(),
                            persist_ms = t0.elapsed().as_secs_f64() * 1000.0, "view changed"
                        );
                        me.step(|core, now| core.view_persisted(now));
                    });
                }
                Action::PersistPlacement(spec) => {
                    let me = self.clone();
                    tokio::spawn(async move {
                        let t0 = Instant::now();
                        let store = me.store.clone();
                        let s = spec.clone();
                        crash_point!("coordinator::before_placement_switch");
                        let r = tokio::task::spawn_blocking(move || store.set_placement(&s))
                            .await
                            .expect("set_placement task");
                        if let Err(e) = r {
                            fatal_storage("recording a move of partitions", e);
                        }
                        crash_point!("coordinator::after_placement_switch");
                        info!(
                            version = spec.version, moved = ?spec.previous.keys().collect::<Vec<_>>(),
                            persist_ms = t0.elapsed().as_secs_f64() * 1000.0, "partitions moved"
                        );
                        me.step(|core, now| core.placement_persisted(now));
                    });
                }
                Action::Reply { .. } => unreachable!("taken out in step"),
            }
        }
        if !commits.is_empty() {
            self.send_decide(commits, true);
        }
    }

    /// Sends outcomes; for commits, the first participant hears first and
    /// the rest after (the `after_first_commit` failpoint sits between).
    fn send_decide(self: &Arc<Self>, mut batches: Vec<Outcomes>, commits: bool) {
        let mut told: BTreeMap<(TxnId, &'static str), Vec<u64>> = BTreeMap::new();
        for (to, c, a, _) in &batches {
            for (txn, _) in c {
                told.entry((*txn, "COMMIT sent")).or_default().push(*to);
            }
            for (txn, _) in a {
                told.entry((*txn, "ABORT sent")).or_default().push(*to);
            }
        }
        // Transactions sent to the same participants share one text.
        let mut texts: HashMap<Vec<u64>, Detail> = HashMap::new();
        for ((txn, step), to) in told {
            let detail = texts.entry(to).or_insert_with_key(|to| {
                let list: Vec<String> = to.iter().map(u64::to_string).collect();
                format!("to participants {}", list.join(", ")).into()
            });
            self.trace.record(txn, step, detail.clone());
        }
        self.rpcs.fetch_add(batches.len() as u64, Ordering::Relaxed);
        treaty_metrics::hot::messages().increment(batches.len() as u64);
        let me = self.clone();
        tokio::spawn(async move {
            let cluster = me.cluster;
            let inc = me.incarnation;
            let send = |(to, commits, aborts, skips): Outcomes| {
                let peer = me.peer(to);
                async move {
                    let Some(peer) = peer else { return };
                    let r = peer
                        .call(|c: ParticipantServiceClient| {
                            let (commits, aborts, skips) = (commits.clone(), aborts.clone(), skips.clone());
                            async move {
                                c.decide(rpc::deadline(Duration::from_secs(2)), cluster, inc, commits, aborts, skips)
                                    .await
                            }
                        })
                        .await;
                    if let Err(e) = r {
                        tracing::debug!(error = %e, peer = %peer.name, "outcome not delivered; the participant will ask");
                    }
                }
            };
            batches.sort_by_key(|b| b.0);
            let mut rest = batches.into_iter();
            if commits {
                if let Some(first) = rest.next() {
                    send(first).await;
                }
                crash_point!("coordinator::after_first_commit");
            }
            futures::future::join_all(rest.map(send)).await;
        });
    }

    /// A transaction's decision, if it has one that may be told: recorded
    /// and durable (a commit at or below the durable index), and no longer
    /// running (a decision being persisted belongs to its run).
    fn durable_decision(&self, core: &CoordinatorCore, txn_id: TxnId) -> Result<Option<Decision>> {
        if core.is_running(txn_id) {
            return Ok(None);
        }
        Ok(match self.store.decision(txn_id)? {
            Some(Decision::Committed(i)) if i > self.last_index.load(Ordering::Acquire) => None,
            d => d,
        })
    }

    async fn submit(self: &Arc<Self>, txn: Txn) -> Result<Committed> {
        self.rpcs.fetch_add(1, Ordering::Relaxed);
        treaty_metrics::hot::messages().increment(1);
        txn.validate()?;
        let started = Instant::now();
        self.trace.record(
            txn.id,
            "submitted",
            Detail::Shape { conditions: txn.conditions.len(), writes: txn.writes.len() },
        );
        let rx = {
            let mut p = self.protocol.lock().unwrap();
            if let Some(d) = self.durable_decision(&p.core, txn.id)? {
                return decision_result(d);
            }
            let (tx, rx) = oneshot::channel();
            p.waiters.entry(txn.id).or_default().push(tx);
            rx
        };
        self.step(|core, now| core.submit(txn, now));
        let result = rx.await.unwrap_or_else(|_| Err(Error::Unavailable("the coordinator is shutting down".into())));
        self.observe.answered(&result, started.elapsed());
        result
    }

    /// The connection to participant `id`, unless it was removed.
    fn peer(&self, id: u64) -> Option<Arc<Peer<ParticipantServiceClient>>> {
        self.peers.read().unwrap().get(&id).cloned()
    }

    /// Connects to participants added to the roster and drops removed ones.
    fn set_peers(&self, roster: &Roster) {
        let live = roster.live();
        let mut peers = self.peers.write().unwrap();
        peers.retain(|id, p| live.get(id) == Some(&p.addr));
        for (id, addr) in live {
            peers.entry(id).or_insert_with(|| Arc::new(participant_peer(&self.config, id, &addr)));
        }
    }

    /// An operator's membership change: checks that an added participant
    /// answers at its address as itself, queues the change, and returns
    /// once it is durable.
    async fn change_members(self: &Arc<Self>, change: MemberChange) -> Result<ClusterStatus> {
        if let MemberChange::Add { id, addr } = &change {
            if *id == 0 {
                return Err(Error::Invalid("participant ids start at 1".into()));
            }
            let port = addr.rsplit_once(':').filter(|(h, _)| !h.is_empty()).map(|(_, p)| p.parse::<u16>());
            if !matches!(port, Some(Ok(p)) if p > 0) {
                return Err(Error::Invalid(format!("{addr:?} is not a HOST:PORT address")));
            }
            let probe = participant_peer(&self.config, *id, addr);
            let known = self.protocol.lock().unwrap().core.membership().roster().state(*id).is_some();
            if !known {
                probe
                    .call_raw(|c: ParticipantServiceClient| async move {
                        c.ping(rpc::deadline(Duration::from_secs(3))).await
                    })
                    .await
                    .map_err(|e| {
                        Error::Unavailable(format!(
                            "participant {id} does not answer at {addr} ({e}): start it first (treaty-participant \
                             --id {id} --listen ADDR --data-dir DIR --coordinator {} with its certificate), then \
                             add it",
                            self.addr
                        ))
                    })?;
            }
        }
        let id = match &change {
            MemberChange::Add { id, .. } | MemberChange::Remove { id } => *id,
        };
        self.step(|core, _| core.change_members(&change))?;
        info!(?change, "membership change requested");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            {
                let p = self.protocol.lock().unwrap();
                if !p.core.membership().request_pending(id) && p.core.view_settled() {
                    break;
                }
            }
            if Instant::now() > deadline {
                return Err(Error::Unavailable(
                    "the change is still waiting for transactions in flight to finish; `treaty status` shows when \
                     it is made (asking again is safe)"
                        .into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        info!(?change, "membership change recorded");
        Ok(self.status().await)
    }

    fn sync(self: &Arc<Self>, caller: &Caller, req: SyncRequest) -> Result<SyncReply> {
        if let Some(id) = caller.require_participant("checking in (sync)")? {
            if id != req.node_id {
                return Err(Error::Denied(format!(
                    "this connection is authenticated as participant {id} but checked in as participant {}: each \
                     participant must use its own certificate",
                    req.node_id
                )));
            }
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
        let me = self.clone();
        self.step(move |core, now| {
            let was_fenced = core.is_fenced();
            core.set_installing(req.node_id, req.installing);
            core.installed(req.node_id, req.replica, req.installed);
            let grant = core.on_sync(
                req.node_id,
                req.replica,
                req.coordinator,
                req.seen_index,
                req.undecided,
                req.applied_index,
                req.in_doubt.len(),
                now,
            );
            if !was_fenced && core.is_fenced() {
                error!(participant = req.node_id, "FENCED: this coordinator's log is behind the cluster's");
            }
            let grant = grant?;
            let mut outcomes = Vec::with_capacity(req.in_doubt.len());
            for (txn_id, attempt) in req.in_doubt {
                let outcome = match me.durable_decision(core, txn_id)? {
                    Some(Decision::Committed(i)) => Outcome::Committed(i),
                    Some(Decision::Aborted(_)) => Outcome::Aborted,
                    // Presumed abort only once the log is known complete.
                    None => core.outcome_without_record(txn_id)?,
                };
                outcomes.push((txn_id, attempt, outcome));
            }
            Ok(SyncReply {
                cluster: me.cluster,
                coordinator: core.incarnation(),
                last_index: core.last_index(),
                outcomes,
                epoch: core.membership().view().epoch,
                member: grant.member,
                lease_ms: grant.lease_ms,
                min_applied: grant.min_applied,
                placement: core.placement().spec().clone(),
                participants: core.membership().participants(),
                install: core.install_for(req.node_id),
            })
        })
    }

    fn outcome(self: &Arc<Self>, txn_id: TxnId) -> Result<Outcome> {
        let p = self.protocol.lock().unwrap();
        p.core.check_fence()?;
        match self.durable_decision(&p.core, txn_id)? {
            Some(Decision::Committed(i)) => Ok(Outcome::Committed(i)),
            Some(Decision::Aborted(_)) => Ok(Outcome::Aborted),
            None => match p.core.outcome_without_record(txn_id)? {
                // No record may mean compacted away: say so to a client.
                Outcome::Aborted => match self.compacted.load(Ordering::Acquire) {
                    0 => Ok(Outcome::Aborted),
                    through => Ok(Outcome::Forgotten(through)),
                },
                o => Ok(o),
            },
        }
    }

    /// Compacts the log once a second as far as [`Retention`] allows, in
    /// steps of 10,000 entries (each a short blocking call).
    async fn compactor(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let last = self.last_index.load(Ordering::Acquire);
            let floor = self.protocol.lock().unwrap().core.membership().applied_floor();
            let cutoff = {
                let mut r = self.retention.lock().unwrap();
                let now = self.now_ms();
                r.observe(now, last);
                r.cutoff(now, last, floor)
            };
            let t0 = Instant::now();
            let from = self.compacted.load(Ordering::Acquire);
            while self.compacted.load(Ordering::Acquire) < cutoff {
                let store = self.store.clone();
                match tokio::task::spawn_blocking(move || store.compact(cutoff, 10_000)).await.expect("compact task") {
                    Ok(through) => self.compacted.store(through, Ordering::Release),
                    Err(e) => {
                        warn!(error = %e, "compacting the log failed; will retry");
                        break;
                    }
                }
            }
            let now = self.compacted.load(Ordering::Acquire);
            if now > from {
                self.step(|core, _| core.log_compacted(now));
                tracing::debug!(from, through = now, ms = t0.elapsed().as_millis() as u64, "compacted the log");
            }
        }
    }

    /// Failure detection and time: ticks the core and pings every
    /// participant (one ping in flight per participant).
    async fn monitor(self: Arc<Self>) {
        let tick = Duration::from_millis(100);
        let mut pinging: HashMap<u64, Arc<std::sync::atomic::AtomicBool>> = HashMap::new();
        loop {
            tokio::time::sleep(tick).await;
            let peers = self.peers.read().unwrap().clone();
            pinging.retain(|id, _| peers.contains_key(id));
            for (id, p) in peers {
                let flag = pinging.entry(id).or_default().clone();
                if flag.swap(true, Ordering::AcqRel) {
                    continue;
                }
                let me = self.clone();
                tokio::spawn(async move {
                    let replica = p
                        .call_raw(|c: ParticipantServiceClient| async move {
                            c.ping(rpc::deadline(Duration::from_millis(500))).await
                        })
                        .await
                        .ok();
                    me.step(|core, now| core.on_ping(id, replica, now));
                    flag.store(false, Ordering::Release);
                });
            }
            self.step(|core, now| core.tick(now));
            self.update_gauges();
        }
    }

    fn node_status(&self) -> NodeStatus {
        // Counts entries (O(log)): before taking the protocol lock.
        let log_entries = self.store.log_len().0 as u64;
        let p = self.protocol.lock().unwrap();
        let m = p.core.membership();
        NodeStatus {
            id: 0,
            role: "coordinator".into(),
            addr: self.addr.clone(),
            replica: 0,
            fenced: p.core.fence_status(),
            coordinator: Some(p.core.incarnation()),
            cluster: Some(self.cluster),
            applied_index: self.last_index.load(Ordering::Acquire),
            ready: m.check_writable().is_ok(),
            prepared: p.core.running() as u64,
            syncs: self.syncs.load(Ordering::Relaxed),
            commits: self.committed.load(Ordering::Relaxed),
            rpcs: self.rpcs.load(Ordering::Relaxed),
            epoch: m.view().epoch,
            member: true,
            lease_ms: None,
            in_doubt: Vec::new(),
            keys: 0,
            partitions: u64::from(p.core.placement().partitions()),
            compacted: self.compacted.load(Ordering::Acquire),
            log_entries,
            installing: None,
        }
    }

    async fn status(&self) -> ClusterStatus {
        let peers = self.peers.read().unwrap().clone();
        let statuses = futures::future::join_all(peers.iter().map(|(id, p)| async move {
            let s = p
                .call_infallible(|c: ParticipantServiceClient| async move {
                    c.node_status(rpc::deadline(Duration::from_secs(1))).await
                })
                .await;
            (*id, p.addr.clone(), s.map_err(|e| e.to_string()))
        }))
        .await;
        let (members, min_replicas, placement, roster, rebalance) = {
            let p = self.protocol.lock().unwrap();
            let m = p.core.membership();
            let placement = p.core.placement().spec().clone();
            let roster = m.roster().nodes.iter().map(|(id, e)| (*id, e.state)).collect();
            let members = m.view().members.iter().copied().collect();
            (members, m.config().min_replicas as u64, placement, roster, p.core.rebalance_status())
        };
        ClusterStatus {
            coordinator: self.node_status(),
            members,
            min_replicas,
            placement,
            participants: statuses,
            roster,
            rebalance,
        }
    }
}

fn decision_result(d: Decision) -> Result<Committed> {
    match d {
        Decision::Committed(index) => Ok(Committed { index }),
        Decision::Aborted(reason) => Err(Error::ConditionFailed(reason)),
    }
}

/// The persister: writes each batch of decisions and makes it durable with
/// one sync (it alone writes decisions, so there is nothing to group with),
/// then tells the core, which answers and sends COMMITs only then. It runs
/// on a thread of its own, inside the runtime's context so that what the
/// core asks for next can be spawned from it: a decision's write, sync and
/// answer cost no hand-off to a task and back.
fn persister(me: Arc<Coordinator>, mut durability: Durability, mut rx: mpsc::UnboundedReceiver<Decisions>) {
    while let Some((commits, aborts)) = rx.blocking_recv() {
        crash_point!("coordinator::before_decision");
        let started = Instant::now();
        let done: Vec<TxnId> = commits.iter().map(|e| e.txn_id).chain(aborts.iter().map(|a| a.0)).collect();
        let last = commits.last().map(|e| e.index);
        let after = last.unwrap_or_else(|| me.last_index.load(Ordering::Acquire));
        let written = (|| {
            me.store.record_commits(&commits)?;
            for (txn, reason) in &aborts {
                me.store.record_abort(*txn, reason, after)?;
            }
            crash_point!("coordinator::before_decision_sync");
            durability.sync()
        })();
        written.unwrap_or_else(|e| fatal_storage("recording decisions", e));
        me.syncs.fetch_add(1, Ordering::Relaxed);
        treaty_metrics::hot::syncs().increment(1);
        let took = started.elapsed();
        treaty_metrics::hot::decision_sync_seconds().record(took.as_secs_f64());
        let detail = format!("written and synced in {:.2} ms", took.as_secs_f64() * 1000.0);
        me.trace.record_all(done.iter().copied(), "decision durable", detail);
        crash_point!("coordinator::after_decision_sync");
        if let Some(last) = last {
            me.last_index.fetch_max(last, Ordering::AcqRel);
        }
        me.step(|core, now| core.persisted(now));
    }
}

/// One connection's view of the coordinator: who is calling decides what
/// it may do (see `treaty_common::rpc`).
#[derive(Clone)]
struct Server {
    coord: Arc<Coordinator>,
    caller: Caller,
}

impl CoordinatorService for Server {
    async fn submit(self, _: Context, txn: Txn) -> Result<Committed> {
        // The transaction runs in the core whether or not this future is
        // dropped (a client's deadline passing): it decides and cleans up.
        self.coord.submit(txn).await
    }

    async fn sync(self, _: Context, req: SyncRequest) -> Result<SyncReply> {
        self.coord.sync(&self.caller, req)
    }

    async fn fetch_log(
        self,
        _: Context,
        cluster: ClusterId,
        from: u64,
        max: u64,
        placement_version: u64,
    ) -> Result<Vec<LogEntry>> {
        self.caller.require_participant("fetching the decision log")?;
        if cluster != self.coord.cluster {
            return Err(Error::Identity(format!(
                "asked for the log of cluster {cluster}; this is {}",
                self.coord.cluster
            )));
        }
        self.coord.protocol.lock().unwrap().core.check_fence()?;
        // Only durable entries: one recorded but not yet synced could be
        // lost to a crash and its index reused.
        let last = self.coord.last_index.load(Ordering::Acquire);
        if from > last || from == 0 {
            return Ok(Vec::new());
        }
        let entries = self.coord.store.entries(from, max.min(4096).min(last - from + 1), 4 * 1024 * 1024)?;
        // Checked after the read: entries durable before a move cannot
        // write to the moved partitions under the new placement.
        let version = self.coord.protocol.lock().unwrap().core.placement().spec().version;
        if version > placement_version {
            return Err(Error::NotReady(format!(
                "partitions moved since this replica last checked in (placement version {version}, it knows \
                 {placement_version}): check in, then fetch again"
            )));
        }
        Ok(entries)
    }

    async fn status(self, _: Context) -> ClusterStatus {
        self.coord.status().await
    }

    async fn node_status(self, _: Context) -> NodeStatus {
        self.coord.node_status()
    }

    async fn outcome(self, _: Context, txn_id: TxnId) -> Result<Outcome> {
        self.coord.outcome(txn_id)
    }

    async fn change_members(self, _: Context, change: MemberChange) -> Result<ClusterStatus> {
        self.caller.require_admin("adding or removing participants")?;
        self.coord.change_members(change).await
    }

    async fn trace(self, _: Context, txn_id: TxnId) -> Vec<TraceEvent> {
        self.coord.trace.events(txn_id)
    }

    async fn slowest(self, _: Context, n: u32) -> Vec<TraceSummary> {
        self.coord.trace.slowest(n.min(1000) as usize, "submitted", "answered")
    }
}

/// The connection to participant `id` at `addr`.
fn participant_peer(config: &Config, id: u64, addr: &str) -> Peer<ParticipantServiceClient> {
    let max_call = config.prepare_timeout.max(Duration::from_secs(2)) + Duration::from_secs(1);
    let peer = Peer::new(
        format!("participant {id} at {addr}"),
        addr.to_string(),
        config.security.clone(),
        Expect::Participant(id),
    );
    peer.with_max_call(max_call).logging_reachability()
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
    if config.metrics.is_some() {
        // Before anything records (see `treaty_metrics::hot`).
        treaty_metrics::install();
    }
    let addr = listener.local_addr()?.to_string();
    let (store, cluster) = CoordinatorStore::open(&config.data_dir, &config.participants)?;
    let last = store.last_index()?;
    let (incarnation, history) = store.start_incarnation()?;
    info!(%addr, %cluster, last_index = last, %incarnation, participants = ?config.participants, "coordinator starting");
    let mut durability = store.durability()?;
    // What a killed process left written but unsynced is in the file now and
    // is about to be served as durable: make it so.
    durability.sync()?;
    let n = config.participants.len() as u64;
    let view = match store.view()? {
        Some(v) => v,
        None => {
            let v = View::initial(n);
            store.set_view(&v)?;
            v
        }
    };
    let roster = store.roster()?.unwrap_or_else(|| Roster::initial(&config.participants));
    info!(epoch = view.epoch, members = ?view.members, participants = ?roster.live(), "view restored");
    let (replication, partitions) = store.placement(config.replication, n as usize, DEFAULT_PARTITIONS)?;
    // Full copies: every participant of the roster (it changes with `treaty member`).
    let placement = if replication >= n as usize {
        let ids: Vec<u64> = roster.live().into_keys().collect();
        let live = ids.len();
        Placement::new(ids, live, partitions)
    } else {
        info!(replication, partitions, "keys are partitioned");
        match store.placement_spec()? {
            Some(spec) => Placement::from(spec),
            None => Placement::new((1..=n).collect(), replication, partitions),
        }
    };
    let mut core_config = CoreConfig::partitioned(placement, config.membership.min_replicas);
    core_config.prepare_timeout_ms = config.prepare_timeout.as_millis() as u64;
    core_config.lock_timeout_ms = config.lock_timeout.as_millis() as u64;
    core_config.max_in_flight = config.prepare_pipeline;
    let peers =
        roster.live().into_iter().map(|(id, addr)| (id, Arc::new(participant_peer(&config, id, &addr)))).collect();
    let mut membership = Membership::new(view, roster, config.membership, 0);
    membership.set_log_start(store.compacted_through()?);
    let core = CoordinatorCore::new(core_config, incarnation, history, membership, last);
    let serve_config = ServeConfig {
        max_connections: config.max_connections,
        frame_timeout: config.frame_timeout,
        ..ServeConfig::new(config.security.clone(), format!("the coordinator at {addr}"))
    };
    let (persist_tx, persist_rx) = mpsc::unbounded_channel();
    let compacted = store.compacted_through()?;
    let retention = Retention::new(config.retain_commits, config.retain_for.as_millis() as u64);
    let coord = Arc::new(Coordinator {
        cluster,
        incarnation,
        addr,
        store,
        peers: RwLock::new(peers),
        protocol: Mutex::new(Protocol { core, waiters: HashMap::new() }),
        persist: persist_tx,
        last_index: AtomicU64::new(last),
        committed: AtomicU64::new(0),
        rpcs: AtomicU64::new(0),
        syncs: AtomicU64::new(1),
        retention: Mutex::new(retention),
        compacted: AtomicU64::new(compacted),
        config,
        clock: Instant::now(),
        observe: observe::Observer::new(),
        trace: TraceRing::new("coordinator"),
    });
    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(metrics_addr) = coord.config.metrics.clone() {
        let metrics_listener = TcpListener::bind(&metrics_addr)
            .await
            .with_context(|| format!("cannot serve metrics on {metrics_addr} (--metrics)"))?;
        info!(addr = %metrics_listener.local_addr()?, "serving metrics at /metrics and the status page at /");
        tokio::spawn(coord.clone().sampler());
        tokio::spawn(treaty_metrics::serve(metrics_listener, observe::routes(coord.clone()), async move {
            let _ = metrics_stopped.await;
        }));
    }
    let (me, runtime) = (coord.clone(), tokio::runtime::Handle::current());
    std::thread::Builder::new()
        .name("persister".into())
        .spawn(move || {
            let _in_runtime = runtime.enter();
            persister(me, durability, persist_rx)
        })
        .context("starting the persister thread")?;
    tokio::spawn(coord.clone().monitor());
    tokio::spawn(coord.clone().compactor());
    let server_coord = coord.clone();
    net::serve(
        listener,
        serve_config,
        move |io, caller| {
            let service = Server { coord: server_coord.clone(), caller }.serve();
            treaty_common::execute_channel!(io, service)
        },
        shutdown,
    )
    .await;
    let _ = stop_metrics.send(());
    coord.store.flush()?;
    info!("coordinator stopped");
    Ok(())
}

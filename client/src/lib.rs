//! Treaty's Rust client.
//!
//! ```no_run
//! # async fn demo() -> treaty_client::Result<()> {
//! use treaty_client::{Client, Condition, Identity, Security};
//! let security = Security::tls("treaty-demo-data/certs".as_ref(), Identity::Client("admin".into()))
//!     .expect("the cluster's client certificate");
//! let client = Client::new(vec!["127.0.0.1:7001".into(), "127.0.0.1:7002".into()], security);
//! client.put(b"balance/alice", b"100").await?;
//! let committed = client
//!     .txn()
//!     .when(Condition::ValueEquals(b"balance/alice".to_vec(), b"100".to_vec()))
//!     .put(b"balance/alice", b"90")
//!     .put(b"balance/bob", b"10")
//!     .commit()
//!     .await?;
//! println!("committed at index {}", committed.index);
//! # Ok(()) }
//! ```
//!
//! Every connection is TLS 1.3 with a client certificate from the cluster's
//! CA ([`Security::tls`]); [`Security::Insecure`] only reaches clusters
//! started with `--insecure`.
//!
//! The client reads from participants (any of them: each serves reads
//! locally). Writes go straight to the coordinator, whose address the client
//! learns from a participant; where that address cannot be reached (a
//! container's internal name seen from the host), writes go through a
//! participant, which forwards them. If an endpoint is unreachable or
//! still catching up, the next one is tried. A transaction keeps its id across
//! retries, so a retry after a timeout never applies twice. A write that
//! fails in a way that leaves its fate open (the coordinator lost between the
//! phases) is looked up before the error is returned: if it committed, the
//! commit is returned; if that cannot be known yet, the error names the
//! transaction id and `treaty outcome ID`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use treaty_common::rpc::{self, ClusterStatus, CoordinatorServiceClient, NodeStatus, ParticipantServiceClient, Peer};
pub use treaty_common::rpc::{MemberChange, Outcome, TraceEvent, TraceSummary};
pub use treaty_common::tls::{Expect, Identity, Security};
pub use treaty_common::types::{prefix_end, RangeEntry, RangePage, RangeRequest, MAX_RANGE_LIMIT};
pub use treaty_common::{Committed, Condition, Error, Key, Result, Txn, TxnId, Value, Versioned, Write};

pub mod credentials;

/// How a read is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadMode {
    /// Sees every transaction committed before the read started (waits for
    /// prepared writes to the key to resolve).
    Linearizable,
    /// Whatever the replica has applied, immediately, even if it is behind.
    Stale,
}

/// A connection to a Treaty cluster through a list of participant endpoints.
pub struct Client {
    peers: Vec<Peer<ParticipantServiceClient>>,
    /// The coordinator, once learned (see the module docs).
    direct: std::sync::Mutex<Direct>,
    security: Security,
    current: AtomicUsize,
    timeout: Duration,
    retries: usize,
}

impl Client {
    /// A client for these participant endpoints (`host:port`), connecting
    /// with `security` (lazily, on first use).
    pub fn new(endpoints: Vec<String>, security: Security) -> Self {
        assert!(!endpoints.is_empty(), "at least one endpoint");
        Client {
            peers: endpoints
                .into_iter()
                .map(|e| {
                    Peer::new(format!("endpoint {e}"), e, security.clone(), Expect::AnyNode)
                        .with_max_call(Duration::from_secs(21))
                })
                .collect(),
            direct: std::sync::Mutex::new(Direct::Unknown),
            security,
            current: AtomicUsize::new(0),
            timeout: Duration::from_secs(20),
            retries: 3,
        }
    }

    /// How this client connects.
    pub fn security(&self) -> &Security {
        &self.security
    }

    /// Sets the per-request deadline (default 20 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        let peers = std::mem::take(&mut self.peers);
        self.peers = peers.into_iter().map(|p| p.with_max_call(timeout + Duration::from_secs(1))).collect();
        self
    }

    /// The endpoint requests currently go to.
    pub fn endpoint(&self) -> &str {
        &self.peers[self.current.load(Ordering::Relaxed) % self.peers.len()].addr
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.peers.iter().map(|p| p.addr.clone()).collect()
    }

    /// Runs `f` on the current endpoint, failing over to the next on
    /// connection failures and on "not ready" answers.
    async fn with_failover<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: Fn(ParticipantServiceClient) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<Result<T>, tarpc::client::RpcError>>,
    {
        self.with_failover_sent(f).await.0
    }

    /// Like [`Client::with_failover`], and also whether the request may have
    /// reached any endpoint (`false`: none could even be connected to).
    async fn with_failover_sent<T, F, Fut>(&self, f: F) -> (Result<T>, bool)
    where
        F: Fn(ParticipantServiceClient) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<Result<T>, tarpc::client::RpcError>>,
    {
        let n = self.peers.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut last_err = None;
        let mut sent_any = false;
        for i in 0..n {
            let idx = (start + i) % n;
            let (r, sent) = self.peers[idx].call_raw_sent(&f).await;
            sent_any |= sent;
            match r {
                Ok(Ok(v)) => {
                    self.current.store(idx, Ordering::Relaxed);
                    return (Ok(v), true);
                }
                Ok(Err(e @ Error::NotReady(_))) | Err(e) => last_err = Some(e),
                Ok(Err(e)) => {
                    self.current.store(idx, Ordering::Relaxed);
                    return (Err(e), true);
                }
            }
        }
        (Err(last_err.expect("at least one endpoint")), sent_any)
    }

    /// Reads a key linearizably. `Ok(None)` means the key does not exist.
    pub async fn get(&self, key: &[u8]) -> Result<Option<Versioned>> {
        self.get_with(key, ReadMode::Linearizable).await
    }

    pub async fn get_with(&self, key: &[u8], mode: ReadMode) -> Result<Option<Versioned>> {
        treaty_common::types::check_key(key)?;
        let timeout = self.timeout;
        self.with_failover(|c| {
            let key = key.to_vec();
            async move { c.get(rpc::deadline(timeout), key, mode == ReadMode::Stale).await }
        })
        .await
    }

    /// One page of a range read, from any replica (see [`RangeRequest`]).
    pub async fn range_page(&self, req: &RangeRequest) -> Result<RangePage> {
        req.check()?;
        let timeout = self.timeout;
        self.with_failover(|c| {
            let req = req.clone();
            async move { c.range(rpc::deadline(timeout), req).await }
        })
        .await
    }

    /// A whole range, page by page (`req.limit` entries per page), at most
    /// `total` entries in all if given. Memory is bounded by one page. Each
    /// page is one consistent state (its [`RangePage::index`]); a range of
    /// several pages is not a snapshot: later pages may show later commits.
    pub fn range(&self, req: RangeRequest, total: Option<u64>) -> Pages<'_> {
        Pages { client: self, req, left: total, done: false }
    }

    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<Committed> {
        self.commit(Txn::new(vec![], vec![Write::Put(key.to_vec(), value.to_vec())])).await
    }

    pub async fn delete(&self, key: &[u8]) -> Result<Committed> {
        self.commit(Txn::new(vec![], vec![Write::Delete(key.to_vec())])).await
    }

    /// Compare-and-swap: sets `key` to `new` if it currently holds `expected`
    /// (`None`: if it is missing).
    pub async fn cas(&self, key: &[u8], expected: Option<&[u8]>, new: &[u8]) -> Result<Committed> {
        let cond = match expected {
            Some(v) => Condition::ValueEquals(key.to_vec(), v.to_vec()),
            None => Condition::Missing(key.to_vec()),
        };
        self.commit(Txn::new(vec![cond], vec![Write::Put(key.to_vec(), new.to_vec())])).await
    }

    /// Starts building a transaction.
    pub fn txn(&self) -> TxnBuilder<'_> {
        TxnBuilder { client: self, txn: Txn::new(vec![], vec![]) }
    }

    /// The coordinator to submit to directly, learning its address from a
    /// participant the first time; `None` while it is known to be
    /// unreachable from here (asked again after [`DIRECT_RETRY`]).
    async fn coordinator(&self) -> Option<std::sync::Arc<Peer<CoordinatorServiceClient>>> {
        match &*self.direct.lock().unwrap() {
            Direct::Known(p) => return Some(p.clone()),
            Direct::Unusable(since) if since.elapsed() < DIRECT_RETRY => return None,
            _ => {}
        }
        let timeout = self.timeout.min(Duration::from_secs(2));
        let addr = self
            .with_failover(|c| async move { c.coordinator_addr(rpc::deadline(timeout)).await.map(Ok) })
            .await
            .ok()?;
        let peer = std::sync::Arc::new(
            Peer::new(format!("coordinator at {addr}"), addr, self.security.clone(), Expect::Coordinator)
                .with_max_call(self.timeout + Duration::from_secs(1)),
        );
        *self.direct.lock().unwrap() = Direct::Known(peer.clone());
        Some(peer)
    }

    /// Submits once: to the coordinator directly, or through a participant
    /// if the coordinator cannot be reached from here. Also says whether
    /// the request may have reached anyone.
    async fn submit_once(&self, txn: &Txn) -> (Result<Committed>, bool) {
        let timeout = self.timeout;
        if let Some(coordinator) = self.coordinator().await {
            let (r, sent) = coordinator
                .call_raw_sent(|c: CoordinatorServiceClient| {
                    let txn = txn.clone();
                    async move { c.submit(rpc::deadline(timeout), txn).await }
                })
                .await;
            match r {
                Ok(answer) => return (answer, true),
                Err(e) if sent => return (Err(e), true),
                // Not reachable from here: go through a participant (which
                // may reach it, or says that it cannot).
                Err(_) => *self.direct.lock().unwrap() = Direct::Unusable(std::time::Instant::now()),
            }
        }
        self.with_failover_sent(|c| {
            let txn = txn.clone();
            async move { c.submit(rpc::deadline(timeout), txn).await }
        })
        .await
    }

    /// Submits a transaction. Retryable failures (conflicts, a briefly
    /// unreachable node) are retried a few times under the same id.
    pub async fn commit(&self, txn: Txn) -> Result<Committed> {
        txn.validate()?;
        let mut attempt = 0;
        let mut sent_any = false;
        loop {
            let (r, sent) = self.submit_once(&txn).await;
            sent_any |= sent;
            match r {
                Err(Error::Conflict(_)) | Err(Error::InDoubt(_)) if attempt < self.retries => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(20 << attempt)).await;
                }
                // No endpoint could even be connected to: nothing was sent.
                Err(Error::Unavailable(why)) if !sent_any => {
                    return Err(Error::NotCommitted(format!(
                        "{why}; the write reached no endpoint, so it did not commit: retrying is safe"
                    )))
                }
                Err(e @ (Error::Unavailable(_) | Error::InDoubt(_))) => return self.settle(txn.id, e).await,
                other => return other,
            }
        }
    }

    /// After a failure that may have happened once the transaction reached
    /// the coordinator (a lost connection, a crash between the phases), asks
    /// what became of it: a commit is reported as one; otherwise the error
    /// says whether the transaction may still commit and how to find out.
    async fn settle(&self, id: TxnId, e: Error) -> Result<Committed> {
        let note = match self.outcome(id).await {
            Ok(Outcome::Committed(index)) => return Ok(Committed { index }),
            // Not committed and not running: a retry under the same id is safe.
            Ok(Outcome::Aborted) => return Err(e),
            Ok(Outcome::Pending) => {
                format!("transaction {id} is still running and may yet commit: `treaty outcome {id}` tells which")
            }
            Ok(o @ Outcome::Forgotten(_)) => format!("transaction {id}: {o}"),
            Err(_) => format!(
                "transaction {id} may or may not have committed: `treaty outcome {id}` tells which once the \
                 coordinator is reachable"
            ),
        };
        Err(match e {
            Error::Unavailable(m) => Error::Unavailable(format!("{m}; {note}")),
            Error::InDoubt(m) => Error::InDoubt(format!("{m}; {note}")),
            other => other,
        })
    }

    /// What became of a transaction id: committed (with its index), not
    /// committed and not running (`Aborted`: resubmitting the same id is
    /// safe), or still running (`Pending`). Useful after a timeout.
    pub async fn outcome(&self, txn_id: TxnId) -> Result<Outcome> {
        let timeout = self.timeout.min(Duration::from_secs(5));
        self.with_failover(|c| async move { c.txn_outcome(rpc::deadline(timeout), txn_id).await }).await
    }

    /// Every step of a transaction that the coordinator and this client's
    /// endpoints still remember (each keeps a bounded ring of recent
    /// events in memory), in time order. Nodes that do not answer are left
    /// out; `Err` only if none answered.
    pub async fn trace(&self, txn_id: TxnId) -> Result<Vec<TraceEvent>> {
        let timeout = self.timeout.min(Duration::from_secs(5));
        let from_coordinator = async {
            match self.coordinator().await {
                Some(c) => c.call_infallible(|c| async move { c.trace(rpc::deadline(timeout), txn_id).await }).await,
                None => Err(Error::Unavailable("the coordinator is not reachable from here".into())),
            }
        };
        let from_participants = futures::future::join_all(self.peers.iter().map(|p| {
            p.call_infallible(
                |c: ParticipantServiceClient| async move { c.trace(rpc::deadline(timeout), txn_id).await },
            )
        }));
        let (coordinator, participants) = futures::join!(from_coordinator, from_participants);
        let mut answered = false;
        let mut last_error = None;
        let mut events = Vec::new();
        for r in std::iter::once(coordinator).chain(participants) {
            match r {
                Ok(e) => {
                    answered = true;
                    events.extend(e);
                }
                Err(e) => last_error = Some(e),
            }
        }
        if !answered {
            return Err(last_error.unwrap_or_else(|| Error::Unavailable("no node answered".into())));
        }
        events.sort_by(|a, b| a.at_us.cmp(&b.at_us).then_with(|| a.node.cmp(&b.node)));
        Ok(events)
    }

    /// The `n` slowest transactions the coordinator remembers, slowest first.
    pub async fn slowest(&self, n: u32) -> Result<Vec<TraceSummary>> {
        let timeout = self.timeout.min(Duration::from_secs(5));
        match self.coordinator().await {
            Some(c) => c.call_infallible(|c| async move { c.slowest(rpc::deadline(timeout), n).await }).await,
            None => Err(Error::Unavailable(
                "the coordinator is not reachable from here: --last-slow asks it directly".into(),
            )),
        }
    }

    /// The whole cluster's status, as the coordinator sees it.
    pub async fn cluster_status(&self) -> Result<ClusterStatus> {
        let timeout = self.timeout.min(Duration::from_secs(5));
        self.with_failover(|c| async move { c.cluster_status(rpc::deadline(timeout)).await }).await
    }

    /// Adds or removes a participant (needs the client `admin`'s
    /// certificate). Talks to the coordinator directly and returns, once the
    /// change is durable, the cluster's status.
    pub async fn change_members(&self, change: MemberChange) -> Result<ClusterStatus> {
        let Some(coordinator) = self.coordinator().await else {
            return Err(Error::Unavailable(
                "cannot reach the coordinator from here (membership changes go to it directly); check that it \
                 runs and that its address, as the participants know it, is reachable from this machine"
                    .into(),
            ));
        };
        let timeout = Duration::from_secs(25);
        let coordinator =
            Peer::new(coordinator.name.clone(), coordinator.addr.clone(), self.security.clone(), Expect::Coordinator)
                .with_max_call(timeout + Duration::from_secs(5));
        coordinator
            .call_raw(|c: CoordinatorServiceClient| {
                let change = change.clone();
                async move { c.change_members(rpc::deadline(timeout), change).await }
            })
            .await?
    }

    /// The status of whichever node of this cluster answers at `addr` (not
    /// necessarily one of this client's endpoints).
    pub async fn node_status_at(&self, addr: &str) -> Result<NodeStatus> {
        let peer = Peer::<ParticipantServiceClient>::new(
            format!("node at {addr}"),
            addr.to_string(),
            self.security.clone(),
            Expect::AnyNode,
        );
        peer.call_raw(|c| async move { c.node_status(rpc::deadline(Duration::from_secs(3))).await }).await
    }

    /// Each endpoint's own status (works without the coordinator).
    pub async fn node_statuses(&self) -> Vec<(String, Result<NodeStatus>)> {
        let futs = self.peers.iter().map(|p| async move {
            let s = p.call_raw(|c| async move { c.node_status(rpc::deadline(Duration::from_secs(2))).await }).await;
            (p.addr.clone(), s)
        });
        futures::future::join_all(futs).await
    }
}

/// The pages of a range read, from [`Client::range`].
pub struct Pages<'a> {
    client: &'a Client,
    req: RangeRequest,
    left: Option<u64>,
    done: bool,
}

impl Pages<'_> {
    /// The next page, or `None` once the range (or the total) is done. A
    /// failed page can be asked for again.
    pub async fn next(&mut self) -> Option<Result<RangePage>> {
        if self.done || self.left == Some(0) {
            return None;
        }
        let mut req = self.req.clone();
        if let Some(left) = self.left {
            req.limit = req.limit.min(left.min(u32::MAX as u64) as u32);
        }
        let page = match self.client.range_page(&req).await {
            Ok(page) => page,
            Err(e) => return Some(Err(e)),
        };
        if let Some(left) = &mut self.left {
            *left -= page.entries.len() as u64;
        }
        match &page.next {
            Some(next) => self.req.start = next.clone(),
            None => self.done = true,
        }
        Some(Ok(page))
    }

    /// Where the rest of the range starts, once a total cut it short
    /// (`None`: the range is done, or was not read that far yet).
    pub fn continuation(&self) -> Option<&[u8]> {
        (!self.done && self.left == Some(0)).then_some(self.req.start.as_slice())
    }
}

/// How long a coordinator address that could not be reached is left alone
/// before the client tries it again (writes go through participants meanwhile).
pub const DIRECT_RETRY: Duration = Duration::from_secs(10);

/// Whether writes can go to the coordinator directly.
enum Direct {
    Unknown,
    Known(std::sync::Arc<Peer<CoordinatorServiceClient>>),
    /// Could not be reached, as of then.
    Unusable(std::time::Instant),
}

/// Builds a transaction: conditions first, then writes.
pub struct TxnBuilder<'a> {
    client: &'a Client,
    txn: Txn,
}

impl TxnBuilder<'_> {
    pub fn when(mut self, c: Condition) -> Self {
        self.txn.conditions.push(c);
        self
    }

    pub fn put(mut self, key: &[u8], value: &[u8]) -> Self {
        self.txn.writes.push(Write::Put(key.to_vec(), value.to_vec()));
        self
    }

    pub fn delete(mut self, key: &[u8]) -> Self {
        self.txn.writes.push(Write::Delete(key.to_vec()));
        self
    }

    pub fn build(self) -> Txn {
        self.txn
    }

    pub async fn commit(self) -> Result<Committed> {
        self.client.commit(self.txn).await
    }
}

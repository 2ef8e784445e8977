//! The wire: tarpc service definitions, the messages they carry, and the TCP
//! plumbing both servers and clients share.
//!
//! Every connection is TCP with `TCP_NODELAY` (without it pipelined calls
//! stall about 40 ms), length-delimited frames of at most [`MAX_FRAME`] bytes,
//! bincode inside. A connection whose first frame header is implausible (a
//! browser, `telnet`, random bytes) gets a one-line plain-text explanation and
//! is closed; the server keeps serving everyone else.

use std::future::Future;
use std::io;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tarpc::client::RpcError;
use tarpc::tokio_serde::formats::Bincode;
use tarpc::tokio_util::codec::length_delimited::LengthDelimitedCodec;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::error::{Error, Result};
use crate::types::{Committed, Key, Txn, TxnId, Versioned, Write};

/// Largest frame on any connection: a 4 MiB transaction plus headroom.
pub const MAX_FRAME: usize = 8 * 1024 * 1024;

/// Identifies one cluster; stored in every node's data directory so that a
/// directory from another cluster is refused instead of silently mixed in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ClusterId(pub u64);

impl std::fmt::Display for ClusterId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// PREPARE: check the conditions, lock the keys, log the writes durably, vote.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PrepareRequest {
    pub cluster: ClusterId,
    /// The participant id the coordinator believes it is talking to; a
    /// mismatch means swapped or duplicate ids and is refused.
    pub to: u64,
    /// The view's epoch; a participant refuses an epoch older than one it knows.
    pub epoch: u64,
    /// The participant must have applied up to here before it votes (its
    /// join index if it was readmitted).
    pub min_applied: u64,
    /// Unique per coordinator attempt at this transaction; an ABORT ends
    /// only the attempt it names, so a retry is never undone by a stale one.
    pub attempt: u64,
    pub txn: Txn,
}

/// A participant's vote. `No` carries the failing condition, rendered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Vote {
    Yes,
    No(String),
}

/// What the coordinator knows about a transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Committed(u64),
    /// No commit record and not running: it has not taken effect.
    Aborted,
    /// Still collecting votes: ask again later.
    Pending,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Committed(index) => write!(f, "committed at index {index}"),
            Outcome::Aborted => f.write_str("not committed (it has not taken effect)"),
            Outcome::Pending => f.write_str("still running: ask again shortly"),
        }
    }
}

/// One committed transaction as kept in the coordinator's decision log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    pub index: u64,
    pub txn_id: TxnId,
    pub writes: Vec<Write>,
}

/// A participant's periodic check-in with the coordinator: who it is, how far
/// it has applied, and which prepared transactions it is unsure about.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SyncRequest {
    pub node_id: u64,
    /// `None` until the participant has joined a cluster for the first time.
    pub cluster: Option<ClusterId>,
    pub applied_index: u64,
    /// Prepared, undecided transactions with the attempt that prepared them.
    pub in_doubt: Vec<(TxnId, u64)>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SyncReply {
    pub cluster: ClusterId,
    /// Highest commit index decided so far.
    pub last_index: u64,
    pub outcomes: Vec<(TxnId, u64, Outcome)>,
    pub epoch: u64,
    /// Whether the participant is in the current view.
    pub member: bool,
    /// A read lease of this many ms, counted from when the participant sent
    /// the request.
    pub lease_ms: Option<u64>,
    /// Apply up to here before voting or serving linearizable reads.
    pub min_applied: u64,
}

/// One node's own view of itself.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeStatus {
    /// 0 for the coordinator, 1..=N for participants.
    pub id: u64,
    pub role: String,
    pub addr: String,
    pub cluster: Option<ClusterId>,
    /// Participants: highest commit index applied. Coordinator: highest decided.
    pub applied_index: u64,
    /// Participants: caught up and serving reads and votes.
    pub ready: bool,
    /// Transactions prepared here and not yet applied or aborted.
    pub prepared: u64,
    /// Durable syncs (flush + fdatasync) since start; with `commits` this
    /// tells how many syncs one commit costs.
    pub syncs: u64,
    /// Transactions committed (coordinator) or applied (participant) since start.
    pub commits: u64,
    /// The view epoch this node knows.
    pub epoch: u64,
    /// Participants: in the view as far as it knows.
    pub member: bool,
    /// Participants: ms left on the read lease (`None`: holds none).
    pub lease_ms: Option<u64>,
    /// Transactions prepared here and undecided, with their age in ms.
    pub in_doubt: Vec<(TxnId, u64)>,
}

/// The whole cluster as the coordinator sees it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub coordinator: NodeStatus,
    /// Members of the current view (epoch in `coordinator.epoch`).
    pub members: Vec<u64>,
    pub min_replicas: u64,
    /// Participants in id order: their status, or why they did not answer.
    pub participants: Vec<(u64, String, Result<NodeStatus, String>)>,
}

/// The participant's service: the 2PC peer protocol plus the client API
/// (reads are served here; writes are forwarded to the coordinator).
#[tarpc::service]
pub trait ParticipantService {
    async fn prepare(req: PrepareRequest) -> Result<Vote>;
    async fn commit(cluster: ClusterId, txn_id: TxnId, index: u64) -> Result<()>;
    async fn abort(cluster: ClusterId, txn_id: TxnId, attempt: u64) -> Result<()>;
    /// Reads a key. `stale` skips the readiness and prepared-lock checks.
    async fn get(key: Key, stale: bool) -> Result<Option<Versioned>>;
    /// Submits a transaction; forwarded to the coordinator.
    async fn submit(txn: Txn) -> Result<Committed>;
    async fn node_status() -> NodeStatus;
    /// What became of a transaction id (forwarded to the coordinator).
    async fn txn_outcome(txn_id: TxnId) -> Result<Outcome>;
    /// The whole cluster's status, fetched from the coordinator.
    async fn cluster_status() -> Result<ClusterStatus>;
}

/// The coordinator's service.
#[tarpc::service]
pub trait CoordinatorService {
    async fn submit(txn: Txn) -> Result<Committed>;
    async fn sync(req: SyncRequest) -> Result<SyncReply>;
    /// Committed entries with index >= `from`, in order, at most `max` of them.
    async fn fetch_log(cluster: ClusterId, from: u64, max: u64) -> Result<Vec<LogEntry>>;
    async fn status() -> ClusterStatus;
    /// What became of a transaction id: `Committed(index)`, `Aborted` (no
    /// commit record and not running: it has not taken effect, and
    /// resubmitting the same id is safe), or `Pending` (still running).
    async fn outcome(txn_id: TxnId) -> Result<Outcome>;
    /// The coordinator's own status (cheap: asks nobody else).
    async fn node_status() -> NodeStatus;
}

/// A tarpc context whose deadline is `timeout` from now.
pub fn deadline(timeout: Duration) -> tarpc::context::Context {
    let mut ctx = tarpc::context::current();
    ctx.deadline = Instant::now() + timeout;
    ctx
}

/// Turns a transport-level failure into an error naming the peer.
pub fn rpc_error(peer: &str, e: RpcError) -> Error {
    match e {
        RpcError::DeadlineExceeded => Error::Unavailable(format!("{peer} did not answer in time")),
        RpcError::Shutdown => Error::Unavailable(format!("{peer} unreachable: connection closed")),
        other => Error::Unavailable(format!("{peer} unreachable: {other}")),
    }
}

fn codec() -> tarpc::tokio_util::codec::length_delimited::Builder {
    let mut b = LengthDelimitedCodec::builder();
    b.max_frame_length(MAX_FRAME);
    b
}

async fn connect_tcp(addr: &str, timeout: Duration) -> io::Result<TcpStream> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Connects to a participant.
pub async fn connect_participant(addr: &str, timeout: Duration) -> io::Result<ParticipantServiceClient> {
    let stream = connect_tcp(addr, timeout).await?;
    let transport = tarpc::serde_transport::new(codec().new_framed(stream), Bincode::default());
    Ok(ParticipantServiceClient::new(tarpc::client::Config::default(), transport).spawn())
}

/// Connects to the coordinator.
pub async fn connect_coordinator(addr: &str, timeout: Duration) -> io::Result<CoordinatorServiceClient> {
    let stream = connect_tcp(addr, timeout).await?;
    let transport = tarpc::serde_transport::new(codec().new_framed(stream), Bincode::default());
    Ok(CoordinatorServiceClient::new(tarpc::client::Config::default(), transport).spawn())
}

/// A client type that can open a connection to its server.
pub trait Connect: Clone + Send + Sync + 'static {
    fn connect(addr: &str) -> impl Future<Output = io::Result<Self>> + Send;
}

/// How long to wait for a TCP connection to a peer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

impl Connect for ParticipantServiceClient {
    fn connect(addr: &str) -> impl Future<Output = io::Result<Self>> + Send {
        connect_participant(addr, CONNECT_TIMEOUT)
    }
}

impl Connect for CoordinatorServiceClient {
    fn connect(addr: &str) -> impl Future<Output = io::Result<Self>> + Send {
        connect_coordinator(addr, CONNECT_TIMEOUT)
    }
}

/// A lazily connected, self-healing connection to one peer. A call on a
/// broken connection reconnects once and retries, so a peer's restart costs
/// no request; a peer that stays unreachable fails fast with its name.
pub struct Peer<C> {
    /// Human name for errors, e.g. `participant 3 at 127.0.0.1:7003`.
    pub name: String,
    pub addr: String,
    slot: tokio::sync::Mutex<Option<C>>,
    /// A hard bound on any one call, above every deadline its callers set:
    /// a connection wedged so badly that tarpc never reports the deadline
    /// (a peer that accepts bytes but never reads them) still gives up.
    max_call: Duration,
}

impl<C: Connect> Peer<C> {
    pub fn new(name: String, addr: String) -> Self {
        Peer { name, addr, slot: tokio::sync::Mutex::new(None), max_call: Duration::from_secs(30) }
    }

    /// Sets the hard bound on one call (see the field's docs).
    pub fn with_max_call(mut self, max_call: Duration) -> Self {
        self.max_call = max_call;
        self
    }

    async fn client(&self) -> Result<C> {
        let mut slot = self.slot.lock().await;
        if let Some(c) = &*slot {
            return Ok(c.clone());
        }
        let c =
            C::connect(&self.addr).await.map_err(|e| Error::Unavailable(format!("{} unreachable: {e}", self.name)))?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Calls `f` on the connection and returns the RPC's raw answer; the
    /// error is only about reaching the peer.
    pub async fn call_raw<R, F, Fut>(&self, f: F) -> Result<R>
    where
        F: Fn(C) -> Fut,
        Fut: Future<Output = Result<R, RpcError>>,
    {
        self.call_raw_sent(f).await.0
    }

    /// Like [`Peer::call_raw`], and also whether the request may have reached
    /// the peer (`false`: no connection could be opened, nothing was sent).
    pub async fn call_raw_sent<R, F, Fut>(&self, f: F) -> (Result<R>, bool)
    where
        F: Fn(C) -> Fut,
        Fut: Future<Output = Result<R, RpcError>>,
    {
        let mut retried = false;
        loop {
            let c = match self.client().await {
                Ok(c) => c,
                Err(e) => return (Err(e), retried),
            };
            let result = match tokio::time::timeout(self.max_call, f(c)).await {
                Ok(r) => r,
                Err(_) => {
                    *self.slot.lock().await = None;
                    return (Err(rpc_error(&self.name, RpcError::DeadlineExceeded)), true);
                }
            };
            match result {
                Ok(r) => return (Ok(r), true),
                Err(RpcError::DeadlineExceeded) => {
                    return (Err(rpc_error(&self.name, RpcError::DeadlineExceeded)), true)
                }
                Err(e) => {
                    *self.slot.lock().await = None;
                    if retried {
                        return (Err(rpc_error(&self.name, e)), true);
                    }
                    retried = true;
                }
            }
        }
    }

    /// Calls `f` on the connection; the RPC's own result is flattened in.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: Fn(C) -> Fut,
        Fut: Future<Output = Result<Result<T>, RpcError>>,
    {
        self.call_raw(f).await?
    }

    /// Like [`Peer::call`] for RPCs that cannot fail at the application level.
    pub async fn call_infallible<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: Fn(C) -> Fut,
        Fut: Future<Output = Result<T, RpcError>>,
    {
        self.call_raw(f).await
    }
}

const GARBAGE_REPLY: &[u8] = b"treaty: this port speaks Treaty's RPC protocol (length-delimited bincode over tarpc), \
not what was sent; use the `treaty` CLI or the treaty-client library. Closing.\n";

/// Waits for the first frame header and checks that it is plausible. Returns
/// false (after telling the peer why) for connections that are clearly not
/// speaking our protocol.
async fn first_frame_plausible(stream: &mut TcpStream) -> bool {
    let mut header = [0u8; 4];
    loop {
        match stream.peek(&mut header).await {
            Ok(0) | Err(_) => return false,
            Ok(n) if n < 4 => tokio::time::sleep(Duration::from_millis(2)).await,
            Ok(_) => break,
        }
    }
    let len = u32::from_be_bytes(header) as usize;
    if len == 0 || len > MAX_FRAME {
        let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        tracing::warn!(%peer, frame_len = len, "closing connection: not Treaty RPC (bad frame header)");
        let _ = stream.write_all(GARBAGE_REPLY).await;
        let _ = stream.shutdown().await;
        return false;
    }
    true
}

/// The server side of one connection, before tarpc takes it over.
pub type ServerTransport<Req, Resp> = tarpc::serde_transport::Transport<
    TcpStream,
    tarpc::ClientMessage<Req>,
    tarpc::Response<Resp>,
    Bincode<tarpc::ClientMessage<Req>, tarpc::Response<Resp>>,
>;

/// Runs one connection's requests concurrently on `service` until it closes.
/// (A macro because tarpc's `Serve` futures are only `Send` for concrete types.)
#[macro_export]
macro_rules! execute_channel {
    ($transport:expr, $service:expr) => {{
        use ::futures::StreamExt as _;
        use ::tarpc::server::Channel as _;
        ::tarpc::server::BaseChannel::with_defaults($transport).execute($service).for_each(|fut| async move {
            ::tokio::spawn(fut);
        })
    }};
}

/// Accepts connections until `shutdown` resolves and hands each plausible one
/// to `handle` on its own task.
pub async fn serve<Req, Resp, F, Fut>(listener: TcpListener, handle: F, shutdown: impl Future<Output = ()>)
where
    Req: for<'de> Deserialize<'de> + Send + 'static,
    Resp: Serialize + Send + 'static,
    F: Fn(ServerTransport<Req, Resp>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => return,
            a = listener.accept() => a,
        };
        let (mut stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let handle = handle.clone();
        tokio::spawn(async move {
            if first_frame_plausible(&mut stream).await {
                let transport = tarpc::serde_transport::new(codec().new_framed(stream), Bincode::default());
                handle(transport).await;
                tracing::debug!(%peer, "connection closed");
            }
        });
    }
}

//! The wire: tarpc service definitions and the messages they carry. How
//! connections are made, secured and bounded is in [`crate::net`].
//!
//! Who may call what (enforced by each server from the caller's
//! certificate, see [`crate::net::Caller`]):
//! * participant: `prepare`, `commit`, `abort` only from the coordinator;
//!   everything else from anyone authenticated.
//! * coordinator: `sync` and `fetch_log` only from participants (and `sync`
//!   only for the id the certificate names); `change_members` only from the
//!   client `admin`; everything else from anyone authenticated.

use crate::error::Result;
use crate::types::{Committed, Key, RangePage, RangeRequest, Txn, TxnId, Versioned};

pub use crate::net::{deadline, rpc_error, Peer, MAX_FRAME};
pub use treaty_core::messages::*;

/// The participant's service: the 2PC peer protocol plus the client API
/// (reads are served here; writes are forwarded to the coordinator).
#[tarpc::service]
pub trait ParticipantService {
    /// PREPARE a batch: one vote (or error) per item, in order.
    async fn prepare(batch: PrepareBatch) -> Result<Vec<Result<Vote>>>;
    /// Outcomes: `commits` as (txn, commit index), `aborts` as (txn,
    /// attempt), `skips` (commits touching none of this participant's
    /// partitions, so it passes over their indexes) as (txn, commit index).
    async fn decide(
        cluster: ClusterId,
        coordinator: Incarnation,
        commits: Vec<(TxnId, u64)>,
        aborts: Vec<(TxnId, u64)>,
        skips: Vec<(TxnId, u64)>,
    ) -> Result<()>;
    /// The coordinator's address as this participant knows it (clients
    /// submit there directly when they can reach it).
    async fn coordinator_addr() -> String;
    /// Reads a key. `stale` skips the readiness and prepared-lock checks.
    async fn get(key: Key, stale: bool) -> Result<Option<Versioned>>;
    /// One page of a range read (see [`RangeRequest`]); linearizable unless
    /// `stale`, and one consistent state of the replica either way.
    async fn range(req: RangeRequest) -> Result<RangePage>;
    /// A participant's part of a range page read across partitions: its
    /// keys in the range that it serves for `cover`, as of commit `as_of`
    /// (see `treaty_core::protocol::ranges`). Only from participants, and
    /// refused by one that knows another placement version than the asker.
    async fn range_part(req: RangeRequest, cover: Vec<u64>, as_of: u64, placement_version: u64) -> Result<RangePart>;
    /// One chunk of a snapshot for a replica re-seeding itself: this
    /// replica's keys of `partitions` (`None`: all) from `start` on, as of
    /// one applied index. Only from participants, and only from a replica
    /// that is caught up, holds those partitions and knows the asker's
    /// placement version.
    async fn snapshot(
        cluster: ClusterId,
        partitions: Option<Vec<u32>>,
        start: Key,
        placement_version: u64,
    ) -> Result<SnapshotChunk>;
    /// Submits a transaction; forwarded to the coordinator.
    async fn submit(txn: Txn) -> Result<Committed>;
    /// The coordinator's liveness probe (several times a second): answers
    /// this replica's data-directory id (see [`SyncRequest::replica`]).
    async fn ping() -> u64;
    /// This node's status, with its key count (which reads every key).
    async fn node_status() -> NodeStatus;
    /// What became of a transaction id (forwarded to the coordinator).
    async fn txn_outcome(txn_id: TxnId) -> Result<Outcome>;
    /// The whole cluster's status, fetched from the coordinator.
    async fn cluster_status() -> Result<ClusterStatus>;
    /// What this participant remembers of a transaction (`treaty trace`).
    async fn trace(txn_id: TxnId) -> Vec<TraceEvent>;
}

/// The coordinator's service.
#[tarpc::service]
pub trait CoordinatorService {
    async fn submit(txn: Txn) -> Result<Committed>;
    async fn sync(req: SyncRequest) -> Result<SyncReply>;
    /// Committed entries with index >= `from`, in order, at most `max` of
    /// them. Refused when partitions moved since `placement_version` (the
    /// asker keeps only its own keys' writes, so it must know the new
    /// placement first: it checks in and asks again).
    async fn fetch_log(cluster: ClusterId, from: u64, max: u64, placement_version: u64) -> Result<Vec<LogEntry>>;
    async fn status() -> ClusterStatus;
    /// What became of a transaction id: `Committed(index)`, `Aborted` (no
    /// commit record and not running: it has not taken effect, and
    /// resubmitting the same id is safe), or `Pending` (still running).
    async fn outcome(txn_id: TxnId) -> Result<Outcome>;
    /// The coordinator's own status (cheap: asks nobody else).
    async fn node_status() -> NodeStatus;
    /// Adds or removes a participant (only from client `admin`). Returns
    /// once the change is durable: an added participant is then joining
    /// (it catches up and enters the view by itself), a removed member is
    /// leaving (it is excluded once its read lease has run out).
    async fn change_members(change: MemberChange) -> Result<ClusterStatus>;
    /// What the coordinator remembers of a transaction (`treaty trace`).
    async fn trace(txn_id: TxnId) -> Vec<TraceEvent>;
    /// The `n` slowest transactions it remembers (`treaty trace --last-slow`).
    async fn slowest(n: u32) -> Vec<TraceSummary>;
}

crate::rpc_client!(ParticipantServiceClient);
crate::rpc_client!(CoordinatorServiceClient);

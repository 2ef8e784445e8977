//! The messages of Treaty's RPCs: plain data, no I/O. The services that
//! carry them (tarpc) are in `treaty_core::rpc`.

use serde::{Deserialize, Serialize};

use crate::types::{RangePage, Txn, TxnId, Write};

/// Identifies one cluster; stored in every node's data directory so that a
/// directory from another cluster is refused instead of silently mixed in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ClusterId(pub u64);

impl std::fmt::Display for ClusterId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// One run of the coordinator process over its data directory: the
/// generation counts starts (durably), the nonce is random per start. A
/// participant follows one incarnation at a time and only ever moves to a
/// higher generation, after a check-in the coordinator verified; so a
/// coordinator restarted from an older copy of its data (a restored backup,
/// a damaged disk) meets a participant that knows a newer or a different
/// incarnation, and is fenced off instead of contradicting it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Incarnation {
    pub generation: u64,
    pub nonce: u64,
}

impl std::fmt::Display for Incarnation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "generation {} ({:08x})", self.generation, self.nonce as u32)
    }
}

/// PREPARE for a batch of transactions: for each, check the conditions, lock
/// the keys and log the writes; make the whole batch durable with one sync;
/// answer one vote per transaction, in order.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PrepareBatch {
    pub cluster: ClusterId,
    /// The coordinator incarnation sending it; must be the one the
    /// participant follows.
    pub coordinator: Incarnation,
    /// The replica (data directory) the coordinator believes it is talking
    /// to; a different one at the participant's address refuses.
    pub replica: u64,
    /// The participant id the coordinator believes it is talking to; a
    /// mismatch means swapped or duplicate ids and is refused.
    pub to: u64,
    /// The view's epoch; a participant refuses an epoch older than one it knows.
    pub epoch: u64,
    /// The participant must have applied up to here before it votes (its
    /// join index if it was readmitted).
    pub min_applied: u64,
    /// The placement version the batch was planned with: a participant
    /// that knows an older one checks in first (see `PlacementSpec::version`).
    pub placement_version: u64,
    pub items: Vec<PrepareItem>,
}

/// One transaction of a [`PrepareBatch`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PrepareItem {
    /// Unique per coordinator attempt at this transaction; an ABORT ends
    /// only the attempt it names, so a retry is never undone by a stale one.
    pub attempt: u64,
    /// Shared, not copied, between the batches to every participant.
    pub txn: std::sync::Arc<Txn>,
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
    /// No record and not running, but decisions at or below this commit
    /// index were compacted away: it did not commit recently; one submitted
    /// before the retained window may have (the client API only; a
    /// participant in doubt gets `Aborted`, see docs/compaction.md).
    Forgotten(u64),
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Committed(index) => write!(f, "committed at index {index}"),
            Outcome::Aborted => f.write_str("not committed (it has not taken effect)"),
            Outcome::Pending => f.write_str("still running: ask again shortly"),
            Outcome::Forgotten(index) => write!(
                f,
                "no record: it did not commit recently, but decisions up to index {index} have been compacted, \
                 so one submitted longer ago may have committed (check the data it wrote)"
            ),
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
    /// This participant's data directory (random, made with it): tells a
    /// restarted replica from a new one, and two processes claiming one id apart.
    pub replica: u64,
    /// `None` until the participant has joined a cluster for the first time.
    pub cluster: Option<ClusterId>,
    /// The coordinator incarnation this participant follows (`None`: none yet).
    pub coordinator: Option<Incarnation>,
    /// The highest commit index this participant knows was decided (applied
    /// here, or announced by the coordinator it follows). A coordinator
    /// whose log ends below it has lost decisions.
    pub seen_index: u64,
    /// Prepared transactions here whose outcome is unknown, however recent
    /// (`in_doubt` lists only those old enough to ask about).
    pub undecided: u64,
    pub applied_index: u64,
    /// Prepared, undecided transactions with the attempt that prepared them.
    pub in_doubt: Vec<(TxnId, u64)>,
    /// Installing a snapshot: its data is no state of the cluster yet, so
    /// it cannot be admitted to the view.
    pub installing: bool,
    /// The step of the last [`PartitionInstall`] this replica finished
    /// (durably), 0 for none since it started.
    pub installed: u64,
}

/// Partitions a member is to copy before they move to it (see
/// docs/membership.md, "Moving partitions"): their writes are held back at
/// the coordinator since `as_of`, so any replica of theirs that has applied
/// `as_of` sends the same keys.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionInstall {
    /// Names this step of the rebalance (unique per coordinator run).
    pub step: u64,
    /// The placement version the move makes.
    pub version: u64,
    /// Apply up to here before copying; copy only from sources that have.
    pub as_of: u64,
    /// Each partition with the replicas to copy it from.
    pub partitions: Vec<(u32, Vec<u64>)>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SyncReply {
    pub cluster: ClusterId,
    /// Who answered: the participant follows it from now on.
    pub coordinator: Incarnation,
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
    /// Which participants hold which keys (fixed when the cluster was created).
    pub placement: crate::protocol::PlacementSpec,
    /// The participants' addresses by id (removed ones left out): a
    /// participant forwards reads of keys it does not hold to their
    /// replicas, and copies snapshots from them.
    pub participants: std::collections::BTreeMap<u64, String>,
    /// Partitions to copy here before they move to this participant.
    pub install: Option<PartitionInstall>,
}

/// An operator's change of the cluster's participants (`treaty member`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberChange {
    /// Admit participant `id`, reached at `addr`.
    Add { id: u64, addr: String },
    /// Remove participant `id` for good.
    Remove { id: u64 },
}

/// One participant's part of a range page read across partitions (see
/// `protocol::ranges`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RangePart {
    /// The part's keys, read at `page.index`.
    pub page: RangePage,
    /// No commit after the index asked for changed the keys the page
    /// covers: the page is also the state at that index. `false`: ask
    /// again as of `page.index` (the entries are left out).
    pub unchanged: bool,
}

/// One node's own view of itself.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeStatus {
    /// 0 for the coordinator, 1..=N for participants.
    pub id: u64,
    pub role: String,
    pub addr: String,
    /// Participants: the data directory's random id (see [`SyncRequest::replica`]).
    pub replica: u64,
    /// Coordinator: why it refuses to work (its log is behind the cluster's),
    /// or while it verifies its log after a start.
    pub fenced: Option<String>,
    /// Coordinator: its own incarnation. Participant: the one it follows.
    pub coordinator: Option<Incarnation>,
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
    /// Write-path RPCs since start, each a request and its answer.
    /// Coordinator: submits received, PREPARE batches and outcome messages
    /// sent. Participant: PREPARE batches and outcome messages received,
    /// submits forwarded. With `commits` this tells what batching saves.
    pub rpcs: u64,
    /// The view epoch this node knows.
    pub epoch: u64,
    /// Participants: in the view as far as it knows.
    pub member: bool,
    /// Participants: ms left on the read lease (`None`: holds none).
    pub lease_ms: Option<u64>,
    /// Transactions prepared here and undecided, with their age in ms.
    pub in_doubt: Vec<(TxnId, u64)>,
    /// Participants: keys stored here (counted at most 2 s ago). Coordinator: 0.
    pub keys: u64,
    /// Participants: partitions held here (0 until the placement is
    /// known). Coordinator: the cluster's partition count.
    pub partitions: u64,
    /// Coordinator: its log is compacted through this commit index (0:
    /// nothing was).
    pub compacted: u64,
    /// Coordinator: log entries it holds.
    pub log_entries: u64,
    /// Participant: while it installs a snapshot (it fell behind the
    /// compacted log, or its data was wiped), the keys copied so far.
    pub installing: Option<u64>,
}

/// One chunk of a snapshot (see `treaty_core::protocol::compaction`): the
/// source's keys of the asked partitions from the asked key on, all as of
/// its applied index `index`, and where the next chunk starts (`None`: the
/// last one). `checksum` covers the rest ([`SnapshotChunk::digest`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotChunk {
    pub index: u64,
    pub entries: Vec<crate::types::RangeEntry>,
    pub next: Option<crate::types::Key>,
    pub checksum: u64,
}

impl SnapshotChunk {
    pub fn new(index: u64, entries: Vec<crate::types::RangeEntry>, next: Option<crate::types::Key>) -> Self {
        let mut chunk = SnapshotChunk { index, entries, next, checksum: 0 };
        chunk.checksum = chunk.digest();
        chunk
    }

    /// FNV-1a (64 bit) over the index, every key, version and value (with
    /// their lengths), and the next key.
    pub fn digest(&self) -> u64 {
        let mut h = crate::protocol::Fnv1a::new();
        let mut eat = |bytes: &[u8]| h.eat(bytes);
        eat(&self.index.to_be_bytes());
        for e in &self.entries {
            eat(&(e.key.len() as u64).to_be_bytes());
            eat(&e.key);
            eat(&e.version.to_be_bytes());
            match &e.value {
                Some(v) => {
                    eat(&(v.len() as u64).to_be_bytes());
                    eat(v);
                }
                None => eat(&u64::MAX.to_be_bytes()),
            }
        }
        if let Some(n) = &self.next {
            eat(n);
        }
        h.finish()
    }
}

/// The whole cluster as the coordinator sees it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub coordinator: NodeStatus,
    /// Members of the current view (epoch in `coordinator.epoch`).
    pub members: Vec<u64>,
    pub min_replicas: u64,
    /// Which participants hold which keys.
    pub placement: crate::protocol::PlacementSpec,
    /// Participants in id order: their status, or why they did not answer.
    pub participants: Vec<(u64, String, Result<NodeStatus, String>)>,
    /// Every participant the cluster has had, removed ones included, and
    /// its place (joining and leaving are changes in progress).
    pub roster: Vec<(u64, crate::protocol::RosterState)>,
    /// Partitions moving between participants, in words (`None`: the
    /// placement is where it should be).
    pub rebalance: Option<String>,
}

/// One step of one transaction on one node, as `treaty trace` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceEvent {
    pub txn: TxnId,
    /// When, in microseconds since the Unix epoch on the node's clock.
    pub at_us: u64,
    /// Who: `coordinator` or `participant N` (filled in when answered).
    pub node: String,
    /// What, in a few fixed words (`submitted`, `prepare sent`, `voted`, ...).
    pub step: String,
    /// With what: the participant, the vote, the index, how long it took.
    pub detail: String,
}

/// A recent transaction the coordinator ran, for `treaty trace --last-slow`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceSummary {
    pub txn: TxnId,
    /// Submitted to answered, in microseconds.
    pub took_us: u64,
    /// The answer (`committed at index 12`, or the error).
    pub outcome: String,
}

//! The 2PC protocol as pure state machines: no tokio, sled or tarpc in here.
//!
//! * [`ReplicaCore`] is one participant's protocol state: key locks held by
//!   prepared transactions, decided commits waiting for their turn, and the
//!   applied index. Its methods take an input (a PREPARE, a COMMIT, an ABORT,
//!   "these indexes are now applied") and return what the I/O layer must do
//!   next. The I/O layer (`treaty-participant`) persists, syncs and replies.
//! * [`LockTable`] is the coordinator's per-key FIFO lock queue: transactions
//!   acquire their keys in key order, so conflicting ones queue up instead of
//!   aborting each other, and no cycle (deadlock) can form.
//!
//! * [`ParticipantCore`] is the rest of a participant's protocol state: the
//!   cluster and coordinator incarnation it follows, the epoch and membership
//!   it knows, its read lease, whether it has caught up; it checks every
//!   message before the I/O layer acts on it.
//! * [`Membership`] is the coordinator's view (epoch + members), failure
//!   detection and read leases, driven by check-ins, pings and ticks.
//! * [`CoordinatorCore`] is the coordinator's whole 2PC protocol: locks,
//!   batched PREPAREs, votes, decisions, retries, view changes and fencing,
//!   as inputs in and [`Action`]s out.
//!
//! * [`ranges`] puts a range page together from the participants holding
//!   its partitions, all as of one commit index.
//!
//! * [`Retention`] says how far the coordinator's log may be compacted;
//!   [`snapshot_plan`] how a replica behind it copies its keys instead.
//!
//! All are exercised exhaustively in microseconds by unit and property tests.

mod compaction;
mod coordinator;
mod locks;
mod membership;
mod participant;
mod placement;
pub mod ranges;
mod replica;

pub use compaction::{copy_groups, snapshot_plan, Retention, SnapshotGroup};
pub use coordinator::{Action, CoordinatorCore, CoreConfig, Decisions, Outcomes};
pub use locks::LockTable;
pub use membership::{Grant, Membership, MembershipConfig, Roster, RosterEntry, RosterState, View, ViewChange};
pub use participant::{ParticipantCore, Persist, JOIN_GAP};
pub(crate) use placement::Fnv1a;
pub use placement::{Placement, PlacementSpec, DEFAULT_PARTITIONS};
pub use replica::{ApplyEntry, CommitStep, PrepareStep, PreparedRecord, ReplicaCore, Writes};

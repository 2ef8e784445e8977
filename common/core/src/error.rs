//! One serializable error type for every RPC and the client API.
//!
//! Variants are split by what the caller should do. Retryable outcomes
//! ([`Error::Unavailable`], [`Error::Conflict`], [`Error::NotReady`],
//! [`Error::InDoubt`]) can be retried with the same transaction id, which is
//! always safe; [`Error::NotCommitted`] says for certain that nothing was
//! committed. [`Error::ConditionFailed`] is a final outcome of a transaction.
//! [`Error::Invalid`] and [`Error::Denied`] are the caller's mistake.
//! [`Error::Storage`], [`Error::Identity`] and [`Error::Fenced`] need an
//! operator.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Error {
    /// The transaction aborted because a condition does not hold. Final: a
    /// resubmission of the same id returns this again.
    #[error("aborted: condition failed: {0}")]
    ConditionFailed(String),
    /// A node needed for the operation could not be reached in time.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The transaction could not get its locks in time; retry.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The node is starting up or catching up and cannot serve this yet.
    #[error("not ready: {0}")]
    NotReady(String),
    /// The outcome is not known yet (a prepared transaction is undecided).
    #[error("in doubt: {0}")]
    InDoubt(String),
    /// Bad input: over the limits, malformed, or not allowed.
    #[error("invalid: {0}")]
    Invalid(String),
    /// The node's data directory belongs to another cluster or node.
    #[error("wrong cluster: {0}")]
    Identity(String),
    /// Local storage failed.
    #[error("storage error: {0}")]
    Storage(String),
    /// The caller's identity may not do this (a client calling a node-only
    /// RPC, a participant speaking for another id).
    #[error("permission denied: {0}")]
    Denied(String),
    /// The coordinator's log is behind what the participants have seen (its
    /// data dir was restored from an old copy or damaged): it refuses to
    /// decide anything until an operator restores its newest data.
    #[error("coordinator fenced: {0}")]
    Fenced(String),
    /// The write provably never reached the coordinator: nothing was
    /// committed, and retrying (same or new id) is safe.
    #[error("not committed: {0}")]
    NotCommitted(String),
    /// The coordinator's log no longer holds the entries asked for: they
    /// were compacted through this index. The asking replica installs a
    /// snapshot from a live replica instead.
    #[error("log compacted: entries through index {0} are gone; catch up from a snapshot of a live replica")]
    Compacted(u64),
    /// The participant is not in the cluster's roster (yet): it waits for
    /// `treaty member add`.
    #[error("not a member: {0}")]
    NotMember(String),
}

impl Error {
    /// Whether resubmitting the same request (same transaction id) may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Unavailable(_)
                | Error::Conflict(_)
                | Error::NotReady(_)
                | Error::InDoubt(_)
                | Error::NotCommitted(_)
        )
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Storage(e.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

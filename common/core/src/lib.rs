//! Treaty's core: what every part agrees on, with no I/O.
//!
//! * [`types`]: keys, values, transactions, conditions, limits.
//! * [`error`]: the one error type every RPC and the client API return.
//! * [`messages`]: what the RPCs carry.
//! * [`protocol`]: the 2PC state machines (coordinator, replica, locks,
//!   membership), pure: inputs and the time in, actions out.
//!
//! This crate depends on serde, thiserror and rand only, so the compiler
//! keeps tokio, sled and tarpc out of the protocol. Storage is
//! `treaty-storage`, the network `treaty-common`.

pub mod error;
pub mod messages;
pub mod protocol;
pub mod types;

pub use error::{Error, Result};
pub use types::{Committed, Condition, Key, Txn, TxnId, Value, Versioned, Write};

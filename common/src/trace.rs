//! Each node's memory of recent transactions, for `treaty trace`: a bounded
//! ring of [`TraceEvent`]s (about 40k transactions' worth at the
//! coordinator), in memory only: nothing is written to disk for it, and
//! the oldest events make room for new ones.
//!
//! Recording is on every transaction's path, several times per node, so an
//! event's text is kept as a [`Detail`] and written out only when someone
//! asks: a fixed string or a number costs no allocation, and one text
//! shared by a batch's transactions is allocated once.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::rpc::{TraceEvent, TraceSummary};
use crate::types::TxnId;

/// Events a node keeps.
pub const TRACE_EVENTS: usize = 200_000;

/// An event's text, formatted when it is read.
#[derive(Clone, Debug)]
pub enum Detail {
    Static(&'static str),
    Text(Arc<str>),
    /// `prefix` followed by the number, such as `index 7`.
    Indexed(&'static str, u64),
    /// An applied commit: `index 7 (3 in this apply)`.
    Applied {
        index: u64,
        run: usize,
    },
    /// A submitted transaction: `1 condition(s), 2 write(s)`.
    Shape {
        conditions: usize,
        writes: usize,
    },
}

impl fmt::Display for Detail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Detail::Static(s) => f.write_str(s),
            Detail::Text(s) => f.write_str(s),
            Detail::Indexed(prefix, n) => write!(f, "{prefix}{n}"),
            Detail::Applied { index, run } => write!(f, "index {index} ({run} in this apply)"),
            Detail::Shape { conditions, writes } => write!(f, "{conditions} condition(s), {writes} write(s)"),
        }
    }
}

impl From<&'static str> for Detail {
    fn from(s: &'static str) -> Self {
        Detail::Static(s)
    }
}

impl From<String> for Detail {
    fn from(s: String) -> Self {
        Detail::Text(s.into())
    }
}

/// What one node remembers (see the module docs).
pub struct TraceRing {
    node: String,
    events: Mutex<VecDeque<(TxnId, u64, &'static str, Detail)>>,
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

impl TraceRing {
    /// A ring for the node called `node` (`coordinator`, `participant 3`).
    pub fn new(node: impl Into<String>) -> Self {
        TraceRing { node: node.into(), events: Mutex::new(VecDeque::with_capacity(1024)) }
    }

    /// Records that `txn` reached `step` now.
    pub fn record(&self, txn: TxnId, step: &'static str, detail: impl Into<Detail>) {
        let event = (txn, now_us(), step, detail.into());
        let mut events = self.events.lock().unwrap();
        if events.len() >= TRACE_EVENTS {
            events.pop_front();
        }
        events.push_back(event);
    }

    /// Records the same step, with one shared text, for several transactions
    /// at one moment.
    pub fn record_all(&self, txns: impl IntoIterator<Item = TxnId>, step: &'static str, detail: impl Into<Detail>) {
        let detail = detail.into();
        let at = now_us();
        let mut events = self.events.lock().unwrap();
        for txn in txns {
            if events.len() >= TRACE_EVENTS {
                events.pop_front();
            }
            events.push_back((txn, at, step, detail.clone()));
        }
    }

    /// Every event still held for `txn`, oldest first.
    pub fn events(&self, txn: TxnId) -> Vec<TraceEvent> {
        let events = self.events.lock().unwrap();
        events
            .iter()
            .filter(|e| e.0 == txn)
            .map(|(txn, at_us, step, detail)| TraceEvent {
                txn: *txn,
                at_us: *at_us,
                node: self.node.clone(),
                step: step.to_string(),
                detail: detail.to_string(),
            })
            .collect()
    }

    /// The `n` slowest transactions still held from `start` to `end` (the
    /// coordinator's `submitted` and `answered`), slowest first, with the
    /// detail of their `end` event.
    pub fn slowest(&self, n: usize, start: &str, end: &str) -> Vec<TraceSummary> {
        let events = self.events.lock().unwrap();
        let mut started: HashMap<TxnId, u64> = HashMap::new();
        let mut done: Vec<TraceSummary> = Vec::new();
        for (txn, at, step, detail) in events.iter() {
            if *step == start {
                started.insert(*txn, *at);
            } else if *step == end {
                if let Some(s) = started.remove(txn) {
                    done.push(TraceSummary { txn: *txn, took_us: at.saturating_sub(s), outcome: detail.to_string() });
                }
            }
        }
        done.sort_by_key(|s| std::cmp::Reverse(s.took_us));
        done.truncate(n);
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest_events_and_finds_the_slowest() {
        let ring = TraceRing::new("coordinator");
        ring.record(TxnId(1), "submitted", "");
        ring.record(TxnId(2), "submitted", "");
        std::thread::sleep(std::time::Duration::from_millis(5));
        ring.record(TxnId(2), "answered", "committed at index 1");
        ring.record(TxnId(1), "answered", "committed at index 2");
        let one = ring.events(TxnId(1));
        assert_eq!(one.iter().map(|e| e.step.as_str()).collect::<Vec<_>>(), ["submitted", "answered"]);
        assert!(one.iter().all(|e| e.node == "coordinator"));
        let slow = ring.slowest(1, "submitted", "answered");
        assert_eq!(slow[0].txn, TxnId(1), "submitted first, answered last");
        for i in 0..TRACE_EVENTS as u128 {
            ring.record(TxnId(100 + i), "submitted", "");
        }
        assert!(ring.events(TxnId(1)).is_empty(), "the oldest events make room");

        // Details are written out when read, as the text they stand for.
        ring.record(TxnId(3), "submitted", Detail::Shape { conditions: 1, writes: 2 });
        ring.record(TxnId(3), "COMMIT received", Detail::Indexed("index ", 7));
        ring.record(TxnId(3), "applied", Detail::Applied { index: 7, run: 3 });
        ring.record_all([TxnId(3), TxnId(4)], "record durable", format!("synced in {} ms", 2));
        let texts: Vec<String> = ring.events(TxnId(3)).into_iter().map(|e| e.detail).collect();
        assert_eq!(texts, ["1 condition(s), 2 write(s)", "index 7", "index 7 (3 in this apply)", "synced in 2 ms"]);
        assert_eq!(ring.events(TxnId(4))[0].detail, "synced in 2 ms");
        assert_eq!(ring.events(TxnId(100 + TRACE_EVENTS as u128 - 1)).len(), 1);
    }
}

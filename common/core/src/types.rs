//! The data model: keys, values, versions, transactions and their limits.
//!
//! A transaction is a list of [`Condition`]s and a list of [`Write`]s. If every
//! condition holds against the applied state of every replica, all writes apply
//! atomically under one commit index; otherwise nothing applies and the abort
//! names the first failing condition. A key's version is the commit index of
//! the last write to it (0 never occurs for a present key).

use serde::{Deserialize, Serialize};
use std::fmt;

use crate::error::Error;

/// Keys are byte strings of at most [`MAX_KEY_LEN`] bytes (and never empty).
///
/// Keys and values in the types below are serialized as byte strings
/// (`serde_bytes`): bincode writes exactly the bytes it wrote for them as a
/// sequence of `u8` (a length, then the bytes), so logs and peers from
/// before read the same, but copies them in one go instead of one byte at a
/// time (about eight times faster for a 256-byte value).
pub type Key = Vec<u8>;
/// Values are byte strings of at most [`MAX_VALUE_LEN`] bytes.
pub type Value = Vec<u8>;

/// Largest key accepted: 1 KiB.
pub const MAX_KEY_LEN: usize = 1024;
/// Largest value accepted: 1 MiB.
pub const MAX_VALUE_LEN: usize = 1024 * 1024;
/// Most conditions plus writes in one transaction.
pub const MAX_TXN_OPS: usize = 1024;
/// Most key and value bytes in one transaction: 4 MiB.
pub const MAX_TXN_BYTES: usize = 4 * 1024 * 1024;

/// A client-chosen transaction id. Resubmitting an id returns the first
/// outcome instead of applying twice, so retries after timeouts are safe.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TxnId(pub u128);

impl TxnId {
    /// A fresh random id (128 bits: collisions are not a practical concern).
    pub fn random() -> Self {
        TxnId(rand::random())
    }
}

impl fmt::Display for TxnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl std::str::FromStr for TxnId {
    type Err = String;

    /// Parses the 32 hex digits that `Display` prints.
    fn from_str(s: &str) -> Result<Self, String> {
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "{s:?} is not a transaction id: expected the 32 hex digits an error message or `--json` output shows"
            ));
        }
        u128::from_str_radix(s, 16).map(TxnId).map_err(|e| e.to_string())
    }
}

impl fmt::Debug for TxnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "txn:{:08x}", (self.0 >> 96) as u32)
    }
}

/// A condition checked against the applied state before a transaction commits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Condition {
    /// The key exists and holds exactly this value.
    ValueEquals(#[serde(with = "serde_bytes")] Key, #[serde(with = "serde_bytes")] Value),
    /// The key's version (commit index of its last write) is this number;
    /// version 0 means the key is missing.
    VersionEquals(#[serde(with = "serde_bytes")] Key, u64),
    /// The key exists.
    Exists(#[serde(with = "serde_bytes")] Key),
    /// The key does not exist.
    Missing(#[serde(with = "serde_bytes")] Key),
}

impl Condition {
    pub fn key(&self) -> &[u8] {
        match self {
            Condition::ValueEquals(k, _)
            | Condition::VersionEquals(k, _)
            | Condition::Exists(k)
            | Condition::Missing(k) => k,
        }
    }

    /// Whether the condition holds given the key's current applied entry.
    pub fn holds(&self, current: Option<&Versioned>) -> bool {
        match self {
            Condition::ValueEquals(_, v) => current.is_some_and(|c| &c.value == v),
            Condition::VersionEquals(_, n) => current.map_or(0, |c| c.version) == *n,
            Condition::Exists(_) => current.is_some(),
            Condition::Missing(_) => current.is_none(),
        }
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Condition::ValueEquals(k, v) => write!(f, "{} = {}", escape(k), escape(v)),
            Condition::VersionEquals(k, n) => write!(f, "{} version {}", escape(k), n),
            Condition::Exists(k) => write!(f, "{} exists", escape(k)),
            Condition::Missing(k) => write!(f, "{} missing", escape(k)),
        }
    }
}

/// A write applied when the transaction commits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Write {
    Put(#[serde(with = "serde_bytes")] Key, #[serde(with = "serde_bytes")] Value),
    Delete(#[serde(with = "serde_bytes")] Key),
}

impl Write {
    pub fn key(&self) -> &[u8] {
        match self {
            Write::Put(k, _) | Write::Delete(k) => k,
        }
    }
}

/// A transaction: conditions, then writes, under a client-chosen id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Txn {
    pub id: TxnId,
    pub conditions: Vec<Condition>,
    pub writes: Vec<Write>,
}

impl Txn {
    pub fn new(conditions: Vec<Condition>, writes: Vec<Write>) -> Self {
        Txn { id: TxnId::random(), conditions, writes }
    }

    /// Every key the transaction reads or writes, sorted and deduplicated.
    /// The coordinator locks exactly these, in this order.
    pub fn keys(&self) -> Vec<Key> {
        let mut keys: Vec<Key> = self
            .conditions
            .iter()
            .map(|c| c.key().to_vec())
            .chain(self.writes.iter().map(|w| w.key().to_vec()))
            .collect();
        keys.sort();
        keys.dedup();
        keys
    }

    /// Checks the limits of DESIGN section 2. Every entry point calls this, so
    /// nothing over the limits is ever logged or stored.
    pub fn validate(&self) -> Result<(), Error> {
        if self.writes.is_empty() {
            return Err(Error::Invalid("a transaction needs at least one write (use get to read)".into()));
        }
        let ops = self.conditions.len() + self.writes.len();
        if ops > MAX_TXN_OPS {
            return Err(Error::Invalid(format!(
                "transaction has {ops} operations; the limit is {MAX_TXN_OPS}: split it into smaller transactions"
            )));
        }
        let mut bytes = 0usize;
        for c in &self.conditions {
            check_key(c.key())?;
            bytes += c.key().len();
            if let Condition::ValueEquals(_, v) = c {
                check_value(v)?;
                bytes += v.len();
            }
        }
        for w in &self.writes {
            check_key(w.key())?;
            bytes += w.key().len();
            if let Write::Put(_, v) = w {
                check_value(v)?;
                bytes += v.len();
            }
        }
        if bytes > MAX_TXN_BYTES {
            return Err(Error::Invalid(format!(
                "transaction carries {bytes} bytes; the limit is {MAX_TXN_BYTES} (4 MiB): split it into smaller transactions"
            )));
        }
        Ok(())
    }
}

/// Rejects empty and over-long keys with a message that says what to do.
pub fn check_key(key: &[u8]) -> Result<(), Error> {
    if key.is_empty() {
        return Err(Error::Invalid("empty key: keys must be 1 to 1024 bytes".into()));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(Error::Invalid(format!(
            "key is {} bytes; the limit is {MAX_KEY_LEN} (1 KiB): use a shorter key",
            key.len()
        )));
    }
    Ok(())
}

/// Rejects over-long values with a message that says what to do.
pub fn check_value(value: &[u8]) -> Result<(), Error> {
    if value.len() > MAX_VALUE_LEN {
        return Err(Error::Invalid(format!(
            "value is {} bytes; the limit is {MAX_VALUE_LEN} (1 MiB): store large objects elsewhere and keep a reference",
            value.len()
        )));
    }
    Ok(())
}

/// A stored value with the commit index of the write that produced it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Versioned {
    #[serde(with = "serde_bytes")]
    pub value: Value,
    pub version: u64,
}

/// Most entries one range page may hold.
pub const MAX_RANGE_LIMIT: u32 = 10_000;
/// A range page stops once its keys and values pass this many bytes (after
/// at least one entry), so a page always fits in one RPC frame.
pub const RANGE_PAGE_BYTES: usize = 1024 * 1024;

/// A range read: keys in `[start, end)` in byte order (`end: None` = to the
/// last key), at most `limit` of them. Paging: ask again with `start` set to
/// the page's [`RangePage::next`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeRequest {
    /// First key (inclusive); empty = from the first key.
    pub start: Key,
    /// Last key (exclusive); `None` = no upper bound.
    pub end: Option<Key>,
    /// At most this many entries (1 to [`MAX_RANGE_LIMIT`]).
    pub limit: u32,
    /// Leave values out (versions are still given).
    pub keys_only: bool,
    /// The replica's local copy, without waiting for a lease or for
    /// prepared writes in the range (may be behind).
    pub stale: bool,
}

impl RangeRequest {
    /// The keys that start with `prefix` (all keys if it is empty).
    pub fn prefix(prefix: &[u8]) -> Self {
        RangeRequest {
            start: prefix.to_vec(),
            end: prefix_end(prefix),
            limit: MAX_RANGE_LIMIT,
            keys_only: false,
            stale: false,
        }
    }

    /// Checks bounds and limit; says what to change.
    pub fn check(&self) -> Result<(), Error> {
        if self.start.len() > MAX_KEY_LEN {
            return Err(Error::Invalid(format!(
                "range start is {} bytes; keys are at most {MAX_KEY_LEN}: use a shorter start",
                self.start.len()
            )));
        }
        if let Some(end) = &self.end {
            if end.len() > MAX_KEY_LEN + 1 {
                return Err(Error::Invalid(format!(
                    "range end is {} bytes; keys are at most {MAX_KEY_LEN}: use a shorter end",
                    end.len()
                )));
            }
            if *end < self.start {
                return Err(Error::Invalid(format!(
                    "range end {} sorts before its start {}: swap them",
                    escape(end),
                    escape(&self.start)
                )));
            }
        }
        if self.limit == 0 || self.limit > MAX_RANGE_LIMIT {
            return Err(Error::Invalid(format!(
                "range limit {} is out of bounds: ask for 1 to {MAX_RANGE_LIMIT} entries per page and page on with the continuation key",
                self.limit
            )));
        }
        Ok(())
    }

    /// Whether `key` lies in the range.
    pub fn contains(&self, key: &[u8]) -> bool {
        key >= self.start.as_slice() && self.end.as_deref().is_none_or(|e| key < e)
    }
}

/// The first key after every key that starts with `prefix` (`None`: no
/// such key, the prefix is empty or all `0xff`).
pub fn prefix_end(prefix: &[u8]) -> Option<Key> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// One key of a range page.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeEntry {
    #[serde(with = "serde_bytes")]
    pub key: Key,
    /// Commit index of the key's last write.
    pub version: u64,
    /// `None` when the request was keys-only.
    #[serde(with = "serde_bytes")]
    pub value: Option<Value>,
}

/// A page of a range read: one consistent state of the replica.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangePage {
    pub entries: Vec<RangeEntry>,
    /// Where the next page starts (`None`: the range is done).
    pub next: Option<Key>,
    /// The replica's applied index when the page was read: the page shows
    /// exactly the commits up to here.
    pub index: u64,
}

/// The answer to a committed transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Committed {
    /// The global commit index this transaction was assigned.
    pub index: u64,
}

/// Renders bytes for humans: printable UTF-8 as is, everything else escaped
/// (`\n`, `\t`, `\\`, `\"`, `\xNN`). Quoted when it holds spaces or is empty, so
/// the output can be pasted back into the CLI.
pub fn escape(bytes: &[u8]) -> String {
    let mut out = String::new();
    let text = String::from_utf8_lossy(bytes);
    let lossless = std::str::from_utf8(bytes).is_ok();
    if lossless {
        for ch in text.chars() {
            match ch {
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                '\r' => out.push_str("\\r"),
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                c if c.is_control() => {
                    let mut buf = [0u8; 4];
                    for b in c.encode_utf8(&mut buf).bytes() {
                        out.push_str(&format!("\\x{b:02x}"));
                    }
                }
                c => out.push(c),
            }
        }
    } else {
        for &b in bytes {
            match b {
                b'\n' => out.push_str("\\n"),
                b'\t' => out.push_str("\\t"),
                b'\\' => out.push_str("\\\\"),
                b'"' => out.push_str("\\\""),
                0x20..=0x7e => out.push(b as char),
                _ => out.push_str(&format!("\\x{b:02x}")),
            }
        }
    }
    if out.is_empty() || out.contains(' ') || out.contains('#') {
        format!("\"{out}\"")
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transaction_ids_parse_back_from_what_they_print() {
        let id = TxnId::random();
        assert_eq!(id.to_string().parse::<TxnId>(), Ok(id));
        assert_eq!("0".repeat(32).parse::<TxnId>(), Ok(TxnId(0)));
        for bad in ["", "xyz", &"0".repeat(31), &"0".repeat(33), &"g".repeat(32), "+0000000000000000000000000000000"] {
            let e = bad.parse::<TxnId>().unwrap_err();
            assert!(e.contains("is not a transaction id"), "{bad}: {e}");
        }
    }

    #[test]
    fn limits_are_enforced_with_clear_errors() {
        let big_key = vec![b'k'; MAX_KEY_LEN + 1];
        let t = Txn::new(vec![], vec![Write::Put(big_key, b"v".to_vec())]);
        let err = t.validate().unwrap_err().to_string();
        assert!(err.contains("1025 bytes") && err.contains("1 KiB"), "{err}");

        let big_value = vec![0u8; MAX_VALUE_LEN + 1];
        let t = Txn::new(vec![], vec![Write::Put(b"k".to_vec(), big_value)]);
        assert!(t.validate().unwrap_err().to_string().contains("1 MiB"));

        let writes = (0..5).map(|i| Write::Put(vec![i], vec![0; MAX_VALUE_LEN])).collect();
        let t = Txn::new(vec![], writes);
        assert!(t.validate().unwrap_err().to_string().contains("4 MiB"));

        let writes = (0..1025u32).map(|i| Write::Delete(i.to_be_bytes().to_vec())).collect();
        assert!(Txn::new(vec![], writes).validate().unwrap_err().to_string().contains("1024"));

        assert!(Txn::new(vec![], vec![]).validate().is_err());
        let ok = Txn::new(vec![], vec![Write::Put(vec![1; MAX_KEY_LEN], vec![2; MAX_VALUE_LEN])]);
        ok.validate().unwrap();
    }

    #[test]
    fn prefix_ranges_end_after_the_last_key_with_the_prefix() {
        assert_eq!(prefix_end(b"user/"), Some(b"user0".to_vec()));
        assert_eq!(prefix_end(b"a\xff\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff"), None);
        assert_eq!(prefix_end(b""), None);
        let r = RangeRequest::prefix(b"user/");
        assert!(r.contains(b"user/") && r.contains(b"user/\xff\xff") && !r.contains(b"user0") && !r.contains(b"use"));
        assert!(RangeRequest::prefix(b"").contains(b"\xff"));
    }

    #[test]
    fn range_requests_out_of_bounds_say_what_to_change() {
        let ok = RangeRequest::prefix(b"a");
        assert!(ok.check().is_ok());
        let e = RangeRequest { limit: 0, ..ok.clone() }.check().unwrap_err().to_string();
        assert!(e.contains("ask for 1 to 10000 entries"), "{e}");
        let e = RangeRequest { end: Some(b"0".to_vec()), ..ok.clone() }.check().unwrap_err().to_string();
        assert!(e.contains("sorts before its start a: swap them"), "{e}");
        let e = RangeRequest { start: vec![b'k'; MAX_KEY_LEN + 1], end: None, ..ok }.check().unwrap_err().to_string();
        assert!(e.contains("use a shorter start"), "{e}");
    }

    #[test]
    fn conditions_judge_applied_entries() {
        let e = Versioned { value: b"1".to_vec(), version: 7 };
        let k = b"k".to_vec();
        assert!(Condition::ValueEquals(k.clone(), b"1".to_vec()).holds(Some(&e)));
        assert!(!Condition::ValueEquals(k.clone(), b"1".to_vec()).holds(None));
        assert!(Condition::VersionEquals(k.clone(), 7).holds(Some(&e)));
        assert!(Condition::VersionEquals(k.clone(), 0).holds(None));
        assert!(Condition::Exists(k.clone()).holds(Some(&e)));
        assert!(Condition::Missing(k).holds(None));
    }

    #[test]
    fn keys_are_sorted_and_unique() {
        let t = Txn::new(
            vec![Condition::Exists(b"b".to_vec())],
            vec![Write::Put(b"b".to_vec(), vec![]), Write::Delete(b"a".to_vec())],
        );
        assert_eq!(t.keys(), vec![b"a".to_vec(), b"b".to_vec()]);
    }

    #[test]
    fn escape_is_readable() {
        assert_eq!(escape(b"plain"), "plain");
        assert_eq!(escape(b"a b"), "\"a b\"");
        assert_eq!(escape(b""), "\"\"");
        assert_eq!(escape(b"\x00\xff"), "\\x00\\xff");
        assert_eq!(escape("héllo".as_bytes()), "héllo");
    }
}

//! Durable state in sled: the participant's data and write-ahead log, the
//! coordinator's decision log, and the sync that makes either durable.
//!
//! ## Durability
//! sled 0.34's `flush()` ends in `sync_file_range`, which survives a killed
//! process but not a power loss. [`Durability::sync`] therefore flushes, then
//! `fdatasync`s sled's `db` file. Only after that may a vote or decision
//! leave. Large items (over about 128 KiB) live in separate blob files, which
//! stock sled never syncs; the workspace's patched sled syncs each blob file
//! and its directory entry before the log record that points at it is
//! written, and opening a store syncs once the blobs an older binary left.
//! [`GroupSync`] shares one such sync among all writers waiting at the time
//! (group commit).
//!
//! ## Participant layout (trees of one sled db)
//! * `meta`: `node_id`, `replica` (random, made with the directory),
//!   `cluster`, `seen_index` (u64 big-endian), and `coordinator` (bincode
//!   [`Incarnation`] this replica follows). Directories written before the
//!   applied index moved to `data` may still hold an `applied_index` here;
//!   it is read as a fallback.
//! * `datalog`: 8-byte big-endian sequence number -> one change to the data
//!   (a run of applied commits with its writes, an install's chunk, the
//!   applied index set), since the newest checkpoint. The data itself is a
//!   map in memory; `data.checkpoint` in the data dir holds it as of a
//!   point in that log ([`data`] has the invariants and the file format).
//!   Directories written before this keep the data in a sled tree `data`
//!   (key -> 8-byte big-endian version ++ value, the applied index under
//!   the empty key); opening one writes it into a checkpoint and drops the
//!   tree.
//! * `wal`: 8-byte big-endian sequence number -> bincode [`WalEntry`]: the
//!   PREPARED records of one PREPARE batch, written with one insert however
//!   many transactions it carries, or the ids of transactions whose records
//!   are dead (applied or aborted; one insert per outcome message or apply).
//!   Replaying the entries in order gives the live records: a later record
//!   of the same transaction (a retry) replaces an earlier one, a `Resolved`
//!   entry ends it. Which entry holds each live record is kept in memory
//!   ([`WalIndex`]). Once 64 entries have piled up they are compacted: the
//!   live records (often none) move into one new entry and everything
//!   before it is removed in one batch. sled recovers a prefix of its log,
//!   so a crash can only lose the newest entries, never keep a later one
//!   without an earlier one. Directories written before batching hold one
//!   record per 16-byte txn id key; opening the store moves them into one
//!   entry.
//!
//! Applying commits is two steps ([`ReplicaStore::apply_data`], then
//! [`ReplicaStore::retire`]): one `datalog` record holding the run's writes
//! and its last index (the new applied index), then the removal of the WAL
//! records. sled recovers a prefix of its log, so a crash keeps the whole
//! run or none of it, and keeps the WAL removal only with the run. A crash
//! between the two steps leaves records of transactions already applied;
//! they are in doubt after the restart, the coordinator answers "committed
//! at index i" with i at or below the applied index, and the replica drops
//! them then (see `ReplicaCore::commit`). Versions before the data log
//! wrote a run key by key into the `data` tree after an `applying` mark in
//! `meta` (the run's last index); a crash could keep part of it, and a mark
//! above the applied index still means the data is no state of the cluster
//! ([`ReplicaStore::consistent_from`]) until the run is applied again.
//! (Earlier still: one sled transaction over three trees, then one sled
//! batch per apply; see docs/decisions.md for what each cost.)
//!
//! ## Coordinator layout
//! * `treaty-coordinator.id` (a plain file beside sled's): the cluster id and
//!   participant list, written once when the cluster is created. A data dir
//!   whose database has lost them while this file remains is damaged, and
//!   the coordinator refuses to start rather than found a new cluster there.
//! * `meta`: `cluster`, `participants` (bincode list of addresses, as created), `view`, `roster`,
//!   `history` (bincode map generation -> nonce of every incarnation).
//! * `log`: u64 big-endian commit index -> bincode [`LogEntry`]: every
//!   committed transaction with its writes (catch-up source for replicas).
//! * `decisions`: txn id -> bincode [`Decision`]: the first outcome of a
//!   transaction that aborted on a failed condition, for safe retries
//!   (written with the batch's commits and synced before the client hears
//!   it). A commit's decision is its log entry, which names the
//!   transaction: the log is written one insert per entry in index order
//!   (a crash before the sync keeps a prefix, each entry a decision nobody
//!   heard of yet), and which transaction committed at which index is kept in memory
//!   ([`DecisionIndex`], rebuilt from the log's entries at start). Data
//!   dirs written before this also hold commit decisions here; they are
//!   read as a fallback and removed by compaction like the others.
//! * `aborts`: 8-byte big-endian index ++ txn id -> nothing: each abort
//!   decision filed under the last commit index when it was made, so that
//!   compaction finds it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use treaty_core::messages::{ClusterId, Incarnation, LogEntry};
use treaty_core::protocol::{ApplyEntry, PreparedRecord};
use treaty_core::types::{RangeEntry, RangePage, RangeRequest, TxnId, Versioned, Write, RANGE_PAGE_BYTES};
use treaty_core::{Error, Result};

pub mod alloc;
mod data;
pub mod files;

pub use data::CHECKPOINT_MIN_BYTES as DEFAULT_CHECKPOINT_BYTES;
use data::{Data, Key, RecordOut};

/// sled's errors as Treaty's (`Error::Storage`); the core knows no sled.
trait Db<T> {
    fn db(self) -> Result<T>;
}

impl<T> Db<T> for std::result::Result<T, sled::Error> {
    fn db(self) -> Result<T> {
        self.map_err(|e| Error::Storage(e.to_string()))
    }
}

/// Where the `data` tree of versions before the data log kept the applied
/// index: no client key is empty.
const APPLIED_KEY: &[u8] = b"";
/// `meta` key of versions before the data log: the last index of the apply
/// in progress (see the module docs).
const APPLYING: &str = "applying";

/// sled's page cache for a participant: it holds the WAL and the data log,
/// read back only at a restart (reads are served from memory; sled's
/// default is 1 GiB per process; see docs/decisions.md "sled's settings").
pub const REPLICA_CACHE_BYTES: u64 = 32 * 1024 * 1024;
/// How long after a failed checkpoint the next one may start.
const CHECKPOINT_RETRY: std::time::Duration = std::time::Duration::from_secs(10);
/// sled's page cache for the coordinator: it writes its log and reads back
/// only recent entries (catch-up) and decisions (retries).
pub const COORDINATOR_CACHE_BYTES: u64 = 32 * 1024 * 1024;

/// Opens the sled db of `dir` (rewriting bloated files first, see
/// [`files`]); returns it and the directory holding its files.
fn open_db(dir: &Path, cache_bytes: u64) -> Result<(sled::Db, PathBuf)> {
    files::open(dir, cache_bytes, files::Policy::DEFAULT)
}

fn has_tree(db: &sled::Db, name: &str) -> bool {
    db.tree_names().iter().any(|n| n.as_ref() == name.as_bytes())
}

fn u64_at(tree: &sled::Tree, key: &str) -> Result<Option<u64>> {
    Ok(tree.get(key).db()?.map(|v| u64::from_be_bytes(v.as_ref().try_into().expect("8-byte meta value"))))
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    bincode::serialize(v).expect("in-memory serialization cannot fail")
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8], what: &str) -> Result<T> {
    bincode::deserialize(bytes).map_err(|e| Error::Storage(format!("corrupt {what} record: {e}")))
}

#[cfg(test)]
fn encode_versioned(index: u64, value: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(8 + value.len());
    buf.extend_from_slice(&index.to_be_bytes());
    buf.extend_from_slice(value);
    buf
}

fn decode_versioned(bytes: &[u8]) -> Versioned {
    let (version, value) = bytes.split_at(8);
    Versioned { value: value.to_vec(), version: u64::from_be_bytes(version.try_into().expect("8 bytes")) }
}

/// Makes everything written to a sled db so far durable (see module docs).
pub struct Durability {
    db: sled::Db,
    db_file: File,
}

impl Durability {
    pub fn new(db: sled::Db, dir: &Path) -> Result<Self> {
        let db_file = File::open(dir.join("db"))?;
        Ok(Durability { db, db_file })
    }

    /// Flushes sled and fdatasyncs its `db` file. Blob files need nothing
    /// here: the patched sled syncs each one, and its directory entry, as it
    /// writes it (third_party/sled/PATCHES.md), and the blobs a binary from
    /// before that patch left are synced once when the store is opened
    /// ([`files::open`]).
    pub fn sync(&mut self) -> Result<()> {
        self.db.flush().db()?;
        self.db_file.sync_data()?;
        Ok(())
    }
}

/// Group commit: every caller of [`GroupSync::sync`] returns once a sync that
/// *started after its call* has finished. Callers that arrive while a sync is
/// running share the next one.
///
/// The syncs run on a thread of their own, which callers hand their waits
/// to directly: no task or blocking-pool thread sits in between, so a lone
/// write pays two thread hand-offs for its sync, not four.
#[derive(Clone)]
pub struct GroupSync {
    tx: mpsc::Sender<oneshot::Sender<Result<()>>>,
    syncs: Arc<AtomicU64>,
}

impl GroupSync {
    /// Starts the sync thread; it ends when every handle is dropped.
    pub fn start(mut durability: Durability) -> Self {
        let (tx, rx) = mpsc::channel::<oneshot::Sender<Result<()>>>();
        let syncs = Arc::new(AtomicU64::new(0));
        let counter = syncs.clone();
        std::thread::Builder::new()
            .name("group-sync".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut waiters = vec![first];
                    while let Ok(w) = rx.try_recv() {
                        waiters.push(w);
                    }
                    let result = durability.sync();
                    counter.fetch_add(1, Ordering::Relaxed);
                    for w in waiters {
                        let _ = w.send(result.clone());
                    }
                }
            })
            .expect("starting the sync thread");
        GroupSync { tx, syncs }
    }

    /// Returns once everything written before this call is durable.
    pub async fn sync(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(tx).map_err(|_| Error::Storage("sync task stopped".into()))?;
        rx.await.map_err(|_| Error::Storage("sync task stopped".into()))?
    }

    /// Syncs performed since start.
    pub fn count(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }
}

/// A participant's sled store: data, WAL and identity.
#[derive(Clone)]
pub struct ReplicaStore {
    db: sled::Db,
    /// Where sled's files are (the data dir or a subdirectory, see [`files`]).
    files: PathBuf,
    /// The data dir (where checkpoints are).
    dir: PathBuf,
    meta: sled::Tree,
    wal: sled::Tree,
    wal_index: Arc<Mutex<WalIndex>>,
    /// Every change to the data, in order, since the newest checkpoint
    /// ([`data`] has the invariants).
    datalog: sled::Tree,
    /// The data, in memory. Held for writing while a change is logged and
    /// made, so no reader sees part of one.
    state: Arc<RwLock<Data>>,
    /// Held while a checkpoint is written (one at a time).
    checkpoint_lock: Arc<Mutex<()>>,
}

impl ReplicaStore {
    /// Opens (or creates) the store of participant `node_id`. Refuses a
    /// directory that belongs to another participant, touching nothing.
    pub fn open(dir: &Path, node_id: u64) -> Result<Self> {
        let (db, files) = open_db(dir, REPLICA_CACHE_BYTES)?;
        let meta = db.open_tree("meta").db()?;
        if has_tree(&db, "decisions") {
            return Err(Error::Identity(format!(
                "data dir {} belongs to a coordinator, not a participant: give participant {node_id} its own directory",
                dir.display()
            )));
        }
        if u64_at(&meta, "replica")?.is_none() {
            meta.insert("replica", &(rand::random::<u64>() | 1).to_be_bytes()).db()?;
        }
        match u64_at(&meta, "node_id")? {
            Some(id) if id != node_id => {
                return Err(Error::Identity(format!(
                    "data dir {} belongs to participant {id}, but this process was started as participant {node_id}: \
                     point --data-dir at participant {node_id}'s own directory, or at an empty one to seed a new replica",
                    dir.display()
                )))
            }
            Some(_) => {}
            None => {
                meta.insert("node_id", &node_id.to_be_bytes()).db()?;
                meta.flush().db()?;
            }
        }
        let wal = db.open_tree("wal").db()?;
        let wal_index = Arc::new(Mutex::new(WalIndex::open(&wal)?));
        let datalog = db.open_tree("datalog").db()?;
        let _ = std::fs::remove_file(dir.join(data::CHECKPOINT_TMP));
        let (state, migrated) = match data::read(&dir.join(data::CHECKPOINT))? {
            Some(state) => {
                if has_tree(&db, "data") {
                    // Converted already; a crash came before the old tree went.
                    db.drop_tree("data").db()?;
                }
                (state, false)
            }
            None => Self::data_of_the_sled_layout(&db, &meta)?,
        };
        let store = ReplicaStore {
            dir: dir.to_path_buf(),
            wal,
            wal_index,
            datalog,
            state: Arc::new(RwLock::new(state)),
            checkpoint_lock: Arc::default(),
            meta,
            files,
            db,
        };
        store.replay()?;
        if migrated {
            // Data written by a version that kept it in a sled tree: now in
            // a checkpoint, and the tree goes.
            store.checkpoint()?;
            store.db.drop_tree("data").db()?;
            store.db.flush().db()?;
        }
        Ok(store)
    }

    /// The data as a version before the data log kept it (a sled tree
    /// `data`: key -> version ++ value, and the applied index under the
    /// empty key, or in `meta` before that); empty for a new store. Says
    /// whether there was any.
    fn data_of_the_sled_layout(db: &sled::Db, meta: &sled::Tree) -> Result<(Data, bool)> {
        let mut applied = u64_at(meta, "applied_index")?.unwrap_or(0);
        let mut state = Data::new(0, 0);
        let mut found = false;
        if has_tree(db, "data") {
            let tree = db.open_tree("data").db()?;
            for item in tree.iter() {
                let (key, stored) = item.db()?;
                found = true;
                if key.as_ref() == APPLIED_KEY {
                    applied = u64::from_be_bytes(stored.as_ref().try_into().expect("8-byte applied index"));
                } else {
                    let Versioned { value, version } = decode_versioned(&stored);
                    state.put(&key, version, &value);
                }
            }
        }
        state.applied = applied;
        Ok((state, found))
    }

    /// Replays the data log from the checkpoint's sequence number on.
    fn replay(&self) -> Result<()> {
        let mut state = self.write_state();
        let from = state.next_seq;
        for item in self.datalog.range(from.to_be_bytes()..) {
            let (key, record) = item.db()?;
            state.replay(&record)?;
            state.logged += record.len() as u64;
            state.next_seq = u64::from_be_bytes(key.as_ref().try_into().expect("8-byte sequence number")) + 1;
        }
        Ok(())
    }

    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, Data> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, Data> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Logs one change (under the state's write lock, before it is made);
    /// starts a checkpoint in the background when one is due.
    fn log_change(&self, state: &mut Data, record: &RecordOut) -> Result<()> {
        let bytes = record.encode();
        self.datalog.insert(state.next_seq.to_be_bytes(), bytes.as_slice()).db()?;
        state.next_seq += 1;
        if state.count_logged(bytes.len()) {
            let store = self.clone();
            std::thread::Builder::new()
                .name("checkpoint".into())
                .spawn(move || {
                    // Background work: the node's worker comes first (nice 10;
                    // failing to set it only loses that).
                    unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as u32, 10) };
                    if let Err(e) = store.checkpoint() {
                        tracing::error!(
                            error = %e,
                            "writing a data checkpoint failed (is the disk full?); the data log keeps growing, \
                             and the next try is in {CHECKPOINT_RETRY:?}"
                        );
                        std::thread::sleep(CHECKPOINT_RETRY);
                        store.write_state().checkpointing = false;
                    }
                })
                .map_err(|e| Error::Storage(format!("cannot start a checkpoint thread: {e}")))?;
        }
        Ok(())
    }

    /// Sets how many bytes of data log start a checkpoint (or the data's
    /// size, if larger; see [`DEFAULT_CHECKPOINT_BYTES`]).
    pub fn set_checkpoint_bytes(&self, bytes: u64) {
        self.write_state().checkpoint_min = bytes.max(1);
    }

    /// Writes a checkpoint of the data (see [`data`]), then removes the
    /// log records it covers. Applies go on meanwhile.
    pub fn checkpoint(&self) -> Result<u64> {
        let _one = self.checkpoint_lock.lock().unwrap_or_else(|e| e.into_inner());
        let (seq, applied, logged) = {
            let mut state = self.write_state();
            state.checkpointing = true;
            (state.next_seq, state.applied, state.logged)
        };
        let tmp = self.dir.join(data::CHECKPOINT_TMP);
        let count = data::write(&tmp, seq, applied, |after| {
            let state = self.read_state();
            let start = after.map_or(Bound::Unbounded, Bound::Excluded);
            state.range(start, None).take(4096).map(|(k, (version, v))| (k.clone(), *version, v.clone())).collect()
        })?;
        // Every record the scan may have seen is durable before the file counts.
        self.durability()?.sync()?;
        let path = self.dir.join(data::CHECKPOINT);
        std::fs::rename(&tmp, &path).map_err(|e| Error::Storage(format!("cannot rename {}: {e}", tmp.display())))?;
        files::sync_dir(&self.dir)?;
        fail::fail_point!("storage::after_checkpoint", |_| { files::crash("storage::after_checkpoint") });
        loop {
            let mut batch = sled::Batch::default();
            let mut n = 0;
            for key in self.datalog.range(..seq.to_be_bytes()).keys().take(1024) {
                batch.remove(key.db()?);
                n += 1;
            }
            if n == 0 {
                break;
            }
            self.datalog.apply_batch(batch).db()?;
        }
        let mut state = self.write_state();
        state.logged -= logged;
        state.checkpointing = false;
        tracing::debug!(keys = count, seq, "data checkpoint written");
        Ok(count)
    }

    pub fn durability(&self) -> Result<Durability> {
        Durability::new(self.db.clone(), &self.files)
    }

    pub fn cluster(&self) -> Result<Option<ClusterId>> {
        Ok(u64_at(&self.meta, "cluster")?.map(ClusterId))
    }

    /// This data directory's random id, made when it was created.
    pub fn replica_id(&self) -> Result<u64> {
        Ok(u64_at(&self.meta, "replica")?.expect("set on open"))
    }

    /// The coordinator incarnation this replica follows, if any.
    pub fn following(&self) -> Result<Option<Incarnation>> {
        self.meta.get("coordinator").db()?.map(|v| decode(&v, "coordinator incarnation")).transpose()
    }

    /// Records the coordinator incarnation this replica now follows. Flushed
    /// at once; made durable by the next sync (every WAL sync comes later).
    pub fn set_following(&self, inc: Incarnation) -> Result<()> {
        self.meta.insert("coordinator", encode(&inc)).db()?;
        self.db.flush().db()?;
        Ok(())
    }

    /// The highest commit index known to be decided (see `SyncRequest::seen_index`).
    pub fn seen_index(&self) -> Result<u64> {
        Ok(u64_at(&self.meta, "seen_index")?.unwrap_or(0))
    }

    /// Raises the seen index (written now, durable with the next sync).
    pub fn set_seen_index(&self, index: u64) -> Result<()> {
        self.meta.insert("seen_index", &index.to_be_bytes()).db()?;
        Ok(())
    }

    /// Records the cluster this replica joined (durably: it is written once).
    pub fn set_cluster(&self, cluster: ClusterId) -> Result<()> {
        self.meta.insert("cluster", &cluster.0.to_be_bytes()).db()?;
        self.db.flush().db()?;
        Ok(())
    }

    /// The index of the last commit applied here (0 if none).
    pub fn applied_index(&self) -> Result<u64> {
        Ok(self.read_state().applied)
    }

    /// A key's value and version, between applies, never in the middle of
    /// one: a stale read, which does not wait for the key's prepared
    /// transaction, sees a transaction this replica applies wholly or not
    /// at all, read after read.
    pub fn get(&self, key: &[u8]) -> Result<Option<Versioned>> {
        let state = self.read_state();
        Ok(state.map.get(key).map(|(version, value)| Versioned { value: value.clone(), version: *version }))
    }

    /// How many keys are stored.
    pub fn key_count(&self) -> u64 {
        self.read_state().map.len() as u64
    }

    /// One page of a range read (the request must have passed
    /// [`RangeRequest::check`]): the keys in the range from `req.start` on,
    /// at most `req.limit` of them and about [`RANGE_PAGE_BYTES`], all as of
    /// one applied index. Memory is bounded by the page, whatever the range.
    pub fn range(&self, req: &RangeRequest) -> Result<RangePage> {
        self.range_where(req, |_| true)
    }

    /// Like [`ReplicaStore::range`], counting and returning only the keys
    /// `keep` accepts (a participant's share of a page read across
    /// partitions).
    pub fn range_where(&self, req: &RangeRequest, keep: impl Fn(&[u8]) -> bool) -> Result<RangePage> {
        let state = self.read_state();
        let mut page = RangePage { index: state.applied, ..Default::default() };
        let iter = match &req.end {
            Some(end) if end.as_slice() <= req.start.as_slice() => return Ok(page),
            end => state.range(Bound::Included(&req.start), end.as_deref()),
        };
        let mut bytes = 0;
        for (key, (version, value)) in iter {
            if !keep(key) {
                continue;
            }
            let size = key.len() + 8 + if req.keys_only { 0 } else { value.len() };
            if page.entries.len() >= req.limit as usize || (!page.entries.is_empty() && bytes + size > RANGE_PAGE_BYTES)
            {
                page.next = Some(key.clone());
                break;
            }
            bytes += size;
            page.entries.push(RangeEntry {
                key: key.clone(),
                version: *version,
                value: (!req.keys_only).then(|| value.clone()),
            });
        }
        Ok(page)
    }

    /// Every live prepared record in the WAL (one per transaction, the
    /// newest), for recovery.
    pub fn prepared(&self) -> Result<Vec<PreparedRecord>> {
        let index = self.wal_index.lock().unwrap_or_else(|e| e.into_inner());
        index.live_records(&self.wal)
    }

    /// Writes the PREPARED records of one batch as one WAL entry (one sled
    /// insert, not a sled `Batch`: every batch seals sled's write buffer,
    /// which costs a `pwrite` and a `sync_file_range` of its own; see
    /// docs/decisions.md). Not durable until a sync.
    pub fn log_prepared(&self, records: &[PreparedRecord]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut index = self.wal_index.lock().unwrap_or_else(|e| e.into_inner());
        let seq = index.append(&self.wal, &WalEntry::Prepared(records.to_vec()))?;
        for rec in records {
            index.holder.insert(rec.txn_id, seq);
        }
        index.maybe_compact(&self.wal)
    }

    /// Ends transactions' records (aborted, or applied) with one WAL entry.
    /// Needs no sync: a record that reappears after a crash is in doubt,
    /// and the coordinator's answer ends it again.
    pub fn forget_prepared(&self, txns: &[TxnId]) -> Result<()> {
        let mut index = self.wal_index.lock().unwrap_or_else(|e| e.into_inner());
        let held: Vec<TxnId> = txns.iter().copied().filter(|t| index.holder.remove(t).is_some()).collect();
        if held.is_empty() {
            return Ok(());
        }
        index.append(&self.wal, &WalEntry::Resolved(held))?;
        index.maybe_compact(&self.wal)
    }

    /// WAL entries on disk (for tests).
    pub fn wal_entries(&self) -> usize {
        self.wal.len()
    }

    /// Applies committed transactions: [`apply_data`](Self::apply_data),
    /// then [`retire`](Self::retire).
    pub fn apply(&self, entries: &[ApplyEntry]) -> Result<()> {
        self.apply_data(entries)?;
        self.retire(entries)
    }

    /// Writes committed transactions' data and the new applied index as
    /// one record of the data log, then in memory (their WAL records stay
    /// until [`retire`](Self::retire)). One sled insert however many keys
    /// the run writes (see [`data`]); a crash keeps all of it or none.
    pub fn apply_data(&self, entries: &[ApplyEntry]) -> Result<()> {
        let Some(last) = entries.last() else {
            return Ok(());
        };
        let runs: Vec<(u64, &[Write])> = entries.iter().map(|e| (e.index, e.writes.as_slice())).collect();
        let mut state = self.write_state();
        self.log_change(&mut state, &RecordOut::Apply { last: last.index, runs: &runs })?;
        // Test-only: a crash with the run logged and not yet in memory.
        fail::fail_point!("storage::mid_apply_data", |_| {
            let _ = self.db.flush();
            files::crash("storage::mid_apply_data")
        });
        state.apply(runs, last.index);
        Ok(())
    }

    /// The snapshot install in progress, if one is (see [`Install`]).
    pub fn install(&self) -> Result<Option<Install>> {
        self.meta.get("install").db()?.map(|v| decode(&v, "snapshot install")).transpose()
    }

    /// Starts installing a snapshot over this replica's data: from now
    /// until [`finish_install`](Self::finish_install) its data is no state
    /// of the cluster, so it has no applied index, and the marker (flushed
    /// before this returns) says so after a crash too.
    pub fn begin_install(&self) -> Result<Install> {
        let install = Install { low: u64::MAX, high: 0, group: 0, next: Vec::new() };
        self.meta.insert("install", encode(&install)).db()?;
        self.meta.remove("applied_index").db()?;
        self.set_applied(0)?;
        self.db.flush().db()?;
        Ok(install)
    }

    /// Installs one chunk of a snapshot: afterwards the keys `keep` accepts
    /// in `[start, end)` (`end` `None`: to the end) are exactly `entries`
    /// (which lie in that range). Then records `progress`. A crash may lose
    /// the progress and keep the chunk (sled recovers a prefix of its
    /// writes, and the chunk is written first); installing it again is
    /// harmless.
    pub fn install_chunk(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        entries: &[RangeEntry],
        keep: impl Fn(&[u8]) -> bool,
        progress: &Install,
    ) -> Result<()> {
        self.replace_range(start, end, entries, keep)?;
        self.meta.insert("install", encode(progress)).db()?;
        Ok(())
    }

    /// Deletes the keys `drop` accepts from `start` on, looking at `max`
    /// keys at most (one sled batch). Returns how many it deleted and the
    /// key to go on from (`None`: it reached the end). Keys of partitions
    /// that moved away, which this replica no longer serves.
    pub fn delete_where(
        &self,
        start: &[u8],
        max: usize,
        drop: impl Fn(&[u8]) -> bool,
    ) -> Result<(u64, Option<Vec<u8>>)> {
        let mut state = self.write_state();
        let mut removed = Vec::new();
        let mut next = None;
        for (seen, key) in state.range(Bound::Included(start), None).map(|(k, _)| k).enumerate() {
            if seen >= max {
                next = Some(key.clone());
                break;
            }
            if drop(key) {
                removed.push(Key(key.clone()));
            }
        }
        if !removed.is_empty() {
            self.log_change(&mut state, &RecordOut::Replace { removed: &removed, stored: &[] })?;
            state.replace(&removed, &[])?;
        }
        Ok((removed.len() as u64, next))
    }

    /// Makes the keys `keep` accepts in `[start, end)` exactly `entries`,
    /// in one sled batch. Also one chunk of partitions moving to this
    /// replica while it serves others (see `PartitionInstall`): the applied
    /// index is not touched, and the caller flushes after the last chunk.
    pub fn replace_range(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        entries: &[RangeEntry],
        keep: impl Fn(&[u8]) -> bool,
    ) -> Result<()> {
        if entries.iter().any(|e| e.value.is_none()) {
            return Err(Error::Storage("a snapshot chunk without values".into()));
        }
        let incoming: HashSet<&[u8]> = entries.iter().map(|e| e.key.as_slice()).collect();
        let mut state = self.write_state();
        let local = state.range(Bound::Included(start), end);
        let removed: Vec<Key> = local
            .map(|(k, _)| k)
            .filter(|k| keep(k) && !incoming.contains(k.as_slice()))
            .map(|k| Key(k.clone()))
            .collect();
        self.log_change(&mut state, &RecordOut::Replace { removed: &removed, stored: entries })?;
        state.replace(&removed, entries)
    }

    /// Sets the applied index (installs), logged like any change.
    fn set_applied(&self, index: u64) -> Result<()> {
        let mut state = self.write_state();
        self.log_change(&mut state, &RecordOut::Applied(index))?;
        state.applied = index;
        Ok(())
    }

    /// Ends an install: the data is now the replica's state as of
    /// `install.low` (every chunk was read at or after it; replaying the
    /// log from there brings every key to its newest value), and it shows
    /// one state of the cluster again only once `install.high` is applied
    /// ([`consistent_from`](Self::consistent_from)). Flushed before it returns.
    pub fn finish_install(&self, install: &Install) -> Result<()> {
        let low = if install.low == u64::MAX { 0 } else { install.low };
        self.meta.insert("consistent_from", &install.high.max(low).to_be_bytes()).db()?;
        self.set_applied(low)?;
        self.meta.remove("install").db()?;
        self.db.flush().db()?;
        Ok(())
    }

    /// The applied index from which local reads show one state of the
    /// cluster: after a snapshot install, the newest chunk's; after a crash
    /// in the middle of an apply, the last index of that apply (see
    /// [`apply_data`](Self::apply_data)); 0 otherwise.
    pub fn consistent_from(&self) -> Result<u64> {
        let stored = u64_at(&self.meta, "consistent_from")?.unwrap_or(0);
        let applying = u64_at(&self.meta, APPLYING)?.unwrap_or(0);
        Ok(if applying > self.applied_index()? { stored.max(applying) } else { stored })
    }

    /// Removes applied transactions' WAL records.
    pub fn retire(&self, entries: &[ApplyEntry]) -> Result<()> {
        let txns: Vec<TxnId> = entries.iter().map(|e| e.txn_id).collect();
        self.forget_prepared(&txns)
    }

    pub fn flush(&self) -> Result<()> {
        self.db.flush().db()?;
        Ok(())
    }
}

/// One WAL entry (see the module docs).
#[derive(Debug, Serialize, Deserialize)]
enum WalEntry {
    /// The records of one PREPARE batch.
    Prepared(Vec<PreparedRecord>),
    /// Transactions whose records are dead from here on.
    Resolved(Vec<TxnId>),
}

/// Entries on disk that trigger a compaction.
const WAL_COMPACT_AT: u64 = 64;

/// Where each live PREPARED record is, and the WAL's extent (see the
/// module docs).
#[derive(Debug, Default)]
struct WalIndex {
    /// Entries on disk have sequence numbers `first..next`.
    first: u64,
    next: u64,
    /// Live records: transaction -> the entry holding its newest record.
    holder: HashMap<TxnId, u64>,
}

impl WalIndex {
    /// Replays the WAL (moving records of the old layout, one per txn id
    /// key, into one entry first).
    fn open(wal: &sled::Tree) -> Result<WalIndex> {
        let mut old_layout = Vec::new();
        let mut old_keys = Vec::new();
        let mut index = WalIndex { first: 1, next: 1, holder: HashMap::new() };
        let mut first = None;
        for entry in wal.iter() {
            let (key, value) = entry.db()?;
            match key.len() {
                8 => {
                    let seq = u64::from_be_bytes(key.as_ref().try_into().expect("8 bytes"));
                    first.get_or_insert(seq);
                    index.next = seq + 1;
                    match decode(&value, "WAL")? {
                        WalEntry::Prepared(records) => {
                            for r in records {
                                index.holder.insert(r.txn_id, seq);
                            }
                        }
                        WalEntry::Resolved(txns) => {
                            for t in txns {
                                index.holder.remove(&t);
                            }
                        }
                    }
                }
                16 => {
                    old_layout.push(decode::<PreparedRecord>(&value, "WAL")?);
                    old_keys.push(key);
                }
                n => return Err(Error::Storage(format!("corrupt WAL: a key of {n} bytes"))),
            }
        }
        index.first = first.unwrap_or(index.next);
        if !old_layout.is_empty() {
            let seq = index.next;
            let mut batch = sled::Batch::default();
            batch.insert(&seq.to_be_bytes(), encode(&WalEntry::Prepared(old_layout.clone())));
            for k in old_keys {
                batch.remove(k);
            }
            wal.apply_batch(batch).db()?;
            wal.flush().db()?;
            for r in &old_layout {
                index.holder.insert(r.txn_id, seq);
            }
            index.first = index.first.min(seq);
            index.next = seq + 1;
        }
        Ok(index)
    }

    /// Writes `entry` as the next one; returns its sequence number.
    fn append(&mut self, wal: &sled::Tree, entry: &WalEntry) -> Result<u64> {
        let seq = self.next;
        wal.insert(seq.to_be_bytes(), encode(entry)).db()?;
        self.next += 1;
        Ok(seq)
    }

    /// The live records, read from their entries.
    fn live_records(&self, wal: &sled::Tree) -> Result<Vec<PreparedRecord>> {
        let mut live = Vec::new();
        let entries: BTreeSet<u64> = self.holder.values().copied().collect();
        for seq in entries {
            let value = wal.get(seq.to_be_bytes()).db()?.ok_or_else(|| {
                Error::Storage(format!("corrupt WAL: entry {seq} holds a live record but is missing"))
            })?;
            let WalEntry::Prepared(records) = decode(&value, "WAL")? else {
                return Err(Error::Storage(format!("corrupt WAL: entry {seq} holds no records")));
            };
            live.extend(records.into_iter().filter(|r| self.holder.get(&r.txn_id) == Some(&seq)));
        }
        Ok(live)
    }

    /// Once [`WAL_COMPACT_AT`] entries are on disk: the live records move
    /// into one new entry (none if there are none), then every earlier entry
    /// is removed in one batch. A crash in between leaves both copies, and
    /// the replay takes the newer.
    fn maybe_compact(&mut self, wal: &sled::Tree) -> Result<()> {
        if self.next - self.first < WAL_COMPACT_AT {
            return Ok(());
        }
        let live = self.live_records(wal)?;
        if !live.is_empty() {
            let seq = self.append(wal, &WalEntry::Prepared(live))?;
            for seq_of in self.holder.values_mut() {
                *seq_of = seq;
            }
        }
        let keep_from = if self.holder.is_empty() { self.next } else { self.next - 1 };
        let mut batch = sled::Batch::default();
        for seq in self.first..keep_from {
            batch.remove(&seq.to_be_bytes());
        }
        wal.apply_batch(batch).db()?;
        self.first = keep_from;
        Ok(())
    }
}

/// The coordinator's identity file (see the module docs).
pub const COORDINATOR_ID_FILE: &str = "treaty-coordinator.id";

fn write_id_file(dir: &Path, cluster: ClusterId, participants: &[String]) -> Result<()> {
    use std::io::Write as _;
    let path = dir.join(COORDINATOR_ID_FILE);
    let text = format!(
        "# Treaty coordinator identity: written once when the cluster was created. Do not edit or delete.\n\
         cluster {cluster}\nparticipants {}\n",
        participants.join(",")
    );
    let tmp = dir.join(format!("{COORDINATOR_ID_FILE}.tmp"));
    let mut f = File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    File::open(dir)?.sync_all()?;
    Ok(())
}

fn parse_id_file(text: &str) -> Option<(ClusterId, Vec<String>)> {
    let mut cluster = None;
    let mut participants = None;
    for line in text.lines() {
        if let Some(c) = line.strip_prefix("cluster ") {
            cluster = Some(ClusterId(u64::from_str_radix(c.trim(), 16).ok()?));
        } else if let Some(p) = line.strip_prefix("participants ") {
            participants = Some(p.trim().split(',').map(str::to_string).collect());
        }
    }
    Some((cluster?, participants?))
}

/// A snapshot install in progress on a replica, kept in its `meta` tree
/// until it ends. The chunks come in a fixed plan of groups (a group: keys
/// of some partitions, read from one of their replicas), each in key order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Install {
    /// The lowest and highest applied index of a chunk copied so far
    /// (`u64::MAX` and 0 before the first).
    pub low: u64,
    pub high: u64,
    /// The group being copied (the ones before it are done) ...
    pub group: usize,
    /// ... and the key to continue it at.
    pub next: Vec<u8>,
}

/// The first outcome of a transaction id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Decision {
    Committed(u64),
    /// A condition failed; the reason names it.
    Aborted(String),
}

/// Which transaction ids have a decision in the coordinator's store, kept
/// in memory so that a submission's duplicate check and a commit's record
/// touch no sled tree but the log (see the module docs). Bounded by the log's
/// retained window: compaction removes what it removes from the store.
#[derive(Debug, Default)]
struct DecisionIndex {
    /// Commits in the log: txn id -> commit index.
    commits: HashMap<TxnId, u64>,
    /// Transactions with an abort decision in the `decisions` tree.
    aborted: HashSet<TxnId>,
}

/// The coordinator's sled store: identity, decision log, outcomes.
#[derive(Clone)]
pub struct CoordinatorStore {
    db: sled::Db,
    /// Where sled's files are (the data dir or a subdirectory, see [`files`]).
    files: PathBuf,
    meta: sled::Tree,
    log: sled::Tree,
    decisions: sled::Tree,
    /// Abort decisions filed by the commit index they came after:
    /// 8-byte big-endian index ++ 16-byte txn id -> nothing (for compaction).
    aborts: sled::Tree,
    /// What the log and `decisions` hold, by txn id (changed only together
    /// with them, under this lock).
    index: Arc<Mutex<DecisionIndex>>,
}

/// The transaction id of a bincode [`LogEntry`] without decoding its writes
/// (its fields are the index, 8 bytes, then the id, 16 bytes little-endian).
fn log_entry_txn(bytes: &[u8]) -> Result<TxnId> {
    bytes
        .get(8..24)
        .map(|b| TxnId(u128::from_le_bytes(b.try_into().expect("16 bytes"))))
        .ok_or_else(|| Error::Storage(format!("corrupt log record: {} bytes", bytes.len())))
}

impl CoordinatorStore {
    /// Opens (or creates) the coordinator's store for a cluster of
    /// `participants`. A new store (in a missing or empty directory) gets a
    /// fresh random cluster id. Refuses, touching nothing, a directory made
    /// for a different participant list, and a damaged one: its identity
    /// file remains but the database lost the cluster, or it is not empty
    /// and holds no coordinator state.
    pub fn open(dir: &Path, participants: &[String]) -> Result<(Self, ClusterId)> {
        let id_file = dir.join(COORDINATOR_ID_FILE);
        let was_empty = match std::fs::read_dir(dir) {
            Ok(mut entries) => entries.next().is_none(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(e) => return Err(Error::Storage(format!("cannot read data dir {}: {e}", dir.display()))),
        };
        let recorded = match std::fs::read_to_string(&id_file) {
            Ok(text) => Some(parse_id_file(&text).ok_or_else(|| {
                Error::Storage(format!(
                    "{} is unreadable: the data dir is damaged; restore it from a backup (see the README's operations \
                     section) rather than starting over",
                    id_file.display()
                ))
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::Storage(format!("cannot read {}: {e}", id_file.display()))),
        };
        let (db, files) = open_db(dir, COORDINATOR_CACHE_BYTES)?;
        if has_tree(&db, "wal") {
            return Err(Error::Identity(format!(
                "data dir {} belongs to a participant, not the coordinator: give the coordinator its own directory",
                dir.display()
            )));
        }
        let meta = db.open_tree("meta").db()?;
        let cluster = match (u64_at(&meta, "cluster")?, recorded) {
            (Some(c), recorded) => {
                let stored: Vec<String> = match meta.get("participants").db()? {
                    Some(v) => decode(&v, "participant list")?,
                    None => vec![],
                };
                if let Some((rc, _)) = recorded {
                    if rc != ClusterId(c) {
                        return Err(Error::Storage(format!(
                            "data dir {} is damaged: its database holds cluster {} but {} says cluster {rc}; \
                             restore the data dir from a backup",
                            dir.display(),
                            ClusterId(c),
                            id_file.display()
                        )));
                    }
                }
                if stored != participants {
                    return Err(Error::Identity(format!(
                        "data dir {} was created for participants {} but --participants is {}: \
                         start with the original list (ids are positions in it), or use a new data dir for a new cluster",
                        dir.display(),
                        stored.join(","),
                        participants.join(",")
                    )));
                }
                if !id_file.exists() {
                    write_id_file(dir, ClusterId(c), &stored)?;
                }
                ClusterId(c)
            }
            (None, Some((rc, _))) => {
                return Err(Error::Storage(format!(
                    "data dir {} is damaged: {} records cluster {rc}, but the database holds no cluster (truncated or \
                     replaced). Refusing to start a new cluster over it: restore the data dir from its newest backup \
                     (see the README's operations section)",
                    dir.display(),
                    id_file.display()
                )));
            }
            (None, None) if !was_empty => {
                return Err(Error::Storage(format!(
                    "data dir {} is not empty but holds no coordinator state: it is damaged or belongs to something \
                     else. Restore it from a backup, or point --data-dir at an empty directory to create a new cluster",
                    dir.display()
                )));
            }
            (None, None) => {
                let c = ClusterId(rand::random::<u64>() | 1);
                meta.insert("participants", encode(&participants.to_vec())).db()?;
                meta.insert("cluster", &c.0.to_be_bytes()).db()?;
                Durability::new(db.clone(), &files)?.sync()?;
                write_id_file(dir, c, participants)?;
                c
            }
        };
        let log = db.open_tree("log").db()?;
        let aborts = db.open_tree("aborts").db()?;
        let mut index = DecisionIndex::default();
        for item in log.iter() {
            let (k, v) = item.db()?;
            let at = u64::from_be_bytes(k.as_ref().try_into().expect("8-byte index"));
            index.commits.insert(log_entry_txn(&v)?, at);
        }
        for item in aborts.iter() {
            let (k, _) = item.db()?;
            index.aborted.insert(TxnId(u128::from_be_bytes(k[8..].try_into().expect("8-byte index ++ txn id"))));
        }
        let store = CoordinatorStore {
            log,
            decisions: db.open_tree("decisions").db()?,
            aborts,
            index: Arc::new(Mutex::new(index)),
            meta,
            files,
            db,
        };
        Ok((store, cluster))
    }

    /// Starts a new incarnation: the next generation with a fresh nonce,
    /// recorded durably in the history before it is used. Returns it with
    /// the whole history (generation -> nonce), itself included.
    pub fn start_incarnation(&self) -> Result<(Incarnation, BTreeMap<u64, u64>)> {
        let mut history: BTreeMap<u64, u64> = match self.meta.get("history").db()? {
            Some(v) => decode(&v, "incarnation history")?,
            None => BTreeMap::new(),
        };
        let generation = history.keys().next_back().map_or(1, |g| g + 1);
        let inc = Incarnation { generation, nonce: rand::random() };
        history.insert(generation, inc.nonce);
        self.meta.insert("history", encode(&history)).db()?;
        Durability::new(self.db.clone(), &self.files)?.sync()?;
        Ok((inc, history))
    }

    pub fn durability(&self) -> Result<Durability> {
        Durability::new(self.db.clone(), &self.files)
    }

    /// The stored view, if any.
    /// The cluster's replication degree and partition count, fixed when it
    /// was created: recorded on the first start (`requested`, default all
    /// `n` participants, with `partitions` partitions), refused if a later
    /// start asks for another degree. A cluster created before partitioning
    /// existed holds full copies. Synced before it returns.
    pub fn placement(&self, requested: Option<usize>, n: usize, partitions: u32) -> Result<(usize, u32)> {
        let stored = (u64_at(&self.meta, "replication")?, u64_at(&self.meta, "partitions")?);
        let (replication, partitions) = match stored {
            (Some(r), Some(p)) => (r as usize, p as u32),
            _ if self.last_index()? > 0 => (n, 1),
            _ => {
                let r = requested.unwrap_or(n);
                self.meta.insert("replication", &(r as u64).to_be_bytes()).db()?;
                self.meta.insert("partitions", &u64::from(partitions).to_be_bytes()).db()?;
                self.durability()?.sync()?;
                return Ok((r, partitions));
            }
        };
        match requested {
            Some(r) if r != replication => Err(Error::Identity(format!(
                "this cluster was created with replication {replication} (each key on {replication} of {n} \
                 participants) and it cannot change on a restart: start without --replication (TREATY_REPLICATION), \
                 or with {replication}"
            ))),
            _ => Ok((replication, partitions)),
        }
    }

    /// The placement as the last move of partitions left it (`None`: none
    /// moved since the cluster was created).
    pub fn placement_spec(&self) -> Result<Option<treaty_core::protocol::PlacementSpec>> {
        self.meta.get("placement").db()?.map(|v| decode(&v, "placement")).transpose()
    }

    /// Stores the placement after a move of partitions, durably (synced
    /// before it returns).
    pub fn set_placement(&self, spec: &treaty_core::protocol::PlacementSpec) -> Result<()> {
        self.meta.insert("placement", encode(spec)).db()?;
        Durability::new(self.db.clone(), &self.files)?.sync()
    }

    pub fn view(&self) -> Result<Option<treaty_core::protocol::View>> {
        self.meta.get("view").db()?.map(|v| decode(&v, "view")).transpose()
    }

    /// Stores the view durably (synced before it returns).
    pub fn set_view(&self, view: &treaty_core::protocol::View) -> Result<()> {
        self.meta.insert("view", encode(view)).db()?;
        Durability::new(self.db.clone(), &self.files)?.sync()
    }

    /// The stored roster (`None`: never changed since the cluster was
    /// created, so it is the `--participants` list).
    pub fn roster(&self) -> Result<Option<treaty_core::protocol::Roster>> {
        self.meta.get("roster").db()?.map(|v| decode(&v, "roster")).transpose()
    }

    /// Stores the view and the roster in one batch, durably (synced before
    /// it returns): a crash keeps both or neither.
    pub fn set_membership(
        &self,
        view: &treaty_core::protocol::View,
        roster: &treaty_core::protocol::Roster,
    ) -> Result<()> {
        let mut batch = sled::Batch::default();
        batch.insert("view", encode(view));
        batch.insert("roster", encode(roster));
        self.meta.apply_batch(batch).db()?;
        Durability::new(self.db.clone(), &self.files)?.sync()
    }

    /// Highest commit index in the log (0 if none).
    pub fn last_index(&self) -> Result<u64> {
        Ok(match self.log.last().db()? {
            Some((k, _)) => u64::from_be_bytes(k.as_ref().try_into().expect("8-byte index")),
            None => 0,
        })
    }

    /// The recorded decision of a transaction id, if any (written, not
    /// necessarily synced yet: the caller compares a commit's index with the
    /// durable one). Only an abort's reason is read from disk.
    pub fn decision(&self, txn_id: TxnId) -> Result<Option<Decision>> {
        {
            let index = self.index.lock().unwrap();
            if let Some(&i) = index.commits.get(&txn_id) {
                return Ok(Some(Decision::Committed(i)));
            }
            if !index.aborted.contains(&txn_id) {
                return Ok(None);
            }
        }
        self.decisions.get(txn_id.0.to_be_bytes()).db()?.map(|v| decode(&v, "decision")).transpose()
    }

    /// Writes commits to the log, one insert each in index order. Not
    /// durable until a sync; a crash before it keeps a prefix of them
    /// (sled recovers a prefix of its log), and each entry is a decision of
    /// its own that nobody has heard of yet, so any prefix is a consistent
    /// log. Not a sled batch: sled seals and writes out two log buffers for
    /// every batch (`pin_log`), and the sync after this waits for them.
    pub fn record_commits(&self, entries: &[LogEntry]) -> Result<()> {
        let mut index = self.index.lock().unwrap();
        for e in entries {
            self.log.insert(e.index.to_be_bytes(), encode(e)).db()?;
        }
        index.commits.extend(entries.iter().map(|e| (e.txn_id, e.index)));
        Ok(())
    }

    /// Records that a transaction aborted on a failed condition (unsynced),
    /// filed under `after`, the last commit index when it was decided: it
    /// is forgotten when the log is compacted past that index.
    pub fn record_abort(&self, txn_id: TxnId, reason: &str, after: u64) -> Result<()> {
        let mut index = self.index.lock().unwrap();
        self.decisions.insert(txn_id.0.to_be_bytes(), encode(&Decision::Aborted(reason.to_string()))).db()?;
        let mut key = after.to_be_bytes().to_vec();
        key.extend_from_slice(&txn_id.0.to_be_bytes());
        self.aborts.insert(key, &[]).db()?;
        index.aborted.insert(txn_id);
        Ok(())
    }

    /// The index through which the log has been compacted (0: nothing was).
    pub fn compacted_through(&self) -> Result<u64> {
        Ok(u64_at(&self.meta, "compacted_through")?.unwrap_or(0))
    }

    /// Removes the log entries with index <= `through`, their commit
    /// decisions, and the abort decisions filed at or below it; at most
    /// `max` log entries per call (the caller calls again). Returns the
    /// index compacted through now. Not synced: a crash can only bring back
    /// entries that are no longer served, and the next call removes them.
    ///
    /// The caller keeps `through` below the last index (the log's end is
    /// the coordinator's `last_index`) and at or below what every replica
    /// that may still fetch from the log has applied.
    pub fn compact(&self, through: u64, max: usize) -> Result<u64> {
        let done = self.compacted_through()?;
        if through <= done {
            return Ok(done);
        }
        let (mut log, mut decisions, mut aborts) =
            (sled::Batch::default(), sled::Batch::default(), sled::Batch::default());
        let (mut forget_commits, mut forget_aborts) = (Vec::new(), Vec::new());
        let mut reached = through;
        // From the start: entries a crash brought back below the mark go too.
        for (n, item) in self.log.range(..=through.to_be_bytes()).enumerate() {
            let (k, v) = item.db()?;
            if n >= max {
                reached = u64::from_be_bytes(k.as_ref().try_into().expect("8-byte index")) - 1;
                break;
            }
            let txn = log_entry_txn(&v)?;
            log.remove(k);
            // Commit decisions of data dirs written before they moved to memory.
            decisions.remove(&txn.0.to_be_bytes());
            forget_commits.push(txn);
        }
        if reached <= done {
            return Ok(done);
        }
        for item in self.aborts.range(..(reached + 1).to_be_bytes()) {
            let (k, _) = item.db()?;
            decisions.remove(&k[8..]);
            forget_aborts.push(TxnId(u128::from_be_bytes(k[8..].try_into().expect("8-byte index ++ txn id"))));
            aborts.remove(k);
        }
        let mut index = self.index.lock().unwrap();
        // The mark first: from here on nothing at or below it is served.
        self.meta.insert("compacted_through", &reached.to_be_bytes()).db()?;
        self.decisions.apply_batch(decisions).db()?;
        self.aborts.apply_batch(aborts).db()?;
        self.log.apply_batch(log).db()?;
        for t in forget_commits {
            index.commits.remove(&t);
        }
        for t in forget_aborts {
            index.aborted.remove(&t);
        }
        Ok(reached)
    }

    /// Log entries and decisions held (for status and tests).
    pub fn log_len(&self) -> (usize, usize) {
        let index = self.index.lock().unwrap();
        (self.log.len(), index.commits.len() + index.aborted.len())
    }

    /// Log entries with index >= `from`, at most `max` of them and about
    /// `max_bytes` in total (always at least one if any exist). Entries
    /// already compacted away are an [`Error::Compacted`]: the asker needs
    /// a snapshot.
    pub fn entries(&self, from: u64, max: u64, max_bytes: usize) -> Result<Vec<LogEntry>> {
        let compacted = self.compacted_through()?;
        if from <= compacted {
            return Err(Error::Compacted(compacted));
        }
        let mut out: Vec<LogEntry> = Vec::new();
        let mut bytes = 0;
        for item in self.log.range(from.to_be_bytes()..) {
            let (_, v) = item.db()?;
            if out.len() as u64 >= max || (bytes + v.len() > max_bytes && !out.is_empty()) {
                break;
            }
            bytes += v.len();
            out.push(decode(&v, "log")?);
        }
        // A compaction between reading the mark and the entries.
        if out.first().is_some_and(|e| e.index != from) {
            return Err(Error::Compacted(self.compacted_through()?.max(from)));
        }
        Ok(out)
    }

    pub fn flush(&self) -> Result<()> {
        self.db.flush().db()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::time::{Duration, Instant};

    /// Keys and values are serialized as byte strings (`serde_bytes`); the
    /// bytes must stay those of the plain sequences they were before, in
    /// both of bincode's integer encodings (fixed in the stores, variable
    /// on the wire), so that logs, WALs and peers from before read the same.
    #[test]
    fn keys_and_values_encode_as_the_sequences_they_were() {
        use bincode::Options;
        use serde::Serialize;
        use treaty_core::types::Condition;
        #[derive(Serialize)]
        enum PlainWrite {
            Put(Vec<u8>, Vec<u8>),
            Delete(Vec<u8>),
        }
        #[derive(Serialize)]
        enum PlainCondition {
            ValueEquals(Vec<u8>, Vec<u8>),
            VersionEquals(Vec<u8>, u64),
            Exists(Vec<u8>),
            Missing(Vec<u8>),
        }
        #[derive(Serialize)]
        struct PlainVersioned {
            value: Vec<u8>,
            version: u64,
        }
        #[derive(Serialize)]
        struct PlainRangeEntry {
            key: Vec<u8>,
            version: u64,
            value: Option<Vec<u8>>,
        }
        fn same<A: Serialize, B: Serialize + for<'de> Deserialize<'de> + PartialEq + std::fmt::Debug>(
            new: &B,
            old: &A,
        ) {
            let fixed = bincode::serialize(new).unwrap();
            assert_eq!(fixed, bincode::serialize(old).unwrap());
            assert_eq!(&bincode::deserialize::<B>(&fixed).unwrap(), new);
            let varint = bincode::DefaultOptions::new();
            let wire = varint.serialize(new).unwrap();
            assert_eq!(wire, varint.serialize(old).unwrap());
            assert_eq!(&varint.deserialize::<B>(&wire).unwrap(), new);
        }
        let (k, v) = (b"user/42".to_vec(), (0..=255u8).cycle().take(300).collect::<Vec<u8>>());
        same(&Write::Put(k.clone(), v.clone()), &PlainWrite::Put(k.clone(), v.clone()));
        same(&Write::Put(k.clone(), Vec::new()), &PlainWrite::Put(k.clone(), Vec::new()));
        same(&Write::Delete(k.clone()), &PlainWrite::Delete(k.clone()));
        same(&Condition::ValueEquals(k.clone(), v.clone()), &PlainCondition::ValueEquals(k.clone(), v.clone()));
        same(&Condition::VersionEquals(k.clone(), 7), &PlainCondition::VersionEquals(k.clone(), 7));
        same(&Condition::Exists(k.clone()), &PlainCondition::Exists(k.clone()));
        same(&Condition::Missing(k.clone()), &PlainCondition::Missing(k.clone()));
        same(&Versioned { value: v.clone(), version: 9 }, &PlainVersioned { value: v.clone(), version: 9 });
        for value in [Some(v.clone()), None] {
            same(
                &RangeEntry { key: k.clone(), version: 3, value: value.clone() },
                &PlainRangeEntry { key: k.clone(), version: 3, value },
            );
        }
        // A length beyond the input is an error, not an allocation.
        let mut short = bincode::serialize(&Write::Delete(k.clone())).unwrap();
        short[4..12].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(bincode::deserialize::<Write>(&short).is_err());
    }

    /// Drops a replica store and opens its directory again.
    fn restarted(s: ReplicaStore, dir: &Path) -> ReplicaStore {
        drop(s);
        reopen(|| ReplicaStore::open(dir, 1)).unwrap()
    }

    /// Opens again a store the test has just dropped: sled releases its
    /// file lock from a background thread a moment after the last handle
    /// goes, so a reopen at once can find the lock still held.
    fn reopen<T>(open: impl Fn() -> Result<T>) -> Result<T> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match open() {
                Err(e) if e.to_string().contains("could not acquire lock") && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                r => return r,
            }
        }
    }

    #[test]
    fn a_participant_dir_refuses_another_node_id_and_stays_intact() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = ReplicaStore::open(dir.path(), 1).unwrap();
            let e = ApplyEntry {
                index: 1,
                txn_id: TxnId(5),
                writes: vec![Write::Put(b"k".to_vec(), b"v".to_vec())].into(),
            };
            s.apply(&[e]).unwrap();
            s.flush().unwrap();
        }
        let err = reopen(|| ReplicaStore::open(dir.path(), 2)).err().unwrap().to_string();
        assert!(err.contains("belongs to participant 1") && err.contains("participant 2"), "{err}");
        let s = reopen(|| ReplicaStore::open(dir.path(), 1)).unwrap();
        assert_eq!(s.get(b"k").unwrap().unwrap(), Versioned { value: b"v".to_vec(), version: 1 });
        assert_eq!(s.applied_index().unwrap(), 1);
    }

    #[test]
    fn the_applied_index_travels_with_the_data_and_is_no_client_key() {
        let dir = tempfile::tempdir().unwrap();
        let rec = PreparedRecord {
            txn_id: TxnId(9),
            attempt: 1,
            writes: vec![Write::Put(b"k".to_vec(), b"v".to_vec())].into(),
        };
        {
            // A directory from before the applied index moved to `data` keeps it in `meta`.
            let s = ReplicaStore::open(dir.path(), 1).unwrap();
            s.meta.insert("applied_index", &4u64.to_be_bytes()).unwrap();
            s.flush().unwrap();
            drop(s);
            let s = reopen(|| ReplicaStore::open(dir.path(), 1)).unwrap();
            assert_eq!(s.applied_index().unwrap(), 4);
            s.log_prepared(std::slice::from_ref(&rec)).unwrap();
            // A crash between apply's two writes: the data and index only.
            s.apply_data(&[ApplyEntry { index: 5, txn_id: TxnId(9), writes: rec.writes.clone() }]).unwrap();
            s.flush().unwrap();
        }
        let s = reopen(|| ReplicaStore::open(dir.path(), 1)).unwrap();
        assert_eq!(s.applied_index().unwrap(), 5);
        assert_eq!(s.get(b"k").unwrap().unwrap(), Versioned { value: b"v".to_vec(), version: 5 });
        assert_eq!(s.get(b"").unwrap(), None, "the applied index must not read as a key");
        assert_eq!(s.prepared().unwrap(), vec![rec], "the record outlives a half-done apply");
    }

    /// A directory written before the data log, by a version whose crash
    /// in the middle of an apply kept part of its data without its applied
    /// index: opening it moves the data into a checkpoint, the store says
    /// its data is no state of the cluster until the run is applied again,
    /// and the second apply gives exactly the right data.
    #[test]
    fn a_torn_apply_of_the_sled_layout_is_reported_until_it_is_applied_again() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = ReplicaStore::open(dir.path(), 1).unwrap();
            let old = s.db.open_tree("data").unwrap();
            old.insert(b"a", encode_versioned(3, b"3")).unwrap();
            old.insert(b"b", encode_versioned(1, b"1")).unwrap();
            old.insert(APPLIED_KEY, &1u64.to_be_bytes()).unwrap();
            s.meta.insert(APPLYING, &3u64.to_be_bytes()).unwrap();
            s.flush().unwrap();
        }
        let s = reopen(|| ReplicaStore::open(dir.path(), 1)).unwrap();
        assert!(!has_tree(&s.db, "data"), "the old tree is dropped once converted");
        assert!(dir.path().join(data::CHECKPOINT).exists());
        assert_eq!(s.applied_index().unwrap(), 1);
        assert_eq!(s.key_count(), 2);
        assert_eq!(s.consistent_from().unwrap(), 3, "part of index 3 is here: not one state until it is applied");
        let s = restarted(s, dir.path());
        assert_eq!((s.applied_index().unwrap(), s.consistent_from().unwrap()), (1, 3), "the checkpoint holds it");
        let run = [
            ApplyEntry { index: 2, txn_id: TxnId(2), writes: vec![Write::Delete(b"b".to_vec())].into() },
            ApplyEntry {
                index: 3,
                txn_id: TxnId(3),
                writes: vec![Write::Put(b"a".to_vec(), b"3".to_vec()), Write::Put(b"c".to_vec(), b"3".to_vec())].into(),
            },
        ];
        s.apply_data(&run).unwrap();
        assert_eq!((s.applied_index().unwrap(), s.consistent_from().unwrap()), (3, 0));
        assert_eq!(s.get(b"a").unwrap().unwrap(), Versioned { value: b"3".to_vec(), version: 3 });
        assert_eq!(s.get(b"b").unwrap(), None);
        assert_eq!(s.get(b"c").unwrap().unwrap(), Versioned { value: b"3".to_vec(), version: 3 });
        // An install's mark still counts when it is the higher one.
        s.meta.insert("consistent_from", &9u64.to_be_bytes()).unwrap();
        assert_eq!(s.consistent_from().unwrap(), 9);
    }

    /// Values over sled's blob threshold live in blob files, which the
    /// patched sled syncs as it writes them: a synced record and applied
    /// data of 1 MiB read back after a restart.
    #[test]
    fn values_kept_in_sled_blob_files_read_back_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let big: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
        let rec = PreparedRecord {
            txn_id: TxnId(3),
            attempt: 1,
            writes: vec![Write::Put(b"big".to_vec(), big.clone())].into(),
        };
        let s = ReplicaStore::open(dir.path(), 1).unwrap();
        s.log_prepared(std::slice::from_ref(&rec)).unwrap();
        put_all(&s, 1, &[(b"applied", &big)]);
        s.durability().unwrap().sync().unwrap();
        let blobs = std::fs::read_dir(s.files.join("blobs")).unwrap().count();
        assert!(blobs >= 2, "a record and a value of 1 MiB are sled blobs ({blobs} blob files)");
        let s = restarted(s, dir.path());
        assert_eq!(s.prepared().unwrap(), vec![rec]);
        assert_eq!(s.get(b"applied").unwrap().unwrap(), Versioned { value: big, version: 1 });
    }

    fn put_all(s: &ReplicaStore, index: u64, kvs: &[(&[u8], &[u8])]) {
        let writes = kvs.iter().map(|(k, v)| Write::Put(k.to_vec(), v.to_vec())).collect::<Vec<_>>();
        s.apply(&[ApplyEntry { index, txn_id: TxnId(index.into()), writes: writes.into() }]).unwrap();
    }

    fn keys(page: &RangePage) -> Vec<&[u8]> {
        page.entries.iter().map(|e| e.key.as_slice()).collect()
    }

    #[test]
    fn range_pages_cover_the_range_once_and_hide_the_applied_index() {
        let dir = tempfile::tempdir().unwrap();
        let s = ReplicaStore::open(dir.path(), 1).unwrap();
        put_all(&s, 1, &[(b"a", b"1"), (b"b/1", b"2"), (b"b/2", b"3"), (b"b/3", b"4"), (b"c", b"5")]);
        put_all(&s, 2, &[(b"b/2", b"33")]);
        // Everything, from the empty start: the applied index's empty key is not listed.
        let all = s.range(&RangeRequest::prefix(b"")).unwrap();
        assert_eq!(keys(&all), [b"a".as_slice(), b"b/1", b"b/2", b"b/3", b"c"]);
        assert_eq!((all.next, all.index), (None, 2));
        assert_eq!(all.entries[2], RangeEntry { key: b"b/2".to_vec(), version: 2, value: Some(b"33".to_vec()) });
        // A prefix, two at a time, keys only.
        let mut req = RangeRequest { limit: 2, keys_only: true, ..RangeRequest::prefix(b"b/") };
        let first = s.range(&req).unwrap();
        assert_eq!(keys(&first), [b"b/1".as_slice(), b"b/2"]);
        assert_eq!(first.entries[1].value, None);
        assert_eq!(first.entries[1].version, 2);
        req.start = first.next.clone().expect("more to come");
        let second = s.range(&req).unwrap();
        assert_eq!((keys(&second), second.next.as_deref()), (vec![b"b/3".as_slice()], None));
        // Explicit bounds: start inclusive, end exclusive; an empty range is empty.
        let bounded = RangeRequest { start: b"a".to_vec(), end: Some(b"b/3".to_vec()), ..RangeRequest::prefix(b"") };
        assert_eq!(keys(&s.range(&bounded).unwrap()), [b"a".as_slice(), b"b/1", b"b/2"]);
        let empty = RangeRequest { start: b"b".to_vec(), end: Some(b"b".to_vec()), ..RangeRequest::prefix(b"") };
        assert!(s.range(&empty).unwrap().entries.is_empty());
    }

    #[test]
    fn a_range_page_stays_near_its_byte_budget() {
        let dir = tempfile::tempdir().unwrap();
        let s = ReplicaStore::open(dir.path(), 1).unwrap();
        let big = vec![7u8; 300 * 1024];
        let keys: Vec<Vec<u8>> = (0..8u8).map(|i| vec![b'k', b'0' + i]).collect();
        for (i, k) in keys.iter().enumerate() {
            put_all(&s, i as u64 + 1, &[(k, &big)]);
        }
        let page = s.range(&RangeRequest::prefix(b"k")).unwrap();
        // Three values of 300 KiB fit in 1 MiB, a fourth would not.
        assert_eq!(page.entries.len(), 3);
        assert_eq!(page.next.as_deref(), Some(b"k3".as_slice()));
        // Keys only: the whole range in one page.
        let page = s.range(&RangeRequest { keys_only: true, ..RangeRequest::prefix(b"k") }).unwrap();
        assert_eq!((page.entries.len(), page.next), (8, None));
    }

    #[test]
    fn a_range_page_never_shows_half_of_an_apply() {
        let dir = tempfile::tempdir().unwrap();
        let s = ReplicaStore::open(dir.path(), 1).unwrap();
        let keys: Vec<Vec<u8>> = (0..64).map(|i| format!("acct/{i:02}").into_bytes()).collect();
        let writer = {
            let (s, keys) = (s.clone(), keys.clone());
            std::thread::spawn(move || {
                for index in 1..=300u64 {
                    let value = index.to_string().into_bytes();
                    let kvs: Vec<(&[u8], &[u8])> = keys.iter().map(|k| (k.as_slice(), value.as_slice())).collect();
                    put_all(&s, index, &kvs);
                }
            })
        };
        let mut pages = 0;
        while !writer.is_finished() || pages == 0 {
            let page = s.range(&RangeRequest::prefix(b"acct/")).unwrap();
            pages += 1;
            if page.entries.is_empty() {
                continue;
            }
            assert_eq!(page.entries.len(), 64);
            assert!(
                page.entries.iter().all(|e| e.version == page.index),
                "page at index {} shows versions {:?}",
                page.index,
                page.entries.iter().map(|e| e.version).collect::<BTreeSet<_>>()
            );
        }
        writer.join().unwrap();
    }

    #[test]
    fn apply_is_atomic_with_the_applied_index_and_wal() {
        let dir = tempfile::tempdir().unwrap();
        let s = ReplicaStore::open(dir.path(), 1).unwrap();
        let rec = PreparedRecord { txn_id: TxnId(7), attempt: 1, writes: vec![Write::Delete(b"a".to_vec())].into() };
        s.log_prepared(std::slice::from_ref(&rec)).unwrap();
        assert_eq!(s.prepared().unwrap(), vec![rec.clone()]);
        s.apply(&[ApplyEntry { index: 3, txn_id: TxnId(7), writes: rec.writes }]).unwrap();
        assert!(s.prepared().unwrap().is_empty());
        assert_eq!(s.applied_index().unwrap(), 3);
    }

    fn rec(txn: u128, attempt: u64) -> PreparedRecord {
        PreparedRecord { txn_id: TxnId(txn), attempt, writes: vec![Write::Put(b"k".to_vec(), vec![txn as u8])].into() }
    }

    fn sorted(mut v: Vec<PreparedRecord>) -> Vec<PreparedRecord> {
        v.sort_by_key(|r| r.txn_id);
        v
    }

    #[test]
    fn a_prepare_batch_is_one_wal_entry_and_so_is_each_set_of_outcomes() {
        let dir = tempfile::tempdir().unwrap();
        let s = ReplicaStore::open(dir.path(), 1).unwrap();
        s.log_prepared(&[rec(1, 1), rec(2, 1), rec(3, 1)]).unwrap();
        s.log_prepared(&[rec(4, 1)]).unwrap();
        assert_eq!(s.wal_entries(), 2, "one entry per batch");
        s.forget_prepared(&[TxnId(1), TxnId(3)]).unwrap();
        assert_eq!(s.wal_entries(), 3, "one entry for both outcomes");
        assert_eq!(sorted(s.prepared().unwrap()), vec![rec(2, 1), rec(4, 1)], "only live records");
        s.forget_prepared(&[TxnId(99)]).unwrap();
        assert_eq!(s.wal_entries(), 3, "nothing to end, nothing written");
        // A retry's record replaces the earlier attempt's.
        s.log_prepared(&[rec(4, 2), rec(5, 1)]).unwrap();
        assert_eq!(sorted(s.prepared().unwrap()), vec![rec(2, 1), rec(4, 2), rec(5, 1)]);
        s.forget_prepared(&[TxnId(2)]).unwrap();
        let s = restarted(s, dir.path());
        assert_eq!(sorted(s.prepared().unwrap()), vec![rec(4, 2), rec(5, 1)], "the same after a restart");
        s.forget_prepared(&[TxnId(4), TxnId(5)]).unwrap();
        let s = restarted(s, dir.path());
        assert_eq!(s.prepared().unwrap(), vec![], "ended records stay ended");
        // Sequence numbers go on after a restart: a new entry replays last.
        s.log_prepared(&[rec(1, 5)]).unwrap();
        let s = restarted(s, dir.path());
        assert_eq!(s.prepared().unwrap(), vec![rec(1, 5)]);
    }

    #[test]
    fn the_wal_is_compacted_and_keeps_live_records_across_compactions() {
        let dir = tempfile::tempdir().unwrap();
        let s = ReplicaStore::open(dir.path(), 1).unwrap();
        s.log_prepared(&[rec(1000, 1), rec(1001, 1)]).unwrap();
        for i in 0..500u128 {
            s.log_prepared(&[rec(i, 1), rec(i + 5000, 1)]).unwrap();
            s.forget_prepared(&[TxnId(i), TxnId(i + 5000)]).unwrap();
            if i == 250 {
                s.forget_prepared(&[TxnId(1001)]).unwrap();
            }
            assert!(s.wal_entries() as u64 <= WAL_COMPACT_AT + 1, "{} entries after {i} rounds", s.wal_entries());
        }
        assert_eq!(s.prepared().unwrap(), vec![rec(1000, 1)]);
        let s = restarted(s, dir.path());
        assert_eq!(s.prepared().unwrap(), vec![rec(1000, 1)], "a live record survives compactions and a restart");
        s.forget_prepared(&[TxnId(1000)]).unwrap();
        let mut fewest = usize::MAX;
        for i in 0..WAL_COMPACT_AT as u128 {
            s.log_prepared(&[rec(i, 2)]).unwrap();
            s.forget_prepared(&[TxnId(i)]).unwrap();
            fewest = fewest.min(s.wal_entries());
        }
        assert_eq!(fewest, 0, "with nothing live, a compaction removes every entry");
        assert_eq!(s.prepared().unwrap(), vec![]);
    }

    #[test]
    fn a_crash_inside_a_compaction_keeps_each_live_record_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = ReplicaStore::open(dir.path(), 1).unwrap();
        s.log_prepared(&[rec(1, 1), rec(2, 1)]).unwrap();
        s.log_prepared(&[rec(3, 1)]).unwrap();
        s.forget_prepared(&[TxnId(2)]).unwrap();
        // The compaction's first step (the live records copied into a new
        // entry) without its second (the removal of the older entries).
        let live = s.prepared().unwrap();
        s.wal_index.lock().unwrap().append(&s.wal, &WalEntry::Prepared(live)).unwrap();
        let s = restarted(s, dir.path());
        assert_eq!(sorted(s.prepared().unwrap()), vec![rec(1, 1), rec(3, 1)]);
        s.forget_prepared(&[TxnId(1), TxnId(3)]).unwrap();
        assert_eq!(s.prepared().unwrap(), vec![]);
    }

    #[test]
    fn a_wal_of_the_layout_before_batching_is_moved_into_one_entry() {
        let dir = tempfile::tempdir().unwrap();
        let s = ReplicaStore::open(dir.path(), 1).unwrap();
        for r in [rec(1, 1), rec(2, 1)] {
            s.wal.insert(r.txn_id.0.to_be_bytes(), encode(&r)).unwrap();
        }
        let s = restarted(s, dir.path());
        assert_eq!(sorted(s.prepared().unwrap()), vec![rec(1, 1), rec(2, 1)]);
        assert_eq!(s.wal_entries(), 1);
        assert!(s.wal.iter().keys().all(|k| k.unwrap().len() == 8), "old keys removed");
        s.forget_prepared(&[TxnId(1)]).unwrap();
        let s = restarted(s, dir.path());
        assert_eq!(s.prepared().unwrap(), vec![rec(2, 1)]);
    }

    #[test]
    fn the_coordinator_dir_remembers_its_participants() {
        let dir = tempfile::tempdir().unwrap();
        let ps = vec!["a:1".to_string(), "b:2".to_string()];
        let (s, c1) = CoordinatorStore::open(dir.path(), &ps).unwrap();
        s.record_commits(&[LogEntry { index: 1, txn_id: TxnId(1), writes: vec![] }]).unwrap();
        s.flush().unwrap();
        drop(s);
        let err = reopen(|| CoordinatorStore::open(dir.path(), &ps[..1])).err().unwrap().to_string();
        assert!(err.contains("was created for participants a:1,b:2"), "{err}");
        let (s, c2) = reopen(|| CoordinatorStore::open(dir.path(), &ps)).unwrap();
        assert_eq!(c1, c2);
        assert_eq!(s.last_index().unwrap(), 1);
        assert_eq!(s.decision(TxnId(1)).unwrap(), Some(Decision::Committed(1)));
    }

    #[test]
    fn commit_decisions_are_the_log_and_are_found_again_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let ps = vec!["a:1".to_string()];
        let (s, _) = CoordinatorStore::open(dir.path(), &ps).unwrap();
        let txn = TxnId(u128::MAX - 7);
        let w = vec![Write::Put(b"k".to_vec(), vec![7; 300])];
        s.record_commits(&[LogEntry { index: 1, txn_id: txn, writes: w.clone() }]).unwrap();
        s.record_abort(TxnId(9), "k is missing", 1).unwrap();
        // The id is read from the encoded entry without decoding its writes.
        let raw = s.log.get(1u64.to_be_bytes()).unwrap().unwrap();
        assert_eq!(log_entry_txn(&raw).unwrap(), decode::<LogEntry>(&raw, "log").unwrap().txn_id);
        assert_eq!(s.decisions.len(), 1, "only the abort is in the decisions tree");
        // A data dir of the layout before: the commit's decision in the tree too.
        s.decisions.insert(TxnId(2).0.to_be_bytes(), encode(&Decision::Committed(2))).unwrap();
        s.record_commits(&[LogEntry { index: 2, txn_id: TxnId(2), writes: vec![] }]).unwrap();
        s.flush().unwrap();
        drop(s);
        let (s, _) = reopen(|| CoordinatorStore::open(dir.path(), &ps)).unwrap();
        assert_eq!(s.decision(txn).unwrap(), Some(Decision::Committed(1)));
        assert_eq!(s.decision(TxnId(2)).unwrap(), Some(Decision::Committed(2)));
        assert_eq!(s.decision(TxnId(9)).unwrap(), Some(Decision::Aborted("k is missing".into())));
        assert_eq!(s.decision(TxnId(3)).unwrap(), None);
        assert_eq!(s.log_len(), (2, 3));
        assert_eq!(s.compact(1, 10).unwrap(), 1);
        assert_eq!(s.decision(txn).unwrap(), None);
        assert_eq!(s.decision(TxnId(9)).unwrap(), None);
        assert_eq!(s.decisions.len(), 1, "the old-layout decision of index 2 stays with its entry");
    }

    #[test]
    fn compaction_drops_old_entries_and_decisions_and_says_so_to_a_fetch() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = CoordinatorStore::open(dir.path(), &["a:1".to_string()]).unwrap();
        let entry = |i: u64| LogEntry { index: i, txn_id: TxnId(i.into()), writes: vec![] };
        s.record_commits(&(1..=10).map(entry).collect::<Vec<_>>()).unwrap();
        s.record_abort(TxnId(1000), "x is 1", 3).unwrap();
        s.record_abort(TxnId(1001), "y is 2", 8).unwrap();
        // Two entries per call: the caller calls again.
        assert_eq!(s.compact(6, 2).unwrap(), 2);
        assert_eq!(s.compact(6, 10).unwrap(), 6);
        assert_eq!(s.compact(4, 10).unwrap(), 6, "never backwards");
        let s = {
            drop(s);
            reopen(|| CoordinatorStore::open(dir.path(), &["a:1".to_string()])).unwrap().0
        };
        assert_eq!((s.compacted_through().unwrap(), s.last_index().unwrap()), (6, 10));
        assert_eq!(s.log_len(), (4, 5), "entries 7..=10; their decisions and the abort filed after 8");
        assert_eq!(s.decision(TxnId(6)).unwrap(), None);
        assert_eq!(s.decision(TxnId(1000)).unwrap(), None);
        assert_eq!(s.decision(TxnId(7)).unwrap(), Some(Decision::Committed(7)));
        assert_eq!(s.decision(TxnId(1001)).unwrap(), Some(Decision::Aborted("y is 2".into())));
        assert_eq!(s.entries(5, 100, 1 << 20), Err(Error::Compacted(6)));
        let rest: Vec<u64> = s.entries(7, 100, 1 << 20).unwrap().iter().map(|e| e.index).collect();
        assert_eq!(rest, [7, 8, 9, 10]);
        // A crash that lost the removals but kept the mark: entries below it
        // are not served, and the next compaction removes them.
        s.log.insert(5u64.to_be_bytes(), encode(&entry(5))).unwrap();
        assert_eq!(s.entries(5, 100, 1 << 20), Err(Error::Compacted(6)));
        assert_eq!(s.compact(7, 10).unwrap(), 7);
        assert_eq!(s.log_len().0, 3);
    }

    #[test]
    fn a_snapshot_install_replaces_exactly_its_keys_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let s = ReplicaStore::open(dir.path(), 1).unwrap();
        put_all(&s, 4, &[(b"a", b"old"), (b"b", b"gone"), (b"c", b"old"), (b"x/1", b"other group"), (b"z", b"gone")]);
        let entry = |k: &[u8], v: &[u8], version| RangeEntry { key: k.to_vec(), version, value: Some(v.to_vec()) };
        assert_eq!(s.begin_install().unwrap().group, 0);
        assert_eq!(s.applied_index().unwrap(), 0, "no applied index while installing");
        // Group 0 (keys not under x/), first chunk [start, c): a new, b gone.
        let not_x = |k: &[u8]| !k.starts_with(b"x/");
        let mut at = Install { low: 9, high: 9, group: 0, next: b"c".to_vec() };
        s.install_chunk(b"", Some(b"c"), &[entry(b"a", b"new", 9)], not_x, &at).unwrap();
        let s = restarted(s, dir.path());
        assert_eq!(s.install().unwrap(), Some(at.clone()), "progress survives a restart");
        // Last chunk of the group [c, end): c new, z gone, x/1 (another group) kept.
        at = Install { low: 7, high: 9, group: 1, next: vec![] };
        s.install_chunk(b"c", None, &[entry(b"c", b"new", 7)], not_x, &at).unwrap();
        s.finish_install(&at).unwrap();
        let s = restarted(s, dir.path());
        assert_eq!(s.install().unwrap(), None);
        assert_eq!((s.applied_index().unwrap(), s.consistent_from().unwrap()), (7, 9));
        let got: Vec<(Vec<u8>, Vec<u8>, u64)> = s
            .range(&RangeRequest::prefix(b""))
            .unwrap()
            .entries
            .into_iter()
            .map(|e| (e.key, e.value.unwrap(), e.version))
            .collect();
        assert_eq!(
            got,
            [
                (b"a".to_vec(), b"new".to_vec(), 9),
                (b"c".to_vec(), b"new".to_vec(), 7),
                (b"x/1".to_vec(), b"other group".to_vec(), 4)
            ]
        );
    }

    #[test]
    fn a_damaged_coordinator_dir_is_never_taken_for_a_new_cluster() {
        let ps = vec!["a:1".to_string()];
        // The database lost its contents, the identity file remains.
        let dir = tempfile::tempdir().unwrap();
        let (s, c) = CoordinatorStore::open(dir.path(), &ps).unwrap();
        drop(s);
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let p = entry.unwrap().path();
            if p.file_name().unwrap() != COORDINATOR_ID_FILE {
                if p.is_dir() {
                    std::fs::remove_dir_all(&p).unwrap();
                } else {
                    std::fs::remove_file(&p).unwrap();
                }
            }
        }
        let e = CoordinatorStore::open(dir.path(), &ps).err().unwrap().to_string();
        assert!(e.contains("damaged") && e.contains(&c.to_string()) && e.contains("backup"), "{e}");
        // Not empty, no identity at all: refused too.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("db"), b"garbage").unwrap();
        let e = CoordinatorStore::open(dir.path(), &ps).err().unwrap().to_string();
        assert!(e.contains("not empty") || e.contains("cannot open"), "{e}");
        // Incarnations count up across restarts and are remembered.
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = CoordinatorStore::open(dir.path(), &ps).unwrap();
        let (i1, _) = s.start_incarnation().unwrap();
        let (i2, h) = s.start_incarnation().unwrap();
        assert_eq!((i1.generation, i2.generation), (1, 2));
        assert_eq!(h.get(&1), Some(&i1.nonce));
    }

    #[tokio::test]
    async fn group_sync_makes_writes_durable_and_counts_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let s = ReplicaStore::open(dir.path(), 1).unwrap();
        let g = GroupSync::start(s.durability().unwrap());
        s.log_prepared(&[PreparedRecord { txn_id: TxnId(1), attempt: 1, writes: vec![].into() }]).unwrap();
        let waits: Vec<_> = (0..10).map(|_| g.sync()).collect();
        for r in futures::future::join_all(waits).await {
            r.unwrap();
        }
        assert!(g.count() >= 1 && g.count() <= 10, "{} syncs", g.count());
    }

    #[test]
    fn the_replication_degree_is_fixed_when_the_cluster_is_created() {
        let parts: Vec<String> = (1..=5).map(|i| format!("127.0.0.1:{i}")).collect();
        // A new cluster records what it was asked for.
        let dir = tempfile::tempdir().unwrap();
        {
            let (s, _) = CoordinatorStore::open(dir.path(), &parts).unwrap();
            assert_eq!(s.placement(Some(3), 5, 256).unwrap(), (3, 256));
        }
        let (s, _) = reopen(|| CoordinatorStore::open(dir.path(), &parts)).unwrap();
        assert_eq!(s.placement(None, 5, 64).unwrap(), (3, 256), "a restart keeps it");
        assert_eq!(s.placement(Some(3), 5, 64).unwrap(), (3, 256));
        let e = s.placement(Some(5), 5, 64).unwrap_err().to_string();
        assert!(e.contains("created with replication 3") && e.contains("cannot change"), "{e}");
        // A cluster with commits from before the degree was recorded holds full copies.
        let old = tempfile::tempdir().unwrap();
        let (s, _) = CoordinatorStore::open(old.path(), &parts).unwrap();
        s.record_commits(&[LogEntry { index: 1, txn_id: TxnId(1), writes: vec![] }]).unwrap();
        assert_eq!(s.placement(None, 5, 256).unwrap(), (5, 1));
        assert!(s.placement(Some(3), 5, 256).is_err());
    }
}

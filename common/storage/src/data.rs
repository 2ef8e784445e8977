//! A participant's data: every key in memory, made durable by a log of the
//! changes (sled's `datalog` tree) and by checkpoint files.
//!
//! Why: a sled insert per applied key (copy of the leaf, splits, a frame
//! in sled's log) cost about 10 µs of CPU per key on every replica, a third
//! of all server CPU for a put. Now an apply is one sled insert per run of
//! commits, however many keys it writes, plus in-memory map updates (see
//! docs/storage-engine.md).
//!
//! ## Invariants
//! * **Log before memory.** A change is inserted into `datalog` (key: its
//!   8-byte big-endian sequence number) before the map changes, both under
//!   the map's write lock: the log's order is the order readers saw, and a
//!   reader never sees part of a record.
//! * **Open = checkpoint + replay.** The state is the newest checkpoint
//!   (named by the sequence number `seq` the log had when it started) with
//!   every record from `seq` on replayed in order. sled recovers a prefix of
//!   its log, so a crash loses only the newest records, never one without
//!   the ones before it; a record is the whole of its change.
//! * **Fuzzy checkpoints are exact.** A checkpoint is written while applies
//!   go on: it reads the map a chunk at a time, so it may hold changes made
//!   after `seq`. Every record changes keys by overwriting (put or remove),
//!   so replaying the records from `seq` on gives each key its last change
//!   from `seq` on, or, if none, its value in the checkpoint, which did not
//!   move during the scan and so is its value at `seq`: exactly the state of
//!   the log. The records the scan may have seen are synced before the
//!   file is renamed into place.
//! * **Records below a checkpoint go only after it is durable** (file
//!   synced, renamed, directory synced). A removal a crash loses is
//!   harmless: replay starts at the checkpoint's `seq`.
//!
//! ## Checkpoint file (`data.checkpoint` in the data dir)
//! `TREATYCK`, format `u32` 1, `seq` `u64`, applied index `u64`; then per
//! key: key length `u32`, key, version `u64`, value length `u32`, value;
//! then `u32::MAX`, the key count `u64`, and a CRC-32 of every byte before
//! it. Integers are little-endian. Written to `data.checkpoint.tmp`,
//! synced, renamed.

use std::collections::{btree_map, BTreeMap};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write as _};
use std::ops::Bound;
use std::path::Path;

use serde::{Deserialize, Serialize};

use treaty_core::types::{RangeEntry, Write};
use treaty_core::{Error, Result};

use crate::files::io;

pub(crate) const CHECKPOINT: &str = "data.checkpoint";
pub(crate) const CHECKPOINT_TMP: &str = "data.checkpoint.tmp";
const MAGIC: &[u8; 8] = b"TREATYCK";
const FORMAT: u32 = 1;
const END: u32 = u32::MAX;

/// A checkpoint is started once the records logged since the last one
/// reach this many bytes, or the live data's size if that is larger (so
/// checkpoints write at most about as many bytes as the log, and a restart
/// replays at most about the data's size), times a random factor from 1 to
/// 1.5 drawn for each checkpoint: replicas log the same bytes, and without
/// it all of them would write their checkpoints at the same moment.
pub const CHECKPOINT_MIN_BYTES: u64 = 32 << 20;

/// The map, and where the log stands.
#[derive(Debug)]
pub(crate) struct Data {
    /// key -> (version: commit index of its last write, value).
    pub map: BTreeMap<Vec<u8>, (u64, Vec<u8>)>,
    pub applied: u64,
    /// Bytes of keys and values in `map`.
    pub bytes: u64,
    /// The sequence number of the next record.
    pub next_seq: u64,
    /// Bytes of records logged since the newest checkpoint's `seq`.
    pub logged: u64,
    /// A checkpoint is being written (only one at a time).
    pub checkpointing: bool,
    /// [`CHECKPOINT_MIN_BYTES`] (tests lower it).
    pub checkpoint_min: u64,
    /// This checkpoint's random factor, in percent (100 to 150).
    pub jitter: u64,
}

impl Data {
    pub fn new(applied: u64, next_seq: u64) -> Data {
        Data {
            map: BTreeMap::new(),
            applied,
            bytes: 0,
            next_seq,
            logged: 0,
            checkpointing: false,
            checkpoint_min: CHECKPOINT_MIN_BYTES,
            jitter: Self::jitter(),
        }
    }

    pub fn put(&mut self, key: &[u8], version: u64, value: &[u8]) {
        match self.map.get_mut(key) {
            Some(slot) => {
                self.bytes = self.bytes + value.len() as u64 - slot.1.len() as u64;
                *slot = (version, value.to_vec());
            }
            None => {
                self.bytes += (key.len() + value.len()) as u64;
                self.map.insert(key.to_vec(), (version, value.to_vec()));
            }
        }
    }

    /// The entries from `start` (inclusive) to `end` (exclusive; `None`:
    /// to the last key).
    pub fn range(&self, start: Bound<&[u8]>, end: Option<&[u8]>) -> btree_map::Range<'_, Vec<u8>, (u64, Vec<u8>)> {
        self.map.range::<[u8], _>((start, end.map_or(Bound::Unbounded, Bound::Excluded)))
    }

    pub fn remove(&mut self, key: &[u8]) {
        if let Some((_, old)) = self.map.remove(key) {
            self.bytes -= (key.len() + old.len()) as u64;
        }
    }

    /// Applies committed writes in order: what [`Record::Apply`] holds.
    pub fn apply<'a>(&mut self, runs: impl IntoIterator<Item = (u64, &'a [Write])>, last: u64) {
        for (index, writes) in runs {
            for w in writes {
                match w {
                    Write::Put(k, v) => self.put(k, index, v),
                    Write::Delete(k) => self.remove(k),
                }
            }
        }
        self.applied = last;
    }

    pub fn replace(&mut self, removed: &[Key], stored: &[RangeEntry]) -> Result<()> {
        for k in removed {
            self.remove(&k.0);
        }
        for e in stored {
            let value = e.value.as_deref().ok_or_else(|| Error::Storage("a snapshot chunk without values".into()))?;
            self.put(&e.key, e.version, value);
        }
        Ok(())
    }

    /// Replays one record read back from the log.
    pub fn replay(&mut self, bytes: &[u8]) -> Result<()> {
        let record: Record = bincode::deserialize(bytes)
            .map_err(|e| Error::Storage(format!("corrupt data log record: {e}: the data dir is damaged")))?;
        match record {
            Record::Apply { last, runs } => self.apply(runs.iter().map(|(i, w)| (*i, w.as_slice())), last),
            Record::Replace { removed, stored } => self.replace(&removed, &stored)?,
            Record::Applied(index) => self.applied = index,
        }
        Ok(())
    }

    /// Counts a logged record; says whether a checkpoint is due now (and
    /// then marks one as started).
    pub fn count_logged(&mut self, bytes: usize) -> bool {
        self.logged += bytes as u64;
        let threshold = self.checkpoint_min.max(self.bytes).saturating_mul(self.jitter) / 100;
        let due = !self.checkpointing && self.logged >= threshold;
        if due {
            self.checkpointing = true;
            self.jitter = Self::jitter();
        }
        due
    }

    fn jitter() -> u64 {
        rand::random::<u64>() % 51 + 100
    }
}

/// A key in a log record (written as a byte string).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Key(#[serde(with = "serde_bytes")] pub Vec<u8>);

/// One change, as the log holds it (decoded).
#[derive(Debug, Deserialize)]
pub(crate) enum Record {
    /// Committed transactions in index order, then the applied index is `last`.
    Apply { last: u64, runs: Vec<(u64, Vec<Write>)> },
    /// Keys removed, then entries stored (installs and partition moves).
    Replace { removed: Vec<Key>, stored: Vec<RangeEntry> },
    /// The applied index is set (installs).
    Applied(u64),
}

/// [`Record`] as it is written, borrowing what it holds (same encoding).
#[derive(Serialize)]
pub(crate) enum RecordOut<'a> {
    Apply { last: u64, runs: &'a [(u64, &'a [Write])] },
    Replace { removed: &'a [Key], stored: &'a [RangeEntry] },
    Applied(u64),
}

impl RecordOut<'_> {
    pub fn encode(&self) -> Vec<u8> {
        bincode::serialize(self).expect("in-memory serialization cannot fail")
    }
}

/// Writes a checkpoint to `tmp` and syncs it: the header, then the entries
/// `chunks` yields (each call: the next entries after the key given, or
/// none at the end), then the trailer.
pub(crate) fn write(
    tmp: &Path,
    seq: u64,
    applied: u64,
    mut chunks: impl FnMut(Option<&[u8]>) -> Vec<(Vec<u8>, u64, Vec<u8>)>,
) -> Result<u64> {
    let file = File::create(tmp).map_err(io("create", tmp))?;
    let mut out = Crc { inner: BufWriter::with_capacity(1 << 20, file), crc: crc32fast::Hasher::new() };
    let put = |out: &mut Crc<BufWriter<File>>, bytes: &[u8]| out.write_all(bytes).map_err(io("write", tmp));
    put(&mut out, MAGIC)?;
    put(&mut out, &FORMAT.to_le_bytes())?;
    put(&mut out, &seq.to_le_bytes())?;
    put(&mut out, &applied.to_le_bytes())?;
    let mut count = 0u64;
    let mut written = WriteBack::default();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let chunk = chunks(after.as_deref());
        let Some(last) = chunk.last() else { break };
        after = Some(last.0.clone());
        for (key, version, value) in &chunk {
            put(&mut out, &(key.len() as u32).to_le_bytes())?;
            put(&mut out, key)?;
            put(&mut out, &version.to_le_bytes())?;
            put(&mut out, &(value.len() as u32).to_le_bytes())?;
            put(&mut out, value)?;
        }
        count += chunk.len() as u64;
        out.inner.flush().map_err(io("write", tmp))?;
        written.write_back(out.inner.get_ref());
    }
    put(&mut out, &END.to_le_bytes())?;
    put(&mut out, &count.to_le_bytes())?;
    let crc = out.crc.clone().finalize();
    let mut file = out.inner.into_inner().map_err(|e| io("write", tmp)(e.into_error()))?;
    file.write_all(&crc.to_le_bytes()).map_err(io("write", tmp))?;
    file.sync_all().map_err(io("sync", tmp))?;
    Ok(count)
}

/// Hands a file's written bytes to the disk a few MiB at a time while it is
/// written, waiting for the previous piece, so that its final sync has
/// little left to do: one sync of the whole file held the disk for long
/// enough to delay the votes' syncs behind it.
#[derive(Default)]
struct WriteBack {
    /// Bytes handed to the disk so far, and the end of the piece before.
    started: u64,
    waited: u64,
}

impl WriteBack {
    const PIECE: u64 = 4 << 20;

    fn write_back(&mut self, file: &File) {
        use std::os::fd::AsRawFd;
        let Ok(len) = file.metadata().map(|m| m.len()) else { return };
        if len < self.started + Self::PIECE {
            return;
        }
        // Advisory: errors only lose the smoothing, the final sync decides.
        unsafe {
            if self.started > self.waited {
                libc::sync_file_range(
                    file.as_raw_fd(),
                    self.waited as i64,
                    (self.started - self.waited) as i64,
                    libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER,
                );
            }
            libc::sync_file_range(
                file.as_raw_fd(),
                self.started as i64,
                (len - self.started) as i64,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
        (self.waited, self.started) = (self.started, len);
    }
}

/// Reads the checkpoint at `path`, if there is one: its data, with
/// `next_seq` the sequence number replay starts at.
pub(crate) fn read(path: &Path) -> Result<Option<Data>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("open", path)(e)),
    };
    let damaged = |what: &str| {
        Error::Storage(format!(
            "checkpoint {} is damaged ({what}): the data dir cannot be trusted; move it aside and let this replica \
             be seeded again from the cluster",
            path.display()
        ))
    };
    let mut r = Crc { inner: BufReader::with_capacity(1 << 20, file), crc: crc32fast::Hasher::new() };
    let mut buf8 = [0u8; 8];
    let mut buf4 = [0u8; 4];
    let short = |_| damaged("cut short");
    r.read_exact(&mut buf8).map_err(short)?;
    if &buf8 != MAGIC {
        return Err(damaged("not a checkpoint file"));
    }
    r.read_exact(&mut buf4).map_err(short)?;
    if u32::from_le_bytes(buf4) != FORMAT {
        return Err(damaged("a format this binary does not know: use the newer binary that wrote it"));
    }
    r.read_exact(&mut buf8).map_err(short)?;
    let seq = u64::from_le_bytes(buf8);
    r.read_exact(&mut buf8).map_err(short)?;
    let mut data = Data::new(u64::from_le_bytes(buf8), seq);
    loop {
        r.read_exact(&mut buf4).map_err(short)?;
        let klen = u32::from_le_bytes(buf4);
        if klen == END {
            break;
        }
        let mut key = vec![0; klen as usize];
        r.read_exact(&mut key).map_err(short)?;
        r.read_exact(&mut buf8).map_err(short)?;
        let version = u64::from_le_bytes(buf8);
        r.read_exact(&mut buf4).map_err(short)?;
        let mut value = vec![0; u32::from_le_bytes(buf4) as usize];
        r.read_exact(&mut value).map_err(short)?;
        data.bytes += (key.len() + value.len()) as u64;
        data.map.insert(key, (version, value));
    }
    r.read_exact(&mut buf8).map_err(short)?;
    if u64::from_le_bytes(buf8) != data.map.len() as u64 {
        return Err(damaged("wrong key count"));
    }
    let crc = r.crc.clone().finalize();
    r.inner.read_exact(&mut buf4).map_err(short)?;
    if u32::from_le_bytes(buf4) != crc {
        return Err(damaged("checksum mismatch"));
    }
    Ok(Some(data))
}

/// A reader or writer that checksums what passes through it.
struct Crc<T> {
    inner: T,
    crc: crc32fast::Hasher,
}

impl<T: std::io::Write> std::io::Write for Crc<T> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<T: Read> Read for Crc<T> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests;

//! Where a node's sled files are, and rewriting them to give space back.
//!
//! sled 0.34 never shrinks its files towards the data. After many
//! overwrites they settle at about ten times the live entries and stay
//! there. Measured with sled alone, 100k keys of 272 B (29 MB live),
//! overwritten at random: 249 MB after 500k puts, 279 MB after 1M, 301 MB
//! after 3M. With 10k keys it settles at 30 MB. A fresh copy of the same
//! trees takes about twice the live bytes (287 MB became 60 MB in 1.4 s).
//! So when a store is opened and its files are over [`Policy::factor`]
//! times its live bytes plus [`Policy::slack_bytes`] (sled's own overhead,
//! about 1.5 MB for a tiny store), it is first copied into fresh files. Nodes pay this at a restart, so a rolling
//! restart gives a cluster's space back (docs/compaction.md).
//!
//! ## Layout of a data dir
//! * No `CURRENT` file: sled's files (`conf`, `db`, `blobs/`, `snap.*`)
//!   are in the data dir itself. Every data dir starts so.
//! * `CURRENT` holds the name of a subdirectory `store-N`: sled's files
//!   are there. Other files of the data dir (the coordinator's identity
//!   file) stay where they are.
//!
//! ## A rewrite, and why a crash at any point loses nothing
//! 1. Copy every tree into `store-(N+1)`, flush, then fsync every file
//!    and directory of it.
//! 2. Switch: write `CURRENT.tmp` naming `store-(N+1)`, fsync it, rename
//!    it over `CURRENT`, fsync the data dir. Before the rename the old
//!    files are the store, after it the new ones, and both are complete.
//! 3. Delete the old files.
//!
//! Opening tidies first: `CURRENT` (or its absence) says which files are
//! the store. Any other `store-*` directory (a copy that crashed before its
//! switch, or the old files after it), a `CURRENT.tmp`, and, while
//! `CURRENT` exists, sled files in the data dir itself are leftovers and are
//! deleted. A copy that fails (a full disk) is deleted and the old files
//! are kept.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use treaty_core::{Error, Result};

const CURRENT: &str = "CURRENT";
const CURRENT_TMP: &str = "CURRENT.tmp";
const STORE_PREFIX: &str = "store-";
/// sled's cache while a store is checked and copied.
const CHECK_CACHE_BYTES: u64 = 16 << 20;

/// When opening a store rewrites its files.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// Rewrite when the files are over `factor` times the live bytes plus
    /// `slack_bytes`.
    pub factor: u64,
    pub slack_bytes: u64,
}

impl Policy {
    /// What nodes use: 4 times plus 16 MiB. A fresh copy is about twice
    /// the live bytes, so a store is rewritten again only after it has
    /// grown back to more than twice that.
    pub const DEFAULT: Policy = Policy { factor: 4, slack_bytes: 16 << 20 };
    /// Never rewrite.
    pub const NEVER: Policy = Policy { factor: u64::MAX, slack_bytes: u64::MAX };

    fn threshold(&self, live_bytes: u64) -> u64 {
        live_bytes.saturating_mul(self.factor).saturating_add(self.slack_bytes)
    }
}

pub(crate) fn io(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let (what, path) = (what.to_string(), path.display().to_string());
    move |e| Error::Storage(format!("cannot {what} {path}: {e}"))
}

fn sled_err(e: sled::Error) -> Error {
    Error::Storage(e.to_string())
}

/// Whether `name`, in a data dir, is one of sled's own files.
fn is_sled_file(name: &str) -> bool {
    matches!(name, "conf" | "db" | "blobs") || name.starts_with("snap.")
}

fn remove(path: &Path) -> Result<()> {
    let r = if path.is_dir() { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) };
    match r {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("remove", path)(e)),
        _ => Ok(()),
    }
}

pub(crate) fn sync_dir(path: &Path) -> Result<()> {
    File::open(path).and_then(|f| f.sync_all()).map_err(io("sync", path))
}

/// The subdirectory `CURRENT` names, if any.
fn current(dir: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(dir.join(CURRENT)) {
        Ok(s) => {
            let name = s.trim().to_string();
            let ok = name.strip_prefix(STORE_PREFIX).is_some_and(|n| n.parse::<u64>().is_ok());
            if !ok || !dir.join(&name).is_dir() {
                return Err(Error::Storage(format!(
                    "{} names {name:?}, which is not a store directory there: the data dir is damaged; restore it \
                     from a backup or re-seed this node",
                    dir.join(CURRENT).display()
                )));
            }
            Ok(Some(name))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("read", &dir.join(CURRENT))(e)),
    }
}

/// What a rewrite leaves in `dir` once `CURRENT` names `live` (or, with
/// none, once sled's files are the data dir's own): `CURRENT.tmp`, any other
/// `store-*`, and sled files in the data dir itself while `CURRENT` exists.
fn leftovers(dir: &Path, live: Option<&str>) -> Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(io("read", dir)(e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io("read", dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let leftover = name == CURRENT_TMP
            || (name.starts_with(STORE_PREFIX) && live != Some(name.as_str()))
            || (live.is_some() && is_sled_file(&name));
        if leftover {
            found.push(entry.path());
        }
    }
    Ok(found)
}

/// Tidies the leftovers of an interrupted rewrite (see the module docs)
/// and returns the directory holding sled's files.
pub fn resolve(dir: &Path) -> Result<PathBuf> {
    let live = current(dir)?;
    for path in leftovers(dir, live.as_deref())? {
        tracing::info!(path = %path.display(), "removing what an interrupted storage rewrite left");
        remove(&path)?;
    }
    Ok(live.map_or_else(|| dir.to_path_buf(), |n| dir.join(n)))
}

/// Bytes of sled's files in `files` (the directory [`resolve`] returned).
pub fn file_bytes(files: &Path) -> u64 {
    fn walk(p: &Path, top: bool) -> u64 {
        let Ok(entries) = std::fs::read_dir(p) else { return 0 };
        let mut total = 0;
        for e in entries.flatten() {
            if top && !is_sled_file(&e.file_name().to_string_lossy()) {
                continue;
            }
            match e.metadata() {
                Ok(m) if m.is_dir() => total += walk(&e.path(), false),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
        total
    }
    walk(files, true)
}

/// Live bytes (keys and values of every tree), counted until they reach
/// `enough`.
fn live_bytes(db: &sled::Db, enough: u64) -> Result<u64> {
    let mut total = 0u64;
    for name in db.tree_names() {
        for kv in db.open_tree(&name).map_err(sled_err)?.iter() {
            let (k, v) = kv.map_err(sled_err)?;
            total += (k.len() + v.len()) as u64;
            if total >= enough {
                return Ok(total);
            }
        }
    }
    Ok(total)
}

/// Opens the store in `dir`, first rewriting its files if `policy` says
/// so. Returns the db and the directory holding its files.
pub fn open(dir: &Path, cache_bytes: u64, policy: Policy) -> Result<(sled::Db, PathBuf)> {
    std::fs::create_dir_all(dir).map_err(io("create data dir", dir))?;
    let files = resolve(dir)?;
    let before = file_bytes(&files);
    if before <= policy.threshold(0) {
        return Ok((open_sled(dir, &files, cache_bytes)?, files));
    }
    // The check and the copy read every entry once: through a small cache,
    // so that they leave the process no bigger than serving would.
    let db = open_sled(dir, &files, CHECK_CACHE_BYTES)?;
    let live = live_bytes(&db, (before - policy.slack_bytes).div_ceil(policy.factor))?;
    if before <= policy.threshold(live) {
        drop(db);
        return Ok((open_sled(dir, &files, cache_bytes)?, files));
    }
    let started = Instant::now();
    let rewritten = rewrite(dir, &db);
    drop(db);
    match rewritten {
        Ok(name) => {
            remove_old(dir, &name)?;
            let new_files = dir.join(name);
            let after = file_bytes(&new_files);
            tracing::info!(
                before_mb = before >> 20, after_mb = after >> 20, live_mb = live >> 20,
                took_ms = started.elapsed().as_millis() as u64, dir = %dir.display(),
                "rewrote the storage files to give space back"
            );
            Ok((open_sled(dir, &new_files, cache_bytes)?, new_files))
        }
        Err(e) => {
            tracing::warn!(
                error = %e, dir = %dir.display(),
                "could not rewrite the storage files (keeping the old ones, which are intact): free some disk space \
                 and restart the node to try again"
            );
            Ok((open_sled(dir, &files, cache_bytes)?, files))
        }
    }
}

fn open_sled(dir: &Path, files: &Path, cache_bytes: u64) -> Result<sled::Db> {
    // Every vote and decision is made durable by `Durability::sync`, so
    // sled's background flush (every 500 ms by default) only bounds how much
    // unsynced apply work a crash can lose (replayed from the log); it stays.
    let config = sled::Config::new().path(files).cache_capacity(cache_bytes);
    // A db this process just dropped (the check, the copy) keeps its file
    // lock until sled's background threads let go of it, a few ms later:
    // wait for that rather than fail. Another process holding it fails
    // after the wait.
    let deadline = Instant::now() + std::time::Duration::from_secs(3);
    loop {
        match config.open() {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock") && Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            r => {
                let db = r.map_err(|e| {
                    Error::Storage(format!(
                        "cannot open data dir {}: {e} (is another Treaty process using it?)",
                        dir.display()
                    ))
                })?;
                sync_blobs(files)?;
                return Ok(db);
            }
        }
    }
}

/// Syncs every blob file and the blob directory once. The patched sled syncs
/// each blob as it writes it; this covers blobs left by a binary from before
/// that patch, which synced them only at its next `Durability::sync`.
fn sync_blobs(files: &Path) -> Result<()> {
    let blobs = files.join("blobs");
    let Ok(entries) = std::fs::read_dir(&blobs) else { return Ok(()) };
    for entry in entries.flatten() {
        // A blob sled removed meanwhile is no longer needed.
        if let Ok(f) = File::open(entry.path()) {
            f.sync_data().map_err(io("sync", &entry.path()))?;
        }
    }
    File::open(&blobs).and_then(|f| f.sync_all()).map_err(io("sync", &blobs))
}

/// Steps 1 and 2: the copy and the switch. Returns the new files' directory name.
fn rewrite(dir: &Path, db: &sled::Db) -> Result<String> {
    let now = current(dir)?.and_then(|n| n[STORE_PREFIX.len()..].parse::<u64>().ok()).unwrap_or(0);
    let name = format!("{STORE_PREFIX}{}", now + 1);
    let new_files = dir.join(&name);
    remove(&new_files)?;
    let copied = copy_trees(db, &new_files).and_then(|()| sync_tree(&new_files));
    if let Err(e) = copied {
        let _ = remove(&new_files);
        return Err(e);
    }
    fail::fail_point!("storage::rewrite_before_switch", |_| crash("storage::rewrite_before_switch"));
    let tmp = dir.join(CURRENT_TMP);
    std::fs::write(&tmp, format!("{name}\n")).map_err(io("write", &tmp))?;
    File::open(&tmp).and_then(|f| f.sync_all()).map_err(io("sync", &tmp))?;
    std::fs::rename(&tmp, dir.join(CURRENT)).map_err(io("rename", &tmp))?;
    sync_dir(dir)?;
    fail::fail_point!("storage::rewrite_after_switch", |_| crash("storage::rewrite_after_switch"));
    Ok(name)
}

fn copy_trees(db: &sled::Db, to: &Path) -> Result<()> {
    let fresh =
        sled::Config::new().path(to).cache_capacity(CHECK_CACHE_BYTES).create_new(true).open().map_err(sled_err)?;
    for name in db.tree_names() {
        let (from, into) = (db.open_tree(&name).map_err(sled_err)?, fresh.open_tree(&name).map_err(sled_err)?);
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for kv in from.iter() {
            let (k, v) = kv.map_err(sled_err)?;
            batch.insert(k, v);
            n += 1;
            if n == 1024 {
                into.apply_batch(std::mem::take(&mut batch)).map_err(sled_err)?;
                n = 0;
            }
        }
        into.apply_batch(batch).map_err(sled_err)?;
    }
    fresh.flush().map_err(sled_err)?;
    Ok(())
}

/// A failpoint's `abort()` (a kill -9 at that step, for tests).
pub(crate) fn crash(name: &str) -> ! {
    eprintln!("treaty: failpoint {name} hit: aborting");
    std::process::abort()
}

/// fsyncs every file and directory under `path`, and `path` itself.
fn sync_tree(path: &Path) -> Result<()> {
    for e in std::fs::read_dir(path).map_err(io("read", path))? {
        let p = e.map_err(io("read", path))?.path();
        if p.is_dir() {
            sync_tree(&p)?;
        } else {
            File::open(&p).and_then(|f| f.sync_all()).map_err(io("sync", &p))?;
        }
    }
    sync_dir(path)
}

/// Step 3: the old files go (the next open would remove them too).
fn remove_old(dir: &Path, live: &str) -> Result<()> {
    leftovers(dir, Some(live))?.iter().try_for_each(|p| remove(p))
}

#[cfg(test)]
mod tests;

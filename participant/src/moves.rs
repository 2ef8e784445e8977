//! Partitions moving to and from this replica (partitioned clusters; see
//! docs/membership.md, "Moving partitions").
//!
//! One task does both halves, one after the other, so they never overlap:
//! * **Copy in.** When the coordinator's check-in answer names partitions
//!   to copy here ([`PartitionInstall`]), their writes are held back at the
//!   coordinator since `as_of`. The task waits until this replica has
//!   applied `as_of` (so no older write to them can be applied here later),
//!   copies their keys in checksummed chunks from replicas that have
//!   applied it too, replacing whatever this replica had of them, flushes,
//!   and reports the step at its next check-in. Until the coordinator
//!   switches the placement, these keys are not served: reads of them go to
//!   their replicas as before.
//! * **Drop out.** Keys of partitions this replica no longer holds (and is
//!   not copying in) are deleted in batches, after every change of the
//!   placement and once after a start. They are served by nobody here
//!   already: reads of them are forwarded, and [`only_held`] keeps the
//!   applier from writing them again.
//!
//! A crash anywhere loses nothing: a copy not reported is made again from
//! scratch, a deletion not finished is finished after the next start.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};
use treaty_common::protocol::{copy_groups, ApplyEntry, Placement};
use treaty_common::rpc::PartitionInstall;
use treaty_common::{Error, Result};

use crate::Node;

/// Keys looked at per deletion batch.
const DROP_BATCH: usize = 4096;

/// The applied entries with only the writes to keys `me` holds: a write to
/// a partition that moved away (decided before the move, applied after it)
/// is not this replica's any more.
pub(crate) fn only_held(placement: &Placement, me: u64, batch: Vec<ApplyEntry>) -> Vec<ApplyEntry> {
    let all_held = batch.iter().all(|e| e.writes.iter().all(|w| placement.holds(me, w.key())));
    if all_held {
        return batch;
    }
    batch
        .into_iter()
        .map(|e| {
            let writes = e.writes.iter().filter(|w| placement.holds(me, w.key())).cloned().collect::<Vec<_>>();
            ApplyEntry { writes: Arc::new(writes), ..e }
        })
        .collect()
}

impl Node {
    /// The task (see the module docs): wakes at every check-in answer.
    pub(crate) async fn moves(self: Arc<Self>) {
        // (placement version, step copied in) the last deletion ran for.
        let mut dropped_for: Option<(u64, Option<u64>)> = None;
        // (step, failed tries at copying it).
        let mut tries: (u64, u32) = (0, 0);
        loop {
            tokio::select! {
                _ = self.moves_wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            if self.installing.load(Ordering::Acquire) {
                continue;
            }
            let (placement, pending) = {
                let standing = self.standing.lock().unwrap();
                (standing.placement(), self.pending_install.lock().unwrap().clone())
            };
            let Some(placement) = placement.filter(|p| !p.is_full()) else { continue };
            if let Some(ins) = pending.as_ref().filter(|i| i.step != self.installed_step.load(Ordering::Acquire)) {
                let started = Instant::now();
                if tries.0 != ins.step {
                    tries = (ins.step, 0);
                }
                match self.copy_in(&placement, ins, tries.1 == 0).await {
                    Ok(keys) => {
                        self.installed_step.store(ins.step, Ordering::Release);
                        self.check_in.notify_one();
                        info!(
                            partitions = ins.partitions.len(),
                            keys,
                            as_of = ins.as_of,
                            version = ins.version,
                            ms = started.elapsed().as_millis() as u64,
                            "copied partitions moving here"
                        );
                    }
                    Err(e) => {
                        tries.1 += 1;
                        warn!(error = %e, "copying partitions moving here failed; will try again")
                    }
                }
                continue;
            }
            let key = (placement.spec().version, pending.as_ref().map(|i| i.step));
            if dropped_for == Some(key) {
                continue;
            }
            let copying: BTreeSet<u32> = pending.iter().flat_map(|i| i.partitions.iter().map(|(p, _)| *p)).collect();
            match self.drop_out(&placement, &copying).await {
                Ok(n) => {
                    dropped_for = Some(key);
                    if n > 0 {
                        info!(keys = n, version = key.0, "deleted the keys of partitions that moved away");
                    }
                }
                Err(e) => warn!(error = %e, "deleting the keys of partitions that moved away failed; will try again"),
            }
        }
    }

    /// Copies `ins`'s partitions here (see the module docs); returns the
    /// number of keys copied.
    /// A first try reads from as few sources as can send everything (one
    /// pass over each one's keys); a retry reads each partition from any
    /// of its replicas (`fewest: false`), in case one of those few is down.
    async fn copy_in(&self, placement: &Arc<Placement>, ins: &PartitionInstall, fewest: bool) -> Result<u64> {
        if !self.wait_applied(ins.as_of, Instant::now() + Duration::from_secs(5)).await {
            return Err(Error::NotReady(format!("not yet applied up to index {}", ins.as_of)));
        }
        let cluster =
            self.standing.lock().unwrap().cluster().ok_or_else(|| Error::NotReady("no cluster yet".into()))?;
        let version = placement.spec().version;
        let mut keys = 0u64;
        let mut turn = self.id as usize;
        for group in copy_groups(&ins.partitions, fewest) {
            let mut start = Vec::new();
            loop {
                let chunk = self.snapshot_chunk(cluster, &group, &start, turn, version).await?;
                turn += 1;
                if chunk.index < ins.as_of {
                    return Err(Error::NotReady(format!(
                        "a source sent partitions as of index {}, before {}",
                        chunk.index, ins.as_of
                    )));
                }
                keys += chunk.entries.len() as u64;
                let (store, group2, placement2, from) = (self.store.clone(), group.clone(), placement.clone(), start);
                let next = chunk.next.clone();
                tokio::task::spawn_blocking(move || {
                    let keep = |k: &[u8]| group2.keeps(&placement2, k);
                    store.replace_range(&from, chunk.next.as_deref(), &chunk.entries, keep)
                })
                .await
                .expect("copy task panicked")?;
                treaty_common::crash_point!("participant::mid_partition_copy");
                match next {
                    Some(k) => start = k,
                    None => break,
                }
            }
        }
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.flush()).await.expect("flush task panicked")?;
        // The copies hold writes this replica never applied (it did not hold
        // their partitions): a range part as of an earlier index cannot
        // vouch that its keys did not change since (see `RecentWrites`).
        let applied = self.core.lock().unwrap().applied_index();
        self.recent.lock().unwrap().forget_through(applied);
        Ok(keys)
    }

    /// Deletes the keys of partitions this replica does not hold under
    /// `placement` and is not copying in; returns how many.
    async fn drop_out(&self, placement: &Arc<Placement>, copying: &BTreeSet<u32>) -> Result<u64> {
        let mut start: Vec<u8> = Vec::new();
        let mut total = 0;
        loop {
            let (store, p, copying, me) = (self.store.clone(), placement.clone(), copying.clone(), self.id);
            let (n, next) = tokio::task::spawn_blocking(move || {
                store.delete_where(&start, DROP_BATCH, |k| {
                    let part = p.partition(k);
                    !p.replicas(part).contains(&me) && !copying.contains(&part)
                })
            })
            .await
            .expect("delete task panicked")?;
            total += n;
            match next {
                Some(k) => start = k,
                None => return Ok(total),
            }
        }
    }
}

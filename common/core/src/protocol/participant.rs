//! One participant's standing with the coordinator, as a pure state machine
//! beside [`ReplicaCore`](crate::protocol::ReplicaCore) (which holds its
//! transactions): the cluster and coordinator incarnation it follows, the
//! view epoch and membership it knows, its read lease, and whether it has
//! caught up since it started.
//!
//! The I/O layer (`treaty-participant`) asks it before acting on a message
//! ([`check_prepare`](ParticipantCore::check_prepare),
//! [`check_decide`](ParticipantCore::check_decide),
//! [`check_read`](ParticipantCore::check_read)) and feeds it every check-in
//! answer ([`on_reply`](ParticipantCore::on_reply)), persisting what that
//! returns before anything else reads the new state. Time is an input in
//! milliseconds from any fixed origin.
//!
//! ## Invariants
//! * **Whom it listens to.** PREPARE and outcomes only from the coordinator
//!   incarnation it follows. An older generation is refused for good (its
//!   data is behind the cluster's); the same or a newer generation with
//!   another nonce must check in first. It moves to another incarnation only
//!   through a check-in answer, which a coordinator gives only after
//!   verifying this participant's evidence.
//! * **Epochs only grow**, and membership follows the newest epoch heard.
//! * **A lease only grows.** It counts from when the check-in was *sent*,
//!   shortened by 10% for clock-rate drift, so it ends before the
//!   coordinator's own count; an answer without a lease never shortens one
//!   (the coordinator counts every lease it granted until it expires).
//! * **Ready once, then for good.** It votes and serves linearizable reads
//!   only after it has caught up with the coordinator once since start
//!   (applied up to the coordinator's last index, or within the join gap when
//!   not a member, and nothing in doubt).

use crate::error::Error;
use std::sync::Arc;

use crate::messages::{ClusterId, Incarnation, SyncReply};
use crate::protocol::Placement;

/// A non-member this close to the log's end counts as recovered (it still
/// applies up to its join index before voting or serving reads).
pub const JOIN_GAP: u64 = 128;

/// What a check-in answer requires the I/O layer to persist, in this order,
/// before it acts on the answer's outcomes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Persist {
    /// The cluster this replica just joined (first answer ever).
    pub cluster: Option<ClusterId>,
    /// The incarnation it follows from now on, and the one before.
    pub following: Option<(Option<Incarnation>, Incarnation)>,
    /// A higher seen index.
    pub seen_index: Option<u64>,
}

#[derive(Debug)]
pub struct ParticipantCore {
    id: u64,
    replica: u64,
    /// The data directory, for messages.
    data_dir: String,
    cluster: Option<ClusterId>,
    following: Option<Incarnation>,
    seen_index: u64,
    /// The coordinator's last index as of the latest answer.
    cluster_last: u64,
    ready: bool,
    epoch: u64,
    member: bool,
    /// Apply up to here before voting or serving linearizable reads.
    min_applied: u64,
    lease_until: Option<u64>,
    /// Learnt from the first check-in answer.
    placement: Option<Arc<Placement>>,
    last_contact: Option<u64>,
}

impl ParticipantCore {
    /// The state a replica starts with: what its data dir remembers.
    pub fn new(
        id: u64,
        replica: u64,
        data_dir: String,
        cluster: Option<ClusterId>,
        following: Option<Incarnation>,
        seen_index: u64,
    ) -> Self {
        ParticipantCore {
            id,
            replica,
            data_dir,
            cluster,
            following,
            seen_index,
            cluster_last: 0,
            ready: false,
            epoch: 0,
            member: false,
            min_applied: 0,
            lease_until: None,
            placement: None,
            last_contact: None,
        }
    }

    pub fn cluster(&self) -> Option<ClusterId> {
        self.cluster
    }
    pub fn following(&self) -> Option<Incarnation> {
        self.following
    }
    pub fn seen_index(&self) -> u64 {
        self.seen_index
    }
    pub fn cluster_last(&self) -> u64 {
        self.cluster_last
    }
    pub fn ready(&self) -> bool {
        self.ready
    }
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
    pub fn member(&self) -> bool {
        self.member
    }
    pub fn min_applied(&self) -> u64 {
        self.min_applied
    }

    /// Which participants hold which keys, once a check-in was answered.
    pub fn placement(&self) -> Option<Arc<Placement>> {
        self.placement.clone()
    }

    /// Milliseconds left on the read lease at `now` (`None`: holds none).
    pub fn lease_ms(&self, now: u64) -> Option<u64> {
        self.lease_until.and_then(|u| u.checked_sub(now)).filter(|ms| *ms > 0)
    }

    /// Milliseconds since the coordinator last answered.
    pub fn since_contact(&self, now: u64) -> Option<u64> {
        self.last_contact.map(|t| now.saturating_sub(t))
    }

    pub fn check_cluster(&self, cluster: ClusterId) -> Result<(), Error> {
        match self.cluster {
            Some(mine) if mine == cluster => Ok(()),
            Some(mine) => {
                Err(Error::Identity(format!("participant {} belongs to cluster {mine}, not {cluster}", self.id)))
            }
            None => Err(Error::NotReady(format!(
                "participant {} has not joined the cluster yet (waiting for the coordinator)",
                self.id
            ))),
        }
    }

    /// Whether a message from `from` may be acted on. `Err(NotReady)` means
    /// "check in with it first": the caller should check in at once.
    ///
    /// The same generation with another nonce is not proof of anything: a
    /// restored newest copy reuses the generation of the start that ran
    /// after the copy was taken. Whether such a coordinator may decide is
    /// settled by its check-in verification, never here.
    pub fn check_incarnation(&self, what: &str, from: Incarnation) -> Result<(), Error> {
        match self.following {
            Some(f) if f == from => Ok(()),
            Some(f) if from.generation >= f.generation => Err(Error::NotReady(format!(
                "participant {}: {what} from coordinator {from}, which it has not checked in with yet (it follows \
                 {f}); retry",
                self.id
            ))),
            None => Err(Error::NotReady(format!(
                "participant {} has not checked in with the coordinator yet; retry",
                self.id
            ))),
            Some(f) => Err(Error::Fenced(format!(
                "participant {} refuses a {what} from coordinator {from}: it follows {f}, so that coordinator runs \
                 on an older copy of its data dir than the cluster has seen (restored from an old backup?)",
                self.id
            ))),
        }
    }

    /// Outcomes (COMMIT indexes, ABORT attempts) may be acted on.
    pub fn check_decide(&self, cluster: ClusterId, from: Incarnation) -> Result<(), Error> {
        self.check_cluster(cluster)?;
        self.check_incarnation("COMMIT", from)
    }

    /// The checks a PREPARE batch passes as a whole before any transaction
    /// in it is looked at: cluster, addressee, sender, replica, readiness,
    /// view epoch. Passing makes this replica a member as of `epoch`.
    /// `not_ready` renders the "still catching up" answer.
    pub fn check_prepare(
        &mut self,
        cluster: ClusterId,
        to: u64,
        from: Incarnation,
        replica: u64,
        epoch: u64,
        not_ready: impl FnOnce(&Self) -> Error,
    ) -> Result<(), Error> {
        self.check_cluster(cluster)?;
        if to != self.id {
            return Err(Error::Identity(format!(
                "this participant was started with id {}, but the coordinator sent it a PREPARE for participant {to}: \
                 ids are positions in the coordinator's --participants list; check --id (TREATY_ID) and the list",
                self.id
            )));
        }
        self.check_incarnation("PREPARE", from)?;
        if replica != self.replica {
            return Err(Error::NotReady(format!(
                "participant {} is replica {:016x} (data dir {}), but the coordinator's view has replica \
                 {replica:016x} for it: this data dir replaced the one the view knows, and rejoins once it has \
                 caught up",
                self.id, self.replica, self.data_dir
            )));
        }
        if !self.ready {
            return Err(not_ready(self));
        }
        if epoch < self.epoch {
            return Err(Error::Conflict(format!(
                "participant {}: PREPARE from view epoch {epoch} but epoch {} is current; retry",
                self.id, self.epoch
            )));
        }
        self.epoch = epoch;
        self.member = true;
        Ok(())
    }

    /// A linearizable read may be served at `now`: caught up, and holding a
    /// lease. `coordinator` is the coordinator's address, for the message.
    pub fn check_read(&self, now: u64, coordinator: &str, not_ready: impl FnOnce(&Self) -> Error) -> Result<(), Error> {
        if !self.ready {
            return Err(not_ready(self));
        }
        if self.lease_until.is_some_and(|u| now < u) {
            return Ok(());
        }
        let why = if !self.member {
            format!("it is not in the current view (epoch {}) and is catching up to rejoin", self.epoch)
        } else {
            match self.since_contact(now) {
                Some(ms) if ms < 1000 => format!(
                    "the coordinator at {coordinator} has not granted one yet (it was just readmitted, or is still \
                     applying up to its join index {})",
                    self.min_applied
                ),
                Some(ms) => {
                    format!("the coordinator at {coordinator} has not renewed it for {:.1} s", ms as f64 / 1000.0)
                }
                None => format!("the coordinator at {coordinator} has not granted one yet"),
            }
        };
        Err(Error::NotReady(format!(
            "participant {} holds no read lease: {why}; retry another endpoint, or read with --stale for local \
             (possibly stale) data",
            self.id
        )))
    }

    /// A check-in sent at `sent` was answered at `now`. Returns what to
    /// persist before acting on the answer; `Err` when the answer comes from
    /// another cluster (fatal: this data dir is not that cluster's).
    pub fn on_reply(&mut self, reply: &SyncReply, sent: u64, now: u64) -> Result<Persist, Error> {
        let mut persist = Persist::default();
        match self.cluster {
            None => {
                self.cluster = Some(reply.cluster);
                persist.cluster = Some(reply.cluster);
            }
            Some(c) if c != reply.cluster => {
                return Err(Error::Identity(format!(
                    "this replica's data dir belongs to cluster {c}, but the coordinator leads cluster {}: point \
                     --coordinator at this replica's own cluster, or use an empty data dir",
                    reply.cluster
                )))
            }
            Some(_) => {}
        }
        if self.following != Some(reply.coordinator) {
            // The coordinator verified this check-in, so it knows the
            // incarnation followed so far: move to it.
            persist.following = Some((self.following, reply.coordinator));
            self.following = Some(reply.coordinator);
        }
        if reply.last_index > self.seen_index {
            self.seen_index = reply.last_index;
            persist.seen_index = Some(reply.last_index);
        }
        self.cluster_last = reply.last_index;
        self.last_contact = Some(now);
        if reply.epoch >= self.epoch {
            self.epoch = reply.epoch;
            self.member = reply.member;
        }
        self.min_applied = self.min_applied.max(reply.min_applied);
        if self.placement.as_deref().map(Placement::spec) != Some(&reply.placement) {
            self.placement = Some(Arc::new(reply.placement.clone().into()));
        }
        if let Some(ms) = reply.lease_ms {
            let new = sent + ms * 9 / 10;
            self.lease_until = Some(self.lease_until.map_or(new, |old| old.max(new)));
        }
        Ok(persist)
    }

    /// After the answer's outcomes and any catch-up: becomes ready if it has
    /// applied far enough and holds nothing in doubt. Returns whether it
    /// just became ready.
    pub fn maybe_ready(&mut self, applied: u64, in_doubt: usize) -> bool {
        if self.ready {
            return false;
        }
        let close_enough = applied >= self.cluster_last || (!self.member && applied + JOIN_GAP >= self.cluster_last);
        if close_enough && in_doubt == 0 {
            self.ready = true;
        }
        self.ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: ClusterId = ClusterId(9);
    const INC: Incarnation = Incarnation { generation: 3, nonce: 7 };

    fn reply(last_index: u64, epoch: u64, member: bool, lease_ms: Option<u64>) -> SyncReply {
        SyncReply {
            cluster: C,
            coordinator: INC,
            last_index,
            outcomes: vec![],
            epoch,
            member,
            lease_ms,
            min_applied: 0,
            placement: Placement::full(vec![1, 2, 3]).spec().clone(),
            participants: Default::default(),
            install: None,
        }
    }

    fn joined() -> ParticipantCore {
        let mut p = ParticipantCore::new(2, 42, "d".into(), None, None, 0);
        let persist = p.on_reply(&reply(5, 1, true, Some(2000)), 0, 1).unwrap();
        assert_eq!(
            persist,
            Persist { cluster: Some(C), following: Some((None, INC)), seen_index: Some(5) },
            "a first answer is persisted whole"
        );
        assert!(p.maybe_ready(5, 0));
        p
    }

    fn not_ready(_: &ParticipantCore) -> Error {
        Error::NotReady("catching up".into())
    }

    #[test]
    fn only_the_followed_incarnation_is_obeyed_older_ones_are_fenced() {
        let p = joined();
        assert!(p.check_incarnation("PREPARE", INC).is_ok());
        let older = Incarnation { generation: 2, nonce: 7 };
        assert!(matches!(p.check_incarnation("PREPARE", older), Err(Error::Fenced(_))));
        // The same generation with another nonce, or a newer one: check in.
        for other in [Incarnation { generation: 3, nonce: 8 }, Incarnation { generation: 4, nonce: 1 }] {
            assert!(matches!(p.check_incarnation("PREPARE", other), Err(Error::NotReady(_))));
        }
        let fresh = ParticipantCore::new(2, 42, "d".into(), Some(C), None, 0);
        assert!(matches!(fresh.check_incarnation("PREPARE", INC), Err(Error::NotReady(_))));
    }

    #[test]
    fn it_moves_to_another_incarnation_only_through_an_answer() {
        let mut p = joined();
        let next = Incarnation { generation: 4, nonce: 1 };
        assert!(p.check_incarnation("PREPARE", next).is_err());
        let mut r = reply(5, 1, true, None);
        r.coordinator = next;
        let persist = p.on_reply(&r, 10, 11).unwrap();
        assert_eq!(persist.following, Some((Some(INC), next)));
        assert_eq!(persist.seen_index, None, "nothing new seen");
        assert!(p.check_incarnation("PREPARE", next).is_ok());
        assert!(matches!(p.check_incarnation("PREPARE", INC), Err(Error::Fenced(_))));
    }

    #[test]
    fn an_answer_from_another_cluster_changes_nothing() {
        let mut p = joined();
        let mut r = reply(99, 7, false, Some(5000));
        r.cluster = ClusterId(10);
        assert!(matches!(p.on_reply(&r, 100, 101), Err(Error::Identity(_))));
        assert_eq!((p.cluster(), p.seen_index(), p.epoch(), p.member()), (Some(C), 5, 1, true));
    }

    #[test]
    fn a_prepare_is_checked_as_a_whole_and_epochs_only_grow() {
        let mut p = joined();
        let ok = |p: &mut ParticipantCore, epoch| p.check_prepare(C, 2, INC, 42, epoch, not_ready);
        assert!(ok(&mut p, 1).is_ok());
        assert!(matches!(p.check_prepare(ClusterId(1), 2, INC, 42, 1, not_ready), Err(Error::Identity(_))));
        assert!(matches!(p.check_prepare(C, 9999, INC, 42, 1, not_ready), Err(Error::Identity(_))));
        assert!(matches!(p.check_prepare(C, 2, INC, 43, 1, not_ready), Err(Error::NotReady(_))));
        assert!(ok(&mut p, 3).is_ok());
        assert_eq!(p.epoch(), 3);
        assert!(matches!(ok(&mut p, 2), Err(Error::Conflict(_))), "an older view's PREPARE");
        // An answer from an older epoch does not move membership back.
        p.on_reply(&reply(5, 2, false, None), 20, 21).unwrap();
        assert!(p.member() && p.epoch() == 3);
        let mut unready = ParticipantCore::new(2, 42, "d".into(), Some(C), Some(INC), 0);
        assert!(
            matches!(unready.check_prepare(C, 2, INC, 42, 1, not_ready), Err(Error::NotReady(m)) if m == "catching up")
        );
    }

    #[test]
    fn a_lease_counts_from_sending_shortened_and_never_shrinks() {
        let mut p = joined();
        // Granted 2000 ms for a check-in sent at 0: 1800 ms from sending.
        assert_eq!(p.lease_ms(1), Some(1799));
        assert!(p.check_read(1799, "c", not_ready).is_ok());
        assert!(matches!(p.check_read(1800, "c", not_ready), Err(Error::NotReady(_))));
        // An answer without a lease keeps the running one; a shorter grant
        // does not cut it either.
        p.on_reply(&reply(5, 1, true, None), 500, 501).unwrap();
        assert_eq!(p.lease_ms(1000), Some(800));
        p.on_reply(&reply(5, 1, true, Some(100)), 600, 601).unwrap();
        assert_eq!(p.lease_ms(1000), Some(800));
        p.on_reply(&reply(5, 1, true, Some(2000)), 1000, 1001).unwrap();
        assert_eq!(p.lease_ms(1000), Some(1800));
    }

    #[test]
    fn a_read_without_a_lease_says_why() {
        let mut p = joined();
        let msg = |p: &ParticipantCore, now| p.check_read(now, "c:1", not_ready).unwrap_err().to_string();
        assert!(msg(&p, 5000).contains("has not renewed it for 5.0 s"), "{}", msg(&p, 5000));
        p.on_reply(&reply(5, 2, false, None), 5000, 5001).unwrap();
        assert!(msg(&p, 5002).contains("not in the current view (epoch 2)"));
        let unready = ParticipantCore::new(2, 42, "d".into(), Some(C), Some(INC), 0);
        assert_eq!(msg(&unready, 0), not_ready(&unready).to_string());
    }

    #[test]
    fn ready_after_catching_up_once_with_nothing_in_doubt() {
        let mut p = ParticipantCore::new(2, 42, "d".into(), None, None, 0);
        p.on_reply(&reply(500, 1, true, None), 0, 1).unwrap();
        assert!(!p.maybe_ready(499, 0), "behind");
        assert!(!p.maybe_ready(500, 1), "something in doubt");
        assert!(p.maybe_ready(500, 0));
        // Not a member: within the join gap is enough (it applies up to its
        // join index before voting).
        let mut q = ParticipantCore::new(3, 43, "d".into(), None, None, 0);
        q.on_reply(&reply(500, 1, false, None), 0, 1).unwrap();
        assert!(!q.maybe_ready(500 - JOIN_GAP - 1, 0));
        assert!(q.maybe_ready(500 - JOIN_GAP, 0));
        // Ready for good: a later answer far ahead does not undo it.
        q.on_reply(&reply(10_000, 1, false, None), 2, 3).unwrap();
        assert!(q.ready());
    }
}

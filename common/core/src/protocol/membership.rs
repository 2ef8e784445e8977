//! The coordinator's view of who is a replica, and who may serve reads.
//!
//! A *view* is an epoch and a set of member participant ids. Every PREPARE
//! goes to exactly the members of the current view and carries its epoch.
//! Members hold *read leases*, granted when they check in (`sync`), and only a
//! member with a valid lease serves linearizable reads.
//!
//! Invariants:
//! * A member is excluded only after every lease it was granted has expired
//!   plus a clock-drift margin: at that point it surely no longer serves
//!   linearizable reads, so commits without it cannot be missed by a reader.
//! * A suspected member gets no new lease.
//! * A participant is (re)admitted only when both directions work (it checks
//!   in, and the coordinator's pings reach it), it holds nothing in doubt, and
//!   it is within `join_gap` commits of the log's end. It gets a lease only
//!   once it has applied everything up to its *join index* (the last commit
//!   index when it was admitted); PREPAREs ask it to reach that index before
//!   voting.
//! * Each member is *bound* to one replica (the random id of its data
//!   directory), durably in the view. Only that replica, checking in *and*
//!   answering pings at the member's configured address, gets leases; the
//!   PREPAREs sent to that address name it. A member whose address now
//!   answers as another replica (its directory was wiped or replaced) is
//!   suspected, excluded once its lease has expired, and the new replica
//!   joins like any returning node.
//! * A second process claiming a participant id while the first still
//!   answers at that id's address is refused (a ping after its first
//!   check-in still finds the first one there); it never gets a lease.
//!
//! * The *roster* lists every participant the cluster has had, with its
//!   address and state (active, joining, leaving, removed), durably beside
//!   the view. An operator adds a participant (it joins as *joining*, catches
//!   up like any returning node, and becomes *active* when first admitted)
//!   or removes one (*leaving*: it gets no new lease and is excluded once
//!   its lease has run out, then it is *removed*). Ids are never reused, a
//!   removed participant is refused for good, and a removal that would leave
//!   fewer than `min_replicas` participants is refused. In a partitioned
//!   cluster a leaving member that still holds partitions and answers is
//!   not excluded: its partitions move away first ([`Membership::set_holding`]).
//!
//! Time is an input: every method takes `now` in milliseconds of the
//! coordinator's monotonic clock. After a coordinator restart, all members are
//! treated as holding a fresh lease (a previous incarnation may have granted
//! one), so nobody is excluded before that would have expired.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// An epoch and its members. Stored durably by the coordinator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct View {
    pub epoch: u64,
    pub members: BTreeSet<u64>,
    /// Join index of each readmitted member (kept durably so that a
    /// coordinator restart cannot let a half-caught-up member vote).
    #[serde(default)]
    pub joined_at: BTreeMap<u64, u64>,
    /// The replica each member is bound to (see the module docs). A member
    /// without one is bound at its first check-in confirmed by a ping.
    #[serde(default)]
    pub replicas: BTreeMap<u64, u64>,
}

impl View {
    /// The initial view of a new cluster: every participant, none bound yet.
    pub fn initial(n: u64) -> View {
        View { epoch: 1, members: (1..=n).collect(), joined_at: BTreeMap::new(), replicas: BTreeMap::new() }
    }
}

/// A participant's place in the roster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RosterState {
    /// Created with the cluster, or admitted after being added.
    Active,
    /// Added by an operator, not yet admitted to the view.
    Joining,
    /// Being removed: no new lease; excluded once its lease has run out.
    Leaving,
    /// Gone for good: its id is refused and never reused.
    Removed,
}

impl std::fmt::Display for RosterState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RosterState::Active => "active",
            RosterState::Joining => "joining",
            RosterState::Leaving => "leaving",
            RosterState::Removed => "removed",
        })
    }
}

/// One participant of the roster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RosterEntry {
    pub addr: String,
    pub state: RosterState,
}

/// Every participant the cluster has had (see the module docs). Stored
/// durably with the view, in the same write.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Roster {
    pub nodes: BTreeMap<u64, RosterEntry>,
}

impl Roster {
    /// A new cluster's roster: participants `1..=n` at these addresses.
    pub fn initial(addrs: &[String]) -> Roster {
        let nodes = (1u64..)
            .zip(addrs)
            .map(|(id, addr)| (id, RosterEntry { addr: addr.clone(), state: RosterState::Active }))
            .collect();
        Roster { nodes }
    }

    /// Participants not removed, with their addresses, in id order.
    pub fn live(&self) -> BTreeMap<u64, String> {
        self.nodes
            .iter()
            .filter(|(_, e)| e.state != RosterState::Removed)
            .map(|(id, e)| (*id, e.addr.clone()))
            .collect()
    }

    pub fn state(&self, id: u64) -> Option<RosterState> {
        self.nodes.get(&id).map(|e| e.state)
    }

    fn set(&mut self, id: u64, state: RosterState) {
        if let Some(e) = self.nodes.get_mut(&id) {
            e.state = state;
        }
    }
}

/// An operator's request, queued until it is made durable.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Request {
    Add(u64, String),
    Remove(u64),
}

/// Timing and size limits of failure detection (all in milliseconds).
#[derive(Clone, Copy, Debug)]
pub struct MembershipConfig {
    /// A member silent (no check-in, or no answer to pings) this long is suspected.
    pub detect_ms: u64,
    /// Length of a read lease.
    pub lease_ms: u64,
    /// Extra wait after a lease's expiry before excluding its holder; covers
    /// clock-rate drift between machines (participants also shorten their
    /// own view of a lease by 10%).
    pub drift_margin_ms: u64,
    /// Below this many members, writes are refused.
    pub min_replicas: usize,
    /// A non-member is admitted once it is this close to the log's end.
    pub join_gap: u64,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        MembershipConfig { detect_ms: 1000, lease_ms: 2000, drift_margin_ms: 200, min_replicas: 3, join_gap: 256 }
    }
}

#[derive(Clone, Debug, Default)]
struct Node {
    last_sync: Option<u64>,
    last_ping_ok: Option<u64>,
    lease_until: u64,
    suspected: bool,
    applied: u64,
    in_doubt: usize,
    join_index: u64,
    /// The replica that checked in last.
    replica: Option<u64>,
    /// The replica that answered the last successful ping at the address.
    at_address: Option<u64>,
    /// A replica other than the one at the address, claiming this id, and
    /// since when (see [`Membership::on_sync`]).
    claim: Option<(u64, u64)>,
    /// Being removed (roster state `Leaving`): never leased or admitted again.
    leaving: bool,
    /// Installing a snapshot (as it said at its last check-in).
    installing: bool,
}

/// What the I/O layer must do: change the view (durably, with the write
/// gate held so that no transaction straddles two views).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ViewChange {
    Exclude(u64),
    Admit(u64),
    /// Bind a member to the replica now checking in at its address.
    Bind(u64),
    /// An operator added this participant: record it as joining.
    Add(u64),
    /// An operator removes this participant: record it as leaving (removed
    /// at once if it is not a member).
    Leave(u64),
}

impl ViewChange {
    fn id(self) -> u64 {
        match self {
            ViewChange::Exclude(id)
            | ViewChange::Admit(id)
            | ViewChange::Bind(id)
            | ViewChange::Add(id)
            | ViewChange::Leave(id) => id,
        }
    }
}

/// The answer to a participant's check-in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    pub member: bool,
    /// A lease of this many ms, measured by the participant from when it sent
    /// the check-in.
    pub lease_ms: Option<u64>,
    /// The participant must apply up to here before voting or serving reads.
    pub min_applied: u64,
}

#[derive(Debug)]
pub struct Membership {
    view: View,
    roster: Roster,
    config: MembershipConfig,
    /// Every participant not removed.
    nodes: BTreeMap<u64, Node>,
    /// Operators' requests not yet durable, oldest first.
    requests: std::collections::VecDeque<Request>,
    /// The log holds commits after this index only (compacted through it):
    /// a participant that has applied less cannot catch up from the log.
    log_start: u64,
    /// Participants the placement puts partitions on (partitioned clusters).
    holding: BTreeSet<u64>,
}

impl Membership {
    /// Starts from a stored view and roster.
    pub fn new(view: View, mut roster: Roster, config: MembershipConfig, now: u64) -> Self {
        // A joining participant that was admitted (a crash between the two
        // records cannot happen, they are one write; older data had no roster).
        for id in &view.members {
            if roster.state(*id) == Some(RosterState::Joining) {
                roster.set(*id, RosterState::Active);
            }
        }
        let nodes = roster
            .live()
            .keys()
            .map(|&id| {
                // Members start with a grace period of one detection time to
                // check in; non-members must be heard from first.
                let member = view.members.contains(&id);
                let seen = member.then_some(now);
                let lease_until = if member { now + config.lease_ms } else { 0 };
                let join_index = view.joined_at.get(&id).copied().unwrap_or(0);
                let leaving = roster.state(id) == Some(RosterState::Leaving);
                let node = Node {
                    last_sync: seen,
                    last_ping_ok: seen,
                    lease_until,
                    join_index,
                    leaving,
                    suspected: leaving,
                    ..Default::default()
                };
                (id, node)
            })
            .collect();
        Membership { view, roster, config, nodes, requests: Default::default(), log_start: 0, holding: BTreeSet::new() }
    }

    /// The participants that hold partitions now: a leaving one among them
    /// stays in the view while it answers, until its partitions have moved.
    pub fn set_holding(&mut self, holding: BTreeSet<u64>) {
        self.holding = holding;
    }

    /// The log was compacted through `index`.
    pub fn set_log_start(&mut self, index: u64) {
        self.log_start = self.log_start.max(index);
    }

    /// Participant `id` is (not) installing a snapshot: it is admitted
    /// only once it is not.
    pub fn set_installing(&mut self, id: u64, installing: bool) {
        if let Some(n) = self.nodes.get_mut(&id) {
            n.installing = installing;
        }
    }

    pub fn view(&self) -> &View {
        &self.view
    }

    pub fn roster(&self) -> &Roster {
        &self.roster
    }

    /// Participants not removed, with their addresses.
    pub fn participants(&self) -> BTreeMap<u64, String> {
        self.roster.live()
    }

    /// Queues adding participant `id` at `addr` (made durable by a later
    /// [`ViewChange::Add`]). Asking again for a participant already added
    /// at that address is not an error.
    pub fn request_add(&mut self, id: u64, addr: &str) -> Result<(), String> {
        match self.roster.nodes.get(&id) {
            Some(e) if e.state == RosterState::Removed => {
                let next = self.roster.nodes.keys().next_back().map_or(1, |m| m + 1);
                return Err(format!(
                    "participant {id} was removed from this cluster and ids are never reused: start the new node with \
                     --id {next} (and a certificate for participant {next}: `treaty certs issue DIR participant {next}`)"
                ));
            }
            Some(e) if e.addr == addr => return Ok(()),
            Some(e) => {
                return Err(format!(
                    "participant {id} is already in this cluster at {} ({}): each participant needs its own --id",
                    e.addr, e.state
                ))
            }
            None => {}
        }
        if let Some((other, _)) = self.roster.live().into_iter().find(|(_, a)| a == addr) {
            return Err(format!("{addr} is already participant {other}'s address: each participant needs its own"));
        }
        if self.requests.iter().any(|r| matches!(r, Request::Add(i, _) if *i == id)) {
            return Ok(());
        }
        self.requests.push_back(Request::Add(id, addr.to_string()));
        Ok(())
    }

    /// Queues removing participant `id` (made durable by a later
    /// [`ViewChange::Leave`]). Removing one already leaving or removed is
    /// not an error.
    pub fn request_remove(&mut self, id: u64) -> Result<(), String> {
        match self.roster.state(id) {
            None => {
                let ids: Vec<String> = self.roster.live().keys().map(u64::to_string).collect();
                return Err(format!("there is no participant {id}; the participants are {}", ids.join(", ")));
            }
            Some(RosterState::Removed | RosterState::Leaving) => return Ok(()),
            Some(_) => {}
        }
        if self.requests.contains(&Request::Remove(id)) {
            return Ok(());
        }
        let staying = self
            .roster
            .nodes
            .iter()
            .filter(|(i, e)| {
                **i != id
                    && matches!(e.state, RosterState::Active | RosterState::Joining)
                    && !self.requests.contains(&Request::Remove(**i))
            })
            .count();
        if staying < self.config.min_replicas {
            return Err(format!(
                "removing participant {id} would leave {staying} participant(s), fewer than the minimum of {} \
                     (--min-replicas): add one first (`treaty member add ADDR`)",
                self.config.min_replicas
            ));
        }
        self.requests.push_back(Request::Remove(id));
        Ok(())
    }

    /// Whether an operator's request for `id` is still waiting to be made
    /// durable.
    pub fn request_pending(&self, id: u64) -> bool {
        self.requests.iter().any(|r| matches!(r, Request::Add(i, _) | Request::Remove(i) if *i == id))
    }

    pub fn config(&self) -> &MembershipConfig {
        &self.config
    }

    /// The lowest applied index a member of the view has reported (0 until
    /// every member has checked in with this coordinator): the log must
    /// keep every entry above it.
    pub fn applied_floor(&self) -> u64 {
        self.view
            .members
            .iter()
            .map(|id| self.nodes.get(id).filter(|n| n.last_sync.is_some()).map_or(0, |n| n.applied))
            .min()
            .unwrap_or(0)
    }

    /// Join index of a member (0 for the original members).
    pub fn min_applied(&self, id: u64) -> u64 {
        self.nodes.get(&id).map_or(0, |n| n.join_index)
    }

    /// Whether writes may run: enough members in the view.
    pub fn check_writable(&self) -> Result<(), String> {
        let have = self.view.members.len();
        if have < self.config.min_replicas {
            return Err(format!(
                "only {have} of {} replicas are in the view (epoch {}, minimum {}): writes are refused until replicas \
                 return; `treaty status` shows which are down",
                self.nodes.len(),
                self.view.epoch,
                self.config.min_replicas
            ));
        }
        Ok(())
    }

    /// The replica a member is bound to (0: none yet). PREPAREs name it.
    pub fn bound_replica(&self, id: u64) -> u64 {
        self.view.replicas.get(&id).copied().unwrap_or(0)
    }

    /// The replica that answered the last ping at participant `id`'s address.
    pub fn replica_at_address(&self, id: u64) -> Option<u64> {
        self.nodes.get(&id).and_then(|n| n.at_address)
    }

    /// Whether node `id`'s checking-in replica is the one answering at its
    /// address and the one its membership is bound to.
    fn trusted(&self, id: u64, now: u64) -> bool {
        let Some(node) = self.nodes.get(&id) else { return false };
        node.replica.is_some()
            && node.replica == node.at_address
            && fresh(node.last_ping_ok, now, self.config.detect_ms)
            && self.view.replicas.get(&id).copied() == node.replica
    }

    /// A member whose address or check-ins show a replica other than the one
    /// it is bound to: its bound replica is gone (or never answers).
    fn replaced(&self, id: u64) -> bool {
        let (Some(node), Some(bound)) = (self.nodes.get(&id), self.view.replicas.get(&id)) else { return false };
        node.replica.is_some_and(|r| r != *bound) || node.at_address.is_some_and(|r| r != *bound)
    }

    /// A participant checked in as `replica`. Refused (`Err`, with what to
    /// do) when another replica still answers at this participant's address:
    /// two processes claim one id.
    pub fn on_sync(&mut self, id: u64, replica: u64, applied: u64, in_doubt: usize, now: u64) -> Result<Grant, String> {
        let member = self.view.members.contains(&id);
        let Some(node) = self.nodes.get_mut(&id) else {
            return Ok(Grant { member: false, lease_ms: None, min_applied: 0 });
        };
        if node.leaving {
            // Keeps it known (it may still hold a lease) but grants nothing.
            node.last_sync = Some(now);
            node.applied = applied;
            return Ok(Grant { member, lease_ms: None, min_applied: node.join_index });
        }
        match node.at_address {
            Some(at) if at != replica => {
                let since = match node.claim {
                    Some((r, since)) if r == replica => since,
                    _ => {
                        node.claim = Some((replica, now));
                        now
                    }
                };
                // A ping after the claim began still found the other one.
                if node.last_ping_ok.is_some_and(|t| t > since) {
                    return Err(format!(
                        "participant {id} is already running at its address as replica {at:016x}; this process \
                         (replica {replica:016x}) claims the same id: stop one of them (each participant needs its \
                         own --id, address and certificate)"
                    ));
                }
            }
            // The claimant now answers at the address: no longer a claim.
            _ if node.claim.is_some_and(|(r, _)| r == replica) => node.claim = None,
            _ => {}
        }
        node.last_sync = Some(now);
        node.applied = applied;
        node.in_doubt = in_doubt;
        node.replica = Some(replica);
        let trusted = self.trusted(id, now);
        let node = self.nodes.get_mut(&id).expect("present");
        if node.suspected && trusted {
            node.suspected = false;
        }
        let lease = member && trusted && !node.suspected && applied >= node.join_index;
        if lease {
            node.lease_until = node.lease_until.max(now + self.config.lease_ms);
        }
        Ok(Grant { member, lease_ms: lease.then_some(self.config.lease_ms), min_applied: node.join_index })
    }

    /// The coordinator's ping to a participant's address was answered by
    /// `replica` (`None`: it failed).
    pub fn on_ping(&mut self, id: u64, replica: Option<u64>, now: u64) {
        if let (Some(node), Some(r)) = (self.nodes.get_mut(&id), replica) {
            node.last_ping_ok = Some(now);
            node.at_address = Some(r);
        }
    }

    /// Advances time: suspects silent members and returns the view changes
    /// that are now safe and useful, at most one per call.
    pub fn tick(&mut self, now: u64, last_index: u64) -> Option<ViewChange> {
        let detect = self.config.detect_ms;
        let replaced: Vec<u64> = self.nodes.keys().copied().filter(|id| self.replaced(*id)).collect();
        for (id, node) in self.nodes.iter_mut() {
            if self.view.members.contains(id)
                && (!(fresh(node.last_sync, now, detect) && fresh(node.last_ping_ok, now, detect))
                    || replaced.contains(id))
            {
                node.suspected = true;
            }
            if node.leaving {
                node.suspected = true;
            }
        }
        if let Some(request) = self.requests.front() {
            return Some(match request {
                Request::Add(id, _) => ViewChange::Add(*id),
                Request::Remove(id) => ViewChange::Leave(*id),
            });
        }
        self.nodes.keys().find_map(|id| self.due(*id, now, last_index))
    }

    /// The view change for `id` that is safe and useful right now, if any.
    fn due(&self, id: u64, now: u64, last_index: u64) -> Option<ViewChange> {
        let node = self.nodes.get(&id)?;
        let detect = self.config.detect_ms;
        let member = self.view.members.contains(&id);
        let reachable = fresh(node.last_sync, now, detect)
            && fresh(node.last_ping_ok, now, detect)
            && node.replica.is_some()
            && node.replica == node.at_address;
        let still_holds = node.leaving && reachable && self.holding.contains(&id);
        if member && node.suspected && !still_holds && now >= node.lease_until + self.config.drift_margin_ms {
            return Some(ViewChange::Exclude(id));
        }
        if member && reachable && !self.view.replicas.contains_key(&id) {
            return Some(ViewChange::Bind(id));
        }
        // It must be able to catch up from the log: not installing a
        // snapshot, and past the compacted part.
        let can_catch_up = !node.installing && node.applied >= self.log_start;
        if !member
            && reachable
            && !node.leaving
            && can_catch_up
            && node.in_doubt == 0
            && node.applied + self.config.join_gap >= last_index
        {
            return Some(ViewChange::Admit(id));
        }
        None
    }

    /// Records a view change the I/O layer is about to make durable, if it
    /// is still due now: between [`Membership::tick`] proposing it and the
    /// I/O layer holding the write gate, the node may have checked in again
    /// and, for an exclusion, been granted a fresh lease, which would make
    /// excluding it unsafe (it would serve reads that miss commits made
    /// without it). `last_index` is the last commit index at that moment (the
    /// join index of an admitted node). Returns the new view, or `None` when
    /// the change is no longer due.
    pub fn apply(&mut self, change: ViewChange, last_index: u64, now: u64) -> Option<View> {
        let id = change.id();
        match change {
            ViewChange::Add(_) | ViewChange::Leave(_) => return self.apply_request(change),
            _ if self.due(id, now, last_index) != Some(change) => return None,
            _ => {}
        }
        // Binding changes no membership: PREPAREs of the current epoch stay valid.
        if !matches!(change, ViewChange::Bind(_)) {
            self.view.epoch += 1;
        }
        let replica = self.nodes.get(&id).and_then(|n| n.replica);
        match change {
            ViewChange::Exclude(id) => {
                self.view.members.remove(&id);
                self.view.joined_at.remove(&id);
                self.view.replicas.remove(&id);
                if self.roster.state(id) == Some(RosterState::Leaving) {
                    self.roster.set(id, RosterState::Removed);
                    self.nodes.remove(&id);
                }
            }
            ViewChange::Admit(id) => {
                self.view.members.insert(id);
                self.view.joined_at.insert(id, last_index);
                self.view.replicas.insert(id, replica.expect("due only with a replica"));
                if let Some(n) = self.nodes.get_mut(&id) {
                    n.join_index = last_index;
                    n.suspected = false;
                }
                if self.roster.state(id) == Some(RosterState::Joining) {
                    self.roster.set(id, RosterState::Active);
                }
            }
            ViewChange::Bind(id) => {
                self.view.replicas.insert(id, replica.expect("due only with a replica"));
            }
            ViewChange::Add(_) | ViewChange::Leave(_) => unreachable!("handled above"),
        }
        Some(self.view.clone())
    }

    /// Makes the oldest operator's request part of the roster (the view's
    /// members do not change, so neither does the epoch).
    fn apply_request(&mut self, change: ViewChange) -> Option<View> {
        let request = self.requests.front()?;
        match (change, request) {
            (ViewChange::Add(id), Request::Add(i, addr)) if id == *i => {
                let entry = RosterEntry { addr: addr.clone(), state: RosterState::Joining };
                self.roster.nodes.insert(id, entry);
                self.nodes.insert(id, Node::default());
            }
            (ViewChange::Leave(id), Request::Remove(i)) if id == *i => {
                if self.view.members.contains(&id) {
                    self.roster.set(id, RosterState::Leaving);
                    if let Some(n) = self.nodes.get_mut(&id) {
                        n.leaving = true;
                        n.suspected = true;
                    }
                } else {
                    self.roster.set(id, RosterState::Removed);
                    self.nodes.remove(&id);
                }
            }
            _ => return None,
        }
        self.requests.pop_front();
        Some(self.view.clone())
    }

    /// The applied index participant `id` last reported (`None`: it has
    /// not checked in with this coordinator).
    pub fn applied(&self, id: u64) -> Option<u64> {
        self.nodes.get(&id).filter(|n| n.last_sync.is_some()).map(|n| n.applied)
    }

    /// Milliseconds left on a node's lease as the coordinator counts it.
    pub fn lease_left(&self, id: u64, now: u64) -> u64 {
        self.nodes.get(&id).map_or(0, |n| n.lease_until.saturating_sub(now))
    }

    pub fn is_suspected(&self, id: u64) -> bool {
        self.nodes.get(&id).is_some_and(|n| n.suspected)
    }
}

/// Heard from within the detection time.
fn fresh(t: Option<u64>, now: u64, detect: u64) -> bool {
    t.is_some_and(|t| now.saturating_sub(t) <= detect)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roster(n: u64) -> Roster {
        Roster::initial(&(1..=n).map(|i| format!("p{i}")).collect::<Vec<_>>())
    }

    /// Replica (data dir) id of participant `id` in these tests.
    fn r(id: u64) -> u64 {
        100 + id
    }

    /// Five members bound to replicas `r(1)..=r(5)`.
    fn five(now: u64) -> Membership {
        let mut view = View::initial(5);
        view.replicas = (1..=5).map(|id| (id, r(id))).collect();
        Membership::new(view, roster(5), MembershipConfig::default(), now)
    }

    fn sync(m: &mut Membership, id: u64, applied: u64, in_doubt: usize, now: u64) -> Grant {
        m.on_sync(id, r(id), applied, in_doubt, now).expect("not a duplicate")
    }

    fn ping(m: &mut Membership, id: u64, now: u64) {
        m.on_ping(id, Some(r(id)), now);
    }

    fn heartbeat_all(m: &mut Membership, now: u64, except: &[u64]) {
        for id in 1..=5 {
            if !except.contains(&id) {
                ping(m, id, now);
                sync(m, id, 10, 0, now);
            }
        }
    }

    #[test]
    fn the_applied_floor_is_the_lowest_member_and_waits_for_every_member() {
        let mut m = five(0);
        for id in 1..=4 {
            sync(&mut m, id, 100 + id, 0, 10);
        }
        assert_eq!(m.applied_floor(), 0, "member 5 has not reported since the start");
        sync(&mut m, 5, 90, 0, 10);
        assert_eq!(m.applied_floor(), 90);
        // Silent, then excluded: it no longer holds the log back.
        let mut now = 10;
        while m.view().members.contains(&5) {
            now += 100;
            assert!(now < 10_000, "member 5 was never excluded");
            for id in 1..=4 {
                ping(&mut m, id, now);
                sync(&mut m, id, 100 + id, 0, now);
            }
            if let Some(change) = m.tick(now, 200) {
                m.apply(change, 200, now).expect("due");
            }
        }
        assert_eq!(m.applied_floor(), 101);
    }

    #[test]
    fn a_silent_member_is_excluded_only_after_its_lease_and_the_margin() {
        let mut m = five(0);
        let mut now = 0;
        // Everyone checks in every 100 ms; node 3 stops at t = 1000.
        let mut excluded_at = None;
        while now <= 6000 {
            heartbeat_all(&mut m, now, if now > 1000 { &[3] } else { &[] });
            if let Some(change) = m.tick(now, 10) {
                assert_eq!(change, ViewChange::Exclude(3));
                m.apply(change, 10, now).expect("still due");
                excluded_at = Some(now);
                break;
            }
            now += 100;
        }
        // Last lease granted at t=1000 runs to 3000, plus 200 ms margin.
        assert_eq!(excluded_at, Some(3200));
        assert_eq!(m.view().epoch, 2);
        assert!(!m.view().members.contains(&3));
    }

    #[test]
    fn a_suspected_member_gets_no_new_lease() {
        let mut m = five(0);
        heartbeat_all(&mut m, 0, &[]);
        // Pings to node 2 fail for longer than the detection time.
        for id in 1..=5 {
            if id != 2 {
                ping(&mut m, id, 1500);
            }
        }
        m.tick(1500, 0);
        assert!(m.is_suspected(2));
        assert_eq!(sync(&mut m, 2, 0, 0, 1500).lease_ms, None, "asymmetric partition: check-ins alone do not renew");
    }

    #[test]
    fn readmission_needs_both_directions_no_doubt_and_a_small_gap() {
        let mut view = View::initial(5);
        view.epoch = 3;
        view.members.remove(&3);
        view.replicas = [1, 2, 4, 5].into_iter().map(|id| (id, r(id))).collect();
        let mut m = Membership::new(view, roster(5), MembershipConfig::default(), 0);
        for id in [1, 2, 4, 5] {
            ping(&mut m, id, 50);
        }
        sync(&mut m, 3, 0, 0, 100);
        assert_eq!(m.tick(100, 1000), None, "pings have not reached it yet");
        ping(&mut m, 3, 100);
        assert_eq!(m.tick(100, 1000), None, "1000 commits behind");
        sync(&mut m, 3, 900, 1, 200);
        assert_eq!(m.tick(200, 1000), None, "holds a transaction in doubt");
        sync(&mut m, 3, 900, 0, 300);
        assert_eq!(m.tick(300, 1000), Some(ViewChange::Admit(3)));
        m.apply(ViewChange::Admit(3), 1000, 300).expect("still due");
        assert_eq!(m.view().epoch, 4);
        assert_eq!(m.bound_replica(3), r(3), "admitted as the replica at its address");
        let g = sync(&mut m, 3, 950, 0, 400);
        assert_eq!((g.member, g.lease_ms, g.min_applied), (true, None, 1000), "no lease before the join index");
        assert_eq!(sync(&mut m, 3, 1000, 0, 500).lease_ms, Some(2000));
    }

    /// A node that checks in again between the exclusion being proposed and
    /// being applied (the I/O layer first waits for in-flight transactions)
    /// may have been granted a fresh lease: excluding it then would let it
    /// serve reads that miss commits made without it.
    #[test]
    fn an_exclusion_is_dropped_if_the_node_came_back_before_it_was_applied() {
        let mut m = five(0);
        let mut now = 0;
        let change = loop {
            heartbeat_all(&mut m, now, if now > 1000 { &[3] } else { &[] });
            if let Some(change) = m.tick(now, 10) {
                break change;
            }
            now += 100;
        };
        assert_eq!(change, ViewChange::Exclude(3));
        // Node 3 wakes up (a SIGSTOP ends) while the gate drains: pings and
        // a check-in arrive, and the check-in gets a lease.
        now += 50;
        ping(&mut m, 3, now);
        let grant = sync(&mut m, 3, 10, 0, now);
        assert_eq!(grant.lease_ms, Some(2000));
        assert_eq!(m.apply(change, 10, now), None, "excluded a node holding a fresh lease");
        assert!(m.view().members.contains(&3) && m.view().epoch == 1);
        // Had it stayed silent, the exclusion would have gone through.
        let mut m = five(0);
        let mut now = 0;
        loop {
            heartbeat_all(&mut m, now, if now > 1000 { &[3] } else { &[] });
            if let Some(change) = m.tick(now, 10) {
                assert!(m.apply(change, 10, now + 50).is_some());
                break;
            }
            now += 100;
        }
        assert!(!m.view().members.contains(&3));
    }

    #[test]
    fn writes_need_the_minimum_number_of_members() {
        let mut m = five(0);
        assert!(m.check_writable().is_ok());
        // Nodes 1, 2 and 3 fall silent; each is excluded in turn.
        let mut now = 0;
        while m.view().members.len() > 2 {
            assert!(now < 10_000, "never excluded");
            heartbeat_all(&mut m, now, &[1, 2, 3]);
            if let Some(change) = m.tick(now, 0) {
                m.apply(change, 0, now).expect("still due");
            }
            now += 100;
        }
        let e = m.check_writable().unwrap_err();
        assert!(e.contains("only 2 of 5 replicas") && e.contains("minimum 3"), "{e}");
    }

    #[test]
    fn after_a_restart_nobody_is_excluded_before_an_old_lease_could_expire() {
        let mut m = five(10_000);
        // Nobody checks in at all.
        let mut now = 10_000;
        while m.tick(now, 0).is_none() {
            now += 100;
        }
        assert!(now >= 10_000 + 2000 + 200, "excluded at {now}");
    }

    #[test]
    fn a_new_cluster_binds_each_member_before_it_gets_a_lease() {
        let mut m = Membership::new(View::initial(3), roster(3), MembershipConfig::default(), 0);
        assert_eq!(m.on_sync(1, 501, 0, 0, 10).unwrap().lease_ms, None, "not bound yet");
        m.on_ping(1, Some(501), 20);
        assert_eq!(m.tick(30, 0), Some(ViewChange::Bind(1)));
        m.apply(ViewChange::Bind(1), 0, 30).expect("still due");
        assert_eq!(m.bound_replica(1), 501);
        assert_eq!(m.on_sync(1, 501, 0, 0, 40).unwrap().lease_ms, Some(2000));
    }

    /// Row 5 of the hardening issue: a second process started as participant
    /// 2 (its own data dir, another port) while participant 2 runs.
    #[test]
    fn a_second_process_claiming_a_live_id_is_refused_and_never_gets_a_lease() {
        let mut m = five(0);
        heartbeat_all(&mut m, 0, &[]);
        let dup = 999;
        // Its first check-in waits for a ping to tell who is at the address.
        let g = m.on_sync(2, dup, 10, 0, 10).expect("not yet known to be a duplicate");
        assert_eq!(g.lease_ms, None);
        // The real one keeps checking in meanwhile; that does not end the claim.
        sync(&mut m, 2, 10, 0, 50);
        ping(&mut m, 2, 100);
        let e = m.on_sync(2, dup, 10, 0, 110).unwrap_err();
        assert!(e.contains("already running") && e.contains("claims the same id"), "{e}");
        // The real participant 2 keeps its lease and membership.
        assert_eq!(sync(&mut m, 2, 10, 0, 120).lease_ms, Some(2000));
        assert_eq!(m.tick(120, 10), None);
    }

    /// A member whose data dir was wiped comes back as a new replica at the
    /// same address: it gets no lease as the old member, is excluded once
    /// the old lease has run out, and is then admitted as itself.
    #[test]
    fn a_replaced_replica_is_excluded_then_admitted_as_itself() {
        let mut m = five(0);
        heartbeat_all(&mut m, 0, &[]);
        let fresh_dir = 777;
        let mut now = 100;
        let mut changes = vec![];
        while now < 6000 && changes.len() < 2 {
            heartbeat_all(&mut m, now, &[3]);
            m.on_ping(3, Some(fresh_dir), now);
            let g = m.on_sync(3, fresh_dir, 10, 0, now).expect("the old process is gone");
            if m.view().members.contains(&3) {
                assert_eq!(g.lease_ms, None, "a replaced member got a lease as the old replica");
            }
            if let Some(c) = m.tick(now, 10) {
                m.apply(c, 10, now).expect("still due");
                changes.push((c, now));
            }
            now += 100;
        }
        assert_eq!(changes[0].0, ViewChange::Exclude(3));
        assert!(changes[0].1 >= 2000 + 200, "excluded before the old lease expired: {changes:?}");
        assert_eq!(changes[1].0, ViewChange::Admit(3));
        assert_eq!(m.bound_replica(3), fresh_dir);
    }

    /// Runs ticks (everyone but `silent` heartbeating) until `done`, applying
    /// every change; returns the time.
    fn run_until(m: &mut Membership, mut now: u64, silent: &[u64], done: impl Fn(&Membership) -> bool) -> u64 {
        while !done(m) {
            now += 100;
            assert!(now < 60_000, "never happened: {:?} {:?}", m.view(), m.roster());
            let ids: Vec<u64> = m.participants().keys().copied().collect();
            for id in ids {
                if !silent.contains(&id) {
                    ping(m, id, now);
                    let _ = m.on_sync(id, r(id), 10, 0, now);
                }
            }
            if let Some(change) = m.tick(now, 10) {
                m.apply(change, 10, now);
            }
        }
        now
    }

    #[test]
    fn an_added_participant_joins_then_is_admitted_and_becomes_active() {
        let mut m = five(0);
        heartbeat_all(&mut m, 0, &[]);
        assert!(m.request_add(6, "p6").is_ok());
        assert!(m.request_add(6, "p6").is_ok(), "asking again is not an error");
        assert!(m.request_add(7, "p1").unwrap_err().contains("already participant 1's address"));
        assert!(m.request_add(2, "elsewhere").unwrap_err().contains("already in this cluster"));
        // The request is made durable first (no epoch change) ...
        assert_eq!(m.tick(0, 10), Some(ViewChange::Add(6)));
        let view = m.apply(ViewChange::Add(6), 10, 0).expect("applies");
        assert_eq!(view.epoch, 1);
        assert_eq!(m.roster().state(6), Some(RosterState::Joining));
        assert!(!m.request_pending(6));
        // ... then it is admitted like any returning participant.
        run_until(&mut m, 0, &[], |m| m.view().members.contains(&6));
        assert_eq!(m.roster().state(6), Some(RosterState::Active));
        assert_eq!(m.view().epoch, 2);
    }

    #[test]
    fn a_removed_member_gets_no_lease_is_excluded_after_its_lease_and_never_returns() {
        let mut m = five(0);
        heartbeat_all(&mut m, 0, &[]);
        assert!(m.request_add(3, "p3").is_ok(), "re-adding a live participant at its address is a no-op");
        m.request_remove(3).expect("removable");
        assert_eq!(m.tick(100, 10), Some(ViewChange::Leave(3)));
        m.apply(ViewChange::Leave(3), 10, 100).expect("applies");
        assert_eq!(m.roster().state(3), Some(RosterState::Leaving));
        assert!(m.view().members.contains(&3), "still a member while its lease may run");
        assert_eq!(sync(&mut m, 3, 10, 0, 150).lease_ms, None, "a leaving member gets no lease");
        // It keeps checking in, and is excluded anyway once the lease is over.
        let at = run_until(&mut m, 100, &[], |m| !m.view().members.contains(&3));
        assert!(at >= 2000 + 200, "excluded at {at} ms, before its last lease (to 2000 ms) and the margin");
        assert_eq!(m.roster().state(3), Some(RosterState::Removed));
        assert!(!m.participants().contains_key(&3));
        // Never readmitted, even if it keeps checking in; its id is never reused.
        for t in (at..at + 5_000).step_by(100) {
            ping(&mut m, 3, t);
            let g = m.on_sync(3, r(3), 10, 0, t).unwrap();
            assert!(!g.member && g.lease_ms.is_none());
            assert_ne!(m.tick(t, 10), Some(ViewChange::Admit(3)));
        }
        assert!(m.request_add(3, "p3").unwrap_err().contains("ids are never reused: start the new node with --id 6"));
    }

    #[test]
    fn removals_keep_the_minimum_and_a_non_member_goes_at_once() {
        let mut m = five(0);
        heartbeat_all(&mut m, 0, &[]);
        m.request_remove(1).unwrap();
        m.request_remove(2).unwrap();
        let err = m.request_remove(3).unwrap_err();
        assert!(err.contains("would leave 2 participant(s), fewer than the minimum of 3"), "{err}");
        assert!(m.request_remove(9).unwrap_err().contains("there is no participant 9"));
        // Participant 2 silent long enough to be excluded, then removed: at once.
        let mut m = five(0);
        let now = run_until(&mut m, 0, &[2], |m| !m.view().members.contains(&2));
        m.request_remove(2).unwrap();
        assert_eq!(m.tick(now, 10), Some(ViewChange::Leave(2)));
        m.apply(ViewChange::Leave(2), 10, now).unwrap();
        assert_eq!(m.roster().state(2), Some(RosterState::Removed));
    }

    #[test]
    fn the_roster_survives_a_restart_and_a_leaving_member_keeps_leaving() {
        let mut m = five(0);
        heartbeat_all(&mut m, 0, &[]);
        m.request_add(6, "p6").unwrap();
        m.request_remove(4).unwrap();
        for _ in 0..2 {
            let c = m.tick(0, 10).unwrap();
            m.apply(c, 10, 0).unwrap();
        }
        let (view, roster) = (m.view().clone(), m.roster().clone());
        let mut m = Membership::new(view, roster, MembershipConfig::default(), 0);
        assert_eq!(m.roster().state(6), Some(RosterState::Joining));
        assert!(m.is_suspected(4));
        let now = run_until(&mut m, 0, &[], |m| m.roster().state(4) == Some(RosterState::Removed));
        run_until(&mut m, now, &[], |m| m.roster().state(6) == Some(RosterState::Active));
    }
}

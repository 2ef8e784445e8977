//! `treaty member add ADDR` / `treaty member remove ID`: change the
//! cluster's participants while it runs (docs/membership.md).
//!
//! Both return once the coordinator has made the change durable; with
//! `--wait` they also wait until it is complete (the added participant is
//! in the view, the removed one is out for good).

use std::time::{Duration, Instant};

use serde_json::json;
use treaty_client::{Client, Error, MemberChange};
use treaty_common::protocol::RosterState;
use treaty_common::rpc::ClusterStatus;

#[derive(clap::Subcommand, Debug)]
pub enum MemberAction {
    /// Admit the participant running at ADDR (started with
    /// `treaty-participant --id N --listen ADDR --data-dir D --coordinator C`).
    /// It copies a snapshot from the others, catches up and enters the view.
    Add {
        /// The address the coordinator reaches the new participant at.
        addr: String,
        /// Its id (default: the id it reports; it must hold that id's certificate).
        #[arg(long)]
        id: Option<u64>,
        /// Also wait until it is in the view (up to --timeout).
        #[arg(long)]
        wait: bool,
        /// Longest wait with --wait, in seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Remove participant ID for good: it gets no new read lease, leaves
    /// the view once its lease has run out, and is refused if it returns.
    Remove {
        id: u64,
        /// Also wait until it is out of the view (up to --timeout).
        #[arg(long)]
        wait: bool,
        /// Longest wait with --wait, in seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
}

/// Runs one `member` command; returns the exit status.
pub async fn run(client: &Client, action: MemberAction, json_mode: bool) -> i32 {
    let (change, wait, timeout) = match action {
        MemberAction::Add { addr, id, wait, timeout } => {
            let id = match id {
                Some(id) => id,
                None => match client.node_status_at(&addr).await {
                    Ok(n) if n.role == "participant" => n.id,
                    Ok(n) => {
                        return fail(Error::Invalid(format!("the node at {addr} is the {}, not a participant", n.role)))
                    }
                    Err(e) => {
                        return fail(Error::Unavailable(format!(
                            "no node answers at {addr} ({e}): start the participant first (treaty-participant --id N \
                             --listen {addr} --data-dir DIR --coordinator C), or pass --id N"
                        )))
                    }
                },
            };
            (MemberChange::Add { id, addr }, wait, timeout)
        }
        MemberAction::Remove { id, wait, timeout } => (MemberChange::Remove { id }, wait, timeout),
    };
    let status = match client.change_members(change.clone()).await {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let (id, verb) = match &change {
        MemberChange::Add { id, addr } => (*id, format!("participant {id} at {addr} added")),
        MemberChange::Remove { id } => (*id, format!("participant {id} removed")),
    };
    let state = crate::status::roster_state(&status, id);
    if !json_mode {
        println!("{verb}: it is {}", describe(state, status.members.contains(&id)));
    }
    let mut done = complete(&change, &status);
    if wait && !done {
        let started = Instant::now();
        let deadline = started + Duration::from_secs(timeout);
        while !done && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if let Ok(s) = client.cluster_status().await {
                done = complete(&change, &s);
                if done && !json_mode {
                    let st = crate::status::roster_state(&s, id);
                    println!(
                        "participant {id} is {} ({} ms)",
                        describe(st, s.members.contains(&id)),
                        started.elapsed().as_millis()
                    );
                }
            }
        }
        if !done {
            eprintln!("error: participant {id}'s change did not complete within {timeout} s; `treaty status` shows where it is");
        }
    }
    if json_mode {
        let s = client.cluster_status().await.unwrap_or(status);
        println!(
            "{}",
            json!({"id": id, "change": match change { MemberChange::Add { .. } => "add", MemberChange::Remove { .. } => "remove" },
                   "membership": crate::status::roster_state(&s, id).to_string(), "in_view": s.members.contains(&id), "complete": complete(&change, &s)})
        );
    }
    if wait && !done {
        3
    } else {
        0
    }
}

fn describe(state: RosterState, in_view: bool) -> &'static str {
    match state {
        RosterState::Joining => "joining: copying a snapshot and catching up; it enters the view by itself",
        RosterState::Active if in_view => "active and in the view",
        RosterState::Active => "active, not in the view yet (catching up)",
        RosterState::Leaving => {
            "leaving: no new read lease; its partitions (if keys are partitioned) move away, then it leaves the view \
             once its lease runs out"
        }
        RosterState::Removed => "removed for good",
    }
}

/// Whether the change is complete: added and in the view (with its share
/// of the partitions, in a partitioned cluster), or removed.
fn complete(change: &MemberChange, s: &ClusterStatus) -> bool {
    match change {
        MemberChange::Add { id, .. } => {
            crate::status::roster_state(s, *id) == RosterState::Active
                && s.members.contains(id)
                && s.rebalance.is_none()
        }
        MemberChange::Remove { id } => crate::status::roster_state(s, *id) == RosterState::Removed,
    }
}

fn fail(e: Error) -> i32 {
    eprintln!("error: {e}");
    crate::exit_code(&e)
}

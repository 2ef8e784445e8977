//! `status`: every node of the cluster as the coordinator sees it, one row
//! per node with one applied index each; or, when no endpoint can reach
//! the coordinator, what each endpoint says about itself (the fallback).
//! Shared by `treaty status` and the shell's `status`, as a table or as
//! one JSON object.
//!
//! Exit status: 0 every participant up and in the view, 3 otherwise.

use std::io::Write;

use serde_json::{json, Value};
use treaty_client::Client;
use treaty_common::protocol::{Placement, PlacementSpec, RosterState};
use treaty_common::rpc::{ClusterStatus, NodeStatus};
use treaty_common::types::escape;

/// `placement KEY`: where a key lives, as a line or as JSON.
pub fn placement(spec: &PlacementSpec, key: &[u8], json_mode: bool) -> String {
    let p = Placement::from(spec.clone());
    let partition = p.partition(key);
    let replicas = p.replicas(partition);
    if json_mode {
        return json!({
            "key": escape(key), "partition": partition, "partitions": p.partitions(), "replicas": replicas,
            "replication": p.replication(), "participants": p.holders().len(),
        })
        .to_string();
    }
    let ids = replicas.iter().map(u64::to_string).collect::<Vec<_>>().join(", ");
    if p.is_full() {
        format!("{}: on every participant ({ids}): this cluster keeps full copies", escape(key))
    } else {
        format!(
            "{}: partition {partition} of {}, on participants {ids} (each key on {} of {} participants)",
            escape(key),
            p.partitions(),
            p.replication(),
            p.holders().len()
        )
    }
}

/// "replication 3 of 5 (256 partitions)" for a partitioned cluster.
fn replication(spec: &PlacementSpec) -> String {
    if spec.is_full() {
        return String::new();
    }
    let holders = Placement::from(spec.clone()).holders().len();
    format!("  replication {} of {holders} ({} partitions)", spec.replication, spec.partitions)
}

/// Writes the status to `out`; returns the exit status.
pub async fn report(client: &Client, json_mode: bool, out: &mut impl Write) -> i32 {
    match client.cluster_status().await {
        Ok(s) => {
            let code =
                if s.participants.iter().all(|(id, _, st)| st.is_ok() && s.members.contains(id)) { 0 } else { 3 };
            let _ = if json_mode { writeln!(out, "{}", cluster_json(&s)) } else { cluster_table(&s, out) };
            code
        }
        Err(e) => {
            let why = format!("the coordinator is unreachable through every endpoint ({e})");
            let nodes = client.node_statuses().await;
            let _ = if json_mode {
                let nodes: Vec<Value> = nodes
                    .iter()
                    .map(|(addr, st)| match st {
                        Ok(n) => node_json(n, addr, n.member),
                        Err(e) => json!({"addr": addr, "state": "down", "error": e.to_string()}),
                    })
                    .collect();
                writeln!(out, "{}", json!({"coordinator": null, "error": why, "endpoints": nodes}))
            } else {
                endpoints_table(&why, &nodes, out)
            };
            3
        }
    }
}

/// "since start: 120 commits, 0.08 syncs and 0.26 RPCs per commit": what
/// one commit cost this node since it started (batching shows as ratios
/// below 1).
fn work(n: &NodeStatus) -> String {
    if n.commits == 0 {
        return format!("since start: no commits, {} syncs, {} RPCs", n.syncs, n.rpcs);
    }
    let per = |x: u64| x as f64 / n.commits as f64;
    format!("since start: {} commits, {:.2} syncs and {:.2} RPCs per commit", n.commits, per(n.syncs), per(n.rpcs))
}

/// "log 1200 entries, compacted through 98800": what the coordinator keeps.
fn log_note(c: &NodeStatus) -> String {
    match c.compacted {
        0 => format!("log {} entries", c.log_entries),
        through => format!("log {} entries, compacted through {through}", c.log_entries),
    }
}

fn cluster_table(s: &ClusterStatus, out: &mut impl Write) -> std::io::Result<()> {
    let c = &s.coordinator;
    writeln!(
        out,
        "cluster {}  last commit index {}  view epoch {}  members {:?} (minimum {}){}{}",
        c.cluster.map(|c| c.to_string()).unwrap_or_default(),
        c.applied_index,
        c.epoch,
        s.members,
        s.min_replicas,
        replication(&s.placement),
        if c.ready { "" } else { "  WRITES REFUSED: too few members" }
    )?;
    if let Some(why) = &c.fenced {
        writeln!(out, "COORDINATOR: {why}")?;
    }
    if let Some(moving) = &s.rebalance {
        writeln!(out, "REBALANCING: {moving}")?;
    }
    let partitioned = !s.placement.is_full();
    let row = |out: &mut dyn Write, cols: [&str; 7], note: &str| {
        writeln!(
            out,
            "{:<15} {:<22} {:<6} {:>8} {:>9} {:>8} {:>9}  {note}",
            cols[0], cols[1], cols[2], cols[3], cols[4], cols[5], cols[6]
        )
    };
    row(out, ["NODE", "ADDRESS", "STATE", "APPLIED", "PREPARED", "LEASE", "KEYS"], "NOTE")?;
    let applied = c.applied_index.to_string();
    let log = format!("{}; {}", log_note(c), work(c));
    row(out, ["coordinator", &c.addr, "up", &applied, &c.prepared.to_string(), "-", "-"], &log)?;
    for (id, addr, st) in &s.participants {
        let name = format!("participant {id}");
        let in_view = s.members.contains(id);
        let change = match roster_state(s, *id) {
            RosterState::Joining => Some("JOINING (added: catching up to enter the view)"),
            RosterState::Leaving if partitioned => {
                Some("LEAVING (removed: its partitions move away, then it is excluded once its read lease runs out)")
            }
            RosterState::Leaving => Some("LEAVING (removed: excluded once its read lease runs out)"),
            _ => None,
        };
        match st {
            Ok(n) => {
                let mut note = Vec::new();
                if let Some(change) = change {
                    note.push(change.to_string());
                } else if !in_view {
                    note.push("NOT IN VIEW (catching up to rejoin)".to_string());
                }
                if let Some(keys) = n.installing {
                    note.push(format!("INSTALLING A SNAPSHOT ({keys} keys copied)"));
                } else if !n.ready {
                    note.push("CATCHING UP".to_string());
                }
                for (t, age) in &n.in_doubt {
                    note.push(format!("in doubt {t} for {age} ms"));
                }
                if partitioned {
                    note.push(format!("holds {} of {} partitions", n.partitions, s.placement.partitions));
                }
                note.push(work(n));
                let lease = n.lease_ms.map_or("none".to_string(), |ms| format!("{ms}ms"));
                let (applied, prepared, keys) =
                    (n.applied_index.to_string(), n.prepared.to_string(), n.keys.to_string());
                let cols = [name.as_str(), addr, "up", &applied, &prepared, &lease, &keys];
                row(out, cols, &note.join("; "))?;
            }
            Err(e) => {
                let state = change.map(|c| format!("{c}; ")).unwrap_or_default();
                let note = format!("{state}{}{e}", if in_view || change.is_some() { "" } else { "NOT IN VIEW; " });
                row(out, [&name, addr, "down", "-", "-", "-", "-"], &note)?;
            }
        }
    }
    let removed: Vec<String> =
        s.roster.iter().filter(|(_, st)| *st == RosterState::Removed).map(|(id, _)| id.to_string()).collect();
    if !removed.is_empty() {
        writeln!(out, "removed for good: participant {}", removed.join(", "))?;
    }
    Ok(())
}

/// A participant's place in the roster (active if the coordinator did not say).
pub(crate) fn roster_state(s: &ClusterStatus, id: u64) -> RosterState {
    s.roster.iter().find(|(i, _)| *i == id).map_or(RosterState::Active, |(_, st)| *st)
}

fn endpoints_table(
    why: &str,
    nodes: &[(String, treaty_client::Result<NodeStatus>)],
    out: &mut impl Write,
) -> std::io::Result<()> {
    writeln!(out, "{why}; what each endpoint says about itself:")?;
    writeln!(out, "{:<22} {:<15} {:<12} {:>8} {:>9}  NOTE", "ADDRESS", "NODE", "STATE", "APPLIED", "PREPARED")?;
    for (addr, st) in nodes {
        match st {
            Ok(n) => writeln!(
                out,
                "{:<22} {:<15} {:<12} {:>8} {:>9}  {}",
                addr,
                format!("participant {}", n.id),
                if n.ready { "up" } else { "catching up" },
                n.applied_index,
                n.prepared,
                work(n)
            )?,
            Err(e) => writeln!(out, "{:<22} {:<15} {:<12} {:>8} {:>9}  {e}", addr, "?", "down", "-", "-")?,
        }
    }
    Ok(())
}

fn node_json(n: &NodeStatus, addr: &str, in_view: bool) -> Value {
    json!({
        "id": n.id,
        "role": n.role,
        "addr": addr,
        "state": if n.ready { "up" } else { "catching up" },
        "in_view": in_view,
        "applied_index": n.applied_index,
        "prepared": n.prepared,
        "lease_ms": n.lease_ms,
        "in_doubt": n.in_doubt.iter().map(|(t, age)| json!({"txn": t.to_string(), "age_ms": age})).collect::<Vec<_>>(),
        "since_start": {"commits": n.commits, "syncs": n.syncs, "rpcs": n.rpcs},
        "keys": n.keys,
        "partitions": n.partitions,
        "installing_snapshot": n.installing.map(|keys| json!({"keys_copied": keys})),
    })
}

fn cluster_json(s: &ClusterStatus) -> Value {
    let c = &s.coordinator;
    let mut coordinator = node_json(c, &c.addr, true);
    if let Some(fields) = coordinator.as_object_mut() {
        fields.remove("in_view");
        fields.remove("lease_ms");
        fields.remove("keys");
        fields.remove("installing_snapshot");
    }
    coordinator["log"] = json!({"entries": c.log_entries, "compacted_through": c.compacted});
    coordinator["state"] = json!("up");
    coordinator["fenced"] = json!(c.fenced);
    coordinator["accepting_writes"] = json!(c.ready && c.fenced.is_none());
    let participants: Vec<Value> = s
        .participants
        .iter()
        .map(|(id, addr, st)| {
            let mut v = match st {
                Ok(n) => node_json(n, addr, s.members.contains(id)),
                Err(e) => json!({"id": id, "role": "participant", "addr": addr, "state": "down",
                                 "in_view": s.members.contains(id), "error": e}),
            };
            v["membership"] = json!(roster_state(s, *id).to_string());
            v
        })
        .collect();
    let removed: Vec<u64> = s.roster.iter().filter(|(_, st)| *st == RosterState::Removed).map(|(id, _)| *id).collect();
    json!({
        "cluster": c.cluster.map(|c| c.to_string()),
        "last_commit_index": c.applied_index,
        "view_epoch": c.epoch,
        "members": s.members,
        "min_replicas": s.min_replicas,
        "replication": s.placement.replication,
        "partitions": s.placement.partitions,
        "placement_version": s.placement.version,
        "rebalance": s.rebalance,
        "coordinator": coordinator,
        "participants": participants,
        "removed": removed,
    })
}

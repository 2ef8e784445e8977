//! `treaty trace`: one transaction's timeline across the nodes, or the
//! slowest recent ones; shared by the command line and the shell.

use serde_json::json;

use crate::{Client, Error, TraceEvent, TraceSummary, TxnId};

/// The timeline as lines of text: offsets from the first event, node, step,
/// detail; with a first line saying how it ended.
pub fn render(txn: TxnId, events: &[TraceEvent]) -> Vec<String> {
    let Some(first) = events.first() else {
        return vec![format!(
            "transaction {txn}: no node remembers it (each keeps its recent transactions in memory only; older ones, \
             and those from before a node restarted, are gone)"
        )];
    };
    let answered = events.iter().find(|e| e.node == "coordinator" && e.step == "answered");
    let submitted = events.iter().find(|e| e.node == "coordinator" && e.step == "submitted");
    let head = match (submitted, answered) {
        (Some(s), Some(a)) => format!(
            "transaction {txn}: {} ({:.2} ms from submit to answer)",
            a.detail,
            (a.at_us.saturating_sub(s.at_us)) as f64 / 1000.0
        ),
        (_, Some(a)) => format!("transaction {txn}: {}", a.detail),
        (Some(_), None) => format!("transaction {txn}: not answered yet (still running, or the coordinator restarted)"),
        (None, None) => format!("transaction {txn}: seen by the participants only"),
    };
    let mut lines = vec![head];
    for e in events {
        let offset = e.at_us.saturating_sub(first.at_us) as f64 / 1000.0;
        lines.push(format!("  +{offset:>9.3} ms  {:<14} {:<17} {}", e.node, e.step, e.detail));
    }
    lines
}

/// One JSON object per event.
pub fn render_json(events: &[TraceEvent]) -> Vec<String> {
    let first = events.first().map_or(0, |e| e.at_us);
    events
        .iter()
        .map(|e| {
            json!({
                "txn": e.txn.to_string(), "node": e.node, "step": e.step, "detail": e.detail,
                "at_us": e.at_us, "offset_ms": e.at_us.saturating_sub(first) as f64 / 1000.0,
            })
            .to_string()
        })
        .collect()
}

/// The slowest recent transactions, one line each.
pub fn render_slowest(list: &[TraceSummary], json: bool) -> Vec<String> {
    if json {
        return list
            .iter()
            .map(|s| {
                json!({"txn": s.txn.to_string(), "took_ms": s.took_us as f64 / 1000.0, "outcome": s.outcome})
                    .to_string()
            })
            .collect();
    }
    if list.is_empty() {
        return vec!["the coordinator remembers no finished transaction".into()];
    }
    list.iter().map(|s| format!("{}  {:>9.2} ms  {}", s.txn, s.took_us as f64 / 1000.0, s.outcome)).collect()
}

/// Fetches and prints; the exit status (0, 4 when nothing is known, or the
/// error's).
pub async fn run(client: &Client, txn: Option<TxnId>, last_slow: Option<u32>, json: bool) -> Result<i32, Error> {
    if let Some(n) = last_slow {
        for line in render_slowest(&client.slowest(n).await?, json) {
            println!("{line}");
        }
        return Ok(0);
    }
    let txn = txn.expect("clap requires an id without --last-slow");
    let events = client.trace(txn).await?;
    let lines = if json { render_json(&events) } else { render(txn, &events) };
    for line in lines {
        println!("{line}");
    }
    Ok(if events.is_empty() { 4 } else { 0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeline_shows_offsets_nodes_and_the_answer() {
        let ev = |at_us, node: &str, step: &str, detail: &str| TraceEvent {
            txn: TxnId(7),
            at_us,
            node: node.into(),
            step: step.into(),
            detail: detail.into(),
        };
        let lines = render(
            TxnId(7),
            &[
                ev(1_000, "coordinator", "submitted", "0 condition(s), 1 write(s)"),
                ev(1_500, "participant 1", "voted", "yes"),
                ev(3_250, "coordinator", "answered", "committed at index 4"),
            ],
        );
        assert_eq!(lines[0], format!("transaction {}: committed at index 4 (2.25 ms from submit to answer)", TxnId(7)));
        assert!(lines[2].contains("+    0.500 ms  participant 1  voted"), "{}", lines[2]);
        assert!(render(TxnId(7), &[])[0].contains("no node remembers it"));
    }
}

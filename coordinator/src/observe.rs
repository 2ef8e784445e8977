//! What the coordinator shows of itself: Prometheus metrics (recorded where
//! things happen, gauges refreshed by the monitor), and the live status
//! page at `/` of its `--metrics` address, which polls `/status.json`
//! (the cluster's status plus the last two minutes of commit rate and
//! latency, one sample a second).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use treaty_common::{Committed, Error, Result};
use treaty_metrics as m;

use crate::Coordinator;

/// The status page: one HTML file, its script and styles inline (no
/// external assets: it works offline and behind any firewall).
const PAGE: &str = include_str!("status.html");
/// Samples the page's charts cover.
const HISTORY: usize = 120;

/// One second of the cluster's write traffic.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Sample {
    /// Unix time in ms at the end of the second.
    t: u64,
    commits: u64,
    errors: u64,
    p50_ms: f64,
    p99_ms: f64,
}

/// The coordinator's recent traffic, for the page.
pub(crate) struct Observer {
    /// Latencies (us) of the transactions answered this second.
    latencies: Mutex<hdrhistogram::Histogram<u64>>,
    errors: std::sync::atomic::AtomicU64,
    history: Mutex<VecDeque<Sample>>,
}

impl Observer {
    pub(crate) fn new() -> Self {
        Observer {
            latencies: Mutex::new(hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 2).expect("static bounds")),
            errors: Default::default(),
            history: Mutex::new(VecDeque::with_capacity(HISTORY)),
        }
    }

    /// A transaction this coordinator ran was answered after `took`.
    pub(crate) fn answered(&self, result: &Result<Committed>, took: Duration) {
        m::hot::commit_seconds().record(took.as_secs_f64());
        let _ = self.latencies.lock().unwrap().record(took.as_micros().max(1) as u64);
        if result.is_err() {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The `reason` label of an error (a short, fixed set of values).
pub(crate) fn reason(e: &Error) -> &'static str {
    match e {
        Error::ConditionFailed(_) => "condition_failed",
        Error::Conflict(_) => "conflict",
        Error::Unavailable(_) => "unavailable",
        Error::NotReady(_) => "not_ready",
        Error::InDoubt(_) => "in_doubt",
        Error::Invalid(_) => "invalid",
        Error::Fenced(_) => "fenced",
        Error::Denied(_) => "denied",
        _ => "other",
    }
}

/// Counts one answered transaction (in `step`, once per transaction).
pub(crate) fn count(result: &Result<Committed>) {
    match result {
        Ok(_) => m::hot::commits().increment(1),
        Err(e) => metrics::counter!(m::ABORTS, "reason" => reason(e)).increment(1),
    }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Coordinator {
    /// Refreshes the gauges (called by the monitor every tick).
    pub(crate) fn update_gauges(&self) {
        let last = self.last_index.load(Ordering::Acquire);
        let p = self.protocol.lock().unwrap();
        let core = &p.core;
        let membership = core.membership();
        let view = membership.view();
        metrics::gauge!(m::RUNNING).set(core.running() as f64);
        metrics::gauge!(m::VIEW_EPOCH).set(view.epoch as f64);
        metrics::gauge!(m::VIEW_MEMBERS).set(view.members.len() as f64);
        metrics::gauge!(m::FENCED).set(if core.check_fence() == Ok(true) { 0.0 } else { 1.0 });
        metrics::gauge!(m::LAST_INDEX).set(last as f64);
        metrics::counter!(m::LOCK_WAITS).absolute(core.lock_waits());
        for id in membership.participants().into_keys() {
            let label = id.to_string();
            let member = if view.members.contains(&id) { 1.0 } else { 0.0 };
            metrics::gauge!(m::PARTICIPANT_MEMBER, "participant" => label.clone()).set(member);
            if let Some(applied) = membership.applied(id) {
                metrics::gauge!(m::PARTICIPANT_APPLIED, "participant" => label.clone()).set(applied as f64);
                metrics::gauge!(m::PARTICIPANT_LAG, "participant" => label).set(last.saturating_sub(applied) as f64);
            }
        }
    }

    /// Takes one sample a second for the page's charts.
    pub(crate) async fn sampler(self: Arc<Self>) {
        let mut last_commits = self.committed.load(Ordering::Relaxed);
        let mut next = Instant::now();
        loop {
            next += Duration::from_secs(1);
            tokio::time::sleep_until(next.into()).await;
            let commits = self.committed.load(Ordering::Relaxed);
            let (p50, p99) = {
                let mut h = self.observe.latencies.lock().unwrap();
                let q = if h.is_empty() {
                    (0.0, 0.0)
                } else {
                    (h.value_at_quantile(0.5) as f64 / 1000.0, h.value_at_quantile(0.99) as f64 / 1000.0)
                };
                h.reset();
                q
            };
            let sample = Sample {
                t: unix_ms(),
                commits: commits.saturating_sub(last_commits),
                errors: self.observe.errors.swap(0, Ordering::Relaxed),
                p50_ms: p50,
                p99_ms: p99,
            };
            last_commits = commits;
            let mut history = self.observe.history.lock().unwrap();
            if history.len() == HISTORY {
                history.pop_front();
            }
            history.push_back(sample);
        }
    }

    /// What the page shows: every node as the cluster sees it now, and the
    /// history.
    async fn page_status(&self) -> PageStatus {
        let status = self.status().await;
        let last = status.coordinator.applied_index;
        let lease_left: std::collections::BTreeMap<u64, u64> = {
            let p = self.protocol.lock().unwrap();
            let now = self.now_ms();
            let m = p.core.membership();
            m.participants().into_keys().map(|id| (id, m.lease_left(id, now))).collect()
        };
        let roster: std::collections::BTreeMap<u64, String> =
            status.roster.iter().map(|(id, st)| (*id, format!("{st:?}").to_lowercase())).collect();
        let participants = status
            .participants
            .iter()
            .map(|(id, addr, s)| {
                let member = status.members.contains(id);
                match s {
                    Ok(n) => PageNode {
                        id: *id,
                        addr: addr.clone(),
                        up: true,
                        state: if n.installing.is_some() {
                            "installing a snapshot"
                        } else if !member {
                            "not in the view"
                        } else if !n.ready {
                            "catching up"
                        } else if n.lease_ms.is_none() {
                            "no lease"
                        } else {
                            "serving"
                        },
                        member,
                        roster: roster.get(id).cloned().unwrap_or_default(),
                        applied: n.applied_index,
                        lag: last.saturating_sub(n.applied_index),
                        lease_ms: n.lease_ms,
                        coordinator_lease_ms: lease_left.get(id).copied().unwrap_or(0),
                        in_doubt: n.in_doubt.iter().map(|(t, age)| (t.to_string(), *age)).collect(),
                        keys: n.keys,
                        error: None,
                    },
                    Err(e) => PageNode {
                        id: *id,
                        addr: addr.clone(),
                        up: false,
                        state: "down",
                        member,
                        roster: roster.get(id).cloned().unwrap_or_default(),
                        applied: 0,
                        lag: 0,
                        lease_ms: None,
                        coordinator_lease_ms: lease_left.get(id).copied().unwrap_or(0),
                        in_doubt: vec![],
                        keys: 0,
                        error: Some(e.clone()),
                    },
                }
            })
            .collect();
        let c = &status.coordinator;
        PageStatus {
            cluster: self.cluster.to_string(),
            coordinator: PageCoordinator {
                addr: c.addr.clone(),
                incarnation: c.coordinator.map(|i| i.to_string()).unwrap_or_default(),
                epoch: c.epoch,
                last_index: last,
                running: c.prepared,
                commits: c.commits,
                syncs: c.syncs,
                fenced: c.fenced.clone(),
                writable: c.ready,
            },
            members: status.members.clone(),
            min_replicas: status.min_replicas,
            replication: status.placement.replication as u64,
            participants,
            history: self.observe.history.lock().unwrap().iter().cloned().collect(),
        }
    }
}

#[derive(Serialize)]
struct PageStatus {
    cluster: String,
    coordinator: PageCoordinator,
    members: Vec<u64>,
    min_replicas: u64,
    replication: u64,
    participants: Vec<PageNode>,
    history: Vec<Sample>,
}

#[derive(Serialize)]
struct PageCoordinator {
    addr: String,
    incarnation: String,
    epoch: u64,
    last_index: u64,
    running: u64,
    commits: u64,
    syncs: u64,
    fenced: Option<String>,
    writable: bool,
}

#[derive(Serialize)]
struct PageNode {
    id: u64,
    addr: String,
    up: bool,
    state: &'static str,
    member: bool,
    roster: String,
    applied: u64,
    lag: u64,
    /// As the participant counts it (it shortens its own lease).
    lease_ms: Option<u64>,
    /// As the coordinator counts it.
    coordinator_lease_ms: u64,
    in_doubt: Vec<(String, u64)>,
    keys: u64,
    error: Option<String>,
}

/// The routes the coordinator adds to its metrics endpoint.
pub(crate) fn routes(coord: Arc<Coordinator>) -> treaty_metrics::axum::Router {
    use treaty_metrics::axum::{response::Html, routing::get, Json, Router};
    Router::new().route("/", get(|| async { Html(PAGE) })).route(
        "/status.json",
        get(move || {
            let coord = coord.clone();
            async move { Json(coord.page_status().await) }
        }),
    )
}

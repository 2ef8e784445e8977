//! A node's metrics in Prometheus's text format, over HTTP (`--metrics
//! ADDR`), through the `metrics` facade and `metrics-exporter-prometheus`.
//!
//! Code anywhere in a server records with `metrics::counter!`,
//! `metrics::gauge!` and `metrics::histogram!` under the names below; until
//! [`install`] runs (a node started without `--metrics`), those calls go to
//! the facade's no-op recorder and cost next to nothing.
//!
//! The endpoint serves `GET /metrics`; the coordinator adds its status page
//! and `/status.json` to the same router ([`serve`]). It is plain HTTP and
//! shows operational numbers only (counts, latencies, indexes, node states;
//! never keys or values): bind it to a private or loopback address.

use std::future::Future;
use std::sync::OnceLock;

pub use axum;

use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

/// Latency buckets (seconds) of every `*_seconds` histogram: 100 us to 10 s.
const BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Installs the Prometheus recorder for this process (once; later calls
/// return the same handle).
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("seconds".into()), BUCKETS)
                .expect("static buckets")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder can only be there if a test installed one.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Serves `GET /metrics` (and the routes of `extra`) on `listener` until
/// `shutdown` resolves.
pub async fn serve(listener: TcpListener, extra: Router, shutdown: impl Future<Output = ()> + Send + 'static) {
    let handle = install();
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let handle = handle.clone();
                async move {
                    handle.run_upkeep();
                    ([("content-type", "text/plain; version=0.0.4")], handle.render())
                }
            }),
        )
        .merge(extra);
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
        tracing::warn!(error = %e, "the metrics endpoint stopped");
    }
}

// Names of the metrics, one source for the servers, the tests and the docs
// (docs/observability.md lists what each means).

/// Coordinator: transactions committed.
pub const COMMITS: &str = "treaty_commits_total";
/// Coordinator: transactions answered with an error, by `reason`.
pub const ABORTS: &str = "treaty_aborts_total";
/// Coordinator: transactions that found a key locked and queued for it.
pub const LOCK_WAITS: &str = "treaty_lock_waits_total";
/// Coordinator: submit to answer, for every transaction answered.
pub const COMMIT_SECONDS: &str = "treaty_commit_seconds";
/// Coordinator: a PREPARE batch's round trip (send, participant's sync, votes).
pub const PREPARE_SECONDS: &str = "treaty_prepare_seconds";
/// Coordinator: writing and syncing one batch of decisions.
pub const DECISION_SYNC_SECONDS: &str = "treaty_decision_sync_seconds";
/// Both: durable syncs (flush + fdatasync).
pub const SYNCS: &str = "treaty_syncs_total";
/// Both: write-path messages (see `NodeStatus::rpcs`).
pub const MESSAGES: &str = "treaty_messages_total";
/// Coordinator: transactions running (locking, preparing, deciding).
pub const RUNNING: &str = "treaty_transactions_running";
/// Coordinator: the view's epoch and member count.
pub const VIEW_EPOCH: &str = "treaty_view_epoch";
pub const VIEW_MEMBERS: &str = "treaty_view_members";
/// Coordinator: 1 while fenced or still verifying after a start.
pub const FENCED: &str = "treaty_fenced";
/// Coordinator: the last durable commit index.
pub const LAST_INDEX: &str = "treaty_last_index";
/// Coordinator, per `participant`: applied index it reported, its lag
/// behind the last index, and whether it is a member of the view.
pub const PARTICIPANT_APPLIED: &str = "treaty_participant_applied_index";
pub const PARTICIPANT_LAG: &str = "treaty_participant_lag";
pub const PARTICIPANT_MEMBER: &str = "treaty_participant_member";
/// Participant: applied index, seconds left on its read lease (0: none),
/// member of the view, serving (caught up), records prepared and not
/// applied, and 1 while it installs a snapshot.
pub const APPLIED_INDEX: &str = "treaty_applied_index";
pub const LEASE_SECONDS: &str = "treaty_lease_seconds";
pub const MEMBER: &str = "treaty_member";
pub const READY: &str = "treaty_ready";
pub const PREPARED: &str = "treaty_prepared";
/// Participant: prepared transactions whose outcome it has not learned yet.
pub const IN_DOUBT: &str = "treaty_in_doubt";
pub const INSTALLING: &str = "treaty_installing";
/// Participant: keys copied by the snapshot install under way, and log
/// entries fetched to catch up.
pub const INSTALL_KEYS: &str = "treaty_install_keys";
pub const CATCH_UP_ENTRIES: &str = "treaty_catch_up_entries_total";
/// Participant: reads served, by `mode` (linearizable, stale, forwarded).
pub const READS: &str = "treaty_reads_total";
/// Participant: votes cast, by `vote` (yes, no, error).
pub const VOTES: &str = "treaty_votes_total";
/// Participant: transactions applied, and one apply batch's duration.
pub const APPLIED: &str = "treaty_applied_total";
pub const APPLY_SECONDS: &str = "treaty_apply_seconds";
/// Participant: a PREPARE batch from arrival to its votes (checks, WAL
/// write, sync).
pub const VOTE_SECONDS: &str = "treaty_vote_seconds";

/// Handles of the metrics recorded on every request, looked up once instead
/// of at every call (a lookup hashes the name and labels). They bind to the
/// recorder present at first use, so a server calls [`install`] before it
/// serves anything (without `--metrics` they bind to the no-op recorder).
pub mod hot {
    use std::sync::OnceLock;

    use metrics::{Counter, Histogram};

    macro_rules! handles {
        ($($fn:ident: $kind:ident = $make:expr;)*) => {$(
            pub fn $fn() -> &'static $kind {
                static H: OnceLock<$kind> = OnceLock::new();
                H.get_or_init(|| $make)
            }
        )*};
    }

    handles! {
        commits: Counter = metrics::counter!(super::COMMITS);
        messages: Counter = metrics::counter!(super::MESSAGES);
        syncs: Counter = metrics::counter!(super::SYNCS);
        commit_seconds: Histogram = metrics::histogram!(super::COMMIT_SECONDS);
        prepare_seconds: Histogram = metrics::histogram!(super::PREPARE_SECONDS);
        decision_sync_seconds: Histogram = metrics::histogram!(super::DECISION_SYNC_SECONDS);
        reads_linearizable: Counter = metrics::counter!(super::READS, "mode" => "linearizable");
        reads_stale: Counter = metrics::counter!(super::READS, "mode" => "stale");
        reads_forwarded: Counter = metrics::counter!(super::READS, "mode" => "forwarded");
        votes_yes: Counter = metrics::counter!(super::VOTES, "vote" => "yes");
        votes_no: Counter = metrics::counter!(super::VOTES, "vote" => "no");
        votes_error: Counter = metrics::counter!(super::VOTES, "vote" => "error");
        vote_seconds: Histogram = metrics::histogram!(super::VOTE_SECONDS);
        applied: Counter = metrics::counter!(super::APPLIED);
        apply_seconds: Histogram = metrics::histogram!(super::APPLY_SECONDS);
    }
}

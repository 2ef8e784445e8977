//! What clients and servers share on the network, on top of `treaty-core`.
//!
//! * [`types`], [`error`], [`protocol`]: re-exported from `treaty-core`
//!   (pure: no I/O).
//! * [`rpc`]: tarpc services, and their messages (from `treaty-core`).
//! * [`net`]: connections: TLS, framing, limits, the self-healing [`net::Peer`].
//! * [`tls`]: the cluster CA, identities, certificates.
//!
//! The binaries (`treaty-coordinator`, `treaty-participant`, `treaty`) are thin
//! layers of I/O around these.

pub mod cli;
pub mod net;
pub mod rpc;
pub mod tls;
pub mod trace;

pub use treaty_core::{error, protocol, types};

pub use error::{Error, Result};
pub use types::{Committed, Condition, Key, Txn, TxnId, Value, Versioned, Write};

/// The environment variable that configures failpoints, e.g.
/// `TREATY_FAILPOINTS=participant::after_prepare_sync=return`.
pub const FAILPOINTS_ENV: &str = "TREATY_FAILPOINTS";

/// A named protocol step at which tests can kill the process. Configured
/// through [`FAILPOINTS_ENV`] (`name=return` crashes there with `abort()`,
/// like a `kill -9`; `name=sleep(ms)` delays; `name=pause` blocks). A delay
/// or pause holds up only the step it is in, not the node's other work
/// (see [`failpoint_step`]).
#[macro_export]
macro_rules! crash_point {
    ($name:expr) => {
        $crate::crash_point!($name, {})
    };
    // `$before` runs first (e.g. a flush, to crash with the data written).
    ($name:expr, $before:expr) => {
        $crate::failpoint_step(|| {
            ::fail::fail_point!($name, |_| {
                $before;
                ::tracing::error!(failpoint = $name, "failpoint hit: aborting the process");
                eprintln!("treaty: failpoint {} hit: aborting", $name);
                ::std::process::abort();
            })
        })
    };
}

static FAILPOINTS_ARMED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Evaluates a failpoint ([`crash_point!`]). A `sleep` or `pause` action
/// blocks the thread it runs on; on a tokio worker that would stall every
/// task of the node, which runs one worker by default. So when failpoints
/// are armed and this runs on a worker, the worker first hands its other
/// tasks to a fresh thread (`block_in_place`), and the delay holds up only
/// this step, as a slow disk or a stuck thread would. Unarmed, this costs
/// one atomic load.
#[doc(hidden)]
pub fn failpoint_step(step: impl FnOnce()) {
    let on_worker = || {
        tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
    };
    if FAILPOINTS_ARMED.load(std::sync::atomic::Ordering::Relaxed) && on_worker() {
        tokio::task::block_in_place(step)
    } else {
        step()
    }
}

/// Loads failpoints from [`FAILPOINTS_ENV`]. Call once at startup.
pub fn setup_failpoints() -> anyhow::Result<()> {
    if let Ok(spec) = std::env::var(FAILPOINTS_ENV) {
        for item in spec.split(';').filter(|s| !s.trim().is_empty()) {
            let (name, action) = item
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("bad {FAILPOINTS_ENV} entry {item:?}: expected NAME=ACTION"))?;
            fail::cfg(name.trim(), action.trim())
                .map_err(|e| anyhow::anyhow!("bad {FAILPOINTS_ENV} entry {item:?}: {e}"))?;
            tracing::warn!(failpoint = name.trim(), action = action.trim(), "failpoint armed");
            FAILPOINTS_ARMED.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    Ok(())
}

/// What both server binaries do before `run`: arm failpoints and bind the
/// listener. On failure prints why (prefixed with `program`) and returns the
/// exit status: 2 for a bad failpoint spec, 1 if the address cannot be bound.
pub async fn start_server(program: &str, listen: &str) -> Result<tokio::net::TcpListener, i32> {
    if let Err(e) = setup_failpoints() {
        eprintln!("{program}: {e:#}");
        return Err(2);
    }
    tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        eprintln!("{program}: cannot listen on {listen}: {e}");
        1
    })
}

/// Sets up tracing to stderr, filtered by `RUST_LOG` (default `info,tarpc=error`).
pub fn init_tracing(format: cli::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // tarpc reports every failed call and every peer that disconnects
        // without a TLS close_notify (clients do that routinely); Treaty logs
        // what matters of those itself, once per change (see `net::Peer`).
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tarpc=off"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        cli::LogFormat::Json => builder.json().flatten_event(true).try_init(),
        // Colour codes only on a terminal: log files and `docker logs` stay plain.
        cli::LogFormat::Text => builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).try_init(),
    };
}

/// Resolves on Ctrl-C or SIGTERM (what `docker stop` and `treaty demo` send).
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown requested");
}

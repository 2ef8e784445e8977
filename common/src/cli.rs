//! Flags every server shares: how it secures its connections, how it logs
//! and serves metrics, and the threads it runs on.

use std::net::ToSocketAddrs;
use std::path::PathBuf;

use crate::net::DEFAULT_MAX_CONNECTIONS;
use crate::tls::{Identity, Security};

/// TLS credentials, connection limits, logging and threads of a server.
#[derive(clap::Args, Debug, Clone)]
pub struct SecurityArgs {
    /// Directory with the cluster's `ca.pem` and this node's certificate and
    /// key (`treaty certs create DIR --participants N` makes them).
    #[arg(long, env = "TREATY_CERTS", value_name = "DIR")]
    pub certs: Option<PathBuf>,
    /// Run without TLS or authentication (plaintext; anyone who reaches the
    /// port may do anything). Only for tests and measurements on loopback:
    /// refused on any other listen address.
    #[arg(long, env = "TREATY_INSECURE", conflicts_with = "certs")]
    pub insecure: bool,
    /// Most connections this node accepts at once (further ones are refused
    /// with a message); lowered to fit the file-descriptor limit.
    #[arg(long, env = "TREATY_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// A frame (one request) must arrive whole within this many ms of its
    /// first byte, or the connection is closed; raise it only for very slow links.
    #[arg(long, env = "TREATY_FRAME_TIMEOUT_MS", default_value_t = crate::net::FRAME_TIMEOUT.as_millis() as u64)]
    pub frame_timeout_ms: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics (and, on the
    /// coordinator, the live status page at http://ADDR/): plain HTTP with
    /// operational numbers only, so bind it to a private address.
    #[arg(long, env = "TREATY_METRICS", value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Log lines as text, or as one JSON object per line for log shippers.
    #[arg(long, env = "TREATY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Threads that run this node's network and protocol work. One is the
    /// fastest on small machines and when several nodes share one (fewer
    /// hand-offs between threads per write; docs/decisions.md "One worker
    /// thread per node"); raise it for a coordinator on a machine of its own
    /// with many cores and many clients. Disk syncs and long applies run on
    /// threads of their own either way.
    #[arg(long, env = "TREATY_WORKER_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub worker_threads: u16,
}

impl SecurityArgs {
    /// Runs a server's main future on a tokio runtime of `--worker-threads`
    /// workers and returns its exit status (1, saying why, if the runtime
    /// cannot start).
    pub fn run(&self, program: &str, server: impl std::future::Future<Output = i32>) -> i32 {
        match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(self.worker_threads as usize)
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime.block_on(server),
            Err(e) => {
                eprintln!("{program}: cannot start its threads: {e}");
                1
            }
        }
    }
}

/// How servers write their log lines (stderr).
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Whether every address `listen` resolves to is a loopback address.
pub fn is_loopback(listen: &str) -> bool {
    match listen.to_socket_addrs() {
        Ok(addrs) => {
            let addrs: Vec<_> = addrs.collect();
            !addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback())
        }
        Err(_) => false,
    }
}

impl SecurityArgs {
    /// The security a server listening on `listen` as `me` runs with. On a
    /// mistake, prints what to do (prefixed with `program`) and returns the
    /// exit status (2).
    pub fn server_security(&self, program: &str, listen: &str, me: Identity) -> Result<Security, i32> {
        if self.insecure {
            if !is_loopback(listen) {
                eprintln!(
                    "{program}: --insecure is refused on {listen}, which is not a loopback address: without TLS \
                     anyone who can reach the port could read and change data or act as a node. Pass --certs DIR \
                     instead (`treaty certs create DIR --participants N` makes them)"
                );
                return Err(2);
            }
            eprintln!(
                "{program}: WARNING: running without TLS or authentication (--insecure): for tests and \
                 measurements only"
            );
            tracing::warn!("running without TLS or authentication (--insecure)");
            return Ok(Security::Insecure);
        }
        let Some(dir) = &self.certs else {
            eprintln!(
                "{program}: no TLS credentials: pass --certs DIR (TREATY_CERTS) pointing at the directory \
                 `treaty certs create DIR --participants N` made, or --insecure on a loopback address for local tests"
            );
            return Err(2);
        };
        Security::tls(dir, me).map_err(|e| {
            eprintln!("{program}: {e}");
            2
        })
    }
}

//! `treaty bench`: closed-loop load in the shape of etcd's benchmark tool, so
//! figures compare side by side. Each client sends its next request when the
//! previous one returns; clients are spread round-robin over `--connections`
//! (each connection goes to the next endpoint). Keys are the zero-padded
//! decimal of a uniform random index in `[0, --key-space)` (16 bytes); values
//! are `--value-size` random bytes.
//!
//! On a terminal a live line shows progress, the rate so far and the p99 of
//! the last half second; otherwise nothing is recorded for it.

use std::io::IsTerminal as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::{Rng, RngCore, SeedableRng};

use crate::{Client, Security, Txn, Write};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// One put per request.
    Put,
    /// One transaction of 4 puts on distinct keys per request.
    Txn4,
    /// One linearizable read of a preloaded key per request.
    Get,
}

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[arg(long, value_enum, default_value = "put")]
    pub workload: Workload,
    /// Concurrent closed-loop clients.
    #[arg(long, default_value_t = 1)]
    pub clients: usize,
    /// TCP connections the clients share (at most one per client).
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
    /// Total requests.
    #[arg(long, default_value_t = 10_000)]
    pub ops: u64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 256)]
    pub value_size: usize,
    /// Number of distinct keys.
    #[arg(long, default_value_t = 100_000)]
    pub key_space: u64,
    /// Give up after this many seconds even if not all requests were sent.
    #[arg(long, default_value_t = 300)]
    pub max_seconds: u64,
    /// One JSON object instead of text (set by the global `-o json` / `--json`).
    #[arg(skip)]
    pub json: bool,
}

fn key(i: u64) -> Vec<u8> {
    format!("{i:016}").into_bytes()
}

pub async fn run(endpoints: Vec<String>, security: Security, args: BenchArgs) -> i32 {
    if args.clients == 0 || args.ops == 0 || args.key_space < 4 {
        eprintln!("error: --clients and --ops must be at least 1 and --key-space at least 4");
        return 2;
    }
    let conns = args.connections.clamp(1, args.clients);
    let clients: Vec<Arc<Client>> = (0..conns)
        .map(|i| {
            let mut eps = endpoints.clone();
            eps.rotate_left(i % endpoints.len());
            Arc::new(Client::new(eps, security.clone()))
        })
        .collect();
    if args.workload == Workload::Get {
        let preload = args.key_space.min(args.ops.max(1000));
        eprintln!("preloading {preload} keys...");
        let value = vec![b'x'; args.value_size];
        let mut start = 0;
        while start < preload {
            let end = (start + 64).min(preload);
            let writes = (start..end).map(|i| Write::Put(key(i), value.clone())).collect();
            if let Err(e) = clients[0].commit(Txn::new(vec![], writes)).await {
                eprintln!("error: preload failed: {e}");
                return 3;
            }
            start = end;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let key_space =
        if args.workload == Workload::Get { args.key_space.min(args.ops.max(1000)) } else { args.key_space };
    let counters_before = Work::of(&clients[0]).await;
    let remaining = Arc::new(AtomicU64::new(args.ops));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let deadline = Instant::now() + Duration::from_secs(args.max_seconds);
    let started = Instant::now();
    let live = std::io::stderr().is_terminal().then(|| Arc::new(Live::default()));
    let ticker = live.clone().map(|live| tokio::spawn(live_line(live, args.ops, started)));
    let tasks: Vec<_> = (0..args.clients)
        .map(|c| {
            let live = live.clone();
            let client = clients[c % conns].clone();
            let remaining = remaining.clone();
            let errors = errors.clone();
            let first_error = first_error.clone();
            let workload = args.workload;
            let value_size = args.value_size;
            tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(c as u64 + 1);
                let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
                while remaining.fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| r.checked_sub(1)).is_ok() {
                    if Instant::now() > deadline {
                        break;
                    }
                    let t0 = Instant::now();
                    let result = match workload {
                        Workload::Put => {
                            let mut v = vec![0u8; value_size];
                            rng.fill_bytes(&mut v);
                            client.put(&key(rng.gen_range(0..key_space)), &v).await.map(|_| ())
                        }
                        Workload::Txn4 => {
                            let mut keys = std::collections::BTreeSet::new();
                            while keys.len() < 4 {
                                keys.insert(rng.gen_range(0..key_space));
                            }
                            let writes = keys
                                .into_iter()
                                .map(|k| {
                                    let mut v = vec![0u8; value_size];
                                    rng.fill_bytes(&mut v);
                                    Write::Put(key(k), v)
                                })
                                .collect();
                            client.commit(Txn::new(vec![], writes)).await.map(|_| ())
                        }
                        Workload::Get => client.get(&key(rng.gen_range(0..key_space))).await.map(|_| ()),
                    };
                    let micros = t0.elapsed().as_micros().max(1) as u64;
                    if let Some(live) = &live {
                        if result.is_ok() {
                            let _ = live.recent.lock().unwrap().record(micros);
                        }
                        live.done.fetch_add(1, Ordering::Relaxed);
                    }
                    match result {
                        Ok(()) => {
                            let _ = hist.record(micros);
                        }
                        Err(e) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            first_error.lock().unwrap().get_or_insert(e.to_string());
                        }
                    }
                }
                hist
            })
        })
        .collect();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    for t in tasks {
        hist.add(t.await.expect("bench client panicked")).expect("histogram merge");
    }
    if let Some(t) = ticker {
        t.abort();
        let _ = t.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    // Writes only: the counters count write-path work.
    let work = match (args.workload, counters_before, Work::of(&clients[0]).await) {
        (Workload::Get, ..) => None,
        (_, Some(before), Some(after)) => after.per_commit_since(&before),
        _ => None,
    };
    let ok = hist.len();
    let errs = errors.load(Ordering::Relaxed);
    let ops_per_sec = ok as f64 / elapsed;
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let name = format!("{:?}", args.workload).to_lowercase();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "workload": name, "clients": args.clients, "connections": conns, "value_size": args.value_size,
                "ops": ok, "errors": errs, "seconds": elapsed, "ops_per_sec": ops_per_sec,
                "tls": !security.is_insecure(),
                "p50_ms": ms(0.5), "p99_ms": ms(0.99), "p999_ms": ms(0.999), "max_ms": hist.max() as f64 / 1000.0,
                "per_commit": work.map(|w| serde_json::json!({
                    "coordinator_syncs": w.coordinator_syncs, "coordinator_rpcs": w.coordinator_rpcs,
                    "participant_syncs": w.participant_syncs, "participant_rpcs": w.participant_rpcs,
                })),
            })
        );
    } else {
        println!(
            "{name}: {ok} ok, {errs} errors in {elapsed:.2} s = {ops_per_sec:.0} ops/s  latency p50 {:.2} ms  p99 {:.2} ms  p999 {:.2} ms  max {:.2} ms  (clients {}, connections {conns}, value {} B, {})",
            ms(0.5), ms(0.99), ms(0.999), hist.max() as f64 / 1000.0, args.clients, args.value_size,
            if security.is_insecure() { "insecure" } else { "TLS" }
        );
        if let Some(w) = work {
            println!(
                "per commit: coordinator {:.3} syncs, {:.2} rpcs; each participant {:.3} syncs, {:.2} rpcs",
                w.coordinator_syncs, w.coordinator_rpcs, w.participant_syncs, w.participant_rpcs
            );
        }
    }
    if let Some(e) = first_error.lock().unwrap().take() {
        eprintln!("first error: {e}");
    }
    if errs > 0 {
        1
    } else {
        0
    }
}

/// What the live line shows, recorded by the clients.
struct Live {
    /// Latencies since the line last looked.
    recent: Mutex<Histogram<u64>>,
    /// Requests finished.
    done: AtomicU64,
}

impl Default for Live {
    fn default() -> Self {
        Live {
            recent: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram")),
            done: AtomicU64::new(0),
        }
    }
}

/// The live line, redrawn every half second until aborted; cleared on drop.
async fn live_line(live: Arc<Live>, ops: u64, started: Instant) {
    let bar = indicatif::ProgressBar::new(ops);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:24} {pos}/{len} requests  {msg}  ETA {eta}")
            .expect("progress template"),
    );
    struct Clear(indicatif::ProgressBar);
    impl Drop for Clear {
        fn drop(&mut self) {
            self.0.finish_and_clear();
        }
    }
    let bar = Clear(bar);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let done = live.done.load(Ordering::Relaxed);
        let p99 = {
            let mut h = live.recent.lock().unwrap();
            let p99 = (!h.is_empty()).then(|| h.value_at_quantile(0.99) as f64 / 1000.0);
            h.reset();
            p99
        };
        let rate = done as f64 / started.elapsed().as_secs_f64();
        bar.0.set_position(done);
        bar.0.set_message(match p99 {
            Some(p99) => format!("{rate:.0} ops/s  p99 {p99:.2} ms (last 0.5 s)"),
            None => format!("{rate:.0} ops/s  (nothing finished in the last 0.5 s)"),
        });
    }
}

/// Write-path work counters summed over the cluster (`treaty status`).
#[derive(Clone, Copy)]
struct Work {
    commits: u64,
    coordinator_syncs: u64,
    coordinator_rpcs: u64,
    participant_syncs: u64,
    participant_rpcs: u64,
    participants: u64,
}

/// Work per commit during the run; participant figures are per participant.
#[derive(Clone, Copy)]
struct PerCommit {
    coordinator_syncs: f64,
    coordinator_rpcs: f64,
    participant_syncs: f64,
    participant_rpcs: f64,
}

impl Work {
    /// The cluster's counters now, if the coordinator answers.
    async fn of(client: &Client) -> Option<Work> {
        let s = client.cluster_status().await.ok()?;
        let mut w = Work {
            commits: s.coordinator.commits,
            coordinator_syncs: s.coordinator.syncs,
            coordinator_rpcs: s.coordinator.rpcs,
            participant_syncs: 0,
            participant_rpcs: 0,
            participants: 0,
        };
        for n in s.participants.iter().filter_map(|(_, _, st)| st.as_ref().ok()) {
            w.participant_syncs += n.syncs;
            w.participant_rpcs += n.rpcs;
            w.participants += 1;
        }
        Some(w)
    }

    /// `None` when nothing committed or a node restarted (counters reset).
    fn per_commit_since(&self, before: &Work) -> Option<PerCommit> {
        let commits = self.commits.checked_sub(before.commits).filter(|c| *c > 0)? as f64;
        let parts = self.participants.max(1) as f64;
        let d = |a: u64, b: u64| a.checked_sub(b).map(|x| x as f64);
        Some(PerCommit {
            coordinator_syncs: d(self.coordinator_syncs, before.coordinator_syncs)? / commits,
            coordinator_rpcs: d(self.coordinator_rpcs, before.coordinator_rpcs)? / commits,
            participant_syncs: d(self.participant_syncs, before.participant_syncs)? / commits / parts,
            participant_rpcs: d(self.participant_rpcs, before.participant_rpcs)? / commits / parts,
        })
    }
}

//! A harness for multi-process tests: real `treaty-coordinator` and
//! `treaty-participant` binaries on loopback, real sled directories, and
//! `kill -9` (SIGKILL) to crash them.
//!
//! The binaries are built once per test process with `cargo build --workspace
//! --bins` (a no-op when they are up to date), so `cargo test` alone suffices.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use treaty_client::{Client, Identity, ReadMode, Security};
use treaty_common::rpc::NodeStatus;

/// Path of a workspace binary, building the workspace's binaries first.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        raise_fd_limit();
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--workspace", "--bins", "--quiet"])
            .current_dir(&workspace)
            .status()
            .expect("running cargo build");
        assert!(status.success(), "cargo build --workspace --bins failed");
        let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| workspace.join("target"));
        target.join("debug")
    });
    let path = dir.join(name);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// Ports that were free a moment ago (bound, then released).
///
/// The ports come from below the kernel's ephemeral range, so nothing bound
/// to port 0 afterwards (a test's proxy, an outgoing connection) can take
/// one while its node is down or not yet started. A process-wide cursor
/// (starting at a point drawn from the pid and clock) never hands out the
/// same port twice, and each port is checked free when handed out.
pub fn free_ports(n: usize) -> Vec<u16> {
    static CURSOR: std::sync::Mutex<Option<u32>> = std::sync::Mutex::new(None);
    let low = 10_000u32;
    let high = ephemeral_low().max(low + 1_000);
    let span = high - low;
    let mut cursor = CURSOR.lock().unwrap();
    let next = cursor.get_or_insert_with(|| {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        (std::process::id().wrapping_mul(7919) ^ nanos) % span
    });
    let mut ports = Vec::with_capacity(n);
    for _ in 0..span {
        if ports.len() == n {
            break;
        }
        let port = (low + *next % span) as u16;
        *next = (*next + 1) % span;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            ports.push(port);
        }
    }
    assert_eq!(ports.len(), n, "no {n} free ports between {low} and {high}");
    ports
}

/// The lowest port the kernel hands out for port 0 and outgoing connections.
fn ephemeral_low() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok()))
        .unwrap_or(32_768)
}

/// Every key of a replica with its value and version.
pub type Data = std::collections::BTreeMap<Vec<u8>, (Vec<u8>, u64)>;

/// Every key, value and version in participant `i`'s sled files (the
/// participant must be stopped), asserting no snapshot install is unfinished.
pub fn stored(c: &Cluster, i: usize) -> Data {
    let store = treaty_storage::ReplicaStore::open(&c.data_dir(i), i as u64).unwrap();
    assert!(store.install().unwrap().is_none(), "participant {i} stopped with an install unfinished");
    let mut data = Data::new();
    let mut req = treaty_common::types::RangeRequest::prefix(b"");
    loop {
        let page = store.range(&req).unwrap();
        for e in page.entries {
            data.insert(e.key, (e.value.unwrap(), e.version));
        }
        match page.next {
            Some(next) => req.start = next,
            None => return data,
        }
    }
}

/// A key's value and version as one replica holds it (`None`: missing).
pub type Entry = Option<(Vec<u8>, u64)>;

/// Node 0 is the coordinator; nodes 1..=n are participants.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub ports: Vec<u16>,
    procs: Vec<Option<Child>>,
    /// Extra flags for the coordinator (e.g. `--min-replicas 2`).
    pub coordinator_args: Vec<String>,
    /// Addresses the coordinator uses for participants 1..=n (default: their
    /// own; a fault proxy can sit in between).
    pub route_to_participant: Option<Vec<String>>,
    /// Address each participant 1..=n uses for the coordinator.
    pub route_to_coordinator: Option<Vec<String>>,
    /// Run every node with `--insecure` instead of TLS (set before spawning).
    pub insecure: bool,
    /// Participants the cluster was created with (the coordinator's
    /// `--participants`); later ones were added with `treaty member add`.
    initial: usize,
    /// Participants removed for good: left out of the helpers below.
    removed: std::collections::BTreeSet<usize>,
    /// Ports of the participants' Redis-protocol doors (`--redis`), once
    /// [`Cluster::enable_redis`] asked for them.
    pub redis_ports: Vec<u16>,
    /// Ports of every node's metrics endpoint (`--metrics`; node 0 is the
    /// coordinator, with the status page), once [`Cluster::enable_metrics`]
    /// asked for them.
    pub metrics_ports: Vec<u16>,
}

impl Cluster {
    /// Starts a coordinator and `n` participants and waits until all are ready.
    pub async fn start(n: usize) -> Cluster {
        Cluster::start_with(n, &[]).await
    }

    /// Like [`Cluster::start`] with extra coordinator flags.
    pub async fn start_with(n: usize, coordinator_args: &[&str]) -> Cluster {
        let mut c = Cluster::new(n);
        c.coordinator_args.extend(coordinator_args.iter().map(|s| s.to_string()));
        for i in 0..=n {
            c.spawn(i, &[]);
        }
        c.wait_ready(Duration::from_secs(20)).await;
        c
    }

    /// Allocates ports and directories without starting anything.
    /// Allocates ports and directories and creates the cluster's CA and
    /// certificates (in `certs_dir()`) without starting anything.
    pub fn new(n: usize) -> Cluster {
        let mut dir = tempfile::tempdir().unwrap();
        // TREATY_TEST_KEEP=1 keeps every cluster's directory (logs, data) for a post-mortem.
        if std::env::var_os("TREATY_TEST_KEEP").is_some() {
            dir.disable_cleanup(true);
            eprintln!("keeping cluster directory {}", dir.path().display());
        }
        treaty_common::tls::create(&dir.path().join("certs"), n as u64).expect("creating certificates");
        Cluster {
            dir,
            ports: free_ports(n + 1),
            procs: (0..=n).map(|_| None).collect(),
            coordinator_args: vec!["--min-replicas".into(), n.min(3).to_string()],
            route_to_participant: None,
            route_to_coordinator: None,
            insecure: false,
            initial: n,
            removed: Default::default(),
            redis_ports: vec![],
            metrics_ports: vec![],
        }
    }

    /// Gives every node a metrics endpoint (before spawning).
    pub fn enable_metrics(&mut self) {
        self.metrics_ports = free_ports(self.n() + 1);
    }

    /// The `/metrics` text of node `i` (`None` if it does not answer).
    pub fn scrape(&self, i: usize) -> Option<String> {
        http_get(&format!("127.0.0.1:{}", self.metrics_ports[i]), "/metrics")
    }

    /// Gives every participant a Redis-protocol door (before spawning).
    pub fn enable_redis(&mut self) {
        self.redis_ports = free_ports(self.n());
    }

    /// Makes room for one more participant (the next id, with its own port
    /// and certificate) without starting it; returns its id.
    pub fn add_node(&mut self) -> usize {
        let id = self.ports.len();
        if !self.insecure {
            treaty_common::tls::issue(&self.certs_dir(), &Identity::Participant(id as u64))
                .expect("issuing a participant certificate");
        }
        self.ports.push(free_ports(1)[0]);
        self.procs.push(None);
        id
    }

    /// Participant `i` was removed for good: the helpers leave it out.
    pub fn mark_removed(&mut self, i: usize) {
        self.removed.insert(i);
    }

    /// Participants not removed, in id order.
    pub fn live(&self) -> Vec<usize> {
        (1..=self.n()).filter(|i| !self.removed.contains(i)).collect()
    }

    /// The cluster's certificates (CA, every node, client `admin`).
    pub fn certs_dir(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    /// How clients of this cluster connect: the `admin` client certificate.
    pub fn client_security(&self) -> Security {
        if self.insecure {
            return Security::Insecure;
        }
        Security::tls(&self.certs_dir(), Identity::Client("admin".into())).expect("client certificate")
    }

    /// The `treaty` CLI set up to talk to this cluster (credentials in the
    /// environment; endpoints still to be given).
    pub fn cli(&self) -> Command {
        let mut cmd = Command::new(binary("treaty"));
        cmd.env_remove("TREATY_CERTS").env_remove("TREATY_INSECURE").env_remove("TREATY_ENDPOINTS");
        if self.insecure {
            cmd.env("TREATY_INSECURE", "1");
        } else {
            cmd.env("TREATY_CERTS", self.certs_dir());
        }
        cmd
    }

    /// The security flags every node of this cluster starts with.
    pub fn security_args(&self) -> Vec<String> {
        if self.insecure {
            vec!["--insecure".into()]
        } else {
            vec!["--certs".into(), self.certs_dir().display().to_string()]
        }
    }

    pub fn n(&self) -> usize {
        self.ports.len() - 1
    }

    pub fn addr(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.ports[i])
    }

    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("node-{i}"))
    }

    pub fn participant_addrs(&self) -> Vec<String> {
        self.live().into_iter().map(|i| self.addr(i)).collect()
    }

    /// The command line that starts node `i`.
    pub fn command(&self, i: usize) -> Command {
        let mut cmd;
        if i == 0 {
            cmd = Command::new(binary("treaty-coordinator"));
            cmd.arg("--listen").arg(self.addr(0)).arg("--data-dir").arg(self.data_dir(0));
            let initial = (1..=self.initial).map(|i| self.addr(i)).collect();
            let targets = self.route_to_participant.clone().unwrap_or(initial);
            cmd.arg("--participants").arg(targets.join(","));
            cmd.args(&self.coordinator_args);
        } else {
            cmd = Command::new(binary("treaty-participant"));
            cmd.arg("--id").arg(i.to_string()).arg("--listen").arg(self.addr(i));
            // Participants added later talk to the coordinator directly.
            let coordinator = match self.route_to_coordinator.as_ref().and_then(|r| r.get(i - 1)) {
                Some(route) => route.clone(),
                None => self.addr(0),
            };
            cmd.arg("--data-dir").arg(self.data_dir(i)).arg("--coordinator").arg(coordinator);
            if let Some(port) = self.redis_ports.get(i - 1) {
                cmd.arg("--redis").arg(format!("127.0.0.1:{port}"));
            }
        }
        cmd.args(self.security_args());
        if let Some(port) = self.metrics_ports.get(i) {
            cmd.arg("--metrics").arg(format!("127.0.0.1:{port}"));
        }
        for var in
            ["TREATY_FAILPOINTS", "TREATY_CERTS", "TREATY_INSECURE", "TREATY_MAX_CONNECTIONS", "TREATY_LOG_FORMAT"]
        {
            cmd.env_remove(var);
        }
        // TREATY_TEST_LOG overrides the nodes' log filter (e.g. `debug`).
        let filter = std::env::var("TREATY_TEST_LOG").unwrap_or_else(|_| "info,tarpc=off".into());
        cmd.env("RUST_LOG", filter).stdin(Stdio::null());
        cmd
    }

    /// Starts node `i` with extra environment variables (e.g. failpoints).
    pub fn spawn(&mut self, i: usize, env: &[(&str, &str)]) {
        assert!(self.procs[i].is_none(), "node {i} is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("node-{i}.log")))
            .unwrap();
        let mut cmd = self.command(i);
        cmd.envs(env.iter().copied()).stdout(log.try_clone().unwrap()).stderr(log);
        self.procs[i] = Some(cmd.spawn().expect("spawning a node"));
    }

    /// SIGKILLs node `i` (like a power cut for the process) and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.procs[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops node `i` gracefully (SIGTERM, as `docker stop` does) and waits.
    pub fn stop(&mut self, i: usize) {
        if let Some(child) = self.procs[i].as_ref() {
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            assert!(self.wait_exit(i, Duration::from_secs(10)), "node {i} did not stop on SIGTERM");
        }
    }

    /// Waits for node `i` to exit by itself (e.g. at a failpoint) and returns
    /// whether it did within `timeout`.
    pub fn wait_exit(&mut self, i: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(child) = self.procs[i].as_mut() {
                if child.try_wait().unwrap().is_some() {
                    self.procs[i] = None;
                    return true;
                }
            } else {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Process id of node `i`, if running.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.procs[i].as_ref().map(|c| c.id())
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("node-{i}.log"))).unwrap_or_default()
    }

    /// A client using every participant as an endpoint.
    pub fn client(&self) -> Client {
        self.client_with(self.participant_addrs())
    }

    /// A client bound to participant `i` only.
    pub fn client_for(&self, i: usize) -> Client {
        self.client_with(vec![self.addr(i)])
    }

    /// A client of this cluster for these endpoints.
    pub fn client_with(&self, endpoints: Vec<String>) -> Client {
        Client::new(endpoints, self.client_security()).with_timeout(Duration::from_secs(10))
    }

    /// Participant `i`'s own status, if it answers.
    pub async fn status(&self, i: usize) -> Option<NodeStatus> {
        self.client_for(i).node_statuses().await.pop().and_then(|(_, s)| s.ok())
    }

    /// Waits until every participant is ready and in the view and all have
    /// applied the same index; returns that index.
    pub async fn wait_ready(&self, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let mut indexes = Vec::new();
            for i in self.live() {
                match self.status(i).await {
                    // Ready, and holding a read lease (so it serves reads).
                    Some(s) if s.ready && s.lease_ms.is_some() => indexes.push(s.applied_index),
                    _ => {}
                }
            }
            if indexes.len() == self.live().len() && indexes.iter().all(|x| *x == indexes[0]) {
                // ... and the view holds every participant again.
                let status = self.client().cluster_status().await;
                if let Ok(s) = status {
                    if s.coordinator.applied_index == indexes[0] && s.members.len() == self.live().len() {
                        return indexes[0];
                    }
                }
            }
            if Instant::now() > deadline {
                let logs: Vec<String> =
                    (0..=self.n()).map(|i| format!("--- node {i}\n{}", tail(&self.log(i)))).collect();
                panic!("cluster not ready/converged after {timeout:?}: applied {indexes:?}\n{}", logs.join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (up to `timeout`) until every participant has applied the same
    /// index, and the coordinator's last index when it answers. COMMIT
    /// messages go out after the client's answer, so a replica may briefly
    /// lag a write the client already saw committed.
    pub async fn wait_applied(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let mut indexes = Vec::new();
            for i in self.live() {
                if let Some(s) = self.status(i).await {
                    indexes.push(s.applied_index);
                }
            }
            if indexes.len() == self.live().len() && indexes.iter().all(|x| *x == indexes[0]) {
                match self.client().cluster_status().await {
                    Ok(s) if s.coordinator.applied_index != indexes[0] => {}
                    _ => return true,
                }
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Reads `keys` from every participant's local state, once they have all
    /// applied the same index, and asserts all replicas hold identical
    /// values and versions. Returns participant 1's.
    pub async fn assert_replicas_identical(&self, keys: &[Vec<u8>]) -> Vec<Entry> {
        // Not converging is reported by the comparison below.
        self.wait_applied(Duration::from_secs(10)).await;
        let mut first: Option<Vec<Entry>> = None;
        for i in self.live() {
            let c = self.client_for(i);
            let mut values = Vec::new();
            for k in keys {
                let v = c.get_with(k, ReadMode::Stale).await.unwrap_or_else(|e| panic!("stale read on {i}: {e}"));
                values.push(v.map(|v| (v.value, v.version)));
            }
            match &first {
                None => first = Some(values),
                Some(f) => assert_eq!(f, &values, "participant {i} differs from participant 1"),
            }
        }
        first.unwrap()
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.procs.len() {
            self.kill(i);
        }
    }
}

/// A hand-made peer: a raw tarpc client of type `C` on a connection to
/// `addr` made with `security`, as anyone holding those credentials could.
pub async fn raw_peer<C: treaty_common::net::RpcClient>(
    addr: &str,
    security: &Security,
    expect: treaty_common::tls::Expect,
) -> std::io::Result<C> {
    let io = treaty_common::net::connect(addr, security, &expect, Duration::from_secs(5)).await?;
    let (client, dispatch) = C::start(io);
    tokio::spawn(dispatch);
    Ok(client)
}

/// Open file descriptors of process `pid`.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// CPU time (user + system) process `pid` has used, in milliseconds.
pub fn cpu_ms(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    f.get(11).zip(f.get(12)).map_or(0, |(u, s)| (u + s) * 1000 / ticks)
}

/// Resident memory of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Raises this process's soft open-file limit to its hard limit. A test
/// process holds every client connection and both ends of every proxied
/// one, and its nodes inherit the limit; a soft limit of 1024 (a common
/// default) is close enough to that to fail a busy fault campaign.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we pass; setrlimit reads it.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max.min(65_536).max(lim.rlim_cur);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Sets the open-file limit of a running process (what `prlimit --pid` does).
pub fn set_fd_limit(pid: u32, limit: u64) {
    let new = libc::rlimit { rlim_cur: limit, rlim_max: limit.max(4096) };
    // SAFETY: prlimit reads `new` and writes nothing when `old` is null.
    let r = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
    assert_eq!(r, 0, "prlimit failed: {}", std::io::Error::last_os_error());
}

/// Runs `cmd` and says whether it exited successfully.
fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// Makes sure `program` runs (`program --version`), installing Debian's
/// `package` with apt-get if it does not: tests that drive real third-party
/// programs install them themselves. Panics saying why (`what` needs it) if
/// that fails.
fn debian_program(program: &str, package: &str, what: &str) {
    if succeeds(Command::new(program).arg("--version")) {
        return;
    }
    let installed = succeeds(Command::new("apt-get").arg("update").arg("-q"))
        && succeeds(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends", package])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        );
    assert!(
        installed && succeeds(Command::new(program).arg("--version")),
        "{program} is missing and `apt-get install {package}` failed: {what} needs Debian's {package}"
    );
}

/// Debian's `redis-tools` (redis-cli, redis-benchmark), for the
/// Redis-protocol tests.
pub fn redis_tools() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| debian_program("redis-cli", "redis-tools", "the Redis-protocol tests"));
}

/// A `PYTHONPATH` under which `python3` can `import redis` (PyPI's redis-py,
/// installed with pip into the target directory if it is not installed).
pub fn redis_py() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
        let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| workspace.join("target"));
        let dir = target.join("redis-py");
        // Run from the target directory: from the workspace, a directory
        // named `redis` could pass for the package.
        let importable = |dir: &Path| {
            succeeds(Command::new("python3").args(["-c", "import redis"]).env("PYTHONPATH", dir).current_dir(&target))
        };
        if !importable(&dir) {
            let pip = Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--target"])
                .arg(&dir)
                .arg("redis>=5,<6")
                .status();
            assert!(
                pip.is_ok_and(|s| s.success()) && importable(&dir),
                "could not install redis-py with pip into {}: the Redis-protocol tests need python3 with pip",
                dir.display()
            );
        }
        dir
    })
    .clone()
}

/// A plain HTTP/1.0 GET of `path` from `addr`: the body, if the answer is 200.
pub fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200")
        .then(|| body.to_string())
        .or_else(|| head.starts_with("HTTP/1.0 200").then(|| body.to_string()))
}

/// The value of a metric line `name` (with its labels, e.g.
/// `treaty_aborts_total{reason="conflict"}`) in a `/metrics` text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

/// Debian's chromium, for the status page's browser test; returns the
/// program to run.
pub fn chromium() -> &'static str {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| debian_program("chromium", "chromium", "the status page's browser test"));
    "chromium"
}

/// Accounts `acct/0..n` holding 100 each, and `writers` tasks moving 1 from
/// one to another in transactions (read both, then write both if their
/// versions did not change) until `stop` or `seconds` pass; each task
/// returns how many transfers it committed. The total stays `100 * n`.
pub async fn transfers(
    client: std::sync::Arc<Client>,
    n: u64,
    writers: u64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    seconds: u64,
) -> Vec<tokio::task::JoinHandle<u64>> {
    use treaty_client::{Condition, Txn, Write};
    let accounts: Vec<Vec<u8>> = (0..n).map(|i| format!("acct/{i}").into_bytes()).collect();
    for a in &accounts {
        client.put(a, b"100").await.unwrap();
    }
    (0..writers)
        .map(|w| {
            let (client, accounts, stop) = (client.clone(), accounts.clone(), stop.clone());
            tokio::spawn(async move {
                let mut done = 0u64;
                let deadline = Instant::now() + Duration::from_secs(seconds);
                for i in 0u64.. {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) || Instant::now() > deadline {
                        break;
                    }
                    let from = &accounts[((i * 3 + w) % n) as usize];
                    let to = &accounts[((i * 5 + w + 1) % n) as usize];
                    if from == to {
                        continue;
                    }
                    let (Ok(Some(f)), Ok(Some(t))) = (client.get(from).await, client.get(to).await) else { continue };
                    let fv: i64 = String::from_utf8_lossy(&f.value).parse().unwrap();
                    let tv: i64 = String::from_utf8_lossy(&t.value).parse().unwrap();
                    let txn = Txn::new(
                        vec![
                            Condition::VersionEquals(from.clone(), f.version),
                            Condition::VersionEquals(to.clone(), t.version),
                        ],
                        vec![
                            Write::Put(from.clone(), (fv - 1).to_string().into_bytes()),
                            Write::Put(to.clone(), (tv + 1).to_string().into_bytes()),
                        ],
                    );
                    if client.commit(txn).await.is_ok() {
                        done += 1;
                    }
                }
                done
            })
        })
        .collect()
}

/// One range page of every `acct/` key through `client`: `Some(total)` of
/// the `n` accounts, `None` when the read gave up because the keys kept
/// changing (a clear retry error). Any other error fails the test.
pub async fn account_total(client: &Client, n: usize, stale: bool) -> Option<i64> {
    let req = treaty_client::RangeRequest { stale, ..treaty_client::RangeRequest::prefix(b"acct/") };
    match client.range_page(&req).await {
        Ok(page) => {
            assert_eq!(page.entries.len(), n, "one page holds every account");
            Some(
                page.entries
                    .iter()
                    .map(|e| String::from_utf8_lossy(e.value.as_ref().unwrap()).parse::<i64>().unwrap())
                    .sum(),
            )
        }
        Err(treaty_client::Error::Conflict(m)) if m.contains("kept changing") => None,
        Err(e) => panic!("range read of the accounts: {e}"),
    }
}

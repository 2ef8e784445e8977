//! Treaty's Redis-protocol front door: RESP2 and RESP3 (`HELLO 3`) on a
//! participant's `--redis` port, so that redis-cli, redis-benchmark and the
//! Redis client library of any language read and write a Treaty cluster.
//!
//! Each connection's commands are translated into calls of a
//! [`treaty_client::Client`] that the participant holds (its own endpoint
//! first, then the others): reads are Treaty's linearizable reads (stale
//! local reads after `READONLY`), and every write is a Treaty transaction,
//! so it is on every replica before the reply leaves.
//!
//! ## Semantics (where they differ from Redis's, they are stronger)
//! * **Runs of data commands** (one command, the commands a client
//!   pipelined, or those queued between MULTI and EXEC) go through the
//!   [`engine`]: read, evaluate in order, commit the writes as *one*
//!   transaction conditioned on the versions read, retry if one changed.
//!   INCR, SETNX, GETSET, DEL's count and friends are therefore exact under
//!   any concurrency, a pipelined run is atomic, and EXEC is all-or-nothing
//!   on every replica (Redis's EXEC has no rollback).
//! * **WATCH** records each key's version (Treaty's commit index of its last
//!   write); EXEC answers nil, writing nothing, if one changed, as Redis
//!   does. Commands queued in MULTI are checked when queued; an error there
//!   makes EXEC fail with `EXECABORT`. Only data commands (and PING, ECHO)
//!   can be queued: a Treaty transaction reads and writes keys.
//! * **Reads in MULTI** see the values as of the commit and the transaction's
//!   own earlier writes, as in Redis. **MGET** outside MULTI reads each key
//!   linearizably but not as one snapshot (inside MULTI it is one).
//! * Keys never expire (SET's EX/PX options are refused); keys must be 1 to
//!   1024 bytes and values at most 1 MiB, as everywhere in Treaty; there is
//!   one database (SELECT 0).
//! * Read-modify-write runs from clients of one door queue behind each other
//!   per key here ([`KeyQueues`]), so contention among them costs no retries;
//!   across doors, a changed version makes the run retry (up to
//!   [`MAX_ATTEMPTS`] times, then `TRYAGAIN`).
//!
//! ## Errors
//! Redis's own texts for syntax, arity and type errors; Treaty's errors
//! under the prefixes client libraries act on (see [`reply::Reply::from_error`]):
//! `TRYAGAIN` (conflict, catching up, or provably not committed: retry as
//! is), `CLUSTERDOWN` (unavailable), `NOPERM`, else `ERR` with Treaty's
//! message. Garbage on the port (not RESP, or an inline line or request over
//! the size limits) gets `-ERR Protocol error: ...` and the connection is
//! closed; the node keeps serving everyone else.
//!
//! ## Security
//! With TLS (the default) the port takes TLS 1.3 with a client certificate
//! of the cluster's CA, like every other Treaty port; the certificate is
//! the credential, so AUTH has nothing to check and says so. A node started
//! with `--insecure` serves plaintext RESP on loopback only.

pub mod command;
pub mod engine;
pub mod glob;
pub mod reply;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use treaty_client::{Client, Error, RangeRequest, ReadMode, Security, Txn, Versioned};
use treaty_common::net::{self, BoxIo, Caller, ServeConfig, Wire};

use command::{Command, DataCmd, Key, ParseError};
use reply::Reply;

/// Most arguments one request may carry (MSET of 1024 pairs is 2049).
pub const MAX_ARGS: usize = 16 * 1024;
/// Most bytes one request may take (a transaction carries at most 4 MiB).
pub const MAX_REQUEST: usize = 6 * 1024 * 1024;
/// Longest inline (plain text) command line.
pub const MAX_INLINE: usize = 64 * 1024;
/// A run of pipelined data commands becomes one transaction of at most
/// this many commands ...
pub const MAX_RUN: usize = 256;
/// ... touching at most this many keys (a transaction holds 1024
/// conditions and writes) ...
pub const MAX_RUN_KEYS: usize = 64;
/// ... and carrying at most this many bytes.
pub const MAX_RUN_BYTES: usize = 3 * 1024 * 1024;
/// Times a run is tried when keys it read change before it commits.
pub const MAX_ATTEMPTS: u32 = 40;
/// A SCAN cursor is kept this long after its last use.
pub const CURSOR_TTL: Duration = Duration::from_secs(600);
/// At most this many SCAN cursors are kept (the oldest go first).
pub const MAX_CURSORS: usize = 10_000;
/// KEYS answers at most this many keys (SCAN lists any number).
pub const MAX_KEYS_REPLY: usize = 100_000;
/// The Redis version clients are told (the commands and replies follow 7.0).
pub const REDIS_VERSION: &str = "7.0.0";

/// What the door serves: a participant's view of its cluster.
pub struct Door {
    /// Reads and writes go through this client (rebuilt when the list of
    /// endpoints changes).
    client: RwLock<(Vec<String>, Arc<Client>)>,
    /// This participant's endpoint first, then the others it knows of.
    endpoints: Box<dyn Fn() -> Vec<String> + Send + Sync>,
    security: Security,
    /// Who serves here, for INFO (`participant 3 at 127.0.0.1:7003`).
    role: String,
    /// Runs that read and write queue here for their keys, so that writers
    /// of one key through this door wait for each other instead of failing
    /// each other's conditions.
    queues: KeyQueues,
    /// SCAN cursors: number -> where the next page starts.
    cursors: Mutex<HashMap<u64, (Key, Instant)>>,
    next_client_id: AtomicU64,
    connected: AtomicUsize,
}

impl Door {
    /// A door whose client reaches the cluster through `endpoints()` (asked
    /// again for each new connection), connecting with `security`.
    pub fn new(role: String, security: Security, endpoints: impl Fn() -> Vec<String> + Send + Sync + 'static) -> Self {
        let first = endpoints();
        let client = Arc::new(Client::new(first.clone(), security.clone()));
        Door {
            client: RwLock::new((first, client)),
            endpoints: Box::new(endpoints),
            security,
            role,
            queues: KeyQueues::default(),
            cursors: Mutex::new(HashMap::new()),
            next_client_id: AtomicU64::new(1),
            connected: AtomicUsize::new(0),
        }
    }

    fn client(&self) -> Arc<Client> {
        self.client.read().unwrap().1.clone()
    }

    fn refresh_client(&self) {
        let now = (self.endpoints)();
        if now.is_empty() || self.client.read().unwrap().0 == now {
            return;
        }
        let client = Arc::new(Client::new(now.clone(), self.security.clone()));
        *self.client.write().unwrap() = (now, client);
    }

    /// Runs data commands as one transaction (see [`engine`]); `watched`
    /// are WATCHed keys with the versions seen then. `None`: a watched key
    /// changed, so nothing ran (EXEC's nil).
    async fn run(&self, cmds: &[DataCmd], watched: &BTreeMap<Key, u64>, stale: bool) -> Option<Vec<Reply>> {
        let client = self.client();
        let mut read: BTreeSet<Key> = engine::keys_to_read(cmds);
        read.extend(watched.keys().cloned());
        let writes = cmds.iter().any(|c| !c.writes().is_empty());
        let mode = if stale && !writes { ReadMode::Stale } else { ReadMode::Linearizable };
        // Read-modify-write runs queue per key here (see `queues`).
        let mut _held = None;
        if writes && !read.is_empty() {
            let keys: BTreeSet<Key> =
                read.iter().cloned().chain(cmds.iter().flat_map(|c| c.writes()).cloned()).collect();
            _held = Some(self.queues.hold(keys).await);
        }
        let all_err = |e: &Error| Some(vec![Reply::from_error(e); cmds.len()]);
        for attempt in 0..MAX_ATTEMPTS {
            let values = futures::future::join_all(read.iter().map(|k| client.get_with(k, mode))).await;
            let mut stored: BTreeMap<Key, Option<Versioned>> = BTreeMap::new();
            for (k, v) in read.iter().zip(values) {
                match v {
                    Ok(v) => {
                        stored.insert(k.clone(), v);
                    }
                    Err(e) => return all_err(&e),
                }
            }
            let changed = watched.iter().any(|(k, seen)| stored[k].as_ref().map_or(0, |v| v.version) != *seen);
            if changed {
                return None;
            }
            let plan = engine::evaluate(cmds, &stored);
            if plan.writes.is_empty() {
                return Some(plan.replies);
            }
            match client.commit(Txn::new(plan.conditions, plan.writes)).await {
                Ok(_) => return Some(plan.replies),
                // A key read changed since: read again (and a watched one
                // that changed ends the run above).
                Err(Error::ConditionFailed(_)) => {
                    let pause = 1u64 << attempt.min(6);
                    let jitter = u64::from(rand_u32() % 1000);
                    tokio::time::sleep(Duration::from_micros(pause * 1000 + jitter)).await;
                }
                Err(e) => return all_err(&e),
            }
        }
        Some(vec![
            Reply::err(format!(
                "TRYAGAIN the keys kept changing under this command ({MAX_ATTEMPTS} tries): other clients are \
                 writing them through other endpoints; retry"
            ));
            cmds.len()
        ])
    }

    /// One SCAN page: up to `count` keys from where `cursor` left off
    /// (0: the start), those matching `pattern`, and the next cursor (0: done).
    async fn scan(
        &self,
        cursor: u64,
        pattern: Option<&[u8]>,
        count: u32,
        stale: bool,
    ) -> Result<(u64, Vec<Key>), Reply> {
        let prefix = pattern.map(glob::literal_prefix).unwrap_or_default();
        let start =
            if cursor == 0 {
                prefix.clone()
            } else {
                let mut cursors = self.cursors.lock().unwrap();
                match cursors.remove(&cursor) {
                    Some((next, at)) if at.elapsed() < CURSOR_TTL => next,
                    _ => return Err(Reply::err(
                        "ERR invalid cursor: it expired or was never handed out by this endpoint; start again from 0",
                    )),
                }
            };
        let req = RangeRequest { start, end: treaty_client::prefix_end(&prefix), limit: count, keys_only: true, stale };
        let page = self.client().range_page(&req).await.map_err(|e| Reply::from_error(&e))?;
        let keys =
            page.entries.into_iter().map(|e| e.key).filter(|k| pattern.is_none_or(|p| glob::matches(p, k))).collect();
        let next = match page.next {
            None => 0,
            Some(next) => {
                let mut cursors = self.cursors.lock().unwrap();
                if cursors.len() >= MAX_CURSORS {
                    cursors.retain(|_, (_, at)| at.elapsed() < CURSOR_TTL);
                    if cursors.len() >= MAX_CURSORS {
                        let oldest = cursors.iter().min_by_key(|(_, (_, at))| *at).map(|(c, _)| *c);
                        if let Some(c) = oldest {
                            cursors.remove(&c);
                        }
                    }
                }
                let id = loop {
                    let id = (u64::from(rand_u32()) << 31 | u64::from(rand_u32())) & (i64::MAX as u64);
                    if id != 0 && !cursors.contains_key(&id) {
                        break id;
                    }
                };
                cursors.insert(id, (next, Instant::now()));
                id
            }
        };
        Ok((next, keys))
    }

    async fn keys(&self, pattern: &[u8], stale: bool) -> Reply {
        let prefix = glob::literal_prefix(pattern);
        let mut req = RangeRequest::prefix(&prefix);
        req.keys_only = true;
        req.stale = stale;
        let client = self.client();
        let mut pages = client.range(req, None);
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            match page {
                Err(e) => return Reply::from_error(&e),
                Ok(page) => out.extend(
                    page.entries.into_iter().filter(|e| glob::matches(pattern, &e.key)).map(|e| Reply::Bulk(e.key)),
                ),
            }
            if out.len() > MAX_KEYS_REPLY {
                return Reply::err(format!(
                    "ERR KEYS matched over {MAX_KEYS_REPLY} keys: list them with SCAN (redis-cli --scan --pattern ...)"
                ));
            }
        }
        Reply::Array(out)
    }

    /// Keys in the cluster: every key once (with partitioned keys, each
    /// participant's count divided by the replication degree). Counted by
    /// the participants at most 2 s ago.
    async fn dbsize(&self) -> Reply {
        match self.client().cluster_status().await {
            Err(e) => Reply::from_error(&e),
            Ok(status) => {
                let counts: Vec<u64> =
                    status.participants.iter().filter_map(|(_, _, s)| s.as_ref().ok()).map(|s| s.keys).collect();
                let n = status.placement.participants.len().max(1) as u64;
                let replication = (status.placement.replication as u64).clamp(1, n);
                let keys = if replication >= n {
                    counts.iter().copied().max().unwrap_or(0)
                } else {
                    counts.iter().sum::<u64>() / replication
                };
                Reply::Int(keys as i64)
            }
        }
    }

    async fn info(&self, session: &Session) -> Reply {
        let client = self.client();
        let mut text = format!(
            "# Server\r\nredis_version:{REDIS_VERSION}\r\ntreaty_version:{}\r\nredis_mode:standalone\r\n\
             process_id:{}\r\ntreaty_node:{}\r\n\r\n# Clients\r\nconnected_clients:{}\r\n\r\n\
             # Replication\r\nrole:master\r\nconnected_slaves:0\r\n\r\n",
            env!("CARGO_PKG_VERSION"),
            std::process::id(),
            self.role,
            self.connected.load(Ordering::Relaxed),
        );
        text.push_str("# Treaty\r\n");
        match client.cluster_status().await {
            Ok(status) => {
                let members: Vec<String> = status.members.iter().map(u64::to_string).collect();
                text.push_str(&format!(
                    "cluster:{}\r\ncoordinator:{}\r\nepoch:{}\r\nmembers:{}\r\nmin_replicas:{}\r\n\
                     last_commit_index:{}\r\nreplication:{} of {}\r\n",
                    status.coordinator.cluster.map(|c| c.to_string()).unwrap_or_default(),
                    status.coordinator.addr,
                    status.coordinator.epoch,
                    members.join(","),
                    status.min_replicas,
                    status.coordinator.applied_index,
                    status.placement.replication,
                    status.placement.participants.len(),
                ));
                for (id, addr, s) in &status.participants {
                    match s {
                        Ok(s) => text.push_str(&format!(
                            "participant_{id}:addr={addr},member={},ready={},applied_index={},keys={},lease_ms={}\r\n",
                            u8::from(s.member),
                            u8::from(s.ready),
                            s.applied_index,
                            s.keys,
                            s.lease_ms.unwrap_or(0)
                        )),
                        Err(_) => text.push_str(&format!("participant_{id}:addr={addr},down=1\r\n")),
                    }
                }
            }
            Err(e) => text.push_str(&format!("cluster_status_error:{}\r\n", e.to_string().replace(['\r', '\n'], " "))),
        }
        text.push_str(&format!("connection_reads:{}\r\n", if session.readonly { "stale" } else { "linearizable" }));
        if let Reply::Int(keys) = self.dbsize().await {
            text.push_str(&format!("\r\n# Keyspace\r\ndb0:keys={keys},expires=0,avg_ttl=0\r\n"));
        }
        Reply::Bulk(text.into_bytes())
    }
}

/// A FIFO queue per key, for read-modify-write runs: a run takes its keys
/// in order (so two runs never wait for each other in a circle) and holds
/// them until its transaction is decided. Only keys someone holds or waits
/// for have an entry.
#[derive(Default)]
struct KeyQueues {
    keys: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
}

/// Keys held by one run; released when dropped.
struct Held<'a> {
    queues: &'a KeyQueues,
    keys: BTreeSet<Key>,
    guards: Vec<tokio::sync::OwnedMutexGuard<()>>,
}

impl KeyQueues {
    async fn hold(&self, keys: BTreeSet<Key>) -> Held<'_> {
        let mut guards = Vec::with_capacity(keys.len());
        for k in &keys {
            let queue = self.keys.lock().unwrap().entry(k.clone()).or_default().clone();
            guards.push(queue.lock_owned().await);
        }
        Held { queues: self, keys, guards }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.guards.clear();
        let mut map = self.queues.keys.lock().unwrap();
        for k in &self.keys {
            // Nobody else holds or waits for it (they would hold a clone,
            // made under this lock): forget it.
            if map.get(k).is_some_and(|q| Arc::strong_count(q) == 1) {
                map.remove(k);
            }
        }
    }
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish() as u32
}

/// Since MULTI: the data commands queued, PING/ECHO answers with their
/// place among EXEC's replies, and whether a queued command was refused.
type Queued = (Vec<DataCmd>, Vec<(usize, Reply)>, bool);

/// One connection's state.
pub struct Session {
    id: u64,
    /// 2 or 3 (HELLO).
    proto: u8,
    name: Option<Vec<u8>>,
    /// READONLY: reads are the replica's local (possibly stale) state.
    readonly: bool,
    /// WATCHed keys and the version each had then (0: missing).
    watched: BTreeMap<Key, u64>,
    /// Since MULTI (see [`Queued`]).
    multi: Option<Queued>,
    caller: Caller,
    quit: bool,
}

/// What the door says when it closes a connection over bad input.
fn protocol_error(why: &str) -> Reply {
    Reply::err(format!("ERR Protocol error: {why}"))
}

/// The next complete request in `buf`: its arguments, `Ok(None)` if more
/// bytes are needed, or an error that closes the connection.
fn next_request(buf: &mut Vec<u8>) -> Result<Option<Vec<Vec<u8>>>, String> {
    loop {
        let Some(&first) = buf.first() else { return Ok(None) };
        if first != b'*' {
            // An inline command: one line of words (telnet, redis-cli --pipe of text).
            let Some(end) = buf.iter().position(|&b| b == b'\n') else {
                if buf.len() > MAX_INLINE {
                    return Err(format!("an inline request longer than {MAX_INLINE} bytes"));
                }
                return Ok(None);
            };
            let line: Vec<u8> = buf.drain(..=end).collect();
            let words = inline_words(&line)?;
            if words.is_empty() {
                continue;
            }
            return Ok(Some(words));
        }
        // Check the announced size before the codec sees it.
        if let Some(end) = buf.iter().position(|&b| b == b'\n') {
            let count = std::str::from_utf8(&buf[1..end]).ok().map(str::trim).and_then(|s| s.parse::<i64>().ok());
            match count {
                Some(n) if n > MAX_ARGS as i64 => {
                    return Err(format!("a request of {n} arguments; the limit is {MAX_ARGS}"))
                }
                Some(_) => {}
                None => return Err("invalid multibulk length".into()),
            }
        }
        return match redis_protocol::resp2::decode::decode(buf) {
            Ok(None) => Ok(None),
            Ok(Some((frame, used))) => {
                buf.drain(..used);
                use redis_protocol::resp2::types::OwnedFrame as F;
                match frame {
                    F::Array(items) => items
                        .into_iter()
                        .map(|f| match f {
                            F::BulkString(b) | F::SimpleString(b) => Ok(b),
                            F::Integer(i) => Ok(i.to_string().into_bytes()),
                            _ => Err("expected '$', got something else".to_string()),
                        })
                        .collect::<Result<Vec<_>, _>>()
                        .map(Some),
                    F::Null => Ok(Some(vec![])),
                    _ => Err("expected an array of bulk strings".into()),
                }
            }
            Err(e) => Err(e.details().to_string()),
        };
    }
}

/// Splits an inline command line into words; double or single quotes group
/// words and `\` escapes inside double quotes work as in redis-cli.
fn inline_words(line: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let mut words = Vec::new();
    let mut i = 0;
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    while i < line.len() {
        while i < line.len() && line[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= line.len() {
            break;
        }
        let mut word = Vec::new();
        match line[i] {
            q @ (b'"' | b'\'') => {
                i += 1;
                loop {
                    let Some(&c) = line.get(i) else { return Err("unbalanced quotes in request".into()) };
                    i += 1;
                    if c == q {
                        break;
                    }
                    if c == b'\\' && q == b'"' {
                        let Some(&e) = line.get(i) else { return Err("unbalanced quotes in request".into()) };
                        i += 1;
                        word.push(match e {
                            b'n' => b'\n',
                            b'r' => b'\r',
                            b't' => b'\t',
                            other => other,
                        });
                    } else {
                        word.push(c);
                    }
                }
                if line.get(i).is_some_and(|c| !c.is_ascii_whitespace()) {
                    return Err("unbalanced quotes in request".into());
                }
            }
            _ => {
                while i < line.len() && !line[i].is_ascii_whitespace() {
                    word.push(line[i]);
                    i += 1;
                }
            }
        }
        words.push(word);
    }
    Ok(words)
}

/// A COMMAND entry: name, arity (negative: at least), flags, first key,
/// last key, step, as Redis 7 lists them.
type CommandEntry = (&'static str, i64, &'static [&'static str], i64, i64, i64);

const COMMANDS: &[CommandEntry] = &[
    ("get", 2, &["readonly", "fast"], 1, 1, 1),
    ("set", -3, &["write", "denyoom"], 1, 1, 1),
    ("setnx", 3, &["write", "denyoom", "fast"], 1, 1, 1),
    ("getset", 3, &["write", "denyoom", "fast"], 1, 1, 1),
    ("getdel", 2, &["write", "fast"], 1, 1, 1),
    ("del", -2, &["write"], 1, -1, 1),
    ("unlink", -2, &["write", "fast"], 1, -1, 1),
    ("exists", -2, &["readonly", "fast"], 1, -1, 1),
    ("mget", -2, &["readonly", "fast"], 1, -1, 1),
    ("mset", -3, &["write", "denyoom"], 1, -1, 2),
    ("msetnx", -3, &["write", "denyoom"], 1, -1, 2),
    ("incr", 2, &["write", "denyoom", "fast"], 1, 1, 1),
    ("decr", 2, &["write", "denyoom", "fast"], 1, 1, 1),
    ("incrby", 3, &["write", "denyoom", "fast"], 1, 1, 1),
    ("decrby", 3, &["write", "denyoom", "fast"], 1, 1, 1),
    ("append", 3, &["write", "denyoom", "fast"], 1, 1, 1),
    ("strlen", 2, &["readonly", "fast"], 1, 1, 1),
    ("scan", -2, &["readonly"], 0, 0, 0),
    ("keys", 2, &["readonly"], 0, 0, 0),
    ("dbsize", 1, &["readonly", "fast"], 0, 0, 0),
    ("ping", -1, &["fast"], 0, 0, 0),
    ("echo", 2, &["fast"], 0, 0, 0),
    ("select", 2, &["loading", "stale", "fast"], 0, 0, 0),
    ("quit", -1, &["fast"], 0, 0, 0),
    ("hello", -1, &["noscript", "loading", "stale", "fast"], 0, 0, 0),
    ("auth", -2, &["noscript", "loading", "stale", "fast"], 0, 0, 0),
    ("client", -2, &["noscript", "loading", "stale"], 0, 0, 0),
    ("command", -1, &["loading", "stale"], 0, 0, 0),
    ("info", -1, &["loading", "stale"], 0, 0, 0),
    ("config", -2, &["admin", "loading", "stale"], 0, 0, 0),
    ("readonly", 1, &["loading", "stale", "fast"], 0, 0, 0),
    ("readwrite", 1, &["loading", "stale", "fast"], 0, 0, 0),
    ("watch", -2, &["noscript", "loading", "stale", "fast"], 1, -1, 1),
    ("unwatch", 1, &["noscript", "loading", "stale", "fast"], 0, 0, 0),
    ("multi", 1, &["noscript", "loading", "stale", "fast"], 0, 0, 0),
    ("exec", 1, &["noscript", "loading", "stale"], 0, 0, 0),
    ("discard", 1, &["noscript", "loading", "stale", "fast"], 0, 0, 0),
];

fn command_info(name: &str) -> Option<Reply> {
    COMMANDS.iter().find(|c| c.0 == name).map(|(n, arity, flags, first, last, step)| {
        Reply::Array(vec![
            Reply::bulk(n),
            Reply::Int(*arity),
            Reply::Array(flags.iter().map(|f| Reply::Simple(f.to_string())).collect()),
            Reply::Int(*first),
            Reply::Int(*last),
            Reply::Int(*step),
        ])
    })
}

impl Session {
    fn new(id: u64, caller: Caller) -> Self {
        Session {
            id,
            proto: 2,
            name: None,
            readonly: false,
            watched: BTreeMap::new(),
            multi: None,
            caller,
            quit: false,
        }
    }

    fn auth_reply(&self) -> Reply {
        match &self.caller {
            Caller::Authenticated(id) => Reply::err(format!(
                "ERR AUTH is not used here: this connection is already authenticated by its TLS client certificate \
                 (as {id}); no password is configured"
            )),
            Caller::Unauthenticated => Reply::err(
                "ERR AUTH <password> called without any password configured for the default user. Are you sure \
                 your configuration is correct?",
            ),
        }
    }

    fn hello(&mut self, proto: Option<i64>, auth: bool, setname: Option<Vec<u8>>) -> Reply {
        if auth {
            return self.auth_reply();
        }
        match proto {
            None => {}
            Some(p @ (2 | 3)) => self.proto = p as u8,
            Some(_) => return Reply::err("NOPROTO unsupported protocol version"),
        }
        if setname.is_some() {
            self.name = setname;
        }
        Reply::Map(vec![
            (Reply::bulk("server"), Reply::bulk("redis")),
            (Reply::bulk("version"), Reply::bulk(REDIS_VERSION)),
            (Reply::bulk("proto"), Reply::Int(i64::from(self.proto))),
            (Reply::bulk("id"), Reply::Int(self.id as i64)),
            (Reply::bulk("mode"), Reply::bulk("standalone")),
            (Reply::bulk("role"), Reply::bulk("master")),
            (Reply::bulk("modules"), Reply::Array(vec![])),
        ])
    }
}

/// Answers one command that is not a run of data commands.
async fn answer(door: &Door, session: &mut Session, cmd: Command) -> Reply {
    match cmd {
        Command::Data(d) => {
            door.run(std::slice::from_ref(&d), &BTreeMap::new(), session.readonly).await.expect("no watches").remove(0)
        }
        Command::Ping(None) => Reply::Simple("PONG".into()),
        Command::Ping(Some(m)) | Command::Echo(m) => Reply::Bulk(m),
        Command::Select(0) => Reply::Ok,
        Command::Select(_) => Reply::err("ERR DB index is out of range"),
        Command::Quit => {
            session.quit = true;
            Reply::Ok
        }
        Command::Hello { proto, auth, setname } => session.hello(proto, auth, setname),
        Command::Auth => session.auth_reply(),
        Command::ClientSetName(name) => {
            if name.iter().any(|b| *b == b' ' || *b == b'\n') {
                return Reply::err("ERR Client names cannot contain spaces, newlines or special characters.");
            }
            session.name = (!name.is_empty()).then_some(name);
            Reply::Ok
        }
        Command::ClientGetName => session.name.clone().map_or(Reply::Nil, Reply::Bulk),
        Command::ClientId => Reply::Int(session.id as i64),
        Command::ClientSetInfo => Reply::Ok,
        Command::Command(args) => {
            let sub = args.first().map(|a| String::from_utf8_lossy(a).to_ascii_lowercase());
            match sub.as_deref() {
                None => Reply::Array(COMMANDS.iter().filter_map(|c| command_info(c.0)).collect()),
                Some("count") => Reply::Int(COMMANDS.len() as i64),
                // redis-cli asks for docs to show hints; without them it uses its own.
                Some("docs") => Reply::Map(vec![]),
                Some("info") => Reply::Array(
                    args[1..]
                        .iter()
                        .map(|n| command_info(&String::from_utf8_lossy(n).to_ascii_lowercase()).unwrap_or(Reply::Nil))
                        .collect(),
                ),
                Some(other) => {
                    Reply::err(format!("ERR unknown subcommand '{other}'. Try COMMAND, COMMAND COUNT, COMMAND INFO."))
                }
            }
        }
        Command::Info => door.info(session).await,
        Command::DbSize => door.dbsize().await,
        Command::ConfigGet(name) => match String::from_utf8_lossy(&name).to_ascii_lowercase().as_str() {
            // Every write is durable on every replica before it is answered.
            "appendonly" => Reply::Array(vec![Reply::bulk("appendonly"), Reply::bulk("yes")]),
            "appendfsync" => Reply::Array(vec![Reply::bulk("appendfsync"), Reply::bulk("always")]),
            "save" => Reply::Array(vec![Reply::bulk("save"), Reply::bulk("")]),
            "databases" => Reply::Array(vec![Reply::bulk("databases"), Reply::bulk("1")]),
            _ => Reply::Array(vec![]),
        },
        Command::ReadOnly => {
            session.readonly = true;
            Reply::Ok
        }
        Command::ReadWrite => {
            session.readonly = false;
            Reply::Ok
        }
        Command::Watch(keys) => {
            let client = door.client();
            let versions = futures::future::join_all(keys.iter().map(|k| client.get(k))).await;
            for (k, v) in keys.into_iter().zip(versions) {
                match v {
                    // The first WATCH of a key counts, as in Redis.
                    Ok(v) => {
                        session.watched.entry(k).or_insert(v.map_or(0, |v| v.version));
                    }
                    Err(e) => return Reply::from_error(&e),
                }
            }
            Reply::Ok
        }
        Command::Unwatch => {
            session.watched.clear();
            Reply::Ok
        }
        Command::Multi => {
            session.multi = Some((Vec::new(), Vec::new(), false));
            Reply::Ok
        }
        Command::Exec => Reply::err("ERR EXEC without MULTI"),
        Command::Discard => Reply::err("ERR DISCARD without MULTI"),
        Command::Scan { cursor, pattern, count, strings } => {
            if !strings {
                return Reply::Array(vec![Reply::bulk("0"), Reply::Array(vec![])]);
            }
            match door.scan(cursor, pattern.as_deref(), count, session.readonly).await {
                Ok((next, keys)) => Reply::Array(vec![
                    Reply::bulk(next.to_string()),
                    Reply::Array(keys.into_iter().map(Reply::Bulk).collect()),
                ]),
                Err(e) => e,
            }
        }
        Command::Keys(pattern) => door.keys(&pattern, session.readonly).await,
    }
}

/// Handles a command while MULTI is open: queue it, or end the transaction.
async fn in_multi(door: &Door, session: &mut Session, cmd: Result<Command, ParseError>) -> Reply {
    match cmd {
        Ok(Command::Multi) => Reply::err("ERR MULTI calls can not be nested"),
        Ok(Command::Watch(_)) => Reply::err("ERR WATCH inside MULTI is not allowed"),
        Ok(Command::Discard) => {
            session.multi = None;
            session.watched.clear();
            Reply::Ok
        }
        Ok(Command::Quit) => {
            session.quit = true;
            Reply::Ok
        }
        Ok(Command::Exec) => {
            let (queue, echoes, failed) = session.multi.take().expect("in MULTI");
            let watched = std::mem::take(&mut session.watched);
            if failed {
                return Reply::err("EXECABORT Transaction discarded because of previous errors.");
            }
            let mut replies = if queue.is_empty() && watched.is_empty() {
                Some(vec![])
            } else {
                door.run(&queue, &watched, false).await
            };
            // PING and ECHO answer where they were queued.
            if let Some(r) = replies.as_mut() {
                for (at, reply) in echoes {
                    r.insert(at, reply);
                }
            }
            replies.map_or(Reply::Nil, Reply::Array)
        }
        cmd => {
            let (queue, echoes, failed) = session.multi.as_mut().expect("in MULTI");
            match cmd {
                Err(e) => {
                    *failed = true;
                    e.reply()
                }
                Ok(Command::Data(d)) => {
                    queue.push(d);
                    Reply::Simple("QUEUED".into())
                }
                Ok(Command::Ping(m)) => {
                    echoes.push((queue.len() + echoes.len(), m.map_or(Reply::Simple("PONG".into()), Reply::Bulk)));
                    Reply::Simple("QUEUED".into())
                }
                Ok(Command::Echo(m)) => {
                    echoes.push((queue.len() + echoes.len(), Reply::Bulk(m)));
                    Reply::Simple("QUEUED".into())
                }
                Ok(_) => {
                    *failed = true;
                    Reply::err(
                        "ERR this command cannot run inside MULTI here: a Treaty transaction reads and writes keys \
                         (GET, SET, DEL, MGET, MSET, INCR, ...), PING and ECHO",
                    )
                }
            }
        }
    }
}

/// Splits parsed requests into what runs together: a run of data commands
/// (outside MULTI) within the batch limits, or one other command.
fn next_run(cmds: &[Result<Command, ParseError>], from: usize) -> usize {
    let (mut keys, mut bytes, mut to) = (0, 0, from);
    while to < cmds.len() && to - from < MAX_RUN {
        let Ok(Command::Data(d)) = &cmds[to] else { break };
        let (k, b) = (d.reads().len() + d.writes().len(), d.size());
        if to > from && (keys + k > MAX_RUN_KEYS || bytes + b > MAX_RUN_BYTES) {
            break;
        }
        keys += k;
        bytes += b;
        to += 1;
    }
    to.max(from + 1)
}

/// Serves one connection until the client leaves, QUITs, or sends what is
/// not RESP.
pub async fn connection(door: Arc<Door>, mut io: BoxIo, caller: Caller, frame_timeout: Duration) {
    door.refresh_client();
    door.connected.fetch_add(1, Ordering::Relaxed);
    let mut session = Session::new(door.next_client_id.fetch_add(1, Ordering::Relaxed), caller);
    let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut out: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    'conn: loop {
        // Every complete request in the buffer (up to a run's worth).
        let mut requests = Vec::new();
        let mut fatal = None;
        while requests.len() < MAX_RUN {
            match next_request(&mut buf) {
                Ok(Some(r)) => requests.push(r),
                Ok(None) => break,
                Err(why) => {
                    fatal = Some(why);
                    break;
                }
            }
        }
        if requests.is_empty() && fatal.is_none() {
            if buf.len() > MAX_REQUEST {
                fatal = Some(format!("a request over {} MiB; the limit is a 4 MiB transaction", MAX_REQUEST >> 20));
            } else {
                // An idle connection may wait for ever; a request begun must
                // arrive whole within the frame timeout.
                let read = if buf.is_empty() {
                    io.read(&mut chunk).await
                } else {
                    match tokio::time::timeout(frame_timeout, io.read(&mut chunk)).await {
                        Ok(r) => r,
                        Err(_) => {
                            fatal = Some(format!("a request was not completed within {frame_timeout:?}"));
                            Ok(0)
                        }
                    }
                };
                match read {
                    Ok(0) if fatal.is_none() => break 'conn,
                    Ok(n) => {
                        buf.extend_from_slice(&chunk[..n]);
                        if fatal.is_none() {
                            continue;
                        }
                    }
                    Err(_) => break 'conn,
                }
            }
        }
        let cmds: Vec<Result<Command, ParseError>> = requests.into_iter().map(command::parse).collect();
        let mut at = 0;
        while at < cmds.len() && !session.quit {
            if session.multi.is_some() {
                let reply = in_multi(&door, &mut session, cmds[at].clone()).await;
                reply.encode_into(session.proto, &mut out);
                at += 1;
                continue;
            }
            let end = next_run(&cmds, at);
            match &cmds[at] {
                Ok(Command::Data(_)) => {
                    let run: Vec<DataCmd> = cmds[at..end]
                        .iter()
                        .map(|c| match c {
                            Ok(Command::Data(d)) => d.clone(),
                            _ => unreachable!("next_run takes data commands only"),
                        })
                        .collect();
                    let replies = door.run(&run, &BTreeMap::new(), session.readonly).await.expect("no watches");
                    for r in replies {
                        r.encode_into(session.proto, &mut out);
                    }
                }
                Ok(cmd) => answer(&door, &mut session, cmd.clone()).await.encode_into(session.proto, &mut out),
                Err(e) => e.reply().encode_into(session.proto, &mut out),
            }
            at = end;
        }
        if let Some(why) = &fatal {
            tracing::debug!(session = session.id, why, "closing a RESP connection over bad input");
            protocol_error(why).encode_into(session.proto, &mut out);
            session.quit = true;
        }
        if !out.is_empty() {
            if io.write_all(&out).await.is_err() || io.flush().await.is_err() {
                break;
            }
            out.clear();
        }
        if session.quit {
            break;
        }
    }
    let _ = io.shutdown().await;
    door.connected.fetch_sub(1, Ordering::Relaxed);
}

/// Serves the door on `listener` until `shutdown` resolves, with the
/// connection limits of `cfg` (whose wire is set to RESP).
pub async fn serve(listener: TcpListener, door: Arc<Door>, mut cfg: ServeConfig, shutdown: impl Future<Output = ()>) {
    cfg.wire = Wire::Resp;
    let frame_timeout = cfg.frame_timeout;
    net::serve(listener, cfg, move |io, caller| connection(door.clone(), io, caller, frame_timeout), shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take_all(bytes: &[u8]) -> Result<Vec<Vec<String>>, String> {
        let mut buf = bytes.to_vec();
        let mut out = Vec::new();
        while let Some(r) = next_request(&mut buf)? {
            out.push(r.into_iter().map(|w| String::from_utf8(w).unwrap()).collect());
        }
        Ok(out)
    }

    #[tokio::test]
    async fn key_queues_hold_keys_until_the_run_ends_and_forget_them_after() {
        let q = KeyQueues::default();
        let keys = |ks: &[&str]| ks.iter().map(|k| k.as_bytes().to_vec()).collect::<BTreeSet<Key>>();
        let first = q.hold(keys(&["a", "b"])).await;
        // A run on b waits; one on c does not.
        let waiting = tokio::time::timeout(Duration::from_millis(50), q.hold(keys(&["b"]))).await;
        assert!(waiting.is_err(), "b is held");
        drop(q.hold(keys(&["c"])).await);
        drop(first);
        drop(q.hold(keys(&["b", "c"])).await);
        assert!(q.keys.lock().unwrap().is_empty(), "nothing is kept for keys nobody holds");
    }

    #[test]
    fn requests_come_as_resp_arrays_or_inline_lines() {
        let got = take_all(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nPING\r\n\r\nset \"a b\" 'c d'\r\n*1\r\n$4\r\nPI").unwrap();
        assert_eq!(got, [vec!["GET", "k"], vec!["PING"], vec!["set", "a b", "c d"]], "the last request is incomplete");
    }

    #[test]
    fn garbage_and_oversized_requests_are_refused() {
        assert!(take_all(b"*x\r\n").unwrap_err().contains("multibulk"));
        assert!(take_all(b"*99999999\r\n").unwrap_err().contains("arguments"));
        assert!(take_all(b"*1\r\n:nope\r\n").is_err());
        assert!(take_all(b"set \"unclosed\r\n").unwrap_err().contains("quotes"));
        assert!(take_all(&vec![b'a'; MAX_INLINE + 1]).unwrap_err().contains("inline"));
    }

    #[test]
    fn pipelined_data_commands_run_together_within_the_limits() {
        let parse = |l: &str| command::parse(l.split(' ').map(|w| w.as_bytes().to_vec()).collect());
        let cmds: Vec<_> =
            ["set a 1", "incr b", "ping", "get a", "watch x", "get a"].iter().map(|l| parse(l)).collect();
        assert_eq!(next_run(&cmds, 0), 2);
        assert_eq!(next_run(&cmds, 2), 3, "PING alone");
        assert_eq!(next_run(&cmds, 3), 4);
        let many: Vec<_> = (0..MAX_RUN + 5).map(|i| parse(&format!("set k{i} v"))).collect();
        assert_eq!(next_run(&many, 0), MAX_RUN.min(MAX_RUN_KEYS), "one key each: cut at the key limit");
        let reads: Vec<_> = (0..MAX_RUN + 5).map(|_| parse("ping")).collect();
        assert_eq!(next_run(&reads, 0), 1, "not data commands: one at a time");
        let wide: Vec<_> = (0..3)
            .map(|_| {
                parse(&(0..300).map(|i| format!("k{i}")).collect::<Vec<_>>().join(" ").replacen("k0", "del k0", 1))
            })
            .collect();
        assert_eq!(next_run(&wide, 0), 1, "600 keys in two DELs exceed a run");
    }
}

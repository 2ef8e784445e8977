//! The interactive shell: `treaty repl`, or plain `treaty` on a terminal.
//!
//! Same grammar as batch files ([`crate::script`]). Outside a transaction
//! every command runs on its own. `begin` opens an optimistic transaction:
//! gets record the version they saw (or show a value written earlier in the
//! same transaction), writes are buffered (`show` lists them), and `commit`
//! sends one transaction with a `version == seen` condition for every key
//! read, so it commits only if nothing it read has changed: serializable
//! without holding locks while the user thinks.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustyline::completion::{Completer, Pair};
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::history::DefaultHistory;
use rustyline::validate::Validator;
use rustyline::{Context, Editor, Helper};

use crate::script::{help, parse_line, Command, RangeCmd, COMMANDS};
use crate::Client;
use treaty_client::{RangeRequest, MAX_RANGE_LIMIT};
use treaty_common::types::escape;
use treaty_common::{Condition, Error, Txn, Write};

/// Entries a `scan` or `range` shows in the shell without `--limit`.
const SHELL_RANGE_LIMIT: u64 = 100;

/// Keys Tab offers at most.
const COMPLETION_KEYS: u32 = 50;

/// Tab completion: command names, `on`/`off` after `timing`, condition
/// words after `if KEY`, and keys (a bounded, stale prefix scan of the
/// replica) wherever a key goes. Several candidates are listed.
struct ShellHelper {
    client: Arc<Client>,
    rt: tokio::runtime::Handle,
}

impl ShellHelper {
    /// Stored keys starting with `word` (typed bare: quoted or escaped
    /// words are not completed), as they would be typed.
    fn keys(&self, word: &str) -> Vec<String> {
        if word.contains(['"', '\\']) {
            return vec![];
        }
        let req = RangeRequest {
            limit: COMPLETION_KEYS,
            keys_only: true,
            stale: true,
            ..RangeRequest::prefix(word.as_bytes())
        };
        let page = self
            .rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(1), self.client.range_page(&req)).await });
        match page {
            Ok(Ok(page)) => page.entries.iter().map(|e| escape(&e.key)).collect(),
            _ => vec![],
        }
    }
}

impl Completer for ShellHelper {
    type Candidate = Pair;

    fn complete(&self, line: &str, pos: usize, _: &Context<'_>) -> rustyline::Result<(usize, Vec<Pair>)> {
        let before = &line[..pos];
        let start = before.rfind(char::is_whitespace).map_or(0, |i| i + 1);
        let word = &before[start..];
        let words_before = before[..start].split_whitespace().count();
        let first = before.split_whitespace().next().map(str::to_lowercase);
        let options: Vec<String> = match (words_before, first.as_deref()) {
            (0, _) => COMMANDS.iter().map(|(n, _, _)| n.to_string()).collect(),
            (1, Some("timing" | "stale")) => vec!["on".into(), "off".into()],
            (1, Some("help")) => COMMANDS.iter().map(|(n, _, _)| n.to_string()).collect(),
            (2, Some("if")) => ["=", "version", "exists", "missing"].map(String::from).to_vec(),
            (1, Some("get" | "put" | "set" | "del" | "delete" | "cas" | "if" | "scan" | "range"))
            | (2, Some("range"))
                if !word.starts_with('-') =>
            {
                self.keys(word)
            }
            _ => vec![],
        };
        let pairs = options
            .into_iter()
            .filter(|o| o.starts_with(word))
            .map(|o| Pair { display: o.clone(), replacement: format!("{o} ") })
            .collect();
        Ok((start, pairs))
    }
}

impl Hinter for ShellHelper {
    type Hint = String;
}
impl Highlighter for ShellHelper {
    fn highlight_prompt<'b, 's: 'b, 'p: 'b>(&'s self, prompt: &'p str, _default: bool) -> Cow<'b, str> {
        Cow::Borrowed(prompt)
    }
}
impl Validator for ShellHelper {}
impl Helper for ShellHelper {}

/// Colours, only on a terminal and when `NO_COLOR` is unset.
struct Style {
    on: bool,
}

impl Style {
    fn paint(&self, code: &str, s: &str) -> String {
        if self.on {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }
    fn ok(&self, s: &str) -> String {
        self.paint("32", s)
    }
    fn err(&self, s: &str) -> String {
        self.paint("31", s)
    }
    fn dim(&self, s: &str) -> String {
        self.paint("2", s)
    }
    fn warn(&self, s: &str) -> String {
        self.paint("33", s)
    }
}

/// An open transaction.
#[derive(Default)]
struct OpenTxn {
    conditions: Vec<Condition>,
    writes: Vec<Write>,
    /// Keys read and the version seen (0: missing).
    reads: BTreeMap<Vec<u8>, u64>,
}

impl OpenTxn {
    fn buffered(&self, key: &[u8]) -> Option<Option<&[u8]>> {
        self.writes.iter().rev().find(|w| w.key() == key).map(|w| match w {
            Write::Put(_, v) => Some(v.as_slice()),
            Write::Delete(_) => None,
        })
    }
}

fn history_path() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("TREATY_HISTORY") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".treaty_history"))
}

struct Shell<'a> {
    client: Arc<Client>,
    rt: &'a tokio::runtime::Runtime,
    style: Style,
    txn: Option<OpenTxn>,
    timing: bool,
    /// `stale on`: reads are served from the replica's local state.
    stale: bool,
    endpoint: String,
}

impl Shell<'_> {
    fn say_error(&self, e: &Error) {
        // The library's hints name CLI commands (`treaty outcome ID`); here
        // the same command is typed without the program name.
        let said = e.to_string().replace("`treaty ", "`");
        println!("{}", self.style.err(&format!("error: {said}")));
    }

    /// Notices a failover to another endpoint and says so.
    fn check_endpoint(&mut self) {
        let now = self.client.endpoint().to_string();
        if now != self.endpoint {
            println!("{}", self.style.warn(&format!("lost {}; reconnected to {now}", self.endpoint)));
            self.endpoint = now;
        }
    }

    fn show_commit(&self, r: Result<treaty_common::Committed, Error>) {
        match r {
            Ok(c) => println!("{}", self.style.ok(&format!("OK (commit index {})", c.index))),
            Err(e) => self.say_error(&e),
        }
    }

    /// `scan` / `range`: one page of at most `--limit` (default
    /// [`SHELL_RANGE_LIMIT`]) entries, and how to ask for more.
    fn range(&self, r: &RangeCmd) {
        let shown = r.limit.unwrap_or(SHELL_RANGE_LIMIT);
        let mut pages = self.client.range(r.request(MAX_RANGE_LIMIT), Some(shown));
        let (mut count, mut index) = (0u64, None);
        while let Some(page) = self.rt.block_on(pages.next()) {
            let page = match page {
                Ok(p) => p,
                Err(e) => return self.say_error(&e),
            };
            index = Some(index.map_or(page.index, |i: u64| i.max(page.index)));
            for e in &page.entries {
                count += 1;
                let version = self.style.dim(&format!("(version {})", e.version));
                match &e.value {
                    Some(v) => println!("{} = {}  {version}", escape(&e.key), escape(v)),
                    None => println!("{}  {version}", escape(&e.key)),
                }
            }
        }
        let what = format!(
            "{count} key{}{}{}",
            if count == 1 { "" } else { "s" },
            index.map_or(String::new(), |i| format!(", as of index {i}")),
            if r.stale { ", stale read" } else { "" }
        );
        match pages.continuation() {
            Some(next) => println!("{}", self.style.dim(&format!("({what}; more with: {})", r.continue_at(next)))),
            None => println!("{}", self.style.dim(&format!("({what})"))),
        }
        if self.txn.is_some() {
            println!("{}", self.style.dim("(committed data: a scan is not among this transaction's checks)"));
        }
    }

    fn execute(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Exit => return false,
            Command::Help(topic) => println!("{}", help(topic.as_deref())),
            Command::Timing(on) => {
                self.timing = on.unwrap_or(!self.timing);
                let on = self.timing;
                println!("timing {}", if on { "on" } else { "off" });
            }
            Command::Stale(on) => {
                self.stale = on.unwrap_or(!self.stale);
                if self.stale {
                    println!("stale reads on: get, scan and range answer from the replica's local state, which may be behind");
                } else {
                    println!("stale reads off: reads are linearizable");
                }
            }
            Command::Status => {
                let mut text = Vec::new();
                self.rt.block_on(crate::status::report(&self.client, false, &mut text));
                print!("{}", String::from_utf8_lossy(&text));
            }
            Command::Range(mut r) => {
                r.stale |= self.stale;
                self.range(&r)
            }
            Command::Placement(key) => match self.rt.block_on(self.client.cluster_status()) {
                Ok(s) => println!("{}", crate::status::placement(&s.placement, &key, false)),
                Err(e) => self.say_error(&e),
            },
            Command::Trace(id) => match self.rt.block_on(self.client.trace(id)) {
                Ok(events) => {
                    for line in crate::trace::render(id, &events) {
                        println!("{line}");
                    }
                }
                Err(e) => self.say_error(&e),
            },
            Command::Outcome(id) => match self.rt.block_on(self.client.outcome(id)) {
                Ok(o @ crate::Outcome::Committed(_)) => println!("{}", self.style.ok(&o.to_string())),
                Ok(o) => println!("{o}"),
                Err(e) => self.say_error(&e),
            },
            Command::Begin => {
                if self.txn.is_some() {
                    println!("{}", self.style.err("error: a transaction is already open: commit or abort it first"));
                } else {
                    self.txn = Some(OpenTxn::default());
                    println!("transaction open: reads record versions, writes are buffered until commit");
                }
            }
            Command::Abort => match self.txn.take() {
                Some(t) => println!("discarded {} buffered write(s)", t.writes.len()),
                None => println!("{}", self.style.err("error: no transaction is open (begin starts one)")),
            },
            Command::Show => match &self.txn {
                None => println!("no transaction is open"),
                Some(t) => {
                    for (k, v) in &t.reads {
                        println!("  {}", self.style.dim(&format!("read  {} at version {v}", escape(k))));
                    }
                    for c in &t.conditions {
                        println!("  if    {c}");
                    }
                    for w in &t.writes {
                        match w {
                            Write::Put(k, v) => println!("  put   {} {}", escape(k), escape(v)),
                            Write::Delete(k) => println!("  del   {}", escape(k)),
                        }
                    }
                    if t.reads.is_empty() && t.conditions.is_empty() && t.writes.is_empty() {
                        println!("  (empty)");
                    }
                }
            },
            Command::Commit => match self.txn.take() {
                None => println!("{}", self.style.err("error: no transaction is open (begin starts one)")),
                Some(t) if t.writes.is_empty() => {
                    println!("read-only transaction: nothing to commit");
                }
                Some(t) => {
                    let mut conditions = t.conditions.clone();
                    conditions.extend(t.reads.iter().map(|(k, v)| Condition::VersionEquals(k.clone(), *v)));
                    let r = self.rt.block_on(self.client.commit(Txn::new(conditions, t.writes.clone())));
                    match r {
                        Err(Error::ConditionFailed(reason)) => {
                            let changed = t.reads.iter().find(|(k, v)| {
                                reason.starts_with(&Condition::VersionEquals((*k).clone(), **v).to_string())
                            });
                            let msg = match changed {
                                Some((k, _)) => format!(
                                    "aborted: {} changed since this transaction read it ({reason}); nothing was applied",
                                    escape(k)
                                ),
                                None => format!("aborted: condition failed: {reason}; nothing was applied"),
                            };
                            println!("{}", self.style.err(&msg));
                        }
                        other => self.show_commit(other),
                    }
                }
            },
            Command::If(c) => match &mut self.txn {
                Some(t) => {
                    t.conditions.push(c);
                    println!("{}", self.style.dim("condition added"));
                }
                None => println!("{}", self.style.err("error: `if` only works inside a transaction: type begin first")),
            },
            Command::Get(k, stale) => {
                let stale = stale || self.stale;
                if let Some(t) = &self.txn {
                    if let Some(v) = t.buffered(&k) {
                        match v {
                            Some(v) => println!("{}  {}", escape(v), self.style.dim("(written in this transaction)")),
                            None => println!("(not found)  {}", self.style.dim("(deleted in this transaction)")),
                        }
                        return true;
                    }
                }
                match self.rt.block_on(self.client.get_with(&k, crate::batch::read_mode(stale))) {
                    Ok(v) => {
                        match &v {
                            Some(v) => println!(
                                "{}  {}",
                                escape(&v.value),
                                self.style.dim(&format!(
                                    "(version {}{})",
                                    v.version,
                                    if stale { ", stale read" } else { "" }
                                ))
                            ),
                            None => println!("(not found)"),
                        }
                        if let Some(t) = &mut self.txn {
                            t.reads.entry(k).or_insert(v.map_or(0, |v| v.version));
                        }
                    }
                    Err(e) => self.say_error(&e),
                }
            }
            Command::Put(k, v) => match &mut self.txn {
                Some(t) => {
                    t.writes.push(Write::Put(k, v));
                    println!("{}", self.style.dim("buffered"));
                }
                None => self.show_commit(self.rt.block_on(self.client.put(&k, &v))),
            },
            Command::Del(k) => match &mut self.txn {
                Some(t) => {
                    t.writes.push(Write::Delete(k));
                    println!("{}", self.style.dim("buffered"));
                }
                None => self.show_commit(self.rt.block_on(self.client.delete(&k))),
            },
            Command::Cas(k, e, n) => match &mut self.txn {
                Some(t) => {
                    t.conditions.push(Condition::ValueEquals(k.clone(), e));
                    t.writes.push(Write::Put(k, n));
                    println!("{}", self.style.dim("buffered"));
                }
                None => self.show_commit(self.rt.block_on(self.client.cas(&k, Some(&e), &n))),
            },
        }
        true
    }
}

/// Runs the shell until `exit` or Ctrl-D; returns the exit status.
pub fn run(client: Client, rt: &tokio::runtime::Runtime) -> i32 {
    let config = rustyline::Config::builder().completion_type(rustyline::CompletionType::List).build();
    let mut rl: Editor<ShellHelper, DefaultHistory> = match Editor::with_config(config) {
        Ok(rl) => rl,
        Err(e) => {
            eprintln!("error: cannot start the line editor: {e}");
            return 2;
        }
    };
    let client = Arc::new(client);
    rl.set_helper(Some(ShellHelper { client: client.clone(), rt: rt.handle().clone() }));
    let history = history_path();
    if let Some(h) = &history {
        let _ = rl.load_history(h);
    }
    let color = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let endpoint = client.endpoint().to_string();
    let mut shell = Shell { client, rt, style: Style { on: color }, txn: None, timing: false, stale: false, endpoint };
    println!("Treaty shell: `help` lists commands, Tab completes, Ctrl-D leaves.");
    loop {
        let prompt = format!(
            "treaty {}{}{}> ",
            shell.endpoint,
            if shell.stale { " stale" } else { "" },
            if shell.txn.is_some() { " txn" } else { "" }
        );
        let line = match rl.readline(&prompt) {
            Ok(l) => l,
            Err(ReadlineError::Interrupted) => {
                if shell.txn.is_some() {
                    match rl.readline("discard the open transaction? [y/N] ") {
                        Ok(a) if a.trim().eq_ignore_ascii_case("y") => {
                            shell.txn = None;
                            println!("transaction discarded");
                        }
                        _ => println!("transaction kept"),
                    }
                }
                continue;
            }
            Err(ReadlineError::Eof) => {
                if shell.txn.is_some() {
                    println!("{}", shell.style.warn("open transaction discarded"));
                }
                break;
            }
            Err(e) => {
                eprintln!("error: {e}");
                return 2;
            }
        };
        if !line.trim().is_empty() {
            let _ = rl.add_history_entry(line.as_str());
            if let Some(h) = &history {
                let _ = rl.append_history(h).or_else(|_| rl.save_history(h));
            }
        }
        let cmd = match parse_line(&line) {
            Ok(Some(c)) => c,
            Ok(None) => continue,
            Err(e) => {
                println!("{}", shell.style.err(&format!("error: {e}")));
                continue;
            }
        };
        let started = Instant::now();
        let go_on = shell.execute(cmd);
        if shell.timing {
            println!("{}", shell.style.dim(&format!("({:.2} ms)", started.elapsed().as_secs_f64() * 1000.0)));
        }
        shell.check_endpoint();
        if !go_on {
            break;
        }
    }
    0
}

//! `treaty run FILE|-`: scripted transaction batches.
//!
//! Two passes over the file. The *check* pass parses every line and checks
//! the structure (`begin`/`commit` nesting, `if` only inside a block,
//! per-transaction limits) keeping nothing but counters, so a syntax error
//! anywhere runs nothing and is reported as `FILE:LINE:COLUMN: message`. The
//! *run* pass reads the file again and executes it as a stream of units (a
//! bare command, or a `begin` ... `commit` block). Up to `--pipeline` units
//! are in flight at once; a unit waits for every earlier in-flight unit that
//! touches one of its keys, so the outcome is the same as running the file
//! line by line. Memory is bounded by the pipeline, not the file (stdin is
//! spooled to a temporary file first).

use std::collections::BTreeSet;
use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, IsTerminal, Write as _};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use treaty_common::types::{escape, MAX_TXN_BYTES, MAX_TXN_OPS};
use treaty_common::{Condition, Error, Txn, Write};

use crate::script::{parse_line, Command, RangeCmd};
use crate::Client;

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// The batch file, or `-` for standard input.
    pub file: String,
    /// Run the whole file as one transaction.
    #[arg(long)]
    pub atomic: bool,
    /// Continue past a failed transaction (default: stop at the first).
    #[arg(long)]
    pub keep_going: bool,
    /// One JSON object per command (set by the global `-o json` / `--json`).
    #[arg(skip)]
    pub json: bool,
    /// Transactions in flight at once (1 runs strictly one after another).
    #[arg(long, default_value_t = 32)]
    pub pipeline: usize,
}

/// Exit statuses.
pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILED: i32 = 1;
pub const EXIT_BAD_INPUT: i32 = 2;
pub const EXIT_UNAVAILABLE: i32 = 3;

/// One command of a unit, kept for reporting.
#[derive(Clone, Debug)]
struct Line {
    no: usize,
    cmd: Command,
}

/// What runs as one: a bare command or a block.
#[derive(Debug)]
struct Unit {
    lines: Vec<Line>,
    /// `begin` ... `abort`: checked, then discarded by the script itself.
    discarded: bool,
}

impl Unit {
    fn keys(&self) -> BTreeSet<Vec<u8>> {
        let mut keys = BTreeSet::new();
        for l in &self.lines {
            match &l.cmd {
                Command::Get(k, _) | Command::Del(k) | Command::Put(k, _) | Command::Cas(k, _, _) => {
                    keys.insert(k.clone());
                }
                Command::If(c) => {
                    keys.insert(c.key().to_vec());
                }
                _ => {}
            }
        }
        keys
    }

    /// Whether the unit can abort on a condition (and so must finish before
    /// later units start, unless --keep-going).
    fn conditional(&self) -> bool {
        self.lines.iter().any(|l| matches!(l.cmd, Command::If(_) | Command::Cas(..) | Command::Get(..)))
    }

    fn span(&self) -> String {
        let first = self.lines.first().map_or(0, |l| l.no);
        let last = self.lines.last().map_or(0, |l| l.no);
        if first == last {
            format!("line {first}")
        } else {
            format!("lines {first}-{last}")
        }
    }
}

/// Reads units from a checked file, one at a time.
struct Units<R: BufRead> {
    lines: std::iter::Enumerate<std::io::Lines<R>>,
    atomic: bool,
    done: bool,
}

impl<R: BufRead> Iterator for Units<R> {
    type Item = Unit;

    fn next(&mut self) -> Option<Unit> {
        if self.done {
            return None;
        }
        let mut block: Option<Vec<Line>> = if self.atomic { Some(Vec::new()) } else { None };
        for (i, line) in self.lines.by_ref() {
            let line = line.expect("file changed between check and run");
            let Some(cmd) = parse_line(&line).expect("checked") else { continue };
            let l = Line { no: i + 1, cmd };
            match (&mut block, &l.cmd) {
                (None, Command::Begin) => block = Some(vec![l]),
                (None, _) => return Some(Unit { lines: vec![l], discarded: false }),
                (Some(b), Command::Commit) => {
                    b.push(l);
                    return Some(Unit { lines: block.take().unwrap(), discarded: false });
                }
                (Some(b), Command::Abort) => {
                    b.push(l);
                    return Some(Unit { lines: block.take().unwrap(), discarded: true });
                }
                (Some(b), _) => b.push(l),
            }
        }
        self.done = true;
        block.filter(|b| !b.is_empty()).map(|lines| Unit { lines, discarded: false })
    }
}

/// Checks the whole file; returns the number of commands, or the first error
/// as `FILE:LINE:COLUMN: message`.
fn check(path: &std::path::Path, name: &str, atomic: bool) -> Result<usize, String> {
    let file = File::open(path).map_err(|e| format!("{name}: cannot read: {e}"))?;
    let mut commands = 0usize;
    let mut open_block: Option<usize> = None;
    let (mut ops, mut bytes) = (0usize, 0usize);
    let mut last_line = 0;
    let limit_check = |ops: usize, bytes: usize, line: usize, what: &str| -> Result<(), String> {
        if ops > MAX_TXN_OPS {
            return Err(format!(
                "{name}:{line}:1: {what} has more than {MAX_TXN_OPS} operations; split it into smaller transactions"
            ));
        }
        if bytes > MAX_TXN_BYTES {
            return Err(format!("{name}:{line}:1: {what} carries more than 4 MiB; split it into smaller transactions"));
        }
        Ok(())
    };
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let no = i + 1;
        last_line = no;
        let line = line.map_err(|e| {
            format!("{name}:{no}:1: cannot read line ({e}); use hex x'..' or \\xNN escapes for binary values")
        })?;
        let cmd = match parse_line(&line) {
            Ok(Some(c)) => c,
            Ok(None) => continue,
            Err(e) => return Err(format!("{name}:{no}:{}: {}", e.column, e.message)),
        };
        commands += 1;
        let at = |msg: &str| format!("{name}:{no}:1: {msg}");
        match &cmd {
            Command::Status
            | Command::Outcome(_)
            | Command::Trace(_)
            | Command::Placement(_)
            | Command::Timing(_)
            | Command::Stale(_)
            | Command::Help(_)
            | Command::Exit
            | Command::Show => {
                return Err(at(&format!(
                    "`{}` is for the interactive shell and cannot appear in a batch file",
                    cmd.name()
                )))
            }
            Command::Begin | Command::Commit | Command::Abort if atomic => {
                return Err(at("--atomic already runs the whole file as one transaction: remove begin/commit/abort"))
            }
            Command::Begin => {
                if let Some(b) = open_block {
                    return Err(at(&format!(
                        "nested begin: the transaction begun at line {b} is still open; commit or abort it first"
                    )));
                }
                open_block = Some(no);
                (ops, bytes) = (0, 0);
            }
            Command::Commit | Command::Abort if open_block.take().is_none() => {
                return Err(at(&format!("`{}` without `begin`", cmd.name())));
            }
            Command::Range(_) if open_block.is_some() || atomic => {
                return Err(at(&format!(
                    "`{}` reads committed data and cannot be part of a transaction: move it outside begin ... commit{}",
                    cmd.name(),
                    if atomic { " (and run without --atomic)" } else { "" }
                )))
            }
            Command::If(_) if open_block.is_none() && !atomic => {
                return Err(at("`if` only works inside begin ... commit (or with --atomic)"))
            }
            _ => {}
        }
        let (o, b) = match &cmd {
            Command::Put(k, v) => (1, k.len() + v.len()),
            Command::Del(k) | Command::Get(k, _) => (1, k.len()),
            Command::Cas(k, e, n) => (2, 2 * k.len() + e.len() + n.len()),
            Command::If(c) => (1, c.key().len() + if let Condition::ValueEquals(_, v) = c { v.len() } else { 0 }),
            _ => (0, 0),
        };
        if open_block.is_some() || atomic {
            ops += o;
            bytes += b;
            limit_check(ops, bytes, no, if atomic { "the file (--atomic)" } else { "this transaction" })?;
        }
    }
    if let Some(b) = open_block {
        return Err(format!("{name}:{b}:1: `begin` at line {b} has no `commit` before the end of the file"));
    }
    if commands == 0 {
        return Err(format!("{name}:{}:1: no commands in the file (nothing to run)", last_line.max(1)));
    }
    Ok(commands)
}

/// The outcome of one unit, ready to print.
struct Outcome {
    unit: Unit,
    /// Values read by gets, by line.
    reads: Vec<(usize, Option<treaty_common::Versioned>)>,
    /// The transaction submitted, if the unit wrote anything.
    txn: Option<treaty_common::TxnId>,
    result: Result<Option<u64>, Error>,
}

async fn execute(client: Arc<Client>, unit: Unit) -> Outcome {
    let mut reads = Vec::new();
    if unit.discarded {
        return Outcome { unit, reads, txn: None, result: Ok(None) };
    }
    let mut conditions = Vec::new();
    let mut writes = Vec::new();
    let in_block = unit.lines.len() > 1 || matches!(unit.lines[0].cmd, Command::Begin);
    for l in &unit.lines {
        match &l.cmd {
            Command::Get(k, stale) => match client.get_with(k, read_mode(*stale)).await {
                Ok(v) => {
                    if in_block {
                        conditions.push(Condition::VersionEquals(k.clone(), v.as_ref().map_or(0, |v| v.version)));
                    }
                    reads.push((l.no, v));
                }
                Err(e) => return Outcome { unit, reads, txn: None, result: Err(e) },
            },
            Command::Put(k, v) => writes.push(Write::Put(k.clone(), v.clone())),
            Command::Del(k) => writes.push(Write::Delete(k.clone())),
            Command::Cas(k, e, n) => {
                conditions.push(Condition::ValueEquals(k.clone(), e.clone()));
                writes.push(Write::Put(k.clone(), n.clone()));
            }
            Command::If(c) => conditions.push(c.clone()),
            _ => {}
        }
    }
    if writes.is_empty() {
        return Outcome { unit, reads, txn: None, result: Ok(None) };
    }
    let txn = Txn::new(conditions, writes);
    let id = txn.id;
    let result = client.commit(txn).await.map(|c| Some(c.index));
    Outcome { unit, reads, txn: Some(id), result }
}

#[derive(Default)]
struct Tally {
    committed: u64,
    aborted: u64,
    failed: u64,
    reads: u64,
    unavailable: bool,
    first_failure: Option<String>,
}

fn describe(cmd: &Command) -> String {
    match cmd {
        Command::Get(k, false) => format!("get {}", escape(k)),
        Command::Get(k, true) => format!("get {} --stale", escape(k)),
        Command::Put(k, v) => format!("put {} {}", escape(k), escape(v)),
        Command::Del(k) => format!("del {}", escape(k)),
        Command::Cas(k, e, n) => format!("cas {} {} {}", escape(k), escape(e), escape(n)),
        Command::If(c) => format!("if {c}"),
        Command::Range(r) => r.to_string(),
        other => other.name().to_string(),
    }
}

/// Puts bytes into a JSON object losslessly: valid UTF-8 as the string
/// `field`, anything else base64-encoded as `field_base64`.
pub fn json_bytes(obj: &mut serde_json::Value, field: &str, bytes: &[u8]) {
    use base64::Engine as _;
    match std::str::from_utf8(bytes) {
        Ok(text) => obj[field] = json!(text),
        Err(_) => obj[format!("{field}_base64")] = json!(base64::engine::general_purpose::STANDARD.encode(bytes)),
    }
}

fn report(out: &mut impl std::io::Write, o: &Outcome, json_mode: bool, tally: &mut Tally) {
    let reads: std::collections::HashMap<usize, &Option<treaty_common::Versioned>> =
        o.reads.iter().map(|(n, v)| (*n, v)).collect();
    let status = match &o.result {
        _ if o.unit.discarded => "discarded",
        Ok(Some(_)) => "committed",
        Ok(None) => "ok",
        Err(Error::ConditionFailed(_)) => "aborted",
        Err(_) => "failed",
    };
    match (&o.result, o.unit.discarded) {
        (_, true) => {}
        (Ok(Some(_)), _) => tally.committed += 1,
        (Ok(None), _) => {}
        (Err(e), _) => {
            if matches!(e, Error::ConditionFailed(_)) {
                tally.aborted += 1;
            } else {
                tally.failed += 1;
            }
            if matches!(e, Error::Unavailable(_) | Error::NotReady(_)) {
                tally.unavailable = true;
            }
            tally
                .first_failure
                .get_or_insert_with(|| format!("{} ({}): {e}", o.unit.span(), describe(&o.unit.lines[0].cmd)));
        }
    }
    tally.reads += o.reads.len() as u64;
    if json_mode {
        for l in &o.unit.lines {
            let mut obj = json!({"line": l.no, "command": l.cmd.name(), "status": status});
            if let Command::Get(k, _) | Command::Put(k, _) | Command::Del(k) | Command::Cas(k, _, _) = &l.cmd {
                json_bytes(&mut obj, "key", k);
            }
            if let Command::If(c) = &l.cmd {
                obj["condition"] = json!(c.to_string());
            }
            if let Some(v) = reads.get(&l.no) {
                match v {
                    Some(v) => {
                        obj["found"] = json!(true);
                        json_bytes(&mut obj, "value", &v.value);
                        obj["version"] = json!(v.version);
                    }
                    None => obj["found"] = json!(false),
                }
            }
            if let Some(id) = o.txn {
                obj["txn"] = json!(id.to_string());
            }
            match &o.result {
                Ok(Some(index)) => obj["index"] = json!(index),
                Err(e) => obj["error"] = json!(e.to_string()),
                Ok(None) => {}
            }
            let _ = writeln!(out, "{obj}");
        }
        return;
    }
    for l in &o.unit.lines {
        if let Some(v) = reads.get(&l.no) {
            match v {
                Some(v) => {
                    let _ = writeln!(out, "{} = {}", describe(&l.cmd).trim_start_matches("get "), escape(&v.value));
                }
                None => {
                    let _ = writeln!(out, "{} (not found)", describe(&l.cmd).trim_start_matches("get "));
                }
            }
        }
    }
    let what = if o.unit.lines.len() == 1 { describe(&o.unit.lines[0].cmd) } else { "transaction".to_string() };
    match &o.result {
        _ if o.unit.discarded => {
            let _ = writeln!(out, "discarded  {}  (ends with abort)", o.unit.span());
        }
        Ok(Some(index)) => {
            let _ = writeln!(out, "committed  {}  {what}  (index {index})", o.unit.span());
        }
        Ok(None) => {}
        Err(e) => {
            let _ = writeln!(out, "{status:<9}  {}  {what}: {e}", o.unit.span());
        }
    }
}

fn spool_stdin() -> Result<tempfile::NamedTempFile, String> {
    let mut tmp = tempfile::NamedTempFile::new().map_err(|e| {
        format!(
            "cannot create a temporary file in {} to hold standard input ({e}); set TMPDIR to a writable directory",
            std::env::temp_dir().display()
        )
    })?;
    std::io::copy(&mut std::io::stdin().lock(), &mut tmp).map_err(|e| format!("cannot read standard input: {e}"))?;
    tmp.flush().map_err(|e| e.to_string())?;
    Ok(tmp)
}

/// Runs a batch; returns the exit status.
pub async fn run(client: Client, args: RunArgs) -> i32 {
    let spooled;
    let (path, name): (PathBuf, String) = if args.file == "-" {
        spooled = match spool_stdin() {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: {e}");
                return EXIT_BAD_INPUT;
            }
        };
        (spooled.path().to_path_buf(), "<stdin>".to_string())
    } else {
        (PathBuf::from(&args.file), args.file.clone())
    };
    let total = match check(&path, &name, args.atomic) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("error: {e}");
            eprintln!("nothing was run");
            return EXIT_BAD_INPUT;
        }
    };
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {name}: cannot read: {e}");
            return EXIT_BAD_INPUT;
        }
    };
    let units = Units { lines: BufReader::new(file).lines().enumerate(), atomic: args.atomic, done: false };
    let client = Arc::new(client);
    let window = args.pipeline.max(1);
    // On a terminal, for a file worth watching: commands done of the total
    // the check pass counted, rate, percentage and ETA.
    let progress = (std::io::stderr().is_terminal() && total >= 1000).then(|| {
        let bar = indicatif::ProgressBar::new(total as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:24} {pos}/{len} commands ({percent}%)  {msg}  ETA {eta}")
                .expect("progress template"),
        );
        bar
    });
    let started = Instant::now();
    let mut last_progress = Instant::now();
    let mut done_lines = 0usize;
    let mut tally = Tally::default();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut in_flight: VecDeque<(BTreeSet<Vec<u8>>, bool, tokio::task::JoinHandle<Outcome>)> = VecDeque::new();
    let mut stop = false;
    for unit in units {
        if stop {
            break;
        }
        let keys = unit.keys();
        let conditional = unit.conditional();
        // Without --keep-going, nothing runs past a unit that may abort, so
        // "stop at the first failure" is exact.
        let barrier = |in_flight: &VecDeque<(BTreeSet<Vec<u8>>, bool, _)>| {
            !args.keep_going && !in_flight.is_empty() && (conditional || in_flight.iter().any(|(_, c, _)| *c))
        };
        // A listing sees every earlier line's effect and none of a later
        // one: it waits for everything in flight, then runs alone.
        let listing = matches!(unit.lines.as_slice(), [Line { cmd: Command::Range(_), .. }]);
        while in_flight.len() >= window
            || in_flight.iter().any(|(k, _, _)| !k.is_disjoint(&keys))
            || barrier(&in_flight)
            || (listing && !in_flight.is_empty())
        {
            let (_, _, handle) = in_flight.pop_front().expect("non-empty");
            let o = handle.await.expect("batch task panicked");
            done_lines += o.unit.lines.len();
            let failed = o.result.is_err();
            report(&mut out, &o, args.json, &mut tally);
            if failed && !args.keep_going {
                stop = true;
                break;
            }
        }
        if stop {
            break;
        }
        if let [Line { no, cmd: Command::Range(r) }] = unit.lines.as_slice() {
            // Streamed straight to the output, never collected.
            done_lines += 1;
            match print_range(&mut out, &client, r, args.json, Some(*no)).await {
                Ok((count, next)) => {
                    tally.reads += count;
                    if let (Some(next), false) = (next, args.json) {
                        let _ = writeln!(out, "more       line {no}  {r}: continue with: {}", r.continue_at(&next));
                    }
                }
                Err(e) => {
                    stop = !args.keep_going;
                    report(
                        &mut out,
                        &Outcome { unit, reads: Vec::new(), txn: None, result: Err(e) },
                        args.json,
                        &mut tally,
                    );
                }
            }
            continue;
        }
        if let Some(bar) = progress.as_ref().filter(|_| last_progress.elapsed() > Duration::from_millis(200)) {
            last_progress = Instant::now();
            let rate = tally.committed as f64 / started.elapsed().as_secs_f64();
            bar.set_position(done_lines as u64);
            bar.set_message(format!("{} committed, {rate:.0} txn/s", tally.committed));
        }
        in_flight.push_back((keys, conditional, tokio::spawn(execute(client.clone(), unit))));
    }
    while let Some((_, _, handle)) = in_flight.pop_front() {
        let o = handle.await.expect("batch task panicked");
        report(&mut out, &o, args.json, &mut tally);
    }
    let _ = out.flush();
    drop(out);
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let rate = tally.committed as f64 / elapsed.max(1e-9);
    if let Some(f) = &tally.first_failure {
        if args.keep_going {
            eprintln!("first failure: {f}");
        } else {
            eprintln!("stopped at the first failure (use --keep-going to continue past it): {f}");
        }
    }
    eprintln!(
        "summary: {} committed, {} aborted, {} failed, {} reads in {elapsed:.2} s ({rate:.0} txn/s)",
        tally.committed, tally.aborted, tally.failed, tally.reads
    );
    if tally.unavailable {
        EXIT_UNAVAILABLE
    } else if tally.aborted + tally.failed > 0 {
        EXIT_FAILED
    } else {
        EXIT_OK
    }
}

/// Entries asked for per page by [`print_range`].
const PAGE: u32 = 1000;

/// Streams a range read to `out`, page by page (memory: one page): `KEY =
/// VALUE` lines (`KEY` with `--keys-only`), or one JSON object per entry
/// (with the batch `line` if given). Returns how many entries were printed
/// and, when `--limit` cut the range short, where the rest starts.
pub async fn print_range(
    out: &mut impl std::io::Write,
    client: &Client,
    r: &RangeCmd,
    json_mode: bool,
    line: Option<usize>,
) -> Result<(u64, Option<Vec<u8>>), Error> {
    let mut pages = client.range(r.request(PAGE), r.limit);
    let mut count = 0;
    let head = || match line {
        Some(no) => json!({"line": no, "command": r.name(), "status": "ok"}),
        None => json!({}),
    };
    while let Some(page) = pages.next().await {
        for e in page?.entries {
            count += 1;
            let _ = if json_mode {
                let mut obj = head();
                json_bytes(&mut obj, "key", &e.key);
                if let Some(v) = &e.value {
                    json_bytes(&mut obj, "value", v);
                }
                obj["version"] = json!(e.version);
                writeln!(out, "{obj}")
            } else {
                match &e.value {
                    Some(v) => writeln!(out, "{} = {}", escape(&e.key), escape(v)),
                    None => writeln!(out, "{}", escape(&e.key)),
                }
            };
        }
    }
    let next = pages.continuation().map(<[u8]>::to_vec);
    if let (Some(next), true) = (&next, json_mode) {
        let mut obj = head();
        obj["status"] = json!("more");
        json_bytes(&mut obj, "next", next);
        let _ = writeln!(out, "{obj}");
    }
    Ok((count, next))
}

/// The client's read mode for a `get`, by its `--stale` flag.
pub fn read_mode(stale: bool) -> treaty_client::ReadMode {
    if stale {
        treaty_client::ReadMode::Stale
    } else {
        treaty_client::ReadMode::Linearizable
    }
}

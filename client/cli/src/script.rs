//! The command language shared by the REPL and the batch runner: one grammar,
//! one parser.
//!
//! ```text
//! line      := command? comment?
//! comment   := '#' anything
//! command   := 'get' KEY | 'put' KEY VALUE | 'del' KEY | 'cas' KEY VALUE VALUE
//!            | 'scan' PREFIX flags | 'range' START END? flags
//!            | 'if' KEY ('=' VALUE | 'version' N | 'exists' | 'missing')
//!            | 'begin' | 'commit' | 'abort' | 'show'
//!            | 'status' | 'outcome' TXN_ID | ('timing' | 'stale') ('on'|'off')? | 'help' WORD?
//!            | 'exit' | 'quit'
//! KEY/VALUE := bare | quoted | hex
//! bare      := any characters but whitespace, '"' and '#'
//! quoted    := '"' (char | '\n' | '\t' | '\r' | '\0' | '\\' | '\"' | '\xNN')* '"'
//! hex       := x'HEXDIGITS'          (binary values, e.g. x'00ff')
//! flags     := ('--limit' N | '--keys-only' | '--stale' | '--from' KEY)*   (--from: scan only)
//! ```
//!
//! Keys and values are checked against the store's limits while parsing, so a
//! batch file with an oversized value is rejected before anything runs.

use std::fmt;

use treaty_common::types::{check_key, check_value, escape};
use treaty_common::{Condition, TxnId};

/// One parsed command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// A read; `true` for a stale (local, possibly old) read.
    Get(Vec<u8>, bool),
    Put(Vec<u8>, Vec<u8>),
    Del(Vec<u8>),
    Cas(Vec<u8>, Vec<u8>, Vec<u8>),
    /// `scan` or `range`: a range read outside any transaction.
    Range(RangeCmd),
    If(Condition),
    Begin,
    Commit,
    Abort,
    Show,
    Status,
    /// What became of a transaction (shell only).
    Outcome(TxnId),
    /// A transaction's steps on every node (shell only).
    Trace(TxnId),
    /// Where a key lives (shell only).
    Placement(Vec<u8>),
    /// `timing on|off`; `None` (`timing` alone, psql's `\timing`) toggles.
    Timing(Option<bool>),
    /// `stale on|off` (shell only): reads default to `--stale` while on;
    /// `None` (`stale` alone) toggles.
    Stale(Option<bool>),
    Help(Option<String>),
    Exit,
}

impl Command {
    /// The command's name as typed.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Get(..) => "get",
            Command::Put(..) => "put",
            Command::Del(_) => "del",
            Command::Cas(..) => "cas",
            Command::Range(r) => r.name(),
            Command::If(_) => "if",
            Command::Begin => "begin",
            Command::Commit => "commit",
            Command::Abort => "abort",
            Command::Show => "show",
            Command::Status => "status",
            Command::Outcome(_) => "outcome",
            Command::Trace(_) => "trace",
            Command::Placement(_) => "placement",
            Command::Timing(_) => "timing",
            Command::Stale(_) => "stale",
            Command::Help(_) => "help",
            Command::Exit => "exit",
        }
    }
}

/// A parsed `scan PREFIX` or `range START [END]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeCmd {
    /// Typed as `scan` (`start` is the prefix, `end` follows from it).
    pub prefix: bool,
    pub start: Vec<u8>,
    pub end: Option<Vec<u8>>,
    /// `scan ... --from KEY`: continue a listing at KEY.
    pub from: Option<Vec<u8>>,
    /// `--limit N`: at most N entries.
    pub limit: Option<u64>,
    pub keys_only: bool,
    pub stale: bool,
}

impl RangeCmd {
    /// `scan` or `range`, as typed.
    pub fn name(&self) -> &'static str {
        if self.prefix {
            "scan"
        } else {
            "range"
        }
    }

    /// The first page's request, `page` entries per page.
    pub fn request(&self, page: u32) -> treaty_client::RangeRequest {
        // `--from` past the prefix's keys: an empty range, not an error.
        let start = match (&self.from, &self.end) {
            (Some(from), Some(end)) if from >= end => end.clone(),
            (Some(from), _) => from.clone().max(self.start.clone()),
            (None, _) => self.start.clone(),
        };
        treaty_client::RangeRequest {
            start,
            end: self.end.clone(),
            limit: page,
            keys_only: self.keys_only,
            stale: self.stale,
        }
    }

    /// How to ask for the rest, starting at `next`, as typed in the shell.
    pub fn continue_at(&self, next: &[u8]) -> String {
        let rest = if self.prefix {
            RangeCmd { from: Some(next.to_vec()), ..self.clone() }
        } else {
            RangeCmd { start: next.to_vec(), ..self.clone() }
        };
        rest.to_string()
    }
}

impl fmt::Display for RangeCmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.prefix {
            write!(f, "scan {}", escape(&self.start))?;
            if let Some(from) = &self.from {
                write!(f, " --from {}", escape(from))?;
            }
        } else {
            write!(f, "range {}", escape(&self.start))?;
            if let Some(end) = &self.end {
                write!(f, " {}", escape(end))?;
            }
        }
        if let Some(n) = self.limit {
            write!(f, " --limit {n}")?;
        }
        for (on, flag) in [(self.keys_only, " --keys-only"), (self.stale, " --stale")] {
            if on {
                f.write_str(flag)?;
            }
        }
        Ok(())
    }
}

/// A syntax error at a 1-based column.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    pub column: usize,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "column {}: {}", self.column, self.message)
    }
}

fn err<T>(column: usize, message: impl Into<String>) -> Result<T, ParseError> {
    Err(ParseError { column, message: message.into() })
}

/// A token: its bytes, the column it starts at, and whether it was a bare word.
#[derive(Debug)]
struct Token {
    bytes: Vec<u8>,
    column: usize,
    bare: bool,
}

fn hex_val(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

fn tokenize(line: &str) -> Result<Vec<Token>, ParseError> {
    let b = line.as_bytes();
    let mut i = 0;
    let mut out = Vec::new();
    // Columns count characters, not bytes.
    let col = |i: usize| line[..i].chars().count() + 1;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        if c == b'#' {
            break;
        }
        if c == b'"' {
            i += 1;
            let mut bytes = Vec::new();
            loop {
                match b.get(i) {
                    None => return err(col(start), "unterminated quoted string: add the closing \""),
                    Some(b'"') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') => {
                        let esc = i;
                        i += 1;
                        match b.get(i) {
                            Some(b'n') => bytes.push(b'\n'),
                            Some(b't') => bytes.push(b'\t'),
                            Some(b'r') => bytes.push(b'\r'),
                            Some(b'0') => bytes.push(0),
                            Some(b'\\') => bytes.push(b'\\'),
                            Some(b'"') => bytes.push(b'"'),
                            Some(b'x') => {
                                let (h, l) =
                                    (b.get(i + 1).and_then(|c| hex_val(*c)), b.get(i + 2).and_then(|c| hex_val(*c)));
                                match (h, l) {
                                    (Some(h), Some(l)) => bytes.push(h << 4 | l),
                                    _ => return err(col(esc), "\\x needs two hex digits, e.g. \\x0a"),
                                }
                                i += 2;
                            }
                            Some(_) => return err(col(esc), "unknown escape: use \\n \\t \\r \\0 \\\\ \\\" or \\xNN"),
                            None => return err(col(esc), "unterminated quoted string: add the closing \""),
                        }
                        i += 1;
                    }
                    Some(_) => {
                        // Copy one whole UTF-8 character.
                        let ch = line[i..].chars().next().expect("in bounds");
                        bytes.extend_from_slice(ch.to_string().as_bytes());
                        i += ch.len_utf8();
                    }
                }
            }
            if b.get(i).is_some_and(|c| !c.is_ascii_whitespace() && *c != b'#') {
                return err(col(i), "expected a space after the closing quote");
            }
            out.push(Token { bytes, column: col(start), bare: false });
            continue;
        }
        if (c == b'x' || c == b'X') && b.get(i + 1) == Some(&b'\'') {
            i += 2;
            let digits_start = i;
            while i < b.len() && b[i] != b'\'' {
                i += 1;
            }
            if i >= b.len() {
                return err(col(start), "unterminated hex value: add the closing '");
            }
            let digits = &b[digits_start..i];
            i += 1;
            if !digits.len().is_multiple_of(2) {
                return err(col(start), "hex value needs an even number of digits");
            }
            let mut bytes = Vec::with_capacity(digits.len() / 2);
            for (k, pair) in digits.chunks(2).enumerate() {
                match (hex_val(pair[0]), hex_val(pair[1])) {
                    (Some(h), Some(l)) => bytes.push(h << 4 | l),
                    _ => return err(col(digits_start + 2 * k), "invalid hex digit (use 0-9, a-f)"),
                }
            }
            out.push(Token { bytes, column: col(start), bare: false });
            continue;
        }
        while i < b.len() && !b[i].is_ascii_whitespace() && b[i] != b'#' {
            if b[i] == b'"' {
                return err(col(i), "unexpected quote inside a word: quote the whole value");
            }
            i += 1;
        }
        out.push(Token { bytes: b[start..i].to_vec(), column: col(start), bare: true });
    }
    Ok(out)
}

/// The commands, for completion and help.
pub const COMMANDS: &[(&str, &str, &str)] = &[
    ("get", "get KEY [--stale]", "get user/1"),
    ("put", "put KEY VALUE", "put user/1 \"Ada Lovelace\""),
    ("del", "del KEY", "del user/1"),
    ("cas", "cas KEY EXPECTED NEW", "cas counter 41 42"),
    ("scan", "scan PREFIX [--from KEY] [--limit N] [--keys-only] [--stale]", "scan user/ --limit 10"),
    ("range", "range START [END] [--limit N] [--keys-only] [--stale]", "range user/a user/m --keys-only"),
    ("if", "if KEY = VALUE | if KEY version N | if KEY exists | if KEY missing", "if balance/alice = 100"),
    ("begin", "begin", "begin"),
    ("commit", "commit", "commit"),
    ("abort", "abort", "abort"),
    ("show", "show", "show"),
    ("status", "status", "status"),
    ("outcome", "outcome TXN_ID", "outcome 3f2a9c0d5e6b7a8190a1b2c3d4e5f607"),
    ("trace", "trace TXN_ID   (its steps on every node, in time order)", "trace 3f2a9c0d5e6b7a8190a1b2c3d4e5f607"),
    ("placement", "placement KEY", "placement user/1"),
    ("timing", "timing [on|off]   (alone, or \\timing: toggles)", "timing on"),
    ("stale", "stale [on|off]   (while on, get/scan/range read --stale; alone: toggles)", "stale on"),
    ("help", "help [COMMAND]   (or \\?)", "help if"),
    ("exit", "exit   (or quit, \\q, Ctrl-D)", "exit"),
];

/// A token's bytes, if they pass `check` (the store's key or value limit).
fn checked(t: &Token, check: fn(&[u8]) -> treaty_common::Result<()>) -> Result<Vec<u8>, ParseError> {
    check(&t.bytes).map_err(|e| ParseError { column: t.column, message: e.to_string() })?;
    Ok(t.bytes.clone())
}

fn key(t: &Token) -> Result<Vec<u8>, ParseError> {
    checked(t, check_key)
}

fn value(t: &Token) -> Result<Vec<u8>, ParseError> {
    checked(t, check_value)
}

/// A range bound: up to a key's length, and may be empty (`scan ""` lists
/// every key).
fn bound(t: &Token) -> Result<Vec<u8>, ParseError> {
    if t.bytes.len() > treaty_common::types::MAX_KEY_LEN {
        return err(t.column, format!("{} bytes is longer than any key (at most 1024)", t.bytes.len()));
    }
    Ok(t.bytes.clone())
}

/// The arguments of `scan` (`prefix`) or `range`: positional bounds, then
/// flags in any order.
fn range_cmd(prefix: bool, args: &[Token], end: usize, usage: &str) -> Result<RangeCmd, ParseError> {
    let mut bounds = Vec::new();
    let mut cmd =
        RangeCmd { prefix, start: Vec::new(), end: None, from: None, limit: None, keys_only: false, stale: false };
    let mut i = 0;
    while i < args.len() {
        let t = &args[i];
        match (t.bare, t.bytes.as_slice()) {
            (true, b"--keys-only") => cmd.keys_only = true,
            (true, b"--stale") => cmd.stale = true,
            (true, b"--limit") => {
                let n = args.get(i + 1).and_then(|n| std::str::from_utf8(&n.bytes).ok()?.parse::<u64>().ok());
                match n {
                    Some(n) if n > 0 => cmd.limit = Some(n),
                    _ => {
                        return err(
                            args.get(i + 1).map_or(end, |t| t.column),
                            "--limit needs a number of entries, 1 or more",
                        )
                    }
                }
                i += 1;
            }
            (true, b"--from") if prefix => {
                match args.get(i + 1) {
                    Some(k) => cmd.from = Some(bound(k)?),
                    None => return err(end, "--from needs the key to continue at"),
                }
                i += 1;
            }
            (true, flag) if flag.starts_with(b"--") => {
                return err(t.column, format!("unknown option {}; {usage}", String::from_utf8_lossy(flag)))
            }
            _ => bounds.push(t),
        }
        i += 1;
    }
    let most = if prefix { 1 } else { 2 };
    if bounds.is_empty() {
        let what = if prefix { "missing PREFIX (scan \"\" lists every key)" } else { "missing START" };
        return err(end, format!("{what}; {usage}"));
    }
    if bounds.len() > most {
        return err(bounds[most].column, format!("too many arguments; {usage}"));
    }
    cmd.start = bound(bounds[0])?;
    if prefix {
        cmd.end = treaty_common::types::prefix_end(&cmd.start);
    } else if let Some(e) = bounds.get(1) {
        let e = bound(e)?;
        if e < cmd.start {
            return err(bounds[1].column, "END sorts before START: swap them");
        }
        cmd.end = Some(e);
    }
    Ok(cmd)
}

/// Parses one line. `Ok(None)` for a blank or comment-only line.
pub fn parse_line(line: &str) -> Result<Option<Command>, ParseError> {
    let toks = tokenize(line)?;
    let Some(first) = toks.first() else { return Ok(None) };
    if !first.bare {
        return err(first.column, "expected a command (get, put, del, cas, if, begin, commit, ...)");
    }
    let name = String::from_utf8_lossy(&first.bytes).to_lowercase();
    // psql's and redis-cli's habits.
    let name = match name.as_str() {
        "\\q" => "exit".to_string(),
        "\\?" | "?" => "help".to_string(),
        "\\timing" => "timing".to_string(),
        _ => name,
    };
    let args = &toks[1..];
    let end = line.chars().count() + 1;
    let usage = |name: &str| {
        let (_, usage, example) = COMMANDS.iter().find(|(n, _, _)| *n == name).expect("known command");
        format!("usage: {usage}   (example: {example})")
    };
    // Exactly `n` arguments, or an error saying what is missing or extra.
    let count = |n: usize, missing: &str| -> Result<(), ParseError> {
        if args.len() < n {
            return err(end, format!("{missing}; {}", usage(&name)));
        }
        if args.len() > n {
            return err(args[n].column, format!("too many arguments; {}", usage(&name)));
        }
        Ok(())
    };
    let arity = |n: usize| count(n, "missing argument");
    let cmd = match name.as_str() {
        "get" => {
            // `--stale`: the replica's local copy, without waiting for
            // prepared writes or a lease (may be behind).
            let stale = args.len() == 2 && args[1].bare && args[1].bytes == b"--stale";
            if stale {
                Command::Get(key(&args[0])?, true)
            } else {
                arity(1)?;
                Command::Get(key(&args[0])?, false)
            }
        }
        "scan" | "range" => Command::Range(range_cmd(name == "scan", args, end, &usage(&name))?),
        "put" | "set" => {
            arity(2)?;
            Command::Put(key(&args[0])?, value(&args[1])?)
        }
        "del" | "delete" => {
            arity(1)?;
            Command::Del(key(&args[0])?)
        }
        "cas" => {
            arity(3)?;
            Command::Cas(key(&args[0])?, value(&args[1])?, value(&args[2])?)
        }
        "if" => {
            if args.len() < 2 {
                return err(end, format!("incomplete condition; {}", usage("if")));
            }
            let k = key(&args[0])?;
            let op = String::from_utf8_lossy(&args[1].bytes).to_lowercase();
            let want = |n: usize| count(n, "incomplete condition");
            match (op.as_str(), args[1].bare) {
                ("=" | "==", true) => {
                    want(3)?;
                    Command::If(Condition::ValueEquals(k, value(&args[2])?))
                }
                ("version", true) => {
                    want(3)?;
                    let n = std::str::from_utf8(&args[2].bytes).ok().and_then(|s| s.parse::<u64>().ok());
                    match n {
                        Some(n) => Command::If(Condition::VersionEquals(k, n)),
                        None => return err(args[2].column, "version must be a number (0 means missing)"),
                    }
                }
                ("exists", true) => {
                    want(2)?;
                    Command::If(Condition::Exists(k))
                }
                ("missing", true) => {
                    want(2)?;
                    Command::If(Condition::Missing(k))
                }
                _ => return err(args[1].column, format!("unknown condition; {}", usage("if"))),
            }
        }
        "begin" | "commit" | "abort" | "show" | "status" | "exit" | "quit" => {
            if let Some(extra) = args.first() {
                return err(extra.column, format!("`{name}` takes no arguments"));
            }
            match name.as_str() {
                "begin" => Command::Begin,
                "commit" => Command::Commit,
                "abort" => Command::Abort,
                "show" => Command::Show,
                "status" => Command::Status,
                _ => Command::Exit,
            }
        }
        "placement" => {
            arity(1)?;
            Command::Placement(checked(&args[0], treaty_common::types::check_key)?)
        }
        "outcome" | "trace" => {
            arity(1)?;
            let id = String::from_utf8_lossy(&args[0].bytes);
            let id = id.parse().map_err(|e: String| ParseError { column: args[0].column, message: e })?;
            if name == "trace" {
                Command::Trace(id)
            } else {
                Command::Outcome(id)
            }
        }
        "timing" | "stale" => {
            let on = match args {
                [] => None,
                [t] if t.bytes == b"on" => Some(true),
                [t] if t.bytes == b"off" => Some(false),
                [t] => return err(t.column, format!("usage: {name} [on|off]")),
                [_, extra, ..] => return err(extra.column, format!("usage: {name} [on|off]")),
            };
            if name == "timing" {
                Command::Timing(on)
            } else {
                Command::Stale(on)
            }
        }
        "help" => {
            if args.len() > 1 {
                return err(args[1].column, "usage: help [COMMAND]");
            }
            Command::Help(args.first().map(|t| String::from_utf8_lossy(&t.bytes).to_string()))
        }
        _ => {
            return err(
                first.column,
                format!("unknown command `{name}`; commands: get scan range put del cas if begin commit abort show status outcome timing stale help exit"),
            )
        }
    };
    Ok(Some(cmd))
}

/// Help text for one command, or for all.
pub fn help(topic: Option<&str>) -> String {
    match topic {
        None => {
            let mut s = String::from("commands (type `help COMMAND` for an example):\n");
            for (_, usage, _) in COMMANDS {
                s.push_str(&format!("  {usage}\n"));
            }
            s.push_str(
                "values: bare words, \"quoted with \\n \\t \\xNN escapes\", or hex x'00ff'\n\
                 begin ... commit runs everything between as one transaction; gets inside it\n\
                 record the version they saw and commit fails if any of those keys changed.",
            );
            s
        }
        Some(t) => match COMMANDS.iter().find(|(n, _, _)| *n == t) {
            Some((_, usage, example)) => format!("{usage}\n  example: {example}"),
            None => format!("no command `{t}`; type `help` for the list"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Command {
        parse_line(s).unwrap().unwrap()
    }

    fn e(s: &str) -> ParseError {
        parse_line(s).unwrap_err()
    }

    #[test]
    fn commands_and_values() {
        assert_eq!(p("put k v"), Command::Put(b"k".to_vec(), b"v".to_vec()));
        assert_eq!(p(r#"put "a key" "line\nnext\x00""#), Command::Put(b"a key".to_vec(), b"line\nnext\0".to_vec()));
        assert_eq!(p("put k x'00ff'  # binary"), Command::Put(b"k".to_vec(), vec![0, 255]));
        assert_eq!(p(r#"put k """#), Command::Put(b"k".to_vec(), vec![]));
        assert_eq!(p("put k héllo"), Command::Put(b"k".to_vec(), "héllo".as_bytes().to_vec()));
        assert_eq!(p("if a = 1"), Command::If(Condition::ValueEquals(b"a".to_vec(), b"1".to_vec())));
        assert_eq!(p("if a version 7"), Command::If(Condition::VersionEquals(b"a".to_vec(), 7)));
        assert_eq!(p("IF a missing"), Command::If(Condition::Missing(b"a".to_vec())));
        assert_eq!(p("cas c 1 2"), Command::Cas(b"c".to_vec(), b"1".to_vec(), b"2".to_vec()));
        assert_eq!(p("get k"), Command::Get(b"k".to_vec(), false));
        assert_eq!(p("get k --stale"), Command::Get(b"k".to_vec(), true));
        // A quoted "--stale" is a second argument, not the flag.
        assert!(e(r#"get k "--stale""#).message.contains("too many arguments; usage: get KEY [--stale]"));
        let scan = |start: &[u8], end: Option<&[u8]>| RangeCmd {
            prefix: true,
            start: start.to_vec(),
            end: end.map(<[u8]>::to_vec),
            from: None,
            limit: None,
            keys_only: false,
            stale: false,
        };
        assert_eq!(p("scan user/"), Command::Range(scan(b"user/", Some(b"user0"))));
        assert_eq!(p(r#"scan """#), Command::Range(scan(b"", None)));
        assert_eq!(
            p("range a m --limit 5 --stale --keys-only"),
            Command::Range(RangeCmd {
                end: Some(b"m".to_vec()),
                limit: Some(5),
                keys_only: true,
                stale: true,
                prefix: false,
                ..scan(b"a", None)
            })
        );
        assert_eq!(p("range a"), Command::Range(RangeCmd { prefix: false, ..scan(b"a", None) }));
        assert!(e("range m a").message.contains("END sorts before START: swap them"));
        assert!(e("scan").message.contains("missing PREFIX"));
        assert!(e("scan a b").message.contains("too many arguments; usage: scan PREFIX"));
        assert!(e("scan a --limit").message.contains("--limit needs a number"));
        assert!(e("scan a --limit 0").message.contains("--limit needs a number"));
        assert!(e("scan a --all").message.contains("unknown option --all"));
        assert_eq!(
            RangeCmd { limit: Some(3), ..scan(b"u/", Some(b"u0")) }.continue_at(b"u/7"),
            "scan u/ --from u/7 --limit 3"
        );
        assert_eq!(
            RangeCmd { prefix: false, stale: true, ..scan(b"a", Some(b"m")) }.continue_at(b"c d"),
            r#"range "c d" m --stale"#
        );
        let from = p("scan u/ --from u/5 --keys-only");
        assert_eq!(
            from,
            Command::Range(RangeCmd { from: Some(b"u/5".to_vec()), keys_only: true, ..scan(b"u/", Some(b"u0")) })
        );
        let Command::Range(r) = from else { unreachable!() };
        assert_eq!(r.request(10).start, b"u/5");
        let Command::Range(r) = p("scan u/ --from v") else { unreachable!() };
        assert!(r.request(10).check().is_ok(), "past the prefix: empty, not an error");
        assert!(e("range a --from b").message.contains("unknown option --from"));
        assert_eq!(p("\\q"), Command::Exit);
        assert_eq!(p("\\?"), Command::Help(None));
        assert_eq!(p("\\? scan"), Command::Help(Some("scan".into())));
        assert_eq!(p("\\timing"), Command::Timing(None));
        assert_eq!(p("\\timing off"), Command::Timing(Some(false)));
        assert!(e("\\timing a b").message.contains("usage: timing [on|off]"));
        assert_eq!(p("stale on"), Command::Stale(Some(true)));
        assert_eq!(p("STALE"), Command::Stale(None));
        assert!(e("stale maybe").message.contains("usage: stale [on|off]"));
        assert_eq!(parse_line("   # only a comment").unwrap(), None);
        assert_eq!(parse_line("").unwrap(), None);
    }

    #[test]
    fn outcome_takes_a_transaction_id() {
        let id = "3f2a9c0d5e6b7a8190a1b2c3d4e5f607";
        assert_eq!(p(&format!("outcome {id}")), Command::Outcome(id.parse().unwrap()));
        let bad = e("outcome 12ab");
        assert_eq!(bad.column, 9);
        assert!(bad.message.contains("is not a transaction id"), "{}", bad.message);
        assert!(e("outcome").message.contains("usage: outcome TXN_ID"));
    }

    #[test]
    fn errors_name_the_column_and_what_to_do() {
        assert_eq!(
            e(r#"put k "open"#),
            ParseError { column: 7, message: "unterminated quoted string: add the closing \"".into() }
        );
        assert_eq!(e("frob k").column, 1);
        assert!(e("frob k").message.contains("unknown command `frob`"));
        assert_eq!(e("put k x'0g'").column, 9);
        assert!(e("put k x'0'").message.contains("even number"));
        assert!(e("put k").message.contains("missing argument; usage: put KEY VALUE"));
        assert_eq!(e("get a b").column, 7);
        assert!(e("if a version x").message.contains("number"));
        assert!(e(r#"put k "a\q""#).message.contains("unknown escape"));
        let long = format!("put k x'{}'", "00".repeat(1024 * 1024 + 1));
        assert!(e(&long).message.contains("1 MiB"));
        let long_key = format!("get {}", "k".repeat(1025));
        assert!(e(&long_key).message.contains("1 KiB"));
    }
}

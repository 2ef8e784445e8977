//! The command language shared by the REPL and the batch runner: one grammar,
//! one parser.
//!
//! ```text
//! line      := command? comment?
//! comment   := '#' anything
//! command   := 'get' KEY | 'put' KEY VALUE | 'del' KEY | 'cas' KEY VALUE VALUE
//!            | 'if' KEY ('=' VALUE | 'version' N | 'exists' | 'missing')
//!            | 'begin' | 'commit' | 'abort' | 'show'
//!            | 'status' | 'outcome' TXN_ID | 'timing' ('on'|'off') | 'help' WORD? | 'exit' | 'quit'
//! KEY/VALUE := bare | quoted | hex
//! bare      := any characters but whitespace, '"' and '#'
//! quoted    := '"' (char | '\n' | '\t' | '\r' | '\0' | '\\' | '\"' | '\xNN')* '"'
//! hex       := x'HEXDIGITS'          (binary values, e.g. x'00ff')
//! ```
//!
//! Keys and values are checked against the store's limits while parsing, so a
//! batch file with an oversized value is rejected before anything runs.

use std::fmt;

use treaty_common::types::{check_key, check_value};
use treaty_common::{Condition, TxnId};

/// One parsed command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// A read; `true` for a stale (local, possibly old) read.
    Get(Vec<u8>, bool),
    Put(Vec<u8>, Vec<u8>),
    Del(Vec<u8>),
    Cas(Vec<u8>, Vec<u8>, Vec<u8>),
    If(Condition),
    Begin,
    Commit,
    Abort,
    Show,
    Status,
    /// What became of a transaction (shell only).
    Outcome(TxnId),
    Timing(bool),
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
            Command::If(_) => "if",
            Command::Begin => "begin",
            Command::Commit => "commit",
            Command::Abort => "abort",
            Command::Show => "show",
            Command::Status => "status",
            Command::Outcome(_) => "outcome",
            Command::Timing(_) => "timing",
            Command::Help(_) => "help",
            Command::Exit => "exit",
        }
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
    ("if", "if KEY = VALUE | if KEY version N | if KEY exists | if KEY missing", "if balance/alice = 100"),
    ("begin", "begin", "begin"),
    ("commit", "commit", "commit"),
    ("abort", "abort", "abort"),
    ("show", "show", "show"),
    ("status", "status", "status"),
    ("outcome", "outcome TXN_ID", "outcome 3f2a9c0d5e6b7a8190a1b2c3d4e5f607"),
    ("timing", "timing on|off", "timing on"),
    ("help", "help [COMMAND]", "help if"),
    ("exit", "exit", "exit"),
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

/// Parses one line. `Ok(None)` for a blank or comment-only line.
pub fn parse_line(line: &str) -> Result<Option<Command>, ParseError> {
    let toks = tokenize(line)?;
    let Some(first) = toks.first() else { return Ok(None) };
    if !first.bare {
        return err(first.column, "expected a command (get, put, del, cas, if, begin, commit, ...)");
    }
    let name = String::from_utf8_lossy(&first.bytes).to_lowercase();
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
        "outcome" => {
            arity(1)?;
            let id = String::from_utf8_lossy(&args[0].bytes);
            Command::Outcome(id.parse().map_err(|e: String| ParseError { column: args[0].column, message: e })?)
        }
        "timing" => {
            arity(1)?;
            match args[0].bytes.as_slice() {
                b"on" => Command::Timing(true),
                b"off" => Command::Timing(false),
                _ => return err(args[0].column, "usage: timing on|off"),
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
                format!("unknown command `{name}`; commands: get put del cas if begin commit abort show status outcome timing help exit"),
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

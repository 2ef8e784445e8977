//! Redis commands as the door understands them: parsed from a request's
//! arguments, checked for arity and options, before anything runs (so a
//! bad command inside MULTI is refused when it is queued, as in Redis).

use crate::reply::Reply;

pub type Key = Vec<u8>;

/// A command that reads or writes keys: these run through the batch
/// engine ([`crate::engine`]), alone, in a pipelined run, or in EXEC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataCmd {
    Get(Key),
    /// SET with its options: only if missing (NX) or present (XX), and
    /// whether to answer with the old value (GET).
    Set {
        key: Key,
        value: Vec<u8>,
        when: When,
        get: bool,
    },
    /// SETNX: SET NX answering 1 or 0.
    SetNx(Key, Vec<u8>),
    GetSet(Key, Vec<u8>),
    GetDel(Key),
    Del(Vec<Key>),
    Exists(Vec<Key>),
    MGet(Vec<Key>),
    MSet(Vec<(Key, Vec<u8>)>),
    MSetNx(Vec<(Key, Vec<u8>)>),
    IncrBy(Key, i64),
    Append(Key, Vec<u8>),
    StrLen(Key),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum When {
    Always,
    Missing,
    Exists,
}

impl DataCmd {
    /// The keys whose current value the command needs (before it writes).
    pub fn reads(&self) -> Vec<&Key> {
        match self {
            DataCmd::Set { when: When::Always, get: false, .. } | DataCmd::MSet(_) => vec![],
            DataCmd::Get(k)
            | DataCmd::Set { key: k, .. }
            | DataCmd::SetNx(k, _)
            | DataCmd::GetSet(k, _)
            | DataCmd::GetDel(k)
            | DataCmd::IncrBy(k, _)
            | DataCmd::Append(k, _)
            | DataCmd::StrLen(k) => vec![k],
            DataCmd::Del(ks) | DataCmd::Exists(ks) | DataCmd::MGet(ks) => ks.iter().collect(),
            DataCmd::MSetNx(kvs) => kvs.iter().map(|(k, _)| k).collect(),
        }
    }

    /// The keys the command may write.
    pub fn writes(&self) -> Vec<&Key> {
        match self {
            DataCmd::Get(_) | DataCmd::Exists(_) | DataCmd::MGet(_) | DataCmd::StrLen(_) => vec![],
            DataCmd::Set { key: k, .. }
            | DataCmd::SetNx(k, _)
            | DataCmd::GetSet(k, _)
            | DataCmd::GetDel(k)
            | DataCmd::IncrBy(k, _)
            | DataCmd::Append(k, _) => vec![k],
            DataCmd::Del(ks) => ks.iter().collect(),
            DataCmd::MSet(kvs) | DataCmd::MSetNx(kvs) => kvs.iter().map(|(k, _)| k).collect(),
        }
    }

    /// Bytes the command carries (keys and values), to bound a batch.
    pub fn size(&self) -> usize {
        let keys: usize = self.reads().iter().chain(self.writes().iter()).map(|k| k.len()).sum();
        let values = match self {
            DataCmd::Set { value, .. }
            | DataCmd::SetNx(_, value)
            | DataCmd::GetSet(_, value)
            | DataCmd::Append(_, value) => value.len(),
            DataCmd::MSet(kvs) | DataCmd::MSetNx(kvs) => kvs.iter().map(|(_, v)| v.len()).sum(),
            _ => 0,
        };
        keys + values
    }
}

/// Any command of the door.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Data(DataCmd),
    Ping(Option<Vec<u8>>),
    Echo(Vec<u8>),
    Select(i64),
    Quit,
    Hello {
        proto: Option<i64>,
        auth: bool,
        setname: Option<Vec<u8>>,
    },
    Auth,
    ClientSetName(Vec<u8>),
    ClientGetName,
    ClientId,
    /// CLIENT SETINFO (client libraries announce themselves): accepted.
    ClientSetInfo,
    /// COMMAND, COMMAND COUNT, COMMAND DOCS, COMMAND INFO ...
    Command(Vec<Vec<u8>>),
    Info,
    DbSize,
    ConfigGet(Vec<u8>),
    ReadOnly,
    ReadWrite,
    Watch(Vec<Key>),
    Unwatch,
    Multi,
    Exec,
    Discard,
    Scan {
        cursor: u64,
        pattern: Option<Vec<u8>>,
        count: u32,
        strings: bool,
    },
    Keys(Vec<u8>),
}

/// Why a request is not a command the door can run; each becomes Redis's
/// own error text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParseError {
    Unknown(String, Vec<Vec<u8>>),
    Arity(String),
    Syntax,
    NotInteger,
    Unsupported(String),
}

impl ParseError {
    pub fn reply(&self) -> Reply {
        Reply::Error(match self {
            ParseError::Unknown(name, args) => {
                let shown: Vec<String> =
                    args.iter().take(8).map(|a| format!("'{}'", String::from_utf8_lossy(a))).collect();
                format!("ERR unknown command '{name}', with args beginning with: {}", shown.join(" "))
            }
            ParseError::Arity(name) => format!("ERR wrong number of arguments for '{name}' command"),
            ParseError::Syntax => "ERR syntax error".into(),
            ParseError::NotInteger => "ERR value is not an integer or out of range".into(),
            ParseError::Unsupported(why) => format!("ERR {why}"),
        })
    }
}

fn int(arg: &[u8]) -> Result<i64, ParseError> {
    std::str::from_utf8(arg).ok().and_then(|s| s.parse().ok()).ok_or(ParseError::NotInteger)
}

fn upper(arg: &[u8]) -> String {
    String::from_utf8_lossy(arg).to_ascii_uppercase()
}

fn pairs(name: &str, args: &[Vec<u8>]) -> Result<Vec<(Key, Vec<u8>)>, ParseError> {
    if args.is_empty() || !args.len().is_multiple_of(2) {
        return Err(ParseError::Arity(name.into()));
    }
    Ok(args.chunks(2).map(|c| (c[0].clone(), c[1].clone())).collect())
}

/// Parses one request (the command name and its arguments).
pub fn parse(request: Vec<Vec<u8>>) -> Result<Command, ParseError> {
    let mut it = request.into_iter();
    let Some(name_raw) = it.next() else {
        return Err(ParseError::Unknown(String::new(), vec![]));
    };
    let args: Vec<Vec<u8>> = it.collect();
    let name = String::from_utf8_lossy(&name_raw).to_ascii_lowercase();
    let n = args.len();
    let arity = |ok: bool| if ok { Ok(()) } else { Err(ParseError::Arity(name.clone())) };
    let data = |d: DataCmd| Ok(Command::Data(d));
    match name.as_str() {
        "get" => {
            arity(n == 1)?;
            data(DataCmd::Get(args[0].clone()))
        }
        "set" => {
            arity(n >= 2)?;
            let (mut when, mut get) = (When::Always, false);
            for opt in &args[2..] {
                match upper(opt).as_str() {
                    "NX" if when == When::Always => when = When::Missing,
                    "XX" if when == When::Always => when = When::Exists,
                    "GET" => get = true,
                    "EX" | "PX" | "EXAT" | "PXAT" | "KEEPTTL" => {
                        return Err(ParseError::Unsupported(
                            "Treaty keys do not expire: SET's EX, PX, EXAT, PXAT and KEEPTTL are not supported".into(),
                        ))
                    }
                    _ => return Err(ParseError::Syntax),
                }
            }
            data(DataCmd::Set { key: args[0].clone(), value: args[1].clone(), when, get })
        }
        "setnx" => {
            arity(n == 2)?;
            data(DataCmd::SetNx(args[0].clone(), args[1].clone()))
        }
        "getset" => {
            arity(n == 2)?;
            data(DataCmd::GetSet(args[0].clone(), args[1].clone()))
        }
        "getdel" => {
            arity(n == 1)?;
            data(DataCmd::GetDel(args[0].clone()))
        }
        "del" | "unlink" => {
            arity(n >= 1)?;
            data(DataCmd::Del(args))
        }
        "exists" => {
            arity(n >= 1)?;
            data(DataCmd::Exists(args))
        }
        "mget" => {
            arity(n >= 1)?;
            data(DataCmd::MGet(args))
        }
        "mset" => data(DataCmd::MSet(pairs(&name, &args)?)),
        "msetnx" => data(DataCmd::MSetNx(pairs(&name, &args)?)),
        "incr" | "decr" => {
            arity(n == 1)?;
            data(DataCmd::IncrBy(args[0].clone(), if name == "incr" { 1 } else { -1 }))
        }
        "incrby" | "decrby" => {
            arity(n == 2)?;
            let by = int(&args[1])?;
            let by = if name == "incrby" { by } else { by.checked_neg().ok_or(ParseError::NotInteger)? };
            data(DataCmd::IncrBy(args[0].clone(), by))
        }
        "append" => {
            arity(n == 2)?;
            data(DataCmd::Append(args[0].clone(), args[1].clone()))
        }
        "strlen" => {
            arity(n == 1)?;
            data(DataCmd::StrLen(args[0].clone()))
        }
        "ping" => {
            arity(n <= 1)?;
            Ok(Command::Ping(args.into_iter().next()))
        }
        "echo" => {
            arity(n == 1)?;
            Ok(Command::Echo(args[0].clone()))
        }
        "select" => {
            arity(n == 1)?;
            Ok(Command::Select(int(&args[0])?))
        }
        "quit" => Ok(Command::Quit),
        "hello" => {
            let mut proto = None;
            let mut rest = args.as_slice();
            if let Some(first) = rest.first() {
                proto = Some(int(first).map_err(|_| {
                    ParseError::Unsupported("Protocol version is not an integer or out of range".into())
                })?);
                rest = &rest[1..];
            }
            let (mut auth, mut setname) = (false, None);
            while let Some(opt) = rest.first() {
                match upper(opt).as_str() {
                    "AUTH" if rest.len() >= 3 => {
                        auth = true;
                        rest = &rest[3..];
                    }
                    "SETNAME" if rest.len() >= 2 => {
                        setname = Some(rest[1].clone());
                        rest = &rest[2..];
                    }
                    _ => return Err(ParseError::Syntax),
                }
            }
            Ok(Command::Hello { proto, auth, setname })
        }
        "auth" => {
            arity(n == 1 || n == 2)?;
            Ok(Command::Auth)
        }
        "client" => {
            arity(n >= 1)?;
            match (upper(&args[0]).as_str(), n) {
                ("SETNAME", 2) => Ok(Command::ClientSetName(args[1].clone())),
                ("GETNAME", 1) => Ok(Command::ClientGetName),
                ("ID", 1) => Ok(Command::ClientId),
                ("SETINFO", 3) => Ok(Command::ClientSetInfo),
                ("SETNAME" | "GETNAME" | "ID" | "SETINFO", _) => {
                    Err(ParseError::Arity(format!("client|{}", String::from_utf8_lossy(&args[0]).to_lowercase())))
                }
                _ => Err(ParseError::Unsupported(format!(
                    "unknown subcommand '{}'. Try CLIENT SETNAME, GETNAME, ID or SETINFO.",
                    String::from_utf8_lossy(&args[0])
                ))),
            }
        }
        "command" => Ok(Command::Command(args)),
        "info" => Ok(Command::Info),
        "dbsize" => {
            arity(n == 0)?;
            Ok(Command::DbSize)
        }
        "config" => match (args.first().map(|a| upper(a)).as_deref(), n) {
            (Some("GET"), 2) => Ok(Command::ConfigGet(args[1].clone())),
            _ => Err(ParseError::Unsupported(
                "CONFIG: only CONFIG GET is answered here (with nothing: Treaty is configured by its flags)".into(),
            )),
        },
        "readonly" => Ok(Command::ReadOnly),
        "readwrite" => Ok(Command::ReadWrite),
        "watch" => {
            arity(n >= 1)?;
            Ok(Command::Watch(args))
        }
        "unwatch" => Ok(Command::Unwatch),
        "multi" => Ok(Command::Multi),
        "exec" => Ok(Command::Exec),
        "discard" => Ok(Command::Discard),
        "scan" => {
            arity(n >= 1)?;
            let cursor = std::str::from_utf8(&args[0])
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or(ParseError::Unsupported("invalid cursor".into()))?;
            let (mut pattern, mut count, mut strings) = (None, 10u32, true);
            let mut rest = &args[1..];
            while rest.len() >= 2 {
                match upper(&rest[0]).as_str() {
                    "MATCH" => pattern = Some(rest[1].clone()),
                    "COUNT" => {
                        let c = int(&rest[1])?;
                        if c < 1 {
                            return Err(ParseError::Syntax);
                        }
                        count = c.min(i64::from(treaty_client::MAX_RANGE_LIMIT)) as u32;
                    }
                    // Every Treaty value is a string.
                    "TYPE" => strings = upper(&rest[1]) == "STRING",
                    _ => return Err(ParseError::Syntax),
                }
                rest = &rest[2..];
            }
            if !rest.is_empty() {
                return Err(ParseError::Syntax);
            }
            Ok(Command::Scan { cursor, pattern, count, strings })
        }
        "keys" => {
            arity(n == 1)?;
            Ok(Command::Keys(args[0].clone()))
        }
        _ => Err(ParseError::Unknown(String::from_utf8_lossy(&name_raw).into_owned(), args)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(words: &[&str]) -> Result<Command, ParseError> {
        parse(words.iter().map(|w| w.as_bytes().to_vec()).collect())
    }

    #[test]
    fn commands_parse_with_their_options() {
        assert_eq!(
            p(&["SET", "k", "v", "nx", "GET"]),
            Ok(Command::Data(DataCmd::Set {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                when: When::Missing,
                get: true
            }))
        );
        assert_eq!(p(&["decrby", "c", "5"]), Ok(Command::Data(DataCmd::IncrBy(b"c".to_vec(), -5))));
        assert_eq!(
            p(&["scan", "0", "MATCH", "user:*", "COUNT", "100"]),
            Ok(Command::Scan { cursor: 0, pattern: Some(b"user:*".to_vec()), count: 100, strings: true })
        );
        assert_eq!(
            p(&["mset", "a", "1", "b", "2"]),
            Ok(Command::Data(DataCmd::MSet(vec![(b"a".to_vec(), b"1".to_vec()), (b"b".to_vec(), b"2".to_vec())])))
        );
    }

    #[test]
    fn bad_commands_get_redis_errors() {
        let text = |r: Result<Command, ParseError>| match r.unwrap_err().reply() {
            Reply::Error(e) => e,
            other => panic!("{other:?}"),
        };
        assert_eq!(text(p(&["get"])), "ERR wrong number of arguments for 'get' command");
        assert_eq!(text(p(&["set", "k", "v", "NX", "XX"])), "ERR syntax error");
        assert_eq!(text(p(&["incrby", "k", "x"])), "ERR value is not an integer or out of range");
        assert_eq!(text(p(&["mset", "a"])), "ERR wrong number of arguments for 'mset' command");
        assert!(text(p(&["set", "k", "v", "EX", "10"])).contains("do not expire"));
        assert_eq!(
            text(p(&["FLUSHALL", "ASYNC"])),
            "ERR unknown command 'FLUSHALL', with args beginning with: 'ASYNC'"
        );
        assert_eq!(text(p(&["decrby", "k", &i64::MIN.to_string()])), "ERR value is not an integer or out of range");
    }

    #[test]
    fn reads_and_writes_name_the_keys_a_command_touches() {
        let Command::Data(set) = p(&["set", "k", "v"]).unwrap() else { panic!() };
        assert!(set.reads().is_empty(), "a plain SET writes blind");
        assert_eq!(set.writes(), [&b"k".to_vec()]);
        let Command::Data(nx) = p(&["set", "k", "v", "nx"]).unwrap() else { panic!() };
        assert_eq!(nx.reads(), [&b"k".to_vec()]);
        let Command::Data(del) = p(&["del", "a", "b"]).unwrap() else { panic!() };
        assert_eq!(del.reads().len(), 2);
        assert_eq!(del.writes().len(), 2);
    }
}

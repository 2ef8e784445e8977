//! Answers, and how they are written in RESP2 or RESP3 (through the
//! `redis-protocol` crate's frames and encoders).

use redis_protocol::resp2::types::{OwnedFrame as Frame2, Resp2Frame};
use redis_protocol::resp3::types::{OwnedFrame as Frame3, Resp3Frame};

use treaty_client::Error;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Ok,
    Simple(String),
    /// The whole error line after `-`, prefix included (`ERR ...`).
    Error(String),
    Int(i64),
    Bulk(Vec<u8>),
    /// A missing value (`$-1` in RESP2, `_` in RESP3).
    Nil,
    Array(Vec<Reply>),
    /// A map in RESP3, a flat array of keys and values in RESP2.
    Map(Vec<(Reply, Reply)>),
}

impl Reply {
    pub fn bulk(s: impl AsRef<[u8]>) -> Reply {
        Reply::Bulk(s.as_ref().to_vec())
    }

    pub fn err(s: impl Into<String>) -> Reply {
        Reply::Error(s.into())
    }

    pub fn is_error(&self) -> bool {
        matches!(self, Reply::Error(_))
    }

    /// Treaty's errors under the prefixes Redis clients act on: `TRYAGAIN`
    /// for what is worth retrying as is, `CLUSTERDOWN` while the cluster (or
    /// a node it needs) is unavailable, `NOPERM` for permissions, `ERR`
    /// otherwise, each with Treaty's own message after it.
    pub fn from_error(e: &Error) -> Reply {
        let one_line = |m: &str| m.replace(['\r', '\n'], " ");
        Reply::Error(match e {
            Error::Conflict(_) | Error::NotReady(_) | Error::NotCommitted(_) => {
                format!("TRYAGAIN {}", one_line(&e.to_string()))
            }
            Error::Unavailable(_) | Error::Fenced(_) => format!("CLUSTERDOWN {}", one_line(&e.to_string())),
            Error::Denied(_) => format!("NOPERM {}", one_line(&e.to_string())),
            _ => format!("ERR {}", one_line(&e.to_string())),
        })
    }

    fn resp2(self) -> Frame2 {
        match self {
            Reply::Ok => Frame2::SimpleString(b"OK".to_vec()),
            Reply::Simple(s) => Frame2::SimpleString(s.into_bytes()),
            Reply::Error(s) => Frame2::Error(s),
            Reply::Int(i) => Frame2::Integer(i),
            Reply::Bulk(b) => Frame2::BulkString(b),
            Reply::Nil => Frame2::Null,
            Reply::Array(items) => Frame2::Array(items.into_iter().map(Reply::resp2).collect()),
            Reply::Map(pairs) => Frame2::Array(pairs.into_iter().flat_map(|(k, v)| [k.resp2(), v.resp2()]).collect()),
        }
    }

    fn resp3(self) -> Frame3 {
        match self {
            Reply::Ok => Frame3::SimpleString { data: b"OK".to_vec(), attributes: None },
            Reply::Simple(s) => Frame3::SimpleString { data: s.into_bytes(), attributes: None },
            Reply::Error(s) => Frame3::SimpleError { data: s, attributes: None },
            Reply::Int(i) => Frame3::Number { data: i, attributes: None },
            Reply::Bulk(b) => Frame3::BlobString { data: b, attributes: None },
            Reply::Nil => Frame3::Null,
            Reply::Array(items) => {
                Frame3::Array { data: items.into_iter().map(Reply::resp3).collect(), attributes: None }
            }
            Reply::Map(pairs) => {
                Frame3::Map { data: pairs.into_iter().map(|(k, v)| (k.resp3(), v.resp3())).collect(), attributes: None }
            }
        }
    }

    /// Appends this reply, encoded for protocol version `proto` (2 or 3).
    pub fn encode_into(self, proto: u8, out: &mut Vec<u8>) {
        let at = out.len();
        if proto >= 3 {
            let frame = self.resp3();
            out.resize(at + frame.encode_len(false), 0);
            redis_protocol::resp3::encode::complete::encode(&mut out[at..], &frame, false)
                .expect("buffer sized by encode_len");
        } else {
            let frame = self.resp2();
            out.resize(at + frame.encode_len(false), 0);
            redis_protocol::resp2::encode::encode(&mut out[at..], &frame, false).expect("buffer sized by encode_len");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(r: Reply, proto: u8) -> String {
        let mut out = Vec::new();
        r.encode_into(proto, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn replies_encode_as_redis_writes_them() {
        assert_eq!(wire(Reply::Ok, 2), "+OK\r\n");
        assert_eq!(wire(Reply::bulk("hi"), 2), "$2\r\nhi\r\n");
        assert_eq!(wire(Reply::Nil, 2), "$-1\r\n");
        assert_eq!(wire(Reply::Nil, 3), "_\r\n");
        assert_eq!(wire(Reply::Int(-3), 3), ":-3\r\n");
        assert_eq!(wire(Reply::err("ERR nope"), 2), "-ERR nope\r\n");
        assert_eq!(wire(Reply::Array(vec![Reply::Int(1), Reply::Nil]), 2), "*2\r\n:1\r\n$-1\r\n");
        assert_eq!(wire(Reply::Map(vec![(Reply::bulk("a"), Reply::Int(1))]), 2), "*2\r\n$1\r\na\r\n:1\r\n");
        assert_eq!(wire(Reply::Map(vec![(Reply::bulk("a"), Reply::Int(1))]), 3), "%1\r\n$1\r\na\r\n:1\r\n");
    }

    #[test]
    fn treaty_errors_carry_the_prefixes_clients_retry_on() {
        let text = |e: Error| match Reply::from_error(&e) {
            Reply::Error(t) => t,
            _ => unreachable!(),
        };
        assert!(text(Error::Conflict("busy".into())).starts_with("TRYAGAIN conflict: busy"));
        assert!(text(Error::Unavailable("p3 down\nretry".into())).starts_with("CLUSTERDOWN unavailable: p3 down retry"));
        assert!(text(Error::Invalid("key too long".into())).starts_with("ERR invalid: key too long"));
        assert!(text(Error::InDoubt("?".into())).starts_with("ERR in doubt"), "not TRYAGAIN: it may have committed");
    }
}

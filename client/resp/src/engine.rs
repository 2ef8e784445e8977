//! How a run of data commands becomes one Treaty transaction.
//!
//! A single command, a pipelined run of commands, and the commands queued
//! between MULTI and EXEC all go the same way:
//!
//! 1. **Read** every key some command needs before the run itself writes
//!    it ([`keys_to_read`]), each with a linearizable read that also gives
//!    its version (0: missing).
//! 2. **Evaluate** the commands in order against those values, with the
//!    run's own writes laid over them ([`evaluate`], pure): each command's
//!    reply, and the final value of every key the run wrote.
//! 3. **Commit** those writes as one transaction whose conditions are the
//!    versions read in step 1. If a key changed in between, the condition
//!    fails, nothing is written, and the run starts again from step 1.
//!
//! So the replies are exactly what the commands would have answered had
//! they run alone and in order at the moment of the commit, and the run's
//! writes land all together or not at all: INCR and friends never lose an
//! update, and EXEC is all-or-nothing on every replica. A run that writes
//! nothing is answered from its reads.

use std::collections::{BTreeMap, BTreeSet};

use treaty_client::{Condition, Versioned, Write};

use crate::command::{DataCmd, Key, When};
use crate::reply::Reply;

/// What a run decided: a reply per command, the writes to commit, and the
/// conditions that make the replies true at the commit.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub replies: Vec<Reply>,
    pub writes: Vec<Write>,
    pub conditions: Vec<Condition>,
}

/// The keys whose stored value the run needs: read by a command before any
/// earlier command of the run wrote them.
pub fn keys_to_read(cmds: &[DataCmd]) -> BTreeSet<Key> {
    let mut written: BTreeSet<&Key> = BTreeSet::new();
    let mut need = BTreeSet::new();
    for c in cmds {
        for k in c.reads() {
            if !written.contains(k) {
                need.insert(k.clone());
            }
        }
        written.extend(c.writes());
    }
    need
}

/// The run's view of the keys: what was read, and what it wrote since.
struct Overlay<'a> {
    stored: &'a BTreeMap<Key, Option<Versioned>>,
    written: BTreeMap<Key, Option<Vec<u8>>>,
}

impl Overlay<'_> {
    fn get(&self, key: &Key) -> Option<&[u8]> {
        match self.written.get(key) {
            Some(v) => v.as_deref(),
            None => self
                .stored
                .get(key)
                .expect("keys_to_read covers every key read before it is written")
                .as_ref()
                .map(|v| v.value.as_slice()),
        }
    }

    fn set(&mut self, key: &Key, value: Option<Vec<u8>>) {
        self.written.insert(key.clone(), value);
    }
}

/// Evaluates the run against `stored` (every key of [`keys_to_read`] with
/// its value and version, `None` if missing).
pub fn evaluate(cmds: &[DataCmd], stored: &BTreeMap<Key, Option<Versioned>>) -> Plan {
    let mut view = Overlay { stored, written: BTreeMap::new() };
    let replies = cmds.iter().map(|c| run(c, &mut view)).collect();
    let writes = view
        .written
        .into_iter()
        .map(|(k, v)| match v {
            Some(v) => Write::Put(k, v),
            None => Write::Delete(k),
        })
        .collect();
    let conditions =
        stored.iter().map(|(k, v)| Condition::VersionEquals(k.clone(), v.as_ref().map_or(0, |v| v.version))).collect();
    Plan { replies, writes, conditions }
}

fn bulk_or_nil(v: Option<&[u8]>) -> Reply {
    v.map_or(Reply::Nil, Reply::bulk)
}

fn run(cmd: &DataCmd, view: &mut Overlay<'_>) -> Reply {
    match cmd {
        DataCmd::Get(k) => bulk_or_nil(view.get(k)),
        DataCmd::Set { key, value, when, get } => {
            let old = if *get || *when != When::Always { view.get(key).map(<[u8]>::to_vec) } else { None };
            let go = match when {
                When::Always => true,
                When::Missing => old.is_none(),
                When::Exists => old.is_some(),
            };
            if go {
                view.set(key, Some(value.clone()));
            }
            match (get, go) {
                (true, _) => bulk_or_nil(old.as_deref()),
                (false, true) => Reply::Ok,
                (false, false) => Reply::Nil,
            }
        }
        DataCmd::SetNx(k, v) => {
            if view.get(k).is_some() {
                Reply::Int(0)
            } else {
                view.set(k, Some(v.clone()));
                Reply::Int(1)
            }
        }
        DataCmd::GetSet(k, v) => {
            let old = bulk_or_nil(view.get(k));
            view.set(k, Some(v.clone()));
            old
        }
        DataCmd::GetDel(k) => {
            let old = bulk_or_nil(view.get(k));
            if old != Reply::Nil {
                view.set(k, None);
            }
            old
        }
        DataCmd::Del(keys) => {
            let mut n = 0;
            for k in keys {
                if view.get(k).is_some() {
                    view.set(k, None);
                    n += 1;
                }
            }
            Reply::Int(n)
        }
        DataCmd::Exists(keys) => Reply::Int(keys.iter().filter(|k| view.get(k).is_some()).count() as i64),
        DataCmd::MGet(keys) => Reply::Array(keys.iter().map(|k| bulk_or_nil(view.get(k))).collect()),
        DataCmd::MSet(kvs) => {
            for (k, v) in kvs {
                view.set(k, Some(v.clone()));
            }
            Reply::Ok
        }
        DataCmd::MSetNx(kvs) => {
            if kvs.iter().any(|(k, _)| view.get(k).is_some()) {
                return Reply::Int(0);
            }
            for (k, v) in kvs {
                view.set(k, Some(v.clone()));
            }
            Reply::Int(1)
        }
        DataCmd::IncrBy(k, by) => {
            let current = match view.get(k) {
                None => Some(0),
                Some(v) => std::str::from_utf8(v).ok().and_then(|s| s.parse::<i64>().ok()),
            };
            match current {
                None => Reply::err("ERR value is not an integer or out of range"),
                Some(n) => match n.checked_add(*by) {
                    None => Reply::err("ERR increment or decrement would overflow"),
                    Some(m) => {
                        view.set(k, Some(m.to_string().into_bytes()));
                        Reply::Int(m)
                    }
                },
            }
        }
        DataCmd::Append(k, v) => {
            let mut value = view.get(k).map(<[u8]>::to_vec).unwrap_or_default();
            value.extend_from_slice(v);
            let len = value.len() as i64;
            view.set(k, Some(value));
            Reply::Int(len)
        }
        DataCmd::StrLen(k) => Reply::Int(view.get(k).map_or(0, |v| v.len() as i64)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{parse, Command};

    fn cmds(lines: &[&str]) -> Vec<DataCmd> {
        lines
            .iter()
            .map(|l| match parse(l.split(' ').map(|w| w.as_bytes().to_vec()).collect()).unwrap() {
                Command::Data(d) => d,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    fn stored(kvs: &[(&str, Option<(&str, u64)>)]) -> BTreeMap<Key, Option<Versioned>> {
        kvs.iter()
            .map(|(k, v)| {
                (k.as_bytes().to_vec(), v.map(|(v, version)| Versioned { value: v.as_bytes().to_vec(), version }))
            })
            .collect()
    }

    #[test]
    fn a_run_reads_only_what_it_has_not_written_itself() {
        let run = cmds(&["set a 1", "get a", "incr b", "get c", "set c 2"]);
        let want: BTreeSet<Key> = [b"b".to_vec(), b"c".to_vec()].into();
        assert_eq!(keys_to_read(&run), want);
    }

    #[test]
    fn commands_see_the_writes_of_the_run_before_them() {
        let run =
            cmds(&["incr n", "incr n", "incrby n 10", "get n", "set s x nx", "set s y nx", "append s z", "del n s m"]);
        let plan = evaluate(&run, &stored(&[("n", Some(("5", 7))), ("s", None), ("m", None)]));
        assert_eq!(
            plan.replies,
            [
                Reply::Int(6),
                Reply::Int(7),
                Reply::Int(17),
                Reply::bulk("17"),
                Reply::Ok,
                Reply::Nil,
                Reply::Int(2),
                Reply::Int(2)
            ]
        );
        // The run's net effect: both deleted.
        assert_eq!(plan.writes, [Write::Delete(b"n".to_vec()), Write::Delete(b"s".to_vec())]);
        assert_eq!(
            plan.conditions,
            [
                Condition::VersionEquals(b"m".to_vec(), 0),
                Condition::VersionEquals(b"n".to_vec(), 7),
                Condition::VersionEquals(b"s".to_vec(), 0)
            ]
        );
    }

    #[test]
    fn failed_options_and_bad_values_answer_without_writing() {
        let run = cmds(&["set k v xx", "incr t", "setnx e 1", "msetnx e 2 f 3", "getset g new"]);
        let plan = evaluate(
            &run,
            &stored(&[("k", None), ("t", Some(("text", 3))), ("e", Some(("0", 4))), ("f", None), ("g", None)]),
        );
        assert_eq!(
            plan.replies,
            [
                Reply::Nil,
                Reply::err("ERR value is not an integer or out of range"),
                Reply::Int(0),
                Reply::Int(0),
                Reply::Nil
            ]
        );
        assert_eq!(plan.writes, [Write::Put(b"g".to_vec(), b"new".to_vec())]);
    }

    #[test]
    fn blind_writes_need_no_reads_and_no_conditions() {
        let run = cmds(&["set a 1", "mset b 2 c 3", "set a 4"]);
        assert!(keys_to_read(&run).is_empty());
        let plan = evaluate(&run, &BTreeMap::new());
        assert_eq!(plan.replies, [Reply::Ok, Reply::Ok, Reply::Ok]);
        assert!(plan.conditions.is_empty());
        assert_eq!(plan.writes.len(), 3, "one write per key, the last value: {:?}", plan.writes);
        assert_eq!(plan.writes[0], Write::Put(b"a".to_vec(), b"4".to_vec()));
    }

    #[test]
    fn increments_refuse_to_overflow() {
        let plan = evaluate(&cmds(&["incr n"]), &stored(&[("n", Some((&i64::MAX.to_string(), 1)))]));
        assert_eq!(plan.replies, [Reply::err("ERR increment or decrement would overflow")]);
        assert!(plan.writes.is_empty());
    }
}

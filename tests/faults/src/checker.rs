//! A linearizability checker (Wing & Gong's search with Lowe's memoization),
//! applied per key group (P-compositionality: operations on different groups
//! never interact, so each group's sub-history is checked alone).
//!
//! Each key group is one object whose state is a map of its keys. Single-key
//! operations and multi-key transactions within the group are operations on
//! that object, so a linearizable group history means the transactions are
//! strictly serializable.
//!
//! An operation whose outcome is unknown (a timeout, a lost connection) may or
//! may not have happened: it can be linearized at any point after its call,
//! or never. A check that exceeds its search budget is *undecided*, which
//! callers must treat as a failure.

use std::collections::{BTreeMap, HashSet};

/// A condition of a transaction.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Cond {
    Equals(String, String),
    Missing(String),
}

/// What a client asked for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Call {
    Get(String),
    Put(String, String),
    Del(String),
    /// Conditions, then writes (`None` deletes).
    Txn(Vec<Cond>, Vec<(String, Option<String>)>),
}

/// What came back.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Ret {
    /// A read's value (`None`: missing).
    Value(Option<String>),
    /// A write or transaction committed.
    Committed,
    /// A transaction aborted because a condition did not hold.
    Aborted,
    /// Unknown: it may or may not have taken effect.
    Unknown,
}

/// One completed (or abandoned) operation.
#[derive(Clone, Debug)]
pub struct Op {
    pub client: usize,
    pub call: Call,
    pub ret: Ret,
    /// Monotonic nanoseconds.
    pub invoked: u64,
    /// `u64::MAX` for unknown outcomes.
    pub returned: u64,
}

type State = BTreeMap<String, String>;

fn holds(state: &State, c: &Cond) -> bool {
    match c {
        Cond::Equals(k, v) => state.get(k) == Some(v),
        Cond::Missing(k) => !state.contains_key(k),
    }
}

fn apply_writes(state: &State, writes: &[(String, Option<String>)]) -> State {
    let mut s = state.clone();
    for (k, v) in writes {
        match v {
            Some(v) => {
                s.insert(k.clone(), v.clone());
            }
            None => {
                s.remove(k);
            }
        }
    }
    s
}

/// The states an operation may leave, if it can be linearized in `state`.
fn step(state: &State, op: &Op) -> Vec<State> {
    match (&op.call, &op.ret) {
        (Call::Get(k), Ret::Value(v)) => {
            if state.get(k) == v.as_ref() {
                vec![state.clone()]
            } else {
                vec![]
            }
        }
        (Call::Get(_), _) => vec![state.clone()],
        (Call::Put(k, v), Ret::Committed) => vec![apply_writes(state, &[(k.clone(), Some(v.clone()))])],
        (Call::Del(k), Ret::Committed) => vec![apply_writes(state, &[(k.clone(), None)])],
        (Call::Put(k, v), Ret::Unknown) => {
            vec![apply_writes(state, &[(k.clone(), Some(v.clone()))]), state.clone()]
        }
        (Call::Del(k), Ret::Unknown) => vec![apply_writes(state, &[(k.clone(), None)]), state.clone()],
        (Call::Txn(conds, writes), Ret::Committed) => {
            if conds.iter().all(|c| holds(state, c)) {
                vec![apply_writes(state, writes)]
            } else {
                vec![]
            }
        }
        (Call::Txn(conds, _), Ret::Aborted) => {
            if conds.iter().all(|c| holds(state, c)) {
                vec![]
            } else {
                vec![state.clone()]
            }
        }
        (Call::Txn(conds, writes), Ret::Unknown) => {
            if conds.iter().all(|c| holds(state, c)) {
                vec![apply_writes(state, writes), state.clone()]
            } else {
                vec![state.clone()]
            }
        }
        _ => vec![],
    }
}

/// The result of a check.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// No order explains the history; the operations that could not be
    /// placed are described.
    NotLinearizable(String),
    /// The search budget ran out.
    Undecided,
}

/// Checks one object's history. `budget` bounds the number of explored
/// search states.
pub fn check(ops: &[Op], budget: usize) -> Verdict {
    let n = ops.len();
    let words = n.div_ceil(64).max(1);
    // Ops sorted by invocation; a candidate must be invoked before every
    // unlinearized op has returned.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| ops[i].invoked);
    let mut seen: HashSet<(Vec<u64>, State)> = HashSet::new();
    let mut explored = 0usize;
    let mut deepest = 0usize;
    let mut deepest_state = State::new();
    // Iterative DFS: (linearized bitset, state, count).
    let mut stack: Vec<(Vec<u64>, State, usize)> = vec![(vec![0; words], State::new(), 0)];
    while let Some((done, state, count)) = stack.pop() {
        if count == n {
            return Verdict::Linearizable;
        }
        if count > deepest {
            deepest = count;
            deepest_state = state.clone();
        }
        explored += 1;
        if explored > budget {
            return Verdict::Undecided;
        }
        let is_done = |i: usize| done[i / 64] >> (i % 64) & 1 == 1;
        let min_return = order.iter().filter(|&&i| !is_done(i)).map(|&i| ops[i].returned).min().unwrap_or(u64::MAX);
        for &i in order.iter().rev() {
            if is_done(i) || ops[i].invoked > min_return {
                continue;
            }
            for next in step(&state, &ops[i]) {
                let mut d = done.clone();
                d[i / 64] |= 1 << (i % 64);
                if seen.insert((d.clone(), next.clone())) {
                    stack.push((d, next, count + 1));
                }
            }
        }
    }
    Verdict::NotLinearizable(format!("{} of {n} operations could be ordered; state then: {deepest_state:?}", deepest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(client: usize, call: Call, ret: Ret, invoked: u64, returned: u64) -> Op {
        Op { client, call, ret, invoked, returned }
    }
    fn put(k: &str, v: &str) -> Call {
        Call::Put(k.into(), v.into())
    }
    fn get(k: &str) -> Call {
        Call::Get(k.into())
    }
    fn val(v: &str) -> Ret {
        Ret::Value(Some(v.into()))
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let h = vec![
            op(0, put("x", "1"), Ret::Committed, 0, 10),
            op(1, get("x"), val("1"), 20, 30),
            op(0, Call::Del("x".into()), Ret::Committed, 40, 50),
            op(1, get("x"), Ret::Value(None), 60, 70),
        ];
        assert_eq!(check(&h, 10_000), Verdict::Linearizable);
    }

    #[test]
    fn a_stale_read_after_a_completed_write_is_caught() {
        // Known bad: the write finished before the read began, yet the read
        // saw the old value.
        let h = vec![
            op(0, put("x", "1"), Ret::Committed, 0, 10),
            op(0, put("x", "2"), Ret::Committed, 20, 30),
            op(1, get("x"), val("1"), 40, 50),
        ];
        assert!(matches!(check(&h, 10_000), Verdict::NotLinearizable(_)));
    }

    #[test]
    fn concurrent_operations_may_take_either_order() {
        let h = vec![
            op(0, put("x", "1"), Ret::Committed, 0, 100),
            op(1, get("x"), Ret::Value(None), 10, 20),
            op(2, get("x"), val("1"), 30, 40),
        ];
        assert_eq!(check(&h, 10_000), Verdict::Linearizable);
    }

    #[test]
    fn reads_cannot_go_back_in_time() {
        // Known bad: two sequential reads during one write see new then old.
        let h = vec![
            op(0, put("x", "1"), Ret::Committed, 0, 100),
            op(1, get("x"), val("1"), 10, 20),
            op(1, get("x"), Ret::Value(None), 30, 40),
        ];
        assert!(matches!(check(&h, 10_000), Verdict::NotLinearizable(_)));
    }

    #[test]
    fn unknown_writes_may_or_may_not_have_happened() {
        let maybe = op(0, put("x", "1"), Ret::Unknown, 0, u64::MAX);
        let seen = vec![maybe.clone(), op(1, get("x"), val("1"), 50, 60)];
        assert_eq!(check(&seen, 10_000), Verdict::Linearizable);
        let unseen = vec![maybe.clone(), op(1, get("x"), Ret::Value(None), 50, 60)];
        assert_eq!(check(&unseen, 10_000), Verdict::Linearizable);
        // But not both: once seen, it cannot be unseen.
        let flip = vec![maybe, op(1, get("x"), val("1"), 50, 60), op(1, get("x"), Ret::Value(None), 70, 80)];
        assert!(matches!(check(&flip, 10_000), Verdict::NotLinearizable(_)));
    }

    #[test]
    fn transactions_are_atomic_and_conditions_are_judged() {
        let t = Call::Txn(
            vec![Cond::Missing("a".into())],
            vec![("a".into(), Some("1".into())), ("b".into(), Some("1".into()))],
        );
        let ok = vec![
            op(0, t.clone(), Ret::Committed, 0, 10),
            op(1, get("a"), val("1"), 20, 30),
            op(1, get("b"), val("1"), 40, 50),
        ];
        assert_eq!(check(&ok, 10_000), Verdict::Linearizable);
        // Known bad: half a transaction visible.
        let half = vec![
            op(0, t.clone(), Ret::Committed, 0, 10),
            op(1, get("a"), val("1"), 20, 30),
            op(1, get("b"), Ret::Value(None), 40, 50),
        ];
        assert!(matches!(check(&half, 10_000), Verdict::NotLinearizable(_)));
        // Known bad: an abort although the condition held throughout.
        let bad_abort = vec![op(0, t.clone(), Ret::Aborted, 0, 10)];
        assert!(matches!(check(&bad_abort, 10_000), Verdict::NotLinearizable(_)));
        // Known bad: both of two conflicting conditional transactions commit.
        let t2 = Call::Txn(vec![Cond::Missing("a".into())], vec![("a".into(), Some("2".into()))]);
        let both = vec![op(0, t, Ret::Committed, 0, 10), op(1, t2, Ret::Committed, 5, 15)];
        assert!(matches!(check(&both, 10_000), Verdict::NotLinearizable(_)));
    }

    #[test]
    fn an_exhausted_budget_is_undecided() {
        let h: Vec<Op> = (0..40).map(|i| op(i, put("x", &i.to_string()), Ret::Unknown, i as u64, u64::MAX)).collect();
        let mut h = h;
        h.push(op(99, get("x"), val("nope"), 1000, 1001));
        assert_eq!(check(&h, 1000), Verdict::Undecided);
    }
}

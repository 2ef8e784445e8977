//! Redis's glob patterns over bytes, as `SCAN ... MATCH` and `KEYS` take
//! them: `*` (any run), `?` (one byte), `[abc]`, `[a-z]`, `[^abc]` (one byte
//! in or not in a class) and `\x` (the byte `x` itself). Same rules as
//! Redis's `stringmatchlen`, which no maintained crate implements for bytes
//! (the glob crates treat `/` as a path separator).

/// Whether `s` matches `pattern`.
pub fn matches(pattern: &[u8], s: &[u8]) -> bool {
    // Classic backtracking over the last `*`: linear in practice.
    let (mut p, mut i) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        if p < pattern.len() {
            match pattern[p] {
                b'*' => {
                    star = Some((p, i));
                    p += 1;
                    continue;
                }
                b'?' => {
                    p += 1;
                    i += 1;
                    continue;
                }
                b'[' => {
                    if let Some((hit, next)) = class(&pattern[p..], s[i]) {
                        if hit {
                            p += next;
                            i += 1;
                            continue;
                        }
                    } else if s[i] == b'[' {
                        // An unterminated class is a literal '['.
                        p += 1;
                        i += 1;
                        continue;
                    }
                }
                b'\\' if p + 1 < pattern.len() => {
                    if pattern[p + 1] == s[i] {
                        p += 2;
                        i += 1;
                        continue;
                    }
                }
                c => {
                    if c == s[i] {
                        p += 1;
                        i += 1;
                        continue;
                    }
                }
            }
        }
        // Mismatch: let the last `*` swallow one more byte, or fail.
        match star {
            Some((sp, si)) => {
                star = Some((sp, si + 1));
                p = sp + 1;
                i = si + 1;
            }
            None => return false,
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Matches byte `c` against the class at the start of `pattern` (which
/// starts with `[`): whether it is in the class, and the class's length.
/// `None` if the class is not closed.
fn class(pattern: &[u8], c: u8) -> Option<(bool, usize)> {
    let mut k = 1;
    let negate = pattern.get(k) == Some(&b'^');
    if negate {
        k += 1;
    }
    let mut hit = false;
    let mut first = true;
    loop {
        let b = *pattern.get(k)?;
        if b == b']' && !first {
            return Some((hit != negate, k + 1));
        }
        first = false;
        if b == b'\\' {
            k += 1;
            hit |= *pattern.get(k)? == c;
            k += 1;
        } else if pattern.get(k + 1) == Some(&b'-') && pattern.get(k + 2).is_some_and(|&e| e != b']') {
            let (lo, hi) = (b.min(pattern[k + 2]), b.max(pattern[k + 2]));
            hit |= (lo..=hi).contains(&c);
            k += 3;
        } else {
            hit |= b == c;
            k += 1;
        }
    }
}

/// The bytes every match of `pattern` starts with: where a listing can
/// start and end instead of reading every key.
pub fn literal_prefix(pattern: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut k = 0;
    while k < pattern.len() {
        match pattern[k] {
            b'*' | b'?' | b'[' => break,
            b'\\' if k + 1 < pattern.len() => {
                out.push(pattern[k + 1]);
                k += 2;
            }
            c => {
                out.push(c);
                k += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_as_redis_documents_them() {
        let cases: &[(&str, &str, bool)] = &[
            ("h?llo", "hello", true),
            ("h?llo", "hllo", false),
            ("h*llo", "hllo", true),
            ("h*llo", "heeeello", true),
            ("h[ae]llo", "hello", true),
            ("h[ae]llo", "hillo", false),
            ("h[^e]llo", "hallo", true),
            ("h[^e]llo", "hello", false),
            ("h[a-b]llo", "hbllo", true),
            ("h[a-b]llo", "hcllo", false),
            ("h\\*llo", "h*llo", true),
            ("h\\*llo", "hello", false),
            ("*", "", true),
            ("user:*", "user:1", true),
            ("user:*", "user", false),
            ("*:1", "user:1", true),
            ("a*b*c", "aXXbYYc", true),
            ("a*b*c", "aXXbYY", false),
            ("[", "[", true),
            ("[]]", "]", true),
        ];
        for (p, s, want) in cases {
            assert_eq!(matches(p.as_bytes(), s.as_bytes()), *want, "{p:?} against {s:?}");
        }
    }

    #[test]
    fn the_literal_prefix_stops_at_the_first_wildcard() {
        assert_eq!(literal_prefix(b"user:*"), b"user:");
        assert_eq!(literal_prefix(b"a\\*b?c"), b"a*b");
        assert_eq!(literal_prefix(b"*x"), b"");
        assert_eq!(literal_prefix(b"plain"), b"plain");
    }

    proptest::proptest! {
        /// A key with the literal prefix of a pattern is the only kind that
        /// can match it, so listing from the prefix misses nothing.
        #[test]
        fn every_match_starts_with_the_literal_prefix(p in "[a-c*?]{0,6}", s in "[a-c]{0,8}") {
            if matches(p.as_bytes(), s.as_bytes()) {
                proptest::prop_assert!(s.as_bytes().starts_with(&literal_prefix(p.as_bytes())));
            }
        }

        /// Without classes or escapes, the matcher agrees with a plain
        /// recursive definition.
        #[test]
        fn the_matcher_agrees_with_a_reference(p in "[ab*?]{0,7}", s in "[ab]{0,9}") {
            fn reference(p: &[u8], s: &[u8]) -> bool {
                match (p.first(), s.first()) {
                    (None, _) => s.is_empty(),
                    (Some(b'*'), _) => reference(&p[1..], s) || (!s.is_empty() && reference(p, &s[1..])),
                    (Some(b'?'), Some(_)) => reference(&p[1..], &s[1..]),
                    (Some(c), Some(d)) if c == d => reference(&p[1..], &s[1..]),
                    _ => false,
                }
            }
            proptest::prop_assert_eq!(matches(p.as_bytes(), s.as_bytes()), reference(p.as_bytes(), s.as_bytes()));
        }
    }
}

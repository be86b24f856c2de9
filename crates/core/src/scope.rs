//! Scopes and their implications (`admin` ⇒ `read:all`, `write:all` by default).

use std::collections::BTreeMap;

/// Whether `s` is a valid scope token: RFC 6749 `scope-token` characters, minus `,`
/// (used as a list separator in route metadata), at most 128 bytes.
pub fn valid_scope(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| matches!(b, 0x21 | 0x23..=0x2B | 0x2D..=0x5B | 0x5D..=0x7E))
}

/// Splits a scope list written as `"a b"`, `"a,b"` or a mix.
pub fn split_list(s: &str) -> impl Iterator<Item = &str> {
    s.split(|c: char| c == ',' || c.is_ascii_whitespace())
        .filter(|t| !t.is_empty())
}

/// Scope implications, closed transitively when built: `expand` is one map lookup per scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Implications {
    /// Each scope's implied scopes, sorted and unique, itself excluded.
    closure: BTreeMap<String, Vec<String>>,
}

impl Default for Implications {
    /// The default set, from seed 004: `admin` implies `read:all` and `write:all`.
    fn default() -> Self {
        let mut raw = BTreeMap::new();
        raw.insert("admin".to_string(), vec!["read:all".to_string(), "write:all".to_string()]);
        Self::close(&raw)
    }
}

impl Implications {
    /// Validates scope names and computes the transitive closure. Cycles are allowed
    /// (`a` ⇒ `b` ⇒ `a` makes them equivalent). The error names the offending scope.
    pub fn new(raw: &BTreeMap<String, Vec<String>>) -> Result<Self, String> {
        for (from, tos) in raw {
            if !valid_scope(from) {
                return Err(format!("invalid scope name {from:?}"));
            }
            if let Some(bad) = tos.iter().find(|t| !valid_scope(t)) {
                return Err(format!("{from}: invalid scope name {bad:?}"));
            }
        }
        Ok(Self::close(raw))
    }

    fn close(raw: &BTreeMap<String, Vec<String>>) -> Self {
        let mut closure = BTreeMap::new();
        for from in raw.keys() {
            // Sorted as it grows: a binary search per implication, and already in order.
            let mut seen: Vec<&str> = Vec::new();
            let mut stack = vec![from.as_str()];
            while let Some(s) = stack.pop() {
                for t in raw.get(s).into_iter().flatten() {
                    if let Err(at) = seen.binary_search(&t.as_str()) {
                        seen.insert(at, t);
                        stack.push(t);
                    }
                }
            }
            let implied = seen.into_iter().filter(|t| t != from).map(str::to_string).collect();
            closure.insert(from.clone(), implied);
        }
        Implications { closure }
    }

    /// The effective scopes of a set: the set plus everything it implies, sorted, unique.
    pub fn expand<'a>(&self, scopes: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        // Sorted and deduplicated as borrowed strings, then copied once each: a feed page
        // expands thousands of records.
        let mut out: Vec<&str> = Vec::new();
        for s in scopes {
            if let Some(implied) = self.closure.get(s) {
                out.extend(implied.iter().map(String::as_str));
            }
            out.push(s);
        }
        out.sort_unstable();
        out.dedup();
        out.into_iter().map(str::to_string).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn imp(pairs: &[(&str, &[&str])]) -> Implications {
        let raw = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
            .collect();
        Implications::new(&raw).unwrap()
    }

    #[test]
    fn default_admin_implies_read_and_write() {
        let check = |have: &[&str], want: &[&str]| {
            assert_eq!(Implications::default().expand(have.iter().copied()), want, "{have:?}")
        };
        check(&["admin"], &["admin", "read:all", "write:all"]);
        check(&["read:all"], &["read:all"]);
        check(&["webhook", "read:all", "read:all"], &["read:all", "webhook"]);
        check(&[], &[]);
    }

    #[test]
    fn implications_are_transitive_and_tolerate_cycles() {
        let i = imp(&[("owner", &["admin"]), ("admin", &["read:all"]), ("a", &["b"]), ("b", &["a"])]);
        assert_eq!(i.expand(["owner"]), ["admin", "owner", "read:all"]);
        assert_eq!(i.expand(["a"]), ["a", "b"]);
    }

    #[test]
    fn bad_scope_names_are_named() {
        let raw: BTreeMap<String, Vec<String>> =
            [("admin".to_string(), vec!["read all".to_string()])].into();
        assert_eq!(Implications::new(&raw).unwrap_err(), "admin: invalid scope name \"read all\"");
    }

    #[test]
    fn scope_tokens_follow_rfc6749() {
        for (s, ok) in [("read:all", true), ("a", true), ("", false), ("a b", false), ("a,b", false), ("a\"b", false), ("é", false)] {
            assert_eq!(valid_scope(s), ok, "{s}");
        }
        assert_eq!(split_list(" a, b  c,,").collect::<Vec<_>>(), ["a", "b", "c"]);
    }
}

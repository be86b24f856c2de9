//! Route rules: which scopes a request needs, matched on method, path and host.
//!
//! Rules are tried in order and the first match wins. Envoy route metadata
//! (`filter_metadata.keyward.scopes`) overrides them; see `decision`.

use regex_lite::Regex;

/// What a route asks of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    /// No credential is needed.
    Public,
    /// A valid key holding every listed scope; an empty list means any valid key.
    Scopes(Vec<String>),
}

#[derive(Debug, Clone)]
pub enum PathMatch {
    Any,
    /// A plain string prefix, as Envoy's route `prefix` matches.
    Prefix(String),
    Exact(String),
    /// Must match the whole path (anchored), as Envoy's `safe_regex` does.
    Regex(Regex),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    Any,
    /// Lowercase host, port ignored.
    Exact(String),
    /// `*.example.com`: any host ending in `.example.com` (stored as that suffix).
    Suffix(String),
}

#[derive(Debug, Clone)]
pub struct Rule {
    /// Uppercase methods; `None` matches every method. A rule naming `GET` also matches `HEAD`.
    pub methods: Option<Vec<String>>,
    pub path: PathMatch,
    pub host: HostMatch,
    pub requirement: Requirement,
}

impl Rule {
    /// `path` excludes the query string; `host` is the `:authority` as sent.
    pub fn matches(&self, method: &str, path: &str, host: &str) -> bool {
        if let Some(methods) = &self.methods {
            let hit = methods.iter().any(|m| {
                m.eq_ignore_ascii_case(method) || (m == "GET" && method.eq_ignore_ascii_case("HEAD"))
            });
            if !hit {
                return false;
            }
        }
        let path_ok = match &self.path {
            PathMatch::Any => true,
            PathMatch::Prefix(p) => path.starts_with(p.as_str()),
            PathMatch::Exact(p) => path == p,
            PathMatch::Regex(r) => r.is_match(path),
        };
        path_ok && self.host.matches(host)
    }
}

impl HostMatch {
    pub fn matches(&self, authority: &str) -> bool {
        let host = strip_port(authority);
        match self {
            HostMatch::Any => true,
            HostMatch::Exact(h) => host.eq_ignore_ascii_case(h),
            HostMatch::Suffix(s) => {
                host.len() > s.len()
                    && host.is_char_boundary(host.len() - s.len())
                    && host[host.len() - s.len()..].eq_ignore_ascii_case(s)
            }
        }
    }
}

/// `example.com:8080` → `example.com`; `[::1]:80` → `[::1]`.
fn strip_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        return match authority.find(']') {
            Some(i) => &authority[..=i],
            None => authority,
        };
    }
    match authority.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    }
}

/// The path without its query string or fragment.
pub fn path_only(path: &str) -> &str {
    path.split(['?', '#']).next().unwrap_or(path)
}

/// Finds the requirement for a request: the first matching rule's, or `default`.
pub fn requirement<'a>(rules: &'a [Rule], default: &'a Requirement, method: &str, path: &str, host: &str) -> &'a Requirement {
    rules
        .iter()
        .find(|r| r.matches(method, path, host))
        .map_or(default, |r| &r.requirement)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(methods: Option<&[&str]>, path: PathMatch, host: HostMatch) -> Rule {
        Rule {
            methods: methods.map(|m| m.iter().map(|s| s.to_string()).collect()),
            path,
            host,
            requirement: Requirement::Public,
        }
    }

    #[test]
    fn rules_match_method_path_and_host() {
        let re = Regex::new("^(?:/v1/items/[0-9]+)$").unwrap();
        let cases: Vec<(Rule, &str, &str, &str, bool)> = vec![
            (rule(None, PathMatch::Any, HostMatch::Any), "GET", "/", "a", true),
            (rule(Some(&["POST"]), PathMatch::Any, HostMatch::Any), "GET", "/", "a", false),
            (rule(Some(&["POST"]), PathMatch::Any, HostMatch::Any), "post", "/", "a", true),
            (rule(Some(&["GET"]), PathMatch::Any, HostMatch::Any), "HEAD", "/", "a", true),
            (rule(Some(&["HEAD"]), PathMatch::Any, HostMatch::Any), "GET", "/", "a", false),
            (rule(None, PathMatch::Prefix("/v1/".into()), HostMatch::Any), "GET", "/v1/x", "a", true),
            (rule(None, PathMatch::Prefix("/v1/".into()), HostMatch::Any), "GET", "/v2/x", "a", false),
            (rule(None, PathMatch::Exact("/health".into()), HostMatch::Any), "GET", "/health", "a", true),
            (rule(None, PathMatch::Exact("/health".into()), HostMatch::Any), "GET", "/health/", "a", false),
            (rule(None, PathMatch::Regex(re.clone()), HostMatch::Any), "GET", "/v1/items/42", "a", true),
            (rule(None, PathMatch::Regex(re), HostMatch::Any), "GET", "/v1/items/42/x", "a", false),
            (rule(None, PathMatch::Any, HostMatch::Exact("api.example.com".into())), "GET", "/", "API.example.com:8443", true),
            (rule(None, PathMatch::Any, HostMatch::Exact("api.example.com".into())), "GET", "/", "example.com", false),
            (rule(None, PathMatch::Any, HostMatch::Suffix(".example.com".into())), "GET", "/", "a.example.com", true),
            (rule(None, PathMatch::Any, HostMatch::Suffix(".example.com".into())), "GET", "/", "example.com", false),
            (rule(None, PathMatch::Any, HostMatch::Suffix(".example.com".into())), "GET", "/", "évil.example.com", true),
            (rule(None, PathMatch::Any, HostMatch::Exact("[::1]".into())), "GET", "/", "[::1]:10000", true),
        ];
        for (r, m, p, h, want) in cases {
            assert_eq!(r.matches(m, p, h), want, "{r:?} {m} {p} {h}");
        }
    }

    #[test]
    fn first_matching_rule_wins_else_default() {
        let mut a = rule(None, PathMatch::Prefix("/admin".into()), HostMatch::Any);
        a.requirement = Requirement::Scopes(vec!["admin".into()]);
        let b = rule(None, PathMatch::Prefix("/".into()), HostMatch::Any);
        let dflt = Requirement::Scopes(vec![]);
        let rules = [a, b];
        assert_eq!(requirement(&rules, &dflt, "GET", "/admin/x", "h"), &Requirement::Scopes(vec!["admin".into()]));
        assert_eq!(requirement(&rules, &dflt, "GET", "/x", "h"), &Requirement::Public);
        assert_eq!(requirement(&rules[..1], &dflt, "GET", "/x", "h"), &dflt);
    }

    #[test]
    fn path_only_drops_query_and_fragment() {
        assert_eq!(path_only("/a?b=c"), "/a");
        assert_eq!(path_only("/a#f"), "/a");
        assert_eq!(path_only("/a"), "/a");
    }
}

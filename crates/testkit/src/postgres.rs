//! The PostgreSQL the tests run on: the server `cargo xtask test` starts (a throwaway cluster,
//! passed as `$KEYWARD_TEST_POSTGRES`) or any server the user names there, and a fresh,
//! uniquely named database on it per test, so tests running in parallel never share a store.
//!
//! ```no_run
//! let url = keyward_testkit::postgres::fresh_database("feed").unwrap_or_else(|e| panic!("{e}"));
//! // postgres://kw@127.0.0.1:PORT/kw_feed_1234_0: empty, and this test's alone.
//! # let _ = url;
//! ```

use std::sync::atomic::{AtomicU32, Ordering};

/// The environment variable holding the server's URL.
pub const ENV: &str = "KEYWARD_TEST_POSTGRES";

/// What to do when no server is named.
pub const DIRECTIONS: &str = "no PostgreSQL for the tests: KEYWARD_TEST_POSTGRES is not set.\n\
     Run the tests with `cargo xtask test`, which starts a throwaway PostgreSQL (and installs Debian's \
     `postgresql` package if absent),\n\
     or set KEYWARD_TEST_POSTGRES=postgres://user@host:port/db of a server you can create databases on \
     (`cargo xtask postgres` starts one and prints its URL).";

/// The longest identifier PostgreSQL keeps whole (NAMEDATALEN - 1).
const MAX_IDENTIFIER: usize = 63;

/// `$KEYWARD_TEST_POSTGRES`: the URL of a server the tests may create databases on. An error
/// with directions when it is unset or not a `postgres://` / `postgresql://` URL.
pub fn base_url() -> Result<String, String> {
    base_url_from(std::env::var(ENV).ok())
}

fn base_url_from(value: Option<String>) -> Result<String, String> {
    let url = value.map(|v| v.trim().to_string()).filter(|v| !v.is_empty()).ok_or_else(|| DIRECTIONS.to_string())?;
    split_url(&url)?;
    Ok(url)
}

/// Creates a new, empty database on the server of [`base_url`], named after `tag`, this process
/// and a counter (a valid identifier whatever `tag` holds), and returns its URL: the base URL
/// with the database replaced.
pub fn fresh_database(tag: &str) -> Result<String, String> {
    static N: AtomicU32 = AtomicU32::new(0);
    let base = base_url()?;
    let mut client = postgres::Client::connect(&base, postgres::NoTls).map_err(|e| format!("cannot connect to {base} ({ENV}): {e}"))?;
    // A server the user keeps may still hold a database of an earlier run with the same pid.
    for _ in 0..100 {
        let name = database_name(tag, std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        match client.batch_execute(&format!("CREATE DATABASE \"{name}\"")) {
            Ok(()) => return with_database(&base, &name),
            Err(e) if e.code() == Some(&postgres::error::SqlState::DUPLICATE_DATABASE) => continue,
            Err(e) => return Err(format!("CREATE DATABASE {name} on {base} ({ENV}): {e}")),
        }
    }
    Err(format!("no free database name for {tag:?} on {base} after 100 tries"))
}

/// `kw_<tag>_<pid>_<n>`: lower-case ASCII letters, digits and `_` only, at most 63 bytes (the
/// tag is cut, never the pid or the counter), so it needs no quoting rules beyond `"…"`.
pub fn database_name(tag: &str, pid: u32, n: u32) -> String {
    let suffix = format!("_{pid}_{n}");
    let clean: String = tag
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' })
        .collect();
    let room = MAX_IDENTIFIER - "kw_".len() - suffix.len();
    let clean: String = clean.chars().take(room).collect();
    format!("kw_{clean}{suffix}")
}

/// `(everything up to the database, the query string with its `?`, if any)`.
fn split_url(url: &str) -> Result<(&str, &str), String> {
    let rest = ["postgres://", "postgresql://"]
        .iter()
        .find_map(|s| url.strip_prefix(s))
        .ok_or_else(|| format!("{ENV}={url:?} is not a postgres:// URL.\n{DIRECTIONS}"))?;
    let scheme_len = url.len() - rest.len();
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    if authority_end == 0 {
        return Err(format!("{ENV}={url:?} names no host.\n{DIRECTIONS}"));
    }
    let query = rest.find('?').map_or("", |q| &rest[q..]);
    Ok((&url[..scheme_len + authority_end], query))
}

/// `url` with its database (the path) replaced by `database`; user, host, port and query kept.
pub fn with_database(url: &str, database: &str) -> Result<String, String> {
    let (server, query) = split_url(url)?;
    Ok(format!("{server}/{database}{query}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_valid_unique_identifiers() {
        assert_eq!(database_name("feed", 42, 0), "kw_feed_42_0");
        assert_eq!(database_name("Two Replicas/A-b", 7, 3), "kw_two_replicas_a_b_7_3");
        assert_eq!(database_name("", 7, 3), "kw__7_3");
        assert_eq!(database_name("é\"x", 1, 1), "kw___x_1_1");
        let long = database_name(&"t".repeat(200), u32::MAX, u32::MAX);
        assert_eq!(long.len(), 63);
        assert!(long.ends_with(&format!("_{}_{}", u32::MAX, u32::MAX)));
        for name in [database_name("a", 1, 1), long, database_name("Ω; DROP", 1, 2)] {
            assert!(name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'), "{name}");
            assert!(name.starts_with("kw_"));
        }
        assert_ne!(database_name("a", 1, 1), database_name("a", 1, 2));
    }

    #[test]
    fn the_database_of_a_url_is_replaced_and_the_rest_kept() {
        for (url, want) in [
            ("postgres://kw@127.0.0.1:5432/postgres", "postgres://kw@127.0.0.1:5432/kw_x_1_0"),
            ("postgres://kw@127.0.0.1:5432", "postgres://kw@127.0.0.1:5432/kw_x_1_0"),
            ("postgres://kw@127.0.0.1:5432/", "postgres://kw@127.0.0.1:5432/kw_x_1_0"),
            ("postgresql://u:p%2F@h/db?sslmode=disable", "postgresql://u:p%2F@h/kw_x_1_0?sslmode=disable"),
            ("postgres://h:1?application_name=t", "postgres://h:1/kw_x_1_0?application_name=t"),
        ] {
            assert_eq!(with_database(url, "kw_x_1_0").as_deref(), Ok(want), "{url}");
        }
    }

    #[test]
    fn a_missing_or_wrong_url_gives_directions() {
        for unset in [None, Some(String::new()), Some("  ".into())] {
            let e = base_url_from(unset).unwrap_err();
            assert!(e.contains("cargo xtask test") && e.contains("KEYWARD_TEST_POSTGRES=postgres://"), "{e}");
        }
        for bad in ["mysql://h/db", "host=localhost user=kw", "postgres:///db"] {
            let e = base_url_from(Some(bad.into())).unwrap_err();
            assert!(e.contains(bad) && e.contains("cargo xtask test"), "{e}");
        }
        assert_eq!(base_url_from(Some(" postgres://kw@h:1/db\n".into())).as_deref(), Ok("postgres://kw@h:1/db"));
    }
}

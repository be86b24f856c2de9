//! Credential extraction from hostile headers and paths.
//! Input: the first line is `:path`; every further line is `name:value` (raw bytes).
#![no_main]

use keyward_core::credential::extract;
use keyward_core::Config;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn config() -> &'static Config {
    static C: OnceLock<Config> = OnceLock::new();
    C.get_or_init(|| {
        Config::from_json(br#"{"query_param": "api_key", "key_prefixes": ["kw", "sk"], "max_key_length": 64}"#)
            .unwrap_or_else(|e| panic!("fixture config: {e}"))
    })
}

/// `%XX` decoded, `+` as space: how a query parameter arrives.
fn percent_decoded(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (b[i], b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let mut lines = data.split(|b| *b == b'\n');
    let path = String::from_utf8_lossy(lines.next().unwrap_or_default()).into_owned();
    let headers: Vec<(String, Vec<u8>)> = lines
        .filter_map(|l| {
            let at = l.iter().position(|b| *b == b':')?;
            Some((String::from_utf8_lossy(&l[..at]).to_ascii_lowercase(), l[at + 1..].to_vec()))
        })
        .collect();
    let sources = &config().sources;
    if let Ok(c) = extract(sources, &headers, &path) {
        // What is accepted is bounded, printable and really was presented.
        assert!(!c.key.is_empty() && c.key.len() <= sources.max_length, "key length {}", c.key.len());
        assert!(c.key.bytes().all(|b| b.is_ascii_graphic() && b != b','), "non-printable key accepted");
        let presented = headers.iter().any(|(_, v)| v.windows(c.key.len()).any(|w| w == c.key.as_bytes()))
            || percent_decoded(&path).windows(c.key.len()).any(|w| w == c.key.as_bytes());
        assert!(presented, "extracted a key that was not presented");
        if let Some(stripped) = &c.stripped_path {
            // The parameter is gone from the query (the path before `?` is not the query).
            let query = stripped.split_once('?').map_or("", |(_, q)| q);
            assert!(!query.split('&').any(|p| p.starts_with("api_key=")), "the parameter was left in the query: {stripped:?}");
        }
    }
});

//! Credential extraction: finds the one API key a request presents, or says why it cannot.
//!
//! Sources, in the order checked: the bearer header (`Authorization: Bearer <key>`, scheme
//! case-insensitive), the API-key header (`x-api-key`), and, if enabled, a query parameter.
//! Every value is checked (length bound, printable ASCII) before it is compared or hashed.

use crate::keyformat::{self, FormatCheck};
use std::borrow::Cow;

/// Where credentials may come from, compiled from the plugin configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sources {
    /// Lowercase header carrying `Bearer <key>`; `None` disables it.
    pub bearer_header: Option<String>,
    /// Lowercase header carrying the bare key; `None` disables it.
    pub api_key_header: Option<String>,
    /// Query parameter carrying the key; off (`None`) by default.
    pub query_param: Option<String>,
    /// Longest accepted key, in bytes.
    pub max_length: usize,
    /// Keys that start with `<prefix>_` must carry a valid keyward checksum.
    pub key_prefixes: Vec<String>,
}

impl Default for Sources {
    fn default() -> Self {
        Sources {
            bearer_header: Some("authorization".into()),
            api_key_header: Some("x-api-key".into()),
            query_param: None,
            max_length: 256,
            key_prefixes: vec!["kw".into()],
        }
    }
}

/// Why no usable credential was found. The reasons are safe to show to clients: none of them
/// contains the presented value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialError {
    Missing,
    Malformed(&'static str),
}

/// The credential a request presents, and where it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    pub key: String,
    /// Header names that carried it, to remove before forwarding.
    pub headers: Vec<String>,
    /// The request path with the credential's query parameter removed, when it came from there.
    pub stripped_path: Option<String>,
}

/// Finds the credential in the request's headers (lowercase names, raw values) and path.
pub fn extract(sources: &Sources, headers: &[(String, Vec<u8>)], path: &str) -> Result<Credential, CredentialError> {
    // Every presented value, with the header that carried it (`None`: the query string).
    let mut offered: Vec<(Cow<'_, [u8]>, Option<&str>)> = Vec::new();
    for (name, value) in headers {
        if Some(name) == sources.bearer_header.as_ref() {
            if let Some(token) = bearer_token(value)? {
                offered.push((Cow::Borrowed(token), Some(name)));
            }
        } else if Some(name) == sources.api_key_header.as_ref() {
            offered.push((Cow::Borrowed(value), Some(name)));
        }
    }
    let mut stripped_path = None;
    if let (Some(param), Some((base, query))) = (&sources.query_param, path.split_once('?')) {
        let mut kept: Vec<&str> = Vec::new();
        for pair in query.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if k == param {
                let decoded = percent_decode(v)
                    .ok_or(CredentialError::Malformed("the query parameter is not valid percent-encoding"))?;
                offered.push((Cow::Owned(decoded), None));
            } else {
                kept.push(pair);
            }
        }
        if offered.iter().any(|(_, name)| name.is_none()) {
            stripped_path = Some(if kept.is_empty() { base.to_string() } else { format!("{base}?{}", kept.join("&")) });
        }
    }
    let Some((first, _)) = offered.first() else {
        return Err(CredentialError::Missing);
    };
    for (value, _) in &offered {
        validate(sources, value)?;
    }
    if offered.iter().any(|(v, _)| v != first) {
        return Err(CredentialError::Malformed("the request carries two different credentials"));
    }
    // `validate` admitted only printable ASCII, so this cannot fail; map it anyway rather than unwrap.
    let key = std::str::from_utf8(first)
        .map_err(|_| CredentialError::Malformed("the key contains characters outside printable ASCII"))?
        .to_string();
    if keyformat::check(&sources.key_prefixes, &key) == FormatCheck::BadChecksum {
        return Err(CredentialError::Malformed("the key's checksum does not match; check that it was copied whole"));
    }
    let mut names: Vec<String> = Vec::new();
    for name in offered.iter().filter_map(|(_, n)| *n) {
        if !names.iter().any(|x| x == name) {
            names.push(name.to_string());
        }
    }
    Ok(Credential { key, headers: names, stripped_path })
}

/// Returns the token of a `Bearer` authorization value, `None` for another scheme.
fn bearer_token(value: &[u8]) -> Result<Option<&[u8]>, CredentialError> {
    const SCHEME: &[u8] = b"bearer";
    if value.len() < SCHEME.len() || !value[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
        return Ok(None);
    }
    let rest = &value[SCHEME.len()..];
    match rest.first() {
        None => Err(CredentialError::Malformed("the Bearer token is empty")),
        Some(b' ') => {
            let token = &rest[rest.iter().take_while(|&&b| b == b' ').count()..];
            if token.is_empty() {
                Err(CredentialError::Malformed("the Bearer token is empty"))
            } else {
                Ok(Some(token))
            }
        }
        // `Bearer\tkey`, `Bearerkey`, `Bearer:key`: the scheme must be followed by a space.
        Some(_) => Err(CredentialError::Malformed("the Bearer scheme must be followed by one space and the key")),
    }
}

/// The characters a key may hold: printable ASCII without space. A comma is refused too: it
/// appears when a proxy merges two copies of a header, which is two credentials, not one. The
/// control plane refuses to import a key outside this rule, since the filter would refuse it.
pub fn is_key_text(value: &[u8]) -> bool {
    !value.is_empty() && value.iter().all(|&b| (0x21..=0x7e).contains(&b) && b != b',')
}

fn validate(sources: &Sources, value: &[u8]) -> Result<(), CredentialError> {
    if value.is_empty() {
        return Err(CredentialError::Malformed("the key is empty"));
    }
    if value.len() > sources.max_length {
        return Err(CredentialError::Malformed("the key is longer than the accepted maximum"));
    }
    if !is_key_text(value) {
        return Err(CredentialError::Malformed("the key contains characters outside printable ASCII"));
    }
    Ok(())
}

fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hi = char::from(*b.get(i + 1)?).to_digit(16)?;
                let lo = char::from(*b.get(i + 2)?).to_digit(16)?;
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use CredentialError::*;

    fn sources() -> Sources {
        Sources { query_param: Some("api_key".into()), ..Sources::default() }
    }

    fn check(headers: &[(&str, &[u8])], path: &str, want: Result<&str, CredentialError>) {
        let headers: Vec<(String, Vec<u8>)> = headers.iter().map(|(n, v)| (n.to_string(), v.to_vec())).collect();
        let got = extract(&sources(), &headers, path);
        assert_eq!(got.as_ref().map(|c| c.key.as_str()).map_err(|e| *e), want, "{headers:?} {path}");
    }

    fn valid_key() -> String {
        keyformat::generate("kw_live", (3u8..250).cycle()).unwrap()
    }

    /// Found by `cargo xtask fuzz` (target `credential`): `api_key=` before the `?` is part of
    /// the path, not the query; it is neither read nor stripped.
    #[test]
    fn fuzz_regression_query_parameter_text_in_the_path_is_left_alone() {
        let headers = Vec::new();
        let c = extract(&sources(), &headers, "/a/api_key=1/b?x=1&api_key=abcdefghijklmnop&y=2").unwrap();
        assert_eq!(c.key, "abcdefghijklmnop");
        assert_eq!(c.stripped_path.as_deref(), Some("/a/api_key=1/b?x=1&y=2"));
    }

    /// Found by `cargo xtask fuzz` (target `credential`): a query parameter arrives
    /// percent-encoded, and the key is its decoded value.
    #[test]
    fn fuzz_regression_query_keys_are_percent_decoded() {
        check(&[], "/v1?api_key=legacy%2Dkey%2D0000000001", Ok("legacy-key-0000000001"));
    }

    #[test]
    fn finds_keys_in_each_source() {
        let k = valid_key();
        check(&[("authorization", format!("Bearer {k}").as_bytes())], "/", Ok(&k));
        check(&[("authorization", format!("bEaReR {k}").as_bytes())], "/", Ok(&k));
        check(&[("authorization", format!("Bearer   {k}").as_bytes())], "/", Ok(&k));
        check(&[("x-api-key", k.as_bytes())], "/", Ok(&k));
        check(&[], &format!("/v1?a=1&api_key={k}"), Ok(&k));
        check(&[("x-api-key", b"imported-kong-key")], "/", Ok("imported-kong-key"));
        // The same credential twice is one credential.
        check(&[("x-api-key", k.as_bytes()), ("authorization", format!("Bearer {k}").as_bytes())], "/", Ok(&k));
        check(&[("x-api-key", k.as_bytes()), ("x-api-key", k.as_bytes())], "/", Ok(&k));
    }

    #[test]
    fn missing_credentials_are_missing() {
        check(&[], "/", Err(Missing));
        check(&[("authorization", b"Basic dXNlcjpwYXNz")], "/", Err(Missing));
        check(&[("x-other", b"abc")], "/?other=1", Err(Missing));
        check(&[("authorization", b"Bear")], "/", Err(Missing));
    }

    #[test]
    fn malformed_credentials_are_malformed() {
        let k = valid_key();
        let long = "a".repeat(257);
        let cases: &[(&str, &[u8])] = &[
            ("authorization", b"Bearer"),
            ("authorization", b"Bearer "),
            ("authorization", b"Bearer    "),
            ("authorization", b"Bearerabc"),
            ("authorization", b"Bearer\tabc"),
            ("authorization", b"Bearer abc def"),
            ("authorization", "Bearer ключ".as_bytes()),
            ("authorization", b"Bearer a,Bearer b"),
            ("x-api-key", b""),
            ("x-api-key", b"abc\x00def"),
            ("x-api-key", b"abc\x7fdef"),
            ("x-api-key", long.as_bytes()),
            ("x-api-key", b"kw_live_4fTq9ZtJ0mXkP2sLr8YwVb3NcQe7HdUa_000000"),
            ("x-api-key", b"kw_garbage"),
        ];
        for (name, value) in cases {
            let got = extract(&sources(), &[(name.to_string(), value.to_vec())], "/");
            assert!(matches!(got, Err(Malformed(_))), "{name}: {:?} -> {got:?}", String::from_utf8_lossy(value));
        }
        check(&[("x-api-key", b"one"), ("x-api-key", b"two")], "/", Err(Malformed("the request carries two different credentials")));
        check(&[("x-api-key", b"one"), ("authorization", b"Bearer two")], "/", Err(Malformed("the request carries two different credentials")));
        check(&[("x-api-key", b"one")], "/?api_key=two", Err(Malformed("the request carries two different credentials")));
        check(&[], "/?api_key=one&api_key=two", Err(Malformed("the request carries two different credentials")));
        check(&[], "/?api_key=%zz", Err(Malformed("the query parameter is not valid percent-encoding")));
        assert!(!k.is_empty());
    }

    #[test]
    fn length_bound_is_inclusive() {
        let at = "a".repeat(256);
        check(&[("x-api-key", at.as_bytes())], "/", Ok(&at));
    }

    #[test]
    fn query_credential_is_stripped_from_the_path() {
        let strip = |path: &str| extract(&sources(), &[], path).unwrap().stripped_path.unwrap();
        assert_eq!(strip("/v1/x?api_key=abc"), "/v1/x");
        assert_eq!(strip("/v1/x?a=1&api_key=abc&b=2"), "/v1/x?a=1&b=2");
        assert_eq!(strip("/v1/x?api_key=a%2Bb"), "/v1/x");
        assert_eq!(extract(&sources(), &[], "/?api_key=a%2Bb").unwrap().key, "a+b");
        let hdr = extract(&sources(), &[("x-api-key".into(), b"abc".to_vec())], "/?x=1").unwrap();
        assert_eq!((hdr.headers, hdr.stripped_path), (vec!["x-api-key".to_string()], None));
    }

    #[test]
    fn query_source_is_off_by_default() {
        let got = extract(&Sources::default(), &[], "/?api_key=abc");
        assert_eq!(got, Err(Missing));
    }

    #[test]
    fn header_names_are_configurable() {
        let s = Sources { bearer_header: None, api_key_header: Some("x-token".into()), ..Sources::default() };
        let hs = |n: &str, v: &str| vec![(n.to_string(), v.as_bytes().to_vec())];
        assert_eq!(extract(&s, &hs("x-token", "abc"), "/").unwrap().key, "abc");
        assert_eq!(extract(&s, &hs("authorization", "Bearer abc"), "/"), Err(Missing));
        assert_eq!(extract(&s, &hs("x-api-key", "abc"), "/"), Err(Missing));
    }
}

//! The contract's local replies: status, JSON error body and RFC 6750 headers for each denial.
//!
//! Bodies never contain the presented credential.

use crate::config::Config;
use crate::decision::Denial;
use crate::snapshot::KeyRecord;
use crate::time::format_rfc3339;
#[cfg(test)]
use serde_json::Value;

/// A response the filter sends itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u32,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

/// Every error code of the contract, in a fixed order (the filter indexes its counters by it).
pub const CODES: [&str; 10] = [
    "MISSING_API_KEY",
    "MALFORMED_API_KEY",
    "INVALID_API_KEY",
    "REVOKED_API_KEY",
    "EXPIRED_API_KEY",
    "ACCESS_DISABLED",
    "INSUFFICIENT_SCOPE",
    "TLS_REQUIRED",
    "RATE_LIMITED",
    "KEYS_UNAVAILABLE",
];

impl Denial {
    /// Index into [`CODES`].
    pub fn code_index(&self) -> usize {
        match self {
            Denial::MissingKey => 0,
            Denial::MalformedKey { .. } => 1,
            Denial::InvalidKey => 2,
            Denial::RevokedKey { .. } => 3,
            Denial::ExpiredKey { .. } => 4,
            Denial::AccessDisabled { .. } => 5,
            Denial::InsufficientScope { .. } | Denial::PathRestricted { .. } => 6,
            Denial::TlsRequired => 7,
            Denial::RateLimited { .. } => 8,
            Denial::KeysUnavailable { .. } => 9,
        }
    }

    pub fn code(&self) -> &'static str {
        CODES[self.code_index()]
    }

    pub fn status(&self) -> u32 {
        match self {
            Denial::MissingKey
            | Denial::MalformedKey { .. }
            | Denial::InvalidKey
            | Denial::RevokedKey { .. }
            | Denial::ExpiredKey { .. } => 401,
            Denial::AccessDisabled { .. }
            | Denial::InsufficientScope { .. }
            | Denial::PathRestricted { .. }
            | Denial::TlsRequired => 403,
            Denial::RateLimited { .. } => 429,
            Denial::KeysUnavailable { .. } => 503,
        }
    }

    /// Builds the full local reply for this denial.
    pub fn reply(&self, config: &Config) -> LocalReply {
        let realm = &config.realm;
        // The body is written by hand to keep the contract's field order, in serde_json's
        // compact form: its string escapes, and `details`' keys sorted, as its maps sort them.
        let mut body = format!(r#"{{"success":false,"error":{{"code":"{}","message":"#, self.code());
        match self {
            Denial::MissingKey => push_json_str(&mut body, &missing_message(config)),
            Denial::MalformedKey { reason } => push_json_str(&mut body, &format!("The API key is malformed: {reason}.")),
            Denial::InvalidKey => push_json_str(&mut body, "The API key is not valid."),
            Denial::RevokedKey { .. } => push_json_str(&mut body, "The API key has been revoked."),
            Denial::ExpiredKey { expired_at, .. } => push_json_str(&mut body, &format!("The API key expired at {}.", format_rfc3339(*expired_at))),
            Denial::AccessDisabled { reason } => {
                push_json_str(&mut body, reason.as_deref().unwrap_or("API access is disabled for this key's agent."))
            }
            Denial::InsufficientScope { .. } => push_json_str(&mut body, "The API key lacks a scope this route requires."),
            Denial::PathRestricted { .. } => push_json_str(&mut body, "The API key is restricted to other paths."),
            Denial::TlsRequired => push_json_str(&mut body, "This API requires HTTPS."),
            Denial::RateLimited { retry_after_secs } => {
                push_json_str(&mut body, &format!("Rate limit exceeded; retry after {retry_after_secs} seconds."))
            }
            Denial::KeysUnavailable { .. } => push_json_str(&mut body, "API keys are not loaded yet; retry shortly."),
        }
        body.push_str(r#","details":{"#);
        match self {
            Denial::MissingKey => {
                let s = &config.sources;
                // `details.header` (seed 003): the header a client should send its key in. The
                // Bearer header when enabled (the seed's `Authorization`), else the API-key
                // header; with neither, `details.query_param` names the query parameter instead.
                match (s.bearer_header.as_ref().or(s.api_key_header.as_ref()), &s.query_param) {
                    (Some(header), _) => push_json_field(&mut body, "header", header),
                    (None, Some(q)) => push_json_field(&mut body, "query_param", q),
                    (None, None) => {}
                }
            }
            Denial::RevokedKey { key_id } => push_json_field(&mut body, "key_id", key_id),
            Denial::ExpiredKey { expired_at, key_id } => {
                push_json_field(&mut body, "expired_at", &format_rfc3339(*expired_at));
                body.push(',');
                push_json_field(&mut body, "key_id", key_id);
            }
            Denial::InsufficientScope { required } => push_json_list(&mut body, "required_scopes", required),
            Denial::PathRestricted { allowed } => {
                push_json_list(&mut body, "allowed_path_prefixes", allowed);
                body.push(',');
                push_json_list(&mut body, "required_scopes", &[]);
            }
            Denial::RateLimited { retry_after_secs } => body.push_str(&format!(r#""retry_after_seconds":{retry_after_secs}"#)),
            Denial::MalformedKey { .. } | Denial::InvalidKey | Denial::AccessDisabled { .. } | Denial::TlsRequired | Denial::KeysUnavailable { .. } => {}
        }
        body.push_str("}}}");
        let mut headers = vec![
            ("content-type", "application/json".to_string()),
            ("cache-control", "no-store".to_string()),
        ];
        match self {
            Denial::MissingKey => headers.push(("www-authenticate", format!("Bearer realm=\"{realm}\""))),
            Denial::MalformedKey { reason } => headers.push((
                "www-authenticate",
                format!("Bearer realm=\"{realm}\", error=\"invalid_request\", error_description=\"{reason}\""),
            )),
            Denial::InvalidKey | Denial::RevokedKey { .. } | Denial::ExpiredKey { .. } => {
                let description = match self {
                    Denial::RevokedKey { .. } => "the key has been revoked",
                    Denial::ExpiredKey { .. } => "the key has expired",
                    _ => "the key is not valid",
                };
                headers.push((
                    "www-authenticate",
                    format!("Bearer realm=\"{realm}\", error=\"invalid_token\", error_description=\"{description}\""),
                ))
            }
            Denial::InsufficientScope { required } => headers.push((
                "www-authenticate",
                format!("Bearer realm=\"{realm}\", error=\"insufficient_scope\", scope=\"{}\"", required.join(" ")),
            )),
            Denial::PathRestricted { .. } => headers.push((
                "www-authenticate",
                format!("Bearer realm=\"{realm}\", error=\"insufficient_scope\""),
            )),
            Denial::RateLimited { retry_after_secs } | Denial::KeysUnavailable { retry_after_secs } => {
                headers.push(("retry-after", (*retry_after_secs).max(1).to_string()))
            }
            Denial::AccessDisabled { .. } | Denial::TlsRequired => {}
        }
        LocalReply { status: self.status(), headers, body }
    }
}

/// The code of a request that failed closed: the filter could not judge it (a hostcall refused,
/// a key record it cannot decode). Never forwarded, whatever `fail_open` says.
pub const INTERNAL_ERROR: &str = "INTERNAL_ERROR";

/// The reply to a request that failed closed: 500, and nothing secret.
pub fn internal_error() -> LocalReply {
    LocalReply {
        status: 500,
        headers: vec![("content-type", "application/json".to_string()), ("cache-control", "no-store".to_string())],
        body: format!(r#"{{"success":false,"error":{{"code":"{INTERNAL_ERROR}","message":"The authentication filter failed; see Envoy's log.","details":{{}}}}}}"#),
    }
}

/// Headers that tell a client its key is being retired: `Deprecation` (RFC 9745, the rotation
/// time as `@<unix seconds>`) and `Sunset` (RFC 8594, the key's expiry as an HTTP-date).
pub fn deprecation_headers(record: &KeyRecord) -> Vec<(&'static str, String)> {
    let Some(at) = record.deprecated_at else {
        return Vec::new();
    };
    let mut headers = vec![("deprecation", format!("@{at}"))];
    if let Some(exp) = record.expires_at {
        headers.push(("sunset", crate::time::format_http_date(exp)));
    }
    headers
}

fn missing_message(config: &Config) -> String {
    let mut ways = Vec::new();
    if let Some(h) = &config.sources.bearer_header {
        ways.push(format!("the {h} header as 'Bearer <key>'"));
    }
    if let Some(h) = &config.sources.api_key_header {
        ways.push(format!("the {h} header"));
    }
    if let Some(q) = &config.sources.query_param {
        ways.push(format!("the {q} query parameter"));
    }
    format!("No API key was presented. Send it in {}.", ways.join(" or "))
}

/// Appends `s` as a JSON string, escaped as serde_json escapes it: `"`, `\\`, and control
/// characters (`\b \t \n \f \r`, the rest as `\u00xx`); everything else as it is.
fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    let mut plain = 0;
    for (i, b) in s.bytes().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            0x08 => "\\b",
            b'\t' => "\\t",
            b'\n' => "\\n",
            0x0c => "\\f",
            b'\r' => "\\r",
            0x00..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[plain..i]);
        plain = i + 1;
        if escape.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.push_str("\\u00");
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        } else {
            out.push_str(escape);
        }
    }
    out.push_str(&s[plain..]);
    out.push('"');
}

/// Appends `"name":"value"`.
fn push_json_field(out: &mut String, name: &str, value: &str) {
    push_json_str(out, name);
    out.push(':');
    push_json_str(out, value);
}

/// Appends `"name":["a","b"]`.
fn push_json_list(out: &mut String, name: &str, values: &[String]) {
    push_json_str(out, name);
    out.push_str(":[");
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_str(out, v);
    }
    out.push(']');
}

#[cfg(test)]
#[allow(clippy::type_complexity)]
mod tests {
    use super::*;
    
    fn reply(d: Denial) -> (u32, Value, Option<String>, Option<String>) {
        let config = Config::from_json(b"{}").unwrap();
        let r = d.reply(&config);
        let header = |n: &str| r.headers.iter().find(|(k, _)| *k == n).map(|(_, v)| v.clone());
        assert_eq!(header("content-type").as_deref(), Some("application/json"));
        let body: Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(body["success"], false);
        (r.status, body["error"].clone(), header("www-authenticate"), header("retry-after"))
    }

    #[test]
    fn every_code_has_its_status_body_and_headers() {
        let cases: Vec<(Denial, u32, &str, Option<&str>, Option<&str>)> = vec![
            (Denial::MissingKey, 401, "MISSING_API_KEY", Some(r#"Bearer realm="keyward""#), None),
            (Denial::MalformedKey { reason: "the key is empty" }, 401, "MALFORMED_API_KEY",
                Some(r#"Bearer realm="keyward", error="invalid_request", error_description="the key is empty""#), None),
            (Denial::InvalidKey, 401, "INVALID_API_KEY", Some(r#"Bearer realm="keyward", error="invalid_token", error_description="the key is not valid""#), None),
            (Denial::RevokedKey { key_id: "key_1".into() }, 401, "REVOKED_API_KEY", Some(r#"Bearer realm="keyward", error="invalid_token", error_description="the key has been revoked""#), None),
            (Denial::ExpiredKey { expired_at: 0, key_id: "key_1".into() }, 401, "EXPIRED_API_KEY", Some(r#"Bearer realm="keyward", error="invalid_token", error_description="the key has expired""#), None),
            (Denial::AccessDisabled { reason: None }, 403, "ACCESS_DISABLED", None, None),
            (Denial::InsufficientScope { required: vec!["read:all".into(), "webhook".into()] }, 403, "INSUFFICIENT_SCOPE",
                Some(r#"Bearer realm="keyward", error="insufficient_scope", scope="read:all webhook""#), None),
            (Denial::PathRestricted { allowed: vec!["/a".into()] }, 403, "INSUFFICIENT_SCOPE", Some(r#"Bearer realm="keyward", error="insufficient_scope""#), None),
            (Denial::TlsRequired, 403, "TLS_REQUIRED", None, None),
            (Denial::RateLimited { retry_after_secs: 0 }, 429, "RATE_LIMITED", None, Some("1")),
            (Denial::RateLimited { retry_after_secs: 7 }, 429, "RATE_LIMITED", None, Some("7")),
            (Denial::KeysUnavailable { retry_after_secs: 5 }, 503, "KEYS_UNAVAILABLE", None, Some("5")),
        ];
        for (denial, status, code, www, retry) in cases {
            let (s, err, w, r) = reply(denial.clone());
            assert_eq!((s, err["code"].as_str(), w.as_deref(), r.as_deref()), (status, Some(code), www, retry), "{denial:?}");
            assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()));
            assert!(err["details"].is_object());
        }
    }

    #[test]
    fn details_carry_the_contract_fields() {
        assert_eq!(reply(Denial::ExpiredKey { expired_at: 1_800_000_000, key_id: "k".into() }).1["details"]["expired_at"], "2027-01-15T08:00:00Z");
        assert_eq!(reply(Denial::InsufficientScope { required: vec!["admin".into()] }).1["details"]["required_scopes"], serde_json::json!(["admin"]));
        assert_eq!(reply(Denial::RateLimited { retry_after_secs: 3 }).1["details"]["retry_after_seconds"], 3);
    }

    #[test]
    fn body_keeps_the_contract_field_order() {
        let config = Config::from_json(b"{}").unwrap();
        let body = Denial::InsufficientScope { required: vec!["a\"b".into()] }.reply(&config).body;
        assert_eq!(
            body,
            r#"{"success":false,"error":{"code":"INSUFFICIENT_SCOPE","message":"The API key lacks a scope this route requires.","details":{"required_scopes":["a\"b"]}}}"#
        );
    }

    /// Exact bodies, field order included: clients and seed 003's examples read them as text.
    #[test]
    fn bodies_are_exact_issue_12() {
        let check = |config: &str, denial: Denial, want: &str| {
            let config = Config::from_json(config.as_bytes()).unwrap();
            assert_eq!(denial.reply(&config).body, want, "{denial:?}");
        };
        check("{}", Denial::MissingKey, r#"{"success":false,"error":{"code":"MISSING_API_KEY","message":"No API key was presented. Send it in the authorization header as 'Bearer <key>' or the x-api-key header.","details":{"header":"authorization"}}}"#);
        check(r#"{"bearer_header": null}"#, Denial::MissingKey, r#"{"success":false,"error":{"code":"MISSING_API_KEY","message":"No API key was presented. Send it in the x-api-key header.","details":{"header":"x-api-key"}}}"#);
        check(r#"{"bearer_header": null, "api_key_header": null, "query_param": "api_key"}"#, Denial::MissingKey, r#"{"success":false,"error":{"code":"MISSING_API_KEY","message":"No API key was presented. Send it in the api_key query parameter.","details":{"query_param":"api_key"}}}"#);
        check("{}", Denial::RevokedKey { key_id: "key_01J".into() }, r#"{"success":false,"error":{"code":"REVOKED_API_KEY","message":"The API key has been revoked.","details":{"key_id":"key_01J"}}}"#);
        check("{}", Denial::ExpiredKey { expired_at: 1_800_000_000, key_id: "key_01J".into() }, r#"{"success":false,"error":{"code":"EXPIRED_API_KEY","message":"The API key expired at 2027-01-15T08:00:00Z.","details":{"expired_at":"2027-01-15T08:00:00Z","key_id":"key_01J"}}}"#);
        check("{}", Denial::AccessDisabled { reason: None }, r#"{"success":false,"error":{"code":"ACCESS_DISABLED","message":"API access is disabled for this key's agent.","details":{}}}"#);
        check("{}", Denial::AccessDisabled { reason: Some("Your plan does not include \"API\" access </script>".into()) }, r#"{"success":false,"error":{"code":"ACCESS_DISABLED","message":"Your plan does not include \"API\" access </script>","details":{}}}"#);
    }

    #[test]
    fn details_with_two_fields_keep_serde_json_s_sorted_order() {
        let config = Config::from_json(b"{}").unwrap();
        assert_eq!(
            Denial::PathRestricted { allowed: vec!["/v1/a".into(), "/v2".into()] }.reply(&config).body,
            r#"{"success":false,"error":{"code":"INSUFFICIENT_SCOPE","message":"The API key is restricted to other paths.","details":{"allowed_path_prefixes":["/v1/a","/v2"],"required_scopes":[]}}}"#
        );
        assert_eq!(
            Denial::RateLimited { retry_after_secs: 12 }.reply(&config).body,
            r#"{"success":false,"error":{"code":"RATE_LIMITED","message":"Rate limit exceeded; retry after 12 seconds.","details":{"retry_after_seconds":12}}}"#
        );
        assert_eq!(
            Denial::MalformedKey { reason: "the key is empty" }.reply(&config).body,
            r#"{"success":false,"error":{"code":"MALFORMED_API_KEY","message":"The API key is malformed: the key is empty.","details":{}}}"#
        );
    }

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        let mut all: String = (0u8..0x80).map(char::from).collect();
        all.push_str("é\u{2028}😀");
        for s in ["", "plain", "a\"b\\c", "</script>", all.as_str()] {
            let mut out = String::new();
            push_json_str(&mut out, s);
            assert_eq!(out, Value::String(s.into()).to_string(), "{s:?}");
        }
    }

    #[test]
    fn internal_error_is_exact() {
        let r = internal_error();
        assert_eq!(r.status, 500);
        assert_eq!(r.body, r#"{"success":false,"error":{"code":"INTERNAL_ERROR","message":"The authentication filter failed; see Envoy's log.","details":{}}}"#);
        assert!(!CODES.contains(&INTERNAL_ERROR), "a fault is not a denial: it has its own counter");
    }

    #[test]
    fn codes_are_unique_and_indexed() {
        let mut seen = CODES.to_vec();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), CODES.len());
        assert_eq!(Denial::TlsRequired.code(), "TLS_REQUIRED");
    }
}

//! The control plane's error type: one enum for the store, the operations, the API and the CLI.

use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad argument. `field` is the request field (the CLI maps it to its flag).
    #[error("{field}: {message}")]
    Invalid { field: &'static str, message: String },
    #[error("{field}: {what} {name:?} not found")]
    NotFound { field: &'static str, what: &'static str, name: String },
    #[error("{field}: {message}")]
    Conflict { field: &'static str, message: String },
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    #[error("request body larger than {0} bytes")]
    TooLarge(usize),
    #[error("database: {0}")]
    Store(#[from] rusqlite::Error),
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub fn invalid(field: &'static str, message: impl Into<String>) -> Error {
    Error::Invalid { field, message: message.into() }
}

impl Error {
    /// The machine-readable code in API error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Invalid { .. } => "VALIDATION_ERROR",
            Error::NotFound { .. } => "NOT_FOUND",
            Error::Conflict { .. } => "CONFLICT",
            Error::Unauthorized(_) => "UNAUTHORIZED",
            Error::TooLarge(_) => "PAYLOAD_TOO_LARGE",
            Error::Store(_) | Error::Internal(_) => "INTERNAL_ERROR",
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            Error::Invalid { .. } => 400,
            Error::Unauthorized(_) => 401,
            Error::NotFound { .. } => 404,
            Error::Conflict { .. } => 409,
            Error::TooLarge(_) => 413,
            Error::Store(_) | Error::Internal(_) => 500,
        }
    }

    pub fn field(&self) -> Option<&'static str> {
        match self {
            Error::Invalid { field, .. } | Error::NotFound { field, .. } | Error::Conflict { field, .. } => Some(field),
            _ => None,
        }
    }

    /// The message without the field prefix.
    pub fn message(&self) -> String {
        match self {
            Error::Invalid { message, .. } | Error::Conflict { message, .. } => message.clone(),
            Error::NotFound { what, name, .. } => format!("{what} {name:?} not found"),
            Error::Unauthorized(m) | Error::Internal(m) => m.clone(),
            Error::TooLarge(n) => format!("the request body is larger than {n} bytes"),
            // Storage details stay in the server log.
            Error::Store(_) => "internal storage error".into(),
        }
    }

    /// The API error body, shaped like the filter's.
    pub fn body(&self) -> serde_json::Value {
        let details = match self.field() {
            Some(f) => json!({ "field": f }),
            None => json!({}),
        };
        json!({"success": false, "error": {"code": self.code(), "message": self.message(), "details": details}})
    }

    /// Rebuilds an error from an API error body (the CLI's `--url` mode).
    pub fn from_body(status: u16, body: &serde_json::Value) -> Error {
        let message = body["error"]["message"].as_str().unwrap_or("unexpected response").to_string();
        let field = body["error"]["details"]["field"].as_str().map(static_field).unwrap_or("request");
        match body["error"]["code"].as_str() {
            Some("VALIDATION_ERROR") => Error::Invalid { field, message },
            Some("CONFLICT") => Error::Conflict { field, message },
            Some("NOT_FOUND") => Error::NotFound { field, what: "resource", name: message },
            Some("UNAUTHORIZED") => Error::Unauthorized(message),
            _ => Error::Internal(format!("HTTP {status}: {message}")),
        }
    }
}

/// Field names the API can report, interned so errors stay `&'static str`.
fn static_field(f: &str) -> &'static str {
    const FIELDS: &[&str] = &[
        "name", "scopes", "rate", "description", "agent", "expires_at", "ttl", "grace", "id", "key", "digest",
        "path_prefixes", "limit", "since", "prefix", "request",
    ];
    FIELDS.iter().find(|x| **x == f).copied().unwrap_or("request")
}

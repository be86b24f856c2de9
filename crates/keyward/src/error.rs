//! The control plane's error type: one enum for the store, the operations, the API and the CLI.

use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad argument. `field` is the request field (the CLI maps it to its flag).
    #[error("{field}: {message}")]
    Invalid { field: &'static str, message: String },
    #[error("{field}: {what} {name:?} not found")]
    NotFound { field: &'static str, what: &'static str, name: String },
    /// A not-found answer from the admin API (`--url`), its message kept as the server said it.
    #[error("{field}: {message}")]
    RemoteNotFound { field: &'static str, message: String },
    #[error("{field}: {message}")]
    Conflict { field: &'static str, message: String },
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// The admin is known, and its role does not allow this.
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("request body larger than {0} bytes")]
    TooLarge(usize),
    /// Too many failed token attempts from one client address.
    #[error("too many failed attempts; retry in {retry_after_secs} s")]
    TooManyAttempts { retry_after_secs: u64 },
    #[error("database: {0}")]
    Store(#[from] rusqlite::Error),
    #[error("database: {0}")]
    Postgres(#[from] postgres::Error),
    #[error("{0}")]
    Internal(String),
    /// No route at this path (API).
    #[error("no route {0}")]
    NoRoute(String),
    /// The route is served on the other listener (`--listen` / `--feed-listen`).
    #[error("{route} is served on the {listener} listener")]
    OtherListener { route: String, listener: &'static str },
    /// The route exists, not with this method (API).
    #[error("method not allowed: {0}")]
    MethodNotAllowed(String),
    /// A command that reads found no store at this path.
    #[error("no keyward store at {0}")]
    Missing(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Storage faults a client can act on: another writer holds the lock, or the disk is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreFault {
    Busy,
    Full,
}

pub fn invalid(field: &'static str, message: impl Into<String>) -> Error {
    Error::Invalid { field, message: message.into() }
}

impl Error {
    /// A busy or full database, told apart from other storage errors.
    pub fn store_fault(&self) -> Option<StoreFault> {
        match self {
            Error::Store(rusqlite::Error::SqliteFailure(e, _)) => match e.code {
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked => Some(StoreFault::Busy),
                rusqlite::ErrorCode::DiskFull => Some(StoreFault::Full),
                _ => None,
            },
            Error::Postgres(e) => match e.code() {
                Some(c) if *c == postgres::error::SqlState::DISK_FULL => Some(StoreFault::Full),
                Some(c)
                    if *c == postgres::error::SqlState::T_R_SERIALIZATION_FAILURE
                        || *c == postgres::error::SqlState::T_R_DEADLOCK_DETECTED
                        || *c == postgres::error::SqlState::LOCK_NOT_AVAILABLE =>
                {
                    Some(StoreFault::Busy)
                }
                // The server went away or is shutting down (a restart, a failover): nothing was
                // changed, and trying again reaches it, or its successor.
                Some(c) if c.code().starts_with("08") || c.code().starts_with("57P") => Some(StoreFault::Busy),
                None if e.is_closed() => Some(StoreFault::Busy),
                _ => None,
            },
            _ => None,
        }
    }

    /// `Retry-After` seconds for the API answer, where one applies.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match (self, self.store_fault()) {
            (Error::TooManyAttempts { retry_after_secs }, _) => Some(*retry_after_secs),
            (_, Some(StoreFault::Busy)) => Some(1),
            (_, Some(StoreFault::Full)) => Some(30),
            _ => None,
        }
    }

    /// The machine-readable code in API error bodies.
    pub fn code(&self) -> &'static str {
        match self.store_fault() {
            Some(StoreFault::Busy) => return "STORE_BUSY",
            Some(StoreFault::Full) => return "STORE_FULL",
            None => {}
        }
        match self {
            Error::Invalid { .. } => "VALIDATION_ERROR",
            Error::NotFound { .. } | Error::RemoteNotFound { .. } => "NOT_FOUND",
            Error::Conflict { .. } => "CONFLICT",
            Error::Unauthorized(_) => "UNAUTHORIZED",
            Error::Forbidden(_) => "FORBIDDEN",
            Error::TooLarge(_) => "PAYLOAD_TOO_LARGE",
            Error::TooManyAttempts { .. } => "TOO_MANY_ATTEMPTS",
            Error::Store(_) | Error::Postgres(_) | Error::Internal(_) => "INTERNAL_ERROR",
            Error::Missing(_) | Error::NoRoute(_) | Error::OtherListener { .. } => "NOT_FOUND",
            Error::MethodNotAllowed(_) => "METHOD_NOT_ALLOWED",
        }
    }

    pub fn status(&self) -> u16 {
        match self.store_fault() {
            Some(StoreFault::Busy) => return 503,
            Some(StoreFault::Full) => return 507,
            None => {}
        }
        match self {
            Error::Invalid { .. } => 400,
            Error::Unauthorized(_) => 401,
            Error::Forbidden(_) => 403,
            Error::NotFound { .. } | Error::RemoteNotFound { .. } => 404,
            Error::Conflict { .. } => 409,
            Error::TooLarge(_) => 413,
            Error::TooManyAttempts { .. } => 429,
            Error::Store(_) | Error::Postgres(_) | Error::Internal(_) => 500,
            Error::Missing(_) | Error::NoRoute(_) | Error::OtherListener { .. } => 404,
            Error::MethodNotAllowed(_) => 405,
        }
    }

    pub fn field(&self) -> Option<&'static str> {
        match self {
            Error::Invalid { field, .. } | Error::NotFound { field, .. } | Error::Conflict { field, .. } | Error::RemoteNotFound { field, .. } => {
                Some(field)
            }
            _ => None,
        }
    }

    /// The message, after the field it is about if there is one: what a person reads.
    pub fn message_with_field(&self) -> String {
        match self.field() {
            Some(f) => format!("{f}: {}", self.message()),
            None => self.message(),
        }
    }

    /// The message without the field prefix.
    pub fn message(&self) -> String {
        match self {
            Error::Invalid { message, .. } | Error::Conflict { message, .. } | Error::RemoteNotFound { message, .. } => message.clone(),
            Error::NotFound { what, name, .. } => format!("{what} {name:?} not found"),
            Error::Unauthorized(m) | Error::Forbidden(m) | Error::Internal(m) => m.clone(),
            Error::NoRoute(r) => format!("there is no route {r}; the admin API is described in openapi.json"),
            Error::OtherListener { route, listener } => {
                let flag = if *listener == "feed" { "--feed-listen" } else { "--listen" };
                format!("{route} is served on the {listener} listener ({flag}), not on this one")
            }
            Error::MethodNotAllowed(r) => format!("{r}: this route does not take that method; the admin API is described in openapi.json"),
            Error::Missing(path) => format!(
                "no keyward store at {path}: create an agent first (`keyward agent create`), or pass --db / --url to use another store"
            ),
            Error::TooLarge(n) => format!("the request body is larger than {n} bytes"),
            Error::TooManyAttempts { retry_after_secs } => {
                format!("too many requests with a wrong token from this address; retry in {retry_after_secs} s")
            }
            Error::Store(_) | Error::Postgres(_) => match self.store_fault() {
                Some(StoreFault::Busy) if matches!(self, Error::Postgres(_)) => {
                    "the database is busy or unreachable (restarting, failing over?); nothing was changed, try again".into()
                }
                Some(StoreFault::Busy) => "the database is locked by another writer; nothing was changed, try again".into(),
                Some(StoreFault::Full) => "the disk holding the database is full; nothing was changed".into(),
                // Storage details stay in the server log.
                None => "internal storage error".into(),
            },
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
            Some("NOT_FOUND") => Error::RemoteNotFound { field, message },
            Some("UNAUTHORIZED") => Error::Unauthorized(message),
            Some("FORBIDDEN") => Error::Forbidden(message),
            _ => Error::Internal(format!("HTTP {status}: {message}")),
        }
    }
}

/// Field names the API can report, interned so errors stay `&'static str`.
fn static_field(f: &str) -> &'static str {
    const FIELDS: &[&str] = &[
        "name", "scopes", "rate", "description", "agent", "expires_at", "ttl", "grace", "id", "key", "digest",
        "path_prefixes", "limit", "since", "prefix", "request", "burst", "reason", "add_scopes", "remove_scopes", "implies",
        "no_expiry", "allow_weak", "role",
    ];
    FIELDS.iter().find(|x| **x == f).copied().unwrap_or("request")
}

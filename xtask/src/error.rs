//! The one error type of `cargo xtask`: every module returns it, `main` prints it and exits
//! non-zero.

use std::fmt;

/// Why a command failed, in words for the terminal.
#[derive(Debug)]
pub enum Error {
    /// A check that did not hold or a command that failed, with what is known about it.
    Message(String),
    /// An I/O error with nothing to add.
    Io(std::io::Error),
    /// JSON that did not parse (a tool's summary, a response body).
    Json(serde_json::Error),
}

pub type Result<T = ()> = std::result::Result<T, Error>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Message(m) => f.write_str(m),
            Error::Io(e) => e.fmt(f),
            Error::Json(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Message(_) => None,
            Error::Io(e) => Some(e),
            Error::Json(e) => Some(e),
        }
    }
}

impl From<String> for Error {
    fn from(message: String) -> Self {
        Error::Message(message)
    }
}

impl From<&str> for Error {
    fn from(message: &str) -> Self {
        Error::Message(message.to_string())
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e)
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::Json(e)
    }
}

//! keyward's pure core: everything the filter decides, as plain functions of their inputs.
//!
//! Nothing here performs I/O, reads a clock or touches proxy-wasm. The current time and all
//! state are passed in, so every rule is tested natively with `cargo test`.

pub mod authorize;
pub mod buckets;
pub mod config;
pub mod credential;
pub mod decision;
pub mod digest;
pub mod feed;
pub mod fetch;
pub mod keyformat;
pub mod ratelimit;
pub mod response;
pub mod rules;
pub mod scope;
pub mod snapshot;
pub mod time;
pub mod usage;
pub mod url;

pub use config::{Config, ConfigError};
pub use credential::{Credential, CredentialError};
pub use decision::{decide, Decision, Denial, Identity, KeyLookup, LookupError, NoKeys, Request};
pub use digest::Digest;
pub use response::LocalReply;
pub use snapshot::{KeyRecord, KeyStatus, RateLimit, Snapshot};
pub use authorize::{authorize, Action, Plan};

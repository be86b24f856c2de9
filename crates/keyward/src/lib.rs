//! keyward's control plane: agents and keys in SQLite (digests only), the admin HTTP API, and
//! the CLI. `keyward-core` supplies the key format, digests and the snapshot wire types.

pub mod api;
pub mod applied;
pub mod cli;
pub mod client;
pub mod console;
pub mod error;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod output;
pub mod progress;
pub mod rates;
pub mod store;
pub mod tls;

//! keyward.wasm: the proxy-wasm shell around `keyward-core`.
//!
//! It translates between Envoy and the core and decides nothing: read the configuration,
//! gather each request's headers and properties, apply the core's plan (`filter`), and, with a
//! control plane, keep the snapshot in shared data current (`fetcher`, `shared`). Every hostcall
//! goes through `host::Host`.

pub mod fetcher;
pub mod filter;
pub mod host;
mod http;
mod root;
pub mod shared;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

proxy_wasm::main! {{
    std::panic::set_hook(Box::new(|info| {
        use host::Host as _;
        host::EnvoyHost.log(host::LogLevel::Critical, &format!("panic: {info}"));
    }));
    proxy_wasm::set_root_context(|context_id| Box::new(root::Root::new(context_id)));
}}

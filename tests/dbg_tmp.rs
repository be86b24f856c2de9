#![allow(clippy::unwrap_used)]
use keyward_testkit::*;
use serde_json::json;
#[test]
fn dbg() {
    let k = Keyward::start();
    let echo = Echo::start(0).unwrap();
    let mut opts = EnvoyOptions::new(json!({"control_plane": {"cluster": "keyward", "feed_wait_secs": 5}}), echo.port());
    opts.control_plane_port = Some(k.port);
    opts.extra_args = vec!["--component-log-level".into(), "wasm:debug".into()];
    let envoy = Envoy::start(&opts);
    std::thread::sleep(std::time::Duration::from_secs(3));
    println!("{}", envoy.log().lines().filter(|l| l.contains("wasm") || l.contains("error")).collect::<Vec<_>>().join("\n"));
    println!("---- keyward\n{}", k.log());
    println!("{}", k.api_get("/v1/status"));
}

//! A load driver for rate limits across several Envoys: one key, sent at a fixed rate, spread
//! over the Envoys by a shape (round-robin, or skewed like a sticky load balancer), with a hook
//! to break things mid-run. Used by `tests/envoy_fleet.rs` and `cargo xtask bench --fleet`.

use crate::{poll_until, Echo, Envoy, EnvoyOptions, Keyward};
use serde_json::json;
use std::time::{Duration, Instant};

/// Envoys in a [`Stack`].
pub const ENVOYS: usize = 3;
/// The filter's `rate_sync_ms` in a [`Stack`].
pub const SYNC_MS: u64 = 250;

/// Three real Envoys (`--concurrency 2` each) in front of one echo upstream: with keyward.wasm
/// fed by one real `keyward serve` (with a real `redis-server` as its rate store, or none), or
/// with Envoy's own `local_ratelimit` and no keyward, for comparison.
pub struct Stack {
    pub envoys: Vec<Envoy>,
    pub keyward: Option<Keyward>,
    pub redis: Option<crate::redis::Redis>,
    _echo: Echo,
}

/// The Envoys' node ids.
pub fn node(i: usize) -> String {
    format!("fleet-{i}")
}

impl Stack {
    pub fn keyward(with_redis: bool) -> Stack {
        let redis = with_redis.then(crate::redis::Redis::start);
        let keyward = match &redis {
            Some(r) => Keyward::start_with(&["--rate-store", &r.url()], &[]),
            None => Keyward::start(),
        };
        let echo = Echo::start(0).unwrap_or_else(|e| panic!("echo upstream: {e}"));
        let config = json!({
            "rules": [{"methods": ["GET"], "scopes": ["read:all"]}],
            "control_plane": {"cluster": "keyward", "feed_wait_secs": 5, "usage_report_secs": 1, "rate_sync_ms": SYNC_MS}
        });
        let envoys = (0..ENVOYS)
            .map(|i| {
                let mut opts = EnvoyOptions::new(config.clone(), echo.port());
                opts.control_plane_port = Some(keyward.port);
                opts.node_id = node(i);
                opts.concurrency = 2;
                Envoy::start(&opts)
            })
            .collect();
        Stack { envoys, keyward: Some(keyward), redis, _echo: echo }
    }

    /// Envoy's `local_ratelimit`: a token bucket of `per_second` on each Envoy, no keyward.
    pub fn local_ratelimit(per_second: u32) -> Stack {
        let echo = Echo::start(0).unwrap_or_else(|e| panic!("echo upstream: {e}"));
        let percent = json!({"default_value": {"numerator": 100, "denominator": "HUNDRED"}});
        let filter = json!({
            "name": "envoy.filters.http.local_ratelimit",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
                "stat_prefix": "local_rl",
                "token_bucket": {"max_tokens": per_second, "tokens_per_fill": per_second, "fill_interval": "1s"},
                "filter_enabled": {"runtime_key": "local_rl_enabled", "default_value": percent["default_value"]},
                "filter_enforced": {"runtime_key": "local_rl_enforced", "default_value": percent["default_value"]}
            }
        });
        let routes = json!([{"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}]);
        let envoys = (0..ENVOYS)
            .map(|i| {
                let mut opts = EnvoyOptions::new(json!({}), echo.port());
                opts.concurrency = 2;
                opts.bootstrap = Some(crate::listener_bootstrap(&node(i), routes.clone(), vec![filter.clone()], vec![crate::loopback_cluster("upstream", echo.port())]));
                Envoy::start(&opts)
            })
            .collect();
        Stack { envoys, keyward: None, redis: None, _echo: echo }
    }

    pub fn ports(&self) -> Vec<u16> {
        self.envoys.iter().map(|e| e.port).collect()
    }

    /// A new key limited to `per_second` (a fresh bucket), once every Envoy has applied it and
    /// learned the fleet; any string for `local_ratelimit`, which reads no key.
    pub fn key(&self, name: &str, per_second: u32) -> String {
        let Some(keyward) = &self.keyward else {
            return format!("unused-{name}");
        };
        if keyward.api_get("/v1/agents").as_array().is_none_or(|a| a.is_empty()) {
            keyward.api_post("/v1/agents", &json!({"name": "fleet", "scopes": ["read:all"]}));
        }
        let made = keyward.api_post("/v1/keys", &json!({"agent": "fleet", "name": name, "rate": format!("{per_second}/s")}));
        let secret = made["secret"].as_str().unwrap_or_else(|| panic!("{made}")).to_string();
        poll_until(Duration::from_secs(20), "every Envoy to apply the key and report to the control plane", || {
            let status = keyward.api_get("/v1/status");
            let applied = (0..ENVOYS).all(|i| {
                status["envoys"].as_array().into_iter().flatten().any(|e| e["id"] == node(i).as_str() && e["applied_version"] == status["snapshot_version"])
            });
            let synced = self.envoys.iter().all(|e| e.stat("wasmcustom.keyward.rate_limit.syncs").unwrap_or(0) >= 2);
            (applied && synced).then_some(())
        });
        // The next heartbeat (at most a second) tells every Envoy its share of three.
        std::thread::sleep(Duration::from_millis(1_200));
        secret
    }
}

/// How requests are spread over the Envoys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shape {
    /// Request `i` goes to Envoy `i mod n`.
    RoundRobin,
    /// Weights per Envoy, e.g. `[90, 5, 5]`: out of every `sum` requests, `w[k]` go to Envoy `k`.
    Skew(Vec<u32>),
}

impl Shape {
    /// The Envoy request `i` goes to.
    pub fn pick(&self, i: u64, envoys: usize) -> usize {
        match self {
            Shape::RoundRobin => (i % envoys.max(1) as u64) as usize,
            Shape::Skew(w) => {
                let total: u64 = w.iter().map(|x| u64::from(*x)).sum::<u64>().max(1);
                let mut slot = i % total;
                for (k, weight) in w.iter().enumerate() {
                    if slot < u64::from(*weight) {
                        return k.min(envoys.saturating_sub(1));
                    }
                    slot -= u64::from(*weight);
                }
                0
            }
        }
    }

    pub fn label(&self) -> String {
        match self {
            Shape::RoundRobin => "round-robin".into(),
            Shape::Skew(w) => w.iter().map(u32::to_string).collect::<Vec<_>>().join("/"),
        }
    }
}

/// What a run got back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    /// 2xx answers.
    pub admitted: u64,
    /// 429 answers.
    pub limited: u64,
    /// 5xx answers, and requests that got no answer.
    pub errors: u64,
    /// Anything else (401, 403, …).
    pub other: u64,
    /// Per Envoy: admitted, limited.
    pub per_envoy: Vec<(u64, u64)>,
    /// The slowest answer.
    pub slowest: Duration,
    /// The first few error descriptions.
    pub error_samples: Vec<String>,
}

impl Tally {
    pub fn sent(&self) -> u64 {
        self.admitted + self.limited + self.errors + self.other
    }
}

/// Sends `GET path` with `x-api-key: key` at `per_second` for `duration`, spread over `ports`
/// by `shape`, each request on a new connection. `during` is called before each request with
/// the time since the start (stop Redis at 7 s, say). Requests are paced to their slots; one
/// that falls behind is sent at once.
pub fn drive(ports: &[u16], key: &str, path: &str, per_second: u32, duration: Duration, shape: &Shape, mut during: impl FnMut(Duration)) -> Tally {
    let mut tally = Tally { per_envoy: vec![(0, 0); ports.len()], ..Tally::default() };
    let total = (u128::from(per_second) * duration.as_millis() / 1000) as u64;
    let start = Instant::now();
    for i in 0..total {
        let due = start + Duration::from_micros(i * 1_000_000 / u64::from(per_second.max(1)));
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        during(start.elapsed());
        let k = shape.pick(i, ports.len());
        let sent = Instant::now();
        let answer = crate::request(ports[k], "GET", path, &[("x-api-key", key.as_bytes())]);
        tally.slowest = tally.slowest.max(sent.elapsed());
        match answer {
            Ok(r) if (200..300).contains(&r.status) => {
                tally.admitted += 1;
                tally.per_envoy[k].0 += 1;
            }
            Ok(r) if r.status == 429 => {
                tally.limited += 1;
                tally.per_envoy[k].1 += 1;
            }
            Ok(r) if r.status >= 500 => {
                tally.errors += 1;
                if tally.error_samples.len() < 5 {
                    tally.error_samples.push(format!("envoy {k} at {:?}: {} {}", start.elapsed(), r.status, String::from_utf8_lossy(&r.body)));
                }
            }
            Ok(_) => tally.other += 1,
            Err(e) => {
                tally.errors += 1;
                if tally.error_samples.len() < 5 {
                    tally.error_samples.push(format!("envoy {k} at {:?}: {e}", start.elapsed()));
                }
            }
        }
    }
    tally
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_spread_requests_as_their_weights_say() {
        let count = |shape: &Shape| {
            let mut c = [0u32; 3];
            for i in 0..100 {
                c[shape.pick(i, 3)] += 1;
            }
            c
        };
        assert_eq!(count(&Shape::RoundRobin), [34, 33, 33]);
        assert_eq!(count(&Shape::Skew(vec![90, 5, 5])), [90, 5, 5]);
        assert_eq!(Shape::Skew(vec![90, 5, 5]).label(), "90/5/5");
    }
}

//! `GET /metrics`: what `keyward serve` counts, and how a scrape renders it (OpenMetrics text,
//! through `prometheus-client`).
//!
//! Counters, the histogram and the feed-client gauge live for the process; the replica's
//! identity, the snapshot version and each Envoy's applied version are read at scrape time.

use crate::model::StatusView;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::time::Duration;

/// The `content-type` of a scrape's answer.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabels {
    mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReplicaLabels {
    replica: String,
    engine: String,
    role: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EnvoyLabels {
    envoy: String,
    replica: String,
}

fn store_histogram() -> Histogram {
    // 100 µs (an indexed read) to 5 s (a million-key snapshot, a busy store).
    Histogram::new([0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0])
}

fn rate_store_histogram() -> Histogram {
    // 100 µs (a report of one bucket on loopback) to the 400 ms bound.
    Histogram::new([0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4])
}

/// The process-lifetime metrics. Cheap to update from any thread.
pub struct Metrics {
    changes: Counter,
    lockouts: Counter,
    feed_clients: Gauge,
    store_seconds: Family<OpLabels, Histogram, fn() -> Histogram>,
    rate_reports: Family<ModeLabels, Counter>,
    rate_buckets: Counter,
    rate_store_failures: Counter,
    rate_store_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            changes: Counter::default(),
            lockouts: Counter::default(),
            feed_clients: Gauge::default(),
            store_seconds: Family::new_with_constructor(store_histogram),
            rate_reports: Family::default(),
            rate_buckets: Counter::default(),
            rate_store_failures: Counter::default(),
            rate_store_seconds: rate_store_histogram(),
        }
    }
}

/// One Envoy's series: who it is, which replica holds its feed, where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvoySeries {
    pub envoy: String,
    /// The replica the Envoy talks to; empty where the store does not say.
    pub replica: String,
    pub applied_version: u64,
    pub lag: u64,
}

/// The Envoys of a `status()` answer, as series.
pub fn envoy_series(status: &StatusView) -> Vec<EnvoySeries> {
    status
        .envoys
        .iter()
        .map(|e| EnvoySeries { envoy: e.id.clone(), replica: e.replica.clone().unwrap_or_default(), applied_version: e.applied_version, lag: e.lag })
        .collect()
}

/// What a scrape reads at its own time.
pub struct Scrape<'a> {
    pub replica: &'a str,
    pub engine: &'a str,
    /// What the listener answering the scrape serves: `admin`, `feed` or `admin+feed`.
    pub role: &'a str,
    pub snapshot_version: u64,
    pub envoys: &'a [EnvoySeries],
    /// With `--rate-store`: whether it answered this replica's last call.
    pub rate_store_up: Option<bool>,
}

/// Held while a feed request is open; counted in `keyward_feed_clients`.
pub struct FeedClient<'a>(&'a Gauge);

impl Drop for FeedClient<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn as_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Metrics {
    /// A change committed a snapshot version.
    pub fn change(&self) {
        self.changes.inc();
    }

    /// A client address became blocked by the token guard.
    pub fn lockout(&self) {
        self.lockouts.inc();
    }

    /// Counts a feed request as open until the returned guard drops (answered or cancelled).
    pub fn feed_client(&self) -> FeedClient<'_> {
        self.feed_clients.inc();
        FeedClient(&self.feed_clients)
    }

    /// A store operation named `op` took `took`.
    pub fn store_op(&self, op: &'static str, took: Duration) {
        self.store_seconds.get_or_create(&OpLabels { op }).observe(took.as_secs_f64());
    }

    /// A rate report was answered in `mode`, for `buckets` buckets.
    pub fn rate_report(&self, mode: keyward_core::feed::RateMode, buckets: usize) {
        let mode = match mode {
            keyward_core::feed::RateMode::Global => "global",
            keyward_core::feed::RateMode::Split => "split",
        };
        self.rate_reports.get_or_create(&ModeLabels { mode }).inc();
        self.rate_buckets.inc_by(buckets as u64);
    }

    /// A rate report fell back to `split` because the rate store failed (or was backing off).
    pub fn rate_store_failure(&self) {
        self.rate_store_failures.inc();
    }

    /// A report's call to the rate store took `took` (answered or not).
    pub fn rate_store_call(&self, took: Duration) {
        self.rate_store_seconds.observe(took.as_secs_f64());
    }

    /// The OpenMetrics text of a scrape.
    pub fn render(&self, scrape: &Scrape<'_>) -> Result<String, std::fmt::Error> {
        // A registry per scrape: the lifetime metrics are shared handles (registered by clone),
        // the scrape-time ones are built fresh, so an Envoy that is gone leaves no series.
        let mut r = Registry::default();
        let info = Family::<ReplicaLabels, Gauge>::default();
        info.get_or_create(&ReplicaLabels { replica: scrape.replica.into(), engine: scrape.engine.into(), role: scrape.role.into() }).set(1);
        r.register("keyward_replica_info", "This replica: its name, store engine and what this listener serves", info);
        let version = Gauge::<i64>::default();
        version.set(as_i64(scrape.snapshot_version));
        r.register("keyward_snapshot_version", "The store's snapshot version", version);
        r.register("keyward_feed_clients", "Feed requests (Envoy long-polls) held open by this process now", self.feed_clients.clone());
        let applied = Family::<EnvoyLabels, Gauge>::default();
        let lag = Family::<EnvoyLabels, Gauge>::default();
        for e in scrape.envoys {
            let labels = EnvoyLabels { envoy: e.envoy.clone(), replica: e.replica.clone() };
            applied.get_or_create(&labels).set(as_i64(e.applied_version));
            lag.get_or_create(&labels).set(as_i64(e.lag));
        }
        r.register("keyward_envoy_applied_version", "The snapshot version each Envoy has applied", applied);
        r.register("keyward_envoy_lag_versions", "Versions each Envoy is behind the store", lag);
        r.register("keyward_changes", "Changes committed through this process's API (each one snapshot version)", self.changes.clone());
        r.register(
            "keyward_store_operation_seconds",
            "Time of a store operation by the API, waiting for the store included",
            self.store_seconds.clone(),
        );
        r.register(
            "keyward_admin_guard_lockouts",
            "Times a client address became blocked for too many wrong tokens",
            self.lockouts.clone(),
        );
        r.register("keyward_rate_reports", "Rate reports from Envoys (POST /v1/feed/rates) by the mode answered", self.rate_reports.clone());
        r.register("keyward_rate_buckets", "Buckets in the rate reports answered", self.rate_buckets.clone());
        if let Some(up) = scrape.rate_store_up {
            let gauge = Gauge::<i64>::default();
            gauge.set(i64::from(up));
            r.register("keyward_rate_store_up", "Whether the rate store (--rate-store) answered this replica's last call", gauge);
            r.register(
                "keyward_rate_store_failures",
                "Rate reports answered split because the rate store failed, timed out, or was backing off after a failure",
                self.rate_store_failures.clone(),
            );
            r.register("keyward_rate_store_seconds", "Time of a rate report's call to the rate store, bounded at 0.4 s", self.rate_store_seconds.clone());
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_scrape_names_every_metric_with_its_labels() {
        let m = Metrics::default();
        m.change();
        m.lockout();
        m.store_op("key.create", Duration::from_millis(3));
        let _open = m.feed_client();
        let envoys = [EnvoySeries { envoy: "edge-1".into(), replica: "kw-0".into(), applied_version: 7, lag: 2 }];
        m.rate_report(keyward_core::feed::RateMode::Global, 3);
        m.rate_report(keyward_core::feed::RateMode::Split, 0);
        m.rate_store_failure();
        m.rate_store_call(Duration::from_millis(1));
        let text = m
            .render(&Scrape { replica: "kw-0", engine: "sqlite", role: "admin+feed", snapshot_version: 9, envoys: &envoys, rate_store_up: Some(false) })
            .unwrap();
        for line in [
            r#"keyward_replica_info{replica="kw-0",engine="sqlite",role="admin+feed"} 1"#,
            "keyward_snapshot_version 9",
            "keyward_feed_clients 1",
            r#"keyward_envoy_applied_version{envoy="edge-1",replica="kw-0"} 7"#,
            r#"keyward_envoy_lag_versions{envoy="edge-1",replica="kw-0"} 2"#,
            "keyward_changes_total 1",
            r#"keyward_store_operation_seconds_count{op="key.create"} 1"#,
            "keyward_admin_guard_lockouts_total 1",
            r#"keyward_rate_reports_total{mode="global"} 1"#,
            r#"keyward_rate_reports_total{mode="split"} 1"#,
            "keyward_rate_buckets_total 3",
            "keyward_rate_store_up 0",
            "keyward_rate_store_failures_total 1",
            "keyward_rate_store_seconds_count 1",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} missing from\n{text}");
        }
    }

    #[test]
    fn a_closed_feed_request_is_no_longer_counted() {
        let m = Metrics::default();
        drop(m.feed_client());
        let text = m.render(&Scrape { replica: "r", engine: "sqlite", role: "feed", snapshot_version: 0, envoys: &[], rate_store_up: None }).unwrap();
        assert!(text.lines().any(|l| l == "keyward_feed_clients 0"), "{text}");
        assert!(!text.contains("keyward_rate_store_up"), "no rate store, no rate store series: {text}");
    }
}

//! Fleet-wide rate limits, the control plane's side: `POST /v1/feed/rates`.
//!
//! Each Envoy reports what its buckets admitted since its last report. With `--rate-store`,
//! `keyward serve` adds that to Redis with one Lua script (one pipelined round trip per report)
//! and answers, per bucket, what the *other* Envoys admitted in the bucket's current window
//! (`global`). Without a rate store, or while Redis does not answer in time, it answers
//! `split`: the number of connected Envoys, by which each Envoy divides every limit. No report
//! waits on Redis longer than [`REDIS_BOUND`].
//!
//! The rules are pure functions with tables ([`validate`], [`window`], [`script_args`],
//! [`HotBuckets`], [`merge`]); [`RateStore`] only moves them to and from Redis.

use crate::error::{invalid, Result};
use crate::model::{HotBucket, RateLimitsView, RatesRuntime};
use keyward_core::feed::{BucketAnswer, RateAnswer, RateMode, RateReport, RATE_REPORT_MAX_BUCKETS};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Longest bucket name accepted (`k:<lineage>`, `a:<agent id>` are far shorter).
pub const BUCKET_MAX_BYTES: usize = 200;
/// Longest Envoy id accepted (as on `GET /v1/feed`).
pub const ENVOY_MAX_BYTES: usize = 256;
/// Largest `admitted` accepted: sums stay exact in Lua's numbers (doubles).
pub const MAX_ADMITTED: u64 = 1 << 53;
/// One attempt to connect to Redis (its handshake included).
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(200);
/// One call to Redis (the report's script, or a PING).
pub const CALL_TIMEOUT: Duration = Duration::from_millis(200);
/// The longest a report waits on Redis, whatever Redis does: one connection and one call.
/// Past it, the report is answered `split`.
pub const REDIS_BOUND: Duration = Duration::from_millis(400);
/// The longest a report waits on the store for the fleet size (a long import may hold it);
/// then the last size read answers.
pub const STORE_WAIT: Duration = Duration::from_millis(400);
/// After a failure, Redis is tried again after this, doubling up to [`BACKOFF_MAX`]; reports
/// in between are answered `split` at once.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// A failing rate store is logged at most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// Hot buckets shown by `keyward status`.
pub const HOT_SHOWN: usize = 20;
/// Buckets a replica remembers for the hot list.
const HOT_TRACKED: usize = 1_000;
/// How often a replica writes its runtime view into the store (and checks an idle Redis).
pub const PERSIST_EVERY: Duration = Duration::from_secs(2);
/// A replica's runtime view older than this is not shown: the replica is gone.
pub const RUNTIME_LIVE_SECS: i64 = 10;
/// A reporting Envoy is written to the store as seen at most this often (it reports every
/// 250 ms; it stays connected for 2 s after each).
const SEEN_EVERY: Duration = Duration::from_secs(1);
/// The Redis key prefix of every count.
pub const KEY_PREFIX: &str = "kwrl:";
/// Buckets per invocation of [`SCRIPT`]: a report's invocations go in one pipelined round trip.
/// Measured on Redis 7.0, 2,000 buckets take about 70 ms as one invocation (a script's time
/// grows faster than its arguments) and about 28 ms as eight of 250, and no invocation holds
/// Redis (every other client waits on a script) for more than a few milliseconds.
pub const SCRIPT_CHUNK: usize = 250;

/// What a report does in Redis, for up to [`SCRIPT_CHUNK`] buckets: each bucket's addition
/// and its read of the window are one atomic step. `ARGV[1]` is the reporting Envoy's hash
/// field; then five arguments per bucket: its slot key prefix, the current slot, the slots in
/// its window, a slot's time to live (ms) and what the Envoy admitted since its last report.
/// Answers two integers per bucket: what the other Envoys admitted in the window, and the
/// window's total.
pub const SCRIPT: &str = r#"
local field = ARGV[1]
local out = {}
for i = 2, #ARGV, 5 do
  local prefix = ARGV[i]
  local slot = tonumber(ARGV[i + 1])
  local slots = tonumber(ARGV[i + 2])
  if tonumber(ARGV[i + 4]) > 0 then
    local key = prefix .. ARGV[i + 1]
    redis.call('HINCRBY', key, '_total', ARGV[i + 4])
    redis.call('HINCRBY', key, field, ARGV[i + 4])
    redis.call('PEXPIRE', key, ARGV[i + 3])
  end
  local total, own = 0, 0
  for s = slot - slots + 1, slot do
    local v = redis.call('HMGET', prefix .. string.format('%d', s), '_total', field)
    total = total + (tonumber(v[1]) or 0)
    own = own + (tonumber(v[2]) or 0)
  end
  local others = total - own
  if others < 0 then others = 0 end
  out[#out + 1] = others
  out[#out + 1] = total
end
return out
"#;

/// Refuses a report that names nothing sensible; the error names the field.
pub fn validate(report: &RateReport) -> Result<()> {
    let bad_name = |s: &str, max: usize| s.is_empty() || s.len() > max || s.chars().any(char::is_control);
    if bad_name(&report.envoy, ENVOY_MAX_BYTES) {
        return Err(invalid("envoy", format!("1 to {ENVOY_MAX_BYTES} bytes, no control characters")));
    }
    if report.buckets.len() > RATE_REPORT_MAX_BUCKETS {
        return Err(invalid(
            "buckets",
            format!("at most {RATE_REPORT_MAX_BUCKETS} buckets in one report, this one has {}: send the rest in the next", report.buckets.len()),
        ));
    }
    for (i, b) in report.buckets.iter().enumerate() {
        if bad_name(&b.bucket, BUCKET_MAX_BYTES) {
            return Err(invalid("bucket", format!("buckets[{i}].bucket: 1 to {BUCKET_MAX_BYTES} bytes, no control characters")));
        }
        if b.count == 0 {
            return Err(invalid("count", format!("buckets[{i}].count of {:?} is 0: a limit admits at least 1 request", b.bucket)));
        }
        if b.period_secs == 0 {
            return Err(invalid("period_secs", format!("buckets[{i}].period_secs of {:?} is 0: a period is at least 1 second", b.bucket)));
        }
        if b.admitted > MAX_ADMITTED {
            return Err(invalid("admitted", format!("buckets[{i}].admitted of {:?} is over {MAX_ADMITTED}", b.bucket)));
        }
    }
    Ok(())
}

/// Where a count lands: sub-windows of `sub_ms`, the current one numbered `slot`; the window is
/// the last `slots` of them, the current one included: a period and one more sub-window, so no
/// admission within the last period is ever left out. It may count up to one sub-window of
/// requests that already aged out of the period: conservative.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub sub_ms: u64,
    pub slot: u64,
    pub slots: u64,
    /// A slot's time to live: it is read for a period after it ends, plus a sub-window of slack.
    pub ttl_ms: u64,
}

/// The window of a limit of period `period_secs` at `now_ms` (serve's clock, Unix ms):
/// sub-windows of a tenth of the period, at least 100 ms.
pub fn window(period_secs: u32, now_ms: u64) -> Window {
    let period_ms = u64::from(period_secs.max(1)) * 1000;
    let sub_ms = (period_ms / 10).max(100);
    Window { sub_ms, slot: now_ms / sub_ms, slots: period_ms.div_ceil(sub_ms) + 1, ttl_ms: period_ms + 2 * sub_ms }
}

/// The Redis key of a bucket's slot, before the slot number: `kwrl:{<bucket>}:<sub_ms>:`. The
/// braces keep a bucket's slots on one Redis Cluster node; the sub-window length keeps a limit
/// whose period changed from reading the old period's slots.
pub fn slot_prefix(bucket: &str, sub_ms: u64) -> String {
    format!("{KEY_PREFIX}{{{bucket}}}:{sub_ms}:")
}

/// The Envoy's field in a slot's hash (`_total` is the slot's sum; no Envoy field starts with `_`).
pub fn envoy_field(envoy: &str) -> String {
    format!("e:{envoy}")
}

/// [`SCRIPT`]'s arguments, one invocation per [`SCRIPT_CHUNK`] buckets (one for no bucket:
/// an empty report still asks Redis, whose answer says the mode).
pub fn script_args(report: &RateReport, now_ms: u64) -> Vec<Vec<String>> {
    let field = envoy_field(&report.envoy);
    let mut chunks: Vec<Vec<String>> = report.buckets.chunks(SCRIPT_CHUNK).map(|c| chunk_args(&field, c, now_ms)).collect();
    if chunks.is_empty() {
        chunks.push(vec![field]);
    }
    chunks
}

fn chunk_args(field: &str, buckets: &[keyward_core::feed::BucketReport], now_ms: u64) -> Vec<String> {
    let mut args = Vec::with_capacity(1 + 5 * buckets.len());
    args.push(field.to_string());
    for b in buckets {
        let w = window(b.period_secs, now_ms);
        args.push(slot_prefix(&b.bucket, w.sub_ms));
        args.push(w.slot.to_string());
        args.push(w.slots.to_string());
        args.push(w.ttl_ms.to_string());
        args.push(b.admitted.to_string());
    }
    args
}

/// `(others, total)` per bucket from [`SCRIPT`]'s answer; `None` if it does not fit the report.
pub fn parse_reply(reply: &[u64], buckets: usize) -> Option<Vec<(u64, u64)>> {
    (reply.len() == 2 * buckets).then(|| reply.chunks_exact(2).map(|c| (c[0], c[1])).collect())
}

/// The answer to a report: `global` with the others' counts when Redis gave them, else `split`.
pub fn answer(report: &RateReport, envoys: u64, counts: Option<&[(u64, u64)]>) -> RateAnswer {
    let envoys = u32::try_from(envoys).unwrap_or(u32::MAX).max(1);
    match counts {
        Some(counts) => RateAnswer {
            mode: RateMode::Global,
            envoys,
            buckets: report.buckets.iter().zip(counts).map(|(b, (others, _))| BucketAnswer { bucket: b.bucket.clone(), others: *others }).collect(),
        },
        None => RateAnswer { mode: RateMode::Split, envoys, buckets: Vec::new() },
    }
}

/// The buckets with the most fleet-wide requests in their current window, as this replica last
/// read them from Redis. Bounded: at most [`HOT_TRACKED`] buckets are remembered.
#[derive(Debug, Default)]
pub struct HotBuckets {
    map: HashMap<String, Hot>,
}

#[derive(Debug, Clone, Copy)]
struct Hot {
    used: u64,
    count: u32,
    period_secs: u32,
    /// The count was read at `read_ms`; after a period without a new one it says nothing.
    until_ms: u64,
}

impl HotBuckets {
    /// Notes that `bucket` (a limit of `count` per `period_secs`) had `used` requests in its
    /// window at `now_ms`.
    pub fn note(&mut self, bucket: &str, count: u32, period_secs: u32, used: u64, now_ms: u64) {
        if used == 0 {
            self.map.remove(bucket);
            return;
        }
        let until_ms = now_ms + u64::from(period_secs) * 1000;
        if let Some(h) = self.map.get_mut(bucket) {
            *h = Hot { used, count, period_secs, until_ms };
            return;
        }
        if self.map.len() >= HOT_TRACKED {
            self.map.retain(|_, h| h.until_ms > now_ms);
        }
        if self.map.len() >= HOT_TRACKED {
            // Full of live buckets: the coldest makes room, if this one is hotter.
            let coldest = self.map.iter().min_by_key(|(_, h)| h.used).map(|(b, h)| (b.clone(), h.used));
            match coldest {
                Some((b, u)) if u < used => {
                    self.map.remove(&b);
                }
                _ => return,
            }
        }
        self.map.insert(bucket.to_string(), Hot { used, count, period_secs, until_ms });
    }

    /// The `n` hottest buckets still in their window at `now_ms`, hottest first.
    pub fn top(&self, now_ms: u64, n: usize) -> Vec<HotBucket> {
        let mut live: Vec<HotBucket> = self
            .map
            .iter()
            .filter(|(_, h)| h.until_ms > now_ms)
            .map(|(b, h)| HotBucket { bucket: b.clone(), used: h.used, count: h.count, period_secs: h.period_secs })
            .collect();
        sort_hot(&mut live);
        live.truncate(n);
        live
    }
}

fn sort_hot(hot: &mut [HotBucket]) {
    hot.sort_by(|a, b| b.used.cmp(&a.used).then_with(|| a.bucket.cmp(&b.bucket)));
}

/// What `keyward status` shows of the live replicas' runtime views: global only when a rate
/// store is configured and every replica reaches it; its health since the latest replica
/// became healthy, or since the first became unreachable; the hottest buckets of all.
/// `None` when no replica has said anything lately.
pub fn merge(rows: &[RatesRuntime], envoys: u64) -> Option<RateLimitsView> {
    if rows.is_empty() {
        return None;
    }
    let configured: Vec<&RatesRuntime> = rows.iter().filter(|r| r.store.is_some()).collect();
    let store = configured.first().and_then(|r| r.store.clone());
    let (healthy, since) = if configured.is_empty() {
        (None, None)
    } else if configured.iter().all(|r| r.healthy) {
        (Some(true), configured.iter().map(|r| r.since).max())
    } else {
        (Some(false), configured.iter().filter(|r| !r.healthy).map(|r| r.since).min())
    };
    let mut hot: Vec<HotBucket> = Vec::new();
    for h in rows.iter().flat_map(|r| &r.hot) {
        match hot.iter_mut().find(|x| x.bucket == h.bucket) {
            Some(x) if x.used < h.used => *x = h.clone(),
            Some(_) => {}
            None => hot.push(h.clone()),
        }
    }
    sort_hot(&mut hot);
    hot.truncate(HOT_SHOWN);
    Some(RateLimitsView {
        mode: if healthy == Some(true) { "global" } else { "split" }.into(),
        envoys,
        store,
        healthy,
        since: since.map(keyward_core::time::format_rfc3339),
        hot,
    })
}

/// `50/s`, `60/min`, `1000/h`, `5/day`, else `7/90s`.
pub fn limit_text(count: u32, period_secs: u32) -> String {
    match period_secs {
        1 => format!("{count}/s"),
        60 => format!("{count}/min"),
        3600 => format!("{count}/h"),
        86_400 => format!("{count}/day"),
        p => format!("{count}/{p}s"),
    }
}

/// Serve's clock for slots, in Unix milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Why a report was answered `split` although a rate store is configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fallback {
    /// Redis failed (or did not answer within the bound) just now.
    Failed(String),
    /// Redis failed lately; it is tried again after a back-off.
    BackingOff,
    /// Another report is connecting to Redis now.
    Connecting,
}

enum Link {
    /// No connection; the next attempt may start at `retry_at`.
    Down { retry_at: Option<Instant>, backoff: Duration },
    /// A report is connecting (since then: a connection cancelled midway is forgotten).
    Connecting { since: Instant, backoff: Duration },
    Up(redis::aio::MultiplexedConnection),
}

struct Health {
    healthy: bool,
    /// Unix seconds of the last change of `healthy`.
    since: i64,
    last_ok: Option<Instant>,
    last_warn: Option<Instant>,
    suppressed: u64,
}

/// The Redis behind `--rate-store`: one multiplexed connection, made lazily and again after a
/// failure with back-off. Every wait is bounded ([`CONNECT_TIMEOUT`], [`CALL_TIMEOUT`],
/// [`REDIS_BOUND`]); no lock is held across one.
pub struct RateStore {
    client: redis::Client,
    /// The URL without its password.
    shown: String,
    script: redis::Script,
    link: Mutex<Link>,
    health: Mutex<Health>,
}

impl RateStore {
    /// Checks a `--rate-store` URL; connects nothing yet.
    pub fn open(url: &str) -> std::result::Result<RateStore, String> {
        let shown = crate::store::redact(url);
        if !url.starts_with("redis://") {
            return Err(format!(
                "--rate-store {shown:?} is not a redis:// URL: use redis://host:port or redis://host:port/db (TLS and unix sockets are not supported)"
            ));
        }
        let client = redis::Client::open(url).map_err(|e| format!("--rate-store {shown:?}: {e}"))?;
        Ok(RateStore {
            client,
            shown,
            script: redis::Script::new(SCRIPT),
            link: Mutex::new(Link::Down { retry_at: None, backoff: BACKOFF_MIN }),
            health: Mutex::new(Health { healthy: false, since: crate::store::now_unix(), last_ok: None, last_warn: None, suppressed: 0 }),
        })
    }

    /// The URL without its password.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    fn lock_link(&self) -> std::sync::MutexGuard<'_, Link> {
        self.link.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The connection, or why there is none now. At most one report connects at a time; the
    /// others are answered `split` meanwhile rather than wait.
    async fn connection(&self) -> std::result::Result<redis::aio::MultiplexedConnection, Fallback> {
        let now = Instant::now();
        let backoff = {
            let mut link = self.lock_link();
            let backoff = match &*link {
                Link::Up(c) => return Ok(c.clone()),
                Link::Connecting { since, .. } if now.duration_since(*since) < 2 * CONNECT_TIMEOUT => return Err(Fallback::Connecting),
                Link::Connecting { backoff, .. } => *backoff,
                Link::Down { retry_at: Some(t), .. } if now < *t => return Err(Fallback::BackingOff),
                Link::Down { backoff, .. } => *backoff,
            };
            *link = Link::Connecting { since: now, backoff };
            backoff
        };
        let config = redis::AsyncConnectionConfig::new().set_connection_timeout(Some(CONNECT_TIMEOUT)).set_response_timeout(Some(CALL_TIMEOUT));
        let made = tokio::time::timeout(CONNECT_TIMEOUT, self.client.get_multiplexed_async_connection_with_config(&config)).await;
        let mut link = self.lock_link();
        match made {
            Ok(Ok(c)) => {
                *link = Link::Up(c.clone());
                Ok(c)
            }
            failed => {
                *link = Link::Down { retry_at: Some(Instant::now() + backoff), backoff: (backoff * 2).min(BACKOFF_MAX) };
                Err(Fallback::Failed(match failed {
                    Ok(Err(e)) => format!("connecting: {e}"),
                    _ => format!("connecting: no answer within {} ms", CONNECT_TIMEOUT.as_millis()),
                }))
            }
        }
    }

    /// A call failed: the connection is dropped, and the next one waits for the back-off.
    fn broken(&self) {
        let mut link = self.lock_link();
        if let Link::Up(_) = &*link {
            *link = Link::Down { retry_at: Some(Instant::now() + BACKOFF_MIN), backoff: BACKOFF_MIN * 2 };
        }
    }

    /// Runs `call` on the connection, within [`REDIS_BOUND`] all told, and notes the outcome.
    async fn with_connection<T, F>(&self, call: impl FnOnce(redis::aio::MultiplexedConnection) -> F) -> std::result::Result<T, Fallback>
    where
        F: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let attempt = async {
            let conn = self.connection().await?;
            call(conn).await.map_err(|e| Fallback::Failed(e.to_string()))
        };
        let out = match tokio::time::timeout(REDIS_BOUND, attempt).await {
            Ok(out) => out,
            Err(_) => Err(Fallback::Failed(format!("no answer within {} ms", REDIS_BOUND.as_millis()))),
        };
        match &out {
            Ok(_) => self.observe(Ok(())),
            Err(Fallback::Failed(e)) => {
                self.broken();
                self.observe(Err(e));
            }
            Err(_) => {}
        }
        out
    }

    /// Adds a report's admissions and reads its buckets' windows: `(others, total)` per bucket.
    /// Its invocations of [`SCRIPT`] go in one pipeline; a Redis that lost the script (a
    /// restart, `SCRIPT FLUSH`) is given it again.
    pub async fn count(&self, report: &RateReport, now_ms: u64) -> std::result::Result<Vec<(u64, u64)>, Fallback> {
        let chunks = script_args(report, now_ms);
        let n = report.buckets.len();
        let script = &self.script;
        self.with_connection(|mut conn| async move {
            let invocations: Vec<redis::ScriptInvocation<'_>> = chunks
                .iter()
                .map(|args| {
                    let mut invocation = script.prepare_invoke();
                    for a in args {
                        invocation.arg(a);
                    }
                    invocation
                })
                .collect();
            let mut pipe = redis::pipe();
            for invocation in &invocations {
                pipe.invoke_script(invocation);
            }
            let replies: Vec<Vec<u64>> = match pipe.query_async(&mut conn).await {
                Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                    script.load_async(&mut conn).await?;
                    pipe.query_async(&mut conn).await?
                }
                other => other?,
            };
            parse_reply(&replies.concat(), n)
                .ok_or_else(|| redis::RedisError::from((redis::ErrorKind::UnexpectedReturnType, "the rate script answered the wrong number of counts")))
        })
        .await
    }

    /// A PING when Redis has not answered for a while, so health (and reconnection) does not
    /// wait for the next report.
    pub async fn probe(&self) {
        let fresh = self.lock_health().last_ok.is_some_and(|t| t.elapsed() < PERSIST_EVERY);
        if fresh {
            return;
        }
        let _ = self
            .with_connection(|mut conn| async move { redis::cmd("PING").query_async::<String>(&mut conn).await })
            .await;
    }

    fn observe(&self, outcome: std::result::Result<(), &str>) {
        let mut h = self.lock_health();
        let ok = outcome.is_ok();
        if ok {
            h.last_ok = Some(Instant::now());
        }
        if h.healthy != ok {
            h.healthy = ok;
            h.since = crate::store::now_unix();
            if ok {
                tracing::info!(rate_store = %self.shown, "the rate store answers: rate limits are global");
            }
        }
        if let Err(e) = outcome {
            if h.last_warn.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                let suppressed = std::mem::take(&mut h.suppressed);
                tracing::warn!(rate_store = %self.shown, error = %e, earlier_failures_not_logged = suppressed, "the rate store failed: rate limits are split across the Envoys until it answers");
                h.last_warn = Some(Instant::now());
            } else {
                h.suppressed += 1;
            }
        }
    }

    /// Whether the last call answered, and since when (Unix seconds) that has been so.
    pub fn health(&self) -> (bool, i64) {
        let h = self.lock_health();
        (h.healthy, h.since)
    }
}

/// This replica's side of fleet rate limits: the rate store if any, the hot buckets it has
/// seen, and which reporting Envoys it has lately written to the store as seen.
#[derive(Default)]
pub struct Rates {
    pub store: Option<RateStore>,
    hot: Mutex<HotBuckets>,
    seen: Mutex<HashMap<String, Instant>>,
    /// The last fleet size read, for when the store cannot say.
    last_envoys: AtomicU32,
    /// When a store failure for a rate report was last logged.
    store_warned: Mutex<Option<Instant>>,
}

impl Rates {
    pub fn with_store(store: RateStore) -> Rates {
        Rates { store: Some(store), ..Rates::default() }
    }

    /// Whether to write `envoy` to the store as seen now (at most every [`SEEN_EVERY`]).
    pub fn due_seen(&self, envoy: &str) -> bool {
        let now = Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen.get(envoy).is_some_and(|t| now.duration_since(*t) < SEEN_EVERY) {
            return false;
        }
        if seen.len() >= 10_000 {
            seen.retain(|_, t| now.duration_since(*t) < SEEN_EVERY);
        }
        seen.insert(envoy.to_string(), now);
        true
    }

    /// Forgets that `envoy` was written as seen (the write failed).
    pub fn unseen(&self, envoy: &str) {
        self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(envoy);
    }

    /// Remembers the fleet size read from the store; returns it.
    pub fn envoys_read(&self, n: u64) -> u64 {
        self.last_envoys.store(u32::try_from(n).unwrap_or(u32::MAX), Ordering::Relaxed);
        n
    }

    /// The last fleet size read (the store failed this time).
    pub fn envoys_last(&self) -> u64 {
        u64::from(self.last_envoys.load(Ordering::Relaxed))
    }

    /// Whether to log a store failure for a rate report now (at most once per 10 s).
    pub fn store_warning_due(&self) -> bool {
        let mut last = self.store_warned.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let due = last.is_none_or(|t| t.elapsed() >= WARN_EVERY);
        if due {
            *last = Some(Instant::now());
        }
        due
    }

    /// Notes a report's fleet-wide counts for the hot list.
    pub fn note_hot(&self, report: &RateReport, counts: &[(u64, u64)], now_ms: u64) {
        let mut hot = self.hot.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (b, (_, total)) in report.buckets.iter().zip(counts) {
            hot.note(&b.bucket, b.count, b.period_secs, *total, now_ms);
        }
    }

    /// This replica's runtime view, as written to the store.
    pub fn runtime(&self, now_ms: u64) -> RatesRuntime {
        let hot = self.hot.lock().unwrap_or_else(std::sync::PoisonError::into_inner).top(now_ms, HOT_SHOWN);
        match &self.store {
            None => RatesRuntime { store: None, healthy: false, since: 0, hot },
            Some(s) => {
                let (healthy, since) = s.health();
                RatesRuntime { store: Some(s.shown().to_string()), healthy, since, hot }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use keyward_core::feed::BucketReport;

    fn bucket(name: &str, count: u32, period_secs: u32, admitted: u64) -> BucketReport {
        BucketReport { bucket: name.into(), count, period_secs, admitted }
    }

    #[test]
    fn windows_are_eleven_sub_windows_of_at_least_100_ms() {
        let check = |period: u32, now_ms: u64, want: (u64, u64, u64, u64)| {
            let w = window(period, now_ms);
            assert_eq!((w.sub_ms, w.slot, w.slots, w.ttl_ms), want, "period {period} s at {now_ms} ms");
        };
        check(1, 1_000_050, (100, 10_000, 11, 1_200));
        check(1, 1_000_099, (100, 10_000, 11, 1_200));
        check(1, 1_000_100, (100, 10_001, 11, 1_200));
        check(60, 1_700_000_000_000, (6_000, 283_333_333, 11, 72_000));
        check(86_400, 1_700_000_000_000, (8_640_000, 196_759, 11, 103_680_000));
        // A zero period (refused by `validate`) still has a sane window.
        check(0, 1_000, (100, 10, 11, 1_200));
    }

    #[test]
    fn script_arguments_name_the_envoy_then_five_per_bucket() {
        let report = RateReport { envoy: "edge-1".into(), buckets: vec![bucket("k:key_a", 50, 1, 7), bucket("a:agt_b", 60, 60, 0)] };
        let args = script_args(&report, 1_000_050);
        assert_eq!(
            args,
            [["e:edge-1", "kwrl:{k:key_a}:100:", "10000", "11", "1200", "7", "kwrl:{a:agt_b}:6000:", "166", "11", "72000", "0"]]
        );
        assert_eq!(script_args(&RateReport { envoy: "e".into(), buckets: vec![] }, 0), [["e:e"]], "an empty report still asks Redis");
        let big = RateReport { envoy: "e".into(), buckets: vec![bucket("k:a", 1, 1, 0); 2 * SCRIPT_CHUNK + 1] };
        let sizes: Vec<usize> = script_args(&big, 0).iter().map(Vec::len).collect();
        assert_eq!(sizes, [1 + 5 * SCRIPT_CHUNK, 1 + 5 * SCRIPT_CHUNK, 1 + 5]);
    }

    #[test]
    fn replies_pair_up_or_are_refused() {
        assert_eq!(parse_reply(&[1, 5, 0, 2], 2), Some(vec![(1, 5), (0, 2)]));
        assert_eq!(parse_reply(&[], 0), Some(vec![]));
        assert_eq!(parse_reply(&[1, 5, 0], 2), None);
        assert_eq!(parse_reply(&[1, 5], 2), None);
    }

    #[test]
    fn reports_that_name_nothing_sensible_are_refused_naming_the_field() {
        let ok = || RateReport { envoy: "e1".into(), buckets: vec![bucket("k:key_a", 10, 1, 3)] };
        let check = |edit: &dyn Fn(&mut RateReport), field: Option<&str>| {
            let mut r = ok();
            edit(&mut r);
            let got = validate(&r).err();
            assert_eq!(got.as_ref().and_then(|e| e.field()), field, "{got:?}");
            if let Some(e) = got {
                assert_eq!(e.code(), "VALIDATION_ERROR");
            }
        };
        check(&|_| {}, None);
        check(&|r| r.buckets.clear(), None);
        check(&|r| r.envoy.clear(), Some("envoy"));
        check(&|r| r.envoy = "e".repeat(257), Some("envoy"));
        check(&|r| r.envoy = "e\n1".into(), Some("envoy"));
        check(&|r| r.buckets[0].bucket.clear(), Some("bucket"));
        check(&|r| r.buckets[0].bucket = "k:".to_string() + &"x".repeat(198), None);
        check(&|r| r.buckets[0].bucket = "k:".to_string() + &"x".repeat(199), Some("bucket"));
        check(&|r| r.buckets[0].count = 0, Some("count"));
        check(&|r| r.buckets[0].period_secs = 0, Some("period_secs"));
        check(&|r| r.buckets[0].admitted = MAX_ADMITTED + 1, Some("admitted"));
        check(&|r| r.buckets = vec![bucket("k:a", 1, 1, 0); RATE_REPORT_MAX_BUCKETS], None);
        check(&|r| r.buckets = vec![bucket("k:a", 1, 1, 0); RATE_REPORT_MAX_BUCKETS + 1], Some("buckets"));
        let mut r = ok();
        r.buckets.push(bucket("a:agt_1", 10, 0, 0));
        let msg = validate(&r).unwrap_err().to_string();
        assert!(msg.contains("buckets[1].period_secs") && msg.contains("a:agt_1"), "{msg}");
    }

    #[test]
    fn answers_are_global_with_counts_else_split_across_at_least_one_envoy() {
        let report = RateReport { envoy: "e1".into(), buckets: vec![bucket("k:a", 10, 1, 3), bucket("k:b", 10, 1, 0)] };
        let a = answer(&report, 3, Some(&[(4, 7), (0, 0)]));
        assert_eq!(a.mode, RateMode::Global);
        assert_eq!(a.envoys, 3);
        assert_eq!(a.buckets, vec![BucketAnswer { bucket: "k:a".into(), others: 4 }, BucketAnswer { bucket: "k:b".into(), others: 0 }]);
        let a = answer(&report, 0, None);
        assert_eq!((a.mode, a.envoys, a.buckets.len()), (RateMode::Split, 1, 0));
    }

    #[test]
    fn the_hot_list_keeps_the_hottest_live_buckets() {
        let mut hot = HotBuckets::default();
        hot.note("k:a", 50, 1, 40, 0);
        hot.note("k:b", 50, 1, 45, 0);
        hot.note("k:c", 100, 60, 10, 0);
        hot.note("k:d", 100, 60, 0, 0);
        let names = |h: &HotBuckets, now: u64| h.top(now, 20).into_iter().map(|b| format!("{}={}", b.bucket, b.used)).collect::<Vec<_>>();
        assert_eq!(names(&hot, 500), ["k:b=45", "k:a=40", "k:c=10"]);
        assert_eq!(hot.top(500, 1).len(), 1);
        // A count read a period ago says nothing of the window now.
        assert_eq!(names(&hot, 1_000), ["k:c=10"]);
        // A newer count replaces the older; a window gone quiet leaves the list.
        hot.note("k:c", 100, 60, 3, 2_000);
        hot.note("k:c", 100, 60, 0, 3_000);
        assert!(names(&hot, 3_000).is_empty());
        // Bounded: when full of live buckets, the coldest makes room for a hotter one only.
        let mut hot = HotBuckets::default();
        for i in 0..HOT_TRACKED {
            hot.note(&format!("k:{i}"), 10, 60, 5 + i as u64, 0);
        }
        hot.note("k:cold", 10, 60, 1, 0);
        hot.note("k:hot", 10, 60, 1_000_000, 0);
        assert_eq!(hot.map.len(), HOT_TRACKED);
        assert!(!hot.map.contains_key("k:cold") && hot.map.contains_key("k:hot") && !hot.map.contains_key("k:0"));
        // Expired buckets go first.
        hot.note("k:new", 10, 1, 1, 61_000);
        assert_eq!(names(&hot, 61_000), ["k:new=1"]);
    }

    #[test]
    fn status_merges_the_replicas_views() {
        let hb = |b: &str, used: u64| HotBucket { bucket: b.into(), used, count: 50, period_secs: 1 };
        let rt = |store: Option<&str>, healthy: bool, since: i64, hot: Vec<HotBucket>| RatesRuntime { store: store.map(str::to_string), healthy, since, hot };
        assert_eq!(merge(&[], 3), None);
        let split = merge(&[rt(None, false, 0, vec![])], 3).unwrap();
        assert_eq!((split.mode.as_str(), split.envoys, split.store, split.healthy, split.since), ("split", 3, None, None, None));
        let url = Some("redis://r:6379");
        let global = merge(&[rt(url, true, 100, vec![hb("k:a", 5)]), rt(url, true, 200, vec![hb("k:a", 7), hb("k:b", 6)])], 2).unwrap();
        assert_eq!((global.mode.as_str(), global.healthy, global.since.as_deref()), ("global", Some(true), Some("1970-01-01T00:03:20Z")));
        assert_eq!(global.store.as_deref(), url);
        assert_eq!(global.hot, vec![hb("k:a", 7), hb("k:b", 6)]);
        let down = merge(&[rt(url, true, 100, vec![]), rt(url, false, 300, vec![]), rt(url, false, 250, vec![])], 2).unwrap();
        assert_eq!((down.mode.as_str(), down.healthy, down.since.as_deref()), ("split", Some(false), Some("1970-01-01T00:04:10Z")));
        let many: Vec<HotBucket> = (0..30).map(|i| hb(&format!("k:{i:02}"), i)).collect();
        let top = merge(&[rt(url, true, 1, many)], 1).unwrap().hot;
        assert_eq!(top.len(), HOT_SHOWN);
        assert_eq!(top[0], hb("k:29", 29));
    }

    #[test]
    fn limits_read_as_users_write_them() {
        for (count, period, want) in [(50, 1, "50/s"), (60, 60, "60/min"), (1000, 3600, "1000/h"), (5, 86_400, "5/day"), (7, 90, "7/90s")] {
            assert_eq!(limit_text(count, period), want);
        }
    }

    #[test]
    fn only_redis_urls_are_rate_stores_and_passwords_never_show() {
        assert!(RateStore::open("redis://127.0.0.1:6379").is_ok());
        assert!(RateStore::open("redis://127.0.0.1:6379/2").is_ok());
        assert_eq!(RateStore::open("redis://:s3cret@h:6379/0").unwrap().shown(), "redis://:***@h:6379/0");
        for bad in ["rediss://h:6379", "unix:///tmp/r.sock", "h:6379", "postgres://h/db", "redis://:s3cret@"] {
            let e = RateStore::open(bad).err().unwrap();
            assert!(e.contains("--rate-store") && !e.contains("s3cret"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_reporting_envoy_is_written_as_seen_at_most_once_a_second() {
        let rates = Rates::default();
        assert!(rates.due_seen("e1"));
        assert!(!rates.due_seen("e1"));
        assert!(rates.due_seen("e2"));
        rates.unseen("e1");
        assert!(rates.due_seen("e1"));
    }
}

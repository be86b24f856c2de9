//! What the Envoys see and say: the snapshot and its feed pages, their acknowledgements
//! (`envoys`), their usage reports, and the `keyward serve` replicas they talk to.

use super::db::{p, Db, Engine, Tx};
use super::records::{active, find_agent, key_rows, FEED_KEY_COLUMNS, KEY_COLUMNS};
use super::scopes::implication_map;
use super::{version_in, Store};
use crate::error::{Error, Result};
use crate::model::*;
use keyward_core::feed::{FeedCursor, FeedMessage, UsageReport};
use keyward_core::scope::Implications;
use keyward_core::snapshot::RawSnapshot;

/// The `runtime` rows of the replicas' rate-limit views: `rates:<replica>`.
pub const RATES_RUNTIME_PREFIX: &str = "rates:";

/// Records per feed page: bounds the memory of one answer (and of the filter VM applying it).
pub const FEED_PAGE: usize = 5_000;

/// A replica is live while it has been heard from within this many seconds (it says so every
/// second).
pub const REPLICA_LIVE_SECS: i64 = 5;

pub(crate) fn live_replicas(db: &dyn Db, now: i64) -> Result<Vec<ReplicaView>> {
    db.query("SELECT name, started_at, last_seen FROM replicas WHERE last_seen >= ?1 ORDER BY name", p![now - REPLICA_LIVE_SECS])?
        .iter()
        .map(|r| {
            Ok(ReplicaView {
                name: r.text(0)?,
                started_at: keyward_core::time::format_rfc3339(r.int(1)?),
                last_seen: keyward_core::time::format_rfc3339(r.int(2)?),
            })
        })
        .collect()
}

/// The shell an Envoy runs, as `status` shows it: `native` (libkeyward.so) if its feed requests
/// say so, else `wasm` (keyward.wasm, whose requests never say).
fn shell_name(said: Option<&str>) -> &'static str {
    match said {
        Some("native") => "native",
        _ => "wasm",
    }
}

impl Store {
    /// Notes an Envoy's feed request: it has applied `applied` (if known), and is connected until
    /// `open_until` unless it asks again, to this process's replica. `shell` is what the request
    /// said it runs (`native`), if it said.
    pub fn envoy_seen(&mut self, id: &str, applied: Option<u64>, open_until: i64, shell: Option<&str>) -> Result<()> {
        let now = self.now();
        self.db().execute(
            "INSERT INTO envoys (id, applied_version, last_seen, open_until, replica, shell) VALUES (?1, COALESCE(CAST(?2 AS BIGINT), 0), ?3, ?4, ?5, ?6) \
             ON CONFLICT(id) DO UPDATE SET applied_version = COALESCE(CAST(?2 AS BIGINT), envoys.applied_version), last_seen = ?3, \
             open_until = ?4, replica = COALESCE(?5, envoys.replica), shell = ?6",
            p![id, applied, now, open_until, &self.replica, shell],
        )?;
        Ok(())
    }

    /// Notes an Envoy's rate report: it is connected for 2 s more, or as long as its open feed
    /// request keeps it (a report never shortens that); which replica holds its feed is kept.
    pub fn envoy_reported(&mut self, id: &str) -> Result<()> {
        let now = self.now();
        self.db().execute(
            "INSERT INTO envoys (id, applied_version, last_seen, open_until, replica) VALUES (?1, 0, ?2, ?3, ?4) \
             ON CONFLICT(id) DO UPDATE SET last_seen = ?2, \
             open_until = CASE WHEN envoys.open_until > CAST(?3 AS BIGINT) THEN envoys.open_until ELSE ?3 END",
            p![id, now, now + 2, &self.replica],
        )?;
        Ok(())
    }

    /// The Envoys connected now, as `status` counts them: what a rate limit is split across.
    pub fn fleet_size(&self) -> Result<u64> {
        self.db().one("SELECT COUNT(*) FROM envoys WHERE open_until >= ?1", p![self.now()])?.count(0)
    }

    /// Writes what a running process says of itself (`runtime` row `name`): no audit entry, no
    /// version. Rows not rewritten for a day (their process is long gone) are dropped.
    pub fn put_runtime(&mut self, name: &str, value: &str) -> Result<()> {
        let now = self.now();
        self.db().execute(
            "INSERT INTO runtime (name, value, at) VALUES (?1, ?2, ?3) ON CONFLICT(name) DO UPDATE SET value = ?2, at = ?3",
            p![name, value, now],
        )?;
        self.db().execute("DELETE FROM runtime WHERE at < ?1", p![now - 86_400])?;
        Ok(())
    }

    /// The `runtime` values whose name starts with `prefix`, written at `since` or later.
    pub fn runtime(&self, prefix: &str, since: i64) -> Result<Vec<(String, String)>> {
        let rows = self.db().query("SELECT name, value FROM runtime WHERE at >= ?1 ORDER BY name", p![since])?;
        rows.iter()
            .filter_map(|r| match (r.text(0), r.text(1)) {
                (Ok(name), Ok(value)) if name.starts_with(prefix) => Some(Ok((name, value))),
                (Ok(_), Ok(_)) => None,
                (Err(e), _) | (_, Err(e)) => Some(Err(e)),
            })
            .collect()
    }

    /// What the running replicas last said of the fleet's rate limits (see `rates::merge`).
    fn rate_limits(&self, now: i64, serving: bool) -> Result<Option<RateLimitsView>> {
        if !serving {
            return Ok(None);
        }
        let rows: Vec<RatesRuntime> = self
            .runtime(RATES_RUNTIME_PREFIX, now - crate::rates::RUNTIME_LIVE_SECS)?
            .iter()
            .filter_map(|(_, v)| serde_json::from_str(v).ok())
            .collect();
        Ok(crate::rates::merge(&rows, self.fleet_size()?))
    }

    /// Counts a wrong or missing token from `address` in its window of `window` seconds, across
    /// every replica of the store. Returns the count and when the window ends; the failure that
    /// reaches `allowed` also tells every replica to block the address until then.
    pub fn auth_failure(&mut self, address: &str, window: i64, allowed: u64) -> Result<(u64, i64)> {
        let now = self.now();
        let tx = Tx::write(self.db())?;
        let row = tx.one(
            "INSERT INTO auth_failures (address, window_start, count) VALUES (?1, ?2, 1) ON CONFLICT(address) DO UPDATE SET \
             count = CASE WHEN auth_failures.window_start <= CAST(?2 AS BIGINT) - CAST(?3 AS BIGINT) THEN 1 ELSE auth_failures.count + 1 END, \
             window_start = CASE WHEN auth_failures.window_start <= CAST(?2 AS BIGINT) - CAST(?3 AS BIGINT) THEN ?2 ELSE auth_failures.window_start END \
             RETURNING count, window_start",
            p![address, now, window],
        )?;
        let (count, until) = (row.count(0)?, row.int(1)? + window);
        if count == allowed {
            super::notify(&*tx, &format!("block {address} {until}"))?;
        }
        // Windows long over are forgotten, a few at a time.
        tx.execute("DELETE FROM auth_failures WHERE window_start < ?1", p![now - 10 * window])?;
        tx.commit()?;
        Ok((count, until))
    }

    /// Says this replica is alive (every second, from `serve`).
    pub fn replica_seen(&mut self, name: &str, started_at: i64) -> Result<()> {
        let now = self.now();
        self.db().execute(
            "INSERT INTO replicas (name, started_at, last_seen) VALUES (?1, ?2, ?3) \
             ON CONFLICT(name) DO UPDATE SET started_at = ?2, last_seen = ?3",
            p![name, started_at, now],
        )?;
        Ok(())
    }

    fn envoys(&self, version: u64, now: i64, serving: bool) -> Result<Vec<EnvoyView>> {
        let rows = self.db().query("SELECT id, applied_version, last_seen, open_until, replica, shell FROM envoys ORDER BY id", &[])?;
        rows.iter()
            .map(|r| {
                let applied = u64::try_from(r.int(1)?).unwrap_or(0);
                let connected = serving && now <= r.int(3)?;
                let lag = version.saturating_sub(applied);
                let state = match (connected, lag) {
                    (false, _) => "stale",
                    (true, 0) => "connected",
                    (true, _) => "lagging",
                };
                Ok(EnvoyView {
                    id: r.text(0)?,
                    applied_version: applied,
                    lag,
                    last_seen: keyward_core::time::format_rfc3339(if connected { now } else { r.int(2)? }),
                    connected,
                    state: state.into(),
                    replica: r.opt_text(4)?,
                    shell: shell_name(r.opt_text(5)?.as_deref()).into(),
                })
            })
            .collect()
    }

    pub fn status(&mut self) -> Result<StatusView> {
        let now = self.now();
        let db = self.db();
        let agents = db.one("SELECT COUNT(*) FROM agents WHERE deleted_at IS NULL", &[])?.count(0)?;
        let keys = db.one(&format!("SELECT COUNT(*) FROM keys k WHERE {}", active("k", "?1")), p![now])?.count(0)?;
        let version = self.snapshot_version()?;
        let serving = self.serving();
        Ok(StatusView {
            snapshot_version: version,
            agents,
            active_keys: keys,
            serving,
            engine: self.engine().name().into(),
            replicas: live_replicas(db, now)?,
            envoys: self.envoys(version, now, serving)?,
            rate_limits: self.rate_limits(now, serving)?,
        })
    }

    /// The whole snapshot the filter enforces: digests and the fields it needs, nothing else.
    pub fn snapshot(&mut self) -> Result<RawSnapshot> {
        let tx = Tx::read(self.db())?;
        let version = version_in(&*tx)?;
        let rows = key_rows(&*tx, &format!("SELECT {KEY_COLUMNS} FROM keys k JOIN agents a ON a.id = k.agent_id ORDER BY k.id"), &[])?;
        let map = implication_map(&*tx)?;
        tx.commit()?;
        let imp = Implications::new(&map).map_err(Error::Internal)?;
        let keys = rows.into_iter().map(|k| k.into_raw_record(&imp)).collect();
        Ok(RawSnapshot { version, implications: Some(map), keys })
    }

    /// The Envoys connected now (heard from within their feed request's wait plus 2 s), and which
    /// of them have applied `version`.
    pub fn envoys_applied(&self, version: u64) -> Result<(Vec<String>, Vec<String>)> {
        let rows = self.db().query("SELECT id, applied_version FROM envoys WHERE open_until >= ?1 ORDER BY id", p![self.now()])?;
        let (mut done, mut pending) = (Vec::new(), Vec::new());
        for r in rows {
            let id = r.text(0)?;
            if u64::try_from(r.int(1)?).unwrap_or(0) >= version {
                done.push(id);
            } else {
                pending.push(id);
            }
        }
        Ok((done, pending))
    }

    /// On `serve` start: feed requests held by an earlier process are gone. With `replica`,
    /// only those that replica held (other replicas still hold theirs).
    pub fn forget_open_feeds(&mut self, replica: Option<&str>) -> Result<()> {
        let cutoff = self.now() - 1;
        match replica {
            Some(name) => self.db().execute("UPDATE envoys SET open_until = ?1 WHERE open_until > ?1 AND replica = ?2", p![cutoff, name])?,
            None => self.db().execute("UPDATE envoys SET open_until = ?1 WHERE open_until > ?1", p![cutoff])?,
        };
        Ok(())
    }

    /// The records changed after `since` (or after `(since, after)` when continuing a page), in
    /// `(version, id)` order, at most `limit`, read in one transaction with the version they are
    /// consistent with. Keyset pagination: each page starts where the last ended, on the
    /// `(version, id)` index.
    pub fn feed_page(&mut self, since: u64, after: Option<&str>, limit: usize) -> Result<FeedMessage> {
        let tx = Tx::read(self.db())?;
        let version = version_in(&*tx)?;
        // A row-value comparison, so both engines seek into the `(version, id)` index where the
        // last page ended; `version > ?1 OR (version = ?1 AND id > ?2)` made them scan from the
        // start of the version each page (one batch import puts every key on one version).
        let (cond, after) = match after {
            Some(a) => ("(k.version, k.id) > (?1, ?2)", a),
            None => ("(k.version > ?1 AND ?2 = '')", ""),
        };
        let rows = key_rows(
            &*tx,
            &format!("SELECT {FEED_KEY_COLUMNS} FROM keys k JOIN agents a ON a.id = k.agent_id WHERE {cond} ORDER BY k.version, k.id LIMIT ?3"),
            p![since, after, limit + 1],
        )?;
        let map = implication_map(&*tx)?;
        let store = tx.row("SELECT value FROM meta WHERE name = 'store_id'", &[])?.map(|r| r.text(0)).transpose()?;
        tx.commit()?;
        let imp = Implications::new(&map).map_err(Error::Internal)?;
        let complete = rows.len() <= limit;
        let mut page = rows;
        page.truncate(limit);
        let cursor = match (complete, page.last()) {
            (false, Some(last)) => Some(FeedCursor { version: u64::try_from(last.version).unwrap_or(0), id: last.id.clone() }),
            _ => None,
        };
        Ok(FeedMessage {
            version,
            complete,
            cursor,
            implications: Some(map),
            store,
            reset: false,
            versions: page.iter().map(|k| u64::try_from(k.version).unwrap_or(0)).collect(),
            keys: page.into_iter().map(|k| k.into_raw_record(&imp)).collect(),
        })
    }

    /// Adds an Envoy's usage report: hourly counts, and each key's last use.
    pub fn record_usage(&mut self, report: &UsageReport) -> Result<usize> {
        let now = self.now();
        let tx = Tx::write(self.db())?;
        let mut known = 0;
        // Refusals carry no time of their own: they count in the hour the report arrived.
        let denied_hour = now - now.rem_euclid(3600);
        for u in &report.usage {
            if !tx.one("SELECT EXISTS(SELECT 1 FROM keys WHERE id = ?1)", p![&u.key_id])?.flag(0)? {
                continue; // A key the store no longer has: nothing to attribute it to.
            }
            known += 1;
            // A key that was only refused has no use (`last_used` 0): it is not "last used".
            if u.count > 0 && u.last_used > 0 {
                tx.execute(
                    "UPDATE keys SET last_used_at = ?1 WHERE id = ?2 AND (last_used_at IS NULL OR last_used_at < ?1)",
                    p![u.last_used, &u.key_id],
                )?;
                let hour = u.last_used - u.last_used.rem_euclid(3600);
                tx.execute(
                    "INSERT INTO usage (key_id, hour, count) VALUES (?1, ?2, ?3) \
                     ON CONFLICT(key_id, hour) DO UPDATE SET count = usage.count + ?3",
                    p![&u.key_id, hour, u.count],
                )?;
            }
            for (code, n) in &u.denied {
                // Codes are the contract's upper-case words; anything else is not stored.
                if code.is_empty() || code.len() > 32 || !code.bytes().all(|b| b.is_ascii_uppercase() || b == b'_') {
                    continue;
                }
                tx.execute(
                    "INSERT INTO usage_denied (key_id, hour, code, count) VALUES (?1, ?2, ?3, ?4) \
                     ON CONFLICT(key_id, hour, code) DO UPDATE SET count = usage_denied.count + ?4",
                    p![&u.key_id, denied_hour, code, *n],
                )?;
            }
        }
        tx.commit()?;
        Ok(known)
    }

    /// Requests per key and hour since `since` (Unix seconds), optionally for one agent.
    pub fn usage(&mut self, agent: Option<&str>, since: i64) -> Result<Vec<UsageRow>> {
        let agent_id = match agent {
            Some(name) => Some(find_agent(self.db(), name)?.id),
            None => None,
        };
        let denied = match self.engine() {
            Engine::Sqlite => "json_group_object(d.code, d.count)",
            Engine::Postgres => "CAST(json_object_agg(d.code, d.count) AS TEXT)",
        };
        // Allowed and refused counts, per key and hour: one row wherever either is non-zero.
        let sql = format!(
            "WITH hours AS (SELECT key_id, hour FROM usage UNION SELECT key_id, hour FROM usage_denied) \
             SELECT h.key_id, k.name, a.name, h.hour, COALESCE(u.count, 0), \
                    (SELECT {denied} FROM usage_denied d WHERE d.key_id = h.key_id AND d.hour = h.hour) \
             FROM hours h JOIN keys k ON k.id = h.key_id JOIN agents a ON a.id = k.agent_id \
             LEFT JOIN usage u ON u.key_id = h.key_id AND u.hour = h.hour \
             WHERE h.hour >= ?1 AND (CAST(?2 AS TEXT) IS NULL OR k.agent_id = ?2) ORDER BY a.name, k.name, h.key_id, h.hour"
        );
        let rows = self.db().query(&sql, p![since - since.rem_euclid(3600), agent_id])?;
        rows.iter()
            .map(|r| {
                Ok(UsageRow {
                    key_id: r.text(0)?,
                    key_name: r.text(1)?,
                    agent: r.text(2)?,
                    hour: keyward_core::time::format_rfc3339(r.int(3)?),
                    count: r.count(4)?,
                    denied: r.opt_text(5)?.and_then(|j| serde_json::from_str(&j).ok()).unwrap_or_default(),
                })
            })
            .collect()
    }
}

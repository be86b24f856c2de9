//! The SQLite store: agents, keys (digests only), the append-only audit log, and the snapshot
//! version. Every change runs in one IMMEDIATE transaction that bumps the version, stamps the
//! changed rows with it and appends an audit entry, so a feed can deliver exact deltas.

use crate::error::{invalid, Error, Result};
use crate::model::*;
use keyward_core::feed::{FeedCursor, FeedMessage, UsageReport};
use keyward_core::keyformat;
use keyward_core::scope::Implications;
use keyward_core::snapshot::{KeyStatus, RawKeyRecord, RawSnapshot, RawTime};
use keyward_core::Digest;
use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
use serde_json::json;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT;
INSERT INTO meta (name, value) VALUES ('snapshot_version', '0');
CREATE TABLE agents (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    scopes TEXT NOT NULL,
    enabled INTEGER NOT NULL DEFAULT 1,
    rate_limit TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    deleted_at INTEGER,
    version INTEGER NOT NULL
) STRICT;
CREATE UNIQUE INDEX agents_live_name ON agents(name) WHERE deleted_at IS NULL;
CREATE INDEX agents_version ON agents(version);
CREATE TABLE keys (
    id TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL REFERENCES agents(id),
    name TEXT NOT NULL,
    display_prefix TEXT NOT NULL,
    last4 TEXT NOT NULL,
    digest TEXT NOT NULL UNIQUE,
    scopes TEXT,
    path_prefixes TEXT NOT NULL DEFAULT '[]',
    rate_limit TEXT,
    created_at INTEGER NOT NULL,
    expires_at INTEGER,
    revoked_at INTEGER,
    last_used_at INTEGER,
    rotated_from TEXT,
    rotated_to TEXT,
    imported INTEGER NOT NULL DEFAULT 0,
    version INTEGER NOT NULL
) STRICT;
CREATE INDEX keys_agent ON keys(agent_id);
CREATE INDEX keys_version ON keys(version);
CREATE TABLE audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    details TEXT NOT NULL,
    version INTEGER NOT NULL
);
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"#,
// 2: the per-agent name check ran a scan of the agent's keys on every creation.
r#"
CREATE INDEX keys_agent_name ON keys(agent_id, name);
"#,
// 3: rotation time (for Deprecation headers) and hourly usage reported by the Envoys.
r#"
ALTER TABLE keys ADD COLUMN rotated_at INTEGER;
CREATE TABLE usage (
    key_id TEXT NOT NULL,
    hour INTEGER NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (key_id, hour)
) STRICT;
CREATE INDEX keys_version_id ON keys(version, id);
CREATE TABLE envoys (
    id TEXT PRIMARY KEY,
    applied_version INTEGER NOT NULL,
    last_seen INTEGER NOT NULL,
    open_until INTEGER NOT NULL
) STRICT;
"#,
// 4: a rotation lineage per key, so the keys of one rotation share a rate-limit budget.
r#"
ALTER TABLE keys ADD COLUMN lineage TEXT;
UPDATE keys SET lineage = id WHERE lineage IS NULL;
"#,
// 5: the scope catalogue (seed 004's scopes, and every scope already in use), bursts, the reason
// an agent is disabled, and refused requests per key.
r#"
ALTER TABLE agents ADD COLUMN disabled_reason TEXT;
ALTER TABLE agents ADD COLUMN rate_burst INTEGER;
ALTER TABLE keys ADD COLUMN rate_burst INTEGER;
CREATE TABLE scopes (
    name TEXT PRIMARY KEY,
    description TEXT NOT NULL,
    created_at INTEGER NOT NULL
) STRICT;
CREATE TABLE scope_implications (
    scope TEXT NOT NULL REFERENCES scopes(name),
    implies TEXT NOT NULL REFERENCES scopes(name),
    PRIMARY KEY (scope, implies)
) STRICT;
INSERT INTO scopes (name, description, created_at) VALUES
    ('read:all', 'Read access to all resources (users, projects, records, settings)', 0),
    ('write:all', 'Create and update access to all non-administrative resources', 0),
    ('admin', 'Full access, including team management, billing and API key administration', 0);
INSERT INTO scope_implications (scope, implies) VALUES ('admin', 'read:all'), ('admin', 'write:all');
INSERT OR IGNORE INTO scopes (name, description, created_at)
    SELECT DISTINCT j.value, '', 0 FROM agents a, json_each(a.scopes) j;
INSERT OR IGNORE INTO scopes (name, description, created_at)
    SELECT DISTINCT j.value, '', 0 FROM keys k, json_each(k.scopes) j WHERE k.scopes IS NOT NULL;
CREATE TABLE usage_denied (
    key_id TEXT NOT NULL,
    hour INTEGER NOT NULL,
    code TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (key_id, hour, code)
) STRICT;
-- Records now carry the catalogue's implications and effective scopes: one change re-sends all.
UPDATE meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT)
    WHERE name = 'snapshot_version' AND EXISTS (SELECT 1 FROM keys);
UPDATE keys SET version = (SELECT CAST(value AS INTEGER) FROM meta WHERE name = 'snapshot_version');
INSERT INTO audit (at, actor, action, target, details, version)
    SELECT CAST(strftime('%s', 'now') AS INTEGER), 'keyward', 'schema.migrate', 'scope catalogue', '{}', CAST(value AS INTEGER)
    FROM meta WHERE name = 'snapshot_version' AND EXISTS (SELECT 1 FROM keys);
"#];

/// The schema version this build writes.
pub const SCHEMA_VERSION: usize = MIGRATIONS.len();

/// Default display prefix of generated keys.
pub const DEFAULT_KEY_PREFIX: &str = "kw_live";
/// Default grace period of `key rotate`.
pub const DEFAULT_GRACE: &str = "24h";

pub fn now_unix() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The current second rounded up: a TTL counted from it gives a key at least that long a life
/// (the filter checks expiry to the second).
pub fn now_unix_ceil() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs() + u64::from(d.subsec_nanos() > 0)).unwrap_or(i64::MAX))
}

/// `n` base62 characters from the OS CSPRNG.
pub fn random_base62(n: usize) -> Result<String> {
    let mut out = String::with_capacity(n);
    let mut buf = [0u8; 64];
    while out.len() < n {
        getrandom::fill(&mut buf).map_err(|e| Error::Internal(format!("OS random source: {e}")))?;
        for b in buf.iter().filter(|&&b| b < 248) {
            if out.len() < n {
                out.push(char::from(keyformat::BASE62[usize::from(b % 62)]));
            }
        }
    }
    Ok(out)
}

/// A new keyward-format key from the OS CSPRNG.
pub fn generate_key(prefix: &str) -> Result<String> {
    let mut bytes = Vec::new();
    loop {
        let mut buf = [0u8; 64];
        getrandom::fill(&mut buf).map_err(|e| Error::Internal(format!("OS random source: {e}")))?;
        bytes.extend_from_slice(&buf);
        if let Some(key) = keyformat::generate(prefix, bytes.iter().copied()) {
            return Ok(key);
        }
    }
}

pub struct Store {
    conn: Connection,
    /// Who is acting, for the audit log (`cli:alice`, `api`).
    pub actor: String,
    pub key_prefix: String,
    /// The database file (`None` in memory): where `keyward serve`'s lock lives.
    path: Option<std::path::PathBuf>,
    /// This process is `keyward serve` (it publishes the store).
    pub is_server: bool,
    /// The version the last change committed, for read-your-writes.
    pub last_change: Option<u64>,
}

struct AgentRow {
    id: String,
    name: String,
    description: String,
    scopes: Vec<String>,
    enabled: bool,
    rate_limit: Option<String>,
    created_at: i64,
    rate_burst: Option<u32>,
    disabled_reason: Option<String>,
}

/// A validated key request: its agent, scopes override, expiry and name.
struct CheckedKey {
    agent: AgentRow,
    scopes: Option<Vec<String>>,
    expires_at: Option<i64>,
    name: String,
}

struct KeyRow {
    id: String,
    agent_id: String,
    agent_name: String,
    agent_scopes: Vec<String>,
    agent_enabled: bool,
    agent_rate: Option<String>,
    name: String,
    display_prefix: String,
    last4: String,
    digest: String,
    scopes: Option<Vec<String>>,
    path_prefixes: Vec<String>,
    rate_limit: Option<String>,
    created_at: i64,
    expires_at: Option<i64>,
    revoked_at: Option<i64>,
    last_used_at: Option<i64>,
    rotated_from: Option<String>,
    rotated_to: Option<String>,
    imported: bool,
    rotated_at: Option<i64>,
    version: i64,
    lineage: String,
    agent_burst: Option<u32>,
    rate_burst: Option<u32>,
    agent_disabled_reason: Option<String>,
}

/// Whether agent `?1` has a live key (not revoked, rotated or expired at `?3`) named `?2`: names
/// are unique among an agent's live keys.
const NAME_TAKEN: &str = "SELECT EXISTS(SELECT 1 FROM keys WHERE agent_id = ?1 AND name = ?2 AND revoked_at IS NULL \
    AND rotated_to IS NULL AND (expires_at IS NULL OR expires_at > ?3) AND id != ?4)";

const KEY_COLUMNS: &str = "k.id, k.agent_id, a.name, a.scopes, a.enabled, a.rate_limit, k.name, k.display_prefix, k.last4, \
    k.digest, k.scopes, k.path_prefixes, k.rate_limit, k.created_at, k.expires_at, k.revoked_at, k.last_used_at, \
    k.rotated_from, k.rotated_to, k.imported, k.rotated_at, k.version, COALESCE(k.lineage, k.id), a.rate_burst, k.rate_burst, \
    a.disabled_reason";

fn json_list(s: &str) -> Vec<String> {
    serde_json::from_str(s).unwrap_or_default()
}

fn to_json(v: &[String]) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "[]".into())
}

fn key_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<KeyRow> {
    Ok(KeyRow {
        id: r.get(0)?,
        agent_id: r.get(1)?,
        agent_name: r.get(2)?,
        agent_scopes: json_list(&r.get::<_, String>(3)?),
        agent_enabled: r.get(4)?,
        agent_rate: r.get(5)?,
        name: r.get(6)?,
        display_prefix: r.get(7)?,
        last4: r.get(8)?,
        digest: r.get(9)?,
        scopes: r.get::<_, Option<String>>(10)?.map(|s| json_list(&s)),
        path_prefixes: json_list(&r.get::<_, String>(11)?),
        rate_limit: r.get(12)?,
        created_at: r.get(13)?,
        expires_at: r.get(14)?,
        revoked_at: r.get(15)?,
        last_used_at: r.get(16)?,
        rotated_from: r.get(17)?,
        rotated_to: r.get(18)?,
        imported: r.get(19)?,
        rotated_at: r.get(20)?,
        version: r.get(21)?,
        lineage: r.get(22)?,
        agent_burst: r.get(23)?,
        rate_burst: r.get(24)?,
        agent_disabled_reason: r.get(25)?,
    })
}

impl KeyRow {
    /// The record the filter enforces: digests and the fields it needs, nothing else.
    fn raw_record(&self, imp: &Implications) -> RawKeyRecord {
        let (rate_limit, rate_burst) = self.limit();
        RawKeyRecord {
            digest: self.digest.clone(),
            id: self.id.clone(),
            agent: self.agent_name.clone(),
            status: if self.revoked_at.is_some() { KeyStatus::Revoked } else { KeyStatus::Active },
            expires_at: self.expires_at.map(RawTime::Unix),
            agent_enabled: self.agent_enabled,
            scopes: self.effective_scopes(imp),
            path_prefixes: self.path_prefixes.clone(),
            rate_limit,
            deprecated_at: self.rotated_to.as_ref().and(self.rotated_at),
            // A key's own limit is shared along its rotation lineage; an agent's limit by all
            // of the agent's keys.
            rate_bucket: match (&self.rate_limit, &self.agent_rate) {
                (Some(_), _) => Some(format!("k:{}", self.lineage)),
                (None, Some(_)) => Some(format!("a:{}", self.agent_id)),
                (None, None) => None,
            },
            rate_burst,
            disabled_reason: if self.agent_enabled { None } else { self.agent_disabled_reason.clone() },
        }
    }

    /// The effective limit and burst: the key's own, else its agent's.
    fn limit(&self) -> (Option<String>, Option<u32>) {
        match &self.rate_limit {
            Some(r) => (Some(r.clone()), self.rate_burst),
            None => (self.agent_rate.clone(), self.agent_rate.as_ref().and(self.agent_burst)),
        }
    }

    fn effective_scopes(&self, imp: &Implications) -> Vec<String> {
        crate::model::effective_scopes(self.scopes.as_deref(), &self.agent_scopes, imp)
    }

    fn view(&self, now: i64, imp: &Implications) -> KeyView {
        let masked = if self.last4.is_empty() {
            format!("sha256:{}…", self.digest.get(..8).unwrap_or(""))
        } else {
            format!("{}…{}", self.display_prefix, self.last4)
        };
        let (rate_limit, burst) = self.limit();
        KeyView {
            id: self.id.clone(),
            name: self.name.clone(),
            masked,
            agent: self.agent_name.clone(),
            scopes: self.effective_scopes(imp),
            own_scopes: self.scopes.clone(),
            path_prefixes: self.path_prefixes.clone(),
            rate_limit,
            burst,
            created_at: keyward_core::time::format_rfc3339(self.created_at),
            expires_at: rfc3339(self.expires_at),
            last_used_at: rfc3339(self.last_used_at),
            revoked_at: rfc3339(self.revoked_at),
            status: key_status(self.revoked_at, self.expires_at, self.rotated_to.is_some(), now).to_string(),
            imported: self.imported,
            rotated_from: self.rotated_from.clone(),
            rotated_to: self.rotated_to.clone(),
        }
    }

    /// The fields `key update` can change, for the audit log (never the digest).
    fn editable(&self) -> serde_json::Value {
        json!({
            "name": self.name,
            "scopes": self.scopes,
            "expires_at": rfc3339(self.expires_at),
            "rate": self.rate_limit,
            "burst": self.rate_burst,
            "path_prefixes": self.path_prefixes,
        })
    }
}

fn agent_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AgentRow> {
    Ok(AgentRow {
        id: r.get(0)?,
        name: r.get(1)?,
        description: r.get(2)?,
        scopes: json_list(&r.get::<_, String>(3)?),
        enabled: r.get(4)?,
        rate_limit: r.get(5)?,
        created_at: r.get(6)?,
        rate_burst: r.get(7)?,
        disabled_reason: r.get(8)?,
    })
}

const AGENT_COLUMNS: &str = "id, name, description, scopes, enabled, rate_limit, created_at, rate_burst, disabled_reason";

impl AgentRow {
    /// The fields `agent update` can change, for the audit log.
    fn editable(&self) -> serde_json::Value {
        json!({"description": self.description, "scopes": self.scopes, "rate": self.rate_limit, "burst": self.rate_burst})
    }
}

/// Only the fields that differ, as `{"before": {...}, "after": {...}}`.
fn changes(before: &serde_json::Value, after: &serde_json::Value) -> serde_json::Value {
    let (mut b, mut a) = (serde_json::Map::new(), serde_json::Map::new());
    if let (Some(before), Some(after)) = (before.as_object(), after.as_object()) {
        for (k, v) in before {
            if after.get(k) != Some(v) {
                b.insert(k.clone(), v.clone());
                a.insert(k.clone(), after.get(k).cloned().unwrap_or_default());
            }
        }
    }
    json!({"before": b, "after": a})
}

/// The scope catalogue's names, in creation order.
fn catalogue(tx: &Connection) -> Result<Vec<String>> {
    let mut stmt = tx.prepare("SELECT name FROM scopes ORDER BY created_at, rowid")?;
    let rows = stmt.query_map([], |r| r.get(0))?.collect::<rusqlite::Result<Vec<String>>>()?;
    Ok(rows)
}

/// The catalogue's implications, as the snapshot carries them.
fn implication_map(tx: &Connection) -> Result<std::collections::BTreeMap<String, Vec<String>>> {
    let mut stmt = tx.prepare("SELECT scope, implies FROM scope_implications ORDER BY scope, implies")?;
    let mut map: std::collections::BTreeMap<String, Vec<String>> = std::collections::BTreeMap::new();
    for row in stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))? {
        let (from, to) = row?;
        map.entry(from).or_default().push(to);
    }
    Ok(map)
}

fn implications(tx: &Connection) -> Result<Implications> {
    Implications::new(&implication_map(tx)?).map_err(Error::Internal)
}

/// Scopes of a request: valid tokens, all in the catalogue.
fn catalogue_ok(tx: &Connection, field: &'static str, scopes: &[String]) -> Result<()> {
    scopes_ok(field, scopes)?;
    known_scopes_ok(field, scopes, &catalogue(tx)?)
}

/// `none` (the CLI's word) and `null` both clear a rate limit.
fn rate_patch(rate: &Option<Option<String>>) -> Option<Option<String>> {
    rate.as_ref().map(|r| r.clone().filter(|r| r != "none"))
}

fn find_agent(tx: &Connection, name: &str) -> Result<AgentRow> {
    tx.query_row(&format!("SELECT {AGENT_COLUMNS} FROM agents WHERE name = ?1 AND deleted_at IS NULL"), [name], agent_row)
        .optional()?
        .ok_or_else(|| Error::NotFound { field: "agent", what: "agent", name: name.to_string() })
}

fn find_key(tx: &Connection, id: &str) -> Result<KeyRow> {
    tx.query_row(&format!("SELECT {KEY_COLUMNS} FROM keys k JOIN agents a ON a.id = k.agent_id WHERE k.id = ?1"), [id], key_row)
        .optional()?
        .ok_or_else(|| Error::NotFound { field: "id", what: "key", name: id.to_string() })
}

fn active_keys(tx: &Connection, agent_id: &str, now: i64) -> Result<u64> {
    let n: i64 = tx.query_row(
        "SELECT COUNT(*) FROM keys WHERE agent_id = ?1 AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?2)",
        params![agent_id, now],
        |r| r.get(0),
    )?;
    Ok(u64::try_from(n).unwrap_or(0))
}

fn agent_view(tx: &Connection, a: &AgentRow, now: i64) -> Result<AgentView> {
    let last_used: Option<i64> = tx.query_row("SELECT MAX(last_used_at) FROM keys WHERE agent_id = ?1", [&a.id], |r| r.get(0))?;
    Ok(AgentView {
        id: a.id.clone(),
        name: a.name.clone(),
        description: a.description.clone(),
        scopes: a.scopes.clone(),
        enabled: a.enabled,
        rate_limit: a.rate_limit.clone(),
        burst: a.rate_burst,
        disabled_reason: a.disabled_reason.clone(),
        created_at: keyward_core::time::format_rfc3339(a.created_at),
        active_keys: active_keys(tx, &a.id, now)?,
        last_used_at: rfc3339(last_used),
    })
}

/// Bumps and returns the snapshot version. Must run inside the change's transaction.
fn bump(tx: &Transaction<'_>) -> Result<u64> {
    tx.execute("UPDATE meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE name = 'snapshot_version'", [])?;
    let v: String = tx.query_row("SELECT value FROM meta WHERE name = 'snapshot_version'", [], |r| r.get(0))?;
    v.parse().map_err(|_| Error::Internal(format!("corrupt snapshot_version {v:?}")))
}

impl Store {
    /// Opens (creating if needed) the database and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Store> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::Internal(format!("cannot create {}: {e}", dir.display())))?;
        }
        let conn = Connection::open(path)?;
        let mut store = Store::init(conn)?;
        store.path = Some(path.to_path_buf());
        Ok(store)
    }

    /// Opens an existing store; a missing file is an error that says how one is made.
    pub fn open_existing(path: &Path) -> Result<Store> {
        if !path.exists() {
            return Err(Error::Missing(path.display().to_string()));
        }
        Store::open(path)
    }

    /// An in-memory store, for tests.
    pub fn memory() -> Result<Store> {
        Store::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<Store> {
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // WAL: readers never block the writer. FULL: an acknowledged change survives power loss,
        // not just a crash of this process.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let applied: usize = tx.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))?.try_into().unwrap_or(0);
        if applied > MIGRATIONS.len() {
            return Err(Error::Internal(format!(
                "the database has schema version {applied}, newer than this keyward ({}); upgrade keyward",
                MIGRATIONS.len()
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", i + 1)?;
        }
        // The store's identity on the feed: a restored or replaced store has another one.
        tx.execute("INSERT INTO meta (name, value) VALUES ('store_id', ?1) ON CONFLICT(name) DO NOTHING", [random_base62(16)?])?;
        tx.commit()?;
        Ok(Store { conn, actor: "cli".into(), key_prefix: DEFAULT_KEY_PREFIX.into(), path: None, is_server: false, last_change: None })
    }

    pub fn schema_version(&self) -> Result<i64> {
        Ok(self.conn.query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }

    pub fn integrity_check(&self) -> Result<String> {
        Ok(self.conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?)
    }

    pub fn snapshot_version(&self) -> Result<u64> {
        let v: String = self.conn.query_row("SELECT value FROM meta WHERE name = 'snapshot_version'", [], |r| r.get(0))?;
        v.parse().map_err(|_| Error::Internal(format!("corrupt snapshot_version {v:?}")))
    }

    /// Reads a `meta` value (e.g. the admin token digest).
    pub fn meta(&self, name: &str) -> Result<Option<String>> {
        Ok(self.conn.query_row("SELECT value FROM meta WHERE name = ?1", [name], |r| r.get(0)).optional()?)
    }

    /// Sets a `meta` value that is not part of the snapshot (no version bump), with an audit entry.
    pub fn set_meta(&mut self, name: &str, value: &str, action: &str) -> Result<()> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute("INSERT INTO meta (name, value) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET value = ?2", params![name, value])?;
        let version = u64::try_from(tx.query_row("SELECT CAST(value AS INTEGER) FROM meta WHERE name = 'snapshot_version'", [], |r| r.get::<_, i64>(0))?).unwrap_or(0);
        audit(&tx, &self.actor, action, name, json!({}), version)?;
        tx.commit()?;
        Ok(())
    }

    fn begin(&mut self) -> Result<(Transaction<'_>, u64, &str)> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let version = bump(&tx)?;
        // Recorded before commit: a refused change rolls back, and its caller sees the error.
        self.last_change = Some(version);
        Ok((tx, version, self.actor.as_str()))
    }

    pub fn create_agent(&mut self, req: &NewAgent) -> Result<CreatedAgent> {
        name_ok("name", &req.name)?;
        if req.scopes.is_empty() {
            return Err(invalid("scopes", "an agent needs at least one scope, e.g. read:all"));
        }
        scopes_ok("scopes", &req.scopes)?;
        if let Some(rate) = &req.rate {
            rate_ok("rate", rate)?;
        }
        burst_ok(req.burst, req.rate.as_deref())?;
        let description = req.description.clone().unwrap_or_default();
        description_ok(&description)?;
        let now = now_unix();
        let id = format!("agt_{}", random_base62(16)?);
        let secret = generate_key(&self.key_prefix)?;
        let key_id = format!("key_{}", random_base62(16)?);
        let prefix = self.key_prefix.clone();
        let (tx, version, actor) = self.begin()?;
        catalogue_ok(&tx, "scopes", &req.scopes)?;
        let taken: bool = tx.query_row("SELECT EXISTS(SELECT 1 FROM agents WHERE name = ?1 AND deleted_at IS NULL)", [&req.name], |r| r.get(0))?;
        if taken {
            return Err(Error::Conflict { field: "name", message: format!("an agent named {:?} already exists", req.name) });
        }
        tx.execute(
            "INSERT INTO agents (id, name, description, scopes, enabled, rate_limit, created_at, updated_at, version, rate_burst) VALUES (?1, ?2, ?3, ?4, 1, ?5, ?6, ?6, ?7, ?8)",
            params![id, req.name, description, to_json(&req.scopes), req.rate, now, version, req.burst],
        )?;
        insert_key(&tx, &key_id, &id, "Production", &prefix, &secret, None, &[], (None, None), now, None, None, false, version)?;
        audit(&tx, actor, "agent.create", &id, json!({"name": req.name, "scopes": req.scopes, "rate": req.rate, "burst": req.burst, "first_key": key_id}), version)?;
        let agent = agent_view(&tx, &find_agent(&tx, &req.name)?, now)?;
        let key = find_key(&tx, &key_id)?.view(now, &implications(&tx)?);
        tx.commit()?;
        Ok(CreatedAgent { agent, key, secret })
    }

    pub fn list_agents(&mut self) -> Result<Vec<AgentView>> {
        let now = now_unix();
        let mut stmt = self.conn.prepare(&format!("SELECT {AGENT_COLUMNS} FROM agents WHERE deleted_at IS NULL ORDER BY name"))?;
        let rows = stmt.query_map([], agent_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
        rows.iter().map(|a| agent_view(&self.conn, a, now)).collect()
    }

    pub fn show_agent(&mut self, name: &str) -> Result<AgentDetail> {
        let now = now_unix();
        let agent = find_agent(&self.conn, name)?;
        let keys = self.keys_where("k.agent_id = ?1", &agent.id, now)?;
        Ok(AgentDetail { agent: agent_view(&self.conn, &agent, now)?, keys })
    }

    /// Turns API access on or off; `reason` (when turning it off) becomes the `ACCESS_DISABLED`
    /// message API users see.
    pub fn set_agent_enabled(&mut self, name: &str, enabled: bool, reason: Option<&str>) -> Result<AgentView> {
        let now = now_unix();
        let reason = reason.map(str::trim).filter(|r| !r.is_empty());
        if let Some(r) = reason {
            if enabled {
                return Err(invalid("reason", "a reason goes with disabling an agent"));
            }
            if r.chars().count() > 200 || r.chars().any(char::is_control) {
                return Err(invalid("reason", "must be at most 200 characters, without control characters"));
            }
        }
        let (tx, version, actor) = self.begin()?;
        let agent = find_agent(&tx, name)?;
        tx.execute(
            "UPDATE agents SET enabled = ?1, disabled_reason = ?2, updated_at = ?3, version = ?4 WHERE id = ?5",
            params![enabled, reason, now, version, agent.id],
        )?;
        // Every key of the agent changes in the snapshot (its agent switch), so stamp them too.
        tx.execute("UPDATE keys SET version = ?1 WHERE agent_id = ?2", params![version, agent.id])?;
        let action = if enabled { "agent.enable" } else { "agent.disable" };
        let details = match reason {
            Some(r) => json!({"name": name, "reason": r}),
            None => json!({"name": name}),
        };
        audit(&tx, actor, action, &agent.id, details, version)?;
        let view = agent_view(&tx, &find_agent(&tx, name)?, now)?;
        tx.commit()?;
        Ok(view)
    }

    pub fn delete_agent(&mut self, name: &str) -> Result<AgentView> {
        let now = now_unix();
        let (tx, version, actor) = self.begin()?;
        let agent = find_agent(&tx, name)?;
        let revoked = tx.execute(
            "UPDATE keys SET revoked_at = ?1, version = ?2 WHERE agent_id = ?3 AND revoked_at IS NULL",
            params![now, version, agent.id],
        )?;
        tx.execute("UPDATE keys SET version = ?1 WHERE agent_id = ?2", params![version, agent.id])?;
        tx.execute("UPDATE agents SET deleted_at = ?1, enabled = 0, updated_at = ?1, version = ?2 WHERE id = ?3", params![now, version, agent.id])?;
        audit(&tx, actor, "agent.delete", &agent.id, json!({"name": name, "revoked_keys": revoked}), version)?;
        let mut view = agent_view(&tx, &agent, now)?;
        view.enabled = false;
        tx.commit()?;
        Ok(view)
    }

    /// Validates a key request against its agent.
    /// `default_name` names the key when the request does not; a batch passes `None` and checks
    /// each of its own names instead.
    fn check_new_key(tx: &Connection, req: &NewKey, default_name: Option<&str>, now: i64) -> Result<CheckedKey> {
        let agent = find_agent(tx, &req.agent)?;
        let name = req.name.clone().or_else(|| default_name.map(str::to_string)).unwrap_or_default();
        name_ok("name", &name)?;
        if let Some(scopes) = &req.scopes {
            if scopes.is_empty() {
                return Err(invalid("scopes", "give at least one scope, or leave them unset to use the agent's"));
            }
            catalogue_ok(tx, "scopes", scopes)?;
            subset_ok(scopes, &agent.scopes, &agent.name, &implications(tx)?)?;
        }
        let expires_at = expiry(req.expires_at.as_deref(), req.ttl.as_deref(), now_unix_ceil().max(now))?;
        if let Some(rate) = &req.rate {
            rate_ok("rate", rate)?;
        }
        burst_ok(req.burst, req.rate.as_deref())?;
        path_prefixes_ok(&req.path_prefixes)?;
        let taken: bool = tx.query_row(
            NAME_TAKEN,
            params![agent.id, name, now, ""],
            |r| r.get(0),
        )?;
        if taken && default_name.is_some() {
            return Err(Error::Conflict { field: "name", message: format!("agent {} already has a key named {name:?}", agent.name) });
        }
        Ok(CheckedKey { agent, scopes: req.scopes.clone(), expires_at, name })
    }

    pub fn create_key(&mut self, req: &NewKey) -> Result<CreatedKey> {
        let now = now_unix();
        let secret = generate_key(&self.key_prefix)?;
        let key_id = format!("key_{}", random_base62(16)?);
        let prefix = self.key_prefix.clone();
        let (tx, version, actor) = self.begin()?;
        let CheckedKey { agent, scopes, expires_at, name } = Store::check_new_key(&tx, req, Some(&key_id), now)?;
        insert_key(&tx, &key_id, &agent.id, &name, &prefix, &secret, scopes.as_deref(), &req.path_prefixes, (req.rate.as_deref(), req.burst), now, expires_at, None, false, version)?;
        audit(&tx, actor, "key.create", &key_id, json!({"agent": agent.name, "name": name, "scopes": scopes, "expires_at": rfc3339(expires_at), "rate": req.rate, "burst": req.burst, "path_prefixes": req.path_prefixes}), version)?;
        let key = find_key(&tx, &key_id)?.view(now, &implications(&tx)?);
        tx.commit()?;
        Ok(CreatedKey { key, secret })
    }

    pub fn import_key(&mut self, req: &ImportKey) -> Result<KeyView> {
        let now = now_unix();
        let (digest, prefix, last4) = imported_digest(req.secret.as_deref(), req.digest.as_deref(), &self.key_prefix, req.allow_weak)?;
        let key_id = format!("key_{}", random_base62(16)?);
        let (tx, version, actor) = self.begin()?;
        let CheckedKey { agent, scopes, expires_at, name } = Store::check_new_key(&tx, &req.key, Some(&key_id), now)?;
        let exists: bool = tx.query_row("SELECT EXISTS(SELECT 1 FROM keys WHERE digest = ?1)", [&digest], |r| r.get(0))?;
        if exists {
            return Err(Error::Conflict { field: "key", message: "this key is already registered".into() });
        }
        tx.execute(
            "INSERT INTO keys (id, agent_id, name, display_prefix, last4, digest, scopes, path_prefixes, rate_limit, created_at, expires_at, imported, version, rate_burst) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, 1, ?12, ?13)",
            params![key_id, agent.id, name, prefix, last4, digest, scopes.as_deref().map(to_json), to_json(&req.key.path_prefixes), req.key.rate, now, expires_at, version, req.key.burst],
        )?;
        audit(&tx, actor, "key.import", &key_id, json!({"agent": agent.name, "name": name, "scopes": scopes, "expires_at": rfc3339(expires_at), "rate": req.key.rate, "burst": req.key.burst}), version)?;
        let key = find_key(&tx, &key_id)?.view(now, &implications(&tx)?);
        tx.commit()?;
        Ok(key)
    }

    /// Imports many existing keys in one transaction (one version, one audit entry): each line
    /// is a key, or `sha256:<hex>` for its digest. Keys are named `<name>-<line>`. Any bad line
    /// refuses the whole batch, naming the line.
    pub fn import_batch(&mut self, template: &NewKey, lines: &[String], allow_weak: bool) -> Result<Vec<String>> {
        let now = now_unix();
        let base = template.name.clone().unwrap_or_else(|| "imported".into());
        name_ok("name", &base)?;
        let mut rows = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let parsed = match line.strip_prefix("sha256:") {
                Some(hex) => imported_digest(None, Some(hex), &self.key_prefix, allow_weak),
                None => imported_digest(Some(line), None, &self.key_prefix, allow_weak),
            };
            let (digest, prefix, last4) = parsed.map_err(|e| invalid("key", format!("line {}: {}", i + 1, e.message())))?;
            rows.push((format!("{base}-{}", i + 1), format!("key_{}", random_base62(16)?), digest, prefix, last4));
        }
        if rows.is_empty() {
            return Err(invalid("key", "no keys on stdin"));
        }
        let (tx, version, actor) = self.begin()?;
        let probe = NewKey { name: Some(base.clone()), ..template.clone() };
        let CheckedKey { agent, scopes, expires_at, .. } = Store::check_new_key(&tx, &probe, None, now)?;
        {
            let mut exists = tx.prepare("SELECT EXISTS(SELECT 1 FROM keys WHERE digest = ?1)")?;
            let mut taken = tx.prepare(
                NAME_TAKEN,
            )?;
            let mut insert = tx.prepare(
                "INSERT INTO keys (id, agent_id, name, display_prefix, last4, digest, scopes, path_prefixes, rate_limit, created_at, expires_at, imported, version, rate_burst) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, 1, ?12, ?13)",
            )?;
            let scopes_json = scopes.as_deref().map(to_json);
            let paths_json = to_json(&template.path_prefixes);
            for (name, id, digest, prefix, last4) in &rows {
                if exists.query_row([digest], |r| r.get::<_, bool>(0))? {
                    return Err(Error::Conflict { field: "key", message: format!("{name}: this key is already registered") });
                }
                if taken.query_row(params![agent.id, name, now, ""], |r| r.get::<_, bool>(0))? {
                    return Err(Error::Conflict { field: "name", message: format!("agent {} already has a key named {name:?}", agent.name) });
                }
                insert.execute(params![id, agent.id, name, prefix, last4, digest, scopes_json, paths_json, template.rate, now, expires_at, version, template.burst])?;
            }
        }
        audit(&tx, actor, "key.import_batch", &agent.id, json!({"agent": agent.name, "count": rows.len(), "name": base}), version)?;
        tx.commit()?;
        Ok(rows.into_iter().map(|r| r.1).collect())
    }

    fn keys_where(&self, cond: &str, arg: &str, now: i64) -> Result<Vec<KeyView>> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {KEY_COLUMNS} FROM keys k JOIN agents a ON a.id = k.agent_id WHERE {cond} ORDER BY a.name, k.created_at, k.id"
        ))?;
        let rows = stmt.query_map([arg], key_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
        let imp = implications(&self.conn)?;
        Ok(rows.iter().map(|k| k.view(now, &imp)).collect())
    }

    pub fn list_keys(&mut self, agent: Option<&str>) -> Result<Vec<KeyView>> {
        let now = now_unix();
        match agent {
            Some(name) => {
                let agent = find_agent(&self.conn, name)?;
                self.keys_where("k.agent_id = ?1", &agent.id, now)
            }
            None => self.keys_where("a.deleted_at IS NULL AND ?1 = ''", "", now),
        }
    }

    pub fn revoke_key(&mut self, id: &str) -> Result<KeyView> {
        let now = now_unix();
        let (tx, version, actor) = self.begin()?;
        let key = find_key(&tx, id)?;
        if key.revoked_at.is_some() {
            return Err(Error::Conflict { field: "id", message: format!("key {id} is already revoked") });
        }
        tx.execute("UPDATE keys SET revoked_at = ?1, version = ?2 WHERE id = ?3", params![now, version, id])?;
        audit(&tx, actor, "key.revoke", id, json!({"agent": key.agent_name, "name": key.name}), version)?;
        let view = find_key(&tx, id)?.view(now, &implications(&tx)?);
        tx.commit()?;
        Ok(view)
    }

    pub fn rotate_key(&mut self, id: &str, req: &RotateKey) -> Result<Rotated> {
        let now = now_unix();
        let grace = parse_duration("grace", req.grace.as_deref().unwrap_or(DEFAULT_GRACE))?;
        if req.no_expiry && (req.ttl.is_some() || req.expires_at.is_some()) {
            return Err(invalid("no_expiry", "give no expiry, a TTL or an expiry time, not two of them"));
        }
        let chosen = expiry(req.expires_at.as_deref(), req.ttl.as_deref(), now_unix_ceil().max(now))?;
        let secret = generate_key(&self.key_prefix)?;
        let new_id = format!("key_{}", random_base62(16)?);
        let prefix = self.key_prefix.clone();
        let (tx, version, actor) = self.begin()?;
        let old = find_key(&tx, id)?;
        live_key_ok(id, old.revoked_at, old.expires_at, old.rotated_to.as_deref(), now, "rotate")?;
        // By default the new key lives as long as the old one was meant to, counted from now;
        // a key that never expired gives one that never expires.
        let new_expiry = match (req.no_expiry, chosen) {
            (true, _) => None,
            (false, Some(t)) => Some(t),
            (false, None) => old.expires_at.map(|t| now.saturating_add(t - old.created_at)),
        };
        let old_expiry = now.saturating_add(grace);
        let old_expiry = old.expires_at.map_or(old_expiry, |t| t.min(old_expiry));
        insert_key(&tx, &new_id, &old.agent_id, &old.name, &prefix, &secret, old.scopes.as_deref(), &old.path_prefixes, (old.rate_limit.as_deref(), old.rate_burst), now, new_expiry, Some(id), false, version)?;
        tx.execute(
            "UPDATE keys SET expires_at = ?1, rotated_to = ?2, rotated_at = ?3, version = ?4 WHERE id = ?5",
            params![old_expiry, new_id, now, version, id],
        )?;
        tx.execute("UPDATE keys SET lineage = ?1 WHERE id = ?2", params![old.lineage, new_id])?;
        audit(&tx, actor, "key.rotate", id, json!({"agent": old.agent_name, "new_key": new_id, "old_expires_at": rfc3339(Some(old_expiry)), "new_expires_at": rfc3339(new_expiry)}), version)?;
        let imp = implications(&tx)?;
        let old_view = find_key(&tx, id)?.view(now, &imp);
        let new_view = find_key(&tx, &new_id)?.view(now, &imp);
        tx.commit()?;
        Ok(Rotated { old: old_view, new: CreatedKey { key: new_view, secret } })
    }

    /// Notes an Envoy's feed request: it has applied `applied` (if known), and is connected until
    /// `open_until` unless it asks again.
    pub fn envoy_seen(&mut self, id: &str, applied: Option<u64>, open_until: i64) -> Result<()> {
        let now = now_unix();
        let applied = applied.map(|v| i64::try_from(v).unwrap_or(i64::MAX));
        self.conn.execute(
            "INSERT INTO envoys (id, applied_version, last_seen, open_until) VALUES (?1, COALESCE(?2, 0), ?3, ?4) \
             ON CONFLICT(id) DO UPDATE SET applied_version = COALESCE(?2, applied_version), last_seen = ?3, open_until = ?4",
            params![id, applied, now, open_until],
        )?;
        Ok(())
    }

    fn envoys(&self, version: u64, now: i64, serving: bool) -> Result<Vec<EnvoyView>> {
        let mut stmt = self.conn.prepare("SELECT id, applied_version, last_seen, open_until FROM envoys ORDER BY id")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?, r.get::<_, i64>(3)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, applied, last_seen, open_until) = row?;
            let applied = u64::try_from(applied).unwrap_or(0);
            let connected = serving && now <= open_until;
            let lag = version.saturating_sub(applied);
            let state = match (connected, lag) {
                (false, _) => "stale",
                (true, 0) => "connected",
                (true, _) => "lagging",
            };
            out.push(EnvoyView {
                id,
                applied_version: applied,
                lag,
                last_seen: keyward_core::time::format_rfc3339(if connected { now } else { last_seen }),
                connected,
                state: state.into(),
            });
        }
        Ok(out)
    }

    pub fn status(&mut self) -> Result<StatusView> {
        let now = now_unix();
        let agents: i64 = self.conn.query_row("SELECT COUNT(*) FROM agents WHERE deleted_at IS NULL", [], |r| r.get(0))?;
        let keys: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM keys WHERE revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?1)",
            [now],
            |r| r.get(0),
        )?;
        let version = self.snapshot_version()?;
        let serving = self.serving();
        Ok(StatusView {
            snapshot_version: version,
            agents: u64::try_from(agents).unwrap_or(0),
            active_keys: u64::try_from(keys).unwrap_or(0),
            serving,
            envoys: self.envoys(version, now, serving)?,
        })
    }

    pub fn audit(&mut self, limit: u32) -> Result<Vec<AuditEntry>> {
        let mut stmt = self.conn.prepare(
            "SELECT seq, at, actor, action, target, details, version FROM (SELECT * FROM audit ORDER BY seq DESC LIMIT ?1) ORDER BY seq",
        )?;
        let rows = stmt.query_map([limit], |r| {
            Ok(AuditEntry {
                seq: r.get(0)?,
                at: keyward_core::time::format_rfc3339(r.get(1)?),
                actor: r.get(2)?,
                action: r.get(3)?,
                target: r.get(4)?,
                details: serde_json::from_str(&r.get::<_, String>(5)?).unwrap_or_default(),
                version: u64::try_from(r.get::<_, i64>(6)?).unwrap_or(0),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// The whole snapshot the filter enforces: digests and the fields it needs, nothing else.
    pub fn snapshot(&mut self) -> Result<RawSnapshot> {
        let tx = self.conn.transaction()?;
        let version: String = tx.query_row("SELECT value FROM meta WHERE name = 'snapshot_version'", [], |r| r.get(0))?;
        let mut stmt = tx.prepare(&format!("SELECT {KEY_COLUMNS} FROM keys k JOIN agents a ON a.id = k.agent_id ORDER BY k.id"))?;
        let rows = stmt.query_map([], key_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
        let map = implication_map(&tx)?;
        let imp = Implications::new(&map).map_err(Error::Internal)?;
        let keys = rows.iter().map(|k| k.raw_record(&imp)).collect();
        drop(stmt);
        tx.commit()?;
        Ok(RawSnapshot { version: version.parse().unwrap_or(0), implications: Some(map), keys })
    }
}

impl Store {
    /// Edits an agent: every field present changes, in one version with one audit entry that
    /// records the fields before and after. Its keys are re-stamped: their effective scopes and
    /// limits are the agent's business too.
    pub fn update_agent(&mut self, name: &str, upd: &AgentUpdate) -> Result<AgentView> {
        let now = now_unix();
        let rate = rate_patch(&upd.rate);
        if upd.description.is_none() && upd.scopes.is_none() && upd.add_scopes.is_empty() && upd.remove_scopes.is_empty() && rate.is_none() && upd.burst.is_none() {
            return Err(invalid("request", "nothing to change: give a description, scopes, scopes to add or remove, a rate or a burst"));
        }
        if upd.scopes.is_some() && !(upd.add_scopes.is_empty() && upd.remove_scopes.is_empty()) {
            return Err(invalid("scopes", "replace the scopes or add and remove some, not both"));
        }
        if let Some(d) = &upd.description {
            description_ok(d)?;
        }
        if let Some(Some(r)) = &rate {
            rate_ok("rate", r)?;
        }
        let (tx, version, actor) = self.begin()?;
        let agent = find_agent(&tx, name)?;
        let mut scopes = upd.scopes.clone().unwrap_or_else(|| agent.scopes.clone());
        catalogue_ok(&tx, "scopes", &scopes)?;
        catalogue_ok(&tx, "add_scopes", &upd.add_scopes)?;
        for s in &upd.add_scopes {
            if !scopes.contains(s) {
                scopes.push(s.clone());
            }
        }
        for s in &upd.remove_scopes {
            if !scopes.contains(s) {
                return Err(invalid("remove_scopes", format!("agent {name} does not have scope {s:?} (it has {})", scopes.join(" "))));
            }
            scopes.retain(|x| x != s);
        }
        if scopes.is_empty() {
            return Err(invalid("scopes", "an agent needs at least one scope; disable it to turn API access off"));
        }
        let (new_rate, new_burst) = patched_limit((agent.rate_limit.clone(), agent.rate_burst), rate.clone(), upd.burst)?;
        let description = upd.description.clone().unwrap_or_else(|| agent.description.clone());
        tx.execute(
            "UPDATE agents SET description = ?1, scopes = ?2, rate_limit = ?3, rate_burst = ?4, updated_at = ?5, version = ?6 WHERE id = ?7",
            params![description, to_json(&scopes), new_rate, new_burst, now, version, agent.id],
        )?;
        tx.execute("UPDATE keys SET version = ?1 WHERE agent_id = ?2", params![version, agent.id])?;
        let after = find_agent(&tx, name)?;
        audit(&tx, actor, "agent.update", &agent.id, json!({"name": name, "changes": changes(&agent.editable(), &after.editable())}), version)?;
        let view = agent_view(&tx, &after, now)?;
        tx.commit()?;
        Ok(view)
    }

    /// One key, masked.
    pub fn get_key(&mut self, id: &str) -> Result<KeyView> {
        let key = find_key(&self.conn, id)?;
        Ok(key.view(now_unix(), &implications(&self.conn)?))
    }

    /// Edits a key with the rules that hold at creation: scopes within its agent's and in the
    /// catalogue, an expiry in the future, a valid limit and burst, a name unique among the
    /// agent's live keys.
    pub fn update_key(&mut self, id: &str, upd: &KeyUpdate) -> Result<KeyView> {
        let now = now_unix();
        let rate = rate_patch(&upd.rate);
        if upd.name.is_none() && upd.scopes.is_none() && upd.expires_at.is_none() && upd.ttl.is_none() && rate.is_none() && upd.burst.is_none() && upd.path_prefixes.is_none() {
            return Err(invalid("request", "nothing to change: give a name, scopes, an expiry, a rate, a burst or path prefixes"));
        }
        if let Some(n) = &upd.name {
            name_ok("name", n)?;
        }
        if let Some(Some(r)) = &rate {
            rate_ok("rate", r)?;
        }
        if let Some(p) = &upd.path_prefixes {
            path_prefixes_ok(p)?;
        }
        let expires_at = match (&upd.expires_at, &upd.ttl) {
            (Some(_), Some(_)) => return Err(invalid("expires_at", "give an expiry time, a TTL or no expiry, not two of them")),
            (Some(None), None) => Some(None),
            (Some(Some(t)), None) => Some(expiry(Some(t), None, now_unix_ceil().max(now))?),
            (None, Some(ttl)) => Some(expiry(None, Some(ttl), now_unix_ceil().max(now))?),
            (None, None) => None,
        };
        let (tx, version, actor) = self.begin()?;
        let key = find_key(&tx, id)?;
        // An expired key or the old key of a rotation stays as it ended: editing it would bring
        // a dead key back, or stretch a grace period.
        live_key_ok(id, key.revoked_at, key.expires_at, key.rotated_to.as_deref(), now, "change")?;
        if let Some(Some(scopes)) = &upd.scopes {
            if scopes.is_empty() {
                return Err(invalid("scopes", "give at least one scope, or inherit the agent's (null)"));
            }
            catalogue_ok(&tx, "scopes", scopes)?;
            subset_ok(scopes, &key.agent_scopes, &key.agent_name, &implications(&tx)?)?;
        }
        if let Some(name) = &upd.name {
            let taken: bool = tx.query_row(NAME_TAKEN, params![key.agent_id, name, now, id], |r| r.get(0))?;
            if taken {
                return Err(Error::Conflict { field: "name", message: format!("agent {} already has a key named {name:?}", key.agent_name) });
            }
        }
        let (new_rate, new_burst) = patched_limit((key.rate_limit.clone(), key.rate_burst), rate.clone(), upd.burst)?;
        let scopes = upd.scopes.clone().unwrap_or_else(|| key.scopes.clone());
        let paths = upd.path_prefixes.clone().unwrap_or_else(|| key.path_prefixes.clone());
        tx.execute(
            "UPDATE keys SET name = ?1, scopes = ?2, expires_at = ?3, rate_limit = ?4, rate_burst = ?5, path_prefixes = ?6, version = ?7 WHERE id = ?8",
            params![
                upd.name.clone().unwrap_or_else(|| key.name.clone()),
                scopes.as_deref().map(to_json),
                expires_at.unwrap_or(key.expires_at),
                new_rate,
                new_burst,
                to_json(&paths),
                version,
                id
            ],
        )?;
        let after = find_key(&tx, id)?;
        audit(&tx, actor, "key.update", id, json!({"agent": key.agent_name, "changes": changes(&key.editable(), &after.editable())}), version)?;
        let view = after.view(now, &implications(&tx)?);
        tx.commit()?;
        Ok(view)
    }

    /// The scope catalogue, in creation order.
    pub fn list_scopes(&mut self) -> Result<Vec<ScopeView>> {
        let now = now_unix();
        let map = implication_map(&self.conn)?;
        let mut stmt = self.conn.prepare("SELECT name, description FROM scopes ORDER BY created_at, rowid")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?.collect::<rusqlite::Result<Vec<_>>>()?;
        drop(stmt);
        rows.into_iter()
            .map(|(name, description)| {
                let (agents, keys) = scope_use(&self.conn, &name, now)?;
                Ok(ScopeView { implies: map.get(&name).cloned().unwrap_or_default(), name, description, agents, keys })
            })
            .collect()
    }

    pub fn add_scope(&mut self, req: &NewScope) -> Result<ScopeView> {
        scope_name_ok("name", &req.name)?;
        description_ok(&req.description)?;
        let now = now_unix();
        let (tx, version, actor) = self.begin()?;
        let exists: bool = tx.query_row("SELECT EXISTS(SELECT 1 FROM scopes WHERE name = ?1)", [&req.name], |r| r.get(0))?;
        if exists {
            return Err(Error::Conflict { field: "name", message: format!("scope {:?} is already in the catalogue", req.name) });
        }
        tx.execute("INSERT INTO scopes (name, description, created_at) VALUES (?1, ?2, ?3)", params![req.name, req.description, now])?;
        audit(&tx, actor, "scope.add", &req.name, json!({"description": req.description}), version)?;
        tx.commit()?;
        Ok(ScopeView { name: req.name.clone(), description: req.description.clone(), implies: vec![], agents: 0, keys: 0 })
    }

    /// Removes a scope nobody carries, with its implications.
    pub fn remove_scope(&mut self, name: &str) -> Result<ScopeView> {
        let now = now_unix();
        let (tx, version, actor) = self.begin()?;
        let description: String = tx
            .query_row("SELECT description FROM scopes WHERE name = ?1", [name], |r| r.get(0))
            .optional()?
            .ok_or_else(|| Error::NotFound { field: "name", what: "scope", name: name.to_string() })?;
        let (agents, keys) = scope_use(&tx, name, now)?;
        if agents + keys > 0 {
            return Err(Error::Conflict {
                field: "name",
                message: format!("scope {name:?} is still carried by {agents} agent(s) and {keys} key(s); remove it from them first"),
            });
        }
        // Carried through an implication counts too: removing it would narrow those keys.
        let implied_by = implied_use(&tx, name, now)?;
        if !implied_by.is_empty() {
            return Err(Error::Conflict {
                field: "name",
                message: format!(
                    "scope {name:?} is implied by {} that live agents or keys carry; remove those implications first",
                    implied_by.join(", ")
                ),
            });
        }
        let implied = tx.execute("DELETE FROM scope_implications WHERE scope = ?1 OR implies = ?1", [name])?;
        tx.execute("DELETE FROM scopes WHERE name = ?1", [name])?;
        if implied > 0 {
            // Another scope implied it: every key's effective scopes may change.
            tx.execute("UPDATE keys SET version = ?1", [version])?;
        }
        audit(&tx, actor, "scope.remove", name, json!({"description": description}), version)?;
        tx.commit()?;
        Ok(ScopeView { name: name.to_string(), description, implies: vec![], agents: 0, keys: 0 })
    }

    /// `scope` implies `implies` (or no longer does, with `remove`). Every key is re-sent: the
    /// filter expands scopes with the catalogue's implications.
    pub fn imply_scope(&mut self, scope: &str, req: &Imply) -> Result<ScopeView> {
        let (tx, version, actor) = self.begin()?;
        let names = catalogue(&tx)?;
        known_scopes_ok("name", &[scope.to_string()], &names)?;
        known_scopes_ok("implies", std::slice::from_ref(&req.implies), &names)?;
        if scope == req.implies {
            return Err(invalid("implies", "a scope always implies itself"));
        }
        if req.remove {
            let n = tx.execute("DELETE FROM scope_implications WHERE scope = ?1 AND implies = ?2", params![scope, req.implies])?;
            if n == 0 {
                return Err(invalid("implies", format!("{scope:?} does not imply {:?}", req.implies)));
            }
        } else {
            let n = tx.execute("INSERT OR IGNORE INTO scope_implications (scope, implies) VALUES (?1, ?2)", params![scope, req.implies])?;
            if n == 0 {
                return Err(Error::Conflict { field: "implies", message: format!("{scope:?} already implies {:?}", req.implies) });
            }
        }
        tx.execute("UPDATE keys SET version = ?1", [version])?;
        let action = if req.remove { "scope.unimply" } else { "scope.imply" };
        audit(&tx, actor, action, scope, json!({"implies": req.implies}), version)?;
        let description: String = tx.query_row("SELECT description FROM scopes WHERE name = ?1", [scope], |r| r.get(0))?;
        let (agents, keys) = scope_use(&tx, scope, now_unix())?;
        let implies = implication_map(&tx)?.remove(scope).unwrap_or_default();
        tx.commit()?;
        Ok(ScopeView { name: scope.to_string(), description, implies, agents, keys })
    }

    /// Whether a `keyward serve` publishes this store now. The server itself, and in-memory
    /// stores (tests), always do.
    pub fn serving(&self) -> bool {
        match &self.path {
            Some(p) if !self.is_server => crate::applied::serve_running(p),
            _ => true,
        }
    }

    /// The Envoys connected now (heard from within their feed request's wait plus 2 s), and which
    /// of them have applied `version`.
    pub fn envoys_applied(&self, version: u64) -> Result<(Vec<String>, Vec<String>)> {
        let now = now_unix();
        let mut stmt = self.conn.prepare_cached("SELECT id, applied_version FROM envoys WHERE open_until >= ?1 ORDER BY id")?;
        let rows = stmt.query_map([now], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        let (mut done, mut pending) = (Vec::new(), Vec::new());
        for row in rows {
            let (id, applied) = row?;
            if u64::try_from(applied).unwrap_or(0) >= version {
                done.push(id);
            } else {
                pending.push(id);
            }
        }
        Ok((done, pending))
    }

    /// On `serve` start: feed requests held by an earlier process are gone.
    pub fn forget_open_feeds(&mut self) -> Result<()> {
        self.conn.execute("UPDATE envoys SET open_until = MIN(open_until, ?1)", [now_unix() - 1])?;
        Ok(())
    }
}

/// The scopes that imply `scope` and that some live agent or key carries.
fn implied_use(tx: &Connection, scope: &str, now: i64) -> Result<Vec<String>> {
    // The closure: whatever implies `scope`, directly or not.
    let imp = implications(tx)?;
    let sources = catalogue(tx)?.into_iter().filter(|s| s != scope && imp.expand([s.as_str()]).iter().any(|x| x == scope));
    let mut used = Vec::new();
    for s in sources {
        let (agents, keys) = scope_use(tx, &s, now)?;
        if agents + keys > 0 {
            used.push(s);
        }
    }
    Ok(used)
}

/// Live agents and live keys (not revoked or expired) that carry `scope` themselves.
fn scope_use(tx: &Connection, scope: &str, now: i64) -> Result<(u64, u64)> {
    let agents: i64 = tx.query_row(
        "SELECT COUNT(*) FROM agents a, json_each(a.scopes) j WHERE a.deleted_at IS NULL AND j.value = ?1",
        [scope],
        |r| r.get(0),
    )?;
    let keys: i64 = tx.query_row(
        "SELECT COUNT(*) FROM keys k, json_each(k.scopes) j WHERE k.scopes IS NOT NULL AND k.revoked_at IS NULL \
         AND (k.expires_at IS NULL OR k.expires_at > ?2) AND j.value = ?1",
        params![scope, now],
        |r| r.get(0),
    )?;
    Ok((u64::try_from(agents).unwrap_or(0), u64::try_from(keys).unwrap_or(0)))
}

/// Records per feed page: bounds the memory of one answer (and of the filter VM applying it).
pub const FEED_PAGE: usize = 5_000;

impl Store {
    /// The records changed after `since` (or after `(since, after)` when continuing a page), in
    /// `(version, id)` order, at most `limit`, read in one transaction with the version they are
    /// consistent with.
    pub fn feed_page(&mut self, since: u64, after: Option<&str>, limit: usize) -> Result<FeedMessage> {
        let tx = self.conn.transaction()?;
        let version: String = tx.query_row("SELECT value FROM meta WHERE name = 'snapshot_version'", [], |r| r.get(0))?;
        let version: u64 = version.parse().map_err(|_| Error::Internal(format!("corrupt snapshot_version {version:?}")))?;
        let since_i = i64::try_from(since).unwrap_or(i64::MAX);
        let limit_i = i64::try_from(limit + 1).unwrap_or(i64::MAX);
        let rows = {
            let (sql, after) = match after {
                Some(a) => ("(k.version > ?1 OR (k.version = ?1 AND k.id > ?2))", a),
                None => ("(k.version > ?1 AND ?2 = '')", ""),
            };
            let mut stmt = tx.prepare(&format!(
                "SELECT {KEY_COLUMNS} FROM keys k JOIN agents a ON a.id = k.agent_id WHERE {sql} ORDER BY k.version, k.id LIMIT ?3"
            ))?;
            let rows = stmt.query_map(params![since_i, after, limit_i], key_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
            rows
        };
        let map = implication_map(&tx)?;
        tx.commit()?;
        let imp = Implications::new(&map).map_err(Error::Internal)?;
        let complete = rows.len() <= limit;
        let page = &rows[..rows.len().min(limit)];
        let cursor = match (complete, page.last()) {
            (false, Some(last)) => Some(FeedCursor { version: u64::try_from(last.version).unwrap_or(0), id: last.id.clone() }),
            _ => None,
        };
        Ok(FeedMessage { version, complete, cursor, implications: Some(map), store: None, reset: false, keys: page.iter().map(|k| k.raw_record(&imp)).collect() })
    }

    /// Adds an Envoy's usage report: hourly counts, and each key's last use.
    pub fn record_usage(&mut self, report: &UsageReport) -> Result<usize> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut known = 0;
        let now = now_unix();
        for u in &report.usage {
            let count = i64::try_from(u.count).unwrap_or(i64::MAX);
            let exists: bool = tx.query_row("SELECT EXISTS(SELECT 1 FROM keys WHERE id = ?1)", [&u.key_id], |r| r.get(0))?;
            if !exists {
                continue; // A key the store no longer has: nothing to attribute it to.
            }
            known += 1;
            // A key that was only refused has no use (`last_used` 0): it is not "last used".
            if count > 0 && u.last_used > 0 {
                tx.execute("UPDATE keys SET last_used_at = MAX(COALESCE(last_used_at, 0), ?1) WHERE id = ?2", params![u.last_used, u.key_id])?;
            }
            let hour = u.last_used - u.last_used.rem_euclid(3600);
            // Refusals carry no time of their own: they count in the hour the report arrived.
            let denied_hour = now - now.rem_euclid(3600);
            if count > 0 && u.last_used > 0 {
                tx.execute(
                    "INSERT INTO usage (key_id, hour, count) VALUES (?1, ?2, ?3) ON CONFLICT(key_id, hour) DO UPDATE SET count = count + ?3",
                    params![u.key_id, hour, count],
                )?;
            }
            for (code, n) in &u.denied {
                // Codes are the contract's upper-case words; anything else is not stored.
                if code.is_empty() || code.len() > 32 || !code.bytes().all(|b| b.is_ascii_uppercase() || b == b'_') {
                    continue;
                }
                tx.execute(
                    "INSERT INTO usage_denied (key_id, hour, code, count) VALUES (?1, ?2, ?3, ?4) \
                     ON CONFLICT(key_id, hour, code) DO UPDATE SET count = count + ?4",
                    params![u.key_id, denied_hour, code, i64::try_from(*n).unwrap_or(i64::MAX)],
                )?;
            }
        }
        tx.commit()?;
        Ok(known)
    }

    /// Requests per key and hour since `since` (Unix seconds), optionally for one agent.
    pub fn usage(&mut self, agent: Option<&str>, since: i64) -> Result<Vec<UsageRow>> {
        let agent_id = match agent {
            Some(name) => Some(find_agent(&self.conn, name)?.id),
            None => None,
        };
        // Allowed and refused counts, per key and hour: one row wherever either is non-zero.
        let mut stmt = self.conn.prepare(
            "WITH hours AS (SELECT key_id, hour FROM usage UNION SELECT key_id, hour FROM usage_denied) \
             SELECT h.key_id, k.name, a.name, h.hour, COALESCE(u.count, 0), \
                    (SELECT json_group_object(d.code, d.count) FROM usage_denied d WHERE d.key_id = h.key_id AND d.hour = h.hour) \
             FROM hours h JOIN keys k ON k.id = h.key_id JOIN agents a ON a.id = k.agent_id \
             LEFT JOIN usage u ON u.key_id = h.key_id AND u.hour = h.hour \
             WHERE h.hour >= ?1 AND (?2 IS NULL OR k.agent_id = ?2) ORDER BY a.name, k.name, h.key_id, h.hour",
        )?;
        let rows = stmt.query_map(params![since - since.rem_euclid(3600), agent_id], |r| {
            Ok(UsageRow {
                key_id: r.get(0)?,
                key_name: r.get(1)?,
                agent: r.get(2)?,
                hour: keyward_core::time::format_rfc3339(r.get(3)?),
                count: u64::try_from(r.get::<_, i64>(4)?).unwrap_or(0),
                denied: r.get::<_, Option<String>>(5)?.and_then(|j| serde_json::from_str(&j).ok()).unwrap_or_default(),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }
}

/// Longest key the filter accepts by default (its `max_key_length`).
pub const FILTER_MAX_KEY_LENGTH: usize = 256;
/// Imported keys shorter than this are guessable; they need `allow_weak`.
pub const WEAK_KEY_LENGTH: usize = 16;

/// The digest, display prefix and last four of an imported key (by value or by digest). A key
/// the filter would always refuse is refused here: over its length bound, outside printable
/// ASCII, or in keyward's format (`kw…_`, or this store's prefix) with a wrong checksum.
fn imported_digest(secret: Option<&str>, digest: Option<&str>, key_prefix: &str, allow_weak: bool) -> Result<(String, String, String)> {
    match (secret, digest) {
        (Some(_), Some(_)) => Err(invalid("digest", "give the key or its digest, not both")),
        (None, None) => Err(invalid("key", "give the existing key, or its SHA-256 digest")),
        (Some(secret), None) => {
            let secret = secret.trim();
            if secret.is_empty() || !secret.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',') {
                return Err(invalid("key", "the key must be printable ASCII without spaces or commas: the filter refuses anything else"));
            }
            if secret.len() > FILTER_MAX_KEY_LENGTH {
                return Err(invalid(
                    "key",
                    format!("the key is {} characters; the filter refuses keys over {FILTER_MAX_KEY_LENGTH} (its max_key_length)", secret.len()),
                ));
            }
            let prefixes = [key_prefix.to_string(), "kw".to_string(), "kw_live".to_string(), "kw_test".to_string()];
            if keyformat::check(&prefixes, secret) == keyformat::FormatCheck::BadChecksum {
                return Err(invalid(
                    "key",
                    "the key looks like a keyward key but its checksum is wrong (a typo?); the filter refuses it as MALFORMED_API_KEY",
                ));
            }
            if secret.len() < WEAK_KEY_LENGTH && !allow_weak {
                return Err(invalid(
                    "key",
                    format!("the key is only {} characters and easy to guess; import it as a weak key (allow_weak) only if you must", secret.len()),
                ));
            }
            // Short keys show nothing: eight characters of a 12-character key is too much.
            let shown = secret.len() >= 16;
            let prefix = if shown { secret.get(..4).unwrap_or("").to_string() } else { String::new() };
            let last4 = if shown { secret.get(secret.len() - 4..).unwrap_or("").to_string() } else { String::new() };
            Ok((Digest::of(secret.as_bytes()).to_hex(), prefix, last4))
        }
        (None, Some(d)) => {
            let digest = Digest::from_hex(d.trim()).ok_or_else(|| invalid("digest", "must be the SHA-256 of the key, 64 hex digits"))?;
            Ok((digest.to_hex(), String::new(), String::new()))
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn insert_key(
    tx: &Transaction<'_>,
    id: &str,
    agent_id: &str,
    name: &str,
    prefix: &str,
    secret: &str,
    scopes: Option<&[String]>,
    path_prefixes: &[String],
    (rate, burst): (Option<&str>, Option<u32>),
    now: i64,
    expires_at: Option<i64>,
    rotated_from: Option<&str>,
    imported: bool,
    version: u64,
) -> Result<()> {
    let last4 = secret.get(secret.len().saturating_sub(4)..).unwrap_or("");
    tx.execute(
        "INSERT INTO keys (id, agent_id, name, display_prefix, last4, digest, scopes, path_prefixes, rate_limit, created_at, expires_at, rotated_from, imported, version, rate_burst) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
        params![
            id,
            agent_id,
            name,
            format!("{prefix}_"),
            last4,
            Digest::of(secret.as_bytes()).to_hex(),
            scopes.map(to_json),
            to_json(path_prefixes),
            rate,
            now,
            expires_at,
            rotated_from,
            imported,
            version,
            burst
        ],
    )?;
    Ok(())
}

fn audit(tx: &Transaction<'_>, actor: &str, action: &str, target: &str, details: serde_json::Value, version: u64) -> Result<()> {
    tx.execute(
        "INSERT INTO audit (at, actor, action, target, details, version) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![now_unix(), actor, action, target, details.to_string(), version],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_db(tag: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("keyward-store-{tag}-{}.db", std::process::id()));
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", p.display()));
        }
        p
    }

    #[test]
    fn migrations_run_once_and_reopen_cleanly() {
        let path = temp_db("migrate");
        let mut s = Store::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION as i64);
        s.create_agent(&NewAgent { name: "a".into(), scopes: vec!["read:all".into()], ..Default::default() }).unwrap();
        drop(s);
        let mut s = Store::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION as i64);
        assert_eq!(s.list_agents().unwrap().len(), 1);
        assert_eq!(s.snapshot_version().unwrap(), 1);
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let path = temp_db("newer");
        drop(Store::open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let err = Store::open(&path).err().unwrap();
        assert!(err.to_string().contains("newer than this keyward"), "{err}");
    }

    #[test]
    fn the_audit_log_is_append_only() {
        let mut s = Store::memory().unwrap();
        s.create_agent(&NewAgent { name: "a".into(), scopes: vec!["read:all".into()], ..Default::default() }).unwrap();
        assert!(s.conn.execute("UPDATE audit SET actor = 'someone else'", []).is_err());
        assert!(s.conn.execute("DELETE FROM audit", []).is_err());
        assert_eq!(s.audit(10).unwrap().len(), 1);
    }

    #[test]
    fn every_change_bumps_the_version_and_stamps_its_rows() {
        let mut s = Store::memory().unwrap();
        let a = s.create_agent(&NewAgent { name: "a".into(), scopes: vec!["read:all".into()], ..Default::default() }).unwrap();
        let k = s.create_key(&NewKey { agent: "a".into(), name: Some("k".into()), ..Default::default() }).unwrap();
        s.set_agent_enabled("a", false, None).unwrap();
        s.revoke_key(&k.key.id).unwrap();
        assert_eq!(s.snapshot_version().unwrap(), 4);
        let row_version = |id: &str| -> i64 { s.conn.query_row("SELECT version FROM keys WHERE id = ?1", [id], |r| r.get(0)).unwrap() };
        assert_eq!(row_version(&a.key.id), 3, "disabling the agent restamps its keys");
        assert_eq!(row_version(&k.key.id), 4);
        let versions: Vec<u64> = s.audit(10).unwrap().iter().map(|e| e.version).collect();
        assert_eq!(versions, [1, 2, 3, 4]);
    }

    #[test]
    fn generated_keys_are_keyward_format_and_distinct() {
        let a = generate_key("kw_live").unwrap();
        let b = generate_key("kw_live").unwrap();
        assert_ne!(a, b);
        assert_eq!(keyformat::check(&["kw".into()], &a), keyformat::FormatCheck::Valid);
        assert_eq!(random_base62(16).unwrap().len(), 16);
    }
}

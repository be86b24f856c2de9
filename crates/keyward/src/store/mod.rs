//! The store: agents, keys (digests only), the scope catalogue, the append-only audit log and
//! the snapshot version, on SQLite (the embedded default) or PostgreSQL (shared by replicas).
//!
//! Every change runs in one write transaction that first bumps the version (on PostgreSQL that
//! row lock serializes changes across replicas), stamps the changed rows with it and appends an
//! audit entry, so a feed can deliver exact deltas. The domain rules live in `model`; this
//! module only persists. Submodules by noun: `agents`, `keys`, `scopes`, `envoys` (the feed,
//! acknowledgements, usage, replicas), `records` (rows as read), `schema`, `db` (the engines).

pub mod db;
mod admins;
mod agents;
mod keys;
mod records;
mod schema;
mod scopes;
mod envoys;
pub mod copy;


use crate::error::{Error, Result};
use db::{p, Db, Engine, Tx};
use keyward_core::keyformat;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

pub use envoys::{FEED_PAGE, RATES_RUNTIME_PREFIX};
pub use keys::{FILTER_MAX_KEY_LENGTH, WEAK_KEY_LENGTH};
pub use schema::SCHEMA_VERSION;
pub use admins::ADMIN_TOKEN_PREFIX;

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

/// Where a store lives, as `--store` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// In memory (tests, probes).
    Memory,
    /// A SQLite file: `sqlite:///abs/path.db`, `sqlite://rel/path.db`, or a plain path (`--db`).
    Sqlite(PathBuf),
    /// A PostgreSQL database: `postgres://user:password@host:port/db` (or `postgresql://`).
    Postgres(String),
}

impl Location {
    /// Parses a `--store` URL. The error says what forms are accepted.
    pub fn parse(url: &str) -> Result<Location> {
        if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(crate::error::invalid("store", "sqlite:// needs a file, e.g. sqlite:///var/lib/keyward/keyward.db"));
            }
            return Ok(Location::Sqlite(PathBuf::from(path)));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let query = url.split_once('?').map_or("", |(_, q)| q);
            if query.split('&').any(|kv| kv.eq_ignore_ascii_case("sslmode=require") || kv.to_ascii_lowercase().starts_with("sslmode=verify")) {
                return Err(crate::error::invalid(
                    "store",
                    "keyward connects to PostgreSQL without TLS for now: use a server that accepts plain connections on a private network, or a local TLS-terminating proxy",
                ));
            }
            return Ok(Location::Postgres(url.to_string()));
        }
        Err(crate::error::invalid(
            "store",
            format!("{:?} is not a store URL: use sqlite:///path/to/keyward.db or postgres://user:password@host:5432/db", redact(url)),
        ))
    }

    /// The location without a password, for logs and messages.
    pub fn display(&self) -> String {
        match self {
            Location::Memory => "memory".into(),
            Location::Sqlite(p) => format!("sqlite://{}", p.display()),
            Location::Postgres(url) => redact(url),
        }
    }
}

/// A URL with its password replaced by `***`: in `user:password@` and in a `password=` query
/// parameter.
pub fn redact(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let base = match base.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((auth, host)) => match auth.split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
                None => base.to_string(),
            },
            None => base.to_string(),
        },
        None => base.to_string(),
    };
    match query {
        None => base,
        Some(q) => {
            let params: Vec<String> = q
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => kv.to_string(),
                })
                .collect();
            format!("{base}?{}", params.join("&"))
        }
    }
}

pub struct Store {
    db: Box<dyn Db>,
    /// Who is acting, for the audit log (`cli:alice`, `api`).
    pub actor: String,
    pub key_prefix: String,
    location: Location,
    /// This process is `keyward serve` (it publishes the store).
    pub is_server: bool,
    /// The `keyward serve` replica this process is, when it is one.
    pub replica: Option<String>,
    /// The version the last change committed, for read-your-writes.
    pub last_change: Option<u64>,
    /// The clock every rule is judged by (Unix seconds). Tests may set their own.
    pub clock: fn() -> i64,
}

/// The change being made: its transaction, version and actor.
pub(crate) struct Change<'a> {
    pub tx: Tx<'a>,
    pub version: u64,
    pub actor: &'a str,
}

impl Store {
    /// Opens (creating if needed) the store at `location` and brings its schema up to date.
    pub fn open_at(location: &Location) -> Result<Store> {
        let db: Box<dyn Db> = match location {
            Location::Memory => Box::new(db::Sqlite { conn: rusqlite::Connection::open_in_memory()? }),
            Location::Sqlite(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|e| Error::Internal(format!("cannot create {}: {e}", dir.display())))?;
                }
                Box::new(db::Sqlite { conn: rusqlite::Connection::open(path)? })
            }
            Location::Postgres(url) => Box::new(db::Postgres::connect(url)?),
        };
        schema::migrate(&*db)?;
        Ok(Store {
            db,
            actor: "cli".into(),
            key_prefix: DEFAULT_KEY_PREFIX.into(),
            location: location.clone(),
            is_server: false,
            replica: None,
            last_change: None,
            clock: now_unix,
        })
    }

    /// Opens (creating if needed) a SQLite store.
    pub fn open(path: &Path) -> Result<Store> {
        Store::open_at(&Location::Sqlite(path.to_path_buf()))
    }

    /// Opens an existing store; a missing SQLite file is an error that says how one is made.
    pub fn open_existing_at(location: &Location) -> Result<Store> {
        if let Location::Sqlite(path) = location {
            if !path.exists() {
                return Err(Error::Missing(path.display().to_string()));
            }
        }
        Store::open_at(location)
    }

    pub fn open_existing(path: &Path) -> Result<Store> {
        Store::open_existing_at(&Location::Sqlite(path.to_path_buf()))
    }

    /// An in-memory store, for tests and probes.
    pub fn memory() -> Result<Store> {
        Store::open_at(&Location::Memory)
    }

    pub fn location(&self) -> &Location {
        &self.location
    }

    pub fn engine(&self) -> Engine {
        self.db.engine()
    }

    pub(crate) fn db(&self) -> &(dyn Db + 'static) {
        &*self.db
    }

    pub(crate) fn sqlite(&self) -> Option<&rusqlite::Connection> {
        self.db.sqlite()
    }

    pub(crate) fn sqlite_mut(&mut self) -> Option<&mut rusqlite::Connection> {
        self.db.sqlite_mut()
    }

    pub(crate) fn now(&self) -> i64 {
        (self.clock)()
    }

    pub fn schema_version(&self) -> Result<i64> {
        schema::version(&*self.db)
    }

    /// SQLite's `PRAGMA integrity_check`; PostgreSQL keeps its own, and answers "ok".
    pub fn integrity_check(&self) -> Result<String> {
        match self.engine() {
            Engine::Sqlite => self.db.one("PRAGMA integrity_check", &[])?.text(0),
            Engine::Postgres => Ok("ok".into()),
        }
    }

    pub fn snapshot_version(&self) -> Result<u64> {
        version_in(&*self.db)
    }

    /// Reads a `meta` value (e.g. the admin token digest).
    pub fn meta(&self, name: &str) -> Result<Option<String>> {
        self.db.row("SELECT value FROM meta WHERE name = ?1", p![name])?.map(|r| r.text(0)).transpose()
    }

    /// The store's identity: a restored store gets a new one (see the feed's `reset`).
    pub fn store_id(&self) -> Result<String> {
        self.meta("store_id")?.ok_or_else(|| Error::Internal("the store has no store_id".into()))
    }

    /// Sets a `meta` value that is not part of the snapshot (no version bump), with an audit entry.
    pub fn set_meta(&mut self, name: &str, value: &str, action: &str) -> Result<()> {
        let now = self.now();
        let tx = Tx::write(&*self.db)?;
        tx.execute("INSERT INTO meta (name, value) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET value = ?2", p![name, value])?;
        let version = version_in(&*tx)?;
        audit(&*tx, now, &self.actor, action, name, serde_json::json!({}), version)?;
        notify(&*tx, "meta")?;
        tx.commit()
    }

    /// Sets a `meta` value only if it has none (replicas starting together agree on one admin
    /// token); returns whether this call set it.
    pub fn init_meta(&mut self, name: &str, value: &str, action: &str) -> Result<bool> {
        let now = self.now();
        let tx = Tx::write(&*self.db)?;
        let set = tx.execute("INSERT INTO meta (name, value) VALUES (?1, ?2) ON CONFLICT(name) DO NOTHING", p![name, value])? == 1;
        if set {
            let version = version_in(&*tx)?;
            audit(&*tx, now, &self.actor, action, name, serde_json::json!({}), version)?;
        }
        tx.commit()?;
        Ok(set)
    }

    /// The highest version any Envoy has reported applying, as the store remembers it.
    pub fn max_applied(&self) -> Result<u64> {
        let v = self.db.one("SELECT COALESCE(MAX(applied_version), 0) FROM envoys", &[])?.int(0)?;
        Ok(u64::try_from(v).unwrap_or(0))
    }

    /// Starts a change: a write transaction whose first act is to bump the version.
    pub(crate) fn begin(&mut self) -> Result<Change<'_>> {
        let tx = Tx::write(&*self.db)?;
        let row = tx.one(
            "UPDATE meta SET value = CAST(CAST(value AS BIGINT) + 1 AS TEXT) WHERE name = 'snapshot_version' RETURNING value",
            &[],
        )?;
        let v = row.text(0)?;
        let version: u64 = v.parse().map_err(|_| Error::Internal(format!("corrupt snapshot_version {v:?}")))?;
        // Delivered to every replica's listener when (and only if) the change commits.
        notify(&*tx, &version.to_string())?;
        // Recorded before commit: a refused change rolls back, and its caller sees the error.
        self.last_change = Some(version);
        Ok(Change { tx, version, actor: self.actor.as_str() })
    }

    /// Whether a `keyward serve` publishes this store now. The server itself, and in-memory
    /// stores (tests), always do; on PostgreSQL, any replica heard from in the last seconds.
    pub fn serving(&self) -> bool {
        if self.is_server {
            return true;
        }
        match &self.location {
            Location::Memory => true,
            Location::Sqlite(p) => crate::applied::serve_running(p),
            Location::Postgres(_) => envoys::live_replicas(&*self.db, self.now()).is_ok_and(|r| !r.is_empty()),
        }
    }
}

/// The snapshot version, read in `db`'s current transaction.
pub(crate) fn version_in(db: &dyn Db) -> Result<u64> {
    let v = db.one("SELECT value FROM meta WHERE name = 'snapshot_version'", &[])?.text(0)?;
    v.parse().map_err(|_| Error::Internal(format!("corrupt snapshot_version {v:?}")))
}

/// The PostgreSQL channel every replica listens on; the payload is the new version, or `meta`.
pub const CHANNEL: &str = "keyward_changes";

/// Wakes every replica's listener when the transaction commits (PostgreSQL; SQLite replicas
/// share one process and a file watcher).
fn notify(db: &dyn Db, payload: &str) -> Result<()> {
    if db.engine() == Engine::Postgres {
        db.query("SELECT pg_notify(?1, ?2)", p![CHANNEL, payload])?;
    }
    Ok(())
}

pub(crate) fn audit(db: &dyn Db, now: i64, actor: &str, action: &str, target: &str, details: serde_json::Value, version: u64) -> Result<()> {
    db.execute(
        "INSERT INTO audit (at, actor, action, target, details, version) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        p![now, actor, action, target, details.to_string(), version],
    )?;
    Ok(())
}

pub(crate) fn json_list(s: &str) -> Vec<String> {
    serde_json::from_str(s).unwrap_or_default()
}

pub(crate) fn to_json(v: &[String]) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "[]".into())
}

impl Store {
    pub fn audit(&mut self, limit: u32) -> Result<Vec<crate::model::AuditEntry>> {
        self.audit_filtered(limit, &crate::model::AuditFilter::default())
    }

    /// The last `limit` entries that match `filter`, oldest first. `agent` matches the entries
    /// about the agent and about its keys; `action` a whole action (`key.revoke`) or a family
    /// (`key`).
    pub fn audit_filtered(&mut self, limit: u32, filter: &crate::model::AuditFilter) -> Result<Vec<crate::model::AuditEntry>> {
        // LIKE's wildcards and its escape character stand for themselves in a filter: `key`
        // means `key.*`, and an agent name is matched as written. (`details` is compact JSON.)
        let literal = |v: &str| v.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_");
        let family = filter.action.as_ref().map(|a| format!("{}.%", literal(a)));
        let like = |field: &str, v: &Option<String>| v.as_ref().map(|v| format!("%\"{field}\":\"{}\"%", literal(v)));
        let rows = self.db.query(
            "SELECT seq, at, actor, action, target, details, version FROM \
             (SELECT * FROM audit \
              WHERE (CAST(?2 AS TEXT) IS NULL OR actor = ?2) \
                AND (CAST(?3 AS TEXT) IS NULL OR action = ?3 OR action LIKE ?6 ESCAPE '\\') \
                AND (CAST(?4 AS TEXT) IS NULL OR details LIKE ?4 ESCAPE '\\' OR (action LIKE 'agent.%' AND details LIKE ?5 ESCAPE '\\')) \
              ORDER BY seq DESC LIMIT ?1) AS recent ORDER BY seq",
            p![limit, &filter.actor, &filter.action, like("agent", &filter.agent), like("name", &filter.agent), family],
        )?;
        rows.iter()
            .map(|r| {
                Ok(crate::model::AuditEntry {
                    seq: r.int(0)?,
                    at: keyward_core::time::format_rfc3339(r.int(1)?),
                    actor: r.text(2)?,
                    action: r.text(3)?,
                    target: r.text(4)?,
                    details: serde_json::from_str(&r.text(5)?).unwrap_or_default(),
                    version: u64::try_from(r.int(6)?).unwrap_or(0),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{NewAgent, NewKey};

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
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let err = Store::open(&path).err().unwrap();
        assert!(err.to_string().contains("newer than this keyward"), "{err}");
    }

    #[test]
    fn the_audit_log_is_append_only() {
        let mut s = Store::memory().unwrap();
        s.create_agent(&NewAgent { name: "a".into(), scopes: vec!["read:all".into()], ..Default::default() }).unwrap();
        assert!(s.db().execute("UPDATE audit SET actor = 'someone else'", &[]).is_err());
        assert!(s.db().execute("DELETE FROM audit", &[]).is_err());
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
        let row_version = |id: &str| -> i64 { s.db().one("SELECT version FROM keys WHERE id = ?1", p![id]).unwrap().int(0).unwrap() };
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

    #[test]
    fn store_urls_parse_and_refuse_what_they_cannot_open() {
        assert_eq!(Location::parse("sqlite:///var/k.db").unwrap(), Location::Sqlite("/var/k.db".into()));
        assert_eq!(Location::parse("sqlite://k.db").unwrap(), Location::Sqlite("k.db".into()));
        assert!(matches!(Location::parse("postgres://u:p@h/db").unwrap(), Location::Postgres(_)));
        assert!(matches!(Location::parse("postgresql://h/db").unwrap(), Location::Postgres(_)));
        for bad in ["sqlite://", "mysql://h/db", "/var/k.db", ""] {
            let e = Location::parse(bad).unwrap_err();
            assert_eq!(e.field(), Some("store"), "{bad}");
        }
        let e = Location::parse("mysql://u:secret@h/db").unwrap_err().to_string();
        assert!(!e.contains("secret"), "{e}");
    }

    #[test]
    fn passwords_never_show() {
        assert_eq!(redact("postgres://kw:s3cret@db:5432/keyward"), "postgres://kw:***@db:5432/keyward");
        assert_eq!(redact("postgres://db/k?user=kw&password=s3cret&x=1"), "postgres://db/k?user=kw&password=***&x=1");
        assert_eq!(redact("postgres://kw:a@b@db/k?PASSWORD=s3cret"), "postgres://kw:***@db/k?PASSWORD=***");
        assert!(Location::parse("postgres://db/k?sslmode=require").unwrap_err().to_string().contains("without TLS"));
        assert!(Location::parse("postgres://db/k?sslmode=disable").is_ok());
        assert_eq!(redact("postgres://kw@db/keyward"), "postgres://kw@db/keyward");
        assert_eq!(Location::Postgres("postgres://a:b@c/d".into()).display(), "postgres://a:***@c/d");
    }
}

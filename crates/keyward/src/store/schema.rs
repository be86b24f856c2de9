//! The schema of both engines, and how it is brought up to date. SQLite counts migrations in
//! `PRAGMA user_version`; PostgreSQL in the `schema_version` meta row, under an advisory lock
//! so replicas starting together migrate once. Both end at the same tables and meanings.

use super::db::{p, Db, Engine, Tx};
use crate::error::{Error, Result};

/// SQLite migrations, applied in order; `PRAGMA user_version` records how many ran.
const SQLITE: &[&str] = &[r#"
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
"#,
// 6: replicas, and which replica each Envoy's feed is held by.
r#"
ALTER TABLE envoys ADD COLUMN replica TEXT;
CREATE TABLE replicas (
    name TEXT PRIMARY KEY,
    started_at INTEGER NOT NULL,
    last_seen INTEGER NOT NULL
) STRICT;
"#,
// 7: wrong tokens per client address, counted across replicas.
r#"
CREATE TABLE auth_failures (
    address TEXT PRIMARY KEY,
    window_start INTEGER NOT NULL,
    count INTEGER NOT NULL
) STRICT;
"#,
// 8: admins with personal tokens (digests only), and console sessions (digests only).
r#"
CREATE TABLE admins (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    token_digest TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    token_issued_at INTEGER NOT NULL,
    disabled_at INTEGER
) STRICT;
CREATE TABLE sessions (
    digest TEXT PRIMARY KEY,
    token_digest TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    last_seen INTEGER NOT NULL
) STRICT;
"#,
// 9: what running `keyward serve` replicas say of themselves (`rates:<replica>`: the rate
// limits' mode, the rate store's health, the hot buckets); not data: never audited, never
// versioned, never copied.
r#"
CREATE TABLE runtime (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    at INTEGER NOT NULL
) STRICT;
"#,
// 10: which shell each Envoy runs keyward in (`native` for libkeyward.so; none: keyward.wasm,
// whose feed requests never say).
r#"
ALTER TABLE envoys ADD COLUMN shell TEXT;
"#];


/// PostgreSQL migrations, applied in order. Migration 1 is SQLite's first six as one schema;
/// each later one is the SQLite migration five after it.
/// Booleans are BIGINT 0/1 and times BIGINT Unix seconds, as on SQLite.
const POSTGRES: &[&str] = &[r#"
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta (name, value) VALUES ('snapshot_version', '0');
CREATE TABLE agents (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    scopes TEXT NOT NULL,
    enabled BIGINT NOT NULL DEFAULT 1,
    rate_limit TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    deleted_at BIGINT,
    version BIGINT NOT NULL,
    disabled_reason TEXT,
    rate_burst BIGINT
);
CREATE UNIQUE INDEX agents_live_name ON agents(name) WHERE deleted_at IS NULL;
CREATE INDEX agents_version ON agents(version);
-- Byte order for key ids, as SQLite's: the feed pages by (version, id), and a cursor must mean
-- the same on both engines (a store copied mid-delta), whatever the database's collation.
CREATE TABLE keys (
    id TEXT COLLATE "C" PRIMARY KEY,
    agent_id TEXT NOT NULL REFERENCES agents(id),
    name TEXT NOT NULL,
    display_prefix TEXT NOT NULL,
    last4 TEXT NOT NULL,
    digest TEXT NOT NULL UNIQUE,
    scopes TEXT,
    path_prefixes TEXT NOT NULL DEFAULT '[]',
    rate_limit TEXT,
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    revoked_at BIGINT,
    last_used_at BIGINT,
    rotated_from TEXT,
    rotated_to TEXT,
    imported BIGINT NOT NULL DEFAULT 0,
    version BIGINT NOT NULL,
    rotated_at BIGINT,
    lineage TEXT,
    rate_burst BIGINT
);
CREATE INDEX keys_agent ON keys(agent_id);
CREATE INDEX keys_version ON keys(version);
CREATE INDEX keys_agent_name ON keys(agent_id, name);
CREATE INDEX keys_version_id ON keys(version, id);
CREATE TABLE audit (
    seq BIGSERIAL PRIMARY KEY,
    at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    details TEXT NOT NULL,
    version BIGINT NOT NULL
);
CREATE FUNCTION keyward_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only';
END
$f$;
CREATE TRIGGER audit_no_change BEFORE UPDATE OR DELETE ON audit FOR EACH ROW EXECUTE FUNCTION keyward_audit_append_only();
CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit FOR EACH STATEMENT EXECUTE FUNCTION keyward_audit_append_only();
CREATE TABLE usage (
    key_id TEXT NOT NULL,
    hour BIGINT NOT NULL,
    count BIGINT NOT NULL,
    PRIMARY KEY (key_id, hour)
);
CREATE TABLE usage_denied (
    key_id TEXT NOT NULL,
    hour BIGINT NOT NULL,
    code TEXT NOT NULL,
    count BIGINT NOT NULL,
    PRIMARY KEY (key_id, hour, code)
);
CREATE TABLE envoys (
    id TEXT PRIMARY KEY,
    applied_version BIGINT NOT NULL,
    last_seen BIGINT NOT NULL,
    open_until BIGINT NOT NULL,
    replica TEXT
);
CREATE TABLE replicas (
    name TEXT PRIMARY KEY,
    started_at BIGINT NOT NULL,
    last_seen BIGINT NOT NULL
);
-- rowid: SQLite's implicit insertion order, which the catalogue lists by.
CREATE TABLE scopes (
    rowid BIGSERIAL,
    name TEXT PRIMARY KEY,
    description TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE scope_implications (
    scope TEXT NOT NULL REFERENCES scopes(name),
    implies TEXT NOT NULL REFERENCES scopes(name),
    PRIMARY KEY (scope, implies)
);
INSERT INTO scopes (name, description, created_at) VALUES
    ('read:all', 'Read access to all resources (users, projects, records, settings)', 0),
    ('write:all', 'Create and update access to all non-administrative resources', 0),
    ('admin', 'Full access, including team management, billing and API key administration', 0);
INSERT INTO scope_implications (scope, implies) VALUES ('admin', 'read:all'), ('admin', 'write:all');
"#,
// 2 (SQLite's 7): wrong tokens per client address, counted across replicas.
r#"
CREATE TABLE auth_failures (
    address TEXT PRIMARY KEY,
    window_start BIGINT NOT NULL,
    count BIGINT NOT NULL
);
"#,
// 3 (SQLite's 8): admins with personal tokens, and console sessions (digests only).
r#"
CREATE TABLE admins (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    token_digest TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    token_issued_at BIGINT NOT NULL,
    disabled_at BIGINT
);
CREATE TABLE sessions (
    digest TEXT PRIMARY KEY,
    token_digest TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    last_seen BIGINT NOT NULL
);
"#,
// 4 (SQLite's 9): what running replicas say of themselves (`rates:<replica>`).
r#"
CREATE TABLE runtime (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    at BIGINT NOT NULL
);
"#,
// 5 (SQLite's 10): which shell each Envoy runs keyward in.
r#"
ALTER TABLE envoys ADD COLUMN shell TEXT;
"#];

/// The schema version this build writes (the same meaning on both engines).
pub const SCHEMA_VERSION: usize = SQLITE.len();

/// The version of SQLite's schema each PostgreSQL migration count matches.
fn pg_equivalent(applied: usize) -> usize {
    if applied == 0 { 0 } else { applied + 5 }
}

/// Brings the schema up to date, and gives the store its identity if it has none.
pub fn migrate(db: &(dyn Db + 'static)) -> Result<()> {
    match db.engine() {
        Engine::Sqlite => migrate_sqlite(db)?,
        Engine::Postgres => migrate_postgres(db)?,
    }
    let id = format!("st_{}", super::random_base62(16)?);
    db.execute("INSERT INTO meta (name, value) VALUES ('store_id', ?1) ON CONFLICT(name) DO NOTHING", p![id])?;
    Ok(())
}

fn newer(applied: usize) -> Error {
    Error::Internal(format!(
        "the database has schema version {applied}, newer than this keyward ({SCHEMA_VERSION}); upgrade keyward"
    ))
}

fn migrate_sqlite(db: &(dyn Db + 'static)) -> Result<()> {
    db.batch("PRAGMA busy_timeout = 5000")?;
    // WAL: readers never block the writer. FULL: an acknowledged change survives power loss,
    // not just a crash of this process. (A memory store answers "memory" and stays so.)
    db.query("PRAGMA journal_mode = WAL", &[])?;
    db.batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON")?;
    // Reads through a memory map rather than a copy per page: a full feed read (every key, in
    // the `(version, id)` index's order, so all over the table) cost about 18% less serve CPU
    // at 1M keys. Writes still go through the WAL, so a crash or a kill corrupts nothing.
    db.query("PRAGMA mmap_size = 1073741824", &[])?;
    let tx = Tx::write(db)?;
    let applied = usize::try_from(tx.one("PRAGMA user_version", &[])?.int(0)?).unwrap_or(0);
    if applied > SQLITE.len() {
        return Err(newer(applied));
    }
    for (i, sql) in SQLITE.iter().enumerate().skip(applied) {
        tx.batch(sql)?;
        tx.batch(&format!("PRAGMA user_version = {}", i + 1))?;
    }
    tx.commit()
}

fn migrate_postgres(db: &(dyn Db + 'static)) -> Result<()> {
    let tx = Tx::write(db)?;
    // One migrator at a time across replicas; released at commit.
    tx.query("SELECT pg_advisory_xact_lock(7070707)", &[])?;
    let has_meta = tx.one("SELECT to_regclass('meta') IS NOT NULL", &[])?.flag(0)?;
    let applied = if has_meta {
        tx.row("SELECT value FROM meta WHERE name = 'schema_version'", &[])?
            .map(|r| r.text(0))
            .transpose()?
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0)
    } else {
        0
    };
    if applied > POSTGRES.len() {
        return Err(newer(pg_equivalent(applied)));
    }
    for (i, sql) in POSTGRES.iter().enumerate().skip(applied) {
        tx.batch(sql)?;
        tx.execute(
            "INSERT INTO meta (name, value) VALUES ('schema_version', ?1) ON CONFLICT(name) DO UPDATE SET value = ?1",
            p![(i + 1).to_string()],
        )?;
    }
    tx.commit()
}

/// The schema version, in SQLite's numbering on both engines.
pub fn version(db: &dyn Db) -> Result<i64> {
    match db.engine() {
        Engine::Sqlite => db.one("PRAGMA user_version", &[])?.int(0),
        Engine::Postgres => {
            let v = db.one("SELECT value FROM meta WHERE name = 'schema_version'", &[])?.text(0)?;
            let n = v.parse::<usize>().map_err(|_| Error::Internal(format!("corrupt schema_version {v:?}")))?;
            Ok(i64::try_from(pg_equivalent(n)).unwrap_or(i64::MAX))
        }
    }
}

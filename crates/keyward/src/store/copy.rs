//! Moving and keeping data: `store copy` between engines, `store backup` and `restore` of a
//! SQLite store, and the rule that keeps versions moving forward after a restore.

use super::db::{p, Db, Engine, Tx, Value};
use super::{audit, random_base62, version_in, Location, Store};
use crate::error::{invalid, Error, Result};
use serde_json::json;

/// Progress of a long operation: what it is doing, how far, out of how much.
pub type Progress<'a> = &'a mut dyn FnMut(&str, u64, u64);

/// Rows per read page and per multi-row insert.
const PAGE: usize = 2_000;

/// A table `store copy` moves: its columns (the same on both engines) and the single column
/// its rows are paged by (`None`: small, read whole).
struct Table {
    name: &'static str,
    columns: &'static str,
    page_by: Option<&'static str>,
}

/// In an order foreign keys accept. `envoys`, `replicas` and `runtime` describe running
/// processes, not data: they are not copied.
const TABLES: &[Table] = &[
    Table { name: "agents", columns: "id, name, description, scopes, enabled, rate_limit, created_at, updated_at, deleted_at, version, disabled_reason, rate_burst", page_by: Some("id") },
    Table { name: "scopes", columns: "rowid, name, description, created_at", page_by: Some("name") },
    Table { name: "scope_implications", columns: "scope, implies", page_by: None },
    Table {
        name: "keys",
        columns: "id, agent_id, name, display_prefix, last4, digest, scopes, path_prefixes, rate_limit, created_at, expires_at, revoked_at, \
                  last_used_at, rotated_from, rotated_to, imported, version, rotated_at, lineage, rate_burst",
        page_by: Some("id"),
    },
    Table { name: "audit", columns: "seq, at, actor, action, target, details, version", page_by: Some("seq") },
    Table { name: "usage", columns: "key_id, hour, count", page_by: None },
    Table { name: "usage_denied", columns: "key_id, hour, code, count", page_by: None },
    // Console sessions are not copied: whoever was signed in signs in again.
    Table { name: "admins", columns: "name, role, token_digest, created_at, token_issued_at, disabled_at", page_by: None },
];

fn count(db: &dyn Db, table: &str) -> Result<u64> {
    db.one(&format!("SELECT COUNT(*) FROM {table}"), &[])?.count(0)
}

fn insert_rows(db: &dyn Db, t: &Table, rows: &[Vec<Value>]) -> Result<()> {
    super::db::insert_many(db, t.name, t.columns, rows, PAGE)
}

/// Which side of a copy failed: `--from` or `--to`.
pub type Side = &'static str;

/// Copies every agent, key, scope, audit entry and usage count, the snapshot version, the
/// store's identity and the admin token's digest from `from` to `to`, which must hold no data
/// yet. The source is read in one consistent transaction; the target is written in one, so a
/// failed copy leaves the target as it was. An error names the side that failed, with its cause
/// in words (the API keeps storage details out of its answers; the operator copying needs them).
pub fn copy(from: &Location, to: &Location, progress: Progress<'_>) -> std::result::Result<CopySummary, (Side, Error)> {
    if from == to {
        return Err(("--to", invalid("to", "the source and the target are the same store")));
    }
    let tag = |side: Side| {
        let shown = if side == "--from" { from.display() } else { to.display() };
        move |e: Error| match e {
            e @ (Error::Invalid { .. } | Error::Conflict { .. } | Error::Missing(_)) => (side, e),
            other => (side, Error::Internal(format!("{shown}: {other}"))),
        }
    };
    let source = Store::open_existing_at(from).map_err(tag("--from"))?;
    let target = Store::open_at(to).map_err(tag("--to"))?;
    let src = Tx::read(source.db()).map_err(tag("--from"))?;
    let dst = Tx::write(target.db()).map_err(tag("--to"))?;
    let rows = copy_tables(&src, &dst, to, progress).map_err(|(side, e)| tag(side)(e))?;
    let version = version_in(&*dst).map_err(tag("--to"))?;
    dst.commit().map_err(tag("--to"))?;
    src.commit().map_err(tag("--from"))?;
    Ok(CopySummary { rows, version })
}

type Rows = Vec<(&'static str, u64)>;

fn copy_tables(src: &Tx<'_>, dst: &Tx<'_>, to: &Location, progress: Progress<'_>) -> std::result::Result<Rows, (Side, Error)> {
    let r = |e: Error| ("--from", e);
    let w = |e: Error| ("--to", e);
    for table in ["agents", "keys", "audit"] {
        let n = count(&**dst, table).map_err(w)?;
        if n > 0 {
            return Err(w(Error::Conflict {
                field: "to",
                message: format!(
                    "{} already holds data ({n} rows in {table}); copy into a new, empty store, before any `keyward serve` starts on it",
                    to.display()
                ),
            }));
        }
    }
    // A new store holds the default catalogue: the source's replaces it.
    dst.execute("DELETE FROM scope_implications", &[]).map_err(w)?;
    dst.execute("DELETE FROM scopes", &[]).map_err(w)?;
    let mut copied = Vec::new();
    for t in TABLES {
        let total = count(&**src, t.name).map_err(r)?;
        let mut done = 0u64;
        progress(t.name, 0, total);
        match t.page_by {
            None => {
                let rows: Vec<Vec<Value>> =
                    src.query(&format!("SELECT {} FROM {}", t.columns, t.name), &[]).map_err(r)?.into_iter().map(|row| row.0).collect();
                insert_rows(&**dst, t, &rows).map_err(w)?;
                done += rows.len() as u64;
            }
            Some(key) => {
                let key_index = t.columns.split(", ").position(|c| c.trim() == key).unwrap_or(0);
                let mut after: Option<Value> = None;
                loop {
                    let rows = match &after {
                        None => src.query(&format!("SELECT {} FROM {} ORDER BY {key} LIMIT ?1", t.columns, t.name), p![PAGE]),
                        Some(a) => src.query(
                            &format!("SELECT {} FROM {} WHERE {key} > ?1 ORDER BY {key} LIMIT ?2", t.columns, t.name),
                            &[a.clone(), Value::from(PAGE)],
                        ),
                    }
                    .map_err(r)?;
                    let Some(last) = rows.last() else { break };
                    after = last.0.get(key_index).cloned();
                    let n = rows.len();
                    let rows: Vec<Vec<Value>> = rows.into_iter().map(|row| row.0).collect();
                    insert_rows(&**dst, t, &rows).map_err(w)?;
                    done += n as u64;
                    progress(t.name, done, total);
                    if n < PAGE {
                        break;
                    }
                }
            }
        }
        progress(t.name, done, total);
        copied.push((t.name, done));
    }
    for row in src.query("SELECT name, value FROM meta WHERE name != 'schema_version'", &[]).map_err(r)? {
        let (name, value) = (row.text(0).map_err(r)?, row.text(1).map_err(r)?);
        dst.execute("INSERT INTO meta (name, value) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET value = ?2", p![name, value]).map_err(w)?;
    }
    if dst.engine() == Engine::Postgres {
        // Explicit ids were written: the sequences continue after them.
        dst.query("SELECT setval(pg_get_serial_sequence('audit', 'seq'), GREATEST((SELECT MAX(seq) FROM audit), 1))", &[]).map_err(w)?;
        dst.query("SELECT setval(pg_get_serial_sequence('scopes', 'rowid'), GREATEST((SELECT MAX(rowid) FROM scopes), 1))", &[]).map_err(w)?;
    }
    Ok(copied)
}

/// Copies every page of a SQLite online backup (or restore), 256 at a time, letting writers in
/// between and waiting a moment when the source is busy, and reports pages done.
fn run_backup(backup: &rusqlite::backup::Backup<'_, '_>, progress: Progress<'_>) -> Result<()> {
    loop {
        let more = backup.step(256)?;
        let p = backup.progress();
        let total = u64::try_from(p.pagecount).unwrap_or(0);
        progress("pages", total.saturating_sub(u64::try_from(p.remaining).unwrap_or(0)), total);
        match more {
            rusqlite::backup::StepResult::Done => return Ok(()),
            rusqlite::backup::StepResult::More => {}
            _ => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    }
}

/// The snapshot version, with its row locked for the rest of the transaction (as every change
/// takes it first): on PostgreSQL, a concurrent change or advance waits, and this one reads the
/// value the last of them committed.
fn lock_version(db: &dyn Db) -> Result<u64> {
    let v = db.one("UPDATE meta SET value = value WHERE name = 'snapshot_version' RETURNING value", &[])?.text(0)?;
    v.parse().map_err(|_| Error::Internal(format!("corrupt snapshot_version {v:?}")))
}

#[derive(Debug, Default)]
pub struct CopySummary {
    pub rows: Vec<(&'static str, u64)>,
    pub version: u64,
}

impl Store {
    /// A consistent online backup of a SQLite store to `file` (which must not exist), taken
    /// while `keyward serve` keeps serving.
    pub fn backup(&self, file: &std::path::Path, progress: Progress<'_>) -> Result<u64> {
        let Some(conn) = self.sqlite() else {
            return Err(invalid("store", "store backup works on SQLite stores; back PostgreSQL up with pg_dump (see README)"));
        };
        if file.exists() {
            return Err(invalid("file", format!("{} exists; back up to a new file", file.display())));
        }
        let mut dst = rusqlite::Connection::open(file)?;
        {
            run_backup(&rusqlite::backup::Backup::new(conn, &mut dst)?, progress)?;
        }
        let version = version_in(&super::db::Sqlite { conn: dst })?;
        Ok(version)
    }

    /// Replaces this SQLite store's contents with the backup in `file`, then moves the version
    /// past both the backup's and the store's before it, and gives the store a new identity:
    /// every Envoy that applied the old store is answered with a reset, at a higher version.
    pub fn restore(&mut self, file: &std::path::Path, progress: Progress<'_>) -> Result<(u64, u64)> {
        if self.sqlite().is_none() {
            return Err(invalid("store", "store restore works on SQLite stores; restore PostgreSQL with pg_restore, then `keyward store rekey` (see README)"));
        }
        if !file.is_file() {
            return Err(invalid("file", format!("{} is not a file", file.display())));
        }
        let before = self.snapshot_version()?;
        let backup = Store::open_existing_at(&Location::Sqlite(file.to_path_buf()))
            .map_err(|e| invalid("file", format!("{} is not a keyward store: {}", file.display(), e.message())))?;
        let from = backup.snapshot_version()?;
        drop(backup);
        let src = rusqlite::Connection::open_with_flags(file, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        if let Some(conn) = self.sqlite_mut() {
            run_backup(&rusqlite::backup::Backup::new(&src, conn)?, progress)?;
        }
        super::schema::migrate(self.db())?;
        let version = self.rekey(before.max(from), "store.restore", json!({"file": file.display().to_string(), "backup_version": from}))?;
        Ok((from, version))
    }

    /// Gives the store a new identity and moves its version past `floor`, re-stamping every
    /// key: Envoys that applied another state of this store (a restore, a `pg_restore`) are
    /// answered with a reset at a version above any they saw.
    pub fn rekey(&mut self, floor: u64, action: &str, details: serde_json::Value) -> Result<u64> {
        let now = self.now();
        let id = format!("st_{}", random_base62(16)?);
        let tx = Tx::write(self.db())?;
        let current = lock_version(&*tx)?;
        let version = current.max(floor) + 1;
        tx.execute("UPDATE meta SET value = ?1 WHERE name = 'snapshot_version'", p![version.to_string()])?;
        tx.execute("UPDATE meta SET value = ?1 WHERE name = 'store_id'", p![&id])?;
        tx.execute("UPDATE keys SET version = ?1", p![version])?;
        // Whoever was signed in to the console signs in again: a restored store may have
        // brought back admins or tokens since disabled or replaced.
        tx.execute("DELETE FROM sessions", &[])?;
        audit(&*tx, now, &self.actor, action, &id, details, version)?;
        super::notify(&*tx, &version.to_string())?;
        tx.commit()?;
        self.last_change = Some(version);
        Ok(version)
    }

    /// An Envoy applied a version this store has not reached (it was restored, or replaced):
    /// the version jumps past it, so what the Envoy gets next is newer than what it holds.
    pub fn advance_past(&mut self, seen: u64) -> Result<u64> {
        let now = self.now();
        let tx = Tx::write(self.db())?;
        let current = lock_version(&*tx)?;
        if current > seen {
            return Ok(current);
        }
        let version = seen + 1;
        tx.execute("UPDATE meta SET value = ?1 WHERE name = 'snapshot_version'", p![version.to_string()])?;
        tx.execute("UPDATE keys SET version = ?1", p![version])?;
        audit(&*tx, now, &self.actor, "store.advance", "snapshot_version", json!({"from": current, "past": seen}), version)?;
        super::notify(&*tx, &version.to_string())?;
        tx.commit()?;
        Ok(version)
    }
}

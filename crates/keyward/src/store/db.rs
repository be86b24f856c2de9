//! The engine boundary: the little a store needs from a SQL database. [`Db`] runs statements
//! written once, in the dialect SQLite and PostgreSQL share (`?N` placeholders, `ON CONFLICT`,
//! `RETURNING`, `CAST(… AS BIGINT)`); PostgreSQL gets them with `$N`. Where the engines differ
//! (JSON functions), the caller picks a statement per [`Engine`].
//!
//! Values are [`Value`]s: integers, text or null. Booleans are stored as 0/1 on both engines, so
//! rows read the same whichever engine answered.

use crate::error::{Error, Result};
use std::cell::RefCell;
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Sqlite => "sqlite",
            Engine::Postgres => "postgres",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
}

impl From<i64> for Value {
    fn from(v: i64) -> Value {
        Value::Int(v)
    }
}
impl From<u64> for Value {
    fn from(v: u64) -> Value {
        Value::Int(i64::try_from(v).unwrap_or(i64::MAX))
    }
}
impl From<u32> for Value {
    fn from(v: u32) -> Value {
        Value::Int(i64::from(v))
    }
}
impl From<usize> for Value {
    fn from(v: usize) -> Value {
        Value::Int(i64::try_from(v).unwrap_or(i64::MAX))
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Value {
        Value::Int(i64::from(v))
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Value {
        Value::Text(v.to_string())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Value {
        Value::Text(v)
    }
}
impl From<&String> for Value {
    fn from(v: &String) -> Value {
        Value::Text(v.clone())
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Value {
        v.map_or(Value::Null, Into::into)
    }
}
impl<T: Into<Value> + Clone> From<&Option<T>> for Value {
    fn from(v: &Option<T>) -> Value {
        v.clone().map_or(Value::Null, Into::into)
    }
}

/// Statement parameters: `p![a, b]` is `&[Value::from(a), Value::from(b)]`.
macro_rules! p {
    ($($v:expr),* $(,)?) => { &[$($crate::store::db::Value::from($v)),*][..] };
}
pub(crate) use p;

/// One result row.
#[derive(Debug, Clone)]
pub struct Row(pub Vec<Value>);

impl Row {
    fn at(&self, i: usize) -> Result<&Value> {
        self.0.get(i).ok_or_else(|| Error::Internal(format!("column {i} missing from a row")))
    }

    pub fn text(&self, i: usize) -> Result<String> {
        match self.at(i)? {
            Value::Text(s) => Ok(s.clone()),
            other => Err(Error::Internal(format!("column {i}: expected text, found {other:?}"))),
        }
    }

    pub fn opt_text(&self, i: usize) -> Result<Option<String>> {
        match self.at(i)? {
            Value::Null => Ok(None),
            _ => self.text(i).map(Some),
        }
    }

    /// Moves a text column out of the row (left `Null`): a row read into a struct whole spares
    /// copying each string.
    pub fn take_text(&mut self, i: usize) -> Result<String> {
        match self.0.get_mut(i).map(|v| std::mem::replace(v, Value::Null)) {
            Some(Value::Text(s)) => Ok(s),
            Some(other) => Err(Error::Internal(format!("column {i}: expected text, found {other:?}"))),
            None => Err(Error::Internal(format!("column {i} missing from a row"))),
        }
    }

    pub fn take_opt_text(&mut self, i: usize) -> Result<Option<String>> {
        match self.at(i)? {
            Value::Null => Ok(None),
            _ => self.take_text(i).map(Some),
        }
    }

    pub fn int(&self, i: usize) -> Result<i64> {
        match self.at(i)? {
            Value::Int(n) => Ok(*n),
            other => Err(Error::Internal(format!("column {i}: expected an integer, found {other:?}"))),
        }
    }

    pub fn opt_int(&self, i: usize) -> Result<Option<i64>> {
        match self.at(i)? {
            Value::Null => Ok(None),
            _ => self.int(i).map(Some),
        }
    }

    pub fn flag(&self, i: usize) -> Result<bool> {
        Ok(self.int(i)? != 0)
    }

    pub fn opt_u32(&self, i: usize) -> Result<Option<u32>> {
        Ok(self.opt_int(i)?.map(|n| u32::try_from(n).unwrap_or(u32::MAX)))
    }

    pub fn count(&self, i: usize) -> Result<u64> {
        Ok(u64::try_from(self.int(i)?).unwrap_or(0))
    }
}

/// A SQL database as the store uses it. Methods take `&self`: a store runs one statement at a
/// time, and rows are read whole before the next statement.
pub trait Db: Send {
    fn engine(&self) -> Engine;
    /// Runs one statement; returns the rows it changed.
    fn execute(&self, sql: &str, params: &[Value]) -> Result<u64>;
    /// Runs one query; returns every row.
    fn query(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>>;
    /// Runs statements without parameters (schema, transaction control).
    fn batch(&self, sql: &str) -> Result<()>;
    /// Starts a transaction that changes the store. SQLite takes the write lock at once; on
    /// PostgreSQL, changes serialize on the snapshot version's row, which each takes first.
    fn begin_write(&self) -> Result<()>;
    /// Starts a read-only transaction that sees one consistent state.
    fn begin_read(&self) -> Result<()>;

    /// The SQLite connection, for what only SQLite does (online backup and restore).
    fn sqlite(&self) -> Option<&rusqlite::Connection> {
        None
    }

    fn sqlite_mut(&mut self) -> Option<&mut rusqlite::Connection> {
        None
    }

    /// At most one row.
    fn row(&self, sql: &str, params: &[Value]) -> Result<Option<Row>> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    /// Exactly one row.
    fn one(&self, sql: &str, params: &[Value]) -> Result<Row> {
        self.row(sql, params)?.ok_or_else(|| Error::Internal(format!("no row from {sql}")))
    }
}

/// Inserts `rows` (each as wide as `columns`) into `table` with multi-row `INSERT`s of at most
/// `per_statement` rows (and 30,000 parameters, under both engines' limits): few round trips
/// to a networked store.
pub fn insert_many(db: &dyn Db, table: &str, columns: &str, rows: &[Vec<Value>], per_statement: usize) -> Result<()> {
    let width = columns.split(',').count();
    for chunk in rows.chunks(per_statement.min(30_000 / width).max(1)) {
        let mut sql = format!("INSERT INTO {table} ({columns}) VALUES ");
        let mut params = Vec::with_capacity(chunk.len() * width);
        for (i, row) in chunk.iter().enumerate() {
            if i > 0 {
                sql.push_str(", ");
            }
            let marks: Vec<String> = (1..=width).map(|j| format!("?{}", i * width + j)).collect();
            sql.push_str(&format!("({})", marks.join(", ")));
            params.extend(row.iter().cloned());
        }
        db.execute(&sql, &params)?;
    }
    Ok(())
}

/// An open transaction: rolled back when dropped uncommitted. Derefs to its [`Db`].
pub struct Tx<'a> {
    db: &'a (dyn Db + 'static),
    open: bool,
}

impl<'a> Tx<'a> {
    pub fn write(db: &'a (dyn Db + 'static)) -> Result<Tx<'a>> {
        db.begin_write()?;
        Ok(Tx { db, open: true })
    }

    pub fn read(db: &'a (dyn Db + 'static)) -> Result<Tx<'a>> {
        db.begin_read()?;
        Ok(Tx { db, open: true })
    }

    pub fn commit(mut self) -> Result<()> {
        self.open = false;
        self.db.batch("COMMIT")
    }
}

impl std::ops::Deref for Tx<'_> {
    type Target = dyn Db + 'static;
    fn deref(&self) -> &Self::Target {
        self.db
    }
}

impl Drop for Tx<'_> {
    fn drop(&mut self) {
        if self.open {
            if let Err(e) = self.db.batch("ROLLBACK") {
                tracing::warn!(error = %e, "rolling back a transaction");
            }
        }
    }
}

// --- SQLite -------------------------------------------------------------------------------

pub struct Sqlite {
    pub conn: rusqlite::Connection,
}

fn sqlite_params(params: &[Value]) -> Vec<rusqlite::types::Value> {
    params
        .iter()
        .map(|v| match v {
            Value::Null => rusqlite::types::Value::Null,
            Value::Int(n) => rusqlite::types::Value::Integer(*n),
            Value::Text(s) => rusqlite::types::Value::Text(s.clone()),
        })
        .collect()
}

/// A column's text: `from_utf8` first, which is much cheaper than `from_utf8_lossy` on valid
/// text (a feed page converts tens of thousands of columns); lossy only when it is not.
fn text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_owned(),
        Err(_) => String::from_utf8_lossy(bytes).into_owned(),
    }
}

impl Db for Sqlite {
    fn engine(&self) -> Engine {
        Engine::Sqlite
    }

    fn execute(&self, sql: &str, params: &[Value]) -> Result<u64> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        let n = stmt.execute(rusqlite::params_from_iter(sqlite_params(params)))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    fn query(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        let width = stmt.column_count();
        let mut rows = stmt.query(rusqlite::params_from_iter(sqlite_params(params)))?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let mut row = Vec::with_capacity(width);
            for i in 0..width {
                row.push(match r.get_ref(i)? {
                    rusqlite::types::ValueRef::Null => Value::Null,
                    rusqlite::types::ValueRef::Integer(n) => Value::Int(n),
                    rusqlite::types::ValueRef::Text(t) => Value::Text(text(t)),
                    rusqlite::types::ValueRef::Real(f) => Value::Int(f as i64),
                    rusqlite::types::ValueRef::Blob(b) => Value::Text(text(b)),
                });
            }
            out.push(Row(row));
        }
        Ok(out)
    }

    fn batch(&self, sql: &str) -> Result<()> {
        Ok(self.conn.execute_batch(sql)?)
    }

    fn begin_write(&self) -> Result<()> {
        self.batch("BEGIN IMMEDIATE")
    }

    fn begin_read(&self) -> Result<()> {
        self.batch("BEGIN")
    }

    fn sqlite(&self) -> Option<&rusqlite::Connection> {
        Some(&self.conn)
    }

    fn sqlite_mut(&mut self) -> Option<&mut rusqlite::Connection> {
        Some(&mut self.conn)
    }
}

// --- PostgreSQL ---------------------------------------------------------------------------

/// `?N` placeholders as PostgreSQL's `$N`. Statements carry no `?` of their own (no string
/// literal holds one).
pub fn pg_sql(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '?' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

pub struct Postgres {
    url: String,
    client: RefCell<postgres::Client>,
    statements: RefCell<HashMap<String, postgres::Statement>>,
    /// A transaction is open: a lost connection must fail it, never reconnect under it.
    in_tx: std::cell::Cell<bool>,
}

impl Postgres {
    pub fn connect(url: &str) -> Result<Postgres> {
        let client = postgres::Client::connect(url, postgres::NoTls)?;
        Ok(Postgres { url: url.to_string(), client: RefCell::new(client), statements: RefCell::new(HashMap::new()), in_tx: false.into() })
    }

    /// Between transactions, a connection the server closed (a restart, a failover) is replaced.
    fn ensure_connected(&self) -> Result<()> {
        if self.in_tx.get() || !self.client.borrow().is_closed() {
            return Ok(());
        }
        tracing::warn!("the PostgreSQL connection was closed; reconnecting");
        let client = postgres::Client::connect(&self.url, postgres::NoTls)?;
        *self.client.borrow_mut() = client;
        self.statements.borrow_mut().clear();
        Ok(())
    }

    fn prepared(&self, sql: &str) -> Result<postgres::Statement> {
        self.ensure_connected()?;
        if let Some(s) = self.statements.borrow().get(sql) {
            return Ok(s.clone());
        }
        let stmt = self.client.borrow_mut().prepare(&pg_sql(sql))?;
        self.statements.borrow_mut().insert(sql.to_string(), stmt.clone());
        Ok(stmt)
    }
}

/// A [`Value`] bound to whatever type PostgreSQL inferred for its parameter.
#[derive(Debug)]
struct PgValue<'a>(&'a Value);

impl postgres::types::ToSql for PgValue<'_> {
    fn to_sql(
        &self,
        ty: &postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use postgres::types::Type;
        match self.0 {
            Value::Null => Ok(postgres::types::IsNull::Yes),
            Value::Int(n) => match *ty {
                Type::INT8 => n.to_sql(ty, out),
                Type::INT4 => i32::try_from(*n)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*n)?.to_sql(ty, out),
                Type::BOOL => (*n != 0).to_sql(ty, out),
                _ => n.to_string().to_sql(ty, out),
            },
            Value::Text(s) => s.to_sql(ty, out),
        }
    }

    fn accepts(_: &postgres::types::Type) -> bool {
        true
    }

    postgres::types::to_sql_checked!();
}

fn pg_value(row: &postgres::Row, i: usize) -> Result<Value> {
    use postgres::types::Type;
    let ty = row.columns().get(i).map(|c| c.type_().clone()).unwrap_or(Type::TEXT);
    Ok(match ty {
        Type::INT8 => row.try_get::<_, Option<i64>>(i)?.map_or(Value::Null, Value::Int),
        Type::INT4 => row.try_get::<_, Option<i32>>(i)?.map_or(Value::Null, |n| Value::Int(i64::from(n))),
        Type::INT2 => row.try_get::<_, Option<i16>>(i)?.map_or(Value::Null, |n| Value::Int(i64::from(n))),
        Type::BOOL => row.try_get::<_, Option<bool>>(i)?.map_or(Value::Null, |b| Value::Int(i64::from(b))),
        Type::VOID => Value::Null,
        _ => row.try_get::<_, Option<String>>(i)?.map_or(Value::Null, Value::Text),
    })
}

impl Db for Postgres {
    fn engine(&self) -> Engine {
        Engine::Postgres
    }

    fn execute(&self, sql: &str, params: &[Value]) -> Result<u64> {
        let stmt = self.prepared(sql)?;
        let values: Vec<PgValue<'_>> = params.iter().map(PgValue).collect();
        let refs: Vec<&(dyn postgres::types::ToSql + Sync)> = values.iter().map(|v| v as _).collect();
        Ok(self.client.borrow_mut().execute(&stmt, &refs)?)
    }

    fn query(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>> {
        let stmt = self.prepared(sql)?;
        let values: Vec<PgValue<'_>> = params.iter().map(PgValue).collect();
        let refs: Vec<&(dyn postgres::types::ToSql + Sync)> = values.iter().map(|v| v as _).collect();
        let rows = self.client.borrow_mut().query(&stmt, &refs)?;
        rows.iter().map(|r| (0..r.len()).map(|i| pg_value(r, i)).collect::<Result<Vec<_>>>().map(Row)).collect()
    }

    fn batch(&self, sql: &str) -> Result<()> {
        let ends = matches!(sql, "COMMIT" | "ROLLBACK");
        if !ends {
            self.ensure_connected()?;
        }
        let done = self.client.borrow_mut().batch_execute(sql);
        if ends {
            self.in_tx.set(false);
        }
        Ok(done?)
    }

    fn begin_write(&self) -> Result<()> {
        self.batch("BEGIN")?;
        self.in_tx.set(true);
        Ok(())
    }

    fn begin_read(&self) -> Result<()> {
        self.batch("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")?;
        self.in_tx.set(true);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_dollars_and_nothing_else_changes() {
        for (sql, want) in [
            ("SELECT ?1", "SELECT $1"),
            ("a = ?1 AND b = ?12", "a = $1 AND b = $12"),
            ("x ? y", "x ? y"),
            ("no params", "no params"),
        ] {
            assert_eq!(pg_sql(sql), want, "{sql}");
        }
    }

    #[test]
    fn rows_read_typed_values_and_name_a_mismatch() {
        let row = Row(vec![Value::Int(1), Value::Null, Value::Text("a".into())]);
        assert!(row.flag(0).unwrap());
        assert_eq!(row.opt_int(1).unwrap(), None);
        assert_eq!(row.text(2).unwrap(), "a");
        assert!(row.int(2).unwrap_err().to_string().contains("expected an integer"));
        assert!(row.text(7).is_err());
    }
}

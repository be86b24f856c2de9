//! The scope catalogue: the only scopes agents and keys may carry, and their implications.

use super::db::{p, Db, Engine};
use super::records::active;
use super::{audit, Change, Store};
use crate::error::{invalid, Error, Result};
use crate::model::*;
use keyward_core::scope::Implications;
use serde_json::json;
use std::collections::BTreeMap;

/// The catalogue's names, in creation order.
pub(crate) fn catalogue(db: &dyn Db) -> Result<Vec<String>> {
    db.query("SELECT name FROM scopes ORDER BY created_at, rowid", &[])?.iter().map(|r| r.text(0)).collect()
}

/// The catalogue's implications, as the snapshot carries them.
pub(crate) fn implication_map(db: &dyn Db) -> Result<BTreeMap<String, Vec<String>>> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in db.query("SELECT scope, implies FROM scope_implications ORDER BY scope, implies", &[])? {
        map.entry(r.text(0)?).or_default().push(r.text(1)?);
    }
    Ok(map)
}

pub(crate) fn implications(db: &dyn Db) -> Result<Implications> {
    Implications::new(&implication_map(db)?).map_err(Error::Internal)
}

/// Scopes of a request: valid tokens, all in the catalogue.
pub(crate) fn catalogue_ok(db: &dyn Db, field: &'static str, scopes: &[String]) -> Result<()> {
    scopes_ok(field, scopes)?;
    known_scopes_ok(field, scopes, &catalogue(db)?)
}

/// `none` (the CLI's word) and `null` both clear a rate limit.
pub(crate) fn rate_patch(rate: &Option<Option<String>>) -> Option<Option<String>> {
    rate.as_ref().map(|r| r.clone().filter(|r| r != "none"))
}

/// The scopes that imply `scope` and that some live agent or key carries.
fn implied_use(db: &dyn Db, scope: &str, now: i64) -> Result<Vec<String>> {
    // The closure: whatever implies `scope`, directly or not.
    let imp = implications(db)?;
    let mut used = Vec::new();
    for s in catalogue(db)?.into_iter().filter(|s| s != scope && imp.expand([s.as_str()]).iter().any(|x| x == scope)) {
        let (agents, keys) = scope_use(db, &s, now)?;
        if agents + keys > 0 {
            used.push(s);
        }
    }
    Ok(used)
}

/// Live agents and active keys (not revoked or expired) that carry `scope` themselves.
fn scope_use(db: &dyn Db, scope: &str, now: i64) -> Result<(u64, u64)> {
    // Scopes are stored as JSON arrays of strings; each engine unpacks them its own way.
    let (agents_sql, keys_sql) = match db.engine() {
        Engine::Sqlite => (
            "SELECT COUNT(*) FROM agents a, json_each(a.scopes) j WHERE a.deleted_at IS NULL AND j.value = ?1".to_string(),
            format!("SELECT COUNT(*) FROM keys k, json_each(k.scopes) j WHERE k.scopes IS NOT NULL AND {} AND j.value = ?1", active("k", "?2")),
        ),
        Engine::Postgres => (
            "SELECT COUNT(*) FROM agents a, jsonb_array_elements_text(a.scopes::jsonb) j(value) WHERE a.deleted_at IS NULL AND j.value = ?1"
                .to_string(),
            format!(
                "SELECT COUNT(*) FROM keys k, jsonb_array_elements_text(k.scopes::jsonb) j(value) WHERE k.scopes IS NOT NULL AND {} AND j.value = ?1",
                active("k", "?2")
            ),
        ),
    };
    let agents = db.one(&agents_sql, p![scope])?.count(0)?;
    let keys = db.one(&keys_sql, p![scope, now])?.count(0)?;
    Ok((agents, keys))
}

fn description_of(db: &dyn Db, name: &str) -> Result<Option<String>> {
    db.row("SELECT description FROM scopes WHERE name = ?1", p![name])?.map(|r| r.text(0)).transpose()
}

impl Store {
    /// The scope catalogue, in creation order.
    pub fn list_scopes(&mut self) -> Result<Vec<ScopeView>> {
        let now = self.now();
        let db = self.db();
        let map = implication_map(db)?;
        let rows = db.query("SELECT name, description FROM scopes ORDER BY created_at, rowid", &[])?;
        rows.iter()
            .map(|r| {
                let name = r.text(0)?;
                let (agents, keys) = scope_use(db, &name, now)?;
                Ok(ScopeView { implies: map.get(&name).cloned().unwrap_or_default(), description: r.text(1)?, name, agents, keys })
            })
            .collect()
    }

    pub fn add_scope(&mut self, req: &NewScope) -> Result<ScopeView> {
        scope_name_ok("name", &req.name)?;
        description_ok(&req.description)?;
        let now = self.now();
        let Change { tx, version, actor } = self.begin()?;
        if description_of(&*tx, &req.name)?.is_some() {
            return Err(Error::Conflict { field: "name", message: format!("scope {:?} is already in the catalogue", req.name) });
        }
        tx.execute("INSERT INTO scopes (name, description, created_at) VALUES (?1, ?2, ?3)", p![&req.name, &req.description, now])?;
        audit(&*tx, now, actor, "scope.add", &req.name, json!({"description": req.description}), version)?;
        tx.commit()?;
        Ok(ScopeView { name: req.name.clone(), description: req.description.clone(), implies: vec![], agents: 0, keys: 0 })
    }

    /// Removes a scope nobody carries, with its implications.
    pub fn remove_scope(&mut self, name: &str) -> Result<ScopeView> {
        let now = self.now();
        let Change { tx, version, actor } = self.begin()?;
        let description =
            description_of(&*tx, name)?.ok_or_else(|| Error::NotFound { field: "name", what: "scope", name: name.to_string() })?;
        let (agents, keys) = scope_use(&*tx, name, now)?;
        if agents + keys > 0 {
            return Err(Error::Conflict {
                field: "name",
                message: format!("scope {name:?} is still carried by {agents} agent(s) and {keys} key(s); remove it from them first"),
            });
        }
        // Carried through an implication counts too: removing it would narrow those keys.
        let implied_by = implied_use(&*tx, name, now)?;
        if !implied_by.is_empty() {
            return Err(Error::Conflict {
                field: "name",
                message: format!(
                    "scope {name:?} is implied by {} that live agents or keys carry; remove those implications first",
                    implied_by.join(", ")
                ),
            });
        }
        let implied = tx.execute("DELETE FROM scope_implications WHERE scope = ?1 OR implies = ?1", p![name])?;
        tx.execute("DELETE FROM scopes WHERE name = ?1", p![name])?;
        if implied > 0 {
            // Another scope implied it: every key's effective scopes may change.
            tx.execute("UPDATE keys SET version = ?1", p![version])?;
        }
        audit(&*tx, now, actor, "scope.remove", name, json!({"description": description}), version)?;
        tx.commit()?;
        Ok(ScopeView { name: name.to_string(), description, implies: vec![], agents: 0, keys: 0 })
    }

    /// `scope` implies `implies` (or no longer does, with `remove`). Every key is re-sent: the
    /// filter expands scopes with the catalogue's implications.
    pub fn imply_scope(&mut self, scope: &str, req: &Imply) -> Result<ScopeView> {
        let now = self.now();
        let Change { tx, version, actor } = self.begin()?;
        let names = catalogue(&*tx)?;
        known_scopes_ok("name", &[scope.to_string()], &names)?;
        known_scopes_ok("implies", std::slice::from_ref(&req.implies), &names)?;
        if scope == req.implies {
            return Err(invalid("implies", "a scope always implies itself"));
        }
        if req.remove {
            let n = tx.execute("DELETE FROM scope_implications WHERE scope = ?1 AND implies = ?2", p![scope, &req.implies])?;
            if n == 0 {
                return Err(invalid("implies", format!("{scope:?} does not imply {:?}", req.implies)));
            }
        } else {
            let n = tx.execute("INSERT INTO scope_implications (scope, implies) VALUES (?1, ?2) ON CONFLICT DO NOTHING", p![scope, &req.implies])?;
            if n == 0 {
                return Err(Error::Conflict { field: "implies", message: format!("{scope:?} already implies {:?}", req.implies) });
            }
        }
        tx.execute("UPDATE keys SET version = ?1", p![version])?;
        let action = if req.remove { "scope.unimply" } else { "scope.imply" };
        audit(&*tx, now, actor, action, scope, json!({"implies": req.implies}), version)?;
        let description = description_of(&*tx, scope)?.unwrap_or_default();
        let (agents, keys) = scope_use(&*tx, scope, now)?;
        let implies = implication_map(&*tx)?.remove(scope).unwrap_or_default();
        tx.commit()?;
        Ok(ScopeView { name: scope.to_string(), description, implies, agents, keys })
    }
}

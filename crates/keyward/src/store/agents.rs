//! Agents: create, list, show, edit, enable or disable, delete.

use super::db::p;
use super::keys::{insert_key, NewKeyRow};
use super::records::{agent_view, find_agent, find_key, AgentRow, AGENT_COLUMNS};
use super::scopes::{catalogue_ok, implications, rate_patch};
use super::{audit, generate_key, random_base62, to_json, Change, Store};
use crate::error::{invalid, Error, Result};
use crate::model::*;
use serde_json::json;

/// Only the fields that differ, as `{"before": {...}, "after": {...}}`.
pub(crate) fn changes(before: &serde_json::Value, after: &serde_json::Value) -> serde_json::Value {
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

impl Store {
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
        let now = self.now();
        let id = format!("agt_{}", random_base62(16)?);
        let secret = generate_key(&self.key_prefix)?;
        let key_id = format!("key_{}", random_base62(16)?);
        let prefix = self.key_prefix.clone();
        let Change { tx, version, actor } = self.begin()?;
        catalogue_ok(&*tx, "scopes", &req.scopes)?;
        if tx.one("SELECT EXISTS(SELECT 1 FROM agents WHERE name = ?1 AND deleted_at IS NULL)", p![&req.name])?.flag(0)? {
            return Err(Error::Conflict { field: "name", message: format!("an agent named {:?} already exists", req.name) });
        }
        tx.execute(
            "INSERT INTO agents (id, name, description, scopes, enabled, rate_limit, created_at, updated_at, version, rate_burst) \
             VALUES (?1, ?2, ?3, ?4, 1, ?5, ?6, ?6, ?7, ?8)",
            p![&id, &req.name, description, to_json(&req.scopes), &req.rate, now, version, req.burst],
        )?;
        insert_key(&*tx, &NewKeyRow::generated(&key_id, &id, "Production", &prefix, &secret, now, version))?;
        audit(
            &*tx,
            now,
            actor,
            "agent.create",
            &id,
            json!({"name": req.name, "scopes": req.scopes, "rate": req.rate, "burst": req.burst, "first_key": key_id}),
            version,
        )?;
        let agent = agent_view(&*tx, &find_agent(&*tx, &req.name)?, now)?;
        let key = find_key(&*tx, &key_id)?.view(now, &implications(&*tx)?);
        tx.commit()?;
        Ok(CreatedAgent { agent, key, secret })
    }

    pub fn list_agents(&mut self) -> Result<Vec<AgentView>> {
        let now = self.now();
        let rows = self.db().query(&format!("SELECT {AGENT_COLUMNS} FROM agents WHERE deleted_at IS NULL ORDER BY name"), &[])?;
        rows.iter().map(|r| agent_view(self.db(), &AgentRow::read(r)?, now)).collect()
    }

    pub fn show_agent(&mut self, name: &str) -> Result<AgentDetail> {
        let now = self.now();
        let agent = find_agent(self.db(), name)?;
        let keys = self.keys_where("k.agent_id = ?1", &agent.id, now)?;
        Ok(AgentDetail { agent: agent_view(self.db(), &agent, now)?, keys })
    }

    /// Turns API access on or off; `reason` (when turning it off) becomes the `ACCESS_DISABLED`
    /// message API users see.
    pub fn set_agent_enabled(&mut self, name: &str, enabled: bool, reason: Option<&str>) -> Result<AgentView> {
        let now = self.now();
        let reason = reason.map(str::trim).filter(|r| !r.is_empty());
        if let Some(r) = reason {
            if enabled {
                return Err(invalid("reason", "a reason goes with disabling an agent"));
            }
            if r.chars().count() > 200 || r.chars().any(char::is_control) {
                return Err(invalid("reason", "must be at most 200 characters, without control characters"));
            }
        }
        let Change { tx, version, actor } = self.begin()?;
        let agent = find_agent(&*tx, name)?;
        tx.execute(
            "UPDATE agents SET enabled = ?1, disabled_reason = ?2, updated_at = ?3, version = ?4 WHERE id = ?5",
            p![enabled, reason, now, version, &agent.id],
        )?;
        // Every key of the agent changes in the snapshot (its agent switch), so stamp them too.
        tx.execute("UPDATE keys SET version = ?1 WHERE agent_id = ?2", p![version, &agent.id])?;
        let action = if enabled { "agent.enable" } else { "agent.disable" };
        let details = match reason {
            Some(r) => json!({"name": name, "reason": r}),
            None => json!({"name": name}),
        };
        audit(&*tx, now, actor, action, &agent.id, details, version)?;
        let view = agent_view(&*tx, &find_agent(&*tx, name)?, now)?;
        tx.commit()?;
        Ok(view)
    }

    pub fn delete_agent(&mut self, name: &str) -> Result<AgentView> {
        let now = self.now();
        let Change { tx, version, actor } = self.begin()?;
        let agent = find_agent(&*tx, name)?;
        let revoked = tx.execute(
            "UPDATE keys SET revoked_at = ?1, version = ?2 WHERE agent_id = ?3 AND revoked_at IS NULL",
            p![now, version, &agent.id],
        )?;
        tx.execute("UPDATE keys SET version = ?1 WHERE agent_id = ?2", p![version, &agent.id])?;
        tx.execute(
            "UPDATE agents SET deleted_at = ?1, enabled = 0, updated_at = ?1, version = ?2 WHERE id = ?3",
            p![now, version, &agent.id],
        )?;
        audit(&*tx, now, actor, "agent.delete", &agent.id, json!({"name": name, "revoked_keys": revoked}), version)?;
        let mut view = agent_view(&*tx, &agent, now)?;
        view.enabled = false;
        tx.commit()?;
        Ok(view)
    }

    /// Edits an agent: every field present changes, in one version with one audit entry that
    /// records the fields before and after. Its keys are re-stamped: their effective scopes and
    /// limits are the agent's business too.
    pub fn update_agent(&mut self, name: &str, upd: &AgentUpdate) -> Result<AgentView> {
        let now = self.now();
        let rate = rate_patch(&upd.rate);
        if upd.description.is_none()
            && upd.scopes.is_none()
            && upd.add_scopes.is_empty()
            && upd.remove_scopes.is_empty()
            && rate.is_none()
            && upd.burst.is_none()
        {
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
        let Change { tx, version, actor } = self.begin()?;
        let agent = find_agent(&*tx, name)?;
        let mut scopes = upd.scopes.clone().unwrap_or_else(|| agent.scopes.clone());
        catalogue_ok(&*tx, "scopes", &scopes)?;
        catalogue_ok(&*tx, "add_scopes", &upd.add_scopes)?;
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
            p![description, to_json(&scopes), new_rate, new_burst, now, version, &agent.id],
        )?;
        tx.execute("UPDATE keys SET version = ?1 WHERE agent_id = ?2", p![version, &agent.id])?;
        let after = find_agent(&*tx, name)?;
        audit(&*tx, now, actor, "agent.update", &agent.id, json!({"name": name, "changes": changes(&agent.editable(), &after.editable())}), version)?;
        let view = agent_view(&*tx, &after, now)?;
        tx.commit()?;
        Ok(view)
    }
}

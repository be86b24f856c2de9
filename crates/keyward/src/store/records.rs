//! Agent and key rows as the store reads them, and the views and filter records made from
//! them with the rules in `model`.

use super::db::{p, Db, Row};
use super::json_list;
use crate::error::{Error, Result};
use crate::model::{self, key_status, rfc3339, AgentView, KeyView};
use keyward_core::scope::Implications;
use keyward_core::snapshot::{RawKeyRecord, RawTime};
use serde_json::json;

pub(crate) struct AgentRow {
    pub id: String,
    pub name: String,
    pub description: String,
    pub scopes: Vec<String>,
    pub enabled: bool,
    pub rate_limit: Option<String>,
    pub created_at: i64,
    pub rate_burst: Option<u32>,
    pub disabled_reason: Option<String>,
}

pub(crate) const AGENT_COLUMNS: &str = "id, name, description, scopes, enabled, rate_limit, created_at, rate_burst, disabled_reason";

impl AgentRow {
    pub fn read(r: &Row) -> Result<AgentRow> {
        Ok(AgentRow {
            id: r.text(0)?,
            name: r.text(1)?,
            description: r.text(2)?,
            scopes: json_list(&r.text(3)?),
            enabled: r.flag(4)?,
            rate_limit: r.opt_text(5)?,
            created_at: r.int(6)?,
            rate_burst: r.opt_u32(7)?,
            disabled_reason: r.opt_text(8)?,
        })
    }

    /// The fields `agent update` can change, for the audit log.
    pub fn editable(&self) -> serde_json::Value {
        json!({"description": self.description, "scopes": self.scopes, "rate": self.rate_limit, "burst": self.rate_burst})
    }
}

pub(crate) struct KeyRow {
    pub id: String,
    pub agent_id: String,
    pub agent_name: String,
    pub agent_scopes: Vec<String>,
    pub agent_enabled: bool,
    pub agent_rate: Option<String>,
    pub name: String,
    pub display_prefix: String,
    pub last4: String,
    pub digest: String,
    pub scopes: Option<Vec<String>>,
    pub path_prefixes: Vec<String>,
    pub rate_limit: Option<String>,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub last_used_at: Option<i64>,
    pub rotated_from: Option<String>,
    pub rotated_to: Option<String>,
    pub imported: bool,
    pub rotated_at: Option<i64>,
    pub version: i64,
    pub lineage: String,
    pub agent_burst: Option<u32>,
    pub rate_burst: Option<u32>,
    pub agent_disabled_reason: Option<String>,
}

/// A key joined with its agent (`k`, `a`), in [`KeyRow::read`]'s order.
pub(crate) const KEY_COLUMNS: &str = "k.id, k.agent_id, a.name, a.scopes, a.enabled, a.rate_limit, k.name, k.display_prefix, k.last4, \
    k.digest, k.scopes, k.path_prefixes, k.rate_limit, k.created_at, k.expires_at, k.revoked_at, k.last_used_at, \
    k.rotated_from, k.rotated_to, k.imported, k.rotated_at, k.version, COALESCE(k.lineage, k.id), a.rate_burst, k.rate_burst, \
    a.disabled_reason";

/// [`KEY_COLUMNS`] for a feed page: what a filter record needs, the rest constants. A page
/// reads thousands of rows, and a record has no name, prefix, creation or use.
pub(crate) const FEED_KEY_COLUMNS: &str = "k.id, k.agent_id, a.name, a.scopes, a.enabled, a.rate_limit, '', '', '', \
    k.digest, k.scopes, k.path_prefixes, k.rate_limit, 0, k.expires_at, k.revoked_at, NULL, \
    NULL, k.rotated_to, 0, k.rotated_at, k.version, COALESCE(k.lineage, k.id), a.rate_burst, k.rate_burst, \
    a.disabled_reason";

/// A live key at `?now`: not revoked, not the old key of a rotation, not expired. `{k}` is the
/// keys table's alias (or the table itself).
pub(crate) fn live(k: &str, now_param: &str) -> String {
    format!("{k}.revoked_at IS NULL AND {k}.rotated_to IS NULL AND ({k}.expires_at IS NULL OR {k}.expires_at > {now_param})")
}

/// An active key at `?now`: not revoked, not expired (a rotated key in its grace period counts).
pub(crate) fn active(k: &str, now_param: &str) -> String {
    format!("{k}.revoked_at IS NULL AND ({k}.expires_at IS NULL OR {k}.expires_at > {now_param})")
}

impl KeyRow {
    /// Reads a row of [`KEY_COLUMNS`], taking its strings.
    pub fn read(mut r: Row) -> Result<KeyRow> {
        Ok(KeyRow {
            id: r.take_text(0)?,
            agent_id: r.take_text(1)?,
            agent_name: r.take_text(2)?,
            agent_scopes: json_list(&r.take_text(3)?),
            agent_enabled: r.flag(4)?,
            agent_rate: r.take_opt_text(5)?,
            name: r.take_text(6)?,
            display_prefix: r.take_text(7)?,
            last4: r.take_text(8)?,
            digest: r.take_text(9)?,
            scopes: r.take_opt_text(10)?.map(|s| json_list(&s)),
            path_prefixes: json_list(&r.take_text(11)?),
            rate_limit: r.take_opt_text(12)?,
            created_at: r.int(13)?,
            expires_at: r.opt_int(14)?,
            revoked_at: r.opt_int(15)?,
            last_used_at: r.opt_int(16)?,
            rotated_from: r.take_opt_text(17)?,
            rotated_to: r.take_opt_text(18)?,
            imported: r.flag(19)?,
            rotated_at: r.opt_int(20)?,
            version: r.int(21)?,
            lineage: r.take_text(22)?,
            agent_burst: r.opt_u32(23)?,
            rate_burst: r.opt_u32(24)?,
            agent_disabled_reason: r.take_opt_text(25)?,
        })
    }

    fn limit(&self) -> model::Limit {
        model::effective_limit(
            (self.rate_limit.as_deref(), self.rate_burst),
            (self.agent_rate.as_deref(), self.agent_burst),
            &self.lineage,
            &self.agent_id,
        )
    }

    /// The record the filter enforces: digests and the fields it needs, nothing else. Takes the
    /// row: a feed page builds thousands, and moving its strings spares copying them.
    pub fn into_raw_record(self, imp: &Implications) -> RawKeyRecord {
        let limit = self.limit();
        let scopes = self.effective_scopes(imp);
        RawKeyRecord {
            status: model::record_status(self.revoked_at),
            expires_at: self.expires_at.map(RawTime::Unix),
            deprecated_at: self.rotated_to.as_ref().and(self.rotated_at),
            disabled_reason: if self.agent_enabled { None } else { self.agent_disabled_reason },
            agent_enabled: self.agent_enabled,
            digest: self.digest,
            id: self.id,
            agent: self.agent_name,
            scopes,
            path_prefixes: self.path_prefixes,
            rate_limit: limit.rate,
            rate_bucket: limit.bucket,
            rate_burst: limit.burst,
        }
    }

    pub fn effective_scopes(&self, imp: &Implications) -> Vec<String> {
        model::effective_scopes(self.scopes.as_deref(), &self.agent_scopes, imp)
    }

    pub fn view(&self, now: i64, imp: &Implications) -> KeyView {
        let limit = self.limit();
        KeyView {
            id: self.id.clone(),
            name: self.name.clone(),
            masked: model::masked(&self.display_prefix, &self.last4, &self.digest),
            agent: self.agent_name.clone(),
            scopes: self.effective_scopes(imp),
            own_scopes: self.scopes.clone(),
            path_prefixes: self.path_prefixes.clone(),
            rate_limit: limit.rate,
            burst: limit.burst,
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
    pub fn editable(&self) -> serde_json::Value {
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

pub(crate) fn find_agent(db: &dyn Db, name: &str) -> Result<AgentRow> {
    db.row(&format!("SELECT {AGENT_COLUMNS} FROM agents WHERE name = ?1 AND deleted_at IS NULL"), p![name])?
        .map(|r| AgentRow::read(&r))
        .transpose()?
        .ok_or_else(|| Error::NotFound { field: "agent", what: "agent", name: name.to_string() })
}

pub(crate) fn find_key(db: &dyn Db, id: &str) -> Result<KeyRow> {
    db.row(&format!("SELECT {KEY_COLUMNS} FROM keys k JOIN agents a ON a.id = k.agent_id WHERE k.id = ?1"), p![id])?
        .map(KeyRow::read)
        .transpose()?
        .ok_or_else(|| Error::NotFound { field: "id", what: "key", name: id.to_string() })
}

pub(crate) fn key_rows(db: &dyn Db, sql: &str, params: &[super::db::Value]) -> Result<Vec<KeyRow>> {
    db.query(sql, params)?.into_iter().map(KeyRow::read).collect()
}

fn active_keys(db: &dyn Db, agent_id: &str, now: i64) -> Result<u64> {
    db.one(&format!("SELECT COUNT(*) FROM keys k WHERE k.agent_id = ?1 AND {}", active("k", "?2")), p![agent_id, now])?.count(0)
}

pub(crate) fn agent_view(db: &dyn Db, a: &AgentRow, now: i64) -> Result<AgentView> {
    let last_used = db.one("SELECT MAX(last_used_at) FROM keys WHERE agent_id = ?1", p![&a.id])?.opt_int(0)?;
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
        active_keys: active_keys(db, &a.id, now)?,
        last_used_at: rfc3339(last_used),
    })
}

//! Keys: create, import (one or a batch), list, show, edit, revoke, rotate.

use super::agents::changes;
use super::db::{insert_many, p, Db, Value};
use super::records::{find_agent, find_key, key_rows, live, AgentRow, KEY_COLUMNS};
use super::scopes::{catalogue_ok, implications, rate_patch};
use super::{audit, generate_key, now_unix_ceil, random_base62, to_json, Change, Store, DEFAULT_GRACE};
use crate::error::{invalid, Error, Result};
use crate::model::*;
use keyward_core::{keyformat, Digest};
use serde_json::json;

/// Longest key the filter accepts by default (its `max_key_length`).
pub const FILTER_MAX_KEY_LENGTH: usize = 256;
/// Imported keys shorter than this are guessable; they need `allow_weak`.
pub const WEAK_KEY_LENGTH: usize = 16;

/// Whether agent `?1` has a live key named `?2` at `?3`, other than key `?4`: names are unique
/// among an agent's live keys.
fn name_taken(db: &dyn Db, agent_id: &str, name: &str, now: i64, except: &str) -> Result<bool> {
    let sql = format!("SELECT EXISTS(SELECT 1 FROM keys k WHERE k.agent_id = ?1 AND k.name = ?2 AND {} AND k.id != ?4)", live("k", "?3"));
    db.one(&sql, p![agent_id, name, now, except])?.flag(0)
}

fn digest_taken(db: &dyn Db, digest: &str) -> Result<bool> {
    db.one("SELECT EXISTS(SELECT 1 FROM keys WHERE digest = ?1)", p![digest])?.flag(0)
}

/// A validated key request: its agent, scopes override, expiry and name.
struct CheckedKey {
    agent: AgentRow,
    scopes: Option<Vec<String>>,
    expires_at: Option<i64>,
    name: String,
}

/// One row of the keys table, as every insertion writes it.
pub(crate) struct NewKeyRow<'a> {
    pub id: &'a str,
    pub agent_id: &'a str,
    pub name: &'a str,
    pub display_prefix: String,
    pub last4: String,
    pub digest: String,
    pub scopes: Option<&'a [String]>,
    pub path_prefixes: &'a [String],
    pub rate: Option<&'a str>,
    pub burst: Option<u32>,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub rotated_from: Option<&'a str>,
    pub lineage: Option<&'a str>,
    pub imported: bool,
    pub version: u64,
}

impl<'a> NewKeyRow<'a> {
    /// A generated key with no overrides (an agent's first key).
    pub fn generated(id: &'a str, agent_id: &'a str, name: &'a str, prefix: &str, secret: &str, now: i64, version: u64) -> NewKeyRow<'a> {
        NewKeyRow {
            id,
            agent_id,
            name,
            display_prefix: format!("{prefix}_"),
            last4: secret.get(secret.len().saturating_sub(4)..).unwrap_or("").to_string(),
            digest: Digest::of(secret.as_bytes()).to_hex(),
            scopes: None,
            path_prefixes: &[],
            rate: None,
            burst: None,
            created_at: now,
            expires_at: None,
            rotated_from: None,
            lineage: None,
            imported: false,
            version,
        }
    }
}

/// The columns every key insertion writes, in [`insert_key`]'s order.
const KEY_INSERT_COLUMNS: &str = "id, agent_id, name, display_prefix, last4, digest, scopes, path_prefixes, rate_limit, \
    created_at, expires_at, rotated_from, imported, version, rate_burst, lineage";

/// The one way a key row is written.
pub(crate) fn insert_key(db: &dyn Db, k: &NewKeyRow<'_>) -> Result<()> {
    insert_many(
        db,
        "keys",
        KEY_INSERT_COLUMNS,
        &[p![
            k.id,
            k.agent_id,
            k.name,
            &k.display_prefix,
            &k.last4,
            &k.digest,
            k.scopes.map(to_json),
            to_json(k.path_prefixes),
            k.rate,
            k.created_at,
            k.expires_at,
            k.rotated_from,
            k.imported,
            k.version,
            k.burst,
            k.lineage.unwrap_or(k.id)
        ]
        .to_vec()],
        1,
    )
}

/// Validates a key request against its agent.
/// `default_name` names the key when the request does not; a batch passes `None` and checks
/// each of its own names instead.
fn check_new_key(db: &dyn Db, req: &NewKey, default_name: Option<&str>, now: i64) -> Result<CheckedKey> {
    let agent = find_agent(db, &req.agent)?;
    let name = req.name.clone().or_else(|| default_name.map(str::to_string)).unwrap_or_default();
    name_ok("name", &name)?;
    if let Some(scopes) = &req.scopes {
        if scopes.is_empty() {
            return Err(invalid("scopes", "give at least one scope, or leave them unset to use the agent's"));
        }
        catalogue_ok(db, "scopes", scopes)?;
        subset_ok(scopes, &agent.scopes, &agent.name, &implications(db)?)?;
    }
    let expires_at = expiry(req.expires_at.as_deref(), req.ttl.as_deref(), now_unix_ceil().max(now))?;
    if let Some(rate) = &req.rate {
        rate_ok("rate", rate)?;
    }
    burst_ok(req.burst, req.rate.as_deref())?;
    path_prefixes_ok(&req.path_prefixes)?;
    if default_name.is_some() && name_taken(db, &agent.id, &name, now, "")? {
        return Err(Error::Conflict { field: "name", message: format!("agent {} already has a key named {name:?}", agent.name) });
    }
    Ok(CheckedKey { agent, scopes: req.scopes.clone(), expires_at, name })
}

/// The digest, display prefix and last four of an imported key (by value or by digest). A key
/// the filter would always refuse is refused here: over its length bound, outside printable
/// ASCII, or in keyward's format (`kw…_`, or this store's prefix) with a wrong checksum.
fn imported_digest(secret: Option<&str>, digest: Option<&str>, key_prefix: &str, allow_weak: bool) -> Result<(String, String, String)> {
    match (secret, digest) {
        (Some(_), Some(_)) => Err(invalid("digest", "give the key or its digest, not both")),
        (None, None) => Err(invalid("key", "give the existing key, or its SHA-256 digest")),
        (Some(secret), None) => {
            let secret = secret.trim();
            if !keyward_core::credential::is_key_text(secret.as_bytes()) {
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

/// Rows per statement when a batch inserts: few round trips to a networked store.
const BATCH_ROWS: usize = 500;

impl Store {
    pub fn create_key(&mut self, req: &NewKey) -> Result<CreatedKey> {
        let now = self.now();
        let secret = generate_key(&self.key_prefix)?;
        let key_id = format!("key_{}", random_base62(16)?);
        let prefix = self.key_prefix.clone();
        let Change { tx, version, actor } = self.begin()?;
        let CheckedKey { agent, scopes, expires_at, name } = check_new_key(&*tx, req, Some(&key_id), now)?;
        let row = NewKeyRow {
            scopes: scopes.as_deref(),
            path_prefixes: &req.path_prefixes,
            rate: req.rate.as_deref(),
            burst: req.burst,
            expires_at,
            ..NewKeyRow::generated(&key_id, &agent.id, &name, &prefix, &secret, now, version)
        };
        insert_key(&*tx, &row)?;
        audit(
            &*tx,
            now,
            actor,
            "key.create",
            &key_id,
            json!({"agent": agent.name, "name": name, "scopes": scopes, "expires_at": rfc3339(expires_at), "rate": req.rate, "burst": req.burst, "path_prefixes": req.path_prefixes}),
            version,
        )?;
        let key = find_key(&*tx, &key_id)?.view(now, &implications(&*tx)?);
        tx.commit()?;
        Ok(CreatedKey { key, secret })
    }

    pub fn import_key(&mut self, req: &ImportKey) -> Result<KeyView> {
        let now = self.now();
        let (digest, prefix, last4) = imported_digest(req.secret.as_deref(), req.digest.as_deref(), &self.key_prefix, req.allow_weak)?;
        let key_id = format!("key_{}", random_base62(16)?);
        let Change { tx, version, actor } = self.begin()?;
        let CheckedKey { agent, scopes, expires_at, name } = check_new_key(&*tx, &req.key, Some(&key_id), now)?;
        if digest_taken(&*tx, &digest)? {
            return Err(Error::Conflict { field: "key", message: "this key is already registered".into() });
        }
        let row = NewKeyRow {
            id: &key_id,
            agent_id: &agent.id,
            name: &name,
            display_prefix: prefix,
            last4,
            digest,
            scopes: scopes.as_deref(),
            path_prefixes: &req.key.path_prefixes,
            rate: req.key.rate.as_deref(),
            burst: req.key.burst,
            created_at: now,
            expires_at,
            rotated_from: None,
            lineage: None,
            imported: true,
            version,
        };
        insert_key(&*tx, &row)?;
        audit(
            &*tx,
            now,
            actor,
            "key.import",
            &key_id,
            json!({"agent": agent.name, "name": name, "scopes": scopes, "expires_at": rfc3339(expires_at), "rate": req.key.rate, "burst": req.key.burst}),
            version,
        )?;
        let key = find_key(&*tx, &key_id)?.view(now, &implications(&*tx)?);
        tx.commit()?;
        Ok(key)
    }

    /// Imports many existing keys in one transaction (one version, one audit entry): each line
    /// is a key, or `sha256:<hex>` for its digest. Keys are named `<name>-<line>`. Any bad line
    /// refuses the whole batch, naming the line. `progress` hears how many keys are stored.
    pub fn import_batch(&mut self, template: &NewKey, lines: &[String], allow_weak: bool) -> Result<Vec<String>> {
        self.import_batch_with(template, lines, allow_weak, &mut |_| {})
    }

    pub fn import_batch_with(&mut self, template: &NewKey, lines: &[String], allow_weak: bool, progress: &mut dyn FnMut(usize)) -> Result<Vec<String>> {
        let now = self.now();
        let base = template.name.clone().unwrap_or_else(|| "imported".into());
        name_ok("name", &base)?;
        let mut rows = Vec::new();
        let mut seen = std::collections::HashSet::new();
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
            let name = format!("{base}-{}", i + 1);
            if !seen.insert(digest.clone()) {
                return Err(Error::Conflict { field: "key", message: format!("{name}: this key is already registered") });
            }
            rows.push((name, format!("key_{}", random_base62(16)?), digest, prefix, last4));
        }
        if rows.is_empty() {
            return Err(invalid("key", "no keys on stdin"));
        }
        let Change { tx, version, actor } = self.begin()?;
        let probe = NewKey { name: Some(base.clone()), ..template.clone() };
        let CheckedKey { agent, scopes, expires_at, .. } = check_new_key(&*tx, &probe, None, now)?;
        // Conflicts, read once: the digests already registered, and the agent's live names.
        let registered: std::collections::HashSet<String> = {
            let mut found = std::collections::HashSet::new();
            for chunk in rows.chunks(BATCH_ROWS) {
                let marks: Vec<String> = (1..=chunk.len()).map(|i| format!("?{i}")).collect();
                let params: Vec<Value> = chunk.iter().map(|r| r.2.as_str().into()).collect();
                for r in tx.query(&format!("SELECT digest FROM keys WHERE digest IN ({})", marks.join(", ")), &params)? {
                    found.insert(r.text(0)?);
                }
            }
            found
        };
        let names: std::collections::HashSet<String> = tx
            .query(&format!("SELECT k.name FROM keys k WHERE k.agent_id = ?1 AND {}", live("k", "?2")), p![&agent.id, now])?
            .iter()
            .map(|r| r.text(0))
            .collect::<Result<_>>()?;
        for (name, _, digest, _, _) in &rows {
            if registered.contains(digest) {
                return Err(Error::Conflict { field: "key", message: format!("{name}: this key is already registered") });
            }
            if names.contains(name) {
                return Err(Error::Conflict { field: "name", message: format!("agent {} already has a key named {name:?}", agent.name) });
            }
        }
        let scopes_json = scopes.as_deref().map(to_json);
        let paths_json = to_json(&template.path_prefixes);
        let mut stored = 0;
        for chunk in rows.chunks(BATCH_ROWS) {
            let values: Vec<Vec<Value>> = chunk
                .iter()
                .map(|(name, id, digest, prefix, last4)| {
                    vec![
                        id.into(),
                        (&agent.id).into(),
                        name.into(),
                        prefix.into(),
                        last4.into(),
                        digest.into(),
                        scopes_json.clone().into(),
                        paths_json.clone().into(),
                        template.rate.clone().into(),
                        now.into(),
                        expires_at.into(),
                        Value::Null,
                        true.into(),
                        version.into(),
                        template.burst.into(),
                        id.into(),
                    ]
                })
                .collect();
            insert_many(&*tx, "keys", KEY_INSERT_COLUMNS, &values, BATCH_ROWS)?;
            stored += chunk.len();
            progress(stored);
        }
        audit(&*tx, now, actor, "key.import_batch", &agent.id, json!({"agent": agent.name, "count": rows.len(), "name": base}), version)?;
        tx.commit()?;
        Ok(rows.into_iter().map(|r| r.1).collect())
    }

    pub(crate) fn keys_where(&self, cond: &str, arg: &str, now: i64) -> Result<Vec<KeyView>> {
        let rows = key_rows(
            self.db(),
            &format!("SELECT {KEY_COLUMNS} FROM keys k JOIN agents a ON a.id = k.agent_id WHERE {cond} ORDER BY a.name, k.created_at, k.id"),
            p![arg],
        )?;
        let imp = implications(self.db())?;
        Ok(rows.iter().map(|k| k.view(now, &imp)).collect())
    }

    pub fn list_keys(&mut self, agent: Option<&str>) -> Result<Vec<KeyView>> {
        let now = self.now();
        match agent {
            Some(name) => {
                let agent = find_agent(self.db(), name)?;
                self.keys_where("k.agent_id = ?1", &agent.id, now)
            }
            None => self.keys_where("a.deleted_at IS NULL AND ?1 = ''", "", now),
        }
    }

    /// One key, masked.
    pub fn get_key(&mut self, id: &str) -> Result<KeyView> {
        let key = find_key(self.db(), id)?;
        Ok(key.view(self.now(), &implications(self.db())?))
    }

    pub fn revoke_key(&mut self, id: &str) -> Result<KeyView> {
        let now = self.now();
        let Change { tx, version, actor } = self.begin()?;
        let key = find_key(&*tx, id)?;
        if key.revoked_at.is_some() {
            return Err(Error::Conflict { field: "id", message: format!("key {id} is already revoked") });
        }
        tx.execute("UPDATE keys SET revoked_at = ?1, version = ?2 WHERE id = ?3", p![now, version, id])?;
        audit(&*tx, now, actor, "key.revoke", id, json!({"agent": key.agent_name, "name": key.name}), version)?;
        let view = find_key(&*tx, id)?.view(now, &implications(&*tx)?);
        tx.commit()?;
        Ok(view)
    }

    pub fn rotate_key(&mut self, id: &str, req: &RotateKey) -> Result<Rotated> {
        let now = self.now();
        let grace = parse_duration("grace", req.grace.as_deref().unwrap_or(DEFAULT_GRACE))?;
        if req.no_expiry && (req.ttl.is_some() || req.expires_at.is_some()) {
            return Err(invalid("no_expiry", "give no expiry, a TTL or an expiry time, not two of them"));
        }
        let chosen = expiry(req.expires_at.as_deref(), req.ttl.as_deref(), now_unix_ceil().max(now))?;
        let secret = generate_key(&self.key_prefix)?;
        let new_id = format!("key_{}", random_base62(16)?);
        let prefix = self.key_prefix.clone();
        let Change { tx, version, actor } = self.begin()?;
        let old = find_key(&*tx, id)?;
        live_key_ok(id, old.revoked_at, old.expires_at, old.rotated_to.as_deref(), now, "rotate")?;
        let (old_expiry, new_expiry) = rotation_expiry(old.created_at, old.expires_at, now, grace, chosen, req.no_expiry);
        let row = NewKeyRow {
            scopes: old.scopes.as_deref(),
            path_prefixes: &old.path_prefixes,
            rate: old.rate_limit.as_deref(),
            burst: old.rate_burst,
            expires_at: new_expiry,
            rotated_from: Some(id),
            lineage: Some(&old.lineage),
            ..NewKeyRow::generated(&new_id, &old.agent_id, &old.name, &prefix, &secret, now, version)
        };
        insert_key(&*tx, &row)?;
        tx.execute(
            "UPDATE keys SET expires_at = ?1, rotated_to = ?2, rotated_at = ?3, version = ?4 WHERE id = ?5",
            p![old_expiry, &new_id, now, version, id],
        )?;
        audit(
            &*tx,
            now,
            actor,
            "key.rotate",
            id,
            json!({"agent": old.agent_name, "new_key": new_id, "old_expires_at": rfc3339(Some(old_expiry)), "new_expires_at": rfc3339(new_expiry)}),
            version,
        )?;
        let imp = implications(&*tx)?;
        let old_view = find_key(&*tx, id)?.view(now, &imp);
        let new_view = find_key(&*tx, &new_id)?.view(now, &imp);
        tx.commit()?;
        Ok(Rotated { old: old_view, new: CreatedKey { key: new_view, secret } })
    }

    /// Edits a key with the rules that hold at creation: scopes within its agent's and in the
    /// catalogue, an expiry in the future, a valid limit and burst, a name unique among the
    /// agent's live keys.
    pub fn update_key(&mut self, id: &str, upd: &KeyUpdate) -> Result<KeyView> {
        let now = self.now();
        let rate = rate_patch(&upd.rate);
        if upd.name.is_none()
            && upd.scopes.is_none()
            && upd.expires_at.is_none()
            && upd.ttl.is_none()
            && rate.is_none()
            && upd.burst.is_none()
            && upd.path_prefixes.is_none()
        {
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
        let Change { tx, version, actor } = self.begin()?;
        let key = find_key(&*tx, id)?;
        // An expired key or the old key of a rotation stays as it ended: editing it would bring
        // a dead key back, or stretch a grace period.
        live_key_ok(id, key.revoked_at, key.expires_at, key.rotated_to.as_deref(), now, "change")?;
        if let Some(Some(scopes)) = &upd.scopes {
            if scopes.is_empty() {
                return Err(invalid("scopes", "give at least one scope, or inherit the agent's (null)"));
            }
            catalogue_ok(&*tx, "scopes", scopes)?;
            subset_ok(scopes, &key.agent_scopes, &key.agent_name, &implications(&*tx)?)?;
        }
        if let Some(name) = &upd.name {
            if name_taken(&*tx, &key.agent_id, name, now, id)? {
                return Err(Error::Conflict { field: "name", message: format!("agent {} already has a key named {name:?}", key.agent_name) });
            }
        }
        let (new_rate, new_burst) = patched_limit((key.rate_limit.clone(), key.rate_burst), rate.clone(), upd.burst)?;
        let scopes = upd.scopes.clone().unwrap_or_else(|| key.scopes.clone());
        let paths = upd.path_prefixes.clone().unwrap_or_else(|| key.path_prefixes.clone());
        tx.execute(
            "UPDATE keys SET name = ?1, scopes = ?2, expires_at = ?3, rate_limit = ?4, rate_burst = ?5, path_prefixes = ?6, version = ?7 WHERE id = ?8",
            p![
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
        let after = find_key(&*tx, id)?;
        audit(&*tx, now, actor, "key.update", id, json!({"agent": key.agent_name, "changes": changes(&key.editable(), &after.editable())}), version)?;
        let view = after.view(now, &implications(&*tx)?);
        tx.commit()?;
        Ok(view)
    }
}

//! Admins, their personal tokens, and console sessions. Only SHA-256 digests of tokens and
//! session ids are kept. These rows are not part of the snapshot: a change here bumps no
//! version, and its audit entry carries the version it happened at.

use super::db::{p, Row, Tx};
use super::{audit, generate_key, version_in, Store};
use crate::error::{Error, Result};
use crate::model::*;
use keyward_core::time::format_rfc3339;
use keyward_core::Digest;
use serde_json::json;

/// The prefix of personal admin tokens (the bootstrap token's too).
pub const ADMIN_TOKEN_PREFIX: &str = "kwadm";

const ADMIN_COLUMNS: &str = "name, role, created_at, token_issued_at, disabled_at";

fn admin_view(r: &Row) -> Result<AdminView> {
    let role = r.text(1)?;
    let disabled = r.opt_int(4)?;
    Ok(AdminView {
        name: r.text(0)?,
        role: AdminRole::parse("role", &role).map_err(|_| Error::Internal(format!("corrupt admin role {role:?}")))?,
        status: if disabled.is_some() { "disabled" } else { "active" }.into(),
        created_at: format_rfc3339(r.int(2)?),
        token_issued_at: format_rfc3339(r.int(3)?),
        disabled_at: disabled.map(format_rfc3339),
    })
}

fn not_found(name: &str) -> Error {
    Error::NotFound { field: "name", what: "admin", name: name.into() }
}

impl Store {
    /// Creates an admin with a personal token, returned once.
    pub fn create_admin(&mut self, req: &NewAdmin) -> Result<AdminWithToken> {
        name_ok("name", &req.name)?;
        let role = AdminRole::parse("role", &req.role)?;
        if req.name == Actor::bootstrap().name {
            return Err(crate::error::invalid("name", format!("{:?} names the bootstrap admin token in the audit log; choose another name", req.name)));
        }
        let token = generate_key(ADMIN_TOKEN_PREFIX)?;
        let digest = Digest::of(token.as_bytes()).to_hex();
        let now = self.now();
        let tx = Tx::write(self.db())?;
        if tx.row("SELECT 1 FROM admins WHERE name = ?1", p![&req.name])?.is_some() {
            return Err(Error::Conflict { field: "name", message: format!("an admin named {:?} already exists", req.name) });
        }
        tx.execute(
            "INSERT INTO admins (name, role, token_digest, created_at, token_issued_at) VALUES (?1, ?2, ?3, ?4, ?4)",
            p![&req.name, role.as_str(), digest, now],
        )?;
        audit(&*tx, now, &self.actor, "admin.create", &req.name, json!({"role": role.as_str()}), version_in(&*tx)?)?;
        let admin = admin_view(&tx.one(&format!("SELECT {ADMIN_COLUMNS} FROM admins WHERE name = ?1"), p![&req.name])?)?;
        tx.commit()?;
        Ok(AdminWithToken { admin, token })
    }

    pub fn list_admins(&self) -> Result<Vec<AdminView>> {
        self.db().query(&format!("SELECT {ADMIN_COLUMNS} FROM admins ORDER BY name"), &[])?.iter().map(admin_view).collect()
    }

    /// Disables (or, with `enabled`, re-enables) an admin. A disabled admin's token and console
    /// sessions stop working at once.
    pub fn set_admin_enabled(&mut self, name: &str, enabled: bool) -> Result<AdminView> {
        let now = self.now();
        let tx = Tx::write(self.db())?;
        let Some(row) = tx.row("SELECT disabled_at FROM admins WHERE name = ?1", p![name])? else {
            return Err(not_found(name));
        };
        // Already so: nothing changes, and nothing is audited.
        if row.opt_int(0)?.is_none() == enabled {
            return admin_view(&tx.one(&format!("SELECT {ADMIN_COLUMNS} FROM admins WHERE name = ?1"), p![name])?);
        }
        let disabled_at = if enabled { None } else { Some(now) };
        tx.execute("UPDATE admins SET disabled_at = ?2 WHERE name = ?1", p![name, disabled_at])?;
        if !enabled {
            tx.execute("DELETE FROM sessions WHERE token_digest = (SELECT token_digest FROM admins WHERE name = ?1)", p![name])?;
        }
        let action = if enabled { "admin.enable" } else { "admin.disable" };
        audit(&*tx, now, &self.actor, action, name, json!({}), version_in(&*tx)?)?;
        let admin = admin_view(&tx.one(&format!("SELECT {ADMIN_COLUMNS} FROM admins WHERE name = ?1"), p![name])?)?;
        tx.commit()?;
        Ok(admin)
    }

    /// A new personal token for an admin, returned once; the old one, and the sessions it
    /// signed in, stop working.
    pub fn new_admin_token(&mut self, name: &str) -> Result<AdminWithToken> {
        let token = generate_key(ADMIN_TOKEN_PREFIX)?;
        let digest = Digest::of(token.as_bytes()).to_hex();
        let now = self.now();
        let tx = Tx::write(self.db())?;
        let Some(row) = tx.row("SELECT token_digest, disabled_at FROM admins WHERE name = ?1", p![name])? else {
            return Err(not_found(name));
        };
        if row.opt_int(1)?.is_some() {
            return Err(Error::Conflict { field: "name", message: format!("admin {name:?} is disabled; enable it first (`keyward admin enable`)") });
        }
        tx.execute("DELETE FROM sessions WHERE token_digest = ?1", p![row.text(0)?])?;
        tx.execute("UPDATE admins SET token_digest = ?2, token_issued_at = ?3 WHERE name = ?1", p![name, digest, now])?;
        audit(&*tx, now, &self.actor, "admin.token", name, json!({}), version_in(&*tx)?)?;
        let admin = admin_view(&tx.one(&format!("SELECT {ADMIN_COLUMNS} FROM admins WHERE name = ?1"), p![name])?)?;
        tx.commit()?;
        Ok(AdminWithToken { admin, token })
    }

    /// The enabled admin whose personal token has this digest.
    pub fn admin_by_token(&self, digest: &Digest) -> Result<Option<Actor>> {
        let row = self.db().row("SELECT name, role FROM admins WHERE token_digest = ?1 AND disabled_at IS NULL", p![digest.to_hex()])?;
        row.map(|r| {
            let role = r.text(1)?;
            Ok(Actor { name: r.text(0)?, role: AdminRole::parse("role", &role).map_err(|_| Error::Internal(format!("corrupt admin role {role:?}")))? })
        })
        .transpose()
    }

    /// Starts a console session signed in with the token whose digest is `token`; `session` is
    /// the digest of the session id the browser holds.
    pub fn create_session(&mut self, session: &Digest, token: &Digest) -> Result<()> {
        let now = self.now();
        // Sessions long over are swept here, at a sign-in, rather than on every page view.
        self.db().execute("DELETE FROM sessions WHERE last_seen < ?1 OR created_at < ?2", p![now - 86_400, now - 86_400])?;
        self.db().execute(
            "INSERT INTO sessions (digest, token_digest, created_at, last_seen) VALUES (?1, ?2, ?3, ?3)",
            p![session.to_hex(), token.to_hex(), now],
        )?;
        Ok(())
    }

    /// The token digest a live session was signed in with, if it has been used within
    /// `idle_secs` and is younger than `max_secs`; marks it used. An expired one is removed.
    pub fn session_token(&mut self, session: &Digest, idle_secs: i64, max_secs: i64) -> Result<Option<Digest>> {
        let now = self.now();
        let db = self.db();
        let Some(row) = db.row("SELECT token_digest, last_seen, created_at FROM sessions WHERE digest = ?1", p![session.to_hex()])? else {
            return Ok(None);
        };
        if row.int(1)? < now - idle_secs || row.int(2)? < now - max_secs {
            db.execute("DELETE FROM sessions WHERE digest = ?1", p![session.to_hex()])?;
            return Ok(None);
        }
        // One write a minute per session at most: a page view is a read.
        if now - row.int(1)? >= 60 {
            db.execute("UPDATE sessions SET last_seen = ?2 WHERE digest = ?1", p![session.to_hex(), now])?;
        }
        Ok(Digest::from_hex(&row.text(0)?))
    }

    pub fn end_session(&mut self, session: &Digest) -> Result<()> {
        self.db().execute("DELETE FROM sessions WHERE digest = ?1", p![session.to_hex()])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> Store {
        Store::memory().unwrap()
    }

    #[test]
    fn an_admin_is_found_by_its_token_until_disabled_or_given_a_new_one() {
        let mut s = store();
        let made = s.create_admin(&NewAdmin { name: "alice".into(), role: "editor".into() }).unwrap();
        assert!(made.token.starts_with("kwadm_"));
        let d = Digest::of(made.token.as_bytes());
        assert_eq!(s.admin_by_token(&d).unwrap(), Some(Actor { name: "alice".into(), role: AdminRole::Editor }));

        let renewed = s.new_admin_token("alice").unwrap();
        assert_eq!(s.admin_by_token(&d).unwrap(), None, "the old token stops working");
        let d2 = Digest::of(renewed.token.as_bytes());
        assert!(s.admin_by_token(&d2).unwrap().is_some());

        s.set_admin_enabled("alice", false).unwrap();
        assert_eq!(s.admin_by_token(&d2).unwrap(), None);
        assert!(matches!(s.new_admin_token("alice"), Err(Error::Conflict { .. })));
        s.set_admin_enabled("alice", true).unwrap();
        assert!(s.admin_by_token(&d2).unwrap().is_some());
    }

    #[test]
    fn admins_are_refused_with_reasons_and_nothing_is_stored_but_digests() {
        let mut s = store();
        let bad_role = s.create_admin(&NewAdmin { name: "bob".into(), role: "root".into() }).unwrap_err();
        assert_eq!(bad_role.field(), Some("role"));
        let reserved = s.create_admin(&NewAdmin { name: "api".into(), role: "viewer".into() }).unwrap_err();
        assert_eq!(reserved.field(), Some("name"));
        let made = s.create_admin(&NewAdmin { name: "bob".into(), role: "viewer".into() }).unwrap();
        assert!(matches!(s.create_admin(&NewAdmin { name: "bob".into(), role: "owner".into() }), Err(Error::Conflict { .. })));
        assert!(matches!(s.set_admin_enabled("nobody", false), Err(Error::NotFound { .. })));
        let dump: Vec<String> = s.db().query("SELECT token_digest FROM admins", &[]).unwrap().iter().map(|r| r.text(0).unwrap()).collect();
        assert_eq!(dump, vec![Digest::of(made.token.as_bytes()).to_hex()]);
        let actions: Vec<String> = s.audit(10).unwrap().into_iter().map(|e| e.action).collect();
        assert_eq!(actions, vec!["admin.create"]);
    }

    #[test]
    fn sessions_end_when_idle_too_old_or_their_admin_is_disabled() {
        let mut s = store();
        let made = s.create_admin(&NewAdmin { name: "carol".into(), role: "owner".into() }).unwrap();
        let token = Digest::of(made.token.as_bytes());
        let session = Digest::of(b"session-1");
        s.create_session(&session, &token).unwrap();
        assert_eq!(s.session_token(&session, 1800, 43200).unwrap(), Some(token));
        // Idle: nobody used it within the window.
        s.clock = || 10_000_000_000;
        assert_eq!(s.session_token(&session, 1800, 43200).unwrap(), None);
        s.clock = crate::store::now_unix;
        s.create_session(&session, &token).unwrap();
        s.set_admin_enabled("carol", false).unwrap();
        assert_eq!(s.session_token(&session, 1800, 43200).unwrap(), None);
    }
}

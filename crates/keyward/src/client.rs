//! The CLI's two backends behind one trait: the database file directly, or the admin API
//! (`--url`). The same validation runs either way: the API calls the same `Store`.

use crate::error::{invalid, Error, Result};
use crate::model::*;
use crate::store::Store;
use keyward_core::snapshot::RawSnapshot;
use serde::de::DeserializeOwned;
use serde::Serialize;

pub trait Admin {
    fn create_agent(&mut self, req: &NewAgent) -> Result<CreatedAgent>;
    fn list_agents(&mut self) -> Result<Vec<AgentView>>;
    fn show_agent(&mut self, name: &str) -> Result<AgentDetail>;
    fn set_agent_enabled(&mut self, name: &str, enabled: bool, reason: Option<&str>) -> Result<AgentView>;
    fn update_agent(&mut self, name: &str, req: &AgentUpdate) -> Result<AgentView>;
    fn get_key(&mut self, id: &str) -> Result<KeyView>;
    fn update_key(&mut self, id: &str, req: &KeyUpdate) -> Result<KeyView>;
    fn list_scopes(&mut self) -> Result<Vec<ScopeView>>;
    fn add_scope(&mut self, req: &NewScope) -> Result<ScopeView>;
    fn remove_scope(&mut self, name: &str) -> Result<ScopeView>;
    fn imply_scope(&mut self, name: &str, req: &Imply) -> Result<ScopeView>;
    /// How the last change reached the Envoys: waited for here (the file) or by the server.
    fn applied(&mut self, wait: bool) -> Result<Option<Applied>>;
    fn delete_agent(&mut self, name: &str) -> Result<AgentView>;
    fn create_key(&mut self, req: &NewKey) -> Result<CreatedKey>;
    fn import_key(&mut self, req: &ImportKey) -> Result<KeyView>;
    fn import_batch(&mut self, template: &NewKey, lines: &[String], allow_weak: bool, progress: &mut dyn FnMut(usize)) -> Result<Vec<String>>;
    fn list_keys(&mut self, agent: Option<&str>) -> Result<Vec<KeyView>>;
    fn revoke_key(&mut self, id: &str) -> Result<KeyView>;
    fn rotate_key(&mut self, id: &str, req: &RotateKey) -> Result<Rotated>;
    fn status(&mut self) -> Result<StatusView>;
    /// The last `limit` audit entries that `filter` lets through, oldest first.
    fn audit(&mut self, limit: u32, filter: &AuditFilter) -> Result<Vec<AuditEntry>>;
    fn snapshot(&mut self) -> Result<RawSnapshot>;
    fn usage(&mut self, agent: Option<&str>, since: &str) -> Result<Vec<UsageRow>>;
    /// Creates an admin; its personal token is in the answer, and nowhere else.
    fn create_admin(&mut self, req: &NewAdmin) -> Result<AdminWithToken>;
    fn list_admins(&mut self) -> Result<Vec<AdminView>>;
    fn set_admin_enabled(&mut self, name: &str, enabled: bool) -> Result<AdminView>;
    /// A new personal token for an admin; the old one stops working.
    fn new_admin_token(&mut self, name: &str) -> Result<AdminWithToken>;
}

impl Admin for Store {
    fn create_agent(&mut self, req: &NewAgent) -> Result<CreatedAgent> {
        Store::create_agent(self, req)
    }
    fn list_agents(&mut self) -> Result<Vec<AgentView>> {
        Store::list_agents(self)
    }
    fn show_agent(&mut self, name: &str) -> Result<AgentDetail> {
        Store::show_agent(self, name)
    }
    fn set_agent_enabled(&mut self, name: &str, enabled: bool, reason: Option<&str>) -> Result<AgentView> {
        Store::set_agent_enabled(self, name, enabled, reason)
    }
    fn update_agent(&mut self, name: &str, req: &AgentUpdate) -> Result<AgentView> {
        Store::update_agent(self, name, req)
    }
    fn get_key(&mut self, id: &str) -> Result<KeyView> {
        Store::get_key(self, id)
    }
    fn update_key(&mut self, id: &str, req: &KeyUpdate) -> Result<KeyView> {
        Store::update_key(self, id, req)
    }
    fn list_scopes(&mut self) -> Result<Vec<ScopeView>> {
        Store::list_scopes(self)
    }
    fn add_scope(&mut self, req: &NewScope) -> Result<ScopeView> {
        Store::add_scope(self, req)
    }
    fn remove_scope(&mut self, name: &str) -> Result<ScopeView> {
        Store::remove_scope(self, name)
    }
    fn imply_scope(&mut self, name: &str, req: &Imply) -> Result<ScopeView> {
        Store::imply_scope(self, name, req)
    }
    fn applied(&mut self, wait: bool) -> Result<Option<Applied>> {
        match self.last_change.take() {
            Some(v) => crate::applied::wait_on_store(self, v, wait, crate::applied::DEFAULT_WAIT).map(Some),
            None => Ok(None),
        }
    }
    fn delete_agent(&mut self, name: &str) -> Result<AgentView> {
        Store::delete_agent(self, name)
    }
    fn create_key(&mut self, req: &NewKey) -> Result<CreatedKey> {
        Store::create_key(self, req)
    }
    fn import_key(&mut self, req: &ImportKey) -> Result<KeyView> {
        Store::import_key(self, req)
    }
    fn import_batch(&mut self, template: &NewKey, lines: &[String], allow_weak: bool, progress: &mut dyn FnMut(usize)) -> Result<Vec<String>> {
        Store::import_batch_with(self, template, lines, allow_weak, progress)
    }
    fn list_keys(&mut self, agent: Option<&str>) -> Result<Vec<KeyView>> {
        Store::list_keys(self, agent)
    }
    fn revoke_key(&mut self, id: &str) -> Result<KeyView> {
        Store::revoke_key(self, id)
    }
    fn rotate_key(&mut self, id: &str, req: &RotateKey) -> Result<Rotated> {
        Store::rotate_key(self, id, req)
    }
    fn status(&mut self) -> Result<StatusView> {
        Store::status(self)
    }
    fn audit(&mut self, limit: u32, filter: &AuditFilter) -> Result<Vec<AuditEntry>> {
        Store::audit_filtered(self, limit, filter)
    }
    fn snapshot(&mut self) -> Result<RawSnapshot> {
        Store::snapshot(self)
    }
    fn usage(&mut self, agent: Option<&str>, since: &str) -> Result<Vec<UsageRow>> {
        let window = parse_duration("since", since)?;
        Store::usage(self, agent, crate::store::now_unix().saturating_sub(window))
    }
    fn create_admin(&mut self, req: &NewAdmin) -> Result<AdminWithToken> {
        Store::create_admin(self, req)
    }
    fn list_admins(&mut self) -> Result<Vec<AdminView>> {
        Store::list_admins(self)
    }
    fn set_admin_enabled(&mut self, name: &str, enabled: bool) -> Result<AdminView> {
        Store::set_admin_enabled(self, name, enabled)
    }
    fn new_admin_token(&mut self, name: &str) -> Result<AdminWithToken> {
        Store::new_admin_token(self, name)
    }
}

/// The admin API over HTTP.
pub struct Remote {
    base: String,
    token: String,
    agent: ureq::Agent,
    /// Whether changes wait for the Envoys (`?wait=false` when not).
    wait: bool,
    /// The `applied` object of the last change's answer.
    last_applied: std::cell::RefCell<Option<Applied>>,
}

use keyward_core::url::encode_component as segment;

impl Remote {
    /// `base` is `http://host:port` or `https://…`; a bare `host:port` means plain HTTP.
    /// HTTPS trusts the system's roots and the PEM certificates in `ca_cert`.
    pub fn new(base: &str, token: String, wait: bool, ca_cert: Option<&std::path::Path>) -> Result<Remote> {
        let base = base.trim().trim_end_matches('/');
        let base = match base.split_once("://") {
            None if !base.is_empty() => format!("http://{base}"),
            Some(("http" | "https", rest)) if !rest.is_empty() => base.to_string(),
            Some((scheme, _)) if scheme != "http" && scheme != "https" => {
                return Err(invalid("url", format!("{base:?}: the admin API speaks http:// or https://, not {scheme}://")));
            }
            _ => return Err(invalid("url", format!("{base:?} is not an address; write e.g. http://127.0.0.1:7070"))),
        };
        let mut agent = ureq::AgentBuilder::new().timeout(std::time::Duration::from_secs(30));
        if base.starts_with("https://") {
            agent = agent.tls_config(crate::tls::client_config(ca_cert).map_err(|e| match e {
                crate::tls::TlsError::File { path, message, .. } => invalid("ca_cert", format!("{path}: {message}")),
                other => Error::Internal(other.to_string()),
            })?);
        }
        let agent = agent.build();
        Ok(Remote { base, token, agent, wait, last_applied: Default::default() })
    }

    fn call<T: DeserializeOwned>(&self, method: &str, path: &str, body: Option<&impl Serialize>) -> Result<T> {
        let changes = method != "GET";
        let mut url = format!("{}{path}", self.base);
        if changes && !self.wait {
            url.push_str(if path.contains('?') { "&wait=false" } else { "?wait=false" });
        }
        let req = self.agent.request(method, &url).set("authorization", &format!("Bearer {}", self.token));
        let resp = match body {
            Some(b) => req.send_json(serde_json::to_value(b).map_err(|e| Error::Internal(e.to_string()))?),
            None => req.call(),
        };
        match resp {
            Ok(r) => {
                let value: serde_json::Value = r.into_json().map_err(|e| Error::Internal(format!("bad response from {}: {e}", self.base)))?;
                if changes {
                    *self.last_applied.borrow_mut() = value.get("applied").and_then(|a| serde_json::from_value(a.clone()).ok());
                }
                serde_json::from_value(value).map_err(|e| Error::Internal(format!("bad response from {}: {e}", self.base)))
            }
            Err(ureq::Error::Status(code, r)) => {
                let body: serde_json::Value = r.into_json().unwrap_or_default();
                Err(Error::from_body(code, &body))
            }
            Err(e) => {
                let hint = if e.to_string().contains("certificate") { " (to trust a private CA, pass --ca-cert FILE)" } else { "" };
                Err(Error::Internal(format!("cannot reach the admin API at {}: {e}{hint}", self.base)))
            }
        }
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call("GET", path, None::<&()>)
    }
}


impl Admin for Remote {
    fn create_agent(&mut self, req: &NewAgent) -> Result<CreatedAgent> {
        self.call("POST", "/v1/agents", Some(req))
    }
    fn list_agents(&mut self) -> Result<Vec<AgentView>> {
        self.get("/v1/agents")
    }
    fn show_agent(&mut self, name: &str) -> Result<AgentDetail> {
        self.get(&format!("/v1/agents/{}", segment(name)))
    }
    fn set_agent_enabled(&mut self, name: &str, enabled: bool, reason: Option<&str>) -> Result<AgentView> {
        if enabled {
            return self.call("POST", &format!("/v1/agents/{}/enable", segment(name)), None::<&()>);
        }
        let body = DisableAgent { reason: reason.map(str::to_string) };
        self.call("POST", &format!("/v1/agents/{}/disable", segment(name)), Some(&body))
    }
    fn update_agent(&mut self, name: &str, req: &AgentUpdate) -> Result<AgentView> {
        self.call("PATCH", &format!("/v1/agents/{}", segment(name)), Some(req))
    }
    fn get_key(&mut self, id: &str) -> Result<KeyView> {
        self.get(&format!("/v1/keys/{}", segment(id)))
    }
    fn update_key(&mut self, id: &str, req: &KeyUpdate) -> Result<KeyView> {
        self.call("PATCH", &format!("/v1/keys/{}", segment(id)), Some(req))
    }
    fn list_scopes(&mut self) -> Result<Vec<ScopeView>> {
        self.get("/v1/scopes")
    }
    fn add_scope(&mut self, req: &NewScope) -> Result<ScopeView> {
        self.call("POST", "/v1/scopes", Some(req))
    }
    fn remove_scope(&mut self, name: &str) -> Result<ScopeView> {
        self.call("DELETE", &format!("/v1/scopes/{}", segment(name)), None::<&()>)
    }
    fn imply_scope(&mut self, name: &str, req: &Imply) -> Result<ScopeView> {
        self.call("POST", &format!("/v1/scopes/{}/implies", segment(name)), Some(req))
    }
    fn applied(&mut self, _wait: bool) -> Result<Option<Applied>> {
        Ok(self.last_applied.borrow_mut().take())
    }
    fn delete_agent(&mut self, name: &str) -> Result<AgentView> {
        self.call("DELETE", &format!("/v1/agents/{}", segment(name)), None::<&()>)
    }
    fn create_key(&mut self, req: &NewKey) -> Result<CreatedKey> {
        self.call("POST", "/v1/keys", Some(req))
    }
    fn import_key(&mut self, req: &ImportKey) -> Result<KeyView> {
        self.call("POST", "/v1/keys/import", Some(req))
    }
    fn import_batch(&mut self, _template: &NewKey, _lines: &[String], _allow_weak: bool, _progress: &mut dyn FnMut(usize)) -> Result<Vec<String>> {
        // A batch can be far larger than an API body; it is a migration step run on the store.
        Err(invalid("request", "--batch works on the database file; run it without --url"))
    }
    fn list_keys(&mut self, agent: Option<&str>) -> Result<Vec<KeyView>> {
        match agent {
            Some(a) => self.get(&format!("/v1/keys?agent={}", segment(a))),
            None => self.get("/v1/keys"),
        }
    }
    fn revoke_key(&mut self, id: &str) -> Result<KeyView> {
        self.call("POST", &format!("/v1/keys/{}/revoke", segment(id)), None::<&()>)
    }
    fn rotate_key(&mut self, id: &str, req: &RotateKey) -> Result<Rotated> {
        self.call("POST", &format!("/v1/keys/{}/rotate", segment(id)), Some(req))
    }
    fn status(&mut self) -> Result<StatusView> {
        self.get("/v1/status")
    }
    fn audit(&mut self, limit: u32, filter: &AuditFilter) -> Result<Vec<AuditEntry>> {
        let mut path = format!("/v1/audit?limit={limit}");
        for (param, value) in [("actor", &filter.actor), ("agent", &filter.agent), ("action", &filter.action)] {
            if let Some(v) = value {
                path.push_str(&format!("&{param}={}", segment(v)));
            }
        }
        self.get(&path)
    }
    fn snapshot(&mut self) -> Result<RawSnapshot> {
        self.get("/v1/snapshot")
    }
    fn usage(&mut self, agent: Option<&str>, since: &str) -> Result<Vec<UsageRow>> {
        let mut path = format!("/v1/usage?since={}", segment(since));
        if let Some(a) = agent {
            path.push_str(&format!("&agent={}", segment(a)));
        }
        self.get(&path)
    }
    fn create_admin(&mut self, req: &NewAdmin) -> Result<AdminWithToken> {
        self.call("POST", "/v1/admins", Some(req))
    }
    fn list_admins(&mut self) -> Result<Vec<AdminView>> {
        self.get("/v1/admins")
    }
    fn set_admin_enabled(&mut self, name: &str, enabled: bool) -> Result<AdminView> {
        let action = if enabled { "enable" } else { "disable" };
        self.call("POST", &format!("/v1/admins/{}/{action}", segment(name)), None::<&()>)
    }
    fn new_admin_token(&mut self, name: &str) -> Result<AdminWithToken> {
        self.call("POST", &format!("/v1/admins/{}/token", segment(name)), None::<&()>)
    }
}

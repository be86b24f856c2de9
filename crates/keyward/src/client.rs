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
    fn set_agent_enabled(&mut self, name: &str, enabled: bool) -> Result<AgentView>;
    fn delete_agent(&mut self, name: &str) -> Result<AgentView>;
    fn create_key(&mut self, req: &NewKey) -> Result<CreatedKey>;
    fn import_key(&mut self, req: &ImportKey) -> Result<KeyView>;
    fn import_batch(&mut self, template: &NewKey, lines: &[String]) -> Result<Vec<String>>;
    fn list_keys(&mut self, agent: Option<&str>) -> Result<Vec<KeyView>>;
    fn revoke_key(&mut self, id: &str) -> Result<KeyView>;
    fn rotate_key(&mut self, id: &str, req: &RotateKey) -> Result<Rotated>;
    fn status(&mut self) -> Result<StatusView>;
    fn audit(&mut self, limit: u32) -> Result<Vec<AuditEntry>>;
    fn snapshot(&mut self) -> Result<RawSnapshot>;
    fn usage(&mut self, agent: Option<&str>, since: &str) -> Result<Vec<UsageRow>>;
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
    fn set_agent_enabled(&mut self, name: &str, enabled: bool) -> Result<AgentView> {
        Store::set_agent_enabled(self, name, enabled)
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
    fn import_batch(&mut self, template: &NewKey, lines: &[String]) -> Result<Vec<String>> {
        Store::import_batch(self, template, lines)
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
    fn audit(&mut self, limit: u32) -> Result<Vec<AuditEntry>> {
        Store::audit(self, limit)
    }
    fn snapshot(&mut self) -> Result<RawSnapshot> {
        Store::snapshot(self)
    }
    fn usage(&mut self, agent: Option<&str>, since: &str) -> Result<Vec<UsageRow>> {
        let window = parse_duration("since", since)?;
        Store::usage(self, agent, crate::store::now_unix().saturating_sub(window))
    }
}

/// The admin API over HTTP.
pub struct Remote {
    base: String,
    token: String,
    agent: ureq::Agent,
}

use keyward_core::url::encode_component as segment;

impl Remote {
    pub fn new(base: &str, token: String) -> Remote {
        let agent = ureq::AgentBuilder::new().timeout(std::time::Duration::from_secs(30)).build();
        Remote { base: base.trim_end_matches('/').to_string(), token, agent }
    }

    fn call<T: DeserializeOwned>(&self, method: &str, path: &str, body: Option<&impl Serialize>) -> Result<T> {
        let req = self
            .agent
            .request(method, &format!("{}{path}", self.base))
            .set("authorization", &format!("Bearer {}", self.token));
        let resp = match body {
            Some(b) => req.send_json(serde_json::to_value(b).map_err(|e| Error::Internal(e.to_string()))?),
            None => req.call(),
        };
        match resp {
            Ok(r) => r.into_json().map_err(|e| Error::Internal(format!("bad response from {}: {e}", self.base))),
            Err(ureq::Error::Status(code, r)) => {
                let body: serde_json::Value = r.into_json().unwrap_or_default();
                Err(Error::from_body(code, &body))
            }
            Err(e) => Err(Error::Internal(format!("cannot reach the admin API at {}: {e}", self.base))),
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
    fn set_agent_enabled(&mut self, name: &str, enabled: bool) -> Result<AgentView> {
        let verb = if enabled { "enable" } else { "disable" };
        self.call("POST", &format!("/v1/agents/{}/{verb}", segment(name)), None::<&()>)
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
    fn import_batch(&mut self, _template: &NewKey, _lines: &[String]) -> Result<Vec<String>> {
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
    fn audit(&mut self, limit: u32) -> Result<Vec<AuditEntry>> {
        self.get(&format!("/v1/audit?limit={limit}"))
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
}

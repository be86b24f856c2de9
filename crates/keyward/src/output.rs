//! Human and `--json` output of CLI results.

use crate::model::*;
use serde::Serialize;

pub struct Output {
    pub json: bool,
}

/// Prints rows as aligned columns under a header.
fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

fn or_dash(v: &Option<String>) -> String {
    v.clone().unwrap_or_else(|| "-".into())
}

const SHOWN_ONCE: &str = "This key is shown once. Store it now: only its SHA-256 digest is kept, so it cannot be recovered.";

impl Output {
    pub fn json_value(&self, v: &impl Serialize) {
        match serde_json::to_string_pretty(v) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("error: cannot serialise output: {e}"),
        }
    }

    pub fn created_agent(&self, c: &CreatedAgent) {
        if self.json {
            return self.json_value(c);
        }
        println!("Created agent {} ({}) with scopes {}.", c.agent.name, c.agent.id, c.agent.scopes.join(" "));
        println!("Created key {} {:?} for agent {}.\n\n  {}\n\n{SHOWN_ONCE}", c.key.id, c.key.name, c.agent.name, c.secret);
    }

    pub fn created_key(&self, c: &CreatedKey) {
        if self.json {
            return self.json_value(c);
        }
        let expires = c.key.expires_at.as_deref().map(|e| format!(", expires {e}")).unwrap_or_default();
        println!("Created key {} {:?} for agent {}{expires}.\n\n  {}\n\n{SHOWN_ONCE}", c.key.id, c.key.name, c.key.agent, c.secret);
    }

    pub fn rotated(&self, r: &Rotated) {
        if self.json {
            return self.json_value(r);
        }
        println!(
            "Rotated key {} {:?} of agent {}: the old key works until {}.\nNew key {}:\n\n  {}\n\n{SHOWN_ONCE}",
            r.old.id,
            r.old.name,
            r.old.agent,
            or_dash(&r.old.expires_at),
            r.new.key.id,
            r.new.secret
        );
    }

    pub fn imported_batch(&self, ids: &[String]) {
        if self.json {
            return self.json_value(&serde_json::json!({"imported": ids.len(), "ids": ids}));
        }
        println!("Imported {} keys in one change.", ids.len());
    }

    pub fn key_changed(&self, what: &str, k: &KeyView) {
        if self.json {
            return self.json_value(k);
        }
        println!("{what} key {} {:?} ({}) of agent {}; status {}.", k.id, k.name, k.masked, k.agent, k.status);
    }

    pub fn agent_changed(&self, what: &str, a: &AgentView) {
        if self.json {
            return self.json_value(a);
        }
        println!("{what} agent {} ({}).", a.name, a.id);
    }

    pub fn agents(&self, agents: &[AgentView]) {
        if self.json {
            return self.json_value(&agents);
        }
        let rows: Vec<Vec<String>> = agents
            .iter()
            .map(|a| {
                vec![
                    a.name.clone(),
                    a.id.clone(),
                    a.scopes.join(" "),
                    if a.enabled { "enabled".into() } else { "disabled".into() },
                    or_dash(&a.rate_limit),
                    a.active_keys.to_string(),
                    a.created_at.clone(),
                ]
            })
            .collect();
        table(&["NAME", "ID", "SCOPES", "ACCESS", "RATE", "ACTIVE KEYS", "CREATED"], &rows);
    }

    pub fn agent_detail(&self, d: &AgentDetail) {
        if self.json {
            return self.json_value(d);
        }
        let a = &d.agent;
        println!("agent:       {} ({})", a.name, a.id);
        println!("description: {}", if a.description.is_empty() { "-" } else { &a.description });
        println!("scopes:      {}", a.scopes.join(" "));
        println!("api access:  {}", if a.enabled { "enabled" } else { "disabled" });
        println!("rate limit:  {}", or_dash(&a.rate_limit));
        println!("created:     {}\n", a.created_at);
        self.keys(&d.keys);
    }

    pub fn keys(&self, keys: &[KeyView]) {
        if self.json {
            return self.json_value(&keys);
        }
        let rows: Vec<Vec<String>> = keys
            .iter()
            .map(|k| {
                vec![
                    k.id.clone(),
                    k.name.clone(),
                    k.masked.clone(),
                    k.agent.clone(),
                    k.scopes.join(" "),
                    k.created_at.clone(),
                    or_dash(&k.expires_at),
                    or_dash(&k.last_used_at),
                    k.status.clone(),
                ]
            })
            .collect();
        table(&["ID", "NAME", "KEY", "AGENT", "SCOPES", "CREATED", "EXPIRES", "LAST USED", "STATUS"], &rows);
    }

    pub fn status(&self, s: &StatusView) {
        if self.json {
            return self.json_value(s);
        }
        println!("snapshot version: {}", s.snapshot_version);
        println!("agents:           {}", s.agents);
        println!("active keys:      {}", s.active_keys);
        if s.envoys.is_empty() {
            println!("envoys:           none seen");
            return;
        }
        println!();
        let rows: Vec<Vec<String>> = s
            .envoys
            .iter()
            .map(|e| vec![e.id.clone(), e.applied_version.to_string(), e.lag.to_string(), e.last_seen.clone(), if e.connected { "yes".into() } else { "no".into() }])
            .collect();
        table(&["ENVOY", "APPLIED", "LAG", "LAST SEEN", "CONNECTED"], &rows);
    }

    pub fn usage(&self, rows: &[UsageRow]) {
        if self.json {
            return self.json_value(&rows);
        }
        let mut table_rows: Vec<Vec<String>> = rows
            .iter()
            .map(|r| vec![r.key_id.clone(), r.key_name.clone(), r.agent.clone(), r.hour.clone(), r.count.to_string()])
            .collect();
        let mut totals: Vec<(String, u64)> = Vec::new();
        for r in rows {
            match totals.iter_mut().find(|(id, _)| *id == r.key_id) {
                Some((_, n)) => *n += r.count,
                None => totals.push((r.key_id.clone(), r.count)),
            }
        }
        for (id, n) in totals {
            table_rows.push(vec![id, "(total)".into(), String::new(), String::new(), n.to_string()]);
        }
        table(&["KEY ID", "NAME", "AGENT", "HOUR", "REQUESTS"], &table_rows);
    }

    pub fn audit(&self, entries: &[AuditEntry]) {
        if self.json {
            return self.json_value(&entries);
        }
        let rows: Vec<Vec<String>> = entries
            .iter()
            .map(|e| vec![e.seq.to_string(), e.at.clone(), e.actor.clone(), e.action.clone(), e.target.clone(), e.version.to_string(), e.details.to_string()])
            .collect();
        table(&["SEQ", "AT", "ACTOR", "ACTION", "TARGET", "VERSION", "DETAILS"], &rows);
    }
}

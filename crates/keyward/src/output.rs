//! Human and `--json` output of CLI results.

use crate::model::*;
use serde::Serialize;

pub struct Output {
    pub json: bool,
    /// How the change being printed reached the Envoys: an `applied` object in `--json`, a
    /// line after the result otherwise.
    pub applied: Option<Applied>,
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

/// `global via Redis redis://h:6379, healthy since T`, or `split across 3 Envoys`, with why.
fn rate_mode(r: &crate::model::RateLimitsView) -> String {
    let envoys = match r.envoys {
        1 => "1 Envoy".to_string(),
        n => format!("{n} Envoys"),
    };
    let since = r.since.as_deref().unwrap_or("-");
    match (&r.store, r.healthy) {
        (Some(store), Some(true)) => format!("global via Redis {store}, healthy since {since} ({envoys} connected)"),
        (Some(store), _) => format!("split across {envoys}: Redis {store} UNREACHABLE since {since}"),
        (None, _) => format!("split across {envoys} (no --rate-store)"),
    }
}

/// `RATE_LIMITED=3 REVOKED_API_KEY=1`, or `-`.
fn denied(d: &std::collections::BTreeMap<String, u64>) -> String {
    if d.is_empty() {
        return "-".into();
    }
    d.iter().map(|(c, n)| format!("{c}={n}")).collect::<Vec<_>>().join(" ")
}

fn or_dash(v: &Option<String>) -> String {
    v.clone().unwrap_or_else(|| "-".into())
}

const SHOWN_ONCE: &str = "This key is shown once. Store it now: only its SHA-256 digest is kept, so it cannot be recovered.";
const TOKEN_SHOWN_ONCE: &str = "This token is shown once. Store it now: only its SHA-256 digest is kept, so it cannot be recovered.";

impl Output {
    pub fn json_value(&self, v: &impl Serialize) {
        let mut value = match serde_json::to_value(v) {
            Ok(v) => v,
            Err(e) => return eprintln!("error: cannot serialise output: {e}"),
        };
        if let (Some(a), Some(obj)) = (&self.applied, value.as_object_mut()) {
            obj.insert("applied".into(), serde_json::to_value(a).unwrap_or_default());
        }
        match serde_json::to_string_pretty(&value) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("error: cannot serialise output: {e}"),
        }
        // A change no Envoy will see is said on stderr even in --json.
        if let Some(a) = self.applied.as_ref().filter(|a| !a.serving) {
            eprintln!("{}", crate::applied::summary(a).1);
        }
    }

    /// After a change's human output: whether every Envoy has it.
    fn reach(&self) {
        if let Some(a) = &self.applied {
            match crate::applied::summary(a) {
                (true, line) => println!("{line}"),
                (false, line) => eprintln!("{line}"),
            }
        }
    }

    pub fn key(&self, k: &KeyView) {
        if self.json {
            return self.json_value(k);
        }
        println!("key:          {} ({})", k.id, k.masked);
        println!("name:         {}", k.name);
        println!("agent:        {}", k.agent);
        println!("scopes:       {}{}", k.scopes.join(" "), if k.own_scopes.is_none() { " (the agent's)" } else { "" });
        println!("paths:        {}", if k.path_prefixes.is_empty() { "any".to_string() } else { k.path_prefixes.join(" ") });
        println!("rate limit:   {}{}", or_dash(&k.rate_limit), k.burst.map(|b| format!(", burst {b}")).unwrap_or_default());
        println!("created:      {}", k.created_at);
        println!("expires:      {}", k.expires_at.as_deref().unwrap_or("never"));
        println!("last used:    {}", or_dash(&k.last_used_at));
        println!("status:       {}", k.status);
    }

    pub fn scopes(&self, scopes: &[ScopeView]) {
        if self.json {
            return self.json_value(&scopes);
        }
        let rows: Vec<Vec<String>> = scopes
            .iter()
            .map(|s| vec![s.name.clone(), s.implies.join(" "), s.agents.to_string(), s.keys.to_string(), s.description.clone()])
            .collect();
        table(&["SCOPE", "IMPLIES", "AGENTS", "KEYS", "DESCRIPTION"], &rows);
    }

    pub fn scope_changed(&self, what: &str, s: &ScopeView) {
        if self.json {
            return self.json_value(s);
        }
        let implies = if s.implies.is_empty() { String::new() } else { format!("; implies {}", s.implies.join(" ")) };
        println!("{what} scope {}{implies}.", s.name);
        self.reach();
    }

    pub fn created_agent(&self, c: &CreatedAgent) {
        if self.json {
            return self.json_value(c);
        }
        println!("Created agent {} ({}) with scopes {}.", c.agent.name, c.agent.id, c.agent.scopes.join(" "));
        println!("Created key {} {:?} for agent {}.\n\n  {}\n\n{SHOWN_ONCE}", c.key.id, c.key.name, c.agent.name, c.secret);
        self.reach();
    }

    pub fn created_key(&self, c: &CreatedKey) {
        if self.json {
            return self.json_value(c);
        }
        let expires = c.key.expires_at.as_deref().map(|e| format!(", expires {e}")).unwrap_or_default();
        println!("Created key {} {:?} for agent {}{expires}.\n\n  {}\n\n{SHOWN_ONCE}", c.key.id, c.key.name, c.key.agent, c.secret);
        self.reach();
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
        self.reach();
    }

    pub fn imported_batch(&self, ids: &[String]) {
        if self.json {
            return self.json_value(&serde_json::json!({"imported": ids.len(), "ids": ids}));
        }
        println!("Imported {} keys in one change.", ids.len());
        self.reach();
    }

    pub fn key_changed(&self, what: &str, k: &KeyView) {
        if self.json {
            return self.json_value(k);
        }
        println!("{what} key {} {:?} ({}) of agent {}; status {}.", k.id, k.name, k.masked, k.agent, k.status);
        self.reach();
    }

    pub fn agent_changed(&self, what: &str, a: &AgentView) {
        if self.json {
            return self.json_value(a);
        }
        match (&a.disabled_reason, a.enabled) {
            (Some(reason), false) => println!("{what} agent {} ({}): API users see {reason:?}.", a.name, a.id),
            _ => println!("{what} agent {} ({}).", a.name, a.id),
        }
        self.reach();
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
                    or_dash(&a.last_used_at),
                    a.created_at.clone(),
                ]
            })
            .collect();
        table(&["NAME", "ID", "SCOPES", "ACCESS", "RATE", "ACTIVE KEYS", "LAST USED", "CREATED"], &rows);
    }

    pub fn agent_detail(&self, d: &AgentDetail) {
        if self.json {
            return self.json_value(d);
        }
        let a = &d.agent;
        println!("agent:       {} ({})", a.name, a.id);
        println!("description: {}", if a.description.is_empty() { "-" } else { &a.description });
        println!("scopes:      {}", a.scopes.join(" "));
        match (&a.enabled, &a.disabled_reason) {
            (true, _) => println!("api access:  enabled"),
            (false, Some(r)) => println!("api access:  disabled ({r})"),
            (false, None) => println!("api access:  disabled"),
        }
        println!("rate limit:  {}{}", or_dash(&a.rate_limit), a.burst.map(|b| format!(", burst {b}")).unwrap_or_default());
        println!("last used:   {}", or_dash(&a.last_used_at));
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
        if !s.serving {
            println!("control plane:    NOT SERVING: no `keyward serve` runs on this store, so no Envoy is connected");
        }
        if !s.engine.is_empty() {
            println!("store engine:     {}", s.engine);
        }
        if !s.replicas.is_empty() {
            let names: Vec<&str> = s.replicas.iter().map(|r| r.name.as_str()).collect();
            println!("replicas:         {}", names.join(", "));
        }
        if let Some(r) = &s.rate_limits {
            println!("rate limits:      {}", rate_mode(r));
        }
        if s.envoys.is_empty() {
            println!("envoys:           none seen");
        } else {
            println!();
            let rows: Vec<Vec<String>> = s
                .envoys
                .iter()
                .map(|e| {
                    let state = match e.state.as_str() {
                        "lagging" => format!("LAGGING by {}", e.lag),
                        "stale" => "STALE (not heard from)".into(),
                        other => other.into(),
                    };
                    let replica = e.replica.clone().unwrap_or_else(|| "-".into());
                    vec![e.id.clone(), e.shell.clone(), replica, e.applied_version.to_string(), e.lag.to_string(), e.last_seen.clone(), state]
                })
                .collect();
            table(&["ENVOY", "SHELL", "REPLICA", "APPLIED", "LAG", "LAST SEEN", "STATE"], &rows);
            println!("\nAn Envoy is connected while its feed request is open, or until 2 s after its last answer.");
        }
        if let Some(r) = s.rate_limits.as_ref().filter(|r| !r.hot.is_empty()) {
            println!();
            let rows: Vec<Vec<String>> = r
                .hot
                .iter()
                .map(|h| {
                    let share = (h.used.saturating_mul(100)) / u64::from(h.count.max(1));
                    vec![h.bucket.clone(), h.used.to_string(), crate::rates::limit_text(h.count, h.period_secs), format!("{share}%")]
                })
                .collect();
            table(&["HOT BUCKET", "USED IN WINDOW", "LIMIT", "OF LIMIT"], &rows);
            println!("\nFleet-wide requests admitted in each bucket's current window, as the rate store last counted them.");
        }
    }

    pub fn usage(&self, rows: &[UsageRow]) {
        if self.json {
            return self.json_value(&rows);
        }
        let mut table_rows: Vec<Vec<String>> = rows
            .iter()
            .map(|r| vec![r.key_id.clone(), r.key_name.clone(), r.agent.clone(), r.hour.clone(), r.count.to_string(), denied(&r.denied)])
            .collect();
        let mut totals: Vec<(String, u64, std::collections::BTreeMap<String, u64>)> = Vec::new();
        for r in rows {
            let i = match totals.iter().position(|(id, _, _)| *id == r.key_id) {
                Some(i) => i,
                None => {
                    totals.push((r.key_id.clone(), 0, Default::default()));
                    totals.len() - 1
                }
            };
            if let Some((_, n, d)) = totals.get_mut(i) {
                *n += r.count;
                for (code, c) in &r.denied {
                    *d.entry(code.clone()).or_default() += c;
                }
            }
        }
        for (id, n, d) in totals {
            table_rows.push(vec![id, "(total)".into(), String::new(), String::new(), n.to_string(), denied(&d)]);
        }
        table(&["KEY ID", "NAME", "AGENT", "HOUR", "ALLOWED", "DENIED"], &table_rows);
    }

    /// `admin create` and `admin token`: the personal token, once, and where it works.
    pub fn admin_token(&self, what: &str, a: &AdminWithToken) {
        if self.json {
            return self.json_value(a);
        }
        let role = a.admin.role.as_str();
        match what {
            "Created" => println!("Created admin {} ({role}).", a.admin.name),
            _ => println!("New token for admin {} ({role}): the old one, and the console sessions it signed in, no longer work.", a.admin.name),
        }
        println!("\n  {}\n\n{TOKEN_SHOWN_ONCE}", a.token);
        println!("Use it as the admin token: `keyward --url URL --token TOKEN …` (or KEYWARD_ADMIN_TOKEN),");
        println!("`Authorization: Bearer TOKEN` on the admin API, or sign in to the console at /console.");
        println!("The audit log names {} for what it changes.", a.admin.name);
    }

    pub fn admin_changed(&self, what: &str, a: &AdminView) {
        if self.json {
            return self.json_value(a);
        }
        match a.disabled_at {
            Some(_) => println!("{what} admin {} ({}): its token and console sessions no longer work.", a.name, a.role.as_str()),
            None => println!("{what} admin {} ({}): its token works again.", a.name, a.role.as_str()),
        }
    }

    pub fn admins(&self, admins: &[AdminView]) {
        if self.json {
            return self.json_value(&admins);
        }
        let rows: Vec<Vec<String>> = admins
            .iter()
            .map(|a| vec![a.name.clone(), a.role.as_str().into(), a.status.clone(), a.created_at.clone(), a.token_issued_at.clone(), or_dash(&a.disabled_at)])
            .collect();
        table(&["NAME", "ROLE", "STATUS", "CREATED", "TOKEN ISSUED", "DISABLED"], &rows);
        println!("\nThe bootstrap admin token (`keyward admin-token rotate`) is an owner too, named `api` in the audit log.");
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

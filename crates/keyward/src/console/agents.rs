//! The API-keys pages: the agents table, creating an agent, and an agent's tabs (Manage keys,
//! Capabilities, Usage, Settings), with the key forms: generate, edit, rotate, revoke.

use super::layout::{badge, confirm, csrf, may, when, Nav};
use super::{done, failed, render, Form, Session, Shown};
use crate::api::{change, with_store, AppState};
use crate::error::{Error, Result};
use crate::model::*;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use maud::{html, Markup};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;

type St = State<Arc<AppState>>;
type Ses = Extension<Session>;

/// Agents per page of the table.
const PAGE: usize = 50;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/console/agents", get(home).post(create))
        .route("/console/agents/new", get(new_agent))
        .route("/console/agents/{name}", get(keys_tab))
        .route("/console/agents/{name}/capabilities", get(capabilities_tab).post(save_capabilities))
        .route("/console/agents/{name}/usage", get(usage_tab))
        .route("/console/agents/{name}/settings", get(settings_tab))
        .route("/console/agents/{name}/details", post(save_details))
        .route("/console/agents/{name}/access", post(set_access))
        .route("/console/agents/{name}/delete", post(delete))
        .route("/console/agents/{name}/keys/new", get(new_key))
        .route("/console/agents/{name}/keys", post(generate))
        .route("/console/agents/{name}/revoke", post(bulk_revoke))
        .route("/console/keys/{id}/edit", get(edit_key).post(save_key))
        .route("/console/keys/{id}/rotate", get(rotate_page).post(rotate))
        .route("/console/keys/{id}/revoke", get(revoke_page).post(revoke))
}

/// A path segment, percent-encoded (agent names may hold spaces).
pub use keyward_core::url::encode_component as seg;

fn agent_url(name: &str) -> String {
    format!("/console/agents/{}", seg(name))
}

fn scopes_list(scopes: &[String]) -> Markup {
    html! {
        ul.chips {
            @for s in scopes { li { code { (s) } } }
        }
    }
}

/// An error answered as a page of its own (the agent or key does not exist, the store fails).
fn problem(state: &AppState, session: &Session, e: &Error) -> Response {
    let status = axum::http::StatusCode::from_u16(e.status()).unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR);
    let body = html! {
        h1 { "Not available" }
        p.notice.bad role="alert" { (e.message_with_field()) }
        p { a href="/console/agents" { "Back to API keys" } }
    };
    (status, render(state, session, "Not available", Nav::Agents, body)).into_response()
}

#[derive(Debug, Default, Deserialize)]
struct HomeQuery {
    q: Option<String>,
    access: Option<String>,
    page: Option<usize>,
}

/// API keys home: the agents, searchable and filterable.
async fn home(State(state): St, Extension(session): Ses, q: Result<Query<HomeQuery>, axum::extract::rejection::QueryRejection>) -> Response {
    let q = q.map(|q| q.0).unwrap_or_default();
    let agents = match with_store(&state, "console.agents", |s| s.list_agents()).await {
        Ok(a) => a,
        Err(e) => return problem(&state, &session, &e),
    };
    let needle = q.q.clone().unwrap_or_default().to_lowercase();
    let access = q.access.clone().unwrap_or_else(|| "all".into());
    let matching: Vec<&AgentView> = agents
        .iter()
        .filter(|a| {
            needle.is_empty()
                || a.name.to_lowercase().contains(&needle)
                || a.description.to_lowercase().contains(&needle)
                || a.scopes.iter().any(|s| s.to_lowercase().contains(&needle))
        })
        .filter(|a| match access.as_str() {
            "on" => a.enabled,
            "off" => !a.enabled,
            _ => true,
        })
        .collect();
    let pages = matching.len().div_ceil(PAGE).max(1);
    let page = q.page.unwrap_or(1).clamp(1, pages);
    let shown = matching.iter().skip((page - 1) * PAGE).take(PAGE);
    let link = |p: usize| {
        let mut qs = form_urlencoded::Serializer::new(String::new());
        if !needle.is_empty() {
            qs.append_pair("q", q.q.as_deref().unwrap_or_default());
        }
        if access != "all" {
            qs.append_pair("access", &access);
        }
        qs.append_pair("page", &p.to_string());
        format!("/console/agents?{}", qs.finish())
    };
    let body = html! {
        div.titlebar {
            h1 { "API keys" }
            @if may(&session, Permission::ManageKeys) {
                a.button.primary href="/console/agents/new" { "Create agent" }
            }
        }
        p.muted { "Each agent carries scopes; its keys share them, or narrow them. Open an agent to manage its keys." }
        form.filters method="get" action="/console/agents" role="search" {
            div.field {
                label for="q" { "Search" }
                input id="q" name="q" type="search" value=[q.q.as_deref()] placeholder="Name, description or scope";
            }
            div.field {
                label for="access" { "API access" }
                select id="access" name="access" {
                    @for (v, l) in [("all", "All"), ("on", "On"), ("off", "Off")] {
                        option value=(v) selected[access == v] { (l) }
                    }
                }
            }
            button.secondary type="submit" { "Filter" }
        }
        p.muted { (matching.len()) " of " (agents.len()) " agents" }
        div.scroll {
            table {
                thead {
                    tr {
                        th scope="col" { "Name" }
                        th scope="col" { "Description" }
                        th scope="col" { "Scopes" }
                        th scope="col" { "API access" }
                        th scope="col" { "Rate limit" }
                        th scope="col" class="num" { "Active keys" }
                        th scope="col" { "Last used" }
                    }
                }
                tbody {
                    @for a in shown {
                        tr {
                            td.nowrap { a href=(agent_url(&a.name)) { (a.name) } }
                            td { (a.description) }
                            td { (scopes_list(&a.scopes)) }
                            td { (badge(if a.enabled { "on" } else { "off" })) }
                            td { (a.rate_limit.as_deref().unwrap_or("—")) }
                            td.num { (a.active_keys) }
                            td { (when(a.last_used_at.as_deref())) }
                        }
                    }
                    @if matching.is_empty() {
                        tr { td colspan="7" { "No agents match." } }
                    }
                }
            }
        }
        @if pages > 1 {
            nav.pager aria-label="Pages" {
                @if page > 1 { a href=(link(page - 1)) rel="prev" { "← Previous" } }
                span { "Page " (page) " of " (pages) }
                @if page < pages { a href=(link(page + 1)) rel="next" { "Next →" } }
            }
        }
    };
    render(&state, &session, "API keys", Nav::Agents, body)
}

/// The catalogue's scopes as toggles; `on` are checked; `implied` names what implies each.
fn scope_toggles(catalogue: &[ScopeView], on: &[String], only: Option<&[String]>) -> Markup {
    // What each checked scope implies, to show as implied.
    let mut implied_by: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for s in catalogue.iter().filter(|s| on.contains(&s.name)) {
        for i in &s.implies {
            implied_by.entry(i.as_str()).or_default().push(s.name.as_str());
        }
    }
    html! {
        fieldset.toggles {
            legend { "Capabilities" }
            @for (i, s) in catalogue.iter().filter(|s| only.is_none_or(|o| o.contains(&s.name))).enumerate() {
                div.toggle {
                    input type="checkbox" role="switch" id=(format!("scope-{i}")) name="scopes" value=(s.name) checked[on.contains(&s.name)];
                    label for=(format!("scope-{i}")) {
                        code { (s.name) }
                        span.desc { (s.description) }
                        @if !s.implies.is_empty() {
                            span.implied { "Implies " (s.implies.join(", ")) }
                        }
                        @if let Some(by) = implied_by.get(s.name.as_str()) {
                            span.implied { "Implied by " (by.join(", ")) }
                        }
                    }
                }
            }
        }
    }
}

async fn catalogue(state: &Arc<AppState>) -> Result<Vec<ScopeView>> {
    with_store(state, "console.scopes", |s| s.list_scopes()).await
}

fn agent_form(session: &Session, catalogue: &[ScopeView], values: &Form, error: Option<&str>) -> Markup {
    let chosen = values.all("scopes");
    html! {
        h1 { "Create agent" }
        p.muted { "An agent is one integration or customer. It gets a key named Production at once; you can add more keys later." }
        @if let Some(e) = error { p.notice.bad role="alert" { (e) } }
        form.card method="post" action="/console/agents" {
            (csrf(session))
            div.field {
                label for="name" { "Name" }
                input id="name" name="name" required maxlength="64" value=[values.get("name")] autocomplete="off";
                p.hint { "Letters, digits, spaces, '.', '_' and '-'." }
            }
            div.field {
                label for="description" { "Description" }
                input id="description" name="description" value=[values.get("description")] autocomplete="off";
                p.hint { "A short note so you can recognize what the agent is for." }
            }
            (scope_toggles(catalogue, &chosen, None))
            div.field {
                label for="rate" { "Rate limit (optional)" }
                input id="rate" name="rate" value=[values.get("rate")] placeholder="e.g. 100/min" autocomplete="off";
                p.hint { "N/s, N/min, N/h or N/day, shared by the agent's keys unless a key has its own." }
            }
            div.actions {
                button.primary type="submit" { "Create agent" }
                a.button.secondary href="/console/agents" { "Cancel" }
            }
        }
    }
}

async fn new_agent(State(state): St, Extension(session): Ses) -> Response {
    if !may(&session, Permission::ManageKeys) {
        return super::refused(&session, &session.actor.role.refusal(Permission::ManageKeys));
    }
    match catalogue(&state).await {
        Ok(c) => render(&state, &session, "Create agent", Nav::Agents, agent_form(&session, &c, &Form(Vec::new()), None)),
        Err(e) => problem(&state, &session, &e),
    }
}

async fn create(State(state): St, Extension(session): Ses, body: Bytes) -> Response {
    let form = match Form::parse(&session, &body) {
        Ok(f) => f,
        Err(r) => return *r,
    };
    let req = NewAgent {
        name: form.get("name").unwrap_or_default(),
        scopes: form.all("scopes"),
        rate: form.get("rate"),
        burst: None,
        description: form.get("description"),
    };
    match change(&state, "create_agent", true, move |s| s.create_agent(&req)).await {
        Ok((created, applied)) => {
            let back = agent_url(&created.agent.name);
            let reach = applied.as_ref().map(|a| crate::applied::summary(a).1);
            super::show_once(
                &state,
                &session,
                Shown {
                    secret: created.secret,
                    what: format!("Agent \"{}\" is created, with its Production key.", created.agent.name),
                    key: Some(created.key),
                    back,
                    note: reach,
                },
            )
        }
        Err(e) => {
            let c = catalogue(&state).await.unwrap_or_default();
            let page = agent_form(&session, &c, &form, Some(&e.message_with_field()));
            let status = axum::http::StatusCode::from_u16(e.status()).unwrap_or(axum::http::StatusCode::BAD_REQUEST);
            (status, render(&state, &session, "Create agent", Nav::Agents, page)).into_response()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tab {
    Keys,
    Capabilities,
    Usage,
    Settings,
}

/// The agent's header and tabs around a tab's body.
fn agent_frame(a: &AgentView, tab: Tab, inner: Markup) -> Markup {
    let url = agent_url(&a.name);
    let tabs = [
        (Tab::Keys, url.clone(), "Manage keys"),
        (Tab::Capabilities, format!("{url}/capabilities"), "Capabilities"),
        (Tab::Usage, format!("{url}/usage"), "Usage"),
        (Tab::Settings, format!("{url}/settings"), "Settings"),
    ];
    html! {
        p.crumbs { a href="/console/agents" { "API keys" } " / " (a.name) }
        div.titlebar {
            div {
                h1 { (a.name) " " (badge(if a.enabled { "enabled" } else { "disabled" })) }
                @if !a.description.is_empty() { p.muted { (a.description) } }
                @if let Some(r) = &a.disabled_reason { p.notice.warn { "API access is off: " (r) } }
            }
        }
        nav.tabs aria-label="Agent" {
            ul {
                @for (t, href, label) in &tabs {
                    li { a href=(href) aria-current=[(*t == tab).then_some("page")] { (label) } }
                }
            }
        }
        section.tabbody { (inner) }
    }
}

async fn detail(state: &Arc<AppState>, name: String) -> Result<AgentDetail> {
    with_store(state, "console.agent", move |s| s.show_agent(&name)).await
}

#[derive(Debug, Default, Deserialize)]
struct PageQuery {
    page: Option<usize>,
}

/// Keys per page of an agent's table.
const KEYS_PAGE: usize = 100;

async fn keys_tab(State(state): St, Extension(session): Ses, Path(name): Path<String>, q: Result<Query<PageQuery>, axum::extract::rejection::QueryRejection>) -> Response {
    let d = match detail(&state, name).await {
        Ok(d) => d,
        Err(e) => return problem(&state, &session, &e),
    };
    let edit = may(&session, Permission::ManageKeys);
    let url = agent_url(&d.agent.name);
    let pages = d.keys.len().div_ceil(KEYS_PAGE).max(1);
    let page = q.ok().and_then(|q| q.0.page).unwrap_or(1).clamp(1, pages);
    // Usable keys first, newest first within each status.
    let rank = |status: &str| match status {
        "active" => 0,
        "expiring" => 1,
        "expired" => 2,
        _ => 3,
    };
    let mut sorted: Vec<&KeyView> = d.keys.iter().collect();
    sorted.sort_by(|a, b| rank(&a.status).cmp(&rank(&b.status)).then_with(|| b.created_at.cmp(&a.created_at)).then_with(|| a.id.cmp(&b.id)));
    let masked: BTreeMap<&str, &str> = d.keys.iter().map(|k| (k.id.as_str(), k.masked.as_str())).collect();
    let keys: Vec<&KeyView> = sorted.into_iter().skip((page - 1) * KEYS_PAGE).take(KEYS_PAGE).collect();
    let inner = html! {
        div.titlebar {
            h2 { "Keys" }
            @if edit { a.button.primary href=(format!("{url}/keys/new")) { "Generate a new key" } }
        }
        p.muted { "Keys are shown masked: a prefix and the last four characters. The full key was shown once, when it was made." }
        form method="post" action=(format!("{url}/revoke")) {
            (csrf(&session))
            div.scroll {
                table {
                    thead {
                        tr {
                            @if edit { th scope="col" { input type="checkbox" id="select-all" data-select-all="key" aria-label="Select all keys"; } }
                            th scope="col" { "Name" }
                            th scope="col" { "Key" }
                            th scope="col" { "Scopes" }
                            th scope="col" { "Created" }
                            th scope="col" { "Expires" }
                            th scope="col" { "Last used" }
                            th scope="col" { "Status" }
                            @if edit { th scope="col" { "Actions" } }
                        }
                    }
                    tbody {
                        @for k in &keys {
                            tr {
                                @if edit {
                                    td { input type="checkbox" name="key" value=(k.id) aria-label=(format!("Select key {}", k.name)) disabled[k.status == "revoked"]; }
                                }
                                td {
                                    (k.name)
                                    @if let Some(to) = k.rotated_to.as_deref() {
                                        span.sub { "rotated; replaced by " code.nowrap { (masked.get(to).copied().unwrap_or(to)) } }
                                    }
                                    @if let Some(from) = k.rotated_from.as_deref() {
                                        span.sub { "replaces " code.nowrap { (masked.get(from).copied().unwrap_or(from)) } }
                                    }
                                }
                                td { code.nowrap { (k.masked) } }
                                td { (scopes_list(&k.scopes)) }
                                td { (when(Some(&k.created_at))) }
                                td { (when(k.expires_at.as_deref())) }
                                td { (when(k.last_used_at.as_deref())) }
                                td { (badge(&k.status)) }
                                @if edit {
                                    td.actions {
                                        // An expired key, or the old key of a rotation, stays as it ended.
                                        @if matches!(k.status.as_str(), "active" | "expiring") && k.rotated_to.is_none() {
                                            a href=(format!("/console/keys/{}/edit", seg(&k.id))) { "Edit" }
                                            a href=(format!("/console/keys/{}/rotate", seg(&k.id))) { "Rotate" }
                                        }
                                        @if k.status != "revoked" {
                                            a.dangerlink href=(format!("/console/keys/{}/revoke", seg(&k.id))) { "Revoke" }
                                        }
                                    }
                                }
                            }
                        }
                        @if d.keys.is_empty() {
                            tr { td colspan="9" { "This agent has no keys." } }
                        }
                    }
                }
            }
            @if edit && !d.keys.is_empty() {
                div.actions { button.danger type="submit" { "Revoke selected…" } }
            }
        }
        @if pages > 1 {
            nav.pager aria-label="Pages of keys" {
                @if page > 1 { a href=(format!("{url}?page={}", page - 1)) rel="prev" { "← Previous" } }
                span { "Keys " ((page - 1) * KEYS_PAGE + 1) "–" ((page - 1) * KEYS_PAGE + keys.len()) " of " (d.keys.len()) }
                @if page < pages { a href=(format!("{url}?page={}", page + 1)) rel="next" { "Next →" } }
            }
        }
    };
    render(&state, &session, &d.agent.name.clone(), Nav::Agents, agent_frame(&d.agent, Tab::Keys, inner))
}

async fn capabilities_tab(State(state): St, Extension(session): Ses, Path(name): Path<String>) -> Response {
    let (d, c) = match (detail(&state, name).await, catalogue(&state).await) {
        (Ok(d), Ok(c)) => (d, c),
        (Err(e), _) | (_, Err(e)) => return problem(&state, &session, &e),
    };
    let url = agent_url(&d.agent.name);
    let inner = html! {
        p.muted { "Toggle what this agent's keys may do. A key that names its own scopes keeps only those the agent still has; the change reaches every Envoy at once." }
        @if may(&session, Permission::ManageKeys) {
            form.card method="post" action=(format!("{url}/capabilities")) {
                (csrf(&session))
                (scope_toggles(&c, &d.agent.scopes, None))
                div.actions { button.primary type="submit" { "Save capabilities" } }
            }
        } @else {
            div.card { (scopes_list(&d.agent.scopes)) }
        }
    };
    render(&state, &session, &d.agent.name.clone(), Nav::Agents, agent_frame(&d.agent, Tab::Capabilities, inner))
}

async fn save_capabilities(State(state): St, Extension(session): Ses, Path(name): Path<String>, body: Bytes) -> Response {
    let form = match Form::parse(&session, &body) {
        Ok(f) => f,
        Err(r) => return *r,
    };
    let back = format!("{}/capabilities", agent_url(&name));
    let upd = AgentUpdate { scopes: Some(form.all("scopes")), ..AgentUpdate::default() };
    match change(&state, "update_agent", true, move |s| s.update_agent(&name, &upd)).await {
        Ok((a, applied)) => done(&state, &session, format!("Capabilities saved: {}.", a.scopes.join(", ")), applied.as_ref(), &back),
        Err(e) => failed(&state, &session, &e, &back),
    }
}

#[derive(Debug, Default, Deserialize)]
struct UsageQuery {
    range: Option<String>,
    key: Option<String>,
}

async fn usage_tab(State(state): St, Extension(session): Ses, Path(name): Path<String>, q: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>) -> Response {
    let q = q.map(|q| q.0).unwrap_or_default();
    let week = q.range.as_deref() == Some("7d");
    let hours: i64 = if week { 7 * 24 } else { 24 };
    let now = crate::store::now_unix();
    let since = now - now.rem_euclid(3600) - (hours - 1) * 3600;
    let n = name.clone();
    let rows = with_store(&state, "console.usage", move |s| s.usage(Some(&n), since)).await;
    let (d, rows) = match (detail(&state, name).await, rows) {
        (Ok(d), Ok(r)) => (d, r),
        (Err(e), _) | (_, Err(e)) => return problem(&state, &session, &e),
    };
    let key = q.key.filter(|k| d.keys.iter().any(|x| &x.id == k));
    let rows: Vec<&UsageRow> = rows.iter().filter(|r| key.as_ref().is_none_or(|k| &r.key_id == k)).collect();
    let series = super::chart::hourly(&rows, since, hours);
    let url = agent_url(&d.agent.name);
    // Per key, over the range: allowed, and refused by code.
    let masked: BTreeMap<&str, &str> = d.keys.iter().map(|k| (k.id.as_str(), k.masked.as_str())).collect();
    let mut per_key: BTreeMap<(String, String), (u64, BTreeMap<String, u64>)> = BTreeMap::new();
    for r in &rows {
        let e = per_key.entry((r.key_name.clone(), r.key_id.clone())).or_default();
        e.0 += r.count;
        for (code, n) in &r.denied {
            *e.1.entry(code.clone()).or_default() += n;
        }
    }
    let inner = html! {
        form.filters method="get" action=(format!("{url}/usage")) {
            div.field {
                label for="range" { "Range" }
                select id="range" name="range" {
                    option value="24h" selected[!week] { "Last 24 hours" }
                    option value="7d" selected[week] { "Last 7 days" }
                }
            }
            div.field {
                label for="key" { "Key" }
                select id="key" name="key" {
                    option value="" { "All keys" }
                    @for k in &d.keys {
                        option value=(k.id) selected[key.as_deref() == Some(k.id.as_str())] { (k.name) " (" (k.masked) ")" }
                    }
                }
            }
            button.secondary type="submit" { "Show" }
        }
        figure.chart {
            (super::chart::svg(&series, if week { "Requests per hour (UTC), last 7 days" } else { "Requests per hour (UTC), last 24 hours" }))
            figcaption {
                span.legend.allowed { "Allowed" } " "
                span.legend.denied { "Refused" }
                " · Counts arrive from the Envoys every few seconds."
            }
        }
        h3 { "By key" }
        div.scroll {
            table {
                thead { tr { th scope="col" { "Key" } th scope="col" class="num" { "Allowed" } th scope="col" { "Refused, by code" } } }
                tbody {
                    @for ((kname, kid), (allowed, denied)) in &per_key {
                        tr {
                            td { (kname) " " code.nowrap { (masked.get(kid.as_str()).copied().unwrap_or("")) } }
                            td.num { (allowed) }
                            td {
                                @if denied.is_empty() { span.muted { "none" } }
                                @for (code, n) in denied { code { (code) } " " (n) " " }
                            }
                        }
                    }
                    @if per_key.is_empty() { tr { td colspan="3" { "No requests in this range." } } }
                }
            }
        }
    };
    render(&state, &session, &d.agent.name.clone(), Nav::Agents, agent_frame(&d.agent, Tab::Usage, inner))
}

async fn settings_tab(State(state): St, Extension(session): Ses, Path(name): Path<String>) -> Response {
    let d = match detail(&state, name).await {
        Ok(d) => d,
        Err(e) => return problem(&state, &session, &e),
    };
    let a = &d.agent;
    let url = agent_url(&a.name);
    let edit = may(&session, Permission::ManageKeys);
    let inner = html! {
        h2 { "Details" }
        form.card method="post" action=(format!("{url}/details")) {
            (csrf(&session))
            div.field {
                label for="description" { "Description" }
                input id="description" name="description" value=(a.description) disabled[!edit] autocomplete="off";
            }
            div.field {
                label for="rate" { "Rate limit" }
                input id="rate" name="rate" value=[a.rate_limit.as_deref()] placeholder="none" disabled[!edit] autocomplete="off";
                p.hint { "N/s, N/min, N/h or N/day; empty for none." }
            }
            @if edit { div.actions { button.primary type="submit" { "Save details" } } }
        }
        h2 { "API access" }
        div.card {
            @if a.enabled {
                p { "API access is " strong { "on" } ". Turning it off refuses every key of this agent with 403 " code { "ACCESS_DISABLED" } " and the reason you give, until you turn it on again." }
                @if edit {
                    form method="post" action=(format!("{url}/access")) {
                        (csrf(&session))
                        input type="hidden" name="enabled" value="false";
                        div.field {
                            label for="reason" { "Reason (shown to the API's callers)" }
                            input id="reason" name="reason" placeholder="e.g. Your plan does not include API access" autocomplete="off";
                        }
                        div.actions { button.danger type="submit" { "Disable API access" } }
                    }
                }
            } @else {
                p { "API access is " strong { "off" } @if let Some(r) = &a.disabled_reason { ": " (r) } }
                @if edit {
                    form method="post" action=(format!("{url}/access")) {
                        (csrf(&session))
                        input type="hidden" name="enabled" value="true";
                        button.primary type="submit" { "Enable API access" }
                    }
                }
            }
        }
        @if edit {
            h2 { "Delete agent" }
            form.card.dangerzone method="post" action=(format!("{url}/delete")) {
                (csrf(&session))
                p { "Deleting the agent revokes all of its keys at once. This cannot be undone." }
                div.field {
                    label for="confirm-name" { "Type the agent's name, " strong { (a.name) } ", to confirm" }
                    input id="confirm-name" name="confirm_name" autocomplete="off" required;
                }
                div.actions { button.danger type="submit" { "Delete agent" } }
            }
        }
    };
    render(&state, &session, &a.name.clone(), Nav::Agents, agent_frame(a, Tab::Settings, inner))
}

async fn save_details(State(state): St, Extension(session): Ses, Path(name): Path<String>, body: Bytes) -> Response {
    let form = match Form::parse(&session, &body) {
        Ok(f) => f,
        Err(r) => return *r,
    };
    let back = format!("{}/settings", agent_url(&name));
    let upd = AgentUpdate {
        description: Some(form.get("description").unwrap_or_default()),
        rate: Some(form.get("rate")),
        ..AgentUpdate::default()
    };
    match change(&state, "update_agent", true, move |s| s.update_agent(&name, &upd)).await {
        Ok((_, applied)) => done(&state, &session, "Details saved.".into(), applied.as_ref(), &back),
        Err(e) => failed(&state, &session, &e, &back),
    }
}

async fn set_access(State(state): St, Extension(session): Ses, Path(name): Path<String>, body: Bytes) -> Response {
    let form = match Form::parse(&session, &body) {
        Ok(f) => f,
        Err(r) => return *r,
    };
    let back = format!("{}/settings", agent_url(&name));
    let enabled = form.get("enabled").as_deref() == Some("true");
    let reason = form.get("reason");
    match change(&state, "set_agent_enabled", true, move |s| s.set_agent_enabled(&name, enabled, reason.as_deref())).await {
        Ok((_, applied)) => {
            let what = if enabled { "API access enabled." } else { "API access disabled." };
            done(&state, &session, what.into(), applied.as_ref(), &back)
        }
        Err(e) => failed(&state, &session, &e, &back),
    }
}

async fn delete(State(state): St, Extension(session): Ses, Path(name): Path<String>, body: Bytes) -> Response {
    let form = match Form::parse(&session, &body) {
        Ok(f) => f,
        Err(r) => return *r,
    };
    let back = format!("{}/settings", agent_url(&name));
    if form.get("confirm_name").as_deref() != Some(name.as_str()) {
        state.console.notice(&session, false, format!("Not deleted: type the agent's name, {name}, exactly to confirm."));
        return Redirect::to(&back).into_response();
    }
    let n = name.clone();
    match change(&state, "delete_agent", true, move |s| s.delete_agent(&n)).await {
        Ok((_, applied)) => done(&state, &session, format!("Agent \"{name}\" deleted; its keys are revoked."), applied.as_ref(), "/console/agents"),
        Err(e) => failed(&state, &session, &e, &back),
    }
}

/// The key form's expiry, rate and path fields, shared by generate and edit. Expiry is one
/// choice (a radio group), so the form never sends two of them; the store judges the one sent.
fn key_fields(k: Option<&KeyView>) -> Markup {
    let editing = k.is_some();
    html! {
        fieldset {
            legend { "Expiry" }
            @if let Some(k) = k {
                p.hint { "Now: " @if let Some(t) = &k.expires_at { "expires " (when(Some(t))) } @else { "never expires" } }
                div.check {
                    input id="expiry-keep" name="expiry" type="radio" value="keep" checked;
                    label for="expiry-keep" { "Keep it" }
                }
            }
            div.check {
                input id="expiry-never" name="expiry" type="radio" value="never" checked[!editing];
                label for="expiry-never" { "Never expires" }
            }
            div.check {
                input id="expiry-date" name="expiry" type="radio" value="date";
                label for="expiry-date" { "Expires at the end of a day (UTC)" }
            }
            div.field.indent {
                label for="expires_on" { "Date" }
                input id="expires_on" name="expires_on" type="date";
            }
            div.check {
                input id="expiry-ttl" name="expiry" type="radio" value="ttl";
                label for="expiry-ttl" { "Expires after a duration" }
            }
            div.field.indent {
                label for="ttl" { "Duration" }
                input id="ttl" name="ttl" placeholder="e.g. 90d, 24h" autocomplete="off";
            }
        }
        div.field {
            label for="rate" { "Rate limit (optional)" }
            input id="rate" name="rate" value=[k.and_then(|k| k.rate_limit.as_deref())] placeholder="e.g. 10/s; empty: the agent's" autocomplete="off";
        }
        div.field {
            label for="paths" { "Path restrictions (optional)" }
            input id="paths" name="paths" value=(k.map(|k| k.path_prefixes.join(", ")).unwrap_or_default()) placeholder="e.g. /v1/reports, /v1/exports" autocomplete="off";
            p.hint { "Path prefixes the key may call, comma separated; empty for any path." }
        }
    }
}

/// The expiry the form chose: `(expires_at, ttl)` as `KeyUpdate` takes them; `None` keeps it.
/// A chosen date is the end of that day, UTC.
fn chosen_expiry(form: &Form) -> (Option<Option<String>>, Option<String>) {
    match form.get("expiry").as_deref() {
        Some("never") => (Some(None), None),
        Some("date") => (Some(Some(format!("{}T23:59:59Z", form.get("expires_on").unwrap_or_default()))), None),
        Some("ttl") => (None, Some(form.get("ttl").unwrap_or_default())),
        _ => (None, None),
    }
}

/// The key's scopes: every scope it may narrow to, with a choice between the agent's (all of
/// them, following the agent) and only those ticked.
fn key_scopes(catalogue: &[ScopeView], allowed: &[String], own: Option<&[String]>) -> Markup {
    html! {
        fieldset {
            legend { "Scopes" }
            div.check {
                input id="scopes-inherit" name="scope_mode" type="radio" value="inherit" checked[own.is_none()];
                label for="scopes-inherit" { "The agent's scopes (and any it gains later)" }
            }
            div.check {
                input id="scopes-only" name="scope_mode" type="radio" value="only" checked[own.is_some()];
                label for="scopes-only" { "Only the scopes turned on below" }
            }
            (scope_toggles(catalogue, own.unwrap_or(&[]), Some(allowed)))
        }
    }
}

fn paths(form: &Form) -> Vec<String> {
    form.get("paths").map(|p| p.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()).unwrap_or_default()
}

async fn new_key(State(state): St, Extension(session): Ses, Path(name): Path<String>) -> Response {
    if !may(&session, Permission::ManageKeys) {
        return super::refused(&session, &session.actor.role.refusal(Permission::ManageKeys));
    }
    let (d, c) = match (detail(&state, name).await, catalogue(&state).await) {
        (Ok(d), Ok(c)) => (d, c),
        (Err(e), _) | (_, Err(e)) => return problem(&state, &session, &e),
    };
    let url = agent_url(&d.agent.name);
    let agent_scopes = expand_scopes(&c, &d.agent.scopes);
    let body = html! {
        p.crumbs { a href="/console/agents" { "API keys" } " / " a href=(url) { (d.agent.name) } " / new key" }
        h1 { "Generate a new key" }
        form.card method="post" action=(format!("{url}/keys")) {
            (csrf(&session))
            div.field {
                label for="name" { "Name" }
                input id="name" name="name" required maxlength="64" autocomplete="off" placeholder="e.g. Staging";
            }
            (key_scopes(&c, &agent_scopes, None))
            (key_fields(None))
            div.actions {
                button.primary type="submit" { "Generate" }
                a.button.secondary href=(url) { "Cancel" }
            }
        }
    };
    render(&state, &session, "Generate a new key", Nav::Agents, body)
}

/// The agent's scopes with what they imply: what a key of it may narrow to.
fn expand_scopes(catalogue: &[ScopeView], scopes: &[String]) -> Vec<String> {
    let mut out: Vec<String> = scopes.to_vec();
    for s in catalogue.iter().filter(|s| scopes.contains(&s.name)) {
        out.extend(s.implies.iter().cloned());
    }
    out.sort();
    out.dedup();
    out
}

async fn generate(State(state): St, Extension(session): Ses, Path(name): Path<String>, body: Bytes) -> Response {
    let form = match Form::parse(&session, &body) {
        Ok(f) => f,
        Err(r) => return *r,
    };
    let url = agent_url(&name);
    let scopes = (form.get("scope_mode").as_deref() == Some("only")).then(|| form.all("scopes"));
    let (expires_at, ttl) = chosen_expiry(&form);
    let req = NewKey {
        agent: name.clone(),
        name: form.get("name"),
        scopes,
        expires_at: expires_at.flatten(),
        ttl,
        rate: form.get("rate"),
        burst: None,
        path_prefixes: paths(&form),
    };
    match change(&state, "create_key", true, move |s| s.create_key(&req)).await {
        Ok((created, applied)) => {
            super::show_once(
                &state,
                &session,
                Shown {
                    secret: created.secret,
                    what: format!("Key \"{}\" of agent \"{name}\" is generated.", created.key.name),
                    key: Some(created.key),
                    back: url,
                    note: applied.as_ref().map(|a| crate::applied::summary(a).1),
                },
            )
        }
        Err(e) => failed(&state, &session, &e, &format!("{url}/keys/new")),
    }
}

async fn key(state: &Arc<AppState>, id: String) -> Result<KeyView> {
    with_store(state, "console.key", move |s| s.get_key(&id)).await
}

async fn edit_key(State(state): St, Extension(session): Ses, Path(id): Path<String>) -> Response {
    if !may(&session, Permission::ManageKeys) {
        return super::refused(&session, &session.actor.role.refusal(Permission::ManageKeys));
    }
    let k = match key(&state, id).await {
        Ok(k) => k,
        Err(e) => return problem(&state, &session, &e),
    };
    let (d, c) = match (detail(&state, k.agent.clone()).await, catalogue(&state).await) {
        (Ok(d), Ok(c)) => (d, c),
        (Err(e), _) | (_, Err(e)) => return problem(&state, &session, &e),
    };
    let url = agent_url(&k.agent);
    // What it may narrow to, and whatever it names itself (a scope its agent has since lost
    // included: leaving it unticked is then a choice the admin sees).
    let mut allowed = expand_scopes(&c, &d.agent.scopes);
    allowed.extend(k.own_scopes.iter().flatten().cloned());
    allowed.sort();
    allowed.dedup();
    let body = html! {
        p.crumbs { a href="/console/agents" { "API keys" } " / " a href=(url) { (k.agent) } " / " (k.name) }
        h1 { "Edit key " code { (k.masked) } }
        form.card method="post" action=(format!("/console/keys/{}/edit", seg(&k.id))) {
            (csrf(&session))
            div.field {
                label for="name" { "Name" }
                input id="name" name="name" required maxlength="64" value=(k.name) autocomplete="off";
            }
            (key_scopes(&c, &allowed, k.own_scopes.as_deref()))
            (key_fields(Some(&k)))
            div.actions {
                button.primary type="submit" { "Save key" }
                a.button.secondary href=(url) { "Cancel" }
            }
        }
    };
    render(&state, &session, "Edit key", Nav::Agents, body)
}

async fn save_key(State(state): St, Extension(session): Ses, Path(id): Path<String>, body: Bytes) -> Response {
    let form = match Form::parse(&session, &body) {
        Ok(f) => f,
        Err(r) => return *r,
    };
    let k = match key(&state, id.clone()).await {
        Ok(k) => k,
        Err(e) => return problem(&state, &session, &e),
    };
    let back = agent_url(&k.agent);
    // Only what the form changed is sent: an untouched field is not rewritten.
    let scopes = match form.get("scope_mode").as_deref() {
        Some("inherit") => Some(None),
        Some("only") => Some(Some(form.all("scopes"))),
        _ => None,
    }
    .filter(|s| s.as_deref() != k.own_scopes.as_deref());
    let (expires_at, ttl) = chosen_expiry(&form);
    let name = form.get("name").filter(|n| *n != k.name);
    let rate = Some(form.get("rate")).filter(|r| *r != k.rate_limit);
    let paths = Some(paths(&form)).filter(|p| *p != k.path_prefixes);
    let upd = KeyUpdate { name, scopes, expires_at, ttl, rate, burst: None, path_prefixes: paths };
    match change(&state, "update_key", true, move |s| s.update_key(&id, &upd)).await {
        Ok((k, applied)) => done(&state, &session, format!("Key \"{}\" saved.", k.name), applied.as_ref(), &back),
        Err(e) => failed(&state, &session, &e, &format!("/console/keys/{}/edit", seg(&k.id))),
    }
}

async fn rotate_page(State(state): St, Extension(session): Ses, Path(id): Path<String>) -> Response {
    if !may(&session, Permission::ManageKeys) {
        return super::refused(&session, &session.actor.role.refusal(Permission::ManageKeys));
    }
    let k = match key(&state, id).await {
        Ok(k) => k,
        Err(e) => return problem(&state, &session, &e),
    };
    let extra = html! {
        div.field {
            label for="grace" { "The old key keeps working for" }
            select id="grace" name="grace" {
                option value="0s" { "No grace: stop it now" }
                option value="1h" { "1 hour" }
                option value="24h" selected { "24 hours" }
                option value="7d" { "7 days" }
            }
        }
    };
    let body = confirm(
        &session,
        &format!("/console/keys/{}/rotate", seg(&k.id)),
        &format!("Rotate key \"{}\"?", k.name),
        &format!(
            "A new key with the same settings is generated and shown once. The old key {} keeps working during the grace period, and its responses carry a Deprecation header; then it expires.",
            k.masked
        ),
        "Rotate key",
        &agent_url(&k.agent),
        extra,
    );
    render(&state, &session, "Rotate key", Nav::Agents, body)
}

async fn rotate(State(state): St, Extension(session): Ses, Path(id): Path<String>, body: Bytes) -> Response {
    let form = match Form::parse(&session, &body) {
        Ok(f) => f,
        Err(r) => return *r,
    };
    let req = RotateKey { grace: form.get("grace"), ..RotateKey::default() };
    let back = format!("/console/keys/{}/rotate", seg(&id));
    match change(&state, "rotate_key", true, move |s| s.rotate_key(&id, &req)).await {
        Ok((r, applied)) => {
            let until = r.old.expires_at.clone().unwrap_or_else(|| "now".into());
            let reach = applied.as_ref().map(|a| crate::applied::summary(a).1).unwrap_or_default();
            super::show_once(
                &state,
                &session,
                Shown {
                    secret: r.new.secret,
                    what: format!("Key \"{}\" is rotated; this is its successor, \"{}\".", r.old.name, r.new.key.name),
                    back: agent_url(&r.new.key.agent),
                    key: Some(r.new.key),
                    note: Some(format!("The old key {} works until {until}. {reach}", r.old.masked)),
                },
            )
        }
        Err(e) => failed(&state, &session, &e, &back),
    }
}

async fn revoke_page(State(state): St, Extension(session): Ses, Path(id): Path<String>) -> Response {
    if !may(&session, Permission::ManageKeys) {
        return super::refused(&session, &session.actor.role.refusal(Permission::ManageKeys));
    }
    let k = match key(&state, id).await {
        Ok(k) => k,
        Err(e) => return problem(&state, &session, &e),
    };
    let body = confirm(
        &session,
        &format!("/console/keys/{}/revoke", seg(&k.id)),
        &format!("Revoke key \"{}\"?", k.name),
        &format!("Requests with {} are refused with 401 as soon as the Envoys apply this, within a second. This cannot be undone.", k.masked),
        "Revoke key",
        &agent_url(&k.agent),
        html! {},
    );
    render(&state, &session, "Revoke key", Nav::Agents, body)
}

async fn revoke(State(state): St, Extension(session): Ses, Path(id): Path<String>, body: Bytes) -> Response {
    let form = match Form::parse(&session, &body) {
        Ok(f) => f,
        Err(r) => return *r,
    };
    let back = format!("/console/keys/{}/revoke", seg(&id));
    if form.get("confirm").as_deref() != Some("yes") {
        return Redirect::to(&back).into_response();
    }
    match change(&state, "revoke_key", true, move |s| s.revoke_key(&id)).await {
        Ok((k, applied)) => done(&state, &session, format!("Key \"{}\" ({}) revoked.", k.name, k.masked), applied.as_ref(), &agent_url(&k.agent)),
        Err(e) => failed(&state, &session, &e, &back),
    }
}

/// Bulk revoke: the first post (from the keys table) asks; the second (`confirm=yes`) revokes.
async fn bulk_revoke(State(state): St, Extension(session): Ses, Path(name): Path<String>, body: Bytes) -> Response {
    let form = match Form::parse(&session, &body) {
        Ok(f) => f,
        Err(r) => return *r,
    };
    let url = agent_url(&name);
    let ids = form.all("key");
    if ids.is_empty() {
        state.console.notice(&session, false, "Select the keys to revoke first.");
        return Redirect::to(&url).into_response();
    }
    if form.get("confirm").as_deref() != Some("yes") {
        let d = match detail(&state, name.clone()).await {
            Ok(d) => d,
            Err(e) => return problem(&state, &session, &e),
        };
        let chosen: Vec<&KeyView> = d.keys.iter().filter(|k| ids.contains(&k.id)).collect();
        let extra = html! {
            ul { @for k in &chosen { li { (k.name) " " code { (k.masked) } } } }
            @for k in &chosen { input type="hidden" name="key" value=(k.id); }
        };
        let body = confirm(
            &session,
            &format!("{url}/revoke"),
            &format!("Revoke {} keys?", chosen.len()),
            "Requests with these keys are refused with 401 as soon as the Envoys apply this, within a second. This cannot be undone.",
            "Revoke keys",
            &url,
            extra,
        );
        return render(&state, &session, "Revoke keys", Nav::Agents, body);
    }
    // One change per key, through the same operation as one revoke, for this agent's keys not
    // revoked yet (a second click, or a key revoked meanwhile, is not an error); the last
    // change says how far they all reached.
    let d = match detail(&state, name.clone()).await {
        Ok(d) => d,
        Err(e) => return problem(&state, &session, &e),
    };
    let ids: Vec<String> = d.keys.iter().filter(|k| ids.contains(&k.id) && k.status != "revoked").map(|k| k.id.clone()).collect();
    let result = change(&state, "revoke_key", true, move |s| {
        let mut revoked = 0;
        for id in &ids {
            if let Err(e) = s.revoke_key(id) {
                return Ok((revoked, Some(e)));
            }
            revoked += 1;
        }
        Ok((revoked, None))
    })
    .await;
    match result {
        Ok(((n, None), applied)) => done(&state, &session, format!("{n} keys revoked."), applied.as_ref(), &url),
        Ok(((n, Some(e)), applied)) => done(&state, &session, format!("{n} keys revoked, then: {}.", e.message_with_field()), applied.as_ref(), &url),
        Err(e) => failed(&state, &session, &e, &url),
    }
}

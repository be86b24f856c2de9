//! The operator's pages: the Envoys and what they have applied, the audit log, and the admins
//! (owners only).

use super::layout::{badge, csrf, when, Nav};
use super::{done, failed, render, Form, Session, Shown};
use crate::api::{with_store, AppState};
use crate::model::*;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use maud::html;
use serde::Deserialize;
use std::sync::Arc;

type St = State<Arc<AppState>>;
type Ses = Extension<Session>;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/console/envoys", get(envoys))
        .route("/console/audit", get(audit))
        .route("/console/admins", get(admins).post(create_admin))
        .route("/console/admins/{name}/disable", post(disable_admin))
        .route("/console/admins/{name}/enable", post(enable_admin))
        .route("/console/admins/{name}/token", post(new_token))
}

fn trouble(state: &AppState, session: &Session, nav: Nav, e: &crate::error::Error) -> Response {
    let status = axum::http::StatusCode::from_u16(e.status()).unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR);
    let body = html! { h1 { "Not available" } p.notice.bad role="alert" { (e.message_with_field()) } };
    (status, render(state, session, "Not available", nav, body)).into_response()
}

async fn envoys(State(state): St, Extension(session): Ses) -> Response {
    let s = match with_store(&state, "console.status", |s| s.status()).await {
        Ok(s) => s,
        Err(e) => return trouble(&state, &session, Nav::Envoys, &e),
    };
    let body = html! {
        h1 { "Envoys" }
        dl.facts.inline {
            dt { "Snapshot version" } dd { (s.snapshot_version) }
            dt { "Store" } dd { (s.engine) }
            dt { "Agents" } dd { (s.agents) }
            dt { "Active keys" } dd { (s.active_keys) }
            dt { "Control plane" } dd { @if s.replicas.len() <= 1 { "1 replica" } @else { (s.replicas.len()) " replicas" } }
        }
        p.muted { "Each Envoy fetches the snapshot from keyward and says which version it has applied. A change is live on an Envoy once its applied version reaches the change's." }
        div.scroll {
            table {
                thead {
                    tr {
                        th scope="col" { "Envoy" }
                        th scope="col" { "Shell" }
                        th scope="col" class="num" { "Applied version" }
                        th scope="col" class="num" { "Lag" }
                        th scope="col" { "Last contact" }
                        th scope="col" { "State" }
                        th scope="col" { "Replica" }
                    }
                }
                tbody {
                    @for e in &s.envoys {
                        tr class=[(!e.connected).then_some("stale")] {
                            td { code { (e.id) } }
                            td { (if e.shell == "native" { "native (libkeyward.so)" } else { "wasm (keyward.wasm)" }) }
                            td.num { (e.applied_version) }
                            td.num { (e.lag) }
                            td { (when(Some(&e.last_seen))) }
                            td { (badge(if e.connected { &e.state } else { "stale" })) }
                            td { (e.replica.as_deref().unwrap_or("—")) }
                        }
                    }
                    @if s.envoys.is_empty() {
                        tr { td colspan="7" { "No Envoy has fetched the snapshot yet." } }
                    }
                }
            }
        }
    };
    render(&state, &session, "Envoys", Nav::Envoys, body)
}

#[derive(Debug, Default, Deserialize)]
struct AuditQuery {
    actor: Option<String>,
    agent: Option<String>,
    action: Option<String>,
}

/// Entries the audit page lists at most.
const AUDIT_ROWS: u32 = 200;

async fn audit(State(state): St, Extension(session): Ses, q: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>) -> Response {
    let q = q.map(|q| q.0).unwrap_or_default();
    let some = |v: &Option<String>| v.as_ref().map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    let filter = AuditFilter { actor: some(&q.actor), agent: some(&q.agent), action: some(&q.action) };
    let f = filter.clone();
    let mut entries = match with_store(&state, "console.audit", move |s| s.audit_filtered(AUDIT_ROWS, &f)).await {
        Ok(e) => e,
        Err(e) => return trouble(&state, &session, Nav::Audit, &e),
    };
    entries.reverse();
    let body = html! {
        h1 { "Audit log" }
        p.muted { "Every change, who made it, and the snapshot version it made. The log is append-only; the newest entries come first." }
        form.filters method="get" action="/console/audit" role="search" {
            div.field {
                label for="actor" { "Actor" }
                input id="actor" name="actor" value=[filter.actor.as_deref()] placeholder="e.g. alice" autocomplete="off";
            }
            div.field {
                label for="agent" { "Agent" }
                input id="agent" name="agent" value=[filter.agent.as_deref()] placeholder="agent name" autocomplete="off";
            }
            div.field {
                label for="action" { "Action" }
                input id="action" name="action" value=[filter.action.as_deref()] placeholder="e.g. key.revoke or key" autocomplete="off";
            }
            button.secondary type="submit" { "Filter" }
        }
        div.scroll {
            table.audit {
                thead {
                    tr {
                        th scope="col" { "Time" }
                        th scope="col" { "Actor" }
                        th scope="col" { "Action" }
                        th scope="col" { "Target" }
                        th scope="col" { "Details" }
                        th scope="col" class="num" { "Version" }
                    }
                }
                tbody {
                    @for e in &entries {
                        tr {
                            td { (when(Some(&e.at))) }
                            td { (e.actor) }
                            td { code { (e.action) } }
                            td { code { (e.target) } }
                            td.details { (details(&e.details)) }
                            td.num { (e.version) }
                        }
                    }
                    @if entries.is_empty() { tr { td colspan="6" { "No entries match." } } }
                }
            }
        }
    };
    render(&state, &session, "Audit log", Nav::Audit, body)
}

/// An audit entry's details as `name: value` lines (values as compact JSON; nulls left out).
fn details(d: &serde_json::Value) -> maud::Markup {
    match d.as_object() {
        Some(map) if map.values().any(|v| !v.is_null()) => html! {
            dl.details {
                @for (k, v) in map.iter().filter(|(_, v)| !v.is_null()) {
                    dt { (k) } dd { (v.as_str().map_or_else(|| v.to_string(), str::to_string)) }
                }
            }
        },
        Some(_) => html! { span.muted { "—" } },
        None => html! { (d.to_string()) },
    }
}

async fn admins(State(state): St, Extension(session): Ses) -> Response {
    if !session.actor.role.allows(Permission::Own) {
        return super::refused(&session, &session.actor.role.refusal(Permission::Own));
    }
    let list = match with_store(&state, "console.admins", |s| s.list_admins()).await {
        Ok(l) => l,
        Err(e) => return trouble(&state, &session, Nav::Admins, &e),
    };
    let body = html! {
        h1 { "Admins" }
        p.muted {
            "A viewer reads everything and changes nothing; an editor also manages agents and keys; an owner also manages admins and the scope catalogue. "
            "Each admin signs in with a personal token, and the audit log names them."
        }
        div.scroll {
            table {
                thead {
                    tr {
                        th scope="col" { "Name" }
                        th scope="col" { "Role" }
                        th scope="col" { "Status" }
                        th scope="col" { "Created" }
                        th scope="col" { "Token issued" }
                        th scope="col" { "Actions" }
                    }
                }
                tbody {
                    @for a in &list {
                        tr {
                            td { (a.name) }
                            td { (a.role.as_str()) }
                            td { (badge(&a.status)) }
                            td { (when(Some(&a.created_at))) }
                            td { (when(Some(&a.token_issued_at))) }
                            td.actions {
                                @let base = format!("/console/admins/{}", super::agents::seg(&a.name));
                                @if a.status == "active" {
                                    form.inline method="post" action=(format!("{base}/token")) {
                                        (csrf(&session))
                                        button.link type="submit" aria-label=(format!("New token for {}", a.name)) { "New token" }
                                    }
                                    form.inline method="post" action=(format!("{base}/disable")) {
                                        (csrf(&session))
                                        button.link.dangerlink type="submit" aria-label=(format!("Disable {}", a.name)) { "Disable" }
                                    }
                                } @else {
                                    form.inline method="post" action=(format!("{base}/enable")) {
                                        (csrf(&session))
                                        button.link type="submit" aria-label=(format!("Enable {}", a.name)) { "Enable" }
                                    }
                                }
                            }
                        }
                    }
                    @if list.is_empty() { tr { td colspan="6" { "No admins yet: you are signed in with the bootstrap token." } } }
                }
            }
        }
        h2 { "Add an admin" }
        form.card method="post" action="/console/admins" {
            (csrf(&session))
            div.field {
                label for="name" { "Name" }
                input id="name" name="name" required maxlength="64" autocomplete="off";
            }
            div.field {
                label for="role" { "Role" }
                select id="role" name="role" {
                    option value="viewer" { "viewer: reads everything" }
                    option value="editor" selected { "editor: manages agents and keys" }
                    option value="owner" { "owner: also manages admins and scopes" }
                }
            }
            div.actions { button.primary type="submit" { "Add admin" } }
        }
    };
    render(&state, &session, "Admins", Nav::Admins, body)
}

fn show_token(state: &AppState, session: &Session, made: AdminWithToken, what: String) -> Response {
    super::show_once(
        state,
        session,
        Shown {
            secret: made.token,
            what,
            key: None,
            back: "/console/admins".into(),
            note: Some("Give it to them over a channel you trust; they sign in with it, and may use it with the API and the CLI's --url.".into()),
        },
    )
}

async fn create_admin(State(state): St, Extension(session): Ses, body: Bytes) -> Response {
    let form = match Form::parse(&session, &body) {
        Ok(f) => f,
        Err(r) => return *r,
    };
    let req = NewAdmin { name: form.get("name").unwrap_or_default(), role: form.get("role").unwrap_or_default() };
    match with_store(&state, "create_admin", move |s| s.create_admin(&req)).await {
        Ok(made) => {
            let what = format!("Admin \"{}\" ({}) is added. This is their personal token.", made.admin.name, made.admin.role.as_str());
            show_token(&state, &session, made, what)
        }
        Err(e) => failed(&state, &session, &e, "/console/admins"),
    }
}

async fn new_token(State(state): St, Extension(session): Ses, Path(name): Path<String>, body: Bytes) -> Response {
    if let Err(r) = Form::parse(&session, &body) {
        return *r;
    }
    match with_store(&state, "admin_token", move |s| s.new_admin_token(&name)).await {
        Ok(made) => {
            let what = format!("A new personal token for \"{}\". Their old token, and its console sessions, no longer work.", made.admin.name);
            show_token(&state, &session, made, what)
        }
        Err(e) => failed(&state, &session, &e, "/console/admins"),
    }
}

async fn set_enabled(state: Arc<AppState>, session: Session, name: String, body: Bytes, enabled: bool) -> Response {
    if let Err(r) = Form::parse(&session, &body) {
        return *r;
    }
    match with_store(&state, "set_admin_enabled", move |s| s.set_admin_enabled(&name, enabled)).await {
        Ok(a) => {
            let what = if enabled { format!("Admin \"{}\" enabled.", a.name) } else { format!("Admin \"{}\" disabled; their token and sessions no longer work.", a.name) };
            done(&state, &session, what, None, "/console/admins")
        }
        Err(e) => failed(&state, &session, &e, "/console/admins"),
    }
}

async fn disable_admin(State(state): St, Extension(session): Ses, Path(name): Path<String>, body: Bytes) -> Response {
    set_enabled(state, session, name, body, false).await
}

async fn enable_admin(State(state): St, Extension(session): Ses, Path(name): Path<String>, body: Bytes) -> Response {
    set_enabled(state, session, name, body, true).await
}

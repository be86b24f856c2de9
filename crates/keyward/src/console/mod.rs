//! The web console at `/console`: the seeds' key-management screens, server-rendered.
//!
//! Every page is HTML from `maud` templates compiled into the binary (escaping on by default);
//! the stylesheet and the one small script are embedded too. Every change runs through the same
//! store operations as the API ([`crate::api::change`]), so a rule is written and tested once;
//! nothing here validates input itself.
//!
//! Security: a session is a random id in an `HttpOnly`, `SameSite=Strict` cookie (`Secure` on
//! TLS or with `--console-secure`); the store keeps only its digest, and the session ends after
//! [`IDLE_SECS`] of inactivity, [`MAX_SECS`] in all, or when its admin is disabled or given a new
//! token. Every form carries a CSRF token derived from the session id. A role is checked on the
//! server before a form is read. A new key is shown once, from memory, on a `no-store` page,
//! and never in a URL.

mod admin;
mod agents;
mod chart;
mod layout;

use crate::api::{acting_as, with_store, AppState};
use crate::error::Error;
use crate::model::{Actor, KeyView, Permission};
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use keyward_core::Digest;
use maud::Markup;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The session cookie's name.
pub const COOKIE: &str = "keyward_session";
/// A session unused this long ends.
pub const IDLE_SECS: i64 = 30 * 60;
/// No session lasts longer than this.
pub const MAX_SECS: i64 = 12 * 60 * 60;
/// How long a new key waits in memory to be shown (once) after the change that made it.
const SHOW_WITHIN: Duration = Duration::from_secs(300);

const CSS: &str = include_str!("assets/console.css");
const JS: &str = include_str!("assets/console.js");

/// What the console keeps in memory per session: notices for the next page, and new secrets
/// each to show once. Never written anywhere: with several `serve` replicas behind a load
/// balancer, the console needs session affinity (README, "Console").
#[derive(Default)]
pub struct ConsoleState {
    flash: Mutex<HashMap<Digest, Flash>>,
}

#[derive(Default)]
struct Flash {
    notices: Vec<Notice>,
    /// By nonce: what to show, and when it was made.
    shown: HashMap<String, (Shown, Instant)>,
    touched: Option<Instant>,
}

/// Notices and unshown secrets a session may pile up (a client that never follows redirects).
const MAX_NOTICES: usize = 10;
const MAX_SHOWN: usize = 5;

/// A one-line message on the next page: a change's result, or why it was refused.
#[derive(Debug, Clone)]
pub struct Notice {
    pub ok: bool,
    pub text: String,
}

/// A secret to show once: a new key, or an admin's new personal token.
pub struct Shown {
    pub secret: String,
    /// What it is, e.g. `Production key of agent "billing"`.
    pub what: String,
    /// The key, when it is one.
    pub key: Option<KeyView>,
    /// Where "Done" goes.
    pub back: String,
    /// Anything else to say (e.g. the old key's grace period).
    pub note: Option<String>,
}

impl ConsoleState {
    fn with<T>(&self, session: &Digest, f: impl FnOnce(&mut Flash) -> T) -> T {
        let mut map = self.flash.lock().unwrap_or_else(|p| p.into_inner());
        // A secret not looked at within SHOW_WITHIN of its making is gone; so is a session's
        // entry once it has nothing left and has not been used for as long.
        for flash in map.values_mut() {
            flash.shown.retain(|_, (_, made)| made.elapsed() < SHOW_WITHIN);
        }
        map.retain(|_, f| !f.shown.is_empty() || f.touched.is_some_and(|t| t.elapsed() < SHOW_WITHIN));
        let flash = map.entry(*session).or_default();
        flash.touched = Some(Instant::now());
        f(flash)
    }

    pub fn notice(&self, session: &Session, ok: bool, text: impl Into<String>) {
        self.with(&session.id, |f| {
            if f.notices.len() >= MAX_NOTICES {
                f.notices.remove(0);
            }
            f.notices.push(Notice { ok, text: text.into() });
        });
    }

    /// Keeps `shown` to show once; the page to show it at is `/console/shown/<nonce>`.
    pub fn show(&self, session: &Session, shown: Shown) -> crate::error::Result<String> {
        let nonce = crate::store::random_base62(22)?;
        self.with(&session.id, |f| {
            if f.shown.len() >= MAX_SHOWN {
                if let Some(oldest) = f.shown.iter().min_by_key(|(_, (_, made))| *made).map(|(n, _)| n.clone()) {
                    f.shown.remove(&oldest);
                }
            }
            f.shown.insert(nonce.clone(), (shown, Instant::now()));
        });
        Ok(format!("/console/shown/{nonce}"))
    }

    fn take_notices(&self, session: &Session) -> Vec<Notice> {
        self.with(&session.id, |f| std::mem::take(&mut f.notices))
    }

    fn take_shown(&self, session: &Session, nonce: &str) -> Option<Shown> {
        self.with(&session.id, |f| f.shown.remove(nonce).map(|(s, _)| s))
    }

    /// Sign-out: whatever the session had waiting goes with it.
    fn forget(&self, session: &Session) {
        let mut map = self.flash.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(&session.id);
    }
}

/// Shows a secret once: keeps it, then sends the browser to its page.
pub fn show_once(state: &AppState, session: &Session, shown: Shown) -> Response {
    match state.console.show(session, shown) {
        Ok(url) => Redirect::to(&url).into_response(),
        Err(e) => error_page(&e),
    }
}

/// The signed-in admin of a console request.
#[derive(Debug, Clone)]
pub struct Session {
    pub actor: Actor,
    /// The digest of the session id (the cookie's value).
    pub id: Digest,
    /// The CSRF token every form of this session carries.
    pub csrf: String,
}

fn csrf_of(cookie: &str) -> String {
    let mut input = b"keyward console csrf\0".to_vec();
    input.extend_from_slice(cookie.as_bytes());
    Digest::of(&input).to_hex()
}

/// The console's routes, all under `/console`.
pub fn router(state: Arc<AppState>) -> Router<Arc<AppState>> {
    let signed_in = Router::new()
        .route("/console", get(|| async { Redirect::to("/console/agents") }))
        .route("/console/signout", axum::routing::post(signout))
        .route("/console/shown/{nonce}", get(shown))
        .route("/console/{*rest}", get(not_found))
        .merge(agents::routes())
        .merge(admin::routes())
        .route_layer(axum::middleware::from_fn_with_state(state, require_session));
    Router::new()
        .route("/console/signin", get(signin_page).post(signin))
        .route("/console/assets/console.css", get(|| async { asset("text/css; charset=utf-8", CSS) }))
        .route("/console/assets/console.js", get(|| async { asset("text/javascript; charset=utf-8", JS) }))
        .merge(signed_in)
        .layer(axum::middleware::from_fn(same_origin))
        .layer(axum::middleware::from_fn(security_headers))
}

/// Refuses a console POST that a browser says came from another site (`Sec-Fetch-Site`, else
/// `Origin` against `Host`): sign-in has no session yet to hold a CSRF token, and no form
/// should be posted from elsewhere anyway. Clients that send neither (curl) pass; they hold no
/// victim's cookie.
async fn same_origin(headers: HeaderMap, req: Request, next: Next) -> Response {
    if req.method() == Method::POST && !posted_from_here(&headers) {
        let body = maud::html! {
            h1 { "Not allowed" }
            p.notice.bad role="alert" { "This form was posted from another site. Open the console itself and try again." }
        };
        return (StatusCode::FORBIDDEN, layout::page("Not allowed", None, layout::Nav::None, &[], body)).into_response();
    }
    next.run(req).await
}

fn posted_from_here(headers: &HeaderMap) -> bool {
    let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        return matches!(site, "same-origin" | "none");
    }
    match (text(header::ORIGIN), text(header::HOST)) {
        (None, _) => true,
        (Some(origin), Some(host)) => origin.split_once("://").is_some_and(|(_, rest)| rest == host),
        (Some(_), None) => false,
    }
}

/// A console page that does not exist: an HTML 404, with the console's headers.
async fn not_found(State(state): State<Arc<AppState>>, axum::Extension(session): axum::Extension<Session>) -> Response {
    let body = maud::html! {
        h1 { "Page not found" }
        p { "There is no such page in the console." }
        p { a href="/console/agents" { "Back to API keys" } }
    };
    (StatusCode::NOT_FOUND, render(&state, &session, "Not found", layout::Nav::None, body)).into_response()
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "public, max-age=3600")], body).into_response()
}

/// The headers of every console answer: a strict CSP (no inline script or style, no frames),
/// and, for pages, `no-store`: they show keys' details, and one shows a new key.
async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

fn cookie_value(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
        .filter(|v| !v.is_empty())
}

/// What a console form needs: changing the admins takes an owner; any other change an editor.
fn permission(method: &Method, path: &str) -> Permission {
    if method == Method::GET || method == Method::HEAD || path == "/console/signout" {
        Permission::Read
    } else if path.starts_with("/console/admins") {
        Permission::Own
    } else {
        Permission::ManageKeys
    }
}

/// Lets a request through only with a live session whose admin's role allows it; a request
/// without one goes to the sign-in page.
async fn require_session(State(state): State<Arc<AppState>>, headers: HeaderMap, mut req: Request, next: Next) -> Response {
    let to_signin = Redirect::to("/console/signin").into_response();
    let Some(cookie) = cookie_value(&headers) else {
        return to_signin;
    };
    let id = Digest::of(cookie.as_bytes());
    let token = match with_store(&state, "console.session", move |s| s.session_token(&id, IDLE_SECS, MAX_SECS)).await {
        Ok(Some(t)) => t,
        Ok(None) => return to_signin,
        Err(e) => return error_page(&e),
    };
    let actor = match state.actor_for(token).await {
        Ok(Some(a)) => a,
        Ok(None) => return to_signin,
        Err(e) => return error_page(&e),
    };
    let session = Session { actor: actor.clone(), id, csrf: csrf_of(&cookie) };
    let need = permission(req.method(), req.uri().path());
    if !actor.role.allows(need) {
        return refused(&session, &actor.role.refusal(need));
    }
    req.extensions_mut().insert(session);
    acting_as(actor, next.run(req)).await
}

/// A submitted form, its CSRF token checked.
pub struct Form(Vec<(String, String)>);

impl Form {
    /// Parses a urlencoded body; refuses one without this session's CSRF token.
    pub fn parse(session: &Session, body: &Bytes) -> std::result::Result<Form, Box<Response>> {
        let fields: Vec<(String, String)> = form_urlencoded::parse(body).into_owned().collect();
        let token = fields.iter().find(|(k, _)| k == "csrf").map(|(_, v)| v.as_str());
        if token.is_none_or(|t| !crate::api::constant_time_eq(t.as_bytes(), session.csrf.as_bytes())) {
            return Err(Box::new(refused(session, "This form did not come from this console session (its CSRF token is missing or stale). Reload the page and try again.")));
        }
        Ok(Form(fields))
    }

    /// The trimmed value of a field; empty is absent.
    pub fn get(&self, name: &str) -> Option<String> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.trim().to_string()).filter(|v| !v.is_empty())
    }

    /// Every value of a repeated field (checkboxes).
    pub fn all(&self, name: &str) -> Vec<String> {
        self.0.iter().filter(|(k, _)| k == name).map(|(_, v)| v.trim().to_string()).filter(|v| !v.is_empty()).collect()
    }
}

/// A 403 page for a refused role or a forged form.
fn refused(session: &Session, message: &str) -> Response {
    let body = maud::html! {
        h1 { "Not allowed" }
        p.notice.bad role="alert" { (message) }
        p { a href="/console/agents" { "Back to API keys" } }
    };
    (StatusCode::FORBIDDEN, layout::page("Not allowed", Some(session), layout::Nav::None, &[], body)).into_response()
}

/// A page for an error no form can show (the store unreachable, say).
fn error_page(e: &Error) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = maud::html! {
        h1 { "Something went wrong" }
        p.notice.bad role="alert" { (e.message()) }
        p { a href="/console/agents" { "Back to API keys" } }
    };
    (status, layout::page("Error", None, layout::Nav::None, &[], body)).into_response()
}

/// Renders a signed-in page with the session's pending notices.
pub fn render(state: &AppState, session: &Session, title: &str, nav: layout::Nav, body: Markup) -> Response {
    let notices = state.console.take_notices(session);
    layout::page(title, Some(session), nav, &notices, body).into_response()
}

/// After a change: says what it did and how far it reached, then goes to `to`.
pub fn done(state: &AppState, session: &Session, what: String, applied: Option<&crate::model::Applied>, to: &str) -> Response {
    let text = match applied {
        Some(a) => format!("{what} {}", crate::applied::summary(a).1),
        None => what,
    };
    let ok = applied.is_none_or(|a| crate::applied::summary(a).0);
    state.console.notice(session, ok, text);
    Redirect::to(to).into_response()
}

/// After a refused change: says why, then goes to `to`.
pub fn failed(state: &AppState, session: &Session, e: &Error, to: &str) -> Response {
    if e.status() >= 500 {
        tracing::error!(error = %e, "console change failed");
    }
    state.console.notice(session, false, e.message_with_field());
    Redirect::to(to).into_response()
}

async fn signin_page() -> Response {
    layout::signin(None).into_response()
}

async fn signin(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let ip = crate::api::client_ip(&req);
    if let Some(secs) = state.blocked(ip) {
        let msg = format!("Too many sign-in attempts with a wrong token from this address. Try again in {secs} s.");
        return (StatusCode::TOO_MANY_REQUESTS, [(header::RETRY_AFTER, secs.to_string())], layout::signin(Some(&msg))).into_response();
    }
    let body = match axum::body::to_bytes(req.into_body(), 16 * 1024).await {
        Ok(b) => b,
        Err(_) => return (StatusCode::PAYLOAD_TOO_LARGE, layout::signin(Some("The form was too large."))).into_response(),
    };
    let token = form_urlencoded::parse(&body).find(|(k, _)| k == "token").map(|(_, v)| v.trim().to_string()).unwrap_or_default();
    let actor = if token.is_empty() { Ok(None) } else { state.actor_for(Digest::of(token.as_bytes())).await };
    match actor {
        Ok(Some(actor)) => {
            let session = match crate::store::random_base62(43) {
                Ok(s) => s,
                Err(e) => return error_page(&e),
            };
            let (id, token) = (Digest::of(session.as_bytes()), Digest::of(token.as_bytes()));
            if let Err(e) = with_store(&state, "console.signin", move |s| s.create_session(&id, &token)).await {
                return error_page(&e);
            }
            tracing::info!(admin = %actor.name, client = %ip, "console sign-in");
            let secure = if state.console_secure { "; Secure" } else { "" };
            let cookie = format!("{COOKIE}={session}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={MAX_SECS}{secure}");
            ([(header::SET_COOKIE, cookie)], Redirect::to("/console/agents")).into_response()
        }
        Ok(None) => {
            state.failed_attempt(ip).await;
            let msg = if token.is_empty() { "Enter your personal admin token." } else { "That token is not valid, or its admin is disabled." };
            (StatusCode::UNAUTHORIZED, layout::signin(Some(msg))).into_response()
        }
        Err(e) => error_page(&e),
    }
}

async fn signout(State(state): State<Arc<AppState>>, axum::Extension(session): axum::Extension<Session>, body: Bytes) -> Response {
    if let Err(r) = Form::parse(&session, &body) {
        return *r;
    }
    let id = session.id;
    state.console.forget(&session);
    if let Err(e) = with_store(&state, "console.signout", move |s| s.end_session(&id)).await {
        return error_page(&e);
    }
    let secure = if state.console_secure { "; Secure" } else { "" };
    let cookie = format!("{COOKIE}=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0{secure}");
    ([(header::SET_COOKIE, cookie)], Redirect::to("/console/signin")).into_response()
}

/// The one-time page of a new secret. A reload finds nothing: it was shown. Only a GET shows
/// it (axum answers HEAD with the GET handler: a HEAD must not use it up).
async fn shown(
    State(state): State<Arc<AppState>>,
    axum::Extension(session): axum::Extension<Session>,
    method: Method,
    axum::extract::Path(nonce): axum::extract::Path<String>,
) -> Response {
    if method != Method::GET {
        return StatusCode::OK.into_response();
    }
    let shown = state.console.take_shown(&session, &nonce);
    let body = layout::shown(shown.as_ref());
    render(&state, &session, "New key", layout::Nav::Agents, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_console_path_needs_its_permission() {
        let table = [
            (Method::GET, "/console/agents", Permission::Read),
            (Method::GET, "/console/admins", Permission::Read),
            (Method::POST, "/console/signout", Permission::Read),
            (Method::POST, "/console/agents", Permission::ManageKeys),
            (Method::POST, "/console/keys/key_1/revoke", Permission::ManageKeys),
            (Method::POST, "/console/agents/a/capabilities", Permission::ManageKeys),
            (Method::POST, "/console/admins", Permission::Own),
            (Method::POST, "/console/admins/bob/token", Permission::Own),
        ];
        for (method, path, want) in table {
            assert_eq!(permission(&method, path), want, "{method} {path}");
        }
    }

    #[test]
    fn the_session_cookie_is_found_among_others_and_an_empty_one_is_none() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1; keyward_session=abc; b=2"));
        assert_eq!(cookie_value(&h).as_deref(), Some("abc"));
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("keyward_session="));
        assert_eq!(cookie_value(&h), None);
        assert_eq!(cookie_value(&HeaderMap::new()), None);
    }

    #[test]
    fn a_post_from_another_site_is_told_apart() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, HeaderValue::from_static(v));
            }
            h
        };
        let table: &[(&[(&str, &str)], bool)] = &[
            (&[], true),
            (&[("sec-fetch-site", "same-origin")], true),
            (&[("sec-fetch-site", "none")], true),
            (&[("sec-fetch-site", "cross-site"), ("origin", "http://127.0.0.1:7070"), ("host", "127.0.0.1:7070")], false),
            (&[("sec-fetch-site", "same-site")], false),
            (&[("origin", "http://127.0.0.1:7070"), ("host", "127.0.0.1:7070")], true),
            (&[("origin", "https://evil.example"), ("host", "127.0.0.1:7070")], false),
            (&[("origin", "null"), ("host", "127.0.0.1:7070")], false),
        ];
        for (headers, want) in table {
            assert_eq!(posted_from_here(&h(headers)), *want, "{headers:?}");
        }
    }

    #[test]
    fn a_form_needs_its_sessions_csrf_token() {
        let session = Session { actor: Actor::bootstrap(), id: Digest::of(b"s"), csrf: csrf_of("cookie-1") };
        let ok = Bytes::from(format!("csrf={}&name=a&scopes=x&scopes=y", session.csrf));
        let form = Form::parse(&session, &ok).ok();
        assert_eq!(form.as_ref().and_then(|f| f.get("name")).as_deref(), Some("a"));
        assert_eq!(form.map(|f| f.all("scopes")), Some(vec!["x".to_string(), "y".to_string()]));
        let other = format!("csrf={}&name=a", csrf_of("cookie-2"));
        assert!(Form::parse(&session, &Bytes::from(other)).is_err());
        assert!(Form::parse(&session, &Bytes::from_static(b"name=a")).is_err());
    }
}

//! The admin HTTP API: JSON in and out, the same operations as the CLI, behind an admin token.

use crate::error::{Error, Result};
use crate::model::{Actor, AgentUpdate, Applied, DisableAgent, ImportKey, Imply, KeyUpdate, NewAdmin, NewAgent, NewKey, NewScope, Permission, RotateKey};
use crate::store::Store;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use keyward_core::Digest;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Every route, as (method, path). The OpenAPI document must list exactly these
/// (`tests/openapi.rs`).
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/v1/agents"),
    ("POST", "/v1/agents"),
    ("GET", "/v1/agents/{name}"),
    ("PATCH", "/v1/agents/{name}"),
    ("DELETE", "/v1/agents/{name}"),
    ("POST", "/v1/agents/{name}/disable"),
    ("POST", "/v1/agents/{name}/enable"),
    ("GET", "/v1/keys"),
    ("POST", "/v1/keys"),
    ("POST", "/v1/keys/import"),
    ("GET", "/v1/keys/{id}"),
    ("PATCH", "/v1/keys/{id}"),
    ("POST", "/v1/keys/{id}/revoke"),
    ("POST", "/v1/keys/{id}/rotate"),
    ("GET", "/v1/scopes"),
    ("POST", "/v1/scopes"),
    ("DELETE", "/v1/scopes/{name}"),
    ("POST", "/v1/scopes/{name}/implies"),
    ("GET", "/v1/status"),
    ("GET", "/v1/audit"),
    ("GET", "/v1/snapshot"),
    ("GET", "/v1/usage"),
    ("GET", "/v1/admins"),
    ("POST", "/v1/admins"),
    ("POST", "/v1/admins/{name}/disable"),
    ("POST", "/v1/admins/{name}/enable"),
    ("POST", "/v1/admins/{name}/token"),
    ("GET", "/v1/feed"),
    ("POST", "/v1/feed/usage"),
    ("POST", "/v1/feed/rates"),
];

/// The highest version an Envoy ahead of the store may move it to: a bound on what a bad feed
/// request can do to the version counter.
const MAX_ADVANCE: u64 = 1 << 53;

/// Longest a feed request may be held open.
pub const MAX_FEED_WAIT_SECS: u64 = 60;

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// The body limit of `POST /v1/feed/usage` and `POST /v1/feed/rates`.
pub const USAGE_MAX_BODY_BYTES: usize = 1024 * 1024;

pub struct AppState {
    pub store: Mutex<Store>,
    /// SHA-256 of the admin token; the token itself is never kept.
    pub token_digest: std::sync::RwLock<Digest>,
    /// The token's digest lives in the store (`admin-token rotate` changes it), not in the
    /// environment: the version watcher re-reads it.
    pub token_from_store: bool,
    /// SHA-256 of the feed token, if the feed requires one (`KEYWARD_FEED_TOKEN`).
    pub feed_token_digest: Option<Digest>,
    /// The store's snapshot version, as last seen by the watcher.
    pub version: tokio::sync::watch::Sender<u64>,
    /// Failed token attempts per client address.
    pub guard: AuthGuard,
    /// The store's engine, as `keyward_replica_info` names it.
    pub engine: &'static str,
    /// This process's name among the replicas (`--replica`).
    pub replica: String,
    pub metrics: crate::metrics::Metrics,
    /// The console's notices and once-shown secrets, per session, in memory only.
    pub console: crate::console::ConsoleState,
    /// Mark console cookies `Secure` (served over TLS, or `--console-secure` behind a proxy).
    pub console_secure: bool,
    /// Fleet rate limits: the rate store (`--rate-store`), if any, and this replica's view.
    pub rates: crate::rates::Rates,
    /// Feed pages read ahead: see [`FeedPrefetch`].
    pub prefetch: FeedPrefetch,
}

/// A page read ahead, or being read: its continuation `(since, after)` and the page (`None` if
/// the read failed).
type Prefetched = ((u64, String), Arc<tokio::sync::OnceCell<Option<keyward_core::feed::FeedMessage>>>);

/// Feed pages read ahead. Once a page with a cursor is answered, the next one is read in the
/// background while the Envoy applies this one, so the two overlap instead of taking turns. A
/// page read ahead is answered only while the store's version is still the one it was read at
/// (else it is read again); a request that arrives while it is being read waits for it.
#[derive(Default)]
pub struct FeedPrefetch {
    pages: Mutex<std::collections::VecDeque<Prefetched>>,
}

/// Pages held at most (about a megabyte each): a few Envoys taking a full snapshot at once.
const PREFETCH_MAX: usize = 4;

impl FeedPrefetch {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<Prefetched>> {
        self.pages.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The page read ahead for `(since, after)`, taken out.
    fn take(&self, since: u64, after: &str) -> Option<Arc<tokio::sync::OnceCell<Option<keyward_core::feed::FeedMessage>>>> {
        let mut pages = self.lock();
        let i = pages.iter().position(|((s, a), _)| *s == since && a == after)?;
        pages.remove(i).map(|(_, cell)| cell)
    }

    /// A new slot for `(since, after)`, unless one is there already.
    fn slot(&self, since: u64, after: &str) -> Option<Arc<tokio::sync::OnceCell<Option<keyward_core::feed::FeedMessage>>>> {
        let mut pages = self.lock();
        if pages.iter().any(|((s, a), _)| *s == since && a == after) {
            return None;
        }
        if pages.len() >= PREFETCH_MAX {
            pages.pop_front();
        }
        let cell = Arc::new(tokio::sync::OnceCell::new());
        pages.push_back(((since, after.to_string()), Arc::clone(&cell)));
        Some(cell)
    }
}

/// Wrong tokens tolerated from one client address per window; then 429 until the window ends.
pub const AUTH_FAILURES_ALLOWED: u32 = 10;
pub const AUTH_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);
/// Addresses tracked at most; beyond it, expired entries are dropped first, then the oldest.
const AUTH_TRACKED_MAX: usize = 10_000;

/// Brute-force protection for the admin and feed tokens: counts wrong or missing tokens per
/// client address in a fixed window. A blocked address is refused before its token is even
/// compared, so guessing gains nothing once the limit is reached; other addresses are unaffected.
#[derive(Default)]
pub struct AuthGuard {
    failures: Mutex<HashMap<IpAddr, (u32, std::time::Instant)>>,
}

impl AuthGuard {
    /// Seconds until `ip` may try again, if it is blocked now.
    pub fn blocked(&self, ip: IpAddr, now: std::time::Instant) -> Option<u64> {
        let map = self.failures.lock().ok()?;
        let (count, since) = map.get(&ip)?;
        let left = AUTH_WINDOW.checked_sub(now.duration_since(*since)).filter(|l| !l.is_zero())?;
        (*count >= AUTH_FAILURES_ALLOWED).then(|| left.as_secs().max(1))
    }

    /// Counts a failure; true if it is the one that blocks `ip`.
    /// Blocks `ip` for `secs` from `now`: another replica saw it reach the limit.
    pub fn block(&self, ip: IpAddr, secs: u64, now: std::time::Instant) {
        let Ok(mut map) = self.failures.lock() else { return };
        let left = std::time::Duration::from_secs(secs).min(AUTH_WINDOW);
        let since = now.checked_sub(AUTH_WINDOW - left).unwrap_or(now);
        map.insert(ip, (AUTH_FAILURES_ALLOWED, since));
    }

    pub fn failed(&self, ip: IpAddr, now: std::time::Instant) -> bool {
        let Ok(mut map) = self.failures.lock() else { return false };
        if map.len() >= AUTH_TRACKED_MAX && !map.contains_key(&ip) {
            map.retain(|_, (_, since)| now.duration_since(*since) < AUTH_WINDOW);
            if map.len() >= AUTH_TRACKED_MAX {
                if let Some(oldest) = map.iter().min_by_key(|(_, (_, since))| *since).map(|(k, _)| *k) {
                    map.remove(&oldest);
                }
            }
        }
        let entry = map.entry(ip).or_insert((0, now));
        if now.duration_since(entry.1) >= AUTH_WINDOW {
            *entry = (0, now);
        }
        entry.0 = entry.0.saturating_add(1);
        entry.0 == AUTH_FAILURES_ALLOWED
    }
}

/// The client's address (`ConnectInfo`), or `0.0.0.0` when the router runs without one (tests).
pub(crate) fn client_ip(req: &Request) -> IpAddr {
    req.extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0.ip())
}

impl AppState {
    pub fn new(store: Store, token_digest: Digest, feed_token_digest: Option<Digest>) -> Result<AppState> {
        let version = store.snapshot_version()?;
        Ok(AppState {
            store: Mutex::new(store),
            token_digest: std::sync::RwLock::new(token_digest),
            token_from_store: false,
            feed_token_digest,
            version: tokio::sync::watch::channel(version).0,
            guard: AuthGuard::default(),
            engine: "sqlite",
            replica: "keyward".into(),
            metrics: crate::metrics::Metrics::default(),
            console: crate::console::ConsoleState::default(),
            console_secure: false,
            rates: crate::rates::Rates::default(),
            prefetch: FeedPrefetch::default(),
        })
    }

    /// The store, for one operation at a time. A panic in an earlier one rolled its transaction
    /// back as it unwound (`Tx`'s drop), so the store behind a poisoned lock is sound: carry on
    /// rather than refuse every request from then on.
    pub fn lock_store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|poisoned| {
            tracing::error!("a store operation panicked earlier; its transaction was rolled back");
            self.store.clear_poison();
            poisoned.into_inner()
        })
    }

    /// Re-reads the store's version and wakes feed requests if it moved. Changes made by the
    /// CLI straight to the file are seen this way too.
    pub fn refresh_version(&self) -> Result<u64> {
        let store = self.lock_store();
        let v = store.snapshot_version()?;
        if self.token_from_store {
            if let Some(d) = store.meta("admin_token_sha256")?.and_then(|h| Digest::from_hex(&h)) {
                if let Ok(mut t) = self.token_digest.write() {
                    *t = d;
                }
            }
        }
        drop(store);
        self.version.send_if_modified(|cur| {
            let moved = *cur != v;
            *cur = v;
            moved
        });
        Ok(v)
    }
}

/// Watches the store's version every `period`, waking feed requests when it moves.
pub async fn watch_version(state: Arc<AppState>, period: std::time::Duration) {
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        let s = Arc::clone(&state);
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || s.refresh_version()).await {
            tracing::warn!(error = %e, "reading the snapshot version");
        }
    }
}

/// Says every second that this replica lives, so `keyward status` and the CLI's
/// read-your-writes see it, on whichever replica or host they run.
pub async fn heartbeat(state: Arc<AppState>, replica: String) {
    let started_at = crate::store::now_unix();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tick.tick().await;
        let (s, name) = (Arc::clone(&state), replica.clone());
        let beat = tokio::task::spawn_blocking(move || {
            let mut store = s.lock_store();
            store.replica_seen(&name, started_at)
        });
        if let Ok(Err(e)) = beat.await {
            tracing::warn!(error = %e, "recording this replica's heartbeat");
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        if matches!(self, Error::Store(_) | Error::Postgres(_) | Error::Internal(_)) {
            tracing::error!(error = %self, "request failed");
        }
        let status = StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (status, Json(self.body())).into_response();
        if let Some(secs) = self.retry_after_secs() {
            resp.headers_mut().insert("retry-after", axum::http::HeaderValue::from(secs));
        }
        resp
    }
}

/// What a listener serves: with `--feed-listen`, the admin API on one and the feed on the
/// other; without it, both on one. Probes and `/metrics` answer on every listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    Feed,
    AdminAndFeed,
}

impl Role {
    /// The `role` label of `keyward_replica_info`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Feed => "feed",
            Role::AdminAndFeed => "admin+feed",
        }
    }

    /// Which listener serves a route of [`ROUTES`]; `None`: every listener.
    fn of_route(path: &str) -> Option<Role> {
        match path {
            "/healthz" | "/readyz" | "/metrics" => None,
            p if p.starts_with("/v1/feed") => Some(Role::Feed),
            _ => Some(Role::Admin),
        }
    }
}

/// The router of a listener serving both the admin API and the feed.
pub fn router(state: Arc<AppState>) -> Router {
    router_for(state, Role::AdminAndFeed)
}

/// A listener's router: the routes its `role` serves, and for the other listener's routes a
/// 404 that says where they are.
pub fn router_for(state: Arc<AppState>, role: Role) -> Router {
    let admin = Router::new()
        .route("/v1/agents", get(list_agents).post(create_agent))
        .route("/v1/agents/{name}", get(show_agent).patch(update_agent).delete(delete_agent))
        .route("/v1/agents/{name}/disable", post(disable_agent))
        .route("/v1/agents/{name}/enable", post(enable_agent))
        .route("/v1/keys", get(list_keys).post(create_key))
        .route("/v1/keys/import", post(import_key))
        .route("/v1/keys/{id}", get(get_key).patch(update_key))
        .route("/v1/keys/{id}/revoke", post(revoke_key))
        .route("/v1/keys/{id}/rotate", post(rotate_key))
        .route("/v1/scopes", get(list_scopes).post(add_scope))
        .route("/v1/scopes/{name}", delete(remove_scope))
        .route("/v1/scopes/{name}/implies", post(imply_scope))
        .route("/v1/status", get(status))
        .route("/v1/audit", get(audit))
        .route("/v1/snapshot", get(snapshot))
        .route("/v1/usage", get(usage))
        .route("/v1/admins", get(list_admins).post(create_admin))
        .route("/v1/admins/{name}/disable", post(disable_admin))
        .route("/v1/admins/{name}/enable", post(enable_admin))
        .route("/v1/admins/{name}/token", post(admin_token))
        .route_layer(axum::middleware::from_fn_with_state(Arc::clone(&state), require_admin))
        .merge(crate::console::router(Arc::clone(&state)));
    let feed = Router::new()
        .route("/v1/feed", get(feed))
        // A usage report names up to 2,000 keys (the filter batches them): about 120 KiB.
        .route("/v1/feed/usage", post(feed_usage).layer(DefaultBodyLimit::max(USAGE_MAX_BODY_BYTES)))
        // A rate report names up to 2,000 buckets (`RATE_REPORT_MAX_BUCKETS`): about 200 KiB.
        .route("/v1/feed/rates", post(feed_rates).layer(DefaultBodyLimit::max(USAGE_MAX_BODY_BYTES)))
        .route_layer(axum::middleware::from_fn_with_state(Arc::clone(&state), require_feed_token));
    let app = Router::new()
        .route("/healthz", get(|| async { Json(serde_json::json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(move |State(state): State<Arc<AppState>>| metrics(state, role)));
    let app = match role {
        Role::AdminAndFeed => app.merge(admin).merge(feed),
        Role::Admin => app.merge(admin).merge(elsewhere(Role::Feed)),
        Role::Feed => app.merge(feed).merge(elsewhere(Role::Admin)),
    };
    app.fallback(|req: Request| async move { Error::NoRoute(format!("{} {}", req.method(), req.uri().path())) })
        .method_not_allowed_fallback(|req: Request| async move { Error::MethodNotAllowed(format!("{} {}", req.method(), req.uri().path())) })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(log_request))
        .with_state(state)
}

/// The routes of the listener `other`, each answering a 404 that names that listener.
fn elsewhere(other: Role) -> Router<Arc<AppState>> {
    let paths: std::collections::BTreeSet<&str> = ROUTES.iter().map(|(_, p)| *p).filter(|p| Role::of_route(p) == Some(other)).collect();
    paths.into_iter().fold(Router::new(), |r, path| {
        r.route(
            path,
            axum::routing::any(move |req: Request| async move {
                Error::OtherListener { route: format!("{} {}", req.method(), req.uri().path()), listener: other.as_str() }
            }),
        )
    })
}

/// `GET /metrics`: OpenMetrics text; see [`crate::metrics`].
async fn metrics(state: Arc<AppState>, role: Role) -> Result<Response> {
    // Without the store the process's own metrics still answer, with no Envoy series.
    let envoys = match with_store(&state, "metrics.status", |s| s.status()).await {
        Ok(status) => crate::metrics::envoy_series(&status),
        Err(e) => {
            tracing::warn!(error = %e, "reading the Envoys for /metrics");
            Vec::new()
        }
    };
    let snapshot_version = *state.version.borrow();
    let rate_store_up = state.rates.store.as_ref().map(|s| s.health().0);
    let scrape = crate::metrics::Scrape { replica: &state.replica, engine: state.engine, role: role.as_str(), snapshot_version, envoys: &envoys, rate_store_up };
    let text = state.metrics.render(&scrape).map_err(|e| Error::Internal(format!("encoding metrics: {e}")))?;
    Ok(([(axum::http::header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response())
}

/// Logs each request's method, path, status and latency at debug level. Never headers or
/// bodies: they carry the admin token and new keys.
async fn log_request(req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    tracing::debug!(%method, %path, status = resp.status().as_u16(), micros = started.elapsed().as_micros() as u64, "request");
    resp
}

/// Constant-time comparison of two digests.
fn digests_equal(a: &Digest, b: &Digest) -> bool {
    constant_time_eq(&a.0, &b.0)
}

/// Whether two byte strings are equal, in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.get(..7).filter(|s| s.eq_ignore_ascii_case("bearer ")).map(|_| v[7..].trim()))
}

/// The feed is open unless `KEYWARD_FEED_TOKEN` is set; then Envoys must send it.
async fn require_feed_token(State(state): State<Arc<AppState>>, headers: HeaderMap, req: Request, next: Next) -> Response {
    let Some(want) = state.feed_token_digest else {
        return next.run(req).await;
    };
    let feed = "the feed needs 'Authorization: Bearer <feed token>'";
    guarded(&state, &headers, &want, (feed, feed), req, next).await
}

tokio::task_local! {
    /// Who the request being served acts for: the audit log names them.
    static ACTOR: Actor;
}

/// Runs `fut` acting for `actor`: every store change it makes is audited under their name.
pub async fn acting_as<F: std::future::Future>(actor: Actor, fut: F) -> F::Output {
    ACTOR.scope(actor, fut).await
}

/// What a request needs: reading takes any role; changing the catalogue or the admins takes an
/// owner; any other change takes an editor.
pub fn permission(method: &axum::http::Method, path: &str) -> Permission {
    if matches!(*method, axum::http::Method::GET | axum::http::Method::HEAD) {
        Permission::Read
    } else if path.starts_with("/v1/scopes") || path.starts_with("/v1/admins") {
        Permission::Own
    } else {
        Permission::ManageKeys
    }
}

impl AppState {
    /// Who holds the token with this digest: the bootstrap owner, an enabled admin, or nobody.
    pub async fn actor_for(self: &Arc<Self>, digest: Digest) -> Result<Option<Actor>> {
        let bootstrap = match self.token_digest.read() {
            Ok(d) => *d,
            Err(_) => return Err(Error::Internal("token lock poisoned".into())),
        };
        if digests_equal(&digest, &bootstrap) {
            return Ok(Some(Actor::bootstrap()));
        }
        with_store(self, "admin_by_token", move |s| s.admin_by_token(&digest)).await
    }

    /// Refuses an address blocked for too many failures; `Some(retry after)` if it is.
    pub fn blocked(&self, ip: IpAddr) -> Option<u64> {
        self.guard.blocked(ip, std::time::Instant::now())
    }

    /// Counts a wrong or missing credential from `ip`, across replicas on PostgreSQL.
    pub async fn failed_attempt(self: &Arc<Self>, ip: IpAddr) {
        let now = std::time::Instant::now();
        if self.guard.failed(ip, now) {
            self.metrics.lockout();
        }
        if self.engine == "postgres" {
            // Replicas count together: an address gets its ten tries from all of them, not
            // ten from each. The failure that reaches the limit blocks it everywhere.
            let address = ip.to_string();
            let counted = with_store(self, "guard.failure", move |s| {
                s.auth_failure(&address, AUTH_WINDOW.as_secs() as i64, u64::from(AUTH_FAILURES_ALLOWED))
            })
            .await;
            match counted {
                Ok((count, until)) if count >= u64::from(AUTH_FAILURES_ALLOWED) => {
                    let left = u64::try_from(until - crate::store::now_unix()).unwrap_or(0);
                    self.guard.block(ip, left, now);
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "counting a failed token attempt in the store"),
            }
        }
        tracing::warn!(client = %ip, "request with a wrong or missing token");
    }
}

/// The admin API's gate: the bootstrap token or an admin's personal token, whose role must
/// allow the request. Guessing is limited per client address.
async fn require_admin(State(state): State<Arc<AppState>>, headers: HeaderMap, req: Request, next: Next) -> Response {
    let ip = client_ip(&req);
    if let Some(retry_after_secs) = state.blocked(ip) {
        return Error::TooManyAttempts { retry_after_secs }.into_response();
    }
    let token = bearer(&headers);
    let actor = match token {
        Some(t) => match state.actor_for(Digest::of(t.as_bytes())).await {
            Ok(a) => a,
            Err(e) => return e.into_response(),
        },
        None => None,
    };
    let Some(actor) = actor else {
        state.failed_attempt(ip).await;
        let message = if token.is_some() {
            "the admin token is not valid"
        } else {
            "send the admin token (or your personal admin token) as 'Authorization: Bearer <token>'"
        };
        return Error::Unauthorized(message.into()).into_response();
    };
    let need = permission(req.method(), req.uri().path());
    if !actor.role.allows(need) {
        return Error::Forbidden(actor.role.refusal(need)).into_response();
    }
    acting_as(actor, next.run(req)).await
}

/// Compares the bearer token with `want` (as digests, in constant time), unless this client
/// address is blocked for too many failures; counts every failure.
/// `messages`: what to say when the token is missing, and when it is wrong.
async fn guarded(state: &Arc<AppState>, headers: &HeaderMap, want: &Digest, messages: (&str, &str), req: Request, next: Next) -> Response {
    let ip = client_ip(&req);
    if let Some(retry_after_secs) = state.blocked(ip) {
        return Error::TooManyAttempts { retry_after_secs }.into_response();
    }
    match bearer(headers) {
        Some(token) if digests_equal(&Digest::of(token.as_bytes()), want) => next.run(req).await,
        found => {
            state.failed_attempt(ip).await;
            let message = if found.is_some() { messages.1 } else { messages.0 };
            Error::Unauthorized(message.into()).into_response()
        }
    }
}

/// Runs a store operation off the async runtime, timed in `keyward_store_operation_seconds`
/// under `name`.
pub async fn with_store<T: Send + 'static>(
    state: &Arc<AppState>,
    name: &'static str,
    op: impl FnOnce(&mut Store) -> Result<T> + Send + 'static,
) -> Result<T> {
    let state = Arc::clone(state);
    let actor = ACTOR.try_with(|a| a.name.clone()).ok();
    tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let mut store = state.lock_store();
        // Work not done for an admin (the feed moving the version past an Envoy's) is the
        // server's own, audited as `api` as before admins existed.
        store.actor = actor.unwrap_or_else(|| Actor::bootstrap().name);
        let out = op(&mut store);
        drop(store);
        state.metrics.store_op(name, started.elapsed());
        out
    })
    .await
    .map_err(|e| Error::Internal(format!("store task failed: {e}")))?
}

/// The request body, or a JSON error if it could not be read (too large, cut short).
type Body = std::result::Result<Bytes, BytesRejection>;

/// `?wait=false` skips waiting for the Envoys after a change.
#[derive(Debug, Deserialize)]
struct WaitQuery {
    wait: Option<String>,
}

fn wait_param(q: std::result::Result<Query<WaitQuery>, QueryRejection>) -> Result<bool> {
    match query(q, "wait")?.wait.as_deref() {
        None | Some("true" | "1") => Ok(true),
        Some("false" | "0") => Ok(false),
        Some(other) => Err(Error::Invalid { field: "wait", message: format!("{other:?} must be true or false") }),
    }
}

type WaitQ = std::result::Result<Query<WaitQuery>, QueryRejection>;

/// Runs a changing store operation, wakes the feed at once (rather than at the watcher's next
/// look), then waits until every connected Envoy has applied it (unless `wait` is false).
/// Answers the operation's result, and how far the change reached if it changed anything.
pub async fn change<T: Send + 'static>(
    state: &Arc<AppState>,
    name: &'static str,
    wait: bool,
    op: impl FnOnce(&mut Store) -> Result<T> + Send + 'static,
) -> Result<(T, Option<Applied>)> {
    let (out, version) = with_store(state, name, move |s| {
        s.last_change = None;
        let out = op(s)?;
        Ok((out, s.last_change.take()))
    })
    .await?;
    let Some(version) = version else {
        return Ok((out, None));
    };
    state.metrics.change();
    let s = Arc::clone(state);
    let _ = tokio::task::spawn_blocking(move || s.refresh_version()).await;
    Ok((out, Some(wait_applied(state, version, wait).await?)))
}

/// [`change`], answered as JSON with an `applied` object.
async fn mutate<T: Serialize + Send + 'static>(
    state: &Arc<AppState>,
    name: &'static str,
    wait: bool,
    status: StatusCode,
    op: impl FnOnce(&mut Store) -> Result<T> + Send + 'static,
) -> Result<Response> {
    let (out, applied) = change(state, name, wait, op).await?;
    let mut value = serde_json::to_value(out).map_err(|e| Error::Internal(e.to_string()))?;
    if let (Some(applied), Some(obj)) = (applied, value.as_object_mut()) {
        obj.insert("applied".into(), serde_json::to_value(applied).map_err(|e| Error::Internal(e.to_string()))?);
    }
    Ok(ok(status, value))
}

/// Waits (up to [`crate::applied::DEFAULT_WAIT`]) until every Envoy connected now has applied
/// `version`, as its next feed request says.
async fn wait_applied(state: &Arc<AppState>, version: u64, wait: bool) -> Result<Applied> {
    let start = std::time::Instant::now();
    loop {
        let (done, pending) = with_store(state, "envoys_applied", move |s| s.envoys_applied(version)).await?;
        if !wait || pending.is_empty() || start.elapsed() >= crate::applied::DEFAULT_WAIT {
            return Ok(crate::applied::applied(version, true, wait, &done, pending, start));
        }
        tokio::time::sleep(crate::applied::POLL).await;
    }
}

/// Parses a JSON request body (at most [`MAX_BODY_BYTES`]); an empty body is `{}`.
fn parse<T: DeserializeOwned>(body: Body) -> Result<T> {
    parse_limited(body, MAX_BODY_BYTES)
}

/// [`parse`] for a route whose body limit is `limit` bytes, so a 413 names the right size.
fn parse_limited<T: DeserializeOwned>(body: Body, limit: usize) -> Result<T> {
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => Error::TooLarge(limit),
        _ => Error::Invalid { field: "request", message: e.body_text() },
    })?;
    let body: &[u8] = if body.is_empty() { b"{}" } else { &body };
    serde_json::from_slice(body).map_err(|e| Error::Invalid { field: "request", message: format!("invalid JSON body: {e}") })
}

fn ok<T: Serialize>(status: StatusCode, value: T) -> Response {
    (status, Json(value)).into_response()
}

async fn readyz(State(state): State<Arc<AppState>>) -> Result<Response> {
    let version = with_store(&state, "readyz", |s| s.snapshot_version()).await?;
    Ok(ok(StatusCode::OK, serde_json::json!({"status": "ready", "snapshot_version": version})))
}

async fn list_agents(State(state): State<Arc<AppState>>) -> Result<Response> {
    Ok(ok(StatusCode::OK, with_store(&state, "agent.list", |s| s.list_agents()).await?))
}

async fn create_agent(State(state): State<Arc<AppState>>, w: WaitQ, body: Body) -> Result<Response> {
    let req: NewAgent = parse(body)?;
    mutate(&state, "agent.create", wait_param(w)?, StatusCode::CREATED, move |s| s.create_agent(&req)).await
}

async fn update_agent(State(state): State<Arc<AppState>>, Path(name): Path<String>, w: WaitQ, body: Body) -> Result<Response> {
    let req: AgentUpdate = parse(body)?;
    mutate(&state, "agent.update", wait_param(w)?, StatusCode::OK, move |s| s.update_agent(&name, &req)).await
}

async fn show_agent(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Result<Response> {
    Ok(ok(StatusCode::OK, with_store(&state, "agent.show", move |s| s.show_agent(&name)).await?))
}

async fn delete_agent(State(state): State<Arc<AppState>>, Path(name): Path<String>, w: WaitQ) -> Result<Response> {
    mutate(&state, "agent.delete", wait_param(w)?, StatusCode::OK, move |s| s.delete_agent(&name)).await
}

async fn disable_agent(State(state): State<Arc<AppState>>, Path(name): Path<String>, w: WaitQ, body: Body) -> Result<Response> {
    let req: DisableAgent = parse(body)?;
    mutate(&state, "agent.disable", wait_param(w)?, StatusCode::OK, move |s| s.set_agent_enabled(&name, false, req.reason.as_deref())).await
}

async fn enable_agent(State(state): State<Arc<AppState>>, Path(name): Path<String>, w: WaitQ) -> Result<Response> {
    mutate(&state, "agent.enable", wait_param(w)?, StatusCode::OK, move |s| s.set_agent_enabled(&name, true, None)).await
}

#[derive(Debug, Deserialize)]
struct KeyQuery {
    agent: Option<String>,
}

fn query<T>(q: std::result::Result<Query<T>, QueryRejection>, field: &'static str) -> Result<T> {
    q.map(|Query(q)| q).map_err(|e| Error::Invalid { field, message: e.body_text() })
}

async fn list_keys(State(state): State<Arc<AppState>>, q: std::result::Result<Query<KeyQuery>, QueryRejection>) -> Result<Response> {
    let q = query(q, "agent")?;
    Ok(ok(StatusCode::OK, with_store(&state, "key.list", move |s| s.list_keys(q.agent.as_deref())).await?))
}

async fn create_key(State(state): State<Arc<AppState>>, w: WaitQ, body: Body) -> Result<Response> {
    let req: NewKey = parse(body)?;
    mutate(&state, "key.create", wait_param(w)?, StatusCode::CREATED, move |s| s.create_key(&req)).await
}

async fn import_key(State(state): State<Arc<AppState>>, w: WaitQ, body: Body) -> Result<Response> {
    let req: ImportKey = parse(body)?;
    mutate(&state, "key.import", wait_param(w)?, StatusCode::CREATED, move |s| s.import_key(&req)).await
}

async fn get_key(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Response> {
    Ok(ok(StatusCode::OK, with_store(&state, "key.show", move |s| s.get_key(&id)).await?))
}

async fn update_key(State(state): State<Arc<AppState>>, Path(id): Path<String>, w: WaitQ, body: Body) -> Result<Response> {
    let req: KeyUpdate = parse(body)?;
    mutate(&state, "key.update", wait_param(w)?, StatusCode::OK, move |s| s.update_key(&id, &req)).await
}

async fn revoke_key(State(state): State<Arc<AppState>>, Path(id): Path<String>, w: WaitQ) -> Result<Response> {
    mutate(&state, "key.revoke", wait_param(w)?, StatusCode::OK, move |s| s.revoke_key(&id)).await
}

async fn rotate_key(State(state): State<Arc<AppState>>, Path(id): Path<String>, w: WaitQ, body: Body) -> Result<Response> {
    let req: RotateKey = parse(body)?;
    mutate(&state, "key.rotate", wait_param(w)?, StatusCode::CREATED, move |s| s.rotate_key(&id, &req)).await
}

async fn list_scopes(State(state): State<Arc<AppState>>) -> Result<Response> {
    Ok(ok(StatusCode::OK, with_store(&state, "scope.list", |s| s.list_scopes()).await?))
}

async fn add_scope(State(state): State<Arc<AppState>>, w: WaitQ, body: Body) -> Result<Response> {
    let req: NewScope = parse(body)?;
    mutate(&state, "scope.add", wait_param(w)?, StatusCode::CREATED, move |s| s.add_scope(&req)).await
}

async fn remove_scope(State(state): State<Arc<AppState>>, Path(name): Path<String>, w: WaitQ) -> Result<Response> {
    mutate(&state, "scope.remove", wait_param(w)?, StatusCode::OK, move |s| s.remove_scope(&name)).await
}

async fn imply_scope(State(state): State<Arc<AppState>>, Path(name): Path<String>, w: WaitQ, body: Body) -> Result<Response> {
    let req: Imply = parse(body)?;
    mutate(&state, "scope.imply", wait_param(w)?, StatusCode::OK, move |s| s.imply_scope(&name, &req)).await
}

async fn status(State(state): State<Arc<AppState>>) -> Result<Response> {
    Ok(ok(StatusCode::OK, with_store(&state, "status", |s| s.status()).await?))
}

#[derive(Debug, Deserialize)]
struct UsageQuery {
    agent: Option<String>,
    since: Option<String>,
}

async fn usage(State(state): State<Arc<AppState>>, q: std::result::Result<Query<UsageQuery>, QueryRejection>) -> Result<Response> {
    let q = query(q, "since")?;
    let window = crate::model::parse_duration("since", q.since.as_deref().unwrap_or("24h"))?;
    let since = crate::store::now_unix().saturating_sub(window);
    Ok(ok(StatusCode::OK, with_store(&state, "usage", move |s| s.usage(q.agent.as_deref(), since)).await?))
}

#[derive(Debug, Deserialize)]
struct FeedQuery {
    #[serde(default)]
    since: u64,
    after: Option<String>,
    envoy: Option<String>,
    /// The store whose records the Envoy holds: empty before its first apply; absent from a
    /// filter older than resets, which refuses a page with fields it does not know.
    store: Option<String>,
    #[serde(default)]
    wait: u64,
    /// `2` for the line form (`keyward_core::feed::LINES_FORMAT`); absent or `1` for JSON, which
    /// is what a filter from before the line form gets.
    format: Option<String>,
    /// The filter's `max_feed_bytes`: a line page ends early rather than outgrow it.
    max_bytes: Option<usize>,
    /// `native` from libkeyward.so; keyward.wasm does not say.
    shell: Option<String>,
}

/// `GET /v1/feed`: the records changed since `since`, at once if there are any, else when the
/// next change lands or after `wait` seconds, whichever is first. A long-poll: see docs/decisions.md.
///
/// A reset answers an Envoy whose records are not this store's: it names another store
/// (`store=`), or it is ahead of this one (a restore that kept the id). The answer is then the
/// whole snapshot from version 0 with `reset: true` on its first page; its further pages are
/// asked for with this store's id and a cursor, so they are plain continuations. A filter
/// older than resets sends no `store=` and gets pages without `store` and `reset` (its parser
/// refuses unknown fields): the whole snapshot when it is ahead, as before.
async fn feed(State(state): State<Arc<AppState>>, q: std::result::Result<Query<FeedQuery>, QueryRejection>) -> Result<Response> {
    let _open = state.metrics.feed_client();
    let q = query(q, "since")?;
    let envoy = q.envoy.clone().unwrap_or_else(|| "unnamed".into());
    if envoy.len() > 256 {
        return Err(Error::Invalid { field: "envoy", message: "at most 256 characters".into() });
    }
    if q.store.as_deref().is_some_and(|id| !id.is_empty() && !keyward_core::feed::valid_store_id(id)) {
        return Err(Error::Invalid { field: "store", message: "1 to 64 letters, digits or underscores".into() });
    }
    let shell = match q.shell.as_deref() {
        None => None,
        Some(s @ ("wasm" | "native")) => Some(s.to_string()),
        Some(_) => return Err(Error::Invalid { field: "shell", message: "wasm or native".into() }),
    };
    let lines = match q.format.as_deref() {
        None | Some("1") => false,
        Some(keyward_core::feed::LINES_FORMAT) => true,
        Some(_) => return Err(Error::Invalid { field: "format", message: "1 (JSON, the default) or 2 (the line form)".into() }),
    };
    let mut rx = state.version.subscribe();
    let mut current = *rx.borrow_and_update();
    if q.since > current {
        // The watcher may not have seen the newest change yet: ask the store itself.
        let s = Arc::clone(&state);
        if let Ok(Ok(v)) = tokio::task::spawn_blocking(move || s.refresh_version()).await {
            current = v;
        }
    }
    if q.since > current && q.since <= MAX_ADVANCE {
        // The Envoy applied a version this store has not reached (a restore without `rekey`):
        // the store jumps past it, so what the Envoy gets next is newer than what it holds.
        let seen = q.since;
        let advanced = with_store(&state, "feed.advance", move |s| s.advance_past(seen)).await?;
        tracing::warn!(envoy = %envoy, envoy_version = seen, store_version = current, now = advanced, "an Envoy was ahead of the store; the store's version moved past it");
        let s = Arc::clone(&state);
        let _ = tokio::task::spawn_blocking(move || s.refresh_version()).await;
    }
    let store_id = with_store(&state, "feed.store_id", |s| s.store_id()).await?;
    // An Envoy ahead of the store (restored, replaced) or holding another store's records has
    // applied nothing of it: it gets the whole snapshot at once, and counts as behind until it
    // asks again.
    let reset = q.since > current || q.store.as_ref().is_some_and(|id| !id.is_empty() && *id != store_id);
    // Asking for changes after `since` means `since` is applied (mid-delta pages excepted).
    let applied = match (reset, q.after.is_none()) {
        (true, _) => Some(0),
        (false, true) => Some(q.since),
        (false, false) => None,
    };
    let wait = if reset { 0 } else { q.wait.min(MAX_FEED_WAIT_SECS) };
    let open_until = crate::store::now_unix() + i64::try_from(wait).unwrap_or(0) + 2;
    let id = envoy.clone();
    let said = shell.clone();
    with_store(&state, "feed.seen", move |s| s.envoy_seen(&id, applied, open_until, said.as_deref())).await?;
    if q.after.is_none() && current <= q.since && wait > 0 {
        let wait = std::time::Duration::from_secs(wait);
        let _ = tokio::time::timeout(wait, async {
            while *rx.borrow_and_update() <= q.since {
                if rx.changed().await.is_err() {
                    break;
                }
            }
        })
        .await;
    }
    let (since, after) = if reset { (0, None) } else { (q.since, q.after.clone()) };
    if reset {
        tracing::info!(envoy = %envoy, since = q.since, envoy_store = q.store.as_deref().unwrap_or("-"), store = %store_id, "feed reset: the whole snapshot replaces what the Envoy holds");
    }
    let mut page = feed_page(&state, since, after).await?;
    // Answered: connected for as long as it takes to ask again.
    with_store(&state, "feed.seen", move |s| s.envoy_seen(&envoy, None, crate::store::now_unix() + 2, shell.as_deref())).await?;
    if let Some(next) = &page.cursor {
        read_ahead(&state, next.version, next.id.clone());
    }
    if q.store.is_some() {
        page.store = Some(store_id);
        page.reset = reset;
    } else {
        page.store = None;
    }
    if !lines {
        return Ok(ok(StatusCode::OK, page));
    }
    // The store validated every record when it was written: one that does not compile is a bug
    // here, which a JSON page would have made every filter refuse.
    let body = page.to_lines(q.max_bytes.unwrap_or(usize::MAX)).map_err(|e| Error::Internal(format!("feed page version {}: {e}", page.version)))?;
    Ok(([(axum::http::header::CONTENT_TYPE, keyward_core::feed::LINES_CONTENT_TYPE)], body).into_response())
}

/// A feed page: read ahead if it was (and the store has not moved since), else read now.
async fn feed_page(state: &Arc<AppState>, since: u64, after: Option<String>) -> Result<keyward_core::feed::FeedMessage> {
    if let Some(cell) = after.as_deref().and_then(|a| state.prefetch.take(since, a)) {
        let current = cell.get_or_init(|| async { read_page(Arc::clone(state), since, after.clone()).await.ok() }).await.as_ref().is_some_and(|p| p.version == *state.version.borrow());
        if current {
            // The background task is done with it: the page itself, else (still shared) a copy.
            let page = match Arc::try_unwrap(cell) {
                Ok(cell) => cell.into_inner().flatten(),
                Err(cell) => cell.get().cloned().flatten(),
            };
            if let Some(page) = page {
                return Ok(page);
            }
        }
    }
    read_page(Arc::clone(state), since, after).await
}

async fn read_page(state: Arc<AppState>, since: u64, after: Option<String>) -> Result<keyward_core::feed::FeedMessage> {
    with_store(&state, "feed.page", move |s| s.feed_page(since, after.as_deref(), crate::store::FEED_PAGE)).await
}

/// Reads the page after `(since, after)` in the background (see [`FeedPrefetch`]).
fn read_ahead(state: &Arc<AppState>, since: u64, after: String) {
    let Some(cell) = state.prefetch.slot(since, &after) else { return };
    let state = Arc::clone(state);
    tokio::spawn(async move {
        cell.get_or_init(|| async { read_page(Arc::clone(&state), since, Some(after)).await.ok() }).await;
    });
}

async fn feed_usage(State(state): State<Arc<AppState>>, body: Body) -> Result<Response> {
    let report: keyward_core::feed::UsageReport = parse_limited(body, USAGE_MAX_BODY_BYTES)?;
    let known = with_store(&state, "feed.usage", move |s| s.record_usage(&report)).await?;
    Ok(ok(StatusCode::OK, serde_json::json!({"recorded": known})))
}

/// `POST /v1/feed/rates`: an Envoy's rate report, answered with the fleet's size and, with a
/// rate store that answers within [`crate::rates::REDIS_BOUND`], what the other Envoys admitted
/// in each bucket's window. See [`crate::rates`].
async fn feed_rates(State(state): State<Arc<AppState>>, body: Body) -> Result<Response> {
    let report: keyward_core::feed::RateReport = parse_limited(body, USAGE_MAX_BODY_BYTES)?;
    crate::rates::validate(&report)?;
    let now_ms = crate::rates::now_ms();
    let envoy = report.envoy.clone();
    let seen = state.rates.due_seen(&envoy);
    let fleet = tokio::time::timeout(
        crate::rates::STORE_WAIT,
        with_store(&state, "feed.rates", move |s| {
            if seen {
                s.envoy_reported(&envoy)?;
            }
            s.fleet_size()
        }),
    );
    let counted = async {
        match &state.rates.store {
            None => None,
            Some(store) => {
                let started = std::time::Instant::now();
                let counted = store.count(&report, now_ms).await;
                state.metrics.rate_store_call(started.elapsed());
                Some(counted)
            }
        }
    };
    let (fleet, counted) = tokio::join!(fleet, counted);
    let envoys = match fleet {
        Ok(Ok(n)) => state.rates.envoys_read(n),
        failed => {
            // The counts in Redis are already added: answer them with the last fleet size
            // rather than lose them. (A store still busy finishes the write on its own.)
            let error = match failed {
                Ok(Err(e)) => {
                    if seen {
                        state.rates.unseen(&report.envoy);
                    }
                    e.to_string()
                }
                _ => format!("no answer within {} ms", crate::rates::STORE_WAIT.as_millis()),
            };
            if state.rates.store_warning_due() {
                tracing::warn!(%error, "reading the fleet size for a rate report; the last size read answers (logged at most once per 10 s)");
            }
            state.rates.envoys_last()
        }
    };
    let counts = match counted {
        Some(Ok(counts)) => {
            state.rates.note_hot(&report, &counts, now_ms);
            Some(counts)
        }
        Some(Err(_)) => {
            state.metrics.rate_store_failure();
            None
        }
        None => None,
    };
    let answer = crate::rates::answer(&report, envoys, counts.as_deref());
    state.metrics.rate_report(answer.mode, report.buckets.len());
    Ok(ok(StatusCode::OK, answer))
}

/// Writes this replica's rate-limit view into the store every [`crate::rates::PERSIST_EVERY`]
/// (for `keyward status`, wherever it runs), after a PING if Redis has been idle.
pub async fn persist_rates(state: Arc<AppState>) {
    let name = format!("{}{}", crate::store::RATES_RUNTIME_PREFIX, state.replica);
    let mut tick = tokio::time::interval(crate::rates::PERSIST_EVERY);
    loop {
        tick.tick().await;
        if let Some(store) = &state.rates.store {
            store.probe().await;
        }
        let view = state.rates.runtime(crate::rates::now_ms());
        let Ok(value) = serde_json::to_string(&view) else { continue };
        let name = name.clone();
        if let Err(e) = with_store(&state, "rates.persist", move |s| s.put_runtime(&name, &value)).await {
            tracing::warn!(error = %e, "writing this replica's rate-limit view to the store");
        }
    }
}

#[derive(Debug, Deserialize)]
struct AuditQuery {
    limit: Option<u32>,
    actor: Option<String>,
    agent: Option<String>,
    action: Option<String>,
}

async fn audit(State(state): State<Arc<AppState>>, q: std::result::Result<Query<AuditQuery>, QueryRejection>) -> Result<Response> {
    let q = query(q, "limit")?;
    let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
    let filter = crate::model::AuditFilter { actor: q.actor, agent: q.agent, action: q.action };
    Ok(ok(StatusCode::OK, with_store(&state, "audit", move |s| s.audit_filtered(limit, &filter)).await?))
}

async fn snapshot(State(state): State<Arc<AppState>>) -> Result<Response> {
    Ok(ok(StatusCode::OK, with_store(&state, "snapshot", |s| s.snapshot()).await?))
}

async fn list_admins(State(state): State<Arc<AppState>>) -> Result<Response> {
    Ok(ok(StatusCode::OK, with_store(&state, "list_admins", |s| s.list_admins()).await?))
}

async fn create_admin(State(state): State<Arc<AppState>>, body: Body) -> Result<Response> {
    let req: NewAdmin = parse(body)?;
    Ok(ok(StatusCode::CREATED, with_store(&state, "create_admin", move |s| s.create_admin(&req)).await?))
}

async fn disable_admin(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Result<Response> {
    Ok(ok(StatusCode::OK, with_store(&state, "disable_admin", move |s| s.set_admin_enabled(&name, false)).await?))
}

async fn enable_admin(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Result<Response> {
    Ok(ok(StatusCode::OK, with_store(&state, "enable_admin", move |s| s.set_admin_enabled(&name, true)).await?))
}

async fn admin_token(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Result<Response> {
    Ok(ok(StatusCode::OK, with_store(&state, "admin_token", move |s| s.new_admin_token(&name)).await?))
}

#[cfg(test)]
mod permission_tests {
    use super::*;
    use axum::http::Method;

    #[test]
    fn reads_need_any_role_catalogue_and_admins_an_owner_the_rest_an_editor() {
        let table = [
            (Method::GET, "/v1/agents", Permission::Read),
            (Method::GET, "/v1/admins", Permission::Read),
            (Method::GET, "/v1/audit", Permission::Read),
            (Method::POST, "/v1/agents", Permission::ManageKeys),
            (Method::PATCH, "/v1/keys/key_1", Permission::ManageKeys),
            (Method::DELETE, "/v1/agents/a", Permission::ManageKeys),
            (Method::POST, "/v1/keys/import", Permission::ManageKeys),
            (Method::POST, "/v1/scopes", Permission::Own),
            (Method::DELETE, "/v1/scopes/x", Permission::Own),
            (Method::POST, "/v1/admins/bob/disable", Permission::Own),
        ];
        for (method, path, want) in table {
            assert_eq!(permission(&method, path), want, "{method} {path}");
        }
    }
}

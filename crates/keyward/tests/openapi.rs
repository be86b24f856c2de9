//! The OpenAPI document and the router agree: the same routes, and every documented route is
//! served (not a 404 or 405 from routing).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use keyward_control::api::{router, AppState, ROUTES};
use keyward_control::store::Store;
use keyward_core::Digest;
use std::collections::BTreeSet;
use std::sync::Arc;
use tower::ServiceExt;

fn documented() -> BTreeSet<(String, String)> {
    let doc: serde_json::Value = serde_json::from_str(include_str!("../openapi.json")).unwrap();
    let mut out = BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            out.insert((method.to_uppercase(), path.clone()));
        }
    }
    out
}

#[test]
fn openapi_lists_exactly_the_served_routes() {
    let served: BTreeSet<(String, String)> = ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    let documented = documented();
    assert_eq!(documented.difference(&served).collect::<Vec<_>>(), Vec::<&(String, String)>::new(), "documented but not served");
    assert_eq!(served.difference(&documented).collect::<Vec<_>>(), Vec::<&(String, String)>::new(), "served but not documented");
}

#[tokio::test]
async fn every_documented_route_is_routed() {
    let state = Arc::new(AppState::new(Store::memory().unwrap(), Digest::of(b"token-0123456789abcdef"), None).unwrap());
    let app = router(state);
    for (method, path) in documented() {
        let uri = path.replace("{name}", "nobody").replace("{id}", "key_nobody");
        let req = Request::builder()
            .method(method.as_str())
            .uri(&uri)
            .header("authorization", "Bearer token-0123456789abcdef")
            .header("content-type", "application/json")
            .body(Body::from("{}"))
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        // A 404 is fine when it is about the resource, not the route.
        let no_route = body["error"]["message"].as_str().is_some_and(|m| m.starts_with("there is no route"));
        let unrouted = status == 405 || (status == 404 && no_route);
        assert!(!unrouted, "{method} {uri}: {status} {body}");
    }
}

/// Reads take any role; each change documents the role it needs and its 403 FORBIDDEN, as the
/// server's gate (`api::permission`) decides them.
#[test]
fn every_change_documents_the_role_it_needs() {
    use keyward_control::model::{AdminRole, Permission};
    let doc: serde_json::Value = serde_json::from_str(include_str!("../openapi.json")).unwrap();
    for (method, path) in ROUTES.iter().filter(|(_, p)| p.starts_with("/v1/") && !p.starts_with("/v1/feed")) {
        let op = &doc["paths"][path][method.to_lowercase()];
        let needs = keyward_control::api::permission(&method.parse().unwrap(), path);
        let forbidden = op["responses"].get("403").is_some();
        assert_eq!(forbidden, needs != Permission::Read, "{method} {path}: 403 documented: {forbidden}");
        if needs != Permission::Read {
            let role = [AdminRole::Viewer, AdminRole::Editor, AdminRole::Owner].into_iter().find(|r| r.allows(needs)).unwrap();
            let description = op["description"].as_str().unwrap_or_default();
            assert!(description.contains(&format!("Needs the {} role", role.as_str())), "{method} {path}: {description}");
        }
    }
    let security = doc["components"]["securitySchemes"]["adminToken"]["description"].as_str().unwrap();
    assert!(security.contains("personal admin token") && security.contains("kwadm_"), "{security}");
}

/// Every error code the admin API answers is in the documented enum.
#[test]
fn the_documented_error_codes_include_every_code_answered() {
    use keyward_control::error::Error;
    let doc: serde_json::Value = serde_json::from_str(include_str!("../openapi.json")).unwrap();
    let codes: BTreeSet<&str> = doc["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    let errors = [
        Error::Invalid { field: "name", message: String::new() },
        Error::NotFound { field: "name", what: "admin", name: String::new() },
        Error::Conflict { field: "name", message: String::new() },
        Error::Unauthorized(String::new()),
        Error::Forbidden(String::new()),
        Error::TooLarge(1),
        Error::TooManyAttempts { retry_after_secs: 1 },
        Error::Internal(String::new()),
        Error::NoRoute(String::new()),
        Error::MethodNotAllowed(String::new()),
    ];
    for e in errors {
        assert!(codes.contains(e.code()), "{} ({}) is not documented", e.code(), e.status());
    }
    for store_fault in ["STORE_BUSY", "STORE_FULL"] {
        assert!(codes.contains(store_fault), "{store_fault}");
    }
}

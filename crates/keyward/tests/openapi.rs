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

//! The web console (`keyward serve`'s `/console`) in a real headless Chromium, against the real
//! `keyward serve` and a real Envoy running `keyward.wasm`: what an admin does in the browser
//! is what Envoy enforces, within a second. Also the console's own safety (a key shown once on
//! a `no-store` page, the session cookie, CSP, CSRF, roles), keyboard use, a phone's width,
//! axe-core on every page, and the screenshots in `docs/console/` that the README shows.
//!
//! Without chromedriver, Chromium, axe-core, Envoy, `keyward.wasm` or the `keyward` binary
//! these fail and say how to get them (`cargo xtask test` installs and builds them all).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use keyward_testkit::browser::{Key, Violation};
use keyward_testkit::{poll_until, request, send_raw, Browser, Echo, Envoy, EnvoyOptions, Keyward, Response, ADMIN_TOKEN};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The Envoy's node id, as the Envoys page lists it.
const NODE: &str = "edge-eu-west-1";
/// How long a page or an element may take to appear.
const WAIT: Duration = Duration::from_secs(10);
/// How soon Envoy must enforce a change made in the console.
const WITHIN: Duration = Duration::from_secs(1);
/// The console's session cookie.
const COOKIE: &str = "keyward_session";
const REASON: &str = "Your plan does not include API access";

/// The filter: `/v1/reports` needs `reports:read`, `/v1/invoices` `billing:read`, writes
/// `write:all`, other reads `read:all`; usage is reported to `serve` every second.
fn config() -> Value {
    json!({
        "realm": "keyward-console",
        "rules": [
            {"path": {"exact": "/healthz"}, "public": true},
            {"path": {"prefix": "/v1/reports"}, "scopes": ["reports:read"]},
            {"path": {"prefix": "/v1/invoices"}, "scopes": ["billing:read"]},
            {"methods": ["POST", "PUT", "PATCH", "DELETE"], "scopes": ["write:all"]},
            {"methods": ["GET"], "scopes": ["read:all"]}
        ],
        "control_plane": {"cluster": "keyward", "feed_wait_secs": 5, "usage_report_secs": 1}
    })
}

/// `keyward serve`, optionally a two-worker Envoy fed by it (with an echo upstream), and a
/// headless Chromium. The browser goes first on drop.
struct Console {
    browser: Browser,
    envoy: Option<Envoy>,
    keyward: Keyward,
    _echo: Option<Echo>,
}

impl Console {
    /// `serve`, Envoy connected at the store's version, and the browser.
    fn start() -> Console {
        let keyward = Keyward::start();
        let echo = Echo::start(0).unwrap();
        let mut opts = EnvoyOptions::new(config(), echo.port());
        opts.control_plane_port = Some(keyward.port);
        opts.node_id = NODE.into();
        let envoy = Envoy::start(&opts);
        let browser = Browser::start();
        let c = Console { browser, envoy: Some(envoy), keyward, _echo: Some(echo) };
        c.wait_connected();
        c
    }

    /// `serve` and the browser, for what needs no Envoy.
    fn without_envoy() -> Console {
        let keyward = Keyward::start();
        let browser = Browser::start();
        Console { browser, envoy: None, keyward, _echo: None }
    }

    fn wait_connected(&self) {
        poll_until(Duration::from_secs(20), "the Envoy to be connected at the store's version", || {
            let status = self.keyward.api_get("/v1/status");
            let envoy = status["envoys"].as_array()?.iter().find(|e| e["id"] == NODE)?.clone();
            (envoy["state"] == "connected" && envoy["applied_version"] == status["snapshot_version"]).then_some(())
        });
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.keyward.url())
    }

    fn goto(&self, path: &str) {
        self.browser.goto(&self.url(path));
    }

    fn js(&self, script: &str) -> Value {
        self.browser.execute(script, vec![])
    }

    /// The HTTP status of the page the browser shows (WebDriver has no status; the Navigation
    /// Timing entry does).
    fn status(&self) -> u64 {
        let v = self.js("const e = performance.getEntriesByType('navigation')[0]; return e ? e.responseStatus : null;");
        v.as_u64().unwrap_or_else(|| panic!("no navigation status on {}: {v}", self.browser.current_url()))
    }

    /// Does `act` (a click, a submit, a script) and waits for the page it leads to: a marker
    /// set on the old page is gone and the new one has loaded. WebDriver's click can return
    /// before a form's answer replaces the page.
    fn leads_to_a_new_page(&self, act: impl FnOnce()) {
        self.js("window.__keywardOldPage = true;");
        act();
        let client = self.browser.client();
        poll_until(WAIT, "the next page to load", || {
            // A script may fail while the page is being replaced: that is "not yet".
            let state = self.browser.block_on(client.execute("return window.__keywardOldPage ? 'old' : document.readyState;", vec![]));
            state.ok().filter(|s| s == "complete")
        });
    }

    /// Submits the form matching `css` through its first submit button and waits for the answer.
    fn submit(&self, css: &str) {
        self.leads_to_a_new_page(|| self.browser.submit(css));
    }

    /// Clicks the link or button matching `css` and waits for the page it leads to.
    fn click_to(&self, css: &str) {
        self.leads_to_a_new_page(|| self.browser.click(css));
    }

    fn h1(&self) -> String {
        self.browser.find("h1")
    }

    /// The text of the whole page.
    fn text(&self) -> String {
        self.browser.find("body")
    }

    fn sign_in(&self, token: &str) {
        self.goto("/console/signin");
        self.browser.fill("#token", token);
        self.submit("form[action='/console/signin']");
        self.browser.wait_for_url("/console/agents", WAIT);
    }

    fn sign_out(&self) {
        self.submit("form[action='/console/signout']");
        self.browser.wait_for_url("/console/signin", WAIT);
    }

    /// The notice a change left on the page it led to (a success, or why it was refused).
    fn notice(&self) -> String {
        self.browser.wait_for("p.notice[role=status], p.notice[role=alert]", WAIT)
    }

    /// On the once-only page: the new key, from `input#secret`'s value.
    fn shown_secret(&self) -> String {
        self.browser.wait_for_url("/console/shown", WAIT);
        self.browser.wait_for("input#secret", WAIT);
        assert!(self.browser.attr("input#secret", "readonly").is_some(), "the key's field must be read-only");
        let secret = self.js("return document.getElementById('secret').value;");
        secret.as_str().filter(|s| s.len() > 20).unwrap_or_else(|| panic!("no key in input#secret: {secret}")).to_string()
    }

    /// On the once-only page: the key's id, from its facts.
    fn shown_key_id(&self) -> String {
        let facts = self.browser.find("dl.facts");
        let id = self.browser.find("dl.facts dd code");
        assert!(id.starts_with("key_"), "key id {id:?} in {facts}");
        id
    }

    fn envoy_port(&self) -> u16 {
        self.envoy.as_ref().expect("this test runs Envoy").port
    }

    /// One request through Envoy with `key` in `x-api-key`.
    fn send(&self, method: &str, path: &str, key: &str) -> Response {
        request(self.envoy_port(), method, path, &[("x-api-key", key.as_bytes())]).unwrap_or_else(|e| panic!("{method} {path} through Envoy: {e}"))
    }

    /// Requests through Envoy until one passes `want`, for at most [`WITHIN`]: a change made in
    /// the console must be enforced that soon after its page answered.
    fn within_a_second(&self, what: &str, method: &str, path: &str, key: &str, want: impl Fn(&Response) -> bool) -> Response {
        let t0 = Instant::now();
        loop {
            let r = self.send(method, path, key);
            if want(&r) {
                return r;
            }
            assert!(
                t0.elapsed() < WITHIN,
                "{what}: Envoy still answers {method} {path} with {} {} after {:?}",
                r.status,
                String::from_utf8_lossy(&r.body),
                t0.elapsed()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The browser's session cookie (readable through WebDriver although it is `HttpOnly`).
    fn session(&self) -> String {
        self.browser.cookie(COOKIE).unwrap_or_else(|| panic!("no {COOKIE} cookie: {:?}", self.browser.cookies())).value
    }

    /// A request to `serve` outside the browser, with the browser's session cookie (or none):
    /// for what WebDriver cannot see, the headers.
    fn http(&self, method: &str, path: &str, session: Option<&str>, form: &[(&str, &str)]) -> Response {
        let body = form.iter().map(|(k, v)| format!("{}={}", encode(k), encode(v))).collect::<Vec<_>>().join("&");
        let mut raw = format!("{method} {path} HTTP/1.1\r\nhost: 127.0.0.1:{}\r\nconnection: close\r\n", self.keyward.port);
        if let Some(s) = session {
            raw.push_str(&format!("cookie: {COOKIE}={s}\r\n"));
        }
        if method == "POST" {
            raw.push_str(&format!("content-type: application/x-www-form-urlencoded\r\ncontent-length: {}\r\n", body.len()));
        }
        raw.push_str("\r\n");
        raw.push_str(&body);
        send_raw(self.keyward.port, raw.as_bytes()).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// The admin API with `token`: (status, body).
    fn api(&self, token: &str, method: &str, path: &str, body: &Value) -> (u16, Value) {
        let text = body.to_string();
        let raw = format!(
            "{method} {path} HTTP/1.1\r\nhost: keyward\r\nconnection: close\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{text}",
            text.len()
        );
        let r = send_raw(self.keyward.port, raw.as_bytes()).unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let v = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        (r.status, v)
    }

    /// A change on the admin API that must succeed.
    fn api_ok(&self, token: &str, method: &str, path: &str, body: &Value) -> Value {
        let (status, v) = self.api(token, method, path, body);
        assert!((200..300).contains(&status), "{method} {path} {body}: {status} {v}");
        v
    }

    /// A new admin (through the API, as the bootstrap owner): their personal token.
    fn admin(&self, name: &str, role: &str) -> String {
        let v = self.api_ok(ADMIN_TOKEN, "POST", "/v1/admins", &json!({"name": name, "role": role}));
        v["token"].as_str().unwrap_or_else(|| panic!("no token for admin {name}: {v}")).to_string()
    }

    fn agent_names(&self) -> Vec<String> {
        let v = self.keyward.api_get("/v1/agents");
        v.as_array().unwrap_or_else(|| panic!("GET /v1/agents: {v}")).iter().filter_map(|a| a["name"].as_str().map(str::to_string)).collect()
    }

    fn key_status(&self, id: &str) -> String {
        let v = self.keyward.api_get(&format!("/v1/keys/{id}"));
        v["status"].as_str().unwrap_or_else(|| panic!("GET /v1/keys/{id}: {v}")).to_string()
    }

    /// The usage chart's total, from its accessible title ("…: N requests").
    fn chart_total(&self) -> u64 {
        let v = self.js("const t = document.getElementById('chart-title'); return t ? t.textContent : '';");
        let title = v.as_str().unwrap_or_default();
        title
            .rsplit(": ")
            .next()
            .and_then(|t| t.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("the chart's title {title:?} does not end with its total"))
    }

    /// Reloads `path` (an agent's Usage tab) until the chart counts more than `above`.
    fn wait_for_usage(&self, path: &str, above: u64) -> u64 {
        poll_until(Duration::from_secs(15), &format!("the usage chart on {path} to count more than {above} requests"), || {
            self.goto(path);
            let total = self.chart_total();
            (total > above).then_some(total)
        })
    }

    /// Every table of the page is inside a `.scroll` container, and the page itself is no
    /// wider than the window.
    fn assert_fits_the_window(&self, page: &str) {
        let v = self.js(
            "return { scroll: document.documentElement.scrollWidth, body: document.body.scrollWidth, inner: window.innerWidth, \
             loose: [...document.querySelectorAll('table')].filter(t => !t.closest('.scroll')).length };",
        );
        let (scroll, body, inner) = (v["scroll"].as_u64().unwrap(), v["body"].as_u64().unwrap(), v["inner"].as_u64().unwrap());
        assert!(scroll <= inner && body <= inner, "{page} overflows the window: scrollWidth {scroll}, body {body}, innerWidth {inner}");
        assert_eq!(v["loose"], 0, "{page}: a table outside a .scroll container");
    }

    /// No inline script or style in the page: the CSP (`script-src 'self'; style-src 'self'`)
    /// would silently block them.
    fn assert_nothing_inline(&self, page: &str) {
        let v = self.js("return [...document.querySelectorAll('script:not([src]), [style], [onclick], [onsubmit], [onchange]')].map(e => e.outerHTML.slice(0, 120));");
        assert_eq!(v, json!([]), "{page}: inline script or style");
    }

    /// axe-core's serious and critical violations on the current page, labelled, into `found`.
    fn axe(&self, page: &str, found: &mut Vec<String>) {
        let all = self.browser.axe();
        for v in &all {
            // The milder ones are printed for whoever reads the output; only serious ones fail.
            if !v.is_serious() {
                eprintln!("axe (not failing) on {page}: {v}");
            }
        }
        found.extend(all.iter().filter(|v| Violation::is_serious(v)).map(|v| format!("  - {page} ({}): {v}", self.browser.current_url())));
    }

    /// A PNG of the page into `target/screenshots/console/NAME.png`, or, with
    /// `KEYWARD_UPDATE_SCREENSHOTS=1`, the repository's `docs/console/NAME.png` that the README
    /// shows (so a test run leaves the tree as it was): a desktop window grown
    /// to the page's height (up to [`SHOT_MAX_HEIGHT`]), so a form's buttons or a table's last
    /// rows are in the picture, then back to its size.
    fn screenshot(&self, name: &str) {
        let v = self.js("return [window.innerWidth, window.innerHeight, document.documentElement.scrollHeight];");
        let n = |i: usize| v[i].as_u64().and_then(|x| u32::try_from(x).ok()).unwrap_or_else(|| panic!("the viewport's size: {v}"));
        let (width, height, content) = (n(0), n(1), n(2));
        // A phone's picture is what its screen shows.
        let grown = if width < 600 { height } else { content.clamp(height, SHOT_MAX_HEIGHT) };
        if grown != height {
            self.browser.set_viewport_size(width, grown);
        }
        self.browser.screenshot(&docs_dir().join(format!("{name}.png")));
        if grown != height {
            self.browser.set_viewport_size(width, height);
        }
    }
}

/// The tallest screenshot's page, in CSS pixels.
const SHOT_MAX_HEIGHT: u32 = 1300;

fn docs_dir() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if std::env::var("KEYWARD_UPDATE_SCREENSHOTS").is_ok_and(|v| v == "1") {
        root.join("docs/console")
    } else {
        root.join("target/screenshots/console")
    }
}

/// `application/x-www-form-urlencoded` for one name or value.
use keyward_core::url::encode_component as encode;

/// The value of the once-only page's `input#secret`, from its HTML.
fn secret_in(html: &str) -> Option<String> {
    let input = &html[html.find("id=\"secret\"")?..];
    let input = &input[..input.find('>')?];
    let value = &input[input.find("value=\"")? + 7..];
    Some(value[..value.find('"')?].to_string())
}

fn body_text(r: &Response) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

fn now_unix() -> i64 {
    i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()).unwrap()
}

/// The headers every console page carries.
fn assert_page_headers(r: &Response, what: &str) {
    let csp = r.header("content-security-policy").unwrap_or_else(|| panic!("{what}: no Content-Security-Policy: {:?}", r.headers));
    for part in ["default-src 'none'", "script-src 'self'", "style-src 'self'", "form-action 'self'", "frame-ancestors 'none'", "base-uri 'none'"] {
        assert!(csp.contains(part), "{what}: the CSP lacks {part:?}: {csp}");
    }
    assert_eq!(r.header("cache-control"), Some("no-store"), "{what}: {:?}", r.headers);
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"), "{what}");
    assert_eq!(r.header("x-frame-options"), Some("DENY"), "{what}");
    assert_eq!(r.header("referrer-policy"), Some("no-referrer"), "{what}");
}

#[test]
fn an_agent_created_in_the_console_gets_a_key_shown_once_on_a_no_store_page_that_works_through_envoy() {
    let c = Console::start();

    // Signing in: a wrong token is refused and sets no cookie; the right one sets an HttpOnly,
    // SameSite=Strict session cookie on /console.
    let wrong = c.http("POST", "/console/signin", None, &[("token", "not-the-token")]);
    assert_eq!(wrong.status, 401, "{}", body_text(&wrong));
    assert!(wrong.header("set-cookie").is_none(), "{:?}", wrong.headers);
    assert_page_headers(&wrong, "the sign-in page after a wrong token");
    let right = c.http("POST", "/console/signin", None, &[("token", ADMIN_TOKEN)]);
    assert_eq!((right.status, right.header("location")), (303, Some("/console/agents")), "{:?}", right.headers);
    let set = right.header("set-cookie").unwrap_or_else(|| panic!("no session cookie: {:?}", right.headers));
    for part in ["HttpOnly", "SameSite=Strict", "Path=/console"] {
        assert!(set.split("; ").any(|p| p == part), "the session cookie lacks {part}: {set}");
    }

    c.sign_in(ADMIN_TOKEN);
    let cookie = c.browser.cookie(COOKIE).unwrap_or_else(|| panic!("no {COOKIE} after signing in: {:?}", c.browser.cookies()));
    assert!(cookie.http_only, "the session cookie must be HttpOnly: {cookie:?}");
    assert_eq!(cookie.same_site.as_deref(), Some("Strict"), "{cookie:?}");
    assert_eq!(cookie.path.as_deref(), Some("/console"), "{cookie:?}");
    let visible = c.js("return document.cookie;");
    assert!(!visible.as_str().unwrap_or_default().contains(COOKIE), "scripts can read the session cookie: {visible}");
    assert_eq!(c.browser.find("header .who .role"), "owner");

    // Create agent, through its form.
    c.click_to("a.button[href='/console/agents/new']");
    c.browser.wait_for("form[action='/console/agents'][method=post]", WAIT);
    assert_eq!(c.h1(), "Create agent");
    c.assert_nothing_inline("Create agent");
    c.browser.fill("#name", "orders-service");
    c.browser.fill("#description", "Order intake for the storefront");
    c.browser.click("input[name=scopes][value='read:all']");
    c.browser.click("input[name=scopes][value='write:all']");
    c.browser.fill("#rate", "120/min");
    c.submit("form[action='/console/agents'][method=post]");

    // The key, shown once.
    let secret = c.shown_secret();
    assert_eq!(c.status(), 200);
    assert_eq!(c.h1(), "Copy your new key");
    let id = c.shown_key_id();
    let text = c.text();
    assert!(text.contains("Agent \"orders-service\" is created, with its Production key."), "{text}");
    assert!(text.contains("Applied by 1 of 1 Envoy in "), "the page says how far the change reached: {text}");
    assert!(text.contains("read:all, write:all"), "{text}");
    assert!(!c.browser.current_url().contains(&secret), "the key is in the URL");
    c.assert_nothing_inline("the new key");

    let agent = c.keyward.api_get("/v1/agents/orders-service");
    assert_eq!(agent["agent"]["description"], "Order intake for the storefront", "{agent}");
    assert_eq!(agent["agent"]["scopes"], json!(["read:all", "write:all"]), "{agent}");
    assert_eq!(agent["agent"]["rate_limit"], "120/min", "{agent}");
    assert_eq!(agent["keys"][0]["id"], id.as_str(), "{agent}");

    // It works through Envoy at once (the page came after Envoy applied it).
    for method in ["GET", "POST"] {
        let r = c.send(method, "/v1/orders", &secret);
        assert_eq!(r.status, 200, "{method} with the key the console showed: {}", body_text(&r));
    }
    assert_eq!(c.send("GET", "/v1/orders", "kw_live_not-a-key").status, 401);

    // Copy puts it on the clipboard (the console's one script).
    c.browser.click("button[data-copy=secret]");
    poll_until(WAIT, "the Copy button to say Copied", || c.browser.try_find("button[data-copy=secret]").filter(|t| t == "Copied"));
    let selected = c.js("return window.getSelection().toString() || document.activeElement.value.substring(document.activeElement.selectionStart, document.activeElement.selectionEnd);");
    assert_eq!(selected.as_str(), Some(secret.as_str()), "Copy selects the key");

    // A reload does not show it again, nor does a request with the same session.
    c.browser.block_on(c.browser.client().refresh()).unwrap();
    assert_eq!(c.h1(), "Nothing to show");
    assert!(c.text().contains("This key has already been shown."), "{}", c.text());
    assert!(c.browser.try_find("input#secret").is_none());
    assert!(!c.browser.page_source().contains(&secret), "the reloaded page still holds the key");
    let shown_path = c.browser.current_url();
    let shown_path = shown_path.split_once("/console/").map(|(_, p)| format!("/console/{p}")).unwrap_or_default();
    assert!(shown_path.starts_with("/console/shown/"), "{shown_path}");
    let again = c.http("GET", &shown_path, Some(&c.session()), &[]);
    assert_eq!(again.status, 200);
    assert!(body_text(&again).contains("already been shown") && !body_text(&again).contains(&secret), "{}", body_text(&again));
    assert_page_headers(&again, "/console/shown, shown already");

    // The page that carries a key is no-store: a key generated with the browser's session (and
    // a form's CSRF token), fetched over HTTP to read the headers.
    c.click_to("a.button[href='/console/agents']");
    c.browser.wait_for_url("/console/agents", WAIT);
    let csrf = c.browser.attr("form[action='/console/signout'] input[name=csrf]", "value").unwrap();
    let session = c.session();
    let made = c.http("POST", "/console/agents/orders-service/keys", Some(&session), &[("csrf", &csrf), ("name", "Staging")]);
    let location = made.header("location").unwrap_or_default().to_string();
    assert!(made.status == 303 && location.starts_with("/console/shown/"), "{} {location}: {}", made.status, body_text(&made));
    // A HEAD does not use the key up.
    assert_eq!(c.http("HEAD", &location, Some(&session), &[]).status, 200);
    let page = c.http("GET", &location, Some(&session), &[]);
    assert_eq!(page.status, 200);
    assert_page_headers(&page, "/console/shown with a new key");
    let staging = secret_in(&body_text(&page)).unwrap_or_else(|| panic!("no input#secret: {}", body_text(&page)));
    // (maud escapes the quotes of text)
    assert!(body_text(&page).contains("Key &quot;Staging&quot; of agent &quot;orders-service&quot; is generated."), "{}", body_text(&page));
    assert_eq!(c.send("GET", "/v1/orders", &staging).status, 200, "the Staging key through Envoy");
    let later = c.http("GET", &location, Some(&session), &[]);
    assert!(!body_text(&later).contains(&staging) && body_text(&later).contains("already been shown"), "{}", body_text(&later));

    // The CSP and the other headers, on every kind of page.
    for path in ["/console/agents", "/console/agents/new", "/console/agents/orders-service", "/console/agents/orders-service/usage", "/console/envoys", "/console/audit", "/console/admins"] {
        let r = c.http("GET", path, Some(&session), &[]);
        assert_eq!(r.status, 200, "{path}: {}", body_text(&r));
        assert_page_headers(&r, path);
    }
    let signin = c.http("GET", "/console/signin", None, &[]);
    assert_page_headers(&signin, "/console/signin");
    let out = c.http("GET", "/console/agents", None, &[]);
    assert_eq!((out.status, out.header("location")), (303, Some("/console/signin")), "without a session");

    // Signing out ends the session on the server too.
    c.sign_out();
    let after = c.http("GET", "/console/agents", Some(&session), &[]);
    assert_eq!((after.status, after.header("location")), (303, Some("/console/signin")), "the old session after signing out");
}

#[test]
fn going_back_to_a_shown_key_does_not_show_it_again() {
    let c = Console::without_envoy();
    c.sign_in(ADMIN_TOKEN);
    c.goto("/console/agents/new");
    c.browser.fill("#name", "backtrack");
    c.browser.click("input[name=scopes][value='read:all']");
    c.submit("form[action='/console/agents'][method=post]");
    let secret = c.shown_secret();
    // Done, then the browser's Back button. The page is `no-store`, but Chromium keeps such
    // pages in its back/forward cache and restores them, key and all, unless the page opts out.
    c.click_to("a.button[href='/console/agents/backtrack']");
    c.browser.block_on(c.browser.client().back()).unwrap();
    // The page may reload itself when it is restored: give that time.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let client = c.browser.client();
        let url = c.browser.block_on(client.current_url()).map(|u| u.path().to_string()).unwrap_or_default();
        let h1 = c.browser.block_on(client.execute("const h = document.querySelector('h1'); return h ? h.textContent : '';", vec![])).unwrap_or_default();
        if url.starts_with("/console/shown/") && h1 == "Nothing to show" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Back shows the new key again ({url}, h1 {h1}): the back/forward cache restored the no-store page with the key"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!c.browser.page_source().contains(&secret), "the page Back reached still holds the key");
}

#[test]
fn key_changes_in_the_console_reach_envoy_within_a_second() {
    let c = Console::start();
    let created = c.api_ok(ADMIN_TOKEN, "POST", "/v1/agents", &json!({"name": "shop", "scopes": ["read:all", "write:all"], "description": "Storefront checkout"}));
    let (k1_id, k1) = (created["key"]["id"].as_str().unwrap().to_string(), created["secret"].as_str().unwrap().to_string());
    assert_eq!(c.send("POST", "/v1/orders", &k1).status, 200);
    c.sign_in(ADMIN_TOKEN);

    // Capabilities: write:all off → POST refused, GET still fine.
    c.goto("/console/agents/shop");
    c.click_to("nav.tabs a[href='/console/agents/shop/capabilities']");
    c.browser.wait_for("form[action='/console/agents/shop/capabilities']", WAIT);
    let checked = c.js("return [...document.querySelectorAll('input[name=scopes]:checked')].map(e => e.value);");
    assert_eq!(checked, json!(["read:all", "write:all"]));
    c.browser.click("input[name=scopes][value='write:all']");
    c.submit("form[action='/console/agents/shop/capabilities']");
    let notice = c.notice();
    assert!(notice.starts_with("Capabilities saved: read:all. Applied by 1 of 1 Envoy in "), "{notice}");
    let r = c.within_a_second("write:all turned off", "POST", "/v1/orders", &k1, |r| r.status == 403);
    assert_eq!(r.code().as_deref(), Some("INSUFFICIENT_SCOPE"), "{}", body_text(&r));
    assert_eq!(c.send("GET", "/v1/orders", &k1).status, 200, "read:all is still on");

    // Generate a new key with an expiry.
    c.click_to("nav.tabs a[href='/console/agents/shop']");
    c.click_to("a.button[href='/console/agents/shop/keys/new']");
    c.browser.wait_for("form[action='/console/agents/shop/keys']", WAIT);
    c.browser.fill("#name", "Quarterly");
    c.browser.click("#expiry-ttl");
    c.browser.fill("#ttl", "90d");
    c.submit("form[action='/console/agents/shop/keys']");
    let k2 = c.shown_secret();
    let k2_id = c.shown_key_id();
    let expires = c.browser.find("dl.facts dd:nth-of-type(3)");
    let stored = c.keyward.api_get(&format!("/v1/keys/{k2_id}"))["expires_at"].as_str().unwrap_or_default().to_string();
    assert_eq!(expires, stored, "the page shows the key's expiry");
    let in_90_days = keyward_core::time::parse_rfc3339(&stored).unwrap_or_else(|| panic!("expires_at {stored:?}")) - now_unix() - 90 * 86_400;
    assert!(in_90_days.abs() < 120, "a 90d key expires at {stored}");
    assert_eq!(c.send("GET", "/v1/orders", &k2).status, 200, "the new key through Envoy");

    // Rotate it: the old one keeps working (with Deprecation), the new one works.
    c.click_to("a.button[href='/console/agents/shop']");
    c.click_to(&format!("a[href='/console/keys/{k2_id}/rotate']"));
    assert_eq!(c.h1(), "Rotate key \"Quarterly\"?");
    assert_eq!(c.browser.attr("#grace option[selected]", "value").as_deref(), Some("24h"));
    c.submit(&format!("form[action='/console/keys/{k2_id}/rotate']"));
    let k3 = c.shown_secret();
    let k3_id = c.shown_key_id();
    assert_ne!(k3, k2);
    let text = c.text();
    assert!(text.contains("Key \"Quarterly\" is rotated") && text.contains("works until"), "{text}");
    let old = c.within_a_second("the rotated key", "GET", "/v1/orders", &k2, |r| r.header("deprecation").is_some());
    assert_eq!(old.status, 200, "the old key in its grace period: {}", body_text(&old));
    assert!(old.header("sunset").is_some(), "the old key's response says when it stops: {:?}", old.headers);
    let new = c.send("GET", "/v1/orders", &k3);
    assert_eq!(new.status, 200, "the successor: {}", body_text(&new));
    assert!(new.header("deprecation").is_none(), "the successor is not deprecated: {:?}", new.headers);

    // Disable API access with a reason → 403 carrying it; enable → back.
    c.goto("/console/agents/shop/settings");
    c.browser.fill("#reason", REASON);
    c.submit("form[action='/console/agents/shop/access']");
    let notice = c.notice();
    assert!(notice.starts_with("API access disabled. Applied by 1 of 1 Envoy"), "{notice}");
    assert!(c.text().contains(&format!("API access is off: {REASON}")), "{}", c.text());
    let r = c.within_a_second("API access disabled", "GET", "/v1/orders", &k1, |r| r.status == 403);
    assert_eq!(r.code().as_deref(), Some("ACCESS_DISABLED"), "{}", body_text(&r));
    assert_eq!(r.json()["error"]["message"], REASON, "{}", body_text(&r));
    c.submit("form[action='/console/agents/shop/access']");
    assert!(c.notice().starts_with("API access enabled."));
    c.within_a_second("API access enabled", "GET", "/v1/orders", &k1, |r| r.status == 200);

    // Revoke, after the confirmation page.
    c.goto("/console/agents/shop");
    c.click_to(&format!("a[href='/console/keys/{k3_id}/revoke']"));
    assert!(c.h1().starts_with("Revoke key"), "{}", c.h1());
    assert_eq!(c.key_status(&k3_id), "active", "the confirmation page alone revokes nothing");
    c.submit(&format!("form[action='/console/keys/{k3_id}/revoke']"));
    let notice = c.notice();
    assert!(notice.contains("revoked. Applied by 1 of 1 Envoy"), "{notice}");
    let r = c.within_a_second("the revoked key", "GET", "/v1/orders", &k3, |r| r.status == 401);
    assert_eq!(r.code().as_deref(), Some("REVOKED_API_KEY"), "{}", body_text(&r));

    // Bulk revoke: two selected keys, and a confirmation listing them.
    c.browser.click(&format!("input[name=key][value='{k1_id}']"));
    c.browser.click(&format!("input[name=key][value='{k2_id}']"));
    c.submit("form[action='/console/agents/shop/revoke']");
    assert_eq!(c.h1(), "Revoke 2 keys?");
    let listed = c.browser.find_all("main li");
    assert!(listed.iter().any(|l| l.starts_with("Production")) && listed.iter().any(|l| l.starts_with("Quarterly")), "{listed:?}");
    assert!(c.key_status(&k1_id) != "revoked" && c.key_status(&k2_id) != "revoked", "nothing is revoked before the confirmation");
    c.submit("form[action='/console/agents/shop/revoke']");
    let notice = c.notice();
    assert!(notice.starts_with("2 keys revoked. Applied by 1 of 1 Envoy"), "{notice}");
    for (what, key) in [("Production", &k1), ("Quarterly", &k2)] {
        let r = c.within_a_second(&format!("{what}, bulk-revoked"), "GET", "/v1/orders", key, |r| r.status == 401);
        assert_eq!(r.code().as_deref(), Some("REVOKED_API_KEY"), "{what}: {}", body_text(&r));
    }
    let statuses = c.browser.find_all("tbody .badge");
    assert_eq!(statuses, ["revoked", "revoked", "revoked"], "the keys table");

    // Usage: the chart counts what Envoy just answered, allowed and refused.
    let total = c.wait_for_usage("/console/agents/shop/usage", 0);
    assert!(total >= 5, "{total}");
    poll_until(Duration::from_secs(10), "the refusals in the Usage tab", || {
        c.goto("/console/agents/shop/usage");
        let table = c.browser.find("main table");
        (["INSUFFICIENT_SCOPE", "ACCESS_DISABLED", "REVOKED_API_KEY"].iter().all(|code| table.contains(code))
            && c.browser.try_find("svg.usage rect.denied").is_some()
            && c.browser.try_find("svg.usage rect.allowed").is_some())
        .then_some(())
    });
}

#[test]
fn viewers_and_forms_without_a_csrf_token_change_nothing() {
    let c = Console::without_envoy();
    let created = c.api_ok(ADMIN_TOKEN, "POST", "/v1/agents", &json!({"name": "billing", "scopes": ["read:all"], "description": "Invoices export"}));
    let key_id = created["key"]["id"].as_str().unwrap().to_string();
    let viewer = c.admin("vera", "viewer");

    // CSRF: the same forms, their hidden token removed (or wrong), are refused with 403.
    c.sign_in(ADMIN_TOKEN);
    c.goto("/console/agents/new");
    c.browser.fill("#name", "no-token");
    c.browser.click("input[name=scopes][value='read:all']");
    c.js("document.querySelector('form[action=\"/console/agents\"][method=post] input[name=csrf]').remove();");
    c.submit("form[action='/console/agents'][method=post]");
    c.browser.wait_for("h1", WAIT);
    assert_eq!((c.status(), c.h1()), (403, "Not allowed".to_string()));
    assert!(c.text().contains("CSRF token is missing or stale"), "{}", c.text());
    c.browser.assert_no_serious_axe_violations("the console's 403 page");

    c.goto(&format!("/console/keys/{key_id}/revoke"));
    c.js("document.querySelector('main form input[name=csrf]').value = 'f'.repeat(64);");
    c.submit(&format!("form[action='/console/keys/{key_id}/revoke']"));
    c.browser.wait_for("h1", WAIT);
    assert_eq!((c.status(), c.h1()), (403, "Not allowed".to_string()), "a wrong CSRF token");
    assert_eq!(c.agent_names(), ["billing"], "a form without its token created an agent");
    assert_eq!(c.key_status(&key_id), "active", "a form with a wrong token revoked the key");
    c.goto("/console/agents");
    c.sign_out();

    // A viewer reads agents and keys, and sees no form that changes them.
    c.sign_in(&viewer);
    assert_eq!(c.browser.find("header .who .role"), "viewer");
    assert!(c.browser.find("main table").contains("billing"));
    assert!(c.browser.try_find("a[href='/console/agents/new']").is_none(), "a viewer sees Create agent");
    assert!(c.browser.try_find("header nav a[href='/console/admins']").is_none(), "a viewer sees Admins");
    c.goto("/console/agents/billing");
    let masked = created["key"]["masked"].as_str().unwrap();
    assert!(c.browser.find("main table").contains(masked), "the viewer sees the key, masked");
    let changes = "main button, main a[href$='/keys/new'], main a[href$='/rotate'], main a[href$='/revoke'], main a[href$='/edit'], main input[type=checkbox]";
    assert_eq!(c.browser.find_all(changes), Vec::<String>::new(), "the keys tab offers a viewer changes");
    for tab in ["capabilities", "usage", "settings"] {
        c.goto(&format!("/console/agents/billing/{tab}"));
        assert_eq!(c.status(), 200, "{tab}");
        let buttons = c.js("return [...document.querySelectorAll('main button, main input:not([disabled]):not([type=hidden])')].filter(e => e.closest('form[method=post]')).map(e => e.outerHTML.slice(0, 100));");
        assert_eq!(buttons, json!([]), "the {tab} tab offers a viewer a change");
    }
    c.goto("/console/admins");
    assert_eq!((c.status(), c.h1()), (403, "Not allowed".to_string()), "a viewer on the admins page");
    // The change forms are refused by URL too, not only left out of the links.
    for page in ["/console/agents/new".to_string(), "/console/agents/billing/keys/new".to_string(), format!("/console/keys/{key_id}/edit"), format!("/console/keys/{key_id}/rotate"), format!("/console/keys/{key_id}/revoke")] {
        c.goto(&page);
        assert_eq!((c.status(), c.h1()), (403, "Not allowed".to_string()), "a viewer on {page}");
    }

    // …and the server refuses a forged form from the viewer's session, CSRF token and all.
    c.goto("/console/agents");
    let forge = "const [action, fields] = arguments; const f = document.createElement('form'); f.method = 'post'; f.action = action; \
                 const add = (n, v) => { const i = document.createElement('input'); i.type = 'hidden'; i.name = n; i.value = v; f.appendChild(i); }; \
                 add('csrf', document.querySelector('form[action=\"/console/signout\"] input[name=csrf]').value); \
                 for (const [n, v] of fields) add(n, v); document.body.appendChild(f); f.submit();";
    let forged = [
        ("/console/agents".to_string(), json!([["name", "forged"], ["scopes", "read:all"]])),
        (format!("/console/keys/{key_id}/revoke"), json!([["confirm", "yes"]])),
        ("/console/agents/billing/access".to_string(), json!([["enabled", "false"], ["reason", "forged"]])),
        ("/console/admins".to_string(), json!([["name", "mallory"], ["role", "owner"]])),
    ];
    for (action, fields) in forged {
        c.goto("/console/agents");
        c.leads_to_a_new_page(|| {
            c.browser.execute(forge, vec![json!(action), fields]);
        });
        assert_eq!((c.status(), c.h1()), (403, "Not allowed".to_string()), "a viewer's forged POST {action}");
    }
    assert_eq!(c.agent_names(), ["billing"], "a viewer's forged form created an agent");
    assert_eq!(c.key_status(&key_id), "active", "a viewer's forged form revoked a key");
    assert_eq!(c.keyward.api_get("/v1/agents/billing")["agent"]["enabled"], true);
    let admins = c.keyward.api_get("/v1/admins");
    assert!(!admins.to_string().contains("mallory"), "{admins}");
}

#[test]
fn the_create_agent_form_works_by_keyboard_alone() {
    let c = Console::without_envoy();
    c.sign_in(ADMIN_TOKEN);
    // Tab from the top of the page to "Create agent", and Enter.
    c.goto("/console/agents");
    let tab_to = |css: &str| {
        for _ in 0..20 {
            if c.browser.is_focused(css) {
                return;
            }
            c.browser.press(Key::Tab);
        }
        panic!("{css} never took the focus by Tab; the focus is on {}", c.browser.focused());
    };
    c.browser.press(Key::Tab);
    assert!(c.browser.is_focused("a.skip"), "the first Tab reaches the skip link, not {}", c.browser.focused());
    tab_to("a[href='/console/agents/new']");
    c.browser.press(Key::Enter);
    c.browser.wait_for_url("/console/agents/new", WAIT);
    assert_eq!(c.h1(), "Create agent");

    // Fill it in and send it by keyboard too.
    tab_to("#name");
    c.browser.send_keys("keyboard-only");
    c.browser.press(Key::Tab);
    assert!(c.browser.is_focused("#description"), "{}", c.browser.focused());
    c.browser.send_keys("Made without a mouse");
    c.browser.press(Key::Tab);
    assert!(c.browser.is_focused("input[role=switch]"), "the capabilities follow: {}", c.browser.focused());
    tab_to("input[role=switch][value='read:all']");
    c.browser.send_keys(" ");
    assert_eq!(c.js("return document.activeElement.checked;"), true, "Space turns a capability on");
    tab_to("#rate");
    c.browser.send_keys("10/s");
    c.browser.press(Key::Enter);
    c.shown_secret();
    let agent = c.keyward.api_get("/v1/agents/keyboard-only")["agent"].clone();
    assert_eq!((agent["description"].clone(), agent["scopes"].clone(), agent["rate_limit"].clone()), (json!("Made without a mouse"), json!(["read:all"]), json!("10/s")), "{agent}");
}

/// Hourly counts for a day, shaped like a working day's traffic, for the usage history.
fn daily_shape(now: i64, hours_ago: i64) -> u64 {
    let hour_of_day = (now / 3600 - hours_ago).rem_euclid(24);
    let base = [3, 2, 2, 1, 1, 2, 6, 14, 28, 41, 46, 44, 39, 43, 47, 45, 40, 33, 22, 15, 11, 8, 6, 4][usize::try_from(hour_of_day).unwrap()];
    base * 9 + u64::try_from(hours_ago % 5).unwrap() * 7
}

#[test]
fn every_page_passes_axe_fits_a_phone_and_is_photographed_for_the_readme() {
    let c = Console::start();
    c.browser.set_viewport_size(1280, 800);
    let mut axe = Vec::new();

    // A team: an owner signs in; an editor set things up through the API.
    let carol = c.admin("carol", "owner");
    let alice = c.admin("alice", "editor");
    c.admin("bob", "viewer");
    c.admin("dave", "editor");
    c.api_ok(ADMIN_TOKEN, "POST", "/v1/admins/dave/disable", &json!({}));
    for (name, description) in [("reports:read", "Read reports, dashboards and exports"), ("billing:read", "Read invoices, payments and subscriptions")] {
        c.api_ok(&carol, "POST", "/v1/scopes", &json!({"name": name, "description": description}));
    }
    let agent = |name: &str, description: &str, scopes: &[&str], rate: Option<&str>| -> Value {
        c.api_ok(&alice, "POST", "/v1/agents", &json!({"name": name, "description": description, "scopes": scopes, "rate": rate}))
    };
    let key = |agent: &str, name: &str, extra: Value| -> Value {
        let mut body = json!({"agent": agent, "name": name});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        c.api_ok(&alice, "POST", "/v1/keys", &body)
    };
    let mobile = agent("mobile-app", "iOS and Android app backend (v4.2 and later)", &["read:all", "write:all"], Some("1000/min"));
    let android = key("mobile-app", "Android beta", json!({"ttl": "90d", "scopes": ["read:all"]}));
    let ios = key("mobile-app", "iOS release", json!({"ttl": "180d"}));
    let web = key("mobile-app", "Old web client", json!({}));
    key("mobile-app", "CI smoke tests", json!({"ttl": "30d", "path_prefixes": ["/v1/health", "/v1/orders"]}));
    let support = agent("support-bot", "Helpdesk assistant: looks up customers and orders", &["read:all"], Some("60/min"));
    agent("analytics-etl", "Hourly warehouse sync for the data team", &["reports:read", "read:all"], Some("10/s"));
    let partner = agent("partner-acme", "ACME Logistics: shipment status integration", &["read:all"], Some("100/min"));
    agent("ci-deploy", "GitHub Actions: post-deploy checks", &["read:all", "write:all"], None);
    c.api_ok(&alice, "POST", "/v1/agents/partner-acme/disable", &json!({"reason": "Contract under renewal: contact partners@example.com"}));
    let rotated = c.api_ok(&alice, "POST", &format!("/v1/keys/{}/rotate", ios["key"]["id"].as_str().unwrap()), &json!({"grace": "7d"}));
    c.api_ok(&alice, "POST", &format!("/v1/keys/{}/revoke", web["key"]["id"].as_str().unwrap()), &json!({}));

    // Traffic through Envoy: allowed, refused for scope, revoked, disabled.
    let secret = |v: &Value| v["secret"].as_str().unwrap().to_string();
    let (production, beta, ios_new, old_web) = (secret(&mobile), secret(&android), rotated["new"]["secret"].as_str().unwrap().to_string(), secret(&web));
    for i in 0..60 {
        let (method, key) = match i % 6 {
            0 | 1 => ("GET", &production),
            2 => ("POST", &production),
            3 => ("GET", &ios_new),
            4 => ("GET", &beta),
            _ => ("POST", &beta),
        };
        c.send(method, &format!("/v1/orders/{i}"), key);
    }
    c.send("GET", "/v1/orders", &old_web);
    for i in 0..8 {
        c.send("GET", &format!("/v1/customers/{i}"), &secret(&support));
    }
    c.send("GET", "/v1/shipments", &secret(&partner));
    // The day before: what an Envoy reported in earlier hours (a test cannot wait a day), sent
    // to the same feed endpoint the filter reports to.
    let now = now_unix();
    let mut history = 0;
    let mobile_keys = [mobile["key"]["id"].as_str().unwrap(), android["key"]["id"].as_str().unwrap(), rotated["new"]["key"]["id"].as_str().unwrap()];
    for h in 1..24 {
        let usage: Vec<Value> = mobile_keys
            .iter()
            .enumerate()
            .map(|(i, id)| json!({"key_id": id, "count": daily_shape(now, h) / (u64::try_from(i).unwrap() + 1), "last_used": now - h * 3600}))
            .collect();
        history += usage.iter().map(|u| u["count"].as_u64().unwrap()).sum::<u64>();
        let (status, v) = c.api(ADMIN_TOKEN, "POST", "/v1/feed/usage", &json!({"envoy": NODE, "usage": usage}));
        assert_eq!(status, 200, "{v}");
    }

    // Sign-in.
    c.goto("/console/signin");
    c.browser.wait_for("#token", WAIT);
    c.screenshot("signin");
    c.axe("sign-in", &mut axe);
    c.browser.fill("#token", "a-wrong-token");
    c.submit("form[action='/console/signin']");
    assert_eq!((c.status(), c.browser.find("p.notice[role=alert]")), (401, "That token is not valid, or its admin is disabled.".to_string()));
    c.axe("sign-in, after a wrong token", &mut axe);
    c.sign_in(&carol);

    // Create agent, and its key shown once.
    c.goto("/console/agents/new");
    c.browser.fill("#name", "billing-sync");
    c.browser.fill("#description", "Nightly export of invoices to the finance ledger");
    c.browser.click("input[name=scopes][value='billing:read']");
    c.browser.click("input[name=scopes][value='read:all']");
    c.browser.fill("#rate", "600/min");
    c.axe("create agent", &mut axe);
    c.submit("form[action='/console/agents'][method=post]");
    let billing = c.shown_secret();
    c.screenshot("new-key");
    c.axe("the new key, shown once", &mut axe);
    for i in 0..5 {
        assert_eq!(c.send("GET", &format!("/v1/invoices/2024-{i:02}"), &billing).status, 200);
    }
    c.click_to("a.button[href='/console/agents/billing-sync']");
    c.goto("/console/shown/gone");
    c.axe("nothing to show", &mut axe);

    // The agents, and an agent's four tabs.
    c.goto("/console/agents");
    c.assert_nothing_inline("API keys");
    c.screenshot("agents");
    c.axe("API keys", &mut axe);
    c.goto("/console/agents/mobile-app");
    c.screenshot("agent-keys");
    c.axe("an agent's keys", &mut axe);
    c.goto("/console/agents/mobile-app/capabilities");
    c.screenshot("capabilities");
    c.axe("capabilities", &mut axe);
    c.wait_for_usage("/console/agents/mobile-app/usage", history + 50);
    c.screenshot("usage");
    c.axe("usage", &mut axe);
    c.goto("/console/agents/mobile-app/settings");
    c.screenshot("settings");
    c.axe("settings", &mut axe);

    // The key forms.
    let beta_id = android["key"]["id"].as_str().unwrap();
    c.goto("/console/agents/mobile-app/keys/new");
    c.axe("generate a key", &mut axe);
    c.goto(&format!("/console/keys/{beta_id}/edit"));
    c.axe("edit a key", &mut axe);
    c.goto(&format!("/console/keys/{beta_id}/rotate"));
    c.axe("rotate a key", &mut axe);
    c.goto(&format!("/console/keys/{beta_id}/revoke"));
    c.axe("revoke a key", &mut axe);
    c.goto("/console/agents/mobile-app");
    c.browser.click("input#select-all");
    let selected = c.js("return document.querySelectorAll('input[name=key]:checked').length;");
    assert_eq!(selected, 5, "select all selects the keys that are not revoked");
    c.submit("form[action='/console/agents/mobile-app/revoke']");
    assert_eq!(c.h1(), "Revoke 5 keys?");
    c.axe("revoke the selected keys", &mut axe);
    c.click_to("main a.button.secondary");
    c.browser.wait_for_url("/console/agents/mobile-app", WAIT);
    assert_eq!(c.keyward.api_get(&format!("/v1/keys/{beta_id}"))["status"], "active", "Cancel revokes nothing");

    // Envoys, the audit log, the admins.
    c.goto("/console/envoys");
    assert!(c.browser.find("main table").contains(NODE));
    c.screenshot("envoys");
    c.axe("Envoys", &mut axe);
    c.goto("/console/audit");
    c.screenshot("audit");
    c.axe("audit log", &mut axe);
    c.goto("/console/admins");
    c.screenshot("admins");
    c.axe("admins", &mut axe);

    // A phone: nothing wider than the window; tables scroll inside their containers.
    c.browser.set_viewport_size(390, 844);
    for path in ["/console/agents", "/console/agents/mobile-app", "/console/agents/mobile-app/usage", "/console/agents/mobile-app/settings", "/console/envoys", "/console/audit", "/console/admins"] {
        c.goto(path);
        c.assert_fits_the_window(&format!("{path} at 390 px"));
    }
    c.goto("/console/agents");
    let inside = c.js("const s = document.querySelector('.scroll'); return s.scrollWidth > s.clientWidth;");
    assert_eq!(inside, true, "the agents table scrolls inside its container at 390 px");
    c.screenshot("agents-phone");
    c.axe("API keys at 390 px", &mut axe);

    assert!(axe.is_empty(), "{} serious or critical accessibility violation(s):\n{}", axe.len(), axe.join("\n"));
}

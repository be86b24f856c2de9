//! `keyward serve` run like a service, as real processes: `/metrics` (strict OpenMetrics),
//! separate admin and feed listeners, and TLS with a real CA and server certificate.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::Dir;
use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_rustls::rustls;

const ADMIN_TOKEN: &str = "ops-admin-token-0123456789abcdef";
const FEED_TOKEN: &str = "ops-feed-token-0123456789abcdef";

/// The `keyward` binary: `$KEYWARD_BIN`, else the one cargo built for these tests.
fn keyward_bin() -> PathBuf {
    let path = std::env::var_os("KEYWARD_BIN").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_keyward")), PathBuf::from);
    assert!(
        path.is_file(),
        "the keyward binary was not found at {}.\nRun `cargo xtask test` (it builds it), or `cargo build -p keyward`, or set KEYWARD_BIN.",
        path.display()
    );
    path
}

/// A `keyward serve` process and the address of each of its listeners, by role. Killed on drop.
struct Serve {
    child: Child,
    log: PathBuf,
    listeners: BTreeMap<String, SocketAddr>,
}

impl Serve {
    /// `keyward serve --listen 127.0.0.1:0 --replica ops-test` plus `args`, with the admin token
    /// and `env`. Waits until every listener it was asked for is up.
    fn start(dir: &Dir, args: &[&str], env: &[(&str, &str)]) -> Serve {
        let log = dir.0.join(format!("serve-{}.log", std::process::id()));
        let mut cmd = Command::new(keyward_bin());
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--replica", "ops-test", "--db"])
            .arg(dir.db())
            .args(args)
            .env("KEYWARD_ADMIN_TOKEN", ADMIN_TOKEN)
            .env_remove("KEYWARD_FEED_TOKEN")
            .env_remove("KEYWARD_TLS_CERT")
            .env_remove("KEYWARD_TLS_KEY")
            .env_remove("KEYWARD_FEED_LISTEN")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let want = if args.contains(&"--feed-listen") { 2 } else { 1 };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let listeners: BTreeMap<String, SocketAddr> = text
                .lines()
                .filter(|l| l.contains("keyward serve listening"))
                .map(|l| (field(l, "listener").to_string(), field(l, "address").parse().unwrap()))
                .collect();
            if listeners.len() == want {
                return Serve { child, log, listeners };
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("keyward serve exited {status}:\n{text}");
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                panic!("keyward serve did not start:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn addr(&self, role: &str) -> SocketAddr {
        *self.listeners.get(role).unwrap_or_else(|| panic!("no {role} listener in {:?}", self.listeners))
    }

    fn url(&self, role: &str) -> String {
        format!("http://{}", self.addr(role))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of `name=` in a log line.
fn field<'a>(line: &'a str, name: &str) -> &'a str {
    line.split_whitespace().find_map(|w| w.strip_prefix(name).and_then(|w| w.strip_prefix('='))).unwrap_or_else(|| panic!("no {name}= in {line}"))
}

/// Runs the CLI.
fn cli(args: &[&str]) -> std::process::Output {
    Command::new(keyward_bin())
        .args(args)
        .env_remove("KEYWARD_URL")
        .env_remove("KEYWARD_ADMIN_TOKEN")
        .env_remove("KEYWARD_CA_CERT")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// GET `url` with an optional bearer token: status and body, whatever the status.
fn get(agent: &ureq::Agent, url: &str, token: Option<&str>) -> (u16, String) {
    let mut req = agent.get(url);
    if let Some(t) = token {
        req = req.set("authorization", &format!("Bearer {t}"));
    }
    match req.call() {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
        Err(e) => panic!("GET {url}: {e}"),
    }
}

fn plain() -> ureq::Agent {
    ureq::AgentBuilder::new().timeout(Duration::from_secs(30)).build()
}

fn poll_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---- OpenMetrics, read strictly ----

#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn valid_name(n: &str) -> bool {
    let mut chars = n.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':') && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Reads `{a="x",b="y"}` at the start of `s`; returns the labels and the rest.
fn labels(s: &str) -> (BTreeMap<String, String>, &str) {
    let mut out = BTreeMap::new();
    let Some(mut rest) = s.strip_prefix('{') else { return (out, s) };
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return (out, r);
        }
        let (name, r) = rest.split_once("=\"").unwrap_or_else(|| panic!("bad label set at {rest:?}"));
        assert!(valid_name(name) && !name.contains(':'), "bad label name {name:?}");
        let mut value = String::new();
        let mut chars = r.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    other => panic!("bad escape {other:?} in {r:?}"),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => panic!("unterminated label value in {r:?}"),
            }
        };
        assert!(out.insert(name.to_string(), value).is_none(), "label {name} twice");
        rest = &r[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

/// A strict reading of OpenMetrics text: every sample belongs to a family declared by `# TYPE`
/// before it, with a suffix its type allows; label sets are well-formed; values are numbers;
/// the text ends with `# EOF`.
fn parse_openmetrics(body: &str) -> Vec<Sample> {
    assert!(body.ends_with("# EOF\n"), "no # EOF at the end:\n{body}");
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = Vec::new();
    for line in body.lines() {
        if line == "# EOF" {
            break;
        }
        if let Some(meta) = line.strip_prefix("# ") {
            let mut parts = meta.splitn(3, ' ');
            let (kind, name, rest) = (parts.next().unwrap(), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            assert!(valid_name(name), "bad family name in {line:?}");
            match kind {
                "TYPE" => {
                    let known = ["counter", "gauge", "histogram", "gaugehistogram", "summary", "info", "stateset", "unknown"];
                    assert!(known.contains(&rest), "unknown type in {line:?}");
                    assert!(types.insert(name.to_string(), rest.to_string()).is_none(), "{name} declared twice");
                }
                "HELP" | "UNIT" => {}
                _ => panic!("unknown metadata line {line:?}"),
            }
            continue;
        }
        let end = line.find(['{', ' ']).unwrap_or_else(|| panic!("no value in {line:?}"));
        let name = &line[..end];
        assert!(valid_name(name), "bad metric name in {line:?}");
        let (labels, rest) = labels(&line[end..]);
        let mut rest = rest.strip_prefix(' ').unwrap_or_else(|| panic!("no value in {line:?}")).split(' ');
        let value = match rest.next().unwrap() {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|e| panic!("bad value in {line:?}: {e}")),
        };
        if let Some(ts) = rest.next() {
            ts.parse::<f64>().unwrap_or_else(|e| panic!("bad timestamp in {line:?}: {e}"));
        }
        assert!(rest.next().is_none(), "trailing text in {line:?}");
        let family = types
            .iter()
            .find(|(family, ty)| {
                let suffixes: &[&str] = match ty.as_str() {
                    "counter" => &["_total", "_created"],
                    "histogram" => &["_bucket", "_sum", "_count", "_created"],
                    "info" => &["_info"],
                    _ => &[""],
                };
                suffixes.iter().any(|s| name.strip_suffix(s) == Some(family.as_str()))
            })
            .unwrap_or_else(|| panic!("{name} belongs to no declared family"));
        if name.ends_with("_bucket") && types[family.0] == "histogram" {
            assert!(labels.contains_key("le"), "a bucket without le: {line:?}");
        }
        samples.push(Sample { name: name.to_string(), labels, value });
    }
    samples
}

fn scrape(url: &str) -> Vec<Sample> {
    let resp = plain().get(&format!("{url}/metrics")).call().unwrap();
    assert!(resp.content_type().contains("openmetrics-text"), "content-type {}", resp.content_type());
    parse_openmetrics(&resp.into_string().unwrap())
}

/// The value of the one sample `name` whose labels include `with`.
fn value(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> Option<f64> {
    let found: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.name == name && with.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
        .collect();
    assert!(found.len() <= 1, "{name} {with:?}: several samples {found:?}");
    found.first().map(|s| s.value)
}

fn expect(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> f64 {
    value(samples, name, with).unwrap_or_else(|| panic!("no {name} {with:?} in {samples:#?}"))
}

// ---- /metrics ----

#[test]
fn metrics_are_openmetrics_text_naming_every_series_after_a_change_and_a_feed_request() {
    let dir = Dir::new("ops-metrics");
    let serve = Serve::start(&dir, &[], &[]);
    let url = serve.url("admin+feed");
    let out = cli(&["--url", &url, "--token", ADMIN_TOKEN, "agent", "create", "metered", "--scopes", "read:all", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (code, page) = get(&plain(), &format!("{url}/v1/feed?envoy=edge-1&since=0"), None);
    assert_eq!(code, 200, "{page}");
    let version: f64 = serde_json::from_str::<serde_json::Value>(&page).unwrap()["version"].as_f64().unwrap();
    assert!(version >= 1.0, "{page}");

    let m = scrape(&url);
    assert_eq!(expect(&m, "keyward_replica_info", &[("replica", "ops-test"), ("engine", "sqlite"), ("role", "admin+feed")]), 1.0);
    assert_eq!(expect(&m, "keyward_snapshot_version", &[]), version);
    assert_eq!(expect(&m, "keyward_feed_clients", &[]), 0.0);
    // The feed request said nothing was applied yet (since=0): the Envoy is behind by all of it.
    assert_eq!(expect(&m, "keyward_envoy_applied_version", &[("envoy", "edge-1")]), 0.0);
    assert_eq!(expect(&m, "keyward_envoy_lag_versions", &[("envoy", "edge-1")]), version);
    assert_eq!(expect(&m, "keyward_changes_total", &[]), 1.0);
    assert!(expect(&m, "keyward_store_operation_seconds_count", &[("op", "agent.create")]) >= 1.0);
    assert!(expect(&m, "keyward_store_operation_seconds_count", &[("op", "feed.page")]) >= 1.0);
    assert!(expect(&m, "keyward_store_operation_seconds_sum", &[("op", "agent.create")]) > 0.0);
    assert_eq!(expect(&m, "keyward_store_operation_seconds_bucket", &[("op", "agent.create"), ("le", "+Inf")]), 1.0);
    assert_eq!(expect(&m, "keyward_admin_guard_lockouts_total", &[]), 0.0);
}

#[test]
fn feed_clients_counts_the_long_polls_held_open_now() {
    let dir = Dir::new("ops-feedclients");
    let serve = Serve::start(&dir, &[], &[]);
    let url = serve.url("admin+feed");
    let held = {
        let url = url.clone();
        std::thread::spawn(move || get(&plain(), &format!("{url}/v1/feed?envoy=edge-1&since=0&wait=20"), None))
    };
    poll_until("one feed client", Duration::from_secs(10), || value(&scrape(&url), "keyward_feed_clients", &[]) == Some(1.0));
    // A change answers the long-poll at once.
    let out = cli(&["--url", &url, "--token", ADMIN_TOKEN, "--no-wait", "agent", "create", "waker", "--scopes", "read:all"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (code, page) = held.join().unwrap();
    assert_eq!(code, 200, "{page}");
    poll_until("no feed client", Duration::from_secs(5), || value(&scrape(&url), "keyward_feed_clients", &[]) == Some(0.0));
}

#[test]
fn lockouts_counter_moves_when_ten_wrong_tokens_block_an_address() {
    let dir = Dir::new("ops-lockout");
    let serve = Serve::start(&dir, &[], &[]);
    let url = serve.url("admin+feed");
    let agent = plain();
    for i in 0..10 {
        let (code, body) = get(&agent, &format!("{url}/v1/agents"), Some("wrong-token-0123456789abcdef"));
        assert_eq!(code, 401, "attempt {i}: {body}");
    }
    assert_eq!(expect(&scrape(&url), "keyward_admin_guard_lockouts_total", &[]), 1.0);
    let (code, body) = get(&agent, &format!("{url}/v1/agents"), Some(ADMIN_TOKEN));
    assert_eq!(code, 429, "the address is blocked, even with the right token: {body}");
    // Blocked requests are refused before any comparison: no second lockout.
    assert_eq!(expect(&scrape(&url), "keyward_admin_guard_lockouts_total", &[]), 1.0);
}

// ---- separate listeners ----

#[test]
fn with_feed_listen_the_feed_answers_only_there_and_the_admin_api_only_on_listen() {
    let dir = Dir::new("ops-listeners");
    let serve = Serve::start(&dir, &["--feed-listen", "127.0.0.1:0"], &[("KEYWARD_FEED_TOKEN", FEED_TOKEN)]);
    let (admin, feed) = (serve.url("admin"), serve.url("feed"));
    assert_ne!(serve.addr("admin"), serve.addr("feed"));
    let agent = plain();

    // The feed's routes on the admin listener, with either token: a 404 naming the feed listener.
    for (path, token) in [("/v1/feed?envoy=e", FEED_TOKEN), ("/v1/feed?envoy=e", ADMIN_TOKEN), ("/v1/feed/usage", FEED_TOKEN), ("/v1/feed/rates", FEED_TOKEN)] {
        let (code, body) = get(&agent, &format!("{admin}{path}"), Some(token));
        assert_eq!(code, 404, "{path}: {body}");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["error"]["code"], "NOT_FOUND");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("feed listener (--feed-listen)"), "{message}");
    }
    // And the other way round.
    for path in ["/v1/agents", "/v1/status", "/v1/keys/key_x/revoke"] {
        let (code, body) = get(&agent, &format!("{feed}{path}"), Some(ADMIN_TOKEN));
        assert_eq!(code, 404, "{path}: {body}");
        let message = serde_json::from_str::<serde_json::Value>(&body).unwrap()["error"]["message"].as_str().unwrap().to_string();
        assert!(message.contains("admin listener (--listen)"), "{message}");
    }
    // An unknown route is still an unknown route.
    let (code, body) = get(&agent, &format!("{feed}/v1/nothing"), None);
    assert_eq!(code, 404);
    assert!(body.contains("there is no route"), "{body}");

    // Each listener serves its own routes, with its own token.
    let out = cli(&["--url", &admin, "--token", ADMIN_TOKEN, "agent", "create", "split", "--scopes", "read:all"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(get(&agent, &format!("{feed}/v1/feed?envoy=edge-split&since=0"), None).0, 401, "the feed token is required");
    assert_eq!(get(&agent, &format!("{feed}/v1/feed?envoy=edge-split&since=0"), Some(ADMIN_TOKEN)).0, 401, "the admin token is not the feed token");
    let (code, page) = get(&agent, &format!("{feed}/v1/feed?envoy=edge-split&since=0"), Some(FEED_TOKEN));
    assert_eq!(code, 200, "{page}");
    let rates = |token: Option<&str>| {
        let mut req = agent.post(&format!("{feed}/v1/feed/rates"));
        if let Some(t) = token {
            req = req.set("authorization", &format!("Bearer {t}"));
        }
        match req.send_string(r#"{"envoy": "edge-split", "buckets": []}"#) {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
            Err(e) => panic!("POST /v1/feed/rates: {e}"),
        }
    };
    assert_eq!(rates(None).0, 401, "rate reports need the feed token too");
    let (code, answer) = rates(Some(FEED_TOKEN));
    assert_eq!((code, answer.as_str()), (200, r#"{"mode":"split","envoys":1,"buckets":[]}"#));
    let (code, status) = get(&agent, &format!("{admin}/v1/status"), Some(ADMIN_TOKEN));
    assert_eq!(code, 200);
    assert!(status.contains("edge-split"), "the admin API sees the Envoy that fetched on the feed listener: {status}");

    // Probes and metrics on both, each saying what it serves.
    for (url, role) in [(&admin, "admin"), (&feed, "feed")] {
        assert_eq!(get(&agent, &format!("{url}/healthz"), None).0, 200);
        assert_eq!(get(&agent, &format!("{url}/readyz"), None).0, 200);
        assert_eq!(expect(&scrape(url), "keyward_replica_info", &[("role", role), ("replica", "ops-test")]), 1.0);
    }
}

// ---- TLS ----

struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    /// A key that belongs to no certificate here.
    other_key: PathBuf,
}

/// A CA and a server certificate for 127.0.0.1 and localhost, signed by it, as PEM files.
fn pki(dir: &Dir) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "keyward ops test CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, "keyward serve");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    let write = |name: &str, pem: String| {
        let path = dir.0.join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    Pki {
        ca: write("ca.pem", ca.pem()),
        cert: write("server.pem", cert.pem()),
        key: write("server.key", key.serialize_pem()),
        other_key: write("other.key", KeyPair::generate().unwrap().serialize_pem()),
    }
}

fn tls_agent(ca: &Path) -> ureq::Agent {
    let config = keyward_control::tls::client_config(Some(ca)).unwrap();
    ureq::AgentBuilder::new().timeout(Duration::from_secs(30)).tls_config(config).build()
}

/// A raw HTTP/1.1 request over rustls (no HTTP client library), trusting only `ca`.
fn raw_tls_request(addr: SocketAddr, server_name: &str, ca: &Path, request: &str) -> (String, Option<Vec<u8>>, Option<rustls::ProtocolVersion>) {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string()).unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(request.as_bytes()).unwrap();
    let mut response = Vec::new();
    // The server closes after answering (`connection: close`); a missing close_notify is fine.
    match tls.read_to_end(&mut response) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Err(e) => panic!("reading the TLS response: {e}"),
    }
    let alpn = tls.conn.alpn_protocol().map(<[u8]>::to_vec);
    (text(&response), alpn, tls.conn.protocol_version())
}

#[test]
fn tls_serves_the_cli_a_raw_tls_client_and_the_feed_listener() {
    let dir = Dir::new("ops-tls");
    let pki = pki(&dir);
    let (cert, key) = (pki.cert.to_str().unwrap(), pki.key.to_str().unwrap());
    let serve = Serve::start(&dir, &["--feed-listen", "127.0.0.1:0", "--tls-cert", cert, "--tls-key", key], &[("KEYWARD_FEED_TOKEN", FEED_TOKEN)]);
    assert!(serve.log().lines().filter(|l| l.contains("keyward serve listening")).all(|l| field(l, "tls") == "true"), "{}", serve.log());
    let (admin, feed) = (serve.addr("admin"), serve.addr("feed"));
    let ca = pki.ca.to_str().unwrap();

    // The CLI over https, by IP and by name, trusting the CA through the flag and the variable.
    let url = format!("https://127.0.0.1:{}", admin.port());
    let out = cli(&["--url", &url, "--token", ADMIN_TOKEN, "--ca-cert", ca, "agent", "create", "over-tls", "--scopes", "read:all", "--json"]);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), serve.log());
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(created["secret"].as_str().is_some_and(|k| k.starts_with("kw_")), "{created}");
    let by_name = format!("https://localhost:{}", admin.port());
    let out = Command::new(keyward_bin())
        .args(["--url", &by_name, "--token", ADMIN_TOKEN, "agent", "list", "--json"])
        .env("KEYWARD_CA_CERT", ca)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("over-tls"));

    // Without the CA the server is not trusted, and the error says what to do.
    let out = cli(&["--url", &url, "--token", ADMIN_TOKEN, "agent", "list"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("certificate") && err.contains("--ca-cert"), "{err}");

    // A raw TLS client: TLS 1.3, ALPN http/1.1, a real HTTP answer.
    let (response, alpn, version) = raw_tls_request(admin, "localhost", &pki.ca, "GET /healthz HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with(r#"{"status":"ok"}"#), "{response}");
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(version, Some(rustls::ProtocolVersion::TLSv1_3));

    // The feed listener over TLS, with its token; the admin API is not there.
    let agent = tls_agent(&pki.ca);
    let feed_url = format!("https://127.0.0.1:{}", feed.port());
    let (code, page) = get(&agent, &format!("{feed_url}/v1/feed?envoy=tls-edge&since=0"), Some(FEED_TOKEN));
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("\"version\""), "{page}");
    assert_eq!(get(&agent, &format!("{feed_url}/v1/agents"), Some(ADMIN_TOKEN)).0, 404);
    let m = parse_openmetrics(&get(&agent, &format!("{feed_url}/metrics"), None).1);
    assert_eq!(expect(&m, "keyward_replica_info", &[("role", "feed")]), 1.0);
    let (code, status) = get(&agent, &format!("https://127.0.0.1:{}/v1/status", admin.port()), Some(ADMIN_TOKEN));
    assert_eq!(code, 200);
    assert!(status.contains("tls-edge"), "the Envoy that fetched over TLS is in the status: {status}");
    // The token guard sees the client's address through TLS (not the 0.0.0.0 of no address).
    assert_eq!(get(&agent, &format!("https://127.0.0.1:{}/v1/agents", admin.port()), Some("wrong-token-0123456789abcdef")).0, 401);
    poll_until("the guard's log line", Duration::from_secs(5), || serve.log().contains("client=127.0.0.1"));

    // Plain HTTP to a TLS port: a clear 400, and the server carries on.
    for port in [admin.port(), feed.port()] {
        let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n").unwrap();
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 400 Bad Request"), "{answer}");
        assert!(answer.contains("TLS_REQUIRED") && answer.contains("https://"), "{answer}");
        let (code, _) = get(&agent, &format!("https://127.0.0.1:{port}/healthz"), None);
        assert_eq!(code, 200);
    }
    // A plain-HTTP client library sees the same answer.
    let (code, body) = get(&plain(), &format!("http://127.0.0.1:{}/healthz", admin.port()), None);
    assert_eq!(code, 400, "{body}");
}

/// Runs `keyward serve` expecting it to refuse to start; returns its stderr.
fn serve_fails(dir: &Dir, args: &[&str]) -> String {
    let mut child = Command::new(keyward_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--db"])
        .arg(dir.db())
        .args(args)
        .env("KEYWARD_ADMIN_TOKEN", ADMIN_TOKEN)
        .env_remove("KEYWARD_TLS_CERT")
        .env_remove("KEYWARD_TLS_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("keyward serve {args:?} started instead of refusing");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "{args:?} exited 0");
    text(&out.stderr)
}

#[test]
fn tls_flags_and_files_are_checked_at_start_and_named() {
    let dir = Dir::new("ops-tlsflags");
    let pki = pki(&dir);
    let (cert, key) = (pki.cert.to_str().unwrap(), pki.key.to_str().unwrap());

    let err = serve_fails(&dir, &["--tls-cert", cert]);
    assert!(err.contains("--tls-cert needs --tls-key"), "{err}");
    let err = serve_fails(&dir, &["--tls-key", key]);
    assert!(err.contains("--tls-key needs --tls-cert"), "{err}");

    let missing = dir.0.join("missing.pem");
    let err = serve_fails(&dir, &["--tls-cert", missing.to_str().unwrap(), "--tls-key", key]);
    assert!(err.contains(&format!("--tls-cert {}: cannot read it", missing.display())), "{err}");

    let junk = dir.0.join("junk.pem");
    std::fs::write(&junk, "this is not PEM\n").unwrap();
    let err = serve_fails(&dir, &["--tls-cert", junk.to_str().unwrap(), "--tls-key", key]);
    assert!(err.contains(&format!("--tls-cert {}", junk.display())) && err.contains("no PEM certificate"), "{err}");
    let err = serve_fails(&dir, &["--tls-cert", cert, "--tls-key", junk.to_str().unwrap()]);
    assert!(err.contains(&format!("--tls-key {}", junk.display())) && err.contains("private key"), "{err}");
    // A key in the certificate's place, and a key that is not the certificate's.
    let err = serve_fails(&dir, &["--tls-cert", key, "--tls-key", key]);
    assert!(err.contains(&format!("--tls-cert {key}")), "{err}");
    let err = serve_fails(&dir, &["--tls-cert", cert, "--tls-key", pki.other_key.to_str().unwrap()]);
    assert!(err.contains("does not fit the certificate"), "{err}");

    assert!(!dir.db().exists(), "a refused start creates no store");

    // The CLI's --ca-cert is checked the same way.
    let out = cli(&["--url", "https://127.0.0.1:9", "--token", ADMIN_TOKEN, "--ca-cert", missing.to_str().unwrap(), "agent", "list"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains(&format!("--ca-cert: {}: cannot read it", missing.display())), "{err}");
}

//! The browser plumbing against a real headless Chromium: a tiny site served on loopback is
//! read, filled in, submitted by mouse and by keyboard alone, photographed and checked with
//! axe-core. Without chromedriver, Chromium or axe-core this fails and says how to get them
//! (`cargo xtask test` installs them and passes their paths), as the real-Envoy tests do
//! without Envoy.

use keyward_testkit::browser::{Impact, Key};
use keyward_testkit::{Browser, TempDir};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

/// A form page with nothing for axe-core to object to.
const FORM: &str = r#"<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>Create an agent</title></head>
<body>
<main>
<h1>Create an agent</h1>
<form id="create" method="post" action="/submit">
  <label for="name">Name</label>
  <input id="name" name="name" autocomplete="off">
  <button type="submit" id="save">Create</button>
</form>
</main>
</body>
</html>"#;

/// A page with two serious faults on purpose: an image with no text alternative and a field
/// with no label.
const BROKEN: &str = r#"<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>Broken</title></head>
<body>
<main>
<h1>Broken on purpose</h1>
<img id="logo" src="/logo.png">
<form><input id="unlabelled" name="q"></form>
</main>
</body>
</html>"#;

/// A 1×1 PNG for `/logo.png`.
const PIXEL: &[u8] = &[
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00,
    0x01, 0x08, 0x06, 0x00, 0x00, 0x00, 0x1f, 0x15, 0xc4, 0x89, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0xf8, 0xcf,
    0xc0, 0xf0, 0x1f, 0x00, 0x05, 0x00, 0x01, 0xff, 0x89, 0x99, 0x3d, 0x1d, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4e, 0x44, 0xae, 0x42, 0x60,
    0x82,
];

/// A loopback site: `GET /form`, `GET /broken`, `GET /logo.png`; `POST /submit` answers 303 to
/// `/done?<the form body>` and sets two cookies, one `HttpOnly; SameSite=Strict`; `GET /done`
/// shows the query it got. One thread per connection, `connection: close`.
struct Site {
    port: u16,
}

impl Site {
    fn start() -> Site {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind: {e}"));
        let port = listener.local_addr().unwrap_or_else(|e| panic!("{e}")).port();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                std::thread::spawn(move || serve(conn));
            }
        });
        Site { port }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

fn serve(conn: TcpStream) {
    let Ok(mut out) = conn.try_clone() else { return };
    let mut reader = BufReader::new(conn);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
        return;
    }
    let mut length = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0; length];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let html = "text/html; charset=utf-8";
    let (status, headers, content): (&str, Vec<String>, Vec<u8>) = match (method, path) {
        ("GET", "/form") => ("200 OK", vec![format!("content-type: {html}")], FORM.into()),
        ("GET", "/broken") => ("200 OK", vec![format!("content-type: {html}")], BROKEN.into()),
        ("GET", "/logo.png") => ("200 OK", vec!["content-type: image/png".into()], PIXEL.into()),
        ("POST", "/submit") => (
            "303 See Other",
            vec![
                format!("location: /done?{}", String::from_utf8_lossy(&body)),
                "set-cookie: kw_session=s3cret; Path=/; HttpOnly; SameSite=Strict".into(),
                "set-cookie: kw_theme=dark; Path=/; SameSite=Lax".into(),
            ],
            Vec::new(),
        ),
        ("GET", "/done") => {
            let page = format!(
                "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Done</title></head>\
                 <body><main><h1>Done</h1><p id=\"got\">Created {query}</p></main></body></html>"
            );
            ("200 OK", vec![format!("content-type: {html}")], page.into())
        }
        _ => ("404 Not Found", vec!["content-type: text/plain".into()], b"not found".to_vec()),
    };
    let mut response = format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n", content.len());
    for header in headers {
        response.push_str(&header);
        response.push_str("\r\n");
    }
    response.push_str("\r\n");
    let mut bytes = response.into_bytes();
    bytes.extend_from_slice(&content);
    let _ = out.write_all(&bytes);
}

#[test]
fn a_page_is_read_and_a_form_filled_and_submitted() {
    let site = Site::start();
    let browser = Browser::start();
    eprintln!("browser: chromedriver and a session started in {:.2} s", browser.started_in.as_secs_f64());
    browser.goto(&site.url("/form"));
    assert_eq!(browser.title(), "Create an agent");
    assert_eq!(browser.find("h1"), "Create an agent");
    assert_eq!(browser.try_find("#nothing-here"), None);
    assert_eq!(browser.find_all("label, button"), ["Name", "Create"]);
    assert_eq!(browser.attr("form", "method").as_deref(), Some("post"));
    assert!(browser.page_source().contains(r#"<form id="create""#));
    assert_eq!(browser.execute("return arguments[0] + 1", vec![41.into()]), serde_json::json!(42));

    browser.fill("#name", "wrong");
    browser.fill("#name", "billing");
    browser.submit("form#create");
    assert_eq!(browser.wait_for("#got", WAIT), "Created name=billing");
    assert_eq!(browser.wait_for_url("/done", WAIT), site.url("/done?name=billing"));
    assert_eq!(browser.current_url(), site.url("/done?name=billing"));

    let session = browser.cookie("kw_session").unwrap_or_else(|| panic!("no kw_session cookie in {:?}", browser.cookies()));
    assert_eq!(session.value, "s3cret");
    assert!(session.http_only && !session.secure, "{session:?}");
    assert_eq!(session.same_site.as_deref(), Some("Strict"));
    assert_eq!(session.expiry, None, "a session cookie");
    let theme = browser.cookie("kw_theme").unwrap_or_else(|| panic!("no kw_theme cookie in {:?}", browser.cookies()));
    assert!(!theme.http_only, "{theme:?}");
    assert_eq!(theme.same_site.as_deref(), Some("Lax"));
    // What page scripts see: never the HttpOnly one.
    assert_eq!(browser.execute("return document.cookie", vec![]), serde_json::json!("kw_theme=dark"));
}

#[test]
fn the_form_is_reached_and_submitted_with_the_keyboard_alone() {
    let site = Site::start();
    let browser = Browser::start();
    browser.goto(&site.url("/form"));
    browser.press(Key::Tab);
    assert!(browser.is_focused("#name"), "focus after one Tab: {}", browser.focused());
    browser.send_keys("ops");
    browser.press(Key::Tab);
    assert_eq!(browser.focused(), r#"<button type="submit" id="save">"#);
    browser.press(Key::Enter);
    assert_eq!(browser.wait_for("#got", WAIT), "Created name=ops");
}

#[test]
fn a_screenshot_is_a_png_of_the_viewport_and_follows_its_size() {
    let site = Site::start();
    let browser = Browser::start();
    browser.goto(&site.url("/form"));
    let dir = TempDir::new("screenshot").unwrap_or_else(|e| panic!("{e}"));
    let size = |path: &std::path::Path| {
        let png = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{} is not a PNG", path.display());
        // The IHDR chunk comes first: width and height, big-endian, at bytes 16 and 20.
        let be = |at: usize| u32::from_be_bytes([png[at], png[at + 1], png[at + 2], png[at + 3]]);
        (be(16), be(20))
    };
    let first = dir.path().join("sub/form.png");
    browser.screenshot(&first);
    let (width, height) = size(&first);
    assert_eq!(width, keyward_testkit::browser::WINDOW_SIZE.0);
    assert!(height > 0 && height <= keyward_testkit::browser::WINDOW_SIZE.1, "{width}×{height}");
    browser.set_window_size(480, 800);
    let narrow = dir.path().join("narrow.png");
    browser.screenshot(&narrow);
    assert_eq!(size(&narrow).0, 480);
    browser.set_viewport_size(390, 844);
    let phone = dir.path().join("phone.png");
    browser.screenshot(&phone);
    assert_eq!(size(&phone), (390, 844));
    let saved = browser.save_screenshot("testkit-browser-form");
    assert!(saved.starts_with(keyward_testkit::browser::screenshots_dir()) && saved.is_file(), "{}", saved.display());
}

#[test]
fn axe_reports_an_image_without_alt_and_a_field_without_label() {
    let site = Site::start();
    let browser = Browser::start();
    browser.goto(&site.url("/broken"));
    let violations = browser.axe();
    let rule = |id: &str| violations.iter().find(|v| v.id == id).unwrap_or_else(|| panic!("no {id} violation in {violations:#?}"));
    let image = rule("image-alt");
    assert_eq!(image.impact, Some(Impact::Critical));
    assert_eq!(image.nodes.iter().map(|n| n.target.as_str()).collect::<Vec<_>>(), ["#logo"]);
    assert!(image.nodes[0].html.starts_with("<img"), "{image:?}");
    assert!(image.help_url.starts_with("https://"), "{image:?}");
    let label = rule("label");
    assert!(label.is_serious(), "{label:?}");
    assert_eq!(label.nodes.iter().map(|n| n.target.as_str()).collect::<Vec<_>>(), ["#unlabelled"]);

    let failure = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| browser.assert_no_serious_axe_violations("the broken page")));
    let message = failure.err().and_then(|p| p.downcast_ref::<String>().cloned()).unwrap_or_else(|| panic!("the assertion passed on the broken page"));
    for part in ["on the broken page", "image-alt (critical)", "#logo", "label (critical)", "#unlabelled"] {
        assert!(message.contains(part), "{part:?} not in:\n{message}");
    }
}

#[test]
fn axe_finds_nothing_on_a_clean_page() {
    let site = Site::start();
    let browser = Browser::start();
    browser.goto(&site.url("/form"));
    assert_eq!(browser.axe(), []);
    browser.assert_no_serious_axe_violations("the form page");
}

#[test]
fn dropping_the_browser_leaves_no_process_behind() {
    let browser = Browser::start();
    let profile = browser.profile_dir().display().to_string();
    let port = browser.driver_port();
    let holders = || -> Vec<String> {
        let Ok(procs) = std::fs::read_dir("/proc") else { return Vec::new() };
        procs
            .flatten()
            .filter_map(|p| {
                let cmd = std::fs::read(p.path().join("cmdline")).ok()?;
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                let ours = cmd.contains(&profile) || cmd.contains(&format!("--port={port}"));
                ours.then(|| format!("{}: {}", p.file_name().to_string_lossy(), cmd.chars().take(120).collect::<String>()))
            })
            .collect()
    };
    assert!(!holders().is_empty(), "no Chromium runs with the profile {profile}");
    drop(browser);
    keyward_testkit::poll_until(Duration::from_secs(10), "chromedriver and Chromium to be gone", || holders().is_empty().then_some(()));
    assert!(!std::path::Path::new(&profile).exists(), "{profile} is still there");
}

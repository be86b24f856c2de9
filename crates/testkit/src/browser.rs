//! A real, headless Chromium for the console's browser tests: `chromedriver` on a free loopback
//! port, one W3C WebDriver session through [fantoccini], and axe-core's accessibility checks.
//!
//! [`Browser`] is blocking, like the rest of the testkit: it owns a small tokio runtime and
//! every method runs one WebDriver command to completion on it, so a test is a plain `#[test]`
//! that can start [`crate::Keyward`] next to it. Do not call it from inside an async runtime
//! (`#[tokio::test]`): `block_on` there panics. For a command the wrapper lacks, take
//! [`Browser::client`] and run it with [`Browser::block_on`].
//!
//! The methods panic on failure with what they were doing, the selector and the page's URL,
//! since a failed browser step is a failed test. Nothing here skips: a missing `chromedriver`,
//! Chromium or axe-core fails with directions (`cargo xtask browser` installs all three).
//!
//! ```no_run
//! use keyward_testkit::Browser;
//! let browser = Browser::start();
//! browser.goto("http://127.0.0.1:7070/console");
//! browser.fill("#name", "billing");
//! browser.submit("form#create");
//! assert_eq!(browser.wait_for(".flash", std::time::Duration::from_secs(5)), "Created billing");
//! browser.assert_no_serious_axe_violations("console, after creating an agent");
//! browser.save_screenshot("console-created");
//! ```

use crate::{poll_until, workspace_root, TempDir};
use fantoccini::actions::{InputSource, KeyAction, KeyActions};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use std::ffi::OsString;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use fantoccini::key::Key;

/// The axe-core release `cargo xtask` installs from npm.
pub const AXE_CORE_VERSION: &str = "4.14.1";

/// The size of the window every session starts with (`--window-size`).
pub const WINDOW_SIZE: (u32, u32) = (1280, 900);

/// How long `chromedriver` may take to answer, and Chromium to open a session.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How long one WebDriver command may take before the test fails (a hung page, a dead driver).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// What to do when a browser tool is missing.
const DIRECTIONS: &str = "Run the tests with `cargo xtask test`, which installs Debian's chromium and chromium-driver \
     and npm's axe-core and passes their paths,\n\
     or run `cargo xtask browser` (it installs them and prints CHROMIUM_BIN=…, CHROMEDRIVER_BIN=… and AXE_CORE_JS=…; \
     `env $(cargo xtask browser) cargo test …`),\n\
     or set CHROMEDRIVER_BIN, CHROMIUM_BIN and AXE_CORE_JS yourself.";

/// Where `cargo xtask` installs axe-core (`npm install --prefix`).
pub fn axe_core_install_dir() -> PathBuf {
    workspace_root().join(".tools/axe-core")
}

/// The installed `axe.min.js`.
pub fn axe_core_default_path() -> PathBuf {
    axe_core_install_dir().join("node_modules/axe-core/axe.min.js")
}

/// `chromedriver`: `$CHROMEDRIVER_BIN`, else the one on `PATH`. Panics with directions.
pub fn chromedriver_bin() -> PathBuf {
    tool(CHROMEDRIVER)
}

/// Chromium: `$CHROMIUM_BIN`, else `chromium` on `PATH`. Panics with directions.
pub fn chromium_bin() -> PathBuf {
    tool(CHROMIUM)
}

/// axe-core's `axe.min.js`: `$AXE_CORE_JS`, else the `.tools/axe-core` install. Panics with
/// directions.
pub fn axe_core_js() -> PathBuf {
    let path = std::env::var_os("AXE_CORE_JS").filter(|v| !v.is_empty()).map(PathBuf::from).unwrap_or_else(axe_core_default_path);
    assert!(path.is_file(), "axe-core's axe.min.js (axe-core {AXE_CORE_VERSION}) not found at {}.\n{DIRECTIONS}", path.display());
    path
}

/// A program the browser needs: the variable naming it, its command on `PATH`, what it is.
struct Tool {
    var: &'static str,
    command: &'static str,
    what: &'static str,
}

const CHROMEDRIVER: Tool = Tool { var: "CHROMEDRIVER_BIN", command: "chromedriver", what: "chromedriver (Debian's chromium-driver)" };
const CHROMIUM: Tool = Tool { var: "CHROMIUM_BIN", command: "chromium", what: "Chromium (Debian's chromium)" };

fn tool(tool: Tool) -> PathBuf {
    find_tool(&tool, std::env::var_os(tool.var), std::env::var_os("PATH")).unwrap_or_else(|e| panic!("{e}"))
}

/// `value` (the tool's variable) if set, else `command` in one of the `path` directories; an
/// error with directions if neither names a file.
fn find_tool(tool: &Tool, value: Option<OsString>, path: Option<OsString>) -> Result<PathBuf, String> {
    let Tool { var, command, what } = tool;
    if let Some(value) = value.filter(|v| !v.is_empty()) {
        let file = PathBuf::from(value);
        return if file.is_file() { Ok(file) } else { Err(format!("{what} not found at {var}={}.\n{DIRECTIONS}", file.display())) };
    }
    path.and_then(|dirs| std::env::split_paths(&dirs).map(|d| d.join(command)).find(|p| p.is_file()))
        .ok_or_else(|| format!("{what} not found: {var} is not set and `{command}` is not on PATH.\n{DIRECTIONS}"))
}

/// A headless Chromium driven through `chromedriver`. Dropping it ends the session (which
/// closes Chromium) and kills `chromedriver` and anything it left running.
pub struct Browser {
    runtime: tokio::runtime::Runtime,
    client: Client,
    driver: Driver,
    /// From spawning `chromedriver` to an open session.
    pub started_in: Duration,
}

/// The `chromedriver` process, its port, and a directory for Chromium's profile and the log.
/// Dropping it kills the process group and then removes the directory, so a panic while
/// starting leaves nothing running.
struct Driver {
    child: Child,
    port: u16,
    dir: TempDir,
}

impl Browser {
    /// Starts `chromedriver` on a free loopback port and opens a session on a headless
    /// Chromium (`--headless=new --no-sandbox --disable-gpu`, a 1280×900 window, a fresh profile).
    pub fn start() -> Browser {
        let began = Instant::now();
        let chromedriver = chromedriver_bin();
        let chromium = chromium_bin();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("cannot build the browser's tokio runtime: {e}"));
        let mut driver = Driver::start(&chromedriver);
        driver.wait_until_ready(&chromedriver);
        let profile = driver.dir.path().join("profile");
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("browserName".into(), json!("chrome"));
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium.display().to_string(),
                "args": [
                    "--headless=new",
                    // Chromium's sandbox cannot start as root (the tests' user here and in CI).
                    "--no-sandbox",
                    "--disable-gpu",
                    format!("--window-size={},{}", WINDOW_SIZE.0, WINDOW_SIZE.1),
                    format!("--user-data-dir={}", profile.display()),
                ],
            }),
        );
        // Plain HTTP to chromedriver on loopback: no TLS connector (and so no TLS stack) needed.
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let url = format!("http://127.0.0.1:{}", driver.port);
        let connect = async { ClientBuilder::new(connector).capabilities(capabilities).connect(&url).await };
        let client = match within(&runtime, START_TIMEOUT, connect) {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => panic!(
                "chromedriver ({}) could not open a session on Chromium ({}): {e}\nchromedriver's log:\n{}",
                chromedriver.display(),
                chromium.display(),
                driver.log_tail()
            ),
            Err(_) => panic!("Chromium did not open a session within {START_TIMEOUT:?}\nchromedriver's log:\n{}", driver.log_tail()),
        };
        Browser { runtime, client, driver, started_in: began.elapsed() }
    }

    /// The fantoccini client, for any WebDriver command the wrapper lacks; run its futures
    /// with [`Browser::block_on`].
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Runs `future` (typically a [`Browser::client`] call) to completion on the browser's
    /// runtime.
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// Chromium's profile directory (`--user-data-dir`), removed on drop. Chromium's processes
    /// carry it on their command lines.
    pub fn profile_dir(&self) -> PathBuf {
        self.driver.dir.path().join("profile")
    }

    /// The loopback port `chromedriver` listens on.
    pub fn driver_port(&self) -> u16 {
        self.driver.port
    }

    /// One command, with a time limit, panicking with `what` and the page's URL on failure.
    fn run<T, E: std::fmt::Display>(&self, what: &str, command: impl Future<Output = Result<T, E>>) -> T {
        match within(&self.runtime, COMMAND_TIMEOUT, command) {
            Ok(Ok(value)) => value,
            Ok(Err(e)) => panic!("browser: {what} failed on {}: {e}", self.url_for_messages()),
            Err(_) => panic!("browser: {what} took more than {COMMAND_TIMEOUT:?} on {}", self.url_for_messages()),
        }
    }

    /// The current URL, or why it is unknown: for failure messages, so it never panics.
    fn url_for_messages(&self) -> String {
        let url = within(&self.runtime, Duration::from_secs(5), self.client().current_url());
        match url {
            Ok(Ok(url)) => url.to_string(),
            _ => "an unknown page".into(),
        }
    }

    /// Navigates to `url` and waits for the page to load.
    pub fn goto(&self, url: &str) {
        self.run(&format!("goto {url}"), self.client().goto(url));
    }

    /// The URL of the current page.
    pub fn current_url(&self) -> String {
        self.run("reading the URL", self.client().current_url()).to_string()
    }

    /// The page's `<title>`.
    pub fn title(&self) -> String {
        self.run("reading the title", self.client().title())
    }

    /// The current DOM, serialised.
    pub fn page_source(&self) -> String {
        self.run("reading the page source", self.client().source())
    }

    /// The rendered text of the first element matching `css`. Panics if there is none.
    pub fn find(&self, css: &str) -> String {
        let client = self.client();
        self.run(&format!("reading the text of {css:?}"), async move { client.find(Locator::Css(css)).await?.text().await })
    }

    /// The rendered text of the first element matching `css`, or `None` if there is none.
    pub fn try_find(&self, css: &str) -> Option<String> {
        let client = self.client();
        self.run(&format!("looking for {css:?}"), async move {
            match client.find_all(Locator::Css(css)).await?.first() {
                Some(element) => element.text().await.map(Some),
                None => Ok(None),
            }
        })
    }

    /// The rendered text of every element matching `css`, in document order.
    pub fn find_all(&self, css: &str) -> Vec<String> {
        let client = self.client();
        self.run(&format!("reading the texts of {css:?}"), async move {
            let mut texts = Vec::new();
            for element in client.find_all(Locator::Css(css)).await? {
                texts.push(element.text().await?);
            }
            Ok::<_, fantoccini::error::CmdError>(texts)
        })
    }

    /// The attribute `name` of the first element matching `css` (`None` if it has none).
    /// Panics if no element matches.
    pub fn attr(&self, css: &str, name: &str) -> Option<String> {
        let client = self.client();
        self.run(&format!("reading {name:?} of {css:?}"), async move { client.find(Locator::Css(css)).await?.attr(name).await })
    }

    /// Clicks the first element matching `css`, as a user would (it must be visible and not
    /// covered).
    pub fn click(&self, css: &str) {
        let client = self.client();
        self.run(&format!("clicking {css:?}"), async move { client.find(Locator::Css(css)).await?.click().await });
    }

    /// Empties the field matching `css` and types `text` into it.
    pub fn fill(&self, css: &str, text: &str) {
        let client = self.client();
        self.run(&format!("filling {css:?}"), async move {
            let field = client.find(Locator::Css(css)).await?;
            field.clear().await?;
            field.send_keys(text).await
        });
    }

    /// Submits the form matching `form_css` by clicking its first submit button (a `<button>`
    /// with no type or `type=submit`, or an `<input type=submit>`), as a user would.
    pub fn submit(&self, form_css: &str) {
        let client = self.client();
        self.run(&format!("submitting {form_css:?}"), async move {
            let form = client.find(Locator::Css(form_css)).await?;
            let button = form.find(Locator::Css("button:not([type]), button[type=submit], input[type=submit]")).await?;
            button.click().await
        });
    }

    /// Types `text` into whatever has the focus, through the keyboard (WebDriver actions).
    /// Special keys are [`Key`]s as text: `&Key::Tab.to_string()`, or see [`Browser::press`].
    pub fn send_keys(&self, text: &str) {
        let mut keys = KeyActions::new("keyboard".into());
        for c in text.chars() {
            keys = keys.then(KeyAction::Down { value: c }).then(KeyAction::Up { value: c });
        }
        self.run(&format!("typing {text:?}"), self.client().perform_actions(keys));
    }

    /// Presses and releases `key` (Tab, Enter, Escape, …) on whatever has the focus: keyboard-only
    /// navigation.
    pub fn press(&self, key: Key) {
        self.send_keys(&key.to_string());
    }

    /// The opening tag of the focused element (`document.activeElement`), e.g.
    /// `<button type="submit" id="save">`: for asserting where keyboard navigation went.
    pub fn focused(&self) -> String {
        let js = "const e = document.activeElement; if (!e) return ''; \
                  const html = e.outerHTML; const end = html.indexOf('>'); \
                  return end < 0 ? html : html.slice(0, end + 1);";
        self.execute(js, vec![]).as_str().unwrap_or_default().to_string()
    }

    /// Whether the focused element matches `css`.
    pub fn is_focused(&self, css: &str) -> bool {
        let js = "const e = document.activeElement; return !!e && e.matches(arguments[0]);";
        self.execute(js, vec![json!(css)]) == Value::Bool(true)
    }

    /// Runs `js` as the body of a function (`arguments` are `args`) and returns what it returns.
    pub fn execute(&self, js: &str, args: Vec<Value>) -> Value {
        self.run("running a script", self.client().execute(js, args))
    }

    /// Resizes the window, e.g. to a phone's width for a responsive-layout check.
    pub fn set_window_size(&self, width: u32, height: u32) {
        self.run(&format!("resizing the window to {width}×{height}"), self.client().set_window_size(width, height));
    }

    /// Resizes the window so that the page's viewport (`innerWidth`×`innerHeight`, what a
    /// screenshot shows) is `width`×`height`. Headless Chromium's window is taller than its
    /// viewport (by 143 px with Chromium 156), so [`Browser::set_window_size`] alone is not.
    pub fn set_viewport_size(&self, width: u32, height: u32) {
        self.set_window_size(width, height);
        let inner = self.execute("return [window.innerWidth, window.innerHeight]", vec![]);
        let measured = |i: usize| inner[i].as_u64().and_then(|v| u32::try_from(v).ok());
        let (Some(inner_width), Some(inner_height)) = (measured(0), measured(1)) else {
            panic!("browser: cannot read the viewport's size: {inner}");
        };
        let grow = |want: u32, got: u32| (want + want).saturating_sub(got);
        if (inner_width, inner_height) != (width, height) {
            self.set_window_size(grow(width, inner_width), grow(height, inner_height));
        }
    }

    /// Writes a PNG of the viewport to `path` (creating its directory).
    pub fn screenshot(&self, path: &Path) {
        let png = self.run("taking a screenshot", self.client().screenshot());
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        }
        std::fs::write(path, png).unwrap_or_else(|e| panic!("cannot write the screenshot {}: {e}", path.display()));
    }

    /// Writes a PNG of the viewport to `target/screenshots/<name>.png`, for people to look at,
    /// and returns that path.
    pub fn save_screenshot(&self, name: &str) -> PathBuf {
        let path = screenshots_dir().join(format!("{name}.png"));
        self.screenshot(&path);
        path
    }

    /// Waits until an element matches `css` and returns its rendered text. Panics after
    /// `timeout`, naming the selector and the page.
    pub fn wait_for(&self, css: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(text) = self.try_find(css) {
                return text;
            }
            assert!(Instant::now() < deadline, "browser: no element matched {css:?} within {timeout:?} on {}", self.url_for_messages());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the current URL contains `part` (after a redirect, say) and returns it.
    pub fn wait_for_url(&self, part: &str, timeout: Duration) -> String {
        poll_until(timeout, &format!("the URL to contain {part:?}"), || Some(self.current_url()).filter(|url| url.contains(part)))
    }

    /// The cookies the current page's origin can see, `HttpOnly` ones included.
    pub fn cookies(&self) -> Vec<Cookie> {
        let cookies = self.run("reading the cookies", self.client().get_all_cookies());
        cookies
            .iter()
            .map(|c| Cookie {
                name: c.name().to_string(),
                value: c.value().to_string(),
                domain: c.domain().map(str::to_string),
                path: c.path().map(str::to_string),
                http_only: c.http_only().unwrap_or(false),
                secure: c.secure().unwrap_or(false),
                same_site: c.same_site().map(|s| s.to_string()),
                expiry: c.expires_datetime().map(|t| t.unix_timestamp()),
            })
            .collect()
    }

    /// The cookie called `name`, if the current page's origin has one.
    pub fn cookie(&self, name: &str) -> Option<Cookie> {
        self.cookies().into_iter().find(|c| c.name == name)
    }

    /// Runs axe-core on the current page and returns its violations (WCAG 2.x A and AA, best
    /// practices: axe's defaults). Panics with directions if axe-core is not installed.
    pub fn axe(&self) -> Vec<Violation> {
        let path = axe_core_js();
        let source = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read axe-core at {}: {e}", path.display()));
        // axe.min.js defines `window.axe` when run as a script; the check runs asynchronously.
        self.execute(&source, vec![]);
        let run = "const done = arguments[arguments.length - 1];\
                   axe.run(document, { resultTypes: ['violations'] })\
                      .then(r => done({ violations: r.violations }))\
                      .catch(e => done({ error: String(e && e.stack || e) }));";
        let result = self.run("running axe-core", self.client().execute_async(run, vec![]));
        if let Some(error) = result.get("error") {
            panic!("browser: axe-core failed on {}: {}", self.url_for_messages(), error.as_str().unwrap_or_default());
        }
        result["violations"].as_array().map(|vs| vs.iter().map(Violation::from_json).collect()).unwrap_or_default()
    }

    /// Runs axe-core and fails listing every serious or critical violation on `page_name` (a
    /// label for the message, e.g. "console, agent list").
    pub fn assert_no_serious_axe_violations(&self, page_name: &str) {
        let serious: Vec<Violation> = self.axe().into_iter().filter(Violation::is_serious).collect();
        if serious.is_empty() {
            return;
        }
        let list: Vec<String> = serious.iter().map(|v| format!("  - {v}")).collect();
        panic!(
            "{} serious or critical accessibility violation(s) on {page_name} ({}):\n{}",
            serious.len(),
            self.url_for_messages(),
            list.join("\n")
        );
    }

    /// `chromedriver`'s log, with Chromium's stderr (`--enable-chrome-logs`): the page's console
    /// messages show there as `INFO:CONSOLE` lines, among harmless D-Bus errors.
    pub fn log(&self) -> String {
        self.driver.log()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ending the session makes chromedriver close Chromium; the driver's drop then kills
        // whatever is left of its process group.
        let client = self.client.clone();
        let _ = within(&self.runtime, Duration::from_secs(10), client.close());
    }
}

/// Runs `future` on `runtime`, giving up after `limit` (the timer is made inside the runtime,
/// which it needs).
fn within<F: Future>(runtime: &tokio::runtime::Runtime, limit: Duration, future: F) -> Result<F::Output, tokio::time::error::Elapsed> {
    runtime.block_on(async { tokio::time::timeout(limit, future).await })
}

/// Where [`Browser::save_screenshot`] writes.
pub fn screenshots_dir() -> PathBuf {
    workspace_root().join("target/screenshots")
}

impl Driver {
    /// Starts `chromedriver` in a process group of its own (so Chromium, its child, can be
    /// killed with it) on a free port. The port is picked by binding port 0 and letting go of
    /// it; if another process takes it first, chromedriver exits and the next port is tried.
    fn start(chromedriver: &Path) -> Driver {
        use std::os::unix::process::CommandExt;
        let mut last = String::new();
        for _ in 0..5 {
            let dir = TempDir::new("browser").unwrap_or_else(|e| panic!("temp dir for the browser: {e}"));
            let log_path = dir.path().join("chromedriver.log");
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .unwrap_or_else(|e| panic!("no free loopback port for chromedriver: {e}"));
            let log = std::fs::File::create(&log_path).unwrap_or_else(|e| panic!("{}: {e}", log_path.display()));
            let log_too = log.try_clone().unwrap_or_else(|e| panic!("{}: {e}", log_path.display()));
            let child = Command::new(chromedriver)
                .arg(format!("--port={port}"))
                .arg("--enable-chrome-logs")
                .stdin(Stdio::null())
                .stdout(log_too)
                .stderr(log)
                .process_group(0)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}\n{DIRECTIONS}", chromedriver.display()));
            let mut driver = Driver { child, port, dir };
            // Either it listens (and keeps running) or it could not bind and exits at once.
            let listening = poll_until(Duration::from_secs(20), "chromedriver to listen or exit", || {
                if let Ok(Some(_)) = driver.child.try_wait() {
                    return Some(false);
                }
                std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(|_| true)
            });
            if listening {
                return driver;
            }
            last = driver.log();
        }
        panic!("chromedriver ({}) did not start on any of 5 free ports; its last log:\n{last}", chromedriver.display());
    }

    /// Polls `/status` until chromedriver says it is ready.
    fn wait_until_ready(&mut self, chromedriver: &Path) {
        let port = self.port;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().ok().flatten() {
                panic!("chromedriver ({}) exited at start: {status}\nits log:\n{}", chromedriver.display(), self.log_tail());
            }
            // chromedriver refuses a Host that is not a loopback name (DNS rebinding).
            let probe = format!("GET /status HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nconnection: close\r\n\r\n");
            let ready = crate::send_raw(port, probe.as_bytes())
                .ok()
                .and_then(|r| serde_json::from_slice::<Value>(&r.body).ok())
                .is_some_and(|v| v["value"]["ready"] == Value::Bool(true));
            if ready {
                return;
            }
            assert!(Instant::now() < deadline, "chromedriver did not answer on 127.0.0.1:{port} within {START_TIMEOUT:?}\nits log:\n{}", self.log_tail());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("chromedriver.log")).unwrap_or_default()
    }

    /// The log's last lines for a failure message, without Chromium's D-Bus complaints (there
    /// is no bus here; they are harmless and crowd out the rest).
    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().filter(|l| !l.contains(":dbus/")).collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// SIGKILL to the whole process group (chromedriver and any Chromium it left), then reaps
    /// chromedriver.
    fn kill(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill(2) with a negative pid signals that process group; no memory is shared.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A cookie as the browser holds it, for security assertions (`HttpOnly`, `Secure`,
/// `SameSite`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cookie {
    pub name: String,
    pub value: String,
    pub domain: Option<String>,
    pub path: Option<String>,
    pub http_only: bool,
    pub secure: bool,
    /// `"Strict"`, `"Lax"` or `"None"` as the browser reports it; `None` if it reports none.
    pub same_site: Option<String>,
    /// Expiry in Unix seconds; `None` for a session cookie.
    pub expiry: Option<i64>,
}

/// How bad axe-core says a violation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Impact {
    Minor,
    Moderate,
    Serious,
    Critical,
}

impl Impact {
    fn parse(text: &str) -> Option<Impact> {
        match text {
            "minor" => Some(Impact::Minor),
            "moderate" => Some(Impact::Moderate),
            "serious" => Some(Impact::Serious),
            "critical" => Some(Impact::Critical),
            _ => None,
        }
    }
}

/// One axe-core rule that failed on the page, with the elements it failed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The rule, e.g. `image-alt`, `label`, `color-contrast`.
    pub id: String,
    pub impact: Option<Impact>,
    /// One line saying what the rule wants.
    pub help: String,
    /// Deque's page on the rule.
    pub help_url: String,
    pub nodes: Vec<ViolationNode>,
}

/// An element a rule failed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViolationNode {
    /// The CSS selector(s) reaching it; into an iframe or a shadow root the steps are joined
    /// with ` >>> `.
    pub target: String,
    /// Its HTML, as axe-core quotes it.
    pub html: String,
}

impl Violation {
    /// Serious or critical.
    pub fn is_serious(&self) -> bool {
        self.impact >= Some(Impact::Serious)
    }

    fn from_json(v: &Value) -> Violation {
        let text = |v: &Value, key: &str| v[key].as_str().unwrap_or_default().to_string();
        let nodes = v["nodes"]
            .as_array()
            .map(|nodes| {
                nodes
                    .iter()
                    .map(|n| ViolationNode { target: target_text(&n["target"]), html: text(n, "html") })
                    .collect()
            })
            .unwrap_or_default();
        Violation {
            id: text(v, "id"),
            impact: v["impact"].as_str().and_then(Impact::parse),
            help: text(v, "help"),
            help_url: text(v, "helpUrl"),
            nodes,
        }
    }
}

/// axe-core's `target`: a list of selectors, each a string or (in a shadow DOM) a list.
fn target_text(target: &Value) -> String {
    match target {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts.iter().map(target_text).collect::<Vec<_>>().join(" >>> "),
        other => other.to_string(),
    }
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let impact = self.impact.map_or("unknown".to_string(), |i| format!("{i:?}").to_lowercase());
        let targets: Vec<&str> = self.nodes.iter().map(|n| n.target.as_str()).collect();
        write!(f, "{} ({impact}): {} [{}] at {}", self.id, self.help, self.help_url, targets.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn violations_are_read_from_axe_results() {
        let raw = json!({
            "id": "image-alt", "impact": "critical", "help": "Images must have alternative text",
            "helpUrl": "https://dequeuniversity.com/rules/axe/4.14/image-alt",
            "nodes": [
                {"target": ["img.logo"], "html": "<img class=\"logo\" src=\"x.png\">"},
                {"target": [["#host", "img"]], "html": "<img>"},
                {"target": ["iframe", "img"], "html": "<img>"}
            ]
        });
        let v = Violation::from_json(&raw);
        assert_eq!(v.id, "image-alt");
        assert_eq!(v.impact, Some(Impact::Critical));
        assert!(v.is_serious());
        let targets: Vec<&str> = v.nodes.iter().map(|n| n.target.as_str()).collect();
        assert_eq!(targets, ["img.logo", "#host >>> img", "iframe >>> img"]);
        assert_eq!(
            v.to_string(),
            "image-alt (critical): Images must have alternative text [https://dequeuniversity.com/rules/axe/4.14/image-alt] \
             at img.logo, #host >>> img, iframe >>> img"
        );
    }

    #[test]
    fn a_missing_chromedriver_fails_with_directions() {
        let dir = TempDir::new("find-tool").unwrap_or_else(|e| panic!("{e}"));
        let nowhere = dir.path().join("no-such-chromedriver");
        for (value, path) in [(None, None), (Some(OsString::new()), Some(dir.path().into())), (Some(nowhere.clone().into()), None)] {
            let e = find_tool(&CHROMEDRIVER, value.clone(), path).unwrap_err();
            assert!(e.contains("cargo xtask browser") && e.contains("CHROMEDRIVER_BIN"), "{value:?}: {e}");
        }
        let e = find_tool(&CHROMEDRIVER, Some(nowhere.clone().into()), None).unwrap_err();
        assert!(e.contains(&nowhere.display().to_string()), "{e}");
        let found = dir.path().join("chromedriver");
        std::fs::write(&found, "").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(find_tool(&CHROMEDRIVER, None, Some(dir.path().into())), Ok(found.clone()));
        assert_eq!(find_tool(&CHROMEDRIVER, Some(OsString::new()), Some(dir.path().into())), Ok(found.clone()));
        assert_eq!(find_tool(&CHROMEDRIVER, Some(found.clone().into()), None), Ok(found));
    }

    #[test]
    fn only_serious_and_critical_count_as_serious() {
        for (impact, serious) in [(Some("minor"), false), (Some("moderate"), false), (Some("serious"), true), (Some("critical"), true), (None, false)] {
            let v = Violation::from_json(&json!({"id": "r", "impact": impact, "nodes": []}));
            assert_eq!(v.is_serious(), serious, "{impact:?}");
        }
    }
}

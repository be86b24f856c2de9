//! The real `keyward` binary: `keyward serve` as a process, and CLI runs against its store.

use crate::{poll_until, request, workspace_root, TempDir};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The `keyward` binary: `$KEYWARD_BIN`, else `target/debug/keyward`. Panics with directions.
pub fn keyward_bin() -> PathBuf {
    let path = std::env::var_os("KEYWARD_BIN").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target/debug/keyward"));
    assert!(
        path.is_file(),
        "the keyward binary was not found at {}.\nRun `cargo xtask test` (it builds it), or `cargo build -p keyward`, or set KEYWARD_BIN.",
        path.display()
    );
    path
}

/// The admin token every test server accepts.
pub const ADMIN_TOKEN: &str = "keyward-test-admin-token-0123456789";

/// A `keyward serve` process with its own database. Killed on drop; restartable on the same file.
pub struct Keyward {
    dir: TempDir,
    child: Option<Child>,
    pub port: u16,
    run: u32,
    /// A database elsewhere than the temp dir (e.g. on a small disk).
    db: Option<PathBuf>,
    /// A store URL (`postgres://…`) instead of the SQLite file, and this replica's name.
    store: Option<(String, String)>,
    /// More `serve` arguments and environment, kept across restarts (`start_with`).
    extra_args: Vec<String>,
    extra_env: Vec<(String, String)>,
}

impl Keyward {
    /// Starts `keyward serve` on a free port with a fresh database.
    pub fn start() -> Keyward {
        let dir = TempDir::new("serve").unwrap_or_else(|e| panic!("temp dir: {e}"));
        let mut k = Keyward { dir, child: None, port: 0, run: 0, db: None, store: None, extra_args: Vec::new(), extra_env: Vec::new() };
        k.spawn(0);
        k
    }

    /// Starts `keyward serve` as [`Keyward::start`] does, with more arguments (e.g.
    /// `["--rate-store", url]`) and environment; both are kept across [`Keyward::restart`].
    pub fn start_with(args: &[&str], env: &[(&str, &str)]) -> Keyward {
        let dir = TempDir::new("serve").unwrap_or_else(|e| panic!("temp dir: {e}"));
        let mut k = Keyward { dir, child: None, port: 0, run: 0, db: None, store: None, extra_args: Vec::new(), extra_env: Vec::new() };
        k.set_extra(args, env);
        k.spawn(0);
        k
    }

    /// Starts a replica as [`Keyward::start_replica`] does, with more arguments and environment.
    pub fn start_replica_with(url: &str, replica: &str, args: &[&str], env: &[(&str, &str)]) -> Keyward {
        let dir = TempDir::new("serve").unwrap_or_else(|e| panic!("temp dir: {e}"));
        let mut k = Keyward {
            dir,
            child: None,
            port: 0,
            run: 0,
            db: None,
            store: Some((url.to_string(), replica.to_string())),
            extra_args: Vec::new(),
            extra_env: Vec::new(),
        };
        k.set_extra(args, env);
        k.spawn(0);
        k
    }

    /// Replaces the extra `serve` arguments and environment from the next (re)start on.
    pub fn set_extra(&mut self, args: &[&str], env: &[(&str, &str)]) {
        self.extra_args = args.iter().map(|a| a.to_string()).collect();
        self.extra_env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    }

    /// A stopped server whose database exists, to start later (`restart`) on a chosen port.
    pub fn stopped(port: u16) -> Keyward {
        let dir = TempDir::new("serve").unwrap_or_else(|e| panic!("temp dir: {e}"));
        Keyward { dir, child: None, port, run: 0, db: None, store: None, extra_args: Vec::new(), extra_env: Vec::new() }
    }

    /// Starts `keyward serve --store <url> --replica <replica>` on a free port: one of several
    /// replicas sharing a PostgreSQL store.
    pub fn start_replica(url: &str, replica: &str) -> Keyward {
        let dir = TempDir::new("serve").unwrap_or_else(|e| panic!("temp dir: {e}"));
        let mut k = Keyward { dir, child: None, port: 0, run: 0, db: None, store: Some((url.to_string(), replica.to_string())), extra_args: Vec::new(), extra_env: Vec::new() };
        k.spawn(0);
        k
    }

    /// A stopped replica on `url`, to start later (`restart`) on a chosen port.
    pub fn stopped_replica(url: &str, replica: &str, port: u16) -> Keyward {
        let dir = TempDir::new("serve").unwrap_or_else(|e| panic!("temp dir: {e}"));
        Keyward { dir, child: None, port, run: 0, db: None, store: Some((url.to_string(), replica.to_string())), extra_args: Vec::new(), extra_env: Vec::new() }
    }

    /// The `--store` (or `--db`) arguments that reach this server's store.
    fn store_args(&self) -> Vec<std::ffi::OsString> {
        match &self.store {
            Some((url, _)) => vec!["--store".into(), url.into()],
            None => vec!["--db".into(), self.db().into()],
        }
    }

    pub fn db(&self) -> PathBuf {
        self.db.clone().unwrap_or_else(|| self.dir.path().join("keyward.db"))
    }

    /// Keeps the database at `path` from the next start on.
    pub fn set_db(&mut self, path: &std::path::Path) {
        self.db = Some(path.to_path_buf());
    }

    fn log_path(&self, run: u32) -> PathBuf {
        self.dir.path().join(format!("serve-{run}.log"))
    }

    fn spawn(&mut self, port: u16) {
        self.run += 1;
        let log_path = self.log_path(self.run);
        let log = std::fs::File::create(&log_path).unwrap_or_else(|e| panic!("{}: {e}", log_path.display()));
        let mut cmd = Command::new(keyward_bin());
        cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}")]).args(self.store_args());
        if let Some((_, replica)) = &self.store {
            cmd.args(["--replica", replica]);
        }
        cmd.args(&self.extra_args).env_remove("KEYWARD_RATE_STORE");
        let child = cmd
            .env("KEYWARD_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("KEYWARD_LOG", "info")
            .env_remove("KEYWARD_FEED_TOKEN")
            .envs(self.extra_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start keyward serve: {e}"));
        self.child = Some(child);
        let found = poll_until(Duration::from_secs(20), "keyward serve to listen", || {
            let text = std::fs::read_to_string(&log_path).ok()?;
            let addr = text.lines().find_map(|l| l.split("address=").nth(1))?.split_whitespace().next()?.to_string();
            addr.rsplit(':').next()?.parse::<u16>().ok()
        });
        self.port = found;
    }

    /// Restarts on the same port and database.
    pub fn restart(&mut self) {
        self.kill9();
        let port = self.port;
        self.spawn(port);
    }

    /// The process has not been killed (it may still be starting).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The replica name given to `start_replica`.
    pub fn replica(&self) -> Option<&str> {
        self.store.as_ref().map(|(_, r)| r.as_str())
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        (1..=self.run).map(|r| std::fs::read_to_string(self.log_path(r)).unwrap_or_default()).collect()
    }

    /// Runs `keyward --db <db> args…` (the CLI straight on the file) and returns stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        cli_in(&self.store_args(), args, None)
    }

    /// Runs the CLI with `stdin`.
    pub fn cli_stdin(&self, args: &[&str], stdin: &str) -> String {
        cli_in(&self.store_args(), args, Some(stdin))
    }

    /// `GET path` on the admin API, as JSON.
    pub fn api_get(&self, path: &str) -> serde_json::Value {
        let auth = format!("Bearer {ADMIN_TOKEN}");
        request(self.port, "GET", path, &[("authorization", auth.as_bytes())])
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
            .json()
    }

    /// `POST path` with a JSON body on the feed (no token: test servers run without a feed
    /// token), as an Envoy's fetcher sends it; the whole response.
    pub fn feed_post(&self, path: &str, body: &serde_json::Value) -> crate::Response {
        let text = body.to_string();
        let raw = format!(
            "POST {path} HTTP/1.1\r\nhost: keyward\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{text}",
            text.len()
        );
        crate::send_raw(self.port, raw.as_bytes()).unwrap_or_else(|e| panic!("POST {path}: {e}"))
    }

    /// `POST path` with a JSON body on the admin API.
    pub fn api_post(&self, path: &str, body: &serde_json::Value) -> serde_json::Value {
        let text = body.to_string();
        let raw = format!(
            "POST {path} HTTP/1.1\r\nhost: keyward\r\nconnection: close\r\nauthorization: Bearer {ADMIN_TOKEN}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{text}",
            text.len()
        );
        crate::send_raw(self.port, raw.as_bytes()).unwrap_or_else(|e| panic!("POST {path}: {e}")).json()
    }
}

fn cli_in(store: &[std::ffi::OsString], args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write;
    let mut child = Command::new(keyward_bin())
        .args(store)
        .args(args)
        .env_remove("KEYWARD_URL")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("keyward {args:?}: {e}"));
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        let _ = pipe.write_all(input.as_bytes());
    }
    let out = child.wait_with_output().unwrap_or_else(|e| panic!("keyward {args:?}: {e}"));
    assert!(out.status.success(), "keyward {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Drop for Keyward {
    fn drop(&mut self) {
        self.kill9();
    }
}

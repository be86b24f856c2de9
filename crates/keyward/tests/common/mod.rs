//! Runs the real `keyward` binary in a temporary directory.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Dir(pub PathBuf);

impl Dir {
    pub fn new(tag: &str) -> Dir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!("keyward-cli-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
    pub fn db(&self) -> PathBuf {
        self.0.join("keyward.db")
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", self.stdout, self.stderr))
    }
    pub fn ok(self) -> Out {
        assert_eq!(self.code, 0, "stdout: {}\nstderr: {}", self.stdout, self.stderr);
        self
    }
}

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_keyward"))
}

/// Runs `keyward args…` against the database in `dir`, with `stdin` piped in.
pub fn kw_in(dir: &Path, args: &[&str], stdin: Option<&str>) -> Out {
    let mut cmd = bin();
    cmd.args(args)
        .env_remove("KEYWARD_URL")
        .env_remove("KEYWARD_ADMIN_TOKEN")
        .env("HOME", dir)
        .env("XDG_DATA_HOME", dir.join("xdg"))
        .env("USER", "tester")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if !args.iter().any(|a| a.starts_with("--db") || a.starts_with("--url")) {
        cmd.env("KEYWARD_DB", dir.join("keyward.db"));
    }
    let mut child = cmd.spawn().unwrap();
    if let Some(input) = stdin {
        // A command that refuses before reading its input closes the pipe: that is its answer,
        // not the test's failure.
        if let Err(e) = child.stdin.take().unwrap().write_all(input.as_bytes()) {
            assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "writing the command's input: {e}");
        }
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    }
}

pub fn kw(dir: &Dir, args: &[&str]) -> Out {
    kw_in(&dir.0, args, None)
}

/// A running `keyward serve` on a free port. Killed on drop.
pub struct Server {
    pub child: Child,
    pub url: String,
    stdout: std::sync::Arc<std::sync::Mutex<String>>,
    pub log_path: PathBuf,
}

impl Server {
    /// Starts `keyward serve --listen 127.0.0.1:0`; `token` is passed as KEYWARD_ADMIN_TOKEN.
    pub fn start(dir: &Dir, token: Option<&str>, extra_env: &[(&str, &str)]) -> Server {
        let log_path = dir.0.join(format!("serve-{}.log", std::process::id()));
        let log = std::fs::File::create(&log_path).unwrap();
        let mut cmd = bin();
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--db"])
            .arg(dir.db())
            .env_remove("KEYWARD_ADMIN_TOKEN")
            .stdout(Stdio::piped())
            .stderr(log);
        if let Some(t) = token {
            cmd.env("KEYWARD_ADMIN_TOKEN", t);
        }
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let url = loop {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            if let Some(addr) = text.lines().find_map(|l| l.split("address=").nth(1)).and_then(|s| s.split_whitespace().next()) {
                break format!("http://{addr}");
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("keyward serve exited {status}:\n{text}");
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                panic!("keyward serve did not start:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // Collect stdout (where serve prints a generated admin token) in the background.
        let stdout = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        if let Some(out) = child.stdout.take() {
            let sink = std::sync::Arc::clone(&stdout);
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    let mut s = sink.lock().unwrap();
                    s.push_str(&line);
                    s.push('\n');
                }
            });
        }
        Server { child, url, stdout, log_path }
    }

    /// What serve printed on stdout so far.
    pub fn stdout(&self) -> String {
        self.stdout.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A fresh, empty PostgreSQL database for one test, on the server `KEYWARD_TEST_POSTGRES`
/// names. Fails with directions when there is none: the PostgreSQL engine is tested for real.
pub fn postgres_database(tag: &str) -> String {
    keyward_testkit::postgres::fresh_database(tag).unwrap_or_else(|e| panic!("{e}"))
}

//! A throwaway `redis-server` for the rate-store tests: Debian's binary (`$REDIS_SERVER_BIN`,
//! which `cargo xtask test` passes, else `redis-server` on PATH) on a free loopback port, with no
//! persistence, owned by the test (not daemonized): killed on drop.
//!
//! ```no_run
//! let mut redis = keyward_testkit::Redis::start();
//! let url = redis.url(); // redis://127.0.0.1:PORT
//! redis.pause(); // SIGSTOP: connections open, nothing answered
//! redis.resume();
//! redis.kill(); // SIGKILL
//! redis.restart(); // the same port, empty
//! # let _ = url;
//! ```

use crate::{poll_until, TempDir};
use std::io::Write;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The environment variable naming the `redis-server` binary.
pub const REDIS_ENV: &str = "REDIS_SERVER_BIN";

/// The `redis-server` binary: `$REDIS_SERVER_BIN`, else `redis-server` on PATH. Panics with
/// directions when there is none.
pub fn redis_server_bin() -> PathBuf {
    let directions = "redis-server was not found.\n\
         Run the tests with `cargo xtask test` (it installs Debian's redis-server if absent), or install \
         redis-server (apt-get install redis-server), or set REDIS_SERVER_BIN to a redis-server binary.";
    if let Some(path) = std::env::var_os(REDIS_ENV).filter(|v| !v.is_empty()).map(PathBuf::from) {
        assert!(path.is_file(), "REDIS_SERVER_BIN={} names no file.\n{directions}", path.display());
        return path;
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("redis-server")).find(|c| c.is_file()))
        .unwrap_or_default();
    on_path.unwrap_or_else(|| panic!("{directions}"))
}

/// A `redis-server` process on `127.0.0.1:port`.
pub struct Redis {
    dir: TempDir,
    child: Option<Child>,
    pub port: u16,
    run: u32,
}

impl Redis {
    /// Starts `redis-server` on a free loopback port and waits until it answers PING.
    pub fn start() -> Redis {
        let dir = TempDir::new("redis").unwrap_or_else(|e| panic!("temp dir: {e}"));
        let mut r = Redis { dir, child: None, port: 0, run: 0 };
        // A port just released by the OS may be taken again before redis binds it: try a few.
        for _ in 0..5 {
            r.port = free_port();
            if r.spawn() {
                return r;
            }
        }
        panic!("redis-server did not start on a free port; its log:\n{}", r.log());
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn log_path(&self, run: u32) -> PathBuf {
        self.dir.path().join(format!("redis-{run}.log"))
    }

    /// What redis-server printed, every run.
    pub fn log(&self) -> String {
        (1..=self.run).map(|r| std::fs::read_to_string(self.log_path(r)).unwrap_or_default()).collect()
    }

    /// Starts the process on `self.port`; false if it exited (the port was taken).
    fn spawn(&mut self) -> bool {
        self.run += 1;
        let log_path = self.log_path(self.run);
        let log = std::fs::File::create(&log_path).unwrap_or_else(|e| panic!("{}: {e}", log_path.display()));
        let err = log.try_clone().unwrap_or_else(|e| panic!("{}: {e}", log_path.display()));
        let port = self.port.to_string();
        let child = Command::new(redis_server_bin())
            .args(["--port", &port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--protected-mode", "yes", "--dir"])
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server: {e}"));
        self.child = Some(child);
        let up = poll_until(Duration::from_secs(10), "redis-server to answer PING", || {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(_)) = c.try_wait() {
                    return Some(false);
                }
            }
            self.ping().then_some(true)
        });
        if !up {
            self.child = None;
        }
        up
    }

    /// Whether it answers PING now (within 200 ms).
    pub fn ping(&self) -> bool {
        self.command(&["PING"]).is_ok_and(|r| r == "PONG")
    }

    /// Sends one command and returns its reply as JSON: a string (simple, bulk or `ERR …`), an
    /// integer, null, or an array. A small client for checks (`KEYS`, `PTTL`, `HGETALL`).
    pub fn command(&self, args: &[&str]) -> std::io::Result<serde_json::Value> {
        let s = TcpStream::connect_timeout(&([127, 0, 0, 1], self.port).into(), Duration::from_millis(200))?;
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        (&s).write_all(req.as_bytes())?;
        read_reply(&mut std::io::BufReader::new(s))
    }

    /// SIGKILL: gone at once, its data with it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again, empty, on the same port.
    pub fn restart(&mut self) {
        self.kill();
        assert!(self.spawn(), "redis-server did not restart on port {}; its log:\n{}", self.port, self.log());
    }

    /// SIGSTOP: connections still open and accepted, nothing answered (a hung server).
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT after [`Redis::pause`].
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, sig: libc::c_int) {
        if let Some(c) = &self.child {
            let pid = libc::pid_t::try_from(c.id()).unwrap_or_else(|e| panic!("pid: {e}"));
            // SAFETY: kill(2) on our own child's pid; no memory is involved.
            unsafe { libc::kill(pid, sig) };
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.resume();
        self.kill();
    }
}

/// One RESP2 reply.
fn read_reply(r: &mut impl std::io::BufRead) -> std::io::Result<serde_json::Value> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let line = line.trim_end_matches("\r\n");
    let bad = || std::io::Error::other(format!("not a RESP reply: {line:?}"));
    let (kind, rest) = (line.get(..1).ok_or_else(bad)?, line.get(1..).unwrap_or_default());
    Ok(match kind {
        "+" | "-" => rest.into(),
        ":" => rest.parse::<i64>().map_err(|_| bad())?.into(),
        "$" => match rest.parse::<i64>().map_err(|_| bad())? {
            n if n < 0 => serde_json::Value::Null,
            n => {
                let mut buf = vec![0u8; usize::try_from(n).map_err(|_| bad())? + 2];
                r.read_exact(&mut buf)?;
                String::from_utf8_lossy(&buf[..buf.len() - 2]).into_owned().into()
            }
        },
        "*" => match rest.parse::<i64>().map_err(|_| bad())? {
            n if n < 0 => serde_json::Value::Null,
            n => (0..n).map(|_| read_reply(r)).collect::<std::io::Result<Vec<_>>>()?.into(),
        },
        _ => return Err(bad()),
    })
}

/// A loopback port nobody listens on now.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("binding a free port: {e}"));
    l.local_addr().unwrap_or_else(|e| panic!("{e}")).port()
}

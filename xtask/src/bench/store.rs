//! `cargo xtask bench --stores`: the store on its two engines, SQLite (a file in a temp dir) and
//! PostgreSQL (a fresh database on a throwaway cluster, `postgres.rs`), through the real
//! `keyward` binary: keys created through `keyward serve`'s admin API and through the CLI,
//! `key import --batch`, and a full snapshot of 1,000,001 keys paged through the feed.
//!
//! Method: the small measures run in interleaved rounds (the engine that goes first alternates),
//! each on a fresh store, and the report quotes medians; the 1M-key import and snapshot run
//! once per engine. The section goes below the soak's, after its own marker, so a full
//! `cargo xtask bench` (which rewrites everything above the soak marker) keeps it.

use crate::Result;
use crate::postgres::Postgres;
use keyward_core::Digest;
use keyward_testkit::{keyward_bin, TempDir, ADMIN_TOKEN};
use serde_json::Value;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where BENCHMARKS.md's store section starts; `bench --stores` rewrites from here to the end.
pub const STORES_MARKER: &str = "<!-- stores: written by `cargo xtask bench --stores` -->";

pub struct Options {
    /// A smoke run: one round, small sizes, no 1M-key store.
    pub quick: bool,
    pub out: PathBuf,
}

struct Plan {
    quick: bool,
    rounds: usize,
    /// Keys created through the admin API per measure (sequential; and in all, over 4 clients).
    api_keys: usize,
    /// Keys created by one `keyward key create` process each.
    cli_keys: usize,
    /// `key import --batch` in rounds.
    import_small: usize,
    /// The import measured once, whose store then serves the full snapshot.
    import_large: usize,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan { quick, rounds: 1, api_keys: 200, cli_keys: 10, import_small: 5_000, import_large: 20_000 }
        } else {
            Plan { quick, rounds: 3, api_keys: 2_000, cli_keys: 100, import_small: 100_000, import_large: 1_000_000 }
        }
    }
}

const CLIENTS: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Engine {
    Sqlite,
    Postgres,
}

const ENGINES: [Engine; 2] = [Engine::Sqlite, Engine::Postgres];

impl Engine {
    fn name(self) -> &'static str {
        match self {
            Engine::Sqlite => "SQLite",
            Engine::Postgres => "PostgreSQL",
        }
    }

    fn index(self) -> usize {
        match self {
            Engine::Sqlite => 0,
            Engine::Postgres => 1,
        }
    }
}

/// Fresh, empty stores: SQLite files in `dir`, databases on the throwaway PostgreSQL.
struct Stores {
    dir: TempDir,
    n: u32,
}

impl Stores {
    fn fresh(&mut self, engine: Engine, tag: &str) -> Result<String> {
        self.n += 1;
        match engine {
            Engine::Sqlite => Ok(format!("sqlite://{}", self.dir.path().join(format!("{tag}-{}.db", self.n)).display())),
            Engine::Postgres => Ok(keyward_testkit::postgres::fresh_database(tag)?),
        }
    }
}

/// `keyward --store URL args…`, stdout discarded; the wall time and the process's peak RSS (KiB).
fn cli(url: &str, args: &[&str], stdin: Option<&Path>) -> Result<(Duration, u64)> {
    let input = match stdin {
        Some(p) => Stdio::from(std::fs::File::open(p).map_err(|e| format!("{}: {e}", p.display()))?),
        None => Stdio::null(),
    };
    // wait4's peak RSS of a child is at least the parent's peak when it spawned (exec keeps the
    // larger of the two): bring ours down to what we hold now.
    reset_peak(std::process::id());
    let t = Instant::now();
    let child = Command::new(keyward_bin())
        .args(["--store", url])
        .args(args)
        .env_remove("KEYWARD_URL")
        .env_remove("KEYWARD_STORE")
        .stdin(input)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("keyward {args:?}: {e}"))?;
    let (status, maxrss) = wait_with_rusage(child)?;
    let took = t.elapsed();
    if status != 0 {
        return Err(format!("keyward {args:?} exited with status {status}").into());
    }
    Ok((took, maxrss))
}

/// Waits for `child` with wait4(2): its exit status and its own peak RSS (KiB), which
/// `std::process::Child::wait` does not give.
fn wait_with_rusage(mut child: Child) -> Result<(i32, u64)> {
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        // Small: the CLI says little on stderr when its stdout is not a terminal.
        let _ = e.read_to_string(&mut err);
    }
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 on our own unreaped child, with valid pointers to locals.
    let pid = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    if pid < 0 {
        return Err(format!("wait4: {}", std::io::Error::last_os_error()).into());
    }
    let code = if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { -1 };
    if code != 0 {
        return Err(format!("exit {code}: {}", err.trim()).into());
    }
    Ok((code, u64::try_from(usage.ru_maxrss).unwrap_or(0)))
}

/// A `keyward serve` on a free loopback port, killed on drop.
struct Serve {
    child: Child,
    port: u16,
}

impl Serve {
    fn start(url: &str, log: &Path) -> Result<Serve> {
        let file = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let child = Command::new(keyward_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--store", url, "--replica", "bench"])
            .env("KEYWARD_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("KEYWARD_LOG", "info")
            .env_remove("KEYWARD_FEED_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .map_err(|e| format!("cannot start keyward serve: {e}"))?;
        let pid = child.id() as libc::pid_t;
        crate::postgres::on_interrupt(move || {
            // SAFETY: kill(2) on our own child's pid; if it was reaped already, at worst a
            // process that reused the pid in the moment before xtask exits.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        });
        let mut serve = Serve { child, port: 0 };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let port = text.lines().find_map(|l| l.split("address=").nth(1)?.split_whitespace().next()?.rsplit(':').next()?.parse::<u16>().ok());
            if let Some(port) = port {
                serve.port = port;
                return Ok(serve);
            }
            if let Ok(Some(status)) = serve.child.try_wait() {
                return Err(format!("keyward serve exited ({status}):\n{text}").into());
            }
            if Instant::now() > deadline {
                return Err(format!("keyward serve did not listen within 60 s:\n{text}").into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `/proc/<pid>/status` field in KiB (`VmHWM`: peak RSS; `VmRSS`: now).
fn proc_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Resets the peak RSS of `pid` to its current RSS (Linux: `5` into `clear_refs`).
fn reset_peak(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// One keep-alive HTTP/1.1 connection to the admin API, reading whole responses of any size.
struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    fn open(port: u16) -> Result<Conn> {
        let stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect 127.0.0.1:{port}: {e}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(900)))?;
        let writer = stream.try_clone()?;
        Ok(Conn { reader: BufReader::with_capacity(1 << 16, stream), writer })
    }

    /// Sends one request and reads the whole response: (status, body).
    fn send(&mut self, method: &str, path: &str, body: Option<&str>) -> Result<(u16, Vec<u8>)> {
        let body = body.unwrap_or("");
        let raw = format!(
            "{method} {path} HTTP/1.1\r\nhost: keyward\r\nauthorization: Bearer {ADMIN_TOKEN}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        self.writer.write_all(raw.as_bytes()).map_err(|e| format!("{method} {path}: {e}"))?;
        let io = |e: std::io::Error| format!("{method} {path}: {e}");
        let mut line = String::new();
        self.reader.read_line(&mut line).map_err(io)?;
        let status: u16 = line.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| format!("{method} {path}: bad status line {line:?}"))?;
        let (mut length, mut chunked) = (None, false);
        loop {
            line.clear();
            self.reader.read_line(&mut line).map_err(io)?;
            if line == "\r\n" || line.is_empty() {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse::<usize>().ok();
            } else if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                chunked = true;
            }
        }
        let mut out = Vec::new();
        if chunked {
            loop {
                line.clear();
                self.reader.read_line(&mut line).map_err(io)?;
                let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16).map_err(|e| format!("{method} {path}: chunk size {line:?}: {e}"))?;
                let start = out.len();
                out.resize(start + size + 2, 0);
                self.reader.read_exact(&mut out[start..]).map_err(io)?;
                out.truncate(start + size);
                if size == 0 {
                    break;
                }
            }
        } else {
            out.resize(length.ok_or_else(|| format!("{method} {path}: no content-length"))?, 0);
            self.reader.read_exact(&mut out).map_err(io)?;
        }
        Ok((status, out))
    }
}

/// Creates `n` keys for agent `bench` with `POST /v1/keys?wait=false`, over `clients` connections
/// at once; keys per second.
fn create_over_api(port: u16, n: usize, clients: usize) -> Result<f64> {
    let per = n / clients;
    let t = Instant::now();
    let results: Vec<Result> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                s.spawn(move || -> Result {
                    let mut conn = Conn::open(port)?;
                    for _ in 0..per {
                        let (status, body) = conn.send("POST", "/v1/keys?wait=false", Some(r#"{"agent":"bench"}"#))?;
                        if status != 201 {
                            return Err(format!("POST /v1/keys: {status} {}", String::from_utf8_lossy(&body)).into());
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("a client thread panicked".into()))).collect()
    });
    let secs = t.elapsed().as_secs_f64();
    results.into_iter().collect::<Result<Vec<()>>>()?;
    Ok((per * clients) as f64 / secs)
}

/// `sha256:<hex>` lines, the cheapest input of `key import --batch`, deterministic.
fn import_file(dir: &Path, n: usize) -> Result<PathBuf> {
    let path = dir.join(format!("import-{n}.txt"));
    let mut text = String::with_capacity(n * 72);
    for i in 0..n {
        let _ = writeln!(text, "sha256:{}", Digest::of(format!("bench import {i}").as_bytes()).to_hex());
    }
    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

/// A fresh store with agent `bench` (and its first key).
fn store_with_agent(stores: &mut Stores, engine: Engine, tag: &str) -> Result<String> {
    let url = stores.fresh(engine, tag)?;
    cli(&url, &["--json", "agent", "create", "bench", "--scopes", "read:all"], None)?;
    Ok(url)
}

/// `key import --batch` of `file` (`n` lines) into a fresh store: (store URL, seconds, peak RSS KiB).
fn import(stores: &mut Stores, engine: Engine, file: &Path) -> Result<(String, f64, u64)> {
    let url = store_with_agent(stores, engine, "import")?;
    let (took, rss) = cli(&url, &["--json", "--no-wait", "key", "import", "--agent", "bench", "--batch"], Some(file))?;
    Ok((url, took.as_secs_f64(), rss))
}

/// Reads one figure of a round.
type Figure = fn(&Round) -> f64;

/// One round's figures for one engine, keys per second.
#[derive(Debug, Default, Clone)]
struct Round {
    api_one: f64,
    api_four: f64,
    cli: f64,
    import_keys_per_s: f64,
    import_secs: f64,
    import_rss_kib: u64,
}

fn round(stores: &mut Stores, engine: Engine, plan: &Plan, import_input: &Path, log: &Path) -> Result<Round> {
    let url = store_with_agent(stores, engine, "create")?;
    let serve = Serve::start(&url, log)?;
    // A few keys first, so connection pools and statement caches are warm.
    create_over_api(serve.port, 20, 1)?;
    let api_one = create_over_api(serve.port, plan.api_keys, 1)?;
    let api_four = create_over_api(serve.port, plan.api_keys, CLIENTS)?;
    drop(serve);
    let t = Instant::now();
    for _ in 0..plan.cli_keys {
        cli(&url, &["--json", "--no-wait", "key", "create", "--agent", "bench"], None)?;
    }
    let cli_rate = plan.cli_keys as f64 / t.elapsed().as_secs_f64();
    let (_, secs, rss) = import(stores, engine, import_input)?;
    Ok(Round { api_one, api_four, cli: cli_rate, import_keys_per_s: plan.import_small as f64 / secs, import_secs: secs, import_rss_kib: rss })
}

/// The full snapshot of a large store, as `keyward serve` hands it out.
#[derive(Debug, Default, Clone)]
struct Snapshot {
    keys: usize,
    import_secs: f64,
    import_rss_kib: u64,
    serve_start_kib: u64,
    pages: usize,
    feed_secs: f64,
    feed_bytes: u64,
    /// Median of the first and of the last 10 pages (ms): equal if paging is linear.
    first_pages_ms: f64,
    last_pages_ms: f64,
    slowest_page_ms: f64,
    feed_peak_kib: u64,
    snapshot_secs: f64,
    snapshot_bytes: u64,
    snapshot_keys: usize,
    snapshot_peak_kib: u64,
    /// Whether the peak could be reset between the feed and `GET /v1/snapshot`.
    peak_reset: bool,
}

fn count(haystack: &[u8], needle: &[u8]) -> usize {
    haystack.windows(needle.len()).filter(|w| *w == needle).count()
}

fn snapshot(stores: &mut Stores, engine: Engine, n: usize, input: &Path, log: &Path) -> Result<Snapshot> {
    eprintln!("bench --stores: {}: key import --batch of {n} keys", engine.name());
    let (url, import_secs, import_rss_kib) = import(stores, engine, input)?;
    let serve = Serve::start(&url, log)?;
    let pid = serve.pid();
    let mut s = Snapshot { import_secs, import_rss_kib, serve_start_kib: proc_kib(pid, "VmRSS"), ..Snapshot::default() };
    eprintln!("bench --stores: {}: paging through the feed", engine.name());
    let mut conn = Conn::open(serve.port)?;
    let mut path = "/v1/feed?since=0&envoy=bench-pager".to_string();
    let mut page_ms = Vec::new();
    let t = Instant::now();
    loop {
        let t_page = Instant::now();
        let (status, body) = conn.send("GET", &path, None)?;
        page_ms.push(t_page.elapsed().as_secs_f64() * 1000.0);
        if status != 200 {
            return Err(format!("GET {path}: {status} {}", String::from_utf8_lossy(&body)).into());
        }
        s.feed_bytes += body.len() as u64;
        let page: Value = serde_json::from_slice(&body).map_err(|e| format!("GET {path}: {e}"))?;
        s.keys += page["keys"].as_array().map_or(0, Vec::len);
        match page["cursor"].as_object() {
            Some(c) if page["complete"] != true => {
                let (version, id) = (c.get("version").and_then(Value::as_u64).unwrap_or(0), c.get("id").and_then(Value::as_str).unwrap_or(""));
                path = format!("/v1/feed?since={version}&after={id}&envoy=bench-pager");
            }
            _ => break,
        }
    }
    s.feed_secs = t.elapsed().as_secs_f64();
    s.pages = page_ms.len();
    let ends = page_ms.len().min(10);
    s.first_pages_ms = median(page_ms[..ends].to_vec());
    s.last_pages_ms = median(page_ms[page_ms.len() - ends..].to_vec());
    s.slowest_page_ms = page_ms.iter().copied().fold(0.0, f64::max);
    s.feed_peak_kib = proc_kib(pid, "VmHWM");
    s.peak_reset = reset_peak(pid);
    eprintln!("bench --stores: {}: GET /v1/snapshot", engine.name());
    let t = Instant::now();
    let (status, body) = conn.send("GET", "/v1/snapshot", None)?;
    s.snapshot_secs = t.elapsed().as_secs_f64();
    if status != 200 {
        return Err(format!("GET /v1/snapshot: {status} {}", String::from_utf8_lossy(&body[..body.len().min(500)])).into());
    }
    s.snapshot_bytes = body.len() as u64;
    s.snapshot_keys = count(&body, b"\"digest\":");
    s.snapshot_peak_kib = proc_kib(pid, "VmHWM");
    drop(serve);
    if s.keys != n + 1 || s.snapshot_keys != n + 1 {
        return Err(format!("{}: the feed gave {} keys and the snapshot {}, not {}", engine.name(), s.keys, s.snapshot_keys, n + 1).into());
    }
    Ok(s)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

pub fn run(opts: &Options) -> Result {
    let plan = Plan::new(opts.quick);
    let t_total = Instant::now();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().next().unwrap_or("?").to_string();
    let pg = Postgres::start()?;
    eprintln!("bench --stores: PostgreSQL {} at {}, started in {:.2} s", pg.version(), pg.url(), pg.started_in.as_secs_f64());
    // The testkit creates each fresh database on the server named here.
    std::env::set_var(keyward_testkit::postgres::ENV, pg.url());
    let dir = TempDir::new("bench-stores")?;
    let log = dir.path().join("serve.log");
    let mut stores = Stores { dir: TempDir::new("bench-stores-db")?, n: 0 };
    let small_input = import_file(dir.path(), plan.import_small)?;
    let large_input = import_file(dir.path(), plan.import_large)?;
    reset_peak(std::process::id());
    let own_kib = proc_kib(std::process::id(), "VmRSS");

    let mut rounds: [Vec<Round>; 2] = [Vec::new(), Vec::new()];
    for r in 0..plan.rounds {
        for k in 0..2 {
            let engine = ENGINES[(r + k) % 2];
            eprintln!("bench --stores: round {} of {}, {}", r + 1, plan.rounds, engine.name());
            let got = round(&mut stores, engine, &plan, &small_input, &log)?;
            eprintln!("bench --stores:   {got:?}");
            rounds[engine.index()].push(got);
        }
    }
    let mut large = Vec::new();
    for engine in ENGINES {
        let s = snapshot(&mut stores, engine, plan.import_large, &large_input, &log)?;
        eprintln!("bench --stores:   {s:?}");
        large.push(s);
    }
    let pg_version = pg.version().to_string();
    drop(pg);
    let section = report(&plan, &rounds, &large, &pg_version, &load, own_kib, t_total.elapsed());
    print!("{section}");
    let old = std::fs::read_to_string(&opts.out).unwrap_or_default();
    let kept = old.find(STORES_MARKER).map_or(old.as_str(), |at| &old[..at]).trim_end();
    let new = format!("{kept}\n\n{}\n", section.trim_end());
    std::fs::write(&opts.out, new.trim_start()).map_err(|e| format!("{}: {e}", opts.out.display()))?;
    eprintln!("bench --stores: wrote the store section of {} in {:.0} s", opts.out.display(), t_total.elapsed().as_secs_f64());
    Ok(())
}

/// `median (min–max)` of a figure over rounds.
fn spread(v: &[f64], decimals: usize) -> String {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if v.len() < 2 {
        return format!("{:.*}", decimals, median(v.to_vec()));
    }
    format!("{:.*} ({:.*}–{:.*})", decimals, median(v.to_vec()), decimals, lo, decimals, hi)
}

fn report(plan: &Plan, rounds: &[Vec<Round>; 2], large: &[Snapshot], pg_version: &str, load: &str, own_kib: u64, took: Duration) -> String {
    let date = Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]).output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
    let mut r = format!("{STORES_MARKER}\n\n## Stores: SQLite and PostgreSQL\n\n");
    let _ = writeln!(
        r,
        "Written by `cargo xtask bench --stores{}` on {date}, commit {}, machine: {} (shared: load average {load} at the start; nothing pinned). \
         The release `keyward` binary on each engine: SQLite, a file in a temp dir; PostgreSQL {pg_version}, a fresh database per measure on a \
         throwaway local cluster (`fsync = off`, `synchronous_commit = off`, as `cargo xtask test` runs it: durability is not measured here). \
         {} The {}-key import and the full snapshot ran once per engine. A CLI's peak RSS is wait4's `ru_maxrss`, which is never below xtask's \
         own RSS when it spawns the CLI ({:.0} MiB here). Took {:.0} s.\n",
        if plan.quick { " --quick" } else { "" },
        crate::bench::git_commit(),
        crate::bench::machine(),
        if plan.rounds > 1 {
            format!("{} interleaved rounds, each on fresh stores, the engine going first alternating; medians, with the range over rounds in brackets.", plan.rounds)
        } else {
            "One round (a smoke run: these are not medians).".to_string()
        },
        plan.import_large,
        own_kib as f64 / 1024.0,
        took.as_secs_f64()
    );
    let col = |f: Figure, e: usize, d: usize| spread(&rounds[e].iter().map(f).collect::<Vec<_>>(), d);
    let ratio = |f: Figure| median(rounds[1].iter().map(f).collect()) / median(rounds[0].iter().map(f).collect());
    let _ = writeln!(r, "### Creating keys\n");
    let _ = writeln!(r, "| how | SQLite | PostgreSQL | PostgreSQL / SQLite |\n|---|---:|---:|---:|");
    let rows: [(String, Figure, usize); 4] = [
        (format!("admin API `POST /v1/keys?wait=false`, 1 client (keep-alive), {} keys, keys/s", plan.api_keys), |x| x.api_one, 0),
        (format!("admin API, {CLIENTS} concurrent clients, {} keys in all, keys/s", plan.api_keys), |x| x.api_four, 0),
        (
            format!("CLI on the store, one `keyward --store URL key create --no-wait` process per key, {} keys, keys/s (process start and store open dominate)", plan.cli_keys),
            |x| x.cli,
            1,
        ),
        (format!("`key import --batch`, {} keys (`sha256:<hex>` lines), keys/s", plan.import_small), |x| x.import_keys_per_s, 0),
    ];
    for (name, f, d) in rows {
        let _ = writeln!(r, "| {name} | {} | {} | {:.2} |", col(f, 0, d), col(f, 1, d), ratio(f));
    }
    let _ = writeln!(
        r,
        "| `key import --batch`, {} keys: wall time, s | {} | {} | {:.2} |",
        plan.import_small,
        col(|x| x.import_secs, 0, 2),
        col(|x| x.import_secs, 1, 2),
        ratio(|x| x.import_secs)
    );
    let _ = writeln!(
        r,
        "| `key import --batch`, {} keys: the CLI's peak RSS, MiB | {} | {} | |",
        plan.import_small,
        col(|x| x.import_rss_kib as f64 / 1024.0, 0, 0),
        col(|x| x.import_rss_kib as f64 / 1024.0, 1, 0)
    );
    if large.len() == 2 {
        let (a, b) = (&large[0], &large[1]);
        let mib = |k: u64| k as f64 / 1024.0;
        let _ = writeln!(r, "\n### A full snapshot of {} keys (one run per engine)\n", a.keys);
        let _ = writeln!(
            r,
            "`key import --batch` of {n} keys into a store holding the agent and its first key, then a fresh `keyward serve` on that store. \
             The feed is paged as the filter does (`GET /v1/feed?since=0`, then `since=<cursor.version>&after=<cursor.id>`, {page} records a page) \
             over one keep-alive connection; a page's time is from the request to its last byte. Then `GET /v1/snapshot` on the same connection. \
             Peak RSS is `keyward serve`'s VmHWM{reset}.\n",
            n = plan.import_large,
            page = 5_000,
            reset = if a.peak_reset && b.peak_reset { ", reset (`clear_refs`) between the feed and the snapshot" } else { " (not resettable here, so the snapshot's peak includes the feed's)" },
        );
        let _ = writeln!(r, "| | SQLite | PostgreSQL | PostgreSQL / SQLite |\n|---|---:|---:|---:|");
        let mut row = |name: &str, x: f64, y: f64, d: usize| {
            let _ = writeln!(r, "| {name} | {x:.d$} | {y:.d$} | {:.2} |", y / x);
        };
        row(&format!("`key import --batch` of {}: wall time, s", plan.import_large), a.import_secs, b.import_secs, 1);
        row(&format!("`key import --batch` of {}: keys/s", plan.import_large), plan.import_large as f64 / a.import_secs, plan.import_large as f64 / b.import_secs, 0);
        row(&format!("`key import --batch` of {}: the CLI's peak RSS, MiB", plan.import_large), mib(a.import_rss_kib), mib(b.import_rss_kib), 0);
        row("feed pages", a.pages as f64, b.pages as f64, 0);
        row("feed, every page: time, s", a.feed_secs, b.feed_secs, 1);
        row("feed, every page: records/s", a.keys as f64 / a.feed_secs, b.keys as f64 / b.feed_secs, 0);
        row("feed, every page: bytes, MiB", a.feed_bytes as f64 / 1_048_576.0, b.feed_bytes as f64 / 1_048_576.0, 1);
        row("feed, one page: median of the first 10, ms", a.first_pages_ms, b.first_pages_ms, 0);
        row("feed, one page: median of the last 10, ms", a.last_pages_ms, b.last_pages_ms, 0);
        row("feed, slowest page, ms", a.slowest_page_ms, b.slowest_page_ms, 0);
        row("`GET /v1/snapshot`: time, s", a.snapshot_secs, b.snapshot_secs, 1);
        row("`GET /v1/snapshot`: bytes, MiB", a.snapshot_bytes as f64 / 1_048_576.0, b.snapshot_bytes as f64 / 1_048_576.0, 1);
        row("`keyward serve` RSS when started, MiB", mib(a.serve_start_kib), mib(b.serve_start_kib), 0);
        row("`keyward serve` peak RSS over the feed, MiB", mib(a.feed_peak_kib), mib(b.feed_peak_kib), 0);
        row("`keyward serve` peak RSS over `GET /v1/snapshot`, MiB", mib(a.snapshot_peak_kib), mib(b.snapshot_peak_kib), 0);
        for (engine, x) in ENGINES.iter().zip(large) {
            // Keyset paging costs the same on every page; a page that costs more the further it
            // is into the snapshot means each page scans what came before (quadratic in all).
            if x.last_pages_ms > 2.0 * x.first_pages_ms {
                let _ = writeln!(
                    r,
                    "\n{}: a feed page costs more the further it is into the snapshot ({:.0} ms for the first 10, {:.0} ms for the last 10): \
                     paging through the whole snapshot is superlinear in its size.",
                    engine.name(),
                    x.first_pages_ms,
                    x.last_pages_ms
                );
            }
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_lines_are_digests_and_stable() {
        let dir = TempDir::new("bench-stores-test").unwrap();
        let a = std::fs::read_to_string(import_file(dir.path(), 3).unwrap()).unwrap();
        assert_eq!(a.lines().count(), 3);
        assert!(a.lines().all(|l| l.len() == 7 + 64 && l.starts_with("sha256:")), "{a}");
        assert_eq!(a, std::fs::read_to_string(import_file(dir.path(), 3).unwrap()).unwrap());
    }

    #[test]
    fn spread_quotes_the_median_and_the_range() {
        assert_eq!(spread(&[3.0, 1.0, 2.0], 0), "2 (1–3)");
        assert_eq!(spread(&[2.5], 1), "2.5");
        assert_eq!(count(b"\"digest\":1,\"digest\":2", b"\"digest\":"), 2);
    }
}

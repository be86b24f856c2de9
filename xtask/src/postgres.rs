//! A throwaway PostgreSQL for `cargo xtask test`, `cargo xtask up --postgres` and
//! `cargo xtask postgres`: a fresh cluster (`initdb`) in a temp dir, owned by an unprivileged
//! user (PostgreSQL refuses to run as root), on a free loopback port, trust auth for the
//! superuser `kw`, durability off (`fsync=off`: nothing here outlives the run).
//!
//! [`Postgres::start`] returns a guard: dropping it stops the server (`pg_ctl stop -m immediate`)
//! and removes the dir. Ctrl-C (SIGINT), SIGTERM and SIGHUP do the same: a watcher thread runs
//! the cleanups registered with [`on_interrupt`], stops every running cluster, and exits 130.

use crate::Result;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

/// The superuser `initdb` creates; the URL names it.
pub const SUPERUSER: &str = "kw";

/// The unprivileged account the server runs as when xtask runs as root.
const UNPRIVILEGED: &str = "nobody";

/// Tests run in parallel and every `keyward serve` holds a pool of connections.
const MAX_CONNECTIONS: u32 = 200;

/// A running throwaway cluster. Dropping it stops the server and removes its directory.
#[derive(Debug)]
pub struct Postgres {
    id: u64,
    port: u16,
    version: String,
    dir: PathBuf,
    /// From the first `initdb` to accepting connections.
    pub started_in: Duration,
}

/// What stopping a cluster needs; kept in [`RUNNING`] so an interrupt can stop it too.
#[derive(Debug, Clone)]
struct Cluster {
    bin: PathBuf,
    dir: PathBuf,
    user: Option<Account>,
}

#[derive(Debug, Clone)]
struct Account {
    name: String,
    uid: u32,
    gid: u32,
}

static RUNNING: Mutex<Vec<(u64, Cluster)>> = Mutex::new(Vec::new());
static CLEANUPS: Mutex<Vec<Box<dyn FnOnce() + Send>>> = Mutex::new(Vec::new());
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

impl Postgres {
    /// Installs Debian's `postgresql` if no server binaries are found, then starts a cluster
    /// and waits until it accepts connections on 127.0.0.1.
    pub fn start() -> Result<Postgres> {
        catch_interrupts();
        let t0 = Instant::now();
        let bin = find_or_install_bin()?;
        let version = bin.parent().and_then(Path::file_name).map(|v| v.to_string_lossy().to_string()).unwrap_or_default();
        let user = unprivileged_account()?;
        static N: AtomicU64 = AtomicU64::new(0);
        let id = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("keyward-pg-{}-{id}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let cluster = Cluster { bin, dir: dir.clone(), user };
        // Registered before anything runs in it, so an interrupt or a failure below removes it.
        RUNNING.lock().unwrap_or_else(|p| p.into_inner()).push((id, cluster.clone()));
        let mut pg = Postgres { id, port: 0, version, dir, started_in: Duration::ZERO };
        pg.port = cluster.init_and_start()?;
        pg.started_in = t0.elapsed();
        Ok(pg)
    }

    pub fn url(&self) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/postgres", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // After Ctrl-C the watcher tears down and exits the process: returning from here could
        // end `main` (and the process) while it is still stopping the server.
        while interrupted() {
            std::thread::park();
        }
        let taken = {
            let mut running = RUNNING.lock().unwrap_or_else(|p| p.into_inner());
            running.iter().position(|(id, _)| *id == self.id).map(|i| running.remove(i).1)
        };
        if let Some(cluster) = taken {
            cluster.stop();
        }
    }
}

impl Cluster {
    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// `bin/<name>`, run as the unprivileged account when there is one.
    fn command(&self, name: &str) -> Command {
        let program = self.bin.join(name);
        match &self.user {
            Some(u) => {
                let mut cmd = Command::new("runuser");
                cmd.args(["-u", &u.name, "--"]).arg(program);
                cmd
            }
            None => Command::new(program),
        }
    }

    fn init_and_start(&self) -> Result<u16> {
        if let Some(u) = &self.user {
            std::os::unix::fs::chown(&self.dir, Some(u.uid), Some(u.gid)).map_err(|e| format!("chown {}: {e}", self.dir.display()))?;
            let writable = Command::new("runuser").args(["-u", &u.name, "--", "test", "-w"]).arg(&self.dir).status();
            if !writable.is_ok_and(|s| s.success()) {
                return Err(format!(
                    "{} is not writable by the user {:?} that PostgreSQL runs as (it refuses root); \
                     point TMPDIR at a directory every user can reach, such as /tmp",
                    self.dir.display(),
                    u.name
                ).into());
            }
        }
        let out = output(
            self.command("initdb")
                .arg("-D")
                .arg(self.data())
                .args(["-U", SUPERUSER, "--auth=trust", "--no-locale", "--encoding=UTF8", "--no-sync"]),
        )?;
        if !out.status.success() {
            return Err(format!("initdb failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)).into());
        }
        let dir = self.dir.to_string_lossy().replace('\'', "''");
        let settings = format!(
            "\n# cargo xtask: a throwaway test server\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{dir}'\n\
             max_connections = {MAX_CONNECTIONS}\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n"
        );
        let conf = self.data().join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).map_err(|e| format!("{}: {e}", conf.display()))?;
        text.push_str(&settings);
        std::fs::write(&conf, text).map_err(|e| format!("{}: {e}", conf.display()))?;
        // The port is free when chosen; another process may take it before the server binds.
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port()?;
            let out = output(
                self.command("pg_ctl")
                    .arg("-D")
                    .arg(self.data())
                    .arg("-l")
                    .arg(self.log())
                    .args(["-w", "-t", "60", "-o", &format!("-p {port}"), "start"]),
            )?;
            let log = std::fs::read_to_string(self.log()).unwrap_or_default();
            if out.status.success() {
                wait_for_tcp(port, Duration::from_secs(30))?;
                return Ok(port);
            }
            last = format!("{}{}\n{log}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            if !log.contains("could not bind") {
                break;
            }
        }
        Err(format!("PostgreSQL did not start (log in {}):\n{last}", self.log().display()).into())
    }

    /// Stops the server at once (`-m immediate`: no checkpoint, there is nothing to keep),
    /// kills it if that fails, and removes the directory.
    fn stop(&self) {
        let pidfile = self.data().join("postmaster.pid");
        let was_running = pidfile.exists();
        if was_running {
            let stopped = self
                .command("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .args(["-m", "immediate", "-w", "-t", "30", "stop"])
                .output()
                .is_ok_and(|o| o.status.success());
            if !stopped {
                if let Some(pid) = std::fs::read_to_string(&pidfile).ok().and_then(|t| t.lines().next()?.trim().parse::<i32>().ok()) {
                    eprintln!("xtask: pg_ctl stop failed; killing the postmaster (pid {pid})");
                    // SAFETY: kill(2) with a pid read from the cluster's own postmaster.pid.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
            }
        }
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) if was_running => eprintln!("xtask: PostgreSQL stopped, {} removed", self.dir.display()),
            Ok(()) => eprintln!("xtask: {} removed", self.dir.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => eprintln!("xtask: PostgreSQL stopped, but {} could not be removed: {e}", self.dir.display()),
        }
    }
}

fn output(cmd: &mut Command) -> Result<Output> {
    let shown = format!("{cmd:?}");
    cmd.output().map_err(|e| format!("cannot run {shown}: {e}").into())
}

/// A loopback port nobody listens on now.
fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).map_err(|e| format!("no free loopback port: {e}"))?;
    Ok(listener.local_addr()?.port())
}

fn wait_for_tcp(port: u16, timeout: Duration) -> Result {
    let deadline = Instant::now() + timeout;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return Err(format!("PostgreSQL started but does not accept connections on 127.0.0.1:{port}").into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// `nobody` when running as root (PostgreSQL refuses root), else none: run as ourselves.
fn unprivileged_account() -> Result<Option<Account>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name = std::ffi::CString::new(UNPRIVILEGED).map_err(|e| e.to_string())?;
    // SAFETY: getpwnam with a NUL-terminated name; the record is read at once, before any other
    // passwd call (xtask's threads make none).
    let entry = unsafe { libc::getpwnam(name.as_ptr()) };
    if entry.is_null() {
        return Err(format!(
            "running as root, and PostgreSQL refuses root: it runs as the user {UNPRIVILEGED:?}, which does not exist here. \
             Create it (useradd --system {UNPRIVILEGED}) or run xtask as an ordinary user."
        ).into());
    }
    // SAFETY: non-null, just returned by getpwnam.
    let (uid, gid) = unsafe { ((*entry).pw_uid, (*entry).pw_gid) };
    if Command::new("runuser").arg("--version").output().is_err() {
        return Err("running as root: `runuser` (util-linux) is needed to run PostgreSQL as an unprivileged user".into());
    }
    Ok(Some(Account { name: UNPRIVILEGED.to_string(), uid, gid }))
}

/// The directory holding `initdb` and `pg_ctl`: the newest `/usr/lib/postgresql/<v>/bin`
/// (Debian), else the one on PATH; installs Debian's `postgresql` if neither exists.
fn find_or_install_bin() -> Result<PathBuf> {
    if let Some(bin) = find_bin() {
        return Ok(bin);
    }
    let directions = "Install PostgreSQL by hand (Debian: apt-get install postgresql; it needs initdb and pg_ctl), \
                      or run the tests against a server of yours: KEYWARD_TEST_POSTGRES=postgres://user@host:port/db \
                      cargo xtask test (a user that may create databases).";
    let apt = Command::new("apt-get").arg("--version").output().is_ok_and(|o| o.status.success());
    if !apt {
        return Err(format!("PostgreSQL's initdb was not found (in /usr/lib/postgresql/*/bin or on PATH) and there is no apt-get.\n{directions}").into());
    }
    eprintln!("xtask: installing Debian's postgresql (initdb and pg_ctl for a throwaway test server)");
    for args in [&["update", "-qq"][..], &["install", "-y", "-qq", "postgresql"][..]] {
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .map_err(|e| format!("cannot run apt-get: {e}\n{directions}"))?;
        if !status.success() {
            return Err(format!("apt-get {} failed: {status}\n{directions}", args.join(" ")).into());
        }
    }
    find_bin().ok_or_else(|| format!("the postgresql package installed no initdb in /usr/lib/postgresql/*/bin.\n{directions}").into())
}

fn find_bin() -> Option<PathBuf> {
    let mut debian: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin): &(u32, PathBuf)| bin.join("initdb").is_file() && bin.join("pg_ctl").is_file())
        .collect();
    debian.sort();
    if let Some((_, bin)) = debian.pop() {
        return Some(bin);
    }
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .find(|d| d.join("initdb").is_file() && d.join("pg_ctl").is_file())
}

/// Runs `f` when xtask is interrupted, before the clusters stop (newest first).
pub fn on_interrupt(f: impl FnOnce() + Send + 'static) {
    catch_interrupts();
    CLEANUPS.lock().unwrap_or_else(|p| p.into_inner()).push(Box::new(f));
}

/// Whether Ctrl-C (or SIGTERM, SIGHUP) arrived; the watcher is then tearing down.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

extern "C" fn note_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Turns SIGINT, SIGTERM and SIGHUP into a flag that a watcher thread acts on: run the
/// cleanups, stop every cluster, exit 130. (The handler itself only stores the flag, which
/// is all a signal handler may safely do.)
fn catch_interrupts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: the handler only stores to an atomic (async-signal-safe).
            unsafe {
                libc::signal(signal, note_signal as extern "C" fn(libc::c_int) as libc::sighandler_t);
            }
        }
        std::thread::spawn(|| {
            while !interrupted() {
                std::thread::sleep(Duration::from_millis(50));
            }
            eprintln!("\nxtask: interrupted; stopping");
            let cleanups: Vec<_> = std::mem::take(&mut *CLEANUPS.lock().unwrap_or_else(|p| p.into_inner()));
            for f in cleanups.into_iter().rev() {
                f();
            }
            let clusters: Vec<_> = std::mem::take(&mut *RUNNING.lock().unwrap_or_else(|p| p.into_inner()));
            for (_, cluster) in clusters {
                cluster.stop();
            }
            std::process::exit(130);
        });
    });
}

/// `cargo xtask postgres`: start one, print its URL, keep it until Ctrl-C.
pub fn serve_until_interrupted() -> Result {
    let pg = Postgres::start()?;
    println!(
        "PostgreSQL {} on 127.0.0.1:{} (dir {}), ready in {:.2} s:\n\n  {}\n\n\
         Try: psql {}\n     KEYWARD_TEST_POSTGRES={} cargo test ...\n\nCtrl-C stops it and removes its directory.",
        pg.version(),
        pg.port(),
        pg.dir().display(),
        pg.started_in.as_secs_f64(),
        pg.url(),
        pg.url(),
        pg.url()
    );
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// The two `keyward serve` replicas of `cargo xtask up --postgres`: name and port.
pub const UP_REPLICAS: [(&str, u16); 2] = [("a", 7070), ("b", 7071)];

/// Child processes killed (SIGTERM, then waited for) when dropped, and on Ctrl-C.
struct Children(Vec<(String, std::process::Child)>);

impl Children {
    fn add(&mut self, what: String, child: std::process::Child) {
        let pid = child.id() as libc::pid_t;
        on_interrupt(move || {
            // SAFETY: kill(2) on our own child's pid (still unreaped, so not reused).
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        });
        self.0.push((what, child));
    }

    /// The first child that exited, and how; it leaves the set.
    fn exited(&mut self) -> Option<(String, std::process::ExitStatus)> {
        let (i, status) = self.0.iter_mut().enumerate().find_map(|(i, (_, c))| c.try_wait().ok().flatten().map(|s| (i, s)))?;
        Some((self.0.remove(i).0, status))
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe {
                libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
            }
        }
        for (_, c) in &mut self.0 {
            let deadline = Instant::now() + Duration::from_secs(5);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `cargo xtask up --postgres`, once Envoy, the module and `keyward` are built: a throwaway
/// PostgreSQL, replica a then b of `keyward serve` on it, Envoy on envoy/local-postgres.yaml.
/// Runs until Ctrl-C, until Envoy exits or until no replica is left; everything is stopped
/// either way. One replica exiting (killed, to watch the feed fail over) is only reported.
pub fn up(envoy: &Path, keyward: &Path, root: &Path) -> Result {
    let pg = Postgres::start()?;
    let url = pg.url();
    eprintln!("xtask: PostgreSQL {} at {url}, started in {:.2} s", pg.version(), pg.started_in.as_secs_f64());
    let mut children = Children(Vec::new());
    // One at a time: a creates the schema (and prints the admin token, once), then b joins.
    for (name, port) in UP_REPLICAS {
        let what = format!("keyward serve --replica {name} (127.0.0.1:{port})");
        let child = Command::new(keyward)
            .args(["serve", "--store", &url, "--listen", &format!("127.0.0.1:{port}"), "--replica", name])
            .env("KEYWARD_STORE", &url)
            .current_dir(root)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", keyward.display()))?;
        children.add(what.clone(), child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while keyward_testkit::request(port, "GET", "/healthz", &[]).map_or(true, |r| r.status != 200) {
            if let Some((what, status)) = children.exited() {
                return Err(format!("{what} exited: {status} (it needs `serve --store postgres://… --replica NAME`)").into());
            }
            if Instant::now() > deadline {
                return Err(format!("{what} did not answer GET /healthz within 30 s").into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let config = "envoy/local-postgres.yaml";
    let child = Command::new(envoy)
        .args(["-c", config, "--concurrency", "2", "--disable-hot-restart", "--log-level", "warn"])
        .args(["--component-log-level", "wasm:info"])
        .current_dir(root)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", envoy.display()))?;
    children.add(format!("Envoy ({config})"), child);
    println!(
        "\nkeyward local stack on PostgreSQL, two replicas:\n\
         \x20 PostgreSQL {v:<13}  {url}   (throwaway: {dir}, removed on Ctrl-C)\n\
         \x20 keyward serve, replica a  http://127.0.0.1:7070\n\
         \x20 keyward serve, replica b  http://127.0.0.1:7071\n\
         \x20 Envoy + keyward.wasm      http://127.0.0.1:10000   (admin http://127.0.0.1:9901), fed by either replica\n\
         \x20 echo upstream             http://127.0.0.1:10080\n\n\
         Try it, in another terminal at the repository root:\n\
         \x20 export KEYWARD_STORE={url}\n\
         \x20 target/debug/keyward agent create demo --scopes read:all     # prints a key, once\n\
         \x20 curl -i -H 'x-api-key: <that key>' 127.0.0.1:10000/v1/hello   # 200, with x-keyward-* upstream\n\
         \x20 curl -i 127.0.0.1:10000/v1/hello                            # 401 MISSING_API_KEY\n\
         \x20 target/debug/keyward status                                  # this Envoy, its version, its replica\n\
         \x20 kill <pid of one replica>       # Envoy's feed moves to the other (envoy/local-postgres.yaml)\n\n\
         The admin API's token is printed once, when replica a first creates the store (above).\n\
         For a working one now: target/debug/keyward admin-token rotate\n\n\
         Ctrl-C stops the stack and PostgreSQL.\n",
        v = pg.version(),
        dir = pg.dir().display(),
    );
    let pids: Vec<String> = children.0.iter().map(|(what, c)| format!("  pid {:<8} {what}", c.id())).collect();
    println!("Processes:\n{}\n", pids.join("\n"));
    loop {
        if let Some((what, status)) = children.exited() {
            if interrupted() {
                // The watcher is stopping everything and exits the process.
                loop {
                    std::thread::park();
                }
            }
            let replicas_left = children.0.iter().filter(|(w, _)| w.starts_with("keyward serve")).count();
            if what.starts_with("keyward serve") && replicas_left > 0 {
                eprintln!("xtask: {what} exited: {status}; Envoy's feed moves to the other replica, the stack runs on");
                continue;
            }
            drop(children);
            drop(pg);
            return Err(format!("{what} exited: {status}").into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

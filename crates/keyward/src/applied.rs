//! Read-your-writes: whether a `keyward serve` publishes a store, and waiting until every
//! connected Envoy has applied a change.
//!
//! `keyward serve` holds a shared lock on `<db>.serve.lock` while it runs; the CLI, acting on
//! the file, tries an exclusive lock to learn whether anyone publishes its changes. The lock
//! dies with the process, so a killed `serve` never looks alive.

use crate::error::Result;
use crate::model::Applied;
use crate::store::Store;
use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a change waits for the Envoys by default.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(2);
/// How often the wait looks at the Envoys' applied versions.
pub const POLL: Duration = Duration::from_millis(5);

pub fn lock_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(".serve.lock");
    PathBuf::from(name)
}

fn open_lock(db: &Path) -> std::io::Result<File> {
    open_file(lock_path(db))
}

fn open_file(path: PathBuf) -> std::io::Result<File> {
    OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)
}

/// Held by `keyward serve` for as long as it runs.
pub struct ServeLock {
    _file: File,
}

impl ServeLock {
    pub fn acquire(db: &Path) -> std::io::Result<ServeLock> {
        let file = open_lock(db)?;
        file.lock_shared()?;
        Ok(ServeLock { _file: file })
    }
}

/// Whether a `keyward serve` runs on the store at `db` now.
pub fn serve_running(db: &Path) -> bool {
    // Probes take turns on a file serve never locks, so one CLI's brief exclusive lock on the
    // serve lock is never taken by another CLI for a running serve.
    let mut probe_path = lock_path(db).into_os_string();
    probe_path.push(".probe");
    let Ok(probe) = open_file(PathBuf::from(probe_path)) else { return false };
    if probe.lock().is_err() {
        return false;
    }
    let Ok(file) = open_lock(db) else { return false };
    match file.try_lock() {
        Ok(()) => {
            let _ = file.unlock();
            false
        }
        Err(TryLockError::WouldBlock) => true,
        Err(TryLockError::Error(_)) => false,
    }
}

/// Builds the answer from who has applied `version`.
pub fn applied(version: u64, serving: bool, waited: bool, done: &[String], pending: Vec<String>, start: Instant) -> Applied {
    let envoys = if serving { (done.len() + pending.len()) as u64 } else { 0 };
    Applied {
        version,
        serving,
        waited,
        envoys,
        applied: if serving { done.len() as u64 } else { 0 },
        pending: if serving { pending } else { Vec::new() },
        elapsed_ms: u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
    }
}

/// Waits (up to `bound`, unless `wait` is false) until every Envoy connected to this store has
/// applied `version`: the CLI's path, polling the store file that `keyward serve` updates on
/// every feed request.
pub fn wait_on_store(store: &Store, version: u64, wait: bool, bound: Duration) -> Result<Applied> {
    let start = Instant::now();
    let serving = store.serving();
    loop {
        let (done, pending) = store.envoys_applied(version)?;
        if !serving || !wait || pending.is_empty() || start.elapsed() >= bound {
            return Ok(applied(version, serving, wait && serving, &done, pending, start));
        }
        std::thread::sleep(POLL);
    }
}

/// The one-line human summary of a change's reach.
pub fn summary(a: &Applied) -> (bool, String) {
    let envoys = |n: u64| if n == 1 { "Envoy" } else { "Envoys" };
    if !a.serving {
        return (
            false,
            "warning: no control plane is serving this store: no Envoy will see this change until `keyward serve` runs".into(),
        );
    }
    if !a.waited {
        return (true, format!("Committed as version {}; not waiting for the Envoys (--no-wait).", a.version));
    }
    if a.envoys == 0 {
        return (true, format!("No Envoy is connected; version {} applies when one connects.", a.version));
    }
    if a.pending.is_empty() {
        return (true, format!("Applied by {} of {} {} in {} ms.", a.applied, a.envoys, envoys(a.envoys), a.elapsed_ms));
    }
    (
        false,
        format!(
            "warning: not yet applied by {} after {} ms (applied by {} of {} {}, version {}); see `keyward status`",
            a.pending.join(", "),
            a.elapsed_ms,
            a.applied,
            a.envoys,
            envoys(a.envoys),
            a.version
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(serving: bool, waited: bool, envoys: u64, applied: u64, pending: &[&str]) -> Applied {
        Applied { version: 7, serving, waited, envoys, applied, pending: pending.iter().map(|s| s.to_string()).collect(), elapsed_ms: 41 }
    }

    #[test]
    fn summaries_say_plainly_whether_a_change_reached_every_envoy() {
        let check = |x: Applied, ok: bool, want: &str| {
            let (is_ok, text) = summary(&x);
            assert_eq!(is_ok, ok, "{text}");
            assert!(text.contains(want), "{text} lacks {want}");
        };
        check(a(true, true, 2, 2, &[]), true, "Applied by 2 of 2 Envoys in 41 ms.");
        check(a(true, true, 1, 1, &[]), true, "Applied by 1 of 1 Envoy in 41 ms.");
        check(a(true, true, 2, 1, &["edge-b"]), false, "not yet applied by edge-b after 41 ms (applied by 1 of 2 Envoys, version 7)");
        check(a(false, false, 0, 0, &[]), false, "no control plane is serving this store");
        check(a(true, false, 0, 0, &[]), true, "not waiting");
        check(a(true, true, 0, 0, &[]), true, "No Envoy is connected");
    }

    #[test]
    fn a_serve_lock_is_seen_while_held_and_gone_with_it() {
        let dir = std::env::temp_dir().join(format!("keyward-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("k.db");
        assert!(!serve_running(&db));
        let lock = ServeLock::acquire(&db).unwrap();
        assert!(serve_running(&db));
        // A second serve on the same store may run beside it.
        let second = ServeLock::acquire(&db).unwrap();
        drop(lock);
        assert!(serve_running(&db));
        drop(second);
        assert!(!serve_running(&db));
    }
}

//! Change notifications between replicas on PostgreSQL: every change's transaction sends
//! `NOTIFY keyward_changes` (delivered at commit), and each `keyward serve` holds one extra
//! connection that LISTENs and wakes its feed long-polls at once.

use std::time::Duration;

/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Listens on a thread of its own for as long as the process runs, calling `wake` with every
/// notification's payload (a version, `meta`, or `block <address> <until>`), and with `""` once
/// after each (re)connection, since changes may have landed unheard.
pub fn listen(url: String, wake: impl Fn(&str) + Send + 'static) {
    let spawned = std::thread::Builder::new().name("keyward-listen".into()).spawn(move || {
        let mut backoff = Duration::from_millis(100);
        loop {
            match listen_once(&url, &wake) {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!(error = %e, retry_ms = backoff.as_millis() as u64, "listening for changes on PostgreSQL");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the change listener; changes from other replicas arrive within a second");
    }
}

fn listen_once(url: &str, wake: &impl Fn(&str)) -> Result<(), postgres::Error> {
    let mut client = postgres::Client::connect(url, postgres::NoTls)?;
    client.batch_execute(&format!("LISTEN {}", crate::store::CHANNEL))?;
    tracing::info!("listening for changes from every replica");
    wake("");
    let mut notifications = client.notifications();
    let mut it = notifications.blocking_iter();
    while let Some(n) = postgres::fallible_iterator::FallibleIterator::next(&mut it)? {
        tracing::debug!(payload = n.payload(), "change notification");
        wake(n.payload());
    }
    Ok(())
}

//! Rate limits across a fleet of Envoys, the filter's side. No request waits on the network:
//! a request reads and CASes only its bucket in shared data, as with one Envoy.
//!
//! - In global mode every worker counts what it admits per bucket ([`RateCounts`], in VM
//!   memory; in split mode nothing is counted, the control plane needs no counts) and hands the
//!   counts to the fetcher's VM on its tick through the `keyward.rates` queue, at once when a
//!   bucket has used half its budget here (the early push), else every half sync interval.
//! - The fetcher reports the buckets that moved to the control plane every `rate_sync_ms`
//!   (and at least once a second) and gets back how many Envoys share each limit and, when
//!   the control plane has a rate store, how many requests the *other* Envoys admitted in each
//!   bucket's window ([`RateSync`]). It writes the first to `keyward.fleet` (every VM reads it
//!   on its tick) and the second into each bucket's value, trusted for a few sync intervals.
//! - A request is then judged by [`keyward_core::ratelimit::admit_in_fleet`]: against the
//!   whole limit less the others' admissions while the figure is trusted, else against this
//!   Envoy's share of the limit. A lost control plane or rate store leaves each Envoy its last
//!   share.
//!
//! The counts, the queue's lines, the reports and the answers' writes are pure, in
//! `keyward_core::fetch::rates`; here the fleet is read for each tick.

use crate::host::{Host, HostError};
use keyward_core::ratelimit::Fleet;

pub use keyward_core::fetch::rates::{Admitted, AdmittedCounts, RateCounts, RateSync, FLEET_KEY, RATES_QUEUE};

/// The fleet this VM judges requests by, as of its last tick.
pub fn read_fleet<H: Host>(host: &H) -> Result<Fleet, HostError> {
    let (value, _) = host.shared_get(FLEET_KEY)?;
    Ok(value.and_then(|v| std::str::from_utf8(&v).ok().and_then(Fleet::decode)).unwrap_or_default())
}

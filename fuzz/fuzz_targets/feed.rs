//! Feed pages and shared-data records: a page is accepted whole or refused whole, and every
//! accepted record survives the shared-data encoding unchanged.
#![no_main]

use keyward_core::feed::parse_page;
use keyward_core::ratelimit::{admit, Burst, Window};
use keyward_core::RateLimit;
use keyward_core::scope::Implications;
use keyward_core::KeyRecord;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(page) = parse_page(data, 1 << 20, &Implications::default()) {
        assert!(!(page.complete && page.cursor.is_some()), "a complete page with a cursor");
        for (_, record) in &page.records {
            let encoded = record.encode();
            assert_eq!(KeyRecord::decode(&encoded).as_ref(), Some(record), "record does not round-trip: {encoded:?}");
        }
    }
    // Whatever sits in shared data is decoded defensively.
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(record) = KeyRecord::decode(text) {
            let _ = record.allows_path("/v1/x");
            let _ = record.has_scope("read:all");
        }
    }
    // So is a rate-limit bucket: any stored value is judged without a panic, and re-encoded.
    if let Some(mut w) = Window::decode(data) {
        for (now, count, period_secs, burst) in [(0, 1, 1, Burst::Limit), (u64::MAX, u32::MAX, 86_400, Burst::Requests(3)), (1_800_000_000_000_000, 60, 60, Burst::Requests(1))] {
            let _ = admit(now, &mut w, RateLimit { count, period_secs }, burst);
            assert_eq!(Window::decode(&w.encode()), Some(w));
        }
    }
});

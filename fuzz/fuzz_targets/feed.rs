//! Feed pages (JSON or the line form) and shared-data records: a page is accepted whole or
//! refused whole, and every accepted record survives the shared-data encoding unchanged.
#![no_main]

use keyward_core::feed::{parse_page, Epochs};
use keyward_core::ratelimit::{admit, Burst, Window};
use keyward_core::RateLimit;
use keyward_core::scope::Implications;
use keyward_core::snapshot::tag_entry;
use keyward_core::KeyRecord;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(page) = parse_page(data, 1 << 20, &Implications::default()) {
        assert!(!(page.complete && page.cursor.is_some()), "a complete page with a cursor");
        // Whichever form the page came in (JSON or lines), what is stored is a record exactly
        // as the filter would encode it.
        for (_, entry) in &page.records {
            let record = KeyRecord::decode(entry).unwrap_or_else(|| panic!("an accepted record does not decode: {entry:?}"));
            assert_eq!(&record.encode(), entry, "an accepted record is not canonical");
            let tagged = tag_entry(page.version, entry.clone());
            assert_eq!(KeyRecord::decode_entry(&tagged), Some((page.version, record)), "entry does not round-trip: {tagged:?}");
        }
        // Whatever the page says, the epochs after it round-trip too.
        let epochs = Epochs::default();
        if let Ok(step) = epochs.step(&epochs.ask(true, page.version, page.cursor.as_ref()), &page) {
            assert_eq!(Epochs::decode(&step.after.encode()), Some(step.after.clone()));
            assert!(step.after.live(step.tag), "a page's records are live once it is applied");
        }
    }
    // Whatever sits in shared data is decoded defensively.
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(record) = KeyRecord::decode(text) {
            let _ = record.allows_path("/v1/x");
            let _ = record.has_scope("read:all");
        }
        if let Some((epoch, record)) = KeyRecord::decode_entry(text) {
            assert_eq!(KeyRecord::decode_entry(&record.encode_entry(epoch)), Some((epoch, record)));
        }
        if let Some(epochs) = Epochs::decode(text) {
            assert_eq!(Epochs::decode(&epochs.encode()), Some(epochs));
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

//! The plugin-configuration compiler on arbitrary bytes: it refuses or compiles, never panics,
//! and whatever it compiles is self-consistent.
#![no_main]

use keyward_core::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(config) = Config::from_json(data) {
        assert!(!(config.snapshot.is_some() && config.control_plane.is_some()), "snapshot and control_plane together");
        assert!(config.sources.max_length >= 16 && config.sources.max_length <= 4096);
        if let Some(cp) = &config.control_plane {
            assert!(!cp.cluster.is_empty());
        }
    }
});

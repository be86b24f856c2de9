//! The module's size against its budget (`keyward_testkit::WASM_BUDGET_BYTES`): a release
//! `keyward.wasm` that grows past it fails here, when it happens.

#[test]
fn keyward_wasm_stays_within_its_budget() {
    let wasm = keyward_testkit::wasm_path();
    let size = std::fs::metadata(&wasm).map(|m| m.len()).unwrap_or_else(|e| panic!("{}: {e}", wasm.display()));
    let budget = keyward_testkit::WASM_BUDGET_BYTES;
    assert!(
        size <= budget,
        "{} is {size} bytes, over its budget of {budget} (crates/testkit/src/lib.rs: WASM_BUDGET_BYTES).\n\
         Find what grew with `twiggy top` or `cargo bloat` on the module; raise the budget only for a\n\
         feature that earns its bytes, and say so in the commit.",
        wasm.display()
    );
    // A debug build or another file is no measure of the release module.
    assert!(size > 100_000, "{} is {size} bytes: not the release keyward.wasm", wasm.display());
}

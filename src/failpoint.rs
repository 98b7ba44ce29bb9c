//! Crash injection for the reliability tests. With the `failpoints` cargo
//! feature, `hit("name")` aborts the process when `SWTPM_KEEPER_FAILPOINT`
//! equals `name`, as a power cut at that step would. Without the feature
//! (every release build) it compiles to nothing.

#[cfg(feature = "failpoints")]
pub fn hit(name: &str) {
    if std::env::var("SWTPM_KEEPER_FAILPOINT").as_deref() == Ok(name) {
        std::process::abort();
    }
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) {}

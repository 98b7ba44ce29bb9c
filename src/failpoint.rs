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

/// With the feature, `SWTPM_KEEPER_FAILPOINT_SKIP_FSYNC=<n>` turns the
/// process's n-th fsync (counted from 1, files and directories alike) into
/// a no-op: the durability test shows that its trace checker sees the gap.
/// Without the feature it is always false.
#[cfg(feature = "failpoints")]
pub fn skip_fsync() -> bool {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static SEEN: AtomicUsize = AtomicUsize::new(0);
    let n = SEEN.fetch_add(1, Ordering::Relaxed) + 1;
    std::env::var("SWTPM_KEEPER_FAILPOINT_SKIP_FSYNC")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        == Some(n)
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn skip_fsync() -> bool {
    false
}

//! The per-VM lock: an flock on `<store>/<uuid>/.lock`, held by a guard.
//!
//! flock (not fcntl) so that it is released when the process dies, and so
//! that it works across hosts on NFS v4 and cluster filesystems. Waiting
//! always has a deadline: libvirtd is blocked while the hook waits.
//!
//! flock(2) through libc rather than std's `File::try_lock`: that is Rust
//! 1.89, and the minimum Rust is 1.85 (docs/packaging.md). Nor through nix:
//! its `Flock` takes the file and unlocks when dropped, where `try_flock`
//! locks a file its caller keeps, and its plain `flock` is deprecated.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::error::{Error, IoContext, Result};

/// Holds the lock until dropped (closing the file releases the flock).
#[derive(Debug)]
pub struct VmLock {
    _file: File,
    path: PathBuf,
}

impl VmLock {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Take the exclusive lock on `path` (writers), waiting at most `timeout`.
pub fn lock_exclusive(path: &Path, timeout: Duration) -> Result<VmLock> {
    lock(path, timeout, true)
}

/// Take a shared lock on `path` (readers: they only wait for writers).
pub fn lock_shared(path: &Path, timeout: Duration) -> Result<VmLock> {
    lock(path, timeout, false)
}

fn lock(path: &Path, timeout: Duration, exclusive: bool) -> Result<VmLock> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .ctx("open lock file", path)?;
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(2);
    loop {
        match try_flock(&file, exclusive) {
            Ok(true) => {
                return Ok(VmLock {
                    _file: file,
                    path: path.to_owned(),
                })
            }
            Ok(false) => {}
            Err(e) => return Err(Error::io("lock", path, e)),
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(Error::failed(format!(
                "gave up after {:.1} s waiting for the lock {} (another swtpm-keeper run \
                 holds it; raise lock_timeout in the configuration if this host is slow)",
                timeout.as_secs_f64(),
                path.display()
            )));
        }
        sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// One attempt at flock(2) without waiting: `Ok(true)` when `file` now holds
/// the lock, `Ok(false)` when another open file holds a conflicting one.
/// The lock goes with the open file: closing `file` releases it.
pub fn try_flock(file: &File, exclusive: bool) -> io::Result<bool> {
    let mode = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    };
    loop {
        // SAFETY: flock(2) takes an integer descriptor and flags and touches
        // no memory of ours; the descriptor stays open while `file` is
        // borrowed, so it cannot name another file meanwhile.
        if unsafe { libc::flock(file.as_raw_fd(), mode | libc::LOCK_NB) } == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EWOULDBLOCK) => return Ok(false),
            // A signal before the lock was decided: ask again.
            Some(libc::EINTR) => {}
            _ => return Err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock_file(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("swtpm-keeper-lock-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(".lock")
    }

    #[test]
    fn an_exclusive_lock_keeps_out_every_other_open_file_until_dropped() {
        let p = lock_file("excl");
        let held = lock_exclusive(&p, Duration::ZERO).unwrap();
        let other = File::open(&p).unwrap();
        assert!(!try_flock(&other, true).unwrap());
        assert!(!try_flock(&other, false).unwrap());
        drop(held);
        assert!(try_flock(&other, true).unwrap());
    }

    #[test]
    fn shared_locks_share_and_keep_out_a_writer() {
        let p = lock_file("shared");
        let _a = lock_shared(&p, Duration::ZERO).unwrap();
        let _b = lock_shared(&p, Duration::ZERO).unwrap();
        let writer = File::open(&p).unwrap();
        assert!(!try_flock(&writer, true).unwrap());
    }

    #[test]
    fn a_held_lock_makes_the_wait_give_up_at_the_deadline_and_say_why() {
        let p = lock_file("deadline");
        let held = File::create(&p).unwrap();
        assert!(try_flock(&held, true).unwrap());
        let t = Instant::now();
        let err = lock_shared(&p, Duration::from_millis(200)).unwrap_err();
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(200),
            "gave up early: {took:?}"
        );
        assert!(took < Duration::from_secs(2), "waited too long: {took:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("waiting for the lock") && msg.contains("lock_timeout"),
            "{msg}"
        );
    }

    #[test]
    fn a_lock_file_that_is_a_symlink_is_never_followed() {
        let d = std::env::temp_dir().join(format!("swk-lock-link-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("target"), b"").unwrap();
        std::os::unix::fs::symlink(d.join("target"), d.join(".lock")).unwrap();
        let e = lock_exclusive(&d.join(".lock"), Duration::from_millis(10)).unwrap_err();
        assert!(e.to_string().contains("open lock file"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}

//! The per-VM lock: an flock on `<store>/<uuid>/.lock`, held by a guard.
//!
//! flock (not fcntl) so that it is released when the process dies, and so
//! that it works across hosts on NFS v4 and cluster filesystems. Waiting
//! always has a deadline: libvirtd is blocked while the hook waits.

use std::fs::{File, OpenOptions, TryLockError};
use std::os::unix::fs::OpenOptionsExt;
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
        let attempt = if exclusive {
            file.try_lock()
        } else {
            file.try_lock_shared()
        };
        match attempt {
            Ok(()) => {
                return Ok(VmLock {
                    _file: file,
                    path: path.to_owned(),
                })
            }
            Err(TryLockError::WouldBlock) => {}
            Err(TryLockError::Error(e)) => return Err(Error::io("lock", path, e)),
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

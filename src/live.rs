//! Reading the files of a running VM without getting in its way: no lock
//! on swtpm's files, no signal, no pause. What a live read may store is one
//! whole version of each file, so every file is read until two reads in a
//! row are equal (and pass swtpm's header rules, for TPM state):
//!
//! - swtpm's directory backend renames a new `permall` over the old one:
//!   one open and read already gives one version, and the second read only
//!   confirms it;
//! - swtpm 0.11's `backup` mode renames `permall` to `.bak` and rewrites it
//!   in place, and the linear-file backend writes in place: a missing or
//!   partial file there is a moment to retry, not an error;
//! - QEMU writes the UEFI vars (pflash) in place: two reads some tens of
//!   milliseconds apart must be equal (oVirt's rule).
//!
//! A file's identity (device, inode, size, mtime, ctime) tells, without
//! reading it, that it is still the version read last time.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fsutil::FileData;

/// What identifies one version of a file without reading it: a rename
/// gives a new inode, a write in place a new mtime and ctime, a chown a new
/// ctime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

impl Identity {
    pub fn of(st: &libc::stat) -> Identity {
        let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
        Identity {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size as u64,
            mtime_ns: ns(st.st_mtime, st.st_mtime_nsec),
            ctime_ns: ns(st.st_ctime, st.st_ctime_nsec),
        }
    }
}

/// One attempt at reading a file that may be changing.
pub enum Attempt {
    /// A complete read that passed the file's checks.
    Read(FileData),
    /// The file is between versions (missing, or failing its checks, beside
    /// a good backup): try again.
    NotYet(String),
}

/// How patient a live read is: `tries` reads at most, `gap` apart.
#[derive(Debug, Clone, Copy)]
pub struct Patience {
    pub tries: u32,
    pub gap: Duration,
}

/// For swtpm's files: a rename is atomic, so a short gap suffices.
pub const STATE_PATIENCE: Patience = Patience {
    tries: 8,
    gap: Duration::from_millis(10),
};

/// For QEMU's in-place writes of the UEFI vars: reads tens of ms apart.
pub const NVRAM_PATIENCE: Patience = Patience {
    tries: 6,
    gap: Duration::from_millis(40),
};

/// Read `what` with `read_once` until two reads in a row give the same
/// bytes. An error from `read_once` ends it at once; a file that never
/// settles within `patience` is an error that says why.
pub fn read_settled(
    what: &str,
    patience: Patience,
    mut read_once: impl FnMut() -> Result<Attempt>,
) -> Result<FileData> {
    let mut last: Option<FileData> = None;
    let mut why = String::from("it changed between every two reads");
    for i in 0..patience.tries.max(2) {
        if i > 0 {
            std::thread::sleep(patience.gap);
        }
        match read_once()? {
            Attempt::Read(d) => {
                if last.as_ref().is_some_and(|l| l.bytes == d.bytes) {
                    return Ok(d);
                }
                last = Some(d);
            }
            Attempt::NotYet(w) => {
                why = w;
                last = None;
            }
        }
    }
    Err(Error::failed(format!(
        "{what} did not settle in {} reads {} ms apart ({why}); it is captured on a later pass",
        patience.tries.max(2),
        patience.gap.as_millis()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(b: &[u8]) -> FileData {
        FileData {
            bytes: b.to_vec(),
            mode: 0o600,
            uid: 0,
            gid: 0,
        }
    }

    const QUICK: Patience = Patience {
        tries: 4,
        gap: Duration::from_millis(1),
    };

    #[test]
    fn two_equal_reads_in_a_row_settle_a_file() {
        let mut seq = vec![b"a".as_slice(), b"b", b"b"].into_iter();
        let d = read_settled("f", QUICK, || Ok(Attempt::Read(data(seq.next().unwrap())))).unwrap();
        assert_eq!(d.bytes, b"b");
    }

    #[test]
    fn a_file_between_versions_is_read_again_and_never_paired_across_the_gap() {
        // "a", then a moment without a good file, then "a": the two reads
        // of "a" are not in a row, so a third is needed.
        let mut n = 0;
        let d = read_settled("f", QUICK, || {
            n += 1;
            Ok(match n {
                2 => Attempt::NotYet("permall is missing beside permall.bak".into()),
                _ => Attempt::Read(data(b"a")),
            })
        })
        .unwrap();
        assert_eq!(d.bytes, b"a");
        assert_eq!(n, 4);
    }

    #[test]
    fn a_file_that_never_settles_is_an_error_that_says_why() {
        let mut n = 0u8;
        let e = read_settled("NVRAM /x", QUICK, || {
            n += 1;
            Ok(Attempt::Read(data(&[n])))
        })
        .unwrap_err();
        assert!(
            e.to_string().contains("NVRAM /x did not settle in 4 reads"),
            "{e}"
        );
        let e =
            read_settled("permall", QUICK, || Ok(Attempt::NotYet("missing".into()))).unwrap_err();
        assert!(e.to_string().contains("(missing)"), "{e}");
    }

    #[test]
    fn a_hard_error_ends_the_read_at_once() {
        let mut n = 0;
        let e = read_settled("f", QUICK, || {
            n += 1;
            Err(Error::failed("refusing f: not a regular file"))
        })
        .unwrap_err();
        assert_eq!(n, 1);
        assert!(e.to_string().contains("not a regular file"));
    }

    #[test]
    fn identity_changes_with_inode_size_and_times() {
        // SAFETY: stat is plain data, all zeroes is a valid value.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        st.st_ino = 7;
        st.st_size = 10;
        st.st_mtime = 1;
        st.st_mtime_nsec = 5;
        let a = Identity::of(&st);
        assert_eq!(a.mtime_ns, 1_000_000_005);
        st.st_ctime_nsec = 1;
        assert_ne!(Identity::of(&st), a, "a chown changes ctime only");
    }
}

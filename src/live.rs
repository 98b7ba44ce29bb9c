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
//! A file's identity (`fsutil::Identity`: device, inode, size, mtime,
//! ctime) tells, without reading it, that it is still the version read
//! last time.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::fsutil::{self, Dir, FileData, Identity};

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
    tries: 10,
    gap: Duration::from_millis(5),
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

/// How a capture reads a VM's files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reading {
    /// At a stop swtpm has exited (its lock says so) and QEMU is gone: one
    /// read is whole, and a file that fails its checks is refused.
    AtStop,
    /// While the VM runs: every file is read until two reads agree (but
    /// one whose writer can only have replaced it whole, or that is
    /// quiet), and a file between versions is read again. Paused, nothing
    /// writes: one read whose file kept its identity is whole.
    Live { paused: bool },
}

impl Reading {
    /// The VM's state as a manifest records it.
    pub fn vm_state(self) -> &'static str {
        match self {
            Reading::AtStop => "shutoff",
            Reading::Live { paused: false } => "running",
            Reading::Live { paused: true } => "paused",
        }
    }
}

/// One file to read.
pub struct FileRead<'a> {
    pub path: &'a Path,
    /// Largest size accepted (`max_file_size`).
    pub max: u64,
    pub patience: Patience,
    /// Live: the file must be there, so its absence is a moment between
    /// versions (swtpm's backup mode renames `permall` away, then writes
    /// it again). Otherwise an absent file is `None`.
    pub must_exist: bool,
    /// Its writer only ever replaces it by a rename (swtpm's directory
    /// backend, without its backup mode): the inode one open holds never
    /// changes, so one read is one whole version.
    pub replaced_whole: bool,
}

/// Read `r.path`, opened by `open` (`None`: it does not exist), and check
/// its bytes with `check` (swtpm's header rules, or the NVRAM's). What
/// `check` returns for the bytes kept comes back with them.
pub fn read_file<T>(
    reading: Reading,
    r: &FileRead,
    open: impl Fn() -> Result<Option<File>>,
    check: impl Fn(&[u8]) -> std::result::Result<T, String>,
) -> Result<Option<(FileData, T)>> {
    let refusing = |why: String| Error::failed(format!("refusing {}: {why}", r.path.display()));
    match open()? {
        None if reading == Reading::AtStop || !r.must_exist => return Ok(None),
        None => {}
        Some(mut f) if reading == Reading::AtStop => {
            let d = fsutil::read_regular(&mut f, r.path, r.max)?;
            let t = check(&d.bytes).map_err(refusing)?;
            return Ok(Some((d, t)));
        }
        Some(mut f) => {
            refuse_never_settling(&f, r)?;
            if let Some(done) = read_once(reading, &mut f, r, &check) {
                log::debug!("{}: read once", r.path.display());
                return Ok(Some(done));
            }
        }
    }
    log::debug!("{}: read until two reads agree", r.path.display());
    let d = read_settled(&r.path.display().to_string(), r.patience, || {
        let Some(mut f) = open()? else {
            return Ok(Attempt::NotYet("it is missing".into()));
        };
        refuse_never_settling(&f, r)?;
        Ok(match fsutil::read_regular(&mut f, r.path, r.max) {
            // Changed size while read: a write in place, under way.
            Err(e) => Attempt::NotYet(e.to_string()),
            Ok(d) => match check(&d.bytes) {
                Err(why) => Attempt::NotYet(why),
                Ok(_) => Attempt::Read(d),
            },
        })
    })?;
    let t = check(&d.bytes).map_err(refusing)?;
    Ok(Some((d, t)))
}

/// One read suffices for a file replaced only by renames, for a quiet
/// one, and for any file of a paused VM; `None`: read it the patient way.
fn read_once<T>(
    reading: Reading,
    f: &mut File,
    r: &FileRead,
    check: &impl Fn(&[u8]) -> std::result::Result<T, String>,
) -> Option<(FileData, T)> {
    if reading == (Reading::Live { paused: true }) {
        return read_unwritten(f, r, check);
    }
    if !r.replaced_whole {
        return read_quiet(f, r, check);
    }
    let d = fsutil::read_regular(f, r.path, r.max).ok()?;
    let t = check(&d.bytes).ok()?;
    Some((d, t))
}

/// A file nobody wrote for this long is quiet: a write while it is read
/// would give it a newer mtime, in another tick of the kernel's coarse
/// clock (a few ms).
const QUIET: Duration = Duration::from_secs(2);

/// One read of a quiet file whose identity is the same after the read as
/// before: nothing wrote it meanwhile (a write in place sets its mtime; a
/// rename leaves the inode read as it was), so that read is one whole
/// version and needs no second one. `None`: read it the patient way.
fn read_quiet<T>(
    f: &mut File,
    r: &FileRead,
    check: &impl Fn(&[u8]) -> std::result::Result<T, String>,
) -> Option<(FileData, T)> {
    let before = fsutil::fstat(f).ok()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs() as i64;
    let last_write = before.st_mtime.max(before.st_ctime);
    if now - last_write < QUIET.as_secs() as i64 {
        return None;
    }
    read_unchanged(f, r, check, &before)
}

/// One read of a paused VM's file: its vCPUs are stopped, so the guest
/// writes neither its UEFI vars nor TPM commands, and QEMU drained its
/// writes when it paused. The file's identity is compared around the read
/// all the same (a TPM command that was under way may still finish): a
/// changed one, or a failed check, is read the patient way.
fn read_unwritten<T>(
    f: &mut File,
    r: &FileRead,
    check: &impl Fn(&[u8]) -> std::result::Result<T, String>,
) -> Option<(FileData, T)> {
    let before = fsutil::fstat(f).ok()?;
    read_unchanged(f, r, check, &before)
}

/// One read, kept only if the file's identity after it is `before`'s and
/// its bytes pass `check`.
fn read_unchanged<T>(
    f: &mut File,
    r: &FileRead,
    check: &impl Fn(&[u8]) -> std::result::Result<T, String>,
    before: &libc::stat,
) -> Option<(FileData, T)> {
    let d = fsutil::read_regular(f, r.path, r.max).ok()?;
    let after = fsutil::fstat(f).ok()?;
    if Identity::of(before) != Identity::of(&after) {
        return None;
    }
    let t = check(&d.bytes).ok()?;
    Some((d, t))
}

/// What no retry can mend: not a regular file, more than one link, over
/// the size limit. `read_regular` says which.
fn refuse_never_settling(f: &File, r: &FileRead) -> Result<()> {
    let st = fsutil::fstat(f).ctx("stat", r.path)?;
    let regular = st.st_mode & libc::S_IFMT == libc::S_IFREG;
    if regular && st.st_nlink <= 1 && st.st_size as u64 <= r.max {
        return Ok(());
    }
    let mut f = f.try_clone().ctx("open", r.path)?;
    fsutil::read_regular(&mut f, r.path, r.max).map(|_| ())
}

/// What the last live capture saw of one VM, kept in `run_dir` (tmpfs,
/// root's): the generation that holds the state, when it last verified,
/// and the identity of every source file read for it. While every source
/// keeps its identity, a pass reads nothing and writes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    pub generation: String,
    pub verified_unix: i64,
    /// (source path, identity), sorted by path.
    pub files: Vec<(String, Identity)>,
}

/// A generation is verified again after this long, so that one damaged
/// since does not pass for a copy for longer.
pub const RECHECK_SECS: i64 = 3600;

fn seen_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("seen")
}

impl Seen {
    /// The record for `uuid`, if there is a readable one.
    pub fn load(run_dir: &Path, uuid: &str) -> Option<Seen> {
        let path = seen_dir(run_dir).join(format!("{uuid}.json"));
        let mut f = fsutil::open_if_exists(&path, false).ok()??;
        let d = fsutil::read_regular(&mut f, &path, 1 << 20).ok()?;
        serde_json::from_slice(&d.bytes).ok()
    }

    /// Still true of `generation` and the sources as they are `now`?
    pub fn holds(&self, generation: &str, now_files: &[(String, Identity)], now: i64) -> bool {
        self.generation == generation
            && now - self.verified_unix < RECHECK_SECS
            && now >= self.verified_unix
            && self.files == now_files
    }

    /// Replace the record for `uuid` (a temporary, then a rename).
    pub fn save(&self, run_dir: &Path, uuid: &str) -> Result<()> {
        fsutil::ensure_dir(run_dir, 0o755)?;
        fsutil::ensure_dir(&seen_dir(run_dir), 0o700)?;
        let bytes = serde_json::to_vec(self).expect("serializes");
        let tmp = format!(".{uuid}.json.{}", std::process::id());
        // Synced like every write, though on tmpfs: tests/durability.rs.
        Dir::open(&seen_dir(run_dir))?.replace(&format!("{uuid}.json"), &tmp, &bytes, 0o600)
    }
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
            identity: None,
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
    fn a_quiet_file_is_read_once_and_a_recently_written_one_the_patient_way() {
        let p = std::env::temp_dir().join(format!("swk-quiet-{}", std::process::id()));
        std::fs::write(&p, b"state").unwrap();
        let r = FileRead {
            path: &p,
            max: 1 << 20,
            patience: QUICK,
            must_exist: true,
            replaced_whole: false,
        };
        let ok = |_: &[u8]| Ok::<(), String>(());
        let mut f = File::open(&p).unwrap();
        assert!(read_quiet(&mut f, &r, &ok).is_none(), "written just now");
        let old = std::time::SystemTime::now() - Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(old)
            .unwrap();
        // ctime moved with the mtime change: only mtime and ctime both old count.
        let mut f = File::open(&p).unwrap();
        assert!(read_quiet(&mut f, &r, &ok).is_none(), "its ctime is new");
        // Left alone long enough (the condition, not the proof): one read.
        std::thread::sleep(QUIET + Duration::from_millis(1100));
        let mut f = File::open(&p).unwrap();
        let (d, ()) = read_quiet(&mut f, &r, &ok).expect("a quiet file");
        assert_eq!(d.bytes, b"state");
        let bad = |_: &[u8]| Err::<(), String>("header".into());
        let mut f = File::open(&p).unwrap();
        assert!(
            read_quiet(&mut f, &r, &bad).is_none(),
            "a failed check reads again"
        );
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn a_file_replaced_only_by_renames_is_read_once_even_just_written() {
        let p = std::env::temp_dir().join(format!("swk-renamed-{}", std::process::id()));
        std::fs::write(&p, b"state").unwrap();
        let mut r = FileRead {
            path: &p,
            max: 1 << 20,
            patience: QUICK,
            must_exist: true,
            replaced_whole: true,
        };
        let ok = |_: &[u8]| Ok::<(), String>(());
        let mut f = File::open(&p).unwrap();
        let running = Reading::Live { paused: false };
        assert_eq!(
            read_once(running, &mut f, &r, &ok).unwrap().0.bytes,
            b"state"
        );
        // Written in place (swtpm's backup mode): just written is not enough.
        r.replaced_whole = false;
        let mut f = File::open(&p).unwrap();
        assert!(read_once(running, &mut f, &r, &ok).is_none());
        // Paused, nothing writes: one read, just written or not.
        let paused = Reading::Live { paused: true };
        let mut f = File::open(&p).unwrap();
        assert_eq!(
            read_once(paused, &mut f, &r, &ok).unwrap().0.bytes,
            b"state"
        );
        let bad = |_: &[u8]| Err::<(), String>("header".into());
        let mut f = File::open(&p).unwrap();
        assert!(read_once(paused, &mut f, &r, &bad).is_none(), "read again");
        std::fs::remove_file(&p).unwrap();
    }
}

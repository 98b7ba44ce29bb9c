//! A corrupt local state at `prepare`: libvirt's TPM state file exists but
//! swtpm cannot use it (0 bytes or cut short after a host crash, swtpm
//! issue 985; or failing its header rules), so `virsh start` would fail
//! with "CMD_INIT: 0x101". Judged here with swtpm's own rules
//! (`swtpm::check_file`, `check_linear`); `putback::at_prepare` keeps it
//! as evidence and puts the newest good generation in its place. A state
//! that passes the checks, or that cannot be judged, is never touched.

use std::path::{Path, PathBuf};

use crate::domain::TpmVersion;
use crate::error::Result;
use crate::evidence::{Exhibit, ExhibitInfo};
use crate::fsutil::{self, Dir};
use crate::manifest;
use crate::swtpm::{self, StateLocation};

/// What is at libvirt's path.
pub enum Judged {
    Absent,
    /// There, and left as it is: it passes the checks, or cannot be judged.
    Present(String),
    Corrupt(Corrupt),
}

/// A state that fails swtpm's checks, read for the evidence.
pub struct Corrupt {
    pub path: PathBuf,
    /// What is wrong, for the log: "tpm2-00.permall: the file is empty".
    pub why: String,
    pub exhibits: Vec<Exhibit>,
}

/// Which of swtpm's rules a file must pass.
#[derive(Clone, Copy)]
pub enum Rule {
    /// A blob in a state directory, judged by its name (`swtpm::check_file`).
    Blob(TpmVersion),
    Linear,
}

impl Rule {
    fn check(self, name: &str, bytes: &[u8]) -> std::result::Result<(), String> {
        match self {
            Rule::Blob(version) => swtpm::check_file(version, name, bytes).map(|_| ()),
            Rule::Linear => swtpm::check_linear(bytes),
        }
    }

    /// The rule for the file that decides "is there a usable state".
    pub fn for_state(loc: &StateLocation, version: TpmVersion) -> Rule {
        match loc {
            StateLocation::File(_) => Rule::Linear,
            StateLocation::Dir(_) => Rule::Blob(version),
        }
    }
}

/// Read `name` in `dir`: a regular file of at most `max` bytes.
fn read(dir: &Dir, name: &str, max: u64) -> Result<Vec<u8>> {
    let path = dir.path().join(name);
    let mut f = dir.open_file(name)?;
    Ok(fsutil::read_regular(&mut f, &path, max)?.bytes)
}

/// Does the file that decides still fail the checks? Ok: it does (or it is
/// gone), so it may be replaced. Err: why it must stay. Called right before
/// and right after a restore swaps it out, through the directory handle
/// the swap uses: `tss` can write there meanwhile.
pub fn recheck(dir: &Dir, name: &str, rule: Rule, max: u64) -> std::result::Result<(), String> {
    match dir.entry_stat(name) {
        Ok(None) => return Ok(()),
        Ok(Some(_)) => {}
        Err(e) => return Err(e.to_string()),
    }
    let bytes = read(dir, name, max).map_err(|e| format!("cannot be judged ({e})"))?;
    match rule.check(name, &bytes) {
        Ok(()) => Err("passes swtpm's checks".into()),
        Err(_) => Ok(()),
    }
}

/// Judge the state at `loc`. Only its deciding file (the permall, or the
/// linear file) decides; for the evidence every state file is read, within
/// `max` bytes each and `budget` bytes in all.
pub fn judge(loc: &StateLocation, version: TpmVersion, max: u64, budget: u64) -> Result<Judged> {
    let Some((dir_path, name)) = deciding_file(loc, version) else {
        let why = format!("{} is not a file path", loc.path().display());
        return Ok(Judged::Present(why));
    };
    let Some(dir) = Dir::open_if_exists(dir_path)? else {
        return Ok(Judged::Absent);
    };
    let Some(st) = dir.entry_stat(&name)? else {
        return Ok(Judged::Absent);
    };
    let path = dir_path.join(&name);
    let left = |why: String| {
        Ok(Judged::Present(format!(
            "{}: {why}; left as it is",
            path.display()
        )))
    };
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return left("libvirt's TPM state exists and is not a regular file".into());
    }
    if let StateLocation::Dir(_) = loc {
        if let Some(pid) = swtpm_holds(&dir)? {
            return left(format!("swtpm (pid {pid}) is running on it"));
        }
    }
    let bytes = match read(&dir, &name, max) {
        Ok(b) => b,
        Err(e) => {
            return left(format!(
                "libvirt's TPM state exists and cannot be judged ({e})"
            ))
        }
    };
    let why = match Rule::for_state(loc, version).check(&name, &bytes) {
        Ok(()) => return left("libvirt's TPM state exists and passes swtpm's checks".into()),
        Err(why) => why,
    };
    // A `<source type='file'>` may name any path: only a file that is
    // swtpm's (empty, as a crash leaves it, or with its magic) is judged
    // corrupt; anything else is some other file, never replaced.
    if matches!(loc, StateLocation::File(_))
        && !bytes.is_empty()
        && !bytes.starts_with(&swtpm::LINEAR_MAGIC)
    {
        return left(format!("it is not a swtpm state file ({why})"));
    }
    let exhibits = match loc {
        StateLocation::File(f) => vec![exhibit(
            swtpm::FILE_STATE_NAME,
            f,
            Ok(bytes),
            Some(why.clone()),
            budget,
        )],
        StateLocation::Dir(_) => collect_dir(&dir, version, (&name, bytes), max, budget)?,
    };
    Ok(Judged::Corrupt(Corrupt::new(loc.path(), exhibits)))
}

/// The directory and name of the file that decides whether a state is
/// there: the permall, or the linear file.
fn deciding_file(loc: &StateLocation, version: TpmVersion) -> Option<(&Path, String)> {
    match loc {
        StateLocation::Dir(d) => Some((d.as_path(), swtpm::permall_name(version))),
        StateLocation::File(f) => Some((f.parent()?, f.file_name()?.to_str()?.to_owned())),
    }
}

impl Corrupt {
    fn new(path: &Path, exhibits: Vec<Exhibit>) -> Corrupt {
        let why = exhibits
            .iter()
            .filter_map(|x| {
                let w = x.info.corrupt.as_ref()?;
                Some(format!("{}: {w}", x.info.name))
            })
            .collect::<Vec<_>>()
            .join("; ");
        Corrupt {
            path: path.to_owned(),
            why,
            exhibits,
        }
    }
}

/// A running swtpm's pid, from its fcntl lock on `.lock`.
fn swtpm_holds(dir: &Dir) -> Result<Option<i32>> {
    let f = match dir.open_file(swtpm::LOCK_FILE) {
        Ok(f) => f,
        Err(e) if e.io_kind() == Some(std::io::ErrorKind::NotFound) => return Ok(None),
        Err(e) => return Err(e),
    };
    swtpm::fcntl_lock_holder(&f)
        .map_err(|e| crate::error::Error::io("query lock", &dir.path().join(swtpm::LOCK_FILE), e))
}

/// Every swtpm state file in the directory, the deciding one (`first`,
/// already read) among them, each judged by its own rule.
fn collect_dir(
    dir: &Dir,
    version: TpmVersion,
    first: (&str, Vec<u8>),
    max: u64,
    mut budget: u64,
) -> Result<Vec<Exhibit>> {
    let mut names: Vec<String> = dir
        .names()?
        .into_iter()
        .filter(|n| swtpm::is_state_file(version, n.as_ref()))
        .collect();
    names.sort();
    let mut first = Some(first);
    let mut out = Vec::new();
    for n in names {
        let bytes = match first.take_if(|(f, _)| *f == n) {
            Some((_, b)) => Ok(b),
            None => read(dir, &n, max).map_err(|e| e.to_string()),
        };
        let corrupt = bytes
            .as_ref()
            .ok()
            .and_then(|b| Rule::Blob(version).check(&n, b).err());
        let x = exhibit(&n, &dir.path().join(&n), bytes, corrupt, budget);
        budget -= x.bytes.as_ref().map_or(0, |b| b.len() as u64);
        out.push(x);
    }
    Ok(out)
}

/// One file for the evidence: copied if it was read and fits in `budget`,
/// else only described.
fn exhibit(
    name: &str,
    source: &Path,
    bytes: std::result::Result<Vec<u8>, String>,
    corrupt: Option<String>,
    budget: u64,
) -> Exhibit {
    let size = std::fs::symlink_metadata(source).map_or(0, |m| m.len());
    let (bytes, not_kept) = match bytes {
        Ok(b) if b.len() as u64 <= budget => (Some(b), None),
        Ok(b) => {
            let why = format!(
                "{} bytes would take the evidence over max_generation_size",
                b.len()
            );
            (None, Some(why))
        }
        Err(e) => (None, Some(e)),
    };
    Exhibit {
        info: ExhibitInfo {
            name: name.to_owned(),
            source: source.display().to_string(),
            size: bytes.as_ref().map_or(size, |b| b.len() as u64),
            sha256: bytes.as_ref().map(|b| manifest::sha256_hex(b)),
            corrupt,
            not_kept,
        },
        bytes,
    }
}

/// Keep the corrupt state in the VM's store (see `evidence`), before
/// anything replaces it. Returns the evidence directory.
pub fn keep(
    vm: &crate::store::VmStore,
    domain: &crate::domain::Domain,
    loc: &StateLocation,
    c: &Corrupt,
    replaced_by: &str,
) -> Result<PathBuf> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let record = crate::evidence::Record {
        format: 1,
        uuid: domain.uuid.to_string(),
        name: domain.name.clone(),
        event: "prepare".into(),
        time: manifest::rfc3339(now),
        time_unix: now,
        host: crate::users::host_name(),
        swtpm_keeper_version: env!("CARGO_PKG_VERSION").into(),
        state_type: loc.kind().into(),
        state_path: loc.path().display().to_string(),
        replaced_by: replaced_by.to_owned(),
        files: c.exhibits.iter().map(|x| x.info.clone()).collect(),
    };
    let name = vm.keep_evidence(&record, &c.exhibits)?;
    Ok(vm.dir().join(name))
}

//! Putting a state back: the newest good generation goes back where
//! libvirt looks for a VM's TPM state (and its UEFI vars), before swtpm
//! starts, when libvirt's copy is gone, so that the guest boots with the
//! same TPM. The hook does it at `prepare` (`at_prepare`), the `restore`
//! command through `put_back`.
//!
//! What is written goes first into a new directory (or temp file) inside
//! the destination's parent, owned and fsynced, then is renamed into place:
//! libvirt's path is either untouched or complete. The hook replaces an
//! existing state only when it fails swtpm's checks (see `mend`), after
//! keeping it as evidence; a state that passes them is never replaced.

use std::path::{Path, PathBuf};

use crate::config::{Config, RestoreAtPrepare};
use crate::domain::{Domain, Tpm, TpmVersion};
use crate::error::{Error, Result};
use crate::failpoint;
use crate::fsutil::{Dir, Rename};
use crate::manifest::{self, Manifest, Role};
use crate::marks;
use crate::mend::{self, Corrupt, Judged, Rule};
use crate::qemuconf::{Owner, QemuConf};
use crate::store::{Loaded, Store, VmStore};
use crate::swtpm::{self, StateLocation};

const TMP_PREFIX: &str = ".swtpm-keeper-";

#[derive(Debug)]
pub enum Outcome {
    Restored {
        generation: String,
        manifest: Box<Manifest>,
        path: PathBuf,
        nvram: NvramOutcome,
        /// Newer generations skipped because they failed verification.
        skipped: Vec<(String, String)>,
        /// Set when it replaced a corrupt state, kept as evidence.
        mended: Option<Mended>,
    },
    /// Nothing to do, and why (at debug level).
    Nothing(String),
    /// The state arrives in a migration stream or a save image, as
    /// `migrate begin`/`restore begin` noted `age_secs` ago.
    Incoming { event: String, age_secs: i64 },
}

#[derive(Debug, PartialEq, Eq)]
pub enum NvramOutcome {
    Restored(PathBuf),
    KeptExisting(PathBuf),
    /// The domain has no <nvram>, or the generation holds none.
    None,
}

/// A corrupt state that a restore replaced: what was wrong, and where the
/// store keeps it.
#[derive(Debug)]
pub struct Mended {
    pub why: String,
    pub evidence: PathBuf,
}

/// Is libvirt's state for this TPM there, and usable? Ok(None): it is
/// gone. Ok(Some): it fails swtpm's checks. Err: it is there (or cannot be
/// judged) and stays as it is, and why.
fn judge_state(
    cfg: &Config,
    domain: &Domain,
    loc: &StateLocation,
    tpm: &Tpm,
) -> std::result::Result<Option<Corrupt>, String> {
    match mend::judge(
        loc,
        tpm.version,
        cfg.max_file_size,
        cfg.max_generation_size(),
    ) {
        Ok(Judged::Absent) => Ok(None),
        Ok(Judged::Corrupt(c)) => Ok(Some(c)),
        Ok(Judged::Present(why)) => Err(why),
        // Not judged (a link planted on the way, say): anything at the
        // path stays, and a lost state meets the restore's own checks.
        Err(e) => {
            let at = match loc {
                StateLocation::Dir(d) => d.join(swtpm::permall_name(tpm.version)),
                StateLocation::File(f) => f.clone(),
            };
            if std::fs::symlink_metadata(&at).is_err() {
                return Ok(None);
            }
            log::warn!(
                "vm={} uuid={}: cannot judge libvirt's TPM state: {e}; left as it is",
                domain.name,
                domain.uuid
            );
            Err(e.to_string())
        }
    }
}

/// A refusal about a start whose state is corrupt says so: the corrupt
/// state stays in place, and the VM will not start with it.
fn says_corrupt(corrupt: Option<&Corrupt>, r: Error) -> Error {
    match corrupt {
        Some(c) => r.context(format_args!(
            "libvirt's TPM state at {} is corrupt ({}) and stays as it is",
            c.path.display(),
            c.why
        )),
        None => r,
    }
}

fn io_refusal(e: Error) -> Error {
    Error::refused(
        e.to_string(),
        "fix the cause and start the VM again; the stored states are untouched",
    )
}

/// The hook's restore at `prepare begin`.
pub fn at_prepare(cfg: &Config, domain: &Domain, tpm: &Tpm) -> Result<Outcome> {
    if cfg.restore == RestoreAtPrepare::Off {
        return Ok(Outcome::Nothing("restore = \"off\"".into()));
    }
    let store = Store::new(&cfg.store_dir);
    if !store.vm_dir(&domain.uuid).is_dir() {
        return Ok(Outcome::Nothing(
            "the store holds nothing for this VM".into(),
        ));
    }
    let vm = store
        .open_vm(&domain.uuid, cfg.lock_timeout())
        .map_err(io_refusal)?;
    if let Some((event, age_secs)) = marks::take_incoming(&vm, domain).map_err(io_refusal)? {
        return Ok(Outcome::Incoming { event, age_secs });
    }
    let loc = StateLocation::of(&cfg.swtpm_dir, domain, tpm);
    if let Err(e) = remove_leftovers(&vm, &loc) {
        log::warn!("vm={} uuid={}: {e}", domain.name, domain.uuid);
    }
    let corrupt = match judge_state(cfg, domain, &loc, tpm) {
        Ok(c) => c,
        Err(why) => return Ok(Outcome::Nothing(why)),
    };
    let gens = vm.generations().map_err(io_refusal)?;
    if gens.is_empty() {
        if let Some(c) = &corrupt {
            log::warn!(
                "vm={} uuid={}: libvirt's TPM state at {} is corrupt ({}), and the store holds no \
                 generation to put in its place: left as it is",
                domain.name,
                domain.uuid,
                c.path.display(),
                c.why
            );
        }
        return Ok(Outcome::Nothing(
            "the store holds no generation for this VM".into(),
        ));
    }
    let refused = |r| says_corrupt(corrupt.as_ref(), r);
    let (gen, skipped) = newest_good(&vm, &gens, cfg.max_file_size).map_err(refused)?;
    check_rules(&vm, &gen, domain, tpm, &loc).map_err(refused)?;
    let replace = Replace {
        if_corrupt: corrupt.as_ref().map(|_| cfg.max_file_size),
        ..Replace::default()
    };
    let checked =
        check_put_back(&vm, &gen, domain, &loc, replace).map_err(|e| refused(io_refusal(e)))?;
    // Every check passed: keep the corrupt state, then replace it.
    let mended = match &corrupt {
        Some(c) => Some(Mended {
            why: c.why.clone(),
            evidence: mend::keep(&vm, domain, &loc, c, &gen.name)
                .map_err(|e| refused(evidence_refusal(e)))?,
        }),
        None => None,
    };
    failpoint::hit("mend-after-evidence");
    let qc = QemuConf::load(&cfg.qemu_conf);
    let nvram = checked
        .write(&qc.swtpm_owner(), &qc.qemu_owner())
        .map_err(|e| refused(io_refusal(e)))?;
    Ok(Outcome::Restored {
        generation: gen.name.clone(),
        path: loc.path().to_owned(),
        manifest: Box::new(gen.manifest),
        nvram,
        skipped,
        mended,
    })
}

fn evidence_refusal(e: Error) -> Error {
    Error::refused(
        format!("cannot keep it in the store as evidence: {e}"),
        "free space in the store and start the VM again (or move the corrupt state aside by \
              hand: then it counts as lost, and the newest good generation is put back)",
    )
}

/// The newest generation that verifies, and the newer ones that did not.
pub fn newest_good(
    vm: &VmStore,
    gens: &[String],
    max: u64,
) -> Result<(Loaded, Vec<(String, String)>)> {
    let mut skipped = Vec::new();
    for g in gens.iter().rev() {
        match vm.load_verified(g, max) {
            Ok(l) => return Ok((l, skipped)),
            Err(why) => skipped.push((g.clone(), why.to_string())),
        }
    }
    let list: Vec<String> = skipped.iter().map(|(g, w)| format!("{g}: {w}")).collect();
    Err(Error::refused(
        format!(
            "no stored generation passes verification ({})",
            list.join("; ")
        ),
        format!(
            "inspect them with `swtpm-keeper verify {}` (in {})",
            vm.dir()
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            vm.dir().display()
        ),
    ))
}

/// The rules that make a stored state wrong for this start.
pub fn check_rules(
    vm: &VmStore,
    gen: &Loaded,
    domain: &Domain,
    tpm: &Tpm,
    loc: &StateLocation,
) -> Result<()> {
    let migrated_at = marks::migrated_away(vm, &gen.name);
    check_rules_marked(migrated_at.is_some(), gen, domain, tpm, loc)
}

/// `check_rules`, told whether the store marks `gen` as taken when the VM
/// migrated away (`import` asks before the store has the VM).
pub fn check_rules_marked(
    marked_migrated: bool,
    gen: &Loaded,
    domain: &Domain,
    tpm: &Tpm,
    loc: &StateLocation,
) -> Result<()> {
    let m = &gen.manifest;
    let which = format!(
        "generation {} (captured {} on {} {})",
        gen.name,
        m.time,
        m.host,
        m.taken()
    );
    let force = format!(
        "if this state is the right one, put it back with `swtpm-keeper restore {} --generation {} --force` and start again",
        domain.uuid, gen.name
    );
    if m.reason == "migrated" || marked_migrated {
        return Err(Error::refused(format!("{which} was taken when the VM migrated to another host: its TPM lives on there and this copy is stale"), force));
    }
    if m.tpm.version != tpm.version {
        return Err(Error::refused(
            format!(
                "{which} is a TPM {} state but the domain now has a TPM {}",
                m.tpm.version, tpm.version
            ),
            force,
        ));
    }
    if m.tpm.encryption_secret != tpm.encryption_secret {
        let show = |s: &Option<String>| s.clone().unwrap_or_else(|| "none".into());
        return Err(Error::refused(format!(
                "{which} is encrypted with libvirt secret {} but the domain now uses {}: swtpm could not open it",
                show(&m.tpm.encryption_secret),
                show(&tpm.encryption_secret)
            ), format!(
                "define secret {} again with its old value (virsh secret-define, secret-set-value) and point <encryption secret=...> at it",
                show(&m.tpm.encryption_secret)
            )));
    }
    if m.tpm.state_type != loc.kind() {
        return Err(Error::refused(
            format!(
                "{which} holds a '{}' state but the domain keeps a '{}' state",
                m.tpm.state_type,
                loc.kind()
            ),
            force,
        ));
    }
    if let Some(why) = other_uefi_store(domain, m) {
        return Err(Error::refused(format!("{which} {why}"), force));
    }
    Ok(())
}

/// Why the generation's UEFI variable store cannot go where the domain
/// keeps its own now (another kind, another format, no file at all), if
/// it cannot: its bytes would be no store the firmware can read there.
fn other_uefi_store(domain: &Domain, m: &Manifest) -> Option<String> {
    let kept = m.nvram.as_ref().filter(|n| n.file.is_some())?;
    if let Some(not_file) = &domain.nvram_not_copied {
        return Some(format!(
            "holds the {} as a file, but the domain now keeps it on a {not_file}",
            kept.kind.label()
        ));
    }
    domain.nvram.as_ref()?;
    if kept.kind != domain.nvram_kind {
        return Some(format!(
            "holds a {} ({}), but the domain now has a {}",
            kept.kind.label(),
            kept.path,
            domain.nvram_kind.label()
        ));
    }
    match (&kept.format, &domain.nvram_format) {
        (Some(was), Some(now)) if was != now => Some(format!(
            "holds a {was} NVRAM, but the domain's is {now} now"
        )),
        _ => None,
    }
}

/// What `put_back` may swap out. Only what was captured first (the CLI's
/// --force) may be replaced; the hook replaces only a corrupt state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Replace {
    pub state: bool,
    pub nvram: bool,
    /// `Some(max_file_size)`: a TPM state that fails swtpm's checks may be
    /// swapped out (the hook's mend, after keeping it as evidence). It is
    /// judged again right before the swap and right after it, through the
    /// directory handle of the swap: if it passes them then, it stays.
    pub if_corrupt: Option<u64>,
}

/// Write the generation into libvirt's paths. Everything is checked before
/// anything is written, so that a refusal leaves no half of the pair. Then
/// the NVRAM goes first (a crash between leaves an NVRAM that the next
/// start completes with its TPM), then the TPM state; if writing that
/// fails, the NVRAM placed for it is taken back out.
///
/// `locked` is the proof that this VM's store lock is held: a temporary of
/// this destination is then one of a run that is over, and may be removed.
pub fn put_back(
    locked: &VmStore,
    gen: &Loaded,
    domain: &Domain,
    loc: &StateLocation,
    swtpm_owner: &Owner,
    qemu_owner: &Owner,
    replace: Replace,
) -> Result<NvramOutcome> {
    check_put_back(locked, gen, domain, loc, replace)?.write(swtpm_owner, qemu_owner)
}

/// A restore checked and ready: nothing is written yet.
pub struct Checked<'a> {
    tpm: TpmTarget,
    tpm_files: Vec<(&'a str, &'a [u8])>,
    nvram: Option<(FileTarget, &'a [u8])>,
}

/// `put_back`'s checks alone, so that a caller can act between them and
/// the writing (the hook keeps a corrupt state as evidence there).
pub fn check_put_back<'a>(
    _locked: &VmStore,
    gen: &'a Loaded,
    domain: &Domain,
    loc: &StateLocation,
    replace: Replace,
) -> Result<Checked<'a>> {
    // Only swtpm's own names go back: a generation of 0.1.0 may hold a
    // file that `tss` planted under a swtpm-like name.
    let version = gen.manifest.tpm.version;
    let swtpms = |n: &str| n == swtpm::FILE_STATE_NAME || swtpm::is_state_file(version, n.as_ref());
    let tpm_files: Vec<(&str, &[u8])> = gen
        .manifest
        .files
        .iter()
        .filter(|f| f.role == Role::Tpm && swtpms(&f.name))
        .filter_map(|f| gen.file(&f.name).map(|b| (f.name.as_str(), b)))
        .collect();
    if tpm_files.is_empty() {
        return Err(Error::failed(format!(
            "generation {} holds no TPM state file",
            gen.name
        )));
    }
    let tpm = TpmTarget::check(loc, version, replace)?;
    let nvram = match (nvram_path(domain, &gen.manifest), gen.file(manifest::NVRAM)) {
        (Some(path), Some(bytes)) => Some((FileTarget::check(path, true, replace.nvram)?, bytes)),
        _ => None,
    };
    Ok(Checked {
        tpm,
        tpm_files,
        nvram,
    })
}

impl Checked<'_> {
    pub fn write(self, swtpm_owner: &Owner, qemu_owner: &Owner) -> Result<NvramOutcome> {
        let Checked {
            tpm,
            tpm_files,
            nvram,
        } = self;
        let (outcome, placed) = match nvram {
            Some((t, _)) if !t.will_write() => (NvramOutcome::KeptExisting(t.path), None),
            Some((t, bytes)) => {
                let path = t.path.clone();
                match t.write(bytes, qemu_owner)? {
                    Some(p) => (NvramOutcome::Restored(path), Some(p)),
                    None => (NvramOutcome::KeptExisting(path), None),
                }
            }
            None => (NvramOutcome::None, None),
        };
        failpoint::hit("restore-after-nvram");
        let Err(e) = tpm.write(&tpm_files, swtpm_owner) else {
            if let Some(p) = placed {
                p.keep();
            }
            return Ok(outcome);
        };
        match placed.map(Placed::undo) {
            Some(Err(u)) => Err(Error::failed(format!(
                "{e}; and the NVRAM written for it could not be undone ({u}): it is not the pair of the TPM \
                 state there, move it aside before starting the VM"
            ))),
            _ => Err(e),
        }
    }
}

/// Where libvirt will look for the NVRAM file. The domain XML names it,
/// except at `prepare` of a VM with firmware auto-selection on libvirt 9.0,
/// which resolves it later as `<nvram dir>/<name>_VARS.fd`: then use the
/// directory recorded at capture and the VM's current name.
pub fn nvram_path(domain: &Domain, m: &Manifest) -> Option<PathBuf> {
    if let Some(p) = &domain.nvram {
        return Some(p.clone());
    }
    // A block device or a network image: never written to.
    if domain.nvram_not_copied.is_some() {
        return None;
    }
    if domain.firmware.as_deref() != Some("efi") {
        return None;
    }
    let recorded = PathBuf::from(&m.nvram.as_ref()?.path);
    let file = recorded.file_name()?.to_str()?;
    let renamed = match file.strip_prefix(m.name.as_str()) {
        Some(rest) if rest.starts_with("_VARS") => format!("{}{rest}", domain.name),
        _ => file.to_owned(),
    };
    Some(recorded.with_file_name(renamed))
}

/// Is this entry of a state directory swtpm's own? One of its names
/// (`swtpm::is_swtpm_name`), as a regular file: a subdirectory or a link
/// under such a name is someone else's.
fn swtpm_owned(name: &str, st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFREG && swtpm::is_swtpm_name(name)
}

/// What a restore writes beside a destination before renaming it into
/// place: a directory, or a file.
#[derive(Clone, Copy)]
enum TempKind {
    Dir,
    File,
}

/// The temporary this run writes `leaf` through. Named for its
/// destination: in a parent that several VMs share (`<source type='dir'
/// path='/srv/tpm/<vm>'/>`) each run then knows which temporaries are its
/// own VM's.
fn temp_name(leaf: &str, kind: TempKind) -> String {
    let pid = std::process::id();
    match kind {
        TempKind::Dir => format!("{TMP_PREFIX}{leaf}-restore-{pid}"),
        TempKind::File => format!(".{leaf}{TMP_PREFIX}{pid}"),
    }
}

/// Is `name` a temporary of a restore into `leaf` (by any run; the
/// emulated exchange of `Dir::rename` adds `.aside`)? The pid must be all
/// that follows the leaf's prefix, so that no leaf's temporaries match
/// another's (`vm` and `vm-2`, or `a` and `a.swtpm-keeper-1`).
fn is_temp_of(name: &str, leaf: &str, kind: TempKind) -> bool {
    let prefix = match kind {
        TempKind::Dir => format!("{TMP_PREFIX}{leaf}-restore-"),
        TempKind::File => format!(".{leaf}{TMP_PREFIX}"),
    };
    let Some(rest) = name.strip_prefix(&prefix) else {
        return false;
    };
    let pid = rest.strip_suffix(".aside").unwrap_or(rest);
    !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())
}

/// Remove what interrupted restores into `leaf` left in `dir`. Only the
/// caller's own VM's: it holds that VM's lock, so their runs are over.
/// Every one is tried; the first failure is returned (a leftover only
/// takes space: callers log it and go on).
fn remove_own_temps(dir: &Dir, leaf: &str, kind: TempKind) -> Result<()> {
    let mut first_err = None;
    let mut removed = false;
    for n in dir.names()? {
        if is_temp_of(&n, leaf, kind) {
            match dir.remove_entry(&n) {
                Ok(()) => removed = true,
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
    }
    if removed {
        dir.sync()?;
    }
    first_err.map_or(Ok(()), Err)
}

/// At `prepare`, under this VM's lock (`_locked`): remove what an
/// interrupted restore of this VM left beside libvirt's path. For a
/// directory, only in a parent that root alone can write: elsewhere a name
/// is no proof that it is ours.
fn remove_leftovers(_locked: &VmStore, loc: &StateLocation) -> Result<()> {
    let (parent, leaf) = split(loc.path())?;
    let Some(dir) = Dir::open_if_exists(parent)? else {
        return Ok(());
    };
    match loc {
        StateLocation::Dir(_) if !dir.is_trusted()? => Ok(()),
        StateLocation::Dir(_) => remove_own_temps(&dir, leaf, TempKind::Dir),
        StateLocation::File(_) => remove_own_temps(&dir, leaf, TempKind::File),
    }
}

fn split(path: &Path) -> Result<(&Path, &str)> {
    match (path.parent(), path.file_name().and_then(|n| n.to_str())) {
        (Some(p), Some(n)) => Ok((p, n)),
        _ => Err(Error::failed(format!(
            "{} has no parent directory",
            path.display()
        ))),
    }
}

/// A destination's directory: open, or missing and to be created in its
/// own (existing) parent as libvirt would. Nothing is created until
/// `open_or_create`, after every check.
enum Parent {
    Open(Dir),
    Missing { grand: Dir, name: String },
}

impl Parent {
    fn check(path: &Path) -> Result<Parent> {
        if let Some(d) = Dir::open_if_exists(path)? {
            return Ok(Parent::Open(d));
        }
        let (grand, name) = split(path)?;
        Ok(Parent::Missing {
            grand: Dir::open(grand)?,
            name: name.to_owned(),
        })
    }

    fn existing(&self) -> Option<&Dir> {
        match self {
            Parent::Open(d) => Some(d),
            Parent::Missing { .. } => None,
        }
    }

    /// The directory, created now if missing (`mode`, owned by `owner`).
    fn open_or_create(self, mode: u32, owner: Option<(u32, u32)>) -> Result<Dir> {
        match self {
            Parent::Open(d) => Ok(d),
            Parent::Missing { grand, name } => {
                let d = grand.mkdir(&name, mode)?;
                d.chown_chmod(owner, mode)?;
                grand.sync()?;
                Ok(d)
            }
        }
    }
}

/// Where the TPM state goes, checked.
enum TpmTarget {
    Dir(DirTarget),
    File(FileTarget),
}

impl TpmTarget {
    fn check(loc: &StateLocation, version: TpmVersion, replace: Replace) -> Result<TpmTarget> {
        match loc {
            StateLocation::Dir(d) => Ok(TpmTarget::Dir(DirTarget::check(d, version, replace)?)),
            StateLocation::File(f) => {
                let mut t = FileTarget::check(f.clone(), false, replace.state)?;
                t.if_corrupt = replace.if_corrupt;
                if !t.will_write() {
                    return Err(Error::failed(format!(
                        "{} exists; left as it is",
                        f.display()
                    )));
                }
                Ok(TpmTarget::File(t))
            }
        }
    }

    fn write(self, files: &[(&str, &[u8])], owner: &Owner) -> Result<()> {
        match self {
            TpmTarget::Dir(t) => t.write(files, owner),
            TpmTarget::File(t) => {
                let path = t.path.clone();
                let bytes = files
                    .first()
                    .map(|(_, b)| *b)
                    .ok_or_else(|| Error::failed("the generation has no state file"))?;
                match t.write(bytes, owner)? {
                    Some(placed) => {
                        placed.keep();
                        Ok(())
                    }
                    None => Err(Error::failed(format!(
                        "{} appeared while restoring; left as it is",
                        path.display()
                    ))),
                }
            }
        }
    }
}

/// A file to create (or, with `replace`, to replace), checked.
struct FileTarget {
    path: PathBuf,
    name: String,
    dir: Parent,
    exists: bool,
    replace: bool,
    /// `Replace::if_corrupt`, for a linear state file.
    if_corrupt: Option<u64>,
}

impl FileTarget {
    /// `create_parent`: its directory may be missing (libvirt's NVRAM dir).
    fn check(path: PathBuf, create_parent: bool, replace: bool) -> Result<FileTarget> {
        let (parent, name) = split(&path)?;
        let name = name.to_owned();
        let dir = if create_parent {
            Parent::check(parent)?
        } else {
            Parent::Open(Dir::open(parent)?)
        };
        let st = match dir.existing() {
            Some(d) => d.entry_stat(&name)?,
            None => None,
        };
        if replace && st.as_ref().is_some_and(Dir::entry_is_dir) {
            return Err(Error::failed(format!(
                "{} is a directory; left as it is",
                path.display()
            )));
        }
        Ok(FileTarget {
            exists: st.is_some(),
            path,
            name,
            dir,
            replace,
            if_corrupt: None,
        })
    }

    fn will_write(&self) -> bool {
        !self.exists || self.replace || self.if_corrupt.is_some()
    }

    /// Write through a temporary in the same directory, fsynced, then
    /// renamed: without replacing, or with `replace` exchanged with what is
    /// there (kept until `Placed::keep`). None: something appeared at the
    /// name meanwhile and was left as it is.
    fn write(self, bytes: &[u8], owner: &Owner) -> Result<Option<Placed>> {
        let ids = Some((owner.uid, owner.gid));
        let dir = self.dir.open_or_create(0o755, ids)?;
        if let Err(e) = remove_own_temps(&dir, &self.name, TempKind::File) {
            log::warn!("a leftover of an earlier restore stays: {e}");
        }
        let tmp = temp_name(&self.name, TempKind::File);
        if let Err(e) = dir.write_new(&tmp, bytes, 0o600, ids) {
            let _ = dir.remove_entry(&tmp);
            return Err(e);
        }
        failpoint::hit("restore-file-before-rename");
        let ours = dir.entry_stat(&tmp)?.map(|st| (st.st_dev, st.st_ino));
        let exists = dir.entry_stat(&self.name)?.is_some();
        let swap = (self.replace || self.if_corrupt.is_some()) && exists;
        let guard = self.if_corrupt.filter(|_| swap && !self.replace);
        if let Err(e) = linear_may_go(&self.path, guard, &dir, &self.name) {
            let _ = dir.remove_entry(&tmp);
            return Err(e);
        }
        let how = if swap {
            Rename::Exchange
        } else {
            Rename::NoReplace
        };
        if let Err(e) = dir.rename(&tmp, &self.name, how) {
            let _ = dir.remove_entry(&tmp);
            return match e.io_kind() {
                Some(std::io::ErrorKind::AlreadyExists) => Ok(None),
                _ => Err(e),
            };
        }
        if let Err(e) = linear_may_go(&self.path, guard, &dir, &tmp) {
            // Rewritten meanwhile, and good now: it goes back.
            dir.rename(&tmp, &self.name, Rename::Exchange)?;
            dir.remove_entry(&tmp)?;
            dir.sync()?;
            return Err(e);
        }
        dir.sync()?;
        Ok(Some(Placed {
            dir,
            name: self.name,
            tmp,
            swapped: swap,
            ours,
        }))
    }
}

/// With `guard` (`Replace::if_corrupt`, when a swap without `replace` is
/// due), the linear file at `name` (libvirt's, or what the swap moved out
/// of `path`) must still fail swtpm's checks to be swapped out.
fn linear_may_go(path: &Path, guard: Option<u64>, dir: &Dir, name: &str) -> Result<()> {
    let Some(max) = guard else {
        return Ok(());
    };
    mend::recheck(dir, name, Rule::Linear, max).map_err(|why| {
        Error::failed(format!(
            "{} holds a TPM state that {why}; left as it is",
            path.display()
        ))
    })
}

/// A file renamed into place, until the restore it belongs to is complete.
struct Placed {
    dir: Dir,
    name: String,
    /// Holds what was replaced, when `swapped`.
    tmp: String,
    swapped: bool,
    /// The file we wrote (device, inode).
    ours: Option<(libc::dev_t, libc::ino_t)>,
}

impl Placed {
    /// The restore is complete: drop what the file replaced.
    fn keep(self) {
        if !self.swapped {
            return;
        }
        if let Err(e) = self
            .dir
            .remove_entry(&self.tmp)
            .and_then(|_| self.dir.sync())
        {
            log::warn!(
                "restored {}, but {e}",
                self.dir.path().join(&self.name).display()
            );
        }
    }

    /// The restore failed: put back what was there (nothing, or the file
    /// it replaced). Only if the name still holds the file we wrote.
    fn undo(self) -> Result<()> {
        let now = self.dir.entry_stat(&self.name)?;
        if now.map(|st| (st.st_dev, st.st_ino)) != self.ours || self.ours.is_none() {
            return Ok(());
        }
        if self.swapped {
            self.dir.rename(&self.tmp, &self.name, Rename::Replace)?;
        } else {
            self.dir.remove_entry(&self.name)?;
        }
        self.dir.sync()
    }
}

/// The state directory: built beside `path` in its parent, then renamed
/// into place. The parent must be root's alone (libvirt makes `<uuid>/`
/// root 0711), so nothing in it can be a planted link.
struct DirTarget {
    dest: DirDest,
    parent: Parent,
}

struct DirDest {
    path: PathBuf,
    leaf: String,
    version: TpmVersion,
    permall: String,
    replace: bool,
    /// `Replace::if_corrupt`.
    if_corrupt: Option<u64>,
}

impl DirTarget {
    fn check(path: &Path, version: TpmVersion, replace: Replace) -> Result<DirTarget> {
        let (parent, leaf) = split(path)?;
        let (grand, _) = split(parent)?;
        // libvirt's layout: <swtpm_dir> and <swtpm_dir>/<uuid> are root 0711.
        if !grand.exists() {
            return Err(Error::failed(format!(
                "{} does not exist: is libvirt's swtpm support installed?",
                grand.display()
            )));
        }
        let t = DirTarget {
            dest: DirDest {
                path: path.to_owned(),
                leaf: leaf.to_owned(),
                version,
                permall: swtpm::permall_name(version),
                replace: replace.state,
                if_corrupt: replace.if_corrupt,
            },
            parent: Parent::check(parent)?,
        };
        if let Some(p) = t.parent.existing() {
            if !p.is_trusted()? {
                let st = p.stat()?;
                return Err(Error::failed(format!(
                    "refusing to restore into {}: it is writable by uid {} (mode {:o}), not root alone",
                    parent.display(),
                    st.st_uid,
                    st.st_mode & 0o7777
                )));
            }
            t.dest.check_swappable(p)?;
        }
        Ok(t)
    }

    fn write(self, files: &[(&str, &[u8])], owner: &Owner) -> Result<()> {
        let DirTarget { dest, parent } = self;
        let pdir = parent.open_or_create(0o711, None)?;
        if let Err(e) = remove_own_temps(&pdir, &dest.leaf, TempKind::Dir) {
            log::warn!("a leftover of an earlier restore stays: {e}");
        }
        let tmp = temp_name(&dest.leaf, TempKind::Dir);
        let nd = pdir.mkdir(&tmp, 0o700)?;
        let ids = Some((owner.uid, owner.gid));
        let written = files
            .iter()
            .try_for_each(|(name, bytes)| nd.write_new(name, bytes, 0o600, ids))
            .and_then(|()| {
                failpoint::hit("restore-dir-half-written");
                nd.chown_chmod(ids, 0o700)
            })
            .and_then(|()| nd.sync());
        if let Err(e) = written {
            // Nothing partial stays behind (a full disk is the usual cause).
            let _ = pdir.remove_entry(&tmp);
            return Err(e);
        }
        failpoint::hit("restore-before-rename");
        dest.place(&pdir, &tmp)?;
        pdir.sync()
    }
}

impl DirDest {
    /// What is at the destination may be swapped out: nothing, or a
    /// directory without a TPM state (swtpm_setup never ran, or only
    /// `.lock` is left), or with one that fails swtpm's checks when
    /// `if_corrupt` allows it, that holds nothing but swtpm's files. A
    /// `<source path>` that names some other directory is never swapped
    /// out. Returns the open directory that is there.
    fn check_swappable(&self, pdir: &Dir) -> Result<Option<Dir>> {
        let Some(st) = pdir.entry_stat(&self.leaf)? else {
            return Ok(None);
        };
        if !Dir::entry_is_dir(&st) {
            return Err(Error::failed(format!(
                "{} exists and is not a directory; left as it is",
                self.path.display()
            )));
        }
        let old = pdir.open_subdir(&self.leaf)?;
        self.may_swap_out(&old)?;
        let mut foreign = Vec::new();
        for n in old.names()? {
            match old.entry_stat(&n)? {
                Some(st) if swtpm_owned(&n, &st) => {}
                Some(_) => foreign.push(n),
                None => {}
            }
        }
        if foreign.is_empty() {
            return Ok(Some(old));
        }
        foreign.sort();
        foreign.truncate(5);
        Err(Error::failed(format!(
            "{} holds files that are not swtpm's ({}); refusing to replace it",
            self.path.display(),
            foreign.join(", ")
        )))
    }

    /// The state in the directory `old` (open) may go: there is none, or
    /// `replace`, or it fails swtpm's checks and `if_corrupt` allows that.
    fn may_swap_out(&self, old: &Dir) -> Result<()> {
        if self.replace || old.entry_stat(&self.permall)?.is_none() {
            return Ok(());
        }
        let why = match self.if_corrupt {
            None => "holds a TPM state".to_owned(),
            Some(max) => match mend::recheck(old, &self.permall, Rule::Blob(self.version), max) {
                Ok(()) => return Ok(()),
                Err(why) => format!("holds a TPM state that {why}"),
            },
        };
        Err(Error::failed(format!(
            "{} {why}; left as it is",
            self.path.display()
        )))
    }

    /// Rename the complete directory `tmp` into place: into an empty name,
    /// or exchanged with the directory there, which is then removed with
    /// everything in it (failing that only leaves a leftover for the next
    /// run of this VM).
    fn place(&self, pdir: &Dir, tmp: &str) -> Result<()> {
        // Again, just before: `tss` can write in the old directory.
        let swap = self.check_swappable(pdir).and_then(|old| {
            let how = if old.is_some() {
                Rename::Exchange
            } else {
                Rename::NoReplace
            };
            pdir.rename(tmp, &self.leaf, how).map(|()| old)
        });
        match swap {
            Err(e) => {
                let _ = pdir.remove_entry(tmp);
                Err(e)
            }
            Ok(None) => Ok(()),
            Ok(Some(old)) => {
                // And once more through the same handle, now at `tmp`: a
                // state rewritten between the check and the swap goes back.
                if let Err(e) = self.may_swap_out(&old) {
                    pdir.rename(tmp, &self.leaf, Rename::Exchange)?;
                    pdir.remove_entry(tmp)?;
                    pdir.sync()?;
                    return Err(e);
                }
                pdir.sync()?;
                failpoint::hit("restore-after-exchange");
                if let Err(e) = pdir.remove_entry(tmp) {
                    log::warn!(
                        "restored {}, but could not remove the directory it replaced: {e}",
                        self.path.display()
                    );
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod placement_tests {
    use super::*;

    #[test]
    fn a_temporary_belongs_to_one_destination_only() {
        let pid = std::process::id();
        let dir = temp_name("vm", TempKind::Dir);
        assert_eq!(dir, format!(".swtpm-keeper-vm-restore-{pid}"));
        assert!(is_temp_of(&dir, "vm", TempKind::Dir));
        assert!(is_temp_of(&format!("{dir}.aside"), "vm", TempKind::Dir));
        for other in ["vm-2", "v", "m", "vm-restore-1"] {
            assert!(!is_temp_of(&dir, other, TempKind::Dir), "{other}");
            let theirs = temp_name(other, TempKind::Dir);
            assert!(!is_temp_of(&theirs, "vm", TempKind::Dir), "{theirs}");
        }
        let file = temp_name("a", TempKind::File);
        assert_eq!(file, format!(".a.swtpm-keeper-{pid}"));
        assert!(is_temp_of(&file, "a", TempKind::File));
        assert!(!is_temp_of(&file, "a", TempKind::Dir));
        let theirs = temp_name("a.swtpm-keeper-1", TempKind::File);
        assert!(!is_temp_of(&theirs, "a", TempKind::File), "{theirs}");
        // The unnamed temporaries of 0.1.0 are no VM's: never removed.
        assert!(!is_temp_of(".swtpm-keeper-restore-12", "vm", TempKind::Dir));
        assert!(!is_temp_of(
            ".swtpm-keeper-vm-restore-",
            "vm",
            TempKind::Dir
        ));
    }

    /// `<root>/<uuid>/tpm2` as libvirt lays it out, holding `permall`.
    fn state_dir(test: &str, permall: &[u8]) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let root = std::env::temp_dir().join(format!("swk-unit-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let d = root.join("uuid").join("tpm2");
        std::fs::create_dir_all(&d).unwrap();
        for p in [&root, &root.join("uuid")] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o711)).unwrap();
        }
        std::fs::write(d.join("tpm2-00.permall"), permall).unwrap();
        d
    }

    fn good_permall() -> Vec<u8> {
        std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/libvirt-9.0/tpm2-00.permall.plain"),
        )
        .unwrap()
    }

    const IF_CORRUPT: Replace = Replace {
        state: false,
        nvram: false,
        if_corrupt: Some(1 << 20),
    };

    #[test]
    fn put_back_never_swaps_out_a_state_that_passes_the_checks() {
        let d = state_dir("passes", &good_permall());
        let e = DirTarget::check(&d, TpmVersion::V2_0, IF_CORRUPT)
            .err()
            .expect("refused");
        assert!(e.to_string().contains("passes swtpm's checks"), "{e}");
        let _ = std::fs::remove_dir_all(d.parent().unwrap().parent().unwrap());
    }

    #[test]
    fn a_corrupt_state_rewritten_good_before_the_swap_stays() {
        let d = state_dir("rewritten", b"");
        let t = DirTarget::check(&d, TpmVersion::V2_0, IF_CORRUPT).expect("corrupt: may go");
        // `tss` writes a good state after the first check.
        let good = good_permall();
        std::fs::write(d.join("tpm2-00.permall"), &good).unwrap();
        let owner = Owner {
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            desc: String::new(),
        };
        let e = t
            .write(&[("tpm2-00.permall", b"other")], &owner)
            .expect_err("refused");
        assert!(e.to_string().contains("passes swtpm's checks"), "{e}");
        assert_eq!(std::fs::read(d.join("tpm2-00.permall")).unwrap(), good);
        let parent = d.parent().unwrap();
        let names: Vec<_> = std::fs::read_dir(parent)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["tpm2"], "a temporary was left");
        let _ = std::fs::remove_dir_all(parent.parent().unwrap());
    }

    #[test]
    fn only_swtpms_own_regular_files_count_as_swtpms() {
        let mut st = crate::fsutil::fstat(&std::fs::File::open("/").unwrap()).unwrap();
        st.st_mode = libc::S_IFREG | 0o600;
        for n in [
            ".lock",
            "tpm2-00.permall",
            "tpm2-00.volatilestate",
            "TMP2-00.permall",
            "tpm-00.savestate",
            "TMP-00.volatilestate",
        ] {
            assert!(swtpm_owned(n, &st), "{n}");
        }
        for n in [
            ".precious-dotfile",
            "TMPnotes.txt",
            "tpm2-00.permall.bak",
            "tpm2-00.notes",
            "tpm2-01.permall",
            ".lock2",
            "notes",
        ] {
            assert!(!swtpm_owned(n, &st), "{n}");
        }
        st.st_mode = libc::S_IFDIR | 0o700;
        assert!(!swtpm_owned("tpm2-00.volatilestate", &st));
        st.st_mode = libc::S_IFLNK | 0o777;
        assert!(!swtpm_owned(".lock", &st));
    }
}

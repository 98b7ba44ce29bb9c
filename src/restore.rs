//! Restore: put the newest good generation back where libvirt looks for a
//! VM's TPM state (and its UEFI vars), before swtpm starts, when libvirt's
//! copy is gone, so that the guest boots with the same TPM.
//!
//! What is written goes first into a new directory (or temp file) inside
//! the destination's parent, owned and fsynced, then is renamed into place:
//! libvirt's path is either untouched or complete. Existing state is never
//! replaced by the hook.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::{Config, Restore};
use crate::domain::{Domain, Tpm};
use crate::error::{Error, Result};
use crate::failpoint;
use crate::fsutil::{Dir, Rename};
use crate::manifest::{self, Manifest};
use crate::qemuconf::{Owner, QemuConf};
use crate::store::{Loaded, Store, VmStore};
use crate::swtpm::{self, StateLocation};
use crate::users;

/// How long a mark left at `migrate begin`/`restore begin` keeps a
/// `prepare` from restoring, as the last guard: the mark is normally used
/// up by the `prepare` of its own operation, or cleared by the
/// `stopped`/`release` of a failed one. It outlives its operation only when
/// neither follows: an offline migration (`qemuMigrationDstPrepareFresh`
/// runs the migrate hook, then skips `qemuMigrationDstPrepareActive`; no
/// later hook runs), or a failure before `qemuProcessInit` runs the prepare
/// hook (cookie, domain already active, storage pre-creation, QEMU
/// capabilities). Between the two hooks of one operation libvirt (read in
/// 9.0 and 11.3) parses XML and cookie, may wait for the domain's job (at
/// most `VIR_JOB_WAIT_TIME`, 30 s), may probe QEMU's capabilities (seconds)
/// and creates missing disks of a copy-storage migration (fallocate, fast;
/// zero-filled where the filesystem has none). 45 s covers all but that
/// zero fill and slow hooks that run between ours, with a margin. A later
/// `prepare` restores as a plain start does (a refusal then aborts the
/// migration); an earlier start after an offline migration restores
/// nothing.
pub const INCOMING_WINDOW_SECS: i64 = 45;
pub const MIGRATED_MARKER: &str = "migrated-away.json";
const TMP_PREFIX: &str = ".swtpm-keeper-";

/// Why a restore must not happen, and what the operator can do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub why: String,
    pub fix: String,
}

#[derive(Debug)]
pub enum Outcome {
    Restored {
        generation: String,
        manifest: Box<Manifest>,
        path: PathBuf,
        nvram: NvramOutcome,
        /// Newer generations skipped because they failed verification.
        skipped: Vec<(String, String)>,
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

#[derive(Serialize, Deserialize)]
struct IncomingMarker {
    event: String,
    time_unix: i64,
}

#[derive(Serialize, Deserialize)]
pub struct MigratedMarker {
    pub generation: String,
    pub time: String,
    pub host: String,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn incoming_marker_name() -> String {
    // Per host: on a shared store the marker is for this host's `prepare`.
    format!("incoming-{}.json", users::host_name().replace('/', "_"))
}

/// At `migrate begin` / `restore begin`: the TPM state will arrive in the
/// stream, so the `prepare` that follows must not restore an old copy.
/// False when the store holds nothing for the VM: nothing could be
/// restored, so nothing is noted (and no store directory is created).
pub fn note_incoming(cfg: &Config, domain: &Domain, event: &str) -> Result<bool> {
    let store = Store::new(&cfg.store_dir);
    if !store.vm_dir(&domain.uuid).is_dir() {
        return Ok(false);
    }
    let vm = store.open_vm(&domain.uuid, cfg.lock_timeout())?;
    let m = IncomingMarker {
        event: event.to_owned(),
        time_unix: now(),
    };
    vm.write_marker(
        &incoming_marker_name(),
        &serde_json::to_vec(&m).expect("serializes"),
    )?;
    Ok(true)
}

/// At `stopped`/`release`: the VM stopped on this host, so an incoming
/// operation noted here is over (a failed incoming migration or restore
/// stops the VM). Removes this host's mark only: on a shared store another
/// host's mark is for that host's `prepare`. True when there was one.
pub fn clear_incoming(cfg: &Config, domain: &Domain) -> Result<bool> {
    let store = Store::new(&cfg.store_dir);
    let name = incoming_marker_name();
    // The usual stop has no mark: one stat, no lock.
    if std::fs::symlink_metadata(store.vm_dir(&domain.uuid).join(&name)).is_err() {
        return Ok(false);
    }
    let vm = store.open_vm(&domain.uuid, cfg.lock_timeout())?;
    let had = vm.read_marker(&name).is_some();
    vm.remove_marker(&name)?;
    Ok(had)
}

/// At `prepare`: this host's incoming mark, used up whether it counts or
/// not. Some(event, age in seconds) when it is recent enough to count.
fn take_incoming(vm: &VmStore, domain: &Domain) -> Result<Option<(String, i64)>> {
    let name = incoming_marker_name();
    let Some(bytes) = vm.read_marker(&name) else {
        return Ok(None);
    };
    vm.remove_marker(&name)?;
    let Ok(m) = serde_json::from_slice::<IncomingMarker>(&bytes) else {
        return Ok(None);
    };
    let age = now() - m.time_unix;
    if age.abs() <= INCOMING_WINDOW_SECS {
        return Ok(Some((m.event, age)));
    }
    log::info!(
        "vm={} uuid={}: the incoming {} noted {age} s ago had no prepare within {INCOMING_WINDOW_SECS} s \
         (an offline migration, or one that failed early): not counted",
        domain.name,
        domain.uuid,
        m.event
    );
    Ok(None)
}

/// At a stop with reason `migrated` that stored nothing (the state was
/// already gone, or could not be read): this host's copies are stale all
/// the same, so mark the newest generation, under the lock. None when the
/// store holds no generation for the VM.
pub fn mark_migrated_away(cfg: &Config, domain: &Domain) -> Result<Option<String>> {
    let store = Store::new(&cfg.store_dir);
    if !store.vm_dir(&domain.uuid).is_dir() {
        return Ok(None);
    }
    let vm = store.open_vm(&domain.uuid, cfg.lock_timeout())?;
    let Some(newest) = vm.generations()?.pop() else {
        return Ok(None);
    };
    note_migrated_away(&vm, &newest)?;
    Ok(Some(newest))
}

/// At a stop with reason `migrated` (libvirt 10.5+): this host's copy is
/// stale from now on; remember which generation that was.
pub fn note_migrated_away(vm: &VmStore, generation: &str) -> Result<()> {
    let m = MigratedMarker {
        generation: generation.to_owned(),
        time: manifest::rfc3339(now()),
        host: users::host_name(),
    };
    vm.write_marker(
        MIGRATED_MARKER,
        &serde_json::to_vec(&m).expect("serializes"),
    )
}

/// Is libvirt's state for this TPM there? (Any entry at the permall's name
/// counts: the hook never replaces what exists.)
fn state_present(loc: &StateLocation, tpm: &Tpm) -> bool {
    let p = match loc {
        StateLocation::Dir(d) => d.join(swtpm::permall_name(tpm.version)),
        StateLocation::File(f) => f.clone(),
    };
    std::fs::symlink_metadata(p).is_ok()
}

fn io_refusal(e: Error) -> Refusal {
    Refusal {
        why: e.to_string(),
        fix: "fix the cause and start the VM again; the stored states are untouched".into(),
    }
}

/// The hook's restore at `prepare begin`.
pub fn at_prepare(
    cfg: &Config,
    domain: &Domain,
    tpm: &Tpm,
) -> std::result::Result<Outcome, Refusal> {
    if cfg.restore == Restore::Off {
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
    if let Some((event, age_secs)) = take_incoming(&vm, domain).map_err(io_refusal)? {
        return Ok(Outcome::Incoming { event, age_secs });
    }
    let loc = StateLocation::of(&cfg.swtpm_dir, domain, tpm);
    if let Err(e) = remove_leftovers(&loc) {
        log::warn!("vm={} uuid={}: {e}", domain.name, domain.uuid);
    }
    if state_present(&loc, tpm) {
        return Ok(Outcome::Nothing(format!(
            "libvirt's TPM state exists at {}",
            loc.path().display()
        )));
    }
    let gens = vm.generations().map_err(io_refusal)?;
    if gens.is_empty() {
        return Ok(Outcome::Nothing(
            "the store holds no generation for this VM".into(),
        ));
    }
    let (gen, skipped) = newest_good(&vm, &gens, cfg.max_file_size)?;
    check_rules(&vm, &gen, domain, tpm, &loc)?;
    let qc = QemuConf::load(&cfg.qemu_conf);
    let nvram = put_back(
        &gen,
        domain,
        &loc,
        &qc.swtpm_owner(),
        &qc.qemu_owner(),
        Replace::default(),
    )
    .map_err(io_refusal)?;
    Ok(Outcome::Restored {
        generation: gen.name.clone(),
        path: loc.path().to_owned(),
        manifest: Box::new(gen.manifest),
        nvram,
        skipped,
    })
}

/// The newest generation that verifies, and the newer ones that did not.
pub fn newest_good(
    vm: &VmStore,
    gens: &[String],
    max: u64,
) -> std::result::Result<(Loaded, Vec<(String, String)>), Refusal> {
    let mut skipped = Vec::new();
    for g in gens.iter().rev() {
        match vm.load_verified(g, max) {
            Ok(l) => return Ok((l, skipped)),
            Err(why) => skipped.push((g.clone(), why)),
        }
    }
    let list: Vec<String> = skipped.iter().map(|(g, w)| format!("{g}: {w}")).collect();
    Err(Refusal {
        why: format!(
            "no stored generation passes verification ({})",
            list.join("; ")
        ),
        fix: format!(
            "inspect them with `swtpm-keeper verify {}` (in {})",
            vm.dir()
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            vm.dir().display()
        ),
    })
}

/// The rules that make a stored state wrong for this start.
pub fn check_rules(
    vm: &VmStore,
    gen: &Loaded,
    domain: &Domain,
    tpm: &Tpm,
    loc: &StateLocation,
) -> std::result::Result<(), Refusal> {
    let m = &gen.manifest;
    let which = format!(
        "generation {} (captured {} on {} at {})",
        gen.name, m.time, m.host, m.event
    );
    let force = format!(
        "if this state is the right one, put it back with `swtpm-keeper restore {} --generation {} --force` and start again",
        domain.uuid, gen.name
    );
    let migrated_at = vm
        .read_marker(MIGRATED_MARKER)
        .and_then(|b| serde_json::from_slice::<MigratedMarker>(&b).ok())
        .filter(|mk| mk.generation.as_str() >= gen.name.as_str());
    if m.reason == "migrated" || migrated_at.is_some() {
        return Err(Refusal {
            why: format!("{which} was taken when the VM migrated to another host: its TPM lives on there and this copy is stale"),
            fix: force,
        });
    }
    if m.tpm.version != tpm.version.as_str() {
        return Err(Refusal {
            why: format!(
                "{which} is a TPM {} state but the domain now has a TPM {}",
                m.tpm.version,
                tpm.version.as_str()
            ),
            fix: force,
        });
    }
    if m.tpm.encryption_secret != tpm.encryption_secret {
        let show = |s: &Option<String>| s.clone().unwrap_or_else(|| "none".into());
        return Err(Refusal {
            why: format!(
                "{which} is encrypted with libvirt secret {} but the domain now uses {}: swtpm could not open it",
                show(&m.tpm.encryption_secret),
                show(&tpm.encryption_secret)
            ),
            fix: format!(
                "define secret {} again with its old value (virsh secret-define, secret-set-value) and point <encryption secret=...> at it",
                show(&m.tpm.encryption_secret)
            ),
        });
    }
    if m.tpm.state_type != loc.kind() {
        return Err(Refusal {
            why: format!(
                "{which} holds a '{}' state but the domain keeps a '{}' state",
                m.tpm.state_type,
                loc.kind()
            ),
            fix: force,
        });
    }
    Ok(())
}

/// What `put_back` may swap out. Only what was captured first (the CLI's
/// --force) may be replaced; the hook replaces nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Replace {
    pub state: bool,
    pub nvram: bool,
}

/// Write the generation into libvirt's paths: NVRAM first (so that a TPM
/// never comes back without its NVRAM), then the TPM state.
pub fn put_back(
    gen: &Loaded,
    domain: &Domain,
    loc: &StateLocation,
    swtpm_owner: &Owner,
    qemu_owner: &Owner,
    replace: Replace,
) -> Result<NvramOutcome> {
    let mut nvram = NvramOutcome::None;
    let path = nvram_path(domain, &gen.manifest);
    if let (Some(path), Some(bytes)) = (&path, gen.file(manifest::NVRAM)) {
        nvram = if put_file(path, bytes, qemu_owner, true, replace.nvram)? {
            NvramOutcome::Restored(path.clone())
        } else {
            NvramOutcome::KeptExisting(path.clone())
        };
    }
    failpoint::hit("restore-after-nvram");
    let tpm_files: Vec<(&str, &[u8])> = gen
        .manifest
        .files
        .iter()
        .filter(|f| f.role == "tpm")
        .filter_map(|f| gen.file(&f.name).map(|b| (f.name.as_str(), b)))
        .collect();
    match loc {
        StateLocation::Dir(dir) => put_dir(
            dir,
            &tpm_files,
            swtpm_owner,
            &swtpm::permall_name(version_of(gen)),
            replace.state,
        )?,
        StateLocation::File(path) => {
            let bytes = tpm_files
                .first()
                .map(|(_, b)| *b)
                .ok_or_else(|| Error::failed("the generation has no state file"))?;
            if !put_file(path, bytes, swtpm_owner, false, replace.state)? {
                return Err(Error::failed(format!(
                    "{} appeared while restoring; left as it is",
                    path.display()
                )));
            }
        }
    }
    Ok(nvram)
}

/// Where libvirt will look for the NVRAM file. The domain XML names it,
/// except at `prepare` of a VM with firmware auto-selection on libvirt 9.0,
/// which resolves it later as `<nvram dir>/<name>_VARS.fd`: then use the
/// directory recorded at capture and the VM's current name.
pub fn nvram_path(domain: &Domain, m: &Manifest) -> Option<PathBuf> {
    if let Some(p) = &domain.nvram {
        return Some(p.clone());
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

/// Names swtpm (and libvirt for it) leaves in a state directory.
fn swtpm_owned(name: &str) -> bool {
    name.starts_with('.')
        || name.starts_with("TMP")
        || name.starts_with("tpm-00.")
        || name.starts_with("tpm2-00.")
}

/// Remove what an interrupted restore left beside libvirt's path (a
/// half-built directory, or the one swapped out). Only in a directory that
/// root alone can write: elsewhere a name is no proof that it is ours.
fn remove_leftovers(loc: &StateLocation) -> Result<()> {
    let (parent, prefix) = match loc {
        StateLocation::Dir(d) => (split(d)?.0, TMP_PREFIX.to_owned()),
        StateLocation::File(f) => {
            let (p, leaf) = split(f)?;
            (p, format!(".{leaf}{TMP_PREFIX}"))
        }
    };
    let Some(dir) = Dir::open_if_exists(parent)? else {
        return Ok(());
    };
    if !dir.is_trusted()? && matches!(loc, StateLocation::Dir(_)) {
        return Ok(());
    }
    let mut removed = false;
    for n in dir.names()? {
        if n.starts_with(&prefix) {
            dir.remove_entry(&n)?;
            removed = true;
        }
    }
    if removed {
        dir.sync()?;
    }
    Ok(())
}

fn version_of(gen: &Loaded) -> crate::domain::TpmVersion {
    crate::domain::TpmVersion::parse(&gen.manifest.tpm.version)
        .unwrap_or(crate::domain::TpmVersion::V2_0)
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

/// Open `path`'s directory, creating the last missing level as libvirt
/// would (`mode`, owned by `owner`).
fn open_or_create_dir(path: &Path, mode: u32, owner: Option<(u32, u32)>) -> Result<Dir> {
    if let Some(d) = Dir::open_if_exists(path)? {
        return Ok(d);
    }
    let (parent, name) = split(path)?;
    let p = Dir::open(parent)?;
    let d = p.mkdir(name, mode)?;
    d.chown_chmod(owner, mode)?;
    p.sync()?;
    Ok(d)
}

/// Create `path` with `bytes` unless something exists there. Written to a
/// temporary name in the same directory, fsynced, then renamed without
/// replacing. Returns false if something was already there.
fn put_file(
    path: &Path,
    bytes: &[u8],
    owner: &Owner,
    create_parent: bool,
    replace: bool,
) -> Result<bool> {
    let (parent, name) = split(path)?;
    let dir = if create_parent {
        open_or_create_dir(parent, 0o755, Some((owner.uid, owner.gid)))?
    } else {
        Dir::open(parent)?
    };
    if !replace && dir.entry_stat(name)?.is_some() {
        return Ok(false);
    }
    // Temporaries of runs that crashed here (any pid) go first.
    let leftover = format!(".{name}{TMP_PREFIX}");
    for n in dir.names()? {
        if n.starts_with(&leftover) {
            dir.remove_entry(&n)?;
        }
    }
    let tmp = format!("{leftover}{}", std::process::id());
    if let Err(e) = dir.write_new(&tmp, bytes, 0o600, Some((owner.uid, owner.gid))) {
        let _ = dir.remove_entry(&tmp);
        return Err(e);
    }
    failpoint::hit("restore-file-before-rename");
    let how = if replace {
        Rename::Replace
    } else {
        Rename::NoReplace
    };
    match dir.rename(&tmp, name, how) {
        Ok(()) => {}
        Err(e) if e.io_kind() == Some(std::io::ErrorKind::AlreadyExists) => {
            dir.remove_entry(&tmp)?;
            return Ok(false);
        }
        Err(e) => {
            let _ = dir.remove_entry(&tmp);
            return Err(e);
        }
    }
    dir.sync()?;
    Ok(true)
}

/// Build the state directory beside `dir` and rename it into place. The
/// parent must be root's alone (libvirt makes `<uuid>/` root 0711), so
/// nothing in it can be a planted link.
fn put_dir(
    dir: &Path,
    files: &[(&str, &[u8])],
    owner: &Owner,
    permall: &str,
    replace: bool,
) -> Result<()> {
    let (parent, leaf) = split(dir)?;
    let (grand, _) = split(parent)?;
    // libvirt's layout: <swtpm_dir> and <swtpm_dir>/<uuid> are root 0711.
    if !grand.exists() {
        return Err(Error::failed(format!(
            "{} does not exist: is libvirt's swtpm support installed?",
            grand.display()
        )));
    }
    let pdir = open_or_create_dir(parent, 0o711, None)?;
    if !pdir.is_trusted()? {
        let st = pdir.stat()?;
        return Err(Error::failed(format!(
            "refusing to restore into {}: it is writable by uid {} (mode {:o}), not root alone",
            parent.display(),
            st.st_uid,
            st.st_mode & 0o7777
        )));
    }
    for n in pdir.names()? {
        if n.starts_with(TMP_PREFIX) {
            pdir.remove_entry(&n)?;
        }
    }
    let tmp = format!("{TMP_PREFIX}restore-{}", std::process::id());
    let nd = pdir.mkdir(&tmp, 0o700)?;
    let ids = Some((owner.uid, owner.gid));
    let written = files
        .iter()
        .try_for_each(|(name, bytes)| nd.write_new(name, bytes, 0o600, ids));
    if let Err(e) = written {
        // Nothing partial stays behind (a full disk is the usual cause).
        let _ = pdir.remove_entry(&tmp);
        return Err(e);
    }
    failpoint::hit("restore-dir-half-written");
    nd.chown_chmod(ids, 0o700)?;
    nd.sync()?;
    failpoint::hit("restore-before-rename");
    match pdir.entry_stat(leaf)? {
        None => pdir.rename(&tmp, leaf, Rename::NoReplace)?,
        Some(st) if Dir::entry_is_dir(&st) => {
            // A directory without state (swtpm_setup never ran, or only
            // .lock is left): swap ours in, then drop the old one. Only if
            // it holds nothing but swtpm's files: a <source path> that
            // names some other directory is never swapped out.
            let old = pdir.open_subdir(leaf)?;
            if !replace && old.entry_stat(permall)?.is_some() {
                pdir.remove_entry(&tmp)?;
                return Err(Error::failed(format!(
                    "{} gained a TPM state while restoring; left as it is",
                    dir.display()
                )));
            }
            let foreign: Vec<String> = old
                .names()?
                .into_iter()
                .filter(|n| !swtpm_owned(n))
                .collect();
            if !foreign.is_empty() {
                pdir.remove_entry(&tmp)?;
                return Err(Error::failed(format!(
                    "{} holds files that are not swtpm's ({}); refusing to replace it",
                    dir.display(),
                    foreign
                        .iter()
                        .take(5)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            pdir.rename(&tmp, leaf, Rename::Exchange)?;
            pdir.sync()?;
            failpoint::hit("restore-after-exchange");
            if let Err(e) = pdir.remove_entry(&tmp) {
                log::warn!(
                    "restored {}, but could not remove the directory it replaced: {e}",
                    dir.display()
                );
            }
        }
        Some(_) => {
            pdir.remove_entry(&tmp)?;
            return Err(Error::failed(format!(
                "{} exists and is not a directory; left as it is",
                dir.display()
            )));
        }
    }
    pdir.sync()
}

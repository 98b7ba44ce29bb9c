//! Capture: read a stopped VM's swtpm state and UEFI vars safely and add
//! them to the store as a new generation, unless nothing changed.

use std::ffi::OsStr;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::config::Config;
use crate::domain::{Domain, Tpm, TpmVersion};
use crate::error::{Error, IoContext, Result};
use crate::fsutil::{self, FileData, Identity};
use crate::live::{self, FileRead, Reading, Seen};
use crate::manifest::{self, FileEntry, Manifest, NvramInfo, Role, TpmInfo};
use crate::marks;
use crate::running::RunningVm;
use crate::store::{Known, Store, VmStore};
use crate::swtpm::{self, StateLocation};
use crate::users;

/// How long to wait for a stopping swtpm to release its `.lock`; at
/// `stopped` it has normally exited already.
const SWTPM_EXIT_GRACE: Duration = Duration::from_secs(2);

/// The hook event being handled, as libvirt passed it.
#[derive(Debug, Clone)]
pub struct Event {
    pub op: String,
    pub sub_op: String,
    pub extra: String,
}

#[derive(Debug)]
pub enum Outcome {
    Stored {
        generation: String,
        path: PathBuf,
        files: usize,
        nvram: bool,
        removed: Vec<String>,
    },
    Unchanged {
        generation: String,
        path: PathBuf,
        /// Nothing was read: every source file kept its identity since the
        /// last live capture saw it in this generation.
        unread: bool,
    },
    /// No state file at libvirt's path (the TPM never ran, or it is gone).
    NoState { path: PathBuf },
}

struct Captured {
    name: String,
    role: Role,
    source: Option<PathBuf>,
    data: FileData,
}

/// The bytes a generation may still take (`max_generation_size`): a
/// directory that `tss` can fill is never copied without a bound.
struct Budget {
    left: u64,
    limit: u64,
}

impl Budget {
    fn new(limit: u64) -> Budget {
        Budget { left: limit, limit }
    }

    /// Refuse `what` if `size` more bytes would not fit.
    fn check(&self, what: &dyn std::fmt::Display, size: u64) -> Result<()> {
        if size <= self.left {
            return Ok(());
        }
        Err(Error::failed(format!(
            "refusing {what}: its {size} bytes take the generation over max_generation_size \
             ({} bytes); raise max_generation_size if this state is real",
            self.limit
        )))
    }

    fn take(&mut self, what: &dyn std::fmt::Display, size: u64) -> Result<()> {
        self.check(what, size)?;
        self.left -= size;
        Ok(())
    }
}

/// Open a file for the generation, refusing one that would take it over
/// its budget before a byte is read (nothing is read that cannot be kept).
/// A file over `max_file_size` is left to the read, which says so.
fn open_within(
    open: impl Fn() -> Result<Option<File>>,
    path: &Path,
    max: u64,
    budget: &Budget,
) -> Result<Option<File>> {
    let Some(f) = open()? else {
        return Ok(None);
    };
    let size = fsutil::fstat(&f).ctx("stat", path)?.st_size as u64;
    if size <= max {
        budget.check(&path.display(), size)?;
    }
    Ok(Some(f))
}

/// Read one file of the generation as `reading` allows, checked by
/// `check`, and count it against the budget.
fn read_counted<T>(
    reading: Reading,
    r: &FileRead,
    open: impl Fn() -> Result<Option<File>>,
    check: impl Fn(&[u8]) -> std::result::Result<T, String>,
    budget: &mut Budget,
) -> Result<Option<(FileData, T)>> {
    let b: &Budget = budget;
    let got = live::read_file(reading, r, || open_within(&open, r.path, r.max, b), check)?;
    if let Some((d, _)) = &got {
        budget.take(&r.path.display(), d.bytes.len() as u64)?;
    }
    Ok(got)
}

/// Read the swtpm state at `loc`. `Ok(None)` when there is none.
fn read_state(
    loc: &StateLocation,
    version: TpmVersion,
    reading: Reading,
    max: u64,
    budget: &mut Budget,
) -> Result<Option<(Vec<Captured>, u16)>> {
    match loc {
        StateLocation::File(path) => {
            let patience = live::STATE_PATIENCE;
            let check = swtpm::check_linear;
            let Some((data, ())) = read_path(reading, path, max, patience, check, budget)? else {
                return Ok(None);
            };
            let c = Captured {
                name: swtpm::FILE_STATE_NAME.into(),
                role: Role::Tpm,
                source: Some(path.clone()),
                data,
            };
            Ok(Some((vec![c], 0)))
        }
        StateLocation::Dir(dir_path) => read_state_dir(dir_path, version, reading, max, budget),
    }
}

/// swtpm's files in a state directory (only its own names), checked.
fn read_state_dir(
    dir_path: &Path,
    version: TpmVersion,
    reading: Reading,
    max: u64,
    budget: &mut Budget,
) -> Result<Option<(Vec<Captured>, u16)>> {
    let Some(dir) = fsutil::open_if_exists(dir_path, true)? else {
        return Ok(None);
    };
    if reading == Reading::AtStop {
        wait_for_swtpm_exit(&dir, dir_path)?;
    }
    let Some((names, backup_mode)) = state_names(&dir, dir_path, version, reading)? else {
        return Ok(None);
    };
    let permall = swtpm::permall_name(version);
    let mut out = Vec::new();
    let mut flags = 0;
    for name in names {
        let path = dir_path.join(&name);
        let is_permall = name == permall;
        let r = FileRead {
            path: &path,
            max,
            patience: live::STATE_PATIENCE,
            must_exist: is_permall,
            // Without its backup mode swtpm replaces its files by rename.
            replaced_whole: !backup_mode,
        };
        let open = || match fsutil::open_in_dir(&dir, OsStr::new(&name)) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("open", &path, e)),
        };
        let check = |b: &[u8]| swtpm::check_file(version, &name, b);
        // A volatile state that went away meanwhile is simply not there.
        let Some((data, f_flags)) = read_counted(reading, &r, open, check, budget)? else {
            continue;
        };
        if is_permall {
            flags = f_flags;
        }
        out.push(Captured {
            name,
            role: Role::Tpm,
            source: Some(path),
            data,
        });
    }
    Ok(Some((out, flags)))
}

/// The names of swtpm's state files in `dir`, sorted, and whether swtpm's
/// backup mode is at work (a `permall.bak` beside them: it rewrites
/// `permall` in place); `None` without a permanent state. Live, a
/// `permall` renamed to `.bak` counts as there: it is being written again.
fn state_names(
    dir: &File,
    dir_path: &Path,
    version: TpmVersion,
    reading: Reading,
) -> Result<Option<(Vec<String>, bool)>> {
    let listed = fsutil::list_dir(dir, dir_path)?;
    let mut names: Vec<String> = listed
        .iter()
        .filter(|n| swtpm::is_state_file(version, n))
        .filter_map(|n| n.to_str().map(str::to_owned))
        .collect();
    let permall = swtpm::permall_name(version);
    let backup = format!("{permall}.bak");
    let backup_mode = listed.iter().any(|n| n == OsStr::new(&backup));
    if !names.contains(&permall) {
        if reading == Reading::AtStop || !backup_mode {
            return Ok(None);
        }
        names.push(permall);
    }
    names.sort();
    Ok(Some((names, backup_mode)))
}

/// Never copy a live state: wait briefly for swtpm to drop its fcntl lock.
fn wait_for_swtpm_exit(dir: &std::fs::File, dir_path: &Path) -> Result<()> {
    let lock_path = dir_path.join(swtpm::LOCK_FILE);
    let f = match fsutil::open_in_dir(dir, OsStr::new(swtpm::LOCK_FILE)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("open", &lock_path, e)),
    };
    let deadline = Instant::now() + SWTPM_EXIT_GRACE;
    loop {
        match swtpm::fcntl_lock_holder(&f).ctx("query lock", &lock_path)? {
            None => return Ok(()),
            Some(pid) if Instant::now() >= deadline => {
                return Err(Error::failed(format!(
                    "swtpm (pid {pid}) still holds {}: the state is live, not captured",
                    lock_path.display()
                )))
            }
            Some(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The UEFI vars file; QEMU writes it in place while the VM runs.
fn read_nvram(
    path: &Path,
    reading: Reading,
    max: u64,
    budget: &mut Budget,
) -> Result<Option<FileData>> {
    let not_empty = |b: &[u8]| match b.is_empty() {
        true => Err("the NVRAM file is empty".to_owned()),
        false => Ok(()),
    };
    let patience = live::NVRAM_PATIENCE;
    Ok(read_path(reading, path, max, patience, not_empty, budget)?.map(|(d, ())| d))
}

/// The file at `path`, if there is one, read as `reading` allows.
fn read_path<T>(
    reading: Reading,
    path: &Path,
    max: u64,
    patience: live::Patience,
    check: impl Fn(&[u8]) -> std::result::Result<T, String>,
    budget: &mut Budget,
) -> Result<Option<(FileData, T)>> {
    // The linear file and the NVRAM are written in place.
    let r = FileRead {
        path,
        max,
        patience,
        must_exist: false,
        replaced_whole: false,
    };
    read_counted(
        reading,
        &r,
        || fsutil::open_if_exists(path, false),
        check,
        budget,
    )
}

/// libvirt's inactive definition of a persistent domain, if it has one
/// with this UUID (`virsh define` accepts it, unlike the live XML of an
/// EFI domain with firmware auto-selection on libvirt 9.0).
fn inactive_definition(cfg: &Config, domain: &Domain, max: u64) -> Option<(PathBuf, FileData)> {
    let path = cfg.libvirt_config_dir.join(format!("{}.xml", domain.name));
    let mut f = fsutil::open_no_untrusted_links(&path, false).ok()?;
    let data = fsutil::read_regular(&mut f, &path, max).ok()?;
    match Domain::parse(&data.bytes) {
        Ok(d) if d.uuid == domain.uuid => Some((path, data)),
        _ => None,
    }
}

fn entry(c: &Captured) -> FileEntry {
    FileEntry {
        name: c.name.clone(),
        role: c.role,
        source: c.source.as_ref().map(|p| p.display().to_string()),
        size: c.data.bytes.len() as u64,
        mode: format!("{:04o}", c.data.mode),
        uid: c.data.uid,
        gid: c.data.gid,
        owner: users::user_name(c.data.uid),
        group: users::group_name(c.data.gid),
        sha256: manifest::sha256_hex(&c.data.bytes),
        identity: c.source.as_ref().and(c.data.identity),
    }
}

/// Capture the state of `domain` (which has the emulator TPM `tpm`).
pub fn capture(
    cfg: &Config,
    domain: &Domain,
    tpm: &Tpm,
    event: &Event,
    live_xml: &[u8],
) -> Result<Outcome> {
    let vm = Store::new(&cfg.store_dir).open_vm(&domain.uuid, cfg.lock_timeout())?;
    capture_locked(cfg, &vm, domain, tpm, event, live_xml)
}

/// The same, into a VM store the caller has locked exclusively.
pub fn capture_locked(
    cfg: &Config,
    vm: &VmStore,
    domain: &Domain,
    tpm: &Tpm,
    event: &Event,
    live_xml: &[u8],
) -> Result<Outcome> {
    let plan = ReadPlan {
        reading: Reading::AtStop,
        after_read: &mut || Ok(()),
    };
    capture_read(cfg, vm, domain, tpm, event, live_xml, plan).map(|(o, _)| o)
}

/// How a capture reads, and what runs once everything is read, before
/// anything is stored: `capture --pause` resumes the VM there, and an
/// error from it stores nothing.
pub struct ReadPlan<'a> {
    pub reading: Reading,
    pub after_read: &'a mut dyn FnMut() -> Result<()>,
}

/// Capture as `reading` allows, into a VM store the caller has locked
/// exclusively: collect the files, describe them, then store them unless
/// the newest generation already holds this state and verifies. Also
/// returns the identity of each source file read.
fn capture_read(
    cfg: &Config,
    vm: &VmStore,
    domain: &Domain,
    tpm: &Tpm,
    event: &Event,
    live_xml: &[u8],
    plan: ReadPlan,
) -> Result<(Outcome, Vec<(String, Identity)>)> {
    let reading = plan.reading;
    let loc = StateLocation::of(&cfg.swtpm_dir, domain, tpm);
    let collected = collect(cfg, domain, tpm, &loc, live_xml, reading)?;
    (plan.after_read)()?;
    let Some(c) = collected else {
        let path = loc.path().to_owned();
        return Ok((Outcome::NoState { path }, Vec::new()));
    };
    let mut m = build_manifest(domain, tpm, &loc, event, &c);
    m.live = reading != Reading::AtStop;
    m.vm_state = Some(reading.vm_state().to_owned());
    let mut read: Vec<(String, Identity)> = c
        .files
        .iter()
        .filter(|f| f.role.is_state())
        .filter_map(|f| Some((f.source.as_ref()?.display().to_string(), f.data.identity?)))
        .collect();
    read.sort_by(|a, b| a.0.cmp(&b.0));
    crate::failpoint::hit("capture-after-read");
    let outcome = store_unless_unchanged(cfg, vm, domain, c.files, &m, event)?;
    Ok((outcome, read))
}

/// Capture a VM that runs (or is paused), into its store locked by the
/// caller, without touching swtpm or QEMU. Nothing is read when every
/// source file still has the identity the last live capture saw in the
/// newest generation (`live::Seen`, in `run_dir`); otherwise each file is
/// read until two reads agree (once, when the VM is paused).
pub fn capture_running(cfg: &Config, vm: &VmStore, running: &RunningVm) -> Result<Outcome> {
    capture_running_then(cfg, vm, running, &mut || Ok(()))
}

/// The same, running `after_read` once the files are read (or found
/// unchanged) and before anything is stored.
pub fn capture_running_then(
    cfg: &Config,
    vm: &VmStore,
    running: &RunningVm,
    after_read: &mut dyn FnMut() -> Result<()>,
) -> Result<Outcome> {
    if let Some(unchanged) = unchanged_running(cfg, vm, running)? {
        after_read()?;
        return Ok(unchanged);
    }
    let domain = &running.domain;
    let tpm = emulator_tpm(domain)?;
    let now = unix_now();
    let reading = Reading::Live {
        paused: running.status.state == "paused",
    };
    let event = Event {
        op: "capture".into(),
        sub_op: "live".into(),
        extra: "-".into(),
    };
    let plan = ReadPlan {
        reading,
        after_read,
    };
    let (outcome, read) = capture_read(cfg, vm, domain, tpm, &event, &running.live_xml, plan)?;
    if let Outcome::Stored { generation, .. } | Outcome::Unchanged { generation, .. } = &outcome {
        let seen = Seen {
            generation: generation.clone(),
            verified_unix: now,
            files: read,
        };
        if let Err(e) = seen.save(&cfg.run_dir, &domain.uuid) {
            log::warn!("{e}: the next pass reads {}'s state again", domain.name);
        }
    }
    Ok(outcome)
}

/// `Some` when nothing needs reading: every source file still has the
/// identity the last live capture saw in the newest generation. A shared
/// lock on the VM's store is enough (a pass over unchanged VMs takes no
/// exclusive lock and writes nothing).
pub fn unchanged_running(
    cfg: &Config,
    vm: &VmStore,
    running: &RunningVm,
) -> Result<Option<Outcome>> {
    let domain = &running.domain;
    let tpm = emulator_tpm(domain)?;
    let loc = StateLocation::of(&cfg.swtpm_dir, domain, tpm);
    let (Some(seen), Some(g)) = (
        Seen::load(&cfg.run_dir, &domain.uuid),
        vm.generations()?.pop(),
    ) else {
        return Ok(None);
    };
    let now_files = source_identities(&loc, tpm.version, domain.nvram.as_deref());
    Ok(seen
        .holds(&g, &now_files, unix_now())
        .then(|| Outcome::Unchanged {
            path: vm.dir().join(&g),
            generation: g,
            unread: true,
        }))
}

fn emulator_tpm(domain: &Domain) -> Result<&Tpm> {
    domain
        .tpm
        .as_ref()
        .ok_or_else(|| Error::failed(format!("VM {} has no emulator TPM", domain.name)))
}

/// swtpm's state files and the NVRAM as they are now, with their
/// identities, sorted by path: what a live pass compares before reading.
fn source_identities(
    loc: &StateLocation,
    version: TpmVersion,
    nvram: Option<&Path>,
) -> Vec<(String, Identity)> {
    let mut paths: Vec<PathBuf> = match loc {
        StateLocation::File(p) => vec![p.clone()],
        StateLocation::Dir(d) => std::fs::read_dir(d)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .filter(|n| swtpm::is_state_file(version, n))
            .map(|n| d.join(n))
            .collect(),
    };
    paths.extend(nvram.map(Path::to_path_buf));
    let mut v: Vec<(String, Identity)> = paths
        .iter()
        .filter_map(|p| {
            let m = std::fs::symlink_metadata(p).ok()?;
            Some((p.display().to_string(), Identity::of_metadata(&m)))
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Everything a generation holds, read and checked.
struct Collected {
    files: Vec<Captured>,
    header_flags: u16,
    nvram: Option<NvramInfo>,
    persistent: bool,
    domain_xml_from: &'static str,
}

/// Read the TPM state, the NVRAM and the domain XMLs, within
/// `max_generation_size`. `Ok(None)` when there is no TPM state.
fn collect(
    cfg: &Config,
    domain: &Domain,
    tpm: &Tpm,
    loc: &StateLocation,
    live_xml: &[u8],
    reading: Reading,
) -> Result<Option<Collected>> {
    let mut budget = Budget::new(cfg.max_generation_size());
    let Some((mut files, header_flags)) =
        read_state(loc, tpm.version, reading, cfg.max_file_size, &mut budget)?
    else {
        return Ok(None);
    };
    let nvram = collect_nvram(cfg, domain, reading, &mut files, &mut budget)?;
    let (persistent, domain_xml_from) =
        collect_xml(cfg, domain, live_xml, &mut files, &mut budget)?;
    Ok(Some(Collected {
        files,
        header_flags,
        nvram,
        persistent,
        domain_xml_from,
    }))
}

/// The UEFI variable store the domain names (`<nvram>` or `<varstore>`),
/// if any, byte for byte whatever its format; a missing file is noted, not
/// fatal. A store that is no file is named in the manifest and the log,
/// never copied.
fn collect_nvram(
    cfg: &Config,
    domain: &Domain,
    reading: Reading,
    files: &mut Vec<Captured>,
    budget: &mut Budget,
) -> Result<Option<NvramInfo>> {
    let who = format!("vm={} uuid={}", domain.name, domain.uuid);
    let mut info = NvramInfo {
        template: domain.nvram_template.clone(),
        kind: domain.nvram_kind,
        format: domain.nvram_format.clone(),
        ..NvramInfo::default()
    };
    let Some(p) = &domain.nvram else {
        let Some(what) = &domain.nvram_not_copied else {
            return Ok(None);
        };
        log::warn!(
            "{who}: its NVRAM is a {}, not a file: NOT copied with the TPM state; \
             back it up with the VM's disks",
            crate::logging::sanitize(&what.to_string())
        );
        info.path = what.at.clone();
        info.not_copied = Some(what.to_string());
        return Ok(Some(info));
    };
    let label = domain.nvram_kind.label();
    let data = read_nvram(p, reading, cfg.max_file_size, budget)?;
    if data.is_none() {
        log::warn!(
            "{who}: {label} {} named by the domain does not exist; storing the TPM state without it",
            p.display()
        );
    }
    info.path = p.display().to_string();
    info.file = data.as_ref().map(|_| manifest::NVRAM.to_owned());
    if let Some(data) = data {
        files.push(Captured {
            name: manifest::NVRAM.into(),
            role: Role::Nvram,
            source: Some(p.clone()),
            data,
        });
    }
    Ok(Some(info))
}

/// `domain.xml` (libvirt's inactive definition, else the live XML) and
/// `domain-live.xml`. Returns whether the VM is persistent, and where
/// `domain.xml` came from.
fn collect_xml(
    cfg: &Config,
    domain: &Domain,
    live_xml: &[u8],
    files: &mut Vec<Captured>,
    budget: &mut Budget,
) -> Result<(bool, &'static str)> {
    let root_file = |bytes: Vec<u8>| FileData {
        bytes,
        mode: 0o600,
        uid: 0,
        gid: 0,
        identity: None,
    };
    let stdin = "the domain XML on stdin";
    let (persistent, from) = match inactive_definition(cfg, domain, cfg.max_file_size) {
        Some((path, data)) => {
            budget.take(&path.display(), data.bytes.len() as u64)?;
            files.push(Captured {
                name: manifest::DOMAIN_XML.into(),
                role: Role::Domain,
                source: Some(path),
                data,
            });
            (true, "libvirt-config")
        }
        None => {
            budget.take(&stdin, live_xml.len() as u64)?;
            files.push(Captured {
                name: manifest::DOMAIN_XML.into(),
                role: Role::Domain,
                source: None,
                data: root_file(live_xml.to_vec()),
            });
            (false, "hook-stdin")
        }
    };
    budget.take(&stdin, live_xml.len() as u64)?;
    files.push(Captured {
        name: manifest::DOMAIN_LIVE_XML.into(),
        role: Role::DomainLive,
        source: None,
        data: root_file(live_xml.to_vec()),
    });
    Ok((persistent, from))
}

fn build_manifest(
    domain: &Domain,
    tpm: &Tpm,
    loc: &StateLocation,
    event: &Event,
    c: &Collected,
) -> Manifest {
    let now = unix_now();
    Manifest {
        format: manifest::FORMAT,
        uuid: domain.uuid.to_string(),
        name: domain.name.clone(),
        event: event.op.clone(),
        sub_event: event.sub_op.clone(),
        reason: event.extra.clone(),
        time: manifest::rfc3339(now),
        time_unix: now,
        host: users::host_name(),
        swtpm_keeper_version: env!("CARGO_PKG_VERSION").into(),
        persistent: c.persistent,
        domain_xml_from: c.domain_xml_from.into(),
        tpm: TpmInfo {
            version: tpm.version,
            model: tpm.model.clone(),
            state_type: loc.kind().into(),
            state_path: loc.path().display().to_string(),
            encryption_secret: tpm.encryption_secret.clone(),
            header_flags: c.header_flags,
        },
        nvram: c.nvram.clone(),
        files: c.files.iter().map(entry).collect(),
        live: false,
        vm_state: None,
        imported_from: None,
    }
}

/// The newest generation, if it holds this very state and verifies. A
/// damaged one is no copy: a restore would skip it and put back an older,
/// stale state, so the state is stored again.
fn unchanged_since(
    cfg: &Config,
    vm: &VmStore,
    domain: &Domain,
    m: &Manifest,
    files: &[Captured],
) -> Result<Option<String>> {
    let gens = vm.generations()?;
    let Some(newest) = gens.last() else {
        return Ok(None);
    };
    // The manifest first: only a generation naming this state is read whole.
    match vm.read_manifest(newest) {
        Ok(prev) if prev.state_identity() == m.state_identity() => {}
        _ => return Ok(None),
    }
    // What was just read and hashed is compared, not hashed again.
    let known: Vec<Known> = m
        .files
        .iter()
        .zip(files)
        .filter(|(e, c)| e.name == c.name)
        .map(|(e, c)| (e.name.as_str(), e.sha256.as_str(), c.data.bytes.as_slice()))
        .collect();
    match vm.load_verified_knowing(newest, cfg.max_file_size, &known) {
        Ok(l) if l.manifest.state_identity() == m.state_identity() => Ok(Some(newest.clone())),
        Ok(_) => Ok(None),
        Err(why) => {
            log::warn!(
                "vm={} uuid={}: the newest generation {newest} names this TPM state but fails verification \
                 ({why}): it does not count as a copy, the state is stored again",
                domain.name,
                domain.uuid
            );
            Ok(None)
        }
    }
}

/// Add the generation, unless the newest one already holds it (a release
/// after its stop adds nothing).
fn store_unless_unchanged(
    cfg: &Config,
    vm: &VmStore,
    domain: &Domain,
    files: Vec<Captured>,
    m: &Manifest,
    event: &Event,
) -> Result<Outcome> {
    // libvirt 10.5+ says why the VM stopped: after an outgoing migration
    // this host's copy goes stale, whatever generation holds it.
    let migrated = event.extra == "migrated";
    if let Some(newest) = unchanged_since(cfg, vm, domain, m, &files)? {
        if migrated {
            marks::note_migrated_away(vm, &newest)?;
        }
        return Ok(Outcome::Unchanged {
            path: vm.dir().join(&newest),
            generation: newest,
            unread: false,
        });
    }
    let nvram = files.iter().any(|c| c.role == Role::Nvram);
    let n = files.len();
    let payload: Vec<(String, Vec<u8>)> =
        files.into_iter().map(|c| (c.name, c.data.bytes)).collect();
    let (generation, removed) = vm.add_generation(&payload, m, cfg.generations as usize)?;
    if migrated {
        marks::note_migrated_away(vm, &generation)?;
    }
    Ok(Outcome::Stored {
        path: vm.dir().join(&generation),
        generation,
        files: n,
        nvram,
        removed,
    })
}

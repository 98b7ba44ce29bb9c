//! Capture: read a stopped VM's swtpm state and UEFI vars safely and add
//! them to the store as a new generation, unless nothing changed.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::config::Config;
use crate::domain::{Domain, Tpm, TpmVersion};
use crate::error::{Error, IoContext, Result};
use crate::fsutil::{self, FileData};
use crate::manifest::{self, FileEntry, Manifest, NvramInfo, TpmInfo};
use crate::restore;
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
    },
    /// No state file at libvirt's path (the TPM never ran, or it is gone).
    NoState {
        path: PathBuf,
    },
}

struct Captured {
    name: String,
    role: &'static str,
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

/// Read a file for the generation: at most `max` bytes, and within the
/// budget, checked before reading (nothing is read that cannot be kept)
/// and again after (the size may change meanwhile).
fn read_counted(
    f: &mut std::fs::File,
    path: &Path,
    max: u64,
    budget: &mut Budget,
) -> Result<FileData> {
    let size = fsutil::fstat(f).ctx("stat", path)?.st_size as u64;
    if size <= max {
        budget.check(&path.display(), size)?;
    }
    let data = fsutil::read_regular(f, path, max)?;
    budget.take(&path.display(), data.bytes.len() as u64)?;
    Ok(data)
}

/// Read the swtpm state at `loc`. `Ok(None)` when there is none.
fn read_state(
    loc: &StateLocation,
    version: TpmVersion,
    max: u64,
    budget: &mut Budget,
) -> Result<Option<(Vec<Captured>, u16)>> {
    match loc {
        StateLocation::File(path) => {
            let Some(mut f) = fsutil::open_if_exists(path, false)? else {
                return Ok(None);
            };
            let data = read_counted(&mut f, path, max, budget)?;
            swtpm::check_linear(&data.bytes)
                .map_err(|why| Error::failed(format!("refusing {}: {why}", path.display())))?;
            let c = Captured {
                name: swtpm::FILE_STATE_NAME.into(),
                role: "tpm",
                source: Some(path.clone()),
                data,
            };
            Ok(Some((vec![c], 0)))
        }
        StateLocation::Dir(dir_path) => read_state_dir(dir_path, version, max, budget),
    }
}

/// swtpm's files in a state directory (only its own names), checked.
fn read_state_dir(
    dir_path: &Path,
    version: TpmVersion,
    max: u64,
    budget: &mut Budget,
) -> Result<Option<(Vec<Captured>, u16)>> {
    let Some(dir) = fsutil::open_if_exists(dir_path, true)? else {
        return Ok(None);
    };
    wait_for_swtpm_exit(&dir, dir_path)?;
    let mut names: Vec<_> = fsutil::list_dir(&dir, dir_path)?
        .into_iter()
        .filter(|n| swtpm::is_state_file(version, n))
        .collect();
    names.sort();
    let permall = swtpm::permall_name(version);
    if !names.iter().any(|n| n == OsStr::new(&permall)) {
        return Ok(None);
    }
    let mut out = Vec::new();
    let mut flags = 0;
    for n in names {
        let path = dir_path.join(&n);
        let mut f = fsutil::open_in_dir(&dir, &n).ctx("open", &path)?;
        let data = read_counted(&mut f, &path, max, budget)?;
        let name = n.to_string_lossy().into_owned();
        let is_permall = name == permall;
        let f_flags = swtpm::check_blob(&data.bytes, is_permall && version == TpmVersion::V2_0)
            .map_err(|why| Error::failed(format!("refusing {}: {why}", path.display())))?;
        if is_permall {
            flags = f_flags;
        }
        out.push(Captured {
            name,
            role: "tpm",
            source: Some(path),
            data,
        });
    }
    Ok(Some((out, flags)))
}

/// Never copy a live state: wait briefly for swtpm to drop its fcntl lock.
fn wait_for_swtpm_exit(dir: &std::fs::File, dir_path: &Path) -> Result<()> {
    let lock_path = dir_path.join(".lock");
    let f = match fsutil::open_in_dir(dir, OsStr::new(".lock")) {
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

fn read_nvram(path: &Path, max: u64, budget: &mut Budget) -> Result<Option<FileData>> {
    let Some(mut f) = fsutil::open_if_exists(path, false)? else {
        return Ok(None);
    };
    let d = read_counted(&mut f, path, max, budget)?;
    if d.bytes.is_empty() {
        return Err(Error::failed(format!(
            "refusing NVRAM {}: the file is empty",
            path.display()
        )));
    }
    Ok(Some(d))
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
        role: c.role.into(),
        source: c.source.as_ref().map(|p| p.display().to_string()),
        size: c.data.bytes.len() as u64,
        mode: format!("{:04o}", c.data.mode),
        uid: c.data.uid,
        gid: c.data.gid,
        owner: users::user_name(c.data.uid),
        group: users::group_name(c.data.gid),
        sha256: manifest::sha256_hex(&c.data.bytes),
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

/// The same, into a VM store the caller has locked exclusively: collect
/// the files, describe them, then store them unless the newest generation
/// already holds this state and verifies.
pub fn capture_locked(
    cfg: &Config,
    vm: &VmStore,
    domain: &Domain,
    tpm: &Tpm,
    event: &Event,
    live_xml: &[u8],
) -> Result<Outcome> {
    let loc = StateLocation::of(&cfg.swtpm_dir, domain, tpm);
    let Some(c) = collect(cfg, domain, tpm, &loc, live_xml)? else {
        return Ok(Outcome::NoState {
            path: loc.path().to_owned(),
        });
    };
    let m = build_manifest(domain, tpm, &loc, event, &c);
    crate::failpoint::hit("capture-after-read");
    store_unless_unchanged(cfg, vm, domain, c.files, &m, event)
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
) -> Result<Option<Collected>> {
    let mut budget = Budget::new(cfg.max_generation_size());
    let Some((mut files, header_flags)) =
        read_state(loc, tpm.version, cfg.max_file_size, &mut budget)?
    else {
        return Ok(None);
    };
    let nvram = collect_nvram(cfg, domain, &mut files, &mut budget)?;
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

/// The NVRAM the domain names, if any; a missing file is noted, not fatal.
fn collect_nvram(
    cfg: &Config,
    domain: &Domain,
    files: &mut Vec<Captured>,
    budget: &mut Budget,
) -> Result<Option<NvramInfo>> {
    let Some(p) = &domain.nvram else {
        return Ok(None);
    };
    let data = read_nvram(p, cfg.max_file_size, budget)?;
    if data.is_none() {
        log::warn!(
            "vm={} uuid={}: NVRAM {} named by the domain does not exist; storing the TPM state without it",
            domain.name,
            domain.uuid,
            p.display()
        );
    }
    let info = NvramInfo {
        path: p.display().to_string(),
        template: domain.nvram_template.clone(),
        file: data.as_ref().map(|_| manifest::NVRAM.to_owned()),
    };
    if let Some(data) = data {
        files.push(Captured {
            name: manifest::NVRAM.into(),
            role: "nvram",
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
    };
    let stdin = "the domain XML on stdin";
    let (persistent, from) = match inactive_definition(cfg, domain, cfg.max_file_size) {
        Some((path, data)) => {
            budget.take(&path.display(), data.bytes.len() as u64)?;
            files.push(Captured {
                name: manifest::DOMAIN_XML.into(),
                role: "domain",
                source: Some(path),
                data,
            });
            (true, "libvirt-config")
        }
        None => {
            budget.take(&stdin, live_xml.len() as u64)?;
            files.push(Captured {
                name: manifest::DOMAIN_XML.into(),
                role: "domain",
                source: None,
                data: root_file(live_xml.to_vec()),
            });
            (false, "hook-stdin")
        }
    };
    budget.take(&stdin, live_xml.len() as u64)?;
    files.push(Captured {
        name: manifest::DOMAIN_LIVE_XML.into(),
        role: "domain-live",
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
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Manifest {
        format: manifest::FORMAT,
        uuid: domain.uuid.clone(),
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
            version: tpm.version.as_str().into(),
            model: tpm.model.clone(),
            state_type: loc.kind().into(),
            state_path: loc.path().display().to_string(),
            encryption_secret: tpm.encryption_secret.clone(),
            header_flags: c.header_flags,
        },
        nvram: c.nvram.clone(),
        files: c.files.iter().map(entry).collect(),
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
            restore::note_migrated_away(vm, &newest)?;
        }
        return Ok(Outcome::Unchanged {
            path: vm.dir().join(&newest),
            generation: newest,
        });
    }
    let nvram = files.iter().any(|c| c.role == "nvram");
    let n = files.len();
    let payload: Vec<(String, Vec<u8>)> =
        files.into_iter().map(|c| (c.name, c.data.bytes)).collect();
    let (generation, removed) = vm.add_generation(&payload, m, cfg.generations as usize)?;
    if migrated {
        restore::note_migrated_away(vm, &generation)?;
    }
    Ok(Outcome::Stored {
        path: vm.dir().join(&generation),
        generation,
        files: n,
        nvram,
        removed,
    })
}

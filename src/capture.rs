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
use crate::store::{Store, VmStore};
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

/// Read the swtpm state at `loc`. `Ok(None)` when there is none.
fn read_state(
    loc: &StateLocation,
    version: TpmVersion,
    max: u64,
) -> Result<Option<(Vec<Captured>, u16)>> {
    match loc {
        StateLocation::File(path) => {
            let Some(mut f) = fsutil::open_if_exists(path, false)? else {
                return Ok(None);
            };
            let data = fsutil::read_regular(&mut f, path, max)?;
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
        StateLocation::Dir(dir_path) => {
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
                let data = fsutil::read_regular(&mut f, &path, max)?;
                let name = n.to_string_lossy().into_owned();
                let is_permall = name == permall;
                let f_flags =
                    swtpm::check_blob(&data.bytes, is_permall && version == TpmVersion::V2_0)
                        .map_err(|why| {
                            Error::failed(format!("refusing {}: {why}", path.display()))
                        })?;
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
    }
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

fn read_nvram(path: &Path, max: u64) -> Result<Option<FileData>> {
    let Some(mut f) = fsutil::open_if_exists(path, false)? else {
        return Ok(None);
    };
    let d = fsutil::read_regular(&mut f, path, max)?;
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

/// The same, into a VM store the caller has locked exclusively.
pub fn capture_locked(
    cfg: &Config,
    vm: &VmStore,
    domain: &Domain,
    tpm: &Tpm,
    event: &Event,
    live_xml: &[u8],
) -> Result<Outcome> {
    let loc = StateLocation::of(&cfg.swtpm_dir, domain, tpm);
    let Some((mut files, header_flags)) = read_state(&loc, tpm.version, cfg.max_file_size)? else {
        return Ok(Outcome::NoState {
            path: loc.path().to_owned(),
        });
    };

    let mut nvram_info = None;
    if let Some(p) = &domain.nvram {
        let data = read_nvram(p, cfg.max_file_size)?;
        if data.is_none() {
            log::warn!(
                "vm={} uuid={}: NVRAM {} named by the domain does not exist; storing the TPM state without it",
                domain.name,
                domain.uuid,
                p.display()
            );
        }
        nvram_info = Some(NvramInfo {
            path: p.display().to_string(),
            template: domain.nvram_template.clone(),
            file: data.as_ref().map(|_| manifest::NVRAM.to_owned()),
        });
        if let Some(data) = data {
            files.push(Captured {
                name: manifest::NVRAM.into(),
                role: "nvram",
                source: Some(p.clone()),
                data,
            });
        }
    }

    let root_file = |bytes: Vec<u8>| FileData {
        bytes,
        mode: 0o600,
        uid: 0,
        gid: 0,
    };
    let (persistent, from) = match inactive_definition(cfg, domain, cfg.max_file_size) {
        Some((path, data)) => {
            files.push(Captured {
                name: manifest::DOMAIN_XML.into(),
                role: "domain",
                source: Some(path),
                data,
            });
            (true, "libvirt-config")
        }
        None => {
            let data = root_file(live_xml.to_vec());
            files.push(Captured {
                name: manifest::DOMAIN_XML.into(),
                role: "domain",
                source: None,
                data,
            });
            (false, "hook-stdin")
        }
    };
    files.push(Captured {
        name: manifest::DOMAIN_LIVE_XML.into(),
        role: "domain-live",
        source: None,
        data: root_file(live_xml.to_vec()),
    });

    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let m = Manifest {
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
        persistent,
        domain_xml_from: from.into(),
        tpm: TpmInfo {
            version: tpm.version.as_str().into(),
            model: tpm.model.clone(),
            state_type: loc.kind().into(),
            state_path: loc.path().display().to_string(),
            encryption_secret: tpm.encryption_secret.clone(),
            header_flags,
        },
        nvram: nvram_info,
        files: files.iter().map(entry).collect(),
    };

    crate::failpoint::hit("capture-after-read");

    // libvirt 10.5+ says why the VM stopped: after an outgoing migration
    // this host's copy goes stale, whatever generation holds it.
    let migrated = event.extra == "migrated";

    // An identical TPM + NVRAM state adds no generation (release after stopped).
    let gens = vm.generations()?;
    if let Some(newest) = gens.last() {
        if let Ok(prev) = vm.read_manifest(newest) {
            if prev.state_identity() == m.state_identity() {
                if migrated {
                    restore::note_migrated_away(vm, newest)?;
                }
                return Ok(Outcome::Unchanged {
                    generation: newest.clone(),
                    path: vm.dir().join(newest),
                });
            }
        }
    }

    let nvram = files.iter().any(|c| c.role == "nvram");
    let n = files.len();
    let payload: Vec<(String, Vec<u8>)> =
        files.into_iter().map(|c| (c.name, c.data.bytes)).collect();
    let (generation, removed) = vm.add_generation(&payload, &m, cfg.generations as usize)?;
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

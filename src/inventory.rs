//! What the store holds, as the operator's commands see it: VMs found by
//! name or UUID, and a summary of each.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::Config;
use crate::domain::{Domain, Uuid, MAX_XML_BYTES};
use crate::error::{Error, Result};
use crate::manifest::{Manifest, Role};
use crate::marks;
use crate::store::{Store, VmStore};

/// The schema version of every `--json` output.
pub const JSON_VERSION: u32 = 1;

/// libvirt's persistent definition of `name`, if it is the VM `uuid`.
pub fn libvirt_definition(cfg: &Config, name: &str, uuid: &str) -> Option<(PathBuf, Domain)> {
    if name.is_empty() || name.contains('/') {
        return None;
    }
    let path = cfg.libvirt_config_dir.join(format!("{name}.xml"));
    match read_domain_file(&path) {
        Ok(Some((_, d))) if d.uuid == uuid => Some((path, d)),
        _ => None,
    }
}

/// A domain XML file of libvirt's, read within `MAX_XML_BYTES` and
/// parsed, with its bytes; None when there is no such file.
pub fn read_domain_file(path: &Path) -> Result<Option<(Vec<u8>, Domain)>> {
    use std::io::Read;
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("open", path, e)),
    };
    let mut xml = Vec::new();
    f.take(MAX_XML_BYTES as u64 + 1)
        .read_to_end(&mut xml)
        .map_err(|e| Error::io("read", path, e))?;
    let domain = Domain::parse(&xml).map_err(|e| e.context(path.display()))?;
    Ok(Some((xml, domain)))
}

/// The `*.xml` files directly in libvirt's directory `dir`, sorted; none
/// when it is missing.
pub fn xml_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("read directory", dir, e)),
    };
    let mut v: Vec<_> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "xml"))
        .collect();
    v.sort();
    Ok(v)
}

/// The name recorded in a VM's newest readable manifest.
fn newest_manifest(vm: &VmStore, gens: &[String]) -> Option<(String, Manifest)> {
    gens.iter()
        .rev()
        .find_map(|g| vm.read_manifest(g).ok().map(|m| (g.clone(), m)))
}

fn newest_manifest_unlocked(dir: &Path) -> Option<(String, Manifest)> {
    let mut gens: Vec<String> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| crate::store::is_generation_name(n))
        .collect();
    gens.sort();
    gens.iter().rev().find_map(|g| {
        let bytes = std::fs::read(dir.join(g).join(crate::manifest::MANIFEST)).ok()?;
        Manifest::from_json(&bytes).ok().map(|m| (g.clone(), m))
    })
}

/// A VM argument (name or UUID) to the UUID of a VM in the store. An
/// unknown VM is a failure (exit 1); an ambiguous name is a usage error
/// (exit 2) that lists the candidates.
pub fn resolve(store: &Store, arg: &str) -> Result<Uuid> {
    if let Some(uuid) = Uuid::normalize(arg) {
        if store.vm_dir(&uuid).is_dir() {
            return Ok(uuid);
        }
        return Err(Error::failed(format!(
            "the store holds nothing for VM {uuid} ({})",
            store.root().display()
        )));
    }
    // No locks here: a generation is immutable once renamed into place,
    // and a VM whose lock is held must still be found by name.
    let mut found: Vec<(Uuid, String)> = Vec::new();
    for uuid in store.vm_uuids()? {
        if let Some((g, m)) = newest_manifest_unlocked(&store.vm_dir(&uuid)) {
            if m.name == arg {
                found.push((
                    uuid,
                    format!("newest generation {g}, captured {} on {}", m.time, m.host),
                ));
            }
        }
    }
    match found.len() {
        1 => Ok(found.remove(0).0),
        0 => Err(Error::failed(format!(
            "the store holds no VM named {arg:?} ({}); `swtpm-keeper list` shows what it holds",
            store.root().display()
        ))),
        _ => {
            let list: Vec<String> = found.iter().map(|(u, d)| format!("  {u}  ({d})")).collect();
            Err(Error::usage(format!(
                "{} VMs in the store are named {arg:?}; name one by its UUID:\n{}",
                found.len(),
                list.join("\n")
            )))
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Newest {
    pub generation: String,
    pub time: String,
    pub event: String,
    pub reason: String,
    pub host: String,
    /// Read from the running VM (`capture`), not at a stop.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub live: bool,
    /// The VM's state when it was read: `shutoff`, `running`, `paused`
    /// (absent before 0.2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm_state: Option<String>,
}

/// One row of `list`.
#[derive(Debug, Serialize)]
pub struct VmSummary {
    pub uuid: String,
    pub name: String,
    pub generations: usize,
    pub newest: Option<Newest>,
    pub total_bytes: u64,
    pub encrypted: bool,
    pub nvram: bool,
    pub migrated_away: bool,
    pub defined: bool,
    /// A refused restore left a generation behind (see `show`).
    pub protected: bool,
    /// Corrupt states found at `prepare`, kept as evidence (see `show`).
    pub evidence: usize,
    /// The remembered failed capture, until a good one clears it.
    pub failure: Option<crate::failure::Remembered>,
}

/// The generation named in `migrated-away.json`, if it is the newest
/// or newer: the VM's TPM lives on elsewhere.
pub fn migrated_away(vm: &VmStore, newest: Option<&str>) -> Option<String> {
    marks::migrated_away(vm, newest?)
}

pub fn summary(cfg: &Config, vm: &VmStore, uuid: &str) -> Result<VmSummary> {
    let gens = vm.generations()?;
    let newest = newest_manifest(vm, &gens);
    let name = newest
        .as_ref()
        .map(|(_, m)| m.name.clone())
        .unwrap_or_default();
    let total_bytes = vm.bytes_held(&gens);
    let migrated = migrated_away(vm, gens.last().map(String::as_str)).is_some();
    Ok(VmSummary {
        uuid: uuid.to_owned(),
        defined: libvirt_definition(cfg, &name, uuid).is_some(),
        generations: gens.len(),
        total_bytes,
        encrypted: newest
            .as_ref()
            .is_some_and(|(_, m)| m.tpm.encryption_secret.is_some()),
        nvram: newest
            .as_ref()
            .is_some_and(|(_, m)| m.files.iter().any(|f| f.role == Role::Nvram)),
        migrated_away: migrated,
        evidence: vm.evidence()?.len(),
        protected: marks::protections(vm)
            .is_ok_and(|p| p.iter().any(|p| gens.contains(&p.generation))),
        newest: newest.map(|(g, m)| Newest {
            generation: g,
            time: m.time,
            event: m.event,
            reason: m.reason,
            host: m.host,
            live: m.live,
            vm_state: m.vm_state,
        }),
        failure: Uuid::new(uuid).and_then(|u| crate::failure::read(cfg, &u)),
        name,
    })
}

/// "540.0 KiB"
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

#[cfg(test)]
mod tests {
    #[test]
    fn human_sizes() {
        assert_eq!(super::human_bytes(512), "512 B");
        assert_eq!(super::human_bytes(552_960), "540.0 KiB");
        assert_eq!(super::human_bytes(3 << 30), "3.0 GiB");
    }
}

//! `swtpm-keeper import <FILE|-> [--to <vm>] [--force]`: add the
//! generation an `export` archive holds to the store, as a capture adds
//! one. Everything is checked before the store changes; libvirt's files
//! are never touched (the next start restores it, or `restore`).

use std::io::Write;
use std::path::PathBuf;

use crate::archive::{self, Archived};
use crate::config::Config;
use crate::domain::{Domain, Uuid};
use crate::error::{Error, Result};
use crate::inventory;
use crate::logging::sanitize;
use crate::manifest::{self, FileEntry, Manifest, Origin, Role};
use crate::marks;
use crate::putback;
use crate::store::{Store, VmStore};
use crate::swtpm::{self, StateLocation};
use crate::users;

/// Where the archive's `domain.xml` and `domain-live.xml` are kept when
/// `domain.xml` becomes the target's definition.
pub const ORIGIN_DOMAIN_XML: &str = "origin-domain.xml";
pub const ORIGIN_DOMAIN_LIVE_XML: &str = "origin-domain-live.xml";

pub struct Request<'a> {
    /// A file, or `-` for stdin.
    pub source: &'a str,
    /// The VM defined here that gets the generation (name or UUID).
    pub to: Option<&'a str>,
    pub force: bool,
}

/// libvirt's definition of a VM on this host.
struct Defined {
    path: PathBuf,
    xml: Vec<u8>,
    domain: Domain,
}

pub fn run(cfg: &Config, req: &Request, out: &mut dyn Write) -> Result<i32> {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Error::failed(
            "import needs root: the store and libvirt's definitions belong to root; \
             run it with sudo",
        ));
    }
    let a = read_archive(cfg, req.source)?;
    let target = target(cfg, req.to, &a)?;
    let uuid = match &target {
        Some(t) => t.domain.uuid.clone(),
        None => a.uuid.clone(),
    };
    let store = Store::new(&cfg.store_dir);
    // A VM the store already has is locked now, for the checks and the
    // write; one it lacks is created only once every check passed.
    let existing = match store.vm_dir(&uuid).is_dir() {
        true => Some(store.open_vm(&uuid, cfg.lock_timeout())?),
        false => None,
    };
    if let Some(t) = &target {
        let marked = existing
            .as_ref()
            .filter(|_| uuid == a.uuid)
            .and_then(|vm| marks::migrated_away(vm, &a.generation.name))
            .is_some();
        check_target(&a, t, marked, cfg, req.force)?;
    }
    let (files, m) = stored(&a, target.as_ref());
    let vm = match existing {
        Some(vm) => vm,
        None => store.open_vm(&uuid, cfg.lock_timeout())?,
    };
    // Under the lock: a concurrent import of the same archive adds once.
    if let Some(g) = holds_already(cfg, &vm, &m) {
        let name = sanitize(&m.name);
        line(
            out,
            &format!("{g} unchanged {name}: the store holds this state already"),
        )?;
        return Ok(0);
    }
    let (generation, _) = vm.add_generation(&files, &m, cfg.generations as usize)?;
    report(&a, &m, &generation, out)?;
    if let Some(t) = &target {
        hint_if_state_exists(cfg, t);
    }
    Ok(0)
}

/// The VM that gets the generation, if libvirt defines it here: the one
/// `--to` names (which must be), else the archive's own.
fn target(cfg: &Config, to: Option<&str>, a: &Archived) -> Result<Option<Defined>> {
    let Some(arg) = to else {
        return defined(cfg, a.uuid.as_str());
    };
    let found = defined(cfg, arg)?.ok_or_else(|| {
        Error::failed(format!(
            "libvirt defines no VM {} here (in {}): define it first (virtnbdrestore -D \
             defines restore_<name>), or import without --to to keep the archive's UUID",
            sanitize(arg),
            cfg.libvirt_config_dir.display()
        ))
    })?;
    Ok(Some(found))
}

/// One line on stdout, one in syslog.
fn report(a: &Archived, m: &Manifest, generation: &str, out: &mut dyn Write) -> Result<()> {
    let o = &a.generation;
    let what = format!(
        "generation {} of {} ({}), captured {} on {}",
        o.name,
        sanitize(&o.manifest.name),
        a.uuid,
        o.manifest.time,
        sanitize(&o.manifest.host)
    );
    let nvram = m.files.iter().any(|f| f.role == Role::Nvram);
    let tpm = if nvram { "TPM and NVRAM" } else { "TPM" };
    log::info!(
        "vm={} uuid={} event=import: imported {what} as generation {generation}",
        sanitize(&m.name),
        m.uuid
    );
    line(
        out,
        &format!(
            "{generation} imported {}: {tpm} from {what}",
            sanitize(&m.name)
        ),
    )
}

fn line(out: &mut dyn Write, text: &str) -> Result<()> {
    writeln!(out, "{text}").map_err(|e| Error::failed(format!("cannot write the output: {e}")))
}

/// The archive, from a file or stdin, read within the capture's bounds.
fn read_archive(cfg: &Config, source: &str) -> Result<Archived> {
    let limits = archive::Limits::of(cfg);
    if source == "-" {
        let stdin = std::io::stdin().lock();
        if std::io::IsTerminal::is_terminal(&stdin) {
            return Err(Error::failed(
                "refusing to read an archive from a terminal: name the file, or pipe it in \
                 (swtpm-keeper import - < FILE)",
            ));
        }
        return archive::read(stdin, "on stdin", limits);
    }
    let f = std::fs::File::open(source)
        .map_err(|e| Error::failed(format!("cannot open the archive {source}: {e}")))?;
    archive::read(std::io::BufReader::new(f), source, limits)
}

/// libvirt's persistent definition of the VM `arg` (a name or UUID), if
/// this host has one.
fn defined(cfg: &Config, arg: &str) -> Result<Option<Defined>> {
    let dir = &cfg.libvirt_config_dir;
    let Some(uuid) = Uuid::normalize(arg) else {
        if arg.is_empty() || arg.contains('/') {
            return Ok(None);
        }
        let path = dir.join(format!("{arg}.xml"));
        return Ok(definition(path)?.filter(|d| d.domain.name == arg));
    };
    for p in inventory::xml_files(dir)? {
        // Another file that is no domain of ours does not stop the search.
        if let Ok(Some(d)) = definition(p) {
            if d.domain.uuid == uuid {
                return Ok(Some(d));
            }
        }
    }
    Ok(None)
}

/// The definition in `path`, if it is a file there.
fn definition(path: PathBuf) -> Result<Option<Defined>> {
    let read = inventory::read_domain_file(&path)?;
    Ok(read.map(|(xml, domain)| Defined { path, xml, domain }))
}

/// The restore's rules, as the hook will apply them at the next start:
/// the target has an emulator TPM, of the archive's version, with its
/// encryption secret and kind of state. `--force` overrides the secret
/// and the kind of state, as for `restore`; never a missing TPM or another
/// TPM version, which no start could use.
fn check_target(a: &Archived, t: &Defined, marked: bool, cfg: &Config, force: bool) -> Result<()> {
    let d = &t.domain;
    let Some(tpm) = &d.tpm else {
        return Err(Error::failed(format!(
            "refusing: VM {} ({}) has no emulator TPM, so nothing could use this TPM state; \
             give it one (virsh edit {}: <tpm model='tpm-crb'><backend type='emulator' \
             version='{}'/></tpm>) and import again",
            sanitize(&d.name),
            t.path.display(),
            sanitize(&d.name),
            a.generation.manifest.tpm.version
        )));
    };
    let was = a.generation.manifest.tpm.version;
    if was != tpm.version {
        // Not even with --force: swtpm would never read a state of the
        // other version (other file names, other format); the hook would
        // refuse it at every start.
        return Err(Error::failed(format!(
            "refusing: the archive holds a TPM {was} state, but VM {} has a TPM {}: it could \
             never use it; import it into a VM with a TPM {was} (<backend type='emulator' \
             version='{was}'/>)",
            sanitize(&d.name),
            tpm.version
        )));
    }
    let loc = StateLocation::of(&cfg.swtpm_dir, d, tpm);
    if let Err(r) = putback::check_rules_marked(marked, &a.generation, d, tpm, &loc) {
        if !force {
            // On a new host the usual cause: the secret is not defined yet.
            let was = &a.generation.manifest.tpm.encryption_secret;
            let hint = match was {
                Some(s) if *was != tpm.encryption_secret => format!(
                    "Define libvirt secret {s} here with its old value (virsh secret-define, \
                     secret-set-value) and point the VM's <encryption secret=...> at it, or add \
                     --force to import it anyway"
                ),
                _ => "Add --force to import it anyway".into(),
            };
            return Err(Error::failed(format!(
                "refusing to import into VM {}: {r}. {hint}",
                sanitize(&d.name)
            )));
        }
        log::warn!(
            "vm={} uuid={}: importing despite: {r} (--force)",
            sanitize(&d.name),
            d.uuid
        );
    }
    Ok(())
}

/// The files and manifest the store gets: the archive's, with where it
/// came from. With a target defined here, `domain.xml` is the target's
/// definition (`show --xml` gives the VM that owns the state now) and the
/// archive's XMLs are kept beside it as `origin-domain*.xml`.
fn stored(a: &Archived, target: Option<&Defined>) -> (Vec<(String, Vec<u8>)>, Manifest) {
    let o = &a.generation;
    let mut m = o.manifest.clone();
    let mut files: Vec<(String, Vec<u8>)> = o
        .files
        .iter()
        .filter(|(n, _)| n != manifest::MANIFEST)
        .cloned()
        .collect();
    let mut origin = Origin {
        uuid: a.uuid.to_string(),
        name: o.manifest.name.clone(),
        generation: o.name.clone(),
        host: users::host_name(),
        time: manifest::rfc3339(now()),
        domain_xml: m.imported_from.as_ref().and_then(|f| f.domain_xml.clone()),
    };
    if let Some(t) = target {
        files.retain(|(n, _)| n != ORIGIN_DOMAIN_XML && n != ORIGIN_DOMAIN_LIVE_XML);
        for (from, to) in [
            (manifest::DOMAIN_XML, ORIGIN_DOMAIN_XML),
            (manifest::DOMAIN_LIVE_XML, ORIGIN_DOMAIN_LIVE_XML),
        ] {
            m.files.retain(|f| f.name != from);
            if let Some(f) = files.iter_mut().find(|(n, _)| n == from) {
                f.0 = to.to_owned();
            }
        }
        origin.domain_xml = files
            .iter()
            .any(|(n, _)| n == ORIGIN_DOMAIN_XML)
            .then(|| ORIGIN_DOMAIN_XML.to_owned());
        own_definition(&mut m, &mut files, t, o);
    }
    m.imported_from = Some(origin);
    (files, m)
}

/// Make the manifest the target's: its UUID, name, definition and NVRAM
/// path (the state is the archive's).
fn own_definition(
    m: &mut Manifest,
    files: &mut Vec<(String, Vec<u8>)>,
    t: &Defined,
    o: &crate::store::Loaded,
) {
    let d = &t.domain;
    m.uuid = d.uuid.to_string();
    m.name = d.name.clone();
    m.persistent = true;
    m.domain_xml_from = "libvirt-config".into();
    if let (Some(info), Some(p)) = (m.nvram.as_mut(), putback::nvram_path(d, &o.manifest)) {
        info.path = p.display().to_string();
        info.template = d.nvram_template.clone();
    }
    m.files.push(FileEntry {
        name: manifest::DOMAIN_XML.into(),
        role: Role::Domain,
        source: Some(t.path.display().to_string()),
        size: t.xml.len() as u64,
        mode: "0600".into(),
        uid: 0,
        gid: 0,
        owner: Some("root".into()),
        group: Some("root".into()),
        sha256: manifest::sha256_hex(&t.xml),
        identity: None,
    });
    files.push((manifest::DOMAIN_XML.into(), t.xml.clone()));
}

/// The newest generation, if it holds this very state and verifies: an
/// archive imported twice adds nothing the second time (as a capture of
/// an unchanged state).
fn holds_already(cfg: &Config, vm: &VmStore, m: &Manifest) -> Option<String> {
    let newest = vm.generations().ok()?.pop()?;
    let prev = vm.read_manifest(&newest).ok()?;
    let same = prev.state_identity() == m.state_identity()
        && vm.load_verified(&newest, cfg.max_file_size).is_ok();
    same.then_some(newest)
}

/// The next start restores only a missing state: say what to do when the
/// target made a TPM of its own meanwhile.
fn hint_if_state_exists(cfg: &Config, t: &Defined) {
    let Some(tpm) = &t.domain.tpm else {
        return;
    };
    let permall = match StateLocation::of(&cfg.swtpm_dir, &t.domain, tpm) {
        StateLocation::Dir(d) => d.join(swtpm::permall_name(tpm.version)),
        StateLocation::File(f) => f,
    };
    if std::fs::symlink_metadata(&permall).is_ok() {
        let name = sanitize(&t.domain.name);
        let _ = writeln!(
            std::io::stderr(),
            "swtpm-keeper: {name} has a TPM state of its own at {}, which a start keeps; \
             to use the imported one: swtpm-keeper restore {name} --force",
            permall.display()
        );
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

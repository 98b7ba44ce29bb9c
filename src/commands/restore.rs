//! `swtpm-keeper restore <vm> [--generation G] [--force]`: the operator's
//! restore, with the hook's safety, and the way to override its refusals.

use std::io::Write;

use crate::capture::{self, Event, Outcome};
use crate::config::Config;
use crate::domain::{Domain, Tpm};
use crate::error::{Error, Result};
use crate::fsutil;
use crate::inventory;
use crate::manifest;
use crate::putback::{self, NvramOutcome};
use crate::qemuconf::QemuConf;
use crate::running;
use crate::store::{Loaded, Store, VmStore};
use crate::swtpm::{self, StateLocation};

/// Does a swtpm hold its lock in the state dir?
fn swtpm_holder(loc: &StateLocation) -> Option<i32> {
    let StateLocation::Dir(dir) = loc else {
        return None;
    };
    let f = fsutil::open_no_untrusted_links(&dir.join(swtpm::LOCK_FILE), false).ok()?;
    swtpm::fcntl_lock_holder(&f).ok().flatten()
}

pub fn run(
    cfg: &Config,
    vm_arg: &str,
    generation: Option<&str>,
    force: bool,
    out: &mut dyn Write,
) -> Result<i32> {
    let store = Store::new(&cfg.store_dir);
    let uuid = inventory::resolve(&store, vm_arg)?;
    let vm = store.open_vm(&uuid, cfg.lock_timeout())?;
    let gen = pick_generation(cfg, &vm, &uuid, generation)?;
    let t = Target::of(cfg, &gen, &uuid)?;
    let exists = check_target(cfg, &vm, &gen, &t, force)?;
    // Only what this capture stored may be replaced: with no TPM state
    // there is no capture, and an existing NVRAM stays.
    let captured = exists && capture_existing(cfg, &vm, &gen, &t, out)?;
    let qc = QemuConf::load(&cfg.qemu_conf);
    let nvram = putback::put_back(
        &vm,
        &gen,
        &t.domain,
        &t.loc,
        &qc.swtpm_owner(),
        &qc.qemu_owner(),
        putback::Replace {
            state: force && captured,
            nvram: force && captured,
            ..Default::default()
        },
    )?;
    report(cfg, &uuid, &gen, &t, &nvram, force && !captured, out)?;
    Ok(0)
}

/// The generation named, which must verify, or the newest that verifies.
fn pick_generation(
    cfg: &Config,
    vm: &VmStore,
    uuid: &str,
    generation: Option<&str>,
) -> Result<Loaded> {
    let gens = vm.generations()?;
    if gens.is_empty() {
        return Err(Error::failed(format!(
            "the store holds no generation for VM {uuid}"
        )));
    }
    match generation {
        Some(g) if !gens.iter().any(|x| x == g) => Err(Error::failed(format!(
            "VM {uuid} has no generation {g} (see `swtpm-keeper show {uuid}`)"
        ))),
        Some(g) => vm.load_verified(g, cfg.max_file_size).map_err(|why| {
            Error::failed(format!(
                "generation {g} fails verification: {why}; nothing restored"
            ))
        }),
        None => {
            let (l, skipped) = putback::newest_good(vm, &gens, cfg.max_file_size)
                .map_err(|r| Error::failed(format!("{r}; nothing restored")))?;
            for (g, why) in skipped {
                log::warn!(
                    "generation {g} fails verification ({why}); using {}",
                    l.name
                );
            }
            Ok(l)
        }
    }
}

/// Where the state goes: the domain as libvirt will start it, its TPM,
/// and where that TPM keeps its state.
struct Target {
    domain: Domain,
    tpm: Tpm,
    loc: StateLocation,
}

impl Target {
    /// The domain's definition here, else the stored one (an undefined VM
    /// about to be defined again, or transient).
    fn of(cfg: &Config, gen: &Loaded, uuid: &str) -> Result<Target> {
        let (mut domain, from) = match inventory::libvirt_definition(cfg, &gen.manifest.name, uuid)
        {
            Some((path, d)) => (d, path.display().to_string()),
            None => {
                let bytes = gen.file(manifest::DOMAIN_XML).unwrap_or_default();
                (
                    Domain::parse(bytes)?,
                    format!("the stored domain.xml of generation {}", gen.name),
                )
            }
        };
        let tpm = domain.tpm.clone().ok_or_else(|| {
            Error::failed(format!(
                "the domain ({from}) has no emulator TPM: nothing to restore into"
            ))
        })?;
        // With firmware auto-selection the definition may not name the NVRAM.
        domain.nvram = putback::nvram_path(&domain, &gen.manifest);
        let loc = StateLocation::of(&cfg.swtpm_dir, &domain, &tpm);
        Ok(Target { domain, tpm, loc })
    }
}

/// May the state go there: the VM and its swtpm stopped, the restore's
/// rules met (or overridden with --force), and an existing state replaced
/// only with --force. True when libvirt has a TPM state there.
fn check_target(cfg: &Config, vm: &VmStore, gen: &Loaded, t: &Target, force: bool) -> Result<bool> {
    let (domain, loc) = (&t.domain, &t.loc);
    if let Some(pid) = running::qemu_pid(&cfg.libvirt_run_dir, &domain.name) {
        return Err(Error::failed(format!(
            "VM {} is running (pid {pid}): stop it first (virsh shutdown)",
            domain.name
        )));
    }
    if let Some(pid) = swtpm_holder(loc) {
        return Err(Error::failed(format!(
            "a swtpm (pid {pid}) is using {}: stop the VM first",
            loc.path().display()
        )));
    }
    if let Err(r) = putback::check_rules(vm, gen, domain, &t.tpm, loc) {
        if !force {
            return Err(Error::failed(format!(
                "refusing: {r}. Add --force to restore it anyway"
            )));
        }
        log::warn!(
            "vm={} uuid={}: restoring despite: {r} (--force)",
            domain.name,
            domain.uuid
        );
    }
    let permall = match loc {
        StateLocation::Dir(d) => d.join(swtpm::permall_name(t.tpm.version)),
        StateLocation::File(f) => f.clone(),
    };
    let exists = std::fs::symlink_metadata(&permall).is_ok();
    if exists && !force {
        return Err(Error::failed(format!(
            "libvirt has a TPM state for {} at {}; restoring would replace it. Add --force: the existing \
             state is captured as a new generation first",
            domain.name,
            loc.path().display()
        )));
    }
    Ok(exists)
}

/// Keep what is there before replacing it, without pruning (the
/// generation being restored may be the oldest). True when it is stored.
fn capture_existing(
    cfg: &Config,
    vm: &VmStore,
    gen: &Loaded,
    t: &Target,
    out: &mut dyn Write,
) -> Result<bool> {
    let mut keep_all = cfg.clone();
    keep_all.generations = u32::MAX;
    let event = Event {
        op: "cli-restore".into(),
        sub_op: "replaced".into(),
        extra: "-".into(),
    };
    let live = gen.file(manifest::DOMAIN_LIVE_XML).unwrap_or_default();
    match capture::capture_locked(&keep_all, vm, &t.domain, &t.tpm, &event, live) {
        Ok(Outcome::Stored { generation, .. }) => {
            writeln!(out, "The existing state was captured first as generation {generation}.").ok();
            Ok(true)
        }
        Ok(Outcome::Unchanged { generation, .. }) => {
            writeln!(out, "The existing state is already stored as generation {generation}.").ok();
            Ok(true)
        }
        Ok(Outcome::NoState { .. }) => Ok(false),
        Err(e) => Err(Error::failed(format!(
            "cannot capture the existing state first, so nothing was replaced: {e}. If you are sure, \
             move {} aside yourself and run restore again",
            t.loc.path().display()
        ))),
    }
}

/// Say what was put back, in the log and to the operator. `kept_uncaptured`:
/// --force with no TPM state there, so an existing NVRAM was not captured.
fn report(
    cfg: &Config,
    uuid: &str,
    gen: &Loaded,
    t: &Target,
    nvram: &NvramOutcome,
    kept_uncaptured: bool,
    out: &mut dyn Write,
) -> Result<()> {
    let domain = &t.domain;
    let nv = match nvram {
        NvramOutcome::Restored(p) => format!(" and NVRAM into {}", p.display()),
        NvramOutcome::KeptExisting(p) if kept_uncaptured => format!(
            " (NVRAM {} exists and was kept: with no TPM state there, nothing was captured \
             with it; move it aside and restore again to replace it)",
            p.display()
        ),
        NvramOutcome::KeptExisting(p) => format!(" (NVRAM {} exists, kept)", p.display()),
        NvramOutcome::None => String::new(),
    };
    let m = &gen.manifest;
    let line = format!(
        "restored TPM {} state from generation {} (captured {} on {} at {}) into {}{nv}",
        m.tpm.version,
        gen.name,
        m.time,
        m.host,
        m.event,
        t.loc.path().display()
    );
    log::info!("vm={} uuid={uuid} event=cli-restore: {line}", domain.name);
    writeln!(out, "{}: {line}.", domain.name).map_err(|e| Error::failed(e.to_string()))?;
    if inventory::libvirt_definition(cfg, &domain.name, uuid).is_none() {
        writeln!(out, "libvirt does not define {} here; to bring it back: swtpm-keeper show {uuid} --xml > {}.xml && virsh define {}.xml", domain.name, domain.name, domain.name).ok();
    }
    Ok(())
}

//! `swtpm-keeper capture <vm>... | --all`: add a generation for VMs that
//! run, read without getting in their way (see `live`), and for a stopped
//! VM named here, as a stop would. The timer runs `capture --all`.

use std::io::Write;

use crate::capture::{self, Event, Outcome};
use crate::config::Config;
use crate::domain::{Domain, Uuid};
use crate::error::{Error, Result};
use crate::failure;
use crate::inventory;
use crate::logging::sanitize;
use crate::running::{self, RunningVm};
use crate::store::Store;

/// What became of one VM.
enum Done {
    /// The generation that holds its state now, and what was done.
    Kept(Outcome),
    /// Nothing to do, and why (`--all` skips VMs without an emulator TPM
    /// silently: `None`).
    Skipped(Option<String>),
}

pub fn run(cfg: &Config, vms: &[String], all: bool, out: &mut dyn Write) -> Result<i32> {
    let names = if all {
        running::names(&cfg.libvirt_run_dir)?
    } else {
        vms.to_vec()
    };
    let mut failed = 0;
    for arg in &names {
        let line = match capture_one(cfg, arg, all) {
            Ok(Done::Kept(o)) => Some(outcome_line(arg, &o)),
            Ok(Done::Skipped(why)) => why.map(|w| format!("- skipped {}: {w}", sanitize(arg))),
            Err(e) => {
                // The CLI's logger also shows it on stderr.
                log::error!(
                    "vm={} event=capture/live: TPM state NOT captured: {e}",
                    sanitize(arg)
                );
                failed += 1;
                None
            }
        };
        if let Some(l) = line {
            writeln!(out, "{l}")
                .map_err(|e| Error::failed(format!("cannot write the output: {e}")))?;
        }
    }
    // The timer's pass also writes the Prometheus file (see there why a
    // failure to write it fails the pass).
    if all && !super::metrics::write_after_pass(cfg) {
        failed += 1;
    }
    Ok(if failed > 0 { 1 } else { 0 })
}

/// Capture the VM `arg` (a name, or a UUID the store knows), as it is now.
fn capture_one(cfg: &Config, arg: &str, all: bool) -> Result<Done> {
    let name = vm_name(cfg, arg)?;
    match running::read(&cfg.libvirt_run_dir, &name)? {
        Some(vm) => capture_running(cfg, &vm, all),
        None if all => Ok(Done::Skipped(Some("it stopped meanwhile".into()))),
        None => capture_stopped(cfg, &name),
    }
}

/// A name as given; a UUID is looked up in the store's newest manifest.
fn vm_name(cfg: &Config, arg: &str) -> Result<String> {
    if Uuid::normalize(arg).is_none() {
        return Ok(arg.to_owned());
    }
    let store = Store::new(&cfg.store_dir);
    let uuid = inventory::resolve(&store, arg)?;
    let vm = store.read_vm(&uuid, cfg.lock_timeout())?;
    let s = inventory::summary(cfg, &vm, &uuid)?;
    Ok(s.name)
}

fn capture_running(cfg: &Config, vm: &RunningVm, all: bool) -> Result<Done> {
    if vm.domain.tpm.is_none() {
        let why = "it has no emulator TPM".to_owned();
        return Ok(Done::Skipped((!all).then_some(why)));
    }
    if vm.status.incoming() {
        let why = "an incoming migration is still bringing its TPM state".into();
        return Ok(Done::Skipped(Some(why)));
    }
    let result = keep_running(cfg, vm);
    failure::settle(cfg, &vm.domain, "capture", &result);
    let outcome = result?;
    log_outcome(&vm.domain, "capture/live", &outcome);
    Ok(Done::Kept(outcome))
}

/// The state of a VM that runs, kept (or found unchanged).
fn keep_running(cfg: &Config, vm: &RunningVm) -> Result<Outcome> {
    let store = Store::new(&cfg.store_dir);
    let uuid = &vm.domain.uuid;
    // Unchanged VMs (most, most of the time) under a shared lock only.
    if store.vm_dir(uuid).is_dir() {
        let shared = store.read_vm(uuid, cfg.lock_timeout())?;
        if let Some(unchanged) = capture::unchanged_running(cfg, &shared, vm)? {
            return Ok(unchanged);
        }
    }
    let locked = store.open_vm(uuid, cfg.lock_timeout())?;
    capture::capture_running(cfg, &locked, vm)
}

/// A VM that does not run is captured as at a stop, from libvirt's
/// definition of it (swtpm's lock is checked: a live state is refused).
fn capture_stopped(cfg: &Config, name: &str) -> Result<Done> {
    let path = cfg.libvirt_config_dir.join(format!("{name}.xml"));
    let xml = std::fs::read(&path).map_err(|e| {
        Error::failed(format!(
            "VM {name:?} does not run here and libvirt defines no such VM ({}: {e})",
            path.display()
        ))
    })?;
    let domain = Domain::parse(&xml).map_err(|e| e.context(path.display()))?;
    let Some(tpm) = domain.tpm.clone() else {
        return Ok(Done::Skipped(Some("it has no emulator TPM".into())));
    };
    let event = Event {
        op: "capture".into(),
        sub_op: "-".into(),
        extra: "-".into(),
    };
    let result = capture::capture(cfg, &domain, &tpm, &event, &xml);
    failure::settle(cfg, &domain, "capture", &result);
    let outcome = result?;
    log_outcome(&domain, "capture/-", &outcome);
    Ok(Done::Kept(outcome))
}

/// One syslog line for a generation added; nothing at info otherwise.
fn log_outcome(d: &Domain, event: &str, o: &Outcome) {
    let who = format!("vm={} uuid={} event={event}", d.name, d.uuid);
    match o {
        Outcome::Stored {
            generation,
            path,
            files,
            nvram,
            ..
        } => log::info!(
            "{who}: captured TPM state{} of the {} VM as generation {generation} ({files} files) in {}",
            if *nvram { " and NVRAM" } else { "" },
            if event == "capture/live" { "running" } else { "stopped" },
            path.display()
        ),
        Outcome::Unchanged { generation, .. } => {
            log::debug!("{who}: TPM state unchanged since generation {generation}")
        }
        Outcome::NoState { path } => {
            log::debug!("{who}: no TPM state at {}", path.display())
        }
    }
}

/// The line printed for a VM: the generation that holds its state first.
fn outcome_line(arg: &str, o: &Outcome) -> String {
    let arg = sanitize(arg);
    match o {
        Outcome::Stored {
            generation, nvram, ..
        } => format!(
            "{generation} captured {arg}: TPM{}",
            if *nvram { " and NVRAM" } else { "" }
        ),
        Outcome::Unchanged {
            generation, unread, ..
        } => format!(
            "{generation} unchanged {arg}: {}",
            if *unread {
                "no file changed, nothing read"
            } else {
                "the same state"
            }
        ),
        Outcome::NoState { path } => {
            format!("- nothing {arg}: no TPM state at {}", path.display())
        }
    }
}

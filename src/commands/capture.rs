//! `swtpm-keeper capture <vm>... | --all`: add a generation for VMs that
//! run, read without getting in their way (see `live`), and for a stopped
//! VM named here, as a stop would. The timer runs `capture --all`. With
//! `--pause`, each running VM is held paused around its read (`pause`).

use std::io::Write;
use std::time::Duration;

use crate::capture::{self, Event, Outcome};
use crate::config::Config;
use crate::domain::{Domain, Uuid};
use crate::error::{Error, Result};
use crate::inventory;
use crate::logging::sanitize;
use crate::pause::Pause;
use crate::running::{self, RunningVm};
use crate::store::Store;

/// What became of one VM.
enum Done {
    /// The generation that holds its state now, what was done, and how
    /// the VM was paused for it.
    Kept(Outcome, Pausing),
    /// Nothing to do, and why (`--all` skips VMs without an emulator TPM
    /// silently: `None`).
    Skipped(Option<String>),
}

/// Whether a capture held the VM paused.
#[derive(Clone, Copy)]
enum Pausing {
    /// Not asked to (or nothing ran to pause).
    No,
    /// `--pause`, and the VM was paused already: it stays paused.
    Already,
    /// `--pause`: this capture held it paused that long.
    For(Duration),
}

impl Pausing {
    /// For the output line and the log: "" or "; ...".
    fn note(self) -> String {
        match self {
            Pausing::No => String::new(),
            Pausing::Already => "; the VM was paused already and stays paused".into(),
            Pausing::For(d) => format!("; VM paused for {} ms", d.as_millis()),
        }
    }
}

/// `pause`: hold each running VM paused around its read, at most that long.
pub fn run(
    cfg: &Config,
    vms: &[String],
    all: bool,
    pause: Option<Duration>,
    out: &mut dyn Write,
) -> Result<i32> {
    let names = if all {
        running::names(&cfg.libvirt_run_dir)?
    } else {
        vms.to_vec()
    };
    let mut failed = 0;
    for arg in &names {
        let line = match capture_one(cfg, arg, all, pause) {
            Ok(Done::Kept(o, p)) => Some(outcome_line(arg, &o) + &p.note()),
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
    Ok(if failed > 0 { 1 } else { 0 })
}

/// Capture the VM `arg` (a name, or a UUID the store knows), as it is now.
fn capture_one(cfg: &Config, arg: &str, all: bool, pause: Option<Duration>) -> Result<Done> {
    let name = vm_name(cfg, arg)?;
    match running::read(&cfg.libvirt_run_dir, &name)? {
        Some(vm) => capture_running(cfg, &vm, all, pause),
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

fn capture_running(
    cfg: &Config,
    vm: &RunningVm,
    all: bool,
    pause: Option<Duration>,
) -> Result<Done> {
    if vm.domain.tpm.is_none() {
        let why = "it has no emulator TPM".to_owned();
        return Ok(Done::Skipped((!all).then_some(why)));
    }
    if vm.status.incoming() {
        let why = "an incoming migration is still bringing its TPM state".into();
        return Ok(Done::Skipped(Some(why)));
    }
    let paused = vm.status.state == "paused";
    let pausing = match pause {
        Some(limit) if !paused => return capture_paused(cfg, vm, limit),
        Some(_) => Pausing::Already,
        None => Pausing::No,
    };
    let store = Store::new(&cfg.store_dir);
    let uuid = &vm.domain.uuid;
    // Unchanged VMs (most, most of the time) under a shared lock only.
    if store.vm_dir(uuid).is_dir() {
        let shared = store.read_vm(uuid, cfg.lock_timeout())?;
        if let Some(unchanged) = capture::unchanged_running(cfg, &shared, vm)? {
            return Ok(Done::Kept(unchanged, pausing));
        }
    }
    let locked = store.open_vm(uuid, cfg.lock_timeout())?;
    let outcome = capture::capture_running(cfg, &locked, vm)?;
    let state = vm.status.state.as_str();
    log_outcome(&vm.domain, "capture/live", state, &outcome, pausing);
    Ok(Done::Kept(outcome, pausing))
}

/// `--pause` of a running VM: its store locked first (the VM is never
/// paused while this waits), then paused, read, resumed, and only then
/// stored. libvirt's status must say `paused` once suspended: else the
/// read would be no point in time, and nothing is captured.
fn capture_paused(cfg: &Config, vm: &RunningVm, limit: Duration) -> Result<Done> {
    let d = &vm.domain;
    let locked = Store::new(&cfg.store_dir).open_vm(&d.uuid, cfg.lock_timeout())?;
    let mut pause = Pause::begin(&d.uuid, &d.name, limit)?;
    let now = match running::read(&cfg.libvirt_run_dir, &d.name)? {
        Some(now) if now.status.state == "paused" && now.domain.uuid == d.uuid => now,
        other => {
            let state = other.map_or("not running".into(), |v| v.status.state);
            return Err(Error::failed(format!(
                "VM {} is {state}, not paused, after `virsh suspend {}`: nothing captured \
                 (it is resumed); check that virsh reaches this libvirt (LIBVIRT_DEFAULT_URI)",
                d.name, d.uuid
            )));
        }
    };
    let mut window = Duration::ZERO;
    let outcome = capture::capture_running_then(cfg, &locked, &now, &mut || {
        window = pause.end()?;
        Ok(())
    })?;
    let pausing = Pausing::For(window);
    log_outcome(d, "capture/live", "paused", &outcome, pausing);
    if let Outcome::Unchanged { .. } = outcome {
        // Not logged at info otherwise: a pause is worth a line.
        log::info!(
            "vm={} uuid={} event=capture/live: TPM state unchanged{}",
            d.name,
            d.uuid,
            pausing.note()
        );
    }
    Ok(Done::Kept(outcome, pausing))
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
    let outcome = capture::capture(cfg, &domain, &tpm, &event, &xml)?;
    log_outcome(&domain, "capture/-", "stopped", &outcome, Pausing::No);
    Ok(Done::Kept(outcome, Pausing::No))
}

/// One syslog line for a generation added; nothing at info otherwise.
/// `state`: the VM's, as libvirt's status said when it was read.
fn log_outcome(d: &Domain, event: &str, state: &str, o: &Outcome, pausing: Pausing) {
    let who = format!("vm={} uuid={} event={event}", d.name, d.uuid);
    match o {
        Outcome::Stored {
            generation,
            path,
            files,
            nvram,
            ..
        } => log::info!(
            "{who}: captured TPM state{} of the {} VM as generation {generation} ({files} files) in {}{}",
            if *nvram { " and NVRAM" } else { "" },
            sanitize(state),
            path.display(),
            pausing.note()
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

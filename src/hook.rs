//! The libvirt QEMU hook protocol: `<hook> <domain> <op> <sub-op> <extra>`
//! with the domain XML on stdin.
//!
//! The contract: nothing ever goes to stdout (on `migrate` and `restore` it
//! would replace the domain XML); libvirt is never called back; every wait
//! has a deadline; a stop never fails (exit 0 after logging why); events
//! with nothing to do return at once, without reading stdin (libvirt
//! ignores the EPIPE of a hook that does not read its input), loading the
//! configuration, or touching syslog.

use std::io::Read;
use std::path::{Component, Path};

use std::io::Write;

use crate::capture::{self, Event, Outcome};
use crate::config::{self, Config, OnRefusal, Source};
use crate::domain::{Domain, Tpm, MAX_XML_BYTES};
use crate::error::Error;
use crate::failure;
use crate::logging;
use crate::marks;
use crate::putback::{self, NvramOutcome, Outcome as PutBackOutcome};

/// libvirt's arguments after the program name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookArgs {
    pub name: String,
    pub op: String,
    pub sub_op: String,
    pub extra: String,
}

impl HookArgs {
    /// libvirt passes four arguments; a missing part is `-`. Fewer are
    /// tolerated (a hand-run hook), more are ignored.
    pub fn from_args(args: &[String]) -> HookArgs {
        let get = |i: usize| args.get(i).cloned().unwrap_or_else(|| "-".into());
        HookArgs {
            name: get(0),
            op: get(1),
            sub_op: get(2),
            extra: get(3),
        }
    }
}

/// Whether the program was started by libvirt as a hook: as `…/hooks/qemu`
/// or as any file inside a `…/hooks/qemu.d/` directory. Decided from
/// argv[0] as given, so a symlink installed there counts.
pub fn invoked_as_hook(argv0: &Path) -> bool {
    let comps: Vec<&std::ffi::OsStr> = argv0
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n),
            _ => None,
        })
        .collect();
    match comps.as_slice() {
        [.., parent, file] if *file == "qemu" && *parent == "hooks" => true,
        [.., parent, _file] if *parent == "qemu.d" => true,
        _ => false,
    }
}

/// What the hook does for an (op, sub-op) pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `stopped end`, `release end`: keep the state.
    Capture,
    /// `prepare begin`: put a lost state back before swtpm starts.
    PutBack,
    /// `migrate begin`, `restore begin`: the state arrives in the stream;
    /// remember not to restore an old copy at the `prepare` that follows.
    NoteIncoming,
    /// Everything else: exit 0 at once.
    Ignore,
}

pub fn action(op: &str, sub_op: &str) -> Action {
    match (op, sub_op) {
        ("stopped", "end") | ("release", "end") => Action::Capture,
        ("prepare", "begin") => Action::PutBack,
        ("migrate", "begin") | ("restore", "begin") => Action::NoteIncoming,
        _ => Action::Ignore,
    }
}

/// Run the hook; returns the exit code for libvirt.
pub fn run(args: &HookArgs, source: &Source, stdin: &mut dyn Read) -> i32 {
    let action = action(&args.op, &args.sub_op);
    if action == Action::Ignore {
        return 0;
    }
    let Some(job) = Job::prepare(args, source, stdin) else {
        return 0;
    };
    match action {
        // Never fail a stop: libvirt ignores it, and nothing would improve.
        Action::Capture => job.capture(),
        Action::NoteIncoming => job.note_incoming(),
        Action::PutBack => return job.put_back(),
        Action::Ignore => {}
    }
    0
}

fn read_input(stdin: &mut dyn Read) -> Result<Vec<u8>, String> {
    let mut buf = Vec::with_capacity(16 * 1024);
    stdin
        .take(MAX_XML_BYTES as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("cannot read the domain XML on stdin: {e}"))?;
    if buf.len() > MAX_XML_BYTES {
        return Err(format!(
            "the domain XML on stdin is over {MAX_XML_BYTES} bytes"
        ));
    }
    Ok(buf)
}

/// Load the configuration and point logging at it. Only called once there
/// is work (or an error worth logging).
fn load_config(source: &Source) -> crate::error::Result<Config> {
    let cfg = source.load()?;
    logging::configure(cfg.syslog_socket.clone(), cfg.log_level.filter());
    Ok(cfg)
}

/// An event with work to do: a domain with an emulator TPM, and the
/// configuration loaded.
struct Job<'a> {
    args: &'a HookArgs,
    xml: Vec<u8>,
    domain: Domain,
    tpm: Tpm,
    cfg: Config,
    /// Where `cfg` came from, for the operator.
    source: &'a Source,
    /// "vm=NAME uuid=UUID event=OP/SUB reason=EXTRA", for every log line.
    who: String,
}

impl<'a> Job<'a> {
    /// Read and check the input. None when there is nothing to do, or
    /// when it cannot be done (then the reason is logged).
    fn prepare(args: &'a HookArgs, source: &'a Source, stdin: &mut dyn Read) -> Option<Job<'a>> {
        let ev = format!("{}/{}", args.op, args.sub_op);
        let fail = |what: String| -> Option<Job<'a>> {
            // Point logging at the configured socket if the file is readable.
            let _ = load_config(source);
            log::error!("vm={} event={ev}: {what}; nothing done", args.name);
            None
        };
        let xml = match read_input(stdin) {
            Ok(x) => x,
            Err(e) => return fail(e),
        };
        let domain = match Domain::parse(&xml) {
            Ok(d) => d,
            Err(e) => return fail(format!("cannot use the domain XML on stdin: {e}")),
        };
        let Some(tpm) = domain.tpm.clone() else {
            log::debug!(
                "vm={} uuid={} event={ev}: no emulator TPM, nothing to do",
                domain.name,
                domain.uuid
            );
            return None;
        };
        // Session daemons run the hook as their user: there is no system
        // state to keep and no right to the system store.
        if !nix::unistd::geteuid().is_root() && std::env::var_os(config::ENV_VAR).is_none() {
            log::debug!(
                "vm={} event={ev}: not root (session libvirt?); swtpm-keeper keeps system VMs only",
                domain.name
            );
            return None;
        }
        let who = format!(
            "vm={} uuid={} event={ev} reason={}",
            domain.name, domain.uuid, args.extra
        );
        let cfg = match load_config(source) {
            Ok(c) => c,
            Err(e) => {
                log::error!("{who}: {e}; nothing done: fix the configuration");
                return None;
            }
        };
        Some(Job {
            args,
            xml,
            domain,
            tpm,
            cfg,
            source,
            who,
        })
    }

    fn event(&self) -> Event {
        Event {
            op: self.args.op.clone(),
            sub_op: self.args.sub_op.clone(),
            extra: self.args.extra.clone(),
        }
    }

    /// `stopped`/`release`: keep the state, then settle the marks that
    /// decide what a later start on this host does.
    fn capture(&self) {
        let result = capture::capture(&self.cfg, &self.domain, &self.tpm, &self.event(), &self.xml);
        // Remembered: the stop succeeds, and only syslog would tell.
        failure::settle(&self.cfg, &self.domain, &self.args.op, &result);
        // A stored or unchanged state got the migrated mark with it.
        let marked = matches!(
            result,
            Ok(Outcome::Stored { .. } | Outcome::Unchanged { .. })
        );
        self.log_capture(result);
        if self.args.extra == "migrated" && !marked {
            self.mark_migrated_away();
        }
        self.clear_incoming();
    }

    fn log_capture(&self, result: crate::error::Result<Outcome>) {
        let who = &self.who;
        match result {
            Ok(Outcome::Stored {
                generation,
                path,
                files,
                nvram,
                removed,
            }) => {
                let pruned = if removed.is_empty() {
                    String::new()
                } else {
                    format!(", pruned {}", removed.join(" "))
                };
                log::info!(
                    "{who}: captured TPM {} state{} as generation {generation} ({files} files) in {}{pruned}",
                    self.tpm.version.as_str(),
                    if nvram { " and NVRAM" } else { "" },
                    path.display()
                );
            }
            // Nothing done (a release after its stop, or a VM whose swtpm
            // never ran): nothing at info, but for the migrated mark, which
            // decides what a later start here does.
            Ok(Outcome::Unchanged {
                generation, path, ..
            }) if self.args.extra == "migrated" => {
                log::info!(
                    "{who}: TPM state unchanged since generation {generation}, now marked as migrated away: \
                     it will not be restored on this host ({})",
                    path.display()
                );
            }
            Ok(Outcome::Unchanged {
                generation, path, ..
            }) => {
                log::debug!(
                    "{who}: TPM state unchanged since generation {generation}, nothing added ({})",
                    path.display()
                );
            }
            Ok(Outcome::NoState { path }) => {
                log::debug!(
                    "{who}: no TPM state at {}, nothing captured",
                    path.display()
                );
            }
            Err(e) => {
                log::error!(
                    "{who}: TPM state NOT captured: {e}; the store keeps what it had in {}",
                    self.cfg.store_dir.join(&self.domain.uuid).display()
                );
            }
        }
    }

    /// A stop with reason `migrated` that stored nothing: the copies kept
    /// here are stale all the same.
    fn mark_migrated_away(&self) {
        match marks::mark_migrated_away(&self.cfg, &self.domain) {
            Ok(Some(generation)) => log::info!(
                "{}: generation {generation} marked as migrated away: it will not be restored on this host",
                self.who
            ),
            Ok(None) => {}
            Err(e) => log::error!(
                "{}: could not mark the stored state as migrated away: {e}; if the VM starts here with its state gone, the stale copy may be restored",
                self.who
            ),
        }
    }

    /// A stop ends any incoming migration or restore noted on this host,
    /// whether or not its `prepare` ran.
    fn clear_incoming(&self) {
        match marks::clear_incoming(&self.cfg, &self.domain) {
            Ok(true) => log::info!(
                "{}: cleared this host's incoming mark: the incoming migration or restore ended; the next start restores as usual",
                self.who
            ),
            Ok(false) => {}
            Err(e) => log::warn!(
                "{}: could not clear this host's incoming mark: {e}; a start within {} s may not restore",
                self.who,
                marks::INCOMING_WINDOW_SECS
            ),
        }
    }

    fn note_incoming(&self) {
        match marks::note_incoming(&self.cfg, &self.domain, &self.args.op) {
            Ok(true) => log::info!(
                "{}: incoming TPM state (it arrives in the {} stream); the prepare that follows will not restore",
                self.who,
                if self.args.op == "migrate" { "migration" } else { "save image" }
            ),
            Ok(false) => log::debug!(
                "{}: incoming TPM state; the store holds nothing for this VM, nothing noted",
                self.who
            ),
            Err(e) => log::error!(
                "{}: could not note the incoming state: {e}; if libvirt's state dir is empty at prepare, an old copy may be restored",
                self.who
            ),
        }
    }

    /// Exit code: 1 aborts the start (libvirt shows our stderr).
    fn put_back(&self) -> i32 {
        let who = &self.who;
        match putback::at_prepare(&self.cfg, &self.domain, &self.tpm) {
            Ok(PutBackOutcome::Restored {
                generation,
                manifest: m,
                path,
                nvram,
                skipped,
                mended,
            }) => {
                for (g, why) in &skipped {
                    log::warn!(
                        "{who}: generation {g} fails verification ({why}); used an older one"
                    );
                }
                let nv = match &nvram {
                    NvramOutcome::Restored(p) => format!(" and NVRAM into {}", p.display()),
                    NvramOutcome::KeptExisting(p) => {
                        format!(" (NVRAM {} exists, kept)", p.display())
                    }
                    NvramOutcome::None => String::new(),
                };
                let restored = format!(
                    "restored TPM {} state from generation {generation} (captured {} on {} {}) into {}{nv}",
                    m.tpm.version,
                    m.time,
                    m.host,
                    m.taken(),
                    path.display()
                );
                match mended {
                    Some(md) => log::warn!(
                        "{who}: libvirt's TPM state at {} was corrupt ({}): kept it as evidence in {}, never restored; {restored}",
                        path.display(),
                        md.why,
                        md.evidence.display()
                    ),
                    None => log::info!("{who}: {restored}"),
                }
                0
            }
            Ok(PutBackOutcome::Incoming { event, age_secs }) => {
                log::info!(
                    "{who}: not restoring: the TPM state arrives with the incoming {event} (noted {age_secs} s ago)"
                );
                0
            }
            Ok(PutBackOutcome::Nothing(why)) => {
                log::debug!("{who}: nothing to restore: {why}");
                0
            }
            Err(r) => self.refused(&r),
        }
    }

    /// A restore that must not happen: say why and what to do; abort the
    /// start, or let it go on with a new TPM and protect the refused state.
    fn refused(&self, r: &Error) -> i32 {
        let who = &self.who;
        let fix = r.fix().unwrap_or_default();
        let abort = self.cfg.on_refusal == OnRefusal::Abort;
        let then = if abort {
            "the start is aborted (on_refusal = \"abort\")"
        } else {
            "libvirt starts it with a new TPM (on_refusal = \"continue\")"
        };
        log::error!(
            "{who}: TPM state NOT restored: {}; {then}. To fix: {}",
            r,
            fix
        );
        if abort {
            let _ = writeln!(
                std::io::stderr(),
                "swtpm-keeper: refusing to start {} with a new TPM: {}. To fix: {}. (Or set on_refusal = \"continue\" in {} to start with a new TPM.)",
                logging::sanitize(&self.domain.name),
                r,
                fix,
                self.source.path.display()
            );
            return 1;
        }
        self.protect_refused(&r.to_string());
        0
    }

    /// The VM starts with a new TPM: keep the refused state from being
    /// pushed out of the store by the new TPM's generations.
    fn protect_refused(&self, why: &str) {
        let (cfg, uuid) = (&self.cfg, &self.domain.uuid);
        let store = crate::store::Store::new(&cfg.store_dir);
        match store.protect_refused(uuid, cfg.lock_timeout(), cfg.max_file_size, why) {
            Ok(Some(g)) => log::warn!(
                "{}: generation {g} is kept until an operator removes it: swtpm-keeper prune --vm {uuid} --generation {g}",
                self.who
            ),
            Ok(None) => {}
            Err(e) => log::error!("{}: could not protect the refused state from retention: {e}", self.who),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hook_names_that_libvirt_uses() {
        assert!(invoked_as_hook(Path::new("/etc/libvirt/hooks/qemu")));
        assert!(invoked_as_hook(Path::new(
            "/etc/libvirt/hooks/qemu.d/swtpm-keeper"
        )));
        assert!(invoked_as_hook(Path::new(
            "/etc/libvirt/hooks/qemu.d/50-anything"
        )));
        assert!(!invoked_as_hook(Path::new("/usr/sbin/swtpm-keeper")));
        assert!(!invoked_as_hook(Path::new("swtpm-keeper")));
        assert!(!invoked_as_hook(Path::new("/usr/bin/qemu")));
        assert!(!invoked_as_hook(Path::new("/etc/libvirt/hooks/lxc")));
    }

    #[test]
    fn dispatch_rules() {
        assert_eq!(action("stopped", "end"), Action::Capture);
        assert_eq!(action("release", "end"), Action::Capture);
        assert_eq!(action("prepare", "begin"), Action::PutBack);
        assert_eq!(action("migrate", "begin"), Action::NoteIncoming);
        assert_eq!(action("restore", "begin"), Action::NoteIncoming);
        for (op, sub) in [
            ("start", "begin"),
            ("started", "begin"),
            ("reconnect", "begin"),
            ("attach", "begin"),
            ("stopped", "begin"),
            ("bogus", "-"),
        ] {
            assert_eq!(action(op, sub), Action::Ignore, "{op} {sub}");
        }
    }

    #[test]
    fn missing_arguments_become_dashes() {
        let a = HookArgs::from_args(&["vm".into(), "stopped".into()]);
        assert_eq!(a.sub_op, "-");
        assert_eq!(a.extra, "-");
    }
}

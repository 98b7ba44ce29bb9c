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

use crate::capture::{self, Event, Outcome};
use crate::config::{self, Config};
use crate::domain::{Domain, MAX_XML_BYTES};
use crate::logging;

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
    /// Everything else: exit 0 at once.
    Ignore,
}

pub fn action(op: &str, sub_op: &str) -> Action {
    match (op, sub_op) {
        ("stopped", "end") | ("release", "end") => Action::Capture,
        _ => Action::Ignore,
    }
}

/// Run the hook; returns the exit code for libvirt.
pub fn run(args: &HookArgs, stdin: &mut dyn Read) -> i32 {
    match action(&args.op, &args.sub_op) {
        Action::Ignore => 0,
        Action::Capture => {
            on_stop(args, stdin);
            // Never fail a stop: libvirt ignores it, and nothing would improve.
            0
        }
    }
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
fn load_config() -> Result<Config, String> {
    let path = config::path_from_env();
    let cfg = Config::load(&path).map_err(|e| e.to_string())?;
    logging::configure(cfg.syslog_socket.clone(), cfg.log_level.filter());
    Ok(cfg)
}

fn on_stop(args: &HookArgs, stdin: &mut dyn Read) {
    let ev = format!("{}/{}", args.op, args.sub_op);
    let fail = |what: String| {
        // Point logging at the configured socket if the file is readable.
        let _ = load_config();
        log::error!("vm={} event={ev}: {what}; nothing captured", args.name);
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
        return;
    };
    // Session daemons run the hook as their user: there is no system state
    // to keep and no right to the system store. Say so only at debug level.
    if unsafe { libc::geteuid() } != 0 && std::env::var_os(config::ENV_VAR).is_none() {
        log::debug!(
            "vm={} event={ev}: not root (session libvirt?); swtpm-keeper keeps system VMs only",
            domain.name
        );
        return;
    }
    let cfg = match load_config() {
        Ok(c) => c,
        Err(e) => {
            log::error!(
                "vm={} uuid={} event={ev}: {e}; TPM state NOT captured: fix the configuration",
                domain.name,
                domain.uuid
            );
            return;
        }
    };
    let event = Event {
        op: args.op.clone(),
        sub_op: args.sub_op.clone(),
        extra: args.extra.clone(),
    };
    let who = format!(
        "vm={} uuid={} event={ev} reason={}",
        domain.name, domain.uuid, args.extra
    );
    match capture::capture(&cfg, &domain, &tpm, &event, &xml) {
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
                tpm.version.as_str(),
                if nvram { " and NVRAM" } else { "" },
                path.display()
            );
        }
        Ok(Outcome::Unchanged { generation, path }) => {
            log::info!(
                "{who}: TPM state unchanged since generation {generation}, nothing added ({})",
                path.display()
            );
        }
        Ok(Outcome::NoState { path }) => {
            log::info!(
                "{who}: no TPM state at {}, nothing captured",
                path.display()
            );
        }
        Err(e) => {
            log::error!(
                "{who}: TPM state NOT captured: {e}; the store keeps what it had in {}",
                cfg.store_dir.join(&domain.uuid).display()
            );
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
    fn only_stop_events_capture() {
        assert_eq!(action("stopped", "end"), Action::Capture);
        assert_eq!(action("release", "end"), Action::Capture);
        for (op, sub) in [
            ("prepare", "begin"),
            ("start", "begin"),
            ("started", "begin"),
            ("migrate", "begin"),
            ("restore", "begin"),
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

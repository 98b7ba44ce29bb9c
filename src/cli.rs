//! The command line: `swtpm-keeper <command> [args]`.

use crate::error::{Error, Result};
use crate::hook::HookArgs;

pub const USAGE: &str = "\
swtpm-keeper - keep every libvirt VM's vTPM (swtpm) state and UEFI NVRAM

USAGE:
    swtpm-keeper hook <domain> <op> <sub-op> <extra>   (run as libvirt runs a hook)
    swtpm-keeper --help | --version

As a libvirt hook, install it (or a symlink to it) as
/etc/libvirt/hooks/qemu.d/swtpm-keeper, or as /etc/libvirt/hooks/qemu
for libvirt older than 6.5, and restart libvirtd. It then captures the
TPM state of every VM at each stop (events `stopped end` and
`release end`) into the store, and ignores every other event.

Configuration: /etc/swtpm-keeper/swtpm-keeper.conf, or the file named by
SWTPM_KEEPER_CONFIG. Log lines go to syslog (facility daemon, ident
swtpm-keeper). See swtpm-keeper(8) and swtpm-keeper.conf(5).

EXIT STATUS: 0 success, 1 failure or refusal, 2 usage or configuration error.
As a hook, stop events always exit 0.
";

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Help,
    Version,
    Hook(HookArgs),
}

pub fn parse(args: &[String]) -> Result<Command> {
    let Some(first) = args.first() else {
        return Err(Error::usage("no command given (try --help)"));
    };
    match first.as_str() {
        "-h" | "--help" | "help" => Ok(Command::Help),
        "-V" | "--version" | "version" => Ok(Command::Version),
        "hook" => {
            let rest = &args[1..];
            if rest.len() < 2 || rest.len() > 4 {
                return Err(Error::usage(
                    "usage: swtpm-keeper hook <domain> <op> <sub-op> <extra>",
                ));
            }
            Ok(Command::Hook(HookArgs::from_args(rest)))
        }
        other => Err(Error::usage(format!(
            "unknown command {other:?} (try --help)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn parses_commands() {
        assert_eq!(parse(&s(&["--help"])).unwrap(), Command::Help);
        assert_eq!(parse(&s(&["--version"])).unwrap(), Command::Version);
        match parse(&s(&["hook", "vm", "stopped", "end", "-"])).unwrap() {
            Command::Hook(h) => assert_eq!((h.name.as_str(), h.op.as_str()), ("vm", "stopped")),
            c => panic!("{c:?}"),
        }
    }

    #[test]
    fn bad_usage_is_a_usage_error() {
        for a in [
            vec![],
            s(&["frobnicate"]),
            s(&["hook"]),
            s(&["hook", "a", "b", "c", "d", "e"]),
        ] {
            assert_eq!(parse(&a).unwrap_err().kind, crate::error::Kind::Usage);
        }
    }
}

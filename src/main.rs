//! Parse, start logging, dispatch, map errors to an exit code.

#![deny(clippy::too_many_lines)] // as in lib.rs: 80 lines at most (clippy.toml)

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use swtpm_keeper::cli::{self, Command, Invocation};
use swtpm_keeper::config::Source;
use swtpm_keeper::error::{Kind, Result};
use swtpm_keeper::{commands, hook, logging};

fn main() -> ExitCode {
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_default();
    let args: Vec<String> = args.map(|a| a.to_string_lossy().into_owned()).collect();

    // Installed as a libvirt hook, argv is libvirt's; else it is ours.
    let inv = if hook::invoked_as_hook(Path::new(&argv0)) {
        Ok(Invocation {
            command: Command::Hook(hook::HookArgs::from_args(&args)),
            config: None,
        })
    } else {
        cli::parse_invocation(&args)
    };
    // The hook logs to syslog only; the CLI also shows warnings on stderr.
    logging::init(!matches!(
        inv,
        Ok(Invocation {
            command: Command::Hook(_),
            ..
        })
    ));

    match inv.and_then(|inv| dispatch(inv.command, &Source::new(inv.config))) {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "swtpm-keeper: {e}");
            ExitCode::from(match e.kind {
                Kind::Usage => 2,
                Kind::Failed | Kind::Refused { .. } => 1,
            })
        }
    }
}

/// Run one command; Ok carries the exit code. The hook and `check` load
/// the configuration themselves (the hook only once there is work, `check`
/// reporting a broken file as a finding); the other commands need it valid.
fn dispatch(cmd: Command, source: &Source) -> Result<i32> {
    let cfg = || commands::load_config(source);
    let out = || std::io::stdout().lock();
    match cmd {
        Command::Help(text) => {
            print!("{text}");
            Ok(0)
        }
        Command::Version => {
            println!("swtpm-keeper {}", env!("CARGO_PKG_VERSION"));
            Ok(0)
        }
        Command::Hook(h) => Ok(hook::run(&h, source, &mut std::io::stdin().lock())),
        Command::Check { json } => commands::check::run(source, json, &mut out()),
        Command::List { json } => commands::list::run(&cfg()?, json, &mut out()),
        Command::Show { vm, json, xml } => commands::show::run(&cfg()?, &vm, json, xml, &mut out()),
        Command::Verify { vms } => commands::verify::run(&cfg()?, &vms, &mut out()),
        Command::Restore {
            vm,
            generation,
            force,
        } => commands::restore::run(&cfg()?, &vm, generation.as_deref(), force, &mut out()),
        Command::Prune {
            keep,
            older_than_days,
            vms,
            generations,
            dry_run,
        } => {
            let req = commands::prune::Request {
                keep,
                older_than_days,
                vms: &vms,
                generations: &generations,
                dry_run,
            };
            commands::prune::run(&cfg()?, &req, &mut out())
        }
        Command::Capture { vms, all, pause } => {
            let pause = pause.map(std::time::Duration::from_secs);
            commands::capture::run(&cfg()?, &vms, all, pause, &mut out())
        }
        Command::Export {
            vm,
            generation,
            output,
        } => {
            let req = commands::export::Request {
                vm: &vm,
                generation: generation.as_deref(),
                output: output.as_deref(),
            };
            let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
            commands::export::run(&cfg()?, &req, tty, &mut out())
        }
        Command::Import { source, to, force } => {
            let req = commands::import::Request {
                source: &source,
                to: to.as_deref(),
                force,
            };
            commands::import::run(&cfg()?, &req, &mut out())
        }
        Command::Metrics { output } => {
            commands::metrics::run(&cfg()?, output.as_deref(), &mut out())
        }
    }
}

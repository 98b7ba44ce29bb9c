//! Parse, start logging, dispatch, map errors to an exit code.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use swtpm_keeper::cli::{self, Command};
use swtpm_keeper::error::{Kind, Result};
use swtpm_keeper::{commands, config, hook, logging};

fn main() -> ExitCode {
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_default();
    let args: Vec<String> = args.map(|a| a.to_string_lossy().into_owned()).collect();

    // Installed as a libvirt hook, argv is libvirt's; else it is ours.
    let cmd = if hook::invoked_as_hook(Path::new(&argv0)) {
        Ok(Command::Hook(hook::HookArgs::from_args(&args)))
    } else {
        cli::parse_invocation(&args).map(|inv| {
            if let Some(p) = inv.config {
                config::set_path(p);
            }
            inv.command
        })
    };
    // The hook logs to syslog only; the CLI also shows warnings on stderr.
    logging::init(!matches!(cmd, Ok(Command::Hook(_))));

    match cmd.and_then(dispatch) {
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

/// Run one command; Ok carries the exit code.
fn dispatch(cmd: Command) -> Result<i32> {
    match cmd {
        Command::Help(text) => {
            print!("{text}");
            Ok(0)
        }
        Command::Version => {
            println!("swtpm-keeper {}", env!("CARGO_PKG_VERSION"));
            Ok(0)
        }
        Command::Hook(h) => Ok(hook::run(&h, &mut std::io::stdin().lock())),
        Command::Check => commands::check::run(&mut std::io::stdout().lock()),
        cmd => {
            let cfg = commands::load_config()?;
            let out = &mut std::io::stdout().lock();
            match cmd {
                Command::List { json } => commands::list::run(&cfg, json, out),
                Command::Show { vm, json, xml } => commands::show::run(&cfg, &vm, json, xml, out),
                Command::Verify { vms } => commands::verify::run(&cfg, &vms, out),
                Command::Restore {
                    vm,
                    generation,
                    force,
                } => commands::restore::run(&cfg, &vm, generation.as_deref(), force, out),
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
                    commands::prune::run(&cfg, &req, out)
                }
                Command::Capture { vms, all } => commands::capture::run(&cfg, &vms, all, out),
                Command::Help(_) | Command::Version | Command::Hook(_) | Command::Check => {
                    unreachable!()
                }
            }
        }
    }
}

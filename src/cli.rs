//! The command line: `swtpm-keeper <command> [options]`. Hand-rolled (no
//! argument-parsing dependency): a few commands with a few flags each.

use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::hook::HookArgs;

pub const USAGE: &str = "\
swtpm-keeper - keep every libvirt VM's vTPM (swtpm) state and UEFI NVRAM

USAGE:
    swtpm-keeper [--config FILE] <command> [options]

COMMANDS:
    list                  every VM in the store: generations, newest capture, size, flags
    show <vm>             one VM's generations, files and checksums; --xml prints domain.xml
    verify [<vm>...]      check every generation against SHA256SUMS and swtpm's header rules
    restore <vm>          put a stored state back into libvirt's paths for a stopped VM
    prune                 remove old generations (--keep N, --older-than DAYS, --generation G)
    capture <vm>... | --all
                          add a generation for running VMs (the timer runs --all)
    export <vm>           one generation as a tar archive, for backups (-o FILE or stdout)
    import <FILE|->       add an exported generation to the store (--to VM: to another VM)
    check                 is the hook installed and active, the store sound, every TPM kept?
    metrics [-o FILE]     every VM's TPM protection for Prometheus (textfile collector)
    hook <domain> <op> <sub-op> <extra>
                          run as libvirt runs the hook (domain XML on stdin)

<vm> is a VM's name or UUID. `swtpm-keeper <command> --help` says more.

As a libvirt hook, the program is installed (or linked) as
/etc/libvirt/hooks/qemu.d/swtpm-keeper (or /etc/libvirt/hooks/qemu for
libvirt older than 6.5). It captures every VM's TPM state at each stop,
and puts a lost state back at the next start. See swtpm-keeper(8).

Configuration: /etc/swtpm-keeper/swtpm-keeper.conf, or the file named by
--config FILE (before or after the command) or SWTPM_KEEPER_CONFIG; see
swtpm-keeper.conf(5).

EXIT STATUS: 0 fine; 1 a problem found, or refused; 2 usage or
configuration error. As a hook, stop events always exit 0.
";

const LIST_HELP: &str = "\
swtpm-keeper list [--json]

Every VM the store holds states for: name, UUID, number of generations,
the newest capture's time and event, the VM's state when it was read
(STATE: shutoff, running or paused; `-` for captures before 0.2), the
host it was taken on, the total size, and flags:
  encrypted  the newest state is encrypted (<encryption secret=...>)
  nvram      the newest generation holds the UEFI vars file
  migrated   the newest state was captured when the VM migrated away
  defined    libvirt on this host defines the VM (its config dir has it)
  protected  a refused restore left a generation that retention keeps
  corrupt-evidence
             a corrupt TPM state found at prepare is kept (see `show`)
  live       the newest generation was read from the running VM
  capture-failed
             the last capture failed (at a stop, or from `capture`); a
             line under the table says when and why. A good capture
             clears it.

--json prints {\"version\": 1, \"vms\": [...]} for scripts; see
swtpm-keeper(8) for the schema.
";

const SHOW_HELP: &str = "\
swtpm-keeper show <vm> [--json] [--xml [GENERATION]]

A VM's generations, newest first: capture time, host, event and shutoff
reason, TPM version and encryption secret, and each file with its size,
original mode and owner, and SHA-256. A failed last capture (when, at
which event, why; cleared by the next good capture) and corrupt TPM
states that a start replaced (kept as evidence, never restored) are
listed first.

--json        the same as JSON ({\"version\": 1, ...})
--xml [GEN]   print only the stored domain.xml of GEN (default: the
              newest), which `virsh define` accepts:
                swtpm-keeper show win11 --xml > win11.xml && virsh define win11.xml
";

const CAPTURE_HELP: &str = "\
swtpm-keeper capture <vm>... [--pause [--pause-limit SECONDS]] | --all

Add a generation for each named VM, or with --all for every running VM
with an emulator TPM on this host, whose TPM state (or NVRAM) changed
since the newest good generation. The hook captures at every stop; this
keeps the TPM of VMs that run for months, so that a lost host loses at
most the changes since the last pass. swtpm-keeper-capture.timer runs
`capture --all` every 5 minutes.

A running VM is found in libvirt's status files (libvirt_run_dir), never
by calling libvirt, and read without touching swtpm or QEMU: each file is
read until two reads agree (swtpm replaces its files by rename; QEMU
writes the UEFI vars in place). A VM whose state is still arriving (an
incoming migration) is skipped. A file whose identity (inode, size,
times) did not change since the last pass is not read again, so a pass
over VMs that did not change reads no state and writes nothing. A
stopped VM named here is captured as at a stop. A paused VM (libvirt's
status says `paused`) writes nothing: each file is read once, and the
generation is one point in time (the manifest's vm_state says `paused`).

--pause               hold each named running VM paused around its read,
                      for a TPM state and NVRAM of one point in time (as a
                      backup wants): `virsh suspend <uuid>`, read, `virsh
                      resume <uuid>`, then store. virsh connects to its
                      default (qemu:///system as root), or to
                      LIBVIRT_DEFAULT_URI. The VM is resumed on every path:
                      an error, SIGINT/SIGTERM/SIGHUP (then the signal ends
                      the command, nothing stored), the limit below. A VM
                      paused already stays paused (no suspend, no resume).
                      The line ends `; VM paused for N ms` (from the
                      suspend's start to the resume's end), as the syslog
                      line does. Not with --all.
--pause-limit SECONDS the longest the VM may stay paused (default 10): past
                      it the VM is resumed and nothing is stored; a virsh
                      suspend that has not answered by then is killed.

One line per VM on stdout, starting with the generation that holds its
state now (`-` when none):
  00000007-20261201T101500Z captured win11 (5a5a...): running, TPM and NVRAM
  00000007-20261201T101500Z unchanged win11 (5a5a...): nothing read

Retention: live captures never push out the newest generation taken at a
stop, nor a protected one (see prune).

Exit 0 when every VM was captured, unchanged or skipped; 1 when any
failed (after trying all), with the reason on stderr and in syslog.
With --all, it then writes metrics_file for Prometheus (see `metrics
--help`); a file that cannot be written also makes the exit 1.
";

const VERIFY_HELP: &str = "\
swtpm-keeper verify [<vm>...]

Check every generation of the named VMs (default: all) against its
SHA256SUMS, its manifest, and swtpm's header rules. Prints one line per
generation; exits 1 if any is bad. Corrupt states kept as evidence are
listed as `evidence` lines; they never change the exit code.
";

const RESTORE_HELP: &str = "\
swtpm-keeper restore <vm> [--generation GEN] [--force]

Put a stored state (default: the newest generation that verifies) back
into libvirt's paths for a stopped VM: the swtpm state, and the UEFI vars
file if it is missing. Then start the VM.

It refuses while the VM or its swtpm runs. It refuses to replace an
existing TPM state, and it refuses a state that the hook would refuse
(captured when the VM migrated away, another encryption secret, another
TPM version), unless --force is given.

--generation GEN  restore this generation (see `swtpm-keeper show <vm>`)
--force           replace an existing state and NVRAM, and override the
                  refusals. The existing state and its NVRAM are first
                  captured as a new generation, so a restore never loses
                  anything. An NVRAM with no TPM state beside it is kept
                  (nothing could be captured with it): move it aside to
                  replace it.
";

const PRUNE_HELP: &str = "\
swtpm-keeper prune [--keep N] [--older-than DAYS] [--vm VM]... [--dry-run]
swtpm-keeper prune --vm VM --generation GEN... [--dry-run]

Remove generations beyond the hook's own retention (`generations` in the
configuration). At least one of --keep and --older-than is needed, or
--generation.

--keep N           keep the newest N generations of each VM
--older-than DAYS  remove generations captured more than DAYS days ago
--vm VM            only this VM (repeatable); default: every VM
--generation GEN   remove exactly this generation of the one VM named
                   with --vm (repeatable), whatever the rules below say;
                   also a corrupt state kept as evidence (corrupt-...),
                   which no rule ever removes
--dry-run          say what would be removed, remove nothing

The rules keep every VM restorable. --keep and --older-than remove only a
VM's oldest generations, in capture order: a generation counts as older
than DAYS only if every generation captured before it does too, so a
clock that stepped back never makes a newer one go before an older one.
They never remove the newest generation that verifies (nor a newer one),
and never a protected one: the generation a refused restore left behind
when the VM started with a new TPM (on_refusal = \"continue\"); `show`
marks it. Protected generations do not count against --keep. To remove
one of these, name it with --vm VM --generation GEN.
";

const EXPORT_HELP: &str = "\
swtpm-keeper export <vm> [--generation GEN] [-o FILE]

Write one generation (default: the newest that verifies) as a tar archive
for a backup: under <uuid>/<generation>/, its manifest.json, SHA256SUMS,
swtpm's files, the NVRAM and domain.xml (and domain-live.xml), exactly as
stored. It is verified first; a damaged generation is refused, naming the
newest good one. `import` reads it back, on this host or another.

The archive is the same, byte for byte, every time and on every host:
ustar headers, entries sorted by name, every time the capture's, owner
0:0 without names, mode 0700 for the two directories and 0600 for files.

-o FILE           write FILE (mode 0600) through a temporary, fsynced and
                  renamed into place; prints one line:
                    00000007-20261201T101500Z exported win11 (5a5a...) to FILE
                  Without -o (or with -o -) the archive goes to stdout, and
                  nothing else does; a terminal is refused.
--generation GEN  this generation (see `swtpm-keeper show <vm>`)

Restore on a new host: swtpm-keeper import FILE [--to VM], then start the VM.
";

const IMPORT_HELP: &str = "\
swtpm-keeper import <FILE|-> [--to VM] [--force]

Add the generation an `export` archive holds (FILE, or with - stdin, not a
terminal) to
the store, as a capture adds one: the next number in the VM's sequence,
written through a temporary, fsynced and renamed into place. Its manifest
records where it came from (imported_from: the archive's VM, generation,
and this host and time). libvirt's files are not touched: the next start
of the VM puts the state back when the VM has none (as after a lost
host); for a VM that made a TPM of its own meanwhile, run
`swtpm-keeper restore VM --force`.

--to VM   a VM that libvirt defines on this host (name or UUID), such as
          the restore_<name> that `virtnbdrestore -D` defines with a new
          UUID: the generation goes to that VM. Its domain.xml is then that
          VM's definition; the archive's is kept as origin-domain.xml.
          Without --to the generation goes to the archive's UUID.
--force   import despite the restore's refusals: another <encryption
          secret>, another kind of state, or a state taken when the VM
          migrated away. A VM without an emulator TPM, or with a TPM of
          another version, is always refused: no start could use it.

Everything is verified before the store changes: only regular files
under one <uuid>/<generation>/, no links, devices, absolute or `..`
paths, no duplicates, at most max_file_size per file and
max_generation_size in all, the manifest, every checksum, swtpm's
header rules. A refused import exits 1 and leaves the store as it was.
Importing the same state again adds nothing. Prints one line:
  00000003-20261201T101500Z imported restore_win11: TPM and NVRAM from ...
  00000003-20261201T101500Z unchanged restore_win11: the store holds this state already
Needs root.
";

const CHECK_HELP: &str = "\
swtpm-keeper check [--json]

Is everything in place, and is every TPM protected? One line per check,
`ok`, `warn` or `FIX` with what to do: the configuration, the hook where
this host's libvirt looks for it (a link to this program, or a copy of
it: judged by the version the copy embeds, never by running it; another
version is `warn`), the running libvirt daemon (a hook installed after it
started is used only after a reload), the store's ownership and mode,
syslog, the owners restored files will get from qemu.conf, and the
capture timer.

Then every VM libvirt defines with an emulator TPM (libvirt_config_dir)
or runs (the status files in libvirt_run_dir, transient VMs too), read
without calling libvirt: its newest good generation and its age; FIX
when it was never captured, when its last capture failed (with the
reason), when its <encryption secret> is not among libvirt's secrets, or
when its newest generation was captured under another secret; warn when
a running VM's state was last confirmed more than max_capture_age ago.
\"Good\" here means complete, with a sound manifest and every listed
file present at its size; `verify` checks the bytes. A summary line
follows: VMs with a TPM, protected, stale, never captured, failing.

--json   the same findings as {\"version\": 1, \"findings\": [...],
         \"vms\": [...], ...}; see swtpm-keeper(8) for the schema.

Exits 1 if any line says FIX.

`warn` marks what cannot be told for sure. A reload leaves no trace, so a
daemon older than the hook is `ok` only if the install's own reload of it
is recorded (in /run/swtpm-keeper/reloaded); after a reload by hand it
stays `warn`.
";

const METRICS_HELP: &str = "\
swtpm-keeper metrics [-o FILE]

What protects each VM's TPM, in the Prometheus text format for
node_exporter's textfile collector: one series per VM that libvirt
defines with an emulator TPM, or forgot after a failed capture (labels
vm and uuid), and the store's totals:
  swtpm_keeper_vm_last_capture_timestamp_seconds   newest good capture (0: never)
  swtpm_keeper_vm_generations, swtpm_keeper_vm_bytes
  swtpm_keeper_vm_capture_failure_timestamp_seconds
                                                   remembered failure (0: none)
  swtpm_keeper_vm_protected                        1 if `check` finds it safe
  swtpm_keeper_vm_verdict                          1, with `check`'s verdict in
                                                   a third label (verdict=\"stale\")
  swtpm_keeper_vms                                 VMs with an emulator TPM
  swtpm_keeper_store_vms, swtpm_keeper_store_generations,
  swtpm_keeper_store_bytes                         what the store holds
  swtpm_keeper_metrics_timestamp_seconds           when this was written

-o, --output FILE  replace FILE whole (a temporary beside it, then a
                   rename, mode 0644), e.g.
                   /var/lib/prometheus/node-exporter/swtpm-keeper.prom;
                   default: print to stdout

The capture timer (`capture --all`) writes metrics_file after each pass;
see swtpm-keeper.conf(5). Setup, alert rules and what each alert means:
/usr/share/doc/swtpm-keeper/monitoring.md and examples/swtpm-keeper.rules.yml.
";

const HOOK_HELP: &str = "\
swtpm-keeper hook <domain> <op> <sub-op> <extra>

Run as libvirt runs a QEMU hook, with the domain XML on stdin. The same
happens when the program is run as .../hooks/qemu or from .../hooks/qemu.d/.
stopped/end, release/end: capture; prepare/begin: restore a lost state;
migrate/begin, restore/begin: note an incoming state; others: nothing.
Every argument after `hook` is libvirt's, also one that looks like an
option (a VM may be named --help); only `hook --help` alone shows this.
";

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Help(&'static str),
    Version,
    Hook(HookArgs),
    List {
        json: bool,
    },
    Show {
        vm: String,
        json: bool,
        xml: Option<Option<String>>,
    },
    Verify {
        vms: Vec<String>,
    },
    Restore {
        vm: String,
        generation: Option<String>,
        force: bool,
    },
    Prune {
        keep: Option<usize>,
        older_than_days: Option<u64>,
        vms: Vec<String>,
        generations: Vec<String>,
        dry_run: bool,
    },
    Check {
        json: bool,
    },
    Metrics {
        output: Option<PathBuf>,
    },
    Capture {
        vms: Vec<String>,
        all: bool,
        /// `--pause`: hold each VM paused around its read, at most this
        /// many seconds (`--pause-limit`).
        pause: Option<u64>,
    },
    Export {
        vm: String,
        generation: Option<String>,
        output: Option<PathBuf>,
    },
    Import {
        source: String,
        to: Option<String>,
        force: bool,
    },
}

/// A command line: the command, and the configuration file `--config` named.
#[derive(Debug, PartialEq, Eq)]
pub struct Invocation {
    pub config: Option<PathBuf>,
    pub command: Command,
}

/// Take `--config FILE` (or `--config=FILE`, `-c FILE`) out of `args`, then
/// parse the rest. It goes before the command, or anywhere after it but for
/// `hook`, whose arguments are libvirt's and taken as they come.
pub fn parse_invocation(args: &[String]) -> Result<Invocation> {
    let mut config = None;
    let mut rest = Vec::with_capacity(args.len());
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let in_hook_args = rest.first().is_some_and(|c: &String| c == "hook");
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_owned())),
            _ => (arg.as_str(), None),
        };
        if in_hook_args || !matches!(name, "--config" | "-c") {
            rest.push(arg.clone());
            continue;
        }
        let v = match inline {
            Some(v) => v,
            None => it
                .next()
                .cloned()
                .ok_or_else(|| Error::usage("--config needs a file (try --help)"))?,
        };
        if v.is_empty() {
            return Err(Error::usage("--config needs a file (try --help)"));
        }
        if config.replace(PathBuf::from(v)).is_some() {
            return Err(Error::usage("--config given twice (try --help)"));
        }
    }
    Ok(Invocation {
        config,
        command: parse(&rest)?,
    })
}

fn usage(cmd: &str, msg: impl std::fmt::Display) -> Error {
    Error::usage(format!("{msg} (see `swtpm-keeper {cmd} --help`)"))
}

/// `--name value` or `--name=value`.
fn value(
    cmd: &str,
    name: &str,
    inline: Option<String>,
    rest: &mut std::slice::Iter<String>,
) -> Result<String> {
    match inline {
        Some(v) => Ok(v),
        None => rest
            .next()
            .cloned()
            .ok_or_else(|| usage(cmd, format!("{name} needs a value"))),
    }
}

fn number<T: std::str::FromStr>(cmd: &str, name: &str, v: &str) -> Result<T> {
    v.parse()
        .map_err(|_| usage(cmd, format!("{name} takes a whole number, not {v:?}")))
}

pub fn parse(args: &[String]) -> Result<Command> {
    let Some(first) = args.first() else {
        return Err(Error::usage("no command given (try --help)"));
    };
    let cmd = first.as_str();
    let help = match cmd {
        "-h" | "--help" => return Ok(Command::Help(USAGE)),
        "help" => {
            return Ok(Command::Help(match args.get(1).map(String::as_str) {
                None => USAGE,
                Some(c) => help_of(c)
                    .ok_or_else(|| Error::usage(format!("no command {c:?} (try --help)")))?,
            }))
        }
        "-V" | "--version" | "version" => return Ok(Command::Version),
        c => {
            help_of(c).ok_or_else(|| Error::usage(format!("unknown command {c:?} (try --help)")))?
        }
    };
    let rest = &args[1..];
    if cmd == "hook" {
        return parse_hook(rest);
    }
    if rest.iter().any(|a| a == "-h" || a == "--help") {
        return Ok(Command::Help(help));
    }
    let opts = Options::parse(cmd, rest)?;
    build(cmd, opts)
}

/// After `hook`, every argument is libvirt's, taken as it comes: a VM may
/// be named `--help`. Only `hook --help` alone asks for help (libvirt
/// always passes four arguments).
fn parse_hook(rest: &[String]) -> Result<Command> {
    if let [only] = rest {
        if only == "-h" || only == "--help" {
            return Ok(Command::Help(HOOK_HELP));
        }
    }
    if rest.len() < 2 || rest.len() > 4 {
        return Err(usage("hook", "hook takes <domain> <op> <sub-op> <extra>"));
    }
    Ok(Command::Hook(HookArgs::from_args(rest)))
}

/// The options and arguments of the commands but `hook`, as given.
#[derive(Default)]
struct Options {
    json: bool,
    force: bool,
    dry_run: bool,
    xml: Option<Option<String>>,
    generation: Option<String>,
    keep: Option<usize>,
    older: Option<u64>,
    vms: Vec<String>,
    /// prune's `--generation`s.
    named: Vec<String>,
    all: bool,
    pause: bool,
    pause_limit: Option<u64>,
    output: Option<PathBuf>,
    to: Option<String>,
    positional: Vec<String>,
}

impl Options {
    fn parse(cmd: &str, rest: &[String]) -> Result<Options> {
        let mut o = Options::default();
        let mut it = rest.iter();
        while let Some(arg) = it.next() {
            let (name, inline) = match arg.split_once('=') {
                Some((n, v)) if n.starts_with("--") => (n, Some(v.to_owned())),
                _ => (arg.as_str(), None),
            };
            match (cmd, name) {
                ("list" | "show" | "check", "--json") => o.json = true,
                ("show", "--xml") => {
                    // The generation is optional: `--xml=GEN`, or a generation name next.
                    let next = it
                        .as_slice()
                        .first()
                        .filter(|n| crate::store::is_generation_name(n))
                        .cloned();
                    if next.is_some() {
                        it.next();
                    }
                    o.xml = Some(inline.or(next));
                }
                ("import", "--to") => o.to = Some(value(cmd, name, inline, &mut it)?),
                ("import", "--force" | "-f") => o.force = true,
                ("restore" | "export", "--generation" | "-g") => {
                    o.generation = Some(value(cmd, name, inline, &mut it)?)
                }
                ("restore", "--force" | "-f") => o.force = true,
                ("prune", "--keep") => {
                    o.keep = Some(number(cmd, name, &value(cmd, name, inline, &mut it)?)?)
                }
                ("prune", "--older-than") => {
                    o.older = Some(number(cmd, name, &value(cmd, name, inline, &mut it)?)?)
                }
                ("prune", "--vm") => o.vms.push(value(cmd, name, inline, &mut it)?),
                ("prune", "--generation" | "-g") => {
                    o.named.push(value(cmd, name, inline, &mut it)?)
                }
                ("prune", "--dry-run" | "-n") => o.dry_run = true,
                ("capture", "--all" | "-a") => o.all = true,
                ("capture", "--pause") => o.pause = true,
                ("capture", "--pause-limit") => {
                    o.pause_limit = Some(number(cmd, name, &value(cmd, name, inline, &mut it)?)?)
                }
                ("export" | "metrics", "--output" | "-o") => {
                    let v = value(cmd, name, inline, &mut it)?;
                    if v.is_empty() || o.output.replace(PathBuf::from(v)).is_some() {
                        return Err(usage(cmd, "--output takes one file, once"));
                    }
                }
                (_, n) if n.starts_with('-') && n.len() > 1 => {
                    return Err(usage(cmd, format!("unknown option {n}")))
                }
                _ => o.positional.push(arg.clone()),
            }
        }
        Ok(o)
    }

    fn no_positional(&self, cmd: &str) -> Result<()> {
        match self.positional.first() {
            Some(p) => Err(usage(cmd, format!("unexpected argument {p:?}"))),
            None => Ok(()),
        }
    }
}

fn one_vm(cmd: &str, positional: Vec<String>) -> Result<String> {
    match <[String; 1]>::try_from(positional) {
        Ok([vm]) => Ok(vm),
        Err(v) if v.is_empty() => Err(usage(cmd, "name the VM (its name or UUID)")),
        Err(_) => Err(usage(cmd, "name exactly one VM")),
    }
}

/// The command from its options, checked together.
fn build(cmd: &str, o: Options) -> Result<Command> {
    Ok(match cmd {
        "list" => {
            o.no_positional(cmd)?;
            Command::List { json: o.json }
        }
        "show" => {
            if o.json && o.xml.is_some() {
                return Err(usage(cmd, "--json and --xml do not go together"));
            }
            Command::Show {
                vm: one_vm(cmd, o.positional)?,
                json: o.json,
                xml: o.xml,
            }
        }
        "verify" => Command::Verify { vms: o.positional },
        "restore" => Command::Restore {
            vm: one_vm(cmd, o.positional)?,
            generation: o.generation,
            force: o.force,
        },
        "prune" => {
            o.no_positional(cmd)?;
            if !o.named.is_empty() && (o.vms.len() != 1 || o.keep.is_some() || o.older.is_some()) {
                return Err(usage(
                    cmd,
                    "--generation goes with exactly one --vm, and without --keep or --older-than",
                ));
            }
            if o.named.is_empty() && o.keep.is_none() && o.older.is_none() {
                return Err(usage(
                    cmd,
                    "say what to remove: --keep N and/or --older-than DAYS, or --vm VM --generation GEN",
                ));
            }
            Command::Prune {
                keep: o.keep,
                older_than_days: o.older,
                vms: o.vms,
                generations: o.named,
                dry_run: o.dry_run,
            }
        }
        "check" => {
            o.no_positional(cmd)?;
            Command::Check { json: o.json }
        }
        "metrics" => {
            o.no_positional(cmd)?;
            Command::Metrics { output: o.output }
        }
        "capture" => {
            if o.all != o.positional.is_empty() {
                return Err(usage(cmd, "name the VMs, or give --all (not both)"));
            }
            Command::Capture {
                pause: pause_of(cmd, &o)?,
                vms: o.positional,
                all: o.all,
            }
        }
        "export" => Command::Export {
            vm: one_vm(cmd, o.positional)?,
            generation: o.generation,
            output: o.output,
        },
        "import" => Command::Import {
            source: match <[String; 1]>::try_from(o.positional) {
                Ok([s]) => s,
                Err(_) => return Err(usage(cmd, "name one archive file, or - for stdin")),
            },
            to: o.to,
            force: o.force,
        },
        _ => unreachable!("help_of knows only these"),
    })
}

/// capture's `--pause` and its limit, checked: not with `--all` (a timer
/// that paused every VM would stall them all, for nothing a backup needs).
fn pause_of(cmd: &str, o: &Options) -> Result<Option<u64>> {
    if !o.pause {
        return match o.pause_limit {
            Some(_) => Err(usage(cmd, "--pause-limit goes with --pause")),
            None => Ok(None),
        };
    }
    if o.all {
        return Err(usage(
            cmd,
            "--pause pauses the VMs it names, never --all: name them",
        ));
    }
    match o.pause_limit {
        Some(0) => Err(usage(cmd, "--pause-limit must be at least 1 second")),
        Some(s) => Ok(Some(s)),
        None => Ok(Some(crate::pause::DEFAULT_LIMIT.as_secs())),
    }
}

fn help_of(cmd: &str) -> Option<&'static str> {
    Some(match cmd {
        "list" => LIST_HELP,
        "show" => SHOW_HELP,
        "verify" => VERIFY_HELP,
        "restore" => RESTORE_HELP,
        "prune" => PRUNE_HELP,
        "check" => CHECK_HELP,
        "capture" => CAPTURE_HELP,
        "export" => EXPORT_HELP,
        "import" => IMPORT_HELP,
        "metrics" => METRICS_HELP,
        "hook" => HOOK_HELP,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;

    fn p(v: &[&str]) -> Result<Command> {
        parse(&v.iter().map(|x| x.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn parses_help_version_list_show_verify_and_restore() {
        assert_eq!(p(&["--help"]).unwrap(), Command::Help(USAGE));
        assert_eq!(p(&["--version"]).unwrap(), Command::Version);
        assert_eq!(
            p(&["list", "--json"]).unwrap(),
            Command::List { json: true }
        );
        assert_eq!(
            p(&["show", "vm1"]).unwrap(),
            Command::Show {
                vm: "vm1".into(),
                json: false,
                xml: None
            }
        );
        assert_eq!(
            p(&["show", "vm1", "--xml", "00000002-20261121T215608Z"]).unwrap(),
            Command::Show {
                vm: "vm1".into(),
                json: false,
                xml: Some(Some("00000002-20261121T215608Z".into()))
            }
        );
        assert_eq!(
            p(&["show", "--xml", "vm1"]).unwrap(),
            Command::Show {
                vm: "vm1".into(),
                json: false,
                xml: Some(None)
            }
        );
        assert_eq!(p(&["verify"]).unwrap(), Command::Verify { vms: vec![] });
        assert_eq!(
            p(&[
                "restore",
                "vm1",
                "--generation=00000001-20261121T215608Z",
                "--force"
            ])
            .unwrap(),
            Command::Restore {
                vm: "vm1".into(),
                generation: Some("00000001-20261121T215608Z".into()),
                force: true
            }
        );
    }

    #[test]
    fn parses_prune_by_rules_and_by_named_generations() {
        assert_eq!(
            p(&[
                "prune",
                "--keep",
                "3",
                "--vm",
                "a",
                "--vm=b",
                "--older-than",
                "30",
                "--dry-run"
            ])
            .unwrap(),
            Command::Prune {
                keep: Some(3),
                older_than_days: Some(30),
                vms: vec!["a".into(), "b".into()],
                generations: vec![],
                dry_run: true
            }
        );
        assert_eq!(
            p(&[
                "prune",
                "--vm",
                "a",
                "--generation",
                "G1",
                "--generation=G2"
            ])
            .unwrap(),
            Command::Prune {
                keep: None,
                older_than_days: None,
                vms: vec!["a".into()],
                generations: vec!["G1".into(), "G2".into()],
                dry_run: false
            }
        );
    }

    #[test]
    fn parses_check_and_metrics() {
        assert_eq!(p(&["check"]).unwrap(), Command::Check { json: false });
        assert_eq!(
            p(&["check", "--json"]).unwrap(),
            Command::Check { json: true }
        );
        assert_eq!(p(&["metrics"]).unwrap(), Command::Metrics { output: None });
        for args in [
            &["metrics", "-o", "/m/x.prom"][..],
            &["metrics", "--output", "/m/x.prom"],
            &["metrics", "--output=/m/x.prom"],
        ] {
            assert_eq!(
                p(args).unwrap(),
                Command::Metrics {
                    output: Some("/m/x.prom".into())
                },
                "{args:?}"
            );
        }
    }

    #[test]
    fn parses_capture_with_and_without_pause() {
        assert_eq!(
            p(&["capture", "--all"]).unwrap(),
            Command::Capture {
                vms: vec![],
                all: true,
                pause: None,
            }
        );
        assert_eq!(
            p(&["capture", "a", "b"]).unwrap(),
            Command::Capture {
                vms: vec!["a".into(), "b".into()],
                all: false,
                pause: None,
            }
        );
        assert!(p(&["capture"]).is_err(), "nothing named");
        assert!(p(&["capture", "--all", "a"]).is_err(), "both");
        let paused = |v: &[&str]| match p(v) {
            Ok(Command::Capture { pause, .. }) => Ok(pause),
            Ok(c) => panic!("{c:?}"),
            Err(e) => Err(e.to_string()),
        };
        assert_eq!(paused(&["capture", "--pause", "a"]), Ok(Some(10)));
        assert_eq!(
            paused(&["capture", "a", "--pause", "--pause-limit=3"]),
            Ok(Some(3))
        );
        for (bad, why) in [
            (&["capture", "--pause", "--all"][..], "never --all"),
            (&["capture", "--pause-limit", "3", "a"], "goes with --pause"),
            (
                &["capture", "--pause", "--pause-limit", "0", "a"],
                "at least 1",
            ),
        ] {
            let e = paused(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn parses_export_import_and_hook() {
        assert_eq!(
            p(&["export", "vm1", "-g", "G1", "-o", "/b/vm1.tar"]).unwrap(),
            Command::Export {
                vm: "vm1".into(),
                generation: Some("G1".into()),
                output: Some(PathBuf::from("/b/vm1.tar"))
            }
        );
        assert_eq!(
            p(&["export", "vm1", "--output=-"]).unwrap(),
            Command::Export {
                vm: "vm1".into(),
                generation: None,
                output: Some(PathBuf::from("-"))
            }
        );
        assert_eq!(
            p(&["import", "-", "--to", "restore_vm1", "--force"]).unwrap(),
            Command::Import {
                source: "-".into(),
                to: Some("restore_vm1".into()),
                force: true
            }
        );
        assert_eq!(
            p(&["import", "/b/vm1.tar"]).unwrap(),
            Command::Import {
                source: "/b/vm1.tar".into(),
                to: None,
                force: false
            }
        );
        match p(&["hook", "vm", "stopped", "end", "-"]).unwrap() {
            Command::Hook(h) => assert_eq!((h.name.as_str(), h.op.as_str()), ("vm", "stopped")),
            c => panic!("{c:?}"),
        }
    }

    fn inv(v: &[&str]) -> Result<Invocation> {
        parse_invocation(&v.iter().map(|x| x.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn config_is_taken_before_or_after_the_command_but_not_from_hook_args() {
        let want = |cmd| Invocation {
            config: Some(PathBuf::from("/etc/alt.conf")),
            command: cmd,
        };
        let list = || Command::List { json: true };
        assert_eq!(
            inv(&["--config", "/etc/alt.conf", "list", "--json"]).unwrap(),
            want(list())
        );
        assert_eq!(
            inv(&["list", "--config=/etc/alt.conf", "--json"]).unwrap(),
            want(list())
        );
        assert_eq!(
            inv(&["-c", "/etc/alt.conf", "list", "--json"]).unwrap(),
            want(list())
        );
        assert_eq!(
            inv(&["list", "--json"]).unwrap(),
            Invocation {
                config: None,
                command: list()
            }
        );
        // Before `hook` it is ours; after, libvirt's arguments are left alone.
        let hook = inv(&[
            "--config",
            "/etc/alt.conf",
            "hook",
            "vm",
            "stopped",
            "end",
            "-",
        ]);
        assert_eq!(hook.unwrap().config, Some(PathBuf::from("/etc/alt.conf")));
        let hook = inv(&["hook", "-c", "x", "stopped"]).unwrap();
        assert_eq!(hook.config, None);
        match hook.command {
            Command::Hook(h) => assert_eq!(h.name, "-c"),
            c => panic!("{c:?}"),
        }
        for bad in [
            &["--config"][..],
            &["list", "--config"],
            &["--config=", "list"],
            &["-c", "a", "list", "-c", "b"],
        ] {
            assert_eq!(inv(bad).unwrap_err().kind, Kind::Usage, "{bad:?}");
        }
    }

    #[test]
    fn hook_arguments_are_libvirts_even_when_they_look_like_options() {
        for name in [
            "--help",
            "-h",
            "--version",
            "-V",
            "--config",
            "-c",
            "--json",
        ] {
            match p(&["hook", name, "stopped", "end", "-"]).unwrap() {
                Command::Hook(h) => assert_eq!(
                    (h.name.as_str(), h.op.as_str(), h.extra.as_str()),
                    (name, "stopped", "-")
                ),
                c => panic!("{name}: {c:?}"),
            }
            let i = inv(&["hook", name, "stopped", "end", "-"]).unwrap();
            assert_eq!(i.config, None, "{name}");
            assert!(matches!(i.command, Command::Hook(h) if h.name == name));
        }
        // Any argument may look like one, not only the name.
        match p(&["hook", "vm", "--help", "-h", "--help"]).unwrap() {
            Command::Hook(h) => assert_eq!(
                (h.op, h.sub_op, h.extra),
                ("--help".into(), "-h".into(), "--help".into())
            ),
            c => panic!("{c:?}"),
        }
        // `hook --help` alone (libvirt always passes four) still helps.
        assert_eq!(p(&["hook", "-h"]).unwrap(), Command::Help(HOOK_HELP));
    }

    #[test]
    fn every_command_has_help() {
        for c in [
            "list", "show", "verify", "restore", "prune", "check", "hook", "capture", "export",
            "import", "metrics",
        ] {
            match p(&[c, "--help"]).unwrap() {
                Command::Help(h) => assert!(h.starts_with(&format!("swtpm-keeper {c}")), "{c}"),
                other => panic!("{other:?}"),
            }
            assert_eq!(p(&["help", c]).unwrap(), p(&[c, "-h"]).unwrap());
        }
    }

    #[test]
    fn bad_usage_is_a_usage_error() {
        for a in [
            vec![],
            vec!["frobnicate"],
            vec!["hook"],
            vec!["hook", "a", "b", "c", "d", "e"],
            vec!["show"],
            vec!["show", "a", "b"],
            vec!["restore"],
            vec!["restore", "a", "--bogus"],
            vec!["restore", "a", "--generation"],
            vec!["prune"],
            vec!["prune", "--keep", "many"],
            vec!["prune", "--generation", "G1"],
            vec!["prune", "--vm", "a", "--vm", "b", "--generation", "G1"],
            vec!["prune", "--vm", "a", "--generation", "G1", "--keep", "1"],
            vec!["list", "extra"],
            vec!["show", "a", "--json", "--xml"],
            vec!["export"],
            vec!["export", "a", "b"],
            vec!["export", "a", "-o"],
            vec!["export", "a", "--to", "b"],
            vec!["import"],
            vec!["import", "a", "b"],
            vec!["import", "a", "--to"],
            vec!["import", "a", "-o", "f"],
            vec!["metrics", "-o"],
            vec!["metrics", "-o", "a", "-o", "b"],
            vec!["metrics", "--output="],
            vec!["metrics", "extra"],
        ] {
            let e = p(&a).unwrap_err();
            assert_eq!(e.kind, Kind::Usage, "{a:?}");
        }
    }
}

//! `swtpm-keeper check`: is everything in place on this host?

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::{Config, Source};
use crate::coverage::{self, Found, Summary, Survey, Totals, Verdict, VmCoverage};
use crate::domain::Uuid;
use crate::error::{Error, Result};
use crate::failure::{self, Remembered};
use crate::inventory::JSON_VERSION;
use crate::logging::sanitize;
use crate::qemuconf::{self, QemuConf};

#[derive(Debug, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Level {
    Ok,
    Warn,
    Fix,
}

impl Level {
    fn tag(&self) -> &'static str {
        match self {
            Level::Ok => "ok  ",
            Level::Warn => "warn",
            Level::Fix => "FIX ",
        }
    }
}

/// Seconds since the epoch at which a process started, from `proc`
/// (`/proc`, or a fixture tree in tests).
fn process_start(proc: &Path, pid: u32) -> Option<i64> {
    let stat = std::fs::read_to_string(proc.join(pid.to_string()).join("stat")).ok()?;
    // Field 22 (starttime, in clock ticks since boot) counts from after ") ".
    let after = &stat[stat.rfind(')')? + 2..];
    let ticks: i64 = after.split_whitespace().nth(19)?.parse().ok()?;
    let btime: i64 = std::fs::read_to_string(proc.join("stat"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse().ok()))?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(1, |hz| hz.max(1));
    Some(btime + ticks / hz)
}

/// The libvirt daemons that run QEMU VMs, by name and pid, sorted by pid.
fn daemons(proc: &Path) -> Vec<(String, u32)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(proc).into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(comm) = std::fs::read_to_string(e.path().join("comm")) {
            let comm = comm.trim();
            if comm == "libvirtd" || comm == "virtqemud" {
                v.push((comm.to_owned(), pid));
            }
        }
    }
    v.sort_by_key(|(_, pid)| *pid);
    v
}

/// Reloads of libvirt that the install scripts recorded (packaging/
/// reload-libvirt): `<daemon> <pid> <unix time>` a line. Bad lines are
/// skipped: this is a hint, never a reason to fail.
fn read_reloads(path: &Path) -> Vec<(String, u32, i64)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((
                f.next()?.to_owned(),
                f.next()?.parse().ok()?,
                f.next()?.parse().ok()?,
            ))
        })
        .collect()
}

/// Does the daemon run the hook? libvirt reads its hook list at start and
/// on reload (SIGHUP). A reload leaves no trace but the install's record.
fn daemon_state(
    name: &str,
    pid: u32,
    start: Option<i64>,
    hook_time: Option<i64>,
    reloads: &[(String, u32, i64)],
) -> (Level, String) {
    let (Some(start), Some(installed)) = (start, hook_time) else {
        return (Level::Ok, format!("{name} (pid {pid}) runs"));
    };
    if installed <= start {
        return (
            Level::Ok,
            format!("{name} (pid {pid}) runs, started after the hook was installed"),
        );
    }
    let reloaded = reloads
        .iter()
        .filter(|(n, p, t)| n == name && *p == pid && *t >= installed)
        .map(|(_, _, t)| *t)
        .max();
    match reloaded {
        Some(t) => (
            Level::Ok,
            format!(
                "{name} (pid {pid}) runs, reloaded by the install {}s after the hook was installed",
                t - installed
            ),
        ),
        None => (
            Level::Warn,
            format!(
                "the hook was installed after {name} (pid {pid}) started, and no reload since is recorded: \
                 unless you reloaded it yourself, it does not run the hook yet: `systemctl reload {name}` \
                 or `kill -HUP {pid}`"
            ),
        ),
    }
}

/// This program's version, embedded where a reader of the binary finds
/// it: `check` judges a hook installed as a copy by it, never by running
/// an unknown file as root.
static VERSION_MARK: &[u8] =
    concat!("\0swtpm-keeper-version=", env!("CARGO_PKG_VERSION"), "\0").as_bytes();
/// The marker's fixed part: the version follows, up to a NUL.
const MARK_PREFIX: &[u8] = b"\0swtpm-keeper-version=";
/// A string every swtpm-keeper binary holds, also those from before the
/// marker (0.1): the configuration's environment variable.
const ANY_KEEPER: &[u8] = b"SWTPM_KEEPER_CONFIG";
/// Larger files are not read for a version (the binary is a few MiB).
const MAX_HOOK_READ: u64 = 256 << 20;

/// What a hook file libvirt runs is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HookKind {
    /// It leads to this program (or to qemu-chain beside it).
    Link,
    /// A swtpm-keeper binary of its own, with the version it names (None:
    /// one from before versions were embedded).
    Copy(Option<String>),
}

/// The version a swtpm-keeper binary names, read from its bytes. None:
/// not a swtpm-keeper; Some(None): one that names no version.
fn embedded_version(path: &Path) -> Option<Option<String>> {
    let md = std::fs::metadata(path).ok()?;
    if !md.is_file() || md.len() > MAX_HOOK_READ {
        return None;
    }
    let bytes = std::fs::read(path).ok()?;
    if !bytes.starts_with(b"\x7fELF") {
        return None;
    }
    let found = bytes
        .windows(MARK_PREFIX.len())
        .enumerate()
        .filter(|(_, w)| *w == MARK_PREFIX)
        .find_map(|(i, _)| {
            let rest = &bytes[i + MARK_PREFIX.len()..];
            let end = rest.iter().take(64).position(|&b| b == 0)?;
            let v = std::str::from_utf8(&rest[..end]).ok()?;
            let plausible = !v.is_empty()
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b));
            plausible.then(|| v.to_owned())
        });
    match found {
        Some(v) => Some(Some(v)),
        None => bytes
            .windows(ANY_KEEPER.len())
            .any(|w| w == ANY_KEEPER)
            .then_some(None),
    }
}

/// This program's version, as the marker holds it.
fn own_version() -> &'static str {
    // Through black_box: the marker stays in the binary as a whole.
    let mark = std::hint::black_box(VERSION_MARK);
    std::str::from_utf8(&mark[MARK_PREFIX.len()..mark.len() - 1]).unwrap_or("?")
}

/// Hook files libvirt would run that are this program: links to `exe`
/// (or to the qemu-chain script installed beside it, for libvirt < 6.5
/// with a hook of its own), and swtpm-keeper binaries copied there.
fn installed_hooks(hooks_dir: &Path, exe: &Path) -> Vec<(PathBuf, HookKind)> {
    let mut candidates = vec![hooks_dir.join("qemu")];
    if let Ok(rd) = std::fs::read_dir(hooks_dir.join("qemu.d")) {
        let mut v: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        v.sort();
        candidates.extend(v);
    }
    candidates
        .into_iter()
        .filter_map(|p| {
            let linked = std::fs::canonicalize(&p)
                .map(|c| c == exe || c == exe.with_file_name("qemu-chain"))
                .unwrap_or(false);
            if linked {
                return Some((p, HookKind::Link));
            }
            let kind = HookKind::Copy(embedded_version(&p)?);
            Some((p, kind))
        })
        .collect()
}

/// One line of the report.
type Finding = (Level, String);

/// The configuration, and how it reads. A broken file is a finding, and
/// the checks that follow use the defaults.
fn check_config(source: &Source) -> Result<(Config, Finding)> {
    source.require_named()?;
    let path = &source.path;
    Ok(match source.load() {
        Ok(c) => {
            let state = if path.exists() {
                "is valid"
            } else {
                "does not exist: the defaults apply"
            };
            let line = format!("configuration {} {state}", path.display());
            (c, (Level::Ok, line))
        }
        Err(e) => (
            Config::default(),
            (
                Level::Fix,
                format!("{e}; the checks below use the defaults"),
            ),
        ),
    })
}

/// The hook files libvirt runs that are this program, each executable
/// or not, and the newest time one of them was installed.
fn check_hooks(hooks_dir: &Path, exe: &Path) -> (Vec<Finding>, Option<i64>) {
    let hooks = installed_hooks(hooks_dir, exe);
    if hooks.is_empty() {
        let line = format!(
            "no hook in {} leads to {}: run `make install`, or `ln -s {} {}/qemu.d/swtpm-keeper`",
            hooks_dir.display(),
            exe.display(),
            exe.display(),
            hooks_dir.display()
        );
        return (vec![(Level::Fix, line)], None);
    }
    let mut found = Vec::new();
    let mut hook_time = 0;
    for (h, kind) in &hooks {
        let exec = std::fs::metadata(h)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false);
        found.push(if exec {
            hook_finding(h, kind, exe)
        } else {
            let fix = format!("chmod 0755 {}", exe.display());
            let line = format!("hook {} is not an executable file: {fix}", h.display());
            (Level::Fix, line)
        });
        let installed = std::fs::symlink_metadata(h).map(|m| m.ctime()).unwrap_or(0);
        hook_time = hook_time.max(installed);
    }
    (found, Some(hook_time))
}

/// An executable hook: a link to this program, or a copy of it (of which
/// version).
fn hook_finding(h: &Path, kind: &HookKind, exe: &Path) -> Finding {
    let ours = own_version();
    let reinstall = format!("install -m 0755 {} {}", exe.display(), h.display());
    match kind {
        HookKind::Link => (
            Level::Ok,
            format!("hook {} runs {}", h.display(), exe.display()),
        ),
        HookKind::Copy(Some(v)) if v == ours => (
            Level::Ok,
            format!("hook {} is swtpm-keeper {v}, as this command", h.display()),
        ),
        HookKind::Copy(Some(v)) => (
            Level::Warn,
            format!(
                "hook {} is swtpm-keeper {v}, this command is {ours}: libvirt runs the other \
                 version; to run this one: {reinstall}",
                h.display()
            ),
        ),
        HookKind::Copy(None) => (
            Level::Warn,
            format!(
                "hook {} is a swtpm-keeper that names no version (older than this command, \
                 {ours}); to run this one: {reinstall}",
                h.display()
            ),
        ),
    }
}

/// Does each running daemon run the hook? libvirt reads its hook list at
/// start and on reload.
fn check_daemons(
    proc: &Path,
    hook_time: Option<i64>,
    reloads: &[(String, u32, i64)],
) -> Vec<Finding> {
    let ds = daemons(proc);
    if ds.is_empty() {
        let line = "no libvirtd or virtqemud runs: the hook is used from the daemon's next start";
        return vec![(Level::Warn, line.into())];
    }
    ds.iter()
        .map(|(name, pid)| daemon_state(name, *pid, process_start(proc, *pid), hook_time, reloads))
        .collect()
}

/// The store holds every VM's TPM: root's alone, a real directory.
fn check_store(store: &Path) -> Finding {
    let shown = store.display();
    match std::fs::symlink_metadata(store) {
        Err(_) => (
            Level::Warn,
            format!("store {shown} does not exist yet: the first capture creates it"),
        ),
        Ok(md) if md.file_type().is_symlink() || !md.is_dir() => (
            Level::Fix,
            format!("store {shown} is not a directory (a symlink?): make it a directory"),
        ),
        Ok(md) if md.uid() != 0 || md.mode() & 0o077 != 0 => (
            Level::Fix,
            format!(
                "store {shown} is owned by uid {} with mode {:04o}: it holds every VM's TPM; \
                 chown root:root {shown} && chmod 0700 {shown}",
                md.uid(),
                md.mode() & 0o7777
            ),
        ),
        Ok(md) => (
            Level::Ok,
            format!("store {shown} is root's, mode {:04o}", md.mode() & 0o7777),
        ),
    }
}

/// The hook's log lines reach syslog only if something listens.
fn check_syslog(socket: &Path) -> Finding {
    let reachable = std::os::unix::net::UnixDatagram::unbound()
        .and_then(|s| s.connect(socket))
        .is_ok();
    if reachable {
        (Level::Ok, format!("syslog listens at {}", socket.display()))
    } else {
        let line = format!(
            "nothing listens at {}: the hook's log lines go to stderr, which libvirt discards; start rsyslog or journald",
            socket.display()
        );
        (Level::Fix, line)
    }
}

/// The unit that runs `capture --all`.
const TIMER: &str = "swtpm-keeper-capture.timer";

/// How the capture of running VMs is scheduled: the systemd timer where
/// systemd runs (`timer`: enabled, active, as systemctl says), else a cron
/// line (`cron`: one of the files holds `swtpm-keeper capture --all`).
fn schedule_finding(systemd: bool, timer: (bool, bool), cron: bool) -> Finding {
    match (systemd, timer, cron) {
        (true, (true, true), _) => (Level::Ok, format!("{TIMER} is enabled and active")),
        (true, _, true) => (
            Level::Ok,
            format!("{TIMER} is off, and cron runs `swtpm-keeper capture --all`"),
        ),
        (true, (enabled, _), false) => (
            Level::Fix,
            format!(
                "{TIMER} is {}: running VMs' TPMs are kept only at their stops; \
                 systemctl enable --now {TIMER}",
                if enabled {
                    "enabled but not active"
                } else {
                    "not enabled"
                }
            ),
        ),
        (false, _, true) => (Level::Ok, "cron runs `swtpm-keeper capture --all`".into()),
        (false, _, false) => (
            Level::Warn,
            "systemd does not run here and no cron file runs `swtpm-keeper capture --all`: \
             running VMs' TPMs are kept only at their stops; add to /etc/cron.d/swtpm-keeper: \
             `*/5 * * * * root /usr/sbin/swtpm-keeper capture --all >/dev/null`"
                .into(),
        ),
    }
}

/// Ask systemd about the timer, and look for a cron line.
fn check_schedule() -> Finding {
    let systemd = Path::new("/run/systemd/system").is_dir();
    let systemctl = |verb: &str| {
        std::process::Command::new("systemctl")
            .args([verb, "--quiet", TIMER])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let timer = if systemd {
        (systemctl("is-enabled"), systemctl("is-active"))
    } else {
        (false, false)
    };
    let mut cron_files = vec![
        PathBuf::from("/etc/crontab"),
        "/var/spool/cron/crontabs/root".into(),
    ];
    if let Ok(rd) = std::fs::read_dir("/etc/cron.d") {
        cron_files.extend(rd.flatten().map(|e| e.path()));
    }
    let cron = cron_files.iter().any(|p| {
        std::fs::read_to_string(p).is_ok_and(|t| {
            t.lines().any(|l| {
                !l.trim_start().starts_with('#') && l.contains("swtpm-keeper capture --all")
            })
        })
    });
    schedule_finding(systemd, timer, cron)
}

/// "4 min", "3 h", "2 days": how long ago, for people.
fn age(secs: i64) -> String {
    let secs = secs.max(0);
    if secs < 2 * 3600 {
        format!("{} min", secs / 60)
    } else if secs < 2 * 86_400 {
        format!("{} h", secs / 3600)
    } else {
        format!("{} days", secs / 86_400)
    }
}

/// One line per VM, or more when several things are wrong: see
/// `coverage` for how each is told.
fn vm_findings(cfg: &Config, vm: &VmCoverage, now: i64) -> Vec<Finding> {
    let name = sanitize(&vm.name);
    let capture = format!("swtpm-keeper capture {name}");
    let mut v = Vec::new();
    if let Some(e) = &vm.store_error {
        v.push((
            Level::Fix,
            format!("VM {name}: cannot read its part of the store: {e}"),
        ));
    }
    if let Some(f) = &vm.failure {
        v.push((Level::Fix, failure_line(cfg, vm, &name, f, &capture)));
    }
    if let (Some(s), Some(false)) = (&vm.secret, vm.secret_defined) {
        v.push((
            Level::Fix,
            format!(
                "VM {name} names <encryption secret='{s}'/>, which libvirt does not define \
                 ({} is missing): the VM cannot start, and its TPM state opens only with that \
                 secret's value; define it again under UUID {s} with its old value \
                 (virsh secret-define, virsh secret-set-value)",
                cfg.libvirt_secrets_dir.join(format!("{s}.xml")).display()
            ),
        ));
    }
    if let (Some(old), Some(n)) = (vm.changed_secret(), &vm.newest) {
        v.push((
            Level::Fix,
            secret_changed_line(vm, &name, old, &n.generation),
        ));
    }
    if let Some(f) = capture_finding(cfg, vm, &name, &capture, now, v.is_empty()) {
        v.push(f);
    }
    v
}

/// The line about the VM's captures: never captured, stale, or (when
/// nothing else was said of it, `alone`) ok with its newest generation.
fn capture_finding(
    cfg: &Config,
    vm: &VmCoverage,
    name: &str,
    capture: &str,
    now: i64,
    alone: bool,
) -> Option<Finding> {
    match &vm.newest {
        None if vm.verdict == Verdict::NoStateYet => Some((
            Level::Ok,
            format!("VM {name} has no TPM state yet (it never started): nothing to keep"),
        )),
        // The failure's line already says the store holds nothing.
        None if vm.failure.is_some() => None,
        None if vm.running() => Some((
            Level::Fix,
            format!("VM {name} runs and its TPM was never captured: {capture}"),
        )),
        None => Some((
            Level::Fix,
            format!("VM {name} has an emulator TPM that was never captured: {capture}"),
        )),
        Some(n) if vm.verdict == Verdict::Stale => {
            let since = now - vm.confirmed_unix.unwrap_or(n.time_unix);
            let line = format!(
                "VM {name} runs and its newest capture is {} old (more than max_capture_age, \
                 {}): is the capture timer running? {capture}",
                age(since),
                age(cfg.max_capture_age as i64)
            );
            Some((Level::Warn, line))
        }
        Some(n) if alone => {
            let confirmed = match vm.confirmed_unix {
                Some(t) if t > n.time_unix + 60 => {
                    format!(", found unchanged {} ago", age(now - t))
                }
                _ => String::new(),
            };
            let line = format!(
                "VM {name}: newest capture {}, {} old{confirmed}",
                n.generation,
                age(now - n.time_unix)
            );
            Some((Level::Ok, line))
        }
        Some(_) => None,
    }
}

fn failure_line(
    cfg: &Config,
    vm: &VmCoverage,
    name: &str,
    f: &Remembered,
    capture: &str,
) -> String {
    let held = match &vm.newest {
        Some(n) => format!("generation {} (captured {})", n.generation, n.time),
        None => "nothing for it".into(),
    };
    if vm.found == Found::Gone {
        return format!(
            "VM {name} ({}), which libvirt no longer defines or runs here: its last capture \
             failed ({}); the store holds {held}. Its next good capture clears this; if it is \
             gone for good: rm {} {}",
            vm.uuid,
            f.describe(),
            failure::run_record_path(cfg, &vm.uuid).display(),
            cfg.store_dir.join(&vm.uuid).join(failure::MARKER).display()
        );
    }
    match f {
        Remembered::Failed(_) => format!(
            "VM {name}: its last capture failed ({}); the store still holds {held}. \
             Fix the cause, then `{capture}`: a good capture clears this",
            f.describe()
        ),
        Remembered::Damaged { path, error } => format!(
            "VM {name}: a capture failed, and its record cannot be read ({}: {}); \
             the store holds {held}; `{capture}` clears it once a capture succeeds",
            sanitize(path),
            sanitize(error)
        ),
    }
}

fn secret_changed_line(vm: &VmCoverage, name: &str, old: &str, generation: &str) -> String {
    let now = match &vm.secret {
        Some(s) => format!("secret {s}"),
        None => "no secret".into(),
    };
    let forced = match &vm.secret {
        Some(s) => format!("if {s} holds the same value (imported again under a new UUID), "),
        None => String::new(),
    };
    format!(
        "VM {name}: its newest generation {generation} was captured under secret {old}, but the \
         domain names {now} now: a restore refuses that state. Two ways out: define the old \
         secret {old} again (with its value) and name it in the domain; or, {forced}\
         `swtpm-keeper restore {name} --force`"
    )
}

/// Every VM's findings, then what could not be read, with the VM's UUID.
fn check_vms(cfg: &Config, survey: &Survey, now: i64) -> Vec<(Option<Uuid>, Finding)> {
    let mut out = Vec::new();
    for vm in &survey.vms {
        for f in vm_findings(cfg, vm, now) {
            out.push((Some(vm.uuid.clone()), f));
        }
    }
    for p in &survey.problems {
        out.push((
            None,
            (Level::Warn, format!("{p}: VMs in it are not covered")),
        ));
    }
    out
}

fn summary_line(s: &Summary) -> String {
    format!(
        "VMs with a TPM: {}, protected {}, stale {}, never captured {}, failing {}, secret problems {}",
        s.vms, s.protected, s.stale, s.never_captured, s.failing, s.secret_problems
    )
}

/// The owners restored files will get, from qemu.conf.
fn check_owners(qemu_conf: &Path) -> Vec<Finding> {
    let qc = QemuConf::load(qemu_conf);
    [
        ("TPM state", "swtpm_user", &qc.swtpm_user, qc.swtpm_owner()),
        ("NVRAM", "user", &qc.user, qc.qemu_owner()),
    ]
    .into_iter()
    .map(|(what, key, value, owner)| match value {
        Some(u) if qemuconf::lookup_user(u).is_none() => (
            Level::Fix,
            format!(
                "{key} = {u:?} in {} is no user on this host",
                qemu_conf.display()
            ),
        ),
        _ => (
            Level::Ok,
            format!(
                "restored {what} will be owned by {} ({}:{})",
                owner.desc, owner.uid, owner.gid
            ),
        ),
    })
    .collect()
}

/// Every host-wide finding: configuration, hook, daemons, store, syslog,
/// owners, schedule. Also returns the configuration the VMs are judged by.
fn host_findings(source: &Source) -> Result<(Config, Vec<Finding>)> {
    let (cfg, config_line) = check_config(source)?;
    let mut findings = vec![config_line];
    if !nix::unistd::geteuid().is_root() {
        let line = "not run as root: some checks may be incomplete";
        findings.push((Level::Warn, line.into()));
    }
    let exe = std::env::current_exe()
        .and_then(std::fs::canonicalize)
        .unwrap_or_default();
    let (hooks, hook_time) = check_hooks(&cfg.libvirt_hooks_dir, &exe);
    findings.extend(hooks);
    let reloads = read_reloads(&cfg.run_dir.join("reloaded"));
    findings.extend(check_daemons(Path::new("/proc"), hook_time, &reloads));
    findings.push(check_store(&cfg.store_dir));
    findings.push(check_syslog(&cfg.syslog_socket));
    findings.extend(check_owners(&cfg.qemu_conf));
    findings.push(check_schedule());
    Ok((cfg, findings))
}

/// `check --json`: the same findings, and the survey they come from.
#[derive(Serialize)]
struct CheckJson<'a> {
    version: u32,
    findings: Vec<FindingJson<'a>>,
    fixes: usize,
    summary: Summary,
    store: &'a Totals,
    vms: &'a [VmCoverage],
}

#[derive(Serialize)]
struct FindingJson<'a> {
    level: &'a Level,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    uuid: Option<&'a Uuid>,
}

pub fn run(source: &Source, json: bool, out: &mut dyn Write) -> Result<i32> {
    let (cfg, host) = host_findings(source)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let survey = coverage::survey(&cfg, now);
    let mut findings: Vec<(Option<Uuid>, Finding)> = host.into_iter().map(|f| (None, f)).collect();
    findings.extend(check_vms(&cfg, &survey, now));
    let fixes = findings.iter().filter(|(_, f)| f.0 == Level::Fix).count();
    let w = |e: std::io::Error| Error::failed(format!("cannot write the output: {e}"));
    if json {
        let doc = CheckJson {
            version: JSON_VERSION,
            findings: findings
                .iter()
                .map(|(uuid, (level, message))| FindingJson {
                    level,
                    message,
                    uuid: uuid.as_ref(),
                })
                .collect(),
            fixes,
            summary: survey.summary(),
            store: &survey.store,
            vms: &survey.vms,
        };
        serde_json::to_writer_pretty(&mut *out, &doc).map_err(|e| Error::failed(e.to_string()))?;
        writeln!(out).map_err(w)?;
        out.flush().map_err(w)?;
    } else {
        // As before: a reader that stops early (`check | grep -q ok`) is
        // no failure of the check, whose answer is its exit status.
        for (_, (level, line)) in &findings {
            let _ = writeln!(out, "{} {line}", level.tag());
        }
        let _ = writeln!(out, "{}", summary_line(&survey.summary()));
        let _ = writeln!(out, "{fixes} to fix");
        let _ = out.flush();
    }
    Ok(if fixes > 0 { 1 } else { 0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_daemon_older_than_the_hook_is_ok_only_with_a_recorded_reload_of_that_pid() {
        let rec = |n: &str, p: u32, t: i64| (n.to_owned(), p, t);
        let lvl = |s: Option<i64>, h: Option<i64>, r: &[(String, u32, i64)]| {
            daemon_state("libvirtd", 42, s, h, r).0
        };
        // Started after the hook: it read the hook at start.
        assert_eq!(lvl(Some(200), Some(100), &[]), Level::Ok);
        // Started before: only a reload of this daemon, after the install, counts.
        assert_eq!(lvl(Some(100), Some(200), &[]), Level::Warn);
        assert_eq!(
            lvl(Some(100), Some(200), &[rec("libvirtd", 42, 199)]),
            Level::Warn
        );
        assert_eq!(
            lvl(Some(100), Some(200), &[rec("libvirtd", 7, 300)]),
            Level::Warn
        );
        assert_eq!(
            lvl(Some(100), Some(200), &[rec("virtqemud", 42, 300)]),
            Level::Warn
        );
        assert_eq!(
            lvl(Some(100), Some(200), &[rec("libvirtd", 42, 200)]),
            Level::Ok
        );
    }

    #[test]
    fn reload_records_skip_bad_lines() {
        let p = std::env::temp_dir().join(format!("swk-reloads-{}", std::process::id()));
        std::fs::write(
            &p,
            "libvirtd 42 1000\ngarbage\nvirtqemud x 5\nvirtqemud 9 2000 extra\n",
        )
        .unwrap();
        assert_eq!(
            read_reloads(&p),
            vec![
                ("libvirtd".to_owned(), 42, 1000),
                ("virtqemud".to_owned(), 9, 2000)
            ]
        );
        std::fs::remove_file(&p).unwrap();
        assert!(read_reloads(&p).is_empty());
    }

    #[test]
    fn a_main_hook_linked_to_qemu_chain_beside_the_binary_counts_as_installed() {
        let t = std::env::temp_dir().join(format!("swk-check-chain-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&t);
        std::fs::create_dir_all(t.join("libexec")).unwrap();
        std::fs::create_dir_all(t.join("hooks/qemu.d")).unwrap();
        let exe = t.join("libexec/swtpm-keeper");
        std::fs::write(&exe, b"").unwrap();
        std::fs::write(t.join("libexec/qemu-chain"), b"").unwrap();
        std::fs::write(t.join("libexec/other"), b"").unwrap();
        let hooks = t.join("hooks");
        std::os::unix::fs::symlink(t.join("libexec/other"), hooks.join("qemu.d/other")).unwrap();
        assert!(installed_hooks(&hooks, &exe).is_empty());
        std::os::unix::fs::symlink(t.join("libexec/qemu-chain"), hooks.join("qemu")).unwrap();
        std::os::unix::fs::symlink(&exe, hooks.join("qemu.d/swtpm-keeper")).unwrap();
        assert_eq!(
            installed_hooks(&hooks, &exe),
            vec![
                (hooks.join("qemu"), HookKind::Link),
                (hooks.join("qemu.d/swtpm-keeper"), HookKind::Link)
            ]
        );
        std::fs::remove_dir_all(&t).unwrap();
    }

    #[test]
    fn ages_read_in_minutes_then_hours_then_days() {
        assert_eq!(age(-5), "0 min");
        assert_eq!(age(7199), "119 min");
        assert_eq!(age(7200), "2 h");
        assert_eq!(age(2 * 86_400 - 1), "47 h");
        assert_eq!(age(2 * 86_400), "2 days");
    }

    #[test]
    fn a_copy_is_known_by_the_version_it_embeds_and_other_files_are_not_hooks() {
        let t = std::env::temp_dir().join(format!("swk-check-ver-{}", std::process::id()));
        std::fs::create_dir_all(&t).unwrap();
        let f = t.join("f");
        let with = |bytes: &[u8]| {
            std::fs::write(&f, bytes).unwrap();
            embedded_version(&f)
        };
        assert_eq!(
            with(b"\x7fELF..\0swtpm-keeper-version=1.2.3-rc1\0.."),
            Some(Some("1.2.3-rc1".into()))
        );
        // A prefix not followed by a version (the bare prefix constant).
        assert_eq!(
            with(b"\x7fELF\0swtpm-keeper-version=\0 SWTPM_KEEPER_CONFIG"),
            Some(None)
        );
        assert_eq!(with(b"\x7fELF\0swtpm-keeper-version=a b\0"), None);
        assert_eq!(
            with(b"#!/bin/sh\n# SWTPM_KEEPER_CONFIG\n"),
            None,
            "not a binary"
        );
        assert_eq!(with(b"\x7fELF other program"), None);
        assert_eq!(own_version(), env!("CARGO_PKG_VERSION"));
        std::fs::remove_dir_all(&t).unwrap();
    }

    /// A /proc tree with one process: `comm`, started `ticks` after boot.
    fn fake_proc(test: &str, pid: u32, comm: &str, ticks: i64) -> PathBuf {
        let t = std::env::temp_dir().join(format!("swk-proc-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&t);
        std::fs::create_dir_all(t.join(pid.to_string())).unwrap();
        std::fs::create_dir_all(t.join("self")).unwrap();
        std::fs::write(t.join("stat"), "cpu  1 2 3\nbtime 1000000\n").unwrap();
        std::fs::write(t.join(pid.to_string()).join("comm"), format!("{comm}\n")).unwrap();
        // Fields after ") ": state is the 3rd, starttime the 22nd.
        let fields: Vec<String> = (3..=21).map(|i| i.to_string()).collect();
        let stat = format!("{pid} ({comm}) {} {ticks} 0 0\n", fields.join(" "));
        std::fs::write(t.join(pid.to_string()).join("stat"), stat).unwrap();
        t
    }

    #[test]
    fn daemons_are_found_by_name_in_proc_and_dated_from_their_start() {
        let t = fake_proc("daemons", 4242, "libvirtd", 500 * 100);
        assert_eq!(daemons(&t), vec![("libvirtd".to_owned(), 4242)]);
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).unwrap();
        let hz = hz.unwrap();
        assert_eq!(process_start(&t, 4242), Some(1_000_000 + 500 * 100 / hz));
        std::fs::remove_dir_all(&t).unwrap();
        let t = fake_proc("other", 4243, "bash", 1);
        assert!(daemons(&t).is_empty());
        let found = check_daemons(&t, None, &[]);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, Level::Warn, "no daemon runs: {}", found[0].1);
        std::fs::remove_dir_all(&t).unwrap();
    }

    #[test]
    fn a_daemon_started_before_the_hook_is_a_warning_with_the_reload_command() {
        let t = fake_proc("older", 77, "virtqemud", 0);
        let found = check_daemons(&t, Some(2_000_000), &[]);
        assert_eq!(found[0].0, Level::Warn);
        assert!(found[0].1.contains("kill -HUP 77"), "{}", found[0].1);
        let found = check_daemons(&t, Some(900_000), &[]);
        assert_eq!(found[0].0, Level::Ok, "{}", found[0].1);
        std::fs::remove_dir_all(&t).unwrap();
    }

    #[test]
    fn the_store_must_be_a_real_directory_that_only_root_can_read() {
        let t = std::env::temp_dir().join(format!("swk-check-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&t);
        assert_eq!(check_store(&t).0, Level::Warn, "missing: created later");
        std::fs::create_dir_all(t.join("store")).unwrap();
        std::os::unix::fs::symlink(t.join("store"), t.join("link")).unwrap();
        assert_eq!(check_store(&t.join("link")).0, Level::Fix);
        std::fs::set_permissions(t.join("store"), PermissionsExt::from_mode(0o755)).unwrap();
        assert_eq!(check_store(&t.join("store")).0, Level::Fix);
        std::fs::set_permissions(t.join("store"), PermissionsExt::from_mode(0o700)).unwrap();
        let root = nix::unistd::geteuid().is_root();
        let expect = if root { Level::Ok } else { Level::Fix };
        assert_eq!(check_store(&t.join("store")).0, expect);
        std::fs::remove_dir_all(&t).unwrap();
    }

    #[test]
    fn no_hook_leading_to_the_binary_is_one_finding_to_fix_with_the_command() {
        let t = std::env::temp_dir().join(format!("swk-check-nohook-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&t);
        std::fs::create_dir_all(t.join("hooks/qemu.d")).unwrap();
        let (found, time) = check_hooks(&t.join("hooks"), Path::new("/usr/libexec/x/swtpm-keeper"));
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, Level::Fix);
        assert!(found[0].1.contains("ln -s"), "{}", found[0].1);
        assert_eq!(time, None);
        std::fs::remove_dir_all(&t).unwrap();
    }

    #[test]
    fn the_capture_schedule_is_the_timer_where_systemd_runs_else_a_cron_line() {
        let lvl = |sd, t, c| schedule_finding(sd, t, c).0;
        assert_eq!(lvl(true, (true, true), false), Level::Ok);
        assert_eq!(lvl(true, (true, false), false), Level::Fix);
        assert_eq!(lvl(true, (false, false), false), Level::Fix);
        assert_eq!(lvl(true, (false, false), true), Level::Ok);
        assert_eq!(lvl(false, (false, false), true), Level::Ok);
        let (level, line) = schedule_finding(false, (false, false), false);
        assert_eq!(level, Level::Warn);
        assert!(
            line.contains("*/5 * * * * root /usr/sbin/swtpm-keeper capture --all"),
            "{line}"
        );
        assert!(schedule_finding(true, (false, false), false)
            .1
            .contains("systemctl enable --now"));
    }
}

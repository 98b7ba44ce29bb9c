//! `swtpm-keeper check`: is everything in place on this host?

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::config::{Config, Source};
use crate::error::{Error, Result};
use crate::logging::sanitize;
use crate::qemuconf::{self, QemuConf};
use crate::running;
use crate::store::Store;

#[derive(Debug, PartialEq)]
enum Level {
    Ok,
    Warn,
    Fix,
}

struct Report<'a> {
    out: &'a mut dyn Write,
    fixes: usize,
}

impl Report<'_> {
    fn line(&mut self, level: Level, msg: String) {
        let tag = match level {
            Level::Ok => "ok  ",
            Level::Warn => "warn",
            Level::Fix => {
                self.fixes += 1;
                "FIX "
            }
        };
        let _ = writeln!(self.out, "{tag} {msg}");
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

/// Hook files libvirt would run that lead to `exe`, or to the qemu-chain
/// script installed beside it (libvirt < 6.5 with a hook of its own).
fn installed_hooks(hooks_dir: &Path, exe: &Path) -> Vec<PathBuf> {
    let mut candidates = vec![hooks_dir.join("qemu")];
    if let Ok(rd) = std::fs::read_dir(hooks_dir.join("qemu.d")) {
        let mut v: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        v.sort();
        candidates.extend(v);
    }
    candidates
        .into_iter()
        .filter(|p| {
            std::fs::canonicalize(p)
                .map(|c| c == exe || c == exe.with_file_name("qemu-chain"))
                .unwrap_or(false)
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

/// The hook files libvirt runs that lead to `exe`, each executable or not,
/// and the newest time one of them was installed.
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
    for h in &hooks {
        let exec = std::fs::metadata(h)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false);
        found.push(if exec {
            (
                Level::Ok,
                format!("hook {} runs {}", h.display(), exe.display()),
            )
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

/// Running VMs with an emulator TPM whose newest capture is older than
/// three capture intervals (or that were never captured).
fn check_freshness(cfg: &Config, now: i64) -> Vec<Finding> {
    let stale_after = 3 * cfg.capture_interval as i64;
    let store = Store::new(&cfg.store_dir);
    let mut found = Vec::new();
    for name in running::names(&cfg.libvirt_run_dir).unwrap_or_default() {
        let Ok(Some(vm)) = running::read(&cfg.libvirt_run_dir, &name) else {
            continue;
        };
        if vm.domain.tpm.is_none() || vm.status.incoming() {
            continue;
        }
        let newest = store
            .read_vm(&vm.domain.uuid, cfg.lock_timeout())
            .ok()
            .and_then(|v| {
                v.generations()
                    .ok()?
                    .last()
                    .and_then(|g| v.read_manifest(g).ok())
            });
        let fix = format!("swtpm-keeper capture {}", sanitize(&name));
        match newest {
            None => found.push((Level::Warn, format!("VM {} runs and its TPM was never captured: {fix}", sanitize(&name)))),
            Some(m) if now - m.time_unix > stale_after => found.push((
                Level::Warn,
                format!(
                    "VM {} runs and its newest capture is {} min old (more than 3 × capture_interval): \
                     is the capture timer running? {fix}",
                    sanitize(&name),
                    (now - m.time_unix) / 60
                ),
            )),
            Some(_) => {}
        }
    }
    found
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

pub fn run(source: &Source, out: &mut dyn Write) -> Result<i32> {
    let mut r = Report { out, fixes: 0 };
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
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    findings.extend(check_freshness(&cfg, now));
    for (level, line) in findings {
        r.line(level, line);
    }
    let _ = writeln!(r.out, "{} to fix", r.fixes);
    let _ = r.out.flush().map_err(|e| Error::failed(e.to_string()));
    Ok(if r.fixes > 0 { 1 } else { 0 })
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
            vec![hooks.join("qemu"), hooks.join("qemu.d/swtpm-keeper")]
        );
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

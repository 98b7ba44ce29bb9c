//! `swtpm-keeper check`: is everything in place on this host?

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::config::{self, Config};
use crate::error::{Error, Result};
use crate::qemuconf::{self, QemuConf};

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

/// Seconds since the epoch at which a process started.
fn process_start(pid: u32) -> Option<i64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22 (starttime, in clock ticks since boot) counts from after ") ".
    let after = &stat[stat.rfind(')')? + 2..];
    let ticks: i64 = after.split_whitespace().nth(19)?.parse().ok()?;
    let btime: i64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse().ok()))?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as i64;
    Some(btime + ticks / hz)
}

fn daemons() -> Vec<(String, u32)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) {
            let comm = comm.trim();
            if comm == "libvirtd" || comm == "virtqemud" {
                v.push((comm.to_owned(), pid));
            }
        }
    }
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

pub fn run(out: &mut dyn Write) -> Result<i32> {
    let mut r = Report { out, fixes: 0 };
    config::require_named()?;
    let path = config::path();
    let cfg = match config::load_current() {
        Ok(c) => {
            let state = if path.exists() {
                "is valid"
            } else {
                "does not exist: the defaults apply"
            };
            r.line(
                Level::Ok,
                format!("configuration {} {state}", path.display()),
            );
            c
        }
        Err(e) => {
            r.line(
                Level::Fix,
                format!("{e}; the checks below use the defaults"),
            );
            Config::default()
        }
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        r.line(
            Level::Warn,
            "not run as root: some checks may be incomplete".into(),
        );
    }

    // The hook, where libvirt looks for it.
    let exe = std::env::current_exe()
        .and_then(std::fs::canonicalize)
        .unwrap_or_default();
    let hooks = installed_hooks(&cfg.libvirt_hooks_dir, &exe);
    let mut hook_time = None;
    if hooks.is_empty() {
        r.line(
            Level::Fix,
            format!(
                "no hook in {} leads to {}: run `make install`, or `ln -s {} {}/qemu.d/swtpm-keeper`",
                cfg.libvirt_hooks_dir.display(),
                exe.display(),
                exe.display(),
                cfg.libvirt_hooks_dir.display()
            ),
        );
    }
    for h in &hooks {
        let md = std::fs::metadata(h);
        let exec = md
            .as_ref()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false);
        if exec {
            r.line(
                Level::Ok,
                format!("hook {} runs {}", h.display(), exe.display()),
            );
        } else {
            r.line(
                Level::Fix,
                format!(
                    "hook {} is not an executable file: chmod 0755 {}",
                    h.display(),
                    exe.display()
                ),
            );
        }
        let installed = std::fs::symlink_metadata(h).map(|m| m.ctime()).unwrap_or(0);
        hook_time = Some(hook_time.unwrap_or(0).max(installed));
    }

    // The daemon: libvirt reads its hook list at start and on reload.
    let ds = daemons();
    if ds.is_empty() {
        r.line(
            Level::Warn,
            "no libvirtd or virtqemud runs: the hook is used from the daemon's next start".into(),
        );
    }
    let reloads = read_reloads(&cfg.run_dir.join("reloaded"));
    for (name, pid) in &ds {
        let (level, msg) = daemon_state(name, *pid, process_start(*pid), hook_time, &reloads);
        r.line(level, msg);
    }

    // The store.
    match std::fs::symlink_metadata(&cfg.store_dir) {
        Err(_) => r.line(
            Level::Warn,
            format!(
                "store {} does not exist yet: the first capture creates it",
                cfg.store_dir.display()
            ),
        ),
        Ok(md) if md.file_type().is_symlink() || !md.is_dir() => r.line(
            Level::Fix,
            format!(
                "store {} is not a directory (a symlink?): make it a directory",
                cfg.store_dir.display()
            ),
        ),
        Ok(md) => {
            let mode = md.mode() & 0o7777;
            if md.uid() != 0 || mode & 0o077 != 0 {
                r.line(
                    Level::Fix,
                    format!(
                        "store {} is owned by uid {} with mode {mode:04o}: it holds every VM's TPM; \
                         chown root:root {} && chmod 0700 {}",
                        cfg.store_dir.display(),
                        md.uid(),
                        cfg.store_dir.display(),
                        cfg.store_dir.display()
                    ),
                );
            } else {
                r.line(
                    Level::Ok,
                    format!(
                        "store {} is root's, mode {mode:04o}",
                        cfg.store_dir.display()
                    ),
                );
            }
        }
    }

    // syslog.
    let reachable = std::os::unix::net::UnixDatagram::unbound()
        .and_then(|s| s.connect(&cfg.syslog_socket))
        .is_ok();
    if reachable {
        r.line(
            Level::Ok,
            format!("syslog listens at {}", cfg.syslog_socket.display()),
        );
    } else {
        r.line(
            Level::Fix,
            format!(
                "nothing listens at {}: the hook's log lines go to stderr, which libvirt discards; start rsyslog or journald",
                cfg.syslog_socket.display()
            ),
        );
    }

    // Owners of restored files.
    let qc = QemuConf::load(&cfg.qemu_conf);
    for (what, key, value, owner) in [
        ("TPM state", "swtpm_user", &qc.swtpm_user, qc.swtpm_owner()),
        ("NVRAM", "user", &qc.user, qc.qemu_owner()),
    ] {
        match value {
            Some(u) if qemuconf::lookup_user(u).is_none() => r.line(
                Level::Fix,
                format!(
                    "{key} = {u:?} in {} is no user on this host",
                    cfg.qemu_conf.display()
                ),
            ),
            _ => r.line(
                Level::Ok,
                format!(
                    "restored {what} will be owned by {} ({}:{})",
                    owner.desc, owner.uid, owner.gid
                ),
            ),
        }
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
}

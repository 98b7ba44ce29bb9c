//! The store's temporaries are named after the run that made them:
//! `.tmp-<host>@<pid>-<generation>` (a generation being built),
//! `.trash-<host>@<pid>-<generation>` (one being removed) and
//! `.tmp-<host>@<pid>-<marker>` (a marker being replaced). A later run
//! removes one only when its owner is provably gone.
//!
//! Why a rule, when every run removes leftovers under the VM's exclusive
//! lock? If the lock works, it is not needed: a live writer holds the lock,
//! so under the lock every temporary is a dead run's (one that crashed,
//! was killed, or whose host died while holding the lock; its flock went
//! with it). But on a shared store the lock is the filesystem's, and it
//! can fail across hosts: NFS mounted with `local_lock=flock` (each host
//! locks only locally), a CephFS or NFS client evicted or partitioned
//! whose locks the server dropped while its process keeps writing, an old
//! kernel or FUSE layer that keeps flock local. Then two hosts are in the
//! VM's directory at once, and deleting the other's `.tmp-` would make its
//! capture fail (a lost stop). So removal asks for proof, which costs
//! nothing when the lock works:
//! - this host's temporary: its pid is not alive, or is alive but is not
//!   swtpm-keeper (the pid was reused), or is this very run (which has
//!   written nothing yet when it cleans up);
//! - another host's (or a 0.1.0 one, which names no owner): its pids mean
//!   nothing here, so only age proves it: older than `FOREIGN_AGE`.
//!
//! Keeping too much only costs space until a later run; removing too much
//! loses a capture. Host names are compared after `host_tag`, so two hosts
//! whose names differ only in bytes outside `[A-Za-z0-9._-]` look alike:
//! cluster hosts are expected to have distinct DNS-style names.

use std::path::Path;
use std::time::Duration;

/// How old another host's temporary must be before a run here removes it.
/// A run writes for well under a second and lives at most `lock_timeout`
/// (at most 300 s) plus its I/O: an hour is over ten times that, and room
/// for hosts' clocks that disagree by minutes (the age is this host's
/// clock against the mtime the filesystem recorded; a future mtime counts
/// as new).
pub const FOREIGN_AGE: Duration = Duration::from_secs(3600);

/// Ends the host in a temporary's name; never part of a `host_tag`.
const HOST_END: char = '@';

/// This host's name as temporaries carry it: every byte outside
/// `[A-Za-z0-9._-]` becomes `_`, so that the name is a safe file name and
/// `@` ends it. At most 64 bytes (Linux's HOST_NAME_MAX).
pub fn host_tag() -> String {
    tag(&crate::users::host_name())
}

fn tag(host: &str) -> String {
    host.bytes()
        .take(64)
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_' {
                b as char
            } else {
                '_'
            }
        })
        .collect()
}

/// `<prefix><host>@<pid>-<what>`, owned by this run.
pub fn name(prefix: &str, what: &str) -> String {
    format!(
        "{prefix}{}{HOST_END}{}-{what}",
        host_tag(),
        std::process::id()
    )
}

/// Who made a temporary, read from its name (after the prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    Run {
        host: String,
        pid: u32,
    },
    /// A name without `<host>@<pid>-` (0.1.0 wrote those).
    Unknown,
}

pub fn owner(after_prefix: &str) -> Owner {
    let parsed = after_prefix.split_once(HOST_END).and_then(|(host, rest)| {
        let (pid, _) = rest.split_once('-')?;
        let valid = !host.is_empty()
            && tag(host) == host
            && !pid.is_empty()
            && pid.bytes().all(|b| b.is_ascii_digit());
        Some((host, pid.parse::<u32>().ok().filter(|_| valid)?))
    });
    match parsed {
        Some((host, pid)) => Owner::Run {
            host: host.to_owned(),
            pid,
        },
        None => Owner::Unknown,
    }
}

/// Whether the owner of a temporary is provably gone (see the module
/// comment). `age` is how long ago it was last modified (None: in the
/// future, or unknown); `here` is this host's tag, `me` this process's pid.
pub fn abandoned(owner: &Owner, age: Option<Duration>, here: &str, me: u32, proc: &Path) -> bool {
    match owner {
        Owner::Run { host, pid } if host == here => *pid == me || !is_live_keeper(proc, *pid),
        _ => age.is_some_and(|a| a >= FOREIGN_AGE),
    }
}

/// Whether `pid` is a live swtpm-keeper. Whatever cannot be read counts as
/// alive: keeping a dead run's temporary is harmless, removing a live
/// one's is not.
fn is_live_keeper(proc: &Path, pid: u32) -> bool {
    let dir = proc.join(pid.to_string());
    match std::fs::read(dir.join("comm")) {
        Ok(comm) if comm.trim_ascii_end() == b"swtpm-keeper" => true,
        Ok(_) => {
            // Started through a link of another name (a hook named `qemu`):
            // the same executable as this run's counts too.
            let exe = std::fs::read_link(dir.join("exe"));
            let mine = std::fs::read_link(proc.join("self/exe"));
            match (exe, mine) {
                (Ok(exe), Ok(mine)) => exe == mine || strip_deleted(&exe) == mine,
                (Err(e), _) if e.kind() == std::io::ErrorKind::NotFound => false,
                _ => true,
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(_) => true,
    }
}

/// An executable replaced by an upgrade reads as "<path> (deleted)".
fn strip_deleted(p: &Path) -> std::path::PathBuf {
    let s = p.to_string_lossy();
    s.strip_suffix(" (deleted)").unwrap_or(&s).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_host_and_pid_and_parse_back() {
        let n = name(".tmp-", "00000001-20261121T215608Z");
        let rest = n.strip_prefix(".tmp-").unwrap();
        assert_eq!(
            owner(rest),
            Owner::Run {
                host: host_tag(),
                pid: std::process::id()
            }
        );
        // Hosts with dashes and dots, markers with dashes.
        assert_eq!(
            owner("node-7.example.org@12-incoming-node-8.json"),
            Owner::Run {
                host: "node-7.example.org".into(),
                pid: 12
            }
        );
        assert_eq!(tag("a b/c@d"), "a_b_c_d");
    }

    #[test]
    fn names_of_0_1_0_and_garbage_have_no_owner() {
        for n in [
            "00000001-20261121T215608Z",
            "migrated-away.json",
            "capture-failed.json",
            "host@-x",
            "@12-x",
            "host@12",
            "ho st@12-x",
            "host@99999999999-x",
        ] {
            assert_eq!(owner(n), Owner::Unknown, "{n}");
        }
    }

    #[test]
    fn another_hosts_temporary_goes_only_when_old() {
        let other = Owner::Run {
            host: "elsewhere".into(),
            pid: 1,
        };
        let p = Path::new("/proc");
        let me = std::process::id();
        assert!(!abandoned(
            &other,
            Some(Duration::from_secs(60)),
            "here",
            me,
            p
        ));
        assert!(!abandoned(&other, None, "here", me, p));
        assert!(abandoned(&other, Some(FOREIGN_AGE), "here", me, p));
        assert!(!abandoned(
            &Owner::Unknown,
            Some(Duration::ZERO),
            "here",
            me,
            p
        ));
        assert!(abandoned(
            &Owner::Unknown,
            Some(FOREIGN_AGE * 2),
            "here",
            me,
            p
        ));
    }

    #[test]
    fn this_hosts_temporary_goes_when_its_pid_is_not_a_live_keeper() {
        let proc = std::env::temp_dir().join(format!("swk-leftover-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&proc);
        for (pid, comm) in [(10, "swtpm-keeper\n"), (11, "sleep\n")] {
            std::fs::create_dir_all(proc.join(pid.to_string())).unwrap();
            std::fs::write(proc.join(format!("{pid}/comm")), comm).unwrap();
        }
        let run = |pid| Owner::Run {
            host: "here".into(),
            pid,
        };
        let young = Some(Duration::ZERO);
        assert!(
            !abandoned(&run(10), young, "here", 1, &proc),
            "a live keeper"
        );
        assert!(abandoned(&run(11), young, "here", 1, &proc), "a reused pid");
        assert!(abandoned(&run(12), young, "here", 1, &proc), "no such pid");
        assert!(abandoned(&run(10), young, "here", 10, &proc), "this run");
        std::fs::remove_dir_all(&proc).unwrap();
    }

    #[test]
    fn a_keeper_started_by_another_name_or_replaced_by_an_upgrade_counts_as_alive() {
        let proc = std::env::temp_dir().join(format!("swk-leftover-exe-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&proc);
        std::fs::create_dir_all(proc.join("self")).unwrap();
        std::os::unix::fs::symlink(
            "/usr/libexec/swtpm-keeper/swtpm-keeper",
            proc.join("self/exe"),
        )
        .unwrap();
        let pid_dir = |pid: u32, comm: &str| {
            let d = proc.join(pid.to_string());
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("comm"), comm).unwrap();
            d
        };
        // A hook started as `qemu`: the same executable.
        let same = pid_dir(20, "qemu\n");
        std::os::unix::fs::symlink("/usr/libexec/swtpm-keeper/swtpm-keeper", same.join("exe"))
            .unwrap();
        // Still running the executable an upgrade replaced.
        let old = pid_dir(21, "qemu\n");
        std::os::unix::fs::symlink(
            "/usr/libexec/swtpm-keeper/swtpm-keeper (deleted)",
            old.join("exe"),
        )
        .unwrap();
        // Another program.
        let other = pid_dir(22, "qemu\n");
        std::os::unix::fs::symlink("/usr/bin/qemu-system-x86_64", other.join("exe")).unwrap();
        // Its exe cannot be read (not a link here; EACCES for real): alive.
        let unreadable = pid_dir(23, "qemu\n");
        std::fs::write(unreadable.join("exe"), b"").unwrap();
        // Its comm cannot be read (a directory here): alive.
        std::fs::create_dir_all(proc.join("24/comm")).unwrap();
        assert!(
            is_live_keeper(&proc, 20),
            "the same executable by another name"
        );
        assert!(is_live_keeper(&proc, 21), "the replaced executable");
        assert!(!is_live_keeper(&proc, 22), "another program");
        assert!(is_live_keeper(&proc, 23), "an exe that cannot be read");
        assert!(is_live_keeper(&proc, 24), "a comm that cannot be read");
        std::fs::remove_dir_all(&proc).unwrap();
    }

    #[test]
    fn temporaries_carry_this_hosts_name() {
        // The kernel's own record of the name, not the code under test.
        let kernel = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        assert_eq!(host_tag(), tag(kernel.trim()));
        assert!(name(".tmp-", "x").starts_with(&format!(".tmp-{}@", tag(kernel.trim()))));
        assert_eq!(tag("a b/c@d"), "a_b_c_d");
    }
}

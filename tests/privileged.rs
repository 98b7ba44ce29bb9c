//! What needs root to set up: full disks (tmpfs mounts), device nodes, and
//! the hook run as an unprivileged user the way a session libvirt runs it.
//! Ignored by a plain `cargo test`; `tests/run-all` runs them as root with
//! `cargo test -- --include-ignored`.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn require_root() {
    // SAFETY: no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root: run it through tests/run-all"
    );
}

/// A small tmpfs mounted at a path, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .status()
            .unwrap();
        assert!(ok.success(), "cannot mount a tmpfs at {}", at.display());
        Tmpfs(at.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn no_leftovers(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten().all(|e| {
                !e.file_name().to_string_lossy().contains(".tmp-")
                    && !e.file_name().to_string_lossy().contains("swtpm-keeper-")
            })
        })
        .unwrap_or(true)
}

#[test]
#[ignore = "needs root (mount)"]
fn a_full_store_fails_the_capture_cleanly_and_keeps_every_earlier_generation() {
    require_root();
    let h = Host::new("fullstore");
    let _m = Tmpfs::mount(&h.store, "160k");
    h.put_state(
        UUID_EFI,
        &[("tpm2-00.permall", &fixture("tpm2-00.permall.encrypted"))],
    );
    std::fs::write(h.nvram_path(), vec![1u8; 4096]).unwrap();
    assert_eq!(
        h.hook("efitest", "stopped", "end", "-", &h.efi_xml())
            .status
            .code(),
        Some(0)
    );
    let before = h.generations(UUID_EFI);
    assert_eq!(before.len(), 1, "{:?}", h.logs());
    h.logs();

    // The NVRAM grows past what the store has room for.
    std::fs::write(h.nvram_path(), vec![2u8; 540 * 1024]).unwrap();
    let out = h.hook("efitest", "stopped", "end", "-", &h.efi_xml());
    assert_eq!(out.status.code(), Some(0), "a stop never fails");
    let logs = h.logs();
    assert_eq!(logs.len(), 1, "{logs:?}");
    assert!(
        logs[0].starts_with("<27>")
            && logs[0].contains("NOT captured")
            && logs[0].contains("No space left on device"),
        "{}",
        logs[0]
    );
    assert_eq!(h.generations(UUID_EFI), before);
    swtpm_keeper::store::load_verified(&h.vm_store(UUID_EFI).join(&before[0]), 1 << 30).unwrap();
    assert!(
        no_leftovers(&h.vm_store(UUID_EFI)),
        "the failed generation was left behind"
    );
    // Remembered in run_dir, which a full store cannot touch; check names
    // the VM (transient, so libvirt forgot it) and the reason.
    let record = h.run_dir().join(format!("failures/{UUID_EFI}.json"));
    let text = std::fs::read_to_string(record).unwrap();
    assert!(text.contains("No space left on device"), "{text}");
    let out = h.run(&["check"], b"");
    let t = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.lines().any(|l| l.starts_with("FIX  VM efitest (")
            && l.contains("no longer defines or runs here: its last capture failed")
            && l.contains("No space left on device")),
        "{t}"
    );
}

#[test]
#[ignore = "needs root (mount)"]
fn a_full_restore_target_leaves_no_partial_state() {
    require_root();
    let h = Host::new("fulltarget");
    h.put_state(
        UUID_EFI,
        &[("tpm2-00.permall", &fixture("tpm2-00.permall.encrypted"))],
    );
    std::fs::write(h.nvram_path(), vec![3u8; 540 * 1024]).unwrap();
    h.hook("efitest", "stopped", "end", "-", &h.efi_xml());
    std::fs::remove_dir_all(h.swtpm.join(UUID_EFI)).unwrap();
    std::fs::remove_file(h.nvram_path()).unwrap();

    // The NVRAM does not fit: the start is refused, nothing partial stays.
    let nv = Tmpfs::mount(&h.nvram_dir, "64k");
    let out = h.hook("efitest", "prepare", "begin", "-", &h.efi_xml());
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("No space left on device"));
    assert!(!h.nvram_path().exists());
    assert!(no_leftovers(&h.nvram_dir));
    drop(nv);

    // The TPM state does not fit either.
    let _t = Tmpfs::mount(&h.swtpm, "4k");
    let out = h.hook("efitest", "prepare", "begin", "-", &h.efi_xml());
    assert_eq!(out.status.code(), Some(1));
    assert!(
        !h.state_dir(UUID_EFI).exists(),
        "a partial state dir was left"
    );
    assert!(no_leftovers(&h.swtpm.join(UUID_EFI)));
}

#[test]
#[ignore = "needs root (mknod)"]
fn a_device_node_in_place_of_state_is_refused() {
    require_root();
    let h = Host::new("devnode");
    let d = h.state_dir(UUID_TRANS);
    std::fs::create_dir_all(&d).unwrap();
    let ok = Command::new("mknod")
        .arg(d.join("tpm2-00.permall"))
        .args(["c", "1", "3"])
        .status()
        .unwrap();
    assert!(ok.success());
    h.stop_transient();
    assert!(h.generations(UUID_TRANS).is_empty());
    let logs = h.logs();
    assert!(logs[0].contains("not a regular file"), "{logs:?}");
}

/// The system paths a session daemon's hook run must never look at.
const SYSTEM_PATHS: [&str; 5] = [
    "/etc/swtpm-keeper",
    "/var/lib/swtpm-keeper",
    "/etc/libvirt",
    "/var/lib/libvirt",
    "/run/libvirt",
];

#[test]
#[ignore = "needs root (to become another user)"]
fn a_session_libvirts_hook_run_never_fails_the_vm_and_touches_no_system_path() {
    require_root();
    let h = Host::new("session");
    // A copy anyone can run, as a session daemon's user would.
    let exe = h.root.join("swtpm-keeper");
    // Copied by a child process: a write fd held here would leak into any
    // process another test thread forks meanwhile, and exec would then
    // fail with "Text file busy".
    let cp = Command::new("install")
        .args(["-m", "0755"])
        .arg(bin())
        .arg(&exe)
        .status()
        .unwrap();
    assert!(cp.success());
    // nobody may send to the test's syslog socket (its /dev/log).
    std::fs::set_permissions(
        h.log_socket(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    for (op, sub) in [
        ("prepare", "begin"),
        ("stopped", "end"),
        ("release", "end"),
        ("migrate", "begin"),
    ] {
        let trace = h.root.join(format!("trace-{op}"));
        let trace_arg = trace.to_str().unwrap().to_owned();
        let exe_arg = exe.to_str().unwrap().to_owned();
        // Every path the run names (strace), as nobody with libvirt's
        // environment, its syslog lines at this test's socket.
        let out = run_with(
            &mut h.with_own_dev_log(
                Path::new("strace"),
                &[
                    "-f",
                    "-qq",
                    "-e",
                    "trace=%file",
                    "-o",
                    &trace_arg,
                    "setpriv",
                    "--reuid=65534",
                    "--regid=65534",
                    "--clear-groups",
                    "env",
                    "-i",
                    "PATH=/usr/bin:/bin",
                    "HOME=/nonexistent",
                    "LC_ALL=C",
                    &exe_arg,
                    "hook",
                    "tpmtrans",
                    op,
                    sub,
                    "-",
                ],
            ),
            &fixture("tpm2-transient.stopped.xml"),
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "{op}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{op}");
        let logs = h.logs();
        assert!(logs.is_empty(), "{op}: a session run logged: {logs:?}");
        let text = std::fs::read_to_string(&trace).unwrap();
        assert!(text.contains(&exe_arg), "{op}: the trace misses the run");
        for p in SYSTEM_PATHS {
            let seen: Vec<&str> = text.lines().filter(|l| l.contains(p)).collect();
            assert!(seen.is_empty(), "{op}: looked at {p}: {seen:?}");
        }
    }
}

//! Crash at any instant: the store stays valid, a generation is the old
//! state or the new one (never a mix), a later run removes leftovers, and an
//! interrupted restore leaves libvirt's path untouched or complete.
//!
//! The failpoint tests need `cargo test --features failpoints` (the
//! feature is never in release builds); the SIGKILL loops run always.

mod common;

use common::*;
use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use swtpm_keeper::store::{is_generation_name, load_verified};

/// Every generation verifies; returns their permall bytes, oldest first.
fn verified_states(h: &Host, uuid: &str) -> Vec<Vec<u8>> {
    let dir = h.vm_store(uuid);
    let mut out = Vec::new();
    for g in h.generations(uuid) {
        let l = load_verified(&dir.join(&g), 1 << 30)
            .unwrap_or_else(|e| panic!("{g} does not verify: {e}"));
        out.push(l.file("tpm2-00.permall").expect("permall").to_vec());
    }
    out
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| {
                    n.starts_with(".tmp-")
                        || n.starts_with(".trash-")
                        || n.contains(".swtpm-keeper-")
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A valid permall that differs from the fixture in byte 100 + i.
fn state(i: usize) -> Vec<u8> {
    let mut p = fixture("tpm2-00.permall.plain");
    p[100 + i % 3000] ^= (i / 3000 + 1) as u8;
    p
}

#[cfg(feature = "failpoints")]
fn hook_with_failpoint(
    h: &Host,
    fp: &str,
    op: &str,
    sub: &str,
    xml: &[u8],
) -> std::process::Output {
    run_with(
        Command::new(bin())
            .args(["hook", "tpmtrans", op, sub, "-"])
            .env("SWTPM_KEEPER_CONFIG", &h.conf)
            .env("SWTPM_KEEPER_FAILPOINT", fp),
        xml,
    )
}

#[cfg(feature = "failpoints")]
#[test]
fn a_crash_at_any_step_of_a_capture_leaves_the_old_or_the_new_state() {
    let xml = fixture("tpm2-transient.stopped.xml");
    for fp in [
        "capture-after-read",
        "store-after-first-file",
        "store-before-rename",
        "store-after-rename",
        "prune-after-rename",
    ] {
        // generations = 1: the new generation prunes the old one.
        let h = Host::with_config(&format!("fp-{fp}"), "generations = 1\n");
        let (old, new) = (state(1), state(2));
        h.put_state(UUID_TRANS, &[("tpm2-00.permall", &old)]);
        h.hook("tpmtrans", "stopped", "end", "-", &xml);
        h.put_state(UUID_TRANS, &[("tpm2-00.permall", &new)]);

        let out = hook_with_failpoint(&h, fp, "stopped", "end", &xml);
        assert_eq!(
            out.status.code(),
            None,
            "{fp}: the failpoint did not crash the run: {:?}",
            h.logs()
        );
        let states = verified_states(&h, UUID_TRANS);
        let newest = states
            .last()
            .unwrap_or_else(|| panic!("{fp}: no complete generation left"));
        assert!(
            newest == &old || newest == &new,
            "{fp}: the newest generation is neither state"
        );

        // The crash left what the next run must remove: a half-written
        // generation, or a pruned one renamed to the trash.
        let left = match fp {
            "store-after-first-file" | "store-before-rename" => Some(".tmp-"),
            "prune-after-rename" => Some(".trash-"),
            _ => None,
        };
        if let Some(prefix) = left {
            let found = leftovers(&h.vm_store(UUID_TRANS));
            assert!(
                found.iter().any(|n| n.starts_with(prefix)),
                "{fp}: the crash left no {prefix}* entry: {found:?}"
            );
        }

        // The next run cleans up and ends with the new state, complete.
        assert_eq!(
            h.hook("tpmtrans", "stopped", "end", "-", &xml)
                .status
                .code(),
            Some(0)
        );
        assert_eq!(
            leftovers(&h.vm_store(UUID_TRANS)),
            Vec::<String>::new(),
            "{fp}"
        );
        assert_eq!(
            verified_states(&h, UUID_TRANS).last().unwrap(),
            &new,
            "{fp}"
        );
    }
}

#[cfg(feature = "failpoints")]
#[test]
fn a_crash_at_any_step_of_a_restore_leaves_libvirts_path_untouched_or_complete() {
    let xml = String::from_utf8(fixture("efi-secureboot-encrypted-tpm.stopped.xml")).unwrap();
    for fp in [
        "restore-file-before-rename",
        "restore-after-nvram",
        "restore-dir-half-written",
        "restore-before-rename",
        "restore-after-exchange",
        "replace-before-rename",
    ] {
        let h = Host::new(&format!("fprestore-{fp}"));
        let xml = xml.replace("/var/lib/libvirt/qemu/nvram", h.nvram_dir.to_str().unwrap());
        let permall = fixture("tpm2-00.permall.encrypted");
        let nvram = vec![7u8; 64 * 1024];
        h.put_state(UUID_EFI, &[("tpm2-00.permall", &permall), (".lock", b"")]);
        std::fs::write(h.nvram_path(), &nvram).unwrap();
        h.hook("efitest", "stopped", "end", "-", xml.as_bytes());
        // restore-after-exchange needs a state dir to swap out; the others start from nothing.
        std::fs::remove_file(h.state_dir(UUID_EFI).join("tpm2-00.permall")).unwrap();
        if fp != "restore-after-exchange" {
            std::fs::remove_dir_all(h.swtpm.join(UUID_EFI)).unwrap();
        }
        std::fs::remove_file(h.nvram_path()).unwrap();
        let (op, sub) = if fp == "replace-before-rename" {
            ("migrate", "begin")
        } else {
            ("prepare", "begin")
        };

        let out = run_with(
            Command::new(bin())
                .args(["hook", "efitest", op, sub, "-"])
                .env("SWTPM_KEEPER_CONFIG", &h.conf)
                .env("SWTPM_KEEPER_FAILPOINT", fp),
            xml.as_bytes(),
        );
        assert_eq!(
            out.status.code(),
            None,
            "{fp}: the failpoint did not crash the run"
        );
        let p = h.state_dir(UUID_EFI).join("tpm2-00.permall");
        if p.exists() {
            assert_eq!(
                std::fs::read(&p).unwrap(),
                permall,
                "{fp}: a partial TPM state in libvirt's path"
            );
        }
        if h.nvram_path().exists() {
            assert_eq!(
                std::fs::read(h.nvram_path()).unwrap(),
                nvram,
                "{fp}: a partial NVRAM"
            );
        }
        // The next start completes the pair and leaves no temporaries.
        let out = h.hook("efitest", "prepare", "begin", "-", xml.as_bytes());
        assert_eq!(
            out.status.code(),
            Some(0),
            "{fp}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(std::fs::read(&p).unwrap(), permall, "{fp}");
        assert_eq!(std::fs::read(h.nvram_path()).unwrap(), nvram, "{fp}");
        assert_eq!(
            leftovers(&h.swtpm.join(UUID_EFI)),
            Vec::<String>::new(),
            "{fp}"
        );
        assert_eq!(leftovers(&h.nvram_dir), Vec::<String>::new(), "{fp}");
        assert_eq!(
            leftovers(&h.vm_store(UUID_EFI)),
            Vec::<String>::new(),
            "{fp}"
        );
    }
}

/// Kill a run after `delay`; true if it was still running.
fn kill_after(mut child: std::process::Child, delay: Duration) -> bool {
    std::thread::sleep(delay);
    let running = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    child.wait().unwrap();
    running
}

fn spawn_hook(h: &Host, name: &str, op: &str, sub: &str, xml: &[u8]) -> std::process::Child {
    use std::io::Write;
    let mut c = Command::new(bin())
        .args(["hook", name, op, sub, "-"])
        .env("SWTPM_KEEPER_CONFIG", &h.conf)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _ = c.stdin.take().unwrap().write_all(xml);
    c
}

/// How long one uninterrupted run takes: kills land within twice that.
fn calibrate(run: impl Fn()) -> u64 {
    let t = Instant::now();
    for _ in 0..3 {
        run();
    }
    (t.elapsed().as_micros() as u64 / 3).max(500)
}

/// A cheap deterministic generator: the loop is reproducible.
struct Lcg(u64);
impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

#[test]
fn sigkill_at_random_moments_of_captures_never_leaves_a_mixed_or_invalid_store() {
    let h = Host::with_config("killcapture", "generations = 4\n");
    let xml = fixture("tpm2-transient.stopped.xml");
    let mut rng = Lcg(0x5eed);
    let mut written: HashSet<Vec<u8>> = HashSet::new();
    let (runs, mut killed) = (300, 0);
    let window = 2 * calibrate(|| {
        h.hook("tpmtrans", "stopped", "end", "-", &xml);
    });
    written.insert(fixture("tpm2-00.permall.plain"));
    let t = Instant::now();
    for i in 0..runs {
        let s = state(i);
        written.insert(s.clone());
        h.put_state(UUID_TRANS, &[("tpm2-00.permall", &s)]);
        let child = spawn_hook(&h, "tpmtrans", "stopped", "end", &xml);
        if kill_after(child, Duration::from_micros(rng.below(window))) {
            killed += 1;
        }
        for st in verified_states(&h, UUID_TRANS) {
            assert!(
                written.contains(&st),
                "run {i}: a generation holds a state that was never written"
            );
        }
    }
    // A last run without a kill cleans everything up.
    h.put_state(UUID_TRANS, &[("tpm2-00.permall", &state(runs))]);
    assert_eq!(
        h.hook("tpmtrans", "stopped", "end", "-", &xml)
            .status
            .code(),
        Some(0)
    );
    assert_eq!(leftovers(&h.vm_store(UUID_TRANS)), Vec::<String>::new());
    assert_eq!(
        verified_states(&h, UUID_TRANS).last().unwrap(),
        &state(runs)
    );
    eprintln!(
        "kill loop (capture): {runs} runs, {killed} killed mid-run (window {window} us), {:?}",
        t.elapsed()
    );
    assert!(
        killed > runs / 10,
        "too few runs were killed mid-run ({killed}): the loop tests nothing"
    );
}

#[test]
fn sigkill_at_random_moments_of_restores_leaves_libvirts_path_absent_or_complete() {
    let h = Host::new("killrestore");
    let xml = h.efi_xml();
    let permall = fixture("tpm2-00.permall.encrypted");
    let nvram = vec![9u8; 540 * 1024];
    h.put_state(UUID_EFI, &[("tpm2-00.permall", &permall)]);
    std::fs::write(h.nvram_path(), &nvram).unwrap();
    h.hook("efitest", "stopped", "end", "-", &xml);
    let mut rng = Lcg(0xfeed);
    let (runs, mut killed, mut complete) = (200, 0, 0);
    let window = 2 * calibrate(|| {
        let _ = std::fs::remove_dir_all(h.state_dir(UUID_EFI));
        let _ = std::fs::remove_file(h.nvram_path());
        h.hook("efitest", "prepare", "begin", "-", &xml);
    });
    for i in 0..runs {
        let _ = std::fs::remove_dir_all(h.state_dir(UUID_EFI));
        let _ = std::fs::remove_file(h.nvram_path());
        let child = spawn_hook(&h, "efitest", "prepare", "begin", &xml);
        if kill_after(child, Duration::from_micros(rng.below(window))) {
            killed += 1;
        }
        let p = h.state_dir(UUID_EFI).join("tpm2-00.permall");
        if p.exists() {
            assert_eq!(
                std::fs::read(&p).unwrap(),
                permall,
                "run {i}: partial TPM state"
            );
            complete += 1;
        }
        if h.nvram_path().exists() {
            assert_eq!(
                std::fs::read(h.nvram_path()).unwrap(),
                nvram,
                "run {i}: partial NVRAM"
            );
        }
    }
    let _ = std::fs::remove_dir_all(h.state_dir(UUID_EFI));
    let _ = std::fs::remove_file(h.nvram_path());
    assert_eq!(
        h.hook("efitest", "prepare", "begin", "-", &xml)
            .status
            .code(),
        Some(0)
    );
    assert_eq!(leftovers(&h.swtpm.join(UUID_EFI)), Vec::<String>::new());
    assert_eq!(leftovers(&h.nvram_dir), Vec::<String>::new());
    eprintln!("kill loop (restore): {runs} runs, {killed} killed mid-run (window {window} us), {complete} left a complete state");
    assert!(
        killed > runs / 10,
        "too few runs were killed mid-run ({killed})"
    );
    assert!(
        complete > 0,
        "no run completed: the window is too short to test both outcomes"
    );
}

#[test]
fn generation_names_never_collide_with_leftovers() {
    assert!(!is_generation_name(".tmp-00000001-20261121T000000Z"));
}

/// A crash at any step of mending a corrupt state at `prepare` (issue 13)
/// leaves libvirt's path holding the corrupt state or the good one (never a
/// mix, never nothing), every generation sound, and the next start mends
/// it; no temporary outlives that start.
#[cfg(feature = "failpoints")]
#[test]
fn a_crash_at_any_step_of_a_mend_leaves_the_corrupt_or_the_good_state() {
    let xml = domain_xml("mendvm", UUID_TRANS, None, None).into_bytes();
    let hook = |h: &Host, op: &str, sub: &str, fp: Option<&str>| {
        let mut c = h.command(&["hook", "mendvm", op, sub, "-"]);
        if let Some(fp) = fp {
            c.env("SWTPM_KEEPER_FAILPOINT", fp);
        }
        run_with(&mut c, &xml)
    };
    for fp in [
        "dir-before-rename",
        "mend-after-evidence",
        "restore-before-rename",
        "restore-after-exchange",
    ] {
        let h = Host::new(&format!("fp-mend-{fp}"));
        let good = fixture("tpm2-00.permall.plain");
        let permall = h
            .put_state(UUID_TRANS, &[("tpm2-00.permall", &good)])
            .join("tpm2-00.permall");
        assert_ok(&hook(&h, "stopped", "end", None));
        std::fs::write(&permall, b"").unwrap();

        let out = hook(&h, "prepare", "begin", Some(fp));
        assert_eq!(
            out.status.code(),
            None,
            "{fp}: the failpoint did not crash the run"
        );
        let now = std::fs::read(&permall).unwrap();
        assert!(now.is_empty() || now == good, "{fp}: neither state");
        assert_eq!(
            verified_states(&h, UUID_TRANS),
            std::slice::from_ref(&good),
            "{fp}"
        );

        assert_ok(&hook(&h, "prepare", "begin", None));
        assert_eq!(std::fs::read(&permall).unwrap(), good, "{fp}");
        let kept = h.store_entries(UUID_TRANS, "corrupt-").len();
        assert!(kept >= 1, "{fp}: no evidence kept");
        for d in [h.vm_store(UUID_TRANS), h.swtpm.join(UUID_TRANS)] {
            assert_eq!(
                leftovers(&d),
                Vec::<String>::new(),
                "{fp}: in {}",
                d.display()
            );
        }
    }
}

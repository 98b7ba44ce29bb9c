//! `swtpm-keeper capture`: the TPM of running VMs, found in libvirt's
//! status files and read without touching swtpm (a process holds swtpm's
//! fcntl lock on `.lock`, as swtpm does, and must keep it).

mod common;
use common::*;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A host whose libvirt run dir and swtpm-keeper run dir are its own.
fn live_host(test: &str, extra: &str) -> Host {
    let root = std::env::temp_dir().join(format!("swk-{test}-{}", std::process::id()));
    // Room for every generation a test makes, unless it says otherwise.
    let generations = if extra.contains("generations") {
        ""
    } else {
        "generations = 10\n"
    };
    let conf = format!(
        "libvirt_run_dir = {:?}\nrun_dir = {:?}\n{generations}{extra}",
        root.join("run-libvirt"),
        root.join("run-keeper")
    );
    let h = Host::with_config(test, &conf);
    std::fs::create_dir_all(h.root.join("run-libvirt")).unwrap();
    h
}

/// What libvirt writes while a VM runs: `<name>.xml` (a `<domstatus>`
/// around the live `<domain>`) and `<name>.pid`.
fn set_running(h: &Host, name: &str, domain_xml: &[u8], pid: u32, state: &str, job: &str) {
    let run = h.root.join("run-libvirt");
    let status = format!(
        "<!--\nWARNING: THIS IS AN AUTO-GENERATED FILE.\n-->\n\
         <domstatus state='{state}' reason='booted' pid='{pid}'>\n  \
         <monitor path='/run/x/monitor.sock' type='unix'/>\n{job}{}\n</domstatus>\n",
        String::from_utf8_lossy(domain_xml)
    );
    std::fs::write(run.join(format!("{name}.xml")), status).unwrap();
    std::fs::write(run.join(format!("{name}.pid")), format!("{pid}\n")).unwrap();
}

/// The transient fixture VM, running: its state, and a process holding
/// swtpm's lock (also standing in for QEMU's pid).
fn running_trans(h: &Host, permall: &[u8]) -> FcntlHolder {
    let d = h.put_state(UUID_TRANS, &[("tpm2-00.permall", permall), (".lock", b"")]);
    let swtpm = FcntlHolder::hold(&d.join(".lock"));
    let xml = fixture("tpm2-transient.stopped.xml");
    set_running(h, "tpmtrans", &xml, swtpm.pid(), "running", "");
    swtpm
}

/// The EFI fixture VM, running with `permall`: its state dir and a
/// process holding swtpm's lock (also standing in for QEMU's pid).
fn running_efi(h: &Host, permall: &[u8]) -> (std::path::PathBuf, FcntlHolder) {
    let d = h.put_state(UUID_EFI, &[("tpm2-00.permall", permall), (".lock", b"")]);
    let swtpm = FcntlHolder::hold(&d.join(".lock"));
    set_running(h, "efitest", &h.efi_xml(), swtpm.pid(), "running", "");
    (d, swtpm)
}

fn manifest(h: &Host, uuid: &str, g: &str) -> serde_json::Value {
    let b = std::fs::read(h.vm_store(uuid).join(g).join("manifest.json")).unwrap();
    serde_json::from_slice(&b).unwrap()
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A valid swtpm blob other than the fixture: the fixture with its last
/// data byte changed (the header's length still holds).
fn other_permall(n: u8) -> Vec<u8> {
    let mut b = fixture("tpm2-00.permall.plain");
    let i = b.len() / 2;
    b[i] = b[i].wrapping_add(n);
    b
}

#[test]
fn a_running_vm_is_captured_as_it_is_and_swtpm_keeps_its_lock() {
    let h = live_host("live-basic", "");
    let permall = fixture("tpm2-00.permall.plain");
    let mut swtpm = running_trans(&h, &permall);
    let out = h.run(&["capture", "--all"], b"");
    assert_ok(&out);
    let gens = h.generations(UUID_TRANS);
    assert_eq!(gens.len(), 1, "{}", stdout(&out));
    assert!(
        stdout(&out).starts_with(&format!("{} captured tpmtrans", gens[0])),
        "{}",
        stdout(&out)
    );
    let g = h.vm_store(UUID_TRANS).join(&gens[0]);
    assert_eq!(std::fs::read(g.join("tpm2-00.permall")).unwrap(), permall);
    assert!(sha256sum_check(&g));
    let m = manifest(&h, UUID_TRANS, &gens[0]);
    assert_eq!(m["live"], true);
    assert_eq!(m["vm_state"], "running");
    assert_eq!(m["event"], "capture");
    assert!(m["files"][0]["identity"]["ino"].as_u64().is_some(), "{m}");
    assert!(swtpm.alive(), "swtpm was disturbed");
    assert!(h.logs().iter().any(|l| l.contains("event=capture/live")
        && l.contains("captured TPM state of the running VM as generation")));
}

#[test]
fn a_second_pass_over_an_unchanged_vm_reads_nothing_and_adds_nothing() {
    let h = live_host("live-unchanged", "");
    let _swtpm = running_trans(&h, &fixture("tpm2-00.permall.plain"));
    assert_ok(&h.run(&["capture", "--all"], b""));
    let out = h.run(&["capture", "--all"], b"");
    assert_ok(&out);
    assert!(
        stdout(&out).contains("unchanged tpmtrans: no file changed, nothing read"),
        "{}",
        stdout(&out)
    );
    assert_eq!(h.generations(UUID_TRANS).len(), 1);
    // Touched (same bytes, new mtime): read again, found the same.
    let p = h.state_dir(UUID_TRANS).join("tpm2-00.permall");
    let t = std::fs::File::options().write(true).open(&p).unwrap();
    t.set_modified(std::time::SystemTime::now() + Duration::from_secs(5))
        .unwrap();
    let out = h.run(&["capture", "--all"], b"");
    assert!(
        stdout(&out).contains("unchanged tpmtrans: the same state"),
        "{}",
        stdout(&out)
    );
    assert_eq!(h.generations(UUID_TRANS).len(), 1);
    // Changed: a new generation.
    std::fs::write(&p, other_permall(1)).unwrap();
    let out = h.run(&["capture", "--all"], b"");
    assert!(
        stdout(&out).contains("captured tpmtrans"),
        "{}",
        stdout(&out)
    );
    assert_eq!(h.generations(UUID_TRANS).len(), 2);
}

#[test]
fn a_state_renamed_over_during_the_read_is_stored_as_one_whole_version() {
    let h = live_host("live-rename", "");
    let (a, b) = (other_permall(1), other_permall(2));
    let _swtpm = running_trans(&h, &a);
    let dir = h.state_dir(UUID_TRANS);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (dir, stop, a, b) = (dir.clone(), stop.clone(), a.clone(), b.clone());
        // As swtpm does: a temporary, renamed over permall, every 30 ms.
        std::thread::spawn(move || {
            let mut next_b = true;
            while !stop.load(Ordering::Relaxed) {
                let tmp = dir.join("TMP2-00.permall");
                std::fs::write(&tmp, if next_b { &b } else { &a }).unwrap();
                std::fs::rename(&tmp, dir.join("tpm2-00.permall")).unwrap();
                next_b = !next_b;
                std::thread::sleep(Duration::from_millis(30));
            }
        })
    };
    // On a loaded machine a pass may find no two reads alike: it then
    // stores nothing and says so; most passes store a version.
    let mut stored = 0;
    for _ in 0..5 {
        let out = h.run(&["capture", "tpmtrans"], b"");
        match out.status.code() {
            Some(0) => stored += 1,
            _ => assert!(stderr(&out).contains("did not settle"), "{}", stderr(&out)),
        }
    }
    assert!(stored > 0, "no pass stored a version");
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    for g in h.generations(UUID_TRANS) {
        let gd = h.vm_store(UUID_TRANS).join(&g);
        let got = std::fs::read(gd.join("tpm2-00.permall")).unwrap();
        assert!(got == a || got == b, "{g} holds a mix of versions");
        assert!(sha256sum_check(&gd));
    }
}

#[test]
fn a_permall_renamed_away_by_swtpms_backup_mode_is_waited_for_then_reported() {
    let h = live_host("live-backup", "");
    let permall = fixture("tpm2-00.permall.plain");
    let _swtpm = running_trans(&h, &permall);
    let dir = h.state_dir(UUID_TRANS);
    std::fs::rename(dir.join("tpm2-00.permall"), dir.join("tpm2-00.permall.bak")).unwrap();
    let out = h.run(&["capture", "tpmtrans"], b"");
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stderr(&out).contains("did not settle"), "{}", stderr(&out));
    assert!(stderr(&out).contains("it is missing"), "{}", stderr(&out));
    // Half rewritten in place beside the good .bak: read again, never stored.
    std::fs::write(dir.join("tpm2-00.permall"), &permall[..permall.len() / 2]).unwrap();
    let out = h.run(&["capture", "tpmtrans"], b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("did not settle"), "{}", stderr(&out));
    assert!(h.generations(UUID_TRANS).is_empty());
}

#[test]
fn an_nvram_rewritten_in_place_during_the_reads_is_stored_whole_or_not_at_all() {
    let h = live_host("live-nvram", "");
    let (_, _swtpm) = running_efi(&h, &fixture("tpm2-00.permall.encrypted"));
    let nvram = h.nvram_path();
    std::fs::write(&nvram, vec![0u8; 65536]).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (p, stop) = (nvram.clone(), stop.clone());
        // As QEMU's pflash does: in place, the same size, never truncated;
        // each version one byte value throughout, written in two halves.
        std::thread::spawn(move || {
            use std::io::Write;
            let mut f = std::fs::File::options().write(true).open(&p).unwrap();
            let mut i = 1u8;
            while !stop.load(Ordering::Relaxed) {
                for half in 0..2u64 {
                    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(half * 32768)).unwrap();
                    f.write_all(&[i; 32768]).unwrap();
                }
                i = i.wrapping_add(1).max(1);
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let out = h.run(&["capture", "efitest"], b"");
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    // However the writer was scheduled: one whole version, or nothing.
    match out.status.code() {
        Some(0) => {
            let g = h.generations(UUID_EFI).pop().unwrap();
            let stored = std::fs::read(h.vm_store(UUID_EFI).join(&g).join("nvram.fd")).unwrap();
            assert!(
                stored.iter().all(|b| *b == stored[0]),
                "a torn NVRAM was stored"
            );
        }
        _ => {
            assert!(stderr(&out).contains("did not settle"), "{}", stderr(&out));
            assert!(
                h.generations(UUID_EFI).is_empty(),
                "no TPM without its NVRAM"
            );
        }
    }
}

#[test]
fn an_nvram_that_cannot_be_read_means_no_generation_not_a_tpm_alone() {
    let h = live_host("live-nvram-bad", "");
    let (_, _swtpm) = running_efi(&h, &fixture("tpm2-00.permall.encrypted"));
    // Not a regular file: no retry mends it.
    std::fs::create_dir_all(h.nvram_path()).unwrap();
    let out = h.run(&["capture", "efitest"], b"");
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("not a regular file"),
        "{}",
        stderr(&out)
    );
    assert!(
        h.generations(UUID_EFI).is_empty(),
        "no TPM without its NVRAM"
    );
    // A regular NVRAM again: TPM and NVRAM together.
    std::fs::remove_dir(h.nvram_path()).unwrap();
    std::fs::write(h.nvram_path(), vec![3u8; 65536]).unwrap();
    let out = h.run(&["capture", "efitest"], b"");
    assert_ok(&out);
    assert!(
        stdout(&out).contains("captured efitest: TPM and NVRAM"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn an_incoming_migration_is_skipped_and_a_paused_vm_is_recorded_as_paused() {
    let h = live_host("live-incoming", "");
    let d = h.put_state(
        UUID_TRANS,
        &[
            ("tpm2-00.permall", &fixture("tpm2-00.permall.plain")),
            (".lock", b""),
        ],
    );
    let swtpm = FcntlHolder::hold(&d.join(".lock"));
    let xml = fixture("tpm2-transient.stopped.xml");
    let job = "  <job type='none' async='migration in' phase='prepare' flags='0x0'/>\n";
    set_running(&h, "tpmtrans", &xml, swtpm.pid(), "paused", job);
    let out = h.run(&["capture", "--all"], b"");
    assert_ok(&out);
    assert!(
        stdout(&out).contains("- skipped tpmtrans: an incoming migration"),
        "{}",
        stdout(&out)
    );
    assert!(h.generations(UUID_TRANS).is_empty());
    set_running(&h, "tpmtrans", &xml, swtpm.pid(), "paused", "");
    assert_ok(&h.run(&["capture", "--all"], b""));
    let g = h.generations(UUID_TRANS);
    assert_eq!(manifest(&h, UUID_TRANS, &g[0])["vm_state"], "paused");
}

#[test]
fn a_vm_whose_qemu_is_gone_is_not_taken_for_running() {
    let h = live_host("live-gone", "");
    h.put_state(
        UUID_TRANS,
        &[("tpm2-00.permall", &fixture("tpm2-00.permall.plain"))],
    );
    // A status file left behind, naming a pid no process has.
    set_running(
        &h,
        "tpmtrans",
        &fixture("tpm2-transient.stopped.xml"),
        4_194_304,
        "running",
        "",
    );
    let out = h.run(&["capture", "--all"], b"");
    assert_ok(&out);
    assert!(
        stdout(&out).contains("- skipped tpmtrans: it stopped meanwhile"),
        "{}",
        stdout(&out)
    );
    assert!(h.generations(UUID_TRANS).is_empty());
}

#[test]
fn a_stopped_vm_named_is_captured_as_at_a_stop() {
    let h = live_host("live-stopped", "");
    let permall = fixture("tpm2-00.permall.plain");
    h.put_state(UUID_TRANS, &[("tpm2-00.permall", &permall)]);
    std::fs::write(
        h.etc_qemu.join("tpmtrans.xml"),
        fixture("tpm2-transient.stopped.xml"),
    )
    .unwrap();
    let out = h.run(&["capture", "tpmtrans"], b"");
    assert_ok(&out);
    let g = h.generations(UUID_TRANS);
    let m = manifest(&h, UUID_TRANS, &g[0]);
    assert_eq!(
        (m["vm_state"].as_str(), m.get("live")),
        (Some("shutoff"), None)
    );
    let out = h.run(&["capture", "nosuchvm"], b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("libvirt defines no such VM"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn live_captures_never_push_out_the_newest_capture_taken_at_a_stop() {
    let h = live_host("live-retention", "generations = 2\n");
    let permall = fixture("tpm2-00.permall.plain");
    h.put_state(UUID_TRANS, &[("tpm2-00.permall", &permall)]);
    let out = h.stop_transient();
    assert_ok(&out);
    assert_eq!(h.generations(UUID_TRANS).len(), 1, "{:?}", h.logs());
    let at_stop = h.generations(UUID_TRANS)[0].clone();
    let _swtpm = running_trans(&h, &permall);
    for i in 1..=4 {
        std::fs::write(
            h.state_dir(UUID_TRANS).join("tpm2-00.permall"),
            other_permall(i),
        )
        .unwrap();
        assert_ok(&h.run(&["capture", "--all"], b""));
    }
    let gens = h.generations(UUID_TRANS);
    assert!(gens.contains(&at_stop), "{gens:?}");
    assert_eq!(gens.len(), 3, "the stop capture and the newest 2: {gens:?}");
    let out = h.run(&["prune", "--keep", "1"], b"");
    assert_ok(&out);
    assert!(h.generations(UUID_TRANS).contains(&at_stop));
    assert!(
        stdout(&out).contains("the newest capture taken at a stop"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn every_vm_is_tried_and_any_failure_exits_1() {
    let h = live_host("live-partial", "");
    let _good = running_trans(&h, &fixture("tpm2-00.permall.plain"));
    let (_, _bad) = running_efi(&h, b"not a swtpm blob");
    let out = h.run(&["capture", "--all"], b"");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        h.generations(UUID_TRANS).len(),
        1,
        "the good VM was captured"
    );
    assert!(h.generations(UUID_EFI).is_empty());
    assert!(stderr(&out).contains("vm=efitest"), "{}", stderr(&out));
}

#[test]
fn check_fixes_a_running_vm_never_captured_and_warns_of_one_captured_too_long_ago() {
    let h = live_host("live-check", "max_capture_age = 4200\n");
    let _swtpm = running_trans(&h, &fixture("tpm2-00.permall.plain"));
    let text = stdout(&h.run(&["check"], b""));
    assert!(
        text.contains(
            "FIX  VM tpmtrans runs and its TPM was never captured: swtpm-keeper capture tpmtrans"
        ),
        "{text}"
    );
    assert_ok(&h.run(&["capture", "--all"], b""));
    let text = stdout(&h.run(&["check"], b""));
    assert!(!text.contains("VM tpmtrans runs"), "fresh: {text}");
    // Five hours old, more than max_capture_age: stale. (The pass's own
    // record of having found it unchanged would count as newer: gone.)
    let g = h.generations(UUID_TRANS).pop().unwrap();
    let p = h.vm_store(UUID_TRANS).join(&g).join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    m["time_unix"] = (m["time_unix"].as_i64().unwrap() - 5 * 3600).into();
    std::fs::write(&p, serde_json::to_vec(&m).unwrap()).unwrap();
    let seen = h
        .root
        .join("run-keeper/seen")
        .join(format!("{UUID_TRANS}.json"));
    std::fs::remove_file(seen).unwrap();
    let text = stdout(&h.run(&["check"], b""));
    assert!(
        text.contains("warn VM tpmtrans runs and its newest capture is 5 h old"),
        "{text}"
    );
}

#[test]
fn an_unchanged_nvram_is_kept_once_not_written_again_and_survives_pruning() {
    use std::os::unix::fs::MetadataExt;
    let h = live_host("live-nvram-once", "generations = 2\n");
    let (d, _swtpm) = running_efi(&h, &fixture("tpm2-00.permall.encrypted"));
    std::fs::write(h.nvram_path(), vec![5u8; 65536]).unwrap();
    assert_ok(&h.run(&["capture", "efitest"], b""));
    let inode = |g: &str| {
        std::fs::metadata(h.vm_store(UUID_EFI).join(g).join("nvram.fd"))
            .unwrap()
            .ino()
    };
    // The TPM changes, the NVRAM does not: the new generation links it.
    let mut p = fixture("tpm2-00.permall.encrypted");
    p[300] ^= 1;
    std::fs::write(d.join("tpm2-00.permall"), &p).unwrap();
    assert_ok(&h.run(&["capture", "efitest"], b""));
    let g = h.generations(UUID_EFI);
    assert_eq!(g.len(), 2);
    assert_eq!(
        inode(&g[0]),
        inode(&g[1]),
        "the unchanged NVRAM was written again"
    );
    // The NVRAM changes too: a file of its own.
    p[301] ^= 1;
    std::fs::write(d.join("tpm2-00.permall"), &p).unwrap();
    std::fs::write(h.nvram_path(), vec![6u8; 65536]).unwrap();
    assert_ok(&h.run(&["capture", "efitest"], b""));
    let g = h.generations(UUID_EFI);
    assert_eq!(g.len(), 2, "pruned to 2: {g:?}");
    assert_ne!(inode(&g[0]), inode(&g[1]));
    // The generation whose NVRAM was linked outlived the one it came from.
    let out = h.run(&["verify"], b"");
    assert_ok(&out);
    assert_eq!(
        std::fs::read(h.vm_store(UUID_EFI).join(&g[0]).join("nvram.fd")).unwrap(),
        vec![5u8; 65536]
    );
}

//! The hook as libvirt runs it, against a fixture host: what a stop
//! captures, what it refuses, and the protocol rules around it.

mod common;

use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn manifest(h: &Host, uuid: &str, generation: &str) -> serde_json::Value {
    let p = h.vm_store(uuid).join(generation).join("manifest.json");
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

#[test]
fn stopped_captures_tpm_state_nvram_and_both_xmls() {
    let h = Host::new("capture");
    let permall = fixture("tpm2-00.permall.encrypted");
    let state = h.put_state(
        UUID_EFI,
        &[
            ("tpm2-00.permall", &permall),
            (".lock", b""),
            ("TMP2-00.permall", b"junk"),
        ],
    );
    std::fs::write(h.nvram_path(), vec![0x5a; 540 * 1024]).unwrap();
    let xml = h.efi_xml();

    let out = h.hook("efitest", "stopped", "end", "-", &xml);
    assert_eq!(out.status.code(), Some(0));

    let gens = h.generations(UUID_EFI);
    assert_eq!(gens.len(), 1, "{gens:?}");
    let g = h.vm_store(UUID_EFI).join(&gens[0]);
    let names = dir_names(&g);
    assert_eq!(
        names,
        [
            "SHA256SUMS",
            "domain-live.xml",
            "domain.xml",
            "manifest.json",
            "nvram.fd",
            "tpm2-00.permall"
        ]
    );
    assert_eq!(std::fs::read(g.join("tpm2-00.permall")).unwrap(), permall);
    assert_eq!(
        std::fs::read(g.join("nvram.fd")).unwrap(),
        vec![0x5a; 540 * 1024]
    );
    // Transient (no definition in libvirt's config dir): domain.xml is stdin.
    assert_eq!(std::fs::read(g.join("domain.xml")).unwrap(), xml);
    assert_eq!(std::fs::read(g.join("domain-live.xml")).unwrap(), xml);
    assert!(
        sha256sum_check(&g),
        "sha256sum -c failed in {}",
        g.display()
    );

    // Modes: store dirs 0700, files 0600.
    assert_eq!(
        std::fs::metadata(&h.store).unwrap().permissions().mode() & 0o777,
        0o700
    );
    assert_eq!(
        std::fs::metadata(&g).unwrap().permissions().mode() & 0o777,
        0o700
    );
    for n in &names {
        assert_eq!(
            std::fs::metadata(g.join(n)).unwrap().permissions().mode() & 0o777,
            0o600,
            "{n}"
        );
    }

    let m = manifest(&h, UUID_EFI, &gens[0]);
    assert_eq!(m["format"], 1);
    assert_eq!(m["uuid"], UUID_EFI);
    assert_eq!(m["name"], "efitest");
    assert_eq!(m["event"], "stopped");
    assert_eq!(m["reason"], "-");
    assert_eq!(m["persistent"], false);
    assert_eq!(m["tpm"]["version"], "2.0");
    assert_eq!(
        m["tpm"]["encryption_secret"],
        "0f0e0d0c-0b0a-4909-8807-060504030201"
    );
    assert_eq!(m["tpm"]["header_flags"], 9);
    assert_eq!(m["tpm"]["state_path"], state.display().to_string());
    assert_eq!(m["nvram"]["path"], h.nvram_path().display().to_string());
    let files = m["files"].as_array().unwrap();
    let perm = files
        .iter()
        .find(|f| f["name"] == "tpm2-00.permall")
        .unwrap();
    assert_eq!(perm["size"], permall.len());
    assert_eq!(perm["role"], "tpm");
    let meta = std::fs::metadata(state.join("tpm2-00.permall")).unwrap();
    assert_eq!(perm["mode"], format!("{:04o}", meta.mode() & 0o7777));
    assert_eq!(perm["uid"], meta.uid());

    let logs = h.logs();
    assert_eq!(logs.len(), 1, "{logs:?}");
    let l = &logs[0];
    assert!(l.starts_with("<30>swtpm-keeper["), "{l}");
    for want in [
        "vm=efitest",
        UUID_EFI,
        "event=stopped/end",
        "captured TPM 2.0 state and NVRAM",
        &g.display().to_string(),
    ] {
        assert!(l.contains(want), "{want:?} missing in {l}");
    }
}

#[test]
fn persistent_vm_stores_libvirts_inactive_definition() {
    let h = Host::new("persistent");
    h.put_state(
        UUID_TRANS,
        &[("tpm2-00.permall", &fixture("tpm2-00.permall.plain"))],
    );
    let inactive = b"<domain type='qemu'>\n  <name>tpmtrans</name>\n  <uuid>11111111-2222-3333-4444-555555555555</uuid>\n</domain>\n";
    std::fs::write(h.etc_qemu.join("tpmtrans.xml"), inactive).unwrap();
    h.stop_transient();
    let g = h.vm_store(UUID_TRANS).join(&h.generations(UUID_TRANS)[0]);
    assert_eq!(std::fs::read(g.join("domain.xml")).unwrap(), inactive);
    assert_eq!(
        std::fs::read(g.join("domain-live.xml")).unwrap(),
        fixture("tpm2-transient.stopped.xml")
    );
    assert_eq!(
        manifest(&h, UUID_TRANS, &h.generations(UUID_TRANS)[0])["persistent"],
        true
    );
}

#[test]
fn definition_of_another_vm_with_the_same_name_is_not_used() {
    let h = Host::new("othername");
    h.put_state(
        UUID_TRANS,
        &[("tpm2-00.permall", &fixture("tpm2-00.permall.plain"))],
    );
    std::fs::write(
        h.etc_qemu.join("tpmtrans.xml"),
        "<domain><name>tpmtrans</name><uuid>99999999-2222-3333-4444-555555555555</uuid></domain>",
    )
    .unwrap();
    h.stop_transient();
    let g = h.vm_store(UUID_TRANS).join(&h.generations(UUID_TRANS)[0]);
    assert_eq!(
        std::fs::read(g.join("domain.xml")).unwrap(),
        fixture("tpm2-transient.stopped.xml")
    );
}

#[test]
fn release_after_stopped_adds_nothing_when_the_state_is_the_same() {
    let h = Host::new("release");
    h.put_state(
        UUID_TRANS,
        &[("tpm2-00.permall", &fixture("tpm2-00.permall.plain"))],
    );
    let xml = fixture("tpm2-transient.stopped.xml");
    h.hook("tpmtrans", "stopped", "end", "-", &xml);
    h.hook("tpmtrans", "release", "end", "destroyed", &xml);
    assert_eq!(h.generations(UUID_TRANS).len(), 1);
    // Nothing done, nothing at info: the capture's line is the only one.
    let logs = h.logs();
    assert_eq!(logs.len(), 1, "{logs:?}");
    assert!(logs[0].contains("event=stopped/end"), "{logs:?}");

    // At debug level the release says why it added nothing.
    let h = Host::with_config("releasedebug", "log_level = \"debug\"\n");
    h.put_state(
        UUID_TRANS,
        &[("tpm2-00.permall", &fixture("tpm2-00.permall.plain"))],
    );
    h.hook("tpmtrans", "stopped", "end", "-", &xml);
    h.hook("tpmtrans", "release", "end", "destroyed", &xml);
    let logs = h.logs();
    let release: Vec<&String> = logs
        .iter()
        .filter(|l| l.contains("event=release/end reason=destroyed"))
        .collect();
    assert_eq!(release.len(), 1, "{logs:?}");
    assert!(release[0].starts_with("<31>"), "daemon.debug: {logs:?}");
    assert!(
        release[0].contains("unchanged since generation"),
        "{logs:?}"
    );
}

#[test]
fn a_new_generation_needs_a_changed_tpm_state_or_nvram_not_a_changed_definition() {
    let h = Host::new("identity");
    h.put_state(
        UUID_EFI,
        &[("tpm2-00.permall", &fixture("tpm2-00.permall.encrypted"))],
    );
    std::fs::write(h.nvram_path(), vec![1u8; 4096]).unwrap();
    assert_ok(&h.hook("efitest", "stopped", "end", "-", &h.efi_xml()));
    // Another definition (the live XML at release often differs): the
    // TPM state and the NVRAM are what a generation is kept for.
    let other = String::from_utf8(h.efi_xml()).unwrap().replacen(
        "</name>",
        "</name><description>changed</description>",
        1,
    );
    assert_ok(&h.hook("efitest", "release", "end", "-", other.as_bytes()));
    assert_eq!(h.generations(UUID_EFI).len(), 1, "{:?}", h.logs());
    // The NVRAM alone changed: a new generation.
    std::fs::write(h.nvram_path(), vec![2u8; 4096]).unwrap();
    assert_ok(&h.hook("efitest", "stopped", "end", "-", &h.efi_xml()));
    assert_eq!(h.generations(UUID_EFI).len(), 2, "{:?}", h.logs());
}

#[test]
fn a_release_for_a_migration_marks_the_unchanged_state_and_says_so_at_info() {
    let h = Host::new("releasemigrated");
    h.put_state(
        UUID_TRANS,
        &[("tpm2-00.permall", &fixture("tpm2-00.permall.plain"))],
    );
    let xml = fixture("tpm2-transient.stopped.xml");
    h.hook("tpmtrans", "stopped", "end", "-", &xml);
    h.hook("tpmtrans", "release", "end", "migrated", &xml);
    assert_eq!(h.generations(UUID_TRANS).len(), 1);
    let logs = h.logs();
    assert_eq!(logs.len(), 2, "{logs:?}");
    assert!(
        logs[1].starts_with("<30>")
            && logs[1].contains("reason=migrated")
            && logs[1].contains("marked as migrated away"),
        "{logs:?}"
    );
}

#[test]
fn a_changed_state_adds_a_generation_and_old_ones_are_pruned_to_the_limit() {
    let h = Host::new("retention"); // generations = 3
    let xml = fixture("tpm2-transient.stopped.xml");
    let mut base = fixture("tpm2-00.permall.plain");
    let mut contents = Vec::new();
    for i in 0..5u8 {
        base[100] = i; // inside the TPM data, past the magic: still a valid blob
        contents.push(base.clone());
        h.put_state(UUID_TRANS, &[("tpm2-00.permall", &base)]);
        assert_eq!(
            h.hook("tpmtrans", "stopped", "end", "-", &xml)
                .status
                .code(),
            Some(0)
        );
    }
    let gens = h.generations(UUID_TRANS);
    assert_eq!(gens.len(), 3, "{gens:?}");
    assert!(
        gens[0].starts_with("00000003-") && gens[2].starts_with("00000005-"),
        "{gens:?}"
    );
    for (g, want) in gens.iter().zip(&contents[2..]) {
        assert_eq!(
            &std::fs::read(h.vm_store(UUID_TRANS).join(g).join("tpm2-00.permall")).unwrap(),
            want
        );
    }
    assert!(h.logs().last().unwrap().contains("pruned 00000002-"));
}

#[test]
fn vm_without_tpm_leaves_nothing_and_logs_nothing() {
    let h = Host::new("notpm");
    let out = h.hook(
        "notpm",
        "stopped",
        "end",
        "-",
        &fixture("no-tpm.stopped.xml"),
    );
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stderr.is_empty());
    assert!(
        !h.store.exists(),
        "the store was created for a VM without TPM"
    );
    assert!(h.logs().is_empty());
}

#[test]
fn ignored_events_exit_at_once_without_reading_stdin() {
    let h = Host::new("ignored");
    for (op, sub) in [
        ("start", "begin"),
        ("started", "begin"),
        ("reconnect", "begin"),
        ("stopped", "begin"),
        ("attach", "begin"),
        ("bogus", "-"),
    ] {
        // stdin stays open and empty: reading it would block forever.
        let child = Command::new(bin())
            .args(["hook", "efitest", op, sub, "-"])
            .env("SWTPM_KEEPER_CONFIG", &h.conf)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = wait_with_deadline(child, Duration::from_secs(10));
        assert_eq!(out.status.code(), Some(0), "{op}");
        assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{op}");
    }
    assert!(!h.store.exists());
    assert!(h.logs().is_empty());
}

#[test]
fn runs_as_a_hook_from_qemu_d_by_its_name() {
    let h = Host::new("argv0");
    h.put_state(
        UUID_TRANS,
        &[("tpm2-00.permall", &fixture("tpm2-00.permall.plain"))],
    );
    let d = h.root.join("hooks/qemu.d");
    std::fs::create_dir_all(&d).unwrap();
    std::os::unix::fs::symlink(bin(), d.join("swtpm-keeper")).unwrap();
    let out = run_with(
        Command::new(d.join("swtpm-keeper"))
            .args(["tpmtrans", "stopped", "end", "-"])
            .env("SWTPM_KEEPER_CONFIG", &h.conf),
        &fixture("tpm2-transient.stopped.xml"),
    );
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout.is_empty());
    assert_eq!(h.generations(UUID_TRANS).len(), 1);
    // And as /etc/libvirt/hooks/qemu:
    std::os::unix::fs::symlink(bin(), h.root.join("hooks/qemu")).unwrap();
    let out = run_with(
        Command::new(h.root.join("hooks/qemu")).args(["x", "started", "begin", "-"]),
        b"",
    );
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn invalid_state_is_refused_and_the_store_keeps_what_it_had() {
    let h = Host::new("invalid");
    let xml = fixture("tpm2-transient.stopped.xml");
    h.put_state(
        UUID_TRANS,
        &[("tpm2-00.permall", &fixture("tpm2-00.permall.plain"))],
    );
    h.hook("tpmtrans", "stopped", "end", "-", &xml);
    let before = h.generations(UUID_TRANS);
    h.logs();

    let mut damaged = fixture("tpm2-00.permall.plain");
    damaged.truncate(3000);
    for (bad, why) in [
        (Vec::new(), "empty"),
        (damaged, "header says"),
        (vec![0u8; 100], "header version"),
    ] {
        h.put_state(UUID_TRANS, &[("tpm2-00.permall", &bad)]);
        let out = h.hook("tpmtrans", "stopped", "end", "-", &xml);
        assert_eq!(out.status.code(), Some(0), "a stop must never fail");
        assert_eq!(h.generations(UUID_TRANS), before);
        let logs = h.logs();
        assert_eq!(logs.len(), 1, "{logs:?}");
        assert!(
            logs[0].starts_with("<27>"),
            "not at error level: {}",
            logs[0]
        );
        assert!(
            logs[0].contains("NOT captured") && logs[0].contains(why),
            "{}",
            logs[0]
        );
    }
}

#[test]
fn state_dir_without_permall_captures_nothing() {
    let h = Host::new("nopermall");
    h.put_state(UUID_TRANS, &[(".lock", b"")]);
    h.stop_transient();
    assert!(h.generations(UUID_TRANS).is_empty());
    // Nothing to do (swtpm never ran): nothing at info.
    let logs = h.logs();
    assert!(logs.is_empty(), "{logs:?}");
}

#[test]
fn leftover_temporaries_are_removed_by_the_next_run() {
    let h = Host::new("leftovers");
    let vm = h.vm_store(UUID_TRANS);
    // Left by a run of this host that is gone (rules: tests/shared_store.rs).
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    let owner = format!("{}@{}", swtpm_keeper::leftover::host_tag(), gone.id());
    let tmp = vm.join(format!(".tmp-{owner}-00000001-20261121T000000Z"));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(tmp.join("tpm2-00.permall"), b"half").unwrap();
    std::fs::create_dir_all(vm.join(format!(".trash-{owner}-00000000-20261120T000000Z"))).unwrap();
    h.put_state(
        UUID_TRANS,
        &[("tpm2-00.permall", &fixture("tpm2-00.permall.plain"))],
    );
    h.stop_transient();
    let names = dir_names(&vm);
    assert_eq!(names.len(), 2, "{names:?}"); // .lock and the new generation
    assert!(names[1].starts_with("00000001-"), "{names:?}");
}

#[test]
fn a_live_swtpm_lock_prevents_capture() {
    let h = Host::new("live");
    let d = h.put_state(
        UUID_TRANS,
        &[
            ("tpm2-00.permall", &fixture("tpm2-00.permall.plain")),
            (".lock", b""),
        ],
    );
    // Hold a POSIX write lock on .lock from another process, as swtpm does.
    let holder = FcntlHolder::hold(&d.join(".lock"));
    let t = Instant::now();
    let out = h.stop_transient();
    let took = t.elapsed();
    drop(holder);
    assert_eq!(out.status.code(), Some(0));
    assert!(h.generations(UUID_TRANS).is_empty());
    let logs = h.logs();
    assert!(
        logs[0].contains("still holds") && logs[0].contains("live"),
        "{logs:?}"
    );
    assert!(took < Duration::from_secs(10), "waited {took:?}");
}

#[test]
fn a_held_store_lock_makes_the_hook_give_up_at_the_deadline() {
    let h = Host::new("lockwait"); // lock_timeout = 1.0
    h.put_state(
        UUID_TRANS,
        &[("tpm2-00.permall", &fixture("tpm2-00.permall.plain"))],
    );
    let vm = h.vm_store(UUID_TRANS);
    std::fs::create_dir_all(&vm).unwrap();
    let f = std::fs::File::create(vm.join(".lock")).unwrap();
    assert!(swtpm_keeper::lock::try_flock(&f, true).unwrap());
    let t = Instant::now();
    let out = h.stop_transient();
    let took = t.elapsed();
    assert_eq!(out.status.code(), Some(0));
    assert!(h.generations(UUID_TRANS).is_empty());
    let logs = h.logs();
    assert!(
        logs[0].contains("gave up after 1.0 s waiting for the lock"),
        "{logs:?}"
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(10),
        "{took:?}"
    );
    // Another VM never waits on this one's lock: with it still held, a
    // wait would end in "gave up" and no generation (no clock needed).
    h.put_state(
        UUID_EFI,
        &[("tpm2-00.permall", &fixture("tpm2-00.permall.encrypted"))],
    );
    h.hook("efitest", "stopped", "end", "-", &h.efi_xml());
    assert_eq!(h.generations(UUID_EFI).len(), 1);
    let logs = h.logs();
    assert!(!logs.iter().any(|l| l.contains("gave up")), "{logs:?}");
    assert!(logs.iter().any(|l| l.contains("captured")), "{logs:?}");
    drop(f);
}

#[test]
fn symlinks_fifos_and_hard_links_in_the_state_dir_are_refused() {
    let h = Host::new("hostile");
    let xml = fixture("tpm2-transient.stopped.xml");
    let secret = h.root.join("shadow");
    std::fs::write(&secret, b"root:secret-hash").unwrap();
    let d = h.state_dir(UUID_TRANS);
    std::fs::create_dir_all(&d).unwrap();
    // The state dir is writable by tss in real life: make it so here.
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();

    std::os::unix::fs::symlink(&secret, d.join("tpm2-00.permall")).unwrap();
    h.hook("tpmtrans", "stopped", "end", "-", &xml);
    std::fs::remove_file(d.join("tpm2-00.permall")).unwrap();

    let fifo = std::ffi::CString::new(d.join("tpm2-00.permall").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let t = Instant::now();
    h.hook("tpmtrans", "stopped", "end", "-", &xml);
    assert!(t.elapsed() < Duration::from_secs(10));
    std::fs::remove_file(d.join("tpm2-00.permall")).unwrap();

    std::fs::hard_link(&secret, d.join("tpm2-00.permall")).unwrap();
    h.hook("tpmtrans", "stopped", "end", "-", &xml);

    assert!(h.generations(UUID_TRANS).is_empty());
    let logs = h.logs();
    assert_eq!(logs.len(), 3, "{logs:?}");
    assert!(
        logs[0].contains("NOT captured") && logs[0].contains("Too many levels of symbolic links"),
        "{}",
        logs[0]
    );
    assert!(logs[1].contains("not a regular file"), "{}", logs[1]);
    assert!(logs[2].contains("hard links"), "{}", logs[2]);
}

#[test]
fn a_symlinked_nvram_in_a_user_writable_dir_is_refused() {
    let h = Host::new("nvramlink");
    std::fs::set_permissions(&h.nvram_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::write(h.root.join("shadow"), b"secret").unwrap();
    std::os::unix::fs::symlink(h.root.join("shadow"), h.nvram_path()).unwrap();
    h.put_state(
        UUID_EFI,
        &[("tpm2-00.permall", &fixture("tpm2-00.permall.encrypted"))],
    );
    h.hook("efitest", "stopped", "end", "-", &h.efi_xml());
    assert!(h.generations(UUID_EFI).is_empty());
    assert!(h.logs()[0].contains("NOT captured"));
}

#[test]
fn tpm_1_2_and_source_dir_locations_are_captured() {
    let h = Host::new("locations");
    let src = h.root.join("custom-state");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(
        src.join("tpm-00.permall"),
        fixture("tpm2-00.permall.encrypted"),
    )
    .unwrap();
    let xml = format!(
        "<domain><name>old</name><uuid>{UUID_TRANS}</uuid><devices><tpm model='tpm-tis'><backend type='emulator' version='1.2'><source type='dir' path='{}'/></backend></tpm></devices></domain>",
        src.display()
    );
    h.hook("old", "stopped", "end", "-", xml.as_bytes());
    let gens = h.generations(UUID_TRANS);
    assert_eq!(gens.len(), 1, "{:?}", h.logs());
    let m = manifest(&h, UUID_TRANS, &gens[0]);
    assert_eq!(m["tpm"]["version"], "1.2");
    assert_eq!(m["tpm"]["state_path"], src.display().to_string());
    assert!(h
        .vm_store(UUID_TRANS)
        .join(&gens[0])
        .join("tpm-00.permall")
        .exists());
}

#[test]
fn unusable_xml_is_logged_and_the_stop_still_succeeds() {
    let h = Host::new("badxml");
    for xml in [
        &b"garbage"[..],
        b"<domain><name>x</name><uuid>../../../etc</uuid></domain>",
        &vec![b'<'; 5 << 20],
    ] {
        let out = h.hook("x", "stopped", "end", "-", xml);
        assert_eq!(out.status.code(), Some(0));
    }
    assert!(!h.store.exists());
    let logs = h.logs();
    assert_eq!(logs.len(), 3, "{logs:?}");
    assert!(
        logs.iter()
            .all(|l| l.starts_with("<27>") && l.contains("nothing done")),
        "{logs:?}"
    );
    assert!(logs[2].contains("over 4194304 bytes"), "{}", logs[2]);
}

#[test]
fn control_characters_in_names_are_escaped_in_the_log() {
    let h = Host::new("names");
    h.put_state(
        UUID_TRANS,
        &[("tpm2-00.permall", &fixture("tpm2-00.permall.plain"))],
    );
    let with = |name: &str| {
        String::from_utf8(fixture("tpm2-transient.stopped.xml"))
            .unwrap()
            .replace("<name>tpmtrans</name>", &format!("<name>{name}</name>"))
    };
    // A newline is legal in XML: the VM is captured, the line escapes it.
    h.hook(
        "evil",
        "stopped",
        "end",
        "-",
        with("evil&#10;Nov 21 fake: root login&#9;x").as_bytes(),
    );
    let logs = h.logs();
    assert_eq!(logs.len(), 1);
    assert!(
        !logs[0].contains('\n') && !logs[0].contains('\t'),
        "{:?}",
        logs[0]
    );
    assert!(
        logs[0].contains("vm=evil\\nNov 21 fake") && logs[0].contains("captured"),
        "{}",
        logs[0]
    );
    // An escape sequence is not legal XML: refused, and the line is clean.
    h.hook(
        "evil",
        "stopped",
        "end",
        "-",
        with("evil&#27;[2J").as_bytes(),
    );
    let logs = h.logs();
    assert_eq!(logs.len(), 1);
    assert!(
        !logs[0].contains('\x1b') && logs[0].contains("unusable <name>"),
        "{:?}",
        logs[0]
    );
}

#[test]
#[ignore = "needs root (a mount namespace whose /dev/log is the test's socket)"]
fn a_broken_configuration_is_logged_and_the_stop_still_succeeds() {
    // SAFETY: no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(uid, 0, "this test needs root: run it through tests/run-all");
    let h = Host::new("badconf");
    h.put_state(
        UUID_TRANS,
        &[("tpm2-00.permall", &fixture("tpm2-00.permall.plain"))],
    );
    std::fs::write(&h.conf, "generations = \"lots\"\n").unwrap();
    // The configured socket is unknown now: the line goes to syslog's
    // default socket, which is this test's own.
    let mut cmd = h.with_own_dev_log(
        Path::new(bin()),
        &["hook", "tpmtrans", "stopped", "end", "-"],
    );
    cmd.env("SWTPM_KEEPER_CONFIG", &h.conf);
    let out = run_with(&mut cmd, &fixture("tpm2-transient.stopped.xml"));
    assert_ok(&out);
    assert!(out.stdout.is_empty(), "the hook wrote to stdout");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.is_empty(), "the line did not go to syslog: {err}");
    let logs = h.logs();
    assert_eq!(logs.len(), 1, "{logs:?}");
    let line = &logs[0];
    assert!(
        line.starts_with("<27>swtpm-keeper["),
        "not an error line: {line}"
    );
    assert!(
        line.contains(h.conf.to_str().unwrap())
            && line.contains("generations")
            && line.contains("nothing done: fix the configuration"),
        "the line must name the file, the key and what to do: {line}"
    );
    assert!(!h.store.exists());
}

#[test]
fn cli_usage_errors_exit_2_and_help_exits_0() {
    let h = Host::new("cli");
    let out = h.run(&["frobnicate"], b"");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown command"));
    let out = h.run(&["--help"], b"");
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("qemu.d"));
}

#[test]
fn the_chain_hook_runs_swtpm_keeper_then_the_old_hook_and_passes_on_only_its_output() {
    let h = Host::new("chain");
    h.put_state(
        UUID_TRANS,
        &[("tpm2-00.permall", &fixture("tpm2-00.permall.plain"))],
    );
    let seen = h.root.join("orig-saw");
    let orig = h.root.join("qemu.orig");
    // The old hook records what it got and answers with its own XML, as a
    // migrate hook that rewrites the domain would.
    write_script(
        &orig,
        &format!(
            "#!/bin/sh\necho \"$@\" >'{s}.args'\ncat >'{s}.xml'\necho '<domain>rewritten</domain>'\n",
            s = seen.display()
        ),
    );
    let chain = |op: &str, sub: &str, extra: &str, xml: &[u8]| {
        run_with(
            Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/hooks/qemu-chain"))
                .args(["tpmtrans", op, sub, extra])
                .env("SWTPM_KEEPER", bin())
                .env("SWTPM_KEEPER_CHAINED", &orig)
                .env("SWTPM_KEEPER_CONFIG", &h.conf),
            xml,
        )
    };
    let xml = fixture("tpm2-transient.stopped.xml");
    let out = chain("stopped", "end", "-", &xml);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(out.stdout, b"<domain>rewritten</domain>\n");
    assert_eq!(h.generations(UUID_TRANS).len(), 1, "swtpm-keeper captured");
    assert_eq!(std::fs::read(seen.with_extension("xml")).unwrap(), xml);
    assert_eq!(
        std::fs::read_to_string(seen.with_extension("args")).unwrap(),
        "tpmtrans stopped end -\n"
    );

    // A refusal at prepare fails the start, and the old hook never runs.
    chain("release", "end", "migrated", &xml);
    std::fs::remove_dir_all(h.state_dir(UUID_TRANS)).unwrap();
    std::fs::remove_file(seen.with_extension("xml")).unwrap();
    let out = chain("prepare", "begin", "-", &xml);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("refusing to start tpmtrans"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!seen.with_extension("xml").exists());

    // swtpm-keeper failing otherwise (here: not there at all) never keeps
    // the old hook from running, but at prepare.
    for (op, sub, code, ran) in [
        ("stopped", "end", 0, true),
        ("prepare", "begin", 127, false),
    ] {
        let out = run_with(
            Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/hooks/qemu-chain"))
                .args(["tpmtrans", op, sub, "-"])
                .env("SWTPM_KEEPER", h.root.join("no-such-keeper"))
                .env("SWTPM_KEEPER_CHAINED", &orig),
            &xml,
        );
        assert_eq!(out.status.code(), Some(code), "{op}");
        assert_eq!(seen.with_extension("xml").exists(), ran, "{op}");
        let _ = std::fs::remove_file(seen.with_extension("xml"));
    }
}

//! The hook's restore at `prepare begin`, against a fixture host: when it
//! puts a state back, what it refuses and why, and that it never replaces
//! or follows what it must not.

mod common;

use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

// Owners from qemu.conf: distinct ids as root; without root (chown to
// another user needs it) the caller's own, so the suite runs either way.
fn ids() -> (u32, u32, u32, u32) {
    // SAFETY: no preconditions.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if uid == 0 {
        (4242, 4243, 4300, 4301)
    } else {
        (uid, gid, uid, gid)
    }
}

fn host(test: &str, extra: &str) -> Host {
    let (swtpm_uid, swtpm_gid, qemu_uid, qemu_gid) = ids();
    let h = Host::with_config(test, extra);
    let qc = h.root.join("qemu.conf");
    std::fs::write(&qc, format!("user = \"+{qemu_uid}\"\ngroup = \"+{qemu_gid}\"\nswtpm_user = \"+{swtpm_uid}\"\nswtpm_group = \"+{swtpm_gid}\"\n")).unwrap();
    let conf = std::fs::read_to_string(&h.conf).unwrap();
    let conf: String = conf
        .lines()
        .filter(|l| !l.starts_with("qemu_conf"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&h.conf, format!("{conf}qemu_conf = {qc:?}\n")).unwrap();
    h
}

/// An EFI VM stopped once: its state and NVRAM are in the store.
fn captured_efi(h: &Host) -> (Vec<u8>, Vec<u8>) {
    let permall = fixture("tpm2-00.permall.encrypted");
    let nvram: Vec<u8> = (0..540 * 1024).map(|i| (i % 251) as u8).collect();
    h.put_state(UUID_EFI, &[("tpm2-00.permall", &permall), (".lock", b"")]);
    std::fs::write(h.nvram_path(), &nvram).unwrap();
    assert_eq!(
        h.hook("efitest", "stopped", "end", "-", &h.efi_xml())
            .status
            .code(),
        Some(0)
    );
    assert_eq!(h.generations(UUID_EFI).len(), 1);
    (permall, nvram)
}

/// What libvirt's `undefine --nvram` leaves: nothing.
fn lose_everything(h: &Host) {
    std::fs::remove_dir_all(h.swtpm.join(UUID_EFI)).unwrap();
    std::fs::remove_file(h.nvram_path()).unwrap();
}

fn prepare(h: &Host, xml: &[u8]) -> std::process::Output {
    h.hook("efitest", "prepare", "begin", "-", xml)
}

#[test]
fn a_lost_state_and_nvram_come_back_as_the_pair_they_were() {
    let h = host("restore", "");
    let (permall, nvram) = captured_efi(&h);
    lose_everything(&h);
    h.logs();

    let out = prepare(&h, &h.efi_xml());
    assert_ok(&out);
    let d = h.state_dir(UUID_EFI);
    assert_eq!(std::fs::read(d.join("tpm2-00.permall")).unwrap(), permall);
    assert_eq!(std::fs::read(h.nvram_path()).unwrap(), nvram);
    // Only swtpm's state comes back: never .lock.
    let names: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["tpm2-00.permall"]);
    // Owners and modes as libvirt sets them, from qemu.conf.
    let (swtpm_uid, swtpm_gid, qemu_uid, qemu_gid) = ids();
    let md = std::fs::metadata(&d).unwrap();
    assert_eq!(
        (md.uid(), md.gid(), md.mode() & 0o777),
        (swtpm_uid, swtpm_gid, 0o700)
    );
    let md = std::fs::metadata(d.join("tpm2-00.permall")).unwrap();
    assert_eq!(
        (md.uid(), md.gid(), md.mode() & 0o777),
        (swtpm_uid, swtpm_gid, 0o600)
    );
    let md = std::fs::metadata(h.swtpm.join(UUID_EFI)).unwrap();
    // SAFETY: no preconditions.
    assert_eq!(
        (md.uid(), md.mode() & 0o777),
        (unsafe { libc::geteuid() }, 0o711)
    );
    let md = std::fs::metadata(h.nvram_path()).unwrap();
    assert_eq!(
        (md.uid(), md.gid(), md.mode() & 0o777),
        (qemu_uid, qemu_gid, 0o600)
    );
    // No temporaries left beside them.
    assert_eq!(
        std::fs::read_dir(h.swtpm.join(UUID_EFI)).unwrap().count(),
        1
    );
    assert_eq!(std::fs::read_dir(&h.nvram_dir).unwrap().count(), 1);

    let logs = h.logs();
    assert_eq!(logs.len(), 1, "{logs:?}");
    let g = &h.generations(UUID_EFI)[0];
    for want in [
        "vm=efitest",
        UUID_EFI,
        "event=prepare/begin",
        &format!("restored TPM 2.0 state from generation {g}"),
        "and NVRAM into",
        "at stopped",
    ] {
        assert!(logs[0].contains(want), "{want:?} missing in {}", logs[0]);
    }
}

#[test]
fn an_existing_state_is_never_touched() {
    let h = host("existing", "");
    captured_efi(&h);
    let other = fixture("tpm2-00.permall.plain");
    h.put_state(UUID_EFI, &[("tpm2-00.permall", &other)]);
    let ino = std::fs::metadata(h.state_dir(UUID_EFI).join("tpm2-00.permall"))
        .unwrap()
        .ino();
    h.logs();
    assert_eq!(prepare(&h, &h.efi_xml()).status.code(), Some(0));
    let p = h.state_dir(UUID_EFI).join("tpm2-00.permall");
    assert_eq!(std::fs::read(&p).unwrap(), other);
    assert_eq!(std::fs::metadata(&p).unwrap().ino(), ino);
    assert!(h.logs().is_empty(), "nothing to do logs nothing at info");
}

#[test]
fn an_existing_nvram_is_kept_while_the_tpm_comes_back() {
    let h = host("keepnvram", "");
    let (permall, _) = captured_efi(&h);
    std::fs::remove_dir_all(h.swtpm.join(UUID_EFI)).unwrap();
    std::fs::write(h.nvram_path(), b"newer vars").unwrap();
    assert_eq!(prepare(&h, &h.efi_xml()).status.code(), Some(0));
    assert_eq!(
        std::fs::read(h.state_dir(UUID_EFI).join("tpm2-00.permall")).unwrap(),
        permall
    );
    assert_eq!(std::fs::read(h.nvram_path()).unwrap(), b"newer vars");
    assert!(h.logs().last().unwrap().contains("exists, kept"));
}

#[test]
fn a_state_dir_without_state_is_replaced_whole() {
    let h = host("emptydir", "");
    let (permall, _) = captured_efi(&h);
    std::fs::remove_file(h.state_dir(UUID_EFI).join("tpm2-00.permall")).unwrap();
    assert!(h.state_dir(UUID_EFI).join(".lock").exists());
    assert_eq!(prepare(&h, &h.efi_xml()).status.code(), Some(0));
    assert_eq!(
        std::fs::read(h.state_dir(UUID_EFI).join("tpm2-00.permall")).unwrap(),
        permall
    );
    assert!(!h.state_dir(UUID_EFI).join(".lock").exists());
    assert_eq!(
        std::fs::read_dir(h.swtpm.join(UUID_EFI)).unwrap().count(),
        1,
        "the old dir was removed"
    );
}

#[test]
fn restore_off_restores_nothing() {
    let h = host("off", "restore = \"off\"\n");
    captured_efi(&h);
    lose_everything(&h);
    assert_eq!(prepare(&h, &h.efi_xml()).status.code(), Some(0));
    assert!(!h.swtpm.join(UUID_EFI).exists());
    assert!(!h.nvram_path().exists());
}

#[test]
fn a_vm_the_store_never_saw_starts_normally_and_leaves_no_trace() {
    let h = host("unknown", "");
    let out = prepare(&h, &h.efi_xml());
    assert_eq!(out.status.code(), Some(0));
    assert!(!h.store.exists());
    assert!(!h.swtpm.join(UUID_EFI).exists());
    assert!(h.logs().is_empty());
}

#[test]
fn an_incoming_migration_is_not_overwritten_with_an_old_copy() {
    let h = host("incoming", "");
    captured_efi(&h);
    lose_everything(&h);
    for op in ["migrate", "restore"] {
        h.logs();
        assert_eq!(
            h.hook("efitest", op, "begin", "-", &h.efi_xml())
                .status
                .code(),
            Some(0)
        );
        let out = prepare(&h, &h.efi_xml());
        assert_eq!(out.status.code(), Some(0), "nothing is wrong: no abort");
        assert!(
            !h.swtpm.join(UUID_EFI).exists(),
            "{op}: restored over an incoming state"
        );
        let logs = h.logs();
        assert!(
            logs.last()
                .unwrap()
                .contains(&format!("arrives with the incoming {op}")),
            "{logs:?}"
        );
    }
    // The marker is used up: a later plain start restores.
    assert_eq!(prepare(&h, &h.efi_xml()).status.code(), Some(0));
    assert!(h.state_dir(UUID_EFI).join("tpm2-00.permall").exists());
}

#[test]
fn a_stale_incoming_marker_is_ignored() {
    let h = host("stalemarker", "");
    captured_efi(&h);
    lose_everything(&h);
    let host_name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string();
    std::fs::write(
        h.vm_store(UUID_EFI)
            .join(format!("incoming-{host_name}.json")),
        r#"{"event":"migrate","time_unix":1000}"#,
    )
    .unwrap();
    assert_eq!(prepare(&h, &h.efi_xml()).status.code(), Some(0));
    assert!(h.state_dir(UUID_EFI).join("tpm2-00.permall").exists());
}

fn assert_refused(h: &Host, xml: &[u8], why: &str) {
    h.logs();
    let out = prepare(h, xml);
    assert_eq!(out.status.code(), Some(1), "a refusal aborts the start");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to start efitest with a new TPM") && err.contains(why),
        "{err}"
    );
    assert!(err.contains("To fix:"), "{err}");
    assert!(
        !h.swtpm.join(UUID_EFI).exists(),
        "wrote a state while refusing"
    );
    assert!(!h.nvram_path().exists(), "wrote an NVRAM while refusing");
    let logs = h.logs();
    assert!(
        logs.iter()
            .any(|l| l.starts_with("<27>") && l.contains("NOT restored") && l.contains(why)),
        "{logs:?}"
    );
}

#[test]
fn a_state_captured_when_the_vm_migrated_away_is_refused() {
    let h = host("migratedaway", "");
    captured_efi(&h);
    // libvirt 10.5+: release after an outgoing migration says so.
    h.hook("efitest", "release", "end", "migrated", &h.efi_xml());
    lose_everything(&h);
    assert_refused(&h, &h.efi_xml(), "migrated to another host");
}

#[test]
fn a_state_of_another_secret_is_refused() {
    let h = host("secret", "");
    captured_efi(&h);
    lose_everything(&h);
    let other = String::from_utf8(h.efi_xml()).unwrap().replace(
        "0f0e0d0c-0b0a-4909-8807-060504030201",
        "99999999-0b0a-4909-8807-060504030201",
    );
    assert_refused(
        &h,
        other.as_bytes(),
        "encrypted with libvirt secret 0f0e0d0c",
    );
    let none = String::from_utf8(h.efi_xml()).unwrap().replace(
        "<encryption secret='0f0e0d0c-0b0a-4909-8807-060504030201'/>",
        "",
    );
    assert_refused(&h, none.as_bytes(), "now uses none");
}

#[test]
fn a_state_of_another_tpm_version_is_refused() {
    let h = host("version", "");
    captured_efi(&h);
    lose_everything(&h);
    let v12 = String::from_utf8(h.efi_xml())
        .unwrap()
        .replace("version='2.0'", "version='1.2'");
    h.logs();
    let out = prepare(&h, v12.as_bytes());
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("TPM 2.0 state but the domain now has a TPM 1.2"));
}

#[test]
fn on_refusal_continue_lets_libvirt_start_with_a_new_tpm() {
    let h = host("continue", "on_refusal = \"continue\"\n");
    captured_efi(&h);
    h.hook("efitest", "release", "end", "migrated", &h.efi_xml());
    lose_everything(&h);
    h.logs();
    let out = prepare(&h, &h.efi_xml());
    assert_eq!(out.status.code(), Some(0));
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!h.swtpm.join(UUID_EFI).exists());
    assert!(h
        .logs()
        .iter()
        .any(|l| l.contains("NOT restored") && l.contains("on_refusal = \"continue\"")));
}

#[test]
fn a_damaged_newest_generation_falls_back_to_an_older_good_one() {
    let h = host("fallback", "");
    let (permall, nvram) = captured_efi(&h);
    // A second, different state; then damage it in the store.
    let mut newer = permall.clone();
    newer[200] ^= 1;
    h.put_state(UUID_EFI, &[("tpm2-00.permall", &newer)]);
    h.hook("efitest", "stopped", "end", "-", &h.efi_xml());
    let gens = h.generations(UUID_EFI);
    assert_eq!(gens.len(), 2);
    let damaged = h.vm_store(UUID_EFI).join(&gens[1]).join("tpm2-00.permall");
    let mut b = std::fs::read(&damaged).unwrap();
    b[300] ^= 0xff;
    std::fs::write(&damaged, b).unwrap();
    lose_everything(&h);
    h.logs();
    assert_eq!(prepare(&h, &h.efi_xml()).status.code(), Some(0));
    assert_eq!(
        std::fs::read(h.state_dir(UUID_EFI).join("tpm2-00.permall")).unwrap(),
        permall
    );
    assert_eq!(std::fs::read(h.nvram_path()).unwrap(), nvram);
    let logs = h.logs();
    assert!(
        logs[0].starts_with("<28>")
            && logs[0].contains(&gens[1])
            && logs[0].contains("checksum mismatch"),
        "{logs:?}"
    );
    assert!(
        logs[1].contains(&format!("from generation {}", gens[0])),
        "{logs:?}"
    );
}

#[test]
fn no_good_generation_at_all_is_refused() {
    let h = host("allbad", "");
    captured_efi(&h);
    let g = h.vm_store(UUID_EFI).join(&h.generations(UUID_EFI)[0]);
    std::fs::write(g.join("nvram.fd"), b"tampered").unwrap();
    lose_everything(&h);
    assert_refused(&h, &h.efi_xml(), "no stored generation passes verification");
    // The hint names a command that works as written.
    let out = prepare(&h, &h.efi_xml());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("swtpm-keeper verify {UUID_EFI}`"))
    );
}

#[test]
fn a_parent_writable_by_others_is_refused_and_not_written() {
    let h = host("untrusted", "");
    captured_efi(&h);
    std::fs::remove_dir_all(h.state_dir(UUID_EFI)).unwrap();
    std::fs::remove_file(h.nvram_path()).unwrap();
    std::fs::set_permissions(
        h.swtpm.join(UUID_EFI),
        std::fs::Permissions::from_mode(0o777),
    )
    .unwrap();
    h.logs();
    let out = prepare(&h, &h.efi_xml());
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("(mode 777), not root alone"));
    assert!(!h.state_dir(UUID_EFI).exists());
}

#[test]
fn a_link_planted_at_the_nvram_path_is_never_followed() {
    let h = host("nvramplant", "");
    let (permall, _) = captured_efi(&h);
    lose_everything(&h);
    // The qemu user can write the NVRAM directory: a link to a root file.
    std::fs::set_permissions(&h.nvram_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let victim = h.root.join("victim");
    std::fs::write(&victim, b"root's file").unwrap();
    std::os::unix::fs::symlink(&victim, h.nvram_path()).unwrap();
    assert_eq!(prepare(&h, &h.efi_xml()).status.code(), Some(0));
    assert_eq!(std::fs::read(&victim).unwrap(), b"root's file");
    assert!(std::fs::symlink_metadata(h.nvram_path())
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(
        std::fs::read(h.state_dir(UUID_EFI).join("tpm2-00.permall")).unwrap(),
        permall
    );
}

#[test]
fn prepare_of_a_vm_without_tpm_does_nothing() {
    let h = host("prepnotpm", "");
    assert_eq!(
        h.hook(
            "notpm",
            "prepare",
            "begin",
            "-",
            &fixture("no-tpm.stopped.xml")
        )
        .status
        .code(),
        Some(0)
    );
    assert!(!h.store.exists());
    assert!(h.logs().is_empty());
}

#[test]
fn auto_selected_efi_gets_its_nvram_back_though_prepare_xml_names_none() {
    // libvirt 9.0 resolves <nvram> after the prepare hook: the real
    // prepare XML of such a VM has <os firmware='efi'> and no path.
    let h = host("efiauto", "");
    let (permall, nvram) = captured_efi(&h);
    lose_everything(&h);
    let xml = fixture("efi-secureboot-encrypted-tpm.prepare.xml");
    assert!(!String::from_utf8_lossy(&xml).contains("<nvram"));
    assert_eq!(prepare(&h, &xml).status.code(), Some(0));
    assert_eq!(
        std::fs::read(h.state_dir(UUID_EFI).join("tpm2-00.permall")).unwrap(),
        permall
    );
    assert_eq!(
        std::fs::read(h.nvram_path()).unwrap(),
        nvram,
        "NVRAM restored at {}",
        h.nvram_path().display()
    );
}

/// swtpm's linear file (`<source type='file'>`) holding `blob` as its
/// permanent state: the "swtpmlin" header, 15 entries, the blob.
fn linear_file(blob: &[u8]) -> Vec<u8> {
    let hdrsize = 12 + 15 * 12;
    let mut v = vec![0u8; hdrsize];
    v[..8].copy_from_slice(&0x7377_7470_6d6c_696e_u64.to_le_bytes());
    v[8] = 1;
    v[10..12].copy_from_slice(&(hdrsize as u16).to_le_bytes());
    v[12..16].copy_from_slice(&(hdrsize as u32).to_le_bytes());
    v[16..20].copy_from_slice(&(blob.len() as u32).to_le_bytes());
    v[20..24].copy_from_slice(&(blob.len() as u32).to_le_bytes());
    v.extend_from_slice(blob);
    v
}

/// The EFI VM with its TPM state in one file at `path`.
fn efi_xml_with_state_file(h: &Host, path: &std::path::Path) -> Vec<u8> {
    let x = String::from_utf8(h.efi_xml()).unwrap();
    let backend = "<backend type='emulator' version='2.0'>";
    assert!(x.contains(backend));
    x.replace(
        backend,
        &format!("{backend}<source type='file' path='{}'/>", path.display()),
    )
    .into_bytes()
}

/// An EFI VM whose state is a file, stopped once: (xml, state file, its
/// bytes, NVRAM bytes).
fn captured_efi_file(h: &Host) -> (Vec<u8>, std::path::PathBuf, Vec<u8>, Vec<u8>) {
    let dir = h.root.join("tpm-files");
    std::fs::create_dir(&dir).unwrap();
    let file = dir.join("efitest.tpm");
    let state = linear_file(&fixture("tpm2-00.permall.encrypted"));
    std::fs::write(&file, &state).unwrap();
    let nvram: Vec<u8> = (0..64 * 1024).map(|i| (i % 241) as u8).collect();
    std::fs::write(h.nvram_path(), &nvram).unwrap();
    let xml = efi_xml_with_state_file(h, &file);
    assert_ok(&h.hook("efitest", "stopped", "end", "-", &xml));
    (xml, file, state, nvram)
}

#[test]
fn a_source_file_state_is_captured_and_comes_back_byte_for_byte() {
    let h = host("statefile", "");
    let (xml, file, state, nvram) = captured_efi_file(&h);
    let gens = h.generations(UUID_EFI);
    assert_eq!(gens.len(), 1, "{:?}", h.logs());
    let g = h.vm_store(UUID_EFI).join(&gens[0]);
    assert_eq!(
        std::fs::read(g.join("tpm-state.file")).unwrap(),
        state,
        "the stored copy differs"
    );
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(g.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["tpm"]["state_type"], "file");
    assert_eq!(m["tpm"]["state_path"], file.to_str().unwrap());

    std::fs::remove_file(&file).unwrap();
    std::fs::remove_file(h.nvram_path()).unwrap();
    let out = prepare(&h, &xml);
    assert_ok(&out);
    assert_eq!(std::fs::read(&file).unwrap(), state);
    assert_eq!(std::fs::read(h.nvram_path()).unwrap(), nvram);
    let (swtpm_uid, swtpm_gid, _, _) = ids();
    let md = std::fs::metadata(&file).unwrap();
    assert_eq!((md.uid(), md.gid()), (swtpm_uid, swtpm_gid));
    assert!(
        !h.swtpm.join(UUID_EFI).exists(),
        "a file state also wrote libvirt's default directory"
    );
    let left = dir_names(file.parent().unwrap());
    assert_eq!(left, ["efitest.tpm"], "temporaries were left");
}

#[test]
fn a_dir_state_is_never_restored_as_a_file_state_nor_the_reverse() {
    // A directory state where the domain now keeps a file.
    let h = host("dirasfile", "");
    captured_efi(&h);
    lose_everything(&h);
    let dir = h.root.join("tpm-files");
    std::fs::create_dir(&dir).unwrap();
    let file = dir.join("efitest.tpm");
    assert_refused(
        &h,
        &efi_xml_with_state_file(&h, &file),
        "holds a 'dir' state but the domain keeps a 'file' state",
    );
    assert!(!file.exists(), "wrote the file while refusing");

    // A file state where the domain now keeps libvirt's default directory.
    let h = host("fileasdir", "");
    let (_, file, _, _) = captured_efi_file(&h);
    std::fs::remove_file(&file).unwrap();
    std::fs::remove_file(h.nvram_path()).unwrap();
    assert_refused(
        &h,
        &h.efi_xml(),
        "holds a 'file' state but the domain keeps a 'dir' state",
    );
    assert!(!file.exists(), "wrote the file while refusing");
}

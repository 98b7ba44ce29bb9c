//! What the restore at `prepare` may touch beside libvirt's path: only its
//! own VM's temporaries, only a directory holding nothing but swtpm's
//! files, and a refusal writes nothing, not even the NVRAM half of the pair.

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const UUID_B: &str = "bbbbbbbb-1111-2222-3333-444444444444";

/// A TPM 2.0 VM whose state lives in `<source type='dir' path=dir>`.
fn source_dir_xml(name: &str, uuid: &str, dir: &Path, nvram: Option<&Path>) -> String {
    domain_xml(name, uuid, None, nvram).replace(
        "version='2.0'>",
        &format!(
            "version='2.0'><source type='dir' path='{}'/>",
            dir.display()
        ),
    )
}

/// Stop the VM once with a state in `dir`, so that the store holds it.
fn capture(h: &Host, name: &str, dir: &Path, xml: &str) -> Vec<u8> {
    let permall = fixture("tpm2-00.permall.plain");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("tpm2-00.permall"), &permall).unwrap();
    assert_ok(&h.hook(name, "stopped", "end", "-", xml.as_bytes()));
    permall
}

/// Two VMs whose state dirs are `<root>/srv/tpm/vma` and `.../vmb`.
struct SharedParent {
    parent: PathBuf,
    a: (PathBuf, String),
    b: (PathBuf, String),
}

fn shared_parent(h: &Host) -> SharedParent {
    let parent = h.root.join("srv").join("tpm");
    std::fs::create_dir_all(&parent).unwrap();
    std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (da, db) = (parent.join("vma"), parent.join("vmb"));
    let xa = source_dir_xml("vma", UUID_TRANS, &da, None);
    let xb = source_dir_xml("vmb", UUID_B, &db, None);
    capture(h, "vma", &da, &xa);
    capture(h, "vmb", &db, &xb);
    SharedParent {
        parent,
        a: (da, xa),
        b: (db, xb),
    }
}

#[test]
fn two_vms_whose_state_dirs_share_a_parent_both_restore_when_prepared_at_once() {
    let h = Host::with_config("sharedrace", "lock_timeout = 30.0\n");
    let s = shared_parent(&h);
    let permall = fixture("tpm2-00.permall.plain");
    for round in 0..40 {
        std::fs::remove_dir_all(&s.a.0).unwrap();
        std::fs::remove_dir_all(&s.b.0).unwrap();
        let ca = h.spawn(&["hook", "vma", "prepare", "begin", "-"], s.a.1.as_bytes());
        let cb = h.spawn(&["hook", "vmb", "prepare", "begin", "-"], s.b.1.as_bytes());
        for (vm, c, dir) in [("vma", ca, &s.a.0), ("vmb", cb, &s.b.0)] {
            let out = wait_with_deadline(c, Duration::from_secs(30));
            assert_eq!(
                out.status.code(),
                Some(0),
                "round {round}: {vm}'s start was refused: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(
                std::fs::read(dir.join("tpm2-00.permall")).ok(),
                Some(permall.clone()),
                "round {round}: {vm} has no restored state"
            );
        }
        assert_eq!(dir_names(&s.parent), ["vma", "vmb"], "round {round}");
    }
}

#[test]
fn prepare_of_one_vm_never_removes_another_vms_restore_in_progress() {
    let h = Host::new("sharedplant");
    let s = shared_parent(&h);
    // VM B's run is between its mkdir and its rename (it holds B's lock).
    let b_tmp = s.parent.join(".swtpm-keeper-vmb-restore-4242");
    std::fs::create_dir(&b_tmp).unwrap();
    std::fs::write(b_tmp.join("tpm2-00.permall"), b"half of B").unwrap();
    // ...and B's NVRAM temporary, should it live in the same directory.
    let b_file = s.parent.join(".vmb.swtpm-keeper-4242");
    std::fs::write(&b_file, b"B's vars").unwrap();
    std::fs::remove_dir_all(&s.a.0).unwrap();

    assert_ok(&h.hook("vma", "prepare", "begin", "-", s.a.1.as_bytes()));
    assert!(s.a.0.join("tpm2-00.permall").exists(), "A was not restored");
    assert_eq!(
        std::fs::read(b_tmp.join("tpm2-00.permall")).ok().as_deref(),
        Some(&b"half of B"[..]),
        "A's prepare removed B's restore in progress"
    );
    assert_eq!(std::fs::read(&b_file).unwrap(), b"B's vars");
}

#[test]
fn a_leftover_tree_of_this_vms_crashed_restore_is_removed_whole_without_following_links() {
    let h = Host::new("lefttree");
    let s = shared_parent(&h);
    let victim = h.root.join("victim");
    std::fs::create_dir(&victim).unwrap();
    std::fs::write(victim.join("keep"), b"root's").unwrap();
    // What a swap-out interrupted before its removal left: the old dir,
    // with a tree `tss` made in it, and a link out of it.
    let left = s.parent.join(".swtpm-keeper-vma-restore-77");
    std::fs::create_dir_all(left.join("sub/deeper")).unwrap();
    std::fs::write(left.join("sub/deeper/f"), b"x").unwrap();
    std::fs::write(left.join("sub/g"), b"y").unwrap();
    std::os::unix::fs::symlink(&victim, left.join("sub/out")).unwrap();
    std::fs::remove_dir_all(&s.a.0).unwrap();

    let out = h.hook("vma", "prepare", "begin", "-", s.a.1.as_bytes());
    assert_ok(&out);
    assert!(s.a.0.join("tpm2-00.permall").exists());
    assert!(!left.exists(), "the leftover tree stayed");
    assert_eq!(std::fs::read(victim.join("keep")).unwrap(), b"root's");
    assert_eq!(dir_names(&s.parent), ["vma", "vmb"]);
}

#[test]
fn a_source_dir_holding_dotfiles_and_tmp_files_that_are_not_swtpms_is_never_swapped_out() {
    let h = Host::new("notswtpm");
    let s = shared_parent(&h);
    std::fs::remove_file(s.a.0.join("tpm2-00.permall")).unwrap();
    std::fs::write(s.a.0.join(".precious-dotfile"), b"dot").unwrap();
    std::fs::write(s.a.0.join("TMPnotes.txt"), b"notes").unwrap();
    std::fs::write(s.a.0.join(".lock"), b"").unwrap();

    let out = h.hook("vma", "prepare", "begin", "-", s.a.1.as_bytes());
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("holds files that are not swtpm's (.precious-dotfile, TMPnotes.txt)"),
        "{err}"
    );
    assert_eq!(
        dir_names(&s.a.0),
        [".lock", ".precious-dotfile", "TMPnotes.txt"]
    );
    assert_eq!(
        std::fs::read(s.a.0.join(".precious-dotfile")).unwrap(),
        b"dot"
    );
    assert_eq!(dir_names(&s.parent), ["vma", "vmb"]);
}

#[test]
fn a_dir_holding_only_swtpms_own_files_is_swapped_out_for_the_restored_state() {
    let h = Host::new("onlyswtpm");
    let s = shared_parent(&h);
    std::fs::remove_file(s.a.0.join("tpm2-00.permall")).unwrap();
    for n in [".lock", "TMP2-00.permall", "tpm2-00.volatilestate"] {
        std::fs::write(s.a.0.join(n), b"").unwrap();
    }
    assert_ok(&h.hook("vma", "prepare", "begin", "-", s.a.1.as_bytes()));
    assert_eq!(dir_names(&s.a.0), ["tpm2-00.permall"]);
    assert_eq!(dir_names(&s.parent), ["vma", "vmb"]);
}

/// An EFI VM stopped once (state and NVRAM stored), then lost both; its
/// `<uuid>/` stays, empty.
fn efi_lost(h: &Host) {
    let permall = fixture("tpm2-00.permall.encrypted");
    h.put_state(UUID_EFI, &[("tpm2-00.permall", &permall), (".lock", b"")]);
    std::fs::write(h.nvram_path(), vec![5u8; 4096]).unwrap();
    assert_ok(&h.hook("efitest", "stopped", "end", "-", &h.efi_xml()));
    std::fs::remove_dir_all(h.state_dir(UUID_EFI)).unwrap();
    std::fs::remove_file(h.nvram_path()).unwrap();
}

/// The start is refused with `why`, and no half of the pair was written.
#[track_caller]
fn assert_refused_without_nvram(h: &Host, xml: &[u8], why: &str) {
    let out = h.hook("efitest", "prepare", "begin", "-", xml);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(why), "{err}");
    assert!(
        !h.nvram_path().exists(),
        "the NVRAM was written though the start was refused"
    );
    assert_eq!(dir_names(&h.nvram_dir), Vec::<String>::new());
}

#[test]
fn a_refusal_for_a_uuid_dir_writable_by_others_writes_no_nvram() {
    let h = Host::new("refuse777");
    efi_lost(&h);
    std::fs::set_permissions(
        h.swtpm.join(UUID_EFI),
        std::fs::Permissions::from_mode(0o777),
    )
    .unwrap();
    assert_refused_without_nvram(&h, &h.efi_xml(), "(mode 777), not root alone");
    assert!(!h.state_dir(UUID_EFI).exists());
}

#[test]
fn a_refusal_for_a_missing_swtpm_root_writes_no_nvram() {
    let h = Host::new("refusenoroot");
    efi_lost(&h);
    std::fs::remove_dir_all(&h.swtpm).unwrap();
    assert_refused_without_nvram(&h, &h.efi_xml(), "is libvirt's swtpm support installed?");
    assert!(!h.swtpm.exists());
}

#[test]
fn a_refusal_for_a_foreign_source_dir_writes_no_nvram() {
    let h = Host::new("refuseforeign");
    efi_lost(&h);
    let d = h.root.join("data");
    std::fs::create_dir(&d).unwrap();
    std::fs::write(d.join("important.db"), b"data").unwrap();
    let xml = String::from_utf8(h.efi_xml()).unwrap().replace(
        "<backend type='emulator' version='2.0'>",
        &format!(
            "<backend type='emulator' version='2.0'><source type='dir' path='{}'/>",
            d.display()
        ),
    );
    assert!(xml.contains("<source type='dir'"), "the fixture changed");
    assert_refused_without_nvram(&h, xml.as_bytes(), "holds files that are not swtpm's");
    assert_eq!(dir_names(&d), ["important.db"]);
}

#[test]
fn the_cli_restore_refused_for_a_uuid_dir_writable_by_others_writes_no_nvram() {
    let h = Host::new("clirefuse777");
    efi_lost(&h);
    std::fs::set_permissions(
        h.swtpm.join(UUID_EFI),
        std::fs::Permissions::from_mode(0o777),
    )
    .unwrap();
    let out = h.run(&["restore", UUID_EFI], b"");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("(mode 777), not root alone"), "{err}");
    assert!(!h.nvram_path().exists(), "the NVRAM was written: {err}");
}

/// `chattr +i` on a directory, undone when dropped (or the host's
/// cleanup could not remove it).
struct Immutable(PathBuf);

impl Immutable {
    fn set(p: &Path) -> Option<Immutable> {
        let ok = Command::new("chattr")
            .arg("+i")
            .arg(p)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Immutable(p.to_owned()))
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

#[test]
#[ignore = "needs root and a filesystem with chattr +i (run with --include-ignored)"]
fn a_tpm_write_that_fails_after_the_nvram_was_placed_takes_the_nvram_back_out() {
    let h = Host::new("undonvram");
    efi_lost(&h);
    // Every check passes; the mkdir of the state dir's temporary fails.
    let _guard = Immutable::set(&h.swtpm.join(UUID_EFI))
        .expect("chattr +i failed: run as root on a filesystem that supports it");
    let out = h.hook("efitest", "prepare", "begin", "-", &h.efi_xml());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot create directory"), "{err}");
    assert!(
        !h.nvram_path().exists(),
        "an NVRAM without its TPM state was left in place"
    );
    assert_eq!(dir_names(&h.nvram_dir), Vec::<String>::new());
}

#[test]
#[ignore = "needs root and setfacl (package acl; run with --include-ignored)"]
fn a_uuid_dir_whose_acl_lets_another_user_write_is_not_trusted() {
    // Linux keeps a POSIX ACL's mask in the mode's group bits, and the
    // mask bounds every named entry: the mode check sees this ACL's write.
    let h = Host::new("aclwrite");
    efi_lost(&h);
    let uuid_dir = h.swtpm.join(UUID_EFI);
    let st = Command::new("setfacl")
        .args(["-m", "u:nobody:rwx"])
        .arg(&uuid_dir)
        .status()
        .expect("setfacl is missing: install the package acl");
    assert!(st.success());
    assert_refused_without_nvram(&h, &h.efi_xml(), "not root alone");
    assert_eq!(dir_names(&uuid_dir), Vec::<String>::new());
}

#[test]
#[ignore = "needs root and a filesystem with chattr +i (run with --include-ignored)"]
fn a_forced_restore_whose_tpm_write_fails_puts_the_nvram_it_replaced_back() {
    let h = Host::new("undoforce");
    let permall = fixture("tpm2-00.permall.encrypted");
    h.put_state(UUID_EFI, &[("tpm2-00.permall", &permall)]);
    std::fs::write(h.nvram_path(), b"old vars").unwrap();
    assert_ok(&h.hook("efitest", "stopped", "end", "-", &h.efi_xml()));
    let g1 = h.generations(UUID_EFI)[0].clone();
    // The VM ran on with another TPM state and other vars.
    let mut newer = permall.clone();
    newer[200] ^= 1;
    h.put_state(UUID_EFI, &[("tpm2-00.permall", &newer)]);
    std::fs::write(h.nvram_path(), b"new vars").unwrap();
    std::fs::write(h.etc_qemu.join("efitest.xml"), h.efi_xml()).unwrap();

    let _guard = Immutable::set(&h.swtpm.join(UUID_EFI))
        .expect("chattr +i failed: run as root on a filesystem that supports it");
    let out = h.run(&["restore", UUID_EFI, "--generation", &g1, "--force"], b"");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("cannot create directory"), "{err}");
    assert_eq!(
        std::fs::read(h.nvram_path()).unwrap(),
        b"new vars",
        "the NVRAM of the pair still in place was not put back"
    );
    assert_eq!(
        std::fs::read(h.state_dir(UUID_EFI).join("tpm2-00.permall")).unwrap(),
        newer
    );
    assert_eq!(dir_names(&h.nvram_dir), ["efitest_VARS.fd"]);
}

#[test]
fn a_stored_file_that_swtpm_never_writes_is_never_restored() {
    // A 0.1.0 generation may hold a file planted in the state dir under a
    // swtpm-like name: it verifies, but only swtpm's own names go back.
    let h = Host::new("rp-planted-name");
    let permall = fixture("tpm2-00.permall.plain");
    write_generation(
        &h,
        &FixtureGen {
            uuid: UUID_TRANS,
            vm: "tpmtrans",
            generation: "00000001-20261120T100000Z",
            time_unix: 1_763_632_800,
            event: "stopped",
            reason: "-",
            secret: None,
            files: &[
                ("tpm2-00.permall", "tpm", &permall),
                ("tpm2-00.evil", "tpm", &permall),
            ],
        },
    );
    let out = h.hook(
        "tpmtrans",
        "prepare",
        "begin",
        "-",
        &fixture("tpm2-transient.stopped.xml"),
    );
    assert_ok(&out);
    let dir = h.state_dir(UUID_TRANS);
    assert_eq!(std::fs::read(dir.join("tpm2-00.permall")).unwrap(), permall);
    assert!(!dir.join("tpm2-00.evil").exists(), "{:?}", dir_names(&dir));
}

//! A corrupt local state at `prepare` (issue 13): libvirt's state file is
//! there but empty, cut short or failing swtpm's header rules, as a host
//! crash leaves it (swtpm issue 985). The hook keeps it in the store as
//! evidence, never restored, and puts the newest good generation back; a
//! state that passes the checks is never touched, and the refusals hold.

mod common;

use common::*;
use std::path::{Path, PathBuf};

const SECRET_A: &str = "0d9e4b2a-6a4f-4b9e-9f3e-1a2b3c4d5e6f";
const SECRET_B: &str = "9f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a";

fn xml(secret: Option<&str>) -> Vec<u8> {
    domain_xml("mendvm", UUID_TRANS, secret, None).into_bytes()
}

fn permall_path(h: &Host) -> PathBuf {
    h.state_dir(UUID_TRANS).join("tpm2-00.permall")
}

/// The VM stopped once with `permall`: the store holds one good generation.
fn captured(h: &Host, permall: &[u8], secret: Option<&str>) {
    h.put_state(UUID_TRANS, &[("tpm2-00.permall", permall), (".lock", b"")]);
    assert_ok(&h.hook("mendvm", "stopped", "end", "-", &xml(secret)));
    assert_eq!(h.generations(UUID_TRANS).len(), 1);
}

fn prepare(h: &Host, xml: &[u8]) -> std::process::Output {
    h.hook("mendvm", "prepare", "begin", "-", xml)
}

/// The evidence directories in the VM's store.
fn evidence(h: &Host) -> Vec<PathBuf> {
    h.store_entries(UUID_TRANS, "corrupt-")
}

fn record(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("evidence.json")).unwrap()).unwrap()
}

/// Corrupt the permall with `bad`, then `prepare`: the good state is back,
/// the bad one is the one evidence directory, and one line says both.
fn assert_mended(h: &Host, good: &[u8], bad: &[u8], why: &str) {
    std::fs::write(permall_path(h), bad).unwrap();
    h.logs();
    assert_ok(&prepare(h, &xml(None)));
    assert_eq!(std::fs::read(permall_path(h)).unwrap(), good);
    let ev = evidence(h);
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(std::fs::read(ev[0].join("tpm2-00.permall")).unwrap(), bad);
    assert!(sha256sum_check(&ev[0]), "the evidence fails its SHA256SUMS");
    let r = record(&ev[0]);
    assert_eq!(r["event"], "prepare");
    assert_eq!(r["replaced_by"], h.generations(UUID_TRANS)[0].as_str());
    let f = &r["files"][0];
    assert_eq!(f["name"], "tpm2-00.permall");
    assert_eq!(f["size"], bad.len());
    assert!(f["corrupt"].as_str().unwrap().contains(why), "{f}");
    // Evidence is never a generation.
    assert_eq!(h.generations(UUID_TRANS).len(), 1);
    let logs = h.logs();
    let lines: Vec<_> = logs.iter().filter(|l| l.contains("corrupt")).collect();
    assert_eq!(lines.len(), 1, "{logs:?}");
    let ev_name = ev[0].file_name().unwrap().to_string_lossy().into_owned();
    for part in [
        "vm=mendvm",
        UUID_TRANS,
        "event=prepare",
        why,
        &ev_name,
        "restored TPM 2.0 state from generation",
    ] {
        assert!(lines[0].contains(part), "{part} not in {}", lines[0]);
    }
}

#[test]
fn a_0_byte_permall_is_kept_as_evidence_and_the_good_generation_comes_back() {
    let h = Host::new("mend-empty");
    let good = fixture("tpm2-00.permall.plain");
    captured(&h, &good, None);
    assert_mended(&h, &good, b"", "empty");
}

#[test]
fn a_truncated_permall_is_kept_as_evidence_and_the_good_generation_comes_back() {
    let h = Host::new("mend-cut");
    let good = fixture("tpm2-00.permall.plain");
    captured(&h, &good, None);
    assert_mended(&h, &good, &good[..good.len() / 2], "header says");
}

#[test]
fn a_different_valid_permall_is_left_alone_and_nothing_is_kept() {
    let h = Host::new("mend-valid");
    let good = fixture("tpm2-00.permall.plain");
    captured(&h, &good, None);
    // Another TPM's state, valid: a data byte differs.
    let mut other = good.clone();
    other[100] ^= 0x5a;
    std::fs::write(permall_path(&h), &other).unwrap();
    assert_ok(&prepare(&h, &xml(None)));
    assert_eq!(std::fs::read(permall_path(&h)).unwrap(), other);
    assert!(evidence(&h).is_empty());
}

#[test]
fn a_corrupt_state_with_a_refused_restore_stays_in_place_and_the_refusal_says_corrupt() {
    let h = Host::new("mend-refused");
    captured(&h, &fixture("tpm2-00.permall.encrypted"), Some(SECRET_A));
    std::fs::write(permall_path(&h), b"").unwrap();
    let out = prepare(&h, &xml(Some(SECRET_B)));
    assert_eq!(out.status.code(), Some(1), "the start must be refused");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("corrupt") && err.contains(SECRET_A), "{err}");
    assert_eq!(std::fs::read(permall_path(&h)).unwrap(), b"");
    assert!(evidence(&h).is_empty());
    assert_eq!(h.generations(UUID_TRANS).len(), 1);
}

#[test]
fn a_corrupt_state_that_cannot_be_swapped_out_is_refused_before_any_evidence_is_written() {
    let h = Host::new("mend-foreign");
    captured(&h, &fixture("tpm2-00.permall.plain"), None);
    std::fs::write(permall_path(&h), b"").unwrap();
    // Someone's file beside it: the directory is never swapped out.
    std::fs::write(h.state_dir(UUID_TRANS).join("notes.txt"), b"mine").unwrap();
    let out = prepare(&h, &xml(None));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("corrupt") && err.contains("notes.txt"),
        "{err}"
    );
    assert_eq!(std::fs::read(permall_path(&h)).unwrap(), b"");
    assert!(
        evidence(&h).is_empty(),
        "evidence was written before the checks"
    );
}

#[test]
fn restore_off_leaves_a_corrupt_state_alone() {
    let h = Host::with_config("mend-off", "restore = \"off\"\n");
    captured(&h, &fixture("tpm2-00.permall.plain"), None);
    std::fs::write(permall_path(&h), b"").unwrap();
    assert_ok(&prepare(&h, &xml(None)));
    assert_eq!(std::fs::read(permall_path(&h)).unwrap(), b"");
    assert!(evidence(&h).is_empty());
}

#[test]
fn an_existing_nvram_stays_as_it_is_when_a_corrupt_state_is_mended() {
    let h = Host::new("mend-nvram");
    let permall = fixture("tpm2-00.permall.encrypted");
    let d = h.put_state(UUID_EFI, &[("tpm2-00.permall", &permall), (".lock", b"")]);
    std::fs::write(h.nvram_path(), b"captured vars").unwrap();
    assert_ok(&h.hook("efitest", "stopped", "end", "-", &h.efi_xml()));
    std::fs::write(d.join("tpm2-00.permall"), b"").unwrap();
    std::fs::write(h.nvram_path(), b"newer vars").unwrap();
    assert_ok(&h.hook("efitest", "prepare", "begin", "-", &h.efi_xml()));
    assert_eq!(std::fs::read(d.join("tpm2-00.permall")).unwrap(), permall);
    assert_eq!(std::fs::read(h.nvram_path()).unwrap(), b"newer vars");
}

/// A linear state file as swtpm lays it out, holding `blob`.
fn linear(blob: &[u8]) -> Vec<u8> {
    let hdrsize = 12 + 15 * 12;
    let mut v = vec![0u8; hdrsize];
    v[..8].copy_from_slice(&0x7377_7470_6d6c_696e_u64.to_le_bytes());
    v[8] = 1;
    v[10..12].copy_from_slice(&(hdrsize as u16).to_le_bytes());
    let off = v.len() as u32;
    v[12..16].copy_from_slice(&off.to_le_bytes());
    v[16..20].copy_from_slice(&(blob.len() as u32).to_le_bytes());
    v[20..24].copy_from_slice(&(blob.len() as u32).to_le_bytes());
    v.extend_from_slice(blob);
    v
}

#[test]
fn a_corrupt_linear_state_file_is_mended() {
    let h = Host::new("mend-linear");
    let dir = h.root.join("linear");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("mendvm.tpm");
    let x = domain_xml("mendvm", UUID_TRANS, None, None).replace(
        "version='2.0'>",
        &format!(
            "version='2.0'><source type='file' path='{}'/>",
            file.display()
        ),
    );
    let good = linear(&fixture("tpm2-00.permall.plain"));
    std::fs::write(&file, &good).unwrap();
    assert_ok(&h.hook("mendvm", "stopped", "end", "-", x.as_bytes()));
    // Its entries no longer add up: cut short inside the blob.
    std::fs::write(&file, &good[..good.len() - 100]).unwrap();
    assert_ok(&h.hook("mendvm", "prepare", "begin", "-", x.as_bytes()));
    assert_eq!(std::fs::read(&file).unwrap(), good);
    let ev = evidence(&h);
    assert_eq!(ev.len(), 1);
    assert_eq!(
        std::fs::read(ev[0].join("tpm-state.file")).unwrap(),
        &good[..good.len() - 100]
    );
    assert_eq!(record(&ev[0])["state_type"], "file");
    // Nothing but the state file is left beside it.
    let names: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(names.len(), 1);
}

#[test]
fn evidence_is_never_restored_a_later_lost_state_gets_the_good_generation() {
    let h = Host::new("mend-never");
    let good = fixture("tpm2-00.permall.plain");
    captured(&h, &good, None);
    std::fs::write(permall_path(&h), b"").unwrap();
    assert_ok(&prepare(&h, &xml(None)));
    assert_eq!(evidence(&h).len(), 1);
    std::fs::remove_dir_all(h.swtpm.join(UUID_TRANS)).unwrap();
    std::fs::create_dir_all(h.swtpm.join(UUID_TRANS)).unwrap();
    assert_ok(&prepare(&h, &xml(None)));
    assert_eq!(std::fs::read(permall_path(&h)).unwrap(), good);
    // And `restore` of the CLI does not take it by name either.
    let ev = evidence(&h)[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let out = h.run(&["restore", UUID_TRANS, "--generation", &ev], b"");
    assert_ne!(out.status.code(), Some(0));
}

#[test]
fn show_list_and_verify_report_evidence_and_prune_removes_it_by_name() {
    let h = Host::new("mend-cli");
    captured(&h, &fixture("tpm2-00.permall.plain"), None);
    std::fs::write(permall_path(&h), b"").unwrap();
    assert_ok(&prepare(&h, &xml(None)));
    let ev = evidence(&h)[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let text = |args: &[&str]| {
        let out = h.run(args, b"");
        assert_ok(&out);
        String::from_utf8(out.stdout).unwrap()
    };

    let show = text(&["show", UUID_TRANS]);
    assert!(
        show.contains("1 corrupt TPM state kept as evidence"),
        "{show}"
    );
    assert!(
        show.contains(&ev) && show.contains("the file is empty"),
        "{show}"
    );
    assert!(show.contains("1 generation,"), "{show}");
    let json: serde_json::Value =
        serde_json::from_str(&text(&["show", UUID_TRANS, "--json"])).unwrap();
    assert_eq!(json["evidence"][0]["name"], ev.as_str());
    assert_eq!(json["generations"].as_array().unwrap().len(), 1);

    let list = text(&["list"]);
    assert!(list.contains("corrupt-evidence"), "{list}");
    let json: serde_json::Value = serde_json::from_str(&text(&["list", "--json"])).unwrap();
    assert_eq!(json["vms"][0]["evidence"], 1);
    assert_eq!(json["vms"][0]["generations"], 1);

    // Reported as evidence, not as a bad generation: verify exits 0.
    let verify = text(&["verify"]);
    assert!(
        verify.contains(&format!("evidence {UUID_TRANS} {ev}: corrupt state")),
        "{verify}"
    );
    assert!(verify.contains("1 generations verified, 0 bad"), "{verify}");
    assert!(
        verify.contains("1 corrupt states kept as evidence"),
        "{verify}"
    );

    let prune = text(&["prune", "--vm", UUID_TRANS, "--generation", &ev]);
    assert!(
        prune.contains(&format!("removed {UUID_TRANS} {ev}")),
        "{prune}"
    );
    assert!(evidence(&h).is_empty());
    assert_eq!(h.generations(UUID_TRANS).len(), 1);
}

#[test]
fn only_the_newest_three_evidence_directories_are_kept() {
    let h = Host::new("mend-bound");
    captured(&h, &fixture("tpm2-00.permall.plain"), None);
    let mut seen = Vec::new();
    for i in 0..4u8 {
        std::fs::write(permall_path(&h), [i]).unwrap();
        assert_ok(&prepare(&h, &xml(None)));
        seen.push(evidence(&h).last().unwrap().clone());
    }
    assert_eq!(evidence(&h), seen[1..]);
    let firsts: Vec<u8> = seen[1..]
        .iter()
        .map(|d| std::fs::read(d.join("tpm2-00.permall")).unwrap()[0])
        .collect();
    assert_eq!(firsts, [1, 2, 3]);
}

#[test]
fn evidence_over_max_file_size_is_described_but_not_copied() {
    let h = Host::with_config("mend-bounded", "max_file_size = 8192\n");
    captured(&h, &fixture("tpm2-00.permall.plain"), None);
    let big = vec![7u8; 9000];
    std::fs::write(h.state_dir(UUID_TRANS).join("tpm2-00.volatilestate"), &big).unwrap();
    std::fs::write(permall_path(&h), b"").unwrap();
    assert_ok(&prepare(&h, &xml(None)));
    let ev = evidence(&h);
    assert_eq!(ev.len(), 1);
    assert!(!ev[0].join("tpm2-00.volatilestate").exists());
    let r = record(&ev[0]);
    let v = &r["files"][1];
    assert_eq!(v["name"], "tpm2-00.volatilestate");
    assert_eq!(v["size"], 9000);
    assert!(
        v["not_kept"].as_str().unwrap().contains("max_file_size"),
        "{v}"
    );
    assert!(sha256sum_check(&ev[0]));
}

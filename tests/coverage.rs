//! Which TPMs are protected (issue 18): `check` over every VM libvirt
//! defines with an emulator TPM or runs, the remembered failed capture in
//! `check`, `list` and `show`, and the hook installed as a copy.

mod common;
use common::*;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

const VERSION: &str = env!("CARGO_PKG_VERSION");
const SECRET_OLD: &str = "5ec7e700-0000-4000-8000-0000000000aa";
const SECRET_NEW: &str = "5ec7e700-0000-4000-8000-0000000000bb";
const UUID_B: &str = "bbbbbbbb-0000-4000-8000-000000000001";

/// A host with its own hooks dir and secrets dir (and libvirt's run dir,
/// from `Host`).
fn host(test: &str, extra: &str) -> Host {
    let root = std::env::temp_dir().join(format!("swk-{test}-{}", std::process::id()));
    let conf = format!("libvirt_hooks_dir = {:?}\n{extra}", root.join("hooks"));
    let h = Host::with_config(test, &conf);
    for d in ["hooks/qemu.d", "run-libvirt", "secrets"] {
        std::fs::create_dir_all(h.root.join(d)).unwrap();
    }
    h
}

fn text(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn check(h: &Host) -> (i32, String) {
    let out = h.run(&["check"], b"");
    (out.status.code().unwrap(), text(&out))
}

fn check_json(h: &Host) -> (i32, serde_json::Value) {
    let out = h.run(&["check", "--json"], b"");
    let v = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    (out.status.code().unwrap(), v)
}

/// The one VM of `check --json` with this UUID.
fn vm_json(v: &serde_json::Value, uuid: &str) -> serde_json::Value {
    v["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["uuid"] == uuid)
        .unwrap_or_else(|| panic!("{uuid} not in {v:#}"))
        .clone()
}

fn define(h: &Host, name: &str, xml: &[u8]) {
    std::fs::write(h.etc_qemu.join(format!("{name}.xml")), xml).unwrap();
}

fn put_secret(h: &Host, uuid: &str) {
    let p = h.root.join("secrets").join(format!("{uuid}.xml"));
    std::fs::write(
        p,
        format!("<secret ephemeral='no' private='yes'><uuid>{uuid}</uuid></secret>"),
    )
    .unwrap();
}

/// The transient fixture VM, defined (stopped) with a TPM state.
fn defined_trans(h: &Host) -> Vec<u8> {
    let xml = fixture("tpm2-transient.stopped.xml");
    define(h, "tpmtrans", &xml);
    h.put_state(
        UUID_TRANS,
        &[("tpm2-00.permall", &fixture("tpm2-00.permall.plain"))],
    );
    xml
}

/// The binary, copied where libvirt looks for the main hook.
fn install_copy(h: &Host, bytes: &[u8]) -> PathBuf {
    let p = h.root.join("hooks/qemu");
    std::fs::write(&p, bytes).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[test]
fn a_hook_installed_as_a_copy_of_the_binary_counts_as_installed() {
    let h = host("cov-hookcopy", "");
    let hook = install_copy(&h, &std::fs::read(bin()).unwrap());
    let (_, t) = check(&h);
    assert!(!t.contains("no hook in"), "{t}");
    let want = format!(
        "ok   hook {} is swtpm-keeper {VERSION}, as this command",
        hook.display()
    );
    assert!(t.contains(&want), "{t}");
}

#[test]
fn a_hook_copy_of_another_version_is_a_warning_that_says_how_to_install_this_one() {
    let h = host("cov-hookold", "");
    let mut bytes = std::fs::read(bin()).unwrap();
    let mark = format!("\0swtpm-keeper-version={VERSION}\0");
    let at = bytes
        .windows(mark.len())
        .position(|w| w == mark.as_bytes())
        .expect("the binary names its version");
    let other: String = VERSION
        .chars()
        .map(|c| if c.is_ascii_digit() { '9' } else { c })
        .collect();
    let start = at + mark.len() - 1 - VERSION.len();
    bytes[start..start + VERSION.len()].copy_from_slice(other.as_bytes());
    let hook = install_copy(&h, &bytes);
    let (_, t) = check(&h);
    let want = format!(
        "warn hook {} is swtpm-keeper {other}, this command is {VERSION}",
        hook.display()
    );
    assert!(t.contains(&want), "{t}");
    let reinstall = format!("install -m 0755 {} {}", bin(), hook.display());
    assert!(t.contains(&reinstall), "{t}");
    // A swtpm-keeper from before versions were embedded: still ours.
    install_copy(&h, b"\x7fELF\x02\x01\x01 ... SWTPM_KEEPER_CONFIG ...");
    let (_, t) = check(&h);
    assert!(t.contains("names no version"), "{t}");
    assert!(!t.contains("no hook in"), "{t}");
}

#[test]
fn a_vm_never_captured_is_a_fix_with_the_command_that_captures_it() {
    let h = host("cov-never", "");
    defined_trans(&h);
    let (code, t) = check(&h);
    assert_eq!(code, 1, "{t}");
    assert!(
        t.contains("FIX  VM tpmtrans has an emulator TPM that was never captured: swtpm-keeper capture tpmtrans"),
        "{t}"
    );
    assert!(
        t.contains("VMs with a TPM: 1, protected 0, stale 0, never captured 1, failing 0"),
        "{t}"
    );
    assert_ok(&h.run(&["capture", "tpmtrans"], b""));
    let (_, t) = check(&h);
    assert!(
        t.contains("ok   VM tpmtrans: newest capture 00000001-"),
        "{t}"
    );
    assert!(t.contains("protected 1"), "{t}");
}

#[test]
fn a_defined_vm_whose_tpm_never_ran_has_nothing_to_capture_and_is_no_fix() {
    let h = host("cov-nostate", "");
    define(&h, "tpmtrans", &fixture("tpm2-transient.stopped.xml"));
    let (_, t) = check(&h);
    assert!(t.contains("ok   VM tpmtrans has no TPM state yet"), "{t}");
    assert!(!t.contains("FIX  VM"), "{t}");
}

#[test]
fn a_transient_running_vm_is_found_in_libvirts_status_files_alone() {
    let h = host("cov-transient", "");
    let me = std::process::id();
    let xml = String::from_utf8(fixture("tpm2-transient.stopped.xml")).unwrap();
    let status = |job: &str| {
        format!(
            "<domstatus state='running' reason='booted' pid='{me}'>\n{job}{xml}\n</domstatus>\n"
        )
    };
    let path = h.root.join("run-libvirt/tpmtrans.xml");
    // While an incoming migration brings its state, it is not judged.
    let job = "<job type='none' async='migration in' phase='prepare' flags='0x0'/>\n";
    std::fs::write(&path, status(job)).unwrap();
    let (_, t) = check(&h);
    assert!(!t.contains("VM tpmtrans"), "{t}");
    std::fs::write(&path, status("")).unwrap();
    let (code, t) = check(&h);
    assert_eq!(code, 1);
    assert!(
        t.contains("FIX  VM tpmtrans runs and its TPM was never captured"),
        "{t}"
    );
    let (_, v) = check_json(&h);
    assert_eq!(vm_json(&v, UUID_TRANS)["found"], "status");
    assert_eq!(vm_json(&v, UUID_TRANS)["verdict"], "never-captured");
}

#[test]
fn a_failed_stop_is_remembered_shown_by_check_list_and_show_and_cleared_by_the_next_good_capture() {
    let h = host("cov-failed", "");
    let xml = defined_trans(&h);
    assert_ok(&h.stop_transient());
    // The next stop's state cannot be kept (any failure takes this path:
    // a full store, a lock held too long, a damaged state).
    h.put_state(UUID_TRANS, &[("tpm2-00.permall", b"not a swtpm blob")]);
    let out = h.hook("tpmtrans", "stopped", "end", "-", &xml);
    assert_ok(&out);
    assert!(h.vm_store(UUID_TRANS).join("capture-failed.json").is_file());
    assert!(h
        .run_dir()
        .join(format!("failures/{UUID_TRANS}.json"))
        .is_file());

    let (code, t) = check(&h);
    assert_eq!(code, 1, "{t}");
    let line = t
        .lines()
        .find(|l| l.starts_with("FIX  VM tpmtrans: its last capture failed"))
        .unwrap_or_else(|| panic!("{t}"));
    assert!(line.contains("at stopped"), "{line}");
    assert!(line.contains("swtpm-keeper capture tpmtrans"), "{line}");
    let (_, v) = check_json(&h);
    let vm = vm_json(&v, UUID_TRANS);
    assert_eq!(vm["verdict"], "failing");
    assert_eq!(vm["protected"], false);
    assert_eq!(vm["failure"]["state"], "failed");
    assert_eq!(vm["failure"]["event"], "stopped");

    let list = text(&h.run(&["list"], b""));
    assert!(list.contains("capture-failed"), "{list}");
    let lj: serde_json::Value =
        serde_json::from_slice(&h.run(&["list", "--json"], b"").stdout).unwrap();
    assert_eq!(lj["vms"][0]["failure"]["event"], "stopped");
    let show = text(&h.run(&["show", "tpmtrans"], b""));
    assert!(show.contains("Last capture FAILED"), "{show}");
    let sj: serde_json::Value =
        serde_json::from_slice(&h.run(&["show", "tpmtrans", "--json"], b"").stdout).unwrap();
    assert_eq!(sj["failure"]["state"], "failed");

    // A good capture clears both copies, and every view.
    let mut p = fixture("tpm2-00.permall.plain");
    p[100] ^= 1;
    h.put_state(UUID_TRANS, &[("tpm2-00.permall", &p)]);
    assert_ok(&h.stop_transient());
    assert!(!h.vm_store(UUID_TRANS).join("capture-failed.json").exists());
    assert!(!h
        .run_dir()
        .join(format!("failures/{UUID_TRANS}.json"))
        .exists());
    let (_, t) = check(&h);
    assert!(!t.contains("capture failed"), "{t}");
    assert!(!text(&h.run(&["list"], b"")).contains("capture-failed"));
    let sj: serde_json::Value =
        serde_json::from_slice(&h.run(&["show", "tpmtrans", "--json"], b"").stdout).unwrap();
    assert!(sj["failure"].is_null(), "{sj:#}");
}

#[test]
fn a_failed_capture_command_is_remembered_too() {
    let h = host("cov-failcmd", "");
    defined_trans(&h);
    h.put_state(UUID_TRANS, &[("tpm2-00.permall", b"not a swtpm blob")]);
    assert_eq!(h.run(&["capture", "tpmtrans"], b"").status.code(), Some(1));
    let (_, v) = check_json(&h);
    assert_eq!(vm_json(&v, UUID_TRANS)["failure"]["event"], "capture");
    // One FIX: the failure says the store holds nothing for it.
    let (_, t) = check(&h);
    let line = t
        .lines()
        .find(|l| l.starts_with("FIX  VM tpmtrans: its last capture failed"))
        .unwrap_or_else(|| panic!("{t}"));
    assert!(
        line.contains("the store still holds nothing for it"),
        "{line}"
    );
    assert!(!t.contains("never captured:"), "{t}");
}

#[test]
fn a_damaged_failure_record_is_reported_and_nothing_fails_on_it() {
    let h = host("cov-damaged", "");
    defined_trans(&h);
    assert_ok(&h.stop_transient());
    std::fs::write(
        h.vm_store(UUID_TRANS).join("capture-failed.json"),
        b"{\"format\": 1, \"ti",
    )
    .unwrap();
    let (code, t) = check(&h);
    assert_eq!(code, 1, "{t}");
    assert!(
        t.contains("FIX  VM tpmtrans: a capture failed, and its record cannot be read"),
        "{t}"
    );
    let (_, v) = check_json(&h);
    assert_eq!(vm_json(&v, UUID_TRANS)["failure"]["state"], "damaged");
    assert_ok(&h.run(&["list"], b""));
    assert_ok(&h.run(&["show", "tpmtrans"], b""));
    let lj: serde_json::Value =
        serde_json::from_slice(&h.run(&["list", "--json"], b"").stdout).unwrap();
    assert_eq!(lj["vms"][0]["failure"]["state"], "damaged");
}

/// The EFI fixture VM (encrypted TPM, `secret`), captured once, defined.
fn efi_captured(h: &Host, secret: &str) {
    let xml = String::from_utf8(h.efi_xml()).unwrap();
    let xml = xml.replace("0f0e0d0c-0b0a-4909-8807-060504030201", secret);
    h.put_state(
        UUID_EFI,
        &[("tpm2-00.permall", &fixture("tpm2-00.permall.encrypted"))],
    );
    std::fs::write(h.nvram_path(), vec![1u8; 4096]).unwrap();
    assert_ok(&h.hook("efitest", "stopped", "end", "-", xml.as_bytes()));
    define(h, "efitest", xml.as_bytes());
}

#[test]
fn a_secret_libvirt_does_not_define_is_a_fix() {
    let h = host("cov-secretgone", "");
    efi_captured(&h, SECRET_OLD);
    put_secret(&h, SECRET_OLD);
    let (_, t) = check(&h);
    assert!(t.contains("ok   VM efitest: newest capture"), "{t}");
    assert!(!t.contains("FIX  VM"), "{t}");
    std::fs::remove_file(h.root.join("secrets").join(format!("{SECRET_OLD}.xml"))).unwrap();
    let (code, t) = check(&h);
    assert_eq!(code, 1, "{t}");
    let line = t
        .lines()
        .find(|l| l.starts_with("FIX  VM efitest names <encryption secret="))
        .unwrap_or_else(|| panic!("{t}"));
    assert!(line.contains(SECRET_OLD), "{line}");
    assert!(
        t.contains("protected 0, stale 0, never captured 0, failing 0, secret problems 1"),
        "{t}"
    );
    let (_, v) = check_json(&h);
    let vm = vm_json(&v, UUID_EFI);
    assert_eq!(
        (vm["verdict"].as_str(), vm["secret_defined"].as_bool()),
        (Some("secret-missing"), Some(false))
    );
}

#[test]
fn a_secret_changed_since_the_newest_generation_is_a_fix_naming_both_and_the_two_ways_out() {
    let h = host("cov-secretnew", "");
    efi_captured(&h, SECRET_OLD);
    let xml = String::from_utf8(h.efi_xml())
        .unwrap()
        .replace("0f0e0d0c-0b0a-4909-8807-060504030201", SECRET_NEW);
    define(&h, "efitest", xml.as_bytes());
    put_secret(&h, SECRET_NEW);
    let (code, t) = check(&h);
    assert_eq!(code, 1, "{t}");
    let line = t
        .lines()
        .find(|l| l.contains("was captured under secret"))
        .unwrap_or_else(|| panic!("{t}"));
    assert!(line.starts_with("FIX  VM efitest"), "{line}");
    assert!(
        line.contains(SECRET_OLD) && line.contains(SECRET_NEW),
        "{line}"
    );
    assert!(line.contains("define the old secret"), "{line}");
    assert!(
        line.contains("swtpm-keeper restore efitest --force"),
        "{line}"
    );
    let (_, v) = check_json(&h);
    assert_eq!(vm_json(&v, UUID_EFI)["verdict"], "secret-changed");
}

#[test]
fn a_vm_name_that_needs_escaping_comes_out_whole_in_check_list_and_show_json() {
    let h = host("cov-escape", "");
    let name = "we\"ird\\vm\nünï 🔐";
    let xml = domain_xml("X", UUID_B, None, None)
        .replace("<name>X</name>", "<name>we\"ird\\vm&#10;ünï 🔐</name>");
    define(&h, name, xml.as_bytes());
    h.put_state(
        UUID_B,
        &[("tpm2-00.permall", &fixture("tpm2-00.permall.plain"))],
    );
    let (_, v) = check_json(&h);
    assert_eq!(vm_json(&v, UUID_B)["name"], name);
    let (_, t) = check(&h);
    assert!(
        t.contains("VM we\"ird\\vm\\nünï 🔐 "),
        "one line, the newline shown escaped: {t}"
    );
    assert_ok(&h.run(&["capture", name], b""));
    let lj: serde_json::Value =
        serde_json::from_slice(&h.run(&["list", "--json"], b"").stdout).unwrap();
    assert_eq!(lj["vms"][0]["name"], name);
    let sj: serde_json::Value =
        serde_json::from_slice(&h.run(&["show", UUID_B, "--json"], b"").stdout).unwrap();
    assert_eq!(sj["name"], name);
}

#[test]
fn check_json_is_versioned_holds_every_finding_and_exits_as_the_text_does() {
    let h = host("cov-json", "");
    defined_trans(&h);
    let (code, v) = check_json(&h);
    let (tcode, t) = check(&h);
    assert_eq!((code, tcode), (1, 1));
    assert_eq!(v["version"], 1);
    let findings = v["findings"].as_array().unwrap();
    assert_eq!(
        findings.len(),
        t.lines()
            .filter(|l| ["ok ", "warn", "FIX "].iter().any(|p| l.starts_with(p)))
            .count(),
        "{t}"
    );
    assert_eq!(
        v["fixes"],
        findings.iter().filter(|f| f["level"] == "fix").count()
    );
    assert_eq!(v["summary"]["never_captured"], 1);
    assert_eq!(v["store"]["vms"], 0);
}

#[test]
fn list_shows_the_vm_state_the_newest_generation_was_read_in() {
    let h = host("cov-vmstate", "");
    defined_trans(&h);
    assert_ok(&h.stop_transient());
    let list = text(&h.run(&["list"], b""));
    assert!(list.lines().next().unwrap().contains("STATE"), "{list}");
    assert!(list.contains("shutoff"), "{list}");
    let lj: serde_json::Value =
        serde_json::from_slice(&h.run(&["list", "--json"], b"").stdout).unwrap();
    assert_eq!(lj["vms"][0]["newest"]["vm_state"], "shutoff");
}

#[test]
fn a_transient_vm_whose_stop_failed_stays_in_check_after_libvirt_forgot_it() {
    let h = host("cov-gone", "");
    h.put_state(UUID_TRANS, &[("tpm2-00.permall", b"not a swtpm blob")]);
    assert_ok(&h.stop_transient());
    let (code, t) = check(&h);
    assert_eq!(code, 1, "{t}");
    let line = t
        .lines()
        .find(|l| {
            l.starts_with(&format!(
                "FIX  VM tpmtrans ({UUID_TRANS}), which libvirt no longer"
            ))
        })
        .unwrap_or_else(|| panic!("{t}"));
    assert!(line.contains("the store holds nothing for it"), "{line}");
    let (_, v) = check_json(&h);
    let vm = vm_json(&v, UUID_TRANS);
    assert_eq!(
        (vm["found"].as_str(), vm["verdict"].as_str()),
        (Some("gone"), Some("failing"))
    );
    // Its next start and good stop clear it; then only the store knows it.
    h.put_state(
        UUID_TRANS,
        &[("tpm2-00.permall", &fixture("tpm2-00.permall.plain"))],
    );
    assert_ok(&h.stop_transient());
    let (_, v) = check_json(&h);
    assert!(v["vms"].as_array().unwrap().is_empty(), "{v:#}");
    assert_eq!(v["store"]["vms"], 1);
}

/// The transient fixture VM stopped once with a good state (a generation),
/// then once with a state that fails to capture (remembered).
fn gone_after_a_failed_stop(h: &Host) {
    h.put_state(
        UUID_TRANS,
        &[("tpm2-00.permall", &fixture("tpm2-00.permall.plain"))],
    );
    assert_ok(&h.stop_transient());
    h.put_state(UUID_TRANS, &[("tpm2-00.permall", b"not a swtpm blob")]);
    assert_ok(&h.stop_transient());
}

/// The line `check` prints for the transient VM libvirt forgot.
fn gone_line(t: &str) -> String {
    t.lines()
        .find(|l| l.contains(&format!("({UUID_TRANS}), which libvirt no longer")))
        .unwrap_or_else(|| panic!("{t}"))
        .to_owned()
}

#[test]
fn a_gone_vms_failure_kept_only_in_the_store_is_still_checked_after_a_reboot() {
    let h = host("cov-gone-reboot", "");
    gone_after_a_failed_stop(&h);
    // run_dir is a tmpfs: after a reboot only the store's copy is left.
    std::fs::remove_dir_all(h.run_dir().join("failures")).unwrap();
    let (code, t) = check(&h);
    assert_eq!(code, 1, "{t}");
    assert!(gone_line(&t).starts_with("FIX  VM tpmtrans ("), "{t}");
}

#[test]
fn a_gone_vm_is_named_from_its_newest_generation_when_its_failure_record_names_none() {
    let h = host("cov-gone-name", "");
    gone_after_a_failed_stop(&h);
    let records = [
        h.run_dir().join(format!("failures/{UUID_TRANS}.json")),
        h.vm_store(UUID_TRANS).join("capture-failed.json"),
    ];
    // A record without the VM's name (its field is optional).
    for r in &records {
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(r).unwrap()).unwrap();
        v["name"] = serde_json::Value::String(String::new());
        std::fs::write(r, serde_json::to_vec(&v).unwrap()).unwrap();
    }
    let (_, t) = check(&h);
    assert!(gone_line(&t).starts_with("FIX  VM tpmtrans ("), "{t}");
    // Records that cannot be read at all: the name still comes from the store.
    for r in &records {
        std::fs::write(r, b"{ damaged").unwrap();
    }
    let (code, t) = check(&h);
    assert_eq!(code, 1, "{t}");
    assert!(gone_line(&t).starts_with("FIX  VM tpmtrans ("), "{t}");
}

#[test]
fn a_running_vm_without_a_tpm_is_not_counted() {
    let h = host("cov-notpm", "");
    let xml = String::from_utf8(fixture("tpm2-transient.stopped.xml")).unwrap();
    let (a, b) = (xml.find("<tpm").unwrap(), xml.find("</tpm>").unwrap());
    let without = format!("{}{}", &xml[..a], &xml[b + "</tpm>".len()..]);
    let me = std::process::id();
    std::fs::write(
        h.root.join("run-libvirt/tpmtrans.xml"),
        format!(
            "<domstatus state='running' reason='booted' pid='{me}'>\n{without}\n</domstatus>\n"
        ),
    )
    .unwrap();
    let (_, t) = check(&h);
    assert!(!t.contains("VM tpmtrans"), "{t}");
    assert!(t.contains("VMs with a TPM: 0,"), "{t}");
}

#[test]
fn no_libvirt_config_dir_is_no_problem_but_an_unreadable_one_is_said() {
    let h = host("cov-confdir", "");
    std::fs::remove_dir_all(&h.etc_qemu).unwrap();
    let (_, t) = check(&h);
    assert!(!t.contains("not covered"), "{t}");
    // A file where the directory should be: read_dir fails otherwise.
    std::fs::write(&h.etc_qemu, b"").unwrap();
    let (_, t) = check(&h);
    let want = format!("warn cannot read directory {}", h.etc_qemu.display());
    assert!(
        t.contains(&want) && t.contains("VMs in it are not covered"),
        "{t}"
    );
}

#[test]
fn a_vm_whose_part_of_the_store_cannot_be_read_is_a_fix_that_says_why() {
    let h = host("cov-unreadable", "");
    defined_trans(&h);
    // Its lock cannot be opened: a directory where the lock file goes.
    std::fs::create_dir_all(h.vm_store(UUID_TRANS).join(".lock")).unwrap();
    let (code, t) = check(&h);
    assert_eq!(code, 1, "{t}");
    assert!(
        t.contains("FIX  VM tpmtrans: cannot read its part of the store:"),
        "{t}"
    );
    assert!(
        t.contains("VMs with a TPM: 1, protected 0, stale 0, never captured 0, failing 1"),
        "{t}"
    );
}

/// The transient VM defined, with two generations of its TPM state.
fn two_generations(h: &Host) -> Vec<String> {
    defined_trans(h);
    let plain = fixture("tpm2-00.permall.plain");
    assert_ok(&h.stop_transient());
    let mut other = plain.clone();
    other[200] ^= 1;
    h.put_state(UUID_TRANS, &[("tpm2-00.permall", &other)]);
    assert_ok(&h.stop_transient());
    let gens = h.generations(UUID_TRANS);
    assert_eq!(gens.len(), 2, "{gens:?}");
    gens
}

#[test]
fn a_newest_generation_with_a_file_of_another_size_is_not_good_and_the_older_one_counts() {
    let h = host("cov-size", "");
    let gens = two_generations(&h);
    let (_, t) = check(&h);
    assert!(
        t.contains(&format!("ok   VM tpmtrans: newest capture {}", gens[1])),
        "{t}"
    );
    let permall = h
        .vm_store(UUID_TRANS)
        .join(&gens[1])
        .join("tpm2-00.permall");
    let bytes = std::fs::read(&permall).unwrap();
    std::fs::write(&permall, &bytes[..bytes.len() - 1]).unwrap();
    let (_, t) = check(&h);
    assert!(
        t.contains(&format!("ok   VM tpmtrans: newest capture {}", gens[0])),
        "{t}"
    );
}

#[test]
fn a_newest_generation_whose_manifest_lists_no_tpm_state_is_not_good() {
    let h = host("cov-notpmfile", "");
    let gens = two_generations(&h);
    let path = h.vm_store(UUID_TRANS).join(&gens[1]).join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    for f in m["files"].as_array_mut().unwrap() {
        if f["role"] == "tpm" {
            f["role"] = serde_json::Value::String("domain".into());
        }
    }
    std::fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
    let (_, t) = check(&h);
    assert!(
        t.contains(&format!("ok   VM tpmtrans: newest capture {}", gens[0])),
        "{t}"
    );
}

#[test]
fn a_gone_vms_failure_remembered_in_run_dir_alone_is_still_checked() {
    let h = host("cov-gone-rundir", "");
    h.put_state(UUID_TRANS, &[("tpm2-00.permall", b"not a swtpm blob")]);
    assert_ok(&h.stop_transient());
    // The store has nothing of it (another store, or one wiped): only the
    // record in run_dir knows of the failure.
    let _ = std::fs::remove_dir_all(h.vm_store(UUID_TRANS));
    let (code, t) = check(&h);
    assert_eq!(code, 1, "{t}");
    assert!(
        gone_line(&t).contains("the store holds nothing for it"),
        "{t}"
    );
}

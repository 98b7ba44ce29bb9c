//! `swtpm-keeper capture <vm> --pause`: the VM is paused through a
//! stand-in `virsh` on the PATH (it records its calls and flips libvirt's
//! status file between running and paused, as libvirt would), read, and
//! resumed on every path. A paused VM's files are read once.

mod common;
use common::*;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Output;

/// The stand-in: `SWK_VIRSH_MODE` says how its suspend behaves.
const VIRSH: &str = r#"#!/bin/sh
echo "$*" >>"$SWK_VIRSH_LOG"
flip() { sed -i "s/<domstatus state='$1'/<domstatus state='$2'/" "$SWK_STATUS"; }
case "$1:$SWK_VIRSH_MODE" in
suspend:fail) echo "error: Requested operation is not valid: domain is not running" >&2; exit 1 ;;
suspend:ignore) ;;
suspend:hang) flip running paused; exec sleep 30 ;;
suspend:term) flip running paused; kill -TERM "$PPID" ;;
suspend:int) flip running paused; kill -INT "$PPID" ;;
suspend:*) flip running paused ;;
resume:*) flip paused running ;;
esac
exit 0
"#;

/// A host with its own run dirs, debug logging, and the stand-in virsh
/// in `<root>/bin`.
fn pause_host(test: &str) -> Host {
    let root = std::env::temp_dir().join(format!("swk-{test}-{}", std::process::id()));
    let conf = format!(
        "libvirt_run_dir = {:?}\nrun_dir = {:?}\ngenerations = 10\nlog_level = \"debug\"\n",
        root.join("run-libvirt"),
        root.join("run-keeper")
    );
    let h = Host::with_config(test, &conf);
    std::fs::create_dir_all(h.root.join("run-libvirt")).unwrap();
    std::fs::create_dir_all(h.root.join("bin")).unwrap();
    write_script(&h.root.join("bin/virsh"), VIRSH);
    h
}

/// The EFI fixture VM in `state` ("running" or "paused"), its NVRAM just
/// written: a process holds swtpm's lock and stands in for QEMU.
fn efi_vm(h: &Host, state: &str) -> FcntlHolder {
    let permall = fixture("tpm2-00.permall.encrypted");
    let d = h.put_state(UUID_EFI, &[("tpm2-00.permall", &permall), (".lock", b"")]);
    std::fs::write(h.nvram_path(), vec![7u8; 65536]).unwrap();
    let swtpm = FcntlHolder::hold(&d.join(".lock"));
    let status = format!(
        "<domstatus state='{state}' reason='booted' pid='{}'>\n{}\n</domstatus>\n",
        swtpm.pid(),
        String::from_utf8_lossy(&h.efi_xml())
    );
    std::fs::write(status_file(h), status).unwrap();
    let pid = h.root.join("run-libvirt/efitest.pid");
    std::fs::write(pid, format!("{}\n", swtpm.pid())).unwrap();
    swtpm
}

fn status_file(h: &Host) -> PathBuf {
    h.root.join("run-libvirt/efitest.xml")
}

fn vm_state(h: &Host) -> String {
    let s = std::fs::read_to_string(status_file(h)).unwrap();
    let at = s.find("state='").unwrap() + 7;
    s[at..at + s[at..].find('\'').unwrap()].to_owned()
}

/// `capture <args>` with the stand-in first on the PATH (`path`, when
/// given, replaces the PATH).
fn capture(h: &Host, mode: &str, args: &[&str], path: Option<&Path>) -> Output {
    let mut c = h.command(&[&["capture"], args].concat());
    let bin = h.root.join("bin");
    let path = match path {
        Some(p) => p.as_os_str().to_owned(),
        None => {
            let mut p = bin.into_os_string();
            p.push(":");
            p.push(std::env::var_os("PATH").unwrap_or_default());
            p
        }
    };
    c.env("PATH", path)
        .env("SWK_VIRSH_LOG", h.root.join("virsh.log"))
        .env("SWK_STATUS", status_file(h))
        .env("SWK_VIRSH_MODE", mode);
    run_with(&mut c, b"")
}

/// What the stand-in was asked, one call a line.
fn calls(h: &Host) -> Vec<String> {
    match std::fs::read_to_string(h.root.join("virsh.log")) {
        Ok(s) => s.lines().map(str::to_owned).collect(),
        Err(_) => Vec::new(),
    }
}

fn suspend_resume() -> Vec<String> {
    vec![format!("suspend {UUID_EFI}"), format!("resume {UUID_EFI}")]
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn pause_suspends_reads_resumes_and_reports_the_paused_milliseconds() {
    let h = pause_host("pause-ok");
    let _vm = efi_vm(&h, "running");
    let out = capture(&h, "ok", &["efitest", "--pause"], None);
    assert_ok(&out);
    assert_eq!(calls(&h), suspend_resume());
    assert_eq!(vm_state(&h), "running");
    let gens = h.generations(UUID_EFI);
    assert_eq!(gens.len(), 1);
    let line = text(&out.stdout);
    assert!(
        line.starts_with(&format!(
            "{} captured efitest: TPM and NVRAM; VM paused for ",
            gens[0]
        )),
        "{line}"
    );
    assert!(line.trim_end().ends_with(" ms"), "{line}");
    let m: serde_json::Value = serde_json::from_slice(
        &std::fs::read(h.vm_store(UUID_EFI).join(&gens[0]).join("manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(m["vm_state"], "paused");
    let show = h.run(&["show", "efitest"], b"");
    assert!(
        text(&show.stdout).contains("(live, from the paused VM)"),
        "{}",
        text(&show.stdout)
    );
    let logs = h.logs();
    assert!(
        logs.iter().any(
            |l| l.contains("captured TPM state and NVRAM of the paused VM")
                && l.contains("VM paused for ")
        ),
        "{logs:?}"
    );
}

#[test]
fn a_paused_vms_files_are_read_once_even_just_written() {
    let h = pause_host("pause-once");
    let _vm = efi_vm(&h, "paused");
    let out = capture(&h, "ok", &["efitest"], None);
    assert_ok(&out);
    let logs = h.logs();
    let nvram = h.nvram_path().display().to_string();
    // Running, an NVRAM written just now is read until two reads agree.
    assert!(
        logs.iter()
            .any(|l| l.contains(&format!("{nvram}: read once"))),
        "{logs:?}"
    );
    assert!(
        !logs
            .iter()
            .any(|l| l.contains("read until two reads agree")),
        "{logs:?}"
    );
}

#[test]
fn an_already_paused_vm_gets_no_suspend_and_no_resume_and_stays_paused() {
    let h = pause_host("pause-already");
    let _vm = efi_vm(&h, "paused");
    let out = capture(&h, "ok", &["efitest", "--pause"], None);
    assert_ok(&out);
    assert_eq!(calls(&h), Vec::<String>::new());
    assert_eq!(vm_state(&h), "paused");
    assert!(
        text(&out.stdout).contains("; the VM was paused already and stays paused"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(h.generations(UUID_EFI).len(), 1);
}

#[test]
fn the_vm_is_resumed_after_a_failed_read_and_nothing_is_stored() {
    let h = pause_host("pause-error");
    let _vm = efi_vm(&h, "running");
    let p = h.state_dir(UUID_EFI).join("tpm2-00.permall");
    std::fs::write(&p, b"not a swtpm state").unwrap();
    let out = capture(&h, "ok", &["efitest", "--pause"], None);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert_eq!(calls(&h), suspend_resume());
    assert_eq!(vm_state(&h), "running");
    assert!(h.generations(UUID_EFI).is_empty());
}

/// The stand-in signals the capture while the VM is paused.
fn signal_while_paused(test: &str, mode: &str, signal: i32, name: &str) {
    let h = pause_host(test);
    let _vm = efi_vm(&h, "running");
    let out = capture(&h, mode, &["efitest", "--pause"], None);
    assert_eq!(out.status.signal(), Some(signal), "{out:?}");
    assert_eq!(calls(&h), suspend_resume());
    assert_eq!(vm_state(&h), "running");
    assert!(h.generations(UUID_EFI).is_empty());
    let logs = h.logs();
    assert!(
        logs.iter().any(|l| l.contains(&format!(
            "{name} while the VM was paused for a capture: it was resumed"
        ))),
        "{logs:?}"
    );
}

#[test]
fn sigterm_while_paused_resumes_the_vm_then_ends_the_capture() {
    signal_while_paused("pause-term", "term", libc::SIGTERM, "SIGTERM");
}

#[test]
fn sigint_while_paused_resumes_the_vm_then_ends_the_capture() {
    signal_while_paused("pause-int", "int", libc::SIGINT, "SIGINT");
}

#[test]
fn a_suspend_that_hangs_is_killed_at_the_limit_and_the_vm_resumed() {
    let h = pause_host("pause-hang");
    let _vm = efi_vm(&h, "running");
    let args = ["efitest", "--pause", "--pause-limit", "1"];
    let out = capture(&h, "hang", &args, None);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("no answer within 1 s, killed"), "{err}");
    assert!(
        err.contains("the VM was resumed, in case it had paused"),
        "{err}"
    );
    assert_eq!(calls(&h), suspend_resume());
    assert_eq!(vm_state(&h), "running");
    assert!(h.generations(UUID_EFI).is_empty());
}

#[test]
fn a_suspend_libvirt_refuses_leaves_the_vm_as_it_was_and_captures_nothing() {
    let h = pause_host("pause-refused");
    let _vm = efi_vm(&h, "running");
    let out = capture(&h, "fail", &["efitest", "--pause"], None);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("cannot pause VM efitest"), "{err}");
    assert!(err.contains("domain is not running"), "{err}");
    assert!(err.contains("the VM was left as it was"), "{err}");
    assert_eq!(calls(&h), vec![format!("suspend {UUID_EFI}")]);
    assert!(h.generations(UUID_EFI).is_empty());
}

#[test]
fn a_vm_not_shown_paused_after_the_suspend_is_resumed_and_not_captured() {
    let h = pause_host("pause-ignored");
    let _vm = efi_vm(&h, "running");
    let out = capture(&h, "ignore", &["efitest", "--pause"], None);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("is running, not paused, after `virsh suspend"),
        "{err}"
    );
    assert_eq!(calls(&h), suspend_resume());
    assert!(h.generations(UUID_EFI).is_empty());
}

#[test]
fn without_virsh_the_pause_is_a_clear_error_and_nothing_is_captured() {
    let h = pause_host("pause-novirsh");
    let _vm = efi_vm(&h, "running");
    let empty = h.root.join("empty-bin");
    std::fs::create_dir_all(&empty).unwrap();
    let out = capture(&h, "ok", &["efitest", "--pause"], Some(&empty));
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("cannot run virsh"), "{err}");
    assert!(err.contains("libvirt-clients"), "{err}");
    assert!(err.contains("the VM was left as it was"), "{err}");
    assert_eq!(vm_state(&h), "running");
    assert!(h.generations(UUID_EFI).is_empty());
}

#[test]
fn pause_is_refused_with_all() {
    let h = pause_host("pause-all");
    let out = capture(&h, "ok", &["--all", "--pause"], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("never --all"));
    assert!(calls(&h).is_empty());
}

//! Every UEFI variable store libvirt writes, through the hook: an
//! `<nvram>` file in raw or qcow2 format and a `<varstore>` (libvirt 12.1,
//! QEMU's uefi-vars JSON) are captured and put back byte for byte; an
//! `<nvram type='block'>` or `'network'` is named in the manifest and the
//! log, never copied, and never written to.

mod common;
use common::*;

const UUID: &str = "22222222-3333-4444-5555-666666666666";

/// A TPM 2.0 VM `uefi` whose `<os>` holds `os_inner`.
fn xml(os_inner: &str) -> Vec<u8> {
    format!(
        "<domain type='kvm'><name>uefi</name><uuid>{UUID}</uuid>\
         <os firmware='efi'><type arch='x86_64' machine='q35'>hvm</type>{os_inner}</os>\
         <devices><tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm></devices></domain>\n"
    )
    .into_bytes()
}

/// Stop the VM once with its TPM state (and the store's file, if any):
/// the generation's directory and manifest.
fn stop(h: &Host, domain: &[u8]) -> (std::path::PathBuf, serde_json::Value) {
    let permall = fixture("tpm2-00.permall.plain");
    h.put_state(UUID, &[("tpm2-00.permall", &permall), (".lock", b"")]);
    let out = h.hook("uefi", "stopped", "end", "-", domain);
    assert_ok(&out);
    let g = h.generations(UUID).pop().expect("a generation");
    let dir = h.vm_store(UUID).join(g);
    let m = serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    assert!(sha256sum_check(&dir));
    (dir, m)
}

/// What `undefine --nvram` leaves, then the next start's `prepare`.
fn lose_and_start(
    h: &Host,
    domain: &[u8],
    store_file: Option<&std::path::Path>,
) -> std::process::Output {
    std::fs::remove_dir_all(h.swtpm.join(UUID)).unwrap();
    if let Some(p) = store_file {
        std::fs::remove_file(p).unwrap();
    }
    h.hook("uefi", "prepare", "begin", "-", domain)
}

/// A qcow2 image's first bytes, then data of no OVMF size.
fn qcow2_bytes() -> Vec<u8> {
    let mut b = b"QFI\xfb\x00\x00\x00\x03".to_vec();
    b.extend((0..200_003u32).map(|i| (i % 253) as u8));
    b
}

#[test]
fn nvram_files_in_raw_and_qcow2_format_are_kept_and_put_back_byte_for_byte() {
    for (format, bytes) in [
        ("qcow2", qcow2_bytes()),
        ("raw", (0..4096u32).map(|i| (i % 7) as u8).collect()),
    ] {
        let h = Host::new(&format!("uefi-{format}"));
        let path = h.nvram_dir.join("uefi_VARS.fd");
        std::fs::write(&path, &bytes).unwrap();
        let domain = xml(&format!(
            "<nvram template='/usr/share/OVMF/OVMF_VARS.{format}' format='{format}'>{}</nvram>",
            path.display()
        ));
        let (dir, m) = stop(&h, &domain);
        assert_eq!(
            std::fs::read(dir.join("nvram.fd")).unwrap(),
            bytes,
            "{format}"
        );
        assert_eq!(m["nvram"]["format"], format);
        assert_eq!(m["nvram"]["file"], "nvram.fd");
        assert!(
            m["nvram"].get("kind").is_none(),
            "an <nvram> needs no kind: {m}"
        );
        assert_ok(&lose_and_start(&h, &domain, Some(&path)));
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "{format} restored");
    }
}

#[test]
fn a_varstore_is_kept_as_the_vms_uefi_store_and_put_back_at_its_path() {
    let h = Host::new("uefi-varstore");
    let path = h.nvram_dir.join("uefi_VARS.json");
    let vars = br#"{"version":2,"variables":[{"guid":"8be4df61-93ca-11d2-aa0d-00e098032b8c","name":"SecureBoot","attr":6,"data":"01"}]}"#;
    std::fs::write(&path, vars).unwrap();
    let domain = xml(&format!(
        "<varstore path='{}' template='/usr/share/edk2/ovmf/OVMF.qemuvars.json'/>",
        path.display()
    ));
    let (dir, m) = stop(&h, &domain);
    assert_eq!(std::fs::read(dir.join("nvram.fd")).unwrap(), vars);
    assert_eq!(m["nvram"]["kind"], "varstore");
    assert_eq!(m["nvram"]["path"], path.display().to_string());
    assert_eq!(
        m["nvram"]["template"],
        "/usr/share/edk2/ovmf/OVMF.qemuvars.json"
    );
    let nv = m["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "nvram.fd");
    assert_eq!(nv.unwrap()["role"], "nvram");
    let show = h.run(&["show", "uefi"], b"");
    assert!(
        String::from_utf8_lossy(&show.stdout)
            .contains(&format!("varstore {} (kept)", path.display())),
        "{}",
        String::from_utf8_lossy(&show.stdout)
    );
    assert_ok(&lose_and_start(&h, &domain, Some(&path)));
    assert_eq!(std::fs::read(&path).unwrap(), vars);
}

/// An NVRAM that is no file: the manifest and one log line per capture
/// say what it is; nothing is copied, and a restore never writes there.
fn not_copied(test: &str, nvram: &str, want: &str, at: &str) {
    let h = Host::new(test);
    let domain = xml(nvram);
    let (dir, m) = stop(&h, &domain);
    assert_eq!(m["nvram"]["not_copied"], want, "{m}");
    assert_eq!(m["nvram"]["path"], at);
    assert!(m["nvram"]["file"].is_null());
    assert!(!dir.join("nvram.fd").exists());
    let logs = h.logs();
    let said: Vec<&String> = logs.iter().filter(|l| l.contains("NOT copied")).collect();
    assert_eq!(said.len(), 1, "{logs:?}");
    assert!(
        said[0].contains(&format!("its NVRAM is a {want}, not a file")),
        "{}",
        said[0]
    );
    let show = h.run(&["show", "uefi"], b"");
    assert!(
        String::from_utf8_lossy(&show.stdout).contains(&format!("NVRAM not copied: {want}")),
        "{}",
        String::from_utf8_lossy(&show.stdout)
    );
    assert_ok(&lose_and_start(&h, &domain, None));
    assert!(
        h.state_dir(UUID).join("tpm2-00.permall").exists(),
        "the TPM is restored"
    );
}

#[test]
fn a_block_device_nvram_is_named_in_the_manifest_and_the_log_and_never_copied() {
    let dev = "<nvram type='block'><source dev='/dev/swk-test-no-such-dev'/></nvram>";
    not_copied(
        "uefi-block",
        dev,
        "block device /dev/swk-test-no-such-dev",
        "/dev/swk-test-no-such-dev",
    );
}

#[test]
fn a_network_nvram_is_named_in_the_manifest_and_the_log_and_never_copied() {
    let net = "<nvram type='network'><source protocol='iscsi' name='iqn.2013-07.com.example:iscsi-nopool/0'>\
               <host name='example.com' port='3260'/></source></nvram>";
    let want = "network image iscsi:iqn.2013-07.com.example:iscsi-nopool/0";
    not_copied(
        "uefi-network",
        net,
        want,
        "iscsi:iqn.2013-07.com.example:iscsi-nopool/0",
    );
}

#[test]
fn a_generation_of_another_uefi_store_kind_or_format_is_refused_and_nothing_written() {
    let h = Host::new("uefi-other");
    let fd = h.nvram_dir.join("uefi_VARS.fd");
    let raw = vec![5u8; 8192];
    std::fs::write(&fd, &raw).unwrap();
    let nvram_xml = xml(&format!("<nvram format='raw'>{}</nvram>", fd.display()));
    stop(&h, &nvram_xml);
    std::fs::remove_file(&fd).unwrap();
    // The VM now keeps its variables in a varstore, or in a qcow2 image.
    let json = h.nvram_dir.join("uefi_VARS.json");
    for (now, path) in [
        (format!("<varstore path='{}'/>", json.display()), &json),
        (
            format!("<nvram format='qcow2'>{}</nvram>", fd.display()),
            &fd,
        ),
    ] {
        let domain = xml(&now);
        let _ = std::fs::remove_dir_all(h.swtpm.join(UUID));
        let out = h.hook("uefi", "prepare", "begin", "-", &domain);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        let logs = h.logs().join("\n");
        assert!(
            err.contains("but the domain now has a varstore")
                || err.contains("holds a raw NVRAM, but the domain's is qcow2 now")
                || logs.contains("but the domain now has a varstore")
                || logs.contains("holds a raw NVRAM, but the domain's is qcow2 now"),
            "{now}: {err} {logs}"
        );
        assert!(!path.exists(), "{now}: nothing may be written there");
        assert!(!h.state_dir(UUID).join("tpm2-00.permall").exists(), "{now}");
    }
}

//! Stores written by swtpm-keeper 0.1.0 stay readable by every later
//! version: real 0.1.0 captures (tests/fixtures/store-0.1.0, a copy of
//! shared/fixtures/store-0.1.0) are verified, listed, shown and restored,
//! by the CLI and by the hook at `prepare`.

mod common;
use common::*;

const WIN11: &str = "7b630d45-19ba-4293-a757-82b65928a6f6"; // Win11 profile, NVRAM
const PLAIN: &str = "b4a5e001-0000-4000-8000-00000000b001"; // two generations
const ENCRYPTED: &str = "b4a5e001-0000-4000-8000-00000000b003";
const TPM12: &str = "b4a5e001-0000-4000-8000-00000000f002";
const UNICODE: &str = "c0ffee00-0000-4000-8000-000000000001"; // "swk probe ü 1"

fn text(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The only generation of `uuid`, or its newest.
fn newest(h: &Host, uuid: &str) -> std::path::PathBuf {
    h.vm_store(uuid).join(h.generations(uuid).last().unwrap())
}

/// The stored definition with its NVRAM moved into this host.
fn stored_xml_on_this_host(h: &Host, uuid: &str, file: &str) -> String {
    let x = std::fs::read_to_string(newest(h, uuid).join(file)).unwrap();
    x.replace("/var/lib/libvirt/qemu/nvram", h.nvram_dir.to_str().unwrap())
}

#[test]
fn a_0_1_0_store_verifies_every_generation() {
    let h = host_with_0_1_0_store("compat-verify");
    let out = h.run(&["verify"], b"");
    assert_ok(&out);
    let t = text(&out);
    for uuid in [WIN11, PLAIN, ENCRYPTED, TPM12, UNICODE] {
        assert!(
            t.contains(&format!("ok   {uuid}")),
            "{uuid} not verified:\n{t}"
        );
    }
    assert!(t.contains("6 generations verified, 0 bad, in 5 VMs"), "{t}");
}

#[test]
fn a_0_1_0_store_is_listed_and_shown_with_its_names() {
    let h = host_with_0_1_0_store("compat-list");
    let out = h.run(&["list"], b"");
    assert_ok(&out);
    let t = text(&out);
    for name in ["swkwin11", "barsB1", "barsB3", "barsP2", "swk probe ü 1"] {
        assert!(t.contains(name), "{name} missing from list:\n{t}");
    }
    let out = h.run(&["list", "--json"], b"");
    assert_ok(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["vms"].as_array().unwrap().len(), 5, "{v}");

    let out = h.run(&["show", "swk probe ü 1", "--json"], b"");
    assert_ok(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["uuid"], UNICODE, "{v}");
    let out = h.run(&["show", "barsP2"], b"");
    assert_ok(&out);
    assert!(text(&out).contains("1.2"), "{}", text(&out));
    let out = h.run(&["show", "swkwin11", "--xml"], b"");
    assert_ok(&out);
    assert_eq!(
        out.stdout,
        std::fs::read(newest(&h, WIN11).join("domain.xml")).unwrap()
    );
}

#[test]
fn the_cli_restores_each_kind_of_0_1_0_capture_byte_for_byte() {
    let h = host_with_0_1_0_store("compat-restore");
    // The Win11 VM is defined here, with its NVRAM under this host.
    std::fs::write(
        h.etc_qemu.join("swkwin11.xml"),
        stored_xml_on_this_host(&h, WIN11, "domain.xml"),
    )
    .unwrap();
    for (vm, uuid, dir, file) in [
        ("swkwin11", WIN11, "tpm2", "tpm2-00.permall"),
        ("barsB1", PLAIN, "tpm2", "tpm2-00.permall"),
        ("barsB3", ENCRYPTED, "tpm2", "tpm2-00.permall"),
        ("barsP2", TPM12, "tpm1.2", "tpm-00.permall"),
        ("swk probe ü 1", UNICODE, "tpm2", "tpm2-00.permall"),
    ] {
        let out = h.run(&["restore", vm], b"");
        assert_ok(&out);
        assert_eq!(
            std::fs::read(h.swtpm.join(uuid).join(dir).join(file)).unwrap(),
            std::fs::read(newest(&h, uuid).join(file)).unwrap(),
            "{vm}: restored state differs from the stored one"
        );
    }
    assert_eq!(
        std::fs::read(h.nvram_dir.join("swkwin11_VARS.fd")).unwrap(),
        std::fs::read(newest(&h, WIN11).join("nvram.fd")).unwrap(),
        "the Win11 NVRAM comes back with its TPM"
    );
}

#[test]
fn the_hook_restores_a_0_1_0_win11_capture_at_prepare() {
    let h = host_with_0_1_0_store("compat-prepare");
    let xml = stored_xml_on_this_host(&h, WIN11, "domain-live.xml");
    let out = h.hook("swkwin11", "prepare", "begin", "-", xml.as_bytes());
    assert_ok(&out);
    let g = newest(&h, WIN11);
    assert_eq!(
        std::fs::read(h.state_dir(WIN11).join("tpm2-00.permall")).unwrap(),
        std::fs::read(g.join("tpm2-00.permall")).unwrap()
    );
    assert_eq!(
        std::fs::read(h.nvram_dir.join("swkwin11_VARS.fd")).unwrap(),
        std::fs::read(g.join("nvram.fd")).unwrap()
    );
}

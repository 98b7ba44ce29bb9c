//! The operator's commands against fixture stores: output (golden JSON),
//! exit codes, damaged files, ambiguous names, locks held elsewhere, and
//! the safety of restore and prune.

mod common;

use common::*;
use std::path::Path;

use std::time::{Duration, Instant};

const A: &str = "aaaaaaaa-0000-4000-8000-00000000000a";
const B: &str = "bbbbbbbb-0000-4000-8000-00000000000b";
const C: &str = "cccccccc-0000-4000-8000-00000000000c";
const G1: &str = "00000001-20261101T000000Z";
const G2: &str = "00000002-20261102T000000Z";
const G3: &str = "00000003-20261103T000000Z";
const SECRET: &str = "0f0e0d0c-0b0a-4909-8807-060504030201";
const DAY1: i64 = 1_793_491_200; // 2026-11-01

/// Compare with tests/golden/NAME; `SWTPM_KEEPER_UPDATE_GOLDEN=1 cargo
/// test` rewrites the file instead (review the diff before committing).
fn assert_golden(name: &str, actual: &str) {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("SWTPM_KEEPER_UPDATE_GOLDEN").is_some() {
        std::fs::write(&p, actual).unwrap();
    }
    let want = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert_eq!(actual, want, "output differs from {}", p.display());
}

/// The output with this host's temp paths replaced by `@ROOT@`.
fn stdout(h: &Host, out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).replace(h.root.to_str().unwrap(), "@ROOT@")
}

/// A: "win11", encrypted, NVRAM, three generations, defined in libvirt.
/// B: "linux", two generations, migrated away at its newest.
/// C: also named "linux", one generation (an older VM of the same name).
fn fixture_store(test: &str) -> Host {
    let h = Host::with_config(
        test,
        &format!(
            "libvirt_run_dir = {:?}\n",
            std::env::temp_dir().join(format!("swk-{test}-{}-run", std::process::id()))
        ),
    );
    let plain = fixture("tpm2-00.permall.plain");
    let enc = fixture("tpm2-00.permall.encrypted");
    // The stored XML names libvirt's real NVRAM path (golden sizes stay
    // fixed); the definition libvirt has here names this host's.
    let stored_a = domain_xml(
        "win11",
        A,
        Some(SECRET),
        Some(Path::new("/var/lib/libvirt/qemu/nvram/win11_VARS.fd")),
    );
    let xml_a = domain_xml(
        "win11",
        A,
        Some(SECRET),
        Some(&h.nvram_dir.join("win11_VARS.fd")),
    );
    for (i, g) in [G1, G2, G3].iter().enumerate() {
        let mut p = enc.clone();
        p[100 + i] ^= 1; // distinct encrypted payloads, valid headers
        write_generation(
            &h,
            &FixtureGen {
                uuid: A,
                vm: "win11",
                generation: g,
                time_unix: DAY1 + i as i64 * 86_400,
                event: "stopped",
                reason: "-",
                secret: Some(SECRET),
                files: &[
                    ("tpm2-00.permall", "tpm", &p),
                    ("nvram.fd", "nvram", &vec![i as u8; 4096]),
                    ("domain.xml", "domain", stored_a.as_bytes()),
                    ("domain-live.xml", "domain-live", stored_a.as_bytes()),
                ],
            },
        );
    }
    std::fs::write(h.etc_qemu.join("win11.xml"), &xml_a).unwrap();
    let xml_b = domain_xml("linux", B, None, None);
    for (i, g) in [G1, G2].iter().enumerate() {
        let mut p = plain.clone();
        p[100] ^= i as u8;
        let reason = if i == 1 { "migrated" } else { "-" };
        write_generation(
            &h,
            &FixtureGen {
                uuid: B,
                vm: "linux",
                generation: g,
                time_unix: DAY1 + i as i64 * 86_400,
                event: "release",
                reason,
                secret: None,
                files: &[
                    ("tpm2-00.permall", "tpm", &p),
                    ("domain.xml", "domain", xml_b.as_bytes()),
                    ("domain-live.xml", "domain-live", xml_b.as_bytes()),
                ],
            },
        );
    }
    std::fs::write(
        h.vm_store(B).join("migrated-away.json"),
        format!(r#"{{"generation":"{G2}","time":"x","host":"host-a"}}"#),
    )
    .unwrap();
    let xml_c = domain_xml("linux", C, None, None);
    write_generation(
        &h,
        &FixtureGen {
            uuid: C,
            vm: "linux",
            generation: G1,
            time_unix: DAY1,
            event: "stopped",
            reason: "-",
            secret: None,
            files: &[
                ("tpm2-00.permall", "tpm", &plain),
                ("domain.xml", "domain", xml_c.as_bytes()),
                ("domain-live.xml", "domain-live", xml_c.as_bytes()),
            ],
        },
    );
    h
}

#[test]
fn list_json_matches_the_documented_schema() {
    let h = fixture_store("listjson");
    let out = h.run(&["list", "--json"], b"");
    assert_ok(&out);
    assert_golden("list.json", &stdout(&h, &out));
}

#[test]
fn list_prints_a_table_for_people() {
    let h = fixture_store("listtable");
    let out = h.run(&["list"], b"");
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&h, &out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("FLAGS"),
        "{text}"
    );
    assert!(
        lines[1].starts_with("win11")
            && lines[1].contains(A)
            && lines[1].contains("encrypted,nvram,defined"),
        "{text}"
    );
    assert!(
        lines[2].contains(B)
            && lines[2].contains("release (migrated)")
            && lines[2].ends_with("migrated"),
        "{text}"
    );
}

#[test]
fn an_empty_store_says_so() {
    let h = Host::new("listempty");
    let out = h.run(&["list"], b"");
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("holds no VM"));
    assert_eq!(
        h.run(&["list", "--json"], b"").stdout,
        b"{\n  \"version\": 1,\n  \"vms\": []\n}\n"
    );
}

#[test]
fn show_json_matches_the_documented_schema() {
    let h = fixture_store("showjson");
    let out = h.run(&["show", "win11", "--json"], b"");
    assert_ok(&out);
    assert_golden("show-win11.json", &stdout(&h, &out));
}

#[test]
fn show_lists_generations_newest_first_with_files_and_checksums() {
    let h = fixture_store("showtext");
    let out = h.run(&["show", A], b"");
    let text = stdout(&h, &out);
    let p3 = text.find(G3).unwrap();
    let p1 = text.find(G1).unwrap();
    assert!(p3 < p1, "{text}");
    assert!(
        text.contains("encrypted with secret 0f0e0d0c-0b0a-4909-8807-060504030201"),
        "{text}"
    );
    assert!(text.contains("defined in libvirt here: yes"), "{text}");
    let sums = std::fs::read_to_string(h.vm_store(A).join(G3).join("SHA256SUMS")).unwrap();
    let nv = sums.lines().find(|l| l.ends_with("nvram.fd")).unwrap();
    assert!(text.contains(&nv[..64]), "{text}");
    let out = h.run(&["show", B], b"");
    assert!(String::from_utf8_lossy(&out.stdout).contains("MIGRATED AWAY at generation"));
}

#[test]
fn show_xml_prints_the_stored_definition_for_virsh_define() {
    let h = fixture_store("showxml");
    let out = h.run(&["show", "win11", "--xml"], b"");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        out.stdout,
        domain_xml(
            "win11",
            A,
            Some(SECRET),
            Some(Path::new("/var/lib/libvirt/qemu/nvram/win11_VARS.fd"))
        )
        .into_bytes()
    );
    let out = h.run(&["show", "win11", "--xml", G1], b"");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        out.stdout,
        std::fs::read(h.vm_store(A).join(G1).join("domain.xml")).unwrap()
    );
    let out = h.run(&["show", "win11", "--xml=00000009-20261101T000000Z"], b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
}

#[test]
fn an_ambiguous_name_lists_the_candidates_and_an_unknown_one_says_so() {
    let h = fixture_store("ambiguous");
    let out = h.run(&["show", "linux"], b"");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("2 VMs in the store are named \"linux\"")
            && err.contains(B)
            && err.contains(C),
        "{err}"
    );
    let out = h.run(&["show", "nosuchvm"], b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no VM named \"nosuchvm\""));
    // A UUID always works, in any case.
    assert_eq!(
        h.run(&["show", &B.to_uppercase()], b"").status.code(),
        Some(0)
    );
}

#[test]
fn verify_passes_a_sound_store_and_names_every_damaged_generation() {
    let h = fixture_store("verify");
    let out = h.run(&["verify"], b"");
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&h, &out));
    assert!(stdout(&h, &out).ends_with("6 generations verified, 0 bad, in 3 VMs\n"));

    std::fs::write(h.vm_store(A).join(G2).join("nvram.fd"), b"tampered").unwrap();
    std::fs::remove_file(h.vm_store(B).join(G1).join("domain.xml")).unwrap();
    // One check alone, each pinned by its own test below.
    let mut bad = fixture("tpm2-00.permall.plain");
    bad[9] ^= 1;
    put_file_with_both_sums(&h.vm_store(C).join(G1), "tpm2-00.permall", &bad);

    let out = h.run(&["verify"], b"");
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&h, &out);
    assert!(
        text.contains(&format!("BAD  {A} {G2}: nvram.fd: checksum mismatch")),
        "{text}"
    );
    assert!(
        text.contains(&format!("BAD  {B} {G1}: domain.xml:")),
        "{text}"
    );
    assert!(
        text.contains(&format!("BAD  {C} {G1}: tpm2-00.permall: header says")),
        "{text}"
    );
    assert!(
        text.ends_with("3 generations verified, 3 bad, in 3 VMs\n"),
        "{text}"
    );
    // Only the named VM.
    let out = h.run(&["verify", "win11"], b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&h, &out).ends_with("2 generations verified, 1 bad, in 1 VMs\n"));
}

fn sha_hex(b: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// Set `name`'s line in `dir`/SHA256SUMS to `hex`.
fn set_sum(dir: &Path, name: &str, hex: &str) {
    let sums = std::fs::read_to_string(dir.join("SHA256SUMS")).unwrap();
    let mut found = false;
    let fixed: String = sums
        .lines()
        .map(|l| {
            if l.ends_with(&format!("  {name}")) {
                found = true;
                format!("{hex}  {name}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    assert!(found, "{name} is not in SHA256SUMS");
    std::fs::write(dir.join("SHA256SUMS"), fixed).unwrap();
}

/// Set `name`'s sha256 in `dir`/manifest.json to `hex`, and manifest.json's
/// own line in SHA256SUMS to the edited manifest's checksum.
fn set_manifest_sum(dir: &Path, name: &str, hex: &str) {
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let entry = m["files"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|f| f["name"] == name)
        .unwrap_or_else(|| panic!("{name} is not in manifest.json"));
    entry["sha256"] = serde_json::Value::from(hex);
    let bytes = serde_json::to_vec_pretty(&m).unwrap();
    std::fs::write(dir.join("manifest.json"), &bytes).unwrap();
    set_sum(dir, "manifest.json", &sha_hex(&bytes));
}

/// Replace a generation's file with `bytes` and update both sums for it:
/// the file's line in SHA256SUMS and its entry in manifest.json (and so
/// manifest.json's line). Only a check of the content itself can tell.
fn put_file_with_both_sums(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::write(dir.join(name), bytes).unwrap();
    let hex = sha_hex(bytes);
    set_sum(dir, name, &hex);
    set_manifest_sum(dir, name, &hex);
}

#[test]
fn verify_names_a_broken_swtpm_header_even_when_both_sums_were_updated() {
    let h = fixture_store("verifyheader");
    let mut bad = fixture("tpm2-00.permall.plain");
    bad[9] ^= 1; // the low byte of the header's total length
    let dir = h.vm_store(C).join(G1);
    put_file_with_both_sums(&dir, "tpm2-00.permall", &bad);
    assert!(
        sha256sum_check(&dir),
        "SHA256SUMS must agree with the files"
    );
    let out = h.run(&["verify", C], b"");
    let text = stdout(&h, &out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let want = format!(
        "BAD  {C} {G1}: tpm2-00.permall: header says {} bytes but the file has {}",
        bad.len() ^ 1,
        bad.len()
    );
    assert!(text.contains(&want), "want {want:?} in {text}");
}

#[test]
fn restore_never_puts_back_a_broken_swtpm_header_even_when_both_sums_were_updated() {
    let h = fixture_store("restoreheader");
    let mut bad = fixture("tpm2-00.permall.encrypted");
    bad[9] ^= 1;
    put_file_with_both_sums(&h.vm_store(A).join(G3), "tpm2-00.permall", &bad);
    let out = h.run(&["restore", "win11"], b"");
    assert_ok(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("from generation {G2}")));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!(
        "generation {G3} fails verification (tpm2-00.permall: header says"
    )));
    let restored = std::fs::read(h.state_dir(A).join("tpm2-00.permall")).unwrap();
    assert_ne!(restored, bad, "the broken state was restored");
    let out = h.run(&["restore", "win11", "--generation", G3, "--force"], b"");
    assert_eq!(
        out.status.code(),
        Some(1),
        "a broken header is never restored"
    );
}

#[test]
fn verify_names_a_manifest_that_disagrees_with_sha256sums() {
    let h = fixture_store("verifycross");
    let dir = h.vm_store(C).join(G1);
    // The file and its SHA256SUMS line are intact; only the manifest's
    // record of it differs (and manifest.json's own line is updated).
    set_manifest_sum(&dir, "domain.xml", &sha_hex(b"another definition"));
    assert!(
        sha256sum_check(&dir),
        "SHA256SUMS must agree with the files"
    );
    let out = h.run(&["verify", C], b"");
    let text = stdout(&h, &out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let want = format!("BAD  {C} {G1}: domain.xml: manifest and SHA256SUMS disagree");
    assert!(text.contains(&want), "want {want:?} in {text}");
}

#[test]
fn restore_puts_the_newest_good_generation_back_for_a_stopped_vm() {
    let h = fixture_store("clirestore");
    let out = h.run(&["restore", "win11"], b"");
    assert_ok(&out);
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains(&format!("restored TPM 2.0 state from generation {G3}")));
    assert_eq!(
        std::fs::read(h.state_dir(A).join("tpm2-00.permall")).unwrap(),
        std::fs::read(h.vm_store(A).join(G3).join("tpm2-00.permall")).unwrap()
    );
    assert_eq!(
        std::fs::read(h.nvram_dir.join("win11_VARS.fd")).unwrap(),
        vec![2u8; 4096]
    );
}

#[test]
fn restore_of_a_chosen_generation_refuses_to_replace_without_force_and_keeps_the_old_state_with_it()
{
    let h = fixture_store("cliforce");
    assert_eq!(h.run(&["restore", "win11"], b"").status.code(), Some(0));
    let existing = std::fs::read(h.state_dir(A).join("tpm2-00.permall")).unwrap();
    let mut live = existing.clone();
    live[150] ^= 0x55; // the VM ran since: its state differs from every generation
    std::fs::write(h.state_dir(A).join("tpm2-00.permall"), &live).unwrap();

    let out = h.run(&["restore", "win11", "--generation", G1], b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("restoring would replace it. Add --force")
    );
    assert_eq!(
        std::fs::read(h.state_dir(A).join("tpm2-00.permall")).unwrap(),
        live
    );

    let out = h.run(&["restore", "win11", "--generation", G1, "--force"], b"");
    assert_ok(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("captured first as generation 00000004-"));
    assert_eq!(
        std::fs::read(h.state_dir(A).join("tpm2-00.permall")).unwrap(),
        std::fs::read(h.vm_store(A).join(G1).join("tpm2-00.permall")).unwrap()
    );
    // Nothing lost: the replaced state is the new generation 4, and 1-3 remain.
    let gens = h.generations(A);
    assert_eq!(gens.len(), 4, "{gens:?}");
    assert_eq!(
        std::fs::read(h.vm_store(A).join(&gens[3]).join("tpm2-00.permall")).unwrap(),
        live
    );
    assert_eq!(
        std::fs::read(h.nvram_dir.join("win11_VARS.fd")).unwrap(),
        vec![0u8; 4096],
        "NVRAM restored with its TPM"
    );
}

#[test]
fn restore_force_never_replaces_an_nvram_it_did_not_capture_first() {
    let h = fixture_store("clinvramkeep");
    // No TPM state, but the VM's UEFI vars exist (say, firmware ran with a
    // new TPM): with nothing to capture them with, --force must keep them.
    std::fs::create_dir_all(&h.nvram_dir).unwrap();
    let vars = h.nvram_dir.join("win11_VARS.fd");
    std::fs::write(&vars, vec![7u8; 4096]).unwrap();
    let out = h.run(&["restore", "win11", "--generation", G1, "--force"], b"");
    assert_ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("exists and was kept"), "{text}");
    assert_eq!(std::fs::read(&vars).unwrap(), vec![7u8; 4096]);
    assert_eq!(
        std::fs::read(h.state_dir(A).join("tpm2-00.permall")).unwrap(),
        std::fs::read(h.vm_store(A).join(G1).join("tpm2-00.permall")).unwrap()
    );
    assert_eq!(h.generations(A).len(), 3, "nothing was captured");
}

#[test]
fn restore_refuses_a_running_vm_and_a_live_swtpm() {
    let h = fixture_store("clirunning");
    let run_dir = std::env::temp_dir().join(format!("swk-clirunning-{}-run", std::process::id()));
    std::fs::create_dir_all(&run_dir).unwrap();
    std::fs::write(run_dir.join("win11.pid"), std::process::id().to_string()).unwrap();
    let out = h.run(&["restore", "win11"], b"");
    std::fs::remove_dir_all(&run_dir).unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is running"));
    assert!(!h.state_dir(A).exists());

    // An empty state dir whose .lock a swtpm holds.
    let d = h.put_state(A, &[(".lock", b"")]);
    let holder = FcntlHolder::hold(&d.join(".lock"));
    let out = h.run(&["restore", "win11"], b"");
    drop(holder);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("a swtpm (pid"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!d.join("tpm2-00.permall").exists());
}

#[test]
fn restore_overrides_the_hooks_refusals_only_with_force() {
    let h = fixture_store("clioverride");
    let out = h.run(&["restore", B], b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("migrated to another host"));
    assert!(!h.state_dir(B).exists());
    let out = h.run(&["restore", B, "--force"], b"");
    assert_ok(&out);
    assert!(h.state_dir(B).join("tpm2-00.permall").exists());
    // Not defined here: it says how to define it again.
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("swtpm-keeper show {B} --xml")));
}

#[test]
fn restore_falls_back_past_a_damaged_newest_generation() {
    let h = fixture_store("clifallback");
    std::fs::write(h.vm_store(A).join(G3).join("tpm2-00.permall"), b"x").unwrap();
    let out = h.run(&["restore", "win11"], b"");
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("from generation {G2}")));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains(&format!("generation {G3} fails verification")));
    let out = h.run(&["restore", "win11", "--generation", G3, "--force"], b"");
    assert_eq!(
        out.status.code(),
        Some(1),
        "a damaged generation is never restored"
    );
}

#[test]
fn prune_keeps_each_vms_newest_good_generation_and_removes_it_only_by_name() {
    let h = fixture_store("prune");
    let out = h.run(&["prune", "--keep", "0", "--dry-run"], b"");
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&h, &out);
    for (vm, g) in [(A, G3), (B, G2), (C, G1)] {
        assert!(
            text.contains(&format!("kept {vm} {g} ")),
            "{vm} {g}: {text}"
        );
    }
    assert!(text.ends_with("would remove 3 generations\n"), "{text}");
    assert_eq!(
        h.generations(A).len() + h.generations(B).len() + h.generations(C).len(),
        6,
        "dry run removed something"
    );

    let out = h.run(&["prune", "--keep", "1"], b"");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(h.generations(A), [G3]);
    assert_eq!(h.generations(B), [G2]);
    assert_eq!(h.generations(C), [G1]);
    assert!(!std::fs::read_dir(h.vm_store(A)).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with(".trash")));

    // Older than: every VM keeps its newest good generation, defined or not.
    let out = h.run(&["prune", "--older-than", "1"], b"");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(h.generations(A), [G3]);
    assert_eq!(h.generations(C), [G1]);
    // Naming the VM is not enough; naming the generation is.
    assert_ok(&h.run(&["prune", "--keep", "0", "--vm", "win11"], b""));
    assert_eq!(h.generations(A), [G3]);
    assert_ok(&h.run(&["prune", "--vm", "win11", "--generation", G3], b""));
    assert!(h.generations(A).is_empty());
}

#[test]
fn commands_wait_for_a_vm_lock_held_elsewhere_until_the_deadline() {
    let h = fixture_store("clilock"); // lock_timeout = 1.0
    let f = std::fs::File::open(h.vm_store(A).join(".lock")).unwrap();
    assert!(swtpm_keeper::lock::try_flock(&f, true).unwrap());
    let t = Instant::now();
    let out = h.run(&["restore", "win11"], b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("gave up after 1.0 s waiting for the lock")
    );
    // It waited the whole deadline (lock_timeout = 1.0), and not forever.
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_secs(1),
        "gave up early: {waited:?}"
    );
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    let out = h.run(&["list"], b"");
    assert_eq!(
        out.status.code(),
        Some(1),
        "a VM that could not be read is a problem"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(B),
        "the other VMs are still listed"
    );
    drop(f);
    // Readers share: a held shared lock does not stop list.
    let f = std::fs::File::open(h.vm_store(A).join(".lock")).unwrap();
    assert!(swtpm_keeper::lock::try_flock(&f, false).unwrap());
    assert_eq!(h.run(&["list"], b"").status.code(), Some(0));
}

#[test]
fn check_reports_each_item_as_ok_or_fix() {
    let base = std::env::temp_dir().join(format!("swk-check-{}", std::process::id()));
    let h = Host::with_config(
        "check",
        &format!(
            "libvirt_hooks_dir = {:?}\nqemu_conf = {:?}\n",
            base.join("hooks"),
            base.join("qemu.conf")
        ),
    );
    let hooks = h.root.join("hooks");
    std::fs::create_dir_all(hooks.join("qemu.d")).unwrap();
    std::fs::write(
        h.root.join("qemu.conf"),
        "swtpm_user = \"no-such-user-x\"\n",
    )
    .unwrap();
    let out = h.run(&["check"], b"");
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("FIX  no hook in"), "{text}");
    assert!(
        text.contains("FIX  swtpm_user = \"no-such-user-x\""),
        "{text}"
    );
    assert!(text.contains("ok   syslog listens at"), "{text}");

    std::os::unix::fs::symlink(bin(), hooks.join("qemu.d/swtpm-keeper")).unwrap();
    std::fs::write(h.root.join("qemu.conf"), "").unwrap();
    std::fs::create_dir_all(&h.store).unwrap();
    std::fs::set_permissions(
        &h.store,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let out = h.run(&["check"], b"");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("ok   hook") && text.contains("qemu.d/swtpm-keeper runs"),
        "{text}"
    );
    assert!(
        text.contains("FIX  store") && text.contains("chmod 0700"),
        "{text}"
    );
    std::fs::set_permissions(
        &h.store,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let out = h.run(&["check"], b"");
    // The store must be root's: only root can make everything pass.
    // SAFETY: no preconditions.
    let want = if unsafe { libc::geteuid() } == 0 {
        0
    } else {
        1
    };
    assert_eq!(
        out.status.code(),
        Some(want),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn every_command_answers_help_and_bad_usage_exits_2() {
    let h = Host::new("clihelp");
    for c in [
        "list", "show", "verify", "restore", "prune", "check", "hook",
    ] {
        let out = h.run(&[c, "--help"], b"");
        assert_eq!(out.status.code(), Some(0), "{c}");
        assert!(
            String::from_utf8_lossy(&out.stdout).starts_with(&format!("swtpm-keeper {c}")),
            "{c}"
        );
    }
    for bad in [
        &["prune"][..],
        &["restore"],
        &["show", "a", "b"],
        &["list", "--frob"],
    ] {
        let out = h.run(bad, b"");
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("--help"),
            "{bad:?}"
        );
    }
    std::fs::write(&h.conf, "generations = 0\n").unwrap();
    let out = h.run(&["list"], b"");
    assert_eq!(
        out.status.code(),
        Some(2),
        "an invalid configuration is exit 2"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("`generations`"));
}

#[test]
fn config_flag_names_the_file_and_wins_over_the_environment() {
    let full = fixture_store("cfgfull");
    let empty = Host::new("cfgempty");
    let conf = full.conf.to_str().unwrap();
    // The environment names the empty store; --config, before or after the
    // command, names the full one and wins.
    for args in [&["--config", conf, "list"][..], &["list", "--config", conf]] {
        let out = empty.run(args, b"");
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("win11"),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let out = empty.run(&["check", "--config", conf], b"");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("configuration {conf} is valid")),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // A named file that does not exist is an error, not the defaults.
    let missing = empty.root.join("no-such.conf");
    let out = empty.run(&["--config", missing.to_str().unwrap(), "list"], b"");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no-such.conf") && err.contains("does not exist"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
    // Nor does a dangling link, nor for `check`.
    let dangling = empty.root.join("dangling.conf");
    std::os::unix::fs::symlink(&missing, &dangling).unwrap();
    for args in [
        &["--config", dangling.to_str().unwrap(), "list"][..],
        &["check", "--config", missing.to_str().unwrap()],
    ] {
        let out = empty.run(args, b"");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

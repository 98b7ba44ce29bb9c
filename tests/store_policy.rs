//! What the store trusts and keeps: "unchanged" only against a generation
//! that verifies, only swtpm's own files and within a size bound, prune
//! rules that never leave a VM without a good state, and the state a
//! refused restore left behind kept from retention.

mod common;

use common::*;

const DAY: i64 = 86_400;

/// The real plain TPM 2.0 permall, made distinct by `i` (a byte inside
/// its data: the header, the TLVs and the magic numbers stay valid).
fn permall(i: u8) -> Vec<u8> {
    let mut p = fixture("tpm2-00.permall.plain");
    p[100] ^= i;
    p
}

fn xml() -> Vec<u8> {
    fixture("tpm2-transient.stopped.xml")
}

/// Make `bytes` libvirt's current TPM state of the transient VM.
fn live_state(h: &Host, bytes: &[u8]) {
    h.put_state(UUID_TRANS, &[("tpm2-00.permall", bytes)]);
}

fn hook(h: &Host, op: &str, sub: &str, extra: &str) -> std::process::Output {
    let out = h.hook("tpmtrans", op, sub, extra, &xml());
    assert_ok(&out);
    out
}

fn stored_permall(h: &Host, uuid: &str, generation: &str) -> Vec<u8> {
    std::fs::read(h.vm_store(uuid).join(generation).join("tpm2-00.permall")).unwrap()
}

fn damage(h: &Host, uuid: &str, generation: &str) {
    let p = h.vm_store(uuid).join(generation).join("tpm2-00.permall");
    let mut b = std::fs::read(&p).unwrap();
    b[200] ^= 0xff; // the manifest stays intact; the checksum no longer matches
    std::fs::write(p, b).unwrap();
}

fn has_line(logs: &[String], words: &[&str]) -> bool {
    logs.iter().any(|l| words.iter().all(|w| l.contains(w)))
}

// ---- hole 2: "unchanged" only against a generation that verifies ----

#[test]
fn a_damaged_newest_generation_is_no_copy_so_the_same_state_is_stored_again_and_restored() {
    let h = Host::new("sp-damaged-newest");
    live_state(&h, &permall(1));
    hook(&h, "stopped", "end", "-");
    live_state(&h, &permall(2));
    hook(&h, "stopped", "end", "-");
    let gens = h.generations(UUID_TRANS);
    assert_eq!(gens.len(), 2, "{gens:?}");
    damage(&h, UUID_TRANS, &gens[1]);
    h.logs();

    // The live state is what the damaged generation should hold.
    hook(&h, "release", "end", "destroyed");
    let after = h.generations(UUID_TRANS);
    assert_eq!(after.len(), 3, "the state was not stored again: {after:?}");
    let g3 = &after[2];
    assert_eq!(stored_permall(&h, UUID_TRANS, g3), permall(2));
    assert!(sha256sum_check(&h.vm_store(UUID_TRANS).join(g3)));
    let logs = h.logs();
    assert!(
        has_line(&logs, &[&gens[1], "fails verification", "stored again"]),
        "{logs:?}"
    );
    assert!(has_line(&logs, &["captured", g3]), "{logs:?}");

    // Lost later: the good copy of that state comes back, not the older one.
    std::fs::remove_dir_all(h.state_dir(UUID_TRANS)).unwrap();
    hook(&h, "prepare", "begin", "-");
    let back = std::fs::read(h.state_dir(UUID_TRANS).join("tpm2-00.permall")).unwrap();
    assert_eq!(back, permall(2), "an older, stale state was restored");
}

#[test]
fn restore_force_captures_the_existing_state_when_its_only_stored_copy_is_damaged() {
    let run_dir = std::env::temp_dir().join(format!("swk-sp-force-{}-run", std::process::id()));
    let h = Host::with_config("sp-force", &format!("libvirt_run_dir = {run_dir:?}\n"));
    live_state(&h, &permall(1));
    hook(&h, "stopped", "end", "-");
    live_state(&h, &permall(2));
    hook(&h, "stopped", "end", "-");
    let gens = h.generations(UUID_TRANS);
    damage(&h, UUID_TRANS, &gens[1]);

    let out = h.run(
        &["restore", "tpmtrans", "--generation", &gens[0], "--force"],
        b"",
    );
    assert_ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    let after = h.generations(UUID_TRANS);
    assert_eq!(after.len(), 3, "{text}");
    assert!(
        text.contains(&format!("captured first as generation {}", after[2])),
        "{text}"
    );
    assert_eq!(stored_permall(&h, UUID_TRANS, &after[2]), permall(2));
    assert!(sha256sum_check(&h.vm_store(UUID_TRANS).join(&after[2])));
    let live = std::fs::read(h.state_dir(UUID_TRANS).join("tpm2-00.permall")).unwrap();
    assert_eq!(live, permall(1));
}

#[test]
fn restore_force_adds_nothing_when_the_newest_good_generation_holds_the_existing_state() {
    let run_dir = std::env::temp_dir().join(format!("swk-sp-same-{}-run", std::process::id()));
    let h = Host::with_config("sp-same", &format!("libvirt_run_dir = {run_dir:?}\n"));
    live_state(&h, &permall(1));
    hook(&h, "stopped", "end", "-");
    live_state(&h, &permall(2));
    hook(&h, "stopped", "end", "-");
    let gens = h.generations(UUID_TRANS);
    let out = h.run(
        &["restore", "tpmtrans", "--generation", &gens[0], "--force"],
        b"",
    );
    assert_ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("already stored as generation {}", gens[1])),
        "{text}"
    );
    assert_eq!(h.generations(UUID_TRANS), gens);
}

// ---- hole 4: only swtpm's files, and a bound per generation ----

#[test]
fn files_that_swtpm_never_writes_are_not_stored_whatever_their_header() {
    let h = Host::new("sp-planted");
    let evil = permall(3); // a plausible swtpm blob
    h.put_state(
        UUID_TRANS,
        &[
            ("tpm2-00.permall", &permall(1)),
            ("tpm2-00.evil", &evil),
            ("tpm2-00.permallx", &evil),
            ("tpm2-00.permall.bak", &evil),
            ("tpm-00.permall", &evil),
        ],
    );
    hook(&h, "stopped", "end", "-");
    let gens = h.generations(UUID_TRANS);
    assert_eq!(gens.len(), 1);
    let names = dir_names(&h.vm_store(UUID_TRANS).join(&gens[0]));
    assert_eq!(
        names,
        [
            "SHA256SUMS",
            "domain-live.xml",
            "domain.xml",
            "manifest.json",
            "tpm2-00.permall"
        ]
    );
}

#[test]
fn a_capture_over_max_generation_size_is_refused_and_the_store_keeps_what_it_had() {
    // Room for the permall and the two XMLs, not for a second state file.
    let bound = permall(1).len() + 2 * xml().len() + 1000;
    let h = Host::with_config("sp-bound", &format!("max_generation_size = {bound}\n"));
    live_state(&h, &permall(1));
    hook(&h, "stopped", "end", "-");
    let before = h.generations(UUID_TRANS);
    assert_eq!(before.len(), 1);
    h.logs();

    // A state file that `tss` filled: refused before it is read.
    h.put_state(
        UUID_TRANS,
        &[
            ("tpm2-00.permall", &permall(2)),
            ("tpm2-00.volatilestate", &vec![0x5a; 2 * bound]),
        ],
    );
    hook(&h, "stopped", "end", "-");
    assert_eq!(h.generations(UUID_TRANS), before);
    assert!(sha256sum_check(&h.vm_store(UUID_TRANS).join(&before[0])));
    let logs = h.logs();
    assert!(
        has_line(
            &logs,
            &[
                "NOT captured",
                "tpm2-00.volatilestate",
                "max_generation_size",
                "keeps what it had"
            ]
        ),
        "{logs:?}"
    );
    let leftovers = h.store_entries(UUID_TRANS, ".tmp").len();
    assert_eq!(leftovers, 0);
}

/// A well-formed swtpm blob of `len` bytes (header, one data TLV).
fn blob(len: usize) -> Vec<u8> {
    let mut b = vec![2u8, 1, 0, 10, 0, 0];
    b.extend_from_slice(&(len as u32).to_be_bytes());
    b.extend_from_slice(&1u16.to_be_bytes());
    b.extend_from_slice(&((len - 16) as u32).to_be_bytes());
    b.resize(len, 0);
    b
}

#[test]
fn by_default_a_generation_is_bounded_by_three_times_max_file_size() {
    let h = Host::with_config("sp-bound-default", "max_file_size = 8192\n");
    // Each file is within max_file_size; together with the XMLs they are
    // over 3 x 8192 bytes.
    h.put_state(
        UUID_TRANS,
        &[
            ("tpm2-00.permall", &permall(1)),
            ("tpm2-00.savestate", &blob(8000)),
            ("tpm2-00.volatilestate", &blob(8000)),
        ],
    );
    hook(&h, "stopped", "end", "-");
    assert_eq!(h.generations(UUID_TRANS), Vec::<String>::new());
    let logs = h.logs();
    assert!(
        has_line(
            &logs,
            &["NOT captured", "max_generation_size (24576 bytes)"]
        ),
        "{logs:?}"
    );
    // Without the extra file it fits.
    std::fs::remove_file(h.state_dir(UUID_TRANS).join("tpm2-00.savestate")).unwrap();
    hook(&h, "stopped", "end", "-");
    assert_eq!(h.generations(UUID_TRANS).len(), 1);
}

// ---- hole 5: prune never leaves a VM without a good state ----

const A: &str = "aaaaaaaa-0000-4000-8000-00000000000a";
const B: &str = "bbbbbbbb-0000-4000-8000-00000000000b";
const C: &str = "cccccccc-0000-4000-8000-00000000000c";

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Generations of `uuid` captured at these times, in this (sequence) order.
fn gens_at(h: &Host, uuid: &str, times: &[i64]) -> Vec<String> {
    let mut names = Vec::new();
    for (i, t) in times.iter().enumerate() {
        let g = format!("{:08}-{}", i + 1, swtpm_keeper::manifest::compact_time(*t));
        let p = permall(i as u8 + 1);
        write_generation(
            h,
            &FixtureGen {
                uuid,
                vm: "vm",
                generation: &g,
                time_unix: *t,
                event: "stopped",
                reason: "-",
                secret: None,
                files: &[("tpm2-00.permall", "tpm", &p)],
            },
        );
        names.push(g);
    }
    names
}

#[test]
fn prune_keep_never_removes_the_newest_generation_that_verifies() {
    let h = Host::new("sp-keep-good");
    let t = now() - 10 * DAY;
    let g = gens_at(&h, A, &[t, t + DAY, t + 2 * DAY]);
    damage(&h, A, &g[2]);
    // B: nothing verifies, so no rule may pick what to lose.
    let b = gens_at(&h, B, &[t, t + DAY]);
    damage(&h, B, &b[0]);
    damage(&h, B, &b[1]);
    let out = h.run(&["prune", "--keep", "1"], b"");
    assert_ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(h.generations(A), [g[1].clone(), g[2].clone()], "{text}");
    assert!(sha256sum_check(&h.vm_store(A).join(&g[1])));
    assert!(
        text.contains(&format!(
            "kept {A} {} vm: the newest generation that verifies",
            g[1]
        )),
        "{text}"
    );
    assert_eq!(h.generations(B), b, "{text}");
    assert!(
        text.contains(&format!(
            "kept {B} {} vm: no generation of this VM verifies",
            b[0]
        )),
        "{text}"
    );
    // Not even with --keep 0, or the VM named.
    assert_ok(&h.run(&["prune", "--keep", "0", "--vm", A], b""));
    assert!(h.generations(A).contains(&g[1]));
}

#[test]
fn prune_older_than_ages_by_sequence_so_a_clock_that_stepped_back_removes_nothing_newer() {
    let h = Host::new("sp-clock");
    let n = now();
    // A: captured while the clock was a year ahead, then after it stepped
    // back: the newest looks old.
    let a = gens_at(&h, A, &[n + 365 * DAY, n - 40 * DAY]);
    // B: an old-looking generation between two recent ones.
    let b = gens_at(&h, B, &[n - DAY, n - 40 * DAY, n]);
    // C: ordinary aging still removes the old ones.
    let c = gens_at(&h, C, &[n - 50 * DAY, n - 40 * DAY, n]);
    let out = h.run(&["prune", "--older-than", "30"], b"");
    assert_ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(h.generations(A), a, "{text}");
    assert_eq!(h.generations(B), b, "{text}");
    assert_eq!(h.generations(C), [c[2].clone()], "{text}");
}

#[test]
fn prune_by_name_removes_exactly_the_named_generation_even_the_newest_good_one() {
    let h = Host::new("sp-by-name");
    let t = now();
    let g = gens_at(&h, A, &[t - DAY, t]);
    let out = h.run(
        &["prune", "--vm", A, "--generation", &g[1], "--dry-run"],
        b"",
    );
    assert_ok(&out);
    assert_eq!(h.generations(A), g);
    assert_ok(&h.run(&["prune", "--vm", A, "--generation", &g[1]], b""));
    assert_eq!(h.generations(A), [g[0].clone()]);
    let out = h.run(
        &[
            "prune",
            "--vm",
            A,
            "--generation",
            "00000009-20261101T000000Z",
        ],
        b"",
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(h.generations(A), [g[0].clone()]);
    let out = h.run(&["prune", "--generation", &g[0]], b"");
    assert_eq!(out.status.code(), Some(2), "--generation needs --vm");
}

// ---- hole 8: a new TPM never pushes the refused original out ----

#[test]
fn a_refused_original_stays_protected_while_the_vm_runs_with_a_new_tpm() {
    let h = Host::with_config("sp-protect", "on_refusal = \"continue\"\n"); // generations = 3
    live_state(&h, &permall(1));
    hook(&h, "release", "end", "migrated");
    let original = h.generations(UUID_TRANS)[0].clone();
    std::fs::remove_dir_all(h.state_dir(UUID_TRANS)).unwrap();
    h.logs();
    // The original is refused (taken when the VM migrated away); libvirt
    // starts the VM with a new TPM.
    hook(&h, "prepare", "begin", "-");
    assert!(!h.state_dir(UUID_TRANS).join("tpm2-00.permall").exists());
    let logs = h.logs();
    assert!(
        has_line(
            &logs,
            &[
                &original,
                "kept until an operator removes it",
                "--generation"
            ]
        ),
        "{logs:?}"
    );
    // generations + 2 stops with the new TPM.
    for i in 0..5u8 {
        live_state(&h, &permall(10 + i));
        hook(&h, "stopped", "end", "-");
    }
    let gens = h.generations(UUID_TRANS);
    assert_eq!(gens.len(), 4, "the original and the newest 3: {gens:?}");
    assert_eq!(gens[0], original, "the refused original was pruned");
    assert!(sha256sum_check(&h.vm_store(UUID_TRANS).join(&original)));
    assert_eq!(stored_permall(&h, UUID_TRANS, &original), permall(1));
    assert_ok(&h.run(&["verify", UUID_TRANS], b""));

    let out = h.run(&["show", UUID_TRANS], b"");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("PROTECTED: a restore of it was refused"),
        "{text}"
    );
    assert!(
        text.contains(&format!("prune --vm {UUID_TRANS} --generation {original}")),
        "{text}"
    );
    let out = h.run(&["show", UUID_TRANS, "--json"], b"");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let oldest = &doc["generations"][3];
    assert_eq!(oldest["generation"], original.as_str());
    assert_eq!(oldest["protected"]["generation"], original.as_str());
    assert!(oldest["protected"]["why"]
        .as_str()
        .unwrap()
        .contains("migrated"));
    assert!(doc["generations"][0]["protected"].is_null());
    let out = h.run(&["list"], b"");
    assert!(String::from_utf8_lossy(&out.stdout).contains("protected"));

    // Rules keep it; naming it removes it, and its record.
    assert_ok(&h.run(&["prune", "--keep", "1"], b""));
    assert!(h.generations(UUID_TRANS).contains(&original));
    assert_ok(&h.run(
        &["prune", "--vm", UUID_TRANS, "--generation", &original],
        b"",
    ));
    assert!(!h.generations(UUID_TRANS).contains(&original));
    assert!(!h.vm_store(UUID_TRANS).join("protected.json").exists());
}

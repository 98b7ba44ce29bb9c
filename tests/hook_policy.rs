//! The marks that decide what a later start on this host does (an
//! incoming migration or restore, a migration away), and libvirt's hook
//! arguments taken as they come, whatever they look like.

mod common;

use common::*;
use std::path::PathBuf;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

/// The transient fixture VM (tpmtrans) stopped once: its state is stored.
fn captured(h: &Host) -> Vec<u8> {
    let permall = fixture("tpm2-00.permall.plain");
    h.put_state(UUID_TRANS, &[("tpm2-00.permall", &permall)]);
    assert_ok(&h.stop_transient());
    assert_eq!(h.generations(UUID_TRANS).len(), 1);
    permall
}

fn xml() -> Vec<u8> {
    fixture("tpm2-transient.stopped.xml")
}

fn hook(h: &Host, op: &str, sub: &str, extra: &str) {
    assert_ok(&h.hook("tpmtrans", op, sub, extra, &xml()));
}

/// What libvirt leaves of a transient VM after its stop: no state.
fn lose_state(h: &Host) {
    std::fs::remove_dir_all(h.swtpm.join(UUID_TRANS)).unwrap();
}

fn restored(h: &Host) -> bool {
    h.state_dir(UUID_TRANS).join("tpm2-00.permall").exists()
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The incoming marks in the VM's store (`incoming-<host>.json`).
fn incoming_marks(h: &Host) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(h.vm_store(UUID_TRANS))
        .map(|rd| {
            rd.map(|e| e.unwrap().path())
                .filter(|p| {
                    let n = p.file_name().unwrap().to_string_lossy();
                    n.starts_with("incoming-") && n.ends_with(".json")
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The one mark this host wrote at `migrate begin`, made `age` seconds old.
fn age_this_hosts_mark(h: &Host, age: i64) {
    let marks = incoming_marks(h);
    assert_eq!(marks.len(), 1, "{marks:?}");
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&marks[0]).unwrap()).unwrap();
    m["time_unix"] = serde_json::json!(now() - age);
    std::fs::write(&marks[0], serde_json::to_vec(&m).unwrap()).unwrap();
}

#[test]
fn a_failed_incoming_migration_does_not_block_the_next_restore() {
    let h = Host::new("failedincoming");
    let permall = captured(&h);
    lose_state(&h);
    // The incoming migration fails after its migrate hook: libvirt stops
    // the half-started VM (stopped, then release with reason `failed`).
    hook(&h, "migrate", "begin", "-");
    hook(&h, "stopped", "end", "-");
    hook(&h, "release", "end", "failed");
    h.logs();

    hook(&h, "prepare", "begin", "-");
    assert!(
        restored(&h),
        "a plain start after it restores: {:?}",
        h.logs()
    );
    assert_eq!(
        std::fs::read(h.state_dir(UUID_TRANS).join("tpm2-00.permall")).unwrap(),
        permall
    );
}

#[test]
fn an_incoming_mark_older_than_the_window_does_not_block_a_restore() {
    let h = Host::new("oldincoming");
    captured(&h);
    lose_state(&h);
    // An offline migration runs the migrate hook and no prepare, no stop.
    hook(&h, "migrate", "begin", "-");
    age_this_hosts_mark(&h, 120);
    h.logs();
    hook(&h, "prepare", "begin", "-");
    assert!(
        restored(&h),
        "a 2-minute-old mark still blocked the restore"
    );
    assert!(incoming_marks(&h).is_empty(), "the prepare used it up");
    let logs = h.logs();
    assert!(
        // 120 s, or a second more on a loaded machine.
        logs.iter()
            .any(|l| l.contains("the incoming migrate noted 12")
                && l.contains(" s ago had no prepare within")),
        "{logs:?}"
    );
}

#[test]
fn an_incoming_mark_a_few_seconds_old_keeps_the_restore_away() {
    let h = Host::new("recentincoming");
    captured(&h);
    lose_state(&h);
    hook(&h, "migrate", "begin", "-");
    age_this_hosts_mark(&h, 10);
    h.logs();
    hook(&h, "prepare", "begin", "-");
    assert!(!restored(&h), "restored over an incoming state");
    let logs = h.logs();
    assert!(
        // 10 s, or a second more on a loaded machine.
        logs.iter()
            .any(|l| l.contains("arrives with the incoming migrate (noted 1")
                && l.contains(" s ago)")),
        "{logs:?}"
    );
}

#[test]
fn the_prepare_of_an_incoming_operation_restores_nothing_and_uses_up_the_mark() {
    let h = Host::new("incomingprepare");
    captured(&h);
    lose_state(&h);
    for op in ["migrate", "restore"] {
        hook(&h, op, "begin", "-");
        assert_eq!(incoming_marks(&h).len(), 1, "{op}");
        hook(&h, "prepare", "begin", "-");
        assert!(!restored(&h), "{op}: restored over an incoming state");
        assert!(incoming_marks(&h).is_empty(), "{op}: the mark is left");
    }
    hook(&h, "prepare", "begin", "-");
    assert!(restored(&h), "the next plain start restores");
}

#[test]
fn a_stop_clears_only_this_hosts_incoming_mark() {
    let h = Host::new("clearmark");
    captured(&h);
    // On a shared store, another host's mark is for that host's prepare.
    let other = h.vm_store(UUID_TRANS).join("incoming-some-other-host.json");
    let text = format!(r#"{{"event":"migrate","time_unix":{}}}"#, now());
    std::fs::write(&other, &text).unwrap();
    hook(&h, "migrate", "begin", "-");
    assert_eq!(incoming_marks(&h).len(), 2);
    hook(&h, "stopped", "end", "-");
    assert_eq!(incoming_marks(&h), std::slice::from_ref(&other));
    assert_eq!(std::fs::read_to_string(&other).unwrap(), text);
    assert!(
        h.logs()
            .iter()
            .any(|l| l.contains("cleared this host's incoming mark")),
        "the clearing is logged"
    );
}

#[test]
fn an_incoming_operation_for_a_vm_the_store_does_not_hold_writes_nothing() {
    let h = Host::new("incomingunknown");
    hook(&h, "migrate", "begin", "-");
    assert!(
        !h.store.exists(),
        "nothing could be restored, nothing noted"
    );
    assert!(h.logs().is_empty());
}

fn migrated_mark(h: &Host) -> Option<serde_json::Value> {
    let p = h.vm_store(UUID_TRANS).join("migrated-away.json");
    std::fs::read(p)
        .ok()
        .map(|b| serde_json::from_slice(&b).unwrap())
}

/// The start is refused because the stored copy went stale.
fn assert_refused_as_migrated(h: &Host) {
    lose_state(h);
    let out = h.hook("tpmtrans", "prepare", "begin", "-", &xml());
    assert_eq!(out.status.code(), Some(1), "the stale copy was restored");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("migrated to another host"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!restored(h));
}

#[test]
fn a_migrated_release_with_the_state_gone_still_marks_the_newest_generation() {
    let h = Host::new("migratedgone");
    captured(&h);
    // The stop captured the state; then it went (here: removed by hand).
    std::fs::remove_dir_all(h.state_dir(UUID_TRANS)).unwrap();
    h.logs();
    hook(&h, "release", "end", "migrated");
    let newest = h.generations(UUID_TRANS).pop().unwrap();
    assert_eq!(migrated_mark(&h).unwrap()["generation"], newest.as_str());
    let logs = h.logs();
    assert!(
        logs.iter().any(|l| l.starts_with("<30>")
            && l.contains(&format!("generation {newest} marked as migrated away"))),
        "{logs:?}"
    );
    assert_refused_as_migrated(&h);
}

#[test]
fn a_migrated_release_whose_state_cannot_be_captured_still_marks_the_newest_generation() {
    let h = Host::new("migratedbad");
    captured(&h);
    // A state the capture refuses: the stored copies are stale all the same.
    h.put_state(UUID_TRANS, &[("tpm2-00.permall", b"not a swtpm blob")]);
    hook(&h, "release", "end", "migrated");
    assert_eq!(h.generations(UUID_TRANS).len(), 1, "nothing was stored");
    let newest = h.generations(UUID_TRANS).pop().unwrap();
    assert_eq!(migrated_mark(&h).unwrap()["generation"], newest.as_str());
    assert_refused_as_migrated(&h);
}

/// A VM whose name looks like an option of ours.
const OPTION_NAMES: [(&str, &str); 4] = [
    ("--help", "00000000-0000-4000-8000-000000000001"),
    ("-h", "00000000-0000-4000-8000-000000000002"),
    ("--version", "00000000-0000-4000-8000-000000000003"),
    ("--config", "00000000-0000-4000-8000-000000000004"),
];

fn put_named_state(h: &Host, uuid: &str) {
    h.put_state(
        uuid,
        &[("tpm2-00.permall", &fixture("tpm2-00.permall.plain"))],
    );
}

#[test]
fn a_vm_named_like_an_option_is_captured_by_the_hook_command() {
    let h = Host::new("optionnames");
    for (name, uuid) in OPTION_NAMES {
        put_named_state(&h, uuid);
        let xml = domain_xml(name, uuid, None, None);
        // Host::hook also checks that nothing reached stdout.
        let out = h.hook(name, "stopped", "end", "-", xml.as_bytes());
        assert_ok(&out);
        assert_eq!(h.generations(uuid).len(), 1, "{name} was not captured");
    }
}

#[test]
fn a_vm_named_like_an_option_is_captured_through_qemu_chain() {
    let h = Host::new("optionchain");
    for (name, uuid) in OPTION_NAMES {
        put_named_state(&h, uuid);
        let xml = domain_xml(name, uuid, None, None);
        let out = run_with(
            Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/hooks/qemu-chain"))
                .args([name, "stopped", "end", "-"])
                .env("SWTPM_KEEPER", bin())
                .env("SWTPM_KEEPER_CHAINED", h.root.join("no-old-hook"))
                .env("SWTPM_KEEPER_CONFIG", &h.conf),
            xml.as_bytes(),
        );
        assert_ok(&out);
        assert!(out.stdout.is_empty());
        assert_eq!(h.generations(uuid).len(), 1, "{name} was not captured");
    }
}

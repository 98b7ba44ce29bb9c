//! The store shared by hosts: a run removes another run's temporaries only
//! when their owner is provably gone (src/leftover.rs), judged by the real
//! binary on fixture trees. The two-host drill on a real GlusterFS volume
//! is tests/e2e/shared-store.sh.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, SystemTime};

use common::*;
use swtpm_keeper::leftover;

const GEN: &str = "00000001-20261121T000000Z";

/// A temporary generation directory named `name` in the VM's store, with
/// a file in it, last modified `age` ago.
fn plant(h: &Host, name: &str, age: Duration) -> PathBuf {
    let d = h.vm_store(UUID_TRANS).join(name);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("tpm2-00.permall"), b"half").unwrap();
    std::fs::File::open(&d)
        .unwrap()
        .set_modified(SystemTime::now() - age)
        .unwrap();
    d
}

fn owned(prefix: &str, host: &str, pid: u32, what: &str) -> String {
    format!("{prefix}{host}@{pid}-{what}")
}

fn stop(h: &Host) {
    h.put_state(
        UUID_TRANS,
        &[("tpm2-00.permall", &fixture("tpm2-00.permall.plain"))],
    );
    assert_ok(&h.stop_transient());
}

/// A pid that no process has any more.
fn dead_pid() -> u32 {
    let mut c = Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    pid
}

struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Hold the exclusive flock on `path` (as another run would) until dropped.
fn hold_flock(path: &Path) -> std::fs::File {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let f = std::fs::File::create(path).unwrap();
    assert!(swtpm_keeper::lock::try_flock(&f, true).unwrap());
    f
}

#[test]
fn a_dead_runs_temporaries_on_this_host_are_removed() {
    let h = Host::new("shared-dead");
    let here = leftover::host_tag();
    let pid = dead_pid();
    let tmp = plant(&h, &owned(".tmp-", &here, pid, GEN), Duration::ZERO);
    let trash = plant(&h, &owned(".trash-", &here, pid, GEN), Duration::ZERO);
    let marker = h
        .vm_store(UUID_TRANS)
        .join(owned(".tmp-", &here, pid, "migrated-away.json"));
    std::fs::write(&marker, b"{").unwrap();
    stop(&h);
    for p in [&tmp, &trash, &marker] {
        assert!(!p.exists(), "{} was kept", p.display());
    }
    assert_eq!(h.generations(UUID_TRANS).len(), 1);
}

#[test]
fn a_temporary_whose_pid_now_runs_another_program_is_removed() {
    let h = Host::new("shared-reused");
    let sleeper = Reaped(Command::new("sleep").arg("30").spawn().unwrap());
    let tmp = plant(
        &h,
        &owned(".tmp-", &leftover::host_tag(), sleeper.0.id(), GEN),
        Duration::ZERO,
    );
    stop(&h);
    assert!(!tmp.exists(), "kept for a pid that is not swtpm-keeper");
}

#[test]
fn a_live_swtpm_keepers_temporary_on_this_host_is_kept_until_it_exits() {
    let h = Host::new("shared-live");
    // Another swtpm-keeper, alive: it waits for a lock this test holds.
    let other = Host::with_config("shared-live-other", "lock_timeout = 20.0\n");
    let held = hold_flock(&other.vm_store(UUID_TRANS).join(".lock"));
    other.put_state(
        UUID_TRANS,
        &[("tpm2-00.permall", &fixture("tpm2-00.permall.plain"))],
    );
    let xml = fixture("tpm2-transient.stopped.xml");
    let mut run = Reaped(other.spawn(&["hook", "tpmtrans", "stopped", "end", "-"], &xml));
    let tmp = plant(
        &h,
        &owned(".tmp-", &leftover::host_tag(), run.0.id(), GEN),
        Duration::from_secs(7200),
    );
    stop(&h);
    assert!(tmp.exists(), "removed while its swtpm-keeper runs");
    assert!(
        h.logs().iter().any(|l| l.contains("kept ")),
        "keeping it is not logged"
    );
    // Its owner gone, the next run removes it.
    drop(held);
    run.0.wait().unwrap();
    stop(&h);
    assert!(!tmp.exists(), "kept after its swtpm-keeper exited");
}

#[test]
fn another_hosts_temporaries_are_removed_only_when_an_hour_old() {
    let h = Host::new("shared-foreign");
    let other = "node-2.cluster.example";
    assert_ne!(leftover::host_tag(), other);
    // Its pid is this very test's: alive here, but that means nothing there.
    let me = std::process::id();
    let recent = plant(
        &h,
        &owned(".tmp-", other, me, GEN),
        Duration::from_secs(59 * 60),
    );
    let old_tmp = plant(
        &h,
        &owned(".tmp-", other, me, "00000002-20261121T000000Z"),
        leftover::FOREIGN_AGE + Duration::from_secs(60),
    );
    let old_trash = plant(
        &h,
        &owned(".trash-", other, me, GEN),
        Duration::from_secs(86_400),
    );
    stop(&h);
    assert!(
        recent.exists(),
        "another host's recent temporary was removed"
    );
    assert!(!old_tmp.exists(), "another host's old temporary was kept");
    assert!(!old_trash.exists(), "another host's old trash was kept");
}

#[test]
fn an_unowned_temporary_of_0_1_0_is_removed_only_when_an_hour_old() {
    let h = Host::new("shared-unowned");
    let recent = plant(&h, &format!(".tmp-{GEN}"), Duration::ZERO);
    let old = plant(
        &h,
        ".trash-00000000-20261120T000000Z",
        leftover::FOREIGN_AGE + Duration::from_secs(60),
    );
    stop(&h);
    assert!(recent.exists(), "a recent 0.1.0 temporary was removed");
    assert!(!old.exists(), "an old 0.1.0 temporary was kept");
}

/// What a run killed just before its rename leaves: named after its host
/// and pid, modified when the run made it (a trash too, though its
/// generation is old), and removed by a later run here (the pid is gone).
#[cfg(feature = "failpoints")]
#[test]
fn a_crashed_capture_leaves_temporaries_named_after_its_host_and_pid() {
    let h = Host::with_config("shared-crash", "generations = 1\n");
    for (fp, prefix) in [
        ("store-before-rename", ".tmp-"),
        ("prune-after-rename", ".trash-"),
    ] {
        let mut state = fixture("tpm2-00.permall.plain");
        state[100] ^= prefix.len() as u8;
        h.put_state(UUID_TRANS, &[("tpm2-00.permall", &state)]);
        // The generation about to be pruned is old: its trash must not be.
        for g in h.generations(UUID_TRANS) {
            std::fs::File::open(h.vm_store(UUID_TRANS).join(g))
                .unwrap()
                .set_modified(SystemTime::now() - Duration::from_secs(7200))
                .unwrap();
        }
        let out = run_with(
            h.command(&["hook", "tpmtrans", "stopped", "end", "-"])
                .env("SWTPM_KEEPER_FAILPOINT", fp),
            &fixture("tpm2-transient.stopped.xml"),
        );
        assert!(!out.status.success(), "{fp}: the failpoint did not fire");
        let left: Vec<String> = std::fs::read_dir(h.vm_store(UUID_TRANS))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with('.') && n != ".lock")
            .collect();
        let want = format!("{prefix}{}@", leftover::host_tag());
        assert!(
            left.len() == 1 && left[0].starts_with(&want),
            "{fp}: {left:?} is not one {want}<pid>-..."
        );
        assert!(matches!(
            leftover::owner(&left[0][prefix.len()..]),
            leftover::Owner::Run { .. }
        ));
        let age = std::fs::metadata(h.vm_store(UUID_TRANS).join(&left[0]))
            .unwrap()
            .modified()
            .unwrap()
            .elapsed()
            .unwrap_or_default();
        assert!(age < Duration::from_secs(600), "{fp}: {age:?} old");
        stop(&h);
        assert!(!h.vm_store(UUID_TRANS).join(&left[0]).exists(), "{fp}");
    }
}

#[test]
fn list_and_show_name_the_host_that_took_the_generation() {
    let h = Host::new("shared-host-shown");
    let permall = fixture("tpm2-00.permall.plain");
    let xml = domain_xml("tpmtrans", UUID_TRANS, None, None);
    // write_generation records the host `host-a`, not this one.
    assert_ne!(leftover::host_tag(), "host-a");
    write_generation(
        &h,
        &FixtureGen {
            uuid: UUID_TRANS,
            vm: "tpmtrans",
            generation: GEN,
            time_unix: 1_795_219_200,
            event: "stopped",
            reason: "-",
            secret: None,
            files: &[
                ("tpm2-00.permall", "tpm", &permall),
                ("domain.xml", "domain", xml.as_bytes()),
            ],
        },
    );
    let out = h.run(&["list"], b"");
    assert_ok(&out);
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let col = lines[0].find("HOST").expect("no HOST column");
    assert!(lines[1][col..].starts_with("host-a "), "{text}");

    let out = h.run(&["list", "--json"], b"");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["vms"][0]["newest"]["host"], "host-a");

    let out = h.run(&["show", "tpmtrans"], b"");
    assert_ok(&out);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains(&format!("{GEN}  captured ")), "{text}");
    assert!(text.contains(" on host-a,"), "{text}");
}

//! Concurrency: many hook runs and operator commands on one VM are
//! serialized by its lock, and VMs never wait on each other.

mod common;

use common::*;
use std::process::Child;
use std::time::{Duration, Instant};

/// Replaces the state as swtpm does (temp file, rename). The `restore
/// --force` running meanwhile swaps the whole directory out and deletes the
/// old one, so our temp file can vanish before the rename: write it again.
fn replace_state(d: &std::path::Path, bytes: &[u8]) {
    let (tmp, live) = (d.join("TMP2-00.permall"), d.join("tpm2-00.permall"));
    for _ in 0..1000 {
        let r = std::fs::write(&tmp, bytes).and_then(|_| std::fs::rename(&tmp, &live));
        match r {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("replacing {}: {e}", live.display()),
        }
    }
    panic!("{} kept vanishing", tmp.display());
}

#[test]
fn thirty_two_hook_runs_and_a_restore_and_prune_on_one_vm_are_serialized() {
    let h = Host::with_config(
        "race32",
        "lock_timeout = 30.0\ngenerations = 50\nlog_level = \"debug\"\n",
    );
    let xml = fixture("tpm2-transient.stopped.xml");
    let base = fixture("tpm2-00.permall.plain");
    h.put_state(UUID_TRANS, &[("tpm2-00.permall", &base)]);
    h.hook("tpmtrans", "stopped", "end", "-", &xml);
    let d = h.state_dir(UUID_TRANS);

    let t = Instant::now();
    let mut children = Vec::new();
    for i in 0..32u8 {
        // The state changes between runs, as swtpm would replace it.
        let mut b = base.clone();
        b[100] = i;
        replace_state(&d, &b);
        let op = if i % 2 == 0 { "stopped" } else { "release" };
        children.push(("hook", h.spawn(&["hook", "tpmtrans", op, "end", "-"], &xml)));
        if i == 10 {
            children.push(("prune", h.spawn(&["prune", "--keep", "5"], b"")));
        }
        if i == 20 {
            children.push(("restore", h.spawn(&["restore", UUID_TRANS, "--force"], b"")));
        }
    }
    let mut restore_ok = false;
    // Lines from stderr too: the test's syslog socket holds only a few
    // (net.unix.max_dgram_qlen) and the logger falls back to stderr.
    let mut logs: Vec<String> = Vec::new();
    for (what, c) in children {
        let out = wait_with_deadline(c, Duration::from_secs(60));
        assert!(
            out.stdout.is_empty() || what != "hook",
            "a hook wrote to stdout"
        );
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        logs.extend(stderr.lines().map(String::from));
        logs.extend(h.logs());
        match what {
            "hook" => assert_eq!(out.status.code(), Some(0), "{stderr}"),
            "prune" => assert_eq!(
                out.status.code(),
                Some(0),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            ),
            _ => {
                // restore --force replaces the live state after capturing it.
                assert_ok(&out);
                restore_ok = true;
            }
        }
    }
    let took = t.elapsed();
    assert!(restore_ok);
    logs.extend(h.logs());
    // Every hook run said what it did (a capture, or "unchanged" at debug
    // level), so the checks below saw every run's lines.
    let said = logs
        .iter()
        .filter(|l| l.contains("event=stopped/end") || l.contains("event=release/end"))
        .count();
    assert!(said >= 32, "{said} lines from 32 runs: {logs:?}");
    assert!(
        !logs.iter().any(|l| l.contains("gave up")),
        "a run gave up waiting: {logs:?}"
    );
    assert!(!logs.iter().any(|l| l.contains("NOT captured")), "{logs:?}");
    let gens = h.generations(UUID_TRANS);
    for g in &gens {
        swtpm_keeper::store::load_verified(&h.vm_store(UUID_TRANS).join(g), 1 << 20)
            .unwrap_or_else(|e| panic!("{g}: {e}"));
    }
    let names = dir_names(&h.vm_store(UUID_TRANS));
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with(".tmp-") || n.starts_with(".trash-")),
        "{names:?}"
    );
    eprintln!(
        "race on one VM: 32 hook runs + prune + restore in {took:?}, {} generations, all verify",
        gens.len()
    );
}

#[test]
fn a_run_that_cannot_get_the_lock_in_time_says_so_and_exits_0() {
    let h = Host::with_config("racedeadline", "lock_timeout = 0.5\n");
    h.put_state(
        UUID_TRANS,
        &[("tpm2-00.permall", &fixture("tpm2-00.permall.plain"))],
    );
    std::fs::create_dir_all(h.vm_store(UUID_TRANS)).unwrap();
    let f = std::fs::File::create(h.vm_store(UUID_TRANS).join(".lock")).unwrap();
    assert!(swtpm_keeper::lock::try_flock(&f, true).unwrap());
    let xml = fixture("tpm2-transient.stopped.xml");
    let t = Instant::now();
    let children: Vec<Child> = (0..8)
        .map(|_| h.spawn(&["hook", "tpmtrans", "stopped", "end", "-"], &xml))
        .collect();
    let mut logs: Vec<String> = Vec::new();
    for c in children {
        let out = wait_with_deadline(c, Duration::from_secs(10));
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        logs.extend(stderr.lines().map(String::from));
        logs.extend(h.logs());
    }
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(
        logs.iter()
            .filter(|l| l.contains("gave up after 0.5 s waiting for the lock"))
            .count(),
        8,
        "{logs:?}"
    );
}

/// The soft limit on open files up to the hard one: 200 children hold 400
/// pipe ends here.
fn raise_fd_limit() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

#[test]
fn two_hundred_vms_stopping_at_once_never_wait_on_each_other() {
    let h = Host::with_config("race200", "lock_timeout = 2.0\n");
    let permall = fixture("tpm2-00.permall.plain");
    let template = String::from_utf8(fixture("tpm2-transient.stopped.xml")).unwrap();
    let uuids: Vec<String> = (0..200)
        .map(|i| format!("11111111-2222-3333-4444-{i:012}"))
        .collect();
    let xmls: Vec<Vec<u8>> = uuids
        .iter()
        .enumerate()
        .map(|(i, u)| {
            h.put_state(u, &[("tpm2-00.permall", &permall)]);
            template
                .replace(UUID_TRANS, u)
                .replace("<name>tpmtrans</name>", &format!("<name>vm{i}</name>"))
                .into_bytes()
        })
        .collect();
    // One VM's lock is held all along: nobody else may notice.
    std::fs::create_dir_all(h.vm_store(&uuids[0])).unwrap();
    let held = std::fs::File::create(h.vm_store(&uuids[0]).join(".lock")).unwrap();
    assert!(swtpm_keeper::lock::try_flock(&held, true).unwrap());

    let t = Instant::now();
    let mut running = Vec::new();
    // Lines from the syslog socket, and from stderr when its queue was full.
    let mut logs: Vec<String> = Vec::new();
    let finish = |running: &mut Vec<Child>, logs: &mut Vec<String>| {
        for c in running.drain(..) {
            let out = wait_with_deadline(c, Duration::from_secs(30));
            assert_eq!(out.status.code(), Some(0));
            logs.extend(
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .map(String::from),
            );
        }
        logs.extend(h.logs());
    };
    // All 200 at once (two pipes each stay open until reaped).
    raise_fd_limit();
    for (i, xml) in xmls.iter().enumerate() {
        running.push(h.spawn(&["hook", &format!("vm{i}"), "stopped", "end", "-"], xml));
    }
    finish(&mut running, &mut logs);
    let took = t.elapsed();
    drop(held);
    let gave_up: Vec<&String> = logs.iter().filter(|l| l.contains("gave up")).collect();
    assert_eq!(
        gave_up.len(),
        1,
        "only the VM whose lock was held waits: {gave_up:?}"
    );
    for u in &uuids[1..] {
        assert_eq!(h.generations(u).len(), 1, "{u}");
    }
    // 199 captures and one 2 s wait at once: far below 199 x 2 s.
    assert!(took < Duration::from_secs(20), "{took:?}");
    eprintln!("200 VMs at once, one lock held elsewhere: {took:?}");
}

//! Hostile input: a corpus of broken, malicious and odd domain XML, and
//! what a compromised swtpm (running as `tss`) could plant in its state
//! directory. Never a crash, never a write outside the store (and
//! libvirt's own state path), a clear log line, the exit code the hook
//! contract says.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

type Snapshot = BTreeMap<PathBuf, (u64, i64, i64, u32)>;

/// Every entry under `root` (not following links): size, mtime, ctime, mode.
fn snapshot(root: &Path, skip: &[PathBuf]) -> Snapshot {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if skip.iter().any(|s| p.starts_with(s)) {
                continue;
            }
            let md = std::fs::symlink_metadata(&p).unwrap();
            out.insert(p.clone(), (md.len(), md.mtime(), md.ctime(), md.mode()));
            if md.is_dir() {
                todo.push(p);
            }
        }
    }
    out
}

fn etc_snapshot() -> Vec<(String, u64, i64)> {
    ["/etc", "/etc/shadow", "/etc/passwd"]
        .iter()
        .filter_map(|p| {
            std::fs::symlink_metadata(p)
                .ok()
                .map(|m| (p.to_string(), m.len(), m.mtime()))
        })
        .collect()
}

fn corpus(h: &Host) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hostile-xml");
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let bytes = std::fs::read(e.path()).unwrap();
            let text = String::from_utf8_lossy(&bytes).replace("@ROOT@", h.root.to_str().unwrap());
            let bytes = if text.contains("@ROOT@") || bytes.windows(6).any(|w| w == b"@ROOT@") {
                text.into_bytes()
            } else {
                bytes
            };
            (e.file_name().into_string().unwrap(), bytes)
        })
        .collect();
    v.sort();
    let tpm = "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>";
    // 50 MB: a valid domain followed by a giant comment.
    let mut big =
        format!("<domain><name>big</name><uuid>{UUID_TRANS}</uuid><devices>{tpm}</devices><!--")
            .into_bytes();
    big.resize(50 << 20, b'x');
    big.extend_from_slice(b"--></domain>");
    v.push(("bad-gen-50mb.xml".into(), big));
    // A 1 MB attribute value.
    let huge = format!("<domain><name>h</name><uuid>{UUID_TRANS}</uuid><devices><tpm model='{}'><backend type='emulator' version='2.0'/></tpm></devices></domain>", "A".repeat(1 << 20));
    v.push(("ok-gen-huge-attribute.xml".into(), huge.into_bytes()));
    // 100 000 nested unknown elements.
    let deep = format!(
        "<domain><name>d</name><uuid>{UUID_TRANS}</uuid><devices>{tpm}</devices><metadata>{}{}</metadata></domain>",
        "<a>".repeat(100_000),
        "</a>".repeat(100_000)
    );
    v.push(("ok-gen-deep-nesting.xml".into(), deep.into_bytes()));
    v
}

#[test]
fn a_corpus_of_hostile_domain_xml_never_crashes_and_never_writes_outside_the_store() {
    let h = Host::new("hostilexml");
    // The store knows this UUID, so every prepare below has work to try.
    h.put_state(
        UUID_TRANS,
        &[("tpm2-00.permall", &fixture("tpm2-00.permall.plain"))],
    );
    h.stop_transient();
    std::fs::remove_dir_all(h.swtpm.join(UUID_TRANS)).unwrap();
    // A symlink in a directory anybody can write (ok-31).
    let linkdir = h.root.join("linkdir");
    std::fs::create_dir(&linkdir).unwrap();
    std::fs::set_permissions(&linkdir, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::os::unix::fs::symlink("/etc", linkdir.join("tpm")).unwrap();
    h.logs();

    // libvirt's own state path for the UUID may be restored into; nothing else.
    let skip = [h.store.clone(), h.root.join("log.sock"), h.swtpm.clone()];
    let before = snapshot(&h.root, &skip);
    let etc_before = etc_snapshot();
    let docs = corpus(&h);
    assert!(docs.len() >= 30, "the corpus has {} documents", docs.len());
    let mut runs = 0;
    for (name, xml) in &docs {
        for (op, sub) in [
            ("stopped", "end"),
            ("release", "end"),
            ("prepare", "begin"),
            ("migrate", "begin"),
        ] {
            let t = Instant::now();
            let out = h.hook("vm", op, sub, "-", xml);
            runs += 1;
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.code().is_some(),
                "{name} {op}: killed by a signal (a crash): {err}"
            );
            assert!(!err.contains("panicked"), "{name} {op}: {err}");
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "{name} {op}: took {:?}",
                t.elapsed()
            );
            match op {
                "prepare" => assert!(
                    matches!(out.status.code(), Some(0 | 1)),
                    "{name} {op}: {:?}",
                    out.status
                ),
                _ => assert_eq!(
                    out.status.code(),
                    Some(0),
                    "{name} {op}: a {op} must never fail"
                ),
            }
            let logs = h.logs();
            if name.starts_with("bad-") {
                assert!(!logs.is_empty(), "{name} {op}: refused without a log line");
                assert!(
                    logs.iter()
                        .all(|l| l.starts_with("<27>") && l.contains("nothing done")),
                    "{name} {op}: {logs:?}"
                );
                assert!(
                    logs.iter().all(|l| !l[4..].contains('\n')),
                    "{name}: a log line spans lines"
                );
            }
            if name.starts_with("notpm-") {
                assert!(
                    logs.is_empty(),
                    "{name} {op}: a VM without an emulator TPM logs nothing: {logs:?}"
                );
            }
        }
    }
    assert_eq!(
        snapshot(&h.root, &skip),
        before,
        "something outside the store changed"
    );
    assert_eq!(etc_snapshot(), etc_before, "/etc changed");
    // In libvirt's swtpm dir, only this UUID's state may have appeared.
    let in_swtpm: Vec<String> = std::fs::read_dir(&h.swtpm)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(in_swtpm.iter().all(|n| n == UUID_TRANS), "{in_swtpm:?}");
    // The store holds only UUID directories.
    for e in std::fs::read_dir(&h.store).unwrap() {
        let n = e.unwrap().file_name().into_string().unwrap();
        assert!(
            swtpm_keeper::domain::valid_uuid(&n),
            "unexpected entry {n:?} in the store"
        );
    }
    eprintln!(
        "hostile XML: {} documents, {runs} hook runs, no crash, nothing written outside",
        docs.len()
    );
}

#[test]
fn a_directory_a_sparse_giant_and_a_device_in_place_of_state_are_refused() {
    let h = Host::with_config("hostilestate", "max_file_size = 1048576\n");
    let xml = fixture("tpm2-transient.stopped.xml");
    let d = h.state_dir(UUID_TRANS);
    std::fs::create_dir_all(d.join("tpm2-00.permall")).unwrap();
    h.hook("tpmtrans", "stopped", "end", "-", &xml);
    std::fs::remove_dir(d.join("tpm2-00.permall")).unwrap();

    // A sparse 10 GB file: refused by size, without reading it.
    let f = std::fs::File::create(d.join("tpm2-00.permall")).unwrap();
    f.set_len(10 << 30).unwrap();
    let t = Instant::now();
    h.hook("tpmtrans", "stopped", "end", "-", &xml);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "it read the sparse file: {:?}",
        t.elapsed()
    );
    std::fs::remove_file(d.join("tpm2-00.permall")).unwrap();

    // /dev/null linked in (a device node; making one needs root).
    std::os::unix::fs::symlink("/dev/null", d.join("tpm2-00.volatilestate")).unwrap();
    std::fs::write(d.join("tpm2-00.permall"), fixture("tpm2-00.permall.plain")).unwrap();
    h.hook("tpmtrans", "stopped", "end", "-", &xml);

    assert!(h.generations(UUID_TRANS).is_empty());
    let logs = h.logs();
    assert_eq!(logs.len(), 3, "{logs:?}");
    assert!(logs[0].contains("not a regular file"), "{}", logs[0]);
    assert!(
        logs[1].contains("over the limit of 1048576 (max_file_size)"),
        "{}",
        logs[1]
    );
    assert!(logs[2].contains("NOT captured"), "{}", logs[2]);
}

#[test]
fn state_files_replaced_during_the_copy_give_a_consistent_generation_or_a_refusal() {
    // swtpm replaces files by rename; a hostile one may rewrite them in
    // place. Every generation that results must verify.
    let h = Host::with_config("changing", "generations = 100\n");
    let xml = fixture("tpm2-transient.stopped.xml");
    let d = h.put_state(
        UUID_TRANS,
        &[("tpm2-00.permall", &fixture("tpm2-00.permall.plain"))],
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (d, stop) = (d.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0u32;
            let base = fixture("tpm2-00.permall.plain");
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut b = base.clone();
                b[100] = i as u8;
                if i % 2 == 0 {
                    // as swtpm does: a new file renamed over the old one
                    std::fs::write(d.join("TMP2-00.permall"), &b).unwrap();
                    std::fs::rename(d.join("TMP2-00.permall"), d.join("tpm2-00.permall")).unwrap();
                } else {
                    // in place, truncated then written: torn reads are possible
                    std::fs::write(d.join("tpm2-00.permall"), &b).unwrap();
                }
                i += 1;
            }
        })
    };
    for _ in 0..60 {
        assert_eq!(
            h.hook("tpmtrans", "stopped", "end", "-", &xml)
                .status
                .code(),
            Some(0)
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    let gens = h.generations(UUID_TRANS);
    assert!(!gens.is_empty(), "nothing was ever captured");
    for g in &gens {
        swtpm_keeper::store::load_verified(&h.vm_store(UUID_TRANS).join(g), 1 << 20)
            .unwrap_or_else(|e| panic!("{g}: {e}"));
    }
    eprintln!(
        "changing state: 60 captures, {} generations, all verify",
        gens.len()
    );
}

#[test]
fn links_and_files_planted_where_a_restore_writes_are_never_followed() {
    let h = Host::new("plantrestore");
    let victim = h.root.join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    h.put_state(
        UUID_EFI,
        &[("tpm2-00.permall", &fixture("tpm2-00.permall.encrypted"))],
    );
    std::fs::write(h.nvram_path(), b"vars").unwrap();
    h.hook("efitest", "stopped", "end", "-", &h.efi_xml());
    std::fs::remove_dir_all(h.state_dir(UUID_EFI)).unwrap();
    std::fs::remove_file(h.nvram_path()).unwrap();

    // A link where the state directory goes, and at every temporary name
    // the NVRAM write could use (the NVRAM directory is the qemu user's).
    std::os::unix::fs::symlink(h.root.join("elsewhere"), h.state_dir(UUID_EFI)).unwrap();
    std::fs::set_permissions(&h.nvram_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    for pid in 0..50 {
        let _ = std::os::unix::fs::symlink(
            &victim,
            h.nvram_dir
                .join(format!(".efitest_VARS.fd.swtpm-keeper-{pid}")),
        );
    }
    let out = h.hook("efitest", "prepare", "begin", "-", &h.efi_xml());
    assert_eq!(
        out.status.code(),
        Some(1),
        "a link in place of the state dir is refused"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a directory"));
    assert!(!h.root.join("elsewhere").exists(), "the link was followed");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    // NVRAM went first and went through a temporary of its own.
    assert_eq!(std::fs::read(h.nvram_path()).unwrap(), b"vars");
    assert!(!std::fs::symlink_metadata(h.nvram_path())
        .unwrap()
        .file_type()
        .is_symlink());
}

#[test]
fn a_source_path_naming_a_foreign_directory_is_never_swapped_out() {
    let h = Host::new("foreigndir");
    let d = h.root.join("data");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("tpm2-00.permall"), fixture("tpm2-00.permall.plain")).unwrap();
    let xml = format!(
        "<domain><name>f</name><uuid>{UUID_TRANS}</uuid><devices><tpm><backend type='emulator' version='2.0'><source type='dir' path='{}'/></backend></tpm></devices></domain>",
        d.display()
    );
    h.hook("f", "stopped", "end", "-", xml.as_bytes());
    // The directory now holds someone's files, but no TPM state.
    std::fs::remove_file(d.join("tpm2-00.permall")).unwrap();
    std::fs::write(d.join("important.db"), b"data").unwrap();
    let out = h.hook("f", "prepare", "begin", "-", xml.as_bytes());
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("holds files that are not swtpm's (important.db)"));
    assert_eq!(std::fs::read(d.join("important.db")).unwrap(), b"data");
    assert!(!d.join("tpm2-00.permall").exists());
}

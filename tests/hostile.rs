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

/// /etc and the two files the corpus aims at: inode, size, mtime (another
/// process on the machine may change them: compare over short windows).
fn etc_snapshot() -> Vec<(String, u64, u64, i64)> {
    ["/etc", "/etc/shadow", "/etc/passwd"]
        .iter()
        .filter_map(|p| {
            std::fs::symlink_metadata(p)
                .ok()
                .map(|m| (p.to_string(), m.ino(), m.len(), m.mtime()))
        })
        .collect()
}

/// The documents, `@ROOT@` standing for the host's root.
fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hostile-xml");
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let bytes = std::fs::read(e.path()).unwrap();
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

/// The lowercase UUID a document names, if it has a valid one.
fn doc_uuid(xml: &[u8]) -> Option<String> {
    let t = String::from_utf8_lossy(xml);
    let start = t.find("<uuid>")? + 6;
    let end = start + t[start..].find("</uuid>")?;
    swtpm_keeper::domain::Uuid::normalize(&t[start..end]).map(|u| u.to_string())
}

/// What `prepare` must do with a valid document whose UUID the store knows
/// and whose state is gone.
#[derive(Debug)]
enum Expect {
    /// libvirt's default path for the UUID gets the stored state back.
    Restored,
    /// The restore is refused (exit 1) for this reason, nothing written.
    Refused(&'static str),
    /// Something is at the state path: a present state is never replaced,
    /// so nothing is done and nothing is said.
    LeftAlone,
}

fn expected(name: &str) -> Expect {
    match name {
        // `<source type='dir' path='/etc'>`: refused before /etc is looked
        // into (its parent, /, cannot hold a temporary beside it).
        "ok-29-source-dir-etc.xml" => Expect::Refused("/ has no parent directory"),
        // `<source type='file' path='/etc/shadow'>`: it exists, so it
        // counts as present state and is left as it is (/etc is compared).
        "ok-30-source-file-shadow.xml" => Expect::LeftAlone,
        // A symlink to /etc in a world-writable directory.
        "ok-31-source-symlink-dir.xml" => Expect::Refused("linkdir: it is writable by"),
        n if n.starts_with("ok-") => Expect::Restored,
        n => panic!("{n}: not a valid document"),
    }
}

/// One document on a host of its own whose store knows the document's
/// UUID and whose TPM state is gone, so that `prepare` has a restore to
/// try. Returns the number of hook runs.
fn run_document(i: usize, name: &str, xml_template: &[u8]) -> usize {
    let h = Host::new(&format!("hostilexml{i}"));
    let xml = String::from_utf8_lossy(xml_template)
        .replace("@ROOT@", h.root.to_str().unwrap())
        .into_bytes();
    let xml = if xml_template.windows(6).any(|w| w == b"@ROOT@") {
        xml
    } else {
        xml_template.to_vec()
    };
    let uuid = doc_uuid(&xml).unwrap_or_else(|| UUID_TRANS.to_owned());
    let permall = fixture("tpm2-00.permall.plain");
    h.put_state(&uuid, &[("tpm2-00.permall", &permall)]);
    assert_ok(&h.hook(
        "seed",
        "stopped",
        "end",
        "-",
        domain_xml("seed", &uuid, None, None).as_bytes(),
    ));
    assert_eq!(
        h.generations(&uuid).len(),
        1,
        "{name}: the store was not seeded"
    );
    std::fs::remove_dir_all(h.swtpm.join(&uuid)).unwrap();
    // A symlink to /etc in a directory anybody can write (ok-31).
    let linkdir = h.root.join("linkdir");
    std::fs::create_dir(&linkdir).unwrap();
    std::fs::set_permissions(&linkdir, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::os::unix::fs::symlink("/etc", linkdir.join("tpm")).unwrap();
    h.logs();

    // libvirt's own state path for the UUID may be restored into, and a
    // failed capture is remembered in run_dir; nothing else (libvirt's
    // swtpm dir is checked below: only the UUID may appear).
    let skip = [
        h.store.clone(),
        h.root.join("log.sock"),
        h.swtpm.clone(),
        h.root.join("run"),
    ];
    let before = snapshot(&h.root, &skip);
    // Per document: the window is this document's runs alone.
    let etc_before = etc_snapshot();
    let mut runs = 0;
    // prepare first: it finds the state gone and the store knowing the VM.
    for (op, sub) in [
        ("prepare", "begin"),
        ("stopped", "end"),
        ("release", "end"),
        ("migrate", "begin"),
    ] {
        let t = Instant::now();
        let out = h.hook("vm", op, sub, "-", &xml);
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
        let logs = h.logs();
        if name.starts_with("ok-") && op == "prepare" {
            check_valid_prepare(&h, name, &uuid, &out, &logs);
        } else if op == "prepare" {
            assert_eq!(out.status.code(), Some(0), "{name} prepare: {err}");
        } else {
            assert_eq!(
                out.status.code(),
                Some(0),
                "{name} {op}: a {op} must never fail"
            );
        }
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
    assert_eq!(etc_snapshot(), etc_before, "{name}: /etc changed");
    assert_eq!(
        snapshot(&h.root, &skip),
        before,
        "{name}: something outside the store and libvirt's state path changed"
    );
    // In libvirt's swtpm dir, only this UUID's state may have appeared.
    for e in std::fs::read_dir(&h.swtpm).unwrap() {
        let n = e.unwrap().file_name().into_string().unwrap();
        assert_eq!(n, uuid, "{name}: unexpected entry in libvirt's swtpm dir");
    }
    for e in std::fs::read_dir(&h.store).unwrap() {
        let n = e.unwrap().file_name().into_string().unwrap();
        assert!(
            swtpm_keeper::domain::Uuid::new(&n).is_some(),
            "{name}: unexpected entry {n:?} in the store"
        );
    }
    runs
}

/// A valid document's `prepare`: the outcome its table entry names.
fn check_valid_prepare(
    h: &Host,
    name: &str,
    uuid: &str,
    out: &std::process::Output,
    logs: &[String],
) {
    let err = String::from_utf8_lossy(&out.stderr);
    let restored = h.state_dir(uuid).join("tpm2-00.permall");
    match expected(name) {
        Expect::Restored => {
            assert_eq!(out.status.code(), Some(0), "{name}: {err} {logs:?}");
            assert_eq!(
                std::fs::read(&restored).ok(),
                Some(fixture("tpm2-00.permall.plain")),
                "{name}: the state was not restored at {}: {logs:?}",
                restored.display()
            );
        }
        Expect::Refused(why) => {
            assert_eq!(out.status.code(), Some(1), "{name}: {err} {logs:?}");
            assert!(
                err.contains(why),
                "{name}: refused for another reason: {err}"
            );
            assert!(
                !h.swtpm.join(uuid).exists(),
                "{name}: a refusal wrote state"
            );
        }
        Expect::LeftAlone => {
            assert_eq!(out.status.code(), Some(0), "{name}: {err} {logs:?}");
            assert!(logs.is_empty() && err.is_empty(), "{name}: {err} {logs:?}");
            assert!(!h.swtpm.join(uuid).exists(), "{name}: state was written");
        }
    }
}

#[test]
fn every_document_of_a_hostile_corpus_on_a_host_of_its_own_never_crashes_and_never_writes_outside_the_store(
) {
    let docs = corpus();
    assert!(docs.len() >= 30, "the corpus has {} documents", docs.len());
    let mut runs = 0;
    for (i, (name, xml)) in docs.iter().enumerate() {
        runs += run_document(i, name, xml);
    }
    let valid = docs.iter().filter(|(n, _)| n.starts_with("ok-")).count();
    eprintln!(
        "hostile XML: {} documents ({valid} valid, each outcome checked), {runs} hook runs, no crash, nothing written outside",
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
    // A refusal writes neither half of the pair.
    assert!(std::fs::symlink_metadata(h.nvram_path()).is_err());

    // Without the link, the NVRAM goes through a temporary of its own.
    std::fs::remove_file(h.state_dir(UUID_EFI)).unwrap();
    let out = h.hook("efitest", "prepare", "begin", "-", &h.efi_xml());
    assert_ok(&out);
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
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

//! `export` and `import`: the archive of one generation, its bytes, the
//! round trip to another host (and another VM), the import's refusals,
//! and every hostile archive, each leaving the store as it was.

mod common;
use common::*;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use sha2::{Digest, Sha256};

const SECRET: &str = "0f0e0d0c-0b0a-4909-8807-060504030201";
const OTHER_UUID: &str = "99999999-8888-4777-8666-555555555555";

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The EFI VM stopped once: its encrypted state and NVRAM in the store.
fn captured_efi(h: &Host) -> (Vec<u8>, Vec<u8>) {
    let permall = fixture("tpm2-00.permall.encrypted");
    let nvram: Vec<u8> = (0..540 * 1024).map(|i| (i % 251) as u8).collect();
    h.put_state(UUID_EFI, &[("tpm2-00.permall", &permall)]);
    std::fs::write(h.nvram_path(), &nvram).unwrap();
    assert_ok(&h.hook("efitest", "stopped", "end", "-", &h.efi_xml()));
    assert_eq!(h.generations(UUID_EFI).len(), 1);
    (permall, nvram)
}

/// Run `cmd` reading its stdout while it runs (an archive is larger than
/// a pipe holds), within a deadline.
fn output(cmd: &mut Command) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output().unwrap()));
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(out) => out,
        Err(_) => {
            // SAFETY: no preconditions; the child has not been reaped.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("{cmd:?} did not finish within 30 s");
        }
    }
}

fn export_out(h: &Host, args: &[&str]) -> Output {
    output(&mut h.command(&[&["export"][..], args].concat()))
}

fn export(h: &Host, args: &[&str]) -> Vec<u8> {
    let out = export_out(h, args);
    assert_ok(&out);
    out.stdout
}

fn import(h: &Host, args: &[&str], archive: &[u8]) -> Output {
    let mut a = vec!["import"];
    a.extend_from_slice(args);
    h.run(&a, archive)
}

/// Every entry of a tree: path, type, mode, owner, size and SHA-256 of
/// its bytes (or link target), sorted; what "unchanged" is measured by.
fn snapshot(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let what = if m.is_dir() {
                "dir".to_owned()
            } else if m.file_type().is_symlink() {
                format!("link {:?}", std::fs::read_link(&p).unwrap())
            } else {
                hex(&std::fs::read(&p).unwrap())
            };
            let (mode, uid, gid, size) = (m.mode(), m.uid(), m.gid(), m.len());
            let mtime = if m.is_dir() { 0 } else { m.mtime() };
            out.push(format!("{rel} {mode:o} {uid}:{gid} {size} {mtime} {what}"));
            if m.is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut v = vec![format!("exists {}", root.exists())];
    walk(root, root, &mut v);
    v.sort();
    v
}

fn hex(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// The entries of an archive, as the tar crate reads them raw.
fn entries(archive: &[u8]) -> Vec<(String, tar::Header, Vec<u8>)> {
    let mut ar = tar::Archive::new(archive);
    let mut v = Vec::new();
    for e in ar.entries().unwrap().raw(true) {
        let mut e = e.unwrap();
        let path = String::from_utf8(e.path_bytes().into_owned()).unwrap();
        let h = e.header().clone();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).unwrap();
        v.push((path, h, data));
    }
    v
}

/// A hand-made entry: any name, type, link, size, bytes.
struct Raw {
    path: Vec<u8>,
    kind: u8,
    link: Vec<u8>,
    data: Vec<u8>,
    /// The size the header claims, when not the data's.
    size: Option<u64>,
}

impl Raw {
    fn file(path: &str, data: &[u8]) -> Raw {
        Raw {
            path: path.as_bytes().to_vec(),
            kind: b'0',
            link: Vec::new(),
            data: data.to_vec(),
            size: None,
        }
    }

    fn of(path: &str, kind: u8, link: &str) -> Raw {
        Raw {
            kind,
            link: link.as_bytes().to_vec(),
            ..Raw::file(path, b"")
        }
    }
}

/// Build an archive from raw entries, writing names into the headers by
/// hand (the tar crate refuses to write what these tests need).
fn build(entries: &[Raw]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let mut h = tar::Header::new_ustar();
        h.as_old_mut().name[..e.path.len()].copy_from_slice(&e.path);
        h.as_old_mut().linkname[..e.link.len()].copy_from_slice(&e.link);
        h.set_entry_type(tar::EntryType::new(e.kind));
        h.set_mode(0o600);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(e.size.unwrap_or(e.data.len() as u64));
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(&e.data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.extend_from_slice(&[0; 1024]);
    out
}

/// A valid export's entries as raw ones, to be altered.
fn raw_entries(archive: &[u8]) -> Vec<Raw> {
    entries(archive)
        .into_iter()
        .map(|(p, h, d)| Raw {
            path: p.into_bytes(),
            kind: h.entry_type().as_byte(),
            link: Vec::new(),
            data: d,
            size: None,
        })
        .collect()
}

fn replace(v: &mut [Raw], suffix: &str, data: Vec<u8>) {
    let e = v
        .iter_mut()
        .find(|e| e.path.ends_with(suffix.as_bytes()))
        .unwrap();
    e.data = data;
}

fn data_of<'a>(v: &'a [Raw], suffix: &str) -> &'a [u8] {
    &v.iter()
        .find(|e| e.path.ends_with(suffix.as_bytes()))
        .unwrap()
        .data
}

/// SHA256SUMS made right again after an edit (names as `sha256sum` does).
fn resum(v: &mut [Raw]) {
    let mut lines: Vec<(String, String)> = v
        .iter()
        .filter(|e| e.kind == b'0' && !e.path.ends_with(b"/SHA256SUMS"))
        .map(|e| {
            let p = String::from_utf8(e.path.clone()).unwrap();
            (p.rsplit('/').next().unwrap().to_owned(), hex(&e.data))
        })
        .collect();
    lines.sort();
    let text: String = lines.iter().map(|(n, x)| format!("{x}  {n}\n")).collect();
    replace(v, "/SHA256SUMS", text.into_bytes());
}

fn generation_dir(archive: &[u8]) -> String {
    entries(archive)[1].0.clone()
}

/// Another host whose libvirt defines `name` as the EFI VM with `uuid`,
/// `secret` and TPM `version` (None: no TPM).
fn define(h: &Host, name: &str, uuid: &str, secret: Option<&str>, version: Option<&str>) {
    let xml = String::from_utf8(h.efi_xml()).unwrap();
    let mut xml = xml
        .replace("<name>efitest</name>", &format!("<name>{name}</name>"))
        .replace(UUID_EFI, uuid)
        .replace("efitest_VARS", &format!("{name}_VARS"));
    if secret != Some(SECRET) {
        let with = secret
            .map(|s| format!("<encryption secret='{s}'/>"))
            .unwrap_or_default();
        xml = xml.replace(&format!("<encryption secret='{SECRET}'/>"), &with);
    }
    match version {
        Some(v) => xml = xml.replace("version='2.0'", &format!("version='{v}'")),
        None => {
            let (a, b) = (xml.find("<tpm ").unwrap(), xml.find("</tpm>").unwrap());
            xml.replace_range(a..b + "</tpm>".len(), "");
        }
    }
    assert!(xml.contains(&format!("<uuid>{uuid}</uuid>")), "{xml}");
    std::fs::write(h.etc_qemu.join(format!("{name}.xml")), xml).unwrap();
}

fn manifest_of(h: &Host, uuid: &str) -> serde_json::Value {
    let g = h.generations(uuid).pop().unwrap();
    serde_json::from_slice(&std::fs::read(h.vm_store(uuid).join(g).join("manifest.json")).unwrap())
        .unwrap()
}

// ---- export ---------------------------------------------------------------

#[test]
fn export_writes_one_generation_as_sorted_ustar_entries_owned_by_root_at_the_capture_time() {
    let h = Host::new("archive-layout");
    captured_efi(&h);
    let a = export(&h, &["efitest"]);
    let g = h.generations(UUID_EFI)[0].clone();
    let m = manifest_of(&h, UUID_EFI);
    let e = entries(&a);
    let names: Vec<&str> = e.iter().map(|(p, _, _)| p.as_str()).collect();
    let mut stored = dir_names(&h.vm_store(UUID_EFI).join(&g));
    stored.sort();
    let mut want = vec![format!("{UUID_EFI}/"), format!("{UUID_EFI}/{g}/")];
    want.extend(stored.iter().map(|n| format!("{UUID_EFI}/{g}/{n}")));
    assert_eq!(names, want);
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "entries are sorted");
    for (p, hd, data) in &e {
        assert!(hd.as_ustar().is_some(), "{p}: not a ustar header");
        assert_eq!((hd.uid().unwrap(), hd.gid().unwrap()), (0, 0), "{p}");
        assert_eq!(hd.username_bytes(), Some(&b""[..]), "{p}");
        assert_eq!(hd.groupname_bytes(), Some(&b""[..]), "{p}");
        assert_eq!(hd.mtime().unwrap() as i64, m["time_unix"].as_i64().unwrap());
        let dir = p.ends_with('/');
        assert_eq!(hd.mode().unwrap(), if dir { 0o700 } else { 0o600 }, "{p}");
        if !dir {
            let n = p.rsplit('/').next().unwrap();
            let on_disk = std::fs::read(h.vm_store(UUID_EFI).join(&g).join(n)).unwrap();
            assert!(*data == on_disk, "{p} differs from the stored file");
        }
    }
    // GNU tar reads it, and sha256sum -c agrees with it.
    let x = h.root.join("x");
    std::fs::create_dir_all(&x).unwrap();
    std::fs::write(h.root.join("a.tar"), &a).unwrap();
    let st = Command::new("tar")
        .arg("-xf")
        .arg(h.root.join("a.tar"))
        .arg("-C")
        .arg(&x)
        .status()
        .unwrap();
    assert!(st.success());
    assert!(sha256sum_check(&x.join(UUID_EFI).join(&g)));
}

/// A second host holding a copy of `h`'s store whose files belong to
/// someone else, with other modes and times.
fn copy_store_owned_by_others(h: &Host, test: &str) -> Host {
    let h2 = Host::new(test);
    let st = Command::new("cp")
        .arg("-a")
        .arg(&h.store)
        .arg(&h2.store)
        .status()
        .unwrap();
    assert!(st.success());
    let st = Command::new("sh")
        .arg("-c")
        .arg("find \"$0\" -type f -exec chmod 0644 {} + && find \"$0\" -exec touch -h -d '2001-02-03 04:05:06' {} +")
        .arg(&h2.store)
        .status()
        .unwrap();
    assert!(st.success());
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let st = Command::new("chown")
            .args(["-R", "65534:65534"])
            .arg(h2.store.join(UUID_EFI).join(&h.generations(UUID_EFI)[0]))
            .status()
            .unwrap();
        assert!(st.success());
    }
    h2
}

#[test]
fn the_same_generation_exports_to_the_same_bytes_every_time_to_stdout_or_a_file_and_on_another_host(
) {
    let h = Host::new("archive-same");
    captured_efi(&h);
    let a = export(&h, &["efitest"]);
    assert_eq!(export(&h, &["efitest"]), a, "a second run differs");
    let file = h.root.join("out/efitest.tar");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    let out = h.run(&["export", UUID_EFI, "-o", file.to_str().unwrap()], b"");
    assert_ok(&out);
    let g = h.generations(UUID_EFI)[0].clone();
    assert_eq!(
        stdout(&out),
        format!("{g} exported efitest ({UUID_EFI}) to {}\n", file.display())
    );
    assert_eq!(
        std::fs::read(&file).unwrap(),
        a,
        "-o FILE differs from stdout"
    );
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    assert_eq!(
        dir_names(file.parent().unwrap()),
        ["efitest.tar"],
        "a temporary left"
    );
    // Again over the file: replaced, the same.
    assert_ok(&h.run(&["export", "efitest", "-o", file.to_str().unwrap()], b""));
    assert_eq!(std::fs::read(&file).unwrap(), a);

    let h2 = copy_store_owned_by_others(&h, "archive-same-2");
    assert_eq!(export(&h2, &["efitest"]), a, "another host's copy differs");
}

#[test]
fn export_refuses_a_damaged_generation_and_names_the_newest_good_one() {
    let h = Host::new("archive-damaged");
    let (permall, _) = captured_efi(&h);
    let mut p2 = permall.clone();
    p2[200] ^= 1;
    h.put_state(UUID_EFI, &[("tpm2-00.permall", &p2)]);
    assert_ok(&h.hook("efitest", "stopped", "end", "-", &h.efi_xml()));
    let gens = h.generations(UUID_EFI);
    assert_eq!(gens.len(), 2);
    let nv = h.vm_store(UUID_EFI).join(&gens[1]).join("nvram.fd");
    // The NVRAM is linked from the first generation when unchanged: damage
    // the second's own copy only.
    let mut b = std::fs::read(&nv).unwrap();
    b[0] ^= 1;
    std::fs::remove_file(&nv).unwrap();
    std::fs::write(&nv, b).unwrap();

    let out = export_out(&h, &["efitest", "--generation", &gens[1]]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(out.stdout.is_empty(), "a byte written before verifying");
    let err = stderr(&out);
    assert!(err.contains("nvram.fd: checksum mismatch"), "{err}");
    assert!(
        err.contains(&format!(
            "the newest good one is {0}: export it with --generation {0}",
            gens[0]
        )),
        "{err}"
    );
    // Without --generation: the newest that verifies.
    let a = export(&h, &["efitest"]);
    assert_eq!(generation_dir(&a), format!("{UUID_EFI}/{}/", gens[0]));
}

#[test]
fn export_refuses_a_terminal_as_stdout() {
    let h = Host::new("archive-tty");
    captured_efi(&h);
    // `script` gives the program a pseudo-terminal as stdout.
    let cmd = format!("{} export efitest; echo rc=$?", bin());
    let out = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env("SWTPM_KEEPER_CONFIG", &h.conf)
        .output()
        .unwrap();
    let text = stdout(&out);
    assert!(
        text.contains("refusing to write a tar archive to a terminal"),
        "{text}"
    );
    assert!(text.contains("rc=1"), "{text}");
    assert!(
        !text.contains("ustar"),
        "archive bytes reached the terminal"
    );
}

#[test]
fn import_refuses_a_terminal_as_stdin() {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: import needs root (tests/run-all runs it as root)");
        return;
    }
    let h = Host::new("archive-tty-in");
    let cmd = format!("{} import - ; echo rc=$?", bin());
    let out = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env("SWTPM_KEEPER_CONFIG", &h.conf)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = stdout(&out);
    assert!(
        text.contains("refusing to read an archive from a terminal"),
        "{text}"
    );
    assert!(text.contains("rc=1"), "{text}");
    assert!(!h.store.exists());
}

// ---- import: round trips --------------------------------------------------

#[test]
fn export_then_import_into_an_empty_store_then_restore_gives_the_state_back() {
    let h = Host::new("archive-roundtrip");
    let (permall, nvram) = captured_efi(&h);
    let a = export(&h, &["efitest"]);
    let g = h.generations(UUID_EFI)[0].clone();

    let h2 = Host::new("archive-roundtrip-2");
    let out = import(&h2, &["-"], &a);
    assert_ok(&out);
    let gens = h2.generations(UUID_EFI);
    assert_eq!(gens.len(), 1);
    assert!(gens[0].starts_with("00000001-"), "{gens:?}");
    assert_eq!(
        stdout(&out).lines().next().unwrap(),
        format!(
            "{} imported efitest: TPM and NVRAM from generation {g} of efitest ({UUID_EFI}), captured {} on {}",
            gens[0],
            manifest_of(&h, UUID_EFI)["time"].as_str().unwrap(),
            manifest_of(&h, UUID_EFI)["host"].as_str().unwrap()
        )
    );
    assert_eq!(stdout(&out).lines().count(), 1);
    let m = manifest_of(&h2, UUID_EFI);
    assert_eq!(m["imported_from"]["uuid"], UUID_EFI);
    assert_eq!(m["imported_from"]["generation"], g.as_str());
    assert!(m["imported_from"]["host"].is_string() && m["imported_from"]["time"].is_string());
    // Not defined here: the archive's domain.xml, nothing beside it.
    assert!(m["imported_from"].get("domain_xml").is_none(), "{m}");
    assert_ok(&h2.run(&["verify"], b""));
    assert!(sha256sum_check(&h2.vm_store(UUID_EFI).join(&gens[0])));

    // Defined again from the stored XML, then restored.
    std::fs::write(h2.etc_qemu.join("efitest.xml"), h2.efi_xml()).unwrap();
    assert_ok(&h2.run(&["restore", "efitest"], b""));
    assert_eq!(
        std::fs::read(h2.state_dir(UUID_EFI).join("tpm2-00.permall")).unwrap(),
        permall
    );
    assert_eq!(std::fs::read(h2.nvram_path()).unwrap(), nvram);
    // The export of the imported generation imports again as unchanged.
    let again = export(&h2, &["efitest"]);
    let out = import(&h2, &["-"], &again);
    assert_ok(&out);
    assert!(
        stdout(&out).contains(" unchanged efitest"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn import_to_another_vm_stores_the_generation_under_its_uuid_with_its_definition() {
    let h = Host::new("archive-to");
    let (permall, nvram) = captured_efi(&h);
    let a = export(&h, &["efitest"]);
    let archive_xml = std::fs::read(
        h.vm_store(UUID_EFI)
            .join(&h.generations(UUID_EFI)[0])
            .join("domain.xml"),
    )
    .unwrap();

    let h2 = Host::new("archive-to-2");
    define(
        &h2,
        "restore_efitest",
        OTHER_UUID,
        Some(SECRET),
        Some("2.0"),
    );
    let file = h2.root.join("efitest.tar");
    std::fs::write(&file, &a).unwrap();
    let out = import(
        &h2,
        &[file.to_str().unwrap(), "--to", "restore_efitest"],
        b"",
    );
    assert_ok(&out);
    assert!(
        h2.generations(UUID_EFI).is_empty(),
        "stored under the archive's UUID"
    );
    let gens = h2.generations(OTHER_UUID);
    assert_eq!(gens.len(), 1);
    let gdir = h2.vm_store(OTHER_UUID).join(&gens[0]);
    let m = manifest_of(&h2, OTHER_UUID);
    assert_eq!(
        (m["uuid"].as_str(), m["name"].as_str()),
        (Some(OTHER_UUID), Some("restore_efitest"))
    );
    assert_eq!(m["imported_from"]["uuid"], UUID_EFI);
    assert_eq!(m["imported_from"]["name"], "efitest");
    assert_eq!(m["imported_from"]["domain_xml"], "origin-domain.xml");
    assert_eq!(
        std::fs::read(gdir.join("origin-domain.xml")).unwrap(),
        archive_xml
    );
    assert!(sha256sum_check(&gdir));
    // show --xml gives the VM that owns it now.
    let out = h2.run(&["show", "restore_efitest", "--xml"], b"");
    assert_ok(&out);
    assert_eq!(
        out.stdout,
        std::fs::read(h2.etc_qemu.join("restore_efitest.xml")).unwrap()
    );
    // By UUID too: the same state, so nothing new.
    let out = import(&h2, &[file.to_str().unwrap(), "--to", OTHER_UUID], b"");
    assert_ok(&out);
    assert_eq!(
        stdout(&out),
        format!(
            "{} unchanged restore_efitest: the store holds this state already\n",
            gens[0]
        )
    );
    assert_eq!(h2.generations(OTHER_UUID).len(), 1);
    // The next start puts it back where that VM's libvirt looks.
    let xml = std::fs::read(h2.etc_qemu.join("restore_efitest.xml")).unwrap();
    assert_ok(&h2.hook("restore_efitest", "prepare", "begin", "-", &xml));
    assert_eq!(
        std::fs::read(h2.state_dir(OTHER_UUID).join("tpm2-00.permall")).unwrap(),
        permall
    );
    assert_eq!(
        std::fs::read(h2.nvram_dir.join("restore_efitest_VARS.fd")).unwrap(),
        nvram
    );
}

#[test]
fn importing_the_same_archive_twice_adds_nothing_the_second_time() {
    let h = Host::new("archive-twice");
    captured_efi(&h);
    let a = export(&h, &["efitest"]);
    let h2 = Host::new("archive-twice-2");
    let first = import(&h2, &["-"], &a);
    assert_ok(&first);
    let before = snapshot(&h2.store);
    let second = import(&h2, &["-"], &a);
    assert_ok(&second);
    let g = h2.generations(UUID_EFI);
    assert_eq!(g.len(), 1);
    assert_eq!(
        stdout(&second),
        format!(
            "{} unchanged efitest: the store holds this state already\n",
            g[0]
        )
    );
    assert_eq!(snapshot(&h2.store), before);
}

#[test]
fn import_to_a_vm_with_a_tpm_of_its_own_says_how_to_replace_it_and_touches_nothing_of_libvirt() {
    let h = Host::new("archive-own");
    captured_efi(&h);
    let a = export(&h, &["efitest"]);
    let h2 = Host::new("archive-own-2");
    define(
        &h2,
        "restore_efitest",
        OTHER_UUID,
        Some(SECRET),
        Some("2.0"),
    );
    let mut own = fixture("tpm2-00.permall.encrypted");
    own[200] ^= 1;
    h2.put_state(OTHER_UUID, &[("tpm2-00.permall", &own)]);
    let libvirt_before = snapshot(&h2.swtpm);
    let out = import(&h2, &["-", "--to", "restore_efitest"], &a);
    assert_ok(&out);
    assert_eq!(stdout(&out).lines().count(), 1, "{}", stdout(&out));
    assert!(
        stderr(&out)
            .contains("to use the imported one: swtpm-keeper restore restore_efitest --force"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        snapshot(&h2.swtpm),
        libvirt_before,
        "import touched libvirt's files"
    );
    assert!(!h2.nvram_dir.join("restore_efitest_VARS.fd").exists());
}

// ---- import: refusals about the target --------------------------------------

/// Import `a` into `h` with `args`: refused (exit 1), the store as it was.
#[track_caller]
fn refused(h: &Host, args: &[&str], a: &[u8]) -> String {
    let before = snapshot(&h.store);
    let out = import(h, args, a);
    assert_eq!(out.status.code(), Some(1), "not refused: {}", stderr(&out));
    assert!(out.stdout.is_empty(), "{}", stdout(&out));
    assert_eq!(snapshot(&h.store), before, "the store changed");
    stderr(&out)
}

#[test]
fn import_refuses_a_target_with_another_tpm_version_or_none_even_with_force() {
    let h = Host::new("archive-version");
    captured_efi(&h);
    let a = export(&h, &["efitest"]);
    let h2 = Host::new("archive-version-2");
    define(&h2, "v12", OTHER_UUID, Some(SECRET), Some("1.2"));
    define(
        &h2,
        "notpm",
        "77777777-8888-4777-8666-555555555555",
        None,
        None,
    );
    for force in [&[][..], &["--force"]] {
        let mut args = vec!["-", "--to", "v12"];
        args.extend_from_slice(force);
        let err = refused(&h2, &args, &a);
        assert!(
            err.contains("the archive holds a TPM 2.0 state, but VM v12 has a TPM 1.2")
                && err.contains("import it into a VM with a TPM 2.0"),
            "{err}"
        );
        let mut args = vec!["-", "--to", "notpm"];
        args.extend_from_slice(force);
        let err = refused(&h2, &args, &a);
        assert!(err.contains("has no emulator TPM"), "{err}");
    }
    // And with the store holding the VM already.
    assert_ok(&import(&h2, &["-"], &a));
    let err = refused(&h2, &["-", "--to", "v12"], &a);
    assert!(err.contains("TPM 1.2"), "{err}");
}

#[test]
fn import_refuses_another_encryption_secret_unless_forced() {
    let h = Host::new("archive-secret");
    captured_efi(&h);
    let a = export(&h, &["efitest"]);
    let h2 = Host::new("archive-secret-2");
    let other = "12121212-3434-4565-8787-909090909090";
    define(&h2, "restore_efitest", OTHER_UUID, Some(other), Some("2.0"));
    let err = refused(&h2, &["-", "--to", "restore_efitest"], &a);
    assert!(
        err.contains(&format!(
            "encrypted with libvirt secret {SECRET} but the domain now uses {other}"
        )) && err.contains(&format!(
            "Define libvirt secret {SECRET} here with its old value"
        )),
        "{err}"
    );
    let out = import(&h2, &["-", "--to", "restore_efitest", "--force"], &a);
    assert_ok(&out);
    assert_eq!(h2.generations(OTHER_UUID).len(), 1);
    // The store has the VM now: refused all the same, and nothing changes.
    let err = refused(&h2, &["-", "--to", "restore_efitest"], &a);
    assert!(err.contains("or add --force to import it anyway"), "{err}");
    // Without a secret at all: refused too.
    define(
        &h2,
        "plain",
        "77777777-8888-4777-8666-555555555555",
        None,
        Some("2.0"),
    );
    let err = refused(&h2, &["-", "--to", "plain"], &a);
    assert!(err.contains("but the domain now uses none"), "{err}");
}

#[test]
fn import_to_a_vm_libvirt_does_not_define_is_refused() {
    let h = Host::new("archive-undefined");
    captured_efi(&h);
    let a = export(&h, &["efitest"]);
    let h2 = Host::new("archive-undefined-2");
    let err = refused(&h2, &["-", "--to", "restore_efitest"], &a);
    assert!(
        err.contains("libvirt defines no VM restore_efitest here"),
        "{err}"
    );
    let err = refused(&h2, &["-", "--to", OTHER_UUID], &a);
    assert!(
        err.contains(&format!("libvirt defines no VM {OTHER_UUID}")),
        "{err}"
    );
}

#[test]
fn import_without_root_is_refused_with_a_clear_error() {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to drop it (tests/run-all runs it as root)");
        return;
    }
    let h = Host::new("archive-notroot");
    captured_efi(&h);
    let a = export(&h, &["efitest"]);
    let file = h.root.join("a.tar");
    std::fs::write(&file, &a).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(&h.root, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&h.conf, std::fs::Permissions::from_mode(0o644)).unwrap();
    let before = snapshot(&h.store);
    let out = run_with(
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                bin(),
                "import",
            ])
            .arg(&file)
            .env("SWTPM_KEEPER_CONFIG", &h.conf),
        b"",
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("import needs root"),
        "{}",
        stderr(&out)
    );
    assert_eq!(snapshot(&h.store), before);
}

// ---- import: hostile archives ------------------------------------------------

struct Hostile {
    what: &'static str,
    /// The archive, from a valid export's entries.
    make: fn(Vec<Raw>, &str) -> Vec<u8>,
    /// What the refusal says.
    says: &'static str,
}

fn with(mut v: Vec<Raw>, e: Raw) -> Vec<u8> {
    v.push(e);
    build(&v)
}

const HOSTILE: &[Hostile] = &[
    Hostile {
        what: "a symbolic link",
        make: |v, g| {
            with(
                v,
                Raw::of(&format!("{g}tpm2-00.volatilestate"), b'2', "/etc/shadow"),
            )
        },
        says: "is a symbolic link",
    },
    Hostile {
        what: "a hard link",
        make: |v, g| with(v, Raw::of(&format!("{g}x"), b'1', "/etc/shadow")),
        says: "is a hard link",
    },
    Hostile {
        what: "a character device",
        make: |v, g| with(v, Raw::of(&format!("{g}dev"), b'3', "")),
        says: "is a device",
    },
    Hostile {
        what: "a block device",
        make: |v, g| with(v, Raw::of(&format!("{g}dev"), b'4', "")),
        says: "is a device",
    },
    Hostile {
        what: "a FIFO",
        make: |v, g| with(v, Raw::of(&format!("{g}fifo"), b'6', "")),
        says: "is a FIFO",
    },
    Hostile {
        what: "a PAX header",
        make: |mut v, _| {
            v.insert(2, Raw::file("pax", b"30 mtime=1234567890.123456789\n"));
            v[2].kind = b'x';
            build(&v)
        },
        says: "is a PAX extended header",
    },
    Hostile {
        what: "a GNU long name",
        make: |mut v, _| {
            v.insert(2, Raw::file("././@LongLink", b"../../etc/passwd\0"));
            v[2].kind = b'L';
            build(&v)
        },
        says: "is a GNU long-name header",
    },
    Hostile {
        what: "an absolute path",
        make: |v, _| with(v, Raw::file("/etc/cron.d/x", b"x")),
        says: "an absolute path",
    },
    Hostile {
        what: "a path with ..",
        make: |v, g| with(v, Raw::file(&format!("{g}../../x"), b"x")),
        says: "`..`",
    },
    Hostile {
        what: "a third directory level",
        make: |v, g| with(v, Raw::of(&format!("{g}sub/"), b'5', "")),
        says: "only <uuid>/ and <uuid>/<generation>/ may be directories",
    },
    Hostile {
        what: "a file deeper down",
        make: |v, g| with(v, Raw::file(&format!("{g}sub/x"), b"x")),
        says: "deeper than",
    },
    Hostile {
        what: "a second VM",
        make: |v, g| {
            let other = g.replacen(UUID_EFI, OTHER_UUID, 1);
            with(v, Raw::file(&format!("{other}x"), b"x"))
        },
        says: "a second VM",
    },
    Hostile {
        what: "a second generation",
        make: |v, _| {
            let other = format!("{UUID_EFI}/00000009-20000101T000000Z/x");
            with(v, Raw::file(&other, b"x"))
        },
        says: "a second generation",
    },
    Hostile {
        what: "a duplicate name",
        make: |v, g| {
            let p = format!("{g}tpm2-00.permall");
            let d = data_of(&v, "/tpm2-00.permall").to_vec();
            with(v, Raw::file(&p, &d))
        },
        says: "is in the archive twice",
    },
    Hostile {
        what: "a size over max_file_size, never read",
        make: |v, g| {
            let mut e = Raw::file(&format!("{g}big"), b"");
            e.size = Some(1 << 40);
            let mut a = with(v, e);
            a.truncate(a.len() - 1024);
            a
        },
        says: "bytes is over max_file_size",
    },
    Hostile {
        what: "a checksum mismatch",
        make: |mut v, _| {
            let mut d = data_of(&v, "/tpm2-00.permall").to_vec();
            d[300] ^= 1;
            replace(&mut v, "/tpm2-00.permall", d);
            build(&v)
        },
        says: "tpm2-00.permall: checksum mismatch",
    },
    Hostile {
        what: "a file SHA256SUMS does not list",
        make: |v, g| with(v, Raw::file(&format!("{g}extra"), b"x")),
        says: "extra: not listed in SHA256SUMS",
    },
    Hostile {
        what: "no SHA256SUMS",
        make: |mut v, _| {
            v.retain(|e| !e.path.ends_with(b"/SHA256SUMS"));
            build(&v)
        },
        says: "has no SHA256SUMS",
    },
    Hostile {
        what: "a manifest that is not one (checksums made to match)",
        make: |mut v, _| {
            replace(&mut v, "/manifest.json", b"{\"format\": 1}".to_vec());
            resum(&mut v);
            build(&v)
        },
        says: "manifest.json: missing field",
    },
    Hostile {
        what: "a manifest of a newer format",
        make: |mut v, _| {
            let m = String::from_utf8(data_of(&v, "/manifest.json").to_vec()).unwrap();
            replace(
                &mut v,
                "/manifest.json",
                m.replacen("\"format\": 1", "\"format\": 9", 1).into_bytes(),
            );
            resum(&mut v);
            build(&v)
        },
        says: "newer than this swtpm-keeper",
    },
    Hostile {
        what: "a TPM state swtpm would refuse (checksums made to match)",
        make: |mut v, _| {
            replace(&mut v, "/tpm2-00.permall", vec![0x55; 100]);
            let m = String::from_utf8(data_of(&v, "/manifest.json").to_vec()).unwrap();
            let old = hex(&fixture("tpm2-00.permall.encrypted"));
            let m = m.replace(&old, &hex(&[0x55; 100]));
            replace(&mut v, "/manifest.json", m.into_bytes());
            resum(&mut v);
            build(&v)
        },
        says: "tpm2-00.permall:",
    },
    Hostile {
        what: "a manifest of another VM than its directory",
        make: |mut v, _| {
            let m = String::from_utf8(data_of(&v, "/manifest.json").to_vec()).unwrap();
            let m = m.replacen(
                &format!("\"uuid\": \"{UUID_EFI}\""),
                &format!("\"uuid\": \"{OTHER_UUID}\""),
                1,
            );
            replace(&mut v, "/manifest.json", m.into_bytes());
            resum(&mut v);
            build(&v)
        },
        says: "its manifest is of VM",
    },
    Hostile {
        what: "a manifest whose NVRAM path climbs out (a start may write there)",
        make: |mut v, _| {
            let m = String::from_utf8(data_of(&v, "/manifest.json").to_vec()).unwrap();
            let at = m.find("\"nvram\": {").unwrap();
            let path = m[at..].find("\"path\": \"").unwrap() + at + "\"path\": \"".len();
            let m = format!(
                "{}/var/lib/libvirt/qemu/nvram/../../../../etc/cron.d/{}",
                &m[..path],
                &m[path..]
            );
            replace(&mut v, "/manifest.json", m.into_bytes());
            resum(&mut v);
            build(&v)
        },
        says: "not a plain absolute path",
    },
    Hostile {
        what: "a UUID in capitals",
        make: |mut v, _| {
            for e in &mut v {
                let upper = UUID_EFI.to_uppercase();
                e.path.splice(..36, upper.bytes());
            }
            build(&v)
        },
        says: "not under a VM's UUID",
    },
    Hostile {
        what: "no tar at all",
        make: |_, _| vec![0x42; 4096],
        says: "not a readable tar archive",
    },
    Hostile {
        what: "an empty archive",
        make: |_, _| build(&[]),
        says: "it holds no generation",
    },
];

#[test]
fn every_hostile_archive_is_refused_with_its_reason_and_leaves_the_store_as_it_was() {
    let h = Host::new("archive-hostile");
    captured_efi(&h);
    let a = export(&h, &["efitest"]);
    let g = generation_dir(&a);
    // The valid archive, rebuilt by hand, imports: the test builds right.
    let h2 = Host::new("archive-hostile-2");
    assert_ok(&import(&h2, &["-"], &build(&raw_entries(&a))));
    let empty = Host::new("archive-hostile-3");
    for x in HOSTILE {
        let bad = (x.make)(raw_entries(&a), &g);
        for host in [&h2, &empty] {
            let before = snapshot(&host.store);
            let out = import(host, &["-"], &bad);
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(1), "{}: not refused: {err}", x.what);
            assert!(
                err.contains("refusing the archive on stdin"),
                "{}: {err}",
                x.what
            );
            assert!(err.contains(x.says), "{}: {err}", x.what);
            assert!(out.stdout.is_empty(), "{}", x.what);
            assert_eq!(
                snapshot(&host.store),
                before,
                "{}: the store changed",
                x.what
            );
        }
    }
}

#[test]
fn an_nvram_path_that_no_start_writes_to_may_be_anything() {
    // A store the capture did not copy (a network image, say): nothing
    // is ever written where the manifest says it was.
    let h = Host::new("archive-nvram-path");
    captured_efi(&h);
    let a = export(&h, &["efitest"]);
    let mut v = raw_entries(&a);
    v.retain(|e| !e.path.ends_with(b"/nvram.fd"));
    let m: serde_json::Value = serde_json::from_slice(data_of(&v, "/manifest.json")).unwrap();
    let mut m = m;
    m["nvram"]["path"] = "pool/image".into();
    m["nvram"]["file"] = serde_json::Value::Null;
    m["files"]
        .as_array_mut()
        .unwrap()
        .retain(|f| f["role"] != "nvram");
    replace(
        &mut v,
        "/manifest.json",
        serde_json::to_vec_pretty(&m).unwrap(),
    );
    resum(&mut v);
    let h2 = Host::new("archive-nvram-path-2");
    let out = import(&h2, &["-"], &build(&v));
    assert_ok(&out);
    assert!(
        stdout(&out).contains(": TPM from generation"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn an_archive_over_max_generation_size_is_refused_before_its_rest_is_read() {
    let h = Host::new("archive-total");
    captured_efi(&h);
    let a = export(&h, &["efitest"]);
    let g = generation_dir(&a);
    let h2 = Host::with_config(
        "archive-total-2",
        "max_file_size = 700000\nmax_generation_size = 1048576\n",
    );
    let mut v = raw_entries(&a);
    for i in 0..3 {
        v.push(Raw::file(&format!("{g}pad{i}"), &vec![0; 600_000]));
    }
    // The last entry claims more than is there: the bound comes first.
    let mut a = build(&v);
    a.truncate(a.len() - 1024 - 512 * 100);
    let err = refused(&h2, &["-"], &a);
    assert!(err.contains("raise max_generation_size"), "{err}");
}

// ---- the 0.1.0 store --------------------------------------------------------

#[test]
fn every_0_1_0_generation_exports_and_imports_into_an_empty_store() {
    let h = host_with_0_1_0_store("archive-compat");
    let h2 = Host::new("archive-compat-2");
    let mut n = 0;
    for uuid in dir_names(&h.store) {
        for g in h.generations(&uuid) {
            let a = export(&h, &[&uuid, "--generation", &g]);
            let out = import(&h2, &["-"], &a);
            assert_ok(&out);
            let mine = h2.generations(&uuid).pop().unwrap();
            let theirs: PathBuf = h.vm_store(&uuid).join(&g);
            for f in dir_names(&theirs) {
                if f != "manifest.json" && f != "SHA256SUMS" {
                    let got = std::fs::read(h2.vm_store(&uuid).join(&mine).join(&f)).unwrap();
                    assert!(
                        got == std::fs::read(theirs.join(&f)).unwrap(),
                        "{uuid} {g} {f}"
                    );
                }
            }
            n += 1;
        }
    }
    assert_eq!(n, 6);
    // The bytes are pinned: a 0.1.0 generation exports as it did when
    // export was written (the fuzzer's seed, tests/fixtures/archive).
    let golden =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/archive/barsB1-0.1.0.tar");
    assert!(
        export(&h, &["barsB1"]) == std::fs::read(golden).unwrap(),
        "the archive of a 0.1.0 generation changed"
    );
    let out = h2.run(&["verify"], b"");
    assert_ok(&out);
    assert!(
        stdout(&out).contains("6 generations verified, 0 bad, in 5 VMs"),
        "{}",
        stdout(&out)
    );
}

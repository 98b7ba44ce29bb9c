//! `metrics`: the Prometheus text that node_exporter's textfile collector
//! reads, from the real binary against a fixture host: one series per VM
//! that libvirt defines with an emulator TPM, values that follow what the
//! store holds and what failed, label values escaped, and the file the
//! capture timer's pass writes.

mod common;

use common::*;
use std::path::PathBuf;

/// A fixture host: its libvirt run and secrets directories are its own
/// (the Host's configuration), so nothing of the machine shows up.
fn host(test: &str) -> Host {
    Host::new(test)
}

/// libvirt defines the transient fixture VM (tpmtrans, a plain TPM 2.0).
fn define_tpmtrans(h: &Host) {
    std::fs::write(
        h.etc_qemu.join("tpmtrans.xml"),
        fixture("tpm2-transient.stopped.xml"),
    )
    .unwrap();
}

fn metrics(h: &Host) -> String {
    let out = h.run(&["metrics"], b"");
    assert_ok(&out);
    String::from_utf8(out.stdout).unwrap()
}

/// The value of the series that starts with `prefix` (name and labels).
fn value(text: &str, prefix: &str) -> i64 {
    let line = text
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix} in\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

fn vm_value(text: &str, metric: &str, uuid: &str) -> i64 {
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{metric}{{")) && l.contains(&format!("uuid=\"{uuid}\"")))
        .unwrap_or_else(|| panic!("no {metric} for {uuid} in\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn a_vm_never_captured_has_a_series_with_time_zero_and_is_not_protected() {
    let h = host("metrics-never");
    define_tpmtrans(&h);
    let t = metrics(&h);
    let m = "swtpm_keeper_vm_last_capture_timestamp_seconds";
    assert_eq!(vm_value(&t, m, UUID_TRANS), 0);
    assert_eq!(vm_value(&t, "swtpm_keeper_vm_generations", UUID_TRANS), 0);
    assert_eq!(vm_value(&t, "swtpm_keeper_vm_protected", UUID_TRANS), 0);
    assert_eq!(value(&t, "swtpm_keeper_vms "), 1);
    assert_eq!(value(&t, "swtpm_keeper_store_vms "), 0);
    assert!(t.contains("{vm=\"tpmtrans\",uuid=\"11111111-2222-3333-4444-555555555555\"}"));
    assert_eq!(verdict(&t, UUID_TRANS), "no-state-yet", "never started");
    // Once it has a TPM state, the store lacking it is check's FIX.
    h.put_state(
        UUID_TRANS,
        &[("tpm2-00.permall", &fixture("tpm2-00.permall.plain"))],
    );
    assert_eq!(verdict(&metrics(&h), UUID_TRANS), "never-captured");
}

/// The `verdict` label of the VM's verdict series (there is one).
fn verdict(text: &str, uuid: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("swtpm_keeper_vm_verdict{") && l.contains(uuid))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].ends_with("\"} 1"), "{}", lines[0]);
    let v = lines[0].split(",verdict=\"").nth(1).unwrap();
    v.trim_end_matches("\"} 1").to_owned()
}

#[test]
fn a_vm_whose_encryption_secret_libvirt_lacks_is_not_protected_and_says_why() {
    let h = host("metrics-secret");
    std::fs::write(h.etc_qemu.join("efitest.xml"), h.efi_xml()).unwrap();
    h.put_state(
        UUID_EFI,
        &[("tpm2-00.permall", &fixture("tpm2-00.permall.encrypted"))],
    );
    assert_ok(&h.hook("efitest", "stopped", "end", "-", &h.efi_xml()));
    let t = metrics(&h);
    assert_eq!(vm_value(&t, "swtpm_keeper_vm_generations", UUID_EFI), 1);
    assert_eq!(vm_value(&t, "swtpm_keeper_vm_protected", UUID_EFI), 0);
    assert_eq!(verdict(&t, UUID_EFI), "secret-missing");
}

#[test]
fn a_vm_without_a_tpm_or_only_in_the_store_has_no_series_but_counts_in_the_store() {
    let h = host("metrics-store-only");
    h.put_state(
        UUID_TRANS,
        &[("tpm2-00.permall", &fixture("tpm2-00.permall.plain"))],
    );
    assert_ok(&h.stop_transient());
    std::fs::write(h.etc_qemu.join("notpm.xml"), fixture("no-tpm.stopped.xml")).unwrap();
    let t = metrics(&h);
    assert!(!t.contains("uuid=\""), "no VM defined with a TPM:\n{t}");
    assert_eq!(value(&t, "swtpm_keeper_vms "), 0);
    assert_eq!(value(&t, "swtpm_keeper_store_vms "), 1);
    assert_eq!(value(&t, "swtpm_keeper_store_generations "), 1);
    assert!(value(&t, "swtpm_keeper_store_bytes ") > 0);
}

#[test]
fn a_captured_vm_shows_its_capture_time_generations_bytes_and_is_protected() {
    let h = host("metrics-captured");
    define_tpmtrans(&h);
    h.put_state(
        UUID_TRANS,
        &[("tpm2-00.permall", &fixture("tpm2-00.permall.plain"))],
    );
    let before = now();
    assert_ok(&h.stop_transient());
    let t = metrics(&h);
    let when = vm_value(
        &t,
        "swtpm_keeper_vm_last_capture_timestamp_seconds",
        UUID_TRANS,
    );
    assert!(
        when >= before && when <= now(),
        "{when} not in [{before}, now]"
    );
    assert_eq!(vm_value(&t, "swtpm_keeper_vm_generations", UUID_TRANS), 1);
    let bytes = vm_value(&t, "swtpm_keeper_vm_bytes", UUID_TRANS);
    assert!(
        bytes > fixture("tpm2-00.permall.plain").len() as i64,
        "{bytes}"
    );
    assert_eq!(value(&t, "swtpm_keeper_store_bytes "), bytes);
    assert_eq!(vm_value(&t, "swtpm_keeper_vm_protected", UUID_TRANS), 1);
    let f = "swtpm_keeper_vm_capture_failure_timestamp_seconds";
    assert_eq!(vm_value(&t, f, UUID_TRANS), 0);
    assert_eq!(verdict(&t, UUID_TRANS), "ok");
    let written = value(&t, "swtpm_keeper_metrics_timestamp_seconds ");
    assert!(written >= when, "{written}");
}

#[test]
fn a_failed_capture_shows_its_time_until_the_next_good_capture_clears_it() {
    let h = host("metrics-failure");
    define_tpmtrans(&h);
    let good = fixture("tpm2-00.permall.plain");
    h.put_state(UUID_TRANS, &[("tpm2-00.permall", &good)]);
    assert_ok(&h.stop_transient());
    let before = now();
    h.put_state(UUID_TRANS, &[("tpm2-00.permall", b"not a swtpm blob")]);
    assert_ok(&h.stop_transient());
    let t = metrics(&h);
    let f = "swtpm_keeper_vm_capture_failure_timestamp_seconds";
    let failed = vm_value(&t, f, UUID_TRANS);
    assert!(failed >= before && failed <= now(), "{failed}\n{t}");
    assert_eq!(vm_value(&t, "swtpm_keeper_vm_protected", UUID_TRANS), 0);
    assert_eq!(vm_value(&t, "swtpm_keeper_vm_generations", UUID_TRANS), 1);
    assert_eq!(verdict(&t, UUID_TRANS), "failing");

    let mut changed = good.clone();
    changed[100] ^= 1;
    h.put_state(UUID_TRANS, &[("tpm2-00.permall", &changed)]);
    assert_ok(&h.stop_transient());
    let t = metrics(&h);
    assert_eq!(vm_value(&t, f, UUID_TRANS), 0, "{t}");
    assert_eq!(vm_value(&t, "swtpm_keeper_vm_protected", UUID_TRANS), 1);
    assert_eq!(vm_value(&t, "swtpm_keeper_vm_generations", UUID_TRANS), 2);
}

#[test]
fn a_transient_vm_gone_after_a_failed_capture_keeps_its_series_but_is_not_counted_as_defined() {
    let h = host("metrics-gone");
    h.put_state(UUID_TRANS, &[("tpm2-00.permall", b"not a swtpm blob")]);
    let before = now();
    assert_ok(&h.stop_transient());
    let t = metrics(&h);
    let f = "swtpm_keeper_vm_capture_failure_timestamp_seconds";
    assert!(vm_value(&t, f, UUID_TRANS) >= before, "{t}");
    assert_eq!(verdict(&t, UUID_TRANS), "failing");
    assert_eq!(value(&t, "swtpm_keeper_vms "), 0, "libvirt has no such VM");
}

#[test]
fn a_damaged_failure_record_still_shows_a_failure_at_time_1() {
    let h = host("metrics-damaged");
    define_tpmtrans(&h);
    let good = fixture("tpm2-00.permall.plain");
    h.put_state(UUID_TRANS, &[("tpm2-00.permall", &good)]);
    assert_ok(&h.stop_transient());
    let dir = h.run_dir().join("failures");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{UUID_TRANS}.json")), b"{ torn").unwrap();
    let t = metrics(&h);
    let f = "swtpm_keeper_vm_capture_failure_timestamp_seconds";
    assert_eq!(vm_value(&t, f, UUID_TRANS), 1, "0 would say: none\n{t}");
    assert_eq!(vm_value(&t, "swtpm_keeper_vm_protected", UUID_TRANS), 0);
}

/// A label value in the text format: `"`, then characters other than `\`
/// and `"`, or `\\`, `\"`, `\n`; then `"`. Returns the rest after it.
fn label_value(s: &str) -> Result<&str, String> {
    let mut chars = s
        .strip_prefix('"')
        .ok_or("no opening quote")?
        .char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok(&s[i + 2..]),
            '\n' => return Err("a raw newline".into()),
            '\\' => match chars.next() {
                Some((_, '\\' | '"' | 'n')) => {}
                other => return Err(format!("a bad escape {other:?}")),
            },
            _ => {}
        }
    }
    Err("no closing quote".into())
}

/// One sample line: `name{label="value",...} number`, as the format says.
fn valid_sample(line: &str) -> Result<(), String> {
    let name_end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..name_end];
    let ok_name = |n: &str| {
        n.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    if !ok_name(name) {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut rest = &line[name_end..];
    if let Some(mut labels) = rest.strip_prefix('{') {
        loop {
            let eq = labels.find('=').ok_or("no = in a label")?;
            if !ok_name(&labels[..eq]) {
                return Err(format!("bad label name {:?}", &labels[..eq]));
            }
            labels = label_value(&labels[eq + 1..])?;
            match labels.strip_prefix(',') {
                Some(more) => labels = more,
                None => break,
            }
        }
        rest = labels.strip_prefix('}').ok_or("no closing brace")?;
    }
    let v = rest.strip_prefix(' ').ok_or("no space before the value")?;
    v.parse::<f64>()
        .map(|_| ())
        .map_err(|e| format!("value {v:?}: {e}"))
}

#[test]
fn a_vm_name_with_quotes_backslashes_newlines_and_unicode_is_escaped_in_labels() {
    let h = host("metrics-escaping");
    let name = "we\"ird\\vm\nline two — ünïcødé 🔐";
    let xml = String::from_utf8(fixture("tpm2-transient.stopped.xml"))
        .unwrap()
        .replace(
            "<name>tpmtrans</name>",
            "<name>we\"ird\\vm\nline two — ünïcødé 🔐</name>",
        );
    std::fs::write(h.etc_qemu.join("weird.xml"), xml).unwrap();
    let t = metrics(&h);
    let want = "{vm=\"we\\\"ird\\\\vm\\nline two — ünïcødé 🔐\",uuid=\"11111111-2222-3333-4444-555555555555\"}";
    assert_eq!(
        t.matches(want).count(),
        5,
        "{name:?} not escaped as {want} in\n{t}"
    );
    let labels = want.trim_end_matches('}');
    assert!(t.contains(&format!("swtpm_keeper_vm_verdict{labels},verdict=\"")));
    for line in t.lines().filter(|l| !l.starts_with('#')) {
        valid_sample(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    }
    // The checker itself refuses what an unescaped name would give.
    assert!(valid_sample("m{vm=\"a\"b\"} 1").is_err());
    assert!(valid_sample("m{vm=\"a\\b\"} 1").is_err());
    assert!(valid_sample("m{vm=\"a\nb\"} 1").is_err());
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn metrics_o_writes_the_file_mode_0644_and_nothing_else_beside_it() {
    let h = host("metrics-o");
    define_tpmtrans(&h);
    let dir = h.root.join("collector");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("swtpm-keeper.prom");
    let out = h.run(&["metrics", "-o", file.to_str().unwrap()], b"");
    assert_ok(&out);
    assert!(out.stdout.is_empty(), "{:?}", out.stdout);
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(value(&text, "swtpm_keeper_vms "), 1);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644);
    assert_eq!(dir_names(&dir), ["swtpm-keeper.prom"]);
}

/// The timer's pass, `capture --all`, with no VM running.
fn capture_all(h: &Host) -> std::process::Output {
    h.run(&["capture", "--all"], b"")
}

fn textfile(h: &Host) -> PathBuf {
    h.textfile_dir().join("swtpm-keeper.prom")
}

#[test]
fn the_capture_pass_writes_the_metrics_file_where_node_exporter_reads_when_that_dir_exists() {
    let h = host("metrics-pass");
    define_tpmtrans(&h);
    assert_ok(&capture_all(&h));
    assert!(!textfile(&h).exists(), "no textfile dir, no file");
    std::fs::create_dir_all(h.textfile_dir()).unwrap();
    assert_ok(&capture_all(&h));
    let text = std::fs::read_to_string(textfile(&h)).unwrap();
    assert_eq!(value(&text, "swtpm_keeper_vms "), 1);
    // A named capture is not the timer's pass: it leaves the file alone.
    std::fs::remove_file(textfile(&h)).unwrap();
    h.put_state(
        UUID_TRANS,
        &[("tpm2-00.permall", &fixture("tpm2-00.permall.plain"))],
    );
    assert_ok(&h.run(&["capture", "tpmtrans"], b""));
    assert!(!textfile(&h).exists());
}

#[test]
fn a_capture_pass_that_cannot_write_metrics_file_exits_1_and_says_why() {
    let h = host("metrics-pass-fails");
    let missing = h.root.join("no-such-dir/swtpm-keeper.prom");
    let mut conf = std::fs::read_to_string(&h.conf).unwrap();
    conf.push_str(&format!("metrics_file = {missing:?}\n"));
    std::fs::write(&h.conf, conf).unwrap();
    let out = capture_all(&h);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("metrics for Prometheus NOT written") && err.contains("no-such-dir"),
        "{err}"
    );
}

//! `swtpm-keeper metrics [-o FILE]`: what protects each VM's TPM, in the
//! Prometheus text exposition format (version 0.0.4), for node_exporter's
//! textfile collector. One series per VM that libvirt defines with an
//! emulator TPM, and the store's totals. With `-o` the file is replaced
//! whole (temporary, fsync, rename, directory fsync): the collector must
//! never read half a file.

use std::fmt::Write as _;
use std::io::Write;
use std::path::Path;

use crate::config::Config;
use crate::coverage::{self, Found, VmCoverage};
use crate::error::{Error, Result};
use crate::fsutil;

/// One VM's series.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmSeries {
    pub name: String,
    pub uuid: String,
    /// Unix time of the newest good capture; None: never captured.
    pub last_capture: Option<i64>,
    pub generations: u64,
    pub bytes: u64,
    /// Unix time of the remembered capture failure; None: none.
    pub failure: Option<i64>,
    /// The survey's verdict: its TPM is safe in the store.
    pub protected: bool,
    /// `check`'s word for the VM (the worst that applies): `ok`,
    /// `stale`, `never-captured`, `no-state-yet`, `failing`, ...
    pub verdict: &'static str,
}

/// Everything one exposition says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Every VM with an emulator TPM on this host (the survey's set), and
    /// any libvirt forgot (a transient VM that stopped) whose last capture
    /// failed: that failure must stay in sight.
    pub vms: Vec<VmSeries>,
    /// VMs that libvirt defines or runs with an emulator TPM.
    pub tpm_vms: u64,
    /// What the store holds, for every VM in it (also ones not defined here).
    pub store_vms: u64,
    pub store_generations: u64,
    pub store_bytes: u64,
    /// When this exposition was made (Unix time).
    pub written: i64,
}

/// A metric family: name, help text, and its value for a VM.
type PerVm = (&'static str, &'static str, fn(&VmSeries) -> i64);

const PER_VM: [PerVm; 5] = [
    (
        "swtpm_keeper_vm_last_capture_timestamp_seconds",
        "Unix time of the VM's newest good TPM capture (0: never captured).",
        |v| v.last_capture.unwrap_or(0),
    ),
    (
        "swtpm_keeper_vm_generations",
        "Generations (captured TPM states) the store holds for the VM.",
        |v| v.generations as i64,
    ),
    (
        "swtpm_keeper_vm_bytes",
        "Bytes the store holds for the VM (every generation).",
        |v| v.bytes as i64,
    ),
    (
        "swtpm_keeper_vm_capture_failure_timestamp_seconds",
        "Unix time of the VM's remembered capture failure (0: none; a good capture clears it).",
        |v| v.failure.unwrap_or(0),
    ),
    (
        "swtpm_keeper_vm_protected",
        "1 if the VM's TPM is safe in the store (captured, no failure, secret present), else 0.",
        |v| i64::from(v.protected),
    ),
];

/// `check`'s verdict as a state set: one series per VM, value 1, the
/// verdict in a label (alerts select on it; a new verdict needs no new
/// metric).
const VERDICT: (&str, &str) = (
    "swtpm_keeper_vm_verdict",
    "check's verdict for the VM, in the verdict label (ok, stale, never-captured, \
     no-state-yet, failing, secret-missing, secret-changed, store-unreadable); always 1.",
);

/// A label value as the text format wants it: backslash, double quote and
/// line feed escaped; everything else (Unicode included) as it is.
pub fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

fn family(text: &mut String, name: &str, help: &str) {
    // Writing to a String cannot fail.
    let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} gauge");
}

/// The exposition: each family's HELP and TYPE, then its series (families
/// never interleave, as the format requires), VMs sorted by name and UUID.
pub fn render(s: &Snapshot) -> String {
    let mut vms: Vec<&VmSeries> = s.vms.iter().collect();
    vms.sort_by(|a, b| (&a.name, &a.uuid).cmp(&(&b.name, &b.uuid)));
    let labels: Vec<String> = vms
        .iter()
        .map(|v| {
            format!(
                "{{vm=\"{}\",uuid=\"{}\"}}",
                escape_label(&v.name),
                escape_label(&v.uuid)
            )
        })
        .collect();
    let mut text = String::with_capacity(256 * (vms.len() + 4) * PER_VM.len());
    for (name, help, value) in PER_VM {
        family(&mut text, name, help);
        for (v, l) in vms.iter().zip(&labels) {
            let _ = writeln!(text, "{name}{l} {}", value(v));
        }
    }
    let (name, help) = VERDICT;
    family(&mut text, name, help);
    for (v, l) in vms.iter().zip(&labels) {
        let l = l.trim_end_matches('}');
        let verdict = escape_label(v.verdict);
        let _ = writeln!(text, "{name}{l},verdict=\"{verdict}\"}} 1");
    }
    for (name, help, value) in [
        (
            "swtpm_keeper_vms",
            "VMs that libvirt defines or runs with an emulator TPM on this host.",
            s.tpm_vms,
        ),
        (
            "swtpm_keeper_store_vms",
            "VMs the store holds TPM states for.",
            s.store_vms,
        ),
        (
            "swtpm_keeper_store_generations",
            "Generations the store holds, every VM together.",
            s.store_generations,
        ),
        (
            "swtpm_keeper_store_bytes",
            "Bytes the store's generations hold, every VM together.",
            s.store_bytes,
        ),
    ] {
        family(&mut text, name, help);
        let _ = writeln!(text, "{name} {value}");
    }
    let name = "swtpm_keeper_metrics_timestamp_seconds";
    family(&mut text, name, "Unix time this file was written.");
    let _ = writeln!(text, "{name} {}", s.written);
    text
}

/// Replace `path` with `text`, readable by the collector (0644, whatever
/// the umask: the capture service runs with UMask=0077). The temporary
/// (`.NAME.tmp-PID`) does not end in `.prom`: the collector never takes it.
pub fn write_file(path: &Path, text: &str) -> Result<()> {
    fsutil::replace_at(path, text.as_bytes(), 0o644).map(drop)
}

/// `swtpm-keeper metrics [-o FILE]`: exit 0 when written.
pub fn run(cfg: &Config, output: Option<&Path>, out: &mut dyn Write) -> Result<i32> {
    let text = render(&snapshot(cfg, unix_now()));
    emit(&text, output, out)?;
    Ok(0)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// What the survey found, as series. A file it could not read is logged
/// (the VMs it found are still shown: a partial picture beats none).
pub fn snapshot(cfg: &Config, now: i64) -> Snapshot {
    let survey = coverage::survey(cfg, now);
    for p in &survey.problems {
        log::warn!("metrics: {p}");
    }
    Snapshot {
        vms: survey.vms.iter().map(series).collect(),
        tpm_vms: survey.vms.iter().filter(|c| c.found != Found::Gone).count() as u64,
        store_vms: survey.store.vms as u64,
        store_generations: survey.store.generations as u64,
        store_bytes: survey.store.bytes,
        written: now,
    }
}

fn series(c: &VmCoverage) -> VmSeries {
    VmSeries {
        name: c.name.clone(),
        uuid: c.uuid.to_string(),
        last_capture: c.newest.as_ref().map(|n| n.time_unix),
        generations: c.generations as u64,
        bytes: c.bytes,
        // A damaged record says a capture failed, not when: 1 (not 0,
        // which means none).
        failure: c.failure.as_ref().map(|f| f.time_unix().unwrap_or(1)),
        protected: c.protected,
        verdict: c.verdict.as_str(),
    }
}

/// After a `capture --all` pass (the timer's), write `metrics_file` when
/// there is one. False when it cannot be written, which the pass turns
/// into exit 1: the timer's unit then fails (`systemctl --failed`), seen
/// also by operators who watch systemd rather than the metrics, and the
/// metrics would otherwise go on showing an old picture with no sign.
/// It runs after every VM was captured, so it never costs a capture.
pub fn write_after_pass(cfg: &Config) -> bool {
    let Some(path) = cfg.metrics_file() else {
        return true;
    };
    let text = render(&snapshot(cfg, unix_now()));
    match write_file(&path, &text) {
        Ok(()) => true,
        Err(e) => {
            log::error!(
                "metrics for Prometheus NOT written: {e} (the TPM captures are not affected; \
                 make the directory writable, or set metrics_file in swtpm-keeper.conf)"
            );
            false
        }
    }
}

/// Print the exposition, or with `output` write it there.
pub fn emit(text: &str, output: Option<&Path>, out: &mut dyn Write) -> Result<()> {
    match output {
        Some(p) => write_file(p, text),
        None => out
            .write_all(text.as_bytes())
            .map_err(|e| Error::failed(format!("cannot write the output: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, uuid: &str) -> VmSeries {
        VmSeries {
            name: name.into(),
            uuid: uuid.into(),
            verdict: "ok",
            ..VmSeries::default()
        }
    }

    #[test]
    fn label_values_escape_backslash_quote_and_newline_and_keep_unicode() {
        assert_eq!(escape_label("plain"), "plain");
        assert_eq!(escape_label("a\\b\"c\nd — ü🔐"), "a\\\\b\\\"c\\nd — ü🔐");
        assert_eq!(
            escape_label("\\n"),
            "\\\\n",
            "a backslash-n is two characters"
        );
    }

    #[test]
    fn every_family_has_help_and_type_once_and_a_series_per_vm() {
        let s = Snapshot {
            vms: vec![vm("b", "2"), vm("a", "1")],
            tpm_vms: 2,
            ..Snapshot::default()
        };
        let text = render(&s);
        let per_vm = PER_VM.iter().map(|f| (f.0, f.1)).chain([VERDICT]);
        for (name, _) in per_vm {
            assert_eq!(
                text.matches(&format!("# HELP {name} ")).count(),
                1,
                "{name}"
            );
            assert_eq!(text.matches(&format!("# TYPE {name} gauge\n")).count(), 1);
            let series: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with(&format!("{name}{{")))
                .collect();
            assert_eq!(series.len(), 2, "{name}: {series:?}");
            assert!(series[0].contains("vm=\"a\""), "sorted by name: {series:?}");
        }
        for name in [
            "swtpm_keeper_vms",
            "swtpm_keeper_store_vms",
            "swtpm_keeper_store_generations",
            "swtpm_keeper_store_bytes",
            "swtpm_keeper_metrics_timestamp_seconds",
        ] {
            assert_eq!(text.matches(&format!("# TYPE {name} gauge\n")).count(), 1);
            assert_eq!(
                text.lines()
                    .filter(|l| l.starts_with(&format!("{name} ")))
                    .count(),
                1,
                "{name}"
            );
        }
        assert!(text.contains("\nswtpm_keeper_vms 2\n"), "{text}");
    }

    #[test]
    fn a_family_series_follow_its_type_line_without_another_family_between() {
        let s = Snapshot {
            vms: vec![vm("a", "1"), vm("b", "2")],
            ..Snapshot::default()
        };
        let mut current = String::new();
        for l in render(&s).lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                current = rest.split(' ').next().unwrap().to_owned();
            } else if !l.starts_with('#') {
                let name = l.split(['{', ' ']).next().unwrap();
                assert_eq!(name, current, "{l}");
            }
        }
    }

    #[test]
    fn values_are_the_times_counts_and_flags_with_zero_for_never_and_none() {
        let s = Snapshot {
            vms: vec![
                VmSeries {
                    last_capture: Some(1_795_298_168),
                    generations: 3,
                    bytes: 552_960,
                    failure: Some(1_795_300_000),
                    protected: false,
                    ..vm("win\"11", "5a5a")
                },
                VmSeries {
                    protected: true,
                    verdict: "stale",
                    ..vm("never", "6b6b")
                },
            ],
            tpm_vms: 1,
            store_vms: 4,
            store_generations: 9,
            store_bytes: 1 << 20,
            written: 1_795_301_000,
        };
        let text = render(&s);
        let l = "{vm=\"win\\\"11\",uuid=\"5a5a\"}";
        for want in [
            format!("swtpm_keeper_vm_last_capture_timestamp_seconds{l} 1795298168"),
            format!("swtpm_keeper_vm_generations{l} 3"),
            format!("swtpm_keeper_vm_bytes{l} 552960"),
            format!("swtpm_keeper_vm_capture_failure_timestamp_seconds{l} 1795300000"),
            format!("swtpm_keeper_vm_protected{l} 0"),
            "swtpm_keeper_vm_last_capture_timestamp_seconds{vm=\"never\",uuid=\"6b6b\"} 0".into(),
            "swtpm_keeper_vm_capture_failure_timestamp_seconds{vm=\"never\",uuid=\"6b6b\"} 0"
                .into(),
            "swtpm_keeper_vm_protected{vm=\"never\",uuid=\"6b6b\"} 1".into(),
            "swtpm_keeper_vm_verdict{vm=\"never\",uuid=\"6b6b\",verdict=\"stale\"} 1".into(),
            "swtpm_keeper_vm_verdict{vm=\"win\\\"11\",uuid=\"5a5a\",verdict=\"ok\"} 1".into(),
            "swtpm_keeper_vms 1".into(),
            "swtpm_keeper_store_vms 4".into(),
            "swtpm_keeper_store_generations 9".into(),
            "swtpm_keeper_store_bytes 1048576".into(),
            "swtpm_keeper_metrics_timestamp_seconds 1795301000".into(),
        ] {
            assert!(text.lines().any(|x| x == want), "{want} not in\n{text}");
        }
    }

    #[test]
    fn no_vm_still_gives_the_totals_and_the_time() {
        let text = render(&Snapshot::default());
        assert!(text.contains("\nswtpm_keeper_vms 0\n"));
        assert!(text.ends_with("swtpm_keeper_metrics_timestamp_seconds 0\n"));
    }

    #[test]
    fn write_file_replaces_the_file_whole_and_leaves_no_temporary() {
        let d = std::env::temp_dir().join(format!("swk-metrics-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("swtpm-keeper.prom");
        std::fs::write(&p, "old").unwrap();
        write_file(&p, "new\n").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "new\n");
        let names: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["swtpm-keeper.prom"]);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644, "the collector (another user) must read it");
        let err = write_file(&d.join("no-such-dir/x.prom"), "x").unwrap_err();
        assert!(err.to_string().contains("no-such-dir"), "{err}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}

//! The remembered capture failure: a stop lets the VM go even when its
//! capture fails (a full store, most often), so the failure is written
//! down where `check`, `list`, `show` and the metrics find it, until a
//! later good capture clears it. Two copies of one small record:
//! `<run_dir>/failures/<uuid>.json` (tmpfs: a full store cannot lose it;
//! gone at reboot) and `capture-failed.json` in the VM's store directory
//! (survives a reboot), each written only through `fsutil::Dir`. Writing
//! either may fail; that is logged, never an error: the capture already
//! failed, and the stop must still succeed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::domain::{Domain, Uuid};
use crate::error::Result;
use crate::fsutil::{self, Dir};
use crate::manifest;
use crate::store::Store;
use crate::users;

/// The record's name in the VM's store directory.
pub const MARKER: &str = "capture-failed.json";
/// The layout version of the record.
pub const FORMAT: u32 = 1;
/// The reason is cut to this many bytes: the record stays small however
/// long an error chain gets.
pub const MAX_REASON: usize = 1024;
/// Larger files are not records (nothing this program writes comes near).
pub const MAX_RECORD: u64 = 4096;
/// How long `record` waits for the VM's lock to write the store's copy:
/// the run_dir copy is already written, and the capture may have failed
/// because the lock was held.
const MARKER_LOCK_WAIT: Duration = Duration::from_millis(500);

/// One failed capture.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub format: u32,
    /// RFC 3339 UTC, and the same as seconds since the epoch.
    pub time: String,
    pub time_unix: i64,
    pub host: String,
    /// The VM's name then: libvirt forgets a transient VM once it stops.
    #[serde(default)]
    pub name: String,
    /// `stopped`, `release` (the hook) or `capture` (the command).
    pub event: String,
    pub reason: String,
}

/// What is remembered about a VM's captures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum Remembered {
    /// A capture failed, and none has succeeded since.
    Failed(Failure),
    /// A record exists but cannot be read: a capture failed at some time
    /// (nothing else writes one), and what it said is lost.
    Damaged { path: String, error: String },
}

impl Remembered {
    /// One line for people: "at stopped 2026-...Z on host: reason".
    pub fn describe(&self) -> String {
        match self {
            Remembered::Failed(f) => format!(
                "{} at {} on {}: {}",
                f.time,
                crate::logging::sanitize(&f.event),
                crate::logging::sanitize(&f.host),
                crate::logging::sanitize(&f.reason)
            ),
            Remembered::Damaged { path, error } => format!(
                "a damaged failure record {}: {}",
                crate::logging::sanitize(path),
                crate::logging::sanitize(error)
            ),
        }
    }

    /// When it failed (unix), if the record says.
    pub fn time_unix(&self) -> Option<i64> {
        match self {
            Remembered::Failed(f) => Some(f.time_unix),
            Remembered::Damaged { .. } => None,
        }
    }
}

fn failures_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("failures")
}

/// The run_dir copy of the record for `uuid`.
pub fn run_record_path(cfg: &Config, uuid: &Uuid) -> PathBuf {
    failures_dir(&cfg.run_dir).join(format!("{uuid}.json"))
}

/// `text` cut to `max` bytes at a character boundary, marked with `…`.
fn bounded(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max.saturating_sub("…".len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl Failure {
    pub fn new(name: &str, event: &str, reason: &str, time_unix: i64) -> Failure {
        let mut f = Failure {
            format: FORMAT,
            time: manifest::rfc3339(time_unix),
            time_unix,
            host: bounded(&users::host_name(), 256),
            name: bounded(name, MAX_REASON),
            event: bounded(event, 64),
            reason: bounded(reason, MAX_REASON),
        };
        // Control characters take six bytes each in JSON: cut further
        // until the whole record fits.
        while f.to_json().len() as u64 >= MAX_RECORD {
            f.reason = bounded(&f.reason, f.reason.len() / 2);
            f.name = bounded(&f.name, f.name.len().min(256));
        }
        f
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("serializes");
        v.push(b'\n');
        v
    }
}

/// Remember that capturing `vm` failed at `event` for `reason`, in both
/// places. Logs what it could not write; never fails.
pub fn record(cfg: &Config, vm: &Domain, event: &str, reason: &str) {
    let uuid = &vm.uuid;
    let bytes = Failure::new(&vm.name, event, reason, now()).to_json();
    if let Err(e) = write_run_record(&cfg.run_dir, uuid, &bytes) {
        log::warn!("uuid={uuid}: cannot remember the failed capture in run_dir: {e}");
    }
    if let Err(e) = write_store_marker(cfg, uuid, &bytes) {
        // Expected on a full store: the run_dir copy is the one that counts.
        log::debug!("uuid={uuid}: cannot remember the failed capture in the store: {e}");
    }
}

fn write_run_record(run_dir: &Path, uuid: &Uuid, bytes: &[u8]) -> Result<()> {
    fsutil::ensure_dir(run_dir, 0o755)?;
    let dir = fsutil::ensure_dir(&failures_dir(run_dir), 0o700)?;
    let tmp = format!(".{uuid}.json.{}", std::process::id());
    dir.replace(&format!("{uuid}.json"), &tmp, bytes, 0o600)
}

/// The store's copy, only where the VM already has a directory (a
/// failure is no reason to create one) and its lock comes quickly.
fn write_store_marker(cfg: &Config, uuid: &Uuid, bytes: &[u8]) -> Result<()> {
    let store = Store::new(&cfg.store_dir);
    if !store.vm_dir(uuid).is_dir() {
        return Ok(());
    }
    let wait = MARKER_LOCK_WAIT.min(cfg.lock_timeout());
    store.open_vm(uuid, wait)?.write_marker(MARKER, bytes)
}

/// Forget the failure after a good capture (stored or unchanged). The
/// usual case, nothing remembered, costs two `stat`s and takes no lock.
pub fn clear(cfg: &Config, uuid: &Uuid) {
    let run = run_record_path(cfg, uuid);
    if std::fs::symlink_metadata(&run).is_ok() {
        let removed = Dir::open(&failures_dir(&cfg.run_dir)).and_then(|d| {
            d.remove_file(&format!("{uuid}.json"))?;
            d.sync()
        });
        if let Err(e) = removed {
            log::warn!("uuid={uuid}: cannot forget the failed capture in run_dir: {e}");
        }
    }
    let store = Store::new(&cfg.store_dir);
    if std::fs::symlink_metadata(store.vm_dir(uuid).join(MARKER)).is_err() {
        return;
    }
    let removed = store
        .open_vm(uuid, cfg.lock_timeout())
        .and_then(|vm| vm.remove_marker(MARKER));
    if let Err(e) = removed {
        log::warn!("uuid={uuid}: cannot forget the failed capture in the store: {e}");
    }
}

/// After a capture: remember its failure, or forget an earlier one when
/// it kept the state (stored, or unchanged). No state to capture leaves
/// the record as it is.
pub fn settle(cfg: &Config, vm: &Domain, event: &str, result: &Result<crate::capture::Outcome>) {
    use crate::capture::Outcome;
    match result {
        Ok(Outcome::Stored { .. } | Outcome::Unchanged { .. }) => clear(cfg, &vm.uuid),
        Ok(Outcome::NoState { .. }) => {}
        Err(e) => record(cfg, vm, event, &e.to_string()),
    }
}

/// The VMs a failure is remembered for in run_dir (the store's copies are
/// found beside their generations).
pub fn remembered_in_run_dir(cfg: &Config) -> Vec<Uuid> {
    let Ok(rd) = std::fs::read_dir(failures_dir(&cfg.run_dir)) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|n| Uuid::new(n.strip_suffix(".json")?))
        .collect()
}

/// One copy: None when absent, else the record or why it is damaged.
fn read_one(path: &Path) -> Option<std::result::Result<Failure, String>> {
    let mut f = match fsutil::open_if_exists(path, false) {
        Ok(Some(f)) => f,
        Ok(None) => return None,
        Err(e) => return Some(Err(e.to_string())),
    };
    let parsed = fsutil::read_regular(&mut f, path, MAX_RECORD)
        .map_err(|e| e.to_string())
        .and_then(|d| serde_json::from_slice::<Failure>(&d.bytes).map_err(|e| e.to_string()))
        .and_then(|r| match r.format {
            f if f > FORMAT => Err(format!(
                "record format {f} is newer than this swtpm-keeper ({FORMAT})"
            )),
            _ => Ok(r),
        });
    Some(parsed)
}

/// What is remembered for `uuid`: the newer of the two copies; a damaged
/// copy only when neither reads (it still says a capture failed).
pub fn read(cfg: &Config, uuid: &Uuid) -> Option<Remembered> {
    let store_copy = Store::new(&cfg.store_dir).vm_dir(uuid).join(MARKER);
    let copies = [run_record_path(cfg, uuid), store_copy];
    let mut good: Option<Failure> = None;
    let mut damaged = None;
    for p in &copies {
        match read_one(p) {
            None => {}
            Some(Ok(f)) if good.as_ref().is_none_or(|g| f.time_unix > g.time_unix) => {
                good = Some(f);
            }
            Some(Ok(_)) => {}
            Some(Err(error)) => {
                damaged.get_or_insert(Remembered::Damaged {
                    path: p.display().to_string(),
                    error,
                });
            }
        }
    }
    good.map(Remembered::Failed).or(damaged)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(test: &str) -> Config {
        let d = std::env::temp_dir().join(format!("swk-failure-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("store")).unwrap();
        Config {
            store_dir: d.join("store"),
            run_dir: d.join("run"),
            lock_timeout: 1.0,
            ..Config::default()
        }
    }

    const UUID: &str = "11111111-2222-3333-4444-555555555555";

    fn u() -> Uuid {
        Uuid::new(UUID).unwrap()
    }

    fn vm() -> Domain {
        let xml = format!("<domain type='kvm'><name>vm</name><uuid>{UUID}</uuid></domain>");
        Domain::parse(xml.as_bytes()).unwrap()
    }

    #[test]
    fn a_long_reason_is_cut_at_a_character_and_the_record_stays_under_4_kib() {
        let long = "é".repeat(5000);
        let f = Failure::new("vm", "stopped", &long, 1);
        assert!(f.reason.len() <= MAX_REASON, "{}", f.reason.len());
        assert!(f.reason.ends_with('…'));
        assert!((f.to_json().len() as u64) < MAX_RECORD);
        assert_eq!(bounded("short", 10), "short");
        // Escaped to six bytes each in JSON, name and reason still fit.
        let ctl = "\u{1}".repeat(1000);
        let f = Failure::new(&ctl, "stopped", &ctl, 1);
        assert!(
            (f.to_json().len() as u64) < MAX_RECORD,
            "{}",
            f.to_json().len()
        );
    }

    #[test]
    fn a_record_is_kept_in_run_dir_and_the_store_and_a_good_capture_clears_both() {
        let cfg = scratch("both");
        std::fs::create_dir_all(cfg.store_dir.join(UUID)).unwrap();
        record(&cfg, &vm(), "stopped", "disk full");
        assert!(run_record_path(&cfg, &u()).is_file());
        assert!(cfg.store_dir.join(UUID).join(MARKER).is_file());
        match read(&cfg, &u()) {
            Some(Remembered::Failed(f)) => {
                assert_eq!(
                    (f.event.as_str(), f.reason.as_str()),
                    ("stopped", "disk full")
                );
            }
            other => panic!("{other:?}"),
        }
        clear(&cfg, &u());
        assert!(!run_record_path(&cfg, &u()).exists());
        assert!(!cfg.store_dir.join(UUID).join(MARKER).exists());
        assert_eq!(read(&cfg, &u()), None);
        let _ = std::fs::remove_dir_all(cfg.store_dir.parent().unwrap());
    }

    #[test]
    fn no_store_directory_is_made_for_a_failure_and_run_dir_alone_is_enough() {
        let cfg = scratch("runonly");
        record(&cfg, &vm(), "capture", "no such VM");
        assert!(!cfg.store_dir.join(UUID).exists());
        assert!(matches!(read(&cfg, &u()), Some(Remembered::Failed(_))));
        let _ = std::fs::remove_dir_all(cfg.store_dir.parent().unwrap());
    }

    #[test]
    fn the_newer_copy_wins_and_a_damaged_one_counts_only_alone() {
        let cfg = scratch("merge");
        let vm = cfg.store_dir.join(UUID);
        std::fs::create_dir_all(&vm).unwrap();
        std::fs::create_dir_all(failures_dir(&cfg.run_dir)).unwrap();
        let old = Failure::new("vm", "stopped", "old", 100).to_json();
        let new = Failure::new("vm", "release", "new", 200).to_json();
        std::fs::write(run_record_path(&cfg, &u()), &old).unwrap();
        std::fs::write(vm.join(MARKER), &new).unwrap();
        let reason = |r: Option<Remembered>| match r {
            Some(Remembered::Failed(f)) => f.reason,
            other => panic!("{other:?}"),
        };
        assert_eq!(reason(read(&cfg, &u())), "new");
        // The other way round, and a tie: the newer one, else run_dir's.
        std::fs::write(run_record_path(&cfg, &u()), &new).unwrap();
        std::fs::write(vm.join(MARKER), &old).unwrap();
        assert_eq!(reason(read(&cfg, &u())), "new");
        let tie = Failure::new("vm", "stopped", "tie", 200).to_json();
        std::fs::write(vm.join(MARKER), &tie).unwrap();
        assert_eq!(reason(read(&cfg, &u())), "new");
        std::fs::write(run_record_path(&cfg, &u()), &old).unwrap();
        std::fs::write(vm.join(MARKER), b"{not json").unwrap();
        assert_eq!(reason(read(&cfg, &u())), "old");
        std::fs::remove_file(run_record_path(&cfg, &u())).unwrap();
        match read(&cfg, &u()) {
            Some(Remembered::Damaged { path, .. }) => assert!(path.ends_with(MARKER), "{path}"),
            other => panic!("{other:?}"),
        }
        // A record of a later format is not read as this one.
        let mut later = Failure::new("vm", "stopped", "later", 300);
        later.format = FORMAT + 1;
        std::fs::write(vm.join(MARKER), later.to_json()).unwrap();
        match read(&cfg, &u()) {
            Some(Remembered::Damaged { error, .. }) => assert!(error.contains("newer"), "{error}"),
            other => panic!("{other:?}"),
        }
        let _ = std::fs::remove_dir_all(cfg.store_dir.parent().unwrap());
    }
}

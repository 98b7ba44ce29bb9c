//! Which VMs' TPMs are protected: one survey of every VM that libvirt
//! defines with an emulator TPM (its config files, and the status files of
//! the VMs that run, transient ones included), joined with the store,
//! without calling libvirt. `check` and `metrics` both judge from it.
//!
//! "Good" here is cheap, so that 1,000 VMs take well under a second: a
//! complete generation (under its final name) whose manifest reads, names
//! this VM, lists a TPM state file, and whose listed files are all there
//! with their listed sizes. `verify` reads and checksums every byte.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::config::Config;
use crate::domain::{Domain, Uuid};
use crate::failure::{self, Remembered};
use crate::inventory;
use crate::live::Seen;
use crate::manifest::{self, Manifest, Role};
use crate::running;
use crate::store::{Store, VmStore};
use crate::swtpm::StateLocation;

/// Where libvirt shows the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Found {
    /// A persistent definition only: it does not run.
    Config,
    /// A status file only: a transient VM that runs.
    Status,
    /// Defined, and running.
    Both,
    /// Neither: a transient VM that stopped, or one undefined since, whose
    /// last capture failed (only such VMs are listed; the others count in
    /// the store's totals alone).
    Gone,
}

/// One word per VM, the worst that applies, in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// The store's part for the VM cannot be read.
    StoreUnreadable,
    /// A capture failed, and none has succeeded since.
    Failing,
    /// The domain's `<encryption secret>` is not among libvirt's secrets.
    SecretMissing,
    /// The newest generation was captured under another secret.
    SecretChanged,
    /// No good generation.
    NeverCaptured,
    /// Defined, never started: no TPM state at libvirt's path, nothing
    /// to keep yet.
    NoStateYet,
    /// It runs, and its state was last confirmed more than
    /// `max_capture_age` ago.
    Stale,
    Ok,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::StoreUnreadable => "store-unreadable",
            Verdict::Failing => "failing",
            Verdict::SecretMissing => "secret-missing",
            Verdict::SecretChanged => "secret-changed",
            Verdict::NeverCaptured => "never-captured",
            Verdict::NoStateYet => "no-state-yet",
            Verdict::Stale => "stale",
            Verdict::Ok => "ok",
        }
    }
}

/// The newest good generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Newest {
    pub generation: String,
    pub time: String,
    pub time_unix: i64,
    /// Read from the running VM, not at a stop.
    pub live: bool,
    /// `shutoff`, `running` or `paused` (absent before 0.2).
    pub vm_state: Option<String>,
    /// The secret the state was encrypted under, as the domain named it.
    pub encryption_secret: Option<String>,
}

/// One VM with an emulator TPM.
#[derive(Debug, Clone, Serialize)]
pub struct VmCoverage {
    pub name: String,
    pub uuid: Uuid,
    pub found: Found,
    pub newest: Option<Newest>,
    /// The last time the store was known to hold the VM's current state:
    /// the newest generation's time, or later, when a live capture found
    /// the state unchanged since (`live::Seen`).
    pub confirmed_unix: Option<i64>,
    /// Complete generations in the store, good or not.
    pub generations: usize,
    /// Bytes its generations hold (a file linked into several counted once).
    pub bytes: u64,
    pub failure: Option<Remembered>,
    /// The `<encryption secret>` the domain names now, and whether
    /// libvirt defines it (`<libvirt_secrets_dir>/<uuid>.xml`).
    pub secret: Option<String>,
    pub secret_defined: Option<bool>,
    pub store_error: Option<String>,
    /// libvirt's TPM state exists (false: the VM never started).
    pub has_state: bool,
    pub verdict: Verdict,
    /// A good generation, no remembered failure, no secret problem.
    pub protected: bool,
}

impl VmCoverage {
    pub fn running(&self) -> bool {
        matches!(self.found, Found::Status | Found::Both)
    }

    /// The secret the newest generation was captured under, when the
    /// domain names another one (or none) now.
    pub fn changed_secret(&self) -> Option<&str> {
        // Which secret a VM libvirt forgot names is not known.
        if self.found == Found::Gone {
            return None;
        }
        let old = self.newest.as_ref()?.encryption_secret.as_deref()?;
        let now = self.secret.as_deref();
        (now.map(str::to_ascii_lowercase) != Some(old.to_ascii_lowercase())).then_some(old)
    }
}

/// What the store holds in all, libvirt's VMs or not.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub vms: usize,
    pub generations: usize,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Survey {
    /// Sorted by name, then UUID.
    pub vms: Vec<VmCoverage>,
    pub store: Totals,
    /// Files that could not be read (a domain XML, a status file).
    pub problems: Vec<String>,
}

/// What the store holds for one VM.
#[derive(Default)]
struct Held {
    generations: usize,
    bytes: u64,
    newest: Option<(String, Manifest)>,
    error: Option<String>,
}

/// libvirt's view of one VM: its definition and the live domain.
#[derive(Default)]
struct Libvirt {
    config: Option<Domain>,
    status: Option<Domain>,
}

/// The survey, as of `now` (unix seconds).
pub fn survey(cfg: &Config, now: i64) -> Survey {
    let mut problems = Vec::new();
    let vms = libvirt_vms(cfg, &mut problems);
    let store = Store::new(&cfg.store_dir);
    let mut held: BTreeMap<Uuid, Held> = BTreeMap::new();
    match store.vm_uuids() {
        Ok(uuids) => {
            for uuid in uuids {
                let h = held_by(cfg, &store, &uuid);
                held.insert(uuid, h);
            }
        }
        Err(e) => problems.push(e.to_string()),
    }
    let store_totals = Totals {
        vms: held.len(),
        generations: held.values().map(|h| h.generations).sum(),
        bytes: held.values().map(|h| h.bytes).sum(),
    };
    let gone = gone_but_failed(cfg, &store, &held, &vms);
    let mut out: Vec<VmCoverage> = vms
        .into_iter()
        .map(|(uuid, lv)| {
            let h = held.remove(&uuid).unwrap_or_default();
            judge(cfg, now, uuid, lv, h)
        })
        .collect();
    for (uuid, failure) in gone {
        let h = held.remove(&uuid).unwrap_or_default();
        out.push(judge_gone(uuid, h, failure));
    }
    out.sort_by(|a, b| (&a.name, &a.uuid).cmp(&(&b.name, &b.uuid)));
    Survey {
        vms: out,
        store: store_totals,
        problems,
    }
}

/// VMs libvirt neither defines nor runs whose last capture failed: the
/// failure must not go unseen because a transient VM is gone once it
/// stopped.
fn gone_but_failed(
    cfg: &Config,
    store: &Store,
    held: &BTreeMap<Uuid, Held>,
    known: &BTreeMap<Uuid, Libvirt>,
) -> Vec<(Uuid, Remembered)> {
    let mut uuids = failure::remembered_in_run_dir(cfg);
    let in_store = held.keys().filter(|u| !known.contains_key(*u));
    uuids.extend(
        in_store
            .filter(|u| store.vm_dir(u).join(failure::MARKER).exists())
            .cloned(),
    );
    uuids.sort();
    uuids.dedup();
    uuids
        .into_iter()
        .filter(|u| !known.contains_key(u))
        .filter_map(|u| {
            let f = failure::read(cfg, &u)?;
            Some((u, f))
        })
        .collect()
}

/// A VM only its failure record and the store know.
fn judge_gone(uuid: Uuid, held: Held, failure: Remembered) -> VmCoverage {
    let name = match (&failure, &held.newest) {
        (Remembered::Failed(f), _) if !f.name.is_empty() => f.name.clone(),
        (_, Some((_, m))) => m.name.clone(),
        _ => String::new(),
    };
    VmCoverage {
        name,
        uuid,
        found: Found::Gone,
        newest: held.newest.map(|(g, m)| newest_of(g, m)),
        confirmed_unix: None,
        generations: held.generations,
        bytes: held.bytes,
        failure: Some(failure),
        secret: None,
        secret_defined: None,
        store_error: held.error,
        has_state: false,
        verdict: Verdict::Failing,
        protected: false,
    }
}

fn newest_of(generation: String, m: Manifest) -> Newest {
    Newest {
        generation,
        time: m.time,
        time_unix: m.time_unix,
        live: m.live,
        vm_state: m.vm_state,
        encryption_secret: m.tpm.encryption_secret,
    }
}

/// Every VM with an emulator TPM in libvirt's config and status files.
fn libvirt_vms(cfg: &Config, problems: &mut Vec<String>) -> BTreeMap<Uuid, Libvirt> {
    let mut vms: BTreeMap<Uuid, Libvirt> = BTreeMap::new();
    let files = inventory::xml_files(&cfg.libvirt_config_dir).unwrap_or_else(|e| {
        problems.push(e.to_string());
        Vec::new()
    });
    for path in files {
        match inventory::read_domain_file(&path) {
            Ok(Some((_, d))) if d.tpm.is_some() => {
                let uuid = d.uuid.clone();
                vms.entry(uuid).or_default().config = Some(d);
            }
            Ok(_) => {}
            Err(e) => problems.push(e.to_string()),
        }
    }
    let names = running::names(&cfg.libvirt_run_dir).unwrap_or_else(|e| {
        problems.push(e.to_string());
        Vec::new()
    });
    for name in names {
        match running::read(&cfg.libvirt_run_dir, &name) {
            // Its state is still arriving: judged once it runs here.
            Ok(Some(vm)) if vm.status.incoming() => {}
            Ok(Some(vm)) if vm.domain.tpm.is_some() => {
                let uuid = vm.domain.uuid.clone();
                vms.entry(uuid).or_default().status = Some(vm.domain);
            }
            Ok(_) => {}
            Err(e) => problems.push(e.to_string()),
        }
    }
    vms
}

/// What the store holds for `uuid`, under a shared lock (a capture holds
/// the exclusive one for milliseconds).
fn held_by(cfg: &Config, store: &Store, uuid: &Uuid) -> Held {
    let read = store.read_vm(uuid, cfg.lock_timeout()).and_then(|vm| {
        let gens = vm.generations()?;
        Ok(Held {
            generations: gens.len(),
            bytes: vm.bytes_held(&gens),
            newest: newest_good(&vm, uuid, &gens),
            error: None,
        })
    });
    read.unwrap_or_else(|e| Held {
        error: Some(e.to_string()),
        ..Held::default()
    })
}

/// The newest generation that is good (see the module's comment).
pub fn newest_good(vm: &VmStore, uuid: &Uuid, gens: &[String]) -> Option<(String, Manifest)> {
    gens.iter().rev().find_map(|g| {
        let m = vm.read_manifest(g).ok()?;
        sound(&vm.dir().join(g), uuid, &m).then(|| (g.clone(), m))
    })
}

/// The manifest names this VM and a TPM state, and every file it lists
/// is there with its size (no byte read).
fn sound(dir: &Path, uuid: &Uuid, m: &Manifest) -> bool {
    m.uuid.eq_ignore_ascii_case(uuid)
        && m.files.iter().any(|f| f.role == Role::Tpm)
        && dir.join(manifest::SUMS).is_file()
        && m.files.iter().all(|f| {
            !f.name.contains('/')
                && std::fs::symlink_metadata(dir.join(&f.name))
                    .is_ok_and(|md| md.is_file() && md.len() == f.size)
        })
}

/// One VM's coverage, from what libvirt and the store show.
fn judge(cfg: &Config, now: i64, uuid: Uuid, lv: Libvirt, held: Held) -> VmCoverage {
    let found = match (&lv.config, &lv.status) {
        (Some(_), Some(_)) => Found::Both,
        (None, Some(_)) => Found::Status,
        _ => Found::Config,
    };
    // The definition is what the next start uses; else the live domain.
    let domain = lv.config.or(lv.status).expect("found in one of them");
    let tpm = domain.tpm.as_ref().expect("only VMs with an emulator TPM");
    let has_state = has_state(&StateLocation::of(&cfg.swtpm_dir, &domain, tpm));
    let secret = tpm.encryption_secret.clone();
    let secret_defined = secret
        .as_ref()
        .map(|s| cfg.libvirt_secrets_dir.join(format!("{s}.xml")).is_file());
    let newest = held.newest.map(|(g, m)| newest_of(g, m));
    let confirmed_unix = newest.as_ref().map(|n| {
        let seen = Seen::load(&cfg.run_dir, &uuid).filter(|s| s.generation == n.generation);
        seen.map_or(n.time_unix, |s| s.verified_unix.max(n.time_unix))
    });
    let mut vm = VmCoverage {
        name: domain.name,
        failure: failure::read(cfg, &uuid),
        uuid,
        found,
        newest,
        confirmed_unix,
        generations: held.generations,
        bytes: held.bytes,
        secret,
        secret_defined,
        store_error: held.error,
        has_state,
        verdict: Verdict::Ok,
        protected: false,
    };
    vm.verdict = verdict(&vm, now, cfg.max_capture_age);
    vm.protected = vm.newest.is_some()
        && vm.failure.is_none()
        && vm.store_error.is_none()
        && vm.secret_defined != Some(false)
        && vm.changed_secret().is_none();
    vm
}

fn verdict(vm: &VmCoverage, now: i64, max_age: u64) -> Verdict {
    let stale = vm.running()
        && vm
            .confirmed_unix
            .is_some_and(|t| now.saturating_sub(t) > max_age as i64);
    if vm.store_error.is_some() {
        Verdict::StoreUnreadable
    } else if vm.failure.is_some() {
        Verdict::Failing
    } else if vm.secret_defined == Some(false) {
        Verdict::SecretMissing
    } else if vm.changed_secret().is_some() {
        Verdict::SecretChanged
    } else if vm.newest.is_none() && !vm.running() && !vm.has_state {
        Verdict::NoStateYet
    } else if vm.newest.is_none() {
        Verdict::NeverCaptured
    } else if stale {
        Verdict::Stale
    } else {
        Verdict::Ok
    }
}

/// Whether libvirt's TPM state is there: a state file, or a state
/// directory with anything in it.
fn has_state(loc: &StateLocation) -> bool {
    match loc {
        StateLocation::File(p) => p.exists(),
        StateLocation::Dir(p) => std::fs::read_dir(p).is_ok_and(|mut rd| rd.next().is_some()),
    }
}

/// How many VMs have each verdict, for the summary line.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub vms: usize,
    pub protected: usize,
    pub stale: usize,
    pub never_captured: usize,
    pub failing: usize,
    pub secret_problems: usize,
}

impl Survey {
    pub fn summary(&self) -> Summary {
        let count = |v: Verdict| self.vms.iter().filter(|c| c.verdict == v).count();
        Summary {
            vms: self.vms.len(),
            protected: self.vms.iter().filter(|c| c.protected).count(),
            stale: count(Verdict::Stale),
            never_captured: count(Verdict::NeverCaptured),
            failing: count(Verdict::Failing) + count(Verdict::StoreUnreadable),
            secret_problems: count(Verdict::SecretMissing) + count(Verdict::SecretChanged),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::{self, Event};

    const A: &str = "aaaaaaaa-0000-4000-8000-000000000001";
    const B: &str = "aaaaaaaa-0000-4000-8000-000000000002";
    const T: &str = "aaaaaaaa-0000-4000-8000-000000000003";
    const S1: &str = "5ec7e700-0000-4000-8000-000000000001";
    const S2: &str = "5ec7e700-0000-4000-8000-000000000002";

    fn fixture(name: &str) -> Vec<u8> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/libvirt-9.0");
        std::fs::read(p.join(name)).unwrap()
    }

    fn xml(name: &str, uuid: &str, tpm: bool, secret: Option<&str>) -> String {
        let enc = secret.map_or(String::new(), |s| format!("<encryption secret='{s}'/>"));
        let dev = if tpm {
            format!(
                "<tpm model='tpm-crb'><backend type='emulator' version='2.0'>{enc}</backend></tpm>"
            )
        } else {
            String::new()
        };
        format!("<domain type='kvm'><name>{name}</name><uuid>{uuid}</uuid><devices>{dev}</devices></domain>")
    }

    fn host(test: &str) -> Config {
        let d = std::env::temp_dir().join(format!("swk-coverage-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        for sub in ["etc", "run-libvirt", "secrets", "swtpm", "run"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        Config {
            store_dir: d.join("store"),
            swtpm_dir: d.join("swtpm"),
            libvirt_config_dir: d.join("etc"),
            libvirt_run_dir: d.join("run-libvirt"),
            libvirt_secrets_dir: d.join("secrets"),
            run_dir: d.join("run/keeper"),
            lock_timeout: 1.0,
            ..Config::default()
        }
    }

    fn capture_a(cfg: &Config, secret: &str) {
        capture_a_state(cfg, secret, &fixture("tpm2-00.permall.encrypted"));
    }

    fn capture_a_state(cfg: &Config, secret: &str, permall: &[u8]) {
        let text = xml("a", A, true, Some(secret));
        let d = Domain::parse(text.as_bytes()).unwrap();
        let state = cfg.swtpm_dir.join(A).join("tpm2");
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(state.join("tpm2-00.permall"), permall).unwrap();
        let ev = Event {
            op: "stopped".into(),
            sub_op: "end".into(),
            extra: "-".into(),
        };
        let tpm = d.tpm.clone().unwrap();
        capture::capture(cfg, &d, &tpm, &ev, text.as_bytes()).unwrap();
    }

    fn verdicts(s: &Survey) -> Vec<(String, Found, Verdict, bool)> {
        s.vms
            .iter()
            .map(|v| (v.name.clone(), v.found, v.verdict, v.protected))
            .collect()
    }

    #[test]
    fn every_tpm_vm_of_config_and_status_files_is_judged_against_the_store() {
        let cfg = host("all");
        let etc = &cfg.libvirt_config_dir;
        std::fs::write(etc.join("a.xml"), xml("a", A, true, Some(S1))).unwrap();
        std::fs::write(etc.join("b.xml"), xml("b", B, true, None)).unwrap();
        std::fs::write(
            etc.join("c.xml"),
            xml("c", "aaaaaaaa-0000-4000-8000-000000000009", false, None),
        )
        .unwrap();
        std::fs::write(
            cfg.libvirt_secrets_dir.join(format!("{S1}.xml")),
            "<secret/>",
        )
        .unwrap();
        let me = std::process::id();
        let status = format!(
            "<domstatus state='running' reason='booted' pid='{me}'>\n{}\n</domstatus>\n",
            xml("t", T, true, None)
        );
        std::fs::write(cfg.libvirt_run_dir.join("t.xml"), status).unwrap();
        capture_a(&cfg, S1);
        let s = survey(&cfg, i64::MAX / 2);
        assert_eq!(
            verdicts(&s),
            vec![
                ("a".into(), Found::Config, Verdict::Ok, true),
                ("b".into(), Found::Config, Verdict::NoStateYet, false),
                ("t".into(), Found::Status, Verdict::NeverCaptured, false),
            ],
            "a stopped VM is never stale; one never started has nothing to keep: {:?}",
            s.problems
        );
        let a = &s.vms[0];
        assert_eq!(a.generations, 1);
        assert!(a.bytes > 0);
        assert_eq!(
            s.store,
            Totals {
                vms: 1,
                generations: 1,
                bytes: a.bytes
            }
        );
        assert_eq!(
            a.newest.as_ref().unwrap().encryption_secret.as_deref(),
            Some(S1)
        );

        // The secret is deleted; then the domain names a new one.
        std::fs::remove_file(cfg.libvirt_secrets_dir.join(format!("{S1}.xml"))).unwrap();
        assert_eq!(survey(&cfg, 0).vms[0].verdict, Verdict::SecretMissing);
        std::fs::write(etc.join("a.xml"), xml("a", A, true, Some(S2))).unwrap();
        std::fs::write(
            cfg.libvirt_secrets_dir.join(format!("{S2}.xml")),
            "<secret/>",
        )
        .unwrap();
        let s = survey(&cfg, 0);
        assert_eq!(
            (s.vms[0].verdict, s.vms[0].protected),
            (Verdict::SecretChanged, false)
        );
        assert_eq!(s.vms[0].changed_secret(), Some(S1));

        // A remembered failure outranks the rest.
        let a = Domain::parse(xml("a", A, true, Some(S2)).as_bytes()).unwrap();
        failure::record(&cfg, &a, "stopped", "No space left on device");
        let s = survey(&cfg, 0);
        assert_eq!(s.vms[0].verdict, Verdict::Failing);
        assert_eq!(
            s.summary(),
            Summary {
                vms: 3,
                protected: 0,
                stale: 0,
                never_captured: 1,
                failing: 1,
                secret_problems: 0
            }
        );
        let _ = std::fs::remove_dir_all(cfg.libvirt_config_dir.parent().unwrap());
    }

    #[test]
    fn a_running_vm_is_stale_only_when_its_state_was_last_confirmed_too_long_ago() {
        let cfg = host("stale");
        std::fs::write(
            cfg.libvirt_config_dir.join("a.xml"),
            xml("a", A, true, Some(S1)),
        )
        .unwrap();
        std::fs::write(
            cfg.libvirt_secrets_dir.join(format!("{S1}.xml")),
            "<secret/>",
        )
        .unwrap();
        capture_a(&cfg, S1);
        let me = std::process::id();
        let status = format!(
            "<domstatus state='running' reason='booted' pid='{me}'>\n{}\n</domstatus>\n",
            xml("a", A, true, Some(S1))
        );
        std::fs::write(cfg.libvirt_run_dir.join("a.xml"), status).unwrap();
        let s = survey(&cfg, 0);
        let taken = s.vms[0].newest.as_ref().unwrap().time_unix;
        let at = |now: i64| survey(&cfg, now).vms[0].verdict;
        assert_eq!(s.vms[0].found, Found::Both);
        assert_eq!(at(taken + 86_400), Verdict::Ok);
        assert_eq!(at(taken + 86_401), Verdict::Stale);
        // A live pass that found the state unchanged confirms it.
        let g = s.vms[0].newest.as_ref().unwrap().generation.clone();
        let seen = Seen {
            generation: g,
            verified_unix: taken + 1000,
            files: Vec::new(),
        };
        seen.save(&cfg.run_dir, A).unwrap();
        assert_eq!(at(taken + 86_401), Verdict::Ok);
        assert!(
            survey(&cfg, taken + 86_401).vms[0].protected,
            "stale is still protected"
        );
        let _ = std::fs::remove_dir_all(cfg.libvirt_config_dir.parent().unwrap());
    }

    #[test]
    fn a_generation_missing_a_listed_file_is_not_good_and_an_older_one_is_used() {
        let cfg = host("good");
        std::fs::write(
            cfg.libvirt_config_dir.join("a.xml"),
            xml("a", A, true, Some(S1)),
        )
        .unwrap();
        capture_a(&cfg, S1);
        let mut p = fixture("tpm2-00.permall.encrypted");
        p[300] ^= 1;
        capture_a_state(&cfg, S1, &p);
        let s = survey(&cfg, 0);
        let newest = s.vms[0].newest.clone().unwrap().generation;
        assert!(newest.starts_with("00000002-"), "{newest}");
        std::fs::remove_file(cfg.store_dir.join(A).join(&newest).join("tpm2-00.permall")).unwrap();
        let s = survey(&cfg, 0);
        assert!(s.vms[0]
            .newest
            .as_ref()
            .unwrap()
            .generation
            .starts_with("00000001-"));
        assert_eq!(s.vms[0].generations, 2);
        let _ = std::fs::remove_dir_all(cfg.libvirt_config_dir.parent().unwrap());
    }
}

//! The marks: small JSON records beside a VM's generations that change
//! what a `prepare` may do. `incoming-<host>.json`: a migration or a
//! restore is bringing the state in, so this host's next `prepare` must
//! not put an old copy back. `migrated-away.json`: the VM's TPM lives on
//! on another host from that generation on. `protected.json`: the
//! generations refused restores left behind, which retention keeps.
//! (`capture-failed.json`, the remembered failed capture, is `failure`'s.)

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::domain::Domain;
use crate::error::{Error, Result};
use crate::manifest;
use crate::store::{Store, VmStore};
use crate::users;

/// How long a mark left at `migrate begin`/`restore begin` keeps a
/// `prepare` from restoring, as the last guard: the mark is normally used
/// up by the `prepare` of its own operation, or cleared by the
/// `stopped`/`release` of a failed one. It outlives its operation only when
/// neither follows: an offline migration (`qemuMigrationDstPrepareFresh`
/// runs the migrate hook, then skips `qemuMigrationDstPrepareActive`; no
/// later hook runs), or a failure before `qemuProcessInit` runs the prepare
/// hook (cookie, domain already active, storage pre-creation, QEMU
/// capabilities). Between the two hooks of one operation libvirt (read in
/// 9.0 and 11.3) parses XML and cookie, may wait for the domain's job (at
/// most `VIR_JOB_WAIT_TIME`, 30 s), may probe QEMU's capabilities (seconds)
/// and creates missing disks of a copy-storage migration (fallocate, fast;
/// zero-filled where the filesystem has none). 45 s covers all but that
/// zero fill and slow hooks that run between ours, with a margin. A later
/// `prepare` restores as a plain start does (a refusal then aborts the
/// migration); an earlier start after an offline migration restores
/// nothing.
pub const INCOMING_WINDOW_SECS: i64 = 45;
pub const MIGRATED_MARKER: &str = "migrated-away.json";
/// The generations that refused restores left behind (the VM started with
/// a new TPM, `on_refusal = "continue"`): retention never removes them;
/// only `swtpm-keeper prune --vm VM --generation G` does.
pub const PROTECTED_MARKER: &str = "protected.json";

#[derive(Serialize, Deserialize)]
struct IncomingMarker {
    event: String,
    time_unix: i64,
}

#[derive(Serialize, Deserialize)]
struct MigratedMarker {
    generation: String,
    time: String,
    host: String,
}

/// One protected generation, and the refusal that protected it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Protection {
    pub generation: String,
    /// When and where the restore was refused (RFC 3339 UTC), and why.
    pub time: String,
    pub host: String,
    pub why: String,
}

#[derive(Default, Serialize, Deserialize)]
struct ProtectedFile {
    protected: Vec<Protection>,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn incoming_marker_name() -> String {
    // Per host: on a shared store the marker is for this host's `prepare`.
    format!("incoming-{}.json", users::host_name().replace('/', "_"))
}

/// At `migrate begin` / `restore begin`: the TPM state will arrive in the
/// stream, so the `prepare` that follows must not restore an old copy.
/// False when the store holds nothing for the VM: nothing could be
/// restored, so nothing is noted (and no store directory is created).
pub fn note_incoming(cfg: &Config, domain: &Domain, event: &str) -> Result<bool> {
    let store = Store::new(&cfg.store_dir);
    if !store.vm_dir(&domain.uuid).is_dir() {
        return Ok(false);
    }
    let vm = store.open_vm(&domain.uuid, cfg.lock_timeout())?;
    let m = IncomingMarker {
        event: event.to_owned(),
        time_unix: now(),
    };
    vm.write_marker(
        &incoming_marker_name(),
        &serde_json::to_vec(&m).expect("serializes"),
    )?;
    Ok(true)
}

/// At `stopped`/`release`: the VM stopped on this host, so an incoming
/// operation noted here is over (a failed incoming migration or restore
/// stops the VM). Removes this host's mark only: on a shared store another
/// host's mark is for that host's `prepare`. True when there was one.
pub fn clear_incoming(cfg: &Config, domain: &Domain) -> Result<bool> {
    let store = Store::new(&cfg.store_dir);
    let name = incoming_marker_name();
    // The usual stop has no mark: one stat, no lock.
    if std::fs::symlink_metadata(store.vm_dir(&domain.uuid).join(&name)).is_err() {
        return Ok(false);
    }
    let vm = store.open_vm(&domain.uuid, cfg.lock_timeout())?;
    let had = vm.read_marker(&name).is_some();
    vm.remove_marker(&name)?;
    Ok(had)
}

/// At `prepare`: this host's incoming mark, used up whether it counts or
/// not. Some(event, age in seconds) when it is recent enough to count.
pub fn take_incoming(vm: &VmStore, domain: &Domain) -> Result<Option<(String, i64)>> {
    let name = incoming_marker_name();
    let Some(bytes) = vm.read_marker(&name) else {
        return Ok(None);
    };
    vm.remove_marker(&name)?;
    let Ok(m) = serde_json::from_slice::<IncomingMarker>(&bytes) else {
        return Ok(None);
    };
    let age = now() - m.time_unix;
    if age.abs() <= INCOMING_WINDOW_SECS {
        return Ok(Some((m.event, age)));
    }
    log::info!(
        "vm={} uuid={}: the incoming {} noted {age} s ago had no prepare within {INCOMING_WINDOW_SECS} s \
         (an offline migration, or one that failed early): not counted",
        domain.name,
        domain.uuid,
        m.event
    );
    Ok(None)
}

/// At a stop with reason `migrated` that stored nothing (the state was
/// already gone, or could not be read): this host's copies are stale all
/// the same, so mark the newest generation, under the lock. None when the
/// store holds no generation for the VM.
pub fn mark_migrated_away(cfg: &Config, domain: &Domain) -> Result<Option<String>> {
    let store = Store::new(&cfg.store_dir);
    if !store.vm_dir(&domain.uuid).is_dir() {
        return Ok(None);
    }
    let vm = store.open_vm(&domain.uuid, cfg.lock_timeout())?;
    let Some(newest) = vm.generations()?.pop() else {
        return Ok(None);
    };
    note_migrated_away(&vm, &newest)?;
    Ok(Some(newest))
}

/// At a stop with reason `migrated` (libvirt 10.5+): this host's copy is
/// stale from now on; remember which generation that was.
pub fn note_migrated_away(vm: &VmStore, generation: &str) -> Result<()> {
    let m = MigratedMarker {
        generation: generation.to_owned(),
        time: manifest::rfc3339(now()),
        host: users::host_name(),
    };
    vm.write_marker(
        MIGRATED_MARKER,
        &serde_json::to_vec(&m).expect("serializes"),
    )
}

/// The generation the migrated mark names, when `generation` is stale by
/// it: the mark names that generation or a newer one (generation names
/// sort in the order they were taken), so the TPM lives on elsewhere.
pub fn migrated_away(vm: &VmStore, generation: &str) -> Option<String> {
    let m: MigratedMarker = serde_json::from_slice(&vm.read_marker(MIGRATED_MARKER)?).ok()?;
    (m.generation.as_str() >= generation).then_some(m.generation)
}

/// The protected generations. Err when the record exists but cannot be
/// read: then nothing is safe to prune.
pub fn protections(vm: &VmStore) -> Result<Vec<Protection>> {
    let p = vm.dir().join(PROTECTED_MARKER);
    let bytes = match std::fs::read(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("read", &p, e)),
    };
    serde_json::from_slice::<ProtectedFile>(&bytes)
        .map(|f| f.protected)
        .map_err(|e| Error::failed(format!("cannot read {}: {e}", p.display())))
}

/// Protect `generation` from retention, recording why. Records of
/// generations that are gone are dropped on the way.
pub fn protect(vm: &VmStore, generation: &str, why: &str) -> Result<()> {
    let mut list = protections(vm)?;
    if list.iter().any(|p| p.generation == generation) {
        return Ok(());
    }
    let gens = vm.generations()?;
    list.retain(|p| gens.contains(&p.generation));
    list.push(Protection {
        generation: generation.to_owned(),
        time: manifest::rfc3339(now()),
        host: users::host_name(),
        why: why.to_owned(),
    });
    write_protections(vm, list)
}

/// Drop the records of these generations (removed by name).
pub fn unprotect(vm: &VmStore, generations: &[String]) -> Result<()> {
    let Ok(mut list) = protections(vm) else {
        return Ok(());
    };
    let before = list.len();
    list.retain(|p| !generations.contains(&p.generation));
    if list.len() == before {
        return Ok(());
    }
    write_protections(vm, list)
}

fn write_protections(vm: &VmStore, protected: Vec<Protection>) -> Result<()> {
    if protected.is_empty() {
        return vm.remove_marker(PROTECTED_MARKER);
    }
    let mut bytes = serde_json::to_vec_pretty(&ProtectedFile { protected }).expect("serializes");
    bytes.push(b'\n');
    vm.write_marker(PROTECTED_MARKER, &bytes)
}

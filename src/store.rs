//! The store: `<store_dir>/<uuid>/<generation>/`, one directory per
//! captured state. A generation is built under a temporary name, every file
//! and directory is fsynced, then it is renamed into place: a crash at any
//! instant leaves only complete generations under generation names, plus
//! temporaries that a later run (under the VM's lock) removes once their
//! owner is provably gone (`leftover`). On a store shared by hosts the
//! VM's lock is the filesystem's flock: generation numbers are chosen under
//! it, and the rename into place never replaces, so that even a lock that
//! fails across hosts cannot make one host overwrite another's generation.
//! Every write goes through the VM directory's handle (`fsutil::Dir`, as a
//! restore's do): nothing here creates, renames or removes by path.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::domain::Uuid;
use crate::error::{Error, IoContext, Result};
use crate::failpoint;
use crate::fsutil::{self, Dir, Rename};
use crate::leftover;
use crate::lock::{self, VmLock};
use crate::manifest::{self, Manifest, Role};

const TMP_PREFIX: &str = ".tmp-";
const TRASH_PREFIX: &str = ".trash-";
const LOCK_NAME: &str = ".lock";
/// Tries to place a generation when its number turns out to be taken (only
/// when the VM's lock failed across hosts; see `place`).
const PLACE_TRIES: u64 = 5;

pub struct Store {
    root: PathBuf,
}

/// One VM's part of the store, locked for as long as this value lives:
/// exclusively by writers, shared by readers.
pub struct VmStore {
    dir: PathBuf,
    lock: VmLock,
    /// The VM's directory, opened once by a writer: every write goes
    /// through this handle (`fsutil::Dir`), never by path. None for
    /// readers.
    writer: Option<Dir>,
}

/// `00000042-20261121T215608Z`: a sequence number (capture order, also
/// across clock jumps) and the UTC capture time, for humans.
pub fn is_generation_name(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() == 25
        && b[..8].iter().all(u8::is_ascii_digit)
        && b[8] == b'-'
        && b[9..17].iter().all(u8::is_ascii_digit)
        && b[17] == b'T'
        && b[18..24].iter().all(u8::is_ascii_digit)
        && b[24] == b'Z'
}

fn sequence(name: &str) -> u64 {
    name[..8].parse().unwrap_or(0)
}

impl Store {
    pub fn new(root: impl Into<PathBuf>) -> Store {
        Store { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn vm_dir(&self, uuid: &Uuid) -> PathBuf {
        self.root.join(uuid)
    }

    /// Lock the VM's part of the store (creating it) and clean leftovers.
    pub fn open_vm(&self, uuid: &Uuid, timeout: Duration) -> Result<VmStore> {
        let handle = fsutil::ensure_dir(&self.root, 0o700)?.ensure_subdir(uuid, 0o700)?;
        let dir = self.vm_dir(uuid);
        let lock = lock::lock_exclusive(&dir.join(LOCK_NAME), timeout)?;
        let vm = VmStore {
            dir,
            lock,
            writer: Some(handle),
        };
        vm.remove_leftovers()?;
        Ok(vm)
    }

    /// Lock a VM's part of the store for reading; it must exist.
    pub fn read_vm(&self, uuid: &Uuid, timeout: Duration) -> Result<VmStore> {
        let dir = self.vm_dir(uuid);
        let lock = lock::lock_shared(&dir.join(LOCK_NAME), timeout)?;
        Ok(VmStore {
            dir,
            lock,
            writer: None,
        })
    }

    /// The UUIDs the store holds something for, sorted.
    pub fn vm_uuids(&self) -> Result<Vec<Uuid>> {
        let rd = match std::fs::read_dir(&self.root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io("read directory", &self.root, e)),
        };
        let mut v: Vec<Uuid> = rd
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
            .filter_map(|e| Uuid::new(e.file_name().to_str()?))
            .collect();
        v.sort();
        Ok(v)
    }

    /// After a refused restore that let the VM start with a new TPM: keep
    /// the generation the refusal was about (the newest that verifies,
    /// else the newest) out of retention. Returns it; None when the store
    /// holds no generation for the VM.
    pub fn protect_refused(
        &self,
        uuid: &Uuid,
        timeout: Duration,
        max: u64,
        why: &str,
    ) -> Result<Option<String>> {
        if !self.vm_dir(uuid).is_dir() {
            return Ok(None);
        }
        let vm = self.open_vm(uuid, timeout)?;
        let gens = vm.generations()?;
        let good = gens.iter().rev().find(|g| vm.load_verified(g, max).is_ok());
        let Some(g) = good.or(gens.last()) else {
            return Ok(None);
        };
        crate::marks::protect(&vm, g, why)?;
        Ok(Some(g.clone()))
    }
}

impl VmStore {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The handle writes go through; only under the exclusive lock.
    fn writer(&self) -> Result<&Dir> {
        self.writer.as_ref().ok_or_else(|| {
            Error::failed(format!(
                "{}: writing needs the exclusive lock",
                self.dir.display()
            ))
        })
    }

    /// The bytes the files of `gens` hold, each inode once: an unchanged
    /// NVRAM is linked from one generation into the next.
    pub fn bytes_held(&self, gens: &[String]) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let mut seen = std::collections::HashSet::new();
        let mut total = 0;
        for g in gens {
            let Ok(rd) = std::fs::read_dir(self.dir.join(g)) else {
                continue;
            };
            for md in rd.filter_map(|e| e.ok()?.metadata().ok()) {
                if seen.insert((md.dev(), md.ino())) {
                    total += md.len();
                }
            }
        }
        total
    }

    /// Complete generations, oldest first.
    pub fn generations(&self) -> Result<Vec<String>> {
        let mut v: Vec<String> = std::fs::read_dir(&self.dir)
            .ctx("read directory", &self.dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| is_generation_name(n))
            .collect();
        v.sort();
        Ok(v)
    }

    pub fn read_manifest(&self, generation: &str) -> Result<Manifest> {
        let p = self.dir.join(generation).join(manifest::MANIFEST);
        let bytes = std::fs::read(&p).ctx("read", &p)?;
        Manifest::from_json(&bytes).map_err(|e| Error::failed(format!("{}: {e}", p.display())))
    }

    /// Temporaries whose owner is provably gone (`leftover`) go away
    /// before anything else happens; others stay, and are logged.
    fn remove_leftovers(&self) -> Result<()> {
        let vm = self.writer()?;
        let (here, me, now) = (leftover::host_tag(), std::process::id(), SystemTime::now());
        let mut removed = false;
        for name in vm.names()? {
            let Some(rest) = name
                .strip_prefix(TMP_PREFIX)
                .or_else(|| name.strip_prefix(TRASH_PREFIX))
            else {
                continue;
            };
            let Some(st) = vm.entry_stat(&name)? else {
                continue;
            };
            let p = self.dir.join(&name);
            let age = modified(&st).and_then(|t| now.duration_since(t).ok());
            let owner = leftover::owner(rest);
            if !leftover::abandoned(&owner, age, &here, me, Path::new("/proc")) {
                log::info!(
                    "kept {}: its run may still be writing it (another host's goes when \
                     {} min old)",
                    p.display(),
                    leftover::FOREIGN_AGE.as_secs() / 60
                );
                continue;
            }
            vm.remove_entry(&name)?;
            log::info!("removed {} left by an interrupted run", p.display());
            removed = true;
        }
        if removed {
            vm.sync()?;
        }
        Ok(())
    }

    /// Write every file, the manifest and SHA256SUMS into `tmp`, fsynced.
    fn fill(
        tmp: &Dir,
        files: &[(String, Vec<u8>)],
        manifest: &Manifest,
        prev: Option<&Dir>,
    ) -> Result<()> {
        let mut sums = Vec::with_capacity(files.len() + 1);
        for (i, (fname, bytes)) in files.iter().enumerate() {
            if !(fname == manifest::NVRAM && linked_unchanged(tmp, prev, fname, bytes)) {
                tmp.write_new(fname, bytes, 0o600, None)?;
            }
            // Hashed once, for the manifest; hash here only what it lacks.
            let sha = manifest
                .files
                .iter()
                .find(|f| &f.name == fname)
                .map(|f| f.sha256.clone());
            sums.push((
                fname.clone(),
                sha.unwrap_or_else(|| manifest::sha256_hex(bytes)),
            ));
            if i == 0 {
                failpoint::hit("store-after-first-file");
            }
        }
        let mjson = manifest.to_json();
        tmp.write_new(manifest::MANIFEST, &mjson, 0o600, None)?;
        sums.push((manifest::MANIFEST.to_owned(), manifest::sha256_hex(&mjson)));
        tmp.write_new(manifest::SUMS, &manifest::sums_file(&sums), 0o600, None)?;
        tmp.sync()
    }

    /// Write a new generation holding `files` (name, bytes) and `manifest`,
    /// then keep only the newest `keep`. Returns the new generation's name
    /// and the names of the generations removed.
    pub fn add_generation(
        &self,
        files: &[(String, Vec<u8>)],
        manifest: &Manifest,
        keep: usize,
    ) -> Result<(String, Vec<String>)> {
        let vm = self.writer()?;
        let seq = self.next_sequence()?;
        let time = manifest::compact_time(manifest.time_unix);
        let tmp = leftover::name(TMP_PREFIX, &format!("{seq:08}-{time}"));
        // The newest generation, whose unchanged NVRAM is linked, not copied.
        let prev = self
            .generations()?
            .pop()
            .and_then(|g| vm.open_subdir(&g).ok());
        if let Err(e) = vm
            .mkdir(&tmp, 0o700)
            .and_then(|d| Self::fill(&d, files, manifest, prev.as_ref()))
        {
            // Free the space now (a full disk is the usual cause); a crash
            // here would leave it to the next run's clean-up instead.
            let _ = vm.remove_entry(&tmp);
            return Err(e);
        }
        failpoint::hit("store-before-rename");
        let name = match self.place(&tmp, seq, &time) {
            Ok(name) => name,
            Err(e) => {
                let _ = vm.remove_entry(&tmp);
                return Err(e);
            }
        };
        failpoint::hit("store-after-rename");
        vm.sync()?;
        let removed = self.prune(keep)?;
        Ok((name, removed))
    }

    /// The number after the newest generation's.
    fn next_sequence(&self) -> Result<u64> {
        let seq = self.generations()?.last().map(|g| sequence(g)).unwrap_or(0) + 1;
        if seq > 99_999_999 {
            return Err(Error::failed(format!(
                "{}: generation numbers exhausted",
                self.dir.display()
            )));
        }
        Ok(seq)
    }

    /// Rename the complete generation `tmp` into place as number `seq`,
    /// never replacing one. The number was chosen under the VM's lock, so
    /// it is free; if it is not, another host wrote while we held the lock
    /// (flock does not work across hosts on this store): say so, and take
    /// the next free number rather than lose this capture.
    fn place(&self, tmp: &str, mut seq: u64, time: &str) -> Result<String> {
        let vm = self.writer()?;
        for _ in 0..PLACE_TRIES {
            let name = format!("{seq:08}-{time}");
            let dest = self.dir.join(&name);
            let e = match vm.rename(tmp, &name, Rename::NoReplace) {
                Ok(()) => return Ok(name),
                Err(e) => e,
            };
            let taken = matches!(
                e.io_kind(),
                Some(std::io::ErrorKind::AlreadyExists | std::io::ErrorKind::DirectoryNotEmpty)
            );
            if !taken {
                return Err(e);
            }
            log::warn!(
                "{} appeared while this run held the VM's lock {}: another host wrote \
                 at the same time, so flock does not work across hosts on this store \
                 (see docs/shared-store.md); this capture takes the next number",
                dest.display(),
                self.lock.path().display()
            );
            seq = self.next_sequence()?.max(seq + 1);
        }
        Err(Error::failed(format!(
            "{}: every generation number tried was taken by another writer; \
             make flock work across hosts on this store (see docs/shared-store.md)",
            self.dir.display()
        )))
    }

    /// The hook's retention: remove all but the newest `keep` (at least
    /// one) generations that are not protected. Protected ones neither go
    /// nor count: a new TPM's stops never push out the state a refused
    /// restore left behind.
    pub fn prune(&self, keep: usize) -> Result<Vec<String>> {
        let keep = keep.max(1);
        let protected = match crate::marks::protections(self) {
            Ok(p) => p,
            Err(why) => {
                log::warn!("{why}; retention removes nothing until it is fixed");
                return Ok(Vec::new());
            }
        };
        let all = self.generations()?;
        // Live captures never push out the newest capture taken at a stop
        // (as the newest generation, it is kept anyway).
        let stop = self
            .newest_stop_capture(&all)
            .filter(|g| Some(g) != all.last());
        let gens: Vec<String> = all
            .into_iter()
            .filter(|g| !protected.iter().any(|p| &p.generation == g))
            .filter(|g| Some(g) != stop.as_ref())
            .collect();
        if gens.len() <= keep {
            return Ok(Vec::new());
        }
        let doomed = gens[..gens.len() - keep].to_vec();
        self.remove_generations(&doomed)?;
        Ok(doomed)
    }

    /// The newest of `gens` that was captured at a stop, not from a running
    /// VM: retention keeps it however many live captures follow. Manifests
    /// are read newest first, so this usually reads one or two.
    pub fn newest_stop_capture(&self, gens: &[String]) -> Option<String> {
        gens.iter()
            .rev()
            .find(|g| self.read_manifest(g).is_ok_and(|m| !m.live))
            .cloned()
    }

    /// Remove the named generations. Each is first renamed to a trash
    /// name, so a crash mid-removal never leaves a half-deleted directory
    /// under a generation name.
    pub fn remove_generations(&self, doomed: &[String]) -> Result<()> {
        self.remove_dirs(doomed)?;
        // Only now: a crash before this leaves a record of a generation
        // that is gone (harmless), never a generation without its record.
        crate::marks::unprotect(self, doomed)
    }

    /// Remove these directories of the VM's store (generations, or kept
    /// evidence), each renamed to a trash name first.
    pub(crate) fn remove_dirs(&self, doomed: &[String]) -> Result<()> {
        let vm = self.writer()?;
        if doomed.is_empty() {
            return Ok(());
        }
        let trash: Vec<String> = doomed
            .iter()
            .map(|g| leftover::name(TRASH_PREFIX, g))
            .collect();
        for (g, t) in doomed.iter().zip(&trash) {
            vm.rename_for_removal(g, t)?;
            // Its mtime was the capture's: make it the removal's, so that
            // another host judges this trash by when it began (`leftover`).
            // Best effort: it is doomed either way.
            if let Ok(d) = vm.open_subdir(t) {
                let _ = d.set_modified(SystemTime::now());
            }
        }
        vm.sync()?;
        failpoint::hit("prune-after-rename");
        for t in &trash {
            vm.remove_entry(t)?;
        }
        vm.sync()
    }

    /// Write a directory `name` holding `files` (name, bytes) the way a
    /// generation is written: under a temporary name (removed by the next
    /// run's clean-up if this one dies), every file and the directory
    /// fsynced, renamed into place, the VM's directory fsynced.
    pub(crate) fn add_dir(&self, name: &str, files: &[(String, Vec<u8>)]) -> Result<()> {
        let vm = self.writer()?;
        let tmp = leftover::name(TMP_PREFIX, name);
        let filled = vm.mkdir(&tmp, 0o700).and_then(|d| {
            files
                .iter()
                .try_for_each(|(n, b)| d.write_new(n, b, 0o600, None))
                .and_then(|()| d.sync())
        });
        if let Err(e) = filled {
            let _ = vm.remove_entry(&tmp);
            return Err(e);
        }
        failpoint::hit("dir-before-rename");
        if let Err(e) = vm.rename(&tmp, name, Rename::NoReplace) {
            let _ = vm.remove_entry(&tmp);
            return Err(e);
        }
        vm.sync()
    }
}

/// When an entry was last modified, from its `stat` (None before 1970).
fn modified(st: &libc::stat) -> Option<SystemTime> {
    let secs = u64::try_from(st.st_mtime).ok()?;
    let nanos = u32::try_from(st.st_mtime_nsec).ok()?;
    Some(UNIX_EPOCH + Duration::new(secs, nanos))
}

/// Link `name` from the previous generation when its bytes there are
/// exactly `bytes` (compared, not trusted from a checksum): an NVRAM that
/// did not change costs a directory entry, not 540 KB, at each live
/// capture. Generations stay whole directories; removing one leaves the
/// other's name. False (write it) when there is no such file or the
/// filesystem refuses the link.
fn linked_unchanged(tmp: &Dir, prev: Option<&Dir>, name: &str, bytes: &[u8]) -> bool {
    let Some(prev) = prev else {
        return false;
    };
    let same = prev.open_file(name).is_ok_and(|mut f| {
        let st = fsutil::fstat(&f);
        let regular = st.is_ok_and(|st| {
            st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_size as usize == bytes.len()
        });
        let mut old = Vec::with_capacity(bytes.len());
        regular && std::io::Read::read_to_end(&mut f, &mut old).is_ok() && old == bytes
    });
    same && tmp.link_from(prev, name, name).is_ok()
}

/// A generation read back and verified: every file against `SHA256SUMS`
/// and the manifest, every TPM file against swtpm's header rules.
#[derive(Debug)]
pub struct Loaded {
    pub name: String,
    pub manifest: Manifest,
    /// Every file `SHA256SUMS` lists (the manifest too), as stored.
    pub files: Vec<(String, Vec<u8>)>,
    /// `SHA256SUMS` itself, as stored (an export carries it unchanged).
    pub sums: Vec<u8>,
}

impl Loaded {
    pub fn file(&self, name: &str) -> Option<&[u8]> {
        self.files
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, b)| b.as_slice())
    }
}

/// Verify the generation directory `dir`; the error says what is wrong.
pub fn load_verified(dir: &Path, max: u64) -> Result<Loaded> {
    load_verified_knowing(dir, max, &[])
}

/// Bytes already in memory and hashed, as (name, sha256, bytes).
pub type Known<'a> = (&'a str, &'a str, &'a [u8]);

/// The same, where a stored file equal to its `known` bytes (with the same
/// checksum) is not hashed again: the capture's "nothing changed" check.
pub fn load_verified_knowing(dir: &Path, max: u64, known: &[Known]) -> Result<Loaded> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let read = |n: &str| -> Result<Vec<u8>> {
        let p = dir.join(n);
        let md = std::fs::symlink_metadata(&p).map_err(|e| Error::failed(format!("{n}: {e}")))?;
        if !md.is_file() {
            return Err(Error::failed(format!("{n}: not a regular file")));
        }
        if md.len() > max {
            return Err(Error::failed(format!(
                "{n}: {} bytes is over max_file_size",
                md.len()
            )));
        }
        std::fs::read(&p).map_err(|e| Error::failed(format!("{n}: {e}")))
    };
    let sums_text = read(manifest::SUMS)?;
    let sums = parse_sums(&sums_text)?;
    let mut files = Vec::with_capacity(sums.len());
    for (n, hex) in &sums {
        let bytes = read(n)?;
        let sum_ok = match known.iter().find(|(k, h, _)| k == n && h == hex) {
            Some((_, _, b)) => *b == bytes.as_slice(),
            None => &manifest::sha256_hex(&bytes) == hex,
        };
        if !sum_ok {
            return Err(Error::failed(format!("{n}: checksum mismatch")));
        }
        files.push((n.clone(), bytes));
    }
    let manifest = verified_manifest(&sums, &files)?;
    Ok(Loaded {
        name,
        manifest,
        files,
        sums: sums_text,
    })
}

/// `SHA256SUMS`, whose names are our own: never a dot file.
fn parse_sums(text: &[u8]) -> Result<Vec<(String, String)>> {
    let sums = manifest::parse_sums(&String::from_utf8_lossy(text))
        .map_err(|e| Error::failed(format!("{}: {e}", manifest::SUMS)))?;
    if let Some((n, _)) = sums.iter().find(|(n, _)| n.starts_with('.')) {
        return Err(Error::failed(format!(
            "{}: unexpected name {n:?}",
            manifest::SUMS
        )));
    }
    Ok(sums)
}

/// The manifest of files already checked against `sums`, read and checked
/// against them and swtpm's header rules.
fn verified_manifest(sums: &[(String, String)], files: &[(String, Vec<u8>)]) -> Result<Manifest> {
    let mbytes = files
        .iter()
        .find(|(n, _)| n == manifest::MANIFEST)
        .map(|(_, b)| b)
        .ok_or_else(|| {
            Error::failed(format!(
                "{} does not list {}",
                manifest::SUMS,
                manifest::MANIFEST
            ))
        })?;
    let m = Manifest::from_json(mbytes)
        .map_err(|e| Error::failed(format!("{}: {e}", manifest::MANIFEST)))?;
    check_manifest_files(&m, sums, files)?;
    Ok(m)
}

/// Verify a generation held in memory (an archive's): `files` must be
/// exactly what `sums` (the bytes of its `SHA256SUMS`) lists, each with
/// its checksum, and the manifest and swtpm's header rules must agree, as
/// for a stored generation.
pub fn verify_in_memory(
    name: &str,
    sums: Vec<u8>,
    files: Vec<(String, Vec<u8>)>,
) -> Result<Loaded> {
    let listed = parse_sums(&sums)?;
    for (n, hex) in &listed {
        let Some((_, bytes)) = files.iter().find(|(f, _)| f == n) else {
            return Err(Error::failed(format!(
                "{n}: listed in {} but missing",
                manifest::SUMS
            )));
        };
        if &manifest::sha256_hex(bytes) != hex {
            return Err(Error::failed(format!("{n}: checksum mismatch")));
        }
    }
    if let Some((n, _)) = files
        .iter()
        .find(|(f, _)| !listed.iter().any(|(l, _)| l == f))
    {
        return Err(Error::failed(format!(
            "{n}: not listed in {}",
            manifest::SUMS
        )));
    }
    let manifest = verified_manifest(&listed, &files)?;
    Ok(Loaded {
        name: name.to_owned(),
        manifest,
        files,
        sums,
    })
}

/// Every file the manifest lists agrees with `SHA256SUMS`, and every TPM
/// file passes swtpm's header rules.
fn check_manifest_files(
    m: &Manifest,
    sums: &[(String, String)],
    files: &[(String, Vec<u8>)],
) -> Result<()> {
    for f in &m.files {
        match sums.iter().find(|(n, _)| n == &f.name) {
            Some((_, hex)) if hex == &f.sha256 => {}
            Some(_) => {
                return Err(Error::failed(format!(
                    "{}: manifest and {} disagree",
                    f.name,
                    manifest::SUMS
                )))
            }
            None => {
                return Err(Error::failed(format!(
                    "{}: listed in the manifest but not in {}",
                    f.name,
                    manifest::SUMS
                )))
            }
        }
        if f.role == Role::Tpm {
            let bytes = &files
                .iter()
                .find(|(n, _)| n == &f.name)
                .expect("checked above")
                .1;
            crate::swtpm::check_file(m.tpm.version, &f.name, bytes)
                .map_err(|why| Error::failed(format!("{}: {why}", f.name)))?;
        }
    }
    if !m.files.iter().any(|f| f.role == Role::Tpm) {
        return Err(Error::failed("the manifest lists no TPM state file"));
    }
    Ok(())
}

impl VmStore {
    pub fn load_verified(&self, generation: &str, max: u64) -> Result<Loaded> {
        load_verified(&self.dir.join(generation), max)
    }

    pub fn load_verified_knowing(
        &self,
        generation: &str,
        max: u64,
        known: &[Known],
    ) -> Result<Loaded> {
        load_verified_knowing(&self.dir.join(generation), max, known)
    }

    /// Small per-VM records (`migrated-away.json`, `incoming-<host>.json`,
    /// `protected.json`, `capture-failed.json`), replaced atomically.
    pub fn write_marker(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let tmp = leftover::name(TMP_PREFIX, name);
        self.writer()?.replace(name, &tmp, bytes, 0o600)
    }

    pub fn read_marker(&self, name: &str) -> Option<Vec<u8>> {
        std::fs::read(self.dir.join(name)).ok()
    }

    pub fn remove_marker(&self, name: &str) -> Result<()> {
        let vm = self.writer()?;
        if vm.remove_file(name)? {
            vm.sync()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_names() {
        assert!(is_generation_name("00000001-20261121T215608Z"));
        assert!(!is_generation_name(".tmp-00000001-20261121T215608Z"));
        assert!(!is_generation_name("00000001-20261121T215608"));
        assert!(!is_generation_name("0000000a-20261121T215608Z"));
        assert_eq!(sequence("00000042-20261121T215608Z"), 42);
    }

    fn scratch(test: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("swk-store-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A complete-looking generation directory at `p` holding `text`.
    fn gen_dir(p: &Path, text: &str) {
        std::fs::create_dir_all(p).unwrap();
        std::fs::write(p.join(manifest::MANIFEST), text).unwrap();
    }

    #[test]
    fn a_rename_into_place_never_replaces_a_generation() {
        let d = scratch("noreplace");
        gen_dir(&d.join("a"), "mine");
        // Empty: a plain rename would replace it (a non-empty one never).
        std::fs::create_dir(d.join("b")).unwrap();
        let dir = Dir::open(&d).unwrap();
        let e = dir.rename("a", "b", Rename::NoReplace).unwrap_err();
        assert!(
            matches!(
                e.io_kind(),
                Some(std::io::ErrorKind::AlreadyExists | std::io::ErrorKind::DirectoryNotEmpty)
            ),
            "{e}"
        );
        let read = |p: &Path| std::fs::read_to_string(p.join(manifest::MANIFEST)).unwrap();
        assert_eq!(read(&d.join("a")), "mine");
        assert!(d.join("b").read_dir().unwrap().next().is_none());
        dir.rename("a", "c", Rename::NoReplace).unwrap();
        assert_eq!(read(&d.join("c")), "mine");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_reader_writes_nothing() {
        let d = scratch("reader");
        let store = Store::new(&d);
        let uuid = &Uuid::new("11111111-2222-3333-4444-555555555555").unwrap();
        drop(store.open_vm(uuid, Duration::from_secs(1)).unwrap());
        let vm = store.read_vm(uuid, Duration::from_secs(1)).unwrap();
        let err = vm.write_marker("m.json", b"{}").unwrap_err().to_string();
        assert!(err.contains("needs the exclusive lock"), "{err}");
        assert!(vm.remove_dirs(&["x".into()]).is_err());
        assert!(!vm.dir().join("m.json").exists());
        drop(vm);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_generation_number_taken_behind_the_lock_moves_this_capture_to_the_next() {
        let d = scratch("taken");
        let store = Store::new(&d);
        let uuid = &Uuid::new("11111111-2222-3333-4444-555555555555").unwrap();
        let vm = store.open_vm(uuid, Duration::from_secs(1)).unwrap();
        // This run chose 1 under the lock; another host (its lock not
        // honoured) put its own 1 in place meanwhile.
        let time = "20261121T000000Z";
        gen_dir(&vm.dir().join(format!("00000001-{time}")), "theirs");
        gen_dir(&vm.dir().join(".tmp-x"), "mine");
        assert_eq!(
            vm.place(".tmp-x", 1, time).unwrap(),
            format!("00000002-{time}")
        );
        let read = |g: &str| std::fs::read_to_string(vm.dir().join(g).join(manifest::MANIFEST));
        assert_eq!(read(&format!("00000001-{time}")).unwrap(), "theirs");
        assert_eq!(read(&format!("00000002-{time}")).unwrap(), "mine");
        drop(vm);
        std::fs::remove_dir_all(&d).unwrap();
    }
}

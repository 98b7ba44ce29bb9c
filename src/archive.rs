//! The archive of one generation that `export` writes and `import` reads:
//! a tar of `<uuid>/`, `<uuid>/<generation>/` and the generation's files
//! under it (`SHA256SUMS` and every file it lists, the manifest among
//! them), exactly as stored.
//!
//! Written the same, byte for byte, on every host and every run: ustar
//! headers only (no PAX, no GNU extensions), entries sorted by name, every
//! mtime the capture's time, uid and gid 0 with no user or group names,
//! mode 0700 for the two directories and 0600 for the files (they hold
//! TPM secrets).
//!
//! Read as untrusted input: only those entries, nothing else (no links,
//! devices, FIFOs, extension headers, absolute or `..` paths, duplicates),
//! each size checked from its header before its data is read, and the
//! whole generation verified as a stored one is before anything uses it.

use std::io::{Read, Write};

use crate::domain::Uuid;
use crate::error::{Error, Result};
use crate::manifest;
use crate::store::{self, Loaded};

/// The mode of every file in an archive.
pub const FILE_MODE: u32 = 0o600;
/// The mode of its two directories.
pub const DIR_MODE: u32 = 0o700;
/// More entries than any generation has (swtpm's files, the NVRAM, the
/// XMLs, the manifest and SHA256SUMS): a flood of headers is refused.
const MAX_ENTRIES: usize = 64;
/// Room for the manifest and SHA256SUMS, which `max_generation_size`
/// does not count.
const METADATA_ALLOWANCE: u64 = 1 << 20;

/// The bounds an archive must keep: each file, and all together.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_file: u64,
    pub max_total: u64,
}

impl Limits {
    /// As for a capture: `max_file_size` per file and
    /// `max_generation_size` (and room for the manifest) in all.
    pub fn of(cfg: &crate::config::Config) -> Limits {
        Limits {
            max_file: cfg.max_file_size,
            max_total: cfg.max_generation_size().saturating_add(METADATA_ALLOWANCE),
        }
    }
}

/// The generation `gen` of the VM `uuid` as a tar archive.
pub fn to_bytes(uuid: &Uuid, gen: &Loaded) -> Result<Vec<u8>> {
    let mtime = u64::try_from(gen.manifest.time_unix).unwrap_or(0);
    let mut files: Vec<(&str, &[u8])> = gen
        .files
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice()))
        .chain([(manifest::SUMS, gen.sums.as_slice())])
        .collect();
    files.sort();
    let size: usize = files.iter().map(|(_, b)| b.len() + 1024).sum();
    let mut b = tar::Builder::new(Vec::with_capacity(size + 3 * 512));
    let fail = |e: std::io::Error| {
        Error::failed(format!(
            "cannot write generation {} of VM {uuid} as an archive: {e}",
            gen.name
        ))
    };
    let dirs = [format!("{uuid}/"), format!("{uuid}/{}/", gen.name)];
    for d in &dirs {
        let h = header(d, tar::EntryType::Directory, DIR_MODE, 0, mtime).map_err(fail)?;
        b.append(&h, std::io::empty()).map_err(fail)?;
    }
    for (name, bytes) in files {
        let path = format!("{}{name}", dirs[1]);
        let h = header(
            &path,
            tar::EntryType::Regular,
            FILE_MODE,
            bytes.len(),
            mtime,
        )
        .map_err(fail)?;
        b.append(&h, bytes).map_err(fail)?;
    }
    b.into_inner().map_err(fail)
}

/// A ustar header with nothing of the host in it.
fn header(
    path: &str,
    kind: tar::EntryType,
    mode: u32,
    size: usize,
    mtime: u64,
) -> std::io::Result<tar::Header> {
    let mut h = tar::Header::new_ustar();
    h.set_path(path)?;
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_size(size as u64);
    h.set_mtime(mtime);
    h.set_cksum();
    Ok(h)
}

/// An archive read and verified: the VM it was exported from, and its
/// generation (named as it was there).
#[derive(Debug)]
pub struct Archived {
    pub uuid: Uuid,
    pub generation: Loaded,
}

/// What an entry's path names.
enum Place {
    VmDir(String),
    GenDir(String, String),
    File(String, String, String),
}

/// Read and verify an archive from `input` (`what` names it in errors).
/// Every refusal says why; nothing is kept of a refused archive.
pub fn read(input: impl Read, what: &str, limits: Limits) -> Result<Archived> {
    let refuse = |why: String| Error::failed(format!("refusing the archive {what}: {why}"));
    let mut ar = tar::Archive::new(input);
    let entries = ar
        .entries()
        .map_err(|e| refuse(format!("not a tar archive: {e}")))?
        // Raw: extension headers (PAX, GNU long names) are entries of
        // their own here, and refused, rather than applied to the next.
        .raw(true);
    let mut c = Collected::default();
    for (i, e) in entries.enumerate() {
        let mut e = e.map_err(|e| refuse(format!("not a readable tar archive: {e}")))?;
        if i >= MAX_ENTRIES {
            return Err(refuse(format!(
                "more than {MAX_ENTRIES} entries; a generation has a few"
            )));
        }
        c.entry(&mut e, limits).map_err(refuse)?;
    }
    c.finish().map_err(refuse)
}

#[derive(Default)]
struct Collected {
    vm: Option<String>,
    generation: Option<String>,
    paths: Vec<String>,
    files: Vec<(String, Vec<u8>)>,
    sums: Option<Vec<u8>>,
    total: u64,
}

impl Collected {
    /// Take one entry: check what it is, where it goes, and its size (from
    /// its header, before reading), then read it.
    fn entry<R: Read>(
        &mut self,
        e: &mut tar::Entry<R>,
        limits: Limits,
    ) -> std::result::Result<(), String> {
        let raw = e.path_bytes().into_owned();
        let path = String::from_utf8(raw).map_err(|_| {
            "an entry's name is not UTF-8: not an archive of swtpm-keeper".to_owned()
        })?;
        let shown = crate::logging::sanitize(&path);
        let kind = e.header().entry_type();
        let size = e
            .header()
            .size()
            .map_err(|err| format!("{shown}: unreadable size: {err}"))?;
        if !(kind.is_file() || kind.is_dir()) {
            return Err(format!(
                "{shown} is {}; an archive of a generation holds only regular files",
                describe(kind)
            ));
        }
        let place = parse_path(&path).map_err(|why| format!("{shown}: {why}"))?;
        match (&place, kind) {
            (Place::File(..), tar::EntryType::Regular) => {}
            (Place::VmDir(_) | Place::GenDir(..), tar::EntryType::Directory) if size == 0 => {}
            _ => {
                return Err(format!(
                    "{shown}: only <uuid>/ and <uuid>/<generation>/ may be directories, \
                     and only files under them"
                ))
            }
        }
        self.place(&place)
            .map_err(|why| format!("{shown}: {why}"))?;
        if self.paths.contains(&path) {
            return Err(format!("{shown} is in the archive twice"));
        }
        self.paths.push(path);
        let Place::File(_, _, name) = place else {
            return Ok(());
        };
        if size > limits.max_file {
            return Err(format!(
                "{shown}: {size} bytes is over max_file_size ({})",
                limits.max_file
            ));
        }
        self.total = self.total.saturating_add(size);
        if self.total > limits.max_total {
            return Err(format!(
                "its files take more than {} bytes (max_generation_size and room for the \
                 manifest); raise max_generation_size if this generation is real",
                limits.max_total
            ));
        }
        let mut bytes = Vec::with_capacity(size as usize);
        e.take(size)
            .read_to_end(&mut bytes)
            .map_err(|err| format!("cannot read {shown}: {err}"))?;
        if bytes.len() as u64 != size {
            return Err(format!("{shown}: the archive ends inside it"));
        }
        if name == manifest::SUMS {
            self.sums = Some(bytes);
        } else {
            self.files.push((name, bytes));
        }
        Ok(())
    }

    /// Every entry is under the one `<uuid>/<generation>/`.
    fn place(&mut self, p: &Place) -> std::result::Result<(), String> {
        let (vm, gen) = match p {
            Place::VmDir(v) => (v, None),
            Place::GenDir(v, g) | Place::File(v, g, _) => (v, Some(g)),
        };
        if *self.vm.get_or_insert_with(|| vm.clone()) != *vm {
            return Err("a second VM; an archive holds one generation of one VM".into());
        }
        if let Some(g) = gen {
            if *self.generation.get_or_insert_with(|| g.clone()) != *g {
                return Err("a second generation; an archive holds one".into());
            }
        }
        Ok(())
    }

    fn finish(self) -> std::result::Result<Archived, String> {
        let (Some(vm), Some(gen)) = (self.vm, self.generation) else {
            return Err("it holds no generation (<uuid>/<generation>/ and its files)".into());
        };
        let sums = self
            .sums
            .ok_or_else(|| format!("{vm}/{gen}/ has no {}", manifest::SUMS))?;
        let loaded = store::verify_in_memory(&gen, sums, self.files)
            .map_err(|e| format!("generation {gen} fails verification: {e}"))?;
        if loaded.manifest.uuid != vm {
            return Err(format!(
                "its manifest is of VM {} but the archive puts it under {vm}",
                crate::logging::sanitize(&loaded.manifest.uuid)
            ));
        }
        // A start may write a kept NVRAM where the manifest says it was
        // (libvirt 9.0 names no NVRAM at `prepare` with firmware
        // auto-selection): only a plain absolute path, as libvirt records.
        if let Some(nv) = loaded.manifest.nvram.as_ref().filter(|n| n.file.is_some()) {
            let p = std::path::Path::new(&nv.path);
            let plain = p.components().all(|c| {
                matches!(
                    c,
                    std::path::Component::RootDir | std::path::Component::Normal(_)
                )
            });
            if !(p.is_absolute() && plain) || nv.path.contains("//") {
                return Err(format!(
                    "its manifest records the NVRAM at {:?}, not a plain absolute path",
                    crate::logging::sanitize(&nv.path)
                ));
            }
        }
        let uuid = Uuid::new(&vm).expect("checked by parse_path");
        Ok(Archived {
            uuid,
            generation: loaded,
        })
    }
}

/// `<uuid>/`, `<uuid>/<generation>/` or `<uuid>/<generation>/<file>`, with
/// our own names only: a canonical UUID, a generation name, a file name
/// of letters, digits, `.`, `_` and `-` that does not start with a dot.
fn parse_path(path: &str) -> std::result::Result<Place, String> {
    if path.starts_with('/') {
        return Err("an absolute path".into());
    }
    let (body, dir) = match path.strip_suffix('/') {
        Some(b) => (b, true),
        None => (path, false),
    };
    let parts: Vec<&str> = body.split('/').collect();
    if parts
        .iter()
        .any(|p| *p == ".." || *p == "." || p.is_empty())
    {
        return Err("a path with `..`, `.` or an empty part".into());
    }
    let vm = parts[0];
    if Uuid::new(vm).is_none() || vm.bytes().any(|c| c.is_ascii_uppercase()) {
        return Err("not under a VM's UUID (lower case, as the store names it)".into());
    }
    if let Some(g) = parts.get(1) {
        if !store::is_generation_name(g) {
            return Err("not under a generation's name".into());
        }
    }
    match (parts.as_slice(), dir) {
        ([v], _) => Ok(Place::VmDir(v.to_string())),
        ([v, g], _) => Ok(Place::GenDir(v.to_string(), g.to_string())),
        ([v, g, f], false) if file_name_ok(f) => {
            Ok(Place::File(v.to_string(), g.to_string(), f.to_string()))
        }
        ([_, _, _], true) => Err(
            "a directory inside a generation; only <uuid>/ and <uuid>/<generation>/ may be \
             directories"
                .into(),
        ),
        ([_, _, _], false) => Err("not a file name a generation holds".into()),
        _ => Err("deeper than <uuid>/<generation>/<file>".into()),
    }
}

fn file_name_ok(f: &str) -> bool {
    !f.starts_with('.')
        && f.len() <= 255
        && f.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn describe(k: tar::EntryType) -> String {
    match k {
        tar::EntryType::Symlink => "a symbolic link".into(),
        tar::EntryType::Link => "a hard link".into(),
        tar::EntryType::Char | tar::EntryType::Block => "a device".into(),
        tar::EntryType::Fifo => "a FIFO".into(),
        tar::EntryType::XHeader | tar::EntryType::XGlobalHeader => "a PAX extended header".into(),
        tar::EntryType::GNULongName | tar::EntryType::GNULongLink => {
            "a GNU long-name header".into()
        }
        tar::EntryType::GNUSparse => "a sparse file".into(),
        k => format!("an entry of type {:?}", k.as_byte() as char),
    }
}

/// Write `bytes` (an archive) to `out` whole.
pub fn write_all(out: &mut dyn Write, bytes: &[u8]) -> Result<()> {
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(|e| Error::failed(format!("cannot write the archive to stdout: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_only_ours() {
        let u = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";
        let g = "00000001-20261121T215608Z";
        assert!(matches!(parse_path(&format!("{u}/")), Ok(Place::VmDir(_))));
        assert!(matches!(
            parse_path(&format!("{u}/{g}/")),
            Ok(Place::GenDir(..))
        ));
        assert!(matches!(
            parse_path(&format!("{u}/{g}/tpm2-00.permall")),
            Ok(Place::File(..))
        ));
        for bad in [
            format!("/{u}/{g}/x"),
            format!("{u}/{g}/../x"),
            format!("{u}/../{u}/{g}/x"),
            format!("{u}//{g}/x"),
            format!("{u}/./{g}/x"),
            format!("{u}/{g}/x/"),
            format!("{u}/{g}/a/b"),
            format!("{u}/{g}/.hidden"),
            format!("{u}/{g}/a b"),
            format!("{u}/not-a-generation/x"),
            "AAAAAAAA-BBBB-CCCC-DDDD-EEEEEEEEEEEE/".to_owned(),
            "x/".to_owned(),
            String::new(),
        ] {
            assert!(parse_path(&bad).is_err(), "{bad:?} accepted");
        }
    }
}

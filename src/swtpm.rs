//! What swtpm leaves on disk: where the state is, which files are state,
//! whether a file is a well-formed swtpm blob, and whether swtpm still runs.

use std::ffi::OsStr;
use std::fs::File;
use std::path::PathBuf;

use crate::domain::{Domain, StateSource, Tpm, TpmVersion};

/// Where a domain's TPM state lives on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateLocation {
    /// A directory of `tpm2-00.*` files (the default, and `<source type='dir'>`).
    Dir(PathBuf),
    /// One file holding everything (`<source type='file'>`, libvirt 10.10+).
    File(PathBuf),
}

impl StateLocation {
    pub fn of(swtpm_dir: &std::path::Path, domain: &Domain, tpm: &Tpm) -> StateLocation {
        match &tpm.source {
            Some(StateSource::Dir(p)) => StateLocation::Dir(p.clone()),
            Some(StateSource::File(p)) => StateLocation::File(p.clone()),
            None => StateLocation::Dir(swtpm_dir.join(&domain.uuid).join(tpm.version.dir_name())),
        }
    }

    pub fn path(&self) -> &std::path::Path {
        match self {
            StateLocation::Dir(p) | StateLocation::File(p) => p,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            StateLocation::Dir(_) => "dir",
            StateLocation::File(_) => "file",
        }
    }
}

/// The name a file-backed state gets in a generation.
pub const FILE_STATE_NAME: &str = "tpm-state.file";

/// The blobs swtpm stores, by the names its directory backend gives them
/// (swtpm `src/swtpm/swtpm_nvstore.c`: "tpm2-00.<blob>", "tpm-00.<blob>"
/// for TPM 1.2; libtpms' `TPM_PERMANENT_ALL_NAME`, `TPM_VOLATILESTATE_NAME`,
/// `TPM_SAVESTATE_NAME`).
pub const STATE_BLOBS: [&str; 3] = ["permall", "volatilestate", "savestate"];

/// swtpm's file name prefix for this TPM version: `tpm2-00.permall`.
pub fn file_prefix(version: TpmVersion) -> &'static str {
    match version {
        TpmVersion::V1_2 => "tpm-00.",
        TpmVersion::V2_0 => "tpm2-00.",
    }
}

/// The prefixes of the temporaries swtpm writes its state files through
/// before renaming them into place (`TMP2-00.permall`), both versions.
const TMP_PREFIXES: [&str; 2] = ["TMP2-00.", "TMP-00."];

/// The file a running swtpm holds its fcntl lock on.
pub const LOCK_FILE: &str = ".lock";

/// Is `name` one of swtpm's own state files for this TPM version? Only
/// the three names swtpm writes: anything else in the directory (its
/// temporaries `TMP2-00.*`, `.lock`, a `permall.bak`, or a file the `tss`
/// user planted) is not state, and is never read.
pub fn is_state_file(version: TpmVersion, name: &OsStr) -> bool {
    name.to_str()
        .and_then(|n| n.strip_prefix(file_prefix(version)))
        .is_some_and(|blob| STATE_BLOBS.contains(&blob))
}

/// Is `name` one swtpm writes in a state directory: its lock, a state
/// file of either version, or the temporary it writes one through
/// (swtpm_nvstore.c)? Anything else (another dotfile, `TMPnotes.txt`, the
/// `.bak` backup of swtpm's `backup` option, which may be the only copy
/// of a TPM) is someone else's.
pub fn is_swtpm_name(name: &str) -> bool {
    let prefixes = [TpmVersion::V2_0, TpmVersion::V1_2]
        .map(file_prefix)
        .into_iter()
        .chain(TMP_PREFIXES);
    name == LOCK_FILE
        || prefixes
            .filter_map(|p| name.strip_prefix(p))
            .any(|blob| STATE_BLOBS.contains(&blob))
}

/// The file whose absence means "no TPM here".
pub fn permall_name(version: TpmVersion) -> String {
    format!("{}permall", file_prefix(version))
}

/// Check one of swtpm's files the way swtpm would before using it, by its
/// name: the linear file of a `<source type='file'>` state
/// (`FILE_STATE_NAME`) by its layout, every other file as a blob, and the
/// TPM 2.0 permall also by its magic numbers. Returns the blob's header
/// flags (0 for the linear file, whose blobs carry their own).
pub fn check_file(version: TpmVersion, name: &str, bytes: &[u8]) -> Result<u16, String> {
    if name == FILE_STATE_NAME {
        return check_linear(bytes).map(|()| 0);
    }
    let tpm2_permall = version == TpmVersion::V2_0 && name == permall_name(version);
    check_blob(bytes, tpm2_permall)
}

/// Header flags swtpm defines (see the facts file).
const KNOWN_FLAGS: u16 = 0x1f;
const FLAG_ENCRYPTED: u16 = 0x01;
const FLAG_MIGRATION_ENCRYPTED: u16 = 0x02;
const TPM2_PERMALL_MAGIC: [u8; 4] = [0xab, 0x36, 0x47, 0x23];

/// Check a state blob the way swtpm would before using it: the 10-byte
/// header, the TLVs that must tile the file exactly, and for a plain
/// TPM 2.0 permall the magic at both ends of its data. Returns the flags.
fn check_blob(bytes: &[u8], is_tpm2_permall: bool) -> Result<u16, String> {
    if bytes.is_empty() {
        return Err("the file is empty".into());
    }
    if bytes.len() < 10 {
        return Err(format!(
            "{} bytes is too short for a swtpm header",
            bytes.len()
        ));
    }
    let version = bytes[0];
    let min_version = bytes[1];
    let hdrsize = u16::from_be_bytes([bytes[2], bytes[3]]) as usize;
    let flags = u16::from_be_bytes([bytes[4], bytes[5]]);
    let totlen = u32::from_be_bytes([bytes[6], bytes[7], bytes[8], bytes[9]]) as usize;
    if min_version != 1 || version < min_version {
        return Err(format!(
            "unknown swtpm header version {version}/{min_version}"
        ));
    }
    if hdrsize < 10 || hdrsize > bytes.len() {
        return Err(format!("bad swtpm header size {hdrsize}"));
    }
    if flags & !KNOWN_FLAGS != 0 {
        return Err(format!("unknown swtpm header flags {flags:#06x}"));
    }
    if totlen != bytes.len() {
        return Err(format!(
            "header says {totlen} bytes but the file has {}",
            bytes.len()
        ));
    }
    let mut off = hdrsize;
    let mut data: Option<&[u8]> = None;
    while off < bytes.len() {
        if bytes.len() - off < 6 {
            return Err(format!("truncated TLV at offset {off}"));
        }
        let tag = u16::from_be_bytes([bytes[off], bytes[off + 1]]);
        let len = u32::from_be_bytes([
            bytes[off + 2],
            bytes[off + 3],
            bytes[off + 4],
            bytes[off + 5],
        ]) as usize;
        let start = off + 6;
        if len > bytes.len() - start {
            return Err(format!(
                "TLV {tag} at offset {off} runs past the end of the file"
            ));
        }
        if tag == 1 && data.is_none() {
            data = Some(&bytes[start..start + len]);
        }
        off = start + len;
    }
    let plain = flags & (FLAG_ENCRYPTED | FLAG_MIGRATION_ENCRYPTED) == 0;
    if is_tpm2_permall && plain {
        let d = data.ok_or("plain state has no data TLV")?;
        if d.len() < 10 || d[2..6] != TPM2_PERMALL_MAGIC || d[d.len() - 4..] != TPM2_PERMALL_MAGIC {
            return Err("TPM 2.0 permanent state lacks its magic numbers".into());
        }
    }
    Ok(flags)
}

/// The first bytes of every linear state file (`<source type='file'>`):
/// "swtpmlin" as a little-endian u64.
pub const LINEAR_MAGIC: [u8; 8] = 0x7377_7470_6d6c_696e_u64.to_le_bytes();

/// swtpm's linear file store: the magic
/// "swtpmlin", version 1, flags, header size, then up to 15 entries of
/// (offset, data length, section length), all in host (little-endian)
/// order. Each allocated entry must be a valid state blob; a file that
/// `swtpm_setup` formatted but never filled holds none, and is refused.
pub fn check_linear(bytes: &[u8]) -> Result<(), String> {
    const MAX_STATES: usize = 15;
    let u32_at = |o: usize| {
        u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
    };
    if bytes.is_empty() {
        return Err("the file is empty".into());
    }
    if bytes.len() < 12 || bytes[..8] != LINEAR_MAGIC {
        return Err("not a swtpm linear state file (no 'swtpmlin' magic)".into());
    }
    if bytes[8] != 1 {
        return Err(format!("unknown linear file version {}", bytes[8]));
    }
    let hdrsize = u16::from_le_bytes([bytes[10], bytes[11]]) as usize;
    if hdrsize < 12 || hdrsize > bytes.len() {
        return Err(format!("bad linear header size {hdrsize}"));
    }
    let entries = ((hdrsize - 12) / 12).min(MAX_STATES);
    let mut states = 0;
    for i in 0..entries {
        let e = 12 + i * 12;
        let (offset, len) = (u32_at(e), u32_at(e + 4));
        if offset == 0 || len == 0 {
            continue;
        }
        if offset < hdrsize || offset.checked_add(len).is_none_or(|end| end > bytes.len()) {
            return Err(format!("linear entry {i} points outside the file"));
        }
        check_blob(&bytes[offset..offset + len], false)
            .map_err(|why| format!("linear entry {i}: {why}"))?;
        states += 1;
    }
    if states == 0 {
        return Err("the linear file holds no TPM state (formatted, never written)".into());
    }
    Ok(())
}

/// If a process holds a POSIX (fcntl) lock on the open file, its pid.
/// A running swtpm holds one on `.lock` (flock would not see it).
pub fn fcntl_lock_holder(file: &File) -> std::io::Result<Option<i32>> {
    // SAFETY: libc::flock is a C struct of integers (its fields, and the
    // padding some architectures add, differ between targets, so it cannot
    // be written as a literal); all zeroes is a valid value of it.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 0;
    nix::fcntl::fcntl(file, nix::fcntl::FcntlArg::F_GETLK(&mut fl))?;
    if fl.l_type == libc::F_UNLCK as libc::c_short {
        Ok(None)
    } else {
        Ok(Some(fl.l_pid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/libvirt-9.0")
                .join(name),
        )
        .unwrap()
    }

    #[test]
    fn real_plain_and_encrypted_permall_pass() {
        assert_eq!(check_blob(&fixture("tpm2-00.permall.plain"), true), Ok(0));
        assert_eq!(
            check_blob(&fixture("tpm2-00.permall.encrypted"), true),
            Ok(9)
        );
    }

    #[test]
    fn damaged_blobs_fail_with_a_reason() {
        let good = fixture("tpm2-00.permall.plain");
        assert!(check_blob(&[], true).unwrap_err().contains("empty"));
        assert!(check_blob(&good[..good.len() - 1], true)
            .unwrap_err()
            .contains("header says"));
        let mut bad_magic = good.clone();
        let n = bad_magic.len();
        bad_magic[n - 1] ^= 0xff;
        assert!(check_blob(&bad_magic, true).unwrap_err().contains("magic"));
        let mut bad_flags = good.clone();
        bad_flags[5] = 0x80;
        assert!(check_blob(&bad_flags, true).unwrap_err().contains("flags"));
        let mut bad_tlv = good.clone();
        bad_tlv[12] = 0x7f;
        assert!(check_blob(&bad_tlv, true)
            .unwrap_err()
            .contains("past the end"));
        assert!(check_blob(&[0u8; 4096], true).is_err());
    }

    /// A linear file as swtpm lays it out, holding `blobs`.
    fn linear(blobs: &[&[u8]]) -> Vec<u8> {
        let hdrsize = 12 + 15 * 12;
        let mut v = vec![0u8; hdrsize];
        v[..8].copy_from_slice(&0x7377_7470_6d6c_696e_u64.to_le_bytes());
        v[8] = 1;
        v[10..12].copy_from_slice(&(hdrsize as u16).to_le_bytes());
        for (i, b) in blobs.iter().enumerate() {
            let off = v.len() as u32;
            let e = 12 + i * 12;
            v[e..e + 4].copy_from_slice(&off.to_le_bytes());
            v[e + 4..e + 8].copy_from_slice(&(b.len() as u32).to_le_bytes());
            v[e + 8..e + 12].copy_from_slice(&(b.len() as u32).to_le_bytes());
            v.extend_from_slice(b);
        }
        v
    }

    #[test]
    fn linear_files_are_checked_entry_by_entry() {
        let permall = fixture("tpm2-00.permall.plain");
        assert_eq!(check_linear(&linear(&[&permall])), Ok(()));
        assert!(check_linear(&linear(&[]))
            .unwrap_err()
            .contains("never written"));
        assert!(check_linear(&[]).unwrap_err().contains("empty"));
        assert!(check_linear(b"swtpmlin\x01\x00\x0c\x00")
            .unwrap_err()
            .contains("magic"));
        let mut bad = linear(&[&permall]);
        let n = bad.len();
        bad[n - 1000] ^= 0xff; // inside the blob's TLV area
        bad[200] ^= 0x01; // the blob's totlen
        assert!(check_linear(&bad).unwrap_err().contains("linear entry 0"));
        let mut outside = linear(&[&permall]);
        outside[16] = 0xff; // data length far past the end
        outside[17] = 0xff;
        assert!(check_linear(&outside).unwrap_err().contains("outside"));
    }

    #[test]
    fn state_file_names() {
        let v2 = TpmVersion::V2_0;
        assert!(is_state_file(v2, OsStr::new("tpm2-00.permall")));
        assert!(is_state_file(v2, OsStr::new("tpm2-00.volatilestate")));
        assert!(!is_state_file(v2, OsStr::new("TMP2-00.permall")));
        assert!(!is_state_file(v2, OsStr::new(".lock")));
        assert!(!is_state_file(v2, OsStr::new("tpm2-00.")));
        assert!(!is_state_file(v2, OsStr::new("tpm2-00.permall~")));
        assert!(!is_state_file(v2, OsStr::new("tpm-00.permall")));
        assert!(is_state_file(v2, OsStr::new("tpm2-00.savestate")));
        for planted in [
            "tpm2-00.evil",
            "tpm2-00.permallx",
            "tpm2-00.permall.bak",
            "tpm2-01.permall",
        ] {
            assert!(!is_state_file(v2, OsStr::new(planted)), "{planted}");
        }
        assert!(is_state_file(
            TpmVersion::V1_2,
            OsStr::new("tpm-00.permall")
        ));
        assert!(!is_state_file(TpmVersion::V1_2, OsStr::new("tpm-00.evil")));
    }
}

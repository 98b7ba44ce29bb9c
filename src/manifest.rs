//! What a generation says about itself: `manifest.json` (machine-readable,
//! versioned) and `SHA256SUMS` (checkable with `sha256sum -c`).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::domain::{TpmVersion, UefiStore};
use crate::fsutil::Identity;

pub const FORMAT: u32 = 1;
pub const MANIFEST: &str = "manifest.json";
pub const SUMS: &str = "SHA256SUMS";
pub const DOMAIN_XML: &str = "domain.xml";
pub const DOMAIN_LIVE_XML: &str = "domain-live.xml";
pub const NVRAM: &str = "nvram.fd";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Layout version of this file; readers refuse newer major formats.
    pub format: u32,
    pub uuid: String,
    pub name: String,
    /// The hook event that captured it: `stopped`, `release`, ...
    pub event: String,
    pub sub_event: String,
    /// libvirt's `extra` argument: the shutoff reason on `release` (10.5+), else `-`.
    pub reason: String,
    /// Capture time, RFC 3339 UTC.
    pub time: String,
    pub time_unix: i64,
    pub host: String,
    pub swtpm_keeper_version: String,
    /// Whether libvirt had a persistent definition at capture time.
    pub persistent: bool,
    /// Where domain.xml came from: `libvirt-config` or `hook-stdin`.
    pub domain_xml_from: String,
    pub tpm: TpmInfo,
    pub nvram: Option<NvramInfo>,
    pub files: Vec<FileEntry>,
    /// Read from a running VM (`swtpm-keeper capture`), not at a stop.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub live: bool,
    /// The VM's state when it was read: `shutoff`, `running` or `paused`.
    /// Absent before 0.2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_state: Option<String>,
    /// Added by `swtpm-keeper import` from an archive, not captured here:
    /// where it came from. The capture's own time, host and event stay
    /// above. Absent before 0.2, and on every capture.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imported_from: Option<Origin>,
}

/// Where an imported generation came from, and when it was imported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// The VM whose generation the archive held, and that generation.
    pub uuid: String,
    pub name: String,
    pub generation: String,
    /// The host that imported it, and when (RFC 3339 UTC).
    pub host: String,
    pub time: String,
    /// The archive's `domain.xml`, kept under this name when `domain.xml`
    /// is the definition of the VM that owns the generation now (another
    /// VM, or the same VM defined anew); None when it is the archive's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain_xml: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TpmInfo {
    pub version: TpmVersion,
    pub model: String,
    /// `dir` or `file`, and the path libvirt uses for it.
    pub state_type: String,
    pub state_path: String,
    pub encryption_secret: Option<String>,
    /// swtpm header flags of the permanent state (0x01 = encrypted).
    pub header_flags: u16,
}

/// The VM's UEFI variable store: libvirt's `<nvram>` file, its
/// `<varstore>` (libvirt 12.1), or a store no capture copies.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NvramInfo {
    /// The file (or, not copied, the device or image) libvirt names.
    pub path: String,
    pub template: Option<String>,
    /// The file's name in the generation; None when it did not exist, or
    /// when it is not copied.
    pub file: Option<String>,
    /// `varstore` for `<os><varstore>`; absent for `<nvram>` (and before 0.2).
    #[serde(default, skip_serializing_if = "UefiStore::is_nvram")]
    pub kind: UefiStore,
    /// `<nvram format=…>` (`raw`, `qcow2`), when the domain said; the file
    /// is kept byte for byte whatever it is. Absent before 0.2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Why the store is not in the generation: `block device /dev/…` or
    /// `network image …` (a copy of a file cannot stand for either).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_copied: Option<String>,
}

impl NvramInfo {
    /// One line for people: "NVRAM /path (qcow2, kept)", "varstore /path
    /// (missing at capture)", "NVRAM not copied: block device /dev/sdb".
    pub fn describe(&self) -> String {
        let label = self.kind.label();
        if let Some(why) = &self.not_copied {
            return format!("{label} not copied: {why}");
        }
        let has = match self.file {
            Some(_) => "kept",
            None => "missing at capture",
        };
        match &self.format {
            Some(f) => format!("{label} {} ({f}, {has})", self.path),
            None => format!("{label} {} ({has})", self.path),
        }
    }
}

/// What a file of a generation is, spelled `tpm`, `nvram`, `domain` or
/// `domain-live` in the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// swtpm's state: its files, or the one linear file.
    Tpm,
    /// The UEFI vars file.
    Nvram,
    /// libvirt's persistent definition (or the XML the hook was given).
    Domain,
    /// The XML of the running VM.
    DomainLive,
}

impl Role {
    /// The roles that make up "the state": a TPM and its UEFI vars.
    pub fn is_state(self) -> bool {
        matches!(self, Role::Tpm | Role::Nvram)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub role: Role,
    /// The path it was copied from, if any.
    pub source: Option<String>,
    pub size: u64,
    /// Octal permission bits of the original, e.g. "0600".
    pub mode: String,
    pub uid: u32,
    pub gid: u32,
    pub owner: Option<String>,
    pub group: Option<String>,
    pub sha256: String,
    /// The version of the source file that was read (device, inode, size,
    /// times): a live capture reads again only a file whose identity
    /// changed. Absent before 0.2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<Identity>,
}

impl Manifest {
    /// The part that defines "the same state": the TPM and NVRAM files.
    pub fn state_identity(&self) -> Vec<(&str, &str)> {
        let mut v: Vec<(&str, &str)> = self
            .files
            .iter()
            .filter(|f| f.role.is_state())
            .map(|f| (f.name.as_str(), f.sha256.as_str()))
            .collect();
        v.sort();
        v
    }

    /// How it was taken, for people: "at stopped", or "live, from the
    /// running VM".
    pub fn taken(&self) -> String {
        match (self.live, self.vm_state.as_deref()) {
            (true, Some(state)) => format!("live, from the {state} VM"),
            (true, None) => "live".into(),
            (false, _) => format!("at {}", self.event),
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("manifest serializes");
        v.push(b'\n');
        v
    }

    pub fn from_json(bytes: &[u8]) -> Result<Manifest, String> {
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if m.format > FORMAT {
            return Err(format!(
                "manifest format {} is newer than this swtpm-keeper ({FORMAT})",
                m.format
            ));
        }
        Ok(m)
    }
}

pub fn sha256_hex(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    let mut s = String::with_capacity(64);
    for b in digest.iter() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// `SHA256SUMS` in the format `sha256sum -c` reads: "<hex>  <name>\n",
/// sorted by name. Names are our own and never contain newlines.
pub fn sums_file(entries: &[(String, String)]) -> Vec<u8> {
    let mut e: Vec<&(String, String)> = entries.iter().collect();
    e.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = String::new();
    for (name, hex) in e {
        out.push_str(hex);
        out.push_str("  ");
        out.push_str(name);
        out.push('\n');
    }
    out.into_bytes()
}

/// Parse `SHA256SUMS` back into (name, hex) pairs.
pub fn parse_sums(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut v = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let (hex, name) = line
            .split_once("  ")
            .ok_or_else(|| format!("line {}: not '<sha256>  <name>'", i + 1))?;
        if hex.len() != 64
            || !hex.bytes().all(|c| c.is_ascii_hexdigit())
            || name.is_empty()
            || name.contains('/')
        {
            return Err(format!("line {}: malformed", i + 1));
        }
        v.push((name.to_owned(), hex.to_ascii_lowercase()));
    }
    Ok(v)
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn parts(unix: i64) -> (i64, u32, u32, i64, i64, i64) {
    let (y, mo, d) = civil_from_days(unix.div_euclid(86_400));
    let s = unix.rem_euclid(86_400);
    (y, mo, d, s / 3600, s % 3600 / 60, s % 60)
}

/// "2026-11-21T21:56:08Z"
pub fn rfc3339(unix: i64) -> String {
    let (y, mo, d, h, mi, s) = parts(unix);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// "20261121T215608Z", for generation names.
pub fn compact_time(unix: i64) -> String {
    let (y, mo, d, h, mi, s) = parts(unix);
    format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_format_as_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_298_168), "2026-11-21T21:56:08Z");
        assert_eq!(compact_time(951_782_400), "20000229T000000Z");
    }

    #[test]
    fn provenance_is_optional_and_absent_from_a_capture() {
        let json = br#"{"format": 1, "uuid": "u", "name": "n", "event": "stopped",
            "sub_event": "end", "reason": "-", "time": "t", "time_unix": 0, "host": "h",
            "swtpm_keeper_version": "0.1.0", "persistent": false, "domain_xml_from": "hook-stdin",
            "tpm": {"version": "2.0", "model": "tpm-crb", "state_type": "dir", "state_path": "/p",
                    "encryption_secret": null, "header_flags": 0},
            "nvram": null, "files": []}"#;
        let mut m = Manifest::from_json(json).unwrap();
        assert_eq!(m.imported_from, None);
        let text = String::from_utf8(m.to_json()).unwrap();
        assert!(!text.contains("imported_from"), "{text}");
        m.imported_from = Some(Origin {
            uuid: "u".into(),
            name: "n".into(),
            generation: "00000001-20261121T215608Z".into(),
            host: "b".into(),
            time: rfc3339(0),
            domain_xml: None,
        });
        assert_eq!(Manifest::from_json(&m.to_json()).unwrap(), m);
    }

    #[test]
    fn sums_round_trip_and_sort() {
        let e = vec![
            ("b".to_string(), sha256_hex(b"b")),
            ("a".to_string(), sha256_hex(b"")),
        ];
        let text = String::from_utf8(sums_file(&e)).unwrap();
        assert!(text
            .starts_with("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855  a\n"));
        let back = parse_sums(&text).unwrap();
        assert_eq!(back[1], e[0]);
        assert!(parse_sums("zz  a\n").is_err());
        assert!(parse_sums(&format!("{}  ../x\n", sha256_hex(b""))).is_err());
    }
}

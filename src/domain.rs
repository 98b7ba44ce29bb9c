//! The domain XML libvirt gives the hook on stdin: read only what the hook
//! needs (name, UUID, the emulator TPM, the UEFI variable store) and
//! validate it, since names and paths end up in file paths and log lines.
//!
//! libvirt keeps a VM's UEFI variables in one of:
//! - `<os><nvram>PATH</nvram>` (or `<nvram type='file'><source file=…/>`),
//!   the firmware's pflash image, `format='raw'` (OVMF's) or `'qcow2'`
//!   (libvirt 10.10+): a file, kept byte for byte whatever its format;
//! - `<os><varstore path='…' template='…'/>` (libvirt 12.1, QEMU's
//!   `uefi-vars` device, which keeps the variables as JSON): a file, kept
//!   as the NVRAM is;
//! - `<nvram type='block'>` or `type='network'`: a device or a remote
//!   image, which a copy of a file cannot stand for: named, never copied.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Domain XML is a few KiB; libvirt itself refuses documents over 10 MiB
/// (VIR_DOMAIN_XML_MAX is not that large either). Anything larger is not
/// from libvirt.
pub const MAX_XML_BYTES: usize = 4 << 20;

/// A manifest spells it as libvirt does, "2.0" or "1.2"; any other
/// version makes the manifest unreadable rather than a guess.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TpmVersion {
    #[serde(rename = "1.2")]
    V1_2,
    #[serde(rename = "2.0")]
    V2_0,
}

impl std::fmt::Display for TpmVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TpmVersion {
    /// The directory libvirt uses under `<swtpm_dir>/<uuid>/`.
    pub fn dir_name(self) -> &'static str {
        match self {
            TpmVersion::V1_2 => "tpm1.2",
            TpmVersion::V2_0 => "tpm2",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TpmVersion::V1_2 => "1.2",
            TpmVersion::V2_0 => "2.0",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "1.2" => Some(TpmVersion::V1_2),
            "2.0" => Some(TpmVersion::V2_0),
            _ => None,
        }
    }
}

/// Which of libvirt's UEFI variable stores a VM's file is; spelled
/// `nvram` or `varstore` in a manifest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UefiStore {
    /// `<os><nvram>`: the firmware's pflash image.
    #[default]
    Nvram,
    /// `<os><varstore>`: QEMU's `uefi-vars` device's JSON file.
    Varstore,
}

impl UefiStore {
    pub fn is_nvram(&self) -> bool {
        *self == UefiStore::Nvram
    }

    /// For people: "NVRAM" or "varstore".
    pub fn label(self) -> &'static str {
        match self {
            UefiStore::Nvram => "NVRAM",
            UefiStore::Varstore => "varstore",
        }
    }
}

/// A UEFI variable store that is no file: `what` it is (`block device`,
/// `network image`) and where (the device, `protocol:name`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotAFile {
    pub what: &'static str,
    pub at: String,
}

impl std::fmt::Display for NotAFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.what, self.at)
    }
}

/// Where libvirt (10.10+) was told to keep the state, overriding the default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateSource {
    Dir(PathBuf),
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tpm {
    pub model: String,
    pub version: TpmVersion,
    pub encryption_secret: Option<String>,
    pub source: Option<StateSource>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    pub name: String,
    pub uuid: Uuid,
    /// The emulator TPM, if the domain has one.
    pub tpm: Option<Tpm>,
    /// The UEFI variable store's file (`<os><nvram>` or `<os><varstore>`),
    /// when it is a local file.
    pub nvram: Option<PathBuf>,
    pub nvram_template: Option<String>,
    /// Which store `nvram` is.
    pub nvram_kind: UefiStore,
    /// `<nvram format=…>`: `raw` or `qcow2`, when the XML says.
    pub nvram_format: Option<String>,
    /// A store that is no file (`type='block'` or `'network'`), which no
    /// capture copies: what it is, for the manifest and the log.
    pub nvram_not_copied: Option<NotAFile>,
    /// `<os firmware='efi'>`: firmware auto-selection. On libvirt 9.0 the
    /// XML at `prepare` does not name the NVRAM file yet.
    pub firmware: Option<String>,
}

// --- serde mirror of the parts of the document we read ---

#[derive(Deserialize)]
struct XDomain {
    name: Option<String>,
    uuid: Option<String>,
    os: Option<XOs>,
    devices: Option<XDevices>,
}

#[derive(Deserialize)]
struct XOs {
    #[serde(rename = "@firmware")]
    firmware: Option<String>,
    nvram: Option<XNvram>,
    varstore: Option<XVarstore>,
}

#[derive(Deserialize)]
struct XNvram {
    #[serde(rename = "@template")]
    template: Option<String>,
    #[serde(rename = "@type")]
    kind: Option<String>,
    #[serde(rename = "@format")]
    format: Option<String>,
    #[serde(rename = "$text")]
    text: Option<String>,
    source: Option<XNvramSource>,
}

/// A disk-like `<source>`: `file=` for a file, `dev=` for a block device,
/// `protocol=` and `name=` for a network image.
#[derive(Deserialize)]
struct XNvramSource {
    #[serde(rename = "@file")]
    file: Option<String>,
    #[serde(rename = "@dev")]
    dev: Option<String>,
    #[serde(rename = "@protocol")]
    protocol: Option<String>,
    #[serde(rename = "@name")]
    name: Option<String>,
}

#[derive(Deserialize)]
struct XVarstore {
    #[serde(rename = "@path")]
    path: Option<String>,
    #[serde(rename = "@template")]
    template: Option<String>,
}

#[derive(Deserialize)]
struct XDevices {
    #[serde(default)]
    tpm: Vec<XTpm>,
}

#[derive(Deserialize)]
struct XTpm {
    #[serde(rename = "@model")]
    model: Option<String>,
    backend: Option<XBackend>,
}

#[derive(Deserialize)]
struct XBackend {
    #[serde(rename = "@type")]
    kind: Option<String>,
    #[serde(rename = "@version")]
    version: Option<String>,
    encryption: Option<XEncryption>,
    source: Option<XSource>,
}

#[derive(Deserialize)]
struct XEncryption {
    #[serde(rename = "@secret")]
    secret: Option<String>,
}

#[derive(Deserialize)]
struct XSource {
    #[serde(rename = "@type")]
    kind: Option<String>,
    #[serde(rename = "@path")]
    path: Option<String>,
}

/// A VM's UUID, as libvirt prints it: 8-4-4-4-12 hex digits. It can only
/// be built valid, which also keeps `/` and `..` out of the store paths
/// made from it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Uuid(String);

impl Uuid {
    /// `s` as it is, if it is a UUID (the name of a store directory).
    pub fn new(s: &str) -> Option<Uuid> {
        let b = s.as_bytes();
        let valid = b.len() == 36
            && b.iter().enumerate().all(|(i, &c)| match i {
                8 | 13 | 18 | 23 => c == b'-',
                _ => c.is_ascii_hexdigit(),
            });
        valid.then(|| Uuid(s.to_owned()))
    }

    /// What an operator or an XML document wrote: trimmed, and in lower
    /// case as libvirt prints it.
    pub fn normalize(s: &str) -> Option<Uuid> {
        Uuid::new(s.trim()).map(|u| Uuid(u.0.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for Uuid {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<std::path::Path> for Uuid {
    fn as_ref(&self) -> &std::path::Path {
        self.0.as_ref()
    }
}

impl std::fmt::Display for Uuid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for Uuid {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for Uuid {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl Serialize for Uuid {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

fn abs_path(what: &str, p: &str) -> Result<PathBuf> {
    let p = p.trim();
    if p.is_empty() || !p.starts_with('/') || p.contains('\0') {
        return Err(Error::failed(format!(
            "{what} path {p:?} is not an absolute path"
        )));
    }
    Ok(PathBuf::from(p))
}

impl Domain {
    pub fn parse(xml: &[u8]) -> Result<Domain> {
        let d = read_xml(xml)?;
        let name = name_of(d.name)?;
        let raw_uuid = d
            .uuid
            .ok_or_else(|| Error::failed("domain XML has no <uuid>"))?;
        let uuid = Uuid::normalize(&raw_uuid).ok_or_else(|| {
            Error::failed(format!("domain XML has an invalid <uuid> {raw_uuid:?}"))
        })?;
        let tpm = emulator_tpm(d.devices.map(|d| d.tpm).unwrap_or_default())?;
        let firmware = d.os.as_ref().and_then(|o| o.firmware.clone());
        let store = match d.os {
            Some(os) => uefi_store(os.nvram, os.varstore)?,
            None => Store::default(),
        };
        Ok(Domain {
            name,
            uuid,
            tpm,
            nvram: store.path,
            nvram_template: store.template,
            nvram_kind: store.kind,
            nvram_format: store.format,
            nvram_not_copied: store.not_copied,
            firmware,
        })
    }
}

/// The document, once it is known to be one libvirt could have sent.
fn read_xml(xml: &[u8]) -> Result<XDomain> {
    if xml.len() > MAX_XML_BYTES {
        return Err(Error::failed(format!(
            "domain XML is {} bytes, over the limit of {MAX_XML_BYTES}",
            xml.len()
        )));
    }
    let text = std::str::from_utf8(xml)
        .map_err(|e| Error::failed(format!("domain XML is not UTF-8: {e}")))?;
    if text.contains("<!DOCTYPE") || text.contains("<!ENTITY") {
        // libvirt never emits a DTD; refusing it rules out entity tricks.
        return Err(Error::failed(
            "domain XML has a DOCTYPE; libvirt never sends one",
        ));
    }
    quick_xml::de::from_str(text).map_err(|e| Error::failed(format!("cannot read domain XML: {e}")))
}

/// The <name>, usable in file names and log lines.
fn name_of(name: Option<String>) -> Result<String> {
    let name = name.ok_or_else(|| Error::failed("domain XML has no <name>"))?;
    let name = name.trim().to_owned();
    // XML 1.0 forbids these characters; quick-xml does not check.
    let forbidden = |c: char| c < ' ' && !matches!(c, '\t' | '\n' | '\r');
    if name.is_empty() || name.contains('/') || name.len() > 1024 || name.chars().any(forbidden) {
        return Err(Error::failed(format!(
            "domain XML has an unusable <name> {name:?}"
        )));
    }
    Ok(name)
}

/// The one emulator TPM among the <tpm> devices, if any.
fn emulator_tpm(devices: Vec<XTpm>) -> Result<Option<Tpm>> {
    let mut tpm = None;
    for t in devices {
        let Some(b) = t.backend else { continue };
        if b.kind.as_deref() != Some("emulator") {
            // passthrough/external TPMs keep no state libvirt manages.
            continue;
        }
        let version = match b.version.as_deref() {
            Some(v) => TpmVersion::parse(v.trim())
                .ok_or_else(|| Error::failed(format!("emulator TPM has unknown version {v:?}")))?,
            None => {
                return Err(Error::failed(
                    "emulator TPM has no version attribute (libvirt always sets one)",
                ))
            }
        };
        let encryption_secret = match b.encryption.and_then(|e| e.secret) {
            Some(s) => Some(Uuid::normalize(&s).map(|u| u.0).ok_or_else(|| {
                Error::failed(format!("TPM encryption secret {s:?} is not a UUID"))
            })?),
            None => None,
        };
        let source = b.source.map(state_source).transpose()?;
        if tpm.is_some() {
            return Err(Error::failed("domain XML has more than one emulator TPM"));
        }
        tpm = Some(Tpm {
            model: t.model.unwrap_or_default(),
            version,
            encryption_secret,
            source,
        });
    }
    Ok(tpm)
}

/// Where a TPM's <source> (libvirt 10.10+) keeps the state.
fn state_source(s: XSource) -> Result<StateSource> {
    let path = s
        .path
        .ok_or_else(|| Error::failed("TPM <source> has no path"))?;
    match s.kind.as_deref() {
        Some("dir") => Ok(StateSource::Dir(abs_path("TPM state", &path)?)),
        Some("file") => Ok(StateSource::File(abs_path("TPM state", &path)?)),
        other => Err(Error::failed(format!(
            "TPM <source> has unknown type {other:?}"
        ))),
    }
}

/// A VM's UEFI variable store, as `Domain` keeps it.
#[derive(Default)]
struct Store {
    path: Option<PathBuf>,
    template: Option<String>,
    kind: UefiStore,
    format: Option<String>,
    not_copied: Option<NotAFile>,
}

/// The store `<nvram>` or `<varstore>` names (libvirt allows one of them).
fn uefi_store(nvram: Option<XNvram>, varstore: Option<XVarstore>) -> Result<Store> {
    match (nvram, varstore) {
        (Some(_), Some(_)) => Err(Error::failed(
            "domain XML has both <nvram> and <varstore>; libvirt allows only one",
        )),
        (Some(n), None) => nvram_of(n),
        (None, Some(v)) => {
            let path = v
                .path
                .filter(|p| !p.trim().is_empty())
                .ok_or_else(|| Error::failed("<varstore> has no path"))?;
            Ok(Store {
                path: Some(abs_path("varstore", &path)?),
                template: v.template,
                kind: UefiStore::Varstore,
                ..Store::default()
            })
        }
        (None, None) => Ok(Store::default()),
    }
}

/// The file <nvram> names, if it is a file; else what it is instead.
fn nvram_of(n: XNvram) -> Result<Store> {
    let mut store = Store {
        template: n.template,
        format: n.format,
        ..Store::default()
    };
    let source = n.source;
    let file = match n.kind.as_deref() {
        None | Some("file") => source.and_then(|s| s.file).or(n.text),
        Some("block") => {
            let dev = source.and_then(|s| s.dev).unwrap_or_default();
            store.not_copied = Some(NotAFile {
                what: "block device",
                at: dev.trim().to_owned(),
            });
            None
        }
        Some("network") => {
            let (protocol, name) = source.map_or((None, None), |s| (s.protocol, s.name));
            let (protocol, name) = (protocol.unwrap_or_default(), name.unwrap_or_default());
            store.not_copied = Some(NotAFile {
                what: "network image",
                at: format!("{}:{}", protocol.trim(), name.trim()),
            });
            None
        }
        Some(other) => {
            store.not_copied = Some(NotAFile {
                what: "store of unknown type",
                at: other.to_owned(),
            });
            None
        }
    };
    if let Some(f) = file.filter(|f| !f.trim().is_empty()) {
        store.path = Some(abs_path("NVRAM", &f)?);
    }
    Ok(store)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/libvirt-9.0")
            .join(name);
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    #[test]
    fn reads_efi_secureboot_encrypted_tpm() {
        let d = Domain::parse(&fixture("efi-secureboot-encrypted-tpm.stopped.xml")).unwrap();
        assert_eq!(d.name, "efitest");
        assert_eq!(d.uuid, "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee");
        let t = d.tpm.unwrap();
        assert_eq!(t.version, TpmVersion::V2_0);
        assert_eq!(t.model, "tpm-crb");
        assert_eq!(
            t.encryption_secret.as_deref(),
            Some("0f0e0d0c-0b0a-4909-8807-060504030201")
        );
        assert_eq!(
            d.nvram.unwrap(),
            PathBuf::from("/var/lib/libvirt/qemu/nvram/efitest_VARS.fd")
        );
        assert_eq!(
            d.nvram_template.as_deref(),
            Some("/usr/share/OVMF/OVMF_VARS_4M.ms.fd")
        );
    }

    #[test]
    fn prepare_xml_of_auto_selected_efi_names_no_nvram_yet() {
        let d = Domain::parse(&fixture("efi-secureboot-encrypted-tpm.prepare.xml")).unwrap();
        assert_eq!(d.firmware.as_deref(), Some("efi"));
        assert!(d.nvram.is_none());
        assert!(d.tpm.is_some());
    }

    #[test]
    fn reads_transient_tpm_without_nvram() {
        let d = Domain::parse(&fixture("tpm2-transient.stopped.xml")).unwrap();
        assert_eq!(d.name, "tpmtrans");
        assert!(d.tpm.is_some());
        assert!(d.nvram.is_none());
    }

    #[test]
    fn domain_without_tpm_has_none() {
        let d = Domain::parse(&fixture("no-tpm.stopped.xml")).unwrap();
        assert!(d.tpm.is_none());
    }

    #[test]
    fn passthrough_tpm_is_not_kept() {
        let x = br#"<domain><name>a</name><uuid>11111111-2222-3333-4444-555555555555</uuid>
            <devices><tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm></devices></domain>"#;
        assert!(Domain::parse(x).unwrap().tpm.is_none());
    }

    #[test]
    fn tpm_among_other_devices_is_found() {
        let x = br#"<domain><name>a</name><uuid>11111111-2222-3333-4444-555555555555</uuid>
            <devices><disk/><tpm model='tpm-crb'><backend type='emulator' version='1.2'>
            <source type='dir' path='/srv/tpm/a'/></backend></tpm><video/></devices></domain>"#;
        let t = Domain::parse(x).unwrap().tpm.unwrap();
        assert_eq!(t.version, TpmVersion::V1_2);
        assert_eq!(t.source, Some(StateSource::Dir("/srv/tpm/a".into())));
    }

    fn os(inner: &str) -> Domain {
        let x = format!(
            "<domain><name>a</name><uuid>11111111-2222-3333-4444-555555555555</uuid><os>{inner}</os></domain>"
        );
        Domain::parse(x.as_bytes()).unwrap()
    }

    #[test]
    fn every_uefi_store_form_libvirt_writes_is_read() {
        let d = os("<nvram template='/t.fd' format='qcow2'>/v/a_VARS.qcow2</nvram>");
        assert_eq!(d.nvram, Some(PathBuf::from("/v/a_VARS.qcow2")));
        assert_eq!(d.nvram_format.as_deref(), Some("qcow2"));
        assert_eq!(d.nvram_kind, UefiStore::Nvram);
        let d = os("<nvram type='file' format='raw'><source file='/v/a.fd'/></nvram>");
        assert_eq!(d.nvram, Some(PathBuf::from("/v/a.fd")));
        assert_eq!(d.nvram_format.as_deref(), Some("raw"));
        let d = os("<varstore path='/v/a_VARS.json' template='/t.json'/>");
        assert_eq!(d.nvram, Some(PathBuf::from("/v/a_VARS.json")));
        assert_eq!(d.nvram_template.as_deref(), Some("/t.json"));
        assert_eq!(d.nvram_kind, UefiStore::Varstore);
        let d = os("<nvram type='block'><source dev='/dev/vg/a'/></nvram>");
        assert_eq!(d.nvram, None);
        assert_eq!(
            d.nvram_not_copied.unwrap().to_string(),
            "block device /dev/vg/a"
        );
        let d = os("<nvram type='network'><source protocol='nbd' name='vars'><host name='h'/></source></nvram>");
        assert_eq!(d.nvram, None);
        assert_eq!(
            d.nvram_not_copied.unwrap().to_string(),
            "network image nbd:vars"
        );
        let d = os("<type>hvm</type>");
        assert_eq!((d.nvram, d.nvram_not_copied), (None, None));
    }

    #[test]
    fn rejects_bad_documents_with_a_reason() {
        let cases: &[(&[u8], &str)] = &[
            (b"not xml at all", "cannot read domain XML"),
            (b"<domain><name>a</name></domain>", "no <uuid>"),
            (b"<domain><name>a</name><uuid>../../etc</uuid></domain>", "invalid <uuid>"),
            (
                b"<domain><name>a</name><uuid>11111111-2222-3333-4444-555555555555</uuid><uuid>11111111-2222-3333-4444-555555555556</uuid></domain>",
                "duplicate",
            ),
            (b"<domain><name>a/b</name><uuid>11111111-2222-3333-4444-555555555555</uuid></domain>", "unusable <name>"),
            (b"<!DOCTYPE d [<!ENTITY x 'y'>]><domain/>", "DOCTYPE"),
            (
                b"<domain><name>a</name><uuid>11111111-2222-3333-4444-555555555555</uuid><devices><tpm><backend type='emulator'/></tpm></devices></domain>",
                "no version",
            ),
            (
                b"<domain><name>a</name><uuid>11111111-2222-3333-4444-555555555555</uuid><devices><tpm><backend type='emulator' version='2.0'><source type='dir' path='rel/x'/></backend></tpm></devices></domain>",
                "not an absolute path",
            ),
            (
                b"<domain><name>a</name><uuid>11111111-2222-3333-4444-555555555555</uuid><os><nvram>/v/a.fd</nvram><varstore path='/v/a.json'/></os></domain>",
                "both <nvram> and <varstore>",
            ),
            (
                b"<domain><name>a</name><uuid>11111111-2222-3333-4444-555555555555</uuid><os><varstore path='v/a.json'/></os></domain>",
                "varstore path \"v/a.json\" is not an absolute path",
            ),
            (
                b"<domain><name>a</name><uuid>11111111-2222-3333-4444-555555555555</uuid><os><varstore template='/t.json'/></os></domain>",
                "<varstore> has no path",
            ),
        ];
        for (xml, want) in cases {
            let err = Domain::parse(xml).unwrap_err().to_string();
            assert!(
                err.contains(want),
                "{:?}: got {err:?}, want {want:?}",
                String::from_utf8_lossy(xml)
            );
        }
    }

    #[test]
    fn uuid_is_lowercased_and_validated() {
        assert_eq!(
            Uuid::normalize(" AAAAAAAA-BBBB-CCCC-DDDD-EEEEEEEEEEEE\n").unwrap(),
            "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
        );
        for bad in [
            "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeee/",
            "aaaaaaaabbbbccccddddeeeeeeeeeeee",
            "../aaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
            "",
        ] {
            assert!(Uuid::normalize(bad).is_none(), "{bad}");
            assert!(Uuid::new(bad).is_none(), "{bad}");
        }
        // A store directory's name is taken as it is, never trimmed.
        assert!(Uuid::new(" aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee").is_none());
    }
}

//! The benchmarks' store fixtures: a generation in the store's real
//! on-disk format (files, manifest, SHA256SUMS), written directly rather
//! than captured, so that a store of thousands of VMs is made in seconds.

use std::fs;
use std::path::Path;

use swtpm_keeper::domain::TpmVersion;
use swtpm_keeper::manifest::{self, FileEntry, Manifest, Role, TpmInfo};

/// Who a fixture generation is of, and when it was taken.
pub struct Gen<'a> {
    pub uuid: &'a str,
    pub name: &'a str,
    pub time_unix: i64,
    pub persistent: bool,
}

/// Write generation `gd` (a new directory) holding `files`, a TPM 2.0
/// state captured at a stop, with its manifest and SHA256SUMS.
pub fn write_generation(gd: &Path, g: &Gen, files: &[(&str, Role, &[u8])]) {
    fs::create_dir_all(gd).unwrap();
    let mut entries = Vec::new();
    let mut sums = Vec::new();
    for (fname, role, bytes) in files {
        let sha = manifest::sha256_hex(bytes);
        fs::write(gd.join(fname), bytes).unwrap();
        sums.push((fname.to_string(), sha.clone()));
        entries.push(FileEntry {
            name: (*fname).into(),
            role: *role,
            source: None,
            size: bytes.len() as u64,
            mode: "0600".into(),
            uid: 0,
            gid: 0,
            owner: None,
            group: None,
            sha256: sha,
            identity: None,
        });
    }
    let m = Manifest {
        format: manifest::FORMAT,
        uuid: g.uuid.to_owned(),
        name: g.name.to_owned(),
        event: "stopped".into(),
        sub_event: "end".into(),
        reason: "shutdown".into(),
        time: manifest::rfc3339(g.time_unix),
        time_unix: g.time_unix,
        host: "bench".into(),
        swtpm_keeper_version: "bench".into(),
        persistent: g.persistent,
        domain_xml_from: "hook-stdin".into(),
        tpm: TpmInfo {
            version: TpmVersion::V2_0,
            model: "tpm-crb".into(),
            state_type: "dir".into(),
            state_path: format!("/var/lib/libvirt/swtpm/{}/tpm2", g.uuid),
            encryption_secret: None,
            header_flags: 0,
        },
        nvram: None,
        files: entries,
        live: false,
        vm_state: None,
        imported_from: None,
    };
    let mj = m.to_json();
    fs::write(gd.join(manifest::MANIFEST), &mj).unwrap();
    sums.push((manifest::MANIFEST.into(), manifest::sha256_hex(&mj)));
    fs::write(gd.join(manifest::SUMS), manifest::sums_file(&sums)).unwrap();
}

//! Corrupt TPM states kept as evidence: when `prepare` replaces a state
//! swtpm could not use (see `mend`), the bad files go first into the VM's
//! store, under `corrupt-<UTC time>-<host>/`, with `evidence.json` saying
//! when, where and why, and `SHA256SUMS`. Evidence is never a generation:
//! `generations()` does not see it, nothing restores it, retention does not
//! count it. Only the newest `KEEP` per VM stay; `prune --vm VM
//! --generation corrupt-...` removes one by name.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::manifest;
use crate::store::VmStore;

/// How many corrupt states are kept per VM (the newest).
pub const KEEP: usize = 3;
pub const RECORD: &str = "evidence.json";
const PREFIX: &str = "corrupt-";

/// One file of the state that was found, as the record describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExhibitInfo {
    /// Its name in the evidence directory (swtpm's own name, or
    /// `tpm-state.file` for a linear file).
    pub name: String,
    pub source: String,
    pub size: u64,
    /// None when it was not read (see `not_kept`).
    pub sha256: Option<String>,
    /// Why swtpm's checks fail for it; None: it passes them (kept because
    /// it belongs to the same state).
    pub corrupt: Option<String>,
    /// Why it is described but not copied (over max_file_size or
    /// max_generation_size, not a regular file, unreadable).
    pub not_kept: Option<String>,
}

/// `evidence.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub format: u32,
    pub uuid: String,
    pub name: String,
    /// The hook event that found it (`prepare`).
    pub event: String,
    pub time: String,
    pub time_unix: i64,
    pub host: String,
    pub swtpm_keeper_version: String,
    /// `dir` or `file`, and libvirt's path.
    pub state_type: String,
    pub state_path: String,
    /// The generation put back in its place.
    pub replaced_by: String,
    pub files: Vec<ExhibitInfo>,
}

/// A file to keep: its description, and its bytes when they are kept.
pub struct Exhibit {
    pub info: ExhibitInfo,
    pub bytes: Option<Vec<u8>>,
}

/// `corrupt-20261201T214500Z-host1` (and `-2`... when taken).
pub fn is_evidence_name(name: &str) -> bool {
    name.strip_prefix(PREFIX).is_some_and(|rest| {
        !rest.is_empty()
            && rest
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    })
}

/// A host name as a safe part of a directory name.
fn name_part(host: &str) -> String {
    let s: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    s.trim_start_matches('.').chars().take(64).collect()
}

impl VmStore {
    /// The evidence directories, oldest first.
    pub fn evidence(&self) -> Result<Vec<String>> {
        let rd = std::fs::read_dir(self.dir())
            .map_err(|e| Error::io("read directory", self.dir(), e))?;
        let mut v: Vec<String> = rd
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| is_evidence_name(n))
            .collect();
        // By time, then by the order of their suffixes.
        v.sort();
        Ok(v)
    }

    /// Keep `exhibits` as a new evidence directory; then drop the oldest
    /// beyond `KEEP`. Returns the new directory's name.
    pub fn keep_evidence(&self, record: &Record, exhibits: &[Exhibit]) -> Result<String> {
        let base = format!(
            "{PREFIX}{}-{}",
            manifest::compact_time(record.time_unix),
            name_part(&record.host)
        );
        let existing = self.evidence()?;
        let name = (1..)
            .map(|i| {
                if i == 1 {
                    base.clone()
                } else {
                    format!("{base}-{i}")
                }
            })
            .find(|n| !existing.contains(n) && !self.dir().join(n).exists())
            .expect("some suffix is free");
        let mut files: Vec<(String, Vec<u8>)> = exhibits
            .iter()
            .filter_map(|x| x.bytes.as_ref().map(|b| (x.info.name.clone(), b.clone())))
            .collect();
        let mut rec = serde_json::to_vec_pretty(record).expect("serializes");
        rec.push(b'\n');
        files.push((RECORD.to_owned(), rec));
        let sums: Vec<(String, String)> = files
            .iter()
            .map(|(n, b)| (n.clone(), manifest::sha256_hex(b)))
            .collect();
        files.push((manifest::SUMS.to_owned(), manifest::sums_file(&sums)));
        self.add_dir(&name, &files)?;
        let mut all = self.evidence()?;
        if all.len() > KEEP {
            all.truncate(all.len() - KEEP);
            if let Err(e) = self.remove_dirs(&all) {
                log::warn!("kept {name}, but could not drop older evidence: {e}");
            }
        }
        Ok(name)
    }

    /// An evidence directory's record, its files checked against its
    /// `SHA256SUMS`. The error says what is wrong.
    pub fn load_evidence(&self, name: &str) -> Result<Record> {
        let dir = self.dir().join(name);
        let read =
            |n: &str| std::fs::read(dir.join(n)).map_err(|e| Error::failed(format!("{n}: {e}")));
        let sums = manifest::parse_sums(&String::from_utf8_lossy(&read(manifest::SUMS)?))
            .map_err(|e| Error::failed(format!("{}: {e}", manifest::SUMS)))?;
        for (n, hex) in &sums {
            if n.contains('/') || n.starts_with('.') {
                return Err(Error::failed(format!(
                    "{}: unexpected name {n:?}",
                    manifest::SUMS
                )));
            }
            if &manifest::sha256_hex(&read(n)?) != hex {
                return Err(Error::failed(format!("{n}: checksum mismatch")));
            }
        }
        if !sums.iter().any(|(n, _)| n == RECORD) {
            return Err(Error::failed(format!(
                "{} does not list {RECORD}",
                manifest::SUMS
            )));
        }
        serde_json::from_slice(&read(RECORD)?).map_err(|e| Error::failed(format!("{RECORD}: {e}")))
    }

    /// Remove evidence directories by name.
    pub fn remove_evidence(&self, names: &[String]) -> Result<()> {
        self.remove_dirs(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evidence_names_are_never_generation_names() {
        assert!(is_evidence_name("corrupt-20261201T214500Z-host1"));
        assert!(is_evidence_name("corrupt-20261201T214500Z-host1-2"));
        assert!(!is_evidence_name("corrupt-"));
        assert!(!is_evidence_name("corrupt-a/b"));
        assert!(!is_evidence_name("00000001-20261121T215608Z"));
        assert!(!crate::store::is_generation_name(
            "corrupt-20261201T214500Z-h"
        ));
        assert_eq!(name_part("a/b c.example"), "a_b_c.example");
        assert_eq!(name_part(".."), "");
    }
}

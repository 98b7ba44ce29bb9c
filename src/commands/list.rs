//! `swtpm-keeper list`

use std::io::Write;

use serde::Serialize;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::inventory::{self, human_bytes, VmSummary, JSON_VERSION};
use crate::logging::sanitize;
use crate::store::Store;

#[derive(Serialize)]
struct ListJson {
    version: u32,
    vms: Vec<VmSummary>,
}

pub fn run(cfg: &Config, json: bool, out: &mut dyn Write) -> Result<i32> {
    let store = Store::new(&cfg.store_dir);
    let mut vms = Vec::new();
    let mut problems = 0;
    for uuid in store.vm_uuids()? {
        let res = store
            .read_vm(&uuid, cfg.lock_timeout())
            .and_then(|vm| inventory::summary(cfg, &vm, &uuid));
        match res {
            Ok(s) => vms.push(s),
            Err(e) => {
                log::warn!("{uuid}: {e}");
                problems += 1;
            }
        }
    }
    let w = |e: std::io::Error| Error::failed(format!("cannot write the output: {e}"));
    if json {
        serde_json::to_writer_pretty(
            &mut *out,
            &ListJson {
                version: JSON_VERSION,
                vms,
            },
        )
        .map_err(|e| Error::failed(e.to_string()))?;
        writeln!(out).map_err(w)?;
    } else if vms.is_empty() {
        writeln!(out, "The store {} holds no VM.", store.root().display()).map_err(w)?;
    } else {
        out.write_all(table(&vms).as_bytes()).map_err(w)?;
        for v in vms.iter() {
            if let Some(f) = &v.failure {
                let line = format!(
                    "{}: last capture FAILED: {}",
                    sanitize(&v.name),
                    f.describe()
                );
                writeln!(out, "{line}").map_err(w)?;
            }
        }
    }
    Ok(if problems > 0 { 1 } else { 0 })
}

/// One row per VM, columns padded to their widest cell.
fn table(vms: &[VmSummary]) -> String {
    let rows: Vec<[String; 9]> = vms
        .iter()
        .map(|v| {
            let mut flags = Vec::new();
            for (on, f) in [
                (v.encrypted, "encrypted"),
                (v.nvram, "nvram"),
                (v.migrated_away, "migrated"),
                (v.defined, "defined"),
                (v.protected, "protected"),
                (v.evidence > 0, "corrupt-evidence"),
                (v.newest.as_ref().is_some_and(|n| n.live), "live"),
                (v.failure.is_some(), "capture-failed"),
            ] {
                if on {
                    flags.push(f);
                }
            }
            // HOST: where the newest was taken (on a shared store, the
            // host the VM last stopped on).
            // STATE: the VM's when its newest generation was read
            // (`-` before 0.2, which did not record it).
            let (time, event, state, host) = match &v.newest {
                Some(n) => (
                    n.time.clone(),
                    if n.reason == "-" {
                        n.event.clone()
                    } else {
                        format!("{} ({})", n.event, n.reason)
                    },
                    n.vm_state.clone().unwrap_or_else(|| "-".into()),
                    sanitize(&n.host),
                ),
                None => ("-".into(), "-".into(), "-".into(), "-".into()),
            };
            [
                sanitize(&v.name),
                v.uuid.clone(),
                v.generations.to_string(),
                time,
                event,
                state,
                host,
                human_bytes(v.total_bytes),
                flags.join(","),
            ]
        })
        .collect();
    let head = [
        "NAME", "UUID", "GENS", "NEWEST", "EVENT", "STATE", "HOST", "SIZE", "FLAGS",
    ];
    let mut width = head.map(|h| h.chars().count());
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = width[i]));
            }
        }
        s.trim_end().to_owned()
    };
    let mut text = format!("{}\n", line(&head.map(String::from)));
    for r in &rows {
        text.push_str(&line(r));
        text.push('\n');
    }
    text
}

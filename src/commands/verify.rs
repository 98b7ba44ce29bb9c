//! `swtpm-keeper verify [<vm>...]`

use std::io::Write;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::inventory;
use crate::logging::sanitize;
use crate::store::Store;

pub fn run(cfg: &Config, vm_args: &[String], out: &mut dyn Write) -> Result<i32> {
    let store = Store::new(&cfg.store_dir);
    let uuids = if vm_args.is_empty() {
        store.vm_uuids()?
    } else {
        vm_args
            .iter()
            .map(|a| inventory::resolve(&store, a))
            .collect::<Result<Vec<_>>>()?
    };
    let w = |e: std::io::Error| Error::failed(format!("cannot write the output: {e}"));
    let (mut good, mut bad, mut evidence) = (0, 0, 0);
    for uuid in &uuids {
        let vm = match store.read_vm(uuid, cfg.lock_timeout()) {
            Ok(vm) => vm,
            Err(e) => {
                writeln!(out, "BAD  {uuid}: {e}").map_err(w)?;
                bad += 1;
                continue;
            }
        };
        for g in vm.generations()? {
            match vm.load_verified(&g, cfg.max_file_size) {
                Ok(l) => {
                    writeln!(out, "ok   {uuid} {g} {}", sanitize(&l.manifest.name)).map_err(w)?;
                    good += 1;
                }
                Err(why) => {
                    writeln!(out, "BAD  {uuid} {g}: {why}").map_err(w)?;
                    log::warn!("verify: {uuid} generation {g} is damaged: {why}");
                    bad += 1;
                }
            }
        }
        // Evidence is reported, not counted: the exit code is about what a
        // restore could use.
        for e in vm.evidence()? {
            let line = match vm.load_evidence(&e) {
                Ok(r) => format!(
                    "corrupt state from {} kept at {} ({}), never restored",
                    sanitize(&r.state_path),
                    r.time,
                    r.event
                ),
                Err(why) => format!("DAMAGED ({why})"),
            };
            writeln!(out, "evidence {uuid} {e}: {line}").map_err(w)?;
            evidence += 1;
        }
    }
    writeln!(
        out,
        "{good} generations verified, {bad} bad, in {} VMs",
        uuids.len()
    )
    .map_err(w)?;
    if evidence > 0 {
        writeln!(
            out,
            "{evidence} corrupt states kept as evidence (not generations: see `swtpm-keeper show`)"
        )
        .map_err(w)?;
    }
    Ok(if bad > 0 { 1 } else { 0 })
}

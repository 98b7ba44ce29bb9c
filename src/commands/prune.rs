//! `swtpm-keeper prune`: retention beyond the hook's own.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::inventory;
use crate::logging::sanitize;
use crate::store::Store;

pub fn run(
    cfg: &Config,
    keep: Option<usize>,
    older_than_days: Option<u64>,
    vm_args: &[String],
    dry_run: bool,
    out: &mut dyn Write,
) -> Result<i32> {
    let store = Store::new(&cfg.store_dir);
    // VMs named on the command line may lose their last generation.
    let targets: Vec<(String, bool)> = if vm_args.is_empty() {
        store.vm_uuids()?.into_iter().map(|u| (u, false)).collect()
    } else {
        vm_args
            .iter()
            .map(|a| inventory::resolve(&store, a).map(|u| (u, true)))
            .collect::<Result<_>>()?
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let cutoff = older_than_days.map(|d| now - (d as i64).saturating_mul(86_400));
    let w = |e: std::io::Error| Error::failed(format!("cannot write the output: {e}"));
    let verb = if dry_run { "would remove" } else { "removed" };
    let mut total = 0;
    for (uuid, named) in targets {
        let vm = store.open_vm(&uuid, cfg.lock_timeout())?;
        let gens = vm.generations()?;
        let times: Vec<Option<i64>> = gens
            .iter()
            .map(|g| vm.read_manifest(g).ok().map(|m| m.time_unix))
            .collect();
        let name = gens
            .iter()
            .rev()
            .find_map(|g| vm.read_manifest(g).ok().map(|m| m.name))
            .unwrap_or_default();
        let mut doomed: Vec<bool> = vec![false; gens.len()];
        if let Some(k) = keep {
            for d in doomed.iter_mut().take(gens.len().saturating_sub(k)) {
                *d = true;
            }
        }
        if let Some(c) = cutoff {
            for (d, t) in doomed.iter_mut().zip(&times) {
                // A generation whose manifest cannot be read has no known
                // age: keep it (verify reports it).
                if t.is_some_and(|t| t < c) {
                    *d = true;
                }
            }
        }
        if !gens.is_empty()
            && doomed.iter().all(|d| *d)
            && !named
            && inventory::libvirt_definition(cfg, &name, &uuid).is_some()
        {
            *doomed.last_mut().expect("not empty") = false;
            writeln!(out, "kept {uuid} {}: the last generation of {} (libvirt defines it; name it with --vm to remove it)", gens.last().expect("not empty"), sanitize(&name)).map_err(w)?;
        }
        let list: Vec<String> = gens
            .iter()
            .zip(&doomed)
            .filter(|(_, d)| **d)
            .map(|(g, _)| g.clone())
            .collect();
        for g in &list {
            writeln!(out, "{verb} {uuid} {g} {}", sanitize(&name)).map_err(w)?;
        }
        if !dry_run && !list.is_empty() {
            vm.remove_generations(&list)?;
            log::info!(
                "vm={name} uuid={uuid} event=cli-prune: removed generations {}",
                list.join(" ")
            );
        }
        total += list.len();
    }
    writeln!(
        out,
        "{verb} {total} generation{}",
        if total == 1 { "" } else { "s" }
    )
    .map_err(w)?;
    Ok(0)
}

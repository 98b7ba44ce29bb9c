//! `swtpm-keeper prune`: retention beyond the hook's own.
//!
//! By rule (`--keep`, `--older-than`) it removes only a VM's oldest
//! generations, in capture (sequence) order, and never the newest one that
//! verifies nor a protected one: no rule leaves a VM without a good state.
//! By name (`--vm VM --generation G`) it removes exactly what is named.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::Config;
use crate::domain::Uuid;
use crate::error::{Error, Result};
use crate::inventory;
use crate::logging::sanitize;
use crate::marks;
use crate::store::{Store, VmStore};

/// What the command line asked for.
#[derive(Debug, Default)]
pub struct Request<'a> {
    pub keep: Option<usize>,
    pub older_than_days: Option<u64>,
    pub vms: &'a [String],
    /// Remove exactly these generations of the one VM in `vms`.
    pub generations: &'a [String],
    pub dry_run: bool,
}

/// One VM's part: what goes, and what stays although a rule named it.
struct Plan {
    name: String,
    doomed: Vec<String>,
    kept: Vec<(String, String)>,
    /// Evidence directories named with --generation.
    evidence: Vec<String>,
}

fn write_err(e: std::io::Error) -> Error {
    Error::failed(format!("cannot write the output: {e}"))
}

pub fn run(cfg: &Config, req: &Request, out: &mut dyn Write) -> Result<i32> {
    let store = Store::new(&cfg.store_dir);
    let targets: Vec<Uuid> = if req.vms.is_empty() {
        store.vm_uuids()?
    } else {
        req.vms
            .iter()
            .map(|a| inventory::resolve(&store, a))
            .collect::<Result<_>>()?
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let cutoff = req
        .older_than_days
        .map(|d| now - (d as i64).saturating_mul(86_400));
    let verb = if req.dry_run {
        "would remove"
    } else {
        "removed"
    };
    let mut total = 0;
    for uuid in targets {
        let vm = store.open_vm(&uuid, cfg.lock_timeout())?;
        let plan = if req.generations.is_empty() {
            plan_by_rule(&vm, &uuid, cfg.max_file_size, req.keep, cutoff)?
        } else {
            plan_by_name(&vm, &uuid, req.generations)?
        };
        let name = sanitize(&plan.name);
        for (g, why) in &plan.kept {
            writeln!(out, "kept {uuid} {g} {name}: {why}").map_err(write_err)?;
        }
        for g in plan.doomed.iter().chain(&plan.evidence) {
            writeln!(out, "{verb} {uuid} {g} {name}").map_err(write_err)?;
        }
        if !req.dry_run && !plan.evidence.is_empty() {
            vm.remove_evidence(&plan.evidence)?;
            log::info!(
                "vm={name} uuid={uuid} event=cli-prune: removed evidence {}",
                plan.evidence.join(" ")
            );
        }
        if !req.dry_run && !plan.doomed.is_empty() {
            vm.remove_generations(&plan.doomed)?;
            log::info!(
                "vm={name} uuid={uuid} event=cli-prune: removed generations {}",
                plan.doomed.join(" ")
            );
        }
        total += plan.doomed.len();
    }
    writeln!(
        out,
        "{verb} {total} generation{}",
        if total == 1 { "" } else { "s" }
    )
    .map_err(write_err)?;
    Ok(0)
}

/// `--keep N` and `--older-than`: a prefix of the unprotected generations
/// in sequence order, ending before the newest one that verifies.
fn plan_by_rule(
    vm: &VmStore,
    uuid: &str,
    max: u64,
    keep: Option<usize>,
    cutoff: Option<i64>,
) -> Result<Plan> {
    let gens = vm.generations()?;
    let manifests: Vec<_> = gens.iter().map(|g| vm.read_manifest(g).ok()).collect();
    let name = manifests
        .iter()
        .rev()
        .flatten()
        .next()
        .map(|m| m.name.clone())
        .unwrap_or_default();
    let protected = marks::protections(vm).map_err(|why| {
        Error::failed(format!(
            "{why}: nothing removed for VM {uuid}; repair or remove that file"
        ))
    })?;
    let mut plan = Plan {
        name,
        doomed: Vec::new(),
        kept: Vec::new(),
        evidence: Vec::new(),
    };
    for p in protected.iter().filter(|p| gens.contains(&p.generation)) {
        plan.kept.push((p.generation.clone(), format!(
            "protected since a restore of it was refused at {} ({}); name it with --vm {uuid} --generation {} to remove it",
            p.time, p.why, p.generation
        )));
    }
    // Kept for its own sake only when live captures followed it (as the
    // newest, the rules below keep it or say why not).
    let stop = vm
        .newest_stop_capture(&gens)
        .filter(|g| Some(g) != gens.last());
    let open: Vec<usize> = (0..gens.len())
        .filter(|&i| !protected.iter().any(|p| p.generation == gens[i]))
        .filter(|&i| Some(&gens[i]) != stop.as_ref())
        .collect();
    let by_count = keep.map_or(0, |k| open.len().saturating_sub(k));
    // Old means captured before the cutoff with every older one old too:
    // after the clock stepped back, a newer generation never goes while
    // an older one stays. An unreadable manifest has no known age.
    let by_age = cutoff.map_or(0, |c| {
        open.iter()
            .take_while(|&&i| manifests[i].as_ref().is_some_and(|m| m.time_unix < c))
            .count()
    });
    let candidates = &open[..by_count.max(by_age)];
    if let Some(g) = stop.filter(|g| candidates.last().is_some_and(|&i| gens[i] > *g)) {
        plan.kept.push((g.clone(), format!(
            "the newest capture taken at a stop: live captures never push it out; name it with --vm {uuid} --generation {g} to remove it"
        )));
    }
    if candidates.is_empty() {
        return Ok(plan);
    }
    let newest_good = (0..gens.len())
        .rev()
        .find(|&i| vm.load_verified(&gens[i], max).is_ok());
    for &i in candidates {
        let g = gens[i].clone();
        match newest_good {
            Some(ng) if i < ng => plan.doomed.push(g),
            Some(ng) if i == ng => plan.kept.push((g, "the newest generation that verifies; name it with --generation to remove it".into())),
            Some(ng) => plan.kept.push((g, format!("newer than {}, the newest generation that verifies", gens[ng]))),
            None => plan.kept.push((g, "no generation of this VM verifies (see `swtpm-keeper verify`); name it with --generation to remove it".into())),
        }
    }
    Ok(plan)
}

/// `--vm VM --generation G...`: exactly these, protected or not; a name
/// may also be a corrupt state kept as evidence (`corrupt-...`).
fn plan_by_name(vm: &VmStore, uuid: &str, named: &[String]) -> Result<Plan> {
    let gens = vm.generations()?;
    let kept = vm.evidence()?;
    let (mut evidence, named): (Vec<String>, Vec<String>) =
        named.iter().cloned().partition(|g| kept.contains(g));
    evidence.sort();
    evidence.dedup();
    if let Some(g) = named.iter().find(|g| !gens.contains(g)) {
        return Err(Error::failed(format!(
            "VM {uuid} has no generation {g} (see `swtpm-keeper show {uuid}`); nothing removed"
        )));
    }
    let name = gens
        .iter()
        .rev()
        .find_map(|g| vm.read_manifest(g).ok().map(|m| m.name))
        .unwrap_or_default();
    let mut doomed = named.to_vec();
    doomed.sort();
    doomed.dedup();
    Ok(Plan {
        name,
        doomed,
        kept: Vec::new(),
        evidence,
    })
}

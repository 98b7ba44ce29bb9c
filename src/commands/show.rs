//! `swtpm-keeper show <vm>`

use std::io::Write;

use serde::Serialize;

use crate::config::Config;
use crate::domain::Uuid;
use crate::error::{Error, Result};
use crate::inventory::{self, human_bytes, JSON_VERSION};
use crate::logging::sanitize;
use crate::manifest::{self, Manifest};
use crate::marks::{self, Protection};
use crate::store::{Store, VmStore};

#[derive(Serialize)]
struct ShowJson {
    version: u32,
    uuid: Uuid,
    name: String,
    defined: bool,
    migrated_away: Option<String>,
    store_dir: String,
    /// Newest first.
    generations: Vec<GenerationJson>,
    /// Corrupt states found at `prepare` and kept, never restored; newest
    /// first.
    evidence: Vec<EvidenceJson>,
}

#[derive(Serialize)]
struct EvidenceJson {
    name: String,
    path: String,
    /// None when it fails its own SHA256SUMS (see `error`).
    record: Option<crate::evidence::Record>,
    error: Option<String>,
}

#[derive(Serialize)]
struct GenerationJson {
    generation: String,
    path: String,
    /// None when the manifest cannot be read (see `verify`).
    manifest: Option<Manifest>,
    error: Option<String>,
    /// Set when a refused restore left this generation behind: retention
    /// keeps it until it is pruned by name.
    protected: Option<Protection>,
}

fn write_err(e: std::io::Error) -> Error {
    Error::failed(format!("cannot write the output: {e}"))
}

pub fn run(
    cfg: &Config,
    vm_arg: &str,
    json: bool,
    xml: Option<Option<String>>,
    out: &mut dyn Write,
) -> Result<i32> {
    let store = Store::new(&cfg.store_dir);
    let uuid = inventory::resolve(&store, vm_arg)?;
    let vm = store.read_vm(&uuid, cfg.lock_timeout())?;
    let gens = vm.generations()?;
    if let Some(which) = xml {
        return print_xml(&vm, &uuid, &gens, which, out);
    }

    let (protections, protection_error) = match marks::protections(&vm) {
        Ok(p) => (p, None),
        Err(e) => (Vec::new(), Some(e.to_string())),
    };
    let mut list = Vec::new();
    for g in gens.iter().rev() {
        let (manifest, error) = match vm.read_manifest(g) {
            Ok(m) => (Some(m), None),
            Err(e) => (None, Some(e.to_string())),
        };
        list.push(GenerationJson {
            generation: g.clone(),
            path: vm.dir().join(g).display().to_string(),
            manifest,
            error,
            protected: protections.iter().find(|p| &p.generation == g).cloned(),
        });
    }
    let name = list
        .iter()
        .find_map(|g| g.manifest.as_ref().map(|m| m.name.clone()))
        .unwrap_or_default();
    let evidence = vm
        .evidence()?
        .into_iter()
        .rev()
        .map(|e| {
            let (record, error) = match vm.load_evidence(&e) {
                Ok(r) => (Some(r), None),
                Err(why) => (None, Some(why.to_string())),
            };
            EvidenceJson {
                path: vm.dir().join(&e).display().to_string(),
                name: e,
                record,
                error,
            }
        })
        .collect();
    let doc = ShowJson {
        version: JSON_VERSION,
        defined: inventory::libvirt_definition(cfg, &name, &uuid).is_some(),
        uuid,
        name,
        migrated_away: inventory::migrated_away(&vm, gens.last().map(String::as_str)),
        store_dir: vm.dir().display().to_string(),
        generations: list,
        evidence,
    };
    if json {
        serde_json::to_writer_pretty(&mut *out, &doc).map_err(|e| Error::failed(e.to_string()))?;
        writeln!(out).map_err(write_err)?;
        return Ok(0);
    }
    let text = render(&doc, protection_error.as_deref());
    out.write_all(text.as_bytes()).map_err(write_err)?;
    Ok(0)
}

/// `--xml [GEN]`: the stored domain.xml, as `virsh define` takes it.
fn print_xml(
    vm: &VmStore,
    uuid: &str,
    gens: &[String],
    which: Option<String>,
    out: &mut dyn Write,
) -> Result<i32> {
    let g = match which {
        Some(g) if gens.contains(&g) => g,
        Some(g) => return Err(Error::failed(format!("VM {uuid} has no generation {g}"))),
        None => gens
            .last()
            .cloned()
            .ok_or_else(|| Error::failed(format!("VM {uuid} has no generation")))?,
    };
    let p = vm.dir().join(&g).join(manifest::DOMAIN_XML);
    let bytes = std::fs::read(&p).map_err(|e| Error::io("read", &p, e))?;
    out.write_all(&bytes).map_err(write_err)?;
    Ok(0)
}

/// The text form: the VM, then each generation.
fn render(doc: &ShowJson, protection_error: Option<&str>) -> String {
    let mut s = String::new();
    s.push_str(&format!("VM {} ({})\n", sanitize(&doc.name), doc.uuid));
    s.push_str(&format!(
        "  defined in libvirt here: {}\n",
        if doc.defined { "yes" } else { "no" }
    ));
    s.push_str(&format!("  store: {}\n", doc.store_dir));
    if let Some(g) = &doc.migrated_away {
        s.push_str(&format!("  MIGRATED AWAY at generation {g}: the hook will not restore it (restore --force overrides)\n"));
    }
    if let Some(e) = protection_error {
        s.push_str(&format!("  PROTECTION RECORD UNREADABLE: {e}\n"));
    }
    if !doc.evidence.is_empty() {
        render_evidence(&mut s, &doc.uuid, &doc.evidence);
    }
    let n = doc.generations.len();
    s.push_str(&format!(
        "  {n} generation{}, newest first:\n",
        if n == 1 { "" } else { "s" }
    ));
    for g in &doc.generations {
        s.push('\n');
        render_generation(&mut s, &doc.uuid, g);
    }
    s
}

/// Corrupt states kept as evidence: where they were found, why, and
/// what replaced them.
fn render_evidence(s: &mut String, uuid: &str, list: &[EvidenceJson]) {
    s.push_str(&format!(
        "  {} corrupt TPM state{} kept as evidence, never restored (the newest {} are kept; \
         remove one with: swtpm-keeper prune --vm {uuid} --generation NAME):\n",
        list.len(),
        if list.len() == 1 { "" } else { "s" },
        crate::evidence::KEEP
    ));
    for e in list {
        let Some(r) = &e.record else {
            s.push_str(&format!(
                "    {}  DAMAGED: {}\n",
                e.name,
                e.error.as_deref().unwrap_or("?")
            ));
            continue;
        };
        s.push_str(&format!(
            "    {}  found at {} on {} in {}, replaced by generation {}\n",
            e.name,
            r.event,
            sanitize(&r.host),
            sanitize(&r.state_path),
            r.replaced_by
        ));
        for f in &r.files {
            let verdict = match (&f.corrupt, &f.not_kept) {
                (Some(why), _) => format!("corrupt: {why}"),
                (None, Some(_)) => "not judged".into(),
                (None, None) => "passes swtpm's checks".into(),
            };
            let kept = match &f.not_kept {
                Some(why) => format!("not copied: {why}"),
                None => format!("sha256 {}", f.sha256.as_deref().unwrap_or("-")),
            };
            s.push_str(&format!(
                "      {:<22} {:>10}  {verdict}; {kept}\n",
                f.name,
                human_bytes(f.size)
            ));
        }
    }
}

fn render_generation(s: &mut String, uuid: &str, g: &GenerationJson) {
    let Some(m) = &g.manifest else {
        s.push_str(&format!(
            "{}  UNREADABLE: {}\n",
            g.generation,
            g.error.as_deref().unwrap_or("?")
        ));
        return;
    };
    s.push_str(&format!(
        "{}  captured {} on {}, event {}/{} reason {}{}\n",
        g.generation,
        m.time,
        sanitize(&m.host),
        m.event,
        m.sub_event,
        m.reason,
        if m.live {
            format!(" ({})", m.taken())
        } else {
            String::new()
        }
    ));
    if let Some(p) = &g.protected {
        s.push_str(&format!(
            "    PROTECTED: a restore of it was refused at {} on {} ({}); retention keeps it until \
             it is removed by name: swtpm-keeper prune --vm {uuid} --generation {}\n",
            p.time,
            sanitize(&p.host),
            sanitize(&p.why),
            g.generation
        ));
    }
    let enc = match &m.tpm.encryption_secret {
        Some(sec) => format!("encrypted with secret {sec}"),
        None => "not encrypted".into(),
    };
    s.push_str(&format!(
        "    TPM {} ({}), {enc}, from {}\n",
        m.tpm.version, m.tpm.model, m.tpm.state_path
    ));
    if let Some(nv) = &m.nvram {
        s.push_str(&format!("    {}\n", nv.describe()));
    }
    s.push_str(&format!("    domain.xml from {}\n", m.domain_xml_from));
    for f in &m.files {
        let owner = format!(
            "{}:{}",
            f.owner.clone().unwrap_or_else(|| f.uid.to_string()),
            f.group.clone().unwrap_or_else(|| f.gid.to_string())
        );
        s.push_str(&format!(
            "    {:<22} {:>10}  {}  {:<26} sha256 {}\n",
            f.name,
            human_bytes(f.size),
            f.mode,
            owner,
            f.sha256
        ));
    }
}

//! `swtpm-keeper export <vm> [--generation G] [-o FILE]`: one verified
//! generation as a tar archive (`archive`), for backup tools.

use std::io::Write;
use std::path::Path;

use crate::archive;
use crate::config::Config;
use crate::domain::Uuid;
use crate::error::{Error, Result};
use crate::fsutil;
use crate::inventory;
use crate::logging::sanitize;
use crate::putback;
use crate::store::{Loaded, Store, VmStore};

pub struct Request<'a> {
    pub vm: &'a str,
    pub generation: Option<&'a str>,
    /// None (or `-`): stdout.
    pub output: Option<&'a Path>,
}

/// `stdout_is_terminal`: refuse to write an archive there (it is binary,
/// and no one means it). With `-o`, one line on `out` says what was
/// written; without, `out` carries the archive and nothing else.
pub fn run(
    cfg: &Config,
    req: &Request,
    stdout_is_terminal: bool,
    out: &mut dyn Write,
) -> Result<i32> {
    let file = req.output.filter(|p| *p != Path::new("-"));
    if file.is_none() && stdout_is_terminal {
        return Err(Error::failed(
            "refusing to write a tar archive to a terminal: name a file with -o FILE, \
             or redirect stdout (swtpm-keeper export VM > FILE)",
        ));
    }
    let store = Store::new(&cfg.store_dir);
    let uuid = inventory::resolve(&store, req.vm)?;
    // The lock only while reading: a slow reader of stdout must never hold
    // up the hook's capture at a stop. A generation never changes.
    let gen = {
        let vm = store.read_vm(&uuid, cfg.lock_timeout())?;
        pick(cfg, &vm, &uuid, req.generation)?
    };
    let bytes = archive::to_bytes(&uuid, &gen)?;
    let what = format!(
        "generation {} of {} ({uuid})",
        gen.name,
        sanitize(&gen.manifest.name)
    );
    match file {
        None => archive::write_all(out, &bytes)?,
        Some(p) => {
            // Mode 0600: it holds TPM secrets.
            let path = fsutil::replace_at(p, &bytes, archive::FILE_MODE)?;
            writeln!(
                out,
                "{} exported {} ({uuid}) to {}",
                gen.name,
                sanitize(&gen.manifest.name),
                path.display()
            )
            .map_err(|e| Error::failed(format!("cannot write the output: {e}")))?;
        }
    }
    log::info!(
        "vm={} uuid={uuid} event=export: exported {what} ({} bytes)",
        sanitize(&gen.manifest.name),
        bytes.len()
    );
    Ok(0)
}

/// The generation named, which must verify, else the newest that does.
/// A damaged one is refused, naming the newest good one.
fn pick(cfg: &Config, vm: &VmStore, uuid: &Uuid, generation: Option<&str>) -> Result<Loaded> {
    let gens = vm.generations()?;
    if gens.is_empty() {
        return Err(Error::failed(format!(
            "the store holds no generation for VM {uuid}: nothing to export"
        )));
    }
    let newest_good = || putback::newest_good(vm, &gens, cfg.max_file_size);
    let Some(g) = generation else {
        let (l, skipped) =
            newest_good().map_err(|r| Error::failed(format!("{r}; nothing exported")))?;
        for (g, why) in skipped {
            log::warn!(
                "generation {g} of VM {uuid} fails verification ({why}); exporting {}",
                l.name
            );
        }
        return Ok(l);
    };
    if !gens.iter().any(|x| x == g) {
        return Err(Error::failed(format!(
            "VM {uuid} has no generation {} (see `swtpm-keeper show {uuid}`)",
            sanitize(g)
        )));
    }
    vm.load_verified(g, cfg.max_file_size).map_err(|why| {
        let good = match newest_good() {
            Ok((l, _)) => format!(
                "the newest good one is {}: export it with --generation {}",
                l.name, l.name
            ),
            Err(_) => "no generation of this VM verifies".into(),
        };
        Error::failed(format!(
            "generation {g} of VM {uuid} fails verification: {why}; nothing exported. {good}"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_archive_is_never_written_to_a_terminal() {
        // The refusal comes first: no configuration, store or VM needed.
        let cfg = Config::default();
        let req = Request {
            vm: "any",
            generation: None,
            output: None,
        };
        let mut out = Vec::new();
        let err = run(&cfg, &req, true, &mut out).unwrap_err().to_string();
        assert!(
            err.contains("refusing to write a tar archive to a terminal"),
            "{err}"
        );
        assert!(out.is_empty());
        let dash = Request {
            output: Some(Path::new("-")),
            ..req
        };
        assert!(run(&cfg, &dash, true, &mut out).is_err(), "-o - is stdout");
    }
}

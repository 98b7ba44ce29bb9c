//! `cargo bench --bench backup` (or `-- --smoke`): what `export` and
//! `import` of one generation cost, beside what a user would otherwise run
//! on the same files in the same run: `tar -c` of the generation, then
//! `tar -x` and `sha256sum -c`. Target: at most 1.5x.
//!
//! Every command is a real process. The generation is a real capture of a
//! stopped VM (a fixture libvirt tree under a temp dir): a 27 KB TPM 2.0
//! state (bench/fixtures/tpm2-00.permall: swtpm's, with an EK and twelve
//! 2 KB NV indexes) and an NVRAM of 540 KB (540,672 bytes: OVMF_VARS_4M.fd) or 4 MiB.
//! Needs root (import does). Prints a table of medians; it gates on nothing
//! (a shared machine's fsync latency swings from run to run).

use std::fs;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use swtpm_keeper::store;

const BIN: &str = env!("CARGO_BIN_EXE_swtpm-keeper");
const TOP: &str = env!("CARGO_MANIFEST_DIR");
const UUID: &str = "b0b0b0b0-0000-4000-8000-000000000001";
const NAME: &str = "benchvm";

/// A fixture host: libvirt's paths, a store holding one captured
/// generation, and a second store that imports go to.
struct Host {
    dir: PathBuf,
    /// Captures and exports from `store`.
    conf: PathBuf,
    /// Imports into `store-import`.
    import_conf: PathBuf,
    generation: PathBuf,
    /// Kept open so that the CLI's syslog lines have somewhere to go.
    log: UnixDatagram,
}

/// One round of the tar baseline.
struct Baseline {
    create: Duration,
    extract: Duration,
    sync: Duration,
}

/// Each measurement's samples, one per round.
#[derive(Default)]
struct Samples {
    export: Vec<Duration>,
    import: Vec<Duration>,
    keeper: Vec<Duration>,
    tar_c: Vec<Duration>,
    tar_x: Vec<Duration>,
    tar: Vec<Duration>,
    tar_synced: Vec<Duration>,
}

impl Samples {
    fn round(&mut self, h: &Host, keeper_first: bool) {
        // Alternate which goes first: neither gets the warmer cache.
        let (k, b) = if keeper_first {
            let k = h.keeper_round();
            (k, h.baseline_round())
        } else {
            let b = h.baseline_round();
            (h.keeper_round(), b)
        };
        self.export.push(k.0);
        self.import.push(k.1);
        self.keeper.push(k.0 + k.1);
        self.tar_c.push(b.create);
        self.tar_x.push(b.extract);
        self.tar.push(b.create + b.extract);
        self.tar_synced.push(b.create + b.extract + b.sync);
    }

    fn rows(self, label: &str) -> Vec<[String; 5]> {
        let ratio = |a: Duration, b: Duration| format!("{:.2}x", a.as_secs_f64() / b.as_secs_f64());
        let row = |what: String, k: Duration, b: Duration, target: &str| {
            [what, ms(k), ms(b), ratio(k, b), target.to_owned()]
        };
        let keeper = median(self.keeper);
        vec![
            row(
                format!("export + import vs tar -c, tar -x + sha256sum -c (NVRAM {label})"),
                keeper,
                median(self.tar),
                "<= 1.5x",
            ),
            row(
                format!("export vs tar -c (NVRAM {label})"),
                median(self.export),
                median(self.tar_c),
                "report",
            ),
            row(
                format!("import vs tar -x + sha256sum -c (NVRAM {label})"),
                median(self.import),
                median(self.tar_x),
                "report",
            ),
            row(
                format!("export + import vs the tar run + sync of each file (NVRAM {label})"),
                keeper,
                median(self.tar_synced),
                "report",
            ),
        ]
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// Run to completion (exit 0 asserted); its wall time. Its stderr goes to
/// a file, shown if it fails (import says, rightly, that the VM keeps a
/// state of its own).
fn timed(cmd: &mut Command) -> Duration {
    let err = std::env::temp_dir().join(format!("swk-bench-backup-{}.err", std::process::id()));
    let t = Instant::now();
    let st = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&err).unwrap())
        .status()
        .unwrap();
    let took = t.elapsed();
    let msg = fs::read_to_string(&err).unwrap_or_default();
    let _ = fs::remove_file(&err);
    assert!(st.success(), "{cmd:?} failed: {st}: {msg}");
    took
}

impl Host {
    fn new(root: &Path, nvram_size: usize) -> Host {
        let dir = root.join(format!("nvram-{nvram_size}"));
        for d in ["swtpm", "etc-qemu", "nvram", "run-libvirt", "run"] {
            fs::create_dir_all(dir.join(d)).unwrap();
        }
        let state = dir.join("swtpm").join(UUID).join("tpm2");
        fs::create_dir_all(&state).unwrap();
        fs::copy(
            Path::new(TOP).join("bench/fixtures/tpm2-00.permall"),
            state.join("tpm2-00.permall"),
        )
        .unwrap();
        let nv = dir.join("nvram").join(format!("{NAME}_VARS.fd"));
        let bytes: Vec<u8> = (0..nvram_size).map(|i| (i * 7 % 251) as u8).collect();
        fs::write(&nv, bytes).unwrap();
        fs::write(
            dir.join("etc-qemu").join(format!("{NAME}.xml")),
            format!(
                "<domain type='qemu'><name>{NAME}</name><uuid>{UUID}</uuid>\
                 <os firmware='efi'><type arch='x86_64' machine='q35'>hvm</type><nvram>{}</nvram></os>\
                 <devices><tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm></devices></domain>\n",
                nv.display()
            ),
        )
        .unwrap();
        let sock = dir.join("log.sock");
        let log = UnixDatagram::bind(&sock).unwrap();
        log.set_nonblocking(true).unwrap();
        let conf_for = |store: &str| {
            let c = dir.join(format!("{store}.conf"));
            fs::write(
                &c,
                format!(
                    "store_dir = {:?}\nswtpm_dir = {:?}\nlibvirt_config_dir = {:?}\nlibvirt_run_dir = {:?}\n\
                     run_dir = {:?}\nsyslog_socket = {sock:?}\n",
                    dir.join(store),
                    dir.join("swtpm"),
                    dir.join("etc-qemu"),
                    dir.join("run-libvirt"),
                    dir.join("run"),
                ),
            )
            .unwrap();
            c
        };
        let (conf, import_conf) = (conf_for("store"), conf_for("store-import"));
        let out = Command::new(BIN)
            .args(["--config", conf.to_str().unwrap(), "capture", NAME])
            .output()
            .unwrap();
        assert!(out.status.success(), "capture: {out:?}");
        let gen = String::from_utf8(out.stdout).unwrap();
        let gen = gen.split_whitespace().next().unwrap().to_owned();
        let generation = dir.join("store").join(UUID).join(&gen);
        store::load_verified(&generation, 16 << 20).unwrap();
        Host {
            dir,
            conf,
            import_conf,
            generation,
            log,
        }
    }

    fn keeper(&self, conf: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.arg("--config").arg(conf).args(args);
        c
    }

    /// swtpm-keeper: export, then import into the other store.
    fn keeper_round(&self) -> (Duration, Duration) {
        let tar = self.dir.join("export.tar");
        let e = timed(&mut self.keeper(&self.conf, &["export", NAME, "-o", tar.to_str().unwrap()]));
        let i = timed(&mut self.keeper(&self.import_conf, &["import", tar.to_str().unwrap()]));
        self.check_imported();
        fs::remove_dir_all(self.dir.join("store-import")).unwrap();
        fs::remove_file(&tar).unwrap();
        (e, i)
    }

    /// What a user would run: tar -c of the generation, then tar -x and
    /// sha256sum -c; and the extraction made as durable as an import
    /// (`sync` of each file and the directory: fsync each).
    fn baseline_round(&self) -> Baseline {
        let tar = self.dir.join("baseline.tar");
        let x = self.dir.join("extracted");
        fs::create_dir_all(&x).unwrap();
        let create = timed(
            Command::new("tar")
                .arg("-cf")
                .arg(&tar)
                .arg("-C")
                .arg(&self.generation)
                .arg("."),
        );
        let t = Instant::now();
        timed(Command::new("tar").arg("-xf").arg(&tar).arg("-C").arg(&x));
        timed(
            Command::new("sha256sum")
                .args(["-c", "--quiet", "SHA256SUMS"])
                .current_dir(&x),
        );
        let extract = t.elapsed();
        let names: Vec<_> = fs::read_dir(&x)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        let sync = timed(Command::new("sync").args(&names).arg(".").current_dir(&x));
        fs::remove_dir_all(&x).unwrap();
        fs::remove_file(&tar).unwrap();
        Baseline {
            create,
            extract,
            sync,
        }
    }

    /// The import is the exported generation, and it verifies.
    fn check_imported(&self) {
        let vm = self.dir.join("store-import").join(UUID);
        let gens: Vec<PathBuf> = fs::read_dir(&vm)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| store::is_generation_name(&p.file_name().unwrap().to_string_lossy()))
            .collect();
        assert_eq!(gens.len(), 1, "one generation imported: {gens:?}");
        store::load_verified(&gens[0], 16 << 20).unwrap();
        for f in ["tpm2-00.permall", "nvram.fd"] {
            assert_eq!(
                fs::read(gens[0].join(f)).unwrap(),
                fs::read(self.generation.join(f)).unwrap(),
                "{f} came back byte for byte"
            );
        }
        // Drain the CLI's log lines.
        let mut buf = [0u8; 4096];
        while self.log.recv(&mut buf).is_ok() {}
    }
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke")
        || std::env::var_os("SWTPM_KEEPER_BENCH_SMOKE").is_some();
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("bench backup: run as root (import writes only as root)");
        std::process::exit(1);
    }
    let root = std::env::temp_dir().join(format!("swk-bench-backup-{}", std::process::id()));
    let _ = fs::remove_dir_all(&root);
    let rounds = if smoke { 3 } else { 40 };
    let sizes = [("540 KB", 540_672), ("4 MiB", 4 << 20)];
    let hosts: Vec<Host> = sizes.iter().map(|&(_, n)| Host::new(&root, n)).collect();
    let mut samples: Vec<Samples> = hosts.iter().map(|_| Samples::default()).collect();
    // Sizes interleaved, round by round: the load of a shared machine
    // falls on both alike.
    for r in 0..rounds {
        for (h, s) in hosts.iter().zip(samples.iter_mut()) {
            s.round(h, r % 2 == 0);
        }
    }
    let rows: Vec<[String; 5]> = samples
        .into_iter()
        .zip(sizes)
        .flat_map(|(s, (label, _))| s.rows(label))
        .collect();
    println!("\n| measurement (TPM 2.0 state 27 KB) | swtpm-keeper | tar | ratio | target |");
    println!("| --- | --- | --- | --- | --- |");
    for r in &rows {
        println!("| {} | {} | {} | {} | {} |", r[0], r[1], r[2], r[3], r[4]);
    }
    println!(
        "\n{} ({rounds} rounds), medians, in {}",
        if smoke { "smoke run" } else { "full run" },
        root.display()
    );
    let _ = fs::remove_dir_all(&root);
}

//! `cargo bench` (or `cargo bench -- --smoke`): what libvirt pays for the
//! hook, measured beside what users would otherwise run, in the same run.
//! Every hook run is a real process started the way libvirtd starts it:
//! by its name in qemu.d/, libvirt's four arguments, the XML on stdin.
//! Prints a table; docs/performance.md records a run and how to read it.

#[path = "fixture.rs"]
mod fixture;

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use swtpm_keeper::manifest::Role;
use swtpm_keeper::store;

const HOOK_BIN: &str = env!("CARGO_BIN_EXE_swtpm-keeper");
const TOP: &str = env!("CARGO_MANIFEST_DIR");

struct Bench {
    dir: PathBuf,
    hook: PathBuf,
    conf: PathBuf,
    smoke: bool,
    rows: Vec<[String; 5]>,
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Run to completion with stdin from `input`; wall time and peak RSS (KiB).
// The child is reaped by wait4 (which also gives its peak RSS), not wait().
#[allow(clippy::zombie_processes)]
fn run(cmd: &mut Command, input: &Path) -> (Duration, i64) {
    let stdin = File::open(input).unwrap();
    let t = Instant::now();
    let child = cmd
        .stdin(stdin)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it for this child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = child.id() as libc::pid_t;
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    let took = t.elapsed();
    assert_eq!(rc, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{cmd:?} failed: {status}"
    );
    (took, ru.ru_maxrss)
}

impl Bench {
    fn n(&self, full: usize, smoke: usize) -> usize {
        if self.smoke {
            smoke
        } else {
            full
        }
    }

    fn hook_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.hook);
        c.args(args)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("LC_ALL", "C")
            .env("SWTPM_KEEPER_CONFIG", &self.conf);
        c
    }

    fn baseline_cmd(&self, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new(program);
        c.args(args)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("LC_ALL", "C")
            .env("BACKUP_DIR", self.dir.join("baseline-backups"))
            .env("SWTPM_DIR", self.dir.join("swtpm"));
        c
    }

    fn row(&mut self, what: &str, keeper: String, baseline: String, ratio: String, target: &str) {
        eprintln!("  {what}: {keeper} vs {baseline} ({ratio})");
        self.rows
            .push([what.into(), keeper, baseline, ratio, target.into()]);
    }

    fn vm_xml(&self, name: &str, uuid: &str, tpm: bool) -> String {
        let tpm = if tpm {
            "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"
        } else {
            ""
        };
        let nv = self.dir.join("nvram").join(format!("{name}_VARS.fd"));
        let mut x = String::from_utf8(
            fs::read(Path::new(TOP).join("tests/fixtures/libvirt-9.0/no-tpm.stopped.xml")).unwrap(),
        )
        .unwrap();
        let (ns, ne) = (x.find("<name>").unwrap(), x.find("</name>").unwrap());
        x.replace_range(ns..ne + 7, &format!("<name>{name}</name>"));
        let start = x.find("<uuid>").unwrap();
        let end = x.find("</uuid>").unwrap();
        x.replace_range(start..end + 7, &format!("<uuid>{uuid}</uuid>"));
        if tpm.is_empty() {
            return x;
        }
        x = x.replace(
            "<boot dev=",
            &format!("<nvram>{}</nvram><boot dev=", nv.display()),
        );
        x.replace("</devices>", &format!("{tpm}</devices>"))
    }

    /// A VM's state as swtpm leaves it, and its 540 KB NVRAM.
    fn make_vm(&self, name: &str, uuid: &str) -> PathBuf {
        let d = self.dir.join("swtpm").join(uuid).join("tpm2");
        fs::create_dir_all(&d).unwrap();
        fs::write(
            d.join("tpm2-00.permall"),
            fs::read(Path::new(TOP).join("tests/fixtures/libvirt-9.0/tpm2-00.permall.plain"))
                .unwrap(),
        )
        .unwrap();
        fs::write(d.join(".lock"), b"").unwrap();
        let nv: Vec<u8> = (0..540 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
        fs::write(self.dir.join("nvram").join(format!("{name}_VARS.fd")), nv).unwrap();
        let x = self.dir.join(format!("{name}.xml"));
        fs::write(&x, self.vm_xml(name, uuid, true)).unwrap();
        x
    }

    /// A store `store-<tag>` whose every VM in `uuids` holds one older
    /// generation, and a configuration keeping one: the next stop of each
    /// writes a generation and prunes the older one. Returns the config.
    fn store_conf(&self, tag: &str, uuids: &[String]) -> PathBuf {
        let store = self.dir.join(format!("store-{tag}"));
        for u in uuids {
            write_generations(&store.join(u), u, "seeded", 1);
        }
        let conf = self.dir.join(format!("{tag}.conf"));
        fs::write(
            &conf,
            format!(
                "store_dir = {store:?}\nswtpm_dir = {:?}\nlibvirt_config_dir = {:?}\ngenerations = 1\n",
                self.dir.join("swtpm"),
                self.dir.join("etc-qemu")
            ),
        )
        .unwrap();
        conf
    }

    /// Each VM in `store-<tag>` holds exactly one generation, the new one
    /// (sequence 2: the seeded one was pruned), and it verifies.
    fn assert_each_captured_and_pruned(&self, tag: &str, uuids: &[String]) {
        let store = self.dir.join(format!("store-{tag}"));
        for u in uuids {
            let gens: Vec<String> = fs::read_dir(store.join(u))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| store::is_generation_name(n))
                .collect();
            assert!(
                gens.len() == 1 && gens[0].starts_with("00000002-"),
                "{tag}: {u} was not captured and pruned: {gens:?}"
            );
            store::load_verified(&store.join(u).join(&gens[0]), 1 << 20)
                .unwrap_or_else(|e| panic!("{tag}: {u}: {e}"));
        }
    }

    /// The guest ran: its TPM state changed (a new file renamed in, as swtpm does).
    fn mutate(&self, uuid: &str, i: usize) {
        let d = self.dir.join("swtpm").join(uuid).join("tpm2");
        let mut b = fs::read(d.join("tpm2-00.permall")).unwrap();
        b[100] = i as u8;
        b[101] = (i >> 8) as u8;
        fs::write(d.join("TMP2-00.permall"), &b).unwrap();
        fs::rename(d.join("TMP2-00.permall"), d.join("tpm2-00.permall")).unwrap();
    }
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke")
        || std::env::var_os("SWTPM_KEEPER_BENCH_SMOKE").is_some();
    let dir = std::env::temp_dir().join(format!("swk-bench-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    for d in [
        "swtpm",
        "nvram",
        "etc-qemu",
        "hooks/qemu.d",
        "baseline-backups",
    ] {
        fs::create_dir_all(dir.join(d)).unwrap();
    }
    let hook = dir.join("hooks/qemu.d/swtpm-keeper");
    std::os::unix::fs::symlink(HOOK_BIN, &hook).unwrap();
    let conf = dir.join("swtpm-keeper.conf");
    fs::write(
        &conf,
        format!(
            "store_dir = {:?}\nswtpm_dir = {:?}\nlibvirt_config_dir = {:?}\n",
            dir.join("store"),
            dir.join("swtpm"),
            dir.join("etc-qemu")
        ),
    )
    .unwrap();
    let mut b = Bench {
        dir: dir.clone(),
        hook,
        conf,
        smoke,
        rows: Vec::new(),
    };
    eprintln!(
        "swtpm-keeper benchmark{} in {}",
        if smoke { " (smoke)" } else { "" },
        dir.display()
    );

    // 1. No-op: a VM without TPM, `started`, vs /bin/true with the same stdin.
    let notpm = dir.join("notpm.xml");
    fs::write(
        &notpm,
        b.vm_xml("notpm", "aaaaaaaa-0000-4000-8000-000000000000", false),
    )
    .unwrap();
    let n = b.n(300, 20);
    let (mut k, mut t, mut s, mut rss) = (Vec::new(), Vec::new(), Vec::new(), 0);
    for _ in 0..n {
        let (d, r) = run(&mut b.hook_cmd(&["notpm", "started", "begin", "-"]), &notpm);
        k.push(d);
        rss = rss.max(r);
        t.push(run(&mut Command::new("/bin/true"), &notpm).0);
        s.push(run(&mut b.hook_cmd(&["notpm", "stopped", "end", "-"]), &notpm).0);
    }
    let (k, t, s) = (median(k), median(t), median(s));
    b.row(
        "no-op (no TPM, `started`) vs /bin/true",
        ms(k),
        ms(t),
        format!("{:.2}x", k.as_secs_f64() / t.as_secs_f64()),
        "<= 1.5x",
    );
    b.row(
        "no TPM, `stopped` (reads, parses XML) vs /bin/true",
        ms(s),
        ms(t),
        format!("{:.2}x", s.as_secs_f64() / t.as_secs_f64()),
        "-",
    );
    let noop_rss = rss;

    // 2./3. Capture: 6 KB TPM state + 540 KB NVRAM, all fsynced, vs a shell
    // hook (grep, cp -a, fsync of what it copied) and a Python hook
    // (ElementTree, shutil, the same fsyncs).
    let uuid = "bbbbbbbb-0000-4000-8000-000000000000";
    let xml = b.make_vm("win", uuid);
    let sh = format!("{TOP}/bench/baseline-hook.sh");
    let py = format!("{TOP}/bench/baseline-hook.py");
    let n = b.n(40, 5);
    let (mut k, mut shv, mut pyv, mut rss) = (Vec::new(), Vec::new(), Vec::new(), 0);
    for i in 0..n {
        b.mutate(uuid, i);
        let (d, r) = run(&mut b.hook_cmd(&["win", "stopped", "end", "-"]), &xml);
        k.push(d);
        rss = rss.max(r);
        shv.push(
            run(
                &mut b.baseline_cmd("/bin/sh", &[&sh, "win", "stopped", "end", "-"]),
                &xml,
            )
            .0,
        );
        pyv.push(
            run(
                &mut b.baseline_cmd(
                    "/usr/bin/python3",
                    &["-I", &py, "win", "stopped", "end", "-"],
                ),
                &xml,
            )
            .0,
        );
        let _ = fs::remove_dir_all(dir.join("baseline-backups"));
        fs::create_dir_all(dir.join("baseline-backups")).unwrap();
    }
    let gens = fs::read_dir(dir.join("store").join(uuid))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with('0')
        })
        .count();
    assert!(
        gens >= n.min(10),
        "the captures did not all store a generation ({gens})"
    );
    let (k, shm, pym) = (median(k), median(shv), median(pyv));
    b.row(
        "capture (`stopped`, 6 KB TPM + 540 KB NVRAM) vs shell hook",
        ms(k),
        ms(shm),
        format!("{:.2}x", k.as_secs_f64() / shm.as_secs_f64()),
        "<= 1.0x",
    );
    b.row(
        "capture vs Python hook (python3 -I)",
        ms(k),
        ms(pym),
        format!("{:.1}x faster", pym.as_secs_f64() / k.as_secs_f64()),
        "report (> 15x)",
    );
    let capture_rss = rss;

    // 4. Daemon restart: `reconnect` for 500 running VMs, in sequence.
    let n = b.n(500, 50);
    let mut totals = Vec::new();
    let mut trues = Vec::new();
    for _ in 0..b.n(3, 1) {
        let t0 = Instant::now();
        for _ in 0..n {
            run(&mut b.hook_cmd(&["win", "reconnect", "begin", "-"]), &xml);
        }
        totals.push(t0.elapsed());
        let t0 = Instant::now();
        for _ in 0..n {
            run(&mut Command::new("/bin/true"), &xml);
        }
        trues.push(t0.elapsed());
    }
    let (tot, tru) = (median(totals), median(trues));
    b.row(
        &format!("daemon-restart storm: {n} `reconnect` in sequence"),
        ms(tot),
        format!("{} (/bin/true)", ms(tru)),
        format!("{:.2}x", tot.as_secs_f64() / tru.as_secs_f64()),
        "< 500 ms total",
    );

    // 5. Host shutdown: 200 VMs' stopped + release, 16 at a time, against
    // the same 200 VMs' in sequence. Both do the same work: each VM's store
    // holds one older generation and `generations = 1`, so each stop
    // writes a generation and prunes one.
    let vms = b.n(200, 32);
    let list: Vec<(String, String, PathBuf)> = (0..vms)
        .map(|i| {
            let (name, uuid) = (format!("vm{i}"), format!("cccccccc-0000-4000-8000-{i:012}"));
            let x = b.make_vm(&name, &uuid);
            b.mutate(&uuid, 1);
            (name, uuid, x)
        })
        .collect();
    let uuids: Vec<String> = list.iter().map(|(_, u, _)| u.clone()).collect();
    let storm_conf = b.store_conf("storm", &uuids);
    let list = Arc::new(list);
    let next = Arc::new(AtomicUsize::new(0));
    let b_hook = b.hook.clone();
    let t0 = Instant::now();
    let workers: Vec<_> = (0..16)
        .map(|_| {
            let (list, next, hook, conf) = (
                list.clone(),
                next.clone(),
                b_hook.clone(),
                storm_conf.clone(),
            );
            std::thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some((name, _, x)) = list.get(i) else {
                    break;
                };
                for op in ["stopped", "release"] {
                    let mut c = Command::new(&hook);
                    c.args([name.as_str(), op, "end", "-"])
                        .env_clear()
                        .env("SWTPM_KEEPER_CONFIG", &conf);
                    run(&mut c, x);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let parallel = t0.elapsed();
    b.assert_each_captured_and_pruned("storm", &uuids);
    let seq_conf = b.store_conf("sequential", &uuids);
    let t0 = Instant::now();
    for (name, _, x) in list.iter() {
        for op in ["stopped", "release"] {
            let mut c = b.hook_cmd(&[name.as_str(), op, "end", "-"]);
            c.env("SWTPM_KEEPER_CONFIG", &seq_conf);
            run(&mut c, x);
        }
    }
    let sequential = t0.elapsed();
    b.assert_each_captured_and_pruned("sequential", &uuids);
    let ideal = sequential / 16;
    b.row(
        &format!("host-shutdown storm: {vms} VMs x (stopped + release, prune), 16 at a time"),
        ms(parallel),
        format!("{} (the same {vms} VMs in sequence / 16)", ms(ideal)),
        format!("{:.2}x", parallel.as_secs_f64() / ideal.as_secs_f64()),
        "report: no lock contention means about 16 / cores",
    );

    // 6. The store at scale: list and verify over V VMs x 5 generations.
    let v = b.n(10_000, 100);
    let store2 = dir.join("store-scale");
    let t0 = Instant::now();
    build_store(&store2, v, 5);
    eprintln!(
        "  built a store of {v} VMs x 5 generations in {:?}",
        t0.elapsed()
    );
    let conf2 = dir.join("scale.conf");
    fs::write(
        &conf2,
        format!(
            "store_dir = {store2:?}\nlibvirt_config_dir = {:?}\n",
            dir.join("etc-qemu")
        ),
    )
    .unwrap();
    let timed = |args: &[&str]| {
        let t0 = Instant::now();
        let st = Command::new(HOOK_BIN)
            .args(args)
            .env("SWTPM_KEEPER_CONFIG", &conf2)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "{args:?}");
        t0.elapsed()
    };
    let list_t = median((0..3).map(|_| timed(&["list"])).collect());
    let json_t = median((0..3).map(|_| timed(&["list", "--json"])).collect());
    let verify_t = timed(&["verify"]);
    b.row(
        &format!("`list` over {v} VMs x 5 generations (warm cache)"),
        ms(list_t),
        "-".into(),
        "-".into(),
        "< 1 s",
    );
    b.row(
        &format!("`list --json` over {v} VMs x 5 generations"),
        ms(json_t),
        "-".into(),
        "-".into(),
        "-",
    );
    b.row(
        &format!("`verify` over {v} VMs x 5 generations"),
        ms(verify_t),
        "-".into(),
        "-".into(),
        "report",
    );

    // 6b. Running VMs: one `capture --all` pass over R running VMs (6 KB
    // TPM + 540 KB NVRAM each) whose state did not change, against a
    // cron-style shell baseline that `cp -a`s every state directory and
    // NVRAM file; then the same pass with every permall changed, per VM,
    // against a stop capture (above).
    let r = b.n(1000, 20);
    let live = b.live_fleet(r);
    let pass = |_: &Bench| {
        let t0 = Instant::now();
        // The operator's command: the binary by its own name.
        let st = Command::new(HOOK_BIN)
            .args(["capture", "--all"])
            .env("SWTPM_KEEPER_CONFIG", &live.conf)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "capture --all failed");
        t0.elapsed()
    };
    pass(&b); // the first generation of each
    let unchanged = median((0..3).map(|_| pass(&b)).collect());
    assert_eq!(live.generations(), r, "an unchanged pass added generations");
    let copy_all = median((0..3).map(|_| live.cp_a_baseline()).collect());
    b.row(
        &format!("`capture --all`, {r} running VMs, nothing changed, vs `cp -a` of every state"),
        ms(unchanged),
        ms(copy_all),
        format!("{:.3}x", unchanged.as_secs_f64() / copy_all.as_secs_f64()),
        "<= 0.2x and < 300 ms",
    );
    for (i, u) in live.uuids.iter().enumerate() {
        b.mutate(u, i + 1);
    }
    let changed = pass(&b);
    assert_eq!(live.generations(), 2 * r, "a changed pass missed a VM");
    let per_vm = changed / r as u32;
    b.row(
        &format!(
            "`capture --all`, {r} running VMs, every permall changed: per VM, vs a stop capture"
        ),
        ms(per_vm),
        ms(k),
        format!("{:.2}x", per_vm.as_secs_f64() / k.as_secs_f64()),
        "<= 1.0x",
    );
    live.remove();

    // 7. Binary size, peak memory.
    let size = fs::metadata(HOOK_BIN).unwrap().len();
    b.row(
        "binary size",
        format!("{:.0} KiB", size as f64 / 1024.0),
        "-".into(),
        "-".into(),
        "report",
    );
    b.row(
        "peak RSS of a hook run: no-op / capture",
        format!("{noop_rss} KiB / {capture_rss} KiB"),
        "-".into(),
        "-".into(),
        "report",
    );

    println!("\n| measurement | swtpm-keeper | baseline | ratio | target |");
    println!("| --- | --- | --- | --- | --- |");
    for r in &b.rows {
        println!("| {} | {} | {} | {} | {} |", r[0], r[1], r[2], r[3], r[4]);
    }
    println!(
        "\n{} on {} cores; medians; {}",
        if smoke { "smoke run" } else { "full run" },
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        uname()
    );
    let _ = fs::remove_dir_all(&dir);
}

/// R fake running VMs: libvirt's status files naming a live pid (this
/// process), swtpm's state and the NVRAM, and a configuration with their
/// own store and run directories.
struct LiveFleet {
    dir: PathBuf,
    conf: PathBuf,
    uuids: Vec<String>,
}

impl Bench {
    fn live_fleet(&self, r: usize) -> LiveFleet {
        let dir = self.dir.join("live");
        let run = dir.join("run-libvirt");
        fs::create_dir_all(&run).unwrap();
        let me = std::process::id();
        let mut uuids = Vec::new();
        for i in 0..r {
            let (name, uuid) = (
                format!("live{i}"),
                format!("dddddddd-0000-4000-8000-{i:012}"),
            );
            let xml = fs::read_to_string(self.make_vm(&name, &uuid)).unwrap();
            let status = format!(
                "<domstatus state='running' reason='booted' pid='{me}'>\n{xml}\n</domstatus>\n"
            );
            fs::write(run.join(format!("{name}.xml")), status).unwrap();
            fs::write(run.join(format!("{name}.pid")), format!("{me}\n")).unwrap();
            uuids.push(uuid);
        }
        let conf = dir.join("live.conf");
        fs::write(
            &conf,
            format!(
                "store_dir = {:?}\nswtpm_dir = {:?}\nlibvirt_config_dir = {:?}\nlibvirt_run_dir = {run:?}\nrun_dir = {:?}\n",
                dir.join("store"),
                self.dir.join("swtpm"),
                self.dir.join("etc-qemu"),
                dir.join("run-keeper")
            ),
        )
        .unwrap();
        LiveFleet { dir, conf, uuids }
    }
}

impl LiveFleet {
    fn generations(&self) -> usize {
        self.uuids
            .iter()
            .map(|u| {
                fs::read_dir(self.dir.join("store").join(u))
                    .map(|rd| {
                        rd.filter(|e| {
                            store::is_generation_name(
                                &e.as_ref().unwrap().file_name().to_string_lossy(),
                            )
                        })
                        .count()
                    })
                    .unwrap_or(0)
            })
            .sum()
    }

    /// What a cron job would do instead: copy every state dir and NVRAM.
    fn cp_a_baseline(&self) -> Duration {
        let dest = self.dir.join("cp-a");
        let _ = fs::remove_dir_all(&dest);
        fs::create_dir_all(&dest).unwrap();
        let swtpm = self.dir.parent().unwrap().join("swtpm");
        let nvram = self.dir.parent().unwrap().join("nvram");
        let script = format!(
            "for u in {}; do cp -a {}/$u \"$1\"/; done; cp -a {} \"$1\"/",
            self.uuids.join(" "),
            swtpm.display(),
            nvram.display()
        );
        let t0 = Instant::now();
        let st = Command::new("/bin/sh")
            .args(["-c", &script, "sh"])
            .arg(&dest)
            .status()
            .unwrap();
        let took = t0.elapsed();
        assert!(st.success());
        took
    }

    fn remove(self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn uname() -> String {
    Command::new("uname")
        .arg("-sr")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// A store in the real on-disk format, written directly (no fsync): V VMs,
/// G generations each, with a 6 KB state and small XML files.
fn build_store(root: &Path, vms: usize, gens: usize) {
    for i in 0..vms {
        let uuid = format!("eeeeeeee-0000-4000-8000-{i:012}");
        write_generations(&root.join(&uuid), &uuid, &format!("vm{i}"), gens);
    }
}

/// `gens` generations of one VM in `vm` (its store directory).
fn write_generations(vm: &Path, uuid: &str, name: &str, gens: usize) {
    let permall =
        fs::read(Path::new(TOP).join("tests/fixtures/libvirt-9.0/tpm2-00.permall.plain")).unwrap();
    fs::create_dir_all(vm).unwrap();
    fs::write(vm.join(".lock"), b"").unwrap();
    let xml = format!("<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid></domain>\n");
    for g in 0..gens {
        let gname = format!("{:08}-20261101T{:02}0000Z", g + 1, g);
        let who = fixture::Gen {
            uuid,
            name,
            time_unix: 1_793_491_200 + g as i64,
            persistent: false,
        };
        let files: [(&str, Role, &[u8]); 3] = [
            ("tpm2-00.permall", Role::Tpm, &permall),
            ("domain.xml", Role::Domain, xml.as_bytes()),
            ("domain-live.xml", Role::DomainLive, xml.as_bytes()),
        ];
        fixture::write_generation(&vm.join(&gname), &who, &files);
    }
}

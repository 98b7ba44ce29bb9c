//! `cargo bench --bench coverage` (or `-- --smoke`): what `check` and
//! `metrics` cost on a host with 1,000 VMs that have a TPM, side by side
//! with `list` on the same store. Each VM is a libvirt configuration file
//! (`<name>.xml` with an emulator TPM) and a store directory holding one
//! generation. Each command is a real process, run as an operator runs it;
//! the table gives medians. Target: `check` and `metrics` under 1 s each.

#[path = "fixture.rs"]
mod fixture;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use swtpm_keeper::manifest::{self, Role};

const BIN: &str = env!("CARGO_BIN_EXE_swtpm-keeper");
const TOP: &str = env!("CARGO_MANIFEST_DIR");
const TARGET: Duration = Duration::from_secs(1);

fn uuid(i: usize) -> String {
    format!("c0000000-0000-4000-8000-{i:012}")
}

fn name(i: usize) -> String {
    format!("bench-vm-{i:04}")
}

/// libvirt's configuration of VM `i`: an emulator TPM 2.0.
fn domain_xml(i: usize) -> String {
    format!(
        "<domain type='kvm'>\n  <name>{}</name>\n  <uuid>{}</uuid>\n  <memory unit='KiB'>1048576</memory>\n  \
         <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type></os>\n  <devices>\n    \
         <disk type='file' device='disk'><source file='/var/lib/libvirt/images/{0}.qcow2'/><target dev='vda' bus='virtio'/></disk>\n    \
         <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>\n  </devices>\n</domain>\n",
        name(i),
        uuid(i)
    )
}

/// One generation of VM `i` in the real on-disk format, written directly.
fn write_generation(store: &Path, i: usize, permall: &[u8], now: i64) {
    let (uuid, name) = (uuid(i), name(i));
    let vm = store.join(&uuid);
    let gname = format!("00000001-{}", manifest::compact_time(now - 600));
    fs::create_dir_all(&vm).unwrap();
    fs::write(vm.join(".lock"), b"").unwrap();
    let xml = domain_xml(i);
    let who = fixture::Gen {
        uuid: &uuid,
        name: &name,
        time_unix: now - 600,
        persistent: true,
    };
    let files: [(&str, Role, &[u8]); 2] = [
        ("tpm2-00.permall", Role::Tpm, permall),
        ("domain.xml", Role::Domain, xml.as_bytes()),
    ];
    fixture::write_generation(&vm.join(&gname), &who, &files);
}

/// A host of `n` VMs under `dir`; returns its configuration file.
fn build_host(dir: &Path, n: usize) -> PathBuf {
    let permall =
        fs::read(Path::new(TOP).join("tests/fixtures/libvirt-9.0/tpm2-00.permall.plain")).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    for d in [
        "etc-qemu",
        "run-libvirt",
        "hooks/qemu.d",
        "secrets",
        "run",
        "store",
    ] {
        fs::create_dir_all(dir.join(d)).unwrap();
    }
    for i in 0..n {
        fs::write(dir.join(format!("etc-qemu/{}.xml", name(i))), domain_xml(i)).unwrap();
        write_generation(&dir.join("store"), i, &permall, now);
    }
    let conf = dir.join("swtpm-keeper.conf");
    let keys = [
        ("store_dir", "store"),
        ("swtpm_dir", "swtpm"),
        ("libvirt_config_dir", "etc-qemu"),
        ("libvirt_run_dir", "run-libvirt"),
        ("libvirt_hooks_dir", "hooks"),
        ("libvirt_secrets_dir", "secrets"),
        ("run_dir", "run"),
        ("syslog_socket", "no-syslog"),
    ];
    let text: String = keys
        .iter()
        .map(|(k, v)| format!("{k} = {:?}\n", dir.join(v)))
        .collect();
    fs::write(&conf, text).unwrap();
    conf
}

/// Run `args` with the host's configuration; wall time, and its stdout.
fn time(conf: &Path, args: &[&str], ok_codes: &[i32]) -> (Duration, Vec<u8>) {
    let t = Instant::now();
    let out = Command::new(BIN)
        .args(args)
        .env("SWTPM_KEEPER_CONFIG", conf)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .unwrap();
    let took = t.elapsed();
    let code = out.status.code().unwrap_or(-1);
    assert!(ok_codes.contains(&code), "{args:?} exited {code}");
    (took, out.stdout)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke")
        || std::env::var_os("SWTPM_KEEPER_BENCH_SMOKE").is_some();
    let (vms, runs) = if smoke { (50, 1) } else { (1000, 7) };
    let dir = std::env::temp_dir().join(format!("swk-bench-coverage-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let t = Instant::now();
    let conf = build_host(&dir, vms);
    eprintln!(
        "coverage benchmark{}: {vms} VMs with a TPM, one generation each, in {} ({} to build)",
        if smoke { " (smoke)" } else { "" },
        dir.display(),
        ms(t.elapsed())
    );
    let prom = dir.join("out.prom");
    let prom_s = prom.to_str().unwrap().to_owned();
    // check exits 1 here: no hook is installed in the fixture's hooks dir.
    let cases: [(&str, Vec<&str>, &[i32]); 4] = [
        ("check", vec!["check"], &[0, 1]),
        ("metrics (stdout)", vec!["metrics"], &[0]),
        ("metrics -o FILE", vec!["metrics", "-o", &prom_s], &[0]),
        ("list (the same store)", vec!["list"], &[0]),
    ];
    // Each command once first: it must see every VM (and warms the cache).
    let (_, text) = time(&conf, &["metrics"], &[0]);
    let text = String::from_utf8(text).unwrap();
    let series = text
        .lines()
        .filter(|l| l.starts_with("swtpm_keeper_vm_protected{"))
        .count();
    assert_eq!(series, vms, "metrics shows every VM");
    assert!(text.contains(&format!("\nswtpm_keeper_vms {vms}\n")));
    let (_, check) = time(&conf, &["check"], &[0, 1]);
    let want = format!("VMs with a TPM: {vms}, protected {vms},");
    let check = String::from_utf8(check).unwrap();
    assert!(
        check.contains(&want),
        "check does not judge every VM:\n{check}"
    );
    let (_, list) = time(&conf, &["list"], &[0]);
    assert_eq!(String::from_utf8(list).unwrap().lines().count(), vms + 1);

    println!("\n| command ({vms} VMs) | median | min | max | under 1 s |");
    println!("| --- | --- | --- | --- | --- |");
    for (what, args, codes) in &cases {
        let times: Vec<Duration> = (0..runs).map(|_| time(&conf, args, codes).0).collect();
        let (min, max) = (*times.iter().min().unwrap(), *times.iter().max().unwrap());
        let med = median(times);
        let met = if what.starts_with("list") {
            "-"
        } else if med < TARGET {
            "yes"
        } else {
            "NO"
        };
        println!(
            "| {what} | {} | {} | {} | {met} |",
            ms(med),
            ms(min),
            ms(max)
        );
    }
    println!(
        "\n{} ({runs} runs each, page cache warm) on {} cores",
        if smoke { "smoke run" } else { "full run" },
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    let _ = fs::remove_dir_all(&dir);
}

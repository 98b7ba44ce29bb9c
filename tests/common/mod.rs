//! A fixture host under a temp dir: libvirt's paths, a store, a syslog
//! socket the test reads, and a config that points the binary at them.
#![allow(dead_code)]

use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

pub const UUID_EFI: &str = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";
pub const UUID_TRANS: &str = "11111111-2222-3333-4444-555555555555";

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_swtpm-keeper")
}

pub fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/libvirt-9.0")
            .join(name),
    )
    .unwrap()
}

pub struct Host {
    pub root: PathBuf,
    pub conf: PathBuf,
    pub store: PathBuf,
    pub swtpm: PathBuf,
    pub etc_qemu: PathBuf,
    pub nvram_dir: PathBuf,
    log: UnixDatagram,
}

impl Host {
    pub fn new(test: &str) -> Host {
        Self::with_config(test, "")
    }

    pub fn with_config(test: &str, extra: &str) -> Host {
        let root = std::env::temp_dir().join(format!("swk-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        // `run`: the parent of run_dir, as /run is (run_dir is made).
        for d in ["swtpm", "etc-qemu", "nvram", "run"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let sock = root.join("log.sock");
        let log = UnixDatagram::bind(&sock).unwrap();
        log.set_nonblocking(true).unwrap();
        let conf = root.join("swtpm-keeper.conf");
        let h = Host {
            store: root.join("store"),
            swtpm: root.join("swtpm"),
            etc_qemu: root.join("etc-qemu"),
            nvram_dir: root.join("nvram"),
            conf,
            root,
            log,
        };
        // Restored files go to the caller: chown to others needs root.
        // SAFETY: no preconditions.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let qemu_conf = h.root.join("host-qemu.conf");
        std::fs::write(&qemu_conf, format!("user = \"+{uid}\"\ngroup = \"+{gid}\"\nswtpm_user = \"+{uid}\"\nswtpm_group = \"+{gid}\"\n")).unwrap();
        let base = format!(
            "store_dir = {:?}\nswtpm_dir = {:?}\nlibvirt_config_dir = {:?}\nsyslog_socket = {:?}\nlock_timeout = 1.0\ngenerations = 3\nqemu_conf = {:?}\n",
            h.store, h.swtpm, h.etc_qemu, sock, qemu_conf
        );
        // Every other path the program reads or writes stays in this host
        // too: the machine may run libvirt (and node_exporter) for real.
        let base = format!(
            "{base}run_dir = {:?}\nlibvirt_run_dir = {:?}\nlibvirt_secrets_dir = {:?}\nprometheus_textfile_dir = {:?}\n",
            h.run_dir(),
            h.root.join("run-libvirt"),
            h.root.join("secrets"),
            h.textfile_dir()
        );
        // A key in `extra` replaces the base's (TOML refuses duplicates).
        let key = |l: &str| l.split('=').next().unwrap_or("").trim().to_owned();
        let overridden: Vec<String> = extra.lines().map(key).collect();
        let mut text: String = base
            .lines()
            .filter(|l| !overridden.contains(&key(l)))
            .map(|l| format!("{l}\n"))
            .collect();
        text.push_str(extra);
        std::fs::write(&h.conf, text).unwrap();
        h
    }

    /// node_exporter's textfile directory for this host (not made: no
    /// metrics file unless a test makes it).
    pub fn textfile_dir(&self) -> PathBuf {
        self.root.join("textfile")
    }

    /// This host's run_dir (tmpfs `/run/swtpm-keeper` on a real one).
    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run/swtpm-keeper")
    }

    /// The state dir libvirt would use for a TPM 2.0 VM.
    pub fn state_dir(&self, uuid: &str) -> PathBuf {
        self.swtpm.join(uuid).join("tpm2")
    }

    pub fn put_state(&self, uuid: &str, files: &[(&str, &[u8])]) -> PathBuf {
        let d = self.state_dir(uuid);
        std::fs::create_dir_all(&d).unwrap();
        for (n, b) in files {
            std::fs::write(d.join(n), b).unwrap();
        }
        d
    }

    /// The EFI fixture with its NVRAM path moved into this host.
    pub fn efi_xml(&self) -> Vec<u8> {
        let x = String::from_utf8(fixture("efi-secureboot-encrypted-tpm.stopped.xml")).unwrap();
        x.replace(
            "/var/lib/libvirt/qemu/nvram",
            self.nvram_dir.to_str().unwrap(),
        )
        .into_bytes()
    }

    pub fn nvram_path(&self) -> PathBuf {
        self.nvram_dir.join("efitest_VARS.fd")
    }

    /// The program with this host's configuration.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin());
        c.args(args).env("SWTPM_KEEPER_CONFIG", &self.conf);
        c
    }

    pub fn run(&self, args: &[&str], stdin: &[u8]) -> Output {
        run_with(&mut self.command(args), stdin)
    }

    /// Start it without waiting (for runs that overlap).
    #[allow(dead_code)]
    pub fn spawn(&self, args: &[&str], stdin: &[u8]) -> Child {
        spawn_with(&mut self.command(args), stdin)
    }

    pub fn hook(&self, name: &str, op: &str, sub: &str, extra: &str, xml: &[u8]) -> Output {
        let out = self.run(&["hook", name, op, sub, extra], xml);
        assert!(
            out.stdout.is_empty(),
            "the hook wrote to stdout: {:?}",
            String::from_utf8_lossy(&out.stdout)
        );
        out
    }

    /// libvirt's `stopped end` for the transient fixture VM (tpmtrans).
    pub fn stop_transient(&self) -> Output {
        self.hook(
            "tpmtrans",
            "stopped",
            "end",
            "-",
            &fixture("tpm2-transient.stopped.xml"),
        )
    }

    pub fn vm_store(&self, uuid: &str) -> PathBuf {
        self.store.join(uuid)
    }

    /// The entries of a VM's store directory whose names start with
    /// `prefix` (evidence `corrupt-`, temporaries `.tmp-`), sorted.
    pub fn store_entries(&self, uuid: &str, prefix: &str) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = match std::fs::read_dir(self.vm_store(uuid)) {
            Ok(rd) => rd
                .map(|e| e.unwrap().path())
                .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
                .collect(),
            Err(_) => Vec::new(),
        };
        v.sort();
        v
    }

    /// Complete generations of a VM, oldest first.
    pub fn generations(&self, uuid: &str) -> Vec<String> {
        let mut v: Vec<String> = match std::fs::read_dir(self.vm_store(uuid)) {
            Ok(rd) => rd
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().into_string().unwrap())
                .filter(|n| n.len() == 25 && n.as_bytes()[8] == b'-')
                .collect(),
            Err(_) => Vec::new(),
        };
        v.sort();
        v
    }

    /// The socket this host's syslog lines arrive at.
    pub fn log_socket(&self) -> PathBuf {
        self.root.join("log.sock")
    }

    /// `program args` in a mount namespace of its own (root only) whose
    /// `/dev` is a fresh tmpfs holding `null` and a `log` that is this
    /// host's socket: what the program sends to syslog's default socket,
    /// before or without a configuration, arrives where `logs` reads,
    /// whether or not the machine has a `/dev/log`.
    pub fn with_own_dev_log(&self, program: &Path, args: &[&str]) -> Command {
        // Private before anything is mounted, so nothing reaches the host's
        // /dev: the root where it is a mount point, else (a chroot, whose /
        // is no mount point) the /dev mount itself; neither: refuse.
        let mut c = Command::new("unshare");
        c.args(["--mount", "--propagation", "unchanged", "--", "sh", "-c"])
            .arg(
                "{ mount --make-rprivate / 2>/dev/null || mount --make-rprivate /dev; } || exit 97; \
                 mount -t tmpfs -o mode=0755 swk-dev /dev && mknod -m 0666 /dev/null c 1 3 \
                 && ln -s \"$0\" /dev/log && exec \"$@\"",
            )
            .arg(self.log_socket())
            .arg(program)
            .args(args);
        c
    }

    /// Every line logged since the last call.
    pub fn logs(&self) -> Vec<String> {
        let mut v = Vec::new();
        let mut buf = [0u8; 8192];
        while let Ok(n) = self.log.recv(&mut buf) {
            v.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        v
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The entry names of `dir`, sorted.
pub fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

/// Start `cmd` with its stdio piped, give it `stdin` and close that.
pub fn spawn_with(cmd: &mut Command, stdin: &[u8]) -> Child {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut si = child.stdin.take().unwrap();
    // The hook may exit without reading (ignored events): EPIPE is fine.
    let _ = si.write_all(stdin);
    child
}

/// The run exited 0; if not, the failure shows its stderr.
#[allow(dead_code)]
#[track_caller]
pub fn assert_ok(out: &Output) {
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn run_with(cmd: &mut Command, stdin: &[u8]) -> Output {
    wait_with_deadline(spawn_with(cmd, stdin), Duration::from_secs(30))
}

/// Write an executable script. A child process writes it: a write fd held
/// here leaks into whatever another test thread forks meanwhile, and exec
/// of the script then fails with "Text file busy".
#[allow(dead_code)]
pub fn write_script(path: &Path, text: &str) {
    let out = run_with(
        Command::new("sh")
            .args(["-c", "cat >\"$0\" && chmod 0755 \"$0\""])
            .arg(path),
        text.as_bytes(),
    );
    assert!(out.status.success(), "writing {}", path.display());
}

pub fn wait_with_deadline(mut child: std::process::Child, limit: Duration) -> Output {
    let start = std::time::Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("the process did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn sha256sum_check(dir: &Path) -> bool {
    Command::new("sha256sum")
        .arg("-c")
        .arg("--quiet")
        .arg("SHA256SUMS")
        .current_dir(dir)
        .status()
        .unwrap()
        .success()
}

/// A generation written by hand (fixed times and hosts, for golden output).
pub struct FixtureGen<'a> {
    pub uuid: &'a str,
    pub vm: &'a str,
    pub generation: &'a str,
    pub time_unix: i64,
    pub event: &'a str,
    pub reason: &'a str,
    pub secret: Option<&'a str>,
    /// (name, role, bytes)
    pub files: &'a [(&'a str, &'a str, &'a [u8])],
}

/// Write `g` into the store as the hook would: files, manifest.json in the
/// real format, SHA256SUMS.
pub fn write_generation(h: &Host, g: &FixtureGen) {
    let FixtureGen {
        uuid,
        vm,
        generation,
        time_unix,
        event,
        reason,
        secret,
        files,
    } = *g;
    use sha2::{Digest, Sha256};
    let hex = |b: &[u8]| {
        Sha256::digest(b)
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect::<String>()
    };
    let dir = h.vm_store(uuid).join(generation);
    std::fs::create_dir_all(&dir).unwrap();
    let mut entries = Vec::new();
    let mut sums = Vec::new();
    for (n, role, b) in files {
        std::fs::write(dir.join(n), b).unwrap();
        sums.push((n.to_string(), hex(b)));
        entries.push(serde_json::json!({
            "name": n, "role": role, "source": null, "size": b.len(), "mode": "0600",
            "uid": 0, "gid": 0, "owner": "root", "group": "root", "sha256": hex(b)
        }));
    }
    let has_nvram = files.iter().any(|f| f.1 == "nvram");
    let m = serde_json::json!({
        "format": 1, "uuid": uuid, "name": vm, "event": event, "sub_event": "end", "reason": reason,
        "time": swtpm_keeper::manifest::rfc3339(time_unix), "time_unix": time_unix, "host": "host-a", "swtpm_keeper_version": "0.1.0",
        "persistent": false, "domain_xml_from": "hook-stdin",
        "tpm": {"version": "2.0", "model": "tpm-crb", "state_type": "dir",
                "state_path": format!("/var/lib/libvirt/swtpm/{uuid}/tpm2"), "encryption_secret": secret,
                "header_flags": if secret.is_some() { 9 } else { 0 }},
        "nvram": if has_nvram { serde_json::json!({"path": format!("/var/lib/libvirt/qemu/nvram/{vm}_VARS.fd"), "template": null, "file": "nvram.fd"}) } else { serde_json::Value::Null },
        "files": entries,
    });
    let mb = serde_json::to_vec_pretty(&m).unwrap();
    std::fs::write(dir.join("manifest.json"), &mb).unwrap();
    sums.push(("manifest.json".into(), hex(&mb)));
    sums.sort();
    let text: String = sums.iter().map(|(n, x)| format!("{x}  {n}\n")).collect();
    std::fs::write(dir.join("SHA256SUMS"), text).unwrap();
    std::fs::write(h.vm_store(uuid).join(".lock"), b"").unwrap();
}

pub fn domain_xml(name: &str, uuid: &str, secret: Option<&str>, nvram: Option<&Path>) -> String {
    let enc = secret
        .map(|s| format!("<encryption secret='{s}'/>"))
        .unwrap_or_default();
    let os = nvram
        .map(|p| format!("<os><nvram>{}</nvram></os>", p.display()))
        .unwrap_or_default();
    format!("<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid>{os}<devices><tpm model='tpm-crb'><backend type='emulator' version='2.0'>{enc}</backend></tpm></devices></domain>\n")
}

/// Another process holding a POSIX (fcntl) write lock on `path`, as a
/// running swtpm holds its `.lock`; released when dropped.
pub struct FcntlHolder(std::process::Child);

impl FcntlHolder {
    /// The holder's pid (a stand-in for swtpm's, or QEMU's).
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Still running?
    pub fn alive(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }

    pub fn hold(path: &Path) -> FcntlHolder {
        let mut child = Command::new("python3")
            .args(["-c", "import fcntl,sys,time; f=open(sys.argv[1],'r+'); fcntl.lockf(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)"])
            .arg(path)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "locked");
        FcntlHolder(child)
    }
}

impl Drop for FcntlHolder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A host whose store is the unpacked 0.1.0 store.
pub fn host_with_0_1_0_store(test: &str) -> Host {
    let h = Host::new(test);
    std::fs::create_dir_all(&h.store).unwrap();
    let tarball = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/store-0.1.0/store.tar.gz");
    let st = std::process::Command::new("tar")
        .arg("-xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(&h.store)
        .status()
        .unwrap();
    assert!(st.success(), "tar -xzf {}", tarball.display());
    h
}

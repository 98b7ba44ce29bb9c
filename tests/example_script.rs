//! packaging/examples/swtpm-keeper-virtnbdbackup, as shipped, against
//! stand-ins for `virsh`, `swtpm-keeper` and `virtnbdbackup` on the PATH
//! that log every call and the VM's state at that moment. The real run is
//! tests/e2e/backup.sh; these pin the order and every exit path.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/packaging/examples/swtpm-keeper-virtnbdbackup"
);
const UUID: &str = "11111111-2222-4333-8444-555555555555";

const VIRSH: &str = r#"#!/bin/sh
echo "virsh $*" >>"$FAKE/log"
case $1 in
    domuuid) echo 11111111-2222-4333-8444-555555555555 ;;
    domstate) cat "$FAKE/state" ;;
    suspend) echo paused >"$FAKE/state" ;;
    resume)
        [ "$(cat "$FAKE/state")" = paused ] || { echo "error: domain is already running" >&2; exit 1; }
        echo running >"$FAKE/state" ;;
esac
"#;
const KEEPER: &str = r#"#!/bin/sh
echo "swtpm-keeper $1 [$(cat "$FAKE/state")]" >>"$FAKE/log"
case $1 in
    capture)
        [ -e "$FAKE/capture-fails" ] && { echo "capture failed" >&2; exit 1; }
        echo "00000007-20261202T000000Z captured $2: TPM and NVRAM" ;;
    export) echo "$*" >"$FAKE/export-args"; printf archive >"$6" ;;
esac
"#;
const NBD: &str = r#"#!/bin/sh
echo "virtnbdbackup $* [$(cat "$FAKE/state")]" >>"$FAKE/log"
trap 'echo "virtnbdbackup got TERM" >>"$FAKE/log"; exit 143' TERM
: >"$FAKE/started"
mkdir -p "$4"
if [ -e "$FAKE/block" ]; then while :; do sleep 0.05; done; fi
exit "$(cat "$FAKE/rc" 2>/dev/null || echo 0)"
"#;

struct Fake {
    dir: PathBuf,
}

impl Fake {
    fn new(test: &str, state: &str) -> Fake {
        let dir = std::env::temp_dir().join(format!("swk-example-{test}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("bin")).unwrap();
        for (name, text) in [
            ("virsh", VIRSH),
            ("swtpm-keeper", KEEPER),
            ("virtnbdbackup", NBD),
        ] {
            let p = dir.join("bin").join(name);
            fs::write(&p, text).unwrap();
            let mode = std::os::unix::fs::PermissionsExt::from_mode(0o755);
            fs::set_permissions(&p, mode).unwrap();
        }
        fs::write(dir.join("state"), format!("{state}\n")).unwrap();
        Fake { dir }
    }

    fn spawn(&self) -> Child {
        Command::new(SCRIPT)
            .args([
                "vm1",
                self.dir.join("backup").to_str().unwrap(),
                "-l",
                "full",
            ])
            .env_clear()
            .env(
                "PATH",
                format!("{}:/usr/bin:/bin", self.dir.join("bin").display()),
            )
            .env("FAKE", &self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    fn run(&self) -> ExitStatus {
        self.spawn().wait().unwrap()
    }

    /// Every call, in order, with the VM's state when it was made.
    fn log(&self) -> Vec<String> {
        fs::read_to_string(self.dir.join("log"))
            .unwrap_or_default()
            .lines()
            // The script's own state checks are not what is pinned here.
            .filter(|l| !l.starts_with("virsh domstate") && !l.starts_with("virsh domuuid"))
            .map(str::to_owned)
            .collect()
    }

    fn state(&self) -> String {
        fs::read_to_string(self.dir.join("state"))
            .unwrap()
            .trim()
            .to_owned()
    }

    fn touch(&self, name: &str) {
        fs::write(self.dir.join(name), b"").unwrap();
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn wait_for(path: &Path) {
    let t = Instant::now();
    while !path.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_running_vm_is_paused_for_capture_and_backup_then_resumed_then_exported() {
    let f = Fake::new("order", "running");
    assert!(f.run().success());
    let bk = f.dir.join("backup");
    assert_eq!(
        f.log(),
        [
            "virsh suspend vm1".to_owned(),
            "swtpm-keeper capture [paused]".into(),
            format!("virtnbdbackup -d vm1 -o {} -l full [paused]", bk.display()),
            "virsh resume vm1".into(),
            "swtpm-keeper export [running]".into(),
        ]
    );
    assert_eq!(f.state(), "running");
    assert_eq!(
        fs::read_to_string(f.dir.join("export-args"))
            .unwrap()
            .trim(),
        format!(
            "export vm1 --generation 00000007-20261202T000000Z -o {}/tpm-{UUID}.tar",
            bk.display()
        ),
        "the captured generation, named by the VM's UUID in the backup directory"
    );
}

#[test]
fn a_vm_paused_already_is_neither_suspended_nor_resumed() {
    let f = Fake::new("paused", "paused");
    assert!(f.run().success());
    let log = f.log();
    assert!(
        !log.iter()
            .any(|l| l.starts_with("virsh suspend") || l.starts_with("virsh resume")),
        "{log:?}"
    );
    assert_eq!(f.state(), "paused");
}

#[test]
fn a_failed_backup_resumes_the_vm_and_exports_nothing() {
    let f = Fake::new("nbdfails", "running");
    fs::write(f.dir.join("rc"), "1").unwrap();
    let st = f.run();
    assert_eq!(st.code(), Some(1));
    let log = f.log();
    assert_eq!(
        log.last().map(String::as_str),
        Some("virsh resume vm1"),
        "{log:?}"
    );
    assert!(!f.dir.join("export-args").exists());
    assert_eq!(f.state(), "running");
}

#[test]
fn a_failed_capture_resumes_the_vm_and_backs_up_nothing() {
    let f = Fake::new("capturefails", "running");
    f.touch("capture-fails");
    assert_eq!(f.run().code(), Some(1));
    assert_eq!(
        f.log(),
        [
            "virsh suspend vm1",
            "swtpm-keeper capture [paused]",
            "virsh resume vm1"
        ]
    );
    assert_eq!(f.state(), "running");
}

#[test]
fn sigterm_during_the_backup_stops_virtnbdbackup_then_resumes_the_vm() {
    let f = Fake::new("sigterm", "running");
    f.touch("block");
    let mut child = f.spawn();
    wait_for(&f.dir.join("started"));
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) },
        0
    );
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(143), "exits as a SIGTERM would");
    let log = f.log();
    let term = log.iter().position(|l| l == "virtnbdbackup got TERM");
    let resume = log.iter().position(|l| l == "virsh resume vm1");
    assert!(
        term.is_some() && resume > term,
        "virtnbdbackup stopped, then the VM resumed: {log:?}"
    );
    assert!(!f.dir.join("export-args").exists());
    assert_eq!(f.state(), "running");
}

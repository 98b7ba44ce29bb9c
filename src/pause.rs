//! `capture --pause`: hold a running VM paused through libvirt's client
//! (`virsh suspend`, then `virsh resume`) while its TPM state and UEFI
//! vars are read, so that the two are one point in time. The CLI only:
//! the hook runs with the domain locked and must never call libvirt.
//!
//! The VM is resumed on every path, and soon:
//! - an error, or an early return: `Pause::end`, or its `Drop`;
//! - SIGINT, SIGTERM, SIGHUP: they are blocked (`pthread_sigmask`) from
//!   before the suspend until after the resume, in every thread. A watcher
//!   thread takes them with `sigtimedwait`, resumes the VM, and then lets
//!   the signal act as it would have (default action, raised again in that
//!   thread): the process ends as the sender asked, the VM running. No
//!   signal handler runs, so no work happens in one, and a read stuck in
//!   the kernel does not delay the resume;
//! - the paused window's bound (`--pause-limit`): the watcher resumes the
//!   VM when it is reached, and the capture is refused (what was read may
//!   not be one point in time any more);
//! - each virsh call is killed (its process group) when it outlives that
//!   bound. A suspend that did not answer may still have paused the VM: it
//!   is resumed then too. A suspend that failed left the VM as it was.
//!
//! virsh runs in a process group of its own, so a terminal's Ctrl-C
//! reaches only this process, which resumes the VM; and with the signal
//! mask std gives every child (empty), so virsh itself is not deaf.

use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, SigmaskHow, Signal};

use crate::error::{Error, Result};

/// How long a VM may stay paused, unless `--pause-limit` says otherwise.
pub const DEFAULT_LIMIT: Duration = Duration::from_secs(10);

/// How often the watcher looks whether the read is done.
const WATCH_TICK: Duration = Duration::from_millis(10);

/// A resume is what leaves the VM running: it gets at least this long
/// (libvirt may first finish another job on the domain).
const RESUME_LIMIT: Duration = Duration::from_secs(30);

/// The signals that would end the process while the VM is paused: INT,
/// TERM and HUP, but one that is ignored (HUP under `nohup`) stays so.
fn ending_signals() -> SigSet {
    let mut s = SigSet::empty();
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        if !ignored(sig) {
            s.add(sig);
        }
    }
    s
}

fn ignored(sig: Signal) -> bool {
    // SAFETY: a null new action only reads the current one.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::sigaction(sig as libc::c_int, std::ptr::null(), &mut old) };
    rc == 0 && old.sa_sigaction == libc::SIG_IGN
}

/// Who resumed the VM, once it is resumed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Resumed {
    /// Still paused.
    No,
    /// After the read, as planned (or after an error).
    Done(std::result::Result<(), String>),
    /// The paused window reached its bound.
    Deadline(std::result::Result<(), String>),
}

struct Shared {
    program: PathBuf,
    uuid: String,
    name: String,
    limit: Duration,
    started: Instant,
    state: Mutex<Resumed>,
    done: AtomicBool,
}

impl Shared {
    /// Resume the VM unless it is resumed already; `deadline`: because
    /// the window's bound is reached. Returns the resume's outcome.
    fn resume(&self, deadline: bool) -> Resumed {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if *st == Resumed::No {
            let bound = self.limit.max(RESUME_LIMIT);
            let r = virsh(&self.program, "resume", &self.uuid, bound).map_err(|e| e.to_string());
            *st = if deadline {
                Resumed::Deadline(r)
            } else {
                Resumed::Done(r)
            };
        }
        st.clone()
    }
}

/// A VM this process paused; resumed by `end`, or when dropped.
pub struct Pause {
    shared: Arc<Shared>,
    watcher: Option<JoinHandle<()>>,
    /// The signal mask before the pause, put back once the VM runs.
    old_mask: Option<SigSet>,
    /// The window, once `end` resumed the VM.
    ended: Option<Duration>,
}

impl Pause {
    /// Pause the VM `uuid` (named `name` in messages): block the ending
    /// signals, `virsh suspend`, and start the watcher. On error the VM is
    /// as it was (resumed, if the suspend may have reached it).
    pub fn begin(uuid: &str, name: &str, limit: Duration) -> Result<Pause> {
        Pause::begin_with(Path::new("virsh"), uuid, name, limit)
    }

    /// The same with `program` as virsh (the tests' stand-in).
    pub fn begin_with(program: &Path, uuid: &str, name: &str, limit: Duration) -> Result<Pause> {
        let old_mask = ending_signals()
            .thread_swap_mask(SigmaskHow::SIG_BLOCK)
            .map_err(|e| Error::failed(format!("cannot block signals before pausing: {e}")))?;
        let shared = Arc::new(Shared {
            program: program.to_owned(),
            uuid: uuid.to_owned(),
            name: name.to_owned(),
            limit,
            started: Instant::now(),
            state: Mutex::new(Resumed::No),
            done: AtomicBool::new(false),
        });
        let mut pause = Pause {
            shared: shared.clone(),
            watcher: None,
            old_mask: Some(old_mask),
            ended: None,
        };
        if let Err(e) = virsh(program, "suspend", uuid, limit) {
            let left = if e.answered {
                // libvirt said no: this call paused nothing.
                *shared.state.lock().unwrap_or_else(|p| p.into_inner()) = Resumed::Done(Ok(()));
                "the VM was left as it was".to_owned()
            } else {
                // It may have gone through: resume, to leave it as it was.
                match shared.resume(false) {
                    Resumed::Done(Err(r)) => {
                        format!("resuming it failed too ({r}): run `virsh resume {uuid}`")
                    }
                    _ => "the VM was resumed, in case it had paused".to_owned(),
                }
            };
            pause.end().ok();
            return Err(Error::failed(format!(
                "cannot pause VM {name} for a point-in-time capture: {e}; {left}; nothing captured"
            )));
        }
        pause.watcher = Some(std::thread::spawn(move || watch(&shared)));
        Ok(pause)
    }

    /// Resume the VM (unless the watcher did), and say how long it was
    /// paused: from the suspend's start to the resume's end. An error when
    /// the resume failed, or the window outgrew its bound.
    pub fn end(&mut self) -> Result<Duration> {
        if let Some(d) = self.ended {
            return Ok(d);
        }
        self.shared.done.store(true, Ordering::SeqCst);
        let how = self.shared.resume(false);
        let window = self.shared.started.elapsed();
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
        if let Some(sig) = pending_ending() {
            // Restoring the mask lets it end the process, before any store.
            log_signal(&self.shared, sig, &how);
        }
        self.restore_mask();
        self.ended = Some(window);
        let name = &self.shared.name;
        let limit = self.shared.limit.as_secs_f64();
        match how {
            Resumed::Done(Ok(())) if window <= self.shared.limit => Ok(window),
            Resumed::Done(Ok(())) | Resumed::Deadline(Ok(())) => Err(Error::failed(format!(
                "VM {name} stayed paused {} ms, over the bound of {limit} s (--pause-limit): \
                 it was resumed and nothing was captured; try again, or allow more time",
                window.as_millis()
            ))),
            Resumed::Done(Err(e)) | Resumed::Deadline(Err(e)) => Err(Error::failed(format!(
                "cannot resume VM {name} after the capture: {e}; it may still be paused: \
                 run `virsh resume {}`",
                self.shared.uuid
            ))),
            Resumed::No => unreachable!("resume() never leaves it paused"),
        }
    }

    /// Let the blocked signals act again; a pending one acts now.
    fn restore_mask(&mut self) {
        if let Some(m) = self.old_mask.take() {
            let _ = m.thread_set_mask();
        }
    }
}

impl Drop for Pause {
    fn drop(&mut self) {
        if let Err(e) = self.end() {
            log::error!("{e}");
        }
    }
}

/// The watcher: resume the VM at the window's bound, or when an ending
/// signal arrives, then let that signal end the process.
fn watch(s: &Shared) {
    let set = ending_signals();
    let deadline = s.started + s.limit;
    while !s.done.load(Ordering::SeqCst) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            s.resume(true);
            return;
        }
        let Some(sig) = take_signal(&set, left.min(WATCH_TICK)) else {
            continue;
        };
        log_signal(s, sig, &s.resume(false));
        // What the signal would have done unblocked (the CLI installs no
        // handler: the default action, ending the process).
        let mut one = SigSet::empty();
        one.add(sig);
        let _ = one.thread_unblock();
        let _ = nix::sys::signal::raise(sig);
        // Not reached for INT/TERM/HUP by default; end anyway.
        std::process::exit(128 + sig as i32);
    }
}

/// An ending signal that arrived while blocked, not taken by the watcher.
fn pending_ending() -> Option<Signal> {
    // SAFETY: sigpending fills the set it is given.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    if unsafe { libc::sigpending(&mut set) } != 0 {
        return None;
    }
    ending_signals()
        .iter()
        // SAFETY: a set sigpending filled, and a valid signal number.
        .find(|sig| unsafe { libc::sigismember(&set, *sig as libc::c_int) } == 1)
}

/// The one line an ending signal gets, once the VM is resumed (or not).
fn log_signal(s: &Shared, sig: Signal, resumed: &Resumed) {
    let how = match resumed {
        Resumed::Done(Err(e)) | Resumed::Deadline(Err(e)) => format!(
            "resuming it failed ({e}): it may still be paused, run `virsh resume {}`",
            s.uuid
        ),
        _ => "it was resumed".into(),
    };
    log::error!(
        "vm={} event=capture/pause: {sig} while the VM was paused for a capture: {how}; nothing captured",
        s.name
    );
}

/// One of `set` if it arrives within `wait` (all of `set` is blocked).
fn take_signal(set: &SigSet, wait: Duration) -> Option<Signal> {
    let ts = libc::timespec {
        tv_sec: wait.as_secs() as libc::time_t,
        tv_nsec: wait.subsec_nanos() as libc::c_long,
    };
    // SAFETY: a valid set and timespec; a null siginfo is allowed.
    let n = unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &ts) };
    Signal::try_from(n).ok()
}

/// Why a virsh call failed, and whether virsh answered (exited by itself:
/// libvirt said no, rather than a call that may still have gone through).
#[derive(Debug)]
struct VirshError {
    answered: bool,
    why: String,
}

impl std::fmt::Display for VirshError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.why)
    }
}

/// `virsh <verb> <uuid>` (`program` is virsh), killed with its process
/// group after `limit`. The connection is virsh's default
/// (`qemu:///system` as root), or `LIBVIRT_DEFAULT_URI`.
fn virsh(
    program: &Path,
    verb: &str,
    uuid: &str,
    limit: Duration,
) -> std::result::Result<(), VirshError> {
    let what = format!("virsh {verb} {uuid}");
    let fail = |answered: bool, why: String| VirshError {
        answered,
        why: format!("{what}: {why}"),
    };
    let mut child = Command::new(program)
        .args([verb, uuid])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| {
            let hint = match e.kind() {
                std::io::ErrorKind::NotFound => {
                    " (install libvirt's client, virsh: package libvirt-clients)"
                }
                _ => "",
            };
            fail(true, format!("cannot run virsh{hint}: {e}"))
        })?;
    let start = Instant::now();
    loop {
        match exited(child.id()) {
            Ok(true) => break,
            Ok(false) if start.elapsed() >= limit => {
                kill_group(child.id());
                let _ = child.wait();
                return Err(fail(
                    false,
                    format!("no answer within {} s, killed", limit.as_secs_f64()),
                ));
            }
            Ok(false) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => {
                kill_group(child.id());
                let _ = child.wait();
                return Err(fail(false, format!("cannot wait for virsh: {e}")));
            }
        }
    }
    // Whatever virsh left behind in its group must not hold stderr open;
    // virsh, not reaped yet, still holds the group's id.
    kill_group(child.id());
    let status = child
        .wait()
        .map_err(|e| fail(false, format!("cannot wait for virsh: {e}")))?;
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    if status.success() {
        return Ok(());
    }
    let how = match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => "failed".into(),
    };
    let said = crate::logging::sanitize(err.trim());
    Err(fail(status.code().is_some(), format!("{how}: {said}")))
}

/// Has the child `pid` exited? Asked without reaping it (WNOWAIT): until
/// it is reaped, no other process can take its pid as a group id.
fn exited(pid: u32) -> std::io::Result<bool> {
    // SAFETY: waitid fills the zeroed siginfo it is given; WNOWAIT leaves
    // the child to `Child::wait`.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
    let rc = unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, flags) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: set by waitid; 0 when the child has not exited.
    Ok(unsafe { info.si_pid() } != 0)
}

fn kill_group(pid: u32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in virsh in a fresh directory that logs its calls there.
    /// A child writes it: a write fd held here would leak into another
    /// test's fork, and exec of the script would fail ("Text file busy").
    fn stand_in(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("swk-pause-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("virsh");
        let text = "#!/bin/sh\necho \"$*\" >>\"$(dirname \"$0\")/calls\"\n";
        let mut c = Command::new("sh")
            .args(["-c", "cat >\"$0\" && chmod 0755 \"$0\""])
            .arg(&script)
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut c.stdin.take().unwrap(), text.as_bytes()).unwrap();
        assert!(c.wait().unwrap().success());
        script
    }

    fn calls(script: &Path) -> String {
        std::fs::read_to_string(script.with_file_name("calls")).unwrap_or_default()
    }

    #[test]
    fn the_watcher_resumes_the_vm_at_the_windows_bound_while_the_read_still_runs() {
        let script = stand_in("deadline");
        let limit = Duration::from_millis(200);
        let start = Instant::now();
        let mut p = Pause::begin_with(&script, "u", "vm", limit).unwrap();
        // The "read" goes on; the watcher alone must resume the VM.
        while !calls(&script).contains("resume u") {
            assert!(start.elapsed() < Duration::from_secs(10), "never resumed");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(start.elapsed() >= limit, "resumed before the bound");
        let e = p.end().unwrap_err().to_string();
        assert!(e.contains("over the bound of 0.2 s"), "{e}");
        assert!(e.contains("nothing was captured"), "{e}");
        assert_eq!(calls(&script), "suspend u\nresume u\n", "resumed once");
        let _ = std::fs::remove_dir_all(script.parent().unwrap());
    }

    #[test]
    fn end_resumes_once_and_dropping_an_unended_pause_resumes_too() {
        let script = stand_in("drop");
        let mut p = Pause::begin_with(&script, "u", "vm", DEFAULT_LIMIT).unwrap();
        assert!(p.end().unwrap() < DEFAULT_LIMIT);
        p.end().unwrap();
        drop(p);
        assert_eq!(calls(&script), "suspend u\nresume u\n");
        // An error between the suspend and `end` drops the pause.
        drop(Pause::begin_with(&script, "w", "vm", DEFAULT_LIMIT).unwrap());
        assert_eq!(calls(&script), "suspend u\nresume u\nsuspend w\nresume w\n");
        let _ = std::fs::remove_dir_all(script.parent().unwrap());
    }
}

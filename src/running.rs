//! Running VMs, as libvirt's run directory shows them, read without calling
//! libvirt: `<run dir>/<name>.xml` is libvirt's status file (root 0600), a
//! `<domstatus state='running' reason='booted' pid='QEMU_PID'>` around the
//! live `<domain>`, and `<name>.pid` holds QEMU's pid while the VM runs.
//! An async job `migration in` in the status marks an incoming migration,
//! whose TPM state is still arriving.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::domain::{Domain, MAX_XML_BYTES};
use crate::error::{Error, Result};
use crate::fsutil;

/// A status file holds the domain plus libvirt's private data (capability
/// flags, vCPU threads): allow twice a domain's limit.
const MAX_STATUS_BYTES: u64 = 2 * MAX_XML_BYTES as u64;

/// libvirt's view of a VM that runs, from its status file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// libvirt's domain state: `running`, `paused`, `pmsuspended`, ...
    pub state: String,
    /// Why it is in that state: `booted`, `user`, `migration`, ...
    pub reason: String,
    /// QEMU's pid.
    pub pid: u32,
    /// The async job libvirt runs on it (`migration in`, `backup`, ...).
    pub async_job: Option<String>,
}

impl Status {
    /// An incoming migration is still filling the TPM state.
    pub fn incoming(&self) -> bool {
        self.async_job.as_deref() == Some("migration in")
    }
}

/// A VM libvirt runs on this host.
#[derive(Debug)]
pub struct RunningVm {
    pub status: Status,
    pub domain: Domain,
    /// The live `<domain>` element, as the status file holds it.
    pub live_xml: Vec<u8>,
}

#[derive(Deserialize)]
struct XStatus {
    #[serde(rename = "@state")]
    state: Option<String>,
    #[serde(rename = "@reason")]
    reason: Option<String>,
    #[serde(rename = "@pid")]
    pid: Option<String>,
    job: Option<XJob>,
}

#[derive(Deserialize)]
struct XJob {
    #[serde(rename = "@async")]
    async_job: Option<String>,
}

/// libvirt's status file of the VM `name`.
pub fn status_path(run_dir: &Path, name: &str) -> PathBuf {
    run_dir.join(format!("{name}.xml"))
}

/// QEMU's pid while the VM `name` runs: `<name>.pid` names a live process.
pub fn qemu_pid(run_dir: &Path, name: &str) -> Option<u32> {
    let text = std::fs::read_to_string(run_dir.join(format!("{name}.pid"))).ok()?;
    let pid: u32 = text.trim().parse().ok()?;
    alive(pid).then_some(pid)
}

fn alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // No signal: it only asks whether the process exists. EPERM: it does,
    // as another user (QEMU runs as the qemu user) and this process lacks
    // CAP_KILL, as under the capture service.
    let rc = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None);
    pid > 0 && matches!(rc, Ok(()) | Err(nix::errno::Errno::EPERM))
}

/// Read a status document: the `<domstatus>` attributes, its job, and the
/// `<domain>` inside.
pub fn parse_status(xml: &[u8]) -> Result<RunningVm> {
    let text = std::str::from_utf8(xml)
        .map_err(|e| Error::failed(format!("status XML is not UTF-8: {e}")))?;
    let live = inner_domain(text)?;
    let domain = Domain::parse(live.as_bytes())?;
    // Only the wrapper is wanted here: what precedes the inner <domain>
    // (libvirt's private data) and the close of <domstatus>.
    let wrapper = text.replacen(live, "", 1);
    let x: XStatus = quick_xml::de::from_str(&wrapper)
        .map_err(|e| Error::failed(format!("cannot read status XML: {e}")))?;
    let pid = x.pid.as_deref().and_then(|p| p.trim().parse().ok());
    let (Some(state), Some(pid)) = (x.state, pid) else {
        return Err(Error::failed("status XML has no state or pid attribute"));
    };
    let status = Status {
        state,
        reason: x.reason.unwrap_or_default(),
        pid,
        async_job: x.job.and_then(|j| j.async_job),
    };
    Ok(RunningVm {
        status,
        domain,
        live_xml: live.as_bytes().to_vec(),
    })
}

/// The `<domain>` element inside `<domstatus>`. XML escapes `<` in text,
/// so every `<domain` is markup; libvirt writes only its private data
/// (no user content) before the domain and after it, so the first opening
/// and the last closing tag are the domain's.
fn inner_domain(text: &str) -> Result<&str> {
    let root = text
        .find("<domstatus")
        .ok_or_else(|| Error::failed("not a libvirt status file: no <domstatus>"))?;
    let starts = text[root..].match_indices("<domain").map(|(i, _)| root + i);
    let start = starts
        .into_iter()
        .find(|&i| {
            matches!(
                text.as_bytes().get(i + 7),
                Some(b' ' | b'>' | b'\n' | b'\t')
            )
        })
        .ok_or_else(|| Error::failed("status XML holds no <domain>"))?;
    let end = text
        .rfind("</domain>")
        .filter(|&e| e > start)
        .ok_or_else(|| Error::failed("status XML has no </domain>"))?;
    Ok(&text[start..end + "</domain>".len()])
}

/// The VM `name`, if libvirt runs it: its status file exists and names a
/// live QEMU.
pub fn read(run_dir: &Path, name: &str) -> Result<Option<RunningVm>> {
    let path = status_path(run_dir, name);
    let Some(mut f) = fsutil::open_if_exists(&path, false)? else {
        return Ok(None);
    };
    let data = fsutil::read_regular(&mut f, &path, MAX_STATUS_BYTES)?;
    let vm = parse_status(&data.bytes).map_err(|e| e.context(path.display()))?;
    if vm.domain.name != name {
        return Err(Error::failed(format!(
            "{} describes VM {:?}, not {name:?}",
            path.display(),
            vm.domain.name
        )));
    }
    Ok(alive(vm.status.pid).then_some(vm))
}

/// The names of every VM with a status file in `run_dir`, sorted.
pub fn names(run_dir: &Path) -> Result<Vec<String>> {
    let rd = match std::fs::read_dir(run_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("read directory", run_dir, e)),
    };
    let mut v: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|n| n.strip_suffix(".xml").map(str::to_owned))
        .collect();
    v.sort();
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/libvirt-9.0/run");
        std::fs::read(p.join(name)).unwrap()
    }

    #[test]
    fn a_real_status_file_gives_state_pid_and_the_live_domain_with_its_tpm() {
        let vm = parse_status(&fixture("running.status.xml")).unwrap();
        assert_eq!(vm.status.state, "running");
        assert_eq!(vm.status.reason, "booted");
        assert!(vm.status.pid > 1);
        assert!(!vm.status.incoming());
        assert_eq!(vm.domain.name, "swk-probe-live");
        assert_eq!(vm.domain.uuid, "c0ffee00-0000-4000-8000-0000000000aa");
        assert!(vm.domain.tpm.is_some());
        assert!(vm.live_xml.starts_with(b"<domain type='qemu' id='2'>"));
        assert!(vm.live_xml.ends_with(b"</domain>"));
        let paused = parse_status(&fixture("paused.status.xml")).unwrap();
        assert_eq!(
            (paused.status.state.as_str(), paused.status.reason.as_str()),
            ("paused", "user")
        );
    }

    #[test]
    fn an_incoming_migration_job_marks_the_state_as_still_arriving() {
        // libvirt's qemuDomainObjPrivateXMLFormatJob writes the async job
        // before the <domain>, as here.
        let text = String::from_utf8(fixture("running.status.xml")).unwrap();
        let with_job = text.replacen(
            "  <domain type=",
            "  <job type='none' async='migration in' phase='prepare' flags='0x0'/>\n  <domain type=",
            1,
        );
        let vm = parse_status(with_job.as_bytes()).unwrap();
        assert_eq!(vm.status.async_job.as_deref(), Some("migration in"));
        assert!(vm.status.incoming());
    }

    #[test]
    fn what_is_not_a_status_file_is_an_error_that_says_so() {
        let plain =
            b"<domain><name>a</name><uuid>c0ffee00-0000-4000-8000-0000000000aa</uuid></domain>";
        let e = parse_status(plain).unwrap_err();
        assert!(e.to_string().contains("no <domstatus>"), "{e}");
        let e = parse_status(b"<domstatus state='running' pid='1'></domstatus>").unwrap_err();
        assert!(e.to_string().contains("no <domain>"), "{e}");
        let text = String::from_utf8(fixture("running.status.xml")).unwrap();
        let no_pid = text.replacen(" pid='", " xpid='", 1);
        let e = parse_status(no_pid.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("no state or pid"), "{e}");
    }

    #[test]
    fn a_vm_is_running_only_while_its_status_names_a_live_qemu() {
        let dir = std::env::temp_dir().join(format!("swk-running-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        assert!(
            read(&dir, "swk-probe-live").unwrap().is_none(),
            "no status file"
        );
        let text = String::from_utf8(fixture("running.status.xml")).unwrap();
        let me = std::process::id();
        let live = text.replacen("pid='3342'", &format!("pid='{me}'"), 1);
        std::fs::write(dir.join("swk-probe-live.xml"), &live).unwrap();
        std::fs::write(dir.join("swk-probe-live.pid"), format!("{me}\n")).unwrap();
        let vm = read(&dir, "swk-probe-live").unwrap().unwrap();
        assert_eq!(vm.status.pid, me);
        assert_eq!(qemu_pid(&dir, "swk-probe-live"), Some(me));
        assert_eq!(names(&dir).unwrap(), vec!["swk-probe-live".to_owned()]);
        // A pid no process has: the VM is gone, its status file left over.
        let dead = text.replacen("pid='3342'", "pid='4194304'", 1);
        std::fs::write(dir.join("swk-probe-live.xml"), dead).unwrap();
        assert!(read(&dir, "swk-probe-live").unwrap().is_none());
        // A status file under another VM's name is refused.
        std::fs::rename(dir.join("swk-probe-live.xml"), dir.join("other.xml")).unwrap();
        assert!(read(&dir, "other").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

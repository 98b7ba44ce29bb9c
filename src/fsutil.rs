//! Filesystem primitives that privileged code needs and std lacks:
//! opening paths without following symlinks planted by less privileged
//! users, bounded reads of regular files only, durable writes.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::time::SystemTime;

use nix::errno::Errno;
use nix::fcntl::{self, AtFlags, OFlag, RenameFlags};
use nix::sys::stat::{self, Mode};
use nix::unistd::{self, UnlinkatFlags};

use crate::error::{Error, IoContext, Result};
use crate::failpoint;

const MAX_SYMLINK_HOPS: usize = 40;
/// How deep `Dir::remove_entry` descends. What a restore writes is one
/// level deep; a deeper tree (made by another user) is left, and said so.
const MAX_REMOVE_DEPTH: usize = 16;

fn openat(dir: &OwnedFd, name: &OsStr, flags: OFlag) -> io::Result<OwnedFd> {
    Ok(fcntl::openat(
        dir,
        name,
        flags | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?)
}

pub fn fstat(fd: &impl AsFd) -> io::Result<libc::stat> {
    Ok(stat::fstat(fd)?)
}

fn is_type(st: &libc::stat, t: libc::mode_t) -> bool {
    st.st_mode & libc::S_IFMT == t
}

/// A directory is trusted to hold symlinks when only root (or we
/// ourselves) can change it. POSIX ACLs need no reading: with named
/// entries, Linux shows the ACL mask as the group bits, and the mask
/// bounds what every named user and group may do.
fn trusted_dir(st: &libc::stat) -> bool {
    (st.st_uid == 0 || st.st_uid == unistd::geteuid().as_raw()) && st.st_mode & 0o022 == 0
}

/// Open `path` (absolute) for reading, resolving every component by hand:
/// a symlink is followed only when the directory that holds it is owned by
/// root and writable by nobody else, so that a link planted by `tss` or the
/// qemu user never redirects a root process. `want_dir` selects O_DIRECTORY.
/// Non-blocking, so that a FIFO planted in place of a file cannot hang us.
pub fn open_no_untrusted_links(path: &Path, want_dir: bool) -> Result<File> {
    if !path.is_absolute() {
        return Err(Error::failed(format!(
            "refusing relative path {}",
            path.display()
        )));
    }
    let mut todo: VecDeque<OsString> = VecDeque::new();
    push_components(&mut todo, path);
    let root = || -> io::Result<OwnedFd> {
        let fd = File::open("/")?;
        Ok(OwnedFd::from(fd))
    };
    let mut cur = root().ctx("open", Path::new("/"))?;
    let mut hops = 0;
    while let Some(name) = todo.pop_front() {
        if name == "/" {
            cur = root().ctx("open", Path::new("/"))?;
            continue;
        }
        let last = todo.is_empty();
        let probe = openat(&cur, &name, OFlag::O_PATH | OFlag::O_NOFOLLOW).ctx("open", path)?;
        let st = fstat(&probe).ctx("stat", path)?;
        if is_type(&st, libc::S_IFLNK) {
            let parent = fstat(&cur).ctx("stat", path)?;
            if !trusted_dir(&parent) {
                return Err(Error::failed(format!(
                    "refusing to follow symlink {:?} in {}: its directory is writable by uid {} \
                     (mode {:o}), so the link may have been planted",
                    name,
                    path.display(),
                    parent.st_uid,
                    parent.st_mode & 0o7777
                )));
            }
            hops += 1;
            if hops > MAX_SYMLINK_HOPS {
                return Err(Error::io(
                    "resolve",
                    path,
                    io::Error::from_raw_os_error(libc::ELOOP),
                ));
            }
            let target = fcntl::readlinkat(&cur, name.as_os_str())
                .map_err(io::Error::from)
                .ctx("read symlink in", path)?;
            let mut front = VecDeque::new();
            push_components(&mut front, Path::new(&target));
            while let Some(c) = front.pop_back() {
                todo.push_front(c);
            }
            continue;
        }
        if !last {
            if !is_type(&st, libc::S_IFDIR) {
                return Err(Error::io(
                    "open",
                    path,
                    io::Error::from_raw_os_error(libc::ENOTDIR),
                ));
            }
            cur = probe;
            continue;
        }
        let mut flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY;
        if want_dir {
            flags |= OFlag::O_DIRECTORY;
        }
        let fd = openat(&cur, &name, flags).ctx("open", path)?;
        return Ok(File::from(fd));
    }
    // The path was "/" itself.
    Ok(File::from(root().ctx("open", path)?))
}

fn push_components(todo: &mut VecDeque<OsString>, p: &Path) {
    for c in p.components() {
        match c {
            Component::RootDir => todo.push_back(OsString::from("/")),
            Component::CurDir => {}
            Component::ParentDir => todo.push_back(OsString::from("..")),
            Component::Normal(n) => todo.push_back(n.to_owned()),
            Component::Prefix(_) => {}
        }
    }
}

/// `open_no_untrusted_links`, with a missing path as `None`.
pub fn open_if_exists(path: &Path, want_dir: bool) -> Result<Option<File>> {
    match open_no_untrusted_links(path, want_dir) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.io_kind() == Some(io::ErrorKind::NotFound) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Open `name` inside an already opened directory, never following a symlink.
pub fn open_in_dir(dir: &File, name: &OsStr) -> io::Result<File> {
    let owned = dir.try_clone()?;
    let fd = openat(
        &OwnedFd::from(owned),
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY,
    )?;
    Ok(File::from(fd))
}

/// What a bounded read of a regular file gives: the bytes and the metadata
/// to record (mode, owner) taken from the same open file.
#[derive(Debug, Clone)]
pub struct FileData {
    pub bytes: Vec<u8>,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// The version read, for telling later whether the file changed.
    pub identity: Option<Identity>,
}

/// What identifies one version of a file without reading it: a rename
/// gives a new inode, a write in place a new mtime and ctime, a chown a new
/// ctime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

impl Identity {
    /// From a `stat` of the entry (not following a final symlink).
    pub fn of_metadata(m: &fs::Metadata) -> Identity {
        let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
        Identity {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        }
    }

    pub fn of(st: &libc::stat) -> Identity {
        let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
        Identity {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size as u64,
            mtime_ns: ns(st.st_mtime, st.st_mtime_nsec),
            ctime_ns: ns(st.st_ctime, st.st_ctime_nsec),
        }
    }
}

/// Read an open file that must be a regular file with at most one link, at most
/// `max` bytes, and unchanged in size while we read it.
pub fn read_regular(file: &mut File, path: &Path, max: u64) -> Result<FileData> {
    let st = fstat(file).ctx("stat", path)?;
    if !is_type(&st, libc::S_IFREG) {
        return Err(Error::failed(format!(
            "refusing {}: not a regular file (type {:o})",
            path.display(),
            st.st_mode & libc::S_IFMT
        )));
    }
    // More than one link: perhaps a link to some other file, planted.
    // None: the file was renamed over since we opened it (as swtpm does);
    // what we hold is a complete earlier version, and names nothing else.
    if st.st_nlink > 1 {
        return Err(Error::failed(format!(
            "refusing {}: it has {} hard links (a link to another file may have been planted)",
            path.display(),
            st.st_nlink
        )));
    }
    let size = st.st_size as u64;
    if size > max {
        return Err(Error::failed(format!(
            "refusing {}: {} bytes is over the limit of {} (max_file_size)",
            path.display(),
            size,
            max
        )));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .ctx("read", path)?;
    if bytes.len() as u64 != size {
        return Err(Error::failed(format!(
            "refusing {}: it changed size while being read ({} then {} bytes)",
            path.display(),
            size,
            bytes.len()
        )));
    }
    Ok(FileData {
        bytes,
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        identity: Some(Identity::of(&st)),
    })
}

/// The entry names of an open directory (not "." and "..").
pub fn list_dir(dir: &File, path: &Path) -> Result<Vec<OsString>> {
    // The stream takes the descriptor it is given: hand it a duplicate,
    // which shares the offset, so start from the beginning even if the
    // directory was read before.
    let dup = OwnedFd::from(dir.try_clone().ctx("read directory", path)?);
    unistd::lseek(&dup, 0, unistd::Whence::SeekSet)
        .map_err(io::Error::from)
        .ctx("read directory", path)?;
    let stream = nix::dir::Dir::from_fd(dup)
        .map_err(io::Error::from)
        .ctx("read directory", path)?;
    let mut names = Vec::new();
    for ent in stream {
        let ent = ent.map_err(io::Error::from).ctx("read directory", path)?;
        let b = ent.file_name().to_bytes();
        if b != b"." && b != b".." {
            names.push(OsStr::from_bytes(b).to_owned());
        }
    }
    Ok(names)
}

/// `Dir::replace` of the file `path` names (relative to the current
/// directory), through `.NAME.tmp-PID` beside it: the pid keeps two
/// writers off one temporary. Returns the absolute path written.
pub fn replace_at(path: &Path, data: &[u8], mode: u32) -> Result<PathBuf> {
    let abs = if path.is_absolute() {
        path.to_owned()
    } else {
        std::env::current_dir()
            .ctx("find the current directory for", path)?
            .join(path)
    };
    let (Some(parent), Some(name)) = (abs.parent(), abs.file_name().and_then(|n| n.to_str()))
    else {
        return Err(Error::failed(format!(
            "cannot write {}: name a file",
            path.display()
        )));
    };
    let tmp = format!(".{name}.tmp-{}", std::process::id());
    Dir::open(parent)?.replace(name, &tmp, data, mode)?;
    Ok(abs)
}

/// mkdir with a mode, fine if it exists as a directory (not a symlink);
/// either way its parent is synced, so the directory persists
/// (`Dir::ensure_subdir`). The path is opened as `Dir::open` does.
pub fn ensure_dir(path: &Path, mode: u32) -> Result<Dir> {
    match (path.parent(), path.file_name().and_then(OsStr::to_str)) {
        (Some(parent), Some(name)) => Dir::open(parent)?.ensure_subdir(name, mode),
        _ => Dir::open(path),
    }
}

/// A directory opened once; every operation is relative to its fd, so
/// nothing can redirect them by swapping a path component, and nothing
/// ever follows a symlink at the final name.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

pub enum Rename {
    /// Replace the destination if it exists (a plain rename).
    Replace,
    /// Fail if the destination exists.
    NoReplace,
    /// Atomically swap source and destination (both must exist).
    Exchange,
}

impl Dir {
    /// Open with `open_no_untrusted_links`.
    pub fn open(path: &Path) -> Result<Dir> {
        let f = open_no_untrusted_links(path, true)?;
        Ok(Dir {
            fd: OwnedFd::from(f),
            path: path.to_owned(),
        })
    }

    /// `open`, with a missing directory as `None`.
    pub fn open_if_exists(path: &Path) -> Result<Option<Dir>> {
        Ok(open_if_exists(path, true)?.map(|f| Dir {
            fd: OwnedFd::from(f),
            path: path.to_owned(),
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn stat(&self) -> Result<libc::stat> {
        fstat(&self.fd).ctx("stat", &self.path)
    }

    /// Only root can change it: safe to hold symlinks and our temporaries.
    pub fn is_trusted(&self) -> Result<bool> {
        Ok(trusted_dir(&self.stat()?))
    }

    /// lstat of an entry; None if it does not exist.
    pub fn entry_stat(&self, name: &str) -> Result<Option<libc::stat>> {
        self.stat_at(OsStr::new(name))
    }

    fn stat_at(&self, name: &OsStr) -> Result<Option<libc::stat>> {
        match stat::fstatat(&self.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st)),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(Error::io("stat", &self.path.join(name), e.into())),
        }
    }

    pub fn entry_is_dir(st: &libc::stat) -> bool {
        is_type(st, libc::S_IFDIR)
    }

    /// Open a subdirectory, never through a symlink.
    pub fn open_subdir(&self, name: &str) -> Result<Dir> {
        self.open_sub(OsStr::new(name))
    }

    fn open_sub(&self, name: &OsStr) -> Result<Dir> {
        let p = self.path.join(name);
        let fd = openat(
            &self.fd,
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
        )
        .ctx("open directory", &p)?;
        Ok(Dir { fd, path: p })
    }

    /// Open a file in this directory for reading, never through a symlink
    /// (non-blocking: a FIFO planted in its place cannot hang us).
    pub fn open_file(&self, name: &str) -> Result<File> {
        let p = self.path.join(name);
        let fd = openat(
            &self.fd,
            OsStr::new(name),
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY,
        )
        .ctx("open", &p)?;
        Ok(File::from(fd))
    }

    /// Give `src`'s file `from` a second name `name` here (a hard link),
    /// never through a symlink: a file that did not change is kept once,
    /// not written again. Its data is already durable; the new name is
    /// made durable by syncing this directory.
    pub fn link_from(&self, src: &Dir, from: &str, name: &str) -> Result<()> {
        let p = self.path.join(name);
        unistd::linkat(&src.fd, from, &self.fd, name, AtFlags::empty())
            .map_err(io::Error::from)
            .ctx("link", &p)
    }

    pub fn mkdir(&self, name: &str, mode: u32) -> Result<Dir> {
        let p = self.path.join(name);
        stat::mkdirat(&self.fd, name, Mode::from_bits_retain(mode))
            .map_err(io::Error::from)
            .ctx("create directory", &p)?;
        self.open_subdir(name)
    }

    /// `mkdir`, fine if `name` exists as a directory (not a symlink);
    /// either way this directory is synced, so the new one persists: also
    /// when it exists, as the run that made it may have died before its
    /// fsync (cheap when nothing is pending).
    pub fn ensure_subdir(&self, name: &str, mode: u32) -> Result<Dir> {
        match stat::mkdirat(&self.fd, name, Mode::from_bits_retain(mode)) {
            Ok(()) => {}
            Err(Errno::EEXIST) => {
                let is_dir = self
                    .entry_stat(name)?
                    .is_some_and(|st| Dir::entry_is_dir(&st));
                if !is_dir {
                    return Err(Error::failed(format!(
                        "{} exists and is not a directory",
                        self.path.join(name).display()
                    )));
                }
            }
            Err(e) => {
                return Err(Error::io(
                    "create directory",
                    &self.path.join(name),
                    e.into(),
                ))
            }
        }
        self.sync()?;
        self.open_subdir(name)
    }

    /// Create a new file (never an existing one, never through a link),
    /// write it, set owner and mode, fsync.
    pub fn write_new(
        &self,
        name: &str,
        data: &[u8],
        mode: u32,
        owner: Option<(u32, u32)>,
    ) -> Result<()> {
        let p = self.path.join(name);
        let flags =
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let mut f = fcntl::openat(&self.fd, name, flags, Mode::from_bits_retain(mode))
            .map(File::from)
            .map_err(io::Error::from)
            .ctx("create", &p)?;
        f.write_all(data).ctx("write", &p)?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid)).ctx("chown", &p)?;
        }
        // Explicit, whatever the umask was.
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))
            .ctx("chmod", &p)?;
        if !failpoint::skip_fsync() {
            f.sync_all().ctx("fsync", &p)?;
        }
        Ok(())
    }

    /// Put `data` at `name` whole, replacing what is there: written as
    /// `tmp` (a stale one of that name removed first), fsynced, renamed
    /// over `name`, the directory fsynced. A reader sees the old file or
    /// the new one; a failure removes `tmp`.
    pub fn replace(&self, name: &str, tmp: &str, data: &[u8], mode: u32) -> Result<()> {
        self.remove_file(tmp)?;
        let written = self.write_new(tmp, data, mode, None).and_then(|()| {
            failpoint::hit("replace-before-rename");
            self.rename(tmp, name, Rename::Replace)
        });
        if let Err(e) = written {
            let _ = self.remove_file(tmp);
            return Err(e);
        }
        self.sync()
    }

    pub fn chown_chmod(&self, owner: Option<(u32, u32)>, mode: u32) -> Result<()> {
        if let Some((uid, gid)) = owner {
            let (uid, gid) = (unistd::Uid::from_raw(uid), unistd::Gid::from_raw(gid));
            unistd::fchown(&self.fd, Some(uid), Some(gid))
                .map_err(io::Error::from)
                .ctx("chown", &self.path)?;
        }
        stat::fchmod(&self.fd, Mode::from_bits_retain(mode))
            .map_err(io::Error::from)
            .ctx("chmod", &self.path)
    }

    pub fn rename(&self, from: &str, to: &str, how: Rename) -> Result<()> {
        let dest = self.path.join(to);
        let flags = match how {
            Rename::Replace => return self.plain_rename(from, to, "rename into place", &dest),
            Rename::NoReplace => RenameFlags::RENAME_NOREPLACE,
            Rename::Exchange => RenameFlags::RENAME_EXCHANGE,
        };
        match fcntl::renameat2(&self.fd, from, &self.fd, to, flags) {
            Ok(()) => return Ok(()),
            Err(Errno::EINVAL | Errno::ENOSYS) => {}
            Err(e) => return Err(Error::io("rename into place", &dest, e.into())),
        };
        // The filesystem lacks renameat2 flags (GlusterFS's FUSE client
        // answers EINVAL, measured; older NFS): emulate. The caller holds
        // the VM's lock and libvirt holds the domain's; should another
        // host's lock fail and its entry appear between the check and the
        // rename, a directory still never replaces a non-empty one, and a
        // generation always holds its manifest and SHA256SUMS.
        match how {
            Rename::Replace => unreachable!("handled above"),
            Rename::NoReplace => {
                if self.entry_stat(to)?.is_some() {
                    return Err(Error::io(
                        "rename into place",
                        &dest,
                        io::Error::from_raw_os_error(libc::EEXIST),
                    ));
                }
                self.plain_rename(from, to, "rename into place", &dest)
            }
            Rename::Exchange => {
                let aside = format!("{from}.aside");
                let how = "rename into place";
                self.plain_rename(to, &aside, how, &dest)?;
                self.plain_rename(from, to, how, &dest)?;
                self.plain_rename(&aside, from, how, &dest)
            }
        }
    }

    /// Rename `from` aside to `to` (a plain rename), to remove it next.
    pub fn rename_for_removal(&self, from: &str, to: &str) -> Result<()> {
        self.plain_rename(from, to, "rename for removal", &self.path.join(to))
    }

    fn plain_rename(&self, from: &str, to: &str, action: &str, dest: &Path) -> Result<()> {
        fcntl::renameat(&self.fd, from, &self.fd, to)
            .map_err(io::Error::from)
            .ctx(action, dest)
    }

    /// Remove an entry of ours: a file, or a directory with its whole tree
    /// (a restore's directory holds files, but the one it swapped out may
    /// hold whatever `tss` made in it). Never follows a symlink: a link is
    /// unlinked, and each directory is opened by `openat` with O_NOFOLLOW
    /// relative to its parent's fd, so the walk never leaves the tree.
    pub fn remove_entry(&self, name: &str) -> Result<()> {
        self.remove_at(OsStr::new(name), MAX_REMOVE_DEPTH)
    }

    fn remove_at(&self, name: &OsStr, depth: usize) -> Result<()> {
        let p = self.path.join(name);
        let Some(st) = self.stat_at(name)? else {
            return Ok(());
        };
        let mut flags = UnlinkatFlags::NoRemoveDir;
        if is_type(&st, libc::S_IFDIR) {
            if depth == 0 {
                return Err(Error::failed(format!(
                    "cannot remove {}: it is more than {MAX_REMOVE_DEPTH} directories deep",
                    p.display()
                )));
            }
            let sub = self.open_sub(name)?;
            let f = File::from(sub.fd.try_clone().ctx("remove", &p)?);
            for n in list_dir(&f, &p)? {
                sub.remove_at(&n, depth - 1)?;
            }
            flags = UnlinkatFlags::RemoveDir;
        }
        unistd::unlinkat(&self.fd, name, flags)
            .map_err(io::Error::from)
            .ctx("remove", &p)
    }

    /// Unlink a file (never a directory); false if it was not there.
    pub fn remove_file(&self, name: &str) -> Result<bool> {
        match unistd::unlinkat(&self.fd, name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) => Ok(true),
            Err(Errno::ENOENT) => Ok(false),
            Err(e) => Err(Error::io("remove", &self.path.join(name), e.into())),
        }
    }

    /// Set this directory's mtime.
    pub fn set_modified(&self, t: SystemTime) -> Result<()> {
        File::from(self.fd.try_clone().ctx("open", &self.path)?)
            .set_modified(t)
            .ctx("set the time of", &self.path)
    }

    pub fn names(&self) -> Result<Vec<String>> {
        let f = File::from(self.fd.try_clone().ctx("read directory", &self.path)?);
        Ok(list_dir(&f, &self.path)?
            .into_iter()
            .map(|n| n.to_string_lossy().into_owned())
            .collect())
    }

    pub fn sync(&self) -> Result<()> {
        if failpoint::skip_fsync() {
            return Ok(());
        }
        unistd::fsync(&self.fd)
            .map_err(io::Error::from)
            .ctx("fsync directory", &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_changes_with_inode_size_and_times() {
        let mut st = fstat(&File::open("/").unwrap()).unwrap();
        st.st_ino = 7;
        st.st_size = 10;
        st.st_mtime = 1;
        st.st_mtime_nsec = 5;
        st.st_ctime_nsec = 0;
        let a = Identity::of(&st);
        assert_eq!(a.mtime_ns, 1_000_000_005);
        st.st_ctime_nsec = 1;
        assert_ne!(Identity::of(&st), a, "a chown changes ctime only");
    }

    #[test]
    fn a_file_renamed_over_while_open_is_read_whole_but_a_hard_link_is_refused() {
        let d = std::env::temp_dir().join(format!("swk-fsutil-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("tpm2-00.permall");
        std::fs::write(&p, b"old state").unwrap();
        let mut f = File::open(&p).unwrap();
        std::fs::write(d.join("TMP2-00.permall"), b"new state").unwrap();
        std::fs::rename(d.join("TMP2-00.permall"), &p).unwrap();
        assert_eq!(read_regular(&mut f, &p, 1024).unwrap().bytes, b"old state");

        std::fs::hard_link(&p, d.join("second-name")).unwrap();
        let err = read_regular(&mut File::open(&p).unwrap(), &p, 1024)
            .unwrap_err()
            .to_string();
        assert!(err.contains("2 hard links"), "{err}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn ensure_subdir_takes_an_existing_directory_but_never_a_file_or_a_link() {
        let d = std::env::temp_dir().join(format!("swk-fsutil-ensure-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("there")).unwrap();
        std::fs::write(d.join("file"), b"f").unwrap();
        std::os::unix::fs::symlink(d.join("there"), d.join("link")).unwrap();
        let dir = Dir::open(&d).unwrap();
        dir.ensure_subdir("new", 0o700).unwrap();
        assert!(d.join("new").is_dir());
        dir.ensure_subdir("there", 0o700).unwrap();
        for n in ["file", "link"] {
            let err = dir.ensure_subdir(n, 0o700).unwrap_err().to_string();
            assert!(err.contains("exists and is not a directory"), "{n}: {err}");
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn remove_file_unlinks_a_file_says_when_it_was_absent_and_leaves_a_directory() {
        let d = std::env::temp_dir().join(format!("swk-fsutil-unlink-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("sub")).unwrap();
        std::fs::write(d.join("f"), b"x").unwrap();
        let dir = Dir::open(&d).unwrap();
        assert!(dir.remove_file("f").unwrap());
        assert!(!d.join("f").exists());
        assert!(!dir.remove_file("f").unwrap());
        assert!(dir.remove_file("sub").is_err());
        assert!(d.join("sub").is_dir());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn remove_entry_removes_a_whole_tree_and_never_follows_a_link_out_of_it() {
        let d = std::env::temp_dir().join(format!("swk-fsutil-tree-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let victim = d.join("victim");
        std::fs::create_dir_all(&victim).unwrap();
        std::fs::write(victim.join("keep"), b"k").unwrap();
        let t = d.join("tree");
        std::fs::create_dir_all(t.join("a/b/c")).unwrap();
        std::fs::write(t.join("a/b/c/f"), b"x").unwrap();
        std::os::unix::fs::symlink(&victim, t.join("a/link")).unwrap();
        let dir = Dir::open(&d).unwrap();
        dir.remove_entry("tree").unwrap();
        assert!(!t.exists());
        assert_eq!(std::fs::read(victim.join("keep")).unwrap(), b"k");

        // Deeper than the bound: refused (and said so), not a stack overflow.
        let mut deep = d.join("deep");
        for _ in 0..=MAX_REMOVE_DEPTH {
            deep = deep.join("d");
        }
        std::fs::create_dir_all(&deep).unwrap();
        let err = dir.remove_entry("deep").unwrap_err().to_string();
        assert!(err.contains("directories deep"), "{err}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}

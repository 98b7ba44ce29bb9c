//! One error type: a sentence that names the action and the path, plus
//! the kind that decides the exit code in `main` (and, for a refused
//! restore, what the operator can do about it).

use std::fmt;
use std::io;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Wrong command line or configuration: exit 2.
    Usage,
    /// Something failed: exit 1.
    Failed,
    /// A stored state must not be put back (exit 1), and the fix: what
    /// the operator can do about it.
    Refused { fix: String },
}

#[derive(Debug)]
pub struct Error {
    pub kind: Kind,
    msg: String,
    /// The io error behind it, kept for callers that branch on it (ENOSPC, ENOENT).
    io_kind: Option<io::ErrorKind>,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn failed(msg: impl Into<String>) -> Self {
        Error {
            kind: Kind::Failed,
            msg: msg.into(),
            io_kind: None,
        }
    }

    pub fn usage(msg: impl Into<String>) -> Self {
        Error {
            kind: Kind::Usage,
            msg: msg.into(),
            io_kind: None,
        }
    }

    /// Why a state must not be put back, and what the operator can do.
    pub fn refused(why: impl Into<String>, fix: impl Into<String>) -> Self {
        Error {
            kind: Kind::Refused { fix: fix.into() },
            msg: why.into(),
            io_kind: None,
        }
    }

    /// A refusal's fix; None for any other error.
    pub fn fix(&self) -> Option<&str> {
        match &self.kind {
            Kind::Refused { fix } => Some(fix),
            _ => None,
        }
    }

    /// "cannot <action> <path>: <io error>"
    pub fn io(action: &str, path: &Path, err: io::Error) -> Self {
        Error {
            kind: Kind::Failed,
            msg: format!("cannot {action} {}: {err}", path.display()),
            io_kind: Some(err.kind()),
        }
    }

    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        self.io_kind
    }

    /// Prefix the message with what was being attempted.
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.msg = format!("{what}: {}", self.msg);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Error {}

/// `.ctx("open", path)?` on any io::Result.
pub trait IoContext<T> {
    fn ctx(self, action: &str, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, action: &str, path: &Path) -> Result<T> {
        self.map_err(|e| Error::io(action, path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_says_why_and_carries_its_fix_through_context() {
        let e = Error::refused("generation 3 is stale", "restore it with --force")
            .context("libvirt's TPM state is corrupt");
        assert_eq!(
            e.to_string(),
            "libvirt's TPM state is corrupt: generation 3 is stale"
        );
        assert_eq!(e.fix(), Some("restore it with --force"));
        assert_eq!(Error::failed("x").fix(), None);
    }
}

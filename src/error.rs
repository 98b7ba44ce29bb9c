//! One error type: a sentence that names the action and the path, plus
//! the kind that decides the exit code in `main`.

use std::fmt;
use std::io;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Wrong command line or configuration: exit 2.
    Usage,
    /// Something failed or was refused: exit 1.
    Failed,
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

//! The operator's commands, one module each. Each returns the exit code.

pub mod capture;
pub mod check;
pub mod export;
pub mod import;
pub mod list;
pub mod metrics;
pub mod prune;
pub mod restore;
pub mod show;
pub mod verify;

use crate::config::{Config, Source};
use crate::error::Result;
use crate::logging;

/// Load the configuration for a command (an invalid file is a usage error,
/// exit 2) and point logging at its syslog socket.
pub fn load_config(source: &Source) -> Result<Config> {
    let cfg = source.load()?;
    logging::configure(cfg.syslog_socket.clone(), cfg.log_level.filter());
    Ok(cfg)
}

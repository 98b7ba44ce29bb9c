//! Logging to syslog (facility daemon, ident `swtpm-keeper`) through the
//! `log` facade. Built so that logging can never fail or stall the hook:
//! the socket is connected only when a line is emitted, it is non-blocking
//! (a stuck syslog daemon must not stall libvirtd), and any failure falls
//! back to stderr, then to nothing.

use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use log::{Level, LevelFilter, Log, Metadata, Record};

const IDENT: &str = "swtpm-keeper";
const FACILITY_DAEMON: u8 = 3;
/// Longer lines are cut: syslog daemons truncate at 1-8 KiB anyway.
const MAX_LINE: usize = 2048;

struct Sink {
    socket_path: PathBuf,
    socket: Option<UnixDatagram>,
    tried: bool,
    /// The CLI also shows warnings and errors to the operator on stderr.
    echo_stderr: bool,
}

struct Logger {
    sink: Mutex<Sink>,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

/// Install the logger (no I/O happens here). `echo_stderr` is for the CLI.
pub fn init(echo_stderr: bool) {
    let logger = LOGGER.get_or_init(|| Logger {
        sink: Mutex::new(Sink {
            socket_path: PathBuf::from("/dev/log"),
            socket: None,
            tried: false,
            echo_stderr,
        }),
    });
    if log::set_logger(logger).is_ok() {
        log::set_max_level(LevelFilter::Info);
    }
}

/// Apply the configuration's socket and level.
pub fn configure(socket_path: PathBuf, level: LevelFilter) {
    if let Some(l) = LOGGER.get() {
        if let Ok(mut s) = l.sink.lock() {
            if s.socket_path != socket_path {
                s.socket_path = socket_path;
                s.socket = None;
                s.tried = false;
            }
        }
    }
    log::set_max_level(level);
}

/// Make text safe for one log line: control characters (newlines, escape
/// sequences from a hostile VM name) become visible escapes.
pub fn sanitize(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

fn severity(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

impl Sink {
    fn connect(&mut self) {
        if self.tried {
            return;
        }
        self.tried = true;
        let Ok(sock) = UnixDatagram::unbound() else {
            return;
        };
        if sock.connect(&self.socket_path).is_ok() && sock.set_nonblocking(true).is_ok() {
            self.socket = Some(sock);
        }
    }

    fn emit(&mut self, level: Level, msg: &str) {
        self.connect();
        let mut sent = false;
        if let Some(sock) = &self.socket {
            let pri = FACILITY_DAEMON * 8 + severity(level);
            let line = format!("<{pri}>{IDENT}[{}]: {msg}", std::process::id());
            sent = sock.send(line.as_bytes()).is_ok();
        }
        if !sent || (self.echo_stderr && level <= Level::Warn) {
            let word = match level {
                Level::Error => "error",
                Level::Warn => "warning",
                Level::Info => "info",
                _ => "debug",
            };
            // Ignore failures: stderr may be closed.
            let _ = writeln!(std::io::stderr(), "{IDENT}: {word}: {msg}");
        }
    }
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut msg = sanitize(&record.args().to_string());
        if msg.len() > MAX_LINE {
            let mut cut = MAX_LINE;
            while !msg.is_char_boundary(cut) {
                cut -= 1;
            }
            msg.truncate(cut);
            msg.push_str("...");
        }
        if let Ok(mut sink) = self.sink.lock() {
            sink.emit(record.level(), &msg);
        }
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_escapes_control_characters() {
        assert_eq!(sanitize("vm\nname\x1b[31m"), "vm\\nname\\u{1b}[31m");
        assert_eq!(sanitize("plain-name_1"), "plain-name_1");
        assert_eq!(sanitize("ünï"), "ünï");
    }
}

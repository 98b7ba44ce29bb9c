//! `/etc/swtpm-keeper/swtpm-keeper.conf` (TOML). Every system path the
//! program touches is a key here, so tests run against a fixture tree.
//! `swtpm-keeper --config FILE` or `SWTPM_KEEPER_CONFIG` names another file
//! (libvirt passes neither to hooks, so this is for tests and the CLI).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, Result};

pub const DEFAULT_PATH: &str = "/etc/swtpm-keeper/swtpm-keeper.conf";
pub const ENV_VAR: &str = "SWTPM_KEEPER_CONFIG";
/// One day: see `Config::max_capture_age`.
pub const DEFAULT_MAX_CAPTURE_AGE: u64 = 86_400;
/// The metrics file's name in `prometheus_textfile_dir`.
pub const METRICS_FILE_NAME: &str = "swtpm-keeper.prom";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
}

impl LogLevel {
    pub fn filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
        }
    }
}

/// Whether the hook puts a lost TPM state back at `prepare`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RestoreAtPrepare {
    Auto,
    Off,
}

/// What the hook does when it must refuse a restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnRefusal {
    /// Fail the start (libvirt shows the reason): no silent new TPM.
    Abort,
    /// Let libvirt start the VM with a new, empty TPM.
    Continue,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where generations are kept: `<store_dir>/<uuid>/<generation>/`.
    pub store_dir: PathBuf,
    /// libvirt's swtpm state root (`<swtpm_dir>/<uuid>/tpm2`).
    pub swtpm_dir: PathBuf,
    /// libvirt's persistent domain definitions (`<name>.xml`).
    pub libvirt_config_dir: PathBuf,
    /// How many distinct states to keep per VM (at least 1).
    pub generations: u32,
    /// Seconds to wait for a VM's lock before giving up.
    pub lock_timeout: f64,
    /// Largest file (TPM state, NVRAM) accepted, in bytes.
    pub max_file_size: u64,
    /// Largest generation (every file in it) accepted, in bytes; unset
    /// means 3 × `max_file_size`. See `max_generation_size()`.
    pub max_generation_size: Option<u64>,
    /// The syslog socket; stderr is used when it cannot be reached.
    pub syslog_socket: PathBuf,
    pub log_level: LogLevel,
    /// libvirt's qemu.conf: the owners of restored files.
    pub qemu_conf: PathBuf,
    /// libvirt's runtime dir: `<name>.pid` exists while a VM runs.
    pub libvirt_run_dir: PathBuf,
    /// Where libvirt looks for hooks (`qemu`, `qemu.d/`), for `check`.
    pub libvirt_hooks_dir: PathBuf,
    /// Where the install's reload of libvirt is recorded (`reloaded`), so
    /// that `check` can tell the running daemon uses a newer hook.
    pub run_dir: PathBuf,
    pub restore: RestoreAtPrepare,
    pub on_refusal: OnRefusal,
    /// Seconds between the capture timer's passes (its OnUnitActiveSec=):
    /// `check` warns about a running VM whose newest capture is older
    /// than three of these.
    pub capture_interval: u64,
    /// Seconds after which `check` calls a running VM's newest capture
    /// stale. The capture timer runs every `capture_interval` (5 min), so
    /// a day without one means something is wrong, not a slow timer.
    pub max_capture_age: u64,
    /// libvirt's persistent secrets (`<uuid>.xml`): `check` tells whether
    /// a VM's `<encryption secret>` still exists.
    pub libvirt_secrets_dir: PathBuf,
    /// Where `metrics` and the capture timer write the Prometheus text
    /// file; unset: see `metrics_file()`.
    pub metrics_file: Option<PathBuf>,
    /// node_exporter's textfile collector directory: the metrics file goes
    /// there by default when it exists.
    pub prometheus_textfile_dir: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            store_dir: "/var/lib/swtpm-keeper".into(),
            swtpm_dir: "/var/lib/libvirt/swtpm".into(),
            libvirt_config_dir: "/etc/libvirt/qemu".into(),
            generations: 10,
            lock_timeout: 10.0,
            max_file_size: 64 << 20,
            max_generation_size: None,
            syslog_socket: "/dev/log".into(),
            log_level: LogLevel::Info,
            qemu_conf: "/etc/libvirt/qemu.conf".into(),
            libvirt_run_dir: "/run/libvirt/qemu".into(),
            libvirt_hooks_dir: "/etc/libvirt/hooks".into(),
            run_dir: "/run/swtpm-keeper".into(),
            restore: RestoreAtPrepare::Auto,
            on_refusal: OnRefusal::Abort,
            capture_interval: 300,
            max_capture_age: DEFAULT_MAX_CAPTURE_AGE,
            libvirt_secrets_dir: "/etc/libvirt/secrets".into(),
            metrics_file: None,
            prometheus_textfile_dir: "/var/lib/prometheus/node-exporter".into(),
        }
    }
}

/// Where this run's configuration comes from: the file `--config` named,
/// else `$SWTPM_KEEPER_CONFIG`, else the default. `main` makes it from the
/// command line and passes it down; loading waits until there is work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub path: PathBuf,
    /// Named by `--config`: then the file must exist.
    pub named: bool,
}

impl Source {
    /// `named`: the file `--config` named, which wins over the environment.
    pub fn new(named: Option<PathBuf>) -> Source {
        match named {
            Some(path) => Source { path, named: true },
            None => Source {
                path: match std::env::var_os(ENV_VAR) {
                    Some(p) if !p.is_empty() => PathBuf::from(p),
                    _ => PathBuf::from(DEFAULT_PATH),
                },
                named: false,
            },
        }
    }

    /// Load the file. A missing default file means the defaults, but a
    /// file named with `--config` must exist: a typo there would otherwise
    /// act on the default store unnoticed.
    pub fn load(&self) -> Result<Config> {
        let p = &self.path;
        if !self.named {
            return Config::load(p);
        }
        // Read it once, so that neither a dangling link nor a file removed
        // meanwhile can turn into the defaults.
        let text = std::fs::read_to_string(p).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::usage(format!(
                "configuration {} (named by --config) does not exist",
                p.display()
            )),
            _ => Error::io("read configuration", p, e),
        })?;
        Config::parse(&text).map_err(|e| e.context(format!("configuration {}", p.display())))
    }

    /// With `--config`, the named file must exist: an error for commands
    /// that otherwise report a bad configuration and go on with the defaults.
    pub fn require_named(&self) -> Result<()> {
        if self.named && std::fs::metadata(&self.path).is_err() {
            return Err(Error::usage(format!(
                "configuration {} (named by --config) does not exist",
                self.path.display()
            )));
        }
        Ok(())
    }
}

impl Config {
    /// Load `path`; a missing file means the defaults.
    pub fn load(path: &Path) -> Result<Config> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
            Err(e) => return Err(Error::io("read configuration", path, e)),
        };
        Config::parse(&text).map_err(|e| e.context(format!("configuration {}", path.display())))
    }

    pub fn parse(text: &str) -> Result<Config> {
        let c: Config = basic_toml::from_str(text).map_err(|e| Error::usage(e.to_string()))?;
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<()> {
        let bad = |key: &str, why: &str| Err(Error::usage(format!("key `{key}`: {why}")));
        for (key, p) in [
            ("store_dir", &self.store_dir),
            ("swtpm_dir", &self.swtpm_dir),
            ("libvirt_config_dir", &self.libvirt_config_dir),
            ("syslog_socket", &self.syslog_socket),
            ("qemu_conf", &self.qemu_conf),
            ("libvirt_run_dir", &self.libvirt_run_dir),
            ("libvirt_hooks_dir", &self.libvirt_hooks_dir),
            ("run_dir", &self.run_dir),
            ("libvirt_secrets_dir", &self.libvirt_secrets_dir),
            ("prometheus_textfile_dir", &self.prometheus_textfile_dir),
        ] {
            if !p.is_absolute() {
                return bad(key, "must be an absolute path");
            }
        }
        if self.generations < 1 {
            return bad(
                "generations",
                "must be at least 1 (the newest state is always kept)",
            );
        }
        if !(self.lock_timeout > 0.0 && self.lock_timeout <= 300.0) {
            return bad(
                "lock_timeout",
                "must be more than 0 and at most 300 seconds (libvirtd waits for the hook)",
            );
        }
        if self.max_file_size < 1024 {
            return bad("max_file_size", "must be at least 1024 bytes");
        }
        if !(60..=86_400).contains(&self.capture_interval) {
            return bad("capture_interval", "must be 60 to 86400 seconds");
        }
        if self.metrics_file.as_ref().is_some_and(|p| !p.is_absolute()) {
            return bad("metrics_file", "must be an absolute path");
        }
        // A running VM's unchanged state is confirmed by reading it again
        // once an hour (live::RECHECK_SECS), at the timer's next pass.
        let least = crate::live::RECHECK_SECS as u64 + 2 * self.capture_interval;
        if !(least..=366 * 86_400).contains(&self.max_capture_age) {
            let why = format!(
                "must be at least {least} seconds (1 h + 2 × capture_interval: an unchanged \
                 running VM is confirmed hourly) and at most 366 days (31622400)"
            );
            return bad("max_capture_age", &why);
        }
        if self.max_generation_size.is_some_and(|n| n < 1024) {
            return bad("max_generation_size", "must be at least 1024 bytes");
        }
        Ok(())
    }

    /// The bound on one generation's total bytes. By default room for an
    /// NVRAM and a TPM state each at `max_file_size`, and the domain XMLs:
    /// real generations are well under one `max_file_size` (a 540 KiB
    /// OVMF or 64 MiB AAVMF vars file, a TPM state of KiB).
    pub fn max_generation_size(&self) -> u64 {
        self.max_generation_size
            .unwrap_or(self.max_file_size.saturating_mul(3))
    }

    /// The Prometheus text file to write: `metrics_file`, else
    /// `swtpm-keeper.prom` in node_exporter's textfile directory when that
    /// exists (a host without node_exporter gets no file), else None.
    pub fn metrics_file(&self) -> Option<PathBuf> {
        if let Some(p) = &self.metrics_file {
            return Some(p.clone());
        }
        let dir = &self.prometheus_textfile_dir;
        dir.is_dir().then(|| dir.join(METRICS_FILE_NAME))
    }

    pub fn lock_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.lock_timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.store_dir, PathBuf::from("/var/lib/swtpm-keeper"));
        assert_eq!(c.generations, 10);
    }

    #[test]
    fn shipped_example_is_valid_and_matches_defaults() {
        let text = include_str!("../packaging/swtpm-keeper.conf");
        let c = Config::parse(text).unwrap();
        let d = Config::default();
        assert_eq!(c.store_dir, d.store_dir);
        assert_eq!(c.generations, d.generations);
        assert_eq!(c.lock_timeout, d.lock_timeout);
        assert_eq!(c.restore, d.restore);
        assert_eq!(c.on_refusal, d.on_refusal);
        assert_eq!(c.qemu_conf, d.qemu_conf);
        assert_eq!(c.max_file_size, d.max_file_size);
        assert_eq!(c.max_generation_size(), d.max_generation_size());
    }

    #[test]
    fn generation_bound_defaults_to_three_files_and_can_be_set() {
        assert_eq!(Config::default().max_generation_size(), 192 << 20);
        let c = Config::parse("max_file_size = 1048576").unwrap();
        assert_eq!(c.max_generation_size(), 3 << 20);
        let c = Config::parse("max_generation_size = 5000000").unwrap();
        assert_eq!(c.max_generation_size(), 5_000_000);
        let e = Config::parse("max_generation_size = 10").unwrap_err();
        assert!(e.to_string().contains("`max_generation_size`"), "{e}");
    }

    #[test]
    fn the_metrics_file_defaults_to_the_textfile_dir_only_when_it_exists() {
        let dir = std::env::temp_dir().join(format!("swk-config-prom-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let text = format!("prometheus_textfile_dir = {dir:?}\n");
        assert_eq!(Config::parse(&text).unwrap().metrics_file(), None);
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(
            Config::parse(&text).unwrap().metrics_file(),
            Some(dir.join("swtpm-keeper.prom"))
        );
        let named = format!("{text}metrics_file = \"/srv/m.prom\"\n");
        assert_eq!(
            Config::parse(&named).unwrap().metrics_file(),
            Some(PathBuf::from("/srv/m.prom"))
        );
        let e = Config::parse("metrics_file = \"m.prom\"").unwrap_err();
        assert!(e.to_string().contains("`metrics_file`"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn max_capture_age_defaults_to_a_day_and_is_bounded() {
        assert_eq!(Config::default().max_capture_age, 86_400);
        assert_eq!(
            Config::parse("max_capture_age = 4200")
                .unwrap()
                .max_capture_age,
            4200
        );
        let e = Config::parse("max_capture_age = 4199").unwrap_err();
        assert!(e.to_string().contains("`max_capture_age`"), "{e}");
    }

    #[test]
    fn errors_name_the_key() {
        let e = Config::parse("generations = 0").unwrap_err().to_string();
        assert!(e.contains("`generations`"), "{e}");
        let e = Config::parse("stor_dir = \"/x\"").unwrap_err().to_string();
        assert!(e.contains("stor_dir"), "{e}");
        let e = Config::parse("generations = \"many\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("generations"), "{e}");
        let e = Config::parse("store_dir = \"relative\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`store_dir`"), "{e}");
        let e = Config::parse("log_level = \"loud\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("loud"), "{e}");
    }

    #[test]
    fn a_file_named_by_config_must_exist_where_the_default_may_be_missing() {
        let missing = PathBuf::from("/nonexistent/swtpm-keeper-test.conf");
        let named = Source::new(Some(missing.clone()));
        assert_eq!(named.path, missing);
        let e = named.load().unwrap_err();
        assert_eq!(e.kind, crate::error::Kind::Usage);
        assert!(e.to_string().contains("named by --config"), "{e}");
        assert!(named.require_named().is_err());
        let default = Source {
            path: missing,
            named: false,
        };
        assert!(default.load().is_ok());
        assert!(default.require_named().is_ok());
    }

    #[test]
    fn load_names_the_file() {
        let dir = std::env::temp_dir().join(format!("swk-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("bad.conf");
        std::fs::write(&p, "generations = -3\n").unwrap();
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(e.contains(&p.display().to_string()), "{e}");
        assert!(Config::load(&dir.join("missing.conf")).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

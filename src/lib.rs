//! swtpm-keeper: a libvirt QEMU hook that keeps every VM's swtpm state and
//! UEFI NVRAM in a crash-safe, versioned store. One module per concept.

// No function over 80 lines (clippy.toml): the code is meant to be read.
#![deny(clippy::too_many_lines)]

pub mod archive; // the tar archive of one generation: export and import
pub mod capture; // what a stop captures, and how
pub mod cli; // the command line
pub mod commands; // the operator's commands, one module each
pub mod config; // the configuration file
pub mod coverage; // which VMs' TPMs are protected: libvirt's VMs joined with the store
pub mod domain; // the domain XML libvirt passes on stdin
pub mod error; // errors that name the action and the path
pub mod evidence; // corrupt states kept in the store, never restored
pub mod failpoint; // crash injection for tests (feature `failpoints`)
pub mod failure; // the remembered capture failure
pub mod fsutil; // symlink-safe opens, bounded reads, durable writes
pub mod hook; // the libvirt hook protocol
pub mod inventory; // the store as the commands see it
pub mod leftover; // the store's temporaries: whose, and when they may go
pub mod live; // reading a running VM's files consistently
pub mod lock; // the per-VM lock
pub mod logging; // syslog through the `log` facade
pub mod manifest; // manifest.json and SHA256SUMS
pub mod marks; // the incoming, migrated-away and protected marks beside a VM's generations
pub mod mend; // judging libvirt's state at prepare: absent, good or corrupt
pub mod pause; // capture --pause: suspend and resume a VM through virsh (never in the hook)
pub mod putback; // putting a state back where libvirt looks for it
pub mod qemuconf; // owners of restored files, from qemu.conf
pub mod running; // running VMs, from libvirt's status files
pub mod store; // generations on disk
pub mod swtpm; // swtpm's files: names, headers, liveness
pub mod users; // accounts (user and group names and ids) and the host name

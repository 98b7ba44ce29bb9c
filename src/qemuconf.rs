//! The owners libvirt gives the files we put back, from
//! `/etc/libvirt/qemu.conf`: `swtpm_user`/`swtpm_group` for the TPM state,
//! `user`/`group` for the NVRAM. Only these keys are read.

use std::path::Path;

use crate::users;

/// (uid, gid) and the names they came from, for log lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
    pub desc: String,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct QemuConf {
    pub user: Option<String>,
    pub group: Option<String>,
    pub swtpm_user: Option<String>,
    pub swtpm_group: Option<String>,
}

impl QemuConf {
    /// A missing or unreadable file gives libvirt's defaults.
    pub fn load(path: &Path) -> QemuConf {
        std::fs::read_to_string(path)
            .map(|t| QemuConf::parse(&t))
            .unwrap_or_default()
    }

    /// libvirt's config syntax: `key = "value"`, `#` comments.
    pub fn parse(text: &str) -> QemuConf {
        let mut c = QemuConf::default();
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with('#') {
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            let v = v.trim();
            let v = v.split('#').next().unwrap_or("").trim();
            let Some(v) = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) else {
                continue;
            };
            let slot = match k.trim() {
                "user" => &mut c.user,
                "group" => &mut c.group,
                "swtpm_user" => &mut c.swtpm_user,
                "swtpm_group" => &mut c.swtpm_group,
                _ => continue,
            };
            *slot = Some(v.to_owned());
        }
        c
    }

    /// libvirt's default: `tss:tss` when that user exists, else root.
    pub fn swtpm_owner(&self) -> Owner {
        owner(
            self.swtpm_user.as_deref(),
            self.swtpm_group.as_deref(),
            &["tss"],
            &["tss"],
        )
    }

    /// Debian builds libvirt with libvirt-qemu, Fedora with qemu.
    pub fn qemu_owner(&self) -> Owner {
        owner(
            self.user.as_deref(),
            self.group.as_deref(),
            &["libvirt-qemu", "qemu"],
            &["libvirt-qemu", "qemu", "kvm"],
        )
    }
}

fn owner(
    user: Option<&str>,
    group: Option<&str>,
    default_users: &[&str],
    default_groups: &[&str],
) -> Owner {
    let (uid, uname) = match user {
        Some(u) => (lookup_user(u).unwrap_or(0), u.to_owned()),
        None => default_users
            .iter()
            .find_map(|u| lookup_user(u).map(|id| (id, u.to_string())))
            .unwrap_or((0, "root".into())),
    };
    let (gid, gname) = match group {
        Some(g) => (lookup_group(g).unwrap_or(0), g.to_owned()),
        None => default_groups
            .iter()
            .find_map(|g| lookup_group(g).map(|id| (id, g.to_string())))
            .unwrap_or((0, "root".into())),
    };
    Owner {
        uid,
        gid,
        desc: format!("{uname}:{gname}"),
    }
}

/// A user name, or `+N` for a numeric id (libvirt's syntax).
pub fn lookup_user(name: &str) -> Option<u32> {
    match name.strip_prefix('+') {
        Some(n) => n.parse().ok(),
        None => users::user_id(name),
    }
}

/// A group name, or `+N` for a numeric id.
pub fn lookup_group(name: &str) -> Option<u32> {
    match name.strip_prefix('+') {
        Some(n) => n.parse().ok(),
        None => users::group_id(name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_only_set_keys() {
        let c = QemuConf::parse("#user = \"nobody\"\nuser = \"+107\" # comment\n  swtpm_group = \"root\"\nsecurity_driver = \"none\"\n");
        assert_eq!(c.user.as_deref(), Some("+107"));
        assert_eq!(c.group, None);
        assert_eq!(c.swtpm_group.as_deref(), Some("root"));
        assert_eq!(c.qemu_owner().uid, 107);
        assert_eq!(c.swtpm_owner().gid, 0);
    }

    #[test]
    fn numeric_and_named_ids() {
        assert_eq!(lookup_user("+4242"), Some(4242));
        assert_eq!(lookup_user("root"), Some(0));
        assert_eq!(lookup_group("root"), Some(0));
        assert_eq!(lookup_user("no-such-user-here"), None);
    }
}

//! Accounts and the host name: user and group names by id and ids by name
//! from the system databases (getpw*_r / getgr*_r through nix, so NSS
//! sources such as LDAP or sssd count), names remembered for the run: each
//! lookup may read /etc/passwd or ask nscd, and a capture names the owner of
//! every file.

use std::cell::RefCell;
use std::collections::HashMap;

use nix::unistd::{self, Gid, Group, Uid, User};

thread_local! {
    static USERS: RefCell<HashMap<u32, Option<String>>> = RefCell::new(HashMap::new());
    static GROUPS: RefCell<HashMap<u32, Option<String>>> = RefCell::new(HashMap::new());
}

/// The user name of `uid`, if the system knows one.
pub fn user_name(uid: u32) -> Option<String> {
    USERS.with(|c| {
        let lookup = || Some(User::from_uid(Uid::from_raw(uid)).ok()??.name);
        c.borrow_mut().entry(uid).or_insert_with(lookup).clone()
    })
}

/// The group name of `gid`, if the system knows one.
pub fn group_name(gid: u32) -> Option<String> {
    GROUPS.with(|c| {
        let lookup = || Some(Group::from_gid(Gid::from_raw(gid)).ok()??.name);
        c.borrow_mut().entry(gid).or_insert_with(lookup).clone()
    })
}

/// The uid of the user `name`.
pub fn user_id(name: &str) -> Option<u32> {
    Some(User::from_name(name).ok()??.uid.as_raw())
}

/// The gid of the group `name`.
pub fn group_id(name: &str) -> Option<u32> {
    Some(Group::from_name(name).ok()??.gid.as_raw())
}

/// This host's name, as recorded in every generation and marker.
pub fn host_name() -> String {
    match unistd::gethostname() {
        Ok(name) => name.to_string_lossy().into_owned(),
        Err(_) => "unknown".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_ids_of_root_both_ways() {
        assert_eq!(user_name(0).as_deref(), Some("root"));
        assert_eq!(group_name(0).as_deref(), Some("root"));
        assert_eq!(user_id("root"), Some(0));
        assert_eq!(group_id("root"), Some(0));
        assert!(!host_name().is_empty());
    }

    #[test]
    fn unknown_accounts_are_none() {
        assert_eq!(user_id("no-such-user-here"), None);
        assert_eq!(group_id("no-such-group-here"), None);
        assert_eq!(user_id("nul\0inside"), None);
        assert_eq!(user_name(4_000_000_000), None);
    }
}

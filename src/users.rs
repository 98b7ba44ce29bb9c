//! Accounts and the host name: user and group names by id and ids by name
//! from the system databases (getpw*_r / getgr*_r, so NSS sources such as
//! LDAP or sssd count), names remembered for the run: each lookup may read
//! /etc/passwd or ask nscd, and a capture names the owner of every file.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{CStr, CString};

use libc::{c_char, c_int};

thread_local! {
    static USERS: RefCell<HashMap<u32, Option<String>>> = RefCell::new(HashMap::new());
    static GROUPS: RefCell<HashMap<u32, Option<String>>> = RefCell::new(HashMap::new());
}

/// The user name of `uid`, if the system knows one.
pub fn user_name(uid: u32) -> Option<String> {
    USERS.with(|c| {
        let lookup = || {
            nss_lookup(
                // SAFETY: rec, buf and out are valid for the call; on success
                // out points at rec, whose strings point into buf.
                |rec: &mut libc::passwd, buf, out| unsafe {
                    libc::getpwuid_r(uid, rec, buf.as_mut_ptr(), buf.len(), out)
                },
                |pw| owned_name(pw.pw_name),
            )
        };
        c.borrow_mut().entry(uid).or_insert_with(lookup).clone()
    })
}

/// The group name of `gid`, if the system knows one.
pub fn group_name(gid: u32) -> Option<String> {
    GROUPS.with(|c| {
        let lookup = || {
            nss_lookup(
                // SAFETY: as in user_name.
                |rec: &mut libc::group, buf, out| unsafe {
                    libc::getgrgid_r(gid, rec, buf.as_mut_ptr(), buf.len(), out)
                },
                |gr| owned_name(gr.gr_name),
            )
        };
        c.borrow_mut().entry(gid).or_insert_with(lookup).clone()
    })
}

/// The uid of the user `name`.
pub fn user_id(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    nss_lookup(
        // SAFETY: as in user_name; c is a NUL-terminated string.
        |rec: &mut libc::passwd, buf, out| unsafe {
            libc::getpwnam_r(c.as_ptr(), rec, buf.as_mut_ptr(), buf.len(), out)
        },
        |pw| pw.pw_uid,
    )
}

/// The gid of the group `name`.
pub fn group_id(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    nss_lookup(
        // SAFETY: as in user_id.
        |rec: &mut libc::group, buf, out| unsafe {
            libc::getgrnam_r(c.as_ptr(), rec, buf.as_mut_ptr(), buf.len(), out)
        },
        |gr| gr.gr_gid,
    )
}

/// The records the reentrant lookups fill in.
trait NssRecord {}
impl NssRecord for libc::passwd {}
impl NssRecord for libc::group {}

/// Run one reentrant lookup, growing its buffer while it says ERANGE (a
/// group with many members), and map the record found.
fn nss_lookup<R: NssRecord, T>(
    call: impl Fn(&mut R, &mut [c_char], &mut *mut R) -> c_int,
    map: impl FnOnce(&R) -> T,
) -> Option<T> {
    let mut len = 16 * 1024;
    loop {
        // SAFETY: passwd and group (the only NssRecord types) are C structs
        // of integers and pointers, for which all zeroes is a valid value.
        let mut rec: R = unsafe { std::mem::zeroed() };
        let mut buf = vec![0 as c_char; len];
        let mut out: *mut R = std::ptr::null_mut();
        match call(&mut rec, &mut buf, &mut out) {
            libc::ERANGE if len < 1 << 22 => len *= 4,
            0 if !out.is_null() => return Some(map(&rec)),
            _ => return None,
        }
    }
}

/// A name from a record the lookup filled in, copied out of its buffer.
fn owned_name(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: p points at a NUL-terminated name in the lookup's buffer,
    // which lives until nss_lookup's map returns.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// This host's name, as recorded in every generation and marker.
pub fn host_name() -> String {
    let mut buf = [0 as c_char; 256];
    // SAFETY: buf is writable for len - 1 bytes; the last stays NUL, so the
    // name is NUL-terminated even when gethostname truncates it.
    if unsafe { libc::gethostname(buf.as_mut_ptr(), buf.len() - 1) } != 0 {
        return "unknown".into();
    }
    owned_name(buf.as_ptr())
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

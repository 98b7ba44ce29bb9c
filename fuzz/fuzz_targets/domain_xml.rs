//! The domain XML reader: whatever libvirt (or anyone) puts on stdin, it
//! returns a domain or an error, never a panic or a hang.
#![no_main]

use libfuzzer_sys::fuzz_target;
use swtpm_keeper::domain::{Domain, Uuid};

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = Domain::parse(data) {
        // What parse promises about what it accepts.
        assert_eq!(Uuid::new(&d.uuid).as_ref(), Some(&d.uuid));
        assert!(!d.name.is_empty() && !d.name.contains('/'));
        if let Some(p) = &d.nvram {
            assert!(p.is_absolute());
        }
    }
});

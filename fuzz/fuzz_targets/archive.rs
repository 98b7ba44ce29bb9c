//! The archive reader of `import`: whatever bytes arrive, it returns a
//! verified generation or an error, never a panic, a hang or an
//! allocation beyond its limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use swtpm_keeper::archive::{self, Limits};
use swtpm_keeper::store::is_generation_name;

const LIMITS: Limits = Limits {
    max_file: 1 << 20,
    max_total: 4 << 20,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(a) = archive::read(data, "fuzz input", LIMITS) {
        // What read promises about what it accepts.
        assert!(is_generation_name(&a.generation.name));
        assert_eq!(a.generation.manifest.uuid, a.uuid.as_str());
        let total: usize = a.generation.files.iter().map(|(_, b)| b.len()).sum();
        assert!(total as u64 <= LIMITS.max_total);
    }
});

//! The checks applied to bytes from the state dir and the store: swtpm's
//! blob header and TLVs, the linear file store, SHA256SUMS and manifests.
#![no_main]

use libfuzzer_sys::fuzz_target;
use swtpm_keeper::domain::TpmVersion;
use swtpm_keeper::{manifest, swtpm};

fuzz_target!(|data: &[u8]| {
    if swtpm::check_file(TpmVersion::V2_0, "tpm2-00.permall", data).is_ok() {
        // A blob that passes says its own length.
        assert_eq!(u32::from_be_bytes([data[6], data[7], data[8], data[9]]) as usize, data.len());
    }
    let _ = swtpm::check_file(TpmVersion::V1_2, "tpm-00.permall", data);
    let _ = swtpm::check_linear(data);
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(sums) = manifest::parse_sums(text) {
            for (name, hex) in sums {
                assert!(!name.contains('/') && hex.len() == 64);
            }
        }
    }
    let _ = manifest::Manifest::from_json(data);
});

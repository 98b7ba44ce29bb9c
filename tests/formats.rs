//! The store's formats, through the library's public functions: the times
//! in manifests and generation names, `SHA256SUMS` lines, the manifest's
//! format number, and the bounds of swtpm's blob header and TLVs. (Found
//! by `make mutants`: these rules had mutants no other test killed.)

mod common;

use common::*;
use swtpm_keeper::domain::TpmVersion;
use swtpm_keeper::manifest::{compact_time, parse_sums, rfc3339, sha256_hex, Manifest};
use swtpm_keeper::swtpm::check_file;

/// A TPM 2.0 permall (`true`: checked for its magic numbers too) or
/// another of swtpm's blobs, through the one check by file name.
fn check_blob(bytes: &[u8], permall: bool) -> Result<u16, String> {
    let name = if permall {
        "tpm2-00.permall"
    } else {
        "tpm2-00.volatilestate"
    };
    check_file(TpmVersion::V2_0, name, bytes)
}

/// (year, month, day) of `days` since 1970-01-01, by walking the calendar
/// one day at a time: slow, and obviously right.
fn walk(days: i64) -> (i64, u32, u32) {
    let leap = |y: i64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let len = |y: i64, m: u32| match m {
        2 if leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    let (mut y, mut m, mut d) = (1970i64, 1u32, 1u32);
    for _ in 0..days.max(0) {
        d += 1;
        if d > len(y, m) {
            (d, m) = (1, m + 1);
            if m > 12 {
                (m, y) = (1, y + 1);
            }
        }
    }
    for _ in days.min(0)..0 {
        d -= 1;
        if d == 0 {
            if m == 1 {
                (m, y) = (12, y - 1);
            } else {
                m -= 1;
            }
            d = len(y, m);
        }
    }
    (y, m, d)
}

#[test]
fn times_match_a_day_by_day_calendar_over_three_centuries() {
    // 1820 to 2120: the non-leap centuries 1900 and 2100, the leap 2000.
    let first = -55_000i64;
    let (mut y, mut m, mut d) = walk(first);
    let leap = |y: i64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    for days in first..55_000 {
        let noon = days * 86_400 + 12 * 3600 + 34 * 60 + 56;
        let want = format!("{y:04}-{m:02}-{d:02}T12:34:56Z");
        assert_eq!(rfc3339(noon), want, "day {days}");
        assert_eq!(
            compact_time(noon),
            format!("{y:04}{m:02}{d:02}T123456Z"),
            "day {days}"
        );
        // Next day, as `walk` counts.
        let len = match m {
            2 if leap(y) => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        };
        d += 1;
        if d > len {
            (d, m) = (1, m + 1);
            if m > 12 {
                (m, y) = (1, y + 1);
            }
        }
    }
    assert_eq!(walk(0), (1970, 1, 1));
    assert_eq!(walk(-1), (1969, 12, 31));
    // The ends of eras and centuries, and the second before midnight.
    for (t, want) in [
        (-11_670_998_400, "1600-02-29T00:00:00Z"),
        (-11_670_912_000, "1600-03-01T00:00:00Z"),
        (-2_203_891_201, "1900-02-28T23:59:59Z"),
        (-2_203_891_200, "1900-03-01T00:00:00Z"),
        (-1, "1969-12-31T23:59:59Z"),
        (951_827_696, "2000-02-29T12:34:56Z"),
        (951_868_800, "2000-03-01T00:00:00Z"),
        (4_107_542_399, "2100-02-28T23:59:59Z"),
        (4_107_542_400, "2100-03-01T00:00:00Z"),
        (13_574_563_200, "2400-02-29T00:00:00Z"),
        (13_574_649_600, "2400-03-01T00:00:00Z"),
    ] {
        assert_eq!(rfc3339(t), want);
    }
}

#[test]
fn sha256sums_lines_need_64_hex_digits_and_a_plain_name() {
    let hex = sha256_hex(b"x");
    assert_eq!(
        parse_sums(&format!("{hex}  tpm2-00.permall\n")).unwrap(),
        [("tpm2-00.permall".to_string(), hex.clone())]
    );
    // Upper case is read as lower case.
    assert_eq!(
        parse_sums(&format!("{}  a\n", hex.to_uppercase())).unwrap()[0].1,
        hex
    );
    for (bad, why) in [
        (format!("{}  a\n", "g".repeat(64)), "64 characters, not hex"),
        (format!("{}  a\n", &hex[..63]), "63 hex digits"),
        (format!("{hex}a  a\n"), "65 hex digits"),
        (format!("{hex}  \n"), "no name"),
        (format!("{hex}  d/a\n"), "a path"),
        (format!("{hex} a\n"), "one space"),
    ] {
        assert!(parse_sums(&bad).is_err(), "accepted {why}: {bad:?}");
    }
}

#[test]
fn a_manifest_of_a_newer_format_is_refused_and_this_one_is_read() {
    let h = Host::new("formats");
    write_generation(
        &h,
        &FixtureGen {
            uuid: UUID_TRANS,
            vm: "tpmtrans",
            generation: "00000001-20261101T000000Z",
            time_unix: 1_793_491_200,
            event: "stopped",
            reason: "-",
            secret: None,
            files: &[("tpm2-00.permall", "tpm", &fixture("tpm2-00.permall.plain"))],
        },
    );
    let path = h
        .vm_store(UUID_TRANS)
        .join("00000001-20261101T000000Z")
        .join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    for format in [0, 1] {
        m["format"] = format.into();
        let read = Manifest::from_json(&serde_json::to_vec(&m).unwrap());
        assert!(read.is_ok(), "format {format}: {read:?}");
    }
    m["format"] = 2.into();
    let err = Manifest::from_json(&serde_json::to_vec(&m).unwrap()).unwrap_err();
    assert!(err.contains("manifest format 2 is newer"), "{err}");
}

#[test]
fn a_manifest_tpm_version_is_1_2_or_2_0_and_any_other_is_refused_not_read_as_2_0() {
    let h = Host::new("formats-version");
    write_generation(
        &h,
        &FixtureGen {
            uuid: UUID_TRANS,
            vm: "tpmtrans",
            generation: "00000001-20261101T000000Z",
            time_unix: 1_793_491_200,
            event: "stopped",
            reason: "-",
            secret: None,
            files: &[("tpm2-00.permall", "tpm", &fixture("tpm2-00.permall.plain"))],
        },
    );
    let path = h
        .vm_store(UUID_TRANS)
        .join("00000001-20261101T000000Z")
        .join("manifest.json");
    let bytes = std::fs::read(path).unwrap();
    let mut m: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    for (text, version) in [("2.0", TpmVersion::V2_0), ("1.2", TpmVersion::V1_2)] {
        m["tpm"]["version"] = text.into();
        let read = Manifest::from_json(&serde_json::to_vec(&m).unwrap()).unwrap();
        assert_eq!(read.tpm.version, version);
        // Written back as it was read: the on-disk spelling is unchanged.
        let again: serde_json::Value = serde_json::from_slice(&read.to_json()).unwrap();
        assert_eq!(again["tpm"]["version"], text);
    }
    for other in ["3.0", "2", ""] {
        m["tpm"]["version"] = other.into();
        let read = Manifest::from_json(&serde_json::to_vec(&m).unwrap());
        assert!(read.is_err(), "version {other:?} was read: {read:?}");
    }
}

/// A swtpm blob: the 10-byte header (version, minimum version, header
/// size, flags, total length = the real length unless `totlen` says
/// otherwise) with `pad` bytes of header beyond 10, then `tlvs` as given.
fn blob(version: u8, min: u8, hdrsize: u16, pad: usize, tlvs: &[u8]) -> Vec<u8> {
    let mut v = vec![version, min];
    v.extend_from_slice(&hdrsize.to_be_bytes());
    v.extend_from_slice(&0u16.to_be_bytes());
    v.extend_from_slice(&[0; 4]);
    v.extend(std::iter::repeat_n(0u8, pad));
    v.extend_from_slice(tlvs);
    let len = (v.len() as u32).to_be_bytes();
    v[6..10].copy_from_slice(&len);
    v
}

/// A TLV: tag, length (as stated), then `data`.
fn tlv(tag: u16, len: u32, data: &[u8]) -> Vec<u8> {
    let mut v = tag.to_be_bytes().to_vec();
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(data);
    v
}

#[test]
fn a_swtpm_blob_header_is_checked_at_each_bound() {
    // The smallest valid blob: a bare 10-byte header, version 1.
    assert_eq!(check_blob(&blob(1, 1, 10, 0, &[]), false), Ok(0));
    assert_eq!(check_blob(&blob(2, 1, 10, 0, &[]), false), Ok(0));
    for short in [1usize, 5, 9] {
        let err = check_blob(&blob(1, 1, 10, 0, &[])[..short], false).unwrap_err();
        assert!(
            err.contains("too short for a swtpm header"),
            "{short}: {err}"
        );
    }
    let err = check_blob(&blob(0, 1, 10, 0, &[]), false).unwrap_err();
    assert!(err.contains("unknown swtpm header version 0/1"), "{err}");
    let err = check_blob(&blob(2, 2, 10, 0, &[]), false).unwrap_err();
    assert!(err.contains("unknown swtpm header version 2/2"), "{err}");
    // The header size: at least 10, at most the file.
    let err = check_blob(&blob(1, 1, 9, 0, &[]), false).unwrap_err();
    assert!(err.contains("bad swtpm header size 9"), "{err}");
    assert_eq!(check_blob(&blob(1, 1, 16, 6, &[]), false), Ok(0));
    let err = check_blob(&blob(1, 1, 17, 6, &[]), false).unwrap_err();
    assert!(err.contains("bad swtpm header size 17"), "{err}");
}

#[test]
fn swtpm_tlvs_must_tile_the_blob_exactly() {
    // An empty TLV that ends the file exactly, after a full one.
    let ok = [tlv(2, 3, b"abc"), tlv(3, 0, b"")].concat();
    assert_eq!(check_blob(&blob(1, 1, 10, 0, &ok), false), Ok(0));
    // Fewer than 6 bytes left: a truncated TLV.
    for left in 1..6 {
        let b = blob(1, 1, 10, 0, &tlv(2, 0, b"")[..left]);
        let err = check_blob(&b, false).unwrap_err();
        assert!(err.contains("truncated TLV at offset 10"), "{left}: {err}");
    }
    // A length past the end, for the data tag and another.
    for tag in [1u16, 2] {
        let b = blob(1, 1, 10, 0, &tlv(tag, 4, b"abc"));
        let err = check_blob(&b, false).unwrap_err();
        assert!(
            err.contains("runs past the end of the file"),
            "{tag}: {err}"
        );
        let b = blob(1, 1, 10, 0, &tlv(tag, u32::MAX, b"abc"));
        assert!(check_blob(&b, false).is_err(), "{tag}: a huge length");
    }
}

#[test]
fn a_plain_tpm2_permall_is_judged_by_its_first_data_tlv() {
    let magic = [0xab, 0x36, 0x47, 0x23];
    let data = [&[0, 0][..], &magic, &[7; 8], &magic].concat();
    let good = tlv(1, data.len() as u32, &data);
    let junk = tlv(1, 12, &[0; 12]);
    // The first data TLV (tag 1) counts; a later one does not.
    let b = blob(1, 1, 10, 0, &[good.clone(), junk.clone()].concat());
    assert_eq!(check_blob(&b, true), Ok(0));
    let b = blob(1, 1, 10, 0, &[junk, good.clone()].concat());
    let err = check_blob(&b, true).unwrap_err();
    assert!(err.contains("lacks its magic numbers"), "{err}");
    // Another tag is not data, whatever it holds.
    let b = blob(1, 1, 10, 0, &tlv(2, data.len() as u32, &data));
    let err = check_blob(&b, true).unwrap_err();
    assert!(err.contains("plain state has no data TLV"), "{err}");
    // The data's bounds: 10 bytes is enough, fewer is not, and both
    // magic numbers are needed.
    let ten = [&[0, 0][..], &magic, &magic].concat();
    let b = blob(1, 1, 10, 0, &tlv(1, 10, &ten));
    assert_eq!(check_blob(&b, true), Ok(0));
    for short in [3usize, 5, 9] {
        let b = blob(1, 1, 10, 0, &tlv(1, short as u32, &ten[..short]));
        let err = check_blob(&b, true).unwrap_err();
        assert!(err.contains("lacks its magic numbers"), "{short}: {err}");
    }
    for bad in [
        [&[0, 0][..], &magic, &[7; 12]].concat(),
        [&[0; 6][..], &[7; 8], &magic].concat(),
    ] {
        let b = blob(1, 1, 10, 0, &tlv(1, bad.len() as u32, &bad));
        let err = check_blob(&b, true).unwrap_err();
        assert!(err.contains("lacks its magic numbers"), "{err}");
    }
    // The second TLV is read where the first ends.
    let b = blob(1, 1, 10, 0, &[good, vec![0, 2, 0]].concat());
    let err = check_blob(&b, true).unwrap_err();
    assert!(err.contains("truncated TLV at offset 34"), "{err}");
}

/// A swtpm linear file: the header ("swtpmlin", version 1, flags, header
/// size `hdrsize`), `entries` as (offset, data length, section length),
/// then `body` placed from the end of the header on.
fn linear(hdrsize: u16, entries: &[(u32, u32, u32)], body: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8; hdrsize as usize];
    v[..8].copy_from_slice(&0x7377_7470_6d6c_696e_u64.to_le_bytes());
    v[8] = 1;
    v[10..12].copy_from_slice(&hdrsize.to_le_bytes());
    for (i, (o, l, s)) in entries.iter().enumerate() {
        let e = 12 + i * 12;
        v[e..e + 4].copy_from_slice(&o.to_le_bytes());
        v[e + 4..e + 8].copy_from_slice(&l.to_le_bytes());
        v[e + 8..e + 12].copy_from_slice(&s.to_le_bytes());
    }
    v.extend_from_slice(body);
    v
}

#[test]
fn a_swtpm_linear_file_is_checked_at_each_bound() {
    use swtpm_keeper::swtpm::check_linear;
    let state = fixture("tpm2-00.permall.plain");
    let n = state.len() as u32;
    // Two entries' room; the state in the second, 4 bytes after the
    // header; the first freed but keeping its section (0x100 bytes).
    let ok = linear(
        36,
        &[(0, 0, 0x100), (40, n, n)],
        &[&[0; 4][..], &state].concat(),
    );
    assert_eq!(check_linear(&ok), Ok(()));
    // A freed entry that still names an offset is skipped too.
    let freed = linear(
        36,
        &[(40, 0, 0), (40, n, n)],
        &[&[0; 4][..], &state].concat(),
    );
    assert_eq!(check_linear(&freed), Ok(()));
    // An entry pointing into the header.
    let inside = linear(36, &[(12, n, n)], &state);
    let err = check_linear(&inside).unwrap_err();
    assert!(
        err.contains("linear entry 0 points outside the file"),
        "{err}"
    );
    // A bare 12-byte header: a linear file, formatted, never written.
    let bare = linear(12, &[], &[]);
    assert_eq!(bare.len(), 12);
    let err = check_linear(&bare).unwrap_err();
    assert!(err.contains("holds no TPM state"), "{err}");
    for short in 1..12 {
        let err = check_linear(&bare[..short]).unwrap_err();
        assert!(err.contains("no 'swtpmlin' magic"), "{short}: {err}");
    }
    // Header sizes below 12 and past the file.
    let mut small = linear(12, &[], &state);
    small[10] = 11;
    let err = check_linear(&small).unwrap_err();
    assert!(err.contains("bad linear header size 11"), "{err}");
    let past = linear(12, &[], &[0; 4]);
    let mut past = past;
    past[10] = 17;
    let err = check_linear(&past).unwrap_err();
    assert!(err.contains("bad linear header size 17"), "{err}");
}

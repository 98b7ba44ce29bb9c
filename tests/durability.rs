//! Durability, proven on a trace. A killed process keeps the page cache,
//! so no crash test can see a missing fsync; this one looks at the system
//! calls themselves. It runs the real binary under `strace -f -y` for each
//! writer (a capture, a capture that prunes, a restore at `prepare` of the
//! TPM state and the NVRAM, `restore --force`, a failed capture
//! remembered, `export -o`, `import`, and the others in `WRITERS`) and
//! checks the persistence protocol on the trace, as ALICE (Pillai et al.,
//! OSDI 2014) does for real applications. The rules:
//!
//! - `file-synced-before-publish`: a file written in the run is fsynced
//!   after its last write and before the rename that publishes it (its own
//!   rename, or that of the directory it was written in);
//! - `dir-synced-before-publish`: a directory that got new entries is
//!   fsynced after the last of them and before it is renamed into place;
//! - `parent-synced-after-new-entry`: each new entry (mkdir, create,
//!   rename target) that is still there at the end is followed by an fsync
//!   of its parent directory before the run ends;
//! - `new-entry-synced-before-old-one-removed`: before an entry that the
//!   run did not make (an older generation, a state swapped out) is
//!   removed or renamed away, the directory is fsynced after every new
//!   entry made in it so far: a prune never loses the old generation
//!   before the new one is durable;
//! - `rename-synced-before-contents-removed`: a directory renamed aside
//!   (to the trash) has that rename synced before its files are removed:
//!   a crash mid-removal never leaves a half-emptied directory under the
//!   old name;
//! - `parent-synced-after-removal`: a removal is synced before the run
//!   ends (what the run reports as pruned stays pruned).
//!
//! Root only (ptrace, and like the other root tests ignored by a plain
//! `cargo test`). With `--features failpoints`, a second test skips each
//! fsync of a run in turn and shows the checker names the gap.

mod common;

use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const TRACED: &str =
    "openat,mkdir,mkdirat,rename,renameat,renameat2,fsync,fdatasync,write,close,unlinkat";

/// One system call of the trace, reduced to what the rules need. Paths
/// are absolute, as they were at the time of the call.
#[derive(Debug, Clone, PartialEq)]
enum Op {
    /// A file opened with O_CREAT (it may be new).
    Create(PathBuf),
    Mkdir(PathBuf),
    /// A mkdir that found the directory there (EEXIST).
    MkdirFound(PathBuf),
    Write(PathBuf),
    Fsync(PathBuf),
    /// rename(from, to); `exchange` for RENAME_EXCHANGE.
    Rename {
        from: PathBuf,
        to: PathBuf,
        exchange: bool,
    },
    Unlink(PathBuf),
}

/// A broken rule: its name, and what the trace shows.
#[derive(Debug)]
struct Violation {
    rule: &'static str,
    detail: String,
}

// ---- reading strace's output -------------------------------------------

/// Split a call's argument list at its top-level commas (strings, `<...>`
/// fd annotations and brackets kept whole).
fn split_args(s: &str) -> Vec<String> {
    let (mut out, mut cur) = (Vec::new(), String::new());
    let (mut depth, mut in_str, mut esc) = (0i32, false, false);
    for c in s.chars() {
        if in_str {
            cur.push(c);
            match (esc, c) {
                (true, _) => esc = false,
                (false, '\\') => esc = true,
                (false, '"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_str = true,
            '<' | '[' | '{' | '(' => depth += 1,
            '>' | ']' | '}' | ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(cur.trim().to_owned());
                cur.clear();
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    if !cur.trim().is_empty() {
        out.push(cur.trim().to_owned());
    }
    out
}

/// `3</a/b>` or `AT_FDCWD</a>`: the path strace's -y shows.
fn fd_path(arg: &str) -> Option<PathBuf> {
    let start = arg.find('<')? + 1;
    let end = arg.rfind('>')?;
    Some(PathBuf::from(&arg[start..end]))
}

/// A quoted path argument (our paths hold no escapes).
fn string_arg(arg: &str) -> PathBuf {
    PathBuf::from(arg.trim_matches('"'))
}

/// `name` relative to the directory fd argument `dirfd`.
fn at(dirfd: &str, name: &str) -> PathBuf {
    let name = string_arg(name);
    if name.is_absolute() {
        name
    } else {
        fd_path(dirfd).expect("strace -y names every fd").join(name)
    }
}

/// One line of `strace -f -y` output, if it is a call that succeeded.
fn parse_line(line: &str) -> Option<Op> {
    let line = line.split_once(' ').map(|(_, rest)| rest.trim_start())?;
    let open = line.find('(')?;
    let name = &line[..open];
    let close = line.rfind(") = ")?;
    let result = &line[close + 4..];
    let args = split_args(&line[open + 1..close]);
    let a = |i: usize| args.get(i).map(String::as_str).unwrap_or("");
    if result.starts_with("-1 EEXIST") {
        return match name {
            "mkdir" => Some(Op::MkdirFound(string_arg(a(0)))),
            "mkdirat" => Some(Op::MkdirFound(at(a(0), a(1)))),
            _ => None,
        };
    }
    if result.starts_with('-') || result.starts_with('?') {
        return None; // failed, or never returned
    }
    Some(match name {
        "openat" if a(2).contains("O_CREAT") => Op::Create(at(a(0), a(1))),
        "mkdir" => Op::Mkdir(string_arg(a(0))),
        "mkdirat" => Op::Mkdir(at(a(0), a(1))),
        "write" => Op::Write(fd_path(a(0))?),
        "fsync" | "fdatasync" => Op::Fsync(fd_path(a(0))?),
        "rename" => Op::Rename {
            from: string_arg(a(0)),
            to: string_arg(a(1)),
            exchange: false,
        },
        "renameat" | "renameat2" => Op::Rename {
            from: at(a(0), a(1)),
            to: at(a(2), a(3)),
            exchange: a(4).contains("RENAME_EXCHANGE"),
        },
        "unlinkat" => Op::Unlink(at(a(0), a(1))),
        _ => return None,
    })
}

/// The operations under `root` (the test's host), in order. Calls that
/// strace split (`<unfinished ...>` / `resumed>`) are joined first.
fn parse_trace(text: &str, root: &Path) -> Vec<Op> {
    let mut pending: BTreeMap<String, String> = BTreeMap::new();
    let mut ops = Vec::new();
    for line in text.lines() {
        let pid = line.split(' ').next().unwrap_or("").to_owned();
        let full = if let Some(head) = line.strip_suffix(" <unfinished ...>") {
            pending.insert(pid, head.to_owned());
            continue;
        } else if let Some(i) = line.find(" resumed>") {
            format!(
                "{}{}",
                pending.remove(&pid).unwrap_or_default(),
                &line[i + 9..]
            )
        } else {
            line.to_owned()
        };
        if let Some(op) = parse_line(&full) {
            let paths: Vec<&PathBuf> = match &op {
                Op::Rename { from, to, .. } => vec![from, to],
                Op::Create(p)
                | Op::Mkdir(p)
                | Op::MkdirFound(p)
                | Op::Write(p)
                | Op::Fsync(p)
                | Op::Unlink(p) => {
                    vec![p]
                }
            };
            if paths.iter().any(|p| p.starts_with(root)) {
                ops.push(op);
            }
        }
    }
    ops
}

// ---- the rules ---------------------------------------------------------

/// A lock file's content and persistence do not matter.
fn is_lock_file(p: &Path) -> bool {
    p.file_name().is_some_and(|n| n == ".lock")
}

/// Is there an fsync of `path` in `ops[from..to]`?
fn fsynced(ops: &[Op], path: &Path, from: usize, to: usize) -> bool {
    ops[from..to]
        .iter()
        .any(|o| matches!(o, Op::Fsync(p) if p == path))
}

/// Rules 1 and 2, at each rename: what it publishes was synced first.
fn check_publish(ops: &[Op], out: &mut Vec<Violation>) {
    for (i, op) in ops.iter().enumerate() {
        let Op::Rename { from, .. } = op else {
            continue;
        };
        // Files written (rule 1) and directories given entries (rule 2)
        // at `from` or under it, each with the index of its last change.
        let mut last_change: BTreeMap<&Path, (usize, bool)> = BTreeMap::new();
        for (j, o) in ops[..i].iter().enumerate() {
            if let Op::Write(p) | Op::Create(p) = o {
                if p.starts_with(from) && !is_lock_file(p) {
                    last_change.insert(p, (j, false));
                }
            }
            if let Op::Create(p) | Op::Mkdir(p) | Op::Rename { to: p, .. } = o {
                if let Some(parent) = p.parent().filter(|d| d.starts_with(from)) {
                    last_change.insert(parent, (j, true));
                }
            }
        }
        for (p, (j, is_dir)) in last_change {
            if !fsynced(ops, p, j + 1, i) {
                out.push(Violation {
                    rule: if is_dir {
                        "dir-synced-before-publish"
                    } else {
                        "file-synced-before-publish"
                    },
                    detail: format!(
                        "{} changed (op {j}) and not fsynced before {op:?} (op {i})",
                        p.display()
                    ),
                });
            }
        }
    }
}

/// Rule 3: every new entry still there at the end has its parent synced
/// after it.
fn check_parents(ops: &[Op], out: &mut Vec<Violation>) {
    for (i, op) in ops.iter().enumerate() {
        let new = match op {
            Op::Create(p) | Op::Mkdir(p) => p,
            Op::Rename { to, .. } => to,
            _ => continue,
        };
        if is_lock_file(new) {
            continue;
        }
        // Gone again later (a temporary renamed away or removed), unless
        // an exchange put something back under the name.
        let gone = ops[i + 1..].iter().any(|o| match o {
            Op::Unlink(p) => p == new,
            Op::Rename {
                from,
                exchange: false,
                ..
            } => from == new,
            _ => false,
        });
        let parent = new.parent().expect("absolute");
        if !gone && !fsynced(ops, parent, i + 1, ops.len()) {
            out.push(Violation {
                rule: "parent-synced-after-new-entry",
                detail: format!(
                    "{} is new (op {i}) and {} is not fsynced after it",
                    new.display(),
                    parent.display()
                ),
            });
        }
    }
}

/// Rule 4: an old entry goes only once the new entries beside it persist.
fn check_removals(ops: &[Op], out: &mut Vec<Violation>) {
    let new_in = |o: &Op| -> Option<PathBuf> {
        match o {
            Op::Create(p) | Op::Mkdir(p) | Op::Rename { to: p, .. } if !is_lock_file(p) => {
                Some(p.clone())
            }
            _ => None,
        }
    };
    for (i, op) in ops.iter().enumerate() {
        let gone = match op {
            Op::Unlink(p) => p,
            Op::Rename { from, .. } => from,
            _ => continue,
        };
        // Made by this run (a temporary), unless an exchange since put an
        // older entry under its name.
        let made = ops[..i]
            .iter()
            .rposition(|o| new_in(o).as_ref() == Some(gone));
        let swapped = ops[..i]
            .iter()
            .rposition(|o| matches!(o, Op::Rename { from, exchange: true, .. } if from == gone));
        if made.is_some() && swapped.is_none_or(|x| Some(x) < made) {
            continue;
        }
        let dir = gone.parent().expect("absolute");
        for (j, o) in ops[..i].iter().enumerate() {
            let Some(new) = new_in(o) else { continue };
            if new.parent() == Some(dir) && !fsynced(ops, dir, j + 1, i) {
                out.push(Violation {
                    rule: "new-entry-synced-before-old-one-removed",
                    detail: format!(
                        "{} is removed (op {i}) before {} (new, op {j}) was synced",
                        gone.display(),
                        new.display()
                    ),
                });
            }
        }
    }
}

/// Rule 5: a directory renamed aside is renamed for good before its
/// contents go.
fn check_emptying(ops: &[Op], out: &mut Vec<Violation>) {
    for (i, op) in ops.iter().enumerate() {
        let Op::Unlink(p) = op else { continue };
        let Some(dir) = p.parent() else { continue };
        let renamed = ops[..i]
            .iter()
            .rposition(|o| matches!(o, Op::Rename { to, .. } if to == dir));
        let Some(j) = renamed else { continue };
        let parent = dir.parent().expect("absolute");
        if !fsynced(ops, parent, j + 1, i) {
            out.push(Violation {
                rule: "rename-synced-before-contents-removed",
                detail: format!(
                    "{} is removed (op {i}) before the rename to {} (op {j}) was synced in {}",
                    p.display(),
                    dir.display(),
                    parent.display()
                ),
            });
        }
    }
}

/// Rule 6: each removal is synced in its directory before the run ends,
/// unless that directory goes too.
fn check_removal_synced(ops: &[Op], out: &mut Vec<Violation>) {
    for (i, op) in ops.iter().enumerate() {
        let Op::Unlink(p) = op else { continue };
        let dir = p.parent().expect("absolute");
        let dir_goes = ops[i + 1..]
            .iter()
            .any(|o| matches!(o, Op::Unlink(q) if q == dir));
        if !dir_goes && !fsynced(ops, dir, i + 1, ops.len()) {
            out.push(Violation {
                rule: "parent-synced-after-removal",
                detail: format!(
                    "{} is removed (op {i}) and {} is not fsynced after it",
                    p.display(),
                    dir.display()
                ),
            });
        }
    }
}

/// One line per violation: the rule, then what the trace shows.
fn report(broken: &[Violation]) -> String {
    broken
        .iter()
        .map(|v| format!("{}: {}\n", v.rule, v.detail))
        .collect()
}

fn check(ops: &[Op]) -> Vec<Violation> {
    let mut out = Vec::new();
    check_publish(ops, &mut out);
    check_parents(ops, &mut out);
    check_removals(ops, &mut out);
    check_emptying(ops, &mut out);
    check_removal_synced(ops, &mut out);
    out
}

// ---- running the writers -----------------------------------------------

/// Run the program with `args` under strace; its output and the trace.
fn traced(h: &Host, args: &[&str], stdin: &[u8], env: &[(&str, String)]) -> (Output, Vec<Op>) {
    let trace = h.root.join("trace");
    let _ = std::fs::remove_file(&trace);
    let mut cmd = Command::new("strace");
    cmd.args(["-f", "-y", "-qq", "-e", &format!("trace={TRACED}"), "-o"])
        .arg(&trace)
        .arg(bin())
        .args(args)
        .env("SWTPM_KEEPER_CONFIG", &h.conf);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = run_with(&mut cmd, stdin);
    let text = std::fs::read_to_string(&trace).expect("strace wrote no trace");
    (out, parse_trace(&text, &h.root))
}

fn require_root() {
    // SAFETY: no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root: run it through tests/run-all"
    );
}

/// A writer: its name, and how to set a host up and run it traced.
struct Writer {
    name: &'static str,
    /// Prepares the host; returns the arguments and stdin of the run.
    setup: fn(&Host) -> (Vec<String>, Vec<u8>),
    /// What must be true after the run (it did its work).
    done: fn(&Host),
}

fn transient_xml() -> Vec<u8> {
    fixture("tpm2-transient.stopped.xml")
}

fn hook_args(name: &str, op: &str, sub: &str) -> Vec<String> {
    ["hook", name, op, sub, "-"].map(String::from).to_vec()
}

/// The EFI VM stopped once (state and NVRAM stored), then both lost.
fn efi_lost(h: &Host) {
    h.put_state(
        UUID_EFI,
        &[("tpm2-00.permall", &fixture("tpm2-00.permall.encrypted"))],
    );
    std::fs::write(h.nvram_path(), vec![7u8; 128 * 1024]).unwrap();
    assert_ok(&h.hook("efitest", "stopped", "end", "-", &h.efi_xml()));
    std::fs::remove_dir_all(h.swtpm.join(UUID_EFI)).unwrap();
    std::fs::remove_file(h.nvram_path()).unwrap();
}

/// The EFI VM captured, and its generation exported to `<root>/out/a.tar`.
fn efi_exported(h: &Host) -> PathBuf {
    efi_lost(h);
    let file = h.root.join("out/a.tar");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    assert_ok(&h.run(&["export", "efitest", "-o", file.to_str().unwrap()], b""));
    file
}

const WRITERS: [Writer; 10] = [
    Writer {
        name: "a capture (the first: store and VM directory made)",
        setup: |h| {
            h.put_state(
                UUID_TRANS,
                &[("tpm2-00.permall", &fixture("tpm2-00.permall.plain"))],
            );
            (hook_args("tpmtrans", "stopped", "end"), transient_xml())
        },
        done: |h| assert_eq!(h.generations(UUID_TRANS).len(), 1),
    },
    Writer {
        name: "a capture that prunes (generations = 3, a fourth state)",
        setup: |h| {
            for i in 0..4u8 {
                let mut p = fixture("tpm2-00.permall.plain");
                p[100] ^= i + 1;
                h.put_state(UUID_TRANS, &[("tpm2-00.permall", &p)]);
                if i < 3 {
                    assert_ok(&h.stop_transient());
                }
            }
            (hook_args("tpmtrans", "stopped", "end"), transient_xml())
        },
        done: |h| {
            let g = h.generations(UUID_TRANS);
            assert_eq!(g.len(), 3, "{g:?}");
            assert!(g[0].starts_with("00000002-"), "nothing was pruned: {g:?}");
        },
    },
    Writer {
        name: "a restore at prepare (TPM state and NVRAM)",
        setup: |h| {
            efi_lost(h);
            (hook_args("efitest", "prepare", "begin"), h.efi_xml())
        },
        done: |h| {
            assert!(h.state_dir(UUID_EFI).join("tpm2-00.permall").exists());
            assert!(h.nvram_path().exists());
        },
    },
    Writer {
        name: "restore --force (the current state captured, then swapped)",
        setup: |h| {
            efi_lost(h);
            std::fs::write(h.etc_qemu.join("efitest.xml"), h.efi_xml()).unwrap();
            let g = h.generations(UUID_EFI)[0].clone();
            // Another state now: --force keeps it as a generation first.
            let mut other = fixture("tpm2-00.permall.encrypted");
            other[200] ^= 1;
            h.put_state(UUID_EFI, &[("tpm2-00.permall", &other)]);
            std::fs::write(h.nvram_path(), vec![9u8; 128 * 1024]).unwrap();
            let args = ["restore", "efitest", "--generation", &g, "--force"];
            (args.map(String::from).to_vec(), Vec::new())
        },
        done: |h| {
            assert_eq!(h.generations(UUID_EFI).len(), 2, "--force captured nothing");
            assert_eq!(
                std::fs::read(h.nvram_path()).unwrap(),
                vec![7u8; 128 * 1024]
            );
        },
    },
    Writer {
        name: "a live capture of a running VM (capture --all, and what it saw in run_dir)",
        setup: |h| {
            h.put_state(
                UUID_TRANS,
                &[("tpm2-00.permall", &fixture("tpm2-00.permall.plain"))],
            );
            // The Host's libvirt_run_dir. Its run_dir is under a parent of
            // its own (Host::run_dir), as /run/swtpm-keeper is: the store's
            // syncs of the host root cover nothing of it.
            let run = h.root.join("run-libvirt");
            std::fs::create_dir_all(&run).unwrap();
            let me = std::process::id();
            let status = format!(
                "<domstatus state='running' reason='booted' pid='{me}'>\n{}\n</domstatus>\n",
                String::from_utf8(transient_xml()).unwrap()
            );
            std::fs::write(run.join("tpmtrans.xml"), status).unwrap();
            std::fs::write(run.join("tpmtrans.pid"), me.to_string()).unwrap();
            (["capture", "--all"].map(String::from).to_vec(), Vec::new())
        },
        done: |h| assert_eq!(h.generations(UUID_TRANS).len(), 1),
    },
    Writer {
        name: "a corrupt state mended at prepare (evidence kept, the good state put back)",
        setup: |h| {
            efi_lost(h);
            h.put_state(UUID_EFI, &[("tpm2-00.permall", b"")]);
            (hook_args("efitest", "prepare", "begin"), h.efi_xml())
        },
        done: |h| {
            let p = h.state_dir(UUID_EFI).join("tpm2-00.permall");
            assert!(std::fs::metadata(p).unwrap().len() > 0, "not mended");
            let evidence = h.store_entries(UUID_EFI, "corrupt-").len();
            assert_eq!(evidence, 1, "no evidence kept");
        },
    },
    Writer {
        name: "a failed capture remembered (in run_dir, and beside the generations)",
        setup: |h| {
            h.put_state(
                UUID_TRANS,
                &[("tpm2-00.permall", &fixture("tpm2-00.permall.plain"))],
            );
            assert_ok(&h.stop_transient());
            h.put_state(UUID_TRANS, &[("tpm2-00.permall", b"not a swtpm blob")]);
            (hook_args("tpmtrans", "stopped", "end"), transient_xml())
        },
        done: |h| {
            assert_eq!(h.generations(UUID_TRANS).len(), 1, "nothing new stored");
            let run = h.run_dir().join(format!("failures/{UUID_TRANS}.json"));
            assert!(run.is_file(), "not remembered in run_dir");
            let marker = h.vm_store(UUID_TRANS).join("capture-failed.json");
            assert!(marker.is_file(), "not remembered in the store");
        },
    },
    Writer {
        name: "export -o FILE (a temporary beside it, renamed over it)",
        setup: |h| {
            let file = efi_exported(h);
            let args = ["export", "efitest", "-o", file.to_str().unwrap()];
            (args.map(String::from).to_vec(), Vec::new())
        },
        done: |h| assert!(h.root.join("out/a.tar").metadata().unwrap().len() > 0),
    },
    Writer {
        name: "an import into an empty store (store and VM directory made)",
        setup: |h| {
            let file = efi_exported(h);
            std::fs::remove_dir_all(&h.store).unwrap();
            let args = ["import", file.to_str().unwrap()];
            (args.map(String::from).to_vec(), Vec::new())
        },
        done: |h| assert_eq!(h.generations(UUID_EFI).len(), 1),
    },
    Writer {
        name: "metrics -o FILE (replacing the file node_exporter reads)",
        setup: |h| {
            let dir = h.root.join("textfile");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("swtpm-keeper.prom"), "old\n").unwrap();
            let out = dir.join("swtpm-keeper.prom").display().to_string();
            (
                ["metrics", "-o", &out].map(String::from).to_vec(),
                Vec::new(),
            )
        },
        done: |h| {
            let text = std::fs::read_to_string(h.root.join("textfile/swtpm-keeper.prom")).unwrap();
            assert!(text.contains("\nswtpm_keeper_vms "), "{text}");
        },
    },
];

/// Set a host up for `w` and run it traced, with `env` added.
fn run_writer(tag: &str, w: &Writer, env: &[(&str, String)]) -> (Host, Output, Vec<Op>) {
    let h = Host::new(&format!("durability-{tag}"));
    let (args, stdin) = (w.setup)(&h);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (out, ops) = traced(&h, &args, &stdin, env);
    (h, out, ops)
}

#[test]
#[ignore = "needs root (strace)"]
fn every_writer_fsyncs_each_file_and_directory_before_publishing_it_and_each_parent_after() {
    require_root();
    for (i, w) in WRITERS.iter().enumerate() {
        let (h, out, ops) = run_writer(&i.to_string(), w, &[]);
        assert_ok(&out);
        (w.done)(&h);
        let fsyncs = ops.iter().filter(|o| matches!(o, Op::Fsync(_))).count();
        let renames = ops
            .iter()
            .filter(|o| matches!(o, Op::Rename { .. }))
            .count();
        assert!(
            fsyncs > 0 && renames > 0,
            "{}: an empty trace: {ops:#?}",
            w.name
        );
        let broken = check(&ops);
        assert!(
            broken.is_empty(),
            "{}:\n{}{ops:#?}",
            w.name,
            report(&broken)
        );
        eprintln!(
            "durability: {}: {fsyncs} fsyncs, {renames} renames, every rule kept",
            w.name
        );
    }
}

/// The fsync right after a mkdir that found its directory there: it
/// persists a directory that an earlier run may have made and died before
/// syncing. No rule about this one run can ask for it.
#[cfg(feature = "failpoints")]
fn for_an_earlier_run(ops: &[Op], k: usize) -> bool {
    match (k.checked_sub(1).map(|j| &ops[j]), &ops[k]) {
        (Some(Op::MkdirFound(d)), Op::Fsync(p)) => d.parent() == Some(p.as_path()),
        _ => false,
    }
}

#[cfg(feature = "failpoints")]
#[test]
#[ignore = "needs root (strace)"]
fn the_checker_names_the_rule_when_any_one_fsync_of_a_writer_is_left_out() {
    require_root();
    for (i, w) in WRITERS.iter().enumerate() {
        let (_, out, ops) = run_writer(&format!("{i}-fp"), w, &[]);
        assert_ok(&out);
        let fsyncs: Vec<usize> = (0..ops.len())
            .filter(|&k| matches!(ops[k], Op::Fsync(_)))
            .collect();
        let (mut rules, mut earlier) = (BTreeSet::new(), 0);
        for (n, &k) in fsyncs.iter().enumerate() {
            let n = n + 1;
            let env = [("SWTPM_KEEPER_FAILPOINT_SKIP_FSYNC", n.to_string())];
            let (_, out, skipped) = run_writer(&format!("{i}-fp{n}"), w, &env);
            assert_ok(&out);
            let left = skipped.iter().filter(|o| matches!(o, Op::Fsync(_))).count();
            assert_eq!(
                left,
                fsyncs.len() - 1,
                "{}: fsync {n} was not skipped",
                w.name
            );
            let broken = check(&skipped);
            if for_an_earlier_run(&ops, k) {
                earlier += 1;
                assert!(broken.is_empty(), "{}: {}", w.name, report(&broken));
                continue;
            }
            assert!(
                !broken.is_empty(),
                "{}: without fsync {n} ({:?}) the checker still passes the trace",
                w.name,
                ops[k]
            );
            rules.extend(broken.iter().map(|v| v.rule));
        }
        eprintln!(
            "durability: {}: {} of its {} fsyncs, each left out alone, are caught ({rules:?}); {earlier} persist an earlier run's mkdir",
            w.name,
            fsyncs.len() - earlier,
            fsyncs.len()
        );
    }
}

#[test]
fn the_checker_reads_strace_lines_and_applies_each_rule() {
    let root = Path::new("/r");
    let trace = r#"10 mkdir("/r/s/.tmp-1", 0700) = 0
10 openat(AT_FDCWD</w>, "/r/s/.tmp-1/f", O_WRONLY|O_CREAT|O_EXCL, 0600) = 4</r/s/.tmp-1/f>
10 write(4</r/s/.tmp-1/f>, "a, b) = 3"..., 9) = 9
10 fsync(4</r/s/.tmp-1/f>) = 0
10 fsync(4</r/s/.tmp-1>) = 0
10 renameat2(3</r/s>, ".tmp-1", 3</r/s>, "1", RENAME_NOREPLACE <unfinished ...>
10 <... renameat2 resumed>) = 0
10 fsync(3</r/s>) = 0
10 openat(AT_FDCWD</w>, "/r/s/gone", O_RDONLY) = -1 ENOENT (No such file or directory)
"#;
    let ops = parse_trace(trace, root);
    assert_eq!(ops.len(), 7, "{ops:#?}");
    assert!(check(&ops).is_empty(), "{}", report(&check(&ops)));
    let without = |k: usize| -> BTreeSet<&'static str> {
        let mut o = ops.clone();
        o.remove(k);
        check(&o).iter().map(|v| v.rule).collect()
    };
    let set = |r: &[&'static str]| r.iter().copied().collect::<BTreeSet<_>>();
    assert_eq!(without(3), set(&["file-synced-before-publish"]));
    // The directory's own fsync also persists the entry made in it.
    assert_eq!(
        without(4),
        set(&["dir-synced-before-publish", "parent-synced-after-new-entry"])
    );
    assert_eq!(without(6), set(&["parent-synced-after-new-entry"]));
}

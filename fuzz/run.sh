#!/usr/bin/env bash
# Fuzz the domain XML reader, the state-format checks and the archive
# reader of `import` with cargo fuzz, seeded with the test fixtures (and an
# exported archive). `fuzz/run.sh [SECONDS]` (default 60 per
# target); prints executions and time per target. Needs cargo-fuzz
# (`cargo install cargo-fuzz`); on a stable toolchain RUSTC_BOOTSTRAP=1 lets
# it pass the sanitizer flags.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
export RUSTC_BOOTSTRAP=1
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
mkdir -p corpus/domain_xml corpus/state_formats corpus/archive artifacts
cp ../tests/fixtures/libvirt-9.0/*.xml ../tests/fixtures/hostile-xml/*.xml corpus/domain_xml/
cp ../tests/fixtures/libvirt-9.0/tpm2-00.permall.* corpus/state_formats/
cp ../tests/fixtures/archive/*.tar corpus/archive/
status=0
for t in domain_xml state_formats archive; do
    log="artifacts/$t.log"
    # fuzz/Cargo.lock (committed) pins what the fuzzers build with, as the
    # top-level lock does for the program. A fixed seed makes a failure
    # replayable with the same command.
    if cargo fuzz run "$t" "corpus/$t" -- -seed=1 -max_total_time="$secs" -rss_limit_mb=2048 >"$log" 2>&1; then
        res=ok
    else
        res=FAILED
        status=1
    fi
    done_line=$(grep -o 'Done [0-9]* runs in [0-9]* second' "$log" | tail -n 1 || true)
    echo "fuzz $t: $res, ${done_line:-no summary} (log: fuzz/$log)"
    # The log stays in the CI's clone: show the crash and its input here.
    [ "$res" = ok ] || tail -n 40 "$log" | sed 's/^/    /'
done
exit $status

#!/usr/bin/env bash
# The store on a shared filesystem, two hosts at once (issue 13). No
# libvirt: the hook is driven as libvirt would drive it, with fixture XML
# and fixture swtpm state, by the real binary.
#
# Two "hosts" are two UTS namespaces (own host names) with their own
# swtpm_dir, each seeing the store through its own mount of one shared
# volume. By default that is the GlusterFS volume of tests/e2e/gluster.sh
# (set up here and torn down afterwards); on a real cluster, mount the
# shared filesystem on one machine twice, each mount a client of its own
# (NFS: -o nosharecache; CephFS: -o noshare; GlusterFS: always), and set
#   SK_SHARED_VIEW1=/mnt/a SK_SHARED_VIEW2=/mnt/b tests/e2e/shared-store.sh
# It works in a fresh directory on the views and removes it afterwards.
#
# What it proves:
#   1. flock on <store>/<uuid>/.lock taken through one view excludes the
#      other view (plain flock(1), then the binary's own lock: a stop on
#      host B gives up after lock_timeout and writes nothing).
#   2. Both hosts capture one VM RUNS times each, at the same time: every
#      run exits 0, silent on stdout, logs its capture and no warning; the
#      store holds 2*RUNS generations, numbered 1..2*RUNS without a gap or
#      a duplicate, each passing `sha256sum -c`, each with a different
#      state (nothing was overwritten), RUNS recorded by each host; no
#      temporaries are left; `verify` through the other view agrees.
#   3. Host A keeps a temporary named after host B while it is recent,
#      and removes it once its mtime (set through view 2) is 2 hours old.
#
# Settings: SWTPM_KEEPER_BIN (default: the newer of target/release and
# target/debug),
# SK_SHARED_RUNS (16).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
fixtures=$repo/tests/fixtures/libvirt-9.0
UUID=11111111-2222-3333-4444-555555555555
VM=tpmtrans
RUNS=${SK_SHARED_RUNS:-16}
HOSTS=(sk-shared-host-a sk-shared-host-b)

if [ -z "${SWTPM_KEEPER_BIN:-}" ]; then
    # The newer of the release and debug builds: never a stale one.
    for b in "$repo/target/release/swtpm-keeper" "$repo/target/debug/swtpm-keeper"; do
        [ -x "$b" ] || continue
        [ -n "${SWTPM_KEEPER_BIN:-}" ] && [ ! "$b" -nt "$SWTPM_KEEPER_BIN" ] && continue
        SWTPM_KEEPER_BIN=$b
    done
fi
[ -x "${SWTPM_KEEPER_BIN:-}" ] || { echo "shared-store.sh: build swtpm-keeper first (cargo build --release)" >&2; exit 1; }
BIN=$SWTPM_KEEPER_BIN

fail() {
    echo "shared-store.sh: FAIL: $*" >&2
    exit 1
}

# One host's runs: re-executed inside its own UTS namespace.
#   worker <tmp> <index>
worker() {
    local t=$1 n=$2 i h d
    h=$(hostname)
    d=$t/h$n
    for ((i = 1; i <= RUNS; i++)); do
        # A state of its own for every run, so that every run adds a
        # generation: bytes inside the permall's data (past its magic).
        cp "$fixtures/tpm2-00.permall.plain" "$d/swtpm/$UUID/tpm2/tpm2-00.permall"
        printf '%-24s' "$h/$i" | dd of="$d/swtpm/$UUID/tpm2/tpm2-00.permall" \
            bs=1 seek=64 conv=notrunc status=none
        sha256sum <"$d/swtpm/$UUID/tpm2/tpm2-00.permall" | cut -d' ' -f1 >>"$t/states"
        set +e
        local t0=$EPOCHREALTIME
        SWTPM_KEEPER_CONFIG=$d/conf "$BIN" hook "$VM" stopped end - \
            <"$fixtures/tpm2-transient.stopped.xml" >"$d/out.$i" 2>"$d/err.$i"
        echo $? >"$d/rc.$i"
        echo "$t0 $EPOCHREALTIME" >"$d/time.$i"
        set -e
    done
}

if [ "${1:-}" = worker ]; then
    worker "$2" "$3"
    exit 0
fi

[ "$(id -u)" = 0 ] || fail "must run as root (UTS namespaces; gluster mounts)"
unshare -u true 2>/dev/null || fail "cannot create a UTS namespace (unshare -u)"

own_gluster=
T=
SUB=swtpm-keeper-shared-store-$$
cleanup() {
    local rc=$?
    cd /
    [ -n "$T" ] && rm -rf "${SK_SHARED_VIEW1:?}/$SUB" "$T"
    [ -n "$own_gluster" ] && { "$here/gluster.sh" down || rc=1; }
    exit $rc
}
trap cleanup EXIT
if [ -z "${SK_SHARED_VIEW1:-}" ] || [ -z "${SK_SHARED_VIEW2:-}" ]; then
    own_gluster=1
    "$here/gluster.sh" up || fail "cannot set up GlusterFS (tests/e2e/gluster.sh up, above)"
    mapfile -t views < <("$here/gluster.sh" views)
    SK_SHARED_VIEW1=${views[0]}
    SK_SHARED_VIEW2=${views[1]}
fi

# One superblock behind both (a bind mount, or NFS/CephFS sharing one
# client between two mounts of an export) would make flock local to this
# kernel: the test would prove nothing about the filesystem's locks.
[ "$(stat -c %d "$SK_SHARED_VIEW1")" != "$(stat -c %d "$SK_SHARED_VIEW2")" ] \
    || fail "$SK_SHARED_VIEW1 and $SK_SHARED_VIEW2 are one mount (same device): mount the second as a client of its own (NFS: -o nosharecache; CephFS: -o noshare)"
T=$(mktemp -d /tmp/sk-shared-XXXXXX)
V1=$SK_SHARED_VIEW1/$SUB
V2=$SK_SHARED_VIEW2/$SUB
mkdir -p "$V1"
[ -d "$V2" ] || fail "$SK_SHARED_VIEW2 does not show $SUB made through $SK_SHARED_VIEW1: not one filesystem"

# A host: its own swtpm_dir and libvirt dirs, the store through its view.
# syslog_socket names no socket: the log lines fall back to stderr, which
# is kept per run.
for n in 0 1; do
    d=$T/h$n
    mkdir -p "$d/swtpm/$UUID/tpm2" "$d/etc-qemu"
    printf 'user = "+0"\ngroup = "+0"\nswtpm_user = "+0"\nswtpm_group = "+0"\n' >"$d/qemu.conf"
    view=$V1
    [ "$n" = 1 ] && view=$V2
    cat >"$d/conf" <<EOF
store_dir = "$view"
swtpm_dir = "$d/swtpm"
libvirt_config_dir = "$d/etc-qemu"
syslog_socket = "$d/no-syslog-here.sock"
qemu_conf = "$d/qemu.conf"
lock_timeout = 60.0
generations = $((2 * RUNS + 8))
EOF
done

# --- 1. flock across the two views ------------------------------------
mkdir -p "$V1/$UUID"
lock1=$V1/$UUID/.lock
lock2=$V2/$UUID/.lock
touch "$lock1"
flock -n "$lock1" true || fail "flock on a fresh lock file failed"
flock -x "$lock1" sh -c 'flock -n "$0" true' "$lock2" \
    && fail "flock -n through view 2 succeeded while view 1 held the lock: flock does not work across mounts"
flock -s "$lock1" sh -c 'flock -s -n "$0" true' "$lock2" \
    || fail "a shared flock through view 2 was refused while view 1 held a shared one"
flock -n "$lock2" true || fail "flock through view 2 refused after view 1 released it"

# The binary's own lock: view 1 holds it, host B's stop gives up (a stop
# never fails: exit 0) and writes nothing.
exec 9>>"$lock1"
flock -x -w 30 9 || fail "cannot take the lock through view 1"
sed -i 's/^lock_timeout = .*/lock_timeout = 1.0/' "$T/h1/conf"
cp "$fixtures/tpm2-00.permall.plain" "$T/h1/swtpm/$UUID/tpm2/tpm2-00.permall"
rc=0
SWTPM_KEEPER_CONFIG=$T/h1/conf "$BIN" hook "$VM" stopped end - \
    <"$fixtures/tpm2-transient.stopped.xml" >"$T/lock.out" 2>"$T/lock.err" 9>&- || rc=$?
[ "$rc" = 0 ] || fail "the stop exited $rc while the lock was held elsewhere: $(cat "$T/lock.err")"
grep -q "waiting for the lock" "$T/lock.err" \
    || fail "the stop through view 2 did not wait for view 1's lock: $(cat "$T/lock.err")"
[ -z "$(ls -A "$V1/$UUID" | grep -vx '.lock' || true)" ] \
    || fail "a run that did not get the lock wrote into the store: $(ls -A "$V1/$UUID")"
exec 9>&-
sed -i 's/^lock_timeout = .*/lock_timeout = 60.0/' "$T/h1/conf"

# --- 2. two hosts capture one VM at once --------------------------------
: >"$T/states"
started=$(date +%s)
pids=()
for n in 0 1; do
    unshare -u sh -c 'hostname "$0" && exec "$1" worker "$2" "$3"' \
        "${HOSTS[$n]}" "$0" "$T" "$n" &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || fail "a host's worker failed"; done
took=$(($(date +%s) - started))

for n in 0 1; do
    for ((i = 1; i <= RUNS; i++)); do
        d=$T/h$n
        [ "$(cat "$d/rc.$i")" = 0 ] || fail "${HOSTS[$n]} run $i exited $(cat "$d/rc.$i"): $(cat "$d/err.$i")"
        [ ! -s "$d/out.$i" ] || fail "${HOSTS[$n]} run $i wrote to stdout"
        grep -q ": captured TPM 2.0 state as generation " "$d/err.$i" \
            || fail "${HOSTS[$n]} run $i did not log a capture: $(cat "$d/err.$i")"
        if grep -Ev ': info: ' "$d/err.$i" | grep -q .; then
            fail "${HOSTS[$n]} run $i logged more than info: $(cat "$d/err.$i")"
        fi
    done
done

cd "$V1/$UUID"
total=$((2 * RUNS))
mapfile -t gens < <(ls | grep -E '^[0-9]{8}-[0-9]{8}T[0-9]{6}Z$' | sort)
[ "${#gens[@]}" = "$total" ] || fail "expected $total generations, found ${#gens[@]}: $(ls -a)"
leftovers=$(ls -A | grep -Ev '^([0-9]{8}-[0-9]{8}T[0-9]{6}Z|\.lock)$' || true)
[ -z "$leftovers" ] || fail "left in the store: $leftovers"
[ -z "$(ls -A "$V1" | grep -v "^$UUID\$" || true)" ] || fail "left in the store root: $(ls -A "$V1")"
prev_time=
for ((i = 0; i < total; i++)); do
    g=${gens[$i]}
    [ "${g:0:8}" = "$(printf '%08d' $((i + 1)))" ] || fail "generation $((i + 1)) is named $g: a gap or a duplicate"
    [ -z "$prev_time" ] || [[ ! "${g:9}" < "$prev_time" ]] || fail "$g is older than the generation before it"
    prev_time=${g:9}
    (cd "$g" && sha256sum -c --quiet SHA256SUMS) || fail "$g does not pass sha256sum -c"
done
for n in 0 1; do
    c=$(grep -l "\"host\": \"${HOSTS[$n]}\"" */manifest.json | wc -l)
    [ "$c" = "$RUNS" ] || fail "${HOSTS[$n]} recorded $c generations, not $RUNS"
done
# The hosts' captures interleaved (else this tested nothing concurrent).
switches=$(for g in "${gens[@]}"; do sed -n 's/^ *"host": "\(.*\)",$/\1/p' "$g/manifest.json"; done | uniq | wc -l)
[ "$switches" -ge 3 ] || fail "the two hosts' captures did not interleave ($switches runs of one host): nothing ran at once"
# Every state captured is in exactly one generation: none overwrote another.
diff <(sort "$T/states") <(sha256sum */tpm2-00.permall | cut -d' ' -f1 | sort) >/dev/null \
    || fail "the generations do not hold the $total states captured, one each"
[ "$(sort -u "$T/states" | wc -l)" = "$total" ] || fail "the test's states were not all different"
cd /

# The other view sees the same, and the binary agrees through it.
[ "$(ls "$V2/$UUID" | sort)" = "$(printf '%s\n' "${gens[@]}")" ] \
    || fail "view 2 lists other generations than view 1"
SWTPM_KEEPER_CONFIG=$T/h1/conf "$BIN" verify >"$T/verify.out" 2>&1 \
    || fail "verify through view 2 failed: $(cat "$T/verify.out")"
[ "$(grep -c '^ok ' "$T/verify.out")" = "$total" ] || fail "verify did not report $total good generations: $(cat "$T/verify.out")"

# --- 3. another host's temporary: kept while recent, removed when old ----
# Host B's (named after it) is written through view 2; host A judges it
# by the mtime it reads through view 1.
capture_a() {
    printf '%-24s' "leftover/$1" | dd of="$T/h0/swtpm/$UUID/tpm2/tpm2-00.permall" \
        bs=1 seek=64 conv=notrunc status=none
    unshare -u sh -c 'hostname "$0" && exec "$@"' "${HOSTS[0]}" \
        env SWTPM_KEEPER_CONFIG="$T/h0/conf" "$BIN" hook "$VM" stopped end - \
        <"$fixtures/tpm2-transient.stopped.xml" >/dev/null 2>"$T/leftover.err" \
        || fail "host A's capture failed: $(cat "$T/leftover.err")"
}
foreign=".tmp-${HOSTS[1]}@1-00000999-20261121T000000Z"
mkdir "$V2/$UUID/$foreign"
echo half >"$V2/$UUID/$foreign/tpm2-00.permall"
capture_a 1
[ -d "$V1/$UUID/$foreign" ] || fail "host A removed host B's recent temporary"
grep -q "kept .*$foreign" "$T/leftover.err" || fail "keeping host B's temporary was not logged: $(cat "$T/leftover.err")"
touch -d '2 hours ago' "$V2/$UUID/$foreign"
capture_a 2
[ ! -e "$V1/$UUID/$foreign" ] || fail "host A kept host B's 2-hour-old temporary"

slowest=$(cat "$T"/h*/time.* | awk '{d = $2 - $1; if (d > m) m = d} END {printf "%.2f", m}')
echo "shared-store.sh: ok: flock holds across views; $total concurrent captures from 2 hosts in ${took} s (slowest run ${slowest} s), all verified"

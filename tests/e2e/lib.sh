# Sourced by the e2e scripts: checks that print `ok`/`FAIL` lines and
# count them, and commands kept quiet unless they fail. The script sets
# NAME (its name in messages) and QUIET_LOG (where quiet output goes); the
# TPM helpers below also use WORK (a scratch directory) and SWTPM (libvirt's
# swtpm state directory).
PASS=0
FAIL=0
ok() { PASS=$((PASS + 1)); echo "ok   - $*"; }
nok() { FAIL=$((FAIL + 1)); echo "FAIL - $*"; }
# check "what it pins" command...
check() { local what=$1; shift; if "$@"; then ok "$what"; else nok "$what"; fi; }
die() { echo "$NAME: FATAL: $*" >&2; exit 1; }
# quiet command...: no output when it works; its output when it fails.
quiet() {
    "$@" >"$QUIET_LOG" 2>&1 && return 0
    local rc=$?
    sed 's/^/#   /' "$QUIET_LOG"
    return $rc
}
wait_for() { # seconds command...
    local n=$(($1 * 10)); shift
    while [ $n -gt 0 ]; do "$@" && return 0; sleep 0.1; n=$((n - 1)); done
    return 1
}
same_file() { cmp -s "$1" "$2"; }

# Look inside a TPM at rest: a standalone swtpm on a state dir, tpm2-tools.
TPM_PORT=23210
TCTI="swtpm:host=127.0.0.1,port=$TPM_PORT"
tpm_open() {
    swtpm socket --tpm2 --tpmstate dir="$1" \
        --server type=tcp,port=$TPM_PORT,bindaddr=127.0.0.1 \
        --ctrl type=tcp,port=$((TPM_PORT + 1)),bindaddr=127.0.0.1 \
        --flags not-need-init,startup-clear --daemon --pid file="$WORK/swtpm.pid" || return 1
    wait_for 10 tpm2_getcap -T "$TCTI" properties-fixed >/dev/null 2>&1
}
tpm_close() {
    swtpm_ioctl --tcp 127.0.0.1:$((TPM_PORT + 1)) -s >/dev/null 2>&1
    local pid; pid=$(cat "$WORK/swtpm.pid" 2>/dev/null)
    [ -n "$pid" ] && wait_for 10 sh -c "! kill -0 $pid 2>/dev/null"
    rm -f "$WORK/swtpm.pid"
}
# The endorsement key's public part: derived from the TPM's seed.
ek_pub() { tpm2_createek -T "$TCTI" -c "$WORK/ek.ctx" -G rsa -u "$1" >/dev/null 2>&1; }
# ek_of_copy DIR OUT: the EK of a state copied out of libvirt's or our paths.
ek_of_copy() {
    rm -rf "$WORK/tpmcopy" && mkdir -p "$WORK/tpmcopy" && cp "$1"/tpm2-00.* "$WORK/tpmcopy/" &&
        tpm_open "$WORK/tpmcopy" && ek_pub "$2"; local rc=$?
    tpm_close
    return $rc
}
NV_INDEX=0x1500016

# check_tpm_kept UUID TAG: the TPM in libvirt's path has the NV value and EK
# that mark_tpm noted.
check_tpm_kept() {
    if tpm_open "$SWTPM/$1/tpm2"; then
        tpm2_nvread -T "$TCTI" $NV_INDEX -C o -s 32 -o "$WORK/$2.nv.out" >/dev/null 2>&1
        ek_pub "$WORK/$2.ek.after"
        tpm_close
        check "$2: the NV index holds the same random value" same_file "$WORK/$2.nv.in" "$WORK/$2.nv.out"
        check "$2: the endorsement key is unchanged" same_file "$WORK/$2.ek.before" "$WORK/$2.ek.after"
    else
        nok "$2: cannot open the restored TPM"
    fi
}

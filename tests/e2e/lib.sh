# Sourced by the e2e scripts: checks that print `ok`/`FAIL` lines and
# count them, and commands kept quiet unless they fail. The script sets
# NAME (its name in messages) and QUIET_LOG (where quiet output goes).
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

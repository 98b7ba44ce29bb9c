#!/usr/bin/env bash
# End to end, the monitoring path: a real libvirtd stops a VM whose capture
# fails (its store is a full tmpfs), and Debian's node_exporter (textfile
# collector) and promtool see what `check` sees, until the next good
# capture clears it.
#
#   flock -w 3600 /run/swk-e2e.lock tests/e2e/metrics.sh
#                                 install the built tree (make install
#                                 PREFIX=/usr/local), test, uninstall
#   SWTPM_KEEPER_E2E_INSTALLED=1 ...  test the program already installed
#
# Needs root. The caller holds /run/swk-e2e.lock (the one system libvirtd,
# its hooks and /etc/swtpm-keeper/swtpm-keeper.conf are shared). Uses VMs
# named swk-met-*, its own store (a tmpfs at /var/lib/swtpm-keeper-e2e-met)
# and run_dir; puts the host's configuration back when done. Fails
# loudly, never skips, when it cannot run.
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
TOP=$(cd "$HERE/../.." && pwd)
STORE=/var/lib/swtpm-keeper-e2e-met
RUNDIR=/run/swtpm-keeper-e2e-met
CONF=/etc/swtpm-keeper/swtpm-keeper.conf
WORK=$(mktemp -d /tmp/swk-met.XXXXXX)
TEXTDIR=$WORK/textfile
PROM=$TEXTDIR/swtpm-keeper.prom
PORT=19109
NAME=metrics
QUIET_LOG=$WORK/quiet.out
. "$HERE/lib.sh"
START=$(date +%s)

[ "$(id -u)" = 0 ] || die "run as root: the test drives the system libvirtd"
"$HERE/setup.sh" || die "cannot install or start libvirt (see above)"
for p in prometheus-node-exporter prometheus curl; do
    [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = 'install ok installed' ] && continue
    { "$HERE/apt.sh" update && "$HERE/apt.sh" install --no-install-recommends "$p"; } || die "cannot install $p"
done
virsh -q -c qemu:///system version >/dev/null || die "libvirtd does not answer"
export LIBVIRT_DEFAULT_URI=qemu:///system

A=swk-met-a
UA=5ee2e000-0000-4000-8000-00000000a0a0
# A name that needs escaping in labels: a double quote, a backslash, Unicode.
Q='swk-met-"q\ü'
UQ=5ee2e000-0000-4000-8000-00000000a0a1
VMS=("$A" "$Q")
NODE_PID=
cleanup() {
    for vm in "${VMS[@]}"; do
        virsh destroy "$vm" >/dev/null 2>&1
        virsh undefine "$vm" >/dev/null 2>&1
    done
    [ -n "$NODE_PID" ] && kill "$NODE_PID" 2>/dev/null
    mountpoint -q "$STORE" && umount -l "$STORE"
    rm -rf "$STORE" "$RUNDIR"
    if [ -z "${SWTPM_KEEPER_E2E_INSTALLED:-}" ]; then
        make -s -C "$TOP" uninstall PREFIX=/usr/local >/dev/null 2>&1
    fi
    if [ -e "$WORK/conf.bak" ]; then cp -p "$WORK/conf.bak" "$CONF"; else rm -f "$CONF"; rmdir "$(dirname "$CONF")" 2>/dev/null; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# --- install; our configuration; the store a small tmpfs ---
[ -e "$CONF" ] && cp -p "$CONF" "$WORK/conf.bak"
if [ -z "${SWTPM_KEEPER_E2E_INSTALLED:-}" ]; then
    [ -x "$TOP/target/release/swtpm-keeper" ] || die "build first: make"
    make -s -C "$TOP" install PREFIX=/usr/local >"$QUIET_LOG" 2>&1 || { cat "$QUIET_LOG"; die "make install failed"; }
    RULES=/usr/local/share/doc/swtpm-keeper/examples/swtpm-keeper.rules.yml
else
    RULES=/usr/share/doc/swtpm-keeper/examples/swtpm-keeper.rules.yml
fi
HOOK=$(ls /etc/libvirt/hooks/qemu.d/swtpm-keeper 2>/dev/null) || die "no hook in /etc/libvirt/hooks/qemu.d"
KEEPER=$(readlink -f "$HOOK")
mkdir -p "$(dirname "$CONF")" "$TEXTDIR" "$STORE"
cat >"$CONF" <<CONF
store_dir = "$STORE"
run_dir = "$RUNDIR"
metrics_file = "$PROM"
CONF
mount -t tmpfs -o size=256k,mode=0700 swk-met-store "$STORE" || die "cannot mount a tmpfs at $STORE"
# No room at all: the first capture of $A cannot write its generation.
dd if=/dev/zero of="$STORE/.filler" bs=4k >/dev/null 2>&1
[ "$(df --output=avail "$STORE" | tail -n 1 | tr -d ' ')" = 0 ] || die "cannot fill $STORE"

# domain_xml NAME UUID: a disk-less VM with an emulator TPM 2.0 (as run.sh).
domain_xml() {
    local name=${1//&/&amp;}; name=${name//</&lt;}
    cat <<XML
<domain type='qemu'>
  <name>$name</name>
  <uuid>$2</uuid>
  <memory unit='MiB'>64</memory>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices><tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm><graphics type='vnc' autoport='yes' listen='127.0.0.1'/></devices>
</domain>
XML
}
domain_xml "$A" "$UA" >"$WORK/a.xml"
domain_xml "$Q" "$UQ" >"$WORK/q.xml"
virsh define "$WORK/a.xml" >/dev/null || die "cannot define $A"
virsh define "$WORK/q.xml" >/dev/null || die "cannot define the VM named $Q"

# --- 1. a capture that fails at a real stop ---
# libvirt reads the hook list at start and on SIGHUP (make install sent
# one), in a thread that gives no sign when done: the failure record of
# this first stop is the sign that the hook ran.
stopped_once() {
    virsh start "$A" >/dev/null || return 1
    wait_for 20 test -s "/var/lib/libvirt/swtpm/$UA/tpm2/tpm2-00.permall" || return 1
    virsh destroy "$A" >/dev/null || return 1
    [ -e "$RUNDIR/failures/$UA.json" ]
}
ran=
for _ in 1 2 3 4 5; do stopped_once && { ran=1; break; }; sleep 1; done
[ -n "$ran" ] || die "the hook did not run at $A's stop (libvirtd did not load it?)"
check "failed capture: the VM still stopped" sh -c "virsh domstate $A | grep -qx 'shut off'"
check "failed capture: the store holds no generation of it" sh -c "! ls -d $STORE/$UA/0* >/dev/null 2>&1"
"$KEEPER" check >"$WORK/check.out" 2>&1
RC=$?
check "failed capture: check exits 1" test $RC = 1
check "failed capture: check names the VM, with FIX" grep -q "^FIX .*$A" "$WORK/check.out"
check "failed capture: check gives the reason (no space)" sh -c "grep '$A' '$WORK/check.out' | grep -qi 'no space left'"
[ "$FAIL" = 0 ] || sed 's/^/#   /' "$WORK/check.out"

# --- 2. the timer's pass writes the metrics file; node_exporter serves it ---
"$KEEPER" capture --all >/dev/null 2>"$WORK/capture.err"
check "capture --all (no VM runs) exits 0 and writes metrics_file" sh -c "[ -s '$PROM' ] && [ ! -s '$WORK/capture.err' ]"
check "the metrics file is mode 0644 (node_exporter's user reads it)" test "$(stat -c %a "$PROM")" = 644
check "no temporary is left beside it" test "$(ls -A "$TEXTDIR")" = swtpm-keeper.prom
check "promtool check metrics passes on the file" quiet promtool check metrics <"$PROM"
check "promtool check rules passes on the shipped rules" quiet promtool check rules "$RULES"
check "promtool test rules: each alert fires when and as docs/monitoring.md says" \
    quiet sh -c "cd '$TOP/packaging/prometheus' && promtool test rules swtpm-keeper.rules.test.yml"

prometheus-node-exporter --web.listen-address=127.0.0.1:$PORT --collector.disable-defaults \
    --collector.textfile --collector.textfile.directory="$TEXTDIR" >"$WORK/node.log" 2>&1 &
NODE_PID=$!
scrape() { curl -fsS "http://127.0.0.1:$PORT/metrics" >"$WORK/scrape" 2>/dev/null; }
wait_for 20 scrape || { cat "$WORK/node.log"; die "node_exporter does not answer on 127.0.0.1:$PORT"; }
# metric NAME [UUID]: its value in the last scrape (for a VM, by its uuid
# label), as an integer (node_exporter writes 1.7e+09 for a time).
metric() {
    if [ $# = 2 ]; then grep "^$1{.*uuid=\"$2\"" "$WORK/scrape"; else grep "^$1 " "$WORK/scrape"; fi | awk '{printf "%d\n", $NF}' | head -n 1
}
check "scrape: node_textfile_scrape_error is 0" test "$(metric node_textfile_scrape_error)" = 0
check "scrape: swtpm_keeper_vms counts both VMs (at least)" test "$(metric swtpm_keeper_vms)" -ge 2
check "scrape: the failure of $A is shown" test "$(metric swtpm_keeper_vm_capture_failure_timestamp_seconds "$UA")" -ge "$START"
check "scrape: $A is not protected" test "$(metric swtpm_keeper_vm_protected "$UA")" = 0
check "scrape: $A was never captured" test "$(metric swtpm_keeper_vm_last_capture_timestamp_seconds "$UA")" = 0
check "scrape: check's verdict for $A is failing" grep -q "^swtpm_keeper_vm_verdict{uuid=\"$UA\",verdict=\"failing\",vm=\"$A\"} 1" "$WORK/scrape"
check "scrape: the escaped name comes through node_exporter" \
    grep -qF 'swtpm_keeper_vm_protected{uuid="'"$UQ"'",vm="swk-met-\"q\\ü"} 0' "$WORK/scrape"
check "scrape: the metrics time is now" test "$(metric swtpm_keeper_metrics_timestamp_seconds)" -ge "$START"

# --- 3. room again: the next good capture clears all three ---
rm -f "$STORE/.filler"
check "good capture: capture of the stopped VM succeeds" quiet "$KEEPER" capture "$A"
check "good capture: the VM still shut off, a generation stored" sh -c "virsh domstate $A | grep -qx 'shut off' && ls -d $STORE/$UA/0* >/dev/null"
"$KEEPER" check >"$WORK/check.out" 2>&1
check "good capture: check names no FIX for the VM" sh -c "! grep '^FIX' '$WORK/check.out' | grep -q '$A'"
check "good capture: the failure record is gone" test ! -e "$RUNDIR/failures/$UA.json"
check "good capture: the next pass (capture --all) exits 0" quiet "$KEEPER" capture --all
scrape || nok "scrape after the good capture"
check "good capture: the metric shows no failure" test "$(metric swtpm_keeper_vm_capture_failure_timestamp_seconds "$UA")" = 0
check "good capture: $A is protected" test "$(metric swtpm_keeper_vm_protected "$UA")" = 1
check "good capture: its newest capture is now" test "$(metric swtpm_keeper_vm_last_capture_timestamp_seconds "$UA")" -ge "$START"
check "good capture: one generation of it counted" test "$(metric swtpm_keeper_vm_generations "$UA")" = 1
check "good capture: check's verdict for $A is ok" grep -q "^swtpm_keeper_vm_verdict{uuid=\"$UA\",verdict=\"ok\",vm=\"$A\"} 1" "$WORK/scrape"
check "scrape: node_textfile_scrape_error still 0" test "$(metric node_textfile_scrape_error)" = 0

echo "metrics: $PASS passed, $FAIL failed in $(($(date +%s) - START)) s"
[ "$FAIL" = 0 ]

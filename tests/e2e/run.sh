#!/usr/bin/env bash
# End-to-end suite: a real libvirtd, qemu and swtpm run the hook as
# installed, and we check what the store holds against what libvirt had.
#
#   tests/e2e/run.sh              install the built tree (make install
#                                 PREFIX=/usr/local), test, uninstall
#   SWTPM_KEEPER_E2E_INSTALLED=1 tests/e2e/run.sh
#                                 test the hook already installed (a package)
#
# Needs root. Fails loudly, never skips, when it cannot run. Uses its own
# store (/var/lib/swtpm-keeper-e2e) and VMs named swk-e2e-*; puts the
# host's configuration back when done.
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
TOP=$(cd "$HERE/../.." && pwd)
STORE=/var/lib/swtpm-keeper-e2e
CONF=/etc/swtpm-keeper/swtpm-keeper.conf
SNAPHOOK=/etc/libvirt/hooks/qemu.d/zz-swk-e2e-snapshot
SNAP=/run/swk-e2e-snapshots
SWTPM=/var/lib/libvirt/swtpm
WORK=$(mktemp -d /tmp/swk-e2e.XXXXXX)
PASS=0
FAIL=0

die() { echo "e2e: FATAL: $*" >&2; exit 1; }
ok() { PASS=$((PASS + 1)); echo "ok   - $*"; }
nok() { FAIL=$((FAIL + 1)); echo "FAIL - $*"; }
# check "what it pins" command...
check() { local what=$1; shift; if "$@"; then ok "$what"; else nok "$what"; fi; }
same_file() { cmp -s "$1" "$2"; }

[ "$(id -u)" = 0 ] || die "run as root: the suite drives the system libvirtd"
"$HERE/setup.sh" || die "cannot install or start libvirt (see above)"
virsh -q -c qemu:///system version >/dev/null || die "libvirtd does not answer"
export LIBVIRT_DEFAULT_URI=qemu:///system

VMS=()
cleanup() {
    for vm in "${VMS[@]}"; do
        virsh destroy "$vm" >/dev/null 2>&1
        virsh undefine "$vm" --nvram >/dev/null 2>&1 || virsh undefine "$vm" >/dev/null 2>&1
    done
    rm -f "$SNAPHOOK"
    if [ -z "${SWTPM_KEEPER_E2E_INSTALLED:-}" ]; then
        make -s -C "$TOP" uninstall PREFIX=/usr/local >/dev/null 2>&1
    fi
    if [ -e "$WORK/conf.bak" ]; then cp -p "$WORK/conf.bak" "$CONF"; else rm -f "$CONF"; rmdir "$(dirname "$CONF")" 2>/dev/null; fi
    for pid in $(pidof libvirtd); do kill -HUP "$pid"; done
    rm -rf "$WORK" "$SNAP"
}
trap cleanup EXIT

# --- install the hook, our configuration, and a test-only snapshot hook ---
[ -e "$CONF" ] && cp -p "$CONF" "$WORK/conf.bak"
if [ -z "${SWTPM_KEEPER_E2E_INSTALLED:-}" ]; then
    [ -x "$TOP/target/release/swtpm-keeper" ] || die "build first: make"
    make -s -C "$TOP" install PREFIX=/usr/local || die "make install failed"
fi
HOOK=$(ls /etc/libvirt/hooks/qemu.d/swtpm-keeper 2>/dev/null) || die "no hook in /etc/libvirt/hooks/qemu.d"
mkdir -p "$(dirname "$CONF")"
cat >"$CONF" <<CONF
store_dir = "$STORE"
generations = 5
CONF
rm -rf "$STORE" "$SNAP"
# Runs after swtpm-keeper (strcmp order) at release, the last moment before
# libvirt deletes a transient VM's state: keeps the bytes libvirt deleted.
cat >"$SNAPHOOK" <<'HOOK'
#!/bin/sh
[ "$2" = release ] || exit 0
uuid=$(sed -n 's:.*<uuid>\(.*\)</uuid>.*:\1:p' | head -n 1)
if [ -n "$uuid" ] && [ -d "/var/lib/libvirt/swtpm/$uuid" ]; then
    mkdir -p "/run/swk-e2e-snapshots/$uuid" && cp -a "/var/lib/libvirt/swtpm/$uuid/." "/run/swk-e2e-snapshots/$uuid/"
fi
exit 0
HOOK
chmod 0755 "$SNAPHOOK"
for pid in $(pidof libvirtd); do kill -HUP "$pid"; done
sleep 1

# domain_xml NAME UUID TPM(yes|no) [extra devices]
domain_xml() {
    local tpm=""
    [ "$3" = yes ] && tpm="<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"
    cat <<XML
<domain type='qemu'>
  <name>$1</name>
  <uuid>$2</uuid>
  <memory unit='MiB'>64</memory>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>$tpm${4:-}<graphics type='vnc' autoport='yes' listen='127.0.0.1'/></devices>
</domain>
XML
}

wait_for() { # seconds command...
    local n=$(($1 * 10)); shift
    while [ $n -gt 0 ]; do "$@" && return 0; sleep 0.1; n=$((n - 1)); done
    return 1
}

newest_gen() { ls -d "$STORE/$1"/0* 2>/dev/null | tail -n 1; }
gen_count() { ls -d "$STORE/$1"/0* 2>/dev/null | wc -l; }
syslog_has() { grep -qF -- "$1" /var/log/syslog 2>/dev/null && grep -F -- "$1" /var/log/syslog | grep -qF -- "$2"; }

echo "# libvirt $(virsh version --daemon 2>/dev/null | sed -n "s/^Running against daemon: //p"), swtpm $(swtpm --version 2>&1 | sed -n 's/.*version \([0-9.]*\).*/\1/p'), hook $HOOK"

# --- 1. persistent VM: start, destroy, undefine ---
N=swk-e2e-persistent U=5ee2e000-0000-4000-8000-000000000001
VMS+=("$N")
domain_xml $N $U yes >"$WORK/$N.xml"
virsh define "$WORK/$N.xml" >/dev/null || die "virsh define $N failed"
virsh start $N >/dev/null || die "virsh start $N failed"
check "persistent: swtpm created its state" wait_for 20 test -s $SWTPM/$U/tpm2/tpm2-00.permall
virsh destroy $N >/dev/null
cp $SWTPM/$U/tpm2/tpm2-00.permall "$WORK/persistent.permall"
virsh undefine $N >/dev/null
check "persistent: undefine deleted libvirt's TPM state" test ! -e $SWTPM/$U
G=$(newest_gen $U)
check "persistent: the store holds a generation" test -n "$G"
check "persistent: its permall is byte-identical to the one libvirt deleted" same_file "$G/tpm2-00.permall" "$WORK/persistent.permall"
check "persistent: stop+release made one generation (release added none)" test "$(gen_count $U)" = 1
check "persistent: the generation verifies with sha256sum -c" sh -c "cd '$G' && sha256sum -c --quiet SHA256SUMS"
check "persistent: domain.xml is libvirt's inactive definition" grep -q '"domain_xml_from": "libvirt-config"' "$G/manifest.json"
check "persistent: store dir 0700, files 0600, root-owned" \
    test "$(stat -c %a:%U "$STORE" "$STORE/$U" "$G" "$G/tpm2-00.permall" | sort -u | tr '\n' ' ')" = "600:root 700:root "
if virsh define "$G/domain.xml" >/dev/null 2>&1; then
    check "persistent: the stored domain.xml defines the VM again, same UUID" sh -c "virsh domuuid $N | grep -qx $U"
    virsh undefine $N >/dev/null
else
    nok "persistent: the stored domain.xml defines the VM again"
fi
check "syslog: one line names VM, UUID, event, action and generation" \
    wait_for 5 syslog_has "vm=$N uuid=$U event=stopped/end" "captured TPM 2.0 state as generation $(basename "$G")"

# --- 2. transient VM: create, destroy ---
N=swk-e2e-transient U=5ee2e000-0000-4000-8000-000000000002
VMS+=("$N")
domain_xml $N $U yes >"$WORK/$N.xml"
virsh create "$WORK/$N.xml" >/dev/null || die "virsh create $N failed"
check "transient: swtpm created its state" wait_for 20 test -s $SWTPM/$U/tpm2/tpm2-00.permall
virsh destroy $N >/dev/null
check "transient: libvirt deleted the TPM state at stop" wait_for 5 test ! -e $SWTPM/$U
check "transient: the snapshot hook saw the state before deletion" test -s "$SNAP/$U/tpm2/tpm2-00.permall"
G=$(newest_gen $U)
check "transient: the store holds a generation" test -n "$G"
check "transient: its permall is byte-identical to the one libvirt deleted" same_file "$G/tpm2-00.permall" "$SNAP/$U/tpm2/tpm2-00.permall"
check "transient: domain.xml is the XML libvirt passed" grep -q '"domain_xml_from": "hook-stdin"' "$G/manifest.json"
check "transient: the generation verifies with sha256sum -c" sh -c "cd '$G' && sha256sum -c --quiet SHA256SUMS"

# --- 3. a VM without TPM leaves nothing ---
N=swk-e2e-notpm U=5ee2e000-0000-4000-8000-000000000003
VMS+=("$N")
domain_xml $N $U no >"$WORK/$N.xml"
virsh create "$WORK/$N.xml" >/dev/null || die "virsh create $N failed"
virsh destroy $N >/dev/null
check "no TPM: nothing in the store" test ! -e "$STORE/$U"
check "no TPM: nothing in syslog" sh -c "! grep -qF 'uuid=$U' /var/log/syslog"

echo "e2e: $PASS passed, $FAIL failed"
[ "$FAIL" = 0 ]

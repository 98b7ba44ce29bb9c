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
NAME=e2e
QUIET_LOG=$WORK/quiet.out
. "$HERE/lib.sh"

[ "$(id -u)" = 0 ] || die "run as root: the suite drives the system libvirtd"
# Syslog checks look only at what this run logged: the file outlives runs,
# and each CI run passes the same VMs through the suite twice.
LOGOFF=$(stat -c %s /var/log/syslog 2>/dev/null || echo 0)
newlog() { tail -c +$((LOGOFF + 1)) /var/log/syslog 2>/dev/null; }
restart_libvirtd() {
    pkill -x libvirtd
    wait_for 10 sh -c '! pidof libvirtd >/dev/null'
    # libvirt 11.3's nodedev driver can hang at shutdown (its udev thread
    # waits on a lock the shutdown holds); no VM of ours runs now.
    pkill -9 -x libvirtd && wait_for 5 sh -c '! pidof libvirtd >/dev/null'
    pidof libvirtd >/dev/null && die "libvirtd does not exit"
    libvirtd -d || die "libvirtd does not start"
    wait_for 30 sh -c 'virsh -q -c qemu:///system version >/dev/null 2>&1' || die "libvirtd does not answer after a restart"
}
"$HERE/setup.sh" || die "cannot install or start libvirt (see above)"
virsh -q -c qemu:///system version >/dev/null || die "libvirtd does not answer"
export LIBVIRT_DEFAULT_URI=qemu:///system

VMS=()
cleanup() {
    for vm in "${VMS[@]}"; do
        virsh destroy "$vm" >/dev/null 2>&1
        virsh undefine "$vm" --nvram >/dev/null 2>&1 || virsh undefine "$vm" >/dev/null 2>&1
    done
    # A standalone swtpm left by a failed mark_tpm would hold its ports
    # for the next run.
    [ -s "$WORK/swtpm.pid" ] && kill "$(cat "$WORK/swtpm.pid")" 2>/dev/null
    rm -f "$SNAPHOOK"
    [ -n "${GLUSTER_UP:-}" ] && "$HERE/gluster.sh" down >/dev/null 2>&1
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
KEEPER=$(readlink -f "$HOOK")   # the operator's command is the same binary
mkdir -p "$(dirname "$CONF")"
cat >"$CONF" <<CONF
store_dir = "$STORE"
generations = 5
CONF
rm -rf "$STORE" "$SNAP"
# Runs after swtpm-keeper (strcmp order): at release, the last moment
# before libvirt deletes a transient VM's state, it keeps the bytes libvirt
# deletes; at prepare, what swtpm-keeper just put back (with the permall's
# inode), before swtpm or the firmware touch it.
cat >"$SNAPHOOK" <<'HOOK'
#!/bin/sh
case "$2" in release|prepare) ;; *) exit 0 ;; esac
uuid=$(sed -n 's:.*<uuid>\(.*\)</uuid>.*:\1:p' | head -n 1)
[ -n "$uuid" ] || exit 0
dest="/run/swk-e2e-snapshots/$2/$uuid"
rm -rf "$dest" && mkdir -p "$dest"
src="/var/lib/libvirt/swtpm/$uuid"
[ -d "$src" ] && cp -a "$src/." "$dest/"
[ -e "$src/tpm2/tpm2-00.permall" ] && stat -c %i "$src/tpm2/tpm2-00.permall" >"$dest/permall.inode"
nv="/var/lib/libvirt/qemu/nvram/$1_VARS.fd"
[ -e "$nv" ] && cp -a "$nv" "$dest/nvram.fd"
exit 0
HOOK
chmod 0755 "$SNAPHOOK"
# libvirtd finds hooks at start, or on SIGHUP in a thread of its own that
# gives no sign when done: restart it, so case 1 cannot race the reload.
restart_libvirtd

# domain_xml NAME UUID TPM: TPM is yes, no, a secret's UUID (an encrypted
# state) or a whole <tpm> element.
domain_xml() {
    local tpm=""
    case "$3" in
        yes) tpm="<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>" ;;
        no) ;;
        "<"*) tpm=$3 ;;
        *) tpm="<tpm model='tpm-crb'><backend type='emulator' version='2.0'><encryption secret='$3'/></backend></tpm>" ;;
    esac
    cat <<XML
<domain type='qemu'>
  <name>$1</name>
  <uuid>$2</uuid>
  <memory unit='MiB'>64</memory>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>$tpm<graphics type='vnc' autoport='yes' listen='127.0.0.1'/></devices>
</domain>
XML
}

# An EFI VM with Secure Boot and enrolled keys, firmware auto-selected.
efi_xml() {
    cat <<XML
<domain type='qemu'>
  <name>$1</name>
  <uuid>$2</uuid>
  <memory unit='MiB'>256</memory>
  <os firmware='efi'>
    <type arch='x86_64' machine='q35'>hvm</type>
    <firmware><feature enabled='yes' name='secure-boot'/><feature enabled='yes' name='enrolled-keys'/></firmware>
  </os>
  <features><acpi/><smm state='on'/></features>
  <devices><tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm><graphics type='vnc' autoport='yes' listen='127.0.0.1'/></devices>
</domain>
XML
}


# run_once define|create NAME STATEFILE: start the VM of $WORK/NAME.xml,
# wait until swtpm has written its state, stop it.
run_once() {
    if [ "$1" = define ]; then
        virsh define "$WORK/$2.xml" >/dev/null && virsh start "$2" >/dev/null || die "cannot start $2"
    else
        virsh create "$WORK/$2.xml" >/dev/null || die "virsh create $2 failed"
    fi
    wait_for 20 test -s "$3" || die "$2: no TPM state at $3"
    virsh destroy "$2" >/dev/null
}

# mark_tpm NAME UUID TAG: define and start the VM, stop it, then write a
# random value into an NV index of its TPM and note the EK ($WORK/TAG.*).
mark_tpm() {
    domain_xml "$1" "$2" yes >"$WORK/$1.xml"
    run_once define "$1" "$SWTPM/$2/tpm2/tpm2-00.permall"
    tpm_open "$SWTPM/$2/tpm2" || die "cannot open $1's TPM with a standalone swtpm"
    head -c 32 /dev/urandom >"$WORK/$3.nv.in"
    tpm2_nvdefine -T "$TCTI" $NV_INDEX -C o -s 32 -a "ownerread|ownerwrite" >/dev/null &&
        tpm2_nvwrite -T "$TCTI" $NV_INDEX -C o -i "$WORK/$3.nv.in" || die "cannot write $1's NV index"
    ek_pub "$WORK/$3.ek.before" || die "cannot read $1's EK"
    tpm_close
}



newest_gen() { ls -d "$STORE/$1"/0* 2>/dev/null | tail -n 1; }
gen_count() { ls -d "$STORE/$1"/0* 2>/dev/null | wc -l; }
# Counts rather than grep -q: under pipefail an early exit of the last
# grep would SIGPIPE the first one and fail the check on a match.
syslog_has() {
    local n
    n=$(newlog | grep -F -- "$1" | grep -cF -- "$2")
    [ "${n:-0}" -gt 0 ]
}

# A negative check reads syslog only once a marker sent after the events
# it is about is in the file: rsyslog takes /dev/log's datagrams in the
# order they came, so every line the hook sent before is written by then.
# No marker in 10 s fails the check (it never passes on an unread log).
syslog_settled() {
    local mark="swk-e2e-mark-$$-$RANDOM$RANDOM"
    logger -t swk-e2e -- "$mark" || return 1
    wait_for 10 syslog_has "$mark" "$mark"
}
syslog_lacks() { syslog_settled && test "$(newlog | grep -cF -- "$1")" = 0; }

LIBVIRT=$(virsh version --daemon 2>/dev/null | sed -n "s/^Running against daemon: //p")
# version_ge A B: A >= B
version_ge() { printf '%s\n%s\n' "$2" "$1" | sort -V -C; }
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
check "transient: the snapshot hook saw the state before deletion" test -s "$SNAP/release/$U/tpm2/tpm2-00.permall"
G=$(newest_gen $U)
check "transient: the store holds a generation" test -n "$G"
check "transient: its permall is byte-identical to the one libvirt deleted" same_file "$G/tpm2-00.permall" "$SNAP/release/$U/tpm2/tpm2-00.permall"
check "transient: domain.xml is the XML libvirt passed" grep -q '"domain_xml_from": "hook-stdin"' "$G/manifest.json"
check "transient: the generation verifies with sha256sum -c" sh -c "cd '$G' && sha256sum -c --quiet SHA256SUMS"
check "transient: the stop's capture is in syslog" \
    wait_for 5 syslog_has "vm=$N uuid=$U event=stopped/end" "captured TPM 2.0 state"

# --- 3. a VM without TPM leaves nothing ---
N=swk-e2e-notpm U=5ee2e000-0000-4000-8000-000000000003
VMS+=("$N")
domain_xml $N $U no >"$WORK/$N.xml"
virsh create "$WORK/$N.xml" >/dev/null || die "virsh create $N failed"
virsh destroy $N >/dev/null
check "no TPM: nothing in the store" test ! -e "$STORE/$U"
# virsh destroy returns after libvirt ran the stopped and release hooks.
check "no TPM: nothing in syslog" syslog_lacks "uuid=$U"


# --- 4. a TPM's contents survive undefine: NV index and EK, looked at inside ---
N=swk-e2e-nv U=5ee2e000-0000-4000-8000-000000000011
VMS+=("$N")
mark_tpm $N $U nv
virsh start $N >/dev/null && virsh destroy $N >/dev/null   # a stop captures the TPM with its NV index
virsh undefine --nvram $N >/dev/null
check "nv: undefine deleted the TPM holding the NV index" test ! -e $SWTPM/$U
G=$(newest_gen $U)
virsh define "$G/domain.xml" >/dev/null || die "cannot define $N from $G/domain.xml"
check "nv: the start after define succeeds" quiet virsh start $N
check "nv: syslog says what was restored, from which generation" \
    wait_for 5 syslog_has "vm=$N uuid=$U event=prepare/begin" "restored TPM 2.0 state from generation $(basename "$G")"
virsh destroy $N >/dev/null
check_tpm_kept $U nv

# --- 5. an existing state is never touched ---
PERM=$SWTPM/$U/tpm2/tpm2-00.permall
INODE=$(stat -c %i $PERM) && cp $PERM "$WORK/existing.permall"
prepare_lines() { newlog | grep -cF "vm=$N uuid=$U event=prepare/begin"; }
BEFORE=$(prepare_lines)
virsh start $N >/dev/null && virsh destroy $N >/dev/null
check "existing: at prepare the permall was the same file, unchanged" \
    sh -c "[ \"$(cat $SNAP/prepare/$U/permall.inode 2>/dev/null)\" = $INODE ] && cmp -s $SNAP/prepare/$U/tpm2/tpm2-00.permall $WORK/existing.permall"
no_new_prepare_line() { syslog_settled && test "$(prepare_lines)" = "$BEFORE"; }
check "existing: no restore was logged" no_new_prepare_line
virsh undefine $N >/dev/null

# --- 6. UEFI Secure Boot: NVRAM and TPM come back together ---
N=swk-e2e-efi U=5ee2e000-0000-4000-8000-000000000012
VMS+=("$N")
NVF=/var/lib/libvirt/qemu/nvram/${N}_VARS.fd
efi_xml $N $U >"$WORK/$N.xml"
virsh define "$WORK/$N.xml" >/dev/null && virsh start $N >/dev/null || die "cannot start $N (ovmf installed?)"
wait_for 20 test -s $SWTPM/$U/tpm2/tpm2-00.permall || die "$N: no TPM state"
sleep 3   # let OVMF run a little
virsh destroy $N >/dev/null
cp $NVF "$WORK/efi.vars" && cp $SWTPM/$U/tpm2/tpm2-00.permall "$WORK/efi.permall"
virsh undefine --nvram $N >/dev/null
check "efi: undefine --nvram deleted NVRAM and TPM" sh -c "[ ! -e $NVF ] && [ ! -e $SWTPM/$U ]"
G=$(newest_gen $U)
check "efi: the generation holds the NVRAM" same_file "$G/nvram.fd" "$WORK/efi.vars"
virsh define "$G/domain.xml" >/dev/null || die "cannot define $N from $G/domain.xml"
check "efi: the start after define succeeds" quiet virsh start $N
virsh destroy $N >/dev/null
check "efi: the TPM state put back is byte-identical" same_file "$SNAP/prepare/$U/tpm2/tpm2-00.permall" "$WORK/efi.permall"
check "efi: the NVRAM put back is byte-identical" same_file "$SNAP/prepare/$U/nvram.fd" "$WORK/efi.vars"
check "efi: restored files have libvirt's owners" \
    sh -c "[ \"$(stat -c %U:%a $SNAP/prepare/$U/tpm2/tpm2-00.permall $SNAP/prepare/$U/nvram.fd | tr '\n' ' ')\" = 'tss:600 libvirt-qemu:600 ' ]"
virsh undefine --nvram $N >/dev/null

# --- 7. transient VM: create, destroy, create again: the same TPM ---
N=swk-e2e-again U=5ee2e000-0000-4000-8000-000000000013
VMS+=("$N")
domain_xml $N $U yes >"$WORK/$N.xml"
run_once create $N $SWTPM/$U/tpm2/tpm2-00.permall
G1=$(newest_gen $U)
virsh create "$WORK/$N.xml" >/dev/null || die "second virsh create $N failed"
virsh destroy $N >/dev/null
check "transient again: the TPM put back at prepare is the stored one" same_file "$SNAP/prepare/$U/tpm2/tpm2-00.permall" "$G1/tpm2-00.permall"
ek_of_copy "$G1" "$WORK/ek1" && ek_of_copy "$SNAP/release/$U/tpm2" "$WORK/ek2"
check "transient again: after the second run it is the same TPM (same EK)" same_file "$WORK/ek1" "$WORK/ek2"

# --- 8. restore = "off" restores nothing ---
printf 'store_dir = "%s"\nrestore = "off"\n' "$STORE" >"$CONF"
virsh create "$WORK/$N.xml" >/dev/null && virsh destroy $N >/dev/null
check "restore off: nothing was put back at prepare" test ! -e "$SNAP/prepare/$U/tpm2"
ek_of_copy "$SNAP/release/$U/tpm2" "$WORK/ek3"
check "restore off: libvirt made a new TPM (another EK)" sh -c "! cmp -s $WORK/ek1 $WORK/ek3"
printf 'store_dir = "%s"\n' "$STORE" >"$CONF"

# --- 9. encrypted state: same secret restores; a new secret is refused ---
N=swk-e2e-enc U=5ee2e000-0000-4000-8000-000000000014
S1=5ee2e000-0000-4000-8000-0000000000a1 S2=5ee2e000-0000-4000-8000-0000000000a2
VMS+=("$N")
secret() {
    printf "<secret ephemeral='no' private='yes'><uuid>%s</uuid><usage type='vtpm'><name>swk-e2e-%s</name></usage></secret>" "$1" "$1" >"$WORK/secret.xml"
    virsh secret-define "$WORK/secret.xml" >/dev/null &&
        head -c 32 /dev/urandom | base64 >"$WORK/secret.b64" &&
        virsh secret-set-value "$1" --file "$WORK/secret.b64" >/dev/null
}
virsh secret-undefine $S1 >/dev/null 2>&1; virsh secret-undefine $S2 >/dev/null 2>&1
secret $S1 || die "cannot define a vtpm secret"
domain_xml $N $U $S1 >"$WORK/$N.xml"
run_once define $N $SWTPM/$U/tpm2/tpm2-00.permall
cp $SWTPM/$U/tpm2/tpm2-00.permall "$WORK/enc.permall"
virsh undefine $N >/dev/null
G=$(newest_gen $U)
check "encrypted: the stored state is encrypted (header flags)" grep -q '"header_flags": 9' "$G/manifest.json"
virsh define "$G/domain.xml" >/dev/null
check "encrypted: with the same secret the restored TPM starts" quiet virsh start $N
virsh destroy $N >/dev/null
check "encrypted: what was put back is the stored state" same_file "$SNAP/prepare/$U/tpm2/tpm2-00.permall" "$WORK/enc.permall"
virsh undefine $N >/dev/null
virsh secret-undefine $S1 >/dev/null
secret $S2 || die "cannot define the second secret"
domain_xml $N $U $S2 >"$WORK/$N.xml"
virsh define "$WORK/$N.xml" >/dev/null
GENS_BEFORE=$(gen_count $U)
if virsh start $N >"$WORK/start.out" 2>&1; then
    nok "encrypted: a start with another secret is refused"
    virsh destroy $N >/dev/null
else
    ok "encrypted: a start with another secret is refused"
    sed 's/^/#   /' "$WORK/start.out"
fi
check "encrypted: libvirt shows why" grep -q "refusing to start $N with a new TPM.*encrypted with libvirt secret $S1" "$WORK/start.out"
check "encrypted: nothing was written to libvirt's path" test ! -e $SWTPM/$U/tpm2/tpm2-00.permall
check "encrypted: the store is unchanged" test "$(gen_count $U)" = "$GENS_BEFORE"
check "encrypted: the refusal is in syslog" wait_for 5 syslog_has "vm=$N uuid=$U event=prepare/begin" "TPM state NOT restored"
virsh undefine $N >/dev/null
virsh secret-undefine $S2 >/dev/null

# --- 10. the operator brings back an undefined VM with the CLI ---
N=swk-e2e-cli U=5ee2e000-0000-4000-8000-000000000015
VMS+=("$N")
mark_tpm $N $U cli
virsh start $N >/dev/null && virsh destroy $N >/dev/null
check "cli: list shows the VM as defined" sh -c "'$KEEPER' list | grep '^$N ' | grep -q defined"
check "cli: verify finds the whole store sound" quiet "$KEEPER" verify
check "cli: check finds nothing to fix" quiet "$KEEPER" check
virsh undefine --nvram $N >/dev/null
check "cli: list no longer shows it as defined" sh -c "'$KEEPER' list --json | grep -A20 '\"uuid\": \"$U\"' | grep -q '\"defined\": false'"
"$KEEPER" show $N --xml >"$WORK/$N.back.xml"
check "cli: show --xml gives a definition virsh accepts" quiet virsh define "$WORK/$N.back.xml"
check "cli: restore puts the TPM back" quiet "$KEEPER" restore $N
check "cli: the state is in libvirt's path, owned by tss" sh -c "[ \"\$(stat -c %U $SWTPM/$U/tpm2/tpm2-00.permall)\" = tss ]"
check "cli: a second restore refuses to replace it" sh -c "! '$KEEPER' restore $N >/dev/null 2>&1"
check "cli: the VM boots with its TPM" quiet virsh start $N
virsh destroy $N >/dev/null
check_tpm_kept $U cli
virsh undefine $N >/dev/null

# --- 11. libvirt >= 10.5: release passes the shutoff reason ---
if version_ge "$LIBVIRT" 10.5.0; then
    # A release after its stop adds nothing, and says so at debug level.
    printf 'store_dir = "%s"\nlog_level = "debug"\n' "$STORE" >"$CONF"
    N=swk-e2e-reason U=5ee2e000-0000-4000-8000-000000000018
    VMS+=("$N")
    domain_xml $N $U yes >"$WORK/$N.xml"
    run_once create $N $SWTPM/$U/tpm2/tpm2-00.permall
    check "reason: release after destroy carries reason=destroyed" \
        wait_for 5 syslog_has "vm=$N uuid=$U event=release/end reason=destroyed" "unchanged since generation"
    printf 'store_dir = "%s"\n' "$STORE" >"$CONF"
else
    echo "# libvirt $LIBVIRT < 10.5: release carries no shutoff reason (cases 11 not applicable)"
fi

# --- 12. libvirt >= 10.10: <source type='dir'> and type='file' state paths ---
if version_ge "$LIBVIRT" 10.10.0; then
    src_xml() { # NAME UUID TYPE PATH
        domain_xml "$1" "$2" "<tpm model='tpm-crb'><backend type='emulator' version='2.0'><source type='$3' path='$4'/></backend></tpm>"
    }
    N=swk-e2e-srcdir U=5ee2e000-0000-4000-8000-000000000016 D=/var/lib/swk-e2e-tpmdir
    VMS+=("$N")
    rm -rf $D && install -d -m 0755 $D
    src_xml $N $U dir "$D/$U" >"$WORK/$N.xml"
    run_once define $N "$D/$U/tpm2-00.permall"
    cp "$D/$U/tpm2-00.permall" "$WORK/srcdir.permall"
    virsh undefine $N >/dev/null
    G=$(newest_gen $U)
    check "source dir: the store holds the state from <source path>" same_file "$G/tpm2-00.permall" "$WORK/srcdir.permall"
    check "source dir: the manifest records the path" grep -q "\"state_path\": \"$D/$U\"" "$G/manifest.json"
    rm -rf "${D:?}/$U"   # whether or not libvirt removed it at undefine
    virsh define "$G/domain.xml" >/dev/null
    check "source dir: the start after define succeeds" quiet virsh start $N
    virsh destroy $N >/dev/null
    check "source dir: the state came back into <source path>" \
        wait_for 5 syslog_has "vm=$N uuid=$U event=prepare/begin" "restored TPM 2.0 state from generation $(basename "$G") (captured"
    ek_of_copy "$G" "$WORK/srcdir.ek1" && ek_of_copy "$D/$U" "$WORK/srcdir.ek2"
    check "source dir: the same TPM (same EK)" same_file "$WORK/srcdir.ek1" "$WORK/srcdir.ek2"
    virsh undefine $N >/dev/null
    rm -rf $D

    N=swk-e2e-srcfile U=5ee2e000-0000-4000-8000-000000000017 F=/var/lib/swk-e2e-tpmfile
    VMS+=("$N")
    # swtpm_setup replaces the file, so its directory must be swtpm's.
    rm -rf $F && install -d -o tss -g tss -m 0700 $F
    src_xml $N $U file "$F/$U.state" >"$WORK/$N.xml"
    run_once define $N "$F/$U.state"
    cp "$F/$U.state" "$WORK/srcfile.state"
    virsh undefine $N >/dev/null
    G=$(newest_gen $U)
    check "source file: the store holds the linear state file" same_file "$G/tpm-state.file" "$WORK/srcfile.state"
    rm -f "$F/$U.state"   # whether or not libvirt removed it at undefine
    virsh define "$G/domain.xml" >/dev/null
    check "source file: the start after define succeeds" quiet virsh start $N
    virsh destroy $N >/dev/null
    check "source file: the state came back into <source path>" \
        wait_for 5 syslog_has "vm=$N uuid=$U event=prepare/begin" "restored TPM 2.0 state from generation $(basename "$G") (captured"
    check "source file: it is owned by tss" test "$(stat -c %U "$F/$U.state" 2>/dev/null)" = tss
    virsh undefine $N >/dev/null
    rm -rf $F
else
    echo "# libvirt $LIBVIRT < 10.10: no <source> state paths (cases 12 not applicable)"
fi

# --- 13. save and restore: the TPM comes from the image, not the store ---
# A transient VM's state is deleted at save, and the store has it: without
# the incoming mark taken at `restore begin`, prepare would put it back.
N=swk-e2e-save U=5ee2e000-0000-4000-8000-000000000019
VMS+=("$N")
domain_xml $N $U yes >"$WORK/$N.xml"
virsh create "$WORK/$N.xml" >/dev/null || die "virsh create $N failed"
wait_for 20 test -s $SWTPM/$U/tpm2/tpm2-00.permall || die "$N: no TPM state"
check "save: virsh save stops the VM" quiet virsh save $N "$WORK/$N.img"
G=$(newest_gen $U)
check "save: the store holds the state captured at the save" test -n "$G"
check "save: libvirt deleted the transient VM's state" wait_for 5 test ! -e $SWTPM/$U/tpm2/tpm2-00.permall
check "save: virsh restore starts it again" quiet virsh restore "$WORK/$N.img"
check "save: restore/begin was noted as incoming" \
    wait_for 5 syslog_has "vm=$N uuid=$U event=restore/begin" "incoming TPM state"
check "save: prepare says the state arrives with the image" \
    wait_for 5 syslog_has "vm=$N uuid=$U event=prepare/begin" "not restoring: the TPM state arrives with the incoming restore"
check "save: prepare put nothing back" \
    test "$(newlog | grep -F "vm=$N uuid=$U event=prepare/begin" | grep -cF "restored TPM")" = 0
virsh destroy $N >/dev/null
wait_for 5 test ! -e $SWTPM/$U
# What libvirt held after the restore (the snapshot hook's copy at release)
# against what was stored before the save.
ek_of_copy "$G" "$WORK/save.ek1" && ek_of_copy "$SNAP/release/$U/tpm2" "$WORK/save.ek2"
check "save: after save and restore it is the same TPM (same EK)" same_file "$WORK/save.ek1" "$WORK/save.ek2"
rm -f "$WORK/$N.img"

# --- 14. a running VM: capture --all keeps its TPM while it runs ---
# The NV index is written while the VM is stopped (no stop capture has
# it), then the VM runs: only the live capture can hold it.
N=swk-e2e-live U=5ee2e000-0000-4000-8000-00000000001a
VMS+=("$N")
mark_tpm $N $U live
virsh start $N >/dev/null || die "cannot start $N"
swtpm_pid() { cat /run/libvirt/qemu/swtpm/*-"$N"-swtpm.pid 2>/dev/null; }
wait_for 20 test -n "$(swtpm_pid)" || die "$N: no swtpm pid file"
SWPID=$(swtpm_pid)
"$KEEPER" capture --all >"$WORK/live1.out" 2>&1
check "live: capture --all captures the running VM" grep -q " captured $N: TPM" "$WORK/live1.out"
G=$(newest_gen $U)
check "live: the manifest says live, running" \
    sh -c "grep -q '\"live\": true' '$G/manifest.json' && grep -q '\"vm_state\": \"running\"' '$G/manifest.json'"
check "live: its permall is byte-identical to the running swtpm's" same_file "$G/tpm2-00.permall" "$SWTPM/$U/tpm2/tpm2-00.permall"
check "live: the generation verifies with sha256sum -c" sh -c "cd '$G' && sha256sum -c --quiet SHA256SUMS"
check "live: the VM still runs" test "$(virsh domstate $N)" = running
check "live: swtpm keeps its pid" sh -c "[ '$(swtpm_pid)' = '$SWPID' ] && kill -0 $SWPID"
COUNT=$(gen_count $U)
"$KEEPER" capture --all >"$WORK/live2.out" 2>&1
check "live: a second pass reads nothing and adds nothing" \
    sh -c "grep -q 'unchanged $N: no file changed, nothing read' '$WORK/live2.out' && [ \$(ls -d '$STORE/$U'/0* | wc -l) = $COUNT ]"
check "live: the capture is in syslog" wait_for 5 syslog_has "vm=$N uuid=$U event=capture/live" "captured TPM state of the running VM"
virsh destroy $N >/dev/null
# Whatever the stop added, the restore below must come from the live capture.
for g in "$STORE/$U"/0*; do
    [ "$(basename "$g")" \> "$(basename "$G")" ] && "$KEEPER" prune --vm $U --generation "$(basename "$g")" >/dev/null
done
virsh undefine --nvram $N >/dev/null
virsh define "$G/domain.xml" >/dev/null || die "cannot define $N from $G/domain.xml"
check "live: the start after undefine and define succeeds" quiet virsh start $N
check "live: the live capture was put back" \
    wait_for 5 syslog_has "vm=$N uuid=$U event=prepare/begin" "restored TPM 2.0 state from generation $(basename "$G")"
virsh destroy $N >/dev/null
check_tpm_kept $U live
virsh undefine $N >/dev/null
# --- 15. a corrupt state at prepare: kept as evidence, the good one put back (issue 13) ---
# What a host crash can leave (swtpm issue 985): a 0-byte permall, with
# which `virsh start` fails ("CMD_INIT: 0x101"). The store holds a good
# generation with the NV index; prepare keeps the bad file as evidence and
# puts that generation back.
N=swk-e2e-mend U=5ee2e000-0000-4000-8000-000000000020
VMS+=("$N")
mark_tpm $N $U mend
virsh start $N >/dev/null && virsh destroy $N >/dev/null   # a stop captures the TPM with its NV index
G=$(newest_gen $U)
check "mend: the store holds a generation" test -n "$G"
: >$SWTPM/$U/tpm2/tpm2-00.permall
check "mend: libvirt's permall is 0 bytes" test ! -s $SWTPM/$U/tpm2/tpm2-00.permall
check "mend: virsh start succeeds" quiet virsh start $N
virsh destroy $N >/dev/null
check "mend: prepare put the stored permall back, byte-identical" \
    same_file "$SNAP/prepare/$U/tpm2/tpm2-00.permall" "$G/tpm2-00.permall"
EV=$(ls -d "$STORE/$U"/corrupt-* 2>/dev/null | tail -n 1)
check "mend: the 0-byte permall is kept as evidence" \
    sh -c "[ -n '$EV' ] && [ -f '$EV/tpm2-00.permall' ] && [ ! -s '$EV/tpm2-00.permall' ]"
check "mend: the evidence verifies with sha256sum -c" sh -c "cd '$EV' && sha256sum -c --quiet SHA256SUMS"
check "mend: one syslog line says what was kept and what was restored" \
    wait_for 5 syslog_has "vm=$N uuid=$U event=prepare/begin" "was corrupt (tpm2-00.permall: the file is empty): kept it as evidence in $EV, never restored; restored TPM 2.0 state from generation $(basename "$G")"
check "mend: show lists the evidence" sh -c "'$KEEPER' show $N | grep -qF '$(basename "$EV")'"
check "mend: list flags the VM" sh -c "'$KEEPER' list | grep '^$N ' | grep -q corrupt-evidence"
check "mend: verify reports it as evidence and exits 0" \
    sh -c "'$KEEPER' verify $U >'$WORK/mend.verify' && grep -qF 'evidence $U $(basename "$EV")' '$WORK/mend.verify'"
check_tpm_kept $U mend
virsh undefine $N >/dev/null
# --- end of case 15 ---

# --- 16. a lost host, with the store on a shared filesystem (GlusterFS) ---
# Two mounts of one volume are two hosts' views of the store. The VM runs
# with an NV index only its live capture holds; then the host dies (no
# hook runs) and the VM starts again from the other view.
N=swk-e2e-hostloss U=5ee2e000-0000-4000-8000-000000000021
VMS+=("$N")
"$HERE/gluster.sh" up >"$WORK/gluster.out" 2>&1 || { sed 's/^/#   /' "$WORK/gluster.out"; die "cannot set up GlusterFS"; }
GLUSTER_UP=1
mapfile -t VIEW < <("$HERE/gluster.sh" views)
printf 'store_dir = "%s/store"\n' "${VIEW[0]}" >"$CONF"
mark_tpm $N $U hostloss
virsh start $N >/dev/null || die "cannot start $N"
"$KEEPER" capture --all >"$WORK/hostloss.out" 2>&1
check "host loss: capture --all keeps the running VM on the shared store" grep -q " captured $N: TPM" "$WORK/hostloss.out"
G=$(ls -d "${VIEW[0]}/store/$U"/0* | tail -n 1)
QPID=$(cat /run/libvirt/qemu/$N.pid 2>/dev/null)
SPID=$(cat /run/libvirt/qemu/swtpm/*-$N-swtpm.pid 2>/dev/null)
# The host dies: libvirtd, QEMU and swtpm killed, no hook runs; its disk
# (TPM state, definition, status files) is gone.
pkill -9 -x libvirtd
[ -n "$QPID" ] && kill -9 "$QPID" 2>/dev/null
[ -n "$SPID" ] && kill -9 "$SPID" 2>/dev/null
wait_for 10 sh -c "! kill -0 ${QPID:-0} 2>/dev/null && ! kill -0 ${SPID:-0} 2>/dev/null"
rm -rf "${SWTPM:?}/$U" "/etc/libvirt/qemu/$N.xml" /run/libvirt/qemu/$N.* /run/libvirt/qemu/swtpm/*-$N-swtpm.*
# Another host: the store through the other mount.
printf 'store_dir = "%s/store"\n' "${VIEW[1]}" >"$CONF"
libvirtd -d || die "libvirtd does not start"
wait_for 30 sh -c 'virsh -q -c qemu:///system version >/dev/null 2>&1' || die "libvirtd does not answer"
"$KEEPER" show $N --xml >"$WORK/$N.lost.xml"
check "host loss: the VM is defined again from the store" quiet virsh define "$WORK/$N.lost.xml"
check "host loss: it starts" quiet virsh start $N
check "host loss: its TPM came from the live capture, through the other view" \
    wait_for 5 syslog_has "vm=$N uuid=$U event=prepare/begin" "restored TPM 2.0 state from generation $(basename "$G")"
virsh destroy $N >/dev/null
check_tpm_kept $U hostloss
virsh undefine $N >/dev/null
printf 'store_dir = "%s"\n' "$STORE" >"$CONF"
"$HERE/gluster.sh" down >"$WORK/gluster.out" 2>&1 || { sed 's/^/#   /' "$WORK/gluster.out"; nok "GlusterFS torn down"; }
GLUSTER_UP=

# Case 2's release ran long before; the marker proves its lines are read.
check "transient: nothing at info for the release (it added nothing)" \
    syslog_lacks "uuid=5ee2e000-0000-4000-8000-000000000002 event=release/end"

echo "e2e: $PASS passed, $FAIL failed"
[ "$FAIL" = 0 ]

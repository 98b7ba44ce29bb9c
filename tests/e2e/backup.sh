#!/usr/bin/env bash
# End to end, a disk backup that carries the TPM (issue 17): an EFI VM with
# a qcow2 disk and a TPM 2.0 holding a random NV value is backed up with
# Debian's virtnbdbackup through the shipped example script; the host is
# lost (VM, NVRAM, TPM, disk and store gone); virtnbdrestore -D defines
# restore_<name> under a new UUID, `swtpm-keeper import --to` gives it the
# archived TPM, and it starts with the same TPM (NV value, EK) and the
# NVRAM captured while the VM was paused.
#
#   tests/e2e/backup.sh           install the built tree (make install
#                                 PREFIX=/usr/local), test, uninstall
#   SWTPM_KEEPER_E2E_INSTALLED=1 tests/e2e/backup.sh
#                                 test what is installed (a package)
#
# Needs root and the system libvirtd (started if it does not run; never
# restarted). Fails loudly, never skips. Uses its own store
# (/var/lib/swtpm-keeper-e2e-backup) and VMs named swk-nbd-*; puts the
# host's configuration back when done.
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
TOP=$(cd "$HERE/../.." && pwd)
STORE=/var/lib/swtpm-keeper-e2e-backup
CONF=/etc/swtpm-keeper/swtpm-keeper.conf
SWTPM=/var/lib/libvirt/swtpm
NVDIR=/var/lib/libvirt/qemu/nvram
SNAPHOOK=/etc/libvirt/hooks/qemu.d/zz-swk-nbd-snapshot
SNAP=/run/swk-nbd-snapshots
WORK=$(mktemp -d /tmp/swk-nbd.XXXXXX)
NAME=backup
QUIET_LOG=$WORK/quiet.out
. "$HERE/lib.sh"
T0=$SECONDS

N=swk-nbd-e2e U=5ee2e000-0000-4000-8000-0000000000b2
R=restore_$N
[ "$(id -u)" = 0 ] || die "run as root: the test drives the system libvirtd"
"$HERE/setup.sh" || die "cannot install or start libvirt (see above)"
export LIBVIRT_DEFAULT_URI=qemu:///system
virsh -q version >/dev/null || die "libvirtd does not answer"
for c in virtnbdbackup virtnbdrestore qemu-img; do
    command -v $c >/dev/null || die "$c is missing (setup.sh installs virtnbdbackup and qemu-utils)"
done

forget_vms() {
    for vm in $N $R; do
        virsh destroy $vm >/dev/null 2>&1
        virsh undefine $vm --nvram --tpm >/dev/null 2>&1
    done
    rm -f "$NVDIR/${N}_VARS.fd"
}
cleanup() {
    forget_vms
    [ -s "$WORK/swtpm.pid" ] && kill "$(cat "$WORK/swtpm.pid")" 2>/dev/null
    if [ -z "${SWTPM_KEEPER_E2E_INSTALLED:-}" ]; then
        make -s -C "$TOP" uninstall PREFIX=/usr/local >/dev/null 2>&1
    fi
    if [ -e "$WORK/conf.bak" ]; then cp -p "$WORK/conf.bak" "$CONF"; else rm -f "$CONF"; rmdir "$(dirname "$CONF")" 2>/dev/null; fi
    rm -f "$SNAPHOOK"
    [ -n "${SWTPM_KEEPER_E2E_INSTALLED:-}" ] && for pid in $(pidof libvirtd); do kill -HUP "$pid"; done
    rm -rf "$WORK" "$STORE" "$SNAP"
}
trap cleanup EXIT
forget_vms   # what a failed run may have left

# --- install, and our configuration ---
[ -e "$CONF" ] && cp -p "$CONF" "$WORK/conf.bak"
# Runs after swtpm-keeper (strcmp order): at prepare, the NVRAM the
# firmware is about to read, after swtpm-keeper put it back.
mkdir -p "$(dirname "$SNAPHOOK")"
cat >"$SNAPHOOK" <<HOOK
#!/bin/sh
[ "\$2" = prepare ] || exit 0
case "\$1" in $N|$R) ;; *) exit 0 ;; esac
mkdir -p $SNAP && : >"$SNAP/\$1.ran"
[ -e "$NVDIR/${N}_VARS.fd" ] && cp "$NVDIR/${N}_VARS.fd" "$SNAP/\$1.nvram"
exit 0
HOOK
chmod 0755 "$SNAPHOOK"
rm -rf "$SNAP"
if [ -n "${SWTPM_KEEPER_E2E_INSTALLED:-}" ]; then
    for pid in $(pidof libvirtd); do kill -HUP "$pid"; done   # a reload: VMs run on
fi
if [ -z "${SWTPM_KEEPER_E2E_INSTALLED:-}" ]; then
    [ -x "$TOP/target/release/swtpm-keeper" ] || die "build first: make"
    # It reloads libvirtd (SIGHUP), which then finds our hooks too.
    make -s -C "$TOP" install PREFIX=/usr/local >/dev/null || die "make install failed"
fi
HOOK=$(ls /etc/libvirt/hooks/qemu.d/swtpm-keeper 2>/dev/null) || die "no hook in /etc/libvirt/hooks/qemu.d"
KEEPER=$(readlink -f "$HOOK")
SCRIPT=
for d in /usr/local/share/doc/swtpm-keeper /usr/share/doc/swtpm-keeper /usr/share/doc/swtpm-keeper-*; do
    [ -x "$d/examples/swtpm-keeper-virtnbdbackup" ] && SCRIPT=$d/examples/swtpm-keeper-virtnbdbackup && break
done
[ -n "$SCRIPT" ] || die "the example script swtpm-keeper-virtnbdbackup is not installed (executable) under .../share/doc/swtpm-keeper/examples"
mkdir -p "$(dirname "$CONF")"
printf 'store_dir = "%s"\n' "$STORE" >"$CONF"
rm -rf "$STORE"
# The script finds `swtpm-keeper` on the PATH, as an operator's would.
export PATH="$(dirname "$KEEPER"):$PATH"
echo "# libvirt $(virsh version --daemon 2>/dev/null | sed -n 's/^Running against daemon: //p'), virtnbdbackup $(virtnbdbackup -V 2>&1), script $SCRIPT"

# --- an EFI VM with a qcow2 disk holding random data and a TPM 2.0 ---
chmod 0755 "$WORK"   # qemu (libvirt-qemu) opens the disk in it
head -c 1M /dev/urandom >"$WORK/disk.raw"
qemu-img convert -q -f raw -O qcow2 "$WORK/disk.raw" "$WORK/$N.qcow2" &&
    qemu-img resize -q "$WORK/$N.qcow2" 64M || die "cannot make the qcow2 disk"
cat >"$WORK/$N.xml" <<XML
<domain type='qemu'>
  <name>$N</name>
  <uuid>$U</uuid>
  <memory unit='MiB'>256</memory>
  <os firmware='efi'>
    <type arch='x86_64' machine='q35'>hvm</type>
    <firmware><feature enabled='yes' name='secure-boot'/><feature enabled='yes' name='enrolled-keys'/></firmware>
  </os>
  <features><acpi/><smm state='on'/></features>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='$WORK/$N.qcow2'/><target dev='vda' bus='virtio'/></disk>
    <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
    <graphics type='vnc' autoport='yes' listen='127.0.0.1'/>
  </devices>
</domain>
XML
virsh define "$WORK/$N.xml" >/dev/null && virsh start $N >/dev/null || die "cannot start $N (ovmf installed?)"
wait_for 20 test -s $SWTPM/$U/tpm2/tpm2-00.permall || die "$N: no TPM state"
virsh destroy $N >/dev/null
# libvirt reads its hook list at start and on SIGHUP, in a thread of its
# own: the stop's capture shows that it has read it.
wait_for 10 sh -c "ls -d '$STORE/$U'/0* >/dev/null 2>&1" || die "the hook did not capture $N at its stop: is it active? (reload libvirtd)"
# Mark the TPM at rest: a random NV value, and its EK.
tpm_open "$SWTPM/$U/tpm2" || die "cannot open $N's TPM with a standalone swtpm"
head -c 32 /dev/urandom >"$WORK/bk.nv.in"
tpm2_nvdefine -T "$TCTI" $NV_INDEX -C o -s 32 -a "ownerread|ownerwrite" >/dev/null &&
    tpm2_nvwrite -T "$TCTI" $NV_INDEX -C o -i "$WORK/bk.nv.in" || die "cannot write $N's NV index"
ek_pub "$WORK/bk.ek.before" || die "cannot read $N's EK"
tpm_close
virsh start $N >/dev/null || die "cannot start $N again"
test -e "$SNAP/$N.ran" || die "the snapshot hook did not run at $N's prepare"

# --- back it up with the shipped script ---
BK=$WORK/backup
check "backup: the example script exits 0" quiet "$SCRIPT" $N "$BK" -l full -n
sed 's/^/#   /' "$QUIET_LOG" | grep -v ' INFO ' | tail -n 3
G=$(sed -n 's/.* (generation \([^)]*\)) in .*/\1/p' "$QUIET_LOG")
[ -n "$G" ] || die "the script named no generation"
GEN=$STORE/$U/$G
check "backup: the VM runs again afterwards (the script resumed it)" test "$(virsh domstate $N)" = running
check "backup: the TPM archive is in the backup directory, named by UUID" test -s "$BK/tpm-$U.tar"
check "backup: the archive holds the captured generation" \
    sh -c "tar -tf '$BK/tpm-$U.tar' | grep -qx '$U/$G/manifest.json'"
check "backup: the generation was captured while the VM was paused" grep -q '"vm_state": "paused"' "$GEN/manifest.json"
check "backup: the generation holds the NVRAM" test -s "$GEN/nvram.fd"
check "backup: the generation verifies with sha256sum -c" sh -c "cd '$GEN' && sha256sum -c --quiet SHA256SUMS"
cp "$GEN/nvram.fd" "$WORK/paused.nvram"
check "backup: virtnbdbackup's NVRAM copy is the paused one (the VM stayed paused)" \
    same_file "$BK/${N}_VARS.fd.virtnbdbackup.0" "$WORK/paused.nvram"
check "backup: the same generation exports to the same bytes" \
    sh -c "'$KEEPER' export $N --generation '$G' | cmp -s - '$BK/tpm-$U.tar'"

# A VM that was paused already stays paused.
virsh suspend $N >/dev/null
check "backup: the script backs up a paused VM" quiet "$SCRIPT" $N "$WORK/backup2" -l copy -n
check "backup: and leaves it paused" test "$(virsh domstate $N)" = paused
virsh resume $N >/dev/null

# --- lose the host ---
virsh destroy $N >/dev/null
virsh undefine $N --nvram --tpm >/dev/null || die "cannot undefine $N --nvram --tpm"
rm -f "$WORK/$N.qcow2"
rm -rf "$STORE"
check "lost: no TPM state, no NVRAM, no disk, no store" \
    sh -c "! ls -d '$SWTPM/$U' '$NVDIR/${N}_VARS.fd' '$WORK/$N.qcow2' '$STORE' 2>/dev/null"

# --- restore on the "new" host ---
# virtnbdbackup saved the live XML, and libvirt 9.0 refuses to define the
# live XML of a VM whose firmware it auto-selected ("cannot use
# feature-based firmware autoselection when firmware autoselection is
# disabled"): the fix docs/backup.md gives operators of Debian 12.
if [ "$(libvirtd --version | awk '{print $3}' | cut -d. -f1)" -lt 10 ]; then
    check "restore: libvirt 9: the saved XML made to name its firmware files (docs/backup.md)" \
        perl -0pi -e "s/ firmware='efi'//; s{\\s*<firmware>.*?</firmware>}{}s" "$BK"/vmconfig.virtnbdbackup.*.xml
fi
check "restore: virtnbdrestore -D exits 0" quiet virtnbdrestore -D -n -i "$BK" -o "$WORK/restored"
RU=$(virsh domuuid $R 2>/dev/null)
check "restore: virtnbdrestore defined $R" test -n "$RU"
check "restore: under a new UUID" test "$RU" != "$U"
check "restore: virtnbdrestore put back virtnbdbackup's NVRAM copy at the old path" \
    same_file "$NVDIR/${N}_VARS.fd" "$WORK/paused.nvram"
# Set it aside, so that the NVRAM the VM starts with must come from the
# archive (as after virtnbdbackup >= 2.36 --pause, whose copy is later).
mv "$NVDIR/${N}_VARS.fd" "$WORK/virtnbdrestore.nvram"
check "restore: the disk is the one backed up" \
    quiet qemu-img compare -f raw -F qcow2 "$WORK/disk.raw" "$WORK/restored/$N.qcow2"
check "import: swtpm-keeper import --to $R exits 0" quiet "$KEEPER" import "$BK/tpm-$U.tar" --to $R
IG=$(ls -d "$STORE/$RU"/0* 2>/dev/null | tail -n 1)
check "import: the generation went to $R's UUID" test -s "$IG/manifest.json"
check "import: the manifest records where it came from" \
    sh -c "grep -q '\"imported_from\"' '$IG/manifest.json' && grep -q '\"uuid\": \"$U\"' '$IG/manifest.json'"
check "import: libvirt's TPM directory was not touched" test ! -e "$SWTPM/$RU/tpm2/tpm2-00.permall"
check "restore: virsh start $R succeeds" quiet virsh start $R
check "restore: the hook put the TPM back at prepare" wait_for 20 test -s "$SWTPM/$RU/tpm2/tpm2-00.permall"
virsh destroy $R >/dev/null
check_tpm_kept "$RU" bk
check "restore: the NVRAM the firmware read at start is the one captured while paused" \
    same_file "$SNAP/$R.nvram" "$WORK/paused.nvram"

echo "backup: $PASS passed, $FAIL failed, in $((SECONDS - T0)) s"
[ "$FAIL" = 0 ]

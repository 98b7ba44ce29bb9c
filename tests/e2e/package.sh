#!/usr/bin/env bash
# The package as users get it: the .deb that Debian's own toolchain built
# offline in a clean Debian 12 chroot (tests/distro-build.sh, a stage of
# tests/run-all before this one), installed with dpkg -i; the whole
# end-to-end suite against the hook as installed (from qemu.d/); remove and
# purge it, and check that the store survived.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
TOP=$(cd "$HERE/../.." && pwd)
NAME=package
QUIET_LOG=$TOP/build/package-cmd.log
. "$HERE/lib.sh"

[ "$(id -u)" = 0 ] || die "run as root"
[ "$(dpkg-query -W -f='${Status}' lintian 2>/dev/null)" = 'install ok installed' ] ||
    { "$HERE/apt.sh" update && "$HERE/apt.sh" install --no-install-recommends lintian; } || die "cannot install lintian"

# Only that package: one built another way (rustup's cargo, make deb) would
# prove nothing about what Debian builds.
DEB=$(ls "$TOP"/build/distro/swtpm-keeper_*.deb 2>/dev/null | head -n 1)
if [ -z "$DEB" ]; then
    nok "the .deb from the Debian chroot build is in build/distro/ (run tests/distro-build.sh first)"
    echo "package: $PASS passed, $FAIL failed"
    exit 1
fi
echo "# $(basename "$DEB") (built by tests/distro-build.sh with Debian's Rust)"
# A store with a sentinel, as on a host that ran the hook before.
SENTINEL=/var/lib/swtpm-keeper/5ee2e000-0000-4000-8000-0000000000ff/00000001-20261121T000000Z
mkdir -p "$SENTINEL" && echo keep >"$SENTINEL/sentinel"
quiet dpkg -i "$DEB" || die "dpkg -i failed"
check "dpkg -i is idempotent (install twice)" quiet dpkg -i "$DEB"
check "installed: the hook is in qemu.d, pointing at the binary" test "$(readlink -f /etc/libvirt/hooks/qemu.d/swtpm-keeper)" = /usr/libexec/swtpm-keeper/swtpm-keeper
check "installed: the store is root 0700" test "$(stat -c %U:%a /var/lib/swtpm-keeper)" = root:700
check "installed: the configuration is a conffile" sh -c "dpkg-query -W -f='\${Conffiles}' swtpm-keeper | grep -q /etc/swtpm-keeper/swtpm-keeper.conf"
check "installed: check sees libvirtd running the hook (postinst reloaded it)" \
    sh -c "swtpm-keeper check | grep -q '^ok   libvirtd (pid [0-9]*) runs'"
check "installed: the capture timer and its service are systemd units" \
    sh -c "[ -f /lib/systemd/system/swtpm-keeper-capture.timer ] && grep -q 'ExecStart=/usr/sbin/swtpm-keeper capture --all' /lib/systemd/system/swtpm-keeper-capture.service"
check "installed: the alert rules and the monitoring guide" \
    sh -c "[ -f /usr/share/doc/swtpm-keeper/examples/swtpm-keeper.rules.yml ] && ls /usr/share/doc/swtpm-keeper/monitoring.md* >/dev/null"
check "installed: swtpm-keeper is on PATH with its man page" sh -c "command -v swtpm-keeper >/dev/null && [ -e /usr/share/man/man8/swtpm-keeper.8.gz ]"

SWTPM_KEEPER_E2E_INSTALLED=1 "$HERE/run.sh"
E2E=$?
check "the end-to-end suite passes against the installed package" test $E2E = 0
SWTPM_KEEPER_E2E_INSTALLED=1 "$HERE/backup.sh"
check "a virtnbdbackup backup with the shipped example script carries the TPM to a new host (.deb)" test $? = 0
SWTPM_KEEPER_E2E_INSTALLED=1 "$HERE/metrics.sh"
check "the metrics reach node_exporter and pass promtool; a failed stop shows (.deb)" test $? = 0

quiet dpkg -r swtpm-keeper || nok "dpkg -r failed"
check "removed: the hook is gone" test ! -e /etc/libvirt/hooks/qemu.d/swtpm-keeper
check "removed: the store survived" test -e "$SENTINEL/sentinel"
dpkg --purge swtpm-keeper >"$TOP/build/purge.log" 2>&1
check "purged: the store survived" test -e "$SENTINEL/sentinel"
check "purged: it says what it left" grep -q "left in place" "$TOP/build/purge.log"
check "purged: the configuration is gone" test ! -e /etc/swtpm-keeper/swtpm-keeper.conf
rm -rf "$(dirname "$SENTINEL")"

echo "package: $PASS passed, $FAIL failed"
[ "$FAIL" = 0 ]

#!/usr/bin/env bash
# The package as users get it: build the .deb, install it with dpkg -i, run
# the whole end-to-end suite against the hook as installed (from qemu.d/),
# remove and purge it, and check that the store survived.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
TOP=$(cd "$HERE/../.." && pwd)
NAME=package
QUIET_LOG=$TOP/build/package-cmd.log
. "$HERE/lib.sh"

[ "$(id -u)" = 0 ] || die "run as root"
for p in debhelper dpkg-dev lintian fakeroot; do
    [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = 'install ok installed' ] || NEED="${NEED:-} $p"
done
if [ -n "${NEED:-}" ]; then
    { "$HERE/apt.sh" update && "$HERE/apt.sh" install --no-install-recommends $NEED; } || die "cannot install$NEED"
fi

make -s -C "$TOP" deb >"$TOP/build/deb.log" 2>&1 || { tail -20 "$TOP/build/deb.log"; die "make deb failed"; }
DEB=$(ls "$TOP"/build/deb/swtpm-keeper_*.deb | head -n 1)
echo "# $(basename "$DEB")"
check "lintian reports no errors" sh -c "! lintian '$DEB' 2>/dev/null | grep -q '^E:'"
lintian "$DEB" 2>/dev/null | sed 's/^/#   /'

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
check "installed: swtpm-keeper is on PATH with its man page" sh -c "command -v swtpm-keeper >/dev/null && [ -e /usr/share/man/man8/swtpm-keeper.8.gz ]"

SWTPM_KEEPER_E2E_INSTALLED=1 "$HERE/run.sh"
E2E=$?
check "the end-to-end suite passes against the installed package" test $E2E = 0

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

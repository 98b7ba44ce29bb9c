#!/usr/bin/env bash
# The .rpm as installed, as far as a Debian host allows: rpm installs it
# with its scriptlets, the end-to-end suite runs against the hook as
# installed, a reinstall keeps a changed configuration (%config(noreplace)),
# and erase removes the hook but keeps the store. Not covered here: a
# Fedora/RHEL userland (systemd units, SELinux labels, rpm's dependencies,
# which this host's rpm database does not know; hence --nodeps).
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
TOP=$(cd "$HERE/../.." && pwd)
CONF=/etc/swtpm-keeper/swtpm-keeper.conf
HOOK=/etc/libvirt/hooks/qemu.d/swtpm-keeper
BIN=/usr/libexec/swtpm-keeper/swtpm-keeper
NAME=rpm
QUIET_LOG=$TOP/build/rpm-cmd.log   # read by checks below
. "$HERE/lib.sh"

[ "$(id -u)" = 0 ] || die "run as root"
RPM=$(ls "$TOP"/build/rpm/RPMS/*/swtpm-keeper-[0-9]*.rpm 2>/dev/null | head -n 1)
[ -n "$RPM" ] || die "no package in build/rpm/RPMS: make rpm first"
echo "# $(basename "$RPM")"
[ -e "$BIN" ] && die "$BIN exists (another install of swtpm-keeper?): remove it first"

FILES="$TOP/build/rpm-files.txt"
rpm -qp --qf '[%{FILEMODES:perms} %{FILEUSERNAME}:%{FILEGROUPNAME} %{FILEFLAGS:fflags} %{FILENAMES}\n]' "$RPM" >"$FILES" 2>/dev/null
check "spec: the configuration is %config(noreplace)" grep -qxF -- "-rw-r--r-- root:root cn $CONF" "$FILES"
check "spec: the store is a %dir 0700 root" grep -qxF "drwx------ root:root  /var/lib/swtpm-keeper" "$FILES"

# A store with a sentinel, as on a host that ran the hook before.
SENTINEL=/var/lib/swtpm-keeper/5ee2e000-0000-4000-8000-0000000000fe/00000001-20261122T000000Z
mkdir -p "$SENTINEL" && echo keep >"$SENTINEL/sentinel"
quiet rpm -i --nodeps "$RPM" || die "rpm -i failed"
# Interrupted from here on, leave no package behind for the next run.
trap 'rpm -e swtpm-keeper >/dev/null 2>&1' EXIT
check "installed: %post reloaded the running libvirtd" grep -q "reloaded libvirtd" "$QUIET_LOG"
check "installed: check sees libvirtd running the hook (%post reloaded it)" \
    sh -c "/usr/sbin/swtpm-keeper check | grep -q '^ok   libvirtd (pid [0-9]*) runs'"
check "installed: the hook is in qemu.d, pointing at the binary" test "$(readlink -f "$HOOK")" = "$BIN"
check "installed: the store is root 0700" test "$(stat -c %U:%a /var/lib/swtpm-keeper)" = root:700
check "installed: the store kept what it held" test -e "$SENTINEL/sentinel"
check "installed: the capture timer and its service are systemd units" \
    sh -c "[ -f /usr/lib/systemd/system/swtpm-keeper-capture.timer ] && grep -q 'ExecStart=/usr/sbin/swtpm-keeper capture --all' /usr/lib/systemd/system/swtpm-keeper-capture.service"
check "installed: the alert rules and the monitoring guide" \
    sh -c "[ -f /usr/share/doc/swtpm-keeper/examples/swtpm-keeper.rules.yml ] && ls /usr/share/doc/swtpm-keeper/monitoring.md* >/dev/null"
check "installed: /usr/sbin/swtpm-keeper is the same binary" test "$(readlink -f /usr/sbin/swtpm-keeper)" = "$BIN"
check "installed: rpm -V finds every file as packaged" quiet rpm -V --nodeps swtpm-keeper

SWTPM_KEEPER_E2E_INSTALLED=1 "$HERE/run.sh"
check "the end-to-end suite passes against the installed .rpm" test $? = 0
SWTPM_KEEPER_E2E_INSTALLED=1 "$HERE/backup.sh"
check "a virtnbdbackup backup with the shipped example script carries the TPM to a new host (.rpm)" test $? = 0
SWTPM_KEEPER_E2E_INSTALLED=1 "$HERE/metrics.sh"
check "the metrics reach node_exporter and pass promtool; a failed stop shows (.rpm)" test $? = 0

echo "# changed by the administrator" >>"$CONF"
quiet rpm -U --replacepkgs --nodeps "$RPM" || nok "rpm -U --replacepkgs failed"
check "reinstalled: the changed configuration was kept" grep -q "changed by the administrator" "$CONF"
check "reinstalled: no .rpmnew (the packaged file did not change)" test ! -e "$CONF.rpmnew"

quiet rpm -e swtpm-keeper || nok "rpm -e failed"
trap - EXIT
check "erased: the hook is gone" test ! -e "$HOOK" -a ! -L "$HOOK"
check "erased: the binary is gone" test ! -e "$BIN"
check "erased: the store survived" test -e "$SENTINEL/sentinel"
check "erased: %postun says what it left" grep -q "left in place" "$QUIET_LOG"
check "erased: the changed configuration was saved as .rpmsave" grep -q "changed by the administrator" "$CONF.rpmsave"
rm -f "$CONF.rpmsave"
rmdir /etc/swtpm-keeper 2>/dev/null
rm -rf "$(dirname "$SENTINEL")"

echo "rpm: $PASS passed, $FAIL failed"
[ "$FAIL" = 0 ]

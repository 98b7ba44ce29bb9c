#!/usr/bin/env bash
# Put libvirt 9 (Debian 12) or 11 (bookworm-backports) on this host, and
# restart its daemons: `tests/e2e/libvirt-version.sh 9|11`. Upgrades and
# downgrades both work, so the matrix can run in any order on one machine.
set -euo pipefail
want=${1:?usage: libvirt-version.sh 9|11}
BPO=/etc/apt/sources.list.d/swtpm-keeper-bookworm-backports.sources
APT="$(dirname "$0")/apt.sh"

current() { dpkg-query -W -f='${Version}' libvirt-daemon 2>/dev/null | cut -d. -f1; }
restart() {
    for d in libvirtd virtqemud virtlogd; do pkill -x "$d" 2>/dev/null || true; done
    for _ in $(seq 1 50); do pidof libvirtd virtqemud virtlogd >/dev/null || break; sleep 0.1; done
    # An old daemon still answering would pass for the new one.
    for d in libvirtd virtqemud virtlogd; do pkill -9 -x "$d" 2>/dev/null || true; done
    for _ in $(seq 1 50); do pidof libvirtd virtqemud virtlogd >/dev/null || break; sleep 0.1; done
    virtlogd -d
    libvirtd -d
    for _ in $(seq 1 60); do
        # Not answering yet is expected here (set -e must not end the wait).
        running=$(virsh -q -c qemu:///system version --daemon 2>/dev/null | sed -n 's/^Running against daemon: \([0-9]*\)\..*/\1/p' || true)
        [ "$running" = "$want" ] && return 0
        sleep 0.5
    done
    echo "libvirt-version: libvirtd $want does not answer after the switch (got: ${running:-nothing})" >&2
    return 1
}
libvirt_pkgs() { # installed binary packages built from libvirt
    dpkg-query -W -f='${db:Status-Abbrev} ${binary:Package} ${source:Package}\n' |
        awk '$1 ~ /^ii/ && ($3 == "libvirt" || ($3 == "" && $2 ~ /^libvirt/)) {print $2}' | sed 's/:amd64$//'
}

if [ "$(current)" = "$want" ]; then
    echo "libvirt-version: libvirt $(dpkg-query -W -f='${Version}' libvirt-daemon) already"
    exit 0
fi
case "$want" in
    11)
        if [ ! -e "$BPO" ]; then
            printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' >"$BPO"
        fi
        "$APT" update
        # shellcheck disable=SC2046
        "$APT" install -t bookworm-backports $(libvirt_pkgs)
        ;;
    9)
        bookworm_version() { apt-cache madison "$1" | { grep -v backports || true; } | awk -F'|' 'NR==1 {gsub(/ /, "", $2); print $2}'; }
        "$APT" update
        v=$(bookworm_version libvirt-daemon)
        [ -n "$v" ] || { echo "libvirt-version: no bookworm libvirt-daemon in the package lists" >&2; exit 1; }
        # 11.x split libvirt into packages 9.0 does not have: remove those
        # in the same transaction as the downgrade of the others.
        args=()
        for p in $(libvirt_pkgs); do
            if [ "$(bookworm_version "$p")" = "$v" ]; then args+=("$p=$v"); else args+=("$p-"); fi
        done
        "$APT" install --allow-downgrades "${args[@]}"
        # Files that moved between packages in 11.x (cpu_map, ...) went
        # with the removed ones: reinstall 9.0 to put every file back.
        # shellcheck disable=SC2046
        "$APT" install --reinstall $(libvirt_pkgs)
        ;;
    *) echo "usage: libvirt-version.sh 9|11" >&2; exit 2 ;;
esac
restart
echo "libvirt-version: now libvirt $(dpkg-query -W -f='${Version}' libvirt-daemon)"

#!/usr/bin/env bash
# Install (if missing) and start what the end-to-end suite drives: Debian's
# libvirt, qemu, swtpm, rsyslog. Works with or without systemd.
set -euo pipefail
# build-essential: rustc links with cc, and cargo-fuzz builds libFuzzer (C++).
# acl: setfacl, for the test that an ACL granting write is not trusted;
# strace: the durability test checks the system calls.
# virtnbdbackup, qemu-utils (qemu-img, qemu-nbd): backup.sh backs a VM up and
# restores it with Debian's virtnbdbackup and the shipped example script.
pkgs=(libvirt-daemon-system libvirt-clients qemu-system-x86 swtpm swtpm-tools rsyslog ovmf tpm2-tools strace
    git make build-essential curl ca-certificates acl virtnbdbackup qemu-utils)
need=()
for p in "${pkgs[@]}"; do
    [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = 'install ok installed' ] || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing ${need[*]}"
    "$(dirname "$0")/apt.sh" update
    "$(dirname "$0")/apt.sh" install --no-install-recommends "${need[@]}"
fi
# The daemons started below live on after this script: they must not
# inherit its open files, such as the fd of `flock /run/swk-e2e.lock` that
# the caller holds (a daemon holding it would hold the lock for its life).
for fd in /proc/$$/fd/*; do
    fd=${fd##*/}
    [ "$fd" -gt 2 ] && eval "exec $fd>&-"
done
# /run may be on disk here: a pid file left by a daemon of an earlier boot
# can name a live process and stop rsyslogd from starting.
pidof rsyslogd >/dev/null || { rm -f /run/rsyslogd.pid; rsyslogd; }
pidof virtlogd >/dev/null || virtlogd -d
pidof libvirtd >/dev/null || libvirtd -d
for _ in $(seq 1 60); do
    if virsh -q -c qemu:///system version >/dev/null 2>&1 && [ -S /dev/log ]; then
        exit 0
    fi
    sleep 0.5
done
echo "setup: libvirtd did not answer (or /dev/log is missing) after 30 s" >&2
exit 1

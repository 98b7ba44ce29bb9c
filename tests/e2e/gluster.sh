#!/usr/bin/env bash
# A one-brick GlusterFS volume on this machine, mounted twice: two hosts'
# views of one shared store, for tests/e2e/shared-store.sh and the
# host-loss drill.
#
#   tests/e2e/gluster.sh up     install (if missing), start, mount; idempotent
#   tests/e2e/gluster.sh down   unmount, stop, delete, remove what `up` made
#   tests/e2e/gluster.sh views  print the two mount points, one a line
#
# Only loopback traffic: glusterd is bound to 127.0.0.1 and the brick is
# named by this host's name, which must resolve to a loopback address (the
# script refuses otherwise). Quiet on success; on failure it says what
# failed and shows the end of the relevant gluster log.
#
# Settings (environment):
#   SK_GLUSTER_VOLUME  volume name               (swtpm-keeper-e2e)
#   SK_GLUSTER_DIR     brick, state and logs     (/srv/swtpm-keeper-gluster)
#   SK_GLUSTER_MNT     view1/ and view2/ in here (/mnt/swtpm-keeper-gluster)
set -uo pipefail

VOL=${SK_GLUSTER_VOLUME:-swtpm-keeper-e2e}
DIR=${SK_GLUSTER_DIR:-/srv/swtpm-keeper-gluster}
MNT=${SK_GLUSTER_MNT:-/mnt/swtpm-keeper-gluster}
BRICK=$DIR/brick
STATE=$DIR/state
LOGS=$DIR/log
VIEWS=("$MNT/view1" "$MNT/view2")
HOST=$(hostname)
# Every wait is bounded: glusterd answering, a CLI call, a mount.
WAIT_GLUSTERD=30
CLI_TIMEOUT=60
MOUNT_TIMEOUT=60
here=$(cd "$(dirname "$0")" && pwd)

die() {
    echo "gluster.sh: $*" >&2
    exit 1
}

# The end of a gluster log, to say why something failed.
show_log() {
    [ -f "$1" ] && { echo "--- last lines of $1:" >&2; tail -n 15 "$1" >&2; }
    return 0
}

cli() {
    timeout "$CLI_TIMEOUT" gluster --mode=script "$@"
}

loopback_only() {
    local addrs a
    addrs=$(getent ahosts "$HOST" | awk '{print $1}' | sort -u)
    [ -n "$addrs" ] || die "this host's name '$HOST' does not resolve; the brick is named by it"
    for a in $addrs; do
        case "$a" in
            127.* | ::1) ;;
            *) die "'$HOST' resolves to $a, not loopback: refusing (this test talks over loopback only)" ;;
        esac
    done
}

install_packages() {
    command -v glusterd >/dev/null && command -v mount.glusterfs >/dev/null && return 0
    "$here/apt.sh" install glusterfs-server glusterfs-client \
        || die "cannot install glusterfs-server and glusterfs-client (see apt's errors above)"
}

glusterd_answers() {
    timeout 10 gluster --mode=script volume list >/dev/null 2>&1
}

start_glusterd() {
    glusterd_answers && return 0
    [ -c /dev/fuse ] || die "/dev/fuse is missing: FUSE mounts (mount -t glusterfs) cannot work here"
    mkdir -p "$STATE" "$LOGS"
    # The packaged glusterd.vol listens on every address: bind to loopback.
    sed -e '/transport.socket.listen-port/i\    option transport.socket.bind-address 127.0.0.1' \
        -e 's/^#\? *option transport.address-family.*/    option transport.address-family inet/' \
        /etc/glusterfs/glusterd.vol >"$STATE/glusterd.vol" \
        || die "cannot write $STATE/glusterd.vol"
    glusterd -f "$STATE/glusterd.vol" -p "$STATE/glusterd.pid" -l "$LOGS/glusterd.log" \
        || { show_log "$LOGS/glusterd.log"; die "glusterd did not start"; }
    touch "$STATE/started-glusterd"
    local i
    for ((i = 0; i < WAIT_GLUSTERD * 2; i++)); do
        glusterd_answers && return 0
        sleep 0.5
    done
    show_log "$LOGS/glusterd.log"
    die "glusterd does not answer after ${WAIT_GLUSTERD} s"
}

volume_exists() {
    cli volume info "$VOL" >/dev/null 2>&1
}

volume_started() {
    cli volume info "$VOL" 2>/dev/null | grep -q '^Status: Started'
}

make_volume() {
    if ! volume_exists; then
        mkdir -p "$BRICK" || die "cannot create $BRICK"
        # `force`: the brick is on the root filesystem, which gluster
        # otherwise refuses.
        local out
        out=$(cli volume create "$VOL" "$HOST:$BRICK" force 2>&1) \
            || { show_log "$LOGS/glusterd.log"; die "volume create $VOL $HOST:$BRICK failed: $out"; }
    fi
    if ! volume_started; then
        local out
        out=$(cli volume start "$VOL" 2>&1) \
            || { show_log "$LOGS/glusterd.log"; die "volume start $VOL failed: $out"; }
    fi
}

mount_views() {
    local i v
    for i in 0 1; do
        v=${VIEWS[$i]}
        mountpoint -q "$v" && continue
        mkdir -p "$v" || die "cannot create $v"
        timeout "$MOUNT_TIMEOUT" mount -t glusterfs \
            -o "log-file=$LOGS/view$((i + 1)).log" "$HOST:/$VOL" "$v" \
            || { show_log "$LOGS/view$((i + 1)).log"; die "mount -t glusterfs $HOST:/$VOL $v failed"; }
        mountpoint -q "$v" || { show_log "$LOGS/view$((i + 1)).log"; die "$v is not a mount point after mount"; }
    done
    # Two views of one volume: what one writes, the other reads.
    local probe=".gluster-sh-probe-$$"
    echo "$$" >"${VIEWS[0]}/$probe" || die "cannot write to ${VIEWS[0]}"
    [ "$(cat "${VIEWS[1]}/$probe" 2>/dev/null)" = "$$" ] \
        || { rm -f "${VIEWS[0]}/$probe"; die "${VIEWS[1]} does not see what ${VIEWS[0]} wrote"; }
    rm -f "${VIEWS[0]}/$probe"
}

up() {
    [ "$(id -u)" = 0 ] || die "must run as root (it mounts and runs glusterd)"
    loopback_only
    install_packages
    start_glusterd
    make_volume
    mount_views
}

down() {
    local v rc=0
    for v in "${VIEWS[@]}"; do
        if mountpoint -q "$v"; then
            timeout "$MOUNT_TIMEOUT" umount "$v" || timeout "$MOUNT_TIMEOUT" umount -l "$v" \
                || { echo "gluster.sh: cannot unmount $v" >&2; rc=1; }
        fi
        [ -d "$v" ] && rmdir "$v" 2>/dev/null
    done
    rmdir "$MNT" 2>/dev/null
    if command -v gluster >/dev/null && glusterd_answers && volume_exists; then
        if volume_started; then
            cli volume stop "$VOL" >/dev/null || { echo "gluster.sh: volume stop $VOL failed" >&2; rc=1; }
        fi
        cli volume delete "$VOL" >/dev/null || { echo "gluster.sh: volume delete $VOL failed" >&2; rc=1; }
    fi
    # glusterd only if `up` started it (an operator's own keeps running).
    if [ -f "$STATE/started-glusterd" ] && [ -s "$STATE/glusterd.pid" ]; then
        local pid i
        pid=$(cat "$STATE/glusterd.pid")
        if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = glusterd ]; then
            kill "$pid"
            for ((i = 0; i < 40; i++)); do
                [ "$(cat "/proc/$pid/stat" 2>/dev/null | awk '{print $3}')" = Z ] && break
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.25
            done
            if kill -0 "$pid" 2>/dev/null && [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]; then
                echo "gluster.sh: glusterd ($pid) did not stop within 10 s" >&2
                rc=1
            fi
        fi
    fi
    [ "$rc" = 0 ] || exit 1
    rm -rf "$DIR"
    rm -f "/var/log/glusterfs/bricks/${BRICK#/}.log" "/var/log/glusterfs/bricks/$(echo "${BRICK#/}" | tr / -).log"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    views) printf '%s\n' "${VIEWS[@]}" ;;
    *) echo "usage: gluster.sh up | down | views" >&2; exit 2 ;;
esac

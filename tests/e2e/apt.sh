#!/usr/bin/env bash
# apt-get for the test scripts, made to survive a flaky mirror:
#   tests/e2e/apt.sh update
#   tests/e2e/apt.sh install [apt-get install options] PKG...
# Each download is retried (Acquire::Retries), a held dpkg lock is waited
# for, and a failed install is tried again after a fresh `update` (stale
# lists give 404s). Up to 3 attempts; apt's errors stay on stderr.
set -uo pipefail
export DEBIAN_FRONTEND=noninteractive
apt=(apt-get -o Acquire::Retries=5 -o DPkg::Lock::Timeout=300 -qq)
case "${1:-}" in
    update)
        for i in 1 2 3; do "${apt[@]}" update && exit 0; echo "apt.sh: update failed (attempt $i)" >&2; sleep $((i * 5)); done
        exit 1 ;;
    install)
        shift
        for i in 1 2 3; do
            "${apt[@]}" install -y "$@" >/dev/null && exit 0
            echo "apt.sh: install $* failed (attempt $i)" >&2
            sleep $((i * 5))
            "${apt[@]}" update || true
        done
        exit 1 ;;
    *) echo "usage: apt.sh update | install [options] PKG..." >&2; exit 2 ;;
esac

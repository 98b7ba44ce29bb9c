#!/usr/bin/env bash
# The .deb as Debian builds it: from the release tarball (`make dist`,
# vendored crates) in a clean Debian 12 chroot that holds only
# build-essential, debhelper and Debian's own Rust 1.85 (rustc-web,
# cargo-web), with the network cut. Then the package is what
# tests/e2e/package.sh installs.
#
#   1. make dist; the Debian source package (dpkg-source -b); lintian on it
#   2. the chroot: debootstrap --variant=minbase bookworm from the mirror this
#      host's apt uses, plus the toolchain, cached as a tar in $CACHE
#      (rebuilt when missing or when the package list below changes)
#   3. in a copy of it, under unshare --net: dpkg-source -x,
#      dpkg-checkbuilddeps, cargo test --offline --locked (the root-only
#      tests too), dpkg-buildpackage -b
#   4. the .deb to build/distro/; lintian on it (no errors)
#
# As root. Env: SWTPM_KEEPER_CHROOT_CACHE (default /var/cache/swtpm-keeper),
# SWTPM_KEEPER_DEBIAN_MIRROR (default: the host's bookworm mirror).
set -euo pipefail
TOP=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${SWTPM_KEEPER_CHROOT_CACHE:-/var/cache/swtpm-keeper}
SUITE=bookworm
RUST=1.85
OUT=$TOP/build/distro
[ "$(id -u)" = 0 ] || { echo "distro-build: run as root (debootstrap, chroot, unshare)" >&2; exit 1; }
cd "$TOP"
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
DEBVER=$(dpkg-parsechangelog -l packaging/debian/changelog -S Version)
step() { echo "--- distro-build: $* ($((SECONDS - T0)) s)"; }
T0=$SECONDS

# The first mirror of Debian's main archive that this host's apt lists for
# $SUITE (deb822 .sources, else one-line sources.list).
host_mirror() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -e "$f" ] || continue
        awk -v s="$SUITE" 'BEGIN { RS = ""; FS = "\n" }
            { uri = ""; ok = 0
              for (i = 1; i <= NF; i++) {
                  if ($i ~ /^URIs:/) { split($i, a, /[ \t]+/); uri = a[2] }
                  if ($i ~ /^Suites:/) { n = split($i, b, /[ \t]+/); for (j = 2; j <= n; j++) if (b[j] == s) ok = 1 }
              }
              if (ok && uri != "") { print uri; exit } }' "$f"
    done
    if [ -e /etc/apt/sources.list ]; then
        awk -v s="$SUITE" '$1 == "deb" && $3 == s { print $2 }' /etc/apt/sources.list
    fi
}
MIRROR=${SWTPM_KEEPER_DEBIAN_MIRROR:-$(host_mirror | head -n 1)}
[ -n "$MIRROR" ] || { echo "distro-build: no $SUITE mirror in /etc/apt/sources.list*; set SWTPM_KEEPER_DEBIAN_MIRROR" >&2; exit 1; }

need=()
for p in debootstrap dpkg-dev lintian; do
    [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = 'install ok installed' ] || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    tests/e2e/apt.sh update && tests/e2e/apt.sh install --no-install-recommends "${need[@]}"
fi

# 1. The source package, as a packager uploads it.
make -s dist >/dev/null
rm -rf "$OUT" && mkdir -p "$OUT/src"
cp "build/swtpm-keeper-$VERSION.tar.gz" "$OUT/src/swtpm-keeper_$VERSION.orig.tar.gz"
tar -xzf "build/swtpm-keeper-$VERSION.tar.gz" -C "$OUT/src"
cp -a packaging/debian "$OUT/src/swtpm-keeper-$VERSION/debian"
(cd "$OUT/src" && dpkg-source -q -b "swtpm-keeper-$VERSION" >/dev/null && rm -rf "swtpm-keeper-$VERSION")
DSC=$OUT/src/swtpm-keeper_$DEBVER.dsc
step "source package $(basename "$DSC"), sha256 of the tarball $(sha256sum "build/swtpm-keeper-$VERSION.tar.gz" | cut -c1-16)..."

# 2. The chroot: build-essential and the Build-Depends, nothing else
#    (dpkg-checkbuilddeps checks that these cover them).
# strace and acl: the root-only tests run here too (durability by trace,
# the ACL trust check).
PKGS="build-essential debhelper python3 strace acl rustc-web=$RUST.* cargo-web=$RUST.* libstd-rust-web-dev=$RUST.*"
TARBALL=$CACHE/chroot-$SUITE.tar
KEY="$SUITE $MIRROR $PKGS"
in_root() { # root command...: in the chroot with /proc and /dev, in a private mount namespace
    local r=$1; shift
    unshare --mount --propagation private --fork -- sh -c '
        r=$1; shift
        mount -t proc proc "$r/proc" && mount --rbind /dev "$r/dev" &&
        exec chroot "$r" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
            LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"' sh "$r" "$@"
}
ROOT=
cleanup() {
    [ -n "$ROOT" ] || return 0
    # The mounts lived in the unshared namespace: none may be left here.
    if findmnt -rn -o TARGET | grep -q "^$ROOT/"; then
        echo "distro-build: mounts left under $ROOT; not removing it" >&2
    else
        rm -rf "$ROOT"
    fi
}
trap cleanup EXIT
if [ ! -e "$TARBALL" ] || [ "$(cat "$TARBALL.key" 2>/dev/null)" != "$KEY" ]; then
    step "making the $SUITE chroot from $MIRROR (cached in $TARBALL)"
    mkdir -p "$CACHE"
    ROOT=$(mktemp -d /var/tmp/swtpm-keeper-chroot.XXXXXX)
    chmod 0755 "$ROOT" # its / : apt's _apt and the tests' unprivileged users pass through
    debootstrap --variant=minbase --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
        "$SUITE" "$ROOT" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 ||
        { tail -n 20 "$CACHE/debootstrap.log"; exit 1; }
    # Exactly the Rust of Debian 12's main archive, not a newer one from
    # bookworm-security: $RUST is what Cargo.toml's rust-version promises.
    # shellcheck disable=SC2086
    in_root "$ROOT" sh -c "apt-get -qq -o Acquire::Retries=5 update &&
        apt-get -qq -o Acquire::Retries=5 install -y --no-install-recommends $PKGS >/dev/null &&
        apt-get clean && rm -rf /var/lib/apt/lists/*"
    tar -C "$ROOT" -cf "$TARBALL.tmp" . && mv "$TARBALL.tmp" "$TARBALL"
    echo "$KEY" >"$TARBALL.key"
    rm -rf "$ROOT"
fi
ROOT=$(mktemp -d /var/tmp/swtpm-keeper-chroot.XXXXXX)
tar -C "$ROOT" -xf "$TARBALL"
chmod 0755 "$ROOT"
step "chroot ready: $(in_root "$ROOT" rustc --version), $(in_root "$ROOT" cargo --version)"

# 3. Offline, as a buildd builds. cargo test as root runs the root-only
#    (#[ignore]d) tests too; dh_auto_test would run the others again, so the
#    package build says nocheck.
mkdir -p "$ROOT/build"
cp "$OUT"/src/* "$ROOT/build/"
SRC=/build/swtpm-keeper-$VERSION
run_offline() { # command...: in the chroot, without a network
    unshare --net --mount --propagation private --fork -- sh -c '
        r=$1; shift
        [ "$(grep -c : /proc/net/dev)" = 1 ] || { echo "distro-build: the network is not cut" >&2; exit 1; }
        mount -t proc proc "$r/proc" && mount --rbind /dev "$r/dev" &&
        exec chroot "$r" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
            LANG=C.UTF-8 "$@"' sh "$ROOT" "$@"
}
run_offline sh -c "cd /build && dpkg-source -q -x $(basename "$DSC") >/dev/null && cd $SRC && dpkg-checkbuilddeps"
step "dpkg-checkbuilddeps: ok"
t=$SECONDS
run_offline sh -c "cd $SRC && CARGO_HOME=/build/cargo-home cargo test --offline --locked -- --include-ignored" \
    >"$OUT/cargo-test.log" 2>&1 || { grep -E '^test .*FAILED|panicked|^error' "$OUT/cargo-test.log" | head -n 30; tail -n 5 "$OUT/cargo-test.log"; exit 1; }
step "cargo test --offline --locked in the chroot: $(grep -c '^test .* ok$' "$OUT/cargo-test.log") passed, $((SECONDS - t)) s"
t=$SECONDS
run_offline sh -c "cd $SRC && DEB_BUILD_OPTIONS=nocheck dpkg-buildpackage -b -us -uc" >"$OUT/dpkg-buildpackage.log" 2>&1 ||
    { tail -n 30 "$OUT/dpkg-buildpackage.log"; exit 1; }
step "dpkg-buildpackage -b: $((SECONDS - t)) s"

# 4. The package, out of the chroot, and lintian on the host.
cp "$ROOT"/build/*.deb "$ROOT"/build/*.buildinfo "$ROOT"/build/*.changes "$OUT/"
DEB=$OUT/swtpm-keeper_${DEBVER}_$(dpkg --print-architecture).deb
[ -e "$DEB" ] || { echo "distro-build: $DEB was not built" >&2; exit 1; }
lintian "$DEB" "$DSC" >"$OUT/lintian.log" 2>&1 || true
sed 's/^/    /' "$OUT/lintian.log"
if grep -q '^E:' "$OUT/lintian.log"; then
    echo "distro-build: lintian reports errors" >&2
    exit 1
fi
step "built with Debian's Rust $RUST, offline: $DEB"

#!/usr/bin/env bash
# packaging/dist.sh OUT.tar.gz: the release tarball, as distributions build
# from it: the sources git tracks at HEAD, the crates Cargo.lock pins in
# vendor/, and .cargo/config.toml pointing cargo at them, so that
# `cargo build --offline --locked` needs no network.
#
# Reproducible: the same commit gives the same bytes (every mtime is the
# last commit's time, entries sorted, owner and group 0, modes normalised,
# gzip without name and time). Needs git, cargo (network, to vendor), GNU tar.
set -euo pipefail
out=$(realpath -m "$1")
cd "$(dirname "$0")/.."
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
name=swtpm-keeper-$version
epoch=$(git log -1 --format=%ct HEAD)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

git archive --format=tar --prefix="$name/" HEAD | tar -x -C "$work"
# Vendor from the committed Cargo.lock, never from a re-resolved one.
(cd "$work/$name" && "${CARGO:-cargo}" vendor --locked --versioned-dirs --quiet vendor >/dev/null)
mkdir -p "$work/$name/.cargo"
cat >"$work/$name/.cargo/config.toml" <<'TOML'
# Written by `make dist`: build from the crates in vendor/, never from the
# network (cargo build --offline --locked).
[source.crates-io]
replace-with = "vendored-sources"

[source.vendored-sources]
directory = "vendor"
TOML

mkdir -p "$(dirname "$out")"
# u+rw, go-w, x only where there was one: the umask of the machine that
# vendored does not show in the tarball.
tar -C "$work" --sort=name --format=gnu --mtime="@$epoch" --owner=0 --group=0 \
    --numeric-owner --mode='u+rwX,go=rX' -cf - "$name" | gzip -9 -n >"$out.tmp"
mv "$out.tmp" "$out"
echo "$out"

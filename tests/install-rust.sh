#!/usr/bin/env bash
# Install a Rust toolchain for the tests when the host has none new enough
# (Debian 12's rustc is 1.63; swtpm-keeper needs 1.85): rustup-init from
# static.rust-lang.org, checked against its published SHA-256, minimal
# profile, into $CARGO_HOME/$RUSTUP_HOME (default ~/.cargo, ~/.rustup).
# PATH is not changed; the caller adds ${CARGO_HOME:-~/.cargo}/bin.
set -euo pipefail
TOOLCHAIN=${SWTPM_KEEPER_RUST_TOOLCHAIN:-stable}
url=https://static.rust-lang.org/rustup/dist/x86_64-unknown-linux-gnu/rustup-init
case "$(uname -m)" in
    x86_64) ;;
    aarch64) url=${url/x86_64-unknown-linux-gnu/aarch64-unknown-linux-gnu} ;;
    *) echo "install-rust: no rustup-init for $(uname -m) here; install Rust 1.85+ yourself" >&2; exit 1 ;;
esac
command -v curl >/dev/null || { "$(dirname "$0")/e2e/apt.sh" update && "$(dirname "$0")/e2e/apt.sh" install --no-install-recommends curl ca-certificates; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
curl --proto '=https' --tlsv1.2 -sSf --retry 5 -o "$tmp/rustup-init" "$url"
curl --proto '=https' --tlsv1.2 -sSf --retry 5 -o "$tmp/rustup-init.sha256" "$url.sha256"
# The .sha256 file names the file by its path on the server.
want=$(awk '{print $1}' "$tmp/rustup-init.sha256")
got=$(sha256sum "$tmp/rustup-init" | awk '{print $1}')
[ -n "$want" ] && [ "$want" = "$got" ] || { echo "install-rust: rustup-init checksum mismatch ($got, want $want)" >&2; exit 1; }
chmod +x "$tmp/rustup-init"
"$tmp/rustup-init" -y -q --no-modify-path --profile minimal --component clippy --component rustfmt --default-toolchain "$TOOLCHAIN"
echo "install-rust: $("${CARGO_HOME:-$HOME/.cargo}/bin/cargo" --version)"

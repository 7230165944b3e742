#!/usr/bin/env bash
# Print the ComfyUI checkout to use, provisioning one when none is found.
#
# Found like the tests find it (comfy_path.find_comfyui): $COMFYUI_PATH, the ComfyUI two levels up when this
# pack sits in ComfyUI/custom_nodes/, else ~/comfy/ComfyUI. When none is there it is put into ~/comfy/ComfyUI,
# or into $COMFYUI_PATH when that is set but empty or missing, from, in this order:
#   1. the tarball named by $COMFYUI_ARCHIVE;
#   2. ../shared/vendor/ComfyUI-*.tar.gz beside this checkout (a clean ComfyUI 0.3.64 tree);
#   3. git clone --depth 1 --branch $COMFYUI_REF (default v0.3.64) of Comfy-Org/ComfyUI.
# What it does goes to stderr; stdout is only the path.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${PYTHON:-python3}
ref=${COMFYUI_REF:-v0.3.64}
repo=${COMFYUI_REPO:-https://github.com/comfyanonymous/ComfyUI}

find_existing() {
  "$py" - "$here/comfy_path.py" <<'PY'
import importlib.util, sys
spec = importlib.util.spec_from_file_location("comfy_path", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
try:
    print(mod.find_comfyui())
except mod.ComfyUINotFoundError as e:
    print(e, file=sys.stderr)
    sys.exit(3)
PY
}

if found=$(find_existing 2>/dev/null); then
  echo "$found"
  exit 0
fi

if [ -n "${COMFYUI_PATH:-}" ]; then
  target=$COMFYUI_PATH
  if [ -e "$target" ] && [ -n "$(ls -A "$target" 2>/dev/null)" ]; then
    echo "error: COMFYUI_PATH=$target is neither a ComfyUI checkout (main.py and comfy/) nor empty;" \
         "point it at a ComfyUI or at an empty folder to install one into" >&2
    exit 1
  fi
else
  target="$HOME/comfy/ComfyUI"
fi
mkdir -p "$target"
target=$(cd "$target" && pwd)

unpack() {  # unpack a tarball holding one top-level folder (ComfyUI/) into $target
  local archive=$1 tmp
  tmp=$(mktemp -d "${TMPDIR:-/tmp}/comfyui-unpack.XXXXXX")
  tar -xzf "$archive" -C "$tmp"
  local top
  top=$(find "$tmp" -mindepth 1 -maxdepth 1 -type d | head -n 1)
  if [ -z "$top" ] || [ ! -f "$top/main.py" ]; then
    rm -rf "$tmp"
    echo "error: $archive does not hold a ComfyUI tree (a folder with main.py)" >&2
    exit 1
  fi
  cp -a "$top/." "$target/"
  rm -rf "$tmp"
}

vendor=$(ls "$here"/../shared/vendor/ComfyUI-*.tar.gz 2>/dev/null | sort | tail -n 1 || true)
if [ -n "${COMFYUI_ARCHIVE:-}" ]; then
  echo "ComfyUI: none found; unpacking \$COMFYUI_ARCHIVE=$COMFYUI_ARCHIVE into $target" >&2
  unpack "$COMFYUI_ARCHIVE"
elif [ -n "$vendor" ]; then
  vendor=$(cd "$(dirname "$vendor")" && pwd)/$(basename "$vendor")
  echo "ComfyUI: none found; unpacking $vendor into $target" >&2
  unpack "$vendor"
else
  echo "ComfyUI: none found; cloning $repo at $ref into $target" >&2
  rmdir "$target" 2>/dev/null || true
  git clone --depth 1 --branch "$ref" "$repo" "$target" >&2
fi
if [ ! -f "$target/main.py" ]; then
  echo "error: provisioning ComfyUI into $target failed (no main.py)" >&2
  exit 1
fi
echo "ComfyUI: installed $(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$target/comfyui_version.py" 2>/dev/null) at $target" >&2
echo "$target"

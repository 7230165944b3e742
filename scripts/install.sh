#!/usr/bin/env bash
# Set up everything ComfyUI-SynCD needs: ComfyUI itself when none is found (scripts/provision_comfyui.sh:
# $COMFYUI_ARCHIVE, else ../shared/vendor/ComfyUI-*.tar.gz, else a git clone of v0.3.64), ComfyUI's Python
# requirements (from PyPI), this pack (editable, as `comfyui_syncd`), and with --test the test tools
# (pytest, websocket-client, Playwright + Debian's Chromium).
# ComfyUI is found like the tests find it: $COMFYUI_PATH, the ComfyUI two levels up
# when this pack sits in ComfyUI/custom_nodes/, else ~/comfy/ComfyUI.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${PYTHON:-python3}
with_tests=0
[ "${1:-}" = "--test" ] && with_tests=1

comfy=$(bash "$here/scripts/provision_comfyui.sh")
echo "ComfyUI: $comfy"

# torch and torchvision must be a matching pair; ComfyUI imports torchvision. TORCH_SPEC overrides the pair
# installed when none imports (the default is the pair that is known to import together here).
if ! "$py" -c "import torch, torchvision" >/dev/null 2>&1; then
  # shellcheck disable=SC2086
  "$py" -m pip install ${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
fi
# ComfyUI's own requirements; torch is already there and torchaudio is not needed.
grep -v -E '^\s*(torch|torchvision|torchaudio)\s*$' "$comfy/requirements.txt" > "${TMPDIR:-/tmp}/syncd-comfy-req.txt"
"$py" -m pip install -q -r "${TMPDIR:-/tmp}/syncd-comfy-req.txt"

if [ "$with_tests" = 1 ]; then
  "$py" -m pip install -q -e "$here[test]"
  bash "$here/scripts/install_browser.sh"
else
  "$py" -m pip install -q -e "$here"
fi
echo "ComfyUI-SynCD is installed."

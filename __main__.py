"""``python -m comfyui_syncd``: see :mod:`cli`."""

import sys

from .cli import main

sys.exit(main())

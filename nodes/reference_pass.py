"""Whether the model is running the extra reference forward pass (SynCD §4.2, ``syncd-official-code.md`` §5).

Attention patches read ``transformer_options[REFERENCE_PASS]``; weight wrappers (``ModelPatcher.add_weight_wrapper``,
which see no transformer options) read :func:`in_reference_pass`. Upstream runs this pass with the SynCD LoRA at
scale 0, so the SynCD checkpoint's LoRA wrappers return the base weight while it is set.
"""

from __future__ import annotations

from contextlib import contextmanager

REFERENCE_PASS = "syncd_reference_pass"   # transformer_options flag during the reference pass
REFERENCE_INDEX = "syncd_reference_rows"  # transformer_options: which references the pass rows are (list of int)

_depth = 0


@contextmanager
def reference_pass():
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1


def in_reference_pass() -> bool:
    return _depth > 0

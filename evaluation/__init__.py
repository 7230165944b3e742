"""``python -m comfyui_syncd eval``: customization workflows scored on a DreamBooth-style benchmark with the metrics
of SynCD Table 1 and JeDi Table 2 (:mod:`evaluation.driver`; the metrics are :mod:`core.metrics`)."""

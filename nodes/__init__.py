"""ComfyUI adapters (V3 nodes). Thin: the math lives in ``attention/``."""

from comfy_api.latest import ComfyExtension, io

from .demo import SynCDTinyDemoModel, SynCDTinyDemoTextEncode
from .shared_attention_node import SynCDSharedAttention

NODES = [SynCDSharedAttention, SynCDTinyDemoModel, SynCDTinyDemoTextEncode]


class SynCDExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)

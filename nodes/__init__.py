"""ComfyUI adapters (V3 nodes). Thin: the math lives in ``attention/``."""

from comfy_api.latest import ComfyExtension, io

from .demo import SynCDTinyDemoModel, SynCDTinyDemoReferences, SynCDTinyDemoTextEncode
from .guiders import JeDiImageGuider, SynCDCustomizationSampler, SynCDNormalizedGuider
from .jedi import JeDiJointImageSet
from .reference_nodes import SynCDApplyReferences, SynCDReferenceImages
from .shared_attention_node import SynCDSharedAttention

NODES = [SynCDSharedAttention, SynCDReferenceImages, SynCDApplyReferences, SynCDNormalizedGuider, JeDiImageGuider,
         SynCDCustomizationSampler, JeDiJointImageSet, SynCDTinyDemoModel, SynCDTinyDemoTextEncode,
         SynCDTinyDemoReferences]


class SynCDExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)

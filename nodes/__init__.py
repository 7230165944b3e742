"""ComfyUI adapters (V3 nodes). Thin: the math lives in ``attention/``."""

from comfy_api.latest import ComfyExtension, io

from .demo import SynCDTinyDemoIPAdapter, SynCDTinyDemoModel, SynCDTinyDemoReferences, SynCDTinyDemoTextEncode
from .guiders import JeDiImageGuider, SynCDCustomizationSampler, SynCDNormalizedGuider
from .ip_adapter import SynCDIPAdapterApply, SynCDIPAdapterLoader
from .jedi import JeDiJointImageSet
from .reference_nodes import SynCDApplyReferences, SynCDReferenceImages
from .shared_attention_node import SynCDSharedAttention
from .syncd_checkpoint import SynCDCheckpointLoader

NODES = [SynCDSharedAttention, SynCDReferenceImages, SynCDApplyReferences, SynCDNormalizedGuider, JeDiImageGuider,
         SynCDCustomizationSampler, JeDiJointImageSet, SynCDIPAdapterLoader, SynCDIPAdapterApply,
         SynCDCheckpointLoader, SynCDTinyDemoModel, SynCDTinyDemoTextEncode, SynCDTinyDemoReferences,
         SynCDTinyDemoIPAdapter]


class SynCDExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)

"""ComfyUI adapters (V3 nodes). Thin: the math lives in ``attention/`` and ``core/``; patches are built from
``patch_kit``. The demo nodes live in ``demo/`` and are registered beside these by the pack's entry point."""

from .dci_nodes import DCIDualBranch, DCIGuiderNode, DCIWeightMaps
from .guiders import JeDiImageGuider, SynCDCustomizationSampler, SynCDNormalizedGuider
from .identity_score import SynCDIdentityScore
from .ip_adapter import SynCDIPAdapterApply, SynCDIPAdapterLoader
from .jedi import JeDiJointImageSet
from .reference_nodes import SynCDApplyReferences, SynCDReferenceImages
from .shared_attention_node import SynCDSharedAttention
from .syncd_checkpoint import SynCDCheckpointLoader

NODES = [SynCDSharedAttention, SynCDReferenceImages, SynCDApplyReferences, SynCDNormalizedGuider, JeDiImageGuider,
         SynCDCustomizationSampler, JeDiJointImageSet, SynCDIPAdapterLoader, SynCDIPAdapterApply,
         SynCDCheckpointLoader, DCIDualBranch, DCIGuiderNode, DCIWeightMaps, SynCDIdentityScore]

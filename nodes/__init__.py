"""ComfyUI adapters (V3 nodes). Thin: the math lives in ``attention/`` and ``core/``; patches are built from
``patch_kit``. The demo nodes live in ``demo/`` and are registered beside these by the pack's entry point."""

from .automatic_masks import SynCDAutomaticMasks
from .dci_nodes import DCIDualBranch, DCIGuiderNode, DCIWeightMaps
from .feature_warp import SynCDFeatureWarp, SynCDLoadCorrespondences
from .guiders import JeDiImageGuider, SynCDCustomizationSampler, SynCDNormalizedGuider
from .dataset_writer import SynCDDatasetWriter
from .identity_score import SynCDAestheticScore, SynCDIdentityModelLoader, SynCDIdentityScore
from .ip_adapter import SynCDIPAdapterApply, SynCDIPAdapterLoader
from .jedi import JeDiJointImageSet
from .jedi_checkpoint import JeDiCheckpointLoader
from .mesh_views import SynCDMeshViews
from .prompt_batch import SynCDPromptBatch
from .reference_nodes import SynCDApplyReferences, SynCDReferenceImages
from .shared_attention_node import SynCDSharedAttention
from .syncd_checkpoint import SynCDCheckpointLoader

NODES = [SynCDSharedAttention, SynCDReferenceImages, SynCDApplyReferences, SynCDNormalizedGuider, JeDiImageGuider,
         SynCDCustomizationSampler, JeDiJointImageSet, SynCDIPAdapterLoader, SynCDIPAdapterApply,
         SynCDCheckpointLoader, JeDiCheckpointLoader, DCIDualBranch, DCIGuiderNode, DCIWeightMaps,
         SynCDIdentityModelLoader, SynCDIdentityScore, SynCDAestheticScore, SynCDDatasetWriter,
         SynCDMeshViews, SynCDFeatureWarp, SynCDLoadCorrespondences, SynCDAutomaticMasks, SynCDPromptBatch]

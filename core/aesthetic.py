"""LAION aesthetic score (SynCD data filtering, upstream ``dataset/cal_scores.py``), pure torch.

Upstream: the LAION-AI aesthetic predictor ``sa_0_4_vit_l_14_linear.pth`` — a single ``nn.Linear(768, 1)`` — applied
to the L2-normalised CLIP ViT-L/14 image embedding of the whole image (resize the short side to 224 bicubic, centre
crop 224, CLIP normalisation). Here the CLIP model is transformers' ``CLIPVisionModelWithProjection`` (its
``image_embeds`` are OpenAI CLIP's ``encode_image``) and the image features are :func:`core.identity.features`'s, so
the preprocessing is written once. Scores are roughly 1–10 (the paper keeps images above 6).
"""

from __future__ import annotations

import pathlib

import torch

from .identity import features

HEAD_FILE = "sa_0_4_vit_l_14_linear.pth"  # upstream's file name (LAION-AI/aesthetic-predictor)


class AestheticHeadError(ValueError):
    """A head file that is not a single linear layer's state dict (the message names the file and what is wrong)."""


def load_head(path) -> torch.nn.Linear:
    """The LAION linear head from ``path``: a ``.pth``/``.pt`` state dict (read with ``weights_only=True``) or a
    ``.safetensors`` file, holding ``weight`` (1, D) and ``bias`` (1,)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"aesthetic head {path} does not exist (upstream: {HEAD_FILE} from "
                                f"github.com/LAION-AI/aesthetic-predictor)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # a pickle with more than tensors, or not a torch file
            raise AestheticHeadError(f"{path.name}: not a plain state dict readable with "
                                     f"torch.load(weights_only=True) ({exc})") from None
    if not isinstance(state, dict) or set(state) != {"weight", "bias"}:
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise AestheticHeadError(f"{path.name}: expected the state dict of one nn.Linear (keys 'weight', 'bias'), "
                                 f"found {keys}")
    weight, bias = state["weight"], state["bias"]
    if weight.ndim != 2 or weight.shape[0] != 1 or tuple(bias.shape) != (1,):
        raise AestheticHeadError(f"{path.name}: weight {tuple(weight.shape)} / bias {tuple(bias.shape)}; expected "
                                 f"(1, D) / (1,) (D = 768 for CLIP ViT-L/14)")
    head = torch.nn.Linear(weight.shape[1], 1)
    head.load_state_dict({"weight": weight.float(), "bias": bias.float()})
    return head.eval()


@torch.no_grad()
def aesthetic_scores(clip_model, head: torch.nn.Linear, images: torch.Tensor) -> torch.Tensor:
    """(B,) LAION aesthetic scores of (B, H, W, 3) images in [0, 1]: ``head`` on the L2-normalised CLIP image
    embedding of the whole image (upstream ``cal_scores.py``)."""
    dim = clip_model.config.projection_dim
    if head.in_features != dim:
        raise AestheticHeadError(f"the aesthetic head takes {head.in_features}-dim embeddings but the CLIP model gives "
                                 f"{dim}; use the head of this CLIP (ViT-L/14: sa_0_4_vit_l_14_linear, 768)")
    embeds = features(clip_model, images, None, "clip")
    return head.float().cpu()(embeds)[:, 0]

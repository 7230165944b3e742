"""Identity scores between generated and reference images: MDINOv2-I, DINOv2-I, CLIP-I and DINO (pure torch).

* **MDINOv2-I** (SynCD §5 and supp.): both images cropped to the square around the object mask with the
  background masked, DINOv2 CLS features, cosine similarity.
* **DINOv2 filtering** (SynCD data generation, ``cal_scores.py``): the same crop without masking pixels; a
  square around the mask's bounding box (pixels > 0.1), zero-padded where it leaves the image, the mask inverted
  first when its box covers the whole image; resize 256, centre crop 224, ImageNet normalisation; CLS L2-normalised.
* **CLIP-I**: CLIP image embeddings (224, CLIP normalisation), cosine. **DINO**: DINO ViT CLS features (DreamBooth).

The data-generation filter's keep rule built on these features is ``core/filtering.py``; the LAION aesthetic score
(CLIP embedding + linear head) ``core/aesthetic.py``. Resizing is bicubic with antialiasing, as torchvision's
``Resize`` on the PIL images upstream scores.

Feature extractors are transformers models (``Dinov2Model``, ``CLIPVisionModelWithProjection``, ``ViTModel``);
images are (B, H, W, 3) floats in [0, 1] (ComfyUI's IMAGE layout), masks (B, H, W).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def square_box(mask: torch.Tensor, threshold: float = 0.1) -> tuple[int, int, int, int]:
    """(top, left, size, size) of the square around the bounding box of the mask's pixels > ``threshold``, centred
    on it (upstream crop). A box covering the whole image is taken from the inverted mask; an empty mask gives the
    centred square of the whole image."""
    h, w = mask.shape
    fg = mask > threshold

    def bbox(m):
        ys, xs = torch.nonzero(m, as_tuple=True)
        return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1

    if fg.any() and bbox(fg) == (0, h, 0, w):
        fg = ~fg
    if not fg.any():
        side = min(h, w)
        return (h - side) // 2, (w - side) // 2, side, side
    y0, y1, x0, x1 = bbox(fg)
    side = max(y1 - y0, x1 - x0)
    cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
    return cy - side // 2, cx - side // 2, side, side


def crop_object(image: torch.Tensor, mask: Optional[torch.Tensor], mask_background: bool) -> torch.Tensor:
    """(H, W, 3) → the square crop around the object, zero-padded outside the image; background zeroed if asked."""
    if mask is None:
        return image
    top, left, side, _ = square_box(mask)
    h, w = mask.shape
    if mask_background:
        image = image * (mask > 0.5).unsqueeze(-1).to(image.dtype)
    out = image.new_zeros(side, side, 3)
    ys, xs = slice(max(top, 0), min(top + side, h)), slice(max(left, 0), min(left + side, w))
    out[ys.start - top:ys.stop - top, xs.start - left:xs.stop - left] = image[ys, xs]
    return out


def to_model_input(crops: list[torch.Tensor], resize: int, crop: int, stats) -> torch.Tensor:
    """Square crops → (B, 3, crop, crop): bicubic resize of the short side to ``resize``, centre crop, normalise."""
    mean, std = (torch.tensor(s).view(1, 3, 1, 1) for s in stats)
    batch = []
    for c in crops:
        x = c.permute(2, 0, 1).unsqueeze(0).float()
        h, w = x.shape[-2:]
        # torchvision Resize(resize): short side to ``resize``, long side int(resize · long / short)
        size = (resize, int(resize * w / h)) if h <= w else (int(resize * h / w), resize)
        x = F.interpolate(x, size=(max(crop, size[0]), max(crop, size[1])), mode="bicubic", align_corners=False,
                          antialias=True).clamp(0, 1)
        top, left = int(round((x.shape[-2] - crop) / 2.0)), int(round((x.shape[-1] - crop) / 2.0))  # CenterCrop
        batch.append(x[..., top:top + crop, left:left + crop])
    return (torch.cat(batch) - mean) / std


@torch.no_grad()
def features(model, images: torch.Tensor, masks: Optional[torch.Tensor], kind: str,
             mask_background: bool = True) -> torch.Tensor:
    """L2-normalised (B, D) features: ``kind`` "dinov2" (CLS after the final norm), "clip" (projected image embeds)
    or "dino" (ViT CLS)."""
    crops = [crop_object(images[i], None if masks is None else masks[i], mask_background)
             for i in range(images.shape[0])]
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    if kind == "clip":
        x = to_model_input(crops, 224, 224, CLIP).to(device, dtype)
        out = model(pixel_values=x).image_embeds
    else:
        x = to_model_input(crops, 256, 224, IMAGENET).to(device, dtype)
        result = model(pixel_values=x)
        out = result.pooler_output if kind == "dinov2" else result.last_hidden_state[:, 0]
    return F.normalize(out.float(), dim=-1).cpu()


def identity_scores(generated: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Per generated image: the mean cosine similarity of its feature to the references' features."""
    return (generated @ references.T).mean(-1)

"""Customization benchmark metrics of SynCD (Table 1, App. C.4) and JeDi (Table 2), pure torch.

The models are transformers models (and their processors) loaded by the caller; images are (H, W, 3) floats in
[0, 1] (ComfyUI's IMAGE layout), masks (H, W). Feature extraction and the square crop are :mod:`core.identity`'s.

* **MDINOv2-I** (SynCD §5, App. C.4): the object is detected from its class phrase, segmented by SAM from the
  detected box, the background masked and the image cropped around the mask, in the generated and the reference
  images alike; the DINOv2 cosine similarity to the references. SynCD detects with Detic and falls back to
  Grounding DINO; transformers has no Detic, so Grounding DINO is the detector here (:func:`detect_box`).
* **CLIP-I**, **DINO** (DreamBooth, JeDi §4): cosine of CLIP image embeddings / DINO ViT CLS between generated and
  reference images, whole images; **MCLIP-I**, **MDINO** (JeDi §4): the same on the masked crops.
* **CLIP-T** (JeDi §4; "CLIPScore" [57] in SynCD's tables, which report the plain cosine, not 2.5·cos): cosine
  between the CLIP image embedding and the CLIP text embedding of the prompt with the class word.
* **TIFA** (Hu et al. 2023): a VQA model answers multiple-choice questions about the prompt; the score is the
  fraction answered as the question's answer (:func:`tifa_score`).
* **GeometricScore** (SynCD §5, after [82]): √(TIFA · MDINOv2-I) of the benchmark means (:func:`geometric_score`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .identity import features, identity_scores

BOX_THRESHOLD = 0.35  # Grounding DINO's demo default (a query counts when its best token logit passes it)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(H, W, 3) float in [0, 1] → (H, W, 3) uint8, as transformers' image processors take images."""
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def _device(model) -> torch.device:
    return next(model.parameters()).device


# -- object masks (MDINOv2-I, MCLIP-I, MDINO) -------------------------------------------------------------------
@torch.no_grad()
def detect_box(detector, processor, image: torch.Tensor, phrase: str,
               box_threshold: float = BOX_THRESHOLD) -> Optional[tuple[float, float, float, float]]:
    """The (x0, y0, x1, y1) pixel box of ``phrase`` in ``image`` by Grounding DINO (``GroundingDinoForObjectDetection``
    and its processor), or None when no query's score reaches ``box_threshold``.

    As Grounding DINO's own inference: the text is lower case and ends with '.', a query's score is its highest
    token probability (sigmoid of the logits), boxes are (cx, cy, w, h) relative to the image. The best query wins
    (SynCD App. C.4 takes one box per image as SAM's prompt)."""
    text = phrase.lower().strip().rstrip(".") + "."
    inputs = processor(images=to_uint8(image), text=text, return_tensors="pt").to(_device(detector))
    out = detector(**inputs)
    scores = out.logits[0].sigmoid().max(-1).values  # (queries,)
    best = int(scores.argmax())
    if float(scores[best]) < box_threshold:
        return None
    cx, cy, w, h = out.pred_boxes[0, best].float().cpu().tolist()
    height, width = image.shape[:2]
    x0, y0 = max(0.0, (cx - w / 2) * width), max(0.0, (cy - h / 2) * height)
    x1, y1 = min(float(width), (cx + w / 2) * width), min(float(height), (cy + h / 2) * height)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


@torch.no_grad()
def segment(sam, processor, image: torch.Tensor, box: Sequence[float]) -> torch.Tensor:
    """(H, W) float {0, 1} mask of the object in ``box`` by SAM (``SamModel`` + ``SamProcessor``), one mask
    (``multimask_output=False``, as SAM's predictor is used with a box prompt)."""
    inputs = processor(images=to_uint8(image), input_boxes=[[list(map(float, box))]], return_tensors="pt")
    out = sam(pixel_values=inputs["pixel_values"].to(_device(sam), next(sam.parameters()).dtype),
              input_boxes=inputs["input_boxes"].to(_device(sam)), multimask_output=False)
    masks = processor.image_processor.post_process_masks(out.pred_masks.float().cpu(), inputs["original_sizes"],
                                                         inputs["reshaped_input_sizes"])
    return masks[0][0, 0].float()


def object_mask(image: torch.Tensor, phrase: str, detector, detector_processor, sam, sam_processor,
                box_threshold: float = BOX_THRESHOLD) -> Optional[torch.Tensor]:
    """SynCD App. C.4: the detected box of ``phrase`` as SAM's prompt → the object's (H, W) mask; None when
    nothing is detected or SAM's mask is empty."""
    box = detect_box(detector, detector_processor, image, phrase, box_threshold)
    if box is None:
        return None
    mask = segment(sam, sam_processor, image, box)
    return mask if bool((mask > 0.5).any()) else None


# -- image and text similarities --------------------------------------------------------------------------------
def image_features(model, images: Sequence[torch.Tensor], kind: str,
                   masks: Optional[Sequence[Optional[torch.Tensor]]] = None) -> torch.Tensor:
    """L2-normalised features of images of any sizes (:func:`core.identity.features` one by one): ``kind`` dinov2,
    clip or dino; with ``masks`` (None entries: the whole image) the square crop around the mask, background
    zeroed (SynCD's MDINOv2-I input, JeDi's masked metrics)."""
    rows = []
    for i, image in enumerate(images):
        mask = None if masks is None else masks[i]
        rows.append(features(model, image.unsqueeze(0), None if mask is None else mask.unsqueeze(0), kind,
                             mask_background=True))
    return torch.cat(rows)


def similarity_to_references(generated: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Per generated image, the mean cosine of its feature to the references' (DreamBooth's CLIP-I / DINO, SynCD's
    MDINOv2-I: the average over the reference images)."""
    return identity_scores(generated, references)


@torch.no_grad()
def text_features(text_model, tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """L2-normalised CLIP text embeddings (``CLIPTextModelWithProjection.text_embeds``), texts truncated to the
    model's context (77 tokens for CLIP)."""
    max_length = getattr(text_model.config, "max_position_embeddings", 77)
    tokens = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    out = text_model(input_ids=tokens["input_ids"].to(_device(text_model)),
                     attention_mask=tokens["attention_mask"].to(_device(text_model)))
    return F.normalize(out.text_embeds.float(), dim=-1).cpu()


def clip_t(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """CLIP-T (JeDi §4, SynCD's CLIPScore column): row-wise cosine of L2-normalised CLIP image and text
    embeddings, image i with text i."""
    return (image_feats * text_feats).sum(-1)


def geometric_score(tifa: float, mdinov2_i: float) -> float:
    """SynCD §5: GeometricScore = √(TIFA · MDINOv2-I), the geometric mean of text and image alignment ([82]).
    SynCD Table 1 takes it of the benchmark means (e.g. TIFA 0.902, MDINOv2-I 0.777 / 0.708 over 510 background
    and 240 property prompts → 0.825); a negative mean similarity counts as 0."""
    return math.sqrt(max(tifa * mdinov2_i, 0.0))


# -- TIFA -------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Question:
    """One TIFA question (the fields of TIFA's ``tifa_v1.0_question_answers.json``)."""
    question: str
    choices: tuple
    answer: str
    element_type: str = ""

    def __post_init__(self):
        if self.answer not in self.choices:
            raise ValueError(f"TIFA question {self.question!r}: answer {self.answer!r} is not among its choices "
                             f"{list(self.choices)}")


@torch.no_grad()
def choice_log_likelihoods(vqa, processor, image: torch.Tensor, question: str,
                           choices: Sequence[str]) -> torch.Tensor:
    """Per choice, the sum of the answer decoder's token log-probabilities of ``[bos] choice [sep]`` given the image
    and the question (``BlipForQuestionAnswering``: vision model → question encoder over the image → answer
    decoder), i.e. BLIP's 'rank' VQA inference over a closed answer set."""
    device = _device(vqa)
    inputs = processor(images=to_uint8(image), text=question, return_tensors="pt").to(device)
    vision = vqa.vision_model(pixel_values=inputs["pixel_values"].to(next(vqa.parameters()).dtype)).last_hidden_state
    vision_mask = torch.ones(vision.shape[:-1], dtype=torch.long, device=device)
    encoded = vqa.text_encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                               encoder_hidden_states=vision, encoder_attention_mask=vision_mask).last_hidden_state
    config = vqa.config.text_config
    tokenizer = processor.tokenizer
    rows = [[config.bos_token_id, *tokenizer(c, add_special_tokens=False)["input_ids"], config.sep_token_id]
            for c in choices]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), config.pad_token_id, dtype=torch.long, device=device)
    attention = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, device=device)
        attention[i, :len(row)] = 1
    n = len(rows)
    logits = vqa.text_decoder(input_ids=ids, attention_mask=attention,
                              encoder_hidden_states=encoded.expand(n, -1, -1),
                              encoder_attention_mask=inputs["attention_mask"].expand(n, -1)).logits
    logp = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (logp * attention[:, 1:]).sum(-1).cpu()


def answer(vqa, processor, image: torch.Tensor, question: Question) -> str:
    """The choice the VQA model ranks highest (:func:`choice_log_likelihoods`)."""
    scores = choice_log_likelihoods(vqa, processor, image, question.question, question.choices)
    return question.choices[int(scores.argmax())]


def tifa_score(vqa, processor, image: torch.Tensor, questions: Sequence[Question]) -> tuple[float, list[str]]:
    """TIFA (Hu et al. 2023, eq. 1): the fraction of the prompt's questions whose VQA answer is the question's
    answer; returns (score, the answers given). TIFA answers free-form with mPLUG and maps the answer to a choice
    by SBERT similarity; here the VQA model ranks the choices itself (:func:`choice_log_likelihoods`)."""
    if not questions:
        raise ValueError("TIFA needs at least one question for the prompt")
    given = [answer(vqa, processor, image, q) for q in questions]
    return sum(g == q.answer for g, q in zip(given, questions)) / len(questions), given

"""Tiny metric models for ``python -m comfyui_syncd eval``: transformers' real classes (DINOv2, CLIP, DINO ViT,
Grounding DINO, SAM, BLIP VQA) at tiny width with seeded random weights, written as local model folders that the
command loads exactly as it loads real checkpoints. The scores they give are meaningless; they exist so the command
and its tests run anywhere, without downloads (the tokenizers are character-level vocabularies built here).

``python -m comfyui_syncd.demo.eval_models DIR`` writes them and prints the eval flags that use them.
No ComfyUI import.
"""

from __future__ import annotations

import pathlib
import string
import sys
from typing import Optional

import torch

KINDS = ("dinov2", "clip", "dino", "detector", "segmenter", "vqa")
FLAGS = {"dinov2": "--dinov2", "clip": "--clip", "dino": "--dino", "detector": "--detector",
         "segmenter": "--segmenter", "vqa": "--vqa"}
CHARS = string.ascii_lowercase + string.digits + ".,'-!?"
BERT_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]


def _random_weights(net: torch.nn.Module, std: float = 0.3) -> torch.nn.Module:
    """Weights of std ``std`` (not the default 0.02), so that different images get clearly different features."""
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim >= 2:
                p.normal_(0, std)
    return net.eval()


def bert_tokenizer():
    """A lower-casing WordPiece tokenizer over single characters (``d ##o ##g``) with BLIP's ``[DEC]`` bos token."""
    import transformers

    vocab = {token: i for i, token in enumerate(BERT_SPECIAL + list(CHARS) + ["##" + c for c in CHARS])}
    tokenizer = transformers.BertTokenizer(vocab=vocab)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer


def clip_tokenizer():
    """A CLIP BPE tokenizer with no merges: every character is a token (``</w>`` ends a word)."""
    import transformers

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in list(CHARS) + [c + "</w>" for c in CHARS]:
        vocab.setdefault(token, len(vocab))
    return transformers.CLIPTokenizer(vocab=vocab, merges=[])


def build(kind: str, seed: int = 0):
    """(model, processor or tokenizer or None) of a tiny ``kind`` (one of :data:`KINDS`)."""
    import transformers as T

    torch.manual_seed(seed)
    if kind == "dinov2":
        return _random_weights(T.Dinov2Model(T.Dinov2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=224,
            patch_size=14))), None
    if kind == "dino":
        return _random_weights(T.ViTModel(T.ViTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=224,
            patch_size=16))), None
    if kind == "clip":
        tokenizer = clip_tokenizer()
        layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        config = T.CLIPConfig(
            text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                             pad_token_id=1, projection_dim=16, **layers),
            vision_config=dict(image_size=224, patch_size=32, projection_dim=16, **layers), projection_dim=16)
        return _random_weights(T.CLIPModel(config)), tokenizer
    if kind == "detector":
        tokenizer = bert_tokenizer()
        config = T.GroundingDinoConfig(
            backbone_config=T.SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4,
                                         image_size=128, out_features=["stage2", "stage3", "stage4"]),
            text_config=T.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64),
            d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
            encoder_attention_heads=2, decoder_attention_heads=2, num_queries=10, num_feature_levels=4,
            encoder_n_points=2, decoder_n_points=2, max_text_len=32)
        processor = T.GroundingDinoProcessor(
            image_processor=T.GroundingDinoImageProcessor(size={"shortest_edge": 128, "longest_edge": 128}),
            tokenizer=tokenizer)
        return T.GroundingDinoForObjectDetection(config).eval(), processor
    if kind == "segmenter":
        config = T.SamConfig(
            vision_config=T.SamVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                                            patch_size=8, output_channels=16, window_size=4, global_attn_indexes=[1],
                                            mlp_dim=64, num_pos_feats=8),
            prompt_encoder_config=T.SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=8,
                                                           mask_input_channels=4),
            mask_decoder_config=T.SamMaskDecoderConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                                       mlp_dim=32, iou_head_hidden_dim=16))
        processor = T.SamProcessor(image_processor=T.SamImageProcessor(size={"longest_edge": 64},
                                                                       pad_size={"height": 64, "width": 64}))
        return _random_weights(T.SamModel(config)), processor
    if kind == "vqa":
        tokenizer = bert_tokenizer()
        config = T.BlipConfig(
            text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, encoder_hidden_size=32, max_position_embeddings=64,
                             bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
                             pad_token_id=tokenizer.pad_token_id),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=32, patch_size=8),
            projection_dim=16)
        processor = T.BlipProcessor(image_processor=T.BlipImageProcessor(size={"height": 32, "width": 32}),
                                    tokenizer=tokenizer)
        return _random_weights(T.BlipForQuestionAnswering(config)), processor
    raise ValueError(f"tiny eval model kind {kind!r}; choose one of {', '.join(KINDS)}")


def write_tiny_models(root, kinds=KINDS, seed: int = 0) -> dict[str, pathlib.Path]:
    """Save tiny ``kinds`` under ``root/<kind>`` (``save_pretrained`` of the model and its processor); returns the
    folders by kind."""
    root = pathlib.Path(root)
    folders = {}
    for kind in kinds:
        model, processor = build(kind, seed)
        folder = root / kind
        model.save_pretrained(folder)
        if processor is not None:
            processor.save_pretrained(folder)
        folders[kind] = folder
    return folders


def main(argv: Optional[list] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m comfyui_syncd.demo.eval_models DIR  (writes tiny random metric models)",
              file=sys.stderr)
        return 2
    folders = write_tiny_models(argv[0])
    print(" ".join(f"{FLAGS[kind]} {folder}" for kind, folder in folders.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

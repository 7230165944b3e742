"""The toy world's trained text-to-image model in ComfyUI: MODEL, CLIP and VAE built through ComfyUI's own classes.

The file (``toyworld/weights/toy_sd15.safetensors``, :func:`comfyui_syncd.toyworld.base_model.export_file`) holds
the diffusers UNet, VAE and transformers CLIP text encoder with their configs; here they become what a ComfyUI
SD1.5 checkpoint gives: the UNet through ``comfy.supported_models.SD15`` with its ComfyUI ``unet_config`` and
keys (the JeDi loader's conversion), the CLIP as ``SD1ClipModel`` over a ``SDClipModel`` of the file's text config
(ComfyUI's CLIP-L tokenizer: the toy model was trained on its tokens), the VAE as ComfyUI's ``AutoencoderKL`` of the
file's layout (8× down) with keys converted by ``comfy.diffusers_convert``.

A depth-conditioned toy model (``toyworld reproduce`` stage ``depth_model``: twice the latent channels in) becomes
``comfy.supported_models.SD15_instructpix2pix``, the model ``InstructPixToPixConditioning`` feeds: the depth image's
VAE latent, unscaled, concatenated to the noisy latent, as it was trained.
"""

from __future__ import annotations

import functools
import pathlib

import torch
from comfy_api.latest import io, ui

import comfy.diffusers_convert
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base
import folder_paths

from ..nodes import choices, model_folders
from ..nodes.jedi_checkpoint import comfy_unet_config, convert_keys
from ..nodes.mesh_views import Correspondences
from ..nodes.patch_kit import TOKENIZER
from ..toyworld import base_model, scene as S
from .tiny_models import token_ids

SHIPPED = pathlib.Path(__file__).resolve().parent.parent / "toyworld" / "weights" / "toy_sd15.safetensors"
NAME = "SynCD toy-world model"
FOLDER = "syncd_toyworld"       # models/syncd_toyworld: toy models of your own reproduce runs
SHIPPED_CHOICE = "toy_sd15 (shipped)"
SHIPPED_DEPTH = SHIPPED.with_name("toy_sd15_depth.safetensors")
SHIPPED_DEPTH_CHOICE = "toy_sd15_depth (shipped)"
SHIPPED_FILES = {SHIPPED_CHOICE: SHIPPED, SHIPPED_DEPTH_CHOICE: SHIPPED_DEPTH}


def register_folder() -> None:
    model_folders.register(FOLDER, {".safetensors"})


register_folder()


def available(path=SHIPPED) -> bool:
    return pathlib.Path(path).is_file()


def build_unet(state: dict, config: dict) -> comfy.model_patcher.ModelPatcher:
    unet_config = comfy_unet_config(config, dtype=torch.float32)
    concat = unet_config["in_channels"] == 2 * unet_config["out_channels"]   # depth-conditioned (concat) model
    model_config = (comfy.supported_models.SD15_instructpix2pix if concat else comfy.supported_models.SD15)(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    converted = convert_keys(state, unet_config, NAME)
    expected = set(model.diffusion_model.state_dict())
    if expected != set(converted):
        raise ValueError(f"{NAME}: the UNet weights do not fill the model (missing {sorted(expected - set(converted))[:4]}"
                         f", unexpected {sorted(set(converted) - expected)[:4]})")
    model.load_model_weights(converted, "")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    patcher.model_options[TOKENIZER] = token_ids   # CLIP-L tokens: automatic masks find the subject word
    return patcher


def build_clip(state: dict, config: dict) -> comfy.sd.CLIP:
    params = {"clip_model": comfy.sd1_clip.SDClipModel, "textmodel_json_config": dict(config),
              "return_projected_pooled": False}
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    target.params = params
    clip = comfy.sd.CLIP(target, model_options={"dtype": torch.float32})
    # transformers 4.x keys start with "text_model." (5.x: the CLIPTextModel is the text model); ComfyUI's have it
    weights = {f"clip_l.transformer.{k if k.startswith('text_model.') else 'text_model.' + k}": v
               for k, v in state.items()}
    missing, unexpected = clip.load_sd(weights, full_model=True)
    missing = [k for k in missing if not k.endswith(("position_ids", "logit_scale", "text_projection.weight"))]
    if missing or unexpected:
        raise ValueError(f"{NAME}: the text encoder weights do not fit (missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]})")
    return clip


def build_vae(state: dict, config: dict) -> comfy.sd.VAE:
    channels = [int(c) for c in config["block_out_channels"]]
    ddconfig = {"double_z": True, "z_channels": int(config["latent_channels"]), "resolution": int(config["sample_size"]),
                "in_channels": int(config["in_channels"]), "out_ch": int(config["out_channels"]), "ch": channels[0],
                "ch_mult": [c // channels[0] for c in channels], "num_res_blocks": int(config["layers_per_block"]),
                "attn_resolutions": [], "dropout": 0.0}
    sd = comfy.diffusers_convert.convert_vae_state_dict(state)
    vae = comfy.sd.VAE(sd=sd, config={"params": {"embed_dim": ddconfig["z_channels"], "ddconfig": ddconfig}},
                       dtype=torch.float32)
    ratio = 2 ** (len(channels) - 1)
    if ratio != vae.downscale_ratio:
        raise ValueError(f"{NAME}: the VAE downscales {ratio}×; ComfyUI's SD1.5 latents are 8× smaller than images")
    return vae


@functools.lru_cache(maxsize=2)
def load(path=SHIPPED) -> tuple[comfy.model_patcher.ModelPatcher, comfy.sd.CLIP, comfy.sd.VAE]:
    """(MODEL, CLIP, VAE) of a toy-world model file."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{NAME}: {path} does not exist; train it with 'python -m comfyui_syncd toyworld "
                                f"reproduce'")
    states, configs, _ = base_model.read_file(path)
    return (build_unet(states["unet"], configs["unet"]), build_clip(states["text_encoder"], configs["text_encoder"]),
            build_vae(states["vae"], configs["vae"]))


def model_choices() -> list[str]:
    """The shipped models (text-to-image and depth-conditioned, those in ``toyworld/weights``) and the user's."""
    return [c for c, path in SHIPPED_FILES.items() if available(path)] + folder_paths.get_filename_list(FOLDER)


class SynCDToyWorldModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        register_folder()
        return io.Schema(
            node_id="SynCDToyWorldModel",
            display_name="SynCD Toy-World Model",
            category="SynCD/testing",
            description="The pack's trained toy text-to-image model (a tiny SD1.5 architecture trained from scratch "
                        "on the toy world's objects: 6 shapes, 6 colours, 3 textures, 6 backgrounds) as MODEL, CLIP "
                        "and VAE, like Load Checkpoint. Any CPU samples it in seconds; prompts read like 'a red "
                        "striped cube on green grass, on the left'. Sample at the size it was trained at: the "
                        "shipped model 128x128 (Empty Latent Image 128x128), a default-scale reproduce run's 64x64. "
                        "A depth-conditioned toy model (toy_sd15_depth.safetensors of a reproduce run) takes its "
                        "depth through InstructPixToPixConditioning (SynCD Toy-World Mesh Views gives the depth).",
            inputs=[
                io.Combo.Input("model_file", options=model_choices(),
                               tooltip="The shipped model, or a toy_sd15.safetensors of your own run of 'python -m "
                                       "comfyui_syncd toyworld reproduce' copied to models/syncd_toyworld."),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), io.Clip.Output(display_name="CLIP"),
                     io.Vae.Output(display_name="VAE")],
        )

    @classmethod
    def validate_inputs(cls, model_file=None):
        return choices.check(cls, model_file=model_file)

    @classmethod
    def execute(cls, model_file: str = SHIPPED_CHOICE) -> io.NodeOutput:
        path = SHIPPED_FILES.get(model_file) or folder_paths.get_full_path_or_raise(FOLDER, model_file)
        return io.NodeOutput(*load(path))


REFERENCES_NAME = "SynCD Toy-World References"


def reference_views(shape: str, colour: str, texture: str, views: int, index: int, size: int, seed: int):
    """(IMAGE, MASK) of a toy object's multi-view set (``toyworld.views``): every view (``index`` −1) or view
    ``index``; the mask is 1 on the object's pixels."""
    from ..toyworld import views as V

    if index >= views:
        raise ValueError(f"{REFERENCES_NAME}: view index {index} does not exist in a set of {views} views; use "
                         f"-1 (all) or 0..{views - 1}")
    render = V.multi_view_set(V.Identity(shape, colour, texture), views=views, seed=seed, size=size)
    picked = slice(None) if index < 0 else slice(index, index + 1)
    return render.image[picked].contiguous(), render.mask[picked].float().contiguous()


class SynCDToyWorldReferences(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SynCDToyWorldReferences",
            display_name=REFERENCES_NAME,
            category="SynCD/testing",
            description="Rendered reference views of one toy-world object (shape, colour, texture) in different "
                        "poses over random backgrounds, with exact foreground masks: references the toy-world model "
                        "knows, so customization workflows run without input files. Replace with Load Image + "
                        "masks for your own subject.",
            inputs=[
                io.Combo.Input("shape", options=list(S.SHAPES), default="cube", tooltip="The object's shape."),
                io.Combo.Input("colour", options=list(S.COLOURS), default="red", tooltip="The object's colour."),
                io.Combo.Input("texture", options=list(S.TEXTURES), default="striped",
                               tooltip="The object's surface pattern."),
                io.Int.Input("views", default=3, min=1, max=8,
                             tooltip="Views in the set (azimuths spread around the object)."),
                io.Int.Input("index", default=-1, min=-1, max=7,
                             tooltip="-1: every view as a batch; 0..views-1: that view only (one per Load Image "
                                     "it stands for)."),
                io.Int.Input("size", default=128, min=16, max=1024, step=8,
                             tooltip="Width and height in pixels (the shipped toy-world model draws 128)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Seed of the poses and backgrounds."),
            ],
            outputs=[io.Image.Output(display_name="IMAGE"), io.Mask.Output(display_name="MASK")],
        )

    @classmethod
    def validate_inputs(cls, shape=None, colour=None, texture=None):
        return choices.check(cls, shape=shape, colour=colour, texture=texture)

    @classmethod
    def execute(cls, shape: str, colour: str, texture: str, views: int, index: int, size: int,
                seed: int) -> io.NodeOutput:
        return io.NodeOutput(*reference_views(shape, colour, texture, views, index, size, seed))


MESH_VIEWS_NAME = "SynCD Toy-World Mesh Views"


def toy_mesh_views(shape: str, views: int, size: int, seed: int):
    """(depth IMAGE, MASK, correspondences, info) of ``views`` views of a toy solid (``toyworld.views``): what SynCD
    Mesh Views gives for a mesh, for the toy world's rigid objects."""
    from ..toyworld import views as V

    scenes = V.view_scenes(V.Identity(shape, "red", "plain"), views=views, seed=seed)  # depth ignores the look
    render = S.render(scenes, size=size)
    corr = V.set_correspondences(render)
    lines = [f"toy {shape}: {views} views at {size}x{size}"]
    lines += [f"view {i}: elevation {s.elevation:.1f}°, azimuth {s.azimuth:.1f}°, {s.placement}"
              for i, s in enumerate(scenes)]
    lines.append("matches: " + ", ".join(f"{a}-{b} {int(r.shape[0])}" for (a, b), r in sorted(corr.pairs.items())))
    return V.depth_images(render), render.mask.float(), corr, "\n".join(lines)


class SynCDToyWorldMeshViews(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SynCDToyWorldMeshViews",
            display_name=MESH_VIEWS_NAME,
            category="SynCD/testing",
            description="SynCD Mesh Views for the toy world's solids: a toy shape seen from views spread around it "
                        "(azimuths at least 45° apart, the toy world's elevations, scales and positions), as depth "
                        "for depth conditioning (1/d normalized, gray, as SynCD Mesh Views), exact foreground masks "
                        "and the cross-view correspondences for SynCD Feature Warp. Feeds a depth-conditioned "
                        "toy-world model.",
            inputs=[
                io.Combo.Input("shape", options=list(S.SHAPES), default="cube", tooltip="The toy solid."),
                io.Int.Input("views", default=3, min=2, max=8, tooltip="How many views (SynCD's rigid sets: 3)."),
                io.Int.Input("size", default=128, min=16, max=1024, step=8,
                             tooltip="Width and height of the depth images and masks (the model's size)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the views' poses and positions."),
            ],
            outputs=[io.Image.Output(display_name="depth"), io.Mask.Output(display_name="masks"),
                     Correspondences.Output(display_name="correspondences"), io.String.Output(display_name="info")],
        )

    @classmethod
    def validate_inputs(cls, shape=None):
        return choices.check(cls, shape=shape)

    @classmethod
    def execute(cls, shape: str, views: int, size: int, seed: int) -> io.NodeOutput:
        depth, masks, corr, info = toy_mesh_views(shape, views, size, seed)
        return io.NodeOutput(depth, masks, corr, info, ui=ui.PreviewText(info))

"""Resolution change: fine-tune a checkpoint at another image size (SigLIP 4.6's resolution adaptation).

A ViT's position embeddings are a table with one row per patch of the training grid (CLIP: plus one for its class
token). At a new image size the grid changes, so the table is resampled once, bicubic on the patch grid with
`align_corners=False` as transformers' `interpolate_pos_encoding` does at every forward, and the config and the
image processor are given the new size: the model then runs, trains and saves at that size natively (plain
`transformers.AutoModel` / `AutoProcessor` load it with no option). At the checkpoint's own size nothing changes.

Applies to SigLIP (SiglipModel, SigLIP 2 FixRes checkpoints, our SiglipBottleneckModel with SigLIP's vision tower)
and CLIP. SigLIP 2 NaFlex (Siglip2Model) already resizes its table per image (its processor's `max_num_patches`
sets the resolution); other vision backbones are refused.
"""

import logging

import torch
from torch import nn
from transformers.image_utils import SizeDict

logger = logging.getLogger(__name__)

# vision config model types whose position table this module resamples, and their class-token rows
RESIZABLE_VISION_TYPES = {"siglip_vision_model": 0, "clip_vision_model": 1}


def resolution_problem(config, image_size: int) -> str | None:
    """Why a checkpoint with `config` cannot be moved to `image_size` (one line), or None when it can."""
    vision = getattr(config, "vision_config", None)
    vision_type = getattr(vision, "model_type", None)
    if config.model_type == "siglip2":
        return ("image_size does not apply to SigLIP 2 NaFlex (Siglip2Model): it resizes its position embeddings to "
                "each image; its processor's max_num_patches sets the resolution")
    if vision_type not in RESIZABLE_VISION_TYPES:
        return (f"image_size {image_size} differs from the checkpoint's, and its vision tower ({vision_type}) has no "
                "position table hf-siglip can resample (SigLIP and CLIP towers only): leave image_size unset")
    patch_size = vision.patch_size
    if image_size % patch_size:
        return (f"image_size {image_size} is not a multiple of the checkpoint's patch_size {patch_size}: choose one "
                f"of {image_size // patch_size * patch_size} or {(image_size // patch_size + 1) * patch_size}")
    return None


def interpolate_position_table(table: torch.Tensor, new_grid: int, class_tokens: int = 0) -> torch.Tensor:
    """`table` (rows: `class_tokens` class rows, then a square grid row by row) resampled to a `new_grid` x `new_grid`
    grid, bicubic (align_corners=False), in float32; the class rows are kept as they are."""
    head, grid = table[:class_tokens], table[class_tokens:]
    old_grid = round(grid.shape[0] ** 0.5)
    if old_grid * old_grid != grid.shape[0]:
        raise ValueError(f"the position table holds {grid.shape[0]} patch rows, not a square grid")
    dim = grid.shape[1]
    grid = grid.float().reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2)
    grid = nn.functional.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid * new_grid, dim).to(table.dtype)
    return torch.cat([head, grid])


def change_image_size(model: nn.Module, image_size: int, processor=None) -> int:
    """Move `model` (and `processor`'s image processor) to `image_size` in place; returns the old size. The vision
    config, the embeddings' bookkeeping (num_patches, num_positions, position_ids) and the position table change;
    nothing happens at the current size."""
    config = model.config
    problem = resolution_problem(config, image_size)
    if problem:
        raise ValueError(problem)
    vision_config = config.vision_config
    old_size = vision_config.image_size
    embeddings = vision_embeddings(model)
    if image_size != old_size:
        class_tokens = RESIZABLE_VISION_TYPES[vision_config.model_type]
        grid = image_size // vision_config.patch_size
        old_table = embeddings.position_embedding.weight
        table = interpolate_position_table(old_table.detach(), grid, class_tokens)
        new_embedding = nn.Embedding(table.shape[0], table.shape[1], device=old_table.device, dtype=old_table.dtype)
        with torch.no_grad():
            new_embedding.weight.copy_(table)
        new_embedding.weight.requires_grad_(old_table.requires_grad)
        embeddings.position_embedding = new_embedding
        embeddings.image_size = image_size
        embeddings.num_patches = grid * grid
        embeddings.num_positions = table.shape[0]
        embeddings.register_buffer("position_ids", torch.arange(table.shape[0], device=old_table.device).expand(
            (1, -1)), persistent=False)
        # the tower's config is usually the model's vision_config object; a wrapped tower (VisionTextDualEncoder's
        # SiglipVisionModel) may hold its own: every config on the way to the embeddings gets the new size
        for module in (model, *model.vision_model.modules()):
            owner = getattr(module, "config", None)
            owner = getattr(owner, "vision_config", owner) if module is model else owner
            if owner is not None and hasattr(owner, "image_size"):
                owner.image_size = image_size
        logger.info("image_size %d -> %d: the %d x %d position embeddings resampled to %d x %d (bicubic)",
                    old_size, image_size, old_size // vision_config.patch_size, old_size // vision_config.patch_size,
                    grid, grid)
    if processor is not None:
        set_processor_image_size(getattr(processor, "image_processor", processor), image_size)
    return old_size


def vision_embeddings(model: nn.Module) -> nn.Module:
    """The vision tower's embeddings module (SigLIP's or CLIP's, directly under `vision_model` or one level down as
    in a VisionTextDualEncoder's SiglipVisionModel)."""
    from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings
    from transformers.models.siglip.modeling_siglip import SiglipVisionEmbeddings

    for module in model.vision_model.modules():
        if isinstance(module, (SiglipVisionEmbeddings, CLIPVisionEmbeddings)):
            return module
    raise ValueError(f"{type(model.vision_model).__name__} has no SigLIP or CLIP vision embeddings to resample")


def set_processor_image_size(image_processor, image_size: int) -> None:
    """The image processor's output size (SigLIP: resize to height x width; CLIP: shortest edge, then crop)."""
    size = image_processor.size
    if getattr(size, "height", None) is not None:
        image_processor.size = SizeDict(height=image_size, width=image_size)
    elif getattr(size, "shortest_edge", None) is not None:
        image_processor.size = SizeDict(shortest_edge=image_size)
    else:
        raise ValueError(f"{type(image_processor).__name__} has a size ({size}) hf-siglip cannot set to {image_size}")
    if getattr(image_processor, "crop_size", None) is not None and getattr(image_processor, "do_center_crop", False):
        image_processor.crop_size = SizeDict(height=image_size, width=image_size)


__all__ = ["change_image_size", "interpolate_position_table", "resolution_problem", "set_processor_image_size",
           "vision_embeddings"]

"""Checkpoint conversion: native SigLIP (plain token table) -> bottleneck token embeddings.

The `N x W` table E is factorised by a truncated SVD, `E ~= (U_K S_K) V_K^T`: the new `N x K` table is
`U_K S_K` and the `K x W` projection is `V_K^T`, the best rank-K approximation of E in Frobenius norm.
Everything else is copied unchanged; the processor files (if any) are copied beside the result.
"""

import os
from dataclasses import dataclass

import torch

from .modeling_siglip_bottleneck import BottleneckTokenEmbedding, SiglipBottleneckModel


@dataclass
class ConversionResult:
    """What `convert_to_bottleneck` did: the relative Frobenius error ||E - E_K|| / ||E|| of the table."""

    relative_error: float
    vocab_size: int
    hidden_size: int
    bottleneck_dim: int
    parameters_before: int
    parameters_after: int


def factorize_embedding(weight: torch.Tensor, bottleneck_dim: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Rank-K factors `(table N x K, projection W x K)` of an `N x W` table and the relative error."""
    matrix = weight.detach().float()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    table = u[:, :bottleneck_dim] * s[:bottleneck_dim]
    projection = vh[:bottleneck_dim].T.contiguous()
    # Eckart-Young: the residual's energy is the energy of the dropped singular values.
    relative_error = float(s[bottleneck_dim:].square().sum().sqrt() / s.square().sum().sqrt())
    return table.to(weight.dtype), projection.to(weight.dtype), relative_error


def convert_to_bottleneck(
    src: str | os.PathLike, dst: str | os.PathLike, bottleneck_dim: int
) -> tuple[SiglipBottleneckModel, ConversionResult]:
    """Load `src` (a native SigLIP or plain-table checkpoint), factorise its token table, save to `dst`."""
    model = SiglipBottleneckModel.from_pretrained(src, dtype=torch.float32)
    text_config = model.config.text_config
    if text_config.bottleneck_dim is not None:
        raise ValueError(f"{src} already uses bottleneck embeddings (bottleneck_dim={text_config.bottleneck_dim}).")
    if not 0 < bottleneck_dim < text_config.hidden_size:
        raise ValueError(
            f"--bottleneck-dim must satisfy 0 < K < hidden_size (= {text_config.hidden_size}), got {bottleneck_dim}."
        )
    parameters_before = model.num_parameters()
    old_embedding = model.get_input_embeddings()
    table, projection, relative_error = factorize_embedding(old_embedding.weight, bottleneck_dim)

    new_embedding = BottleneckTokenEmbedding(text_config.vocab_size, bottleneck_dim, text_config.hidden_size)
    with torch.no_grad():
        new_embedding.table.weight.copy_(table)
        new_embedding.projection.weight.copy_(projection)
    model.set_input_embeddings(new_embedding)
    text_config.bottleneck_dim = bottleneck_dim
    model.config.text_config = text_config
    model.save_pretrained(dst)
    _copy_processor(src, dst)
    result = ConversionResult(
        relative_error=relative_error,
        vocab_size=text_config.vocab_size,
        hidden_size=text_config.hidden_size,
        bottleneck_dim=bottleneck_dim,
        parameters_before=parameters_before,
        parameters_after=model.num_parameters(),
    )
    return model, result


def _copy_processor(src, dst) -> None:
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(src)
    except (OSError, ValueError, TypeError):
        return  # weights-only checkpoint: nothing to copy
    processor.save_pretrained(dst)


__all__ = ["ConversionResult", "convert_to_bottleneck", "factorize_embedding"]

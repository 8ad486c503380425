"""Sigmoid loss for image-text pairs (SigLIP).

Placeholder single-process form; the loss-engine issue replaces this module with the ring-chunked,
multi-positive implementation. Imports torch only: it is copied beside the modeling file for
`trust_remote_code` loading.
"""

import torch
import torch.nn.functional as F


def sigmoid_loss(image_embeds, text_embeds, logit_scale, logit_bias, image_ids=None, text_ids=None):
    """`-sum_ij log sigmoid(z_ij * (t * x_i . y_j + b)) / n_images`, z = +1 where ids match (diagonal without ids)."""
    logits = (logit_scale * image_embeds.float() @ text_embeds.float().T + logit_bias).float()
    if image_ids is None:
        labels = torch.eye(logits.shape[0], logits.shape[1], device=logits.device)
    else:
        labels = (image_ids[:, None] == text_ids[None, :]).float()
    return -F.logsigmoid((2 * labels - 1) * logits).sum() / image_embeds.shape[0]

"""AdamW as the official VAR trainer sets it up: decay only on weight matrices, lr scaled by the batch."""

from __future__ import annotations

import torch

# Parameters that are positions, offsets or gains rather than weights: never decayed (official choice).
NO_DECAY_NAMES = ("pos_start", "position_embedding", "level_embedding", "scale_shift_table", "logit_scale")


def scaled_learning_rate(base_learning_rate: float, global_batch_size: int, reference_batch_size: int = 256) -> float:
    """The official linear scaling rule: lr = base lr × global batch / 256."""
    return base_learning_rate * global_batch_size / reference_batch_size


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weight matrices, and everything else (biases, 1-D parameters, embeddings of
    positions and levels, AdaLN offsets, attention logit scales). Frozen parameters are left out."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or any(key in name for key in NO_DECAY_NAMES):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(
    model: torch.nn.Module, learning_rate: float, weight_decay: float = 0.05, betas: tuple[float, float] = (0.9, 0.95)
) -> torch.optim.AdamW:
    """AdamW with the official betas (0.9, 0.95) and weight decay 0.05 on weight matrices."""
    return torch.optim.AdamW(parameter_groups(model, weight_decay), lr=learning_rate, betas=betas)

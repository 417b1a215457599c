"""The VAR training objective: teacher forcing over all scales, and the official trainer's metrics."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.transformer import VARTransformer
from ..models.vqvae import MultiScaleVQVAE


@dataclass
class VARTrainingMetrics:
    """Detached metrics of one batch, as the official trainer logs them.

    Attributes:
        loss: cross-entropy over all L positions (label smoothing included: what is optimised).
        mean_loss / last_scale_loss: plain cross-entropy over all positions / over the last scale ("Lm", "Lt").
        accuracy / last_scale_accuracy: top-1 token accuracy in percent, same split ("Accm", "Acct").
    """

    loss: float
    mean_loss: float
    last_scale_loss: float
    accuracy: float
    last_scale_accuracy: float

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": v for k, v in self.__dict__.items()}


@torch.no_grad()
def teacher_forcing_batch(vqvae: MultiScaleVQVAE, images: torch.Tensor) -> tuple[torch.Tensor, torch.LongTensor]:
    """Images in [-1, 1] → (next-scale inputs (B, L − first_l, Cvae), targets (B, L)) from the frozen tokenizer."""
    token_maps = vqvae.tokenize(images.to(vqvae.dtype))
    targets = torch.cat([t.flatten(1) for t in token_maps], dim=1)
    return vqvae.next_scale_inputs(token_maps), targets


def var_loss(
    transformer: VARTransformer,
    class_labels: torch.LongTensor,
    next_scale_inputs: torch.Tensor,
    targets: torch.LongTensor,
    neighbour_codes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, VARTrainingMetrics]:
    """The training loss (label smoothing from the config, class and neighbour dropout in train mode) and the
    batch's metrics. ``neighbour_codes`` (B, k, L, Cvae): a retrieval model's neighbours (``training.retrieval``)."""
    extra = {} if neighbour_codes is None else {"neighbour_codes": neighbour_codes}
    out = transformer(class_labels, next_scale_inputs, labels=targets, **extra)
    with torch.no_grad():
        logits = out.logits.float()
        config = getattr(transformer, "module", transformer).config  # also under DistributedDataParallel
        last = config.patch_nums[-1] ** 2
        vocab = logits.shape[-1]
        predictions = logits.argmax(dim=-1)
        metrics = VARTrainingMetrics(
            loss=out.loss.item(),
            mean_loss=F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1)).item(),
            last_scale_loss=F.cross_entropy(
                logits[:, -last:].reshape(-1, vocab), targets[:, -last:].reshape(-1)
            ).item(),
            accuracy=(predictions == targets).float().mean().item() * 100,
            last_scale_accuracy=(predictions[:, -last:] == targets[:, -last:]).float().mean().item() * 100,
        )
    return out.loss, metrics


def sequence_log_likelihoods(
    transformer: VARTransformer,
    class_labels: torch.LongTensor,
    next_scale_inputs: torch.Tensor,
    targets: torch.LongTensor,
) -> torch.Tensor:
    """log p(x | c) of each token pyramid, teacher forced: the sum over all L positions of the log-probability of
    the target token, (B,) in float32. No label smoothing and no class dropout of its own: the post-training
    objectives (``training.cca``, ``training.ddo``) choose the labels, including the null class, themselves.

    Example:
        ```py
        >>> inputs, targets = teacher_forcing_batch(vqvae, images)
        >>> log_p = sequence_log_likelihoods(transformer, class_labels, inputs, targets)  # (B,)
        ```
    """
    model = getattr(transformer, "module", transformer)  # also under DistributedDataParallel
    if model.training and model.config.class_dropout_prob > 0:
        raise ValueError(
            f"The transformer drops class labels itself (class_dropout_prob={model.config.class_dropout_prob}) "
            "while a log-likelihood's labels must be the ones given; set config.class_dropout_prob = 0 and draw "
            "null-class rows in the objective (as train_var.py --objective cca|ddo does)."
        )
    logits = transformer(class_labels, next_scale_inputs).logits.float()
    token_nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, L), fused log-softmax
    return -token_nll.sum(dim=1)

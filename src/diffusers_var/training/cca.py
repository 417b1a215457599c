"""Condition Contrastive Alignment (CCA): fine-tuning that makes classifier-free guidance unnecessary.

Chen, Jiang, Zhu et al., "Toward Guidance-Free AR Visual Generation via Condition Contrastive Alignment", ICLR 2025
(github thu-ml/CCA). With r_θ(x, c) = log p_θ(x|c) − log p_ref(x|c), the likelihood ratio against the frozen
starting model, and real data only:

    L_CCA(θ) = − E_{p(x, c)} log σ(β r_θ(x, c)) − λ E_{p(x) p(c)} log σ(−β r_θ(x, c⁻))

The first term raises each image's likelihood under its own class, the second lowers it under a mismatched class
c⁻; at the optimum p_θ(x|c) ∝ p_ref(x|c) (p_ref(x|c) / p_ref(x))^{1/β}, the guided distribution, so sampling needs
no guidance and runs one batch instead of two. The papers' settings: β = 0.02, λ = 50 (VAR-d16, d20) to 1,000
(d30), one epoch, a fraction ``null_prob`` = 0.1 of the images trained on the null class (positive term only), so
that guidance remains possible.

Here c⁻ is drawn uniformly from the other classes (never the image's own), and the loss is divided by max(1, λ),
as thu-ml/CCA does, so that gradient clipping and the learning rate see the scale of a single log-sigmoid term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.transformer import VARTransformer
from .objective import sequence_log_likelihoods

CCA_BETA = 0.02
CCA_LAMBDA = 50.0  # VAR-d16 and d20 in thu-ml/CCA; d24 uses 100, d30 1,000


@dataclass
class CCAMetrics:
    """Detached figures of one batch: the loss and the implicit reward model's view of it.

    Attributes:
        loss: the optimised loss (divided by max(1, λ)).
        reward_positive / reward_negative: mean β·r_θ of images under their own class / a mismatched class.
        reward_margin: mean of β·(r_θ(x, c) − r_θ(x, c⁻)) over the class-conditioned images.
        reward_accuracy: share of those images whose own class has the larger ratio, in percent.
        log_likelihood: mean log p_θ(x|c) of the images under their own class (nats per image).
    """

    loss: float
    reward_positive: float
    reward_negative: float
    reward_margin: float
    reward_accuracy: float
    log_likelihood: float

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": v for k, v in self.__dict__.items()}


def cca_loss(
    log_p: torch.Tensor,
    ref_log_p: torch.Tensor,
    log_p_mismatched: torch.Tensor,
    ref_log_p_mismatched: torch.Tensor,
    conditional: torch.BoolTensor,
    beta: float = CCA_BETA,
    lam: float = CCA_LAMBDA,
) -> torch.Tensor:
    """The CCA loss from sequence log-likelihoods, each (B,).

    ``log_p``, ``ref_log_p``: log p(x|c) of each image under the trained and the reference model, c its class or
    the null class; ``*_mismatched``: under a mismatched class c⁻; ``conditional``: the rows with a real class
    (null-class rows contribute the positive term only). Returns
    ``mean_B[−log σ(β r⁺)] + λ mean_B[conditional · −log σ(−β r⁻)]``, divided by max(1, λ).

    Example:
        ```py
        >>> zero = torch.zeros(4)
        >>> cca_loss(zero, zero, zero, zero, torch.ones(4, dtype=torch.bool), beta=0.02, lam=1.0)  # 2 log 2
        tensor(1.3863)
        ```
    """
    check_cca_weights(beta, lam)
    positive = -F.logsigmoid(beta * (log_p - ref_log_p))
    negative = -F.logsigmoid(-beta * (log_p_mismatched - ref_log_p_mismatched)) * conditional.float()
    return (positive.mean() + lam * negative.mean()) / max(1.0, lam)


def check_cca_weights(beta: float, lam: float) -> None:
    if not beta > 0:
        raise ValueError(f"CCA's β scales the likelihood ratio and must be > 0, got {beta} (the paper uses 0.02).")
    if not lam >= 0:
        raise ValueError(f"CCA's λ weights the mismatched-class term and must be ≥ 0, got {lam} (the paper: 50).")


def check_cca_model(transformer: VARTransformer) -> None:
    """CCA contrasts classes and keeps guidance through the null class: both must exist."""
    config = transformer.config
    rows = transformer.class_embedding.weight.shape[0]
    if rows != config.num_classes + 1:
        raise ValueError(
            f"CCA needs a null class (the class embedding's last row) beside the {config.num_classes} classes, and "
            f"this model's class embedding has {rows} rows. Fine-tune a class-conditional VAR trained with class "
            "dropout."
        )
    if config.num_classes < 2:
        raise ValueError(
            f"CCA contrasts an image's class with another, and this model has {config.num_classes} class; use "
            "--objective ce or ddo."
        )


def mismatched_labels(class_labels: torch.LongTensor, num_classes: int) -> torch.LongTensor:
    """For each label a different class, uniformly among the other ``num_classes − 1`` (global torch RNG, which
    accelerate checkpoints, so a resumed run draws the same)."""
    shift = torch.randint(1, num_classes, class_labels.shape, device=class_labels.device)
    return (class_labels + shift) % num_classes


def null_rows(batch_size: int, null_prob: float, device: torch.device) -> torch.BoolTensor:
    """The rows trained on the null class (probability ``null_prob`` each, global torch RNG)."""
    return torch.rand(batch_size, device=device) < null_prob


def cca_batch_loss(
    transformer: VARTransformer,
    reference: VARTransformer,
    class_labels: torch.LongTensor,
    next_scale_inputs: torch.Tensor,
    targets: torch.LongTensor,
    beta: float = CCA_BETA,
    lam: float = CCA_LAMBDA,
    null_prob: float = 0.1,
) -> tuple[torch.Tensor, CCAMetrics]:
    """One batch of real images (teacher-forcing inputs and targets, from ``teacher_forcing_batch``): the loss to
    back-propagate and its metrics. Each image is scored under its class (or the null class, with ``null_prob``)
    and under a mismatched class, by both models in one forward each (2B rows)."""
    config = getattr(transformer, "module", transformer).config
    null = null_rows(class_labels.shape[0], null_prob, class_labels.device)
    positive_labels = torch.where(null, config.num_classes, class_labels)
    negative_labels = torch.where(null, config.num_classes, mismatched_labels(class_labels, config.num_classes))
    labels = torch.cat([positive_labels, negative_labels])
    inputs, all_targets = torch.cat([next_scale_inputs, next_scale_inputs]), torch.cat([targets, targets])
    log_p, log_p_mismatched = sequence_log_likelihoods(transformer, labels, inputs, all_targets).chunk(2)
    with torch.no_grad():
        ref_log_p, ref_log_p_mismatched = sequence_log_likelihoods(reference, labels, inputs, all_targets).chunk(2)
    conditional = ~null
    loss = cca_loss(log_p, ref_log_p, log_p_mismatched, ref_log_p_mismatched, conditional, beta, lam)
    with torch.no_grad():
        reward, reward_mismatched = beta * (log_p - ref_log_p), beta * (log_p_mismatched - ref_log_p_mismatched)
        margin = (reward - reward_mismatched)[conditional]
        metrics = CCAMetrics(
            loss=loss.item(),
            reward_positive=reward.mean().item(),
            reward_negative=reward_mismatched[conditional].mean().item() if conditional.any() else 0.0,
            reward_margin=margin.mean().item() if conditional.any() else 0.0,
            reward_accuracy=(margin > 0).float().mean().item() * 100 if conditional.any() else 0.0,
            log_likelihood=log_p.mean().item(),
        )
    return loss, metrics

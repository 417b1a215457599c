"""Direct Discriminative Optimization (DDO): a GAN objective whose discriminator is the model's own likelihood ratio.

Zheng, Chen, Chen, He, Liu, Zhu, Zhang, "Direct Discriminative Optimization: Your Likelihood-Based Visual Generative
Model is Secretly a GAN Discriminator", ICML 2025 (github NVlabs/DDO, which releases the weights, not the training
code). With r_θ(x, c) = log p_θ(x|c) − log p_ref(x|c) against a frozen reference and samples x̃ of the reference
itself (decoded to pixels and re-encoded to tokens, as real images are):

    L_DDO(θ) = − E_{p_data(x, c)} log σ(β r_θ(x, c)) − α E_{p_ref(x̃, c)} log σ(−β r_θ(x̃, c))

σ(β r_θ) is a discriminator between real images and the reference's samples; its optimum p_θ ∝
p_ref^{1−1/β} p_data^{1/β} over-shoots towards the data for β < 1, which is why the fine-tuned model needs no
guidance. Training runs in self-play rounds: after each, the reference moves to the latest model and new samples are
drawn (``training.self_play``). The paper's VAR settings: β = 0.02, α searched in [10, 100], class dropout kept so
that guidance remains possible, every dropout layer disabled.

The loss is divided by max(1, α), so that gradient clipping and the learning rate see the scale of a single
log-sigmoid term (as thu-ml/CCA does for its λ).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.transformer import VARTransformer
from .cca import null_rows
from .objective import sequence_log_likelihoods

DDO_BETA = 0.02
DDO_ALPHA = 10.0  # the low end of the paper's VAR search, [10, 100]


@dataclass
class DDOMetrics:
    """Detached figures of one batch, as the implicit discriminator sees it.

    Attributes:
        loss: the optimised loss (divided by max(1, α)).
        reward_real / reward_fake: mean β·r_θ of the real images / of the reference's samples.
        reward_margin: reward_real − reward_fake.
        accuracy_real / accuracy_fake: share of real images with σ(β r_θ) > ½ / of samples with σ(β r_θ) < ½, in
            percent (both 0 while θ equals the reference: the discriminator is undecided).
        log_likelihood_real / log_likelihood_fake: mean log p_θ(x|c) of either (nats per image).
    """

    loss: float
    reward_real: float
    reward_fake: float
    reward_margin: float
    accuracy_real: float
    accuracy_fake: float
    log_likelihood_real: float
    log_likelihood_fake: float

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": v for k, v in self.__dict__.items()}


def check_ddo_weights(alpha: float, beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"DDO's β scales the likelihood ratio and must be > 0, got {beta} (the paper uses 0.02).")
    if not alpha >= 0:
        raise ValueError(f"DDO's α weights the reference samples' term and must be ≥ 0, got {alpha} (paper: 10-100).")


def ddo_loss(
    log_p_real: torch.Tensor,
    ref_log_p_real: torch.Tensor,
    log_p_fake: torch.Tensor,
    ref_log_p_fake: torch.Tensor,
    alpha: float = DDO_ALPHA,
    beta: float = DDO_BETA,
) -> torch.Tensor:
    """The DDO loss from sequence log-likelihoods: ``*_real`` (B,) of real images, ``*_fake`` (B',) of the
    reference's samples, under the trained and the reference model. Returns
    ``(mean[−log σ(β r_real)] + α mean[−log σ(−β r_fake)]) / max(1, α)``.

    Example:
        ```py
        >>> zero = torch.zeros(4)
        >>> ddo_loss(zero, zero, zero, zero, alpha=1.0, beta=0.02)  # 2 log 2
        tensor(1.3863)
        ```
    """
    check_ddo_weights(alpha, beta)
    real = -F.logsigmoid(beta * (log_p_real - ref_log_p_real))
    fake = -F.logsigmoid(-beta * (log_p_fake - ref_log_p_fake))
    return (real.mean() + alpha * fake.mean()) / max(1.0, alpha)


def ddo_batch_loss(
    transformer: VARTransformer,
    reference: VARTransformer,
    real: tuple[torch.LongTensor, torch.Tensor, torch.LongTensor],
    fake: tuple[torch.LongTensor, torch.Tensor, torch.LongTensor],
    alpha: float = DDO_ALPHA,
    beta: float = DDO_BETA,
    null_prob: float = 0.1,
) -> tuple[torch.Tensor, DDOMetrics]:
    """One batch: ``real`` and ``fake`` are (class labels, teacher-forcing inputs, targets) of real images and of
    the reference's re-encoded samples. Each row is scored under its class, or the null class with ``null_prob``
    (the same rows for both models), by each model in one forward over real and fake rows together."""
    config = getattr(transformer, "module", transformer).config
    labels = torch.cat([real[0], fake[0]])
    labels = torch.where(null_rows(labels.shape[0], null_prob, labels.device), config.num_classes, labels)
    inputs, targets = torch.cat([real[1], fake[1].to(real[1].dtype)]), torch.cat([real[2], fake[2]])
    num_real = real[0].shape[0]
    log_p = sequence_log_likelihoods(transformer, labels, inputs, targets)
    with torch.no_grad():
        ref_log_p = sequence_log_likelihoods(reference, labels, inputs, targets)
    loss = ddo_loss(log_p[:num_real], ref_log_p[:num_real], log_p[num_real:], ref_log_p[num_real:], alpha, beta)
    with torch.no_grad():
        reward = beta * (log_p - ref_log_p)
        reward_real, reward_fake = reward[:num_real], reward[num_real:]
        metrics = DDOMetrics(
            loss=loss.item(),
            reward_real=reward_real.mean().item(),
            reward_fake=reward_fake.mean().item(),
            reward_margin=(reward_real.mean() - reward_fake.mean()).item(),
            accuracy_real=(reward_real > 0).float().mean().item() * 100,
            accuracy_fake=(reward_fake < 0).float().mean().item() * 100,
            log_likelihood_real=log_p[:num_real].mean().item(),
            log_likelihood_fake=log_p[num_real:].mean().item(),
        )
    return loss, metrics

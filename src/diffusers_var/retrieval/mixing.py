"""Training-free retrieval: the next-scale distribution mixed with the retrieved images' tokens at the same positions.

At scale ``si`` every position samples from ``(1 − λ_si)·p_model + λ_si·p_retrieved``, where ``p_model`` is the
model's distribution after guidance, temperature, top-k and top-p, and ``p_retrieved`` is the histogram of the k
neighbours' codes at that position, smoothed over the adjacent positions (handwriting and objects never sit at
exactly the same place twice). This is the kNN-style mixing that retrieval-augmented token models use without
training; it works for any VAR model, converted official checkpoints included.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..validation import check_real

RETRIEVAL_SCHEDULES = ("constant", "linear_decay")


def retrieval_weights(weight: float | Sequence[float], num_scales: int, schedule: str = "constant") -> list[float]:
    """λ at every scale: ``weight`` at each (``"constant"``), or falling linearly from ``weight`` at the first scale
    to 0 at the last (``"linear_decay"``: the neighbours set the layout, the model draws the details), or one
    value per scale given explicitly.

    Example:
        ```py
        >>> retrieval_weights(0.8, 5, "linear_decay")
        [0.8, 0.6000000000000001, 0.4, 0.19999999999999996, 0.0]
        ```
    """
    if isinstance(weight, Sequence) and not isinstance(weight, str):
        if len(weight) != num_scales:
            raise ValueError(
                f"retrieval_weight as a list needs one λ per scale ({num_scales}), got {len(weight)}: {list(weight)}."
            )
        weights = [float(w) for w in weight]
    else:
        if schedule not in RETRIEVAL_SCHEDULES:
            raise ValueError(f"retrieval_schedule must be one of {RETRIEVAL_SCHEDULES}, got {schedule!r}.")
        check_real(
            "retrieval_weight", weight, minimum=0, maximum=1, hint=" It is λ in (1 − λ)·p_model + λ·p_retrieved."
        )
        if schedule == "constant":
            weights = [float(weight)] * num_scales
        else:
            weights = [float(weight) * (1 - si / max(num_scales - 1, 1)) for si in range(num_scales)]
    for si, w in enumerate(weights):
        check_real(f"retrieval_weight[{si}]", w, minimum=0, maximum=1, hint=" λ mixes two distributions.")
    return weights


def neighbour_agreement_weights(
    token_maps: list[torch.LongTensor], neighbour_maps: list[torch.LongTensor], sharpness: float
) -> torch.Tensor | None:
    """How much each neighbour counts at the next scale, (B, k): ``softmax(sharpness · agreement)``, agreement being
    the share of the sample's tokens so far equal to the neighbour's at the same place (every finished scale, each
    position once). As in kNN-LM, retrieval follows the context: the neighbours whose coarse scales the sample took
    lead its finer ones, so the mixture stays one coherent image rather than a patchwork. ``None`` before the first
    scale or with ``sharpness`` 0 (all neighbours alike)."""
    if not token_maps or sharpness == 0:
        return None
    same = [(t.unsqueeze(1) == n).flatten(2) for t, n in zip(token_maps, neighbour_maps)]  # (B, k, pn²) each
    agreement = torch.cat(same, dim=2).float().mean(dim=2)
    return (sharpness * agreement).softmax(dim=1)


def retrieved_token_distribution(
    neighbour_maps: torch.LongTensor,
    vocab_size: int,
    smoothing: float = 0.0,
    neighbour_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``p_retrieved`` at one scale: (B, k, pn, pn) neighbour codes → (B, pn², V) distributions.

    Each position counts the k neighbours' codes there (each neighbour with its ``neighbour_weights`` (B, k), default
    1), plus ``smoothing`` times the codes at the 8 adjacent positions (0: the same position only; the result is
    then exactly the neighbours' (weighted) empirical distribution).

    Example:
        ```py
        >>> maps = torch.tensor([[[[1, 2], [3, 4]], [[1, 0], [3, 3]]]])  # one sample, k=2 neighbours, 2×2
        >>> retrieved_token_distribution(maps, vocab_size=5)[0, 0].tolist()  # position (0, 0): both say code 1
        [0.0, 1.0, 0.0, 0.0, 0.0]
        ```
    """
    check_real("retrieval_smoothing", smoothing, minimum=0, hint=" 0 counts the same position only.")
    batch, k, height, width = neighbour_maps.shape
    # counts scattered straight into (B, V, pn²): a one-hot of (B, k, pn, pn, V) would be gigabytes at V = 4096
    counts = torch.zeros(batch, vocab_size, height * width, device=neighbour_maps.device)
    if neighbour_weights is None:
        neighbour_weights = torch.ones(batch, k, device=counts.device)
    votes = neighbour_weights.to(counts).unsqueeze(2).expand(batch, k, height * width)
    counts.scatter_add_(1, neighbour_maps.flatten(2).long(), votes)
    counts = counts.view(batch, vocab_size, height, width)
    if smoothing > 0 and height > 1:
        kernel = torch.full((3, 3), float(smoothing), device=counts.device)
        kernel[1, 1] = 1.0
        kernel = kernel.expand(vocab_size, 1, 3, 3)
        counts = F.conv2d(counts, kernel, padding=1, groups=vocab_size)
    counts = counts.flatten(2).transpose(1, 2)  # (B, pn², V)
    return counts / counts.sum(-1, keepdim=True)

"""Codebook health during tokenizer training: usage per scale, and restarting codes nobody picks.

A code that no scale has chosen for a whole window of steps gets no gradient and stays dead. Restarting moves it
onto an encoder output from a recent batch, where it will be chosen again (as in Jukebox and many VQ recipes).
"""

from __future__ import annotations

import torch


class CodebookUsage:
    """Counts how often each code is chosen at each scale since the last :meth:`reset`.

    Example:
        ```py
        >>> usage = CodebookUsage(num_scales=3, vocab_size=64)
        >>> usage.update(output.token_maps)  # after each forward
        >>> usage.fraction_used()            # (S,) fraction of codes hit per scale
        >>> dead = usage.dead_codes()        # codes unused at every scale
        ```
    """

    def __init__(self, num_scales: int, vocab_size: int):
        self.counts = torch.zeros(num_scales, vocab_size, dtype=torch.float64)

    @torch.no_grad()
    def update(self, token_maps: list[torch.LongTensor]) -> None:
        for scale, token_map in enumerate(token_maps):
            self.counts[scale] += torch.bincount(token_map.flatten().cpu(), minlength=self.counts.shape[1]).double()

    def fraction_used(self) -> torch.Tensor:
        return (self.counts > 0).double().mean(dim=1)

    def dead_codes(self) -> torch.LongTensor:
        return torch.nonzero(self.counts.sum(dim=0) == 0).flatten()

    def reset(self) -> None:
        self.counts.zero_()

    def state_dict(self) -> dict:
        return {"counts": self.counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.counts = state["counts"].clone().double()


@torch.no_grad()
def restart_dead_codes(
    embedding: torch.nn.Embedding, dead: torch.LongTensor, features: torch.Tensor, generator: torch.Generator
) -> int:
    """Move each dead code onto a distinct encoder output chosen at random; returns how many were moved.

    Args:
        embedding: the codebook.
        dead: indices of the codes to move.
        features: encoder outputs (N, C), e.g. the latent grid of a batch, gathered from every process so that all
            processes make the same choice with the same ``generator``.
        generator: a CPU generator seeded identically on every process.
    """
    if dead.numel() == 0 or features.shape[0] == 0:
        return 0
    dead = dead[: features.shape[0]]  # at most one code per available feature
    picks = torch.randperm(features.shape[0], generator=generator)[: dead.numel()]
    embedding.weight[dead.to(embedding.weight.device)] = features[picks].to(embedding.weight)
    return int(dead.numel())

"""An exponential moving average of a model's parameters that works for diffusers and transformers models alike.

(diffusers' ``EMAModel.save_pretrained`` needs ``from_config``, which a transformers model lacks; this one keeps a
plain state dict, so accelerate can checkpoint it and ``copy_to`` can put it into any model of the same shape.)
"""

from __future__ import annotations

import torch


class ParameterEMA:
    """Shadow copy (fp32) of the trainable parameters, updated with ``decay`` after each optimiser step.

    With ``warmup``, the effective decay is ``min(decay, (1 + n) / (10 + n))`` at update n, so early averages are
    not dominated by the random init.

    Example:
        ```py
        >>> ema = ParameterEMA(model, decay=0.999)
        >>> # after optimizer.step():
        >>> ema.update(model)
        >>> ema.copy_to(model_for_eval)
        ```
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}.")
        self.decay, self.warmup, self.num_updates = decay, warmup, 0
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        weight = 1.0 - self.current_decay()
        for name, param in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(param.detach().float(), weight)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for name, param in model.named_parameters():
            if name in self.shadow:
                param.copy_(self.shadow[name].to(param.dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise ValueError(f"The EMA state lacks {sorted(missing)[:5]} ({len(missing)} parameters).")
        self.decay, self.warmup, self.num_updates = state["decay"], state["warmup"], state["num_updates"]
        self.shadow = {n: t.float().clone() for n, t in state["shadow"].items()}

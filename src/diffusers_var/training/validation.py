"""Validation sample grids logged to the accelerate trackers during training."""

from __future__ import annotations

import numpy as np
import torch

from ..models.transformer import VARTransformer
from ..models.vqvae import MultiScaleVQVAE
from ..pipelines.var import VARPipeline
from ..schedulers.scale import VARScaleScheduler


@torch.no_grad()
def sample_validation_grid(
    vqvae: MultiScaleVQVAE,
    transformer: VARTransformer,
    scheduler: VARScaleScheduler,
    class_labels: list[int] | None = None,
    guidance_scale: float = 2.5,
    seed: int = 0,
) -> np.ndarray:
    """One seeded sample per class (up to 8 classes by default), as a (N, H, W, 3) array in [0, 1]."""
    was_training = transformer.training
    transformer.eval()
    try:
        pipe = VARPipeline(vqvae=vqvae, transformer=transformer, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        labels = class_labels or list(range(min(8, transformer.config.num_classes)))
        generators = [torch.Generator().manual_seed(seed + i) for i in range(len(labels))]
        return pipe(class_labels=labels, guidance_scale=guidance_scale, generator=generators, output_type="np").images
    finally:
        transformer.train(was_training)


def log_validation_grid(
    accelerator, vqvae, transformer, scheduler, step: int, class_labels=None, guidance_scale: float = 2.5, seed: int = 0
) -> np.ndarray:
    """Sample a grid and hand it to every tracker that takes images (tensorboard, wandb, …)."""
    images = sample_validation_grid(vqvae, transformer, scheduler, class_labels, guidance_scale, seed)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", images, step, dataformats="NHWC")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({"validation": list(images)}, step=step)
    return images

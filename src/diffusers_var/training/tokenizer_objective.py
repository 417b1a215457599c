"""The tokenizer's training losses, and its held-out report (PSNR, MSE, reconstruction FID, codebook usage)."""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from ..evaluation.features import BackboneFeatures
from ..evaluation.fid import fid_from_features
from ..models.vqvae import MultiScaleVQVAE, MultiScaleVQVAEOutput
from .data import preprocess_image
from .discriminators import DinoDiscriminator, PatchDiscriminator, hinge_discriminator_loss, hinge_generator_loss
from .perceptual import LPIPS


class TokenizerLosses(nn.Module):
    """Reconstruction (L1 or L2) + weighted VQ loss, and optionally LPIPS and an adversarial loss.

    Args:
        reconstruction: ``"l1"`` or ``"l2"``.
        vq_weight: weight of the VQ loss (commitment β is in the tokenizer's config).
        perceptual: an :class:`LPIPS` module, or None; ``perceptual_weight`` its weight.
        discriminator: a patch or DINO discriminator, or None; ``adversarial_weight`` the generator loss weight.
        feature_model: backbone for reconstruction FID on the held-out split, or None.
    """

    def __init__(
        self,
        reconstruction: str = "l1",
        vq_weight: float = 1.0,
        perceptual: LPIPS | None = None,
        perceptual_weight: float = 0.0,
        discriminator: nn.Module | None = None,
        adversarial_weight: float = 0.1,
        feature_model: BackboneFeatures | None = None,
    ):
        super().__init__()
        if reconstruction not in ("l1", "l2"):
            raise ValueError(f"reconstruction must be 'l1' or 'l2', got {reconstruction!r}.")
        self.reconstruction, self.vq_weight = reconstruction, vq_weight
        self.perceptual, self.perceptual_weight = perceptual, perceptual_weight
        self.discriminator, self.adversarial_weight = discriminator, adversarial_weight
        self.feature_model = feature_model

    @classmethod
    def from_args(cls, args: argparse.Namespace, image_size: int) -> TokenizerLosses:
        """Build from ``train_vqvae.py``'s flags; each pretrained part comes from disk or is a clear error."""
        discriminator = None
        if args.discriminator == "patchgan":
            # three strided layers (70-px patches) at 32 px and up; fewer on smaller images, so patches remain
            discriminator = PatchDiscriminator(num_layers=max(1, min(3, image_size.bit_length() - 3)))
        elif args.discriminator == "dino":
            discriminator = DinoDiscriminator.from_pretrained(args.dino_model)
        return cls(
            reconstruction=args.reconstruction_loss,
            vq_weight=args.vq_weight,
            perceptual=LPIPS.from_file(args.lpips_weights).eval() if args.lpips_weight > 0 else None,
            perceptual_weight=args.lpips_weight,
            discriminator=discriminator,
            adversarial_weight=args.disc_weight,
            feature_model=BackboneFeatures.from_pretrained(args.fid_feature_model) if args.fid_feature_model else None,
        )

    def describe(self) -> str:
        parts = [f"{self.reconstruction.upper()} reconstruction", f"{self.vq_weight:g} × VQ"]
        if self.perceptual is not None:
            parts.append(f"{self.perceptual_weight:g} × LPIPS")
        if self.discriminator is not None:
            parts.append(f"{self.adversarial_weight:g} × hinge GAN ({type(self.discriminator).__name__})")
        return " + ".join(parts)

    def tokenizer_loss(
        self, output: MultiScaleVQVAEOutput, images: torch.Tensor, adversarial: bool = False
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The tokenizer's loss for one batch, and its parts as floats for logging."""
        reconstruction = output.sample.float()
        images = images.float()
        if self.reconstruction == "l1":
            rec_loss = F.l1_loss(reconstruction, images)
        else:
            rec_loss = F.mse_loss(reconstruction, images)
        loss = rec_loss + self.vq_weight * output.vq_loss
        logs = {"reconstruction_loss": rec_loss.item(), "vq_loss": output.vq_loss.item()}
        logs["psnr"] = psnr(reconstruction.detach(), images).mean().item()
        if self.perceptual is not None:
            perceptual = self.perceptual(reconstruction, images).mean()
            loss = loss + self.perceptual_weight * perceptual
            logs["lpips"] = perceptual.item()
        if adversarial and self.discriminator is not None:
            generator_loss = hinge_generator_loss(self.discriminator(reconstruction))
            loss = loss + self.adversarial_weight * generator_loss
            logs["generator_loss"] = generator_loss.item()
        return loss, logs

    @staticmethod
    def discriminator_loss(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        return hinge_discriminator_loss(discriminator(real.float()), discriminator(fake.float()))


def psnr(reconstruction: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1], measured on the [0, 1] scale after clamping."""
    error = ((reconstruction.clamp(-1, 1) - images) / 2).square().flatten(1).mean(dim=1)
    return 10 * torch.log10(1 / error.clamp_min(1e-10))


@torch.no_grad()
def reconstruction_report(
    vqvae: MultiScaleVQVAE,
    dataset,
    image_column: str,
    resolution: int,
    feature_model: BackboneFeatures | None = None,
    batch_size: int = 32,
) -> dict[str, float]:
    """Tokenize → detokenize every image of a held-out split (centre-cropped) and measure the reconstructions.

    Returns PSNR (dB, mean over images), MSE (on [-1, 1]), the fraction of codes used per scale over the split, and
    with a ``feature_model`` the reconstruction FID (Fréchet distance between real and reconstructed features; it
    needs at least 2 images and is only comparable between runs that use the same model and split).
    """
    was_training = vqvae.training
    vqvae.eval()
    device, dtype = vqvae.device, vqvae.dtype
    psnrs, squared, real_features, fake_features = [], [], [], []
    used = torch.zeros(len(vqvae.config.patch_nums), vqvae.config.vocab_size, dtype=torch.bool)
    try:
        for start in range(0, len(dataset), batch_size):
            rows = dataset[start : start + batch_size][image_column]
            images = torch.stack([preprocess_image(image, resolution) for image in rows]).to(device)
            token_maps = vqvae.tokenize(images.to(dtype))
            for scale, token_map in enumerate(token_maps):
                used[scale, token_map.flatten().cpu()] = True
            reconstruction = vqvae.detokenize(token_maps).float()
            psnrs.append(psnr(reconstruction, images).cpu())
            squared.append((reconstruction - images).square().flatten(1).mean(dim=1).cpu())
            if feature_model is not None:
                real_features.append(feature_model(images).double().cpu())
                fake_features.append(feature_model(reconstruction).double().cpu())
    finally:
        vqvae.train(was_training)
    report = {"psnr": torch.cat(psnrs).mean().item(), "mse": torch.cat(squared).mean().item()}
    report.update({f"usage_scale_{i}": u.item() for i, u in enumerate(used.float().mean(dim=1))})
    if feature_model is not None and len(dataset) > 1:
        report["rfid"] = fid_from_features(torch.cat(real_features).numpy(), torch.cat(fake_features).numpy())
    return report

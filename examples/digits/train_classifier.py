"""Train ``digits-classifier``: a tiny transformers image classifier of the real digits, the offline stand-in for the
ImageNet classifiers and feature networks that evaluation and rejection sampling take.

    python examples/digits/train_classifier.py --output_dir digits-classifier

It is a ``ConvNextForImageClassification`` (3 stages of widths 16/32/64, about 0.1 M parameters) with a
``ViTImageProcessor`` (32×32, pixels scaled to [-1, 1]) saved beside it, so ``AutoImageProcessor`` and
``AutoModelForImageClassification`` load it like any Hub classifier. It sees only the training split of
``prepare_data.py`` (seed 0), with random shifts of up to 2 pixels so that it reads generated digits that are not
centred exactly like the scans; the held-out split measures it. The folder gets a model card with that accuracy.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from prepare_data import load_digits_split

from diffusers_var.hub import save_card
from diffusers_var.saving import atomic_directory

NUM_CLASSES, RESOLUTION = 10, 32


def build_classifier(seed: int = 0):
    """The untrained classifier and its image processor."""
    from transformers import ConvNextConfig, ConvNextForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    config = ConvNextConfig(
        num_channels=3,
        patch_size=2,
        num_stages=3,
        hidden_sizes=[16, 32, 64],
        depths=[1, 1, 2],
        image_size=RESOLUTION,
        num_labels=NUM_CLASSES,
        id2label={i: str(i) for i in range(NUM_CLASSES)},
        label2id={str(i): i for i in range(NUM_CLASSES)},
    )
    processor = ViTImageProcessor(
        do_resize=True,
        size={"height": RESOLUTION, "width": RESOLUTION},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return ConvNextForImageClassification(config), processor


def pixel_values(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, 32, 32, 3)`` → what the processor makes of them: ``(N, 3, 32, 32)`` in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def shifted(pixels: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Each image moved by up to ``max_shift`` pixels in x and y, the border filled with the background (-1)."""
    padded = F.pad(pixels, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (pixels.shape[0], 2), generator=generator)
    size = pixels.shape[-1]
    return torch.stack([p[:, y : y + size, x : x + size] for p, (y, x) in zip(padded, offsets.tolist())])


@torch.no_grad()
def accuracy(model, pixels: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    predictions = torch.cat([model(pixel_values=chunk).logits.argmax(-1) for chunk in pixels.split(256)])
    return (predictions == labels).float().mean().item()


def train(epochs: int = 60, batch_size: int = 64, learning_rate: float = 3e-3, seed: int = 0) -> tuple:
    """(model, processor, held-out accuracy, train accuracy) after training on the training split."""
    train_x, train_y, test_x, test_y = load_digits_split()
    train_pixels, test_pixels = pixel_values(train_x), pixel_values(test_x)
    train_labels, test_labels = torch.from_numpy(train_y), torch.from_numpy(test_y)
    model, processor = build_classifier(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.05)
    steps = epochs * (len(train_labels) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(train_labels), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            index = order[start : start + batch_size]
            logits = model(pixel_values=shifted(train_pixels[index], generator)).logits
            loss = F.cross_entropy(logits, train_labels[index], label_smoothing=0.05)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    return model, processor, accuracy(model, test_pixels, test_labels), accuracy(model, train_pixels, train_labels)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="the classifier folder to create (must not exist)")
    parser.add_argument("--epochs", type=int, default=60, help="(default: 60)")
    parser.add_argument("--seed", type=int, default=0, help="(default: 0)")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 4))
    model, processor, held_out, train_accuracy = train(args.epochs, seed=args.seed)
    report = {
        "held_out_accuracy": round(held_out, 4),
        "train_accuracy": round(train_accuracy, 4),
        "parameters": sum(p.numel() for p in model.parameters()),
        "epochs": args.epochs,
        "seed": args.seed,
        "data": "prepare_data.py split (seed 0): 1437 train / 360 held-out images, 32 px",
    }
    from huggingface_hub import ModelCard

    card = (Path(__file__).resolve().parents[2] / "model_cards" / "digits-classifier.md").read_text(encoding="utf-8")
    with atomic_directory(args.output_dir) as folder:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        save_card(ModelCard(card.format(**report)), Path(folder) / "README.md")
        (Path(folder) / "training_report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()

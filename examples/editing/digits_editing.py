"""Zero-shot editing and honest reconstruction on the bundled var-digits model, with pictures and figures.

    python examples/editing/digits_editing.py --output_dir editing

Everything runs on the real held-out digits of ``examples/digits/prepare_data.py``'s split (never seen in
training), with the pipelines' default sampling settings (guidance 2.5, top-k 900, top-p 0.96), and is judged by the
scikit-learn SVC of ``examples/digits/evaluate.py`` (trained on the real training split, outside this project's
models), with Platt-scaled probabilities. Writes, in ``--output_dir``:

- ``inpainting.png``: real digits, the centre regenerated (unconditional, three seeds).
- ``outpainting.png``: only the centre kept, the border regenerated, as the digit's own class and unconditionally.
- ``class_edit.png``: the lower half of real digits regenerated as each class 0–9.
- ``reconstructions.png``: the image after each scale for the tokenizer, teacher forcing and autoregressive
  reconstruction (greedy) of real digits.
- ``progressive.png``: samples forming scale by scale (``diffusers-var generate --progressive``).
- ``report.json``: class-conditional editing of the lower half of every held-out digit to every other class (the
  SVC's p(new class) before and after, and after unconditional in-painting of the same half), and per-scale token
  accuracy and PSNR of the three reconstructions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "digits"))
from evaluate import _write_json_atomically, default_reference, refuse_foreign_outputs  # noqa: E402
from prepare_data import load_digits_split  # noqa: E402

from diffusers_var import VARInpaintPipeline  # noqa: E402
from diffusers_var.evaluation.samples import to_uint8  # noqa: E402
from diffusers_var.generate import GridCanvas, add_arguments, generate, save_image_atomically  # noqa: E402
from diffusers_var.pipelines.reconstruction import METHODS  # noqa: E402


def as_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) → float (N, 3, H, W) in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def lower_half(size: int) -> torch.Tensor:
    mask = torch.zeros(size, size)
    mask[size // 2 :] = 1
    return mask


def centre_box(size: int) -> torch.Tensor:
    mask = torch.zeros(size, size)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    return mask


def shaded(image: np.ndarray, mask: torch.Tensor) -> PIL.Image.Image:
    """The input with the region to regenerate tinted red."""
    tinted = image.astype(np.float32).copy()
    region = mask.numpy() > 0.5
    tinted[region] = 0.5 * tinted[region] + 0.5 * np.array([200, 30, 30])
    return PIL.Image.fromarray(tinted.astype(np.uint8))


def grid(rows: dict[str, list[PIL.Image.Image]], titles: list[str], size: int) -> PIL.Image.Image:
    canvas = GridCanvas(list(rows), len(titles), size, titles)
    for row, images in enumerate(rows.values()):
        for column, image in enumerate(images):
            canvas.paste(row, column, image)
    return canvas.grid


def pil(images) -> list[PIL.Image.Image]:
    return [PIL.Image.fromarray(image) for image in to_uint8(images)]


def editing_figures(pipe, images: np.ndarray, labels: np.ndarray, batch_size: int) -> dict:
    """Lower half of every image regenerated as every other class; the SVC's p(target) before and after."""
    reference, size = default_reference(), pipe.vqvae.image_size
    mask = lower_half(size)
    before = reference.probabilities(images)
    jobs = [(i, c) for i in range(len(images)) for c in range(10) if c != labels[i]]
    after, inpainted = np.zeros(len(jobs)), np.zeros(len(jobs))
    unconditional = []
    for start in range(0, len(images), batch_size):  # the same half, regenerated without a class
        rows = list(range(start, min(start + batch_size, len(images))))
        generators = [torch.Generator().manual_seed(10_000 + i) for i in rows]
        out = pipe(image=as_tensor(images[rows]), mask_image=mask, generator=generators, output_type="np")
        unconditional.append(reference.probabilities(to_uint8(out.images)))
    unconditional = np.concatenate(unconditional)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        generators = [torch.Generator().manual_seed(1000 * i + c) for i, c in chunk]
        out = pipe(
            image=as_tensor(images[[i for i, _ in chunk]]), mask_image=mask, class_labels=[c for _, c in chunk],
            generator=generators, output_type="np",
        )  # fmt: skip
        probabilities = reference.probabilities(to_uint8(out.images))
        for k, (i, c) in enumerate(chunk):
            after[start + k] = probabilities[k, c]
            inpainted[start + k] = unconditional[i, c]
    original = np.array([before[i, c] for i, c in jobs])
    return {
        "edits": len(jobs),
        "images": len(images),
        "mask": "lower half (rows 16-31 of 32) regenerated",
        "p_target_original_mean": float(original.mean()),
        "p_target_unconditional_inpainting_mean": float(inpainted.mean()),
        "p_target_after_edit_mean": float(after.mean()),
        "gain_over_original": float(after.mean() - original.mean()),
        "gain_over_unconditional_inpainting": float(after.mean() - inpainted.mean()),
        "svc_reads_target_after_edit": float((after > 0.5).mean()),
    }


@torch.no_grad()
def scale_images(pipe, token_maps: list[torch.Tensor]) -> list[np.ndarray]:
    """The image after each scale of ``token_maps`` (as sampling accumulates f̂)."""
    side = pipe.vqvae.config.patch_nums[-1]
    latents = torch.zeros(token_maps[0].shape[0], pipe.vqvae.config.z_channels, side, side)
    images = []
    for si, tokens in enumerate(token_maps):
        latents = pipe.vqvae.accumulate_scale(latents, si, tokens)
        images.append(pipe.decode_latents(latents, "np"))
    return images


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--model", default="var-digits")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--max_images", type=int, default=None, help="held-out digits to measure (default: all)")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    os.makedirs(out, exist_ok=True)
    names = ("inpainting.png", "outpainting.png", "class_edit.png", "reconstructions.png", "report.json")
    refuse_foreign_outputs([out / name for name in names])  # (progressive.png: generate checks it)
    pipe = VARInpaintPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    _, _, images, labels = load_digits_split()
    measured = slice(0, args.max_images)  # the figures' digits (the pictures pick theirs from all of them)
    size, patch_nums = pipe.vqvae.image_size, pipe.vqvae.config.patch_nums
    examples = [int(np.flatnonzero(labels == c)[0]) for c in (0, 2, 3, 4, 6, 8)]

    # in-painting: the centre, unconditional, three seeds
    box, rows = centre_box(size), {}
    for i in examples:
        edits = pipe(
            image=as_tensor(images[[i]]), mask_image=box, num_images_per_prompt=3, output_type="np",
            generator=[torch.Generator().manual_seed(s) for s in range(3)],
        )  # fmt: skip
        rows[f"{labels[i]}"] = [PIL.Image.fromarray(images[i]), shaded(images[i], box), *pil(edits.images)]
    save_image_atomically(
        grid(rows, ["input", "mask", "seed 0", "seed 1", "seed 2"], size), out / "inpainting.png", "in-painting"
    )

    # out-painting: keep the centre, regenerate the border
    border, rows = 1 - centre_box(size), {}
    for i in examples:
        kwargs = dict(image=as_tensor(images[[i]]), mask_image=border, output_type="np")
        own = pipe(class_labels=int(labels[i]), generator=torch.Generator().manual_seed(0), **kwargs)
        free = pipe(generator=torch.Generator().manual_seed(0), **kwargs)
        rows[f"{labels[i]}"] = [PIL.Image.fromarray(images[i]), shaded(images[i], border), *pil(own.images)]
        rows[f"{labels[i]}"] += pil(free.images)
    titles = ["input", "mask", "its class", "no class"]
    save_image_atomically(grid(rows, titles, size), out / "outpainting.png", "out-painting")

    # class-conditional editing: the lower half of real 3s, 7s and 2s as every class
    half, rows = lower_half(size), {}
    for c in (3, 7, 2):
        i = int(np.flatnonzero(labels == c)[1])
        edits = pipe(
            image=as_tensor(images[[i]]), mask_image=half, class_labels=list(range(10)), output_type="np",
            generator=[torch.Generator().manual_seed(k) for k in range(10)],
        )  # fmt: skip
        rows[f"a {c}"] = [PIL.Image.fromarray(images[i]), shaded(images[i], half), *pil(edits.images)]
    titles = ["input", "mask", *[f"as {c}" for c in range(10)]]
    save_image_atomically(grid(rows, titles, size), out / "class_edit.png", "class-conditional editing")

    # reconstructions, per scale, on all the held-out digits; a picture of four
    report = {"editing": editing_figures(pipe, images[measured], labels[measured], args.batch_size)}
    report["reconstruction"] = {}
    pictured, rows = examples[:4], {}
    for method in METHODS:
        figures = {"token_accuracy": np.zeros(len(patch_nums)), "psnr": np.zeros(len(patch_nums))}
        measured_images, measured_labels = images[measured], labels[measured]
        for start in range(0, len(measured_images), args.batch_size):
            chunk = slice(start, start + args.batch_size)
            batch, batch_labels = as_tensor(measured_images[chunk]), measured_labels[chunk].tolist()
            result = pipe.reconstruct(batch, batch_labels, method=method, output_type="np")
            weight = len(batch) / len(measured_images)
            figures["token_accuracy"] += weight * np.array(result.token_accuracy)
            figures["psnr"] += weight * np.array(result.psnr)
        report["reconstruction"][method] = {
            name: [round(float(v), 4) for v in values] for name, values in figures.items()
        }
        result = pipe.reconstruct(as_tensor(images[pictured]), labels[pictured].tolist(), method=method)
        per_scale = scale_images(pipe, result.token_maps)
        for k, i in enumerate(pictured):
            rows[f"{labels[i]} {method.replace('_', ' ')}"] = [PIL.Image.fromarray(images[i])] + [
                pil(scale[k : k + 1])[0] for scale in per_scale
            ]
    ordered = {name: rows[name] for i in pictured for name in rows if name.startswith(f"{labels[i]} ")}
    titles = ["input", *[f"{side}x{side}" for side in patch_nums]]
    save_image_atomically(grid(ordered, titles, size), out / "reconstructions.png", "reconstructions")

    # a scale-by-scale generation strip, through the command line's own option
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    generate(parser.parse_args(["--model", args.model, "--progressive", "--num-per-class", "1", "--output",
                                str(out / "progressive.png")]))  # fmt: skip

    _write_json_atomically(report, out / "report.json")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

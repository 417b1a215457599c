"""Train or fine-tune VAR's multi-scale VQVAE tokenizer with 🤗 Accelerate (one process, many GPUs, or CPU processes).

Train a tokenizer from a config on an image folder:

    accelerate launch examples/train_vqvae.py --vqvae_config vqvae.json --train_data_dir data/ \\
        --train_batch_size 16 --max_train_steps 20000 --output_dir tokenizer

Fine-tune the official tokenizer (a converted pipeline folder, a tokenizer folder or a Hub repo id), with the
perceptual and adversarial losses of the VAR tokenizer recipe, their weights read from disk:

    accelerate launch examples/train_vqvae.py --pretrained_vqvae_name_or_path var-d16 --dataset_name user/data \\
        --lpips_weight 1.0 --lpips_weights lpips_vgg.pth --discriminator dino --dino_model dinov2-small/ ...

Losses: L1 or L2 reconstruction plus the VQ loss (commitment β from the config); LPIPS and a patch or DINO
discriminator on request. Codebook usage is tracked per scale, dead codes can be restarted, and a held-out split
gets PSNR (and reconstruction FID in the features of --fid_feature_model). The result is a MultiScaleVQVAE folder in
--output_dir with a model card, ready for ``train_var.py --vqvae_name_or_path``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch
from accelerate.logging import get_logger
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from tqdm.auto import tqdm

from diffusers_var import MultiScaleVQVAE
from diffusers_var.hub import load_vqvae, make_vqvae_card, save_pretrained_into, upload_pretrained
from diffusers_var.training.arguments import add_data_arguments, add_logging_arguments, add_training_arguments
from diffusers_var.training.checkpoints import save_checkpoint
from diffusers_var.training.codebook import CodebookUsage, restart_dead_codes
from diffusers_var.training.data import ImageClassDataset, check_dataset, load_image_dataset
from diffusers_var.training.ema import ParameterEMA
from diffusers_var.training.loop import (
    TrainingPlan,
    find_resume_checkpoint,
    make_accelerator,
    make_lr_scheduler,
    tracker_config,
    training_batches,
)
from diffusers_var.training.optim import scaled_learning_rate
from diffusers_var.training.tokenizer_objective import TokenizerLosses, reconstruction_report

logger = get_logger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model = parser.add_argument_group("model")
    model.add_argument("--vqvae_config", help="JSON of MultiScaleVQVAE arguments, to train from scratch")
    model.add_argument("--pretrained_vqvae_name_or_path", help="tokenizer folder, pipeline folder or repo id")
    model.add_argument("--gradient_checkpointing", action="store_true", help="recompute encoder/decoder layers")
    losses = parser.add_argument_group("losses")
    losses.add_argument("--reconstruction_loss", choices=["l1", "l2"], default="l1")
    losses.add_argument("--vq_weight", type=float, default=1.0, help="weight of the VQ loss (β is in the config)")
    losses.add_argument("--lpips_weight", type=float, default=0.0, help="> 0 needs --lpips_weights")
    losses.add_argument("--lpips_weights", help="LPIPS-VGG state dict (lpips package layout), .pth or .safetensors")
    losses.add_argument("--discriminator", choices=["none", "patchgan", "dino"], default="none")
    losses.add_argument("--dino_model", help="for --discriminator dino: a transformers DINO/DINOv2 folder")
    losses.add_argument("--disc_weight", type=float, default=0.1, help="weight of the generator's adversarial loss")
    losses.add_argument("--disc_start_step", type=int, default=0, help="first step with the adversarial losses")
    losses.add_argument("--disc_learning_rate", type=float, help="default: the tokenizer's learning rate")
    losses.add_argument("--restart_dead_codes_steps", type=int, default=0, help="window in steps; 0 = never")
    add_data_arguments(parser, label_column=None)
    add_training_arguments(parser, output_dir="vqvae-output", learning_rate=2e-4)
    log = add_logging_arguments(parser)
    log.add_argument("--validation_split_percentage", type=float, default=5.0, help="held out for PSNR / rFID")
    log.add_argument("--fid_feature_model", help="transformers vision model folder (e.g. DINOv2) for rFID")
    args = parser.parse_args(argv)
    if (args.vqvae_config is None) == (args.pretrained_vqvae_name_or_path is None):
        parser.error("give exactly one of --vqvae_config or --pretrained_vqvae_name_or_path")
    if args.lpips_weight > 0 and not args.lpips_weights:
        parser.error(
            "--lpips_weight > 0 needs --lpips_weights PATH: the LPIPS-VGG weights on disk (nothing is downloaded). "
            "Save them elsewhere with `torch.save(lpips.LPIPS(net='vgg').state_dict(), 'lpips_vgg.pth')`."
        )
    if args.discriminator == "dino" and not args.dino_model:
        parser.error(
            "--discriminator dino needs --dino_model PATH: a transformers DINO or DINOv2 folder on disk, e.g. "
            "`AutoModel.from_pretrained('facebook/dinov2-small').save_pretrained(PATH)` on a machine with Hub access."
        )
    if not 0 <= args.validation_split_percentage < 100:
        parser.error(f"--validation_split_percentage must lie in [0, 100), got {args.validation_split_percentage}")
    return args


def split_validation(dataset, percentage: float, seed: int):
    """(train, validation or None): a seeded hold-out, at least one image when a percentage is asked for."""
    if percentage <= 0:
        return dataset, None
    size = max(1, round(len(dataset) * percentage / 100))
    if size >= len(dataset):
        raise ValueError(f"--validation_split_percentage {percentage} leaves no training images of {len(dataset)}.")
    parts = dataset.train_test_split(test_size=size, seed=seed)
    return parts["train"], parts["test"]


@contextlib.contextmanager
def frozen(module: torch.nn.Module):
    """No parameter gradients inside (the generator's adversarial loss must not train the discriminator)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for param, flag in zip(module.parameters(), flags):
            param.requires_grad_(flag)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_seed(args.seed)  # the new tokenizer's init; the Accelerator reseeds every process the same way
    vqvae = (
        MultiScaleVQVAE(**json.loads(Path(args.vqvae_config).read_text()))
        if args.vqvae_config
        else load_vqvae(args.pretrained_vqvae_name_or_path, cache_dir=args.cache_dir)
    )
    # φ convolutions that no scale uses (few scales, many φ) get no gradient; DDP must be told
    quantizer = vqvae.quantizer
    unused_phis = len(quantizer.phis) > len(set(quantizer.phi_index)) and any(
        p.requires_grad for p in quantizer.phis.parameters()
    )
    accelerator = make_accelerator(args, [DistributedDataParallelKwargs(find_unused_parameters=unused_phis)])
    output_dir = Path(args.output_dir)

    dataset = load_image_dataset(
        args.train_data_dir, args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir
    )
    check_dataset(dataset, args.image_column, None, None)
    train_split, validation_split = split_validation(dataset, args.validation_split_percentage, args.seed)
    resolution = args.resolution or vqvae.image_size
    if resolution % vqvae.downsample_factor or resolution // vqvae.downsample_factor != vqvae.config.patch_nums[-1]:
        raise ValueError(
            f"--resolution {resolution} does not fit the tokenizer: its last scale is {vqvae.config.patch_nums[-1]} "
            f"× {vqvae.config.patch_nums[-1]} at downsampling {vqvae.downsample_factor}, i.e. {vqvae.image_size} px."
        )
    losses = TokenizerLosses.from_args(args, resolution).to(accelerator.device)
    train_set = ImageClassDataset(
        train_split, args.image_column, None, resolution, args.center_crop, args.random_flip, args.seed
    )
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=args.train_batch_size,
        shuffle=True,
        num_workers=args.dataloader_num_workers,
        drop_last=True,
    )
    plan = TrainingPlan.from_args(args, accelerator, loader, len(train_split))
    global_batch, max_steps = plan.global_batch, plan.max_steps
    learning_rate = args.learning_rate if args.no_scale_lr else scaled_learning_rate(args.learning_rate, global_batch)

    vqvae.train()
    if args.gradient_checkpointing:
        vqvae.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(
        vqvae.parameters(), lr=learning_rate, betas=(0.9, 0.95), weight_decay=args.adam_weight_decay
    )
    lr_scheduler = make_lr_scheduler(args, optimizer, accelerator, plan)
    vqvae, optimizer, loader, lr_scheduler = accelerator.prepare(vqvae, optimizer, loader, lr_scheduler)
    discriminator = disc_optimizer = None
    if losses.discriminator is not None:
        disc_optimizer = torch.optim.Adam(
            [p for p in losses.discriminator.parameters() if p.requires_grad],
            lr=args.disc_learning_rate or learning_rate,
            betas=(0.5, 0.9),
        )
        discriminator, disc_optimizer = accelerator.prepare(losses.discriminator, disc_optimizer)
    model = accelerator.unwrap_model(vqvae)
    usage = CodebookUsage(len(model.config.patch_nums), model.config.vocab_size)
    accelerator.register_for_checkpointing(usage)
    ema = ParameterEMA(model, args.ema_decay) if args.use_ema else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    if accelerator.is_main_process:
        accelerator.init_trackers("train_vqvae", config=tracker_config(args))

    def validate(step: int) -> dict[str, float]:
        if validation_split is None:
            return {}
        report = reconstruction_report(
            accelerator.unwrap_model(vqvae), validation_split, args.image_column, resolution, losses.feature_model
        )
        accelerator.log({f"validation/{k}": v for k, v in report.items()}, step=step)
        logger.info(f"Validation at step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in report.items()))
        return report

    resume, global_step = find_resume_checkpoint(args, accelerator)
    logger.info(f"{len(train_split)} training images, global batch {global_batch}, lr {learning_rate:.3g}")
    progress = tqdm(range(max_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process)
    models = [vqvae] + ([discriminator] if discriminator is not None else [])
    for batch in training_batches(accelerator, loader, train_set, plan, resume, global_step):
        images = batch["pixel_values"]
        adversarial = discriminator is not None and global_step >= args.disc_start_step
        with accelerator.accumulate(*models):
            with accelerator.autocast():
                output = vqvae(images)
                with frozen(accelerator.unwrap_model(discriminator)) if adversarial else contextlib.nullcontext():
                    loss, logs = losses.tokenizer_loss(output, images, adversarial)
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(vqvae.parameters(), args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            if adversarial:
                with accelerator.autocast():
                    disc_loss = losses.discriminator_loss(discriminator, images, output.sample.detach())
                accelerator.backward(disc_loss)
                disc_optimizer.step()
                disc_optimizer.zero_grad()
                logs["disc_loss"] = disc_loss.item()
        if args.restart_dead_codes_steps:  # the counts only decide restarts; the logged usage is per batch
            usage.update(output.token_maps)
        if not accelerator.sync_gradients:
            continue
        global_step += 1
        progress.update(1)
        if ema is not None:
            ema.update(model)
        if args.restart_dead_codes_steps and global_step % args.restart_dead_codes_steps == 0:
            usage.counts = accelerator.reduce(usage.counts.to(accelerator.device), "sum").cpu()
            with torch.no_grad():
                latents = model.encode(images.to(model.dtype)).permute(0, 2, 3, 1).flatten(0, 2).float()
            generator = torch.Generator().manual_seed(args.seed * 1_000_003 + global_step)
            dead = usage.dead_codes()
            logs["restarted_codes"] = restart_dead_codes(
                model.quantizer.embedding, dead, accelerator.gather(latents).cpu(), generator
            )
            usage.reset()
        logs.update({f"usage/scale_{i}": u.item() for i, u in enumerate(output.codebook_usage)})
        logs["lr"] = lr_scheduler.get_last_lr()[0]
        progress.set_postfix(rec=f"{logs['reconstruction_loss']:.4f}", vq=f"{logs['vq_loss']:.4f}")
        accelerator.log({f"train/{k}": v for k, v in logs.items()}, step=global_step)
        if global_step % args.checkpointing_steps == 0:
            save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
        if args.validation_steps and global_step % args.validation_steps == 0 and accelerator.is_main_process:
            validate(global_step)
        if global_step >= max_steps:
            break

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(vqvae)
        if ema is not None:
            ema.copy_to(final)
        final.eval()
        report = validate(global_step)
        card = {
            "model_name": output_dir.name,
            "base_model": args.pretrained_vqvae_name_or_path or "from scratch",
            "dataset": args.dataset_name or args.train_data_dir,
            "train_steps": global_step,
            "global_batch": global_batch,
            "learning_rate": learning_rate,
            "losses": losses.describe(),
            "validation": ", ".join(f"{k} {v:.4g}" for k, v in report.items()) or "no held-out split",
        }
        save_pretrained_into(final, output_dir, make_vqvae_card(final, card))
        if args.push_to_hub:
            upload_pretrained(
                final,
                args.hub_model_id or output_dir.name,
                lambda repo_id: make_vqvae_card(final, {**card, "repo_id": repo_id}),
                token=args.hub_token,
            )
        logger.info(f"Saved the tokenizer to {output_dir}")
    accelerator.end_training()


if __name__ == "__main__":
    main()

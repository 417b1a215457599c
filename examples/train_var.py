"""Fine-tune or train a VAR transformer with 🤗 Accelerate (one process, many GPUs, or CPU processes).

Fine-tune a converted or shared pipeline on an image folder (one sub-folder per class):

    accelerate launch examples/train_var.py --pretrained_model_name_or_path var-d16 \\
        --train_data_dir data/ --resolution 256 --train_batch_size 8 --max_train_steps 1000 --output_dir out

Train a transformer from scratch on a frozen tokenizer:

    accelerate launch examples/train_var.py --model_config var_config.json --vqvae_name_or_path tokenizer/ \\
        --dataset_name user/dataset --num_classes 10 ...

The tokenizer stays frozen; training is teacher forcing over all scales (label-smoothed cross-entropy, class dropout
for guidance). The result is a VARPipeline folder in --output_dir with a model card.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration, skip_first_batches
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from diffusers_var import MultiScaleVQVAE, VARConfig, VARPipeline, VARScaleScheduler, VARTransformer
from diffusers_var.hub import make_model_card, save_pipeline_into
from diffusers_var.training.checkpoints import checkpoint_step, resolve_resume_path, save_checkpoint
from diffusers_var.training.data import ImageClassDataset, check_dataset, load_image_dataset
from diffusers_var.training.ema import ParameterEMA
from diffusers_var.training.launch import cpu_only, spawn_cpu_processes
from diffusers_var.training.objective import teacher_forcing_batch, var_loss
from diffusers_var.training.optim import make_optimizer, scaled_learning_rate
from diffusers_var.training.validation import log_validation_grid

logger = get_logger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model = parser.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", help="a VARPipeline folder or Hub repo id to fine-tune")
    model.add_argument("--model_config", help="JSON of VARConfig arguments, to train a transformer from scratch")
    model.add_argument("--vqvae_name_or_path", help="with --model_config: the tokenizer (folder, or pipeline folder)")
    model.add_argument("--num_classes", type=int, help="resize the class embedding (the null class is kept)")
    model.add_argument("--class_dropout_prob", type=float, default=0.1, help="label → null class, for guidance")
    model.add_argument("--label_smoothing", type=float, default=0.0)
    model.add_argument("--gradient_checkpointing", action="store_true")
    data = parser.add_argument_group("data")
    data.add_argument("--train_data_dir", help="an image folder: one sub-folder per class, sorted = class ids")
    data.add_argument("--dataset_name", help="a Hub or local dataset")
    data.add_argument("--dataset_config_name")
    data.add_argument("--image_column", default="image")
    data.add_argument("--label_column", default="label")
    data.add_argument("--resolution", type=int, help="defaults to the tokenizer's image size")
    data.add_argument("--center_crop", action="store_true", help="centre crop (default: random crop)")
    data.add_argument("--random_flip", action="store_true")
    data.add_argument("--dataloader_num_workers", type=int, default=0)
    data.add_argument("--cache_dir")
    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", default="var-output")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--train_batch_size", type=int, default=16, help="per process")
    train.add_argument("--num_epochs", type=int, default=1)
    train.add_argument("--max_train_steps", type=int, help="overrides --num_epochs")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--learning_rate", type=float, default=1e-4, help="base lr per 256 images (official tblr)")
    train.add_argument("--no_scale_lr", action="store_true", help="use --learning_rate as is, not × batch / 256")
    train.add_argument("--lr_scheduler", default="constant_with_warmup")
    train.add_argument("--lr_warmup_steps", type=int, default=0)
    train.add_argument("--adam_weight_decay", type=float, default=0.05)
    train.add_argument("--max_grad_norm", type=float, default=2.0, help="≤ 0 disables clipping")
    train.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    train.add_argument("--use_ema", action="store_true")
    train.add_argument("--ema_decay", type=float, default=0.9999)
    train.add_argument("--checkpointing_steps", type=int, default=500)
    train.add_argument("--checkpoints_total_limit", type=int)
    train.add_argument("--resume_from_checkpoint", help="'latest' or a checkpoint folder")
    log = parser.add_argument_group("logging and sharing")
    log.add_argument("--report_to", default="tensorboard", help="accelerate tracker(s), or 'none'")
    log.add_argument("--logging_dir", default="logs")
    log.add_argument("--validation_steps", type=int, default=500)
    log.add_argument("--validation_classes", type=int, nargs="+", help="default: up to 8 classes")
    log.add_argument("--validation_guidance_scale", type=float, default=2.5)
    log.add_argument("--push_to_hub", action="store_true")
    log.add_argument("--hub_model_id")
    log.add_argument("--hub_token")
    args = parser.parse_args(argv)
    if (args.pretrained_model_name_or_path is None) == (args.model_config is None):
        parser.error("give exactly one of --pretrained_model_name_or_path or --model_config")
    if args.model_config and not args.vqvae_name_or_path:
        parser.error("--model_config needs --vqvae_name_or_path (the frozen tokenizer)")
    return args


def load_components(args) -> tuple[MultiScaleVQVAE, VARTransformer, VARScaleScheduler, dict | None]:
    if args.pretrained_model_name_or_path:
        pipe = VARPipeline.from_pretrained(args.pretrained_model_name_or_path, cache_dir=args.cache_dir)
        return pipe.vqvae, pipe.transformer, pipe.scheduler, pipe.config.id2label
    path = Path(args.vqvae_name_or_path)
    vqvae = MultiScaleVQVAE.from_pretrained(path, subfolder="vqvae" if (path / "vqvae").is_dir() else None)
    config = VARConfig(**json.loads(Path(args.model_config).read_text()))
    transformer = VARTransformer(config)
    return vqvae, transformer, VARScaleScheduler(patch_nums=tuple(config.patch_nums)), None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    spawn_cpu_processes()  # `accelerate launch --cpu --num_processes N` starts one process; start the N workers
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        cpu=cpu_only(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed)

    vqvae, transformer, scheduler, id2label = load_components(args)
    vqvae.requires_grad_(False).eval().to(accelerator.device)
    if args.num_classes is not None and args.num_classes != transformer.config.num_classes:
        logger.info(f"Resizing the class embedding: {transformer.config.num_classes} → {args.num_classes} classes")
        transformer.resize_class_embedding(args.num_classes)
        id2label = None
    transformer.config.class_dropout_prob = args.class_dropout_prob
    transformer.config.label_smoothing = args.label_smoothing
    if args.gradient_checkpointing:
        transformer.activation_checkpointing_enable()
    transformer.train()

    dataset = load_image_dataset(
        args.train_data_dir, args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir
    )
    check_dataset(dataset, args.image_column, args.label_column, transformer.config.num_classes)
    if id2label is None and hasattr(dataset.features.get(args.label_column), "names"):
        id2label = dict(enumerate(dataset.features[args.label_column].names))
    resolution = args.resolution or vqvae.image_size
    if resolution != vqvae.image_size:
        raise ValueError(f"--resolution {resolution} does not match the tokenizer's {vqvae.image_size} px.")
    train_set = ImageClassDataset(
        dataset, args.image_column, args.label_column, resolution, args.center_crop, args.random_flip, args.seed
    )
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=args.train_batch_size,
        shuffle=True,
        num_workers=args.dataloader_num_workers,
        drop_last=True,
    )

    global_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    if len(dataset) < global_batch:
        raise ValueError(
            f"The dataset has {len(dataset)} images, fewer than one global batch of {global_batch} "
            "(batch × processes × accumulation). Lower --train_batch_size."
        )
    learning_rate = args.learning_rate if args.no_scale_lr else scaled_learning_rate(args.learning_rate, global_batch)
    optimizer = make_optimizer(transformer, learning_rate, args.adam_weight_decay)
    steps_per_epoch = math.ceil(len(loader) / accelerator.num_processes / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_epochs * steps_per_epoch
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    # the prepared scheduler steps once per process per optimiser step
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
    )
    transformer, optimizer, loader, lr_scheduler = accelerator.prepare(transformer, optimizer, loader, lr_scheduler)
    ema = ParameterEMA(accelerator.unwrap_model(transformer), args.ema_decay) if args.use_ema else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    if accelerator.is_main_process:
        accelerator.init_trackers(
            "train_var", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        )

    global_step, first_epoch, skip_batches = 0, 0, 0
    resume = resolve_resume_path(output_dir, args.resume_from_checkpoint)
    if resume is not None:
        global_step = checkpoint_step(resume)
        first_epoch, skip_batches = divmod(
            global_step * args.gradient_accumulation_steps, steps_per_epoch * args.gradient_accumulation_steps
        )
        if global_step >= max_steps:  # nothing left to train: restore the final state and save it
            accelerator.load_state(str(resume))
    elif args.resume_from_checkpoint:
        logger.info("No checkpoint to resume from; starting a new run.")

    logger.info(f"{len(dataset)} images, global batch {global_batch}, lr {learning_rate:.3g}, {max_steps} steps")
    progress = tqdm(range(max_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process)
    for epoch in range(first_epoch, num_epochs):
        train_set.set_epoch(epoch)
        loader.set_epoch(epoch)
        batches = iter(skip_first_batches(loader, skip_batches) if epoch == first_epoch and skip_batches else loader)
        if resume is not None and epoch == first_epoch and global_step < max_steps:
            # Restore after fetching the first batch: starting the loader draws from the global RNG, which the
            # uninterrupted run did at the start of the epoch, before the checkpoint's RNG state was taken.
            batches = itertools.chain([next(batches)], batches)
            accelerator.load_state(str(resume))
            logger.info(f"Resumed from {resume} at step {global_step}")
        for batch in batches:
            with accelerator.accumulate(transformer):
                inputs, targets = teacher_forcing_batch(vqvae, batch["pixel_values"])
                with accelerator.autocast():
                    loss, metrics = var_loss(transformer, batch["class_labels"], inputs, targets)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(transformer.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            progress.update(1)
            if ema is not None:
                ema.update(accelerator.unwrap_model(transformer))
            logs = {**metrics.as_dict("train/"), "lr": lr_scheduler.get_last_lr()[0]}
            progress.set_postfix(loss=f"{metrics.loss:.3f}", acc=f"{metrics.accuracy:.1f}")
            accelerator.log(logs, step=global_step)
            if global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
            if args.validation_steps and global_step % args.validation_steps == 0 and accelerator.is_main_process:
                log_validation_grid(
                    accelerator,
                    vqvae,
                    accelerator.unwrap_model(transformer),
                    scheduler,
                    global_step,
                    args.validation_classes,
                    args.validation_guidance_scale,
                    args.seed,
                )
            if global_step >= max_steps:
                break
        if global_step >= max_steps:
            break

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(transformer)
        if ema is not None:
            ema.copy_to(final)
        final.config.class_dropout_prob = args.class_dropout_prob
        pipe = VARPipeline(vqvae=vqvae, transformer=final.eval(), scheduler=scheduler, id2label=id2label)
        card = {
            "model_name": output_dir.name,
            "base_model": args.pretrained_model_name_or_path or "from scratch",
            "dataset": args.dataset_name or args.train_data_dir,
            "train_steps": global_step,
            "global_batch": global_batch,
            "learning_rate": learning_rate,
            "resolution": resolution,
        }
        save_pipeline_into(pipe, output_dir, make_model_card(pipe, "var-trained", card))
        if args.push_to_hub:
            pipe.push_to_hub(
                args.hub_model_id or output_dir.name, token=args.hub_token, card_template="var-trained", card_data=card
            )
        logger.info(f"Saved the pipeline to {output_dir}")
    accelerator.end_training()


if __name__ == "__main__":
    main()

"""Command-line flags shared by the training scripts, with the names of the diffusers training examples."""

from __future__ import annotations

import argparse


def add_data_arguments(parser: argparse.ArgumentParser, label_column: str | None = "label") -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--train_data_dir", help="an image folder: one sub-folder per class, sorted = class ids")
    data.add_argument("--dataset_name", help="a Hub or local dataset")
    data.add_argument("--dataset_config_name")
    data.add_argument("--image_column", default="image")
    data.add_argument("--label_column", default=label_column)
    data.add_argument("--resolution", type=int, help="defaults to the tokenizer's image size")
    data.add_argument("--center_crop", action="store_true", help="centre crop (default: random crop)")
    data.add_argument("--random_flip", action="store_true")
    data.add_argument("--dataloader_num_workers", type=int, default=0)
    data.add_argument("--cache_dir")


def add_training_arguments(parser: argparse.ArgumentParser, output_dir: str, learning_rate: float) -> None:
    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", default=output_dir)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--train_batch_size", type=int, default=16, help="per process")
    train.add_argument("--num_epochs", type=int, default=1)
    train.add_argument("--max_train_steps", type=int, help="overrides --num_epochs")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--learning_rate", type=float, default=learning_rate, help="base lr per 256 images")
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


def add_logging_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    log = parser.add_argument_group("logging and sharing")
    log.add_argument("--report_to", default="tensorboard", help="accelerate tracker(s), or 'none'")
    log.add_argument("--logging_dir", default="logs")
    log.add_argument("--validation_steps", type=int, default=500)
    log.add_argument("--push_to_hub", action="store_true")
    log.add_argument("--hub_model_id")
    log.add_argument("--hub_token")
    return log

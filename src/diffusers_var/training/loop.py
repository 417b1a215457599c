"""The parts of a training script's loop that must agree between scripts for exact resume and multi-process runs:
the Accelerator, the step plan, and an epoch/batch iterator that restores a checkpoint at the right moment."""

from __future__ import annotations

import argparse
import itertools
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration, skip_first_batches
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler

from .checkpoints import checkpoint_step, resolve_resume_path
from .launch import cpu_only, spawn_cpu_processes

logger = get_logger(__name__)


def make_accelerator(args: argparse.Namespace, kwargs_handlers: list | None = None) -> Accelerator:
    """The Accelerator for the shared flags; also starts the CPU workers of ``accelerate launch --cpu -n N``."""
    spawn_cpu_processes()  # accelerate 1.15 starts one process for `--cpu --num_processes N`; start the N workers
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
        kwargs_handlers=kwargs_handlers,
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed)
    return accelerator


def tracker_config(args: argparse.Namespace) -> dict:
    """The flags trackers can store (scalars and strings)."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}


@dataclass
class TrainingPlan:
    """How long a run is: optimiser steps per epoch, in total, and the epochs that cover them."""

    global_batch: int
    steps_per_epoch: int
    max_steps: int
    num_epochs: int
    gradient_accumulation_steps: int

    @classmethod
    def from_args(cls, args: argparse.Namespace, accelerator: Accelerator, loader, num_images: int) -> TrainingPlan:
        accumulation = args.gradient_accumulation_steps
        global_batch = args.train_batch_size * accelerator.num_processes * accumulation
        if num_images < global_batch:
            raise ValueError(
                f"The dataset has {num_images} images, fewer than one global batch of {global_batch} "
                "(batch × processes × accumulation). Lower --train_batch_size."
            )
        steps_per_epoch = math.ceil(len(loader) / accelerator.num_processes / accumulation)
        max_steps = args.max_train_steps or args.num_epochs * steps_per_epoch
        return cls(global_batch, steps_per_epoch, max_steps, math.ceil(max_steps / steps_per_epoch), accumulation)


def make_lr_scheduler(args: argparse.Namespace, optimizer, accelerator: Accelerator, plan: TrainingPlan):
    """``--lr_scheduler`` with warm-up; counted per process, because the prepared scheduler steps once per process
    per optimiser step."""
    return get_scheduler(
        args.lr_scheduler,
        optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=plan.max_steps * accelerator.num_processes,
    )


def find_resume_checkpoint(args: argparse.Namespace, accelerator: Accelerator | None = None) -> tuple[Path | None, int]:
    """(checkpoint to resume from or None, its step). With several processes the main one verifies the checkpoints
    (hashing every file) and tells the others which it chose."""
    if accelerator is None or accelerator.num_processes == 1:
        resume = resolve_resume_path(args.output_dir, args.resume_from_checkpoint)
    else:
        from accelerate.utils import broadcast_object_list

        choice = [None]
        if accelerator.is_main_process:
            try:
                found = resolve_resume_path(args.output_dir, args.resume_from_checkpoint)
                choice = [("ok", None if found is None else str(found))]
            except ValueError as error:
                choice = [("error", str(error))]
        choice = broadcast_object_list(choice)[0]
        if choice[0] == "error":
            raise ValueError(choice[1])
        resume = None if choice[1] is None else Path(choice[1])
    if resume is None:
        if args.resume_from_checkpoint:
            logger.info("No checkpoint to resume from; starting a new run.")
        return None, 0
    return resume, checkpoint_step(resume)


def training_batches(
    accelerator: Accelerator,
    loader: torch.utils.data.DataLoader,
    dataset,
    plan: TrainingPlan,
    resume: Path | None = None,
    global_step: int = 0,
) -> Iterator[dict]:
    """Every batch of the run from ``global_step`` on, epoch after epoch; the caller stops at ``plan.max_steps``.

    ``dataset.set_epoch`` and the sampler's epoch are set before each epoch, and the batches a resumed run has
    already seen are skipped. Starting an epoch's loader draws from the global RNG (its base seed), so the
    checkpoint is restored where the uninterrupted run took it relative to that draw: mid-epoch, the uninterrupted
    run had started the epoch before it saved, so the resumed run starts it (fetching the first batch) and then
    restores; at an epoch boundary the next epoch starts after the save, so the state is restored first.
    """
    if resume is not None and global_step >= plan.max_steps:  # nothing left to train: restore the final state
        accelerator.load_state(str(resume))
        return
    accumulation = plan.gradient_accumulation_steps
    first_epoch, skip = divmod(global_step * accumulation, plan.steps_per_epoch * accumulation)
    for epoch in range(first_epoch, plan.num_epochs):
        resuming = resume is not None and epoch == first_epoch
        if resuming and not skip:
            accelerator.load_state(str(resume))
            logger.info(f"Resumed from {resume} at step {global_step} (the start of epoch {epoch})")
        dataset.set_epoch(epoch)
        loader.set_epoch(epoch)
        batches = iter(skip_first_batches(loader, skip) if resuming and skip else loader)
        if resuming and skip:
            batches = itertools.chain([next(batches)], batches)
            accelerator.load_state(str(resume))
            logger.info(f"Resumed from {resume} at step {global_step}")
        yield from batches

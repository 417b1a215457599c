"""Fine-tune or train a VAR transformer with 🤗 Accelerate (one process, many GPUs, or CPU processes).

Fine-tune a converted or shared pipeline on an image folder (one sub-folder per class):

    accelerate launch examples/train_var.py --pretrained_model_name_or_path var-d16 \\
        --train_data_dir data/ --resolution 256 --train_batch_size 8 --max_train_steps 1000 --output_dir out

Train a transformer from scratch on a frozen tokenizer:

    accelerate launch examples/train_var.py --model_config var_config.json --vqvae_name_or_path tokenizer/ \\
        --dataset_name user/dataset --num_classes 10 ...

Fine-tune only LoRA adapters (transformers' PEFT integration) on the attention and MLP projections:

    accelerate launch examples/train_var.py --pretrained_model_name_or_path var-digits --lora_rank 4 ...

Train with retrieval conditioning (Re-Imagen): every sample attends to k other real images of its label, drawn from a
datastore built with `diffusers-var index --images <the training images> --tokenizer <the tokenizer>`:

    accelerate launch examples/train_var.py --model_config var_config.json --vqvae_name_or_path tokenizer/ \
        --train_data_dir data/ --retrieval_datastore datastore/ --num_neighbours 4 --neighbour_dropout_prob 0.1 ...

Post-train with Condition Contrastive Alignment (guidance-free sampling) or Direct Discriminative Optimization (a GAN
objective in self-play rounds) against a frozen reference, by default the starting weights:

    accelerate launch examples/train_var.py --pretrained_model_name_or_path var-d16 --objective cca \
        --cca_beta 0.02 --cca_lambda 50 --train_data_dir imagenet/train --num_epochs 1 ...
    accelerate launch examples/train_var.py --pretrained_model_name_or_path var-d16 --objective ddo \
        --ddo_alpha 10 --ddo_beta 0.02 --ddo_rounds 2 --train_data_dir imagenet/train ...

The tokenizer stays frozen; training (--objective ce, the default) is teacher forcing over all scales (label-smoothed
cross-entropy, class dropout for guidance). The result is a VARPipeline folder in --output_dir with a model card (with
LoRA: the adapter, as adapter_model.safetensors and adapter_config.json naming the base model, which
`pipe.load_lora_weights` loads).
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
from pathlib import Path

import torch
from accelerate.logging import get_logger
from tqdm.auto import tqdm

from diffusers_var import MultiScaleVQVAE, VARConfig, VARPipeline, VARScaleScheduler, VARTransformer
from diffusers_var.hub import load_vqvae, make_lora_card, make_model_card, save_pretrained_into, upload_pretrained
from diffusers_var.lora import DEFAULT_TARGET_MODULES, ID2LABEL_FILE, add_lora, lora_config
from diffusers_var.saving import write_text_atomically
from diffusers_var.training.arguments import add_data_arguments, add_logging_arguments, add_training_arguments
from diffusers_var.training.cca import CCA_BETA, CCA_LAMBDA, cca_batch_loss, check_cca_model
from diffusers_var.training.checkpoints import save_checkpoint
from diffusers_var.training.data import (
    ImageClassDataset,
    check_dataset,
    dataset_class_names,
    id2label_for_data,
    load_image_dataset,
)
from diffusers_var.training.ddo import DDO_ALPHA, DDO_BETA, ddo_batch_loss
from diffusers_var.training.ema import ParameterEMA
from diffusers_var.training.loop import (
    TrainingPlan,
    find_resume_checkpoint,
    make_accelerator,
    make_lr_scheduler,
    tracker_config,
    training_batches,
)
from diffusers_var.training.objective import teacher_forcing_batch, var_loss
from diffusers_var.training.optim import make_optimizer, scaled_learning_rate
from diffusers_var.training.reference import check_reference, disable_dropout, frozen_reference, load_reference
from diffusers_var.training.retrieval import neighbour_codes
from diffusers_var.training.self_play import DEFAULT_FAKE_TOKENS, FAKE_TOKENS
from diffusers_var.training.validation import log_validation_grid

logger = get_logger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model = parser.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", help="a VARPipeline folder or Hub repo id to fine-tune")
    model.add_argument("--model_config", help="JSON of VARConfig arguments, to train a transformer from scratch")
    model.add_argument(
        "--vqvae_name_or_path", help="with --model_config: the tokenizer (folder, pipeline folder or repo id)"
    )
    model.add_argument("--num_classes", type=int, help="resize the class embedding (the null class is kept)")
    model.add_argument("--class_dropout_prob", type=float, default=0.1, help="label → null class, for guidance")
    model.add_argument("--label_smoothing", type=float, default=0.0)
    model.add_argument("--gradient_checkpointing", action="store_true")
    retrieval = parser.add_argument_group("retrieval conditioning (after Re-Imagen)")
    retrieval.add_argument("--retrieval_datastore", help="a datastore (diffusers-var index) of the training images")
    retrieval.add_argument("--num_neighbours", type=int, help="k neighbours per sample (default: the model's, or 4)")
    retrieval.add_argument(
        "--neighbour_dropout_prob",
        type=float,
        default=None,
        help="drop a sample's neighbours, for guidance on retrieval (default: the model's, 0.1 for a new one)",
    )
    post = parser.add_argument_group("post-training objectives (CCA, DDO)")
    post.add_argument(
        "--objective",
        choices=("ce", "cca", "ddo"),
        default="ce",
        help="ce: teacher-forced cross-entropy; cca: Condition Contrastive Alignment; ddo: Direct Discriminative "
        "Optimization",
    )
    post.add_argument(
        "--reference_model",
        help="cca/ddo: the frozen reference (pipeline or transformer folder, or repo id); default the starting weights",
    )
    post.add_argument(
        "--offload_reference",
        action="store_true",
        help="keep the reference's weights in CPU memory, each layer moved to the device for its forward",
    )
    post.add_argument("--cca_beta", type=float, default=CCA_BETA, help="CCA's β, the likelihood-ratio scale")
    post.add_argument("--cca_lambda", type=float, default=CCA_LAMBDA, help="CCA's λ, the mismatched-class weight")
    post.add_argument("--ddo_alpha", type=float, default=DDO_ALPHA, help="DDO's α, the reference samples' weight")
    post.add_argument("--ddo_beta", type=float, default=DDO_BETA, help="DDO's β, the likelihood-ratio scale")
    post.add_argument("--ddo_rounds", type=int, default=1, help="self-play rounds; the reference moves each round")
    post.add_argument(
        "--ddo_samples_per_round",
        type=int,
        help="reference samples drawn per round (default: one per fake row of the round's steps)",
    )
    post.add_argument("--ddo_generation_batch_size", type=int, default=64)
    post.add_argument(
        "--ddo_fake_tokens",
        choices=FAKE_TOKENS,
        default=DEFAULT_FAKE_TOKENS,
        help="the reference's samples decoded to 8-bit pixels and tokenized again like real images (default), or "
        "the token pyramids it drew (the distribution DDO's ratio is defined on); see the README's DDO section",
    )
    lora = parser.add_argument_group("LoRA (train adapters only; needs peft)")
    lora.add_argument("--lora_rank", type=int, default=0, help="adapter rank; 0 trains the whole transformer")
    lora.add_argument("--lora_alpha", type=float, default=None, help="adapter scale numerator (default: the rank)")
    lora.add_argument("--lora_dropout", type=float, default=0.0)
    lora.add_argument(
        "--lora_target_modules",
        nargs="+",
        default=list(DEFAULT_TARGET_MODULES),
        help=f"linear layers to adapt (default: {' '.join(DEFAULT_TARGET_MODULES)}, attention and MLP)",
    )
    add_data_arguments(parser)
    add_training_arguments(parser, output_dir="var-output", learning_rate=1e-4)
    log = add_logging_arguments(parser)
    log.add_argument("--validation_classes", type=int, nargs="+", help="default: up to 8 classes")
    log.add_argument("--validation_guidance_scale", type=float, default=2.5)
    args = parser.parse_args(argv)
    if (args.pretrained_model_name_or_path is None) == (args.model_config is None):
        parser.error("give exactly one of --pretrained_model_name_or_path or --model_config")
    if args.model_config and not args.vqvae_name_or_path:
        parser.error("--model_config needs --vqvae_name_or_path (the frozen tokenizer)")
    if args.lora_rank < 0:
        parser.error(f"--lora_rank must be ≥ 0 (0 = full fine-tuning), got {args.lora_rank}")
    if args.lora_rank and args.model_config:
        parser.error("LoRA adapts a pretrained model: use --pretrained_model_name_or_path, not --model_config")
    if args.lora_rank and args.num_classes is not None:
        parser.error("--num_classes with --lora_rank would leave the new class rows untrained; fine-tune fully")
    if args.num_neighbours is not None and not args.retrieval_datastore:
        parser.error("--num_neighbours needs --retrieval_datastore (where the neighbours come from)")
    if args.num_neighbours is not None and args.num_neighbours < 1:
        parser.error(f"--num_neighbours must be ≥ 1, got {args.num_neighbours}")
    if args.neighbour_dropout_prob is not None and not 0 <= args.neighbour_dropout_prob <= 1:
        parser.error(f"--neighbour_dropout_prob must lie in [0, 1], got {args.neighbour_dropout_prob}")
    if args.retrieval_datastore and args.lora_rank:
        parser.error("--retrieval_datastore trains new retrieval layers: fine-tune fully, without --lora_rank")
    check_post_training_arguments(parser, args)
    return args


def check_post_training_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for flag in ("cca", "ddo"):  # an objective's hyper-parameters, given for another objective, would do nothing
        changed = [f"--{k}" for k, v in vars(args).items() if k.startswith(f"{flag}_") and v != parser.get_default(k)]
        if changed and args.objective != flag:
            parser.error(f"{', '.join(changed)} set(s) --objective {flag}, and the objective is {args.objective}")
    if args.objective == "ce":
        given = [f"--{k}" for k in ("reference_model", "offload_reference") if getattr(args, k)]
        if given:
            parser.error(f"{' and '.join(given)} belong to --objective cca or ddo (a frozen reference model)")
        return
    for name in ("cca_beta", "ddo_beta"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name} must be > 0 (it scales the likelihood ratio), got {getattr(args, name)}")
    for name in ("cca_lambda", "ddo_alpha"):
        if not getattr(args, name) >= 0:
            parser.error(f"--{name} must be ≥ 0 (a loss weight), got {getattr(args, name)}")
    if args.model_config:
        parser.error(
            f"--objective {args.objective} post-trains a trained model against itself as reference"
            + (" and samples it" if args.objective == "ddo" else "")
            + ": give --pretrained_model_name_or_path, not --model_config"
        )
    if args.lora_rank:
        parser.error(f"--objective {args.objective} fine-tunes the whole transformer; leave out --lora_rank")
    if args.label_smoothing:
        parser.error(
            f"--label_smoothing shapes the cross-entropy; --objective {args.objective} compares exact log-likelihoods"
        )
    if args.retrieval_datastore:
        parser.error(f"--objective {args.objective} does not train retrieval conditioning; use --objective ce")
    if args.objective == "ddo":
        if args.ddo_rounds < 1:
            parser.error(f"--ddo_rounds must be ≥ 1, got {args.ddo_rounds}")
        if args.ddo_samples_per_round is not None and args.ddo_samples_per_round < 1:
            parser.error(
                f"--ddo_samples_per_round must be ≥ 1 (DDO needs the reference's samples), got "
                f"{args.ddo_samples_per_round}"
            )
        if args.ddo_generation_batch_size < 1:
            parser.error(f"--ddo_generation_batch_size must be ≥ 1, got {args.ddo_generation_batch_size}")


def load_components(args) -> tuple[MultiScaleVQVAE, VARTransformer, VARScaleScheduler, dict | None]:
    if args.pretrained_model_name_or_path:
        pipe = VARPipeline.from_pretrained(args.pretrained_model_name_or_path, cache_dir=args.cache_dir)
        return pipe.vqvae, pipe.transformer, pipe.scheduler, pipe.config.id2label
    vqvae = load_vqvae(args.vqvae_name_or_path, cache_dir=args.cache_dir)
    config = VARConfig(**json.loads(Path(args.model_config).read_text()))
    transformer = VARTransformer(config)
    return vqvae, transformer, VARScaleScheduler(patch_nums=tuple(config.patch_nums)), None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    accelerator = make_accelerator(args)
    output_dir = Path(args.output_dir)

    vqvae, transformer, scheduler, id2label = load_components(args)
    vqvae.requires_grad_(False).eval().to(accelerator.device)
    if args.num_classes is not None and args.num_classes != transformer.config.num_classes:
        logger.info(f"Resizing the class embedding: {transformer.config.num_classes} → {args.num_classes} classes")
        transformer.resize_class_embedding(args.num_classes)
        id2label = None
    datastore = None
    if args.retrieval_datastore:
        from diffusers_var.retrieval.datastore import RetrievalDatastore
        from diffusers_var.training.retrieval import add_retrieval_layers

        datastore = RetrievalDatastore.load(args.retrieval_datastore)
        num_neighbours = args.num_neighbours or transformer.config.num_neighbours or 4
        transformer = add_retrieval_layers(transformer, num_neighbours)
        if args.neighbour_dropout_prob is not None:
            transformer.config.neighbour_dropout_prob = args.neighbour_dropout_prob
    transformer.config.class_dropout_prob = args.class_dropout_prob
    transformer.config.label_smoothing = args.label_smoothing
    reference_start = None  # cca/ddo: the weights of the (first) frozen reference
    if args.objective != "ce":
        reference_start = prepare_post_training(args, transformer, vqvae)
    trainable_parameters = None
    if args.lora_rank:
        config = lora_config(
            args.lora_rank,
            args.lora_alpha,
            args.lora_dropout,
            args.lora_target_modules,
            args.pretrained_model_name_or_path,
        )
        trainable_parameters, total = add_lora(transformer, config)
        logger.info(f"LoRA rank {args.lora_rank}: training {trainable_parameters:,} of {total:,} parameters")
        if Path(args.pretrained_model_name_or_path).is_dir():
            logger.warning(
                f"The adapter will name its base model as the local folder {args.pretrained_model_name_or_path!r}; "
                "to share it, name the base by its Hub repo id (or a bundled name) instead."
            )
    if args.gradient_checkpointing:
        transformer.activation_checkpointing_enable()
        if args.lora_rank:
            transformer.enable_input_require_grads()  # a frozen input would leave the checkpointed blocks gradient-free
    transformer.train()

    dataset = load_image_dataset(
        args.train_data_dir, args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir
    )
    check_dataset(dataset, args.image_column, args.label_column, transformer.config.num_classes)
    # the data's class names (an image folder's sub-folders) say what each trained id means now
    class_names = dataset_class_names(dataset, args.label_column)
    new_id2label = id2label_for_data(id2label, class_names)
    if id2label and new_id2label != id2label:
        renamed = [f"{i}: {id2label.get(i)!r} → {name!r}" for i, name in enumerate(class_names)]
        logger.info(f"Class names follow the data: {', '.join(renamed[:5])}{' …' if len(renamed) > 5 else ''}")
    id2label = new_id2label
    resolution = args.resolution or vqvae.image_size
    if resolution != vqvae.image_size:
        raise ValueError(f"--resolution {resolution} does not match the tokenizer's {vqvae.image_size} px.")
    train_set = ImageClassDataset(
        dataset, args.image_column, args.label_column, resolution, args.center_crop, args.random_flip, args.seed
    )
    if datastore is not None:
        from diffusers_var.training.retrieval import NeighbourDataset, check_retrieval_training

        check_retrieval_training(datastore, vqvae, class_names, transformer.config.num_neighbours)
        train_set = NeighbourDataset(train_set, datastore, class_names, transformer.config.num_neighbours)
        logger.info(f"Retrieval: {transformer.config.num_neighbours} neighbours per sample from {datastore.path}")
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=args.train_batch_size,
        shuffle=True,
        num_workers=args.dataloader_num_workers,
        drop_last=True,
    )

    plan = TrainingPlan.from_args(args, accelerator, loader, len(dataset))
    global_batch, max_steps = plan.global_batch, plan.max_steps
    learning_rate = args.learning_rate if args.no_scale_lr else scaled_learning_rate(args.learning_rate, global_batch)
    optimizer = make_optimizer(transformer, learning_rate, args.adam_weight_decay)
    lr_scheduler = make_lr_scheduler(args, optimizer, accelerator, plan)
    transformer, optimizer, loader, lr_scheduler = accelerator.prepare(transformer, optimizer, loader, lr_scheduler)
    ema = ParameterEMA(accelerator.unwrap_model(transformer), args.ema_decay) if args.use_ema else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    if accelerator.is_main_process:
        accelerator.init_trackers("train_var", config=tracker_config(args))

    resume, global_step = find_resume_checkpoint(args, accelerator)
    logger.info(f"{len(dataset)} images, global batch {global_batch}, lr {learning_rate:.3g}, {max_steps} steps")
    reference, self_play = None, None
    if args.objective == "cca":
        reference = make_reference(args, accelerator)(reference_start)
    elif args.objective == "ddo":
        self_play = SelfPlay(args, accelerator, reference_start, vqvae, scheduler, plan)
    del reference_start  # the reference (or round 0) holds what it needs
    progress = tqdm(range(max_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process)
    micro_step = 0  # the micro-batch within an optimiser step (gradient accumulation)
    for batch in training_batches(accelerator, loader, train_set, plan, resume, global_step):
        if self_play is not None:  # a new round (or the round a resumed run is in): its reference and samples
            reference = self_play.reference_for_step(global_step, transformer)
        with accelerator.accumulate(transformer):
            inputs, targets = teacher_forcing_batch(vqvae, batch["pixel_values"])
            labels = batch["class_labels"]
            if args.objective == "ddo":  # the reference's samples, tokenized in full precision like the real images
                fake = self_play.fake_batch(global_step, micro_step, args.train_batch_size)
            codes = None
            if datastore is not None:
                codes = neighbour_codes(datastore, vqvae, batch["neighbour_rows"])
            with accelerator.autocast():
                if args.objective == "cca":
                    loss, metrics = cca_batch_loss(
                        transformer, reference, labels, inputs, targets,
                        args.cca_beta, args.cca_lambda, args.class_dropout_prob,
                    )  # fmt: skip
                elif args.objective == "ddo":
                    loss, metrics = ddo_batch_loss(
                        transformer, reference, (labels, inputs, targets), fake,
                        args.ddo_alpha, args.ddo_beta, args.class_dropout_prob,
                    )  # fmt: skip
                else:
                    loss, metrics = var_loss(transformer, labels, inputs, targets, codes)
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(transformer.parameters(), args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        if not accelerator.sync_gradients:
            micro_step += 1
            continue
        micro_step = 0
        global_step += 1
        progress.update(1)
        if ema is not None:
            ema.update(accelerator.unwrap_model(transformer))
        logs = {**metrics.as_dict("train/"), "lr": lr_scheduler.get_last_lr()[0]}
        progress.set_postfix(progress_figures(metrics))
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

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(transformer)
        if ema is not None:
            ema.copy_to(final)
        final.config.class_dropout_prob = args.class_dropout_prob
        pipe = VARPipeline(vqvae=vqvae, transformer=final.eval(), scheduler=scheduler, id2label=id2label)
        if args.lora_rank:
            save_lora_adapter(args, pipe, output_dir, global_step, global_batch, learning_rate, trainable_parameters)
            accelerator.end_training()
            return
        card = {
            "model_name": output_dir.name,
            "base_model": args.pretrained_model_name_or_path or "from scratch",
            "dataset": args.dataset_name or args.train_data_dir,
            "train_steps": global_step,
            "global_batch": global_batch,
            "learning_rate": learning_rate,
            "resolution": resolution,
        }
        if args.objective != "ce":
            card["objective"] = objective_description(args)
        if datastore is not None:
            card["retrieval"] = (
                f"attends to {final.config.num_neighbours} retrieved neighbours, trained with the datastore "
                f"`{args.retrieval_datastore}` (`VARRetrievalPipeline`, `diffusers-var generate --datastore`)"
            )
        save_pretrained_into(pipe, output_dir, make_model_card(pipe, "var-trained", card))
        if args.push_to_hub:
            pipe.push_to_hub(
                args.hub_model_id or output_dir.name, token=args.hub_token, card_template="var-trained", card_data=card
            )
        logger.info(f"Saved the pipeline to {output_dir}")
    accelerator.end_training()


def prepare_post_training(args: argparse.Namespace, transformer: VARTransformer, vqvae: MultiScaleVQVAE):
    """CCA and DDO: the first reference (checked against the trained model), and the trained model without its own
    dropout (the objectives draw the null-class rows, the same for both models; the saved config keeps the rates)."""
    if args.objective == "cca":
        check_cca_model(transformer)
    if args.reference_model:
        reference, reference_vqvae = load_reference(args.reference_model, cache_dir=args.cache_dir)
        check_reference(reference, transformer, reference_vqvae, vqvae)
    else:
        reference = frozen_reference(transformer)
    transformer.config.class_dropout_prob = 0.0  # restored from --class_dropout_prob when the pipeline is saved
    disable_dropout(transformer)
    return reference


def make_reference(args: argparse.Namespace, accelerator):
    """Weights → the frozen reference on the training device (or offloaded to CPU memory)."""

    def build(weights: VARTransformer) -> VARTransformer:
        if args.offload_reference:
            return frozen_reference(weights, offload_to=accelerator.device)
        return frozen_reference(weights).to(accelerator.device)

    return build


class SelfPlay:
    """DDO's rounds: ``--ddo_rounds`` spans of the run as equal as whole steps allow; each starts with the latest model
    as the frozen reference and draws its samples (cached in OUTPUT_DIR/self_play, see ``training.self_play``)."""

    def __init__(self, args, accelerator, first_reference, vqvae, scheduler, plan):
        from diffusers_var.retrieval.datastore import tokenizer_fingerprint

        self.args, self.accelerator, self.vqvae, self.scheduler = args, accelerator, vqvae, scheduler
        self.first_reference = first_reference  # dropped once round 0 has saved it
        if plan.max_steps < args.ddo_rounds:
            raise ValueError(
                f"--ddo_rounds {args.ddo_rounds} needs at least one step per round, and the run has {plan.max_steps}; "
                "give fewer rounds or more --max_train_steps."
            )
        self.round_starts = [i * plan.max_steps // args.ddo_rounds for i in range(args.ddo_rounds)]
        longest = math.ceil(plan.max_steps / args.ddo_rounds)
        self.num_samples = args.ddo_samples_per_round or longest * plan.global_batch
        self.settings = {
            "seed": args.seed,
            "rounds": args.ddo_rounds,
            "round_starts": self.round_starts,
            "num_samples": self.num_samples,
            "generation_batch_size": args.ddo_generation_batch_size,  # the cache's file layout
            "fake_tokens": args.ddo_fake_tokens,
            "tokenizer": tokenizer_fingerprint(vqvae),
        }
        self.round, self.reference = None, None
        logger.info(
            f"DDO: {args.ddo_rounds} round(s) of ~{longest} steps, {self.num_samples} reference samples per round, "
            f"α = {args.ddo_alpha}, β = {args.ddo_beta}"
        )

    def reference_for_step(self, global_step: int, model) -> VARTransformer:
        """The reference of the round ``global_step`` is in (``model``: the trained model, as prepared)."""
        from diffusers_var.training.self_play import SelfPlayRound

        index = bisect.bisect_right(self.round_starts, global_step) - 1
        if self.round is None or self.round.index != index:
            self.round, self.reference = (
                SelfPlayRound(Path(self.args.output_dir) / "self_play", index, self.settings),
                None,
            )
            if index == 0:
                config, start_weights = self.first_reference.config, self.first_reference.state_dict
            else:  # the full weights, also of a sharded model (collective: every process calls it)
                config = self.accelerator.unwrap_model(model).config
                start_weights = lambda: self.accelerator.get_state_dict(model)  # noqa: E731
            self.reference = self.round.prepare(
                self.accelerator,
                config,
                start_weights,
                self.vqvae,
                self.scheduler,
                make_reference(self.args, self.accelerator),
                self.num_samples,
                self.args.ddo_generation_batch_size,
                # round 0's start is always known (the first reference); a later one only when the run stands there
                at_round_start=index == 0 or global_step == self.round_starts[index],
            )
            self.first_reference = None  # saved with round 0; never needed again in this process
        return self.reference

    def fake_batch(self, global_step: int, micro_step: int, batch_size: int):
        """(labels, teacher-forcing inputs, targets) of this micro-batch's reference samples."""
        from diffusers_var.training.self_play import split_token_maps

        step_in_round = global_step - self.round_starts[self.round.index]
        labels, targets = self.round.fake_batch(step_in_round, micro_step, batch_size, self.accelerator)
        token_maps = split_token_maps(targets, tuple(self.vqvae.config.patch_nums))
        return labels, self.vqvae.next_scale_inputs(token_maps), targets


def progress_figures(metrics) -> dict[str, str]:
    """The progress bar's few figures: the loss, and the token accuracy (ce) or the discriminator's view (cca, ddo)."""
    figures = {"loss": f"{metrics.loss:.3f}"}
    if hasattr(metrics, "accuracy"):
        figures["acc"] = f"{metrics.accuracy:.1f}"
    else:
        figures["margin"] = f"{metrics.reward_margin:.3f}"
    return figures


def objective_description(args: argparse.Namespace) -> str:
    """The model card's line on how the model was post-trained."""
    reference = args.reference_model or "the starting weights"
    if args.objective == "cca":
        return (
            f"Condition Contrastive Alignment (β = {args.cca_beta}, λ = {args.cca_lambda}) against {reference}: "
            "sample without guidance (`guidance_scale=1.0`)"
        )
    return (
        f"Direct Discriminative Optimization (α = {args.ddo_alpha}, β = {args.ddo_beta}, {args.ddo_rounds} "
        f"self-play round(s)) starting from {reference} as reference"
    )


def save_lora_adapter(args, pipe, output_dir, global_step, global_batch, learning_rate, trainable_parameters):
    """The adapter (not the whole pipeline) into --output_dir, with a card that says how to load it."""
    classes = ", ".join(f"{i}: {n}" for i, n in (pipe.config.id2label or {}).items()) or "as in the base model"
    card = {
        "model_name": output_dir.name,
        "base_model": args.pretrained_model_name_or_path,
        "dataset": args.dataset_name or args.train_data_dir,
        "train_steps": global_step,
        "global_batch": global_batch,
        "learning_rate": learning_rate,
        "rank": args.lora_rank,
        "alpha": args.lora_alpha if args.lora_alpha is not None else args.lora_rank,
        "target_modules": ", ".join(args.lora_target_modules),
        "trainable_parameters": trainable_parameters,
        "classes": classes if len(classes) < 400 else classes[:400] + " …",
    }
    save_pretrained_into(pipe.transformer, output_dir, make_lora_card(pipe, card))
    # the data's class names, which load_lora_weights applies (an adapter config has no place for them)
    labels = {ID2LABEL_FILE: json.dumps(pipe.config.id2label, indent=1) + "\n"} if pipe.config.id2label else {}
    for name, text in labels.items():
        write_text_atomically(output_dir / name, text)
    if args.push_to_hub:
        upload_pretrained(
            pipe.transformer,
            args.hub_model_id or output_dir.name,
            lambda repo_id: make_lora_card(pipe, {**card, "repo_id": repo_id}),
            token=args.hub_token,
            extra_files=labels,
        )
    logger.info(f"Saved the LoRA adapter to {output_dir}")


if __name__ == "__main__":
    main()

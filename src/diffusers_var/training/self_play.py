"""DDO's self-play data: each round's reference model, and its samples (re-encoded from their pixels, or as drawn),
cached on disk so that an interrupted run resumes without drawing them again.

    OUTPUT_DIR/self_play/round-000/round.json                 the settings of the run the cache belongs to
    OUTPUT_DIR/self_play/round-000/reference.safetensors      the round's reference: the model at the round's start
    OUTPUT_DIR/self_play/round-000/samples-00000.safetensors  token pyramids (n, L) int32 and class labels (n,)

Sample i of a round has class ``i % num_classes`` and its own generator (seeded from the run seed, the round, the
class and the index), so the cache is the same for a seed whatever the batch size, the number of processes or where
a run was interrupted. Samples are drawn as the reference's own distribution (guidance 1, top-k 0, top-p 1), rounded
to 8-bit pixels like the real images, and tokenized by the same frozen tokenizer (``fake_tokens="reencoded"``), or
kept as the token pyramids the reference drew (``"sampled"``, the distribution the likelihood ratio is defined on).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ..generate import sample_seed
from ..models.transformer import VARTransformer
from ..models.vqvae import MultiScaleVQVAE
from ..saving import current_umask, write_text_atomically
from ..schedulers.scale import VARScaleScheduler

logger = logging.getLogger(__name__)  # not accelerate's: the cache is also read outside a training process

WRITTEN_BY = "diffusers-var train_var.py --objective ddo"
# What DDO's fakes are: their pixels tokenized again (as real images are), or the token pyramids the reference
# drew. The tokenizer does not reproduce its own decodes (var-digits, examples/post_training/likelihood_by_scale.py:
# 20 % of the 1×1 tokens and 79 % of the 8×8 ones change), so re-encoded fakes are pyramids the reference hardly
# draws (6.5 nats per 8×8 token against 0.68 for its own draws) and the discriminator's margin grows there.
FAKE_TOKENS = ("sampled", "reencoded")
DEFAULT_FAKE_TOKENS = "reencoded"  # also what a cache written before the choice existed holds


def check_fake_tokens(fake_tokens: str) -> None:
    if fake_tokens not in FAKE_TOKENS:
        raise ValueError(f"fake_tokens must be one of {FAKE_TOKENS}, got {fake_tokens!r}.")


_ROUND_SEED_OFFSET = 1000  # keeps the self-play samples apart from `diffusers-var generate --seed` (candidate 0)


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict (names, dtypes, shapes and bytes), in key order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state_dict.items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _save_tensors_atomically(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@torch.no_grad()
def draw_samples(
    reference: VARTransformer,
    vqvae: MultiScaleVQVAE,
    scheduler: VARScaleScheduler,
    class_labels: list[int],
    seeds: list[int],
    device: torch.device | str,
    fake_tokens: str = DEFAULT_FAKE_TOKENS,
) -> torch.LongTensor:
    """Token pyramids (n, L) of the reference's own samples for these classes and per-sample seeds, sampled with
    VARPipeline (guidance 1, no top-k or top-p). ``fake_tokens``: ``"sampled"`` keeps the tokens the reference drew;
    ``"reencoded"`` decodes them, rounds to 8-bit pixels and tokenizes again, as a real image is."""
    from ..pipelines.var import VARPipeline

    check_fake_tokens(fake_tokens)
    pipe = VARPipeline(vqvae=vqvae, transformer=reference, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator(device).manual_seed(seed) for seed in seeds]
    output = pipe(
        class_labels=class_labels,
        guidance_scale=1.0,
        top_k=0,
        top_p=1.0,
        generator=generators,
        output_type="latent" if fake_tokens == "sampled" else "pt",  # the decoder runs only for re-encoding
    )
    token_maps = output.token_maps
    if fake_tokens == "reencoded":
        images = output.images  # (n, 3, H, W) in [0, 1]
        pixels = (images.float() * 255).round() / 255 * 2 - 1  # what a PNG of the sample holds, in [-1, 1]
        with torch.autocast(torch.device(device).type, enabled=False):  # tokenized exactly as the real images are
            token_maps = vqvae.tokenize(pixels.to(device=vqvae.device, dtype=vqvae.dtype))
    return torch.cat([t.flatten(1) for t in token_maps], dim=1)


class SelfPlayRound:
    """One round's reference and samples, cached in ``directory``; see the module docstring for the layout.

    Example:
        ```py
        >>> round_ = SelfPlayRound(output_dir / "self_play", 0, settings)
        >>> reference = round_.prepare(accelerator, transformer, vqvae, scheduler, num_samples=6400)
        >>> labels, targets = round_.fake_batch(step_in_round=0, micro_step=0, batch_size=64, accelerator=accelerator)
        ```
    """

    def __init__(self, root: str | os.PathLike, index: int, settings: dict):
        self.index = index
        self.root = Path(root)
        self.directory = self.root / f"round-{index:03d}"
        self.settings = {"fake_tokens": DEFAULT_FAKE_TOKENS, **settings, "round": index}
        check_fake_tokens(self.settings["fake_tokens"])
        self.labels: torch.LongTensor | None = None
        self.targets: torch.IntTensor | None = None
        self._order: torch.LongTensor | None = None

    # -- the cache ---------------------------------------------------------------------------------------------

    def _check_settings(self) -> dict | None:
        """The recorded settings of an existing cache (None if there is none); raises if another run made it."""
        record = self.directory / "round.json"
        if not record.is_file():
            if self.directory.exists():
                raise ValueError(
                    f"{self.directory} exists without a round.json (a round is written whole, then renamed into "
                    "place), so it is not this script's; move it away or choose another --output_dir."
                )
            return None
        recorded = json.loads(record.read_text())
        recorded.setdefault("fake_tokens", DEFAULT_FAKE_TOKENS)
        if recorded.get("written_by") != WRITTEN_BY:
            raise ValueError(f"{record} was not written by {WRITTEN_BY}; choose another --output_dir.")
        mismatched = {k: (recorded.get(k), v) for k, v in self.settings.items() if recorded.get(k) != v}
        if mismatched:
            details = ", ".join(f"{k}: cached {a!r}, now {b!r}" for k, (a, b) in mismatched.items())
            raise ValueError(
                f"The self-play cache {self.directory} belongs to a run with other settings ({details}). Resume "
                "with the same flags, or use a new --output_dir (the cache is never replaced)."
            )
        return recorded

    def _chunk_path(self, chunk: int) -> Path:
        return self.directory / f"samples-{chunk:05d}.safetensors"

    def _reference_path(self) -> Path:
        return self.directory / "reference.safetensors"

    def _start_round(self, weights: dict[str, torch.Tensor]) -> None:
        """Write the round's reference and round.json into a staging folder and rename it into place, so that a
        round folder is complete or absent (a staging folder left by a killed run is this script's: replaced)."""
        staging = self.root / f".{self.directory.name}.staging"
        if staging.exists():
            import shutil

            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        digest = weights_digest(weights)
        _save_tensors_atomically(
            weights, staging / "reference.safetensors", {"written_by": WRITTEN_BY, "sha256": digest}
        )
        record = {"written_by": WRITTEN_BY, **self.settings, "reference_sha256": digest}
        write_text_atomically(staging / "round.json", json.dumps(record, indent=1) + "\n")
        os.replace(staging, self.directory)

    def prepare(
        self,
        accelerator: Accelerator,
        config,
        start_weights: Callable[[], dict[str, torch.Tensor]],
        vqvae: MultiScaleVQVAE,
        scheduler: VARScaleScheduler,
        make_reference: Callable[[VARTransformer], VARTransformer],
        num_samples: int,
        generation_batch_size: int = 64,
        at_round_start: bool = True,
    ) -> VARTransformer:
        """The round's frozen reference (``make_reference`` of the cached weights, or of ``start_weights()`` when the
        round starts now), with its samples drawn or loaded. Every process draws its share of the missing chunks.

        ``config``: the ``VARConfig`` of the weights. ``start_weights``: the full state dict of the model the round
        starts from; every process calls it (gathering sharded weights is collective, e.g. accelerate's
        ``get_state_dict`` under FSDP), and the main process saves it as the round's reference.
        ``at_round_start``: the run stands at the round's first step (not resumed past it); an existing cache must
        then hold exactly these weights, or it belongs to another run and is refused.

        The global RNG is left as it was (forked): a run resumed in this round, which prepares it again, continues
        the same random stream as the uninterrupted run.
        """
        devices = [accelerator.device] if accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            reference = self._prepare_reference(accelerator, config, start_weights, make_reference, at_round_start)
            self._draw_missing(accelerator, reference, config.num_classes, vqvae, scheduler, num_samples,
                               generation_batch_size)  # fmt: skip
        return reference

    def _prepare_reference(self, accelerator, config, start_weights, make_reference, at_round_start):
        from safetensors.torch import load_file

        def main_process(check) -> object:
            """Run ``check`` on the main process and give every process its result, or raise its error on all."""
            result = [None]
            if accelerator.is_main_process:
                try:
                    result = [("ok", check())]
                except ValueError as error:
                    result = [("error", str(error))]
            if accelerator.num_processes > 1:
                from accelerate.utils import broadcast_object_list

                result = broadcast_object_list(result)
            if result[0][0] == "error":
                raise ValueError(result[0][1])
            return result[0][1]

        recorded = main_process(self._check_settings)
        weights = start_weights() if recorded is None or at_round_start else None  # collective: every process

        def install() -> None:
            if recorded is None:
                self._start_round(weights)
            elif at_round_start and weights_digest(weights) != recorded["reference_sha256"]:
                raise ValueError(
                    f"The self-play cache {self.directory} was drawn from other weights than this run has at the "
                    "round's start (another run's cache, or a run that is not deterministic). Use a new --output_dir "
                    "or resume from a checkpoint past the round's start."
                )

        main_process(install)
        weights = None  # noqa: F841  (a model's worth of memory, no longer needed)
        recorded = json.loads((self.directory / "round.json").read_text())
        state = load_file(self._reference_path())
        if weights_digest(state) != recorded["reference_sha256"]:
            raise ValueError(f"{self._reference_path()} is damaged (its digest differs from round.json's).")
        reference_model = VARTransformer(config)  # on the CPU; make_reference places it
        reference_model.load_state_dict(state)
        return make_reference(reference_model)

    def _draw_missing(self, accelerator, reference, num_classes, vqvae, scheduler, num_samples, batch_size) -> None:
        from safetensors.torch import load_file

        chunks = math.ceil(num_samples / batch_size)
        mine = [c for c in range(chunks) if c % accelerator.num_processes == accelerator.process_index]
        missing = [c for c in mine if not self._valid_chunk(c)]
        if missing:
            logger.info(
                f"Self-play round {self.index}: drawing {num_samples} samples of the reference "
                f"({len(missing)} of {chunks} batches on this process)",
            )
        seed = self.settings["seed"]
        for chunk in tqdm(missing, desc=f"Round {self.index} samples", disable=not accelerator.is_local_main_process):
            indices = range(chunk * batch_size, min((chunk + 1) * batch_size, num_samples))
            labels = [i % num_classes for i in indices]
            seeds = [
                sample_seed(seed, i % num_classes, i // num_classes, _ROUND_SEED_OFFSET + self.index) for i in indices
            ]
            with accelerator.autocast():  # sampled in the training precision; tokenized in full (as real images)
                targets = draw_samples(
                    reference, vqvae, scheduler, labels, seeds, accelerator.device, self.settings["fake_tokens"]
                )
            tensors = {"targets": targets.to(torch.int32).cpu(), "class_labels": torch.tensor(labels)}
            metadata = {"written_by": WRITTEN_BY, "round": str(self.index), "sha256": weights_digest(tensors)}
            _save_tensors_atomically(tensors, self._chunk_path(chunk), metadata)
        accelerator.wait_for_everyone()  # long draws: see the README on the process group's timeout
        loaded = [load_file(self._chunk_path(c)) for c in range(chunks)]
        self.targets = torch.cat([part["targets"] for part in loaded])  # int32 in memory; long per batch
        self.labels = torch.cat([part["class_labels"] for part in loaded]).long()
        if len(self.labels) != num_samples:
            raise ValueError(
                f"The self-play cache {self.directory} holds {len(self.labels)} samples, not {num_samples}."
            )
        generator = torch.Generator().manual_seed(self.settings["seed"] + self.index)
        self._order = torch.randperm(num_samples, generator=generator)

    def _valid_chunk(self, chunk: int) -> bool:
        """Whether a chunk file is there, ours and whole (its digest checks); a damaged one of ours is drawn again,
        a file that is not ours is refused."""
        path = self._chunk_path(chunk)
        if not path.is_file():
            return False
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(path, framework="pt") as handle:
                metadata = handle.metadata() or {}
        except Exception:
            metadata = None
        if metadata is not None and metadata.get("written_by") != WRITTEN_BY:
            raise ValueError(f"{path} was not written by {WRITTEN_BY}; move it away or choose another --output_dir.")
        try:
            if metadata is not None and weights_digest(load_file(path)) == metadata.get("sha256"):
                return True
        except Exception:
            pass
        logger.warning(f"Drawing {path} again: it is damaged.")
        return False

    # -- batches -----------------------------------------------------------------------------------------------

    def fake_batch(
        self, step_in_round: int, micro_step: int, batch_size: int, accelerator: Accelerator
    ) -> tuple[torch.LongTensor, torch.LongTensor]:
        """(class labels (B,), targets (B, L)) of this process's micro-batch: the round's samples in an order fixed
        by the seed and the round, walked through once per ``len / global batch`` steps (then again)."""
        if self._order is None:
            raise RuntimeError("Call prepare() before fake_batch().")
        micro_steps = accelerator.gradient_accumulation_steps
        position = (step_in_round * micro_steps + micro_step) * accelerator.num_processes + accelerator.process_index
        indices = self._order[(position * batch_size + torch.arange(batch_size)) % len(self._order)]
        return self.labels[indices].to(accelerator.device), self.targets[indices].long().to(accelerator.device)


def split_token_maps(targets: torch.LongTensor, patch_nums: tuple[int, ...]) -> list[torch.LongTensor]:
    """(B, L) flattened token pyramids → the list of (B, pn, pn) token maps ``MultiScaleVQVAE`` works with."""
    sizes = [pn * pn for pn in patch_nums]
    if targets.shape[1] != sum(sizes):
        raise ValueError(
            f"Token pyramids of patch_nums={tuple(patch_nums)} have {sum(sizes)} tokens, got {targets.shape[1]}."
        )
    return [part.reshape(-1, pn, pn) for part, pn in zip(targets.split(sizes, dim=1), patch_nums)]

"""The long-tail experiment: a digits VAR that never saw class C, and rare classes seen only a few times, drawn
with and without retrieval from a datastore of all real training digits.

    python examples/retrieval/run_recipe.py --holdout-class 5 --rare-classes 3 8 --output-dir long-tail
    diffusers-var generate --model long-tail/pipeline --datastore long-tail/datastore --class-labels 5 --num-per-class 8

Steps (each one of the project's own commands, printed before it runs, skipped when its output exists, so an
interrupted run restarts where it stopped):

1. data: scikit-learn's digits split (examples/digits/prepare_data.py's, seed 0). ``DIR/data/datastore`` holds all
   training images; ``DIR/data/train`` the transformer's: class C removed, each rare class subsampled to
   ``--rare-fraction`` of its images (at least one).
2. ``diffusers-var index``: the datastore (``DIR/datastore``) of all training images, embedded with the bundled
   digits-classifier and tokenized with var-digits' tokenizer (reused: a tokenizer does not know classes).
3. ``train_var.py --retrieval_datastore DIR/datastore --num_neighbours k``: a transformer from scratch on
   ``DIR/data/train`` (9 classes; the class names are the digits, so C is a name its id2label lacks), every sample
   attending to k other real images of its class, never itself. One model serves both retrieval modes; with
   retrieval off it is the plain model.
4. evaluation: for every digit, samples with the seeds (seed, class, index) under four conditions: no retrieval
   (class C: the null class, i.e. unconditional, which is all the plain model can do), and retrieval in each mode
   (trained: the attention alone; training-free: the mixing alone; combined: both), each at the pipeline's
   defaults otherwise, then per group (frequent, rare, held-out):

   - class agreement: the share an independent classifier (examples/digits/evaluate.py's SVC on the real training
     digits, all ten classes) reads as the asked digit;
   - FID against the real test digits of the group, in digits-classifier features; on the held-out class it is the
     zero-shot FID (ZS-FID: the model never trained on it);
   - copying: each sample's distance to its nearest real digit (all 1,797, as 8×8 grey) over the median
     leave-one-out nearest-neighbour distance among the real digits (1.0: as far from the data as real handwriting
     is; near 0: copies), and the distance to its nearest retrieved neighbour next to real held-out digits'
     distance to their nearest other image of the class.

Writes ``DIR/report.json``, ``DIR/report.md`` (the table) and ``DIR/grid.png`` (rows: digits; columns: samples per
condition), and ``DIR/recipe_log.json`` with each step's command and wall time. ``--smoke`` runs every step at
toy size (CI).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent
sys.path.insert(0, str(EXAMPLES / "digits"))

from evaluate import DigitsReference, _box_8x8, to_grey  # noqa: E402  (examples/digits)
from prepare_data import load_digits_split  # noqa: E402

from diffusers_var.hub import atomic_directory  # noqa: E402
from diffusers_var.pretrained import bundled_model_path  # noqa: E402
from diffusers_var.saving import claim_recipe_folder, write_text_atomically  # noqa: E402

CONDITIONS = ("no retrieval", "trained retrieval", "training-free retrieval", "combined retrieval")
MODES = {"trained retrieval": "trained", "training-free retrieval": "training_free", "combined retrieval": "combined"}
DIGITS = [str(d) for d in range(10)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--holdout-class", type=int, required=True, help="the digit the transformer never sees")
    parser.add_argument("--rare-classes", type=int, nargs="*", default=[], help="digits kept at --rare-fraction")
    parser.add_argument("--rare-fraction", type=float, default=0.05, help="share of a rare class's images kept")
    parser.add_argument("--output-dir", required=True, help="writes pipeline/, datastore/, data/ and the reports")
    parser.add_argument("--num-neighbours", type=int, default=4)
    parser.add_argument("--max-train-steps", type=int, default=1200)
    parser.add_argument("--num-per-class", type=int, default=50, help="samples per digit and condition")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="every step at toy size (seconds, for CI)")
    args = parser.parse_args(argv)
    if not 0 <= args.holdout_class <= 9:
        parser.error(f"--holdout-class must be a digit 0-9, got {args.holdout_class}")
    bad = [c for c in args.rare_classes if not 0 <= c <= 9 or c == args.holdout_class]
    if bad or len(set(args.rare_classes)) != len(args.rare_classes):
        parser.error(f"--rare-classes must be distinct digits other than the held-out one, got {args.rare_classes}")
    if not 0 < args.rare_fraction <= 1:
        parser.error(f"--rare-fraction must lie in (0, 1], got {args.rare_fraction}")
    if args.smoke:
        args.max_train_steps, args.num_per_class = 4, 2
    return args


# -- step 1: the data --------------------------------------------------------------------------------------------


def write_data(folder: Path, holdout: int, rare: list[int], rare_fraction: float, seed: int) -> dict:
    """``folder/datastore`` (all training digits) and ``folder/train`` (the transformer's), written atomically."""
    images, labels, _, _ = load_digits_split()
    rng = np.random.default_rng(seed)
    kept = {}
    for digit in range(10):
        rows = np.flatnonzero(labels == digit)
        if digit == holdout:
            rows = rows[:0]
        elif digit in rare:
            rows = np.sort(rng.choice(rows, max(1, round(rare_fraction * len(rows))), replace=False))
        kept[digit] = rows
    with atomic_directory(folder) as staging_name:
        staging = Path(staging_name)
        for digit in range(10):
            for name, rows in (("datastore", np.flatnonzero(labels == digit)), ("train", kept[digit])):
                if len(rows) == 0:
                    continue
                (staging / name / str(digit)).mkdir(parents=True, exist_ok=True)
                for row in rows:
                    PIL.Image.fromarray(images[row]).save(staging / name / str(digit) / f"{row}.png")
        info = {"holdout": holdout, "rare": rare, "train_counts": {str(d): len(kept[d]) for d in range(10)}}
        (staging / "split.json").write_text(json.dumps(info, indent=2))
    return info


# -- steps 2 and 3: the project's commands -----------------------------------------------------------------------


def commands(args, work: Path) -> list[tuple[str, Path, list[str]]]:
    tokenizer = str(bundled_model_path("var-digits"))
    index = [sys.executable, "-m", "diffusers_var.cli", "index", "--images", str(work / "data" / "datastore")]
    index += ["--features", "digits-classifier", "--tokenizer", tokenizer, "--output", str(work / "datastore")]
    config = work / "var_config.json"
    train = [sys.executable, str(EXAMPLES / "train_var.py"), "--model_config", str(config)]
    train += ["--vqvae_name_or_path", tokenizer, "--train_data_dir", str(work / "data" / "train")]
    train += ["--retrieval_datastore", str(work / "datastore"), "--num_neighbours", str(args.num_neighbours)]
    train += ["--neighbour_dropout_prob", "0.1", "--class_dropout_prob", "0.5", "--output_dir", str(work / "pipeline")]
    train += ["--no_scale_lr", "--lr_scheduler", "cosine", "--center_crop", "--seed", str(args.seed)]
    train += ["--learning_rate", "1e-3", "--lr_warmup_steps", str(min(200, args.max_train_steps // 5))]
    train += ["--train_batch_size", "8" if args.smoke else "64", "--max_train_steps", str(args.max_train_steps)]
    train += ["--checkpointing_steps", "500", "--checkpoints_total_limit", "1", "--use_ema", "--ema_decay", "0.999"]
    train += ["--report_to", "tensorboard", "--validation_steps", "0"]
    return [
        ("index the datastore", work / "datastore" / "datastore.json", index),
        ("train the retrieval transformer", work / "pipeline" / "model_index.json", train),
    ]


def write_model_config(path: Path, smoke: bool) -> None:
    config = json.loads((EXAMPLES / "digits" / "var_config.json").read_text())
    config["num_classes"] = 9  # the held-out digit is not a class of this model
    if smoke:
        config.update(depth=1, embed_dim=32, num_heads=2)
    write_text_atomically(path, json.dumps(config, indent=2) + "\n")


# -- step 4: the evaluation -----------------------------------------------------------------------------------------


def sample_all(pipe, datastore, num_per_class: int, seed: int) -> dict[str, dict[int, list[PIL.Image.Image]]]:
    """Samples of every digit under each condition, image i of digit c seeded (seed, c, i) in all three."""
    from diffusers_var.generate import sample_seed

    samples = {condition: {} for condition in CONDITIONS}
    for digit in range(10):
        name = str(digit)
        seeds = [sample_seed(seed, digit, i) for i in range(num_per_class)]

        def generators(seeds=seeds):
            return [torch.Generator().manual_seed(s) for s in seeds]

        known = name in pipe.labels
        plain_labels = [name] * num_per_class if known else [None] * num_per_class
        samples["no retrieval"][digit] = pipe(plain_labels, generator=generators()).images
        for condition, mode in MODES.items():
            samples[condition][digit] = pipe.retrieval(name, num_per_class, datastore, generators(), mode).images
        print(f"digit {digit}: {'class + ' if known else 'unseen, '}{num_per_class} samples per condition", flush=True)
    return samples


class RecipePipelines:
    """The trained pipeline, plain and with retrieval (the same models)."""

    def __init__(self, folder: Path):
        from diffusers_var import VARPipeline, VARRetrievalPipeline

        self.plain = VARPipeline.from_pretrained(folder)
        self.plain.set_progress_bar_config(disable=True)
        self.retrieving = VARRetrievalPipeline(**self.plain.components, **self.plain.parameters)
        self.retrieving.set_progress_bar_config(disable=True)
        self.labels = self.plain.labels

    def __call__(self, labels, generator):
        return self.plain(labels, generator=generator)

    def retrieval(self, name, count, datastore, generator, mode):
        return self.retrieving([name] * count, datastore=datastore, generator=generator, retrieval_mode=mode)


def grey_8x8(images) -> np.ndarray:
    """Images → 8×8 grey in [0, 1] (box-averaged from 32 px), the digits' own grid, flattened to 64."""
    return _box_8x8(to_grey(images))


def nearest_distances(queries: np.ndarray, pool: np.ndarray, leave_one_out: bool = False) -> np.ndarray:
    squared = (queries**2).sum(1)[:, None] + (pool**2).sum(1)[None, :] - 2.0 * queries @ pool.T
    if leave_one_out:
        np.fill_diagonal(squared, np.inf)
    return np.sqrt(np.clip(squared.min(axis=1), 0.0, None))


def evaluate(samples, datastore, holdout: int, rare: list[int], num_neighbours: int) -> dict:
    from diffusers_var.evaluation import fid_from_features
    from diffusers_var.evaluation.image_models import load_image_model

    train_x, train_y, test_x, test_y = load_digits_split()
    reference = DigitsReference(train_x, train_y, test_x, test_y)
    features = load_image_model("digits-classifier")
    real_8x8 = grey_8x8(np.concatenate([train_x, test_x]))
    real_nn = nearest_distances(real_8x8, real_8x8, leave_one_out=True)
    groups = {
        "frequent": [d for d in range(10) if d != holdout and d not in rare],
        "rare": list(rare),
        "held-out": [holdout],
    }
    report = {"real_median_leave_one_out_nn_8x8": float(np.median(real_nn)), "groups": {}}
    for group, digits in groups.items():
        if not digits:
            continue
        real = test_x[np.isin(test_y, digits)]
        real_features = features.features(real).numpy()
        report["groups"][group] = {"digits": digits}
        for condition in CONDITIONS:
            images = [image for d in digits for image in samples[condition][d]]
            asked = np.concatenate([[d] * len(samples[condition][d]) for d in digits])
            arrays = np.stack([np.asarray(image.convert("RGB")) for image in images])
            predicted = reference.predict(arrays)
            sample_8x8 = grey_8x8(arrays)
            distance_ratio = float(np.median(nearest_distances(sample_8x8, real_8x8)) / np.median(real_nn))
            entry = {
                "class_agreement": float(np.mean(predicted == asked)),
                "fid": float(fid_from_features(features.features(arrays).numpy(), real_features)),
                "nn_distance_ratio": distance_ratio,
            }
            if condition != "no retrieval":
                entry["nearest_neighbour_of_class_8x8"] = float(
                    np.median(_distance_to_class(sample_8x8, asked, datastore))
                )
            report["groups"][group][condition] = entry
        # real held-out (test) digits' distance to their nearest training image of the class: what "new" looks like
        report["groups"][group]["real_test_nearest_of_class_8x8"] = float(
            np.median(_distance_to_class(grey_8x8(real), test_y[np.isin(test_y, digits)], datastore))
        )
    report["num_neighbours"] = num_neighbours
    return report


def _distance_to_class(queries_8x8: np.ndarray, digits: np.ndarray, datastore) -> np.ndarray:
    """Each query's distance to the nearest datastore image of its own digit (the pool retrieval draws from)."""
    out = np.empty(len(queries_8x8))
    for digit in np.unique(digits):
        rows = datastore.rows_of_label(str(digit))
        pool = grey_8x8(np.stack([np.asarray(datastore.dataset[int(r)]["image"].convert("RGB")) for r in rows]))
        mask = digits == digit
        out[mask] = nearest_distances(queries_8x8[mask], pool)
    return out


def write_grid(samples, path: Path, holdout: int, rare: list[int], per_condition: int = 4) -> None:
    from diffusers_var.generate import GridCanvas

    names = [f"{d}{' (held out)' if d == holdout else ' (rare)' if d in rare else ''}" for d in range(10)]
    titles = [f"{c}" if i == 0 else "" for c in CONDITIONS for i in range(per_condition)]
    first = samples[CONDITIONS[0]][0][0]
    canvas = GridCanvas(names, len(titles), first.size[0], column_titles=titles)
    for column, (condition, i) in enumerate((c, i) for c in CONDITIONS for i in range(per_condition)):
        for digit in range(10):
            images = samples[condition][digit]
            if i < len(images):
                canvas.paste(digit, column, images[i])
    tmp = path.with_name(f".{path.name}.partial")
    canvas.grid.save(tmp, format="PNG")
    os.replace(tmp, path)


def markdown_table(report: dict) -> str:
    lines = [
        "| group | condition | class agreement | FID (ZS-FID for held-out) | NN distance / real LOO NN | "
        "NN of class (8×8) |",
        "|---|---|---|---|---|---|",
    ]
    for group, entry in report["groups"].items():
        for condition in CONDITIONS:
            e = entry[condition]
            nn = e.get("nearest_neighbour_of_class_8x8")
            lines.append(
                f"| {group} {entry['digits']} | {condition} | {100 * e['class_agreement']:.1f} % | {e['fid']:.2f} | "
                f"{e['nn_distance_ratio']:.2f} | {'' if nn is None else f'{nn:.3f}'} |"
            )
        lines.append(
            f"| {group} | real test digits | | | 1.00 (by definition) | {entry['real_test_nearest_of_class_8x8']:.3f} |"
        )
    return "\n".join(lines) + "\n"


ARGUMENTS_FILE = "recipe_arguments.json"  # marks the folder as this recipe's, and what its data and model are
# what the data, datastore and model depend on: a rerun with other values must not reuse them
_OUTPUT_DEFINING = ("holdout_class", "rare_classes", "rare_fraction", "num_neighbours", "max_train_steps", "seed")


def claim_output_dir(work: Path, args: argparse.Namespace) -> None:
    """Make ``work`` this run's folder (``diffusers_var.saving.claim_recipe_folder``): new or empty, or made by this
    recipe with the same arguments (it then resumes); anything else is refused."""
    claim_recipe_folder(
        work, {name: getattr(args, name) for name in _OUTPUT_DEFINING} | {"smoke": args.smoke}, ARGUMENTS_FILE
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.update(OMP_NUM_THREADS=str(args.threads), OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
    work = Path(args.output_dir)
    claim_output_dir(work, args)
    log = {"arguments": vars(args), "steps": []}
    if (work / "recipe_log.json").is_file():  # a resumed run: keep the times of the steps the first one did
        log["steps"] = json.loads((work / "recipe_log.json").read_text()).get("steps", [])
    started = time.perf_counter()

    def timed(name: str, run) -> None:
        start = time.perf_counter()
        run()
        log["steps"].append({"step": name, "wall_time_s": round(time.perf_counter() - start, 1)})

    if not (work / "data" / "split.json").is_file():
        timed("data", lambda: write_data(work / "data", args.holdout_class, args.rare_classes, args.rare_fraction, 0))
    write_model_config(work / "var_config.json", args.smoke)
    for name, done, command in commands(args, work):
        if done.exists():
            print(f"[skip] {name}: {done} exists", flush=True)
            continue
        print(f"[run] {name}: {shlex.join(command)}", flush=True)
        timed(name, lambda command=command: subprocess.run(command, check=True))
        log["steps"][-1]["command"] = shlex.join(command)

    from diffusers_var.retrieval.datastore import RetrievalDatastore

    pipes = RecipePipelines(work / "pipeline")
    datastore = RetrievalDatastore.load(work / "datastore")
    samples = {}
    timed("sample", lambda: samples.update(sample_all(pipes, datastore, args.num_per_class, args.seed)))
    report = {}
    timed(
        "evaluate",
        lambda: report.update(evaluate(samples, datastore, args.holdout_class, args.rare_classes, args.num_neighbours)),
    )
    write_grid(samples, work / "grid.png", args.holdout_class, args.rare_classes)
    log["total_wall_time_s"] = round(time.perf_counter() - started, 1)
    report["wall_time_s"] = log["total_wall_time_s"]
    write_text_atomically(work / "report.json", json.dumps(report, indent=2) + "\n")
    write_text_atomically(work / "report.md", markdown_table(report))
    write_text_atomically(work / "recipe_log.json", json.dumps(log, indent=2) + "\n")
    print(markdown_table(report))
    print(f"total {log['total_wall_time_s']} s; wrote {work / 'report.md'} and {work / 'grid.png'}")
    return report


if __name__ == "__main__":
    main()

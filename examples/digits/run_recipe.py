"""Reproduce the bundled ``var-digits`` model: data → tokenizer → transformer → samples → measurements.

    python examples/digits/run_recipe.py --work_dir digits-run            # ~1 h on 2 CPU cores
    python examples/digits/run_recipe.py --work_dir digits-run --bundle   # also replace the packaged model

Every step is one of the project's own commands (printed before it runs). The commands, seeds and wall time of
each step go to ``<work_dir>/recipe_log.json``; the final report (class agreement, copy check, FID) to
``<work_dir>/report.json``. A step whose output already exists is skipped, so an interrupted run can be restarted.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent
BUNDLE = EXAMPLES.parent / "src" / "diffusers_var" / "pretrained" / "var-digits"
SEED = 0


def steps(work: Path, threads: int) -> list[tuple[str, Path, list[str]]]:
    """(name, output that marks the step done, command) for each step."""
    python = [sys.executable]
    data, tokenizer, model, samples = work / "data", work / "tokenizer", work / "var-digits", work / "samples"
    common = ["--report_to", "tensorboard", "--no_scale_lr", "--lr_scheduler", "cosine", "--center_crop"]
    common += ["--seed", str(SEED), "--checkpointing_steps", "500", "--checkpoints_total_limit", "1"]
    prepare = [*python, str(HERE / "prepare_data.py"), "--output_dir", str(data)]
    return [
        ("prepare data", data / "digits_info.json", prepare),
        (
            "train tokenizer",
            tokenizer / "diffusion_pytorch_model.safetensors",
            [*python, str(EXAMPLES / "train_vqvae.py"), "--vqvae_config", str(HERE / "vqvae_config.json")]
            + ["--train_data_dir", str(data / "train"), "--output_dir", str(tokenizer), *common]
            + ["--learning_rate", "1e-3", "--lr_warmup_steps", "100", "--train_batch_size", "32"]
            + ["--max_train_steps", "2000", "--validation_split_percentage", "5", "--validation_steps", "500"]
            + ["--restart_dead_codes_steps", "200"],
        ),
        (
            "train transformer",
            model / "model_index.json",
            [*python, str(EXAMPLES / "train_var.py"), "--model_config", str(HERE / "var_config.json")]
            + ["--vqvae_name_or_path", str(tokenizer), "--train_data_dir", str(data / "train")]
            + ["--output_dir", str(model), *common, "--learning_rate", "1e-3", "--lr_warmup_steps", "200"]
            + ["--train_batch_size", "64", "--max_train_steps", "2000", "--class_dropout_prob", "0.1"]
            + ["--use_ema", "--ema_decay", "0.999", "--validation_steps", "1000"],
        ),
        (
            "sample 50 per class",
            samples / "9_49.png",
            [*python, "-m", "diffusers_var.cli", "generate", "--model", str(model), "--num-per-class", "50"]
            + ["--seed", str(SEED)]
            + ["--output-dir", str(samples)],
        ),
        (
            "evaluate",
            work / "report.json",
            [*python, str(HERE / "evaluate.py"), "--samples_dir", str(samples), "--data_dir", str(data)]
            + ["--output_json", str(work / "report.json")],
        ),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work_dir", required=True)
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS for every step")
    parser.add_argument("--bundle", action="store_true", help=f"copy the trained pipeline into {BUNDLE}")
    args = parser.parse_args(argv)
    work = Path(args.work_dir).absolute()
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    log_path = work / "recipe_log.json"
    log = json.loads(log_path.read_text()) if log_path.is_file() else {"seed": SEED, "threads": args.threads}
    for name, done, command in steps(work, args.threads):
        if done.exists():
            print(f"[{name}] done already ({done})")
            continue
        print(f"[{name}] {shlex.join(command)}", flush=True)
        start = time.perf_counter()
        subprocess.run(command, env=env, check=True)
        log[name] = {"command": shlex.join(command), "wall_time_s": round(time.perf_counter() - start, 1)}
        log_path.write_text(json.dumps(log, indent=2))
    if args.bundle:
        staged = BUNDLE.with_name(".var-digits.tmp")
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(work / "var-digits", staged, ignore=shutil.ignore_patterns("checkpoint-*", "logs", ".*"))
        if BUNDLE.exists():
            shutil.rmtree(BUNDLE)
        staged.rename(BUNDLE)
        print(f"Bundled {BUNDLE}")
    print(json.dumps(json.loads((work / "report.json").read_text()), indent=2))


if __name__ == "__main__":
    main()

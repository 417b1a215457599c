"""The post-training objectives (training/cca.py, training/ddo.py, training/reference.py, training/self_play.py) and
``train_var.py --objective cca|ddo`` end to end on a tiny pipeline."""

from __future__ import annotations

import functools
import json
import math
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from conftest import load_script, tiny_images, tiny_pipeline, tiny_transformer
from safetensors.torch import load_file, save_file
from test_train_var import SCRIPT, emulate_kill_after, max_relative_difference, run, weights
from test_training_data import make_imagefolder

from diffusers_var import VARPipeline
from diffusers_var.training.cca import cca_batch_loss, cca_loss, check_cca_model, mismatched_labels, null_rows
from diffusers_var.training.ddo import ddo_batch_loss, ddo_loss
from diffusers_var.training.objective import sequence_log_likelihoods, teacher_forcing_batch
from diffusers_var.training.reference import check_reference, disable_dropout, frozen_reference
from diffusers_var.training.self_play import WRITTEN_BY, SelfPlayRound, draw_samples, split_token_maps, weights_digest


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# -- the losses on constructed log-likelihoods -----------------------------------------------------------------------


def test_cca_loss_equals_its_closed_form():
    log_p, ref_log_p = torch.tensor([-120.0, -95.5, -130.25]), torch.tensor([-118.0, -99.5, -130.25])
    log_p_neg, ref_log_p_neg = torch.tensor([-140.0, -101.0, -150.0]), torch.tensor([-135.0, -104.0, -149.0])
    conditional = torch.tensor([True, True, False])
    for beta, lam in ((0.02, 50.0), (0.5, 0.3), (1.0, 0.0)):
        positive = [-_log_sigmoid(beta * (a - b)) for a, b in zip(log_p.tolist(), ref_log_p.tolist())]
        negative = [
            -_log_sigmoid(-beta * (a - b)) * c
            for a, b, c in zip(log_p_neg.tolist(), ref_log_p_neg.tolist(), conditional.tolist())
        ]
        expected = (sum(positive) / 3 + lam * sum(negative) / 3) / max(1.0, lam)
        got = cca_loss(log_p, ref_log_p, log_p_neg, ref_log_p_neg, conditional, beta=beta, lam=lam)
        assert got.item() == pytest.approx(expected, rel=1e-6)


def test_ddo_loss_equals_its_closed_form():
    real, ref_real = torch.tensor([-80.0, -90.0]), torch.tensor([-85.0, -88.0])
    fake, ref_fake = torch.tensor([-70.0, -100.0, -60.0]), torch.tensor([-69.0, -105.0, -60.0])
    for alpha, beta in ((10.0, 0.02), (0.5, 0.3), (0.0, 1.0)):
        real_term = sum(-_log_sigmoid(beta * (a - b)) for a, b in zip(real.tolist(), ref_real.tolist())) / 2
        fake_term = sum(-_log_sigmoid(-beta * (a - b)) for a, b in zip(fake.tolist(), ref_fake.tolist())) / 3
        expected = (real_term + alpha * fake_term) / max(1.0, alpha)
        assert ddo_loss(real, ref_real, fake, ref_fake, alpha=alpha, beta=beta).item() == pytest.approx(expected)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda z: cca_loss(z, z, z, z, z > 0, beta=-0.1, lam=1.0), "β"),
        (lambda z: cca_loss(z, z, z, z, z > 0, beta=0.0, lam=1.0), "β"),
        (lambda z: cca_loss(z, z, z, z, z > 0, beta=0.1, lam=-1.0), "λ"),
        (lambda z: ddo_loss(z, z, z, z, alpha=-1.0, beta=0.1), "α"),
        (lambda z: ddo_loss(z, z, z, z, alpha=1.0, beta=-0.02), "β"),
    ],
)
def test_negative_weights_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call(torch.zeros(2))


# -- log-likelihoods and gradients of the real model ----------------------------------------------------------------


def _trainable(pipe: VARPipeline):
    model = pipe.transformer
    model.config.class_dropout_prob = 0.0
    return disable_dropout(model.train())


def test_sequence_log_likelihoods_sum_the_target_log_probabilities():
    pipe = tiny_pipeline()
    model = pipe.transformer.eval()
    inputs, targets = teacher_forcing_batch(pipe.vqvae, tiny_images(3))
    labels = torch.tensor([0, 4, 10])  # 10: the null class
    log_probs = model(labels, inputs).logits.float().log_softmax(-1)
    expected = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).sum(1)
    torch.testing.assert_close(sequence_log_likelihoods(model, labels, inputs, targets), expected)
    model.train()  # with class dropout of its own the labels would not be the ones given
    with pytest.raises(ValueError, match="class_dropout_prob"):
        sequence_log_likelihoods(model, labels, inputs, targets)


def _gradient(model, value: torch.Tensor) -> torch.Tensor:
    grads = torch.autograd.grad(value, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, model.parameters())]
    )


def test_cca_gradient_at_the_reference_raises_own_class_and_lowers_mismatched_likelihood():
    pipe = tiny_pipeline()
    model, images = _trainable(pipe), tiny_images(4)
    reference = frozen_reference(model)
    inputs, targets = teacher_forcing_batch(pipe.vqvae, images)
    labels, beta, lam, null_prob = torch.tensor([1, 2, 3, 4]), 0.1, 5.0, 0.3
    torch.manual_seed(11)
    loss, metrics = cca_batch_loss(model, reference, labels, inputs, targets, beta, lam, null_prob)
    torch.manual_seed(11)  # the same null rows and mismatched classes the loss drew
    null = null_rows(4, null_prob, labels.device)
    own, other = torch.where(null, 10, labels), torch.where(null, 10, mismatched_labels(labels, 10))
    assert not (other == labels).any() or null[other == labels].all()
    # at θ = ref every ratio is 0: the loss is log 2 per term and its gradient is β/2 · (−∇ own + λ ∇ mismatched)
    conditional = (~null).float()
    assert loss.item() == pytest.approx(math.log(2) * (1 + lam * conditional.mean().item()) / max(1, lam), rel=1e-6)
    assert metrics.reward_margin == 0.0 and metrics.reward_positive == 0.0
    grad_loss = _gradient(model, loss)
    grad_own = _gradient(model, sequence_log_likelihoods(model, own, inputs, targets).mean())
    grad_other = _gradient(model, (sequence_log_likelihoods(model, other, inputs, targets) * conditional).mean())
    expected = beta / 2 * (-grad_own + lam * grad_other) / max(1, lam)
    torch.testing.assert_close(grad_loss, expected, rtol=1e-4, atol=1e-7)
    # a small step along −∇L therefore raises the own-class likelihood and lowers the mismatched one
    assert (-grad_loss @ grad_own) > 0 or lam * (grad_other @ grad_own) > grad_own @ grad_own
    assert torch.count_nonzero(grad_own) > 0 and torch.count_nonzero(grad_other) > 0


def test_ddo_gradient_at_the_reference_raises_real_and_lowers_sample_likelihood():
    pipe = tiny_pipeline()
    model = _trainable(pipe)
    reference = frozen_reference(model)
    real = (torch.tensor([1, 2, 3]), *teacher_forcing_batch(pipe.vqvae, tiny_images(3, seed=1)))
    fake = (torch.tensor([5, 6]), *teacher_forcing_batch(pipe.vqvae, tiny_images(2, seed=2)))
    alpha, beta = 3.0, 0.2
    loss, metrics = ddo_batch_loss(model, reference, real, fake, alpha, beta, null_prob=0.0)
    assert loss.item() == pytest.approx(math.log(2) * (1 + alpha) / alpha, rel=1e-6)
    assert metrics.accuracy_real == 0.0 and metrics.accuracy_fake == 0.0  # an undecided discriminator
    grad_loss = _gradient(model, loss)
    grad_real = _gradient(model, sequence_log_likelihoods(model, *real).mean())
    grad_fake = _gradient(model, sequence_log_likelihoods(model, *fake).mean())
    torch.testing.assert_close(grad_loss, beta / 2 * (-grad_real + alpha * grad_fake) / alpha, rtol=1e-4, atol=1e-7)
    # with α = 0 the step only raises the real images' likelihood
    loss_real_only, _ = ddo_batch_loss(model, reference, real, fake, 0.0, beta, null_prob=0.0)
    step = -_gradient(model, loss_real_only)
    assert step @ grad_real > 0 and step @ grad_fake != 0


@pytest.mark.parametrize("beta", [0.02, 1.0])
def test_ddo_reference_that_fits_the_data_is_unstable_beyond_the_alpha_threshold(beta):
    """The README's stability claim: where p_ref = p_data, θ = ref is a minimum of the DDO loss for
    α(2 − β) < 2 + β and a maximum beyond. Exact expectations: a uniform categorical model over K outcomes,
    each outcome once as a real and once as a fake row, so the batch means are the expectations."""
    num_outcomes = 6
    reference_logits = torch.zeros(num_outcomes, dtype=torch.float64)
    threshold = (2 + beta) / (2 - beta)

    def loss(logits: torch.Tensor, alpha: float) -> torch.Tensor:
        log_p, ref_log_p = F.log_softmax(logits, 0), F.log_softmax(reference_logits, 0)
        return ddo_loss(log_p, ref_log_p, log_p, ref_log_p, alpha=alpha, beta=beta)

    # the logits' common shift changes nothing: look at the curvature orthogonal to it
    basis = torch.linalg.qr(torch.eye(num_outcomes, dtype=torch.float64) - 1.0 / num_outcomes)[0][:, :-1]
    for alpha, expected_sign in [(threshold * 0.95, 1.0), (threshold * 1.05, -1.0), (10.0, -1.0)]:
        hessian = torch.autograd.functional.hessian(functools.partial(loss, alpha=alpha), reference_logits.clone())
        eigenvalues = torch.linalg.eigvalsh(basis.T @ hessian @ basis)
        assert torch.all(expected_sign * eigenvalues > 0), (alpha, eigenvalues)


def test_the_reference_never_changes_while_the_model_trains():
    pipe = tiny_pipeline()
    model = _trainable(pipe)
    reference = frozen_reference(model)
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    assert not any(p.requires_grad for p in reference.parameters()) and not reference.training
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(model.parameters(), reference.parameters()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    inputs, targets = teacher_forcing_batch(pipe.vqvae, tiny_images(4))
    for _ in range(3):
        loss, _ = cca_batch_loss(model, reference, torch.tensor([0, 1, 2, 3]), inputs, targets, 0.5, 1.0, 0.25)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = reference.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert max_relative_difference(model.state_dict(), before) > 1e-4, "the trained model did not move"


def test_an_offloaded_reference_scores_the_same():
    pipe = tiny_pipeline()
    inputs, targets = teacher_forcing_batch(pipe.vqvae, tiny_images(2))
    labels = torch.tensor([3, 7])
    plain = sequence_log_likelihoods(frozen_reference(pipe.transformer), labels, inputs, targets)
    offloaded = frozen_reference(pipe.transformer, offload_to="cpu")
    assert hasattr(offloaded, "_hf_hook")
    torch.testing.assert_close(sequence_log_likelihoods(offloaded, labels, inputs, targets), plain)


def test_references_that_cannot_score_the_same_pyramids_are_refused():
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match="patch_nums"):
        check_reference(tiny_transformer(patch_nums=(1, 2)), pipe.transformer)
    with pytest.raises(ValueError, match="vocab_size"):
        check_reference(tiny_transformer(vocab_size=24), pipe.transformer)
    other_tokenizer = tiny_pipeline()
    with torch.no_grad():
        other_tokenizer.vqvae.quantizer.embedding.weight.add_(0.5)
    with pytest.raises(ValueError, match="tokenizer"):
        check_reference(other_tokenizer.transformer, pipe.transformer, other_tokenizer.vqvae, pipe.vqvae)
    check_reference(tiny_pipeline().transformer, pipe.transformer, tiny_pipeline().vqvae, pipe.vqvae)


def test_cca_needs_a_null_class_and_two_classes():
    pipe = tiny_pipeline()
    pipe.transformer.class_embedding = torch.nn.Embedding(10, pipe.transformer.config.embed_dim)
    with pytest.raises(ValueError, match="null class"):
        check_cca_model(pipe.transformer)
    with pytest.raises(ValueError, match="1 class"):
        check_cca_model(tiny_transformer(num_classes=1))


def test_split_token_maps_inverts_flattening():
    pipe = tiny_pipeline()
    token_maps = pipe.vqvae.tokenize(tiny_images(2))
    flat = torch.cat([t.flatten(1) for t in token_maps], dim=1)
    patch_nums = tuple(pipe.vqvae.config.patch_nums)
    assert all(torch.equal(a, b) for a, b in zip(split_token_maps(flat, patch_nums), token_maps))
    with pytest.raises(ValueError, match="tokens"):
        split_token_maps(flat[:, 1:], patch_nums)


# -- train_var.py --objective cca|ddo --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("post_training")
    tiny_pipeline().save_pretrained(root / "pipe")
    make_imagefolder(root / "data", classes=("a", "b", "c"), per_class=4, size=(10, 8))
    return root


def test_cca_run_writes_a_pipeline_with_its_card_and_reward_logs(workspace):
    run(
        workspace, "cca", "--objective", "cca", "--cca_beta", "0.5", "--cca_lambda", "2", "--train_batch_size", "4",
        "--max_train_steps", "3", "--report_to", "tensorboard", "--use_ema", "--ema_decay", "0.5",
        "--class_dropout_prob", "0.25",
    )  # fmt: skip
    out = workspace / "cca"
    pipe = VARPipeline.from_pretrained(out)
    assert pipe.transformer.config.class_dropout_prob == 0.25  # the objective drew the null rows; the rate is kept
    assert max_relative_difference(weights(out), weights(workspace / "pipe")) > 1e-4
    assert "Condition Contrastive Alignment (β = 0.5, λ = 2.0)" in (out / "README.md").read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = EventAccumulator(str(out / "logs" / "train_var")).Reload().Tags()["scalars"]
    for tag in ("train/loss", "train/reward_margin", "train/reward_accuracy", "train/reward_positive"):
        assert tag in scalars, tag


DDO_STRAIGHT = [
    "--objective", "ddo", "--ddo_alpha", "2", "--ddo_beta", "0.5", "--ddo_rounds", "2", "--train_batch_size", "2",
    "--max_train_steps", "4", "--checkpointing_steps", "1", "--ddo_samples_per_round", "6",
    "--ddo_generation_batch_size", "4", "--use_ema", "--ema_decay", "0.5", "--class_dropout_prob", "0.3",
]  # fmt: skip


@pytest.fixture(scope="module")
def ddo_straight(workspace):
    """A DDO run of two rounds of two steps, uninterrupted."""
    return run(workspace, "ddo-straight", *DDO_STRAIGHT)


def test_ddo_rounds_resume_exactly_and_move_the_reference(workspace, ddo_straight):
    common, result = DDO_STRAIGHT, ddo_straight
    assert "2 round(s) of ~2 steps, 6 reference samples per round" in result.stderr
    straight = workspace / "ddo-straight"
    # round 0's reference is the starting model, round 1's the model after step 2 (before EMA): never the moving one
    round0, round1 = straight / "self_play" / "round-000", straight / "self_play" / "round-001"
    start = load_file(workspace / "pipe" / "transformer" / "model.safetensors")
    assert max_relative_difference(load_file(round0 / "reference.safetensors"), start) == 0
    after_step_2 = load_file(straight / "checkpoint-2" / "model.safetensors")
    assert max_relative_difference(load_file(round1 / "reference.safetensors"), after_step_2) == 0
    samples = load_file(round0 / "samples-00000.safetensors")
    assert samples["targets"].shape == (4, 1 + 4 + 16) and samples["class_labels"].tolist() == [0, 1, 2, 3]
    assert load_file(round0 / "samples-00001.safetensors")["class_labels"].tolist() == [4, 5]
    assert json.loads((round1 / "round.json").read_text())["round"] == 1
    assert (
        "Direct Discriminative Optimization (α = 2.0, β = 0.5, 2 self-play round(s))"
        in (straight / "README.md").read_text()
    )

    # killed in round 1 after step 3, with one of round 1's sample files lost: resumed, it equals the straight run
    emulate_kill_after(workspace, "ddo-straight", "ddo-killed", 3)
    (workspace / "ddo-killed" / "self_play").mkdir()
    for folder in (round0, round1):
        target = workspace / "ddo-killed" / "self_play" / folder.name
        target.mkdir()
        for file in folder.iterdir():
            if file.name != "samples-00001.safetensors" or folder is round0:
                target.joinpath(file.name).write_bytes(file.read_bytes())
    run(workspace, "ddo-killed", *common, "--resume_from_checkpoint", "latest")
    killed = workspace / "ddo-killed"
    assert max_relative_difference(weights(killed), weights(straight)) <= 1e-6
    for name in ("samples-00000.safetensors", "samples-00001.safetensors"):  # the lost file drawn again, the same
        redrawn = load_file(killed / "self_play" / "round-001" / name)
        assert torch.equal(redrawn["targets"], load_file(round1 / name)["targets"])


def test_ddo_samples_depend_on_the_seed_only(workspace, ddo_straight):
    # the straight run's round 0 (seed 0), and a run that differs in its steps and rounds but has seed 1: the samples
    # are drawn per (seed, round, class, index), so seed 1 gives other samples of the same classes
    common = [
        "--objective", "ddo", "--train_batch_size", "2", "--max_train_steps", "1", "--ddo_samples_per_round", "6",
        "--ddo_generation_batch_size", "4", "--checkpointing_steps", "10", "--seed", "1",
    ]  # fmt: skip
    run(workspace, "ddo-seed-1", *common)

    def samples(name):
        folder = workspace / name / "self_play" / "round-000"
        parts = [load_file(p) for p in sorted(folder.glob("samples-*.safetensors"))]
        return torch.cat([p["targets"] for p in parts]), torch.cat([p["class_labels"] for p in parts])

    (a, labels_a), (c, labels_c) = samples("ddo-straight"), samples("ddo-seed-1")
    assert torch.equal(labels_a, labels_c) and labels_a.tolist() == [0, 1, 2, 3, 4, 5]
    assert not torch.equal(a, c)


def test_a_sample_does_not_depend_on_the_batch_it_is_drawn_in():
    pipe = tiny_pipeline()
    labels, seeds = [0, 1, 2, 3, 4], [11, 12, 13, 14, 15]
    args = (pipe.transformer, pipe.vqvae, pipe.scheduler)
    together = draw_samples(*args, labels, seeds, "cpu")
    apart = torch.cat(
        [draw_samples(*args, labels[:2], seeds[:2], "cpu"), draw_samples(*args, labels[2:], seeds[2:], "cpu")]
    )
    assert together.shape == (5, 21) and torch.equal(together, apart)
    assert not torch.equal(draw_samples(*args, labels, [s + 1 for s in seeds], "cpu"), together)


def test_fakes_are_the_drawn_pyramids_or_their_pixels_tokenized_again():
    pipe = tiny_pipeline()
    labels, seeds = [0, 1, 2], [21, 22, 23]
    args = (pipe.transformer, pipe.vqvae, pipe.scheduler, labels, seeds, "cpu")
    output = pipe(
        class_labels=labels,
        guidance_scale=1.0,
        top_k=0,
        top_p=1.0,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="pt",
    )
    drawn = torch.cat([t.flatten(1) for t in output.token_maps], dim=1)
    assert torch.equal(draw_samples(*args, "sampled"), drawn)
    pixels = (output.images * 255).round() / 255 * 2 - 1
    again = torch.cat([t.flatten(1) for t in pipe.vqvae.tokenize(pixels)], dim=1)
    assert torch.equal(draw_samples(*args, "reencoded"), again)
    with pytest.raises(ValueError, match="fake_tokens must be one of"):
        draw_samples(*args, "decoded")


def test_a_self_play_cache_of_other_settings_or_foreign_files_is_refused(tmp_path):
    settings = {"seed": 0, "rounds": 2, "num_samples": 6}
    folder = tmp_path / "round-000"
    folder.mkdir()
    record = {"written_by": WRITTEN_BY, **settings, "round": 0, "reference_sha256": "x"}
    (folder / "round.json").write_text(json.dumps(record))
    assert SelfPlayRound(tmp_path, 0, settings)._check_settings()["reference_sha256"] == "x"
    with pytest.raises(ValueError, match="num_samples: cached 6, now 7"):
        SelfPlayRound(tmp_path, 0, {**settings, "num_samples": 7})._check_settings()
    # a cache from before --ddo_fake_tokens existed holds re-encoded fakes
    assert SelfPlayRound(tmp_path, 0, {**settings, "fake_tokens": "reencoded"})._check_settings()
    with pytest.raises(ValueError, match="fake_tokens: cached 'reencoded', now 'sampled'"):
        SelfPlayRound(tmp_path, 0, {**settings, "fake_tokens": "sampled"})._check_settings()
    (folder / "round.json").write_text(json.dumps({**record, "written_by": "someone"}))
    with pytest.raises(ValueError, match="not written by"):
        SelfPlayRound(tmp_path, 0, settings)._check_settings()
    (folder / "round.json").unlink()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="without a round.json"):
        SelfPlayRound(tmp_path, 0, settings)._check_settings()
    assert (folder / "notes.txt").read_text() == "mine"
    assert SelfPlayRound(tmp_path, 1, settings)._check_settings() is None  # a new round: nothing there yet
    # a sample file that is not ours is refused, a damaged one of ours is drawn again
    round_ = SelfPlayRound(tmp_path, 0, settings)
    save_file({"x": torch.zeros(2)}, round_._chunk_path(0), metadata={"written_by": "someone"})
    with pytest.raises(ValueError, match="not written by"):
        round_._valid_chunk(0)
    tensors = {"targets": torch.zeros(2, 3, dtype=torch.int32), "class_labels": torch.tensor([0, 1])}
    save_file(tensors, round_._chunk_path(1), metadata={"written_by": WRITTEN_BY, "sha256": weights_digest(tensors)})
    assert round_._valid_chunk(1)
    round_._chunk_path(1).write_bytes(round_._chunk_path(1).read_bytes()[:-4])
    assert not round_._valid_chunk(1)


def _train_var_module():
    return load_script(SCRIPT, "train_var_script")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--objective", "dpo"], "invalid choice: 'dpo'"),
        (["--objective", "cca", "--cca_beta", "-0.1"], "--cca_beta must be > 0"),
        (["--objective", "cca", "--cca_lambda", "-1"], "--cca_lambda must be ≥ 0"),
        (["--objective", "ddo", "--ddo_alpha", "-2"], "--ddo_alpha must be ≥ 0"),
        (["--objective", "ddo", "--ddo_beta", "0"], "--ddo_beta must be > 0"),
        (["--objective", "ddo", "--ddo_samples_per_round", "0"], "DDO needs the reference's samples"),
        (["--objective", "ddo", "--ddo_rounds", "0"], "--ddo_rounds must be ≥ 1"),
        (["--objective", "cca", "--ddo_alpha", "3"], "--ddo_alpha set(s) --objective ddo"),
        (["--cca_lambda", "3"], "--cca_lambda set(s) --objective cca, and the objective is ce"),
        (["--reference_model", "x"], "belong to --objective cca or ddo"),
        (["--objective", "cca", "--lora_rank", "4"], "leave out --lora_rank"),
        (["--objective", "cca", "--label_smoothing", "0.1"], "--label_smoothing shapes the cross-entropy"),
        (["--objective", "ddo", "--retrieval_datastore", "d"], "does not train retrieval conditioning"),
        (
            ["--objective", "ddo", "--model_config", "c.json", "--vqvae_name_or_path", "t"],
            "post-trains a trained model against itself as reference and samples it",
        ),
    ],
)
def test_bad_post_training_flags_are_refused(extra, message, capsys):
    source = [] if "--model_config" in extra else ["--pretrained_model_name_or_path", "pipe"]
    with pytest.raises(SystemExit) as exit_info:
        _train_var_module().parse_args([*source, "--train_data_dir", "data", *extra])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_reference_with_other_scales_is_refused(workspace):
    tiny_pipeline(patch_nums=(1, 2)).save_pretrained(workspace / "other-scales")
    result = run(
        workspace, "refused", "--objective", "cca", "--reference_model", str(workspace / "other-scales"),
        "--max_train_steps", "1", check=False,
    )  # fmt: skip
    assert result.returncode != 0 and "The reference model's patch_nums is [1, 2]" in result.stderr
    assert not (workspace / "refused" / "model_index.json").exists()


def test_a_log_likelihood_sanity_check_against_cross_entropy():
    pipe = tiny_pipeline()
    model = pipe.transformer.eval()
    inputs, targets = teacher_forcing_batch(pipe.vqvae, tiny_images(2))
    labels = torch.tensor([1, 2])
    out = model(labels, inputs, labels=targets)
    total = sequence_log_likelihoods(model, labels, inputs, targets)
    # the model's own loss (no label smoothing) is the mean token cross-entropy: −Σ log p / L
    logits = out.logits.float()
    assert F.cross_entropy(logits.transpose(1, 2), targets).item() == pytest.approx(
        -total.mean().item() / targets.shape[1], rel=1e-5
    )


def test_the_post_training_recipe_runs_in_smoke_form(tmp_path):
    """examples/post_training/run_recipe.py end to end at toy size (the full recipe takes 15-20 minutes)."""
    recipe = Path(__file__).resolve().parents[1] / "examples" / "post_training" / "run_recipe.py"
    command = [sys.executable, str(recipe), "--objective", "ddo", "--output-dir", str(tmp_path / "run")]
    command += ["--smoke", "--threads", "1"]
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "run"
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["runs"]) == {f"{m}, guidance {g}" for m in ("var-digits", "post-trained") for g in ("1.0", "2.5")}
    for row in report["runs"].values():
        assert row["samples"] == 20 and 0 <= row["misread_percent"] <= 100 and row["images_per_s"] > 0
        assert len(row["wall_times_s"]) == 1 and row["wall_time_s"] == row["wall_times_s"][0]
    assert "speed-up, post-trained without guidance over var-digits with guidance 2.5" in report["comparisons"]
    assert "| post-trained, guidance 1.0 |" in (run_dir / "report.md").read_text()
    assert PIL.Image.open(run_dir / "grid.png").size[1] == 20 + 10 * 48
    assert (run_dir / "pipeline" / "self_play" / "round-001" / "reference.safetensors").is_file()
    assert "Direct Discriminative Optimization" in (run_dir / "pipeline" / "README.md").read_text()
    # the recipe's folder is its own: other arguments, or someone else's files, are refused
    module = load_script(recipe, "post_training_recipe")
    other = module.parse_args(["--objective", "ddo", "--output-dir", str(run_dir), "--smoke", "--seed", "3"])
    with pytest.raises(SystemExit, match=r"holds a run with other arguments \(seed: 0 → 3\)"):
        module.claim_output_dir(run_dir, other)
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("keep")
    with pytest.raises(SystemExit, match="not made by this recipe"):
        module.claim_output_dir(tmp_path / "theirs", other)
    assert sorted(p.name for p in (tmp_path / "theirs").iterdir()) == ["notes.txt"]


def test_the_documented_fsdp_configuration_is_one_accelerate_reads():
    from accelerate.commands.config.config_args import load_config_from_file

    path = Path(__file__).resolve().parents[1] / "examples" / "post_training" / "fsdp_d30.yaml"
    config = load_config_from_file(str(path))
    assert config.distributed_type == "FSDP" and config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "VARBlock"
    from diffusers_var.models import transformer

    assert hasattr(transformer, config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"])


def test_likelihood_by_scale_reports_every_scale(capsys):
    """examples/post_training/likelihood_by_scale.py on the bundled model against itself: r is exactly 0."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "post_training"))
    from likelihood_by_scale import main

    report = main(["--model", "var-digits", "--num-samples", "20", "--num-real", "40", "--threads", "1"])
    scales = len(report["patch_nums"])
    assert all(len(v) == scales for v in report["nats_per_token"].values())
    assert len(report["reencode_changes"]) == scales and all(0 <= c <= 1 for c in report["reencode_changes"])
    assert report["models"]["var-digits"]["r_read_right"] == [0.0] * scales
    assert json.loads(capsys.readouterr().out) == report

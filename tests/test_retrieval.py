"""Retrieval-augmented sampling and training (after Re-Imagen): the mixing formula, the trained retrieval
attention, VARRetrievalPipeline in both modes, retrieval training, and their errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import tiny_pipeline, tiny_transformer

from diffusers_var import VARPipeline, VARRetrievalPipeline, VARTransformer
from diffusers_var.retrieval import build_datastore, image_hash
from diffusers_var.retrieval.mixing import retrieval_weights, retrieved_token_distribution
from diffusers_var.schedulers.scale import VARScaleScheduler
from diffusers_var.training.data import ImageClassDataset, load_image_dataset
from diffusers_var.training.retrieval import NeighbourDataset, add_retrieval_layers, check_retrieval_training

PATCH_NUMS = (1, 2, 4)
SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_var.py"


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def retrieval_pipeline(num_neighbours: int = 2, open_gates: bool = True) -> VARRetrievalPipeline:
    """A tiny pipeline whose transformer has retrieval attention (gates opened, so that neighbours matter)."""
    pipe = tiny_pipeline()
    transformer = tiny_transformer(num_neighbours=num_neighbours)
    if open_gates:
        with torch.no_grad():
            for block in transformer.blocks:
                block.neighbour_attn.gate.normal_(0, 1.0, generator=generator(1))
    pipe = VARRetrievalPipeline(vqvae=pipe.vqvae, transformer=transformer, scheduler=pipe.scheduler)
    pipe.set_id2label({i: f"digit {i}" for i in range(10)})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images_01(count: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, 8, 8, generator=generator(seed))


# -- the mixing formula on constructed distributions ----------------------------------------------------------------


def test_retrieved_distribution_is_the_neighbours_histogram_and_smooths_over_adjacent_positions():
    maps = torch.tensor([[[[1, 2], [3, 4]], [[1, 0], [3, 3]], [[1, 2], [0, 4]]]])  # B=1, k=3, 2×2
    plain = retrieved_token_distribution(maps, vocab_size=5)
    assert plain.shape == (1, 4, 5)
    torch.testing.assert_close(plain[0, 0], torch.tensor([0, 1.0, 0, 0, 0]))
    torch.testing.assert_close(plain[0, 1], torch.tensor([1 / 3, 0, 2 / 3, 0, 0]))
    torch.testing.assert_close(plain[0, 3], torch.tensor([0, 0, 0, 1 / 3, 2 / 3]))
    # smoothing s: the 3 neighbours' codes at the position count 1, at each of the other 3 positions s
    s = 0.5
    smooth = retrieved_token_distribution(maps, vocab_size=5, smoothing=s)
    counts = torch.zeros(5)
    for n in range(3):
        for r in range(2):
            for c in range(2):
                counts[maps[0, n, r, c]] += 1.0 if (r, c) == (0, 0) else s
    torch.testing.assert_close(smooth[0, 0], counts / counts.sum())


def test_retrieval_weight_schedules_and_bounds():
    assert retrieval_weights(0.4, 3) == [0.4] * 3
    assert retrieval_weights(0.8, 3, "linear_decay") == pytest.approx([0.8, 0.4, 0.0])
    assert retrieval_weights([0.1, 0.2, 0.3], 3) == [0.1, 0.2, 0.3]
    for bad, message in ((1.5, "retrieval_weight must lie in \\[0, 1\\], got 1.5"), (-0.1, "got -0.1")):
        with pytest.raises(ValueError, match=message):
            retrieval_weights(bad, 3)
    with pytest.raises(ValueError, match="one λ per scale \\(3\\), got 2"):
        retrieval_weights([0.1, 0.2], 3)
    with pytest.raises(ValueError, match="retrieval_weight\\[1\\] must lie in \\[0, 1\\]"):
        retrieval_weights([0.1, 2.0, 0.3], 3)
    with pytest.raises(ValueError, match="retrieval_schedule must be one of"):
        retrieval_weights(0.5, 3, "cosine")


def test_scheduler_step_samples_from_the_mixture():
    scheduler = VARScaleScheduler(patch_nums=PATCH_NUMS)
    logits = torch.randn(2, 4, 16, generator=generator(0))
    retrieved = retrieved_token_distribution(torch.randint(16, (2, 3, 2, 2), generator=generator(1)), 16)
    # λ = 0: the plain step, draw for draw
    plain = scheduler.step(logits, 1, top_k=0, top_p=1.0, generator=generator(5))
    mixed0 = scheduler.step(logits, 1, top_k=0, top_p=1.0, generator=generator(5), retrieval_probs=retrieved)
    assert torch.equal(plain.token_map, mixed0.token_map)
    # the returned logits are log((1 − λ)·p + λ·r), p the filtered model distribution
    out = scheduler.step(
        logits, 1, top_k=4, top_p=1.0, generator=generator(5), retrieval_probs=retrieved, retrieval_weight=0.3
    )
    filtered = scheduler.step(logits, 1, top_k=4, top_p=1.0, generator=generator(5)).logits
    expected = (0.7 * filtered.softmax(-1) + 0.3 * retrieved).log()
    torch.testing.assert_close(out.logits, expected)
    # λ = 1 with one neighbour: the neighbour's codes exactly
    neighbour = torch.randint(16, (2, 1, 2, 2), generator=generator(2))
    copied = scheduler.step(
        logits,
        1,
        generator=generator(5),
        retrieval_probs=retrieved_token_distribution(neighbour, 16),
        retrieval_weight=1.0,
    )
    assert torch.equal(copied.token_map, neighbour[:, 0])
    with pytest.raises(ValueError, match="retrieval_probs must have shape \\(2, 4, 16\\)"):
        scheduler.step(logits, 1, retrieval_weight=0.5)


# -- the trained retrieval attention ------------------------------------------------------------------------------


def test_retrieval_transformer_without_neighbours_is_the_plain_model():
    plain = tiny_transformer()
    retrieval = add_retrieval_layers(plain, num_neighbours=3)
    assert retrieval.config.num_neighbours == 3 and not plain.config.num_neighbours
    labels, inputs = torch.tensor([3, 7]), torch.randn(2, 20, 8)
    torch.testing.assert_close(retrieval(labels, inputs).logits, plain(labels, inputs).logits, rtol=0, atol=0)
    codes = torch.randn(2, 3, 21, 8)
    # fresh retrieval attention has zero gates: with neighbours it is still the plain model
    torch.testing.assert_close(
        retrieval(labels, inputs, neighbour_codes=codes).logits, plain(labels, inputs).logits, rtol=0, atol=0
    )
    with torch.no_grad():
        for block in retrieval.blocks:
            block.neighbour_attn.gate.fill_(1.0)
    with_neighbours = retrieval(labels, inputs, neighbour_codes=codes).logits
    assert not torch.allclose(with_neighbours, plain(labels, inputs).logits)
    # a row whose neighbours are masked is the plain model's row exactly
    masked = retrieval(labels, inputs, neighbour_codes=codes, neighbour_mask=torch.tensor([True, False])).logits
    torch.testing.assert_close(masked[1], plain(labels, inputs).logits[1], rtol=0, atol=0)
    torch.testing.assert_close(masked[0], with_neighbours[0], rtol=0, atol=0)
    # cached decoding (neighbours encoded once into the cache) equals teacher forcing
    cache, outs = retrieval.allocate_kv_cache(2), []
    for si, (begin, end) in enumerate(retrieval.begin_ends):
        scale_input = None if si == 0 else inputs[:, begin - 1 : end - 1]
        outs.append(
            retrieval(labels, scale_input, kv_cache=cache, scale_index=si, neighbour_codes=codes if si == 0 else None)
        )
    torch.testing.assert_close(torch.cat([o.logits for o in outs], 1), with_neighbours, rtol=1e-5, atol=1e-5)


def test_retrieval_transformer_saves_loads_strictly_and_refuses_neighbours_on_a_plain_model(tmp_path):
    model = tiny_transformer(num_neighbours=2)
    model.save_pretrained(tmp_path / "t")
    loaded = VARTransformer.from_pretrained(tmp_path / "t")
    assert loaded.config.num_neighbours == 2
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(ValueError, match="no retrieval conditioning \\(config.num_neighbours=0\\)"):
        tiny_transformer()(torch.tensor([1]), torch.randn(1, 20, 8), neighbour_codes=torch.randn(1, 2, 21, 8))
    with pytest.raises(ValueError, match="neighbour_codes must have shape \\(B, k, 21, 8\\)"):
        model(torch.tensor([1]), torch.randn(1, 20, 8), neighbour_codes=torch.randn(1, 2, 20, 8))
    with pytest.raises(ValueError, match="num_neighbours must be an integer ≥ 0"):
        tiny_transformer(num_neighbours=-1)


# -- VARRetrievalPipeline, both modes -----------------------------------------------------------------------------


def test_training_free_lambda_zero_is_plain_sampling_and_lambda_one_copies_the_neighbour():
    pipe = tiny_pipeline()
    retrieving = VARRetrievalPipeline(**pipe.components, **pipe.parameters)
    retrieving.set_progress_bar_config(disable=True)
    references = images_01(3)
    plain = pipe([2, 5, 5], generator=generator(3))
    zero = retrieving([2, 5, 5], reference_images=references, retrieval_weight=0.0, generator=generator(3))
    assert zero.retrieval_mode == "training_free" and zero.label_names == ["digit 2", "digit 5", "digit 5"]
    assert all(torch.equal(a, b) for a, b in zip(plain.token_maps, zero.token_maps))
    one = retrieving(
        [2, 5], reference_images=references[:1], retrieval_weight=1.0, retrieval_smoothing=0.0, generator=generator(3)
    )
    reference_tokens = pipe.vqvae.tokenize(references[:1] * 2 - 1)
    assert all(torch.equal(a, b.expand_as(a)) for a, b in zip(one.token_maps, reference_tokens))
    # λ between: the draws change (per-image generators give the same plain stream)
    half = retrieving([2, 5, 5], reference_images=references, retrieval_weight=0.5, generator=generator(3))
    assert not all(torch.equal(a, b) for a, b in zip(plain.token_maps, half.token_maps))


def test_trained_mode_uses_the_neighbours_and_guides_on_retrieval():
    pipe = retrieval_pipeline()
    references = images_01(2, seed=4)
    assert pipe.default_retrieval_mode() == "combined"
    closed = retrieval_pipeline(open_gates=False)
    with torch.no_grad():
        for block in closed.transformer.blocks:
            block.neighbour_attn.gate.zero_()
    without = VARPipeline(**closed.components)([1, 2], generator=generator(0))
    off = closed([1, 2], reference_images=references, retrieval_mode="trained", generator=generator(0))
    assert all(torch.equal(a, b) for a, b in zip(without.token_maps, off.token_maps))  # zero gates: the plain model
    plain = VARPipeline(**pipe.components)([1, 2], generator=generator(0))  # the same model, no neighbours
    trained = pipe([1, 2], reference_images=references, retrieval_mode="trained", generator=generator(0))
    assert trained.retrieval_mode == "trained"
    assert not all(torch.equal(a, b) for a, b in zip(plain.token_maps, trained.token_maps))
    # guidance on retrieval adds a group of rows without neighbours; the loop still branches states (select)
    kept = []

    def keep_second(pipeline, si, state):
        assert state.row_groups == 3 and state.neighbour_codes is None  # encoded into the cache at scale 0
        kept.append(state.kv_cache.neighbours.row_mask.tolist())
        return state.select(torch.tensor([1])) if si == 1 else None

    guided = pipe(
        [1, 2],
        reference_images=references,
        retrieval_mode="trained",
        retrieval_guidance_scale=3.0,
        generator=generator(0),
        state_callback=keep_second,
    )
    assert kept[0] == [True, True, True, True, False, False] and kept[-1] == [True, True, False]
    assert len(guided.images) == 1
    # without class guidance, the retrieval guidance alone (two groups)
    only = pipe(
        [1], reference_images=references, guidance_scale=1.0, retrieval_guidance_scale=2.0, generator=generator()
    )
    assert len(only.images) == 1


def test_datastore_sampling_unseen_label_and_neighbour_exclusion_in_training(tmp_path):
    pipe = retrieval_pipeline()
    pipe.set_id2label({i: str(i) for i in range(10)})
    folder = tmp_path / "images"
    rng = np.random.default_rng(0)
    for label in ("3", "7", "zebra"):
        (folder / label).mkdir(parents=True)
        for i in range(5):
            PIL.Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / label / f"{i}.png")
    store = build_datastore(str(folder), "digits-classifier", tmp_path / "store", progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        pipe(["3"], datastore=store)
    store.add_tokenizer(pipe.vqvae, progress=False)

    out = pipe(["3", "zebra"], datastore=store, num_images_per_prompt=2, generator=[generator(i) for i in range(4)])
    assert out.label_names == ["3", "3", "zebra", "zebra"]
    assert out.class_labels.tolist() == [3, 3, 10, 10]  # "zebra" is unseen: the null class, neighbours alone
    assert out.neighbour_rows.shape == (4, 2)
    assert all(store.labels[r] == name for rows, name in zip(out.neighbour_rows, out.label_names) for r in rows)
    again = pipe(["3", "zebra"], datastore=store, num_images_per_prompt=2, generator=[generator(i) for i in range(4)])
    assert np.array_equal(out.neighbour_rows, again.neighbour_rows)
    assert all(torch.equal(a, b) for a, b in zip(out.token_maps, again.token_maps))

    with pytest.raises(ValueError, match="no label\\(s\\) \\['horse'\\]"):
        pipe(["horse"], datastore=store)
    with pytest.raises(ValueError, match="k=6 is more than the 4 images of label '3' \\(1 excluded\\)"):
        pipe(["3"], datastore=store, num_neighbours=6)  # more than the label has besides the anchor
    with pytest.raises(ValueError, match="retrieval_weight, retrieval_smoothing and retrieval_sharpness belong to"):
        pipe(["3"], datastore=store, retrieval_mode="trained", retrieval_weight=0.5)
    with pytest.raises(ValueError, match="needs retrieval_mode='trained'"):
        pipe(["3"], datastore=store, retrieval_mode="training_free", retrieval_guidance_scale=2.0)
    with pytest.raises(ValueError, match="retrieval_mode must be one of"):
        pipe(["3"], datastore=store, retrieval_mode="knn")
    with pytest.raises(ValueError, match="a datastore or reference_images"):
        pipe(["3"])

    # training: a sample's neighbours are other images of its label, never itself
    dataset = load_image_dataset(str(folder), None, None)
    names = dataset.features["label"].names
    check_retrieval_training(store, pipe.vqvae, names, 4)
    with pytest.raises(ValueError, match="at least 6 datastore images per label"):
        check_retrieval_training(store, pipe.vqvae, names, 5)
    neighbours = NeighbourDataset(ImageClassDataset(dataset, "image", "label", 8), store, names, num_neighbours=4)
    for index in range(len(dataset)):
        item = neighbours[index]
        own = image_hash(dataset[index]["image"])
        rows = item["neighbour_rows"].tolist()
        assert len(set(rows)) == 4
        assert all(store.labels[r] == names[int(item["class_labels"])] for r in rows)
        assert own not in {store.dataset[r]["image_hash"] for r in rows}


def test_train_var_with_a_retrieval_datastore(tmp_path):
    pipe = tiny_pipeline(id2label={})
    pipe.save_pretrained(tmp_path / "pipe")
    folder = tmp_path / "data"
    rng = np.random.default_rng(1)
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for i in range(4):
            PIL.Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / label / f"{i}.png")
    build_datastore(str(folder), "digits-classifier", tmp_path / "store", tokenizer=pipe.vqvae, progress=False)
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(dict(num_classes=2, vocab_size=32, latent_channels=8, patch_nums=[1, 2, 4], depth=1, embed_dim=32))
    )
    common = [
        sys.executable,
        str(SCRIPT),
        "--model_config",
        str(config),
        "--vqvae_name_or_path",
        str(tmp_path / "pipe"),
    ]
    common += ["--train_data_dir", str(folder), "--report_to", "none", "--validation_steps", "0", "--no_scale_lr"]
    common += ["--retrieval_datastore", str(tmp_path / "store"), "--train_batch_size", "2", "--num_neighbours", "2"]
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [*common, "--output_dir", str(tmp_path / "out"), "--max_train_steps", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    trained = VARPipeline.from_pretrained(tmp_path / "out")
    assert trained.transformer.config.num_neighbours == 2
    assert (
        "attends to 2 retrieved neighbours, trained with the datastore" in (tmp_path / "out" / "README.md").read_text()
    )
    result = subprocess.run(
        [*common, "--output_dir", str(tmp_path / "bad"), "--max_train_steps", "1", "--num_neighbours", "4"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode != 0 and "at least 5 datastore images per label" in result.stderr


def test_long_tail_recipe_smoke(tmp_path):
    """examples/retrieval/run_recipe.py end to end at toy size (the full recipe takes about 40 minutes)."""
    recipe = Path(__file__).resolve().parents[1] / "examples" / "retrieval" / "run_recipe.py"
    command = [sys.executable, str(recipe), "--holdout-class", "4", "--rare-classes", "1", "9"]
    command += ["--output-dir", str(tmp_path / "run"), "--smoke", "--threads", "1"]
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    # the transformer's data: no held-out digit, rare digits at 5 % (the datastore keeps every training image)
    assert not (run / "data" / "train" / "4").exists() and len(list((run / "data" / "datastore" / "4").iterdir())) > 100
    assert len(list((run / "data" / "train" / "1").iterdir())) == round(
        0.05 * len(list((run / "data" / "datastore" / "1").iterdir()))
    )
    pipe = VARPipeline.from_pretrained(run / "pipeline")
    assert pipe.transformer.config.num_neighbours == 4 and "4" not in pipe.labels and "1" in pipe.labels
    report = json.loads((run / "report.json").read_text())
    assert set(report["groups"]) == {"frequent", "rare", "held-out"}
    held_out = report["groups"]["held-out"]
    assert held_out["digits"] == [4]
    for condition in ("no retrieval", "trained retrieval", "training-free retrieval", "combined retrieval"):
        assert 0 <= held_out[condition]["class_agreement"] <= 1 and held_out[condition]["nn_distance_ratio"] > 0
    assert "| held-out [4] | trained retrieval |" in (run / "report.md").read_text()
    assert PIL.Image.open(run / "grid.png").size[0] > 12 * 32
    # the same folders serve the command line
    from diffusers_var.cli import main as cli_main

    cli_main(
        ["generate", "--model", str(run / "pipeline"), "--datastore", str(run / "datastore"), "--class-labels", "4"]
        + ["--num-per-class", "2", "--output-dir", str(tmp_path / "samples")]
    )
    assert sorted(p.name for p in (tmp_path / "samples").glob("*.png")) == ["4_0.png", "4_1.png"]


def test_guidance_on_class_and_retrieval_combines_the_three_row_groups():
    from diffusers_var.retrieval import RetrievalConditioning

    pipe = retrieval_pipeline()
    maps = [torch.zeros(2, 2, p, p, dtype=torch.long) for p in PATCH_NUMS]
    retrieval = RetrievalConditioning(maps, "trained", guidance_scale=3.0)
    state = pipe.prepare_sampling_state(torch.tensor([1, 2]), guided=True, retrieval=retrieval)
    assert state.row_groups == 3 and state.neighbour_mask.tolist() == [True] * 4 + [False] * 2
    conditional, null_class, no_neighbours = (torch.randn(2, 4, 32, generator=generator(i)) for i in range(3))
    logits = torch.cat((conditional, null_class, no_neighbours))
    guided, scheduler_guidance = pipe._guided_logits(state, logits, 1, 2.5, 3.0)
    t_class, t_retrieval = pipe.scheduler.guidance_weight(1, 2.5), pipe.scheduler.guidance_weight(1, 3.0)
    expected = conditional + t_class * (conditional - null_class) + t_retrieval * (conditional - no_neighbours)
    assert scheduler_guidance == 1.0 and t_class != t_retrieval
    torch.testing.assert_close(guided, expected)
    # guidance on the class switched off mid-call: retrieval guidance alone
    guided, _ = pipe._guided_logits(state, logits, 1, 1.0, 3.0)
    torch.testing.assert_close(guided, conditional + t_retrieval * (conditional - no_neighbours))
    # retrieval guidance cannot start mid-call: there are no rows without neighbours
    plain_state = pipe.prepare_sampling_state(torch.tensor([1, 2]), guided=True)
    with pytest.raises(ValueError, match="retrieval_guidance_scale must stay 1.0"):
        pipe.sample_next_scale(plain_state, 2.5, retrieval_guidance_scale=2.0)


def test_combined_mode_attends_and_mixes():
    pipe = retrieval_pipeline()
    references = images_01(2, seed=4)
    trained = pipe([1, 2], reference_images=references, retrieval_mode="trained", generator=generator(0))
    zero = pipe(
        [1, 2], reference_images=references, retrieval_mode="combined", retrieval_weight=0.0, generator=generator(0)
    )
    assert zero.retrieval_mode == "combined"
    assert all(torch.equal(a, b) for a, b in zip(trained.token_maps, zero.token_maps))  # λ = 0: attention alone
    one = pipe(
        [1, 2], reference_images=references[:1], retrieval_mode="combined", retrieval_weight=1.0, generator=generator(0)
    )
    reference_tokens = pipe.vqvae.tokenize(references[:1] * 2 - 1)
    assert all(torch.equal(a, b.expand_as(a)) for a, b in zip(one.token_maps, reference_tokens))
    with pytest.raises(ValueError, match="retrieval_mode='combined' needs a transformer trained with retrieval"):
        VARRetrievalPipeline(**tiny_pipeline().components)([1], reference_images=references, retrieval_mode="combined")

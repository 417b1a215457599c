"""Inference-time search: verifiers, the three algorithms under a budget, VARSearchPipeline."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import tiny_pipeline
from safetensors.torch import save_file

from diffusers_var import VARPipeline, VARSearchPipeline
from diffusers_var.search import (
    ClassifierVerifier,
    CLIPVerifier,
    LinearHeadVerifier,
    SearchSampler,
    SelfConsistencyVerifier,
    WeightedVerifier,
)


def brightness_classes(images: np.ndarray) -> torch.Tensor:
    """A made-up 10-class 'classifier' on pixels: deterministic, cheap, and sensitive to every sample."""
    pixels = torch.from_numpy(images).float().flatten(1) / 255
    weights = torch.randn(pixels.shape[1], 10, generator=torch.Generator().manual_seed(0))
    return (pixels @ weights).log_softmax(-1)


@pytest.fixture
def search_pipe():
    tiny = tiny_pipeline()
    return VARSearchPipeline(**tiny.components, **tiny.parameters)


VERIFIER = ClassifierVerifier(brightness_classes)
OPTIONS = {"random": {}, "zero-order": {"neighbours": 2}, "paths": {}}


@pytest.mark.parametrize("algorithm", ["random", "zero-order", "paths"])
def test_no_algorithm_scores_below_its_first_candidate_and_budgets_hold(search_pipe, algorithm):
    for budget in (3, 5.5, 8):
        out = search_pipe(
            [1, 2, 3, 4], verifier=VERIFIER, algorithm=algorithm, budget=budget, output_type="np",
            generator=torch.Generator().manual_seed(0), **OPTIONS[algorithm],
        )  # fmt: skip
        assert bool((out.scores >= out.first_scores).all())
        assert bool((out.budget_used <= budget + 1e-9).all()) and bool((out.budget_used >= 1).all())
        assert out.verifier_calls >= 4 and out.images.shape == (4, 8, 8, 3)
    # search finds better than plain sampling on average
    assert float(out.scores.mean()) > float(out.first_scores.mean())


@pytest.mark.parametrize("algorithm", ["random", "zero-order", "paths"])
def test_the_same_generator_gives_the_same_result(search_pipe, algorithm):
    runs = [
        search_pipe(
            [5, 6],
            verifier=VERIFIER,
            algorithm=algorithm,
            budget=5,
            output_type="pt",
            generator=torch.Generator().manual_seed(3),
            **OPTIONS[algorithm],
        )  # fmt: skip
        for _ in range(2)
    ]
    assert torch.equal(runs[0].images, runs[1].images) and torch.equal(runs[0].scores, runs[1].scores)


def test_budget_one_is_the_plain_sample(search_pipe):
    plain = VARPipeline(**search_pipe.components)(
        [1, 2], generator=[torch.Generator().manual_seed(s) for s in (5, 6)], output_type="np"
    ).images
    for algorithm in ("random", "paths"):
        out = search_pipe(
            [1, 2], verifier=VERIFIER, algorithm=algorithm, budget=1, output_type="np",
            generator=[torch.Generator().manual_seed(s) for s in (5, 6)],
        )  # fmt: skip
        assert np.array_equal(out.images, np.round(np.clip(plain, 0, 1) * 255) / 255)


def test_a_forked_kv_cache_gives_the_logits_of_recomputing_from_scratch(pipe):
    labels = torch.tensor([1, 2])
    state = pipe.prepare_sampling_state(labels, guided=True)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        pipe.sample_next_scale(state, 2.0, 0, 1.0, generator=generator)
    fork = state.clone()

    def next_logits(s):
        scale_input = pipe.vqvae.scale_input(s.latents, s.scale_index)
        scale_input = torch.cat((scale_input, scale_input))
        return pipe.transformer(s.model_labels, scale_input, kv_cache=s.kv_cache, scale_index=s.scale_index).logits

    # from scratch: a new state fed the same tokens (forced), its cache rebuilt scale by scale
    sides = pipe.vqvae.config.patch_nums
    forced = [*state.token_maps, *[torch.zeros(2, s, s, dtype=torch.long) for s in sides[2:]]]
    masks = [torch.full((2, s, s), i < 2) for i, s in enumerate(sides)]
    fresh = pipe.prepare_sampling_state(labels, guided=True, forced_token_maps=forced, forced_masks=masks)
    for _ in range(2):
        pipe.sample_next_scale(fresh, 2.0, 0, 1.0, generator=torch.Generator().manual_seed(9))
    assert all(torch.equal(a, b) for a, b in zip(fresh.token_maps, state.token_maps))
    forked = next_logits(fork)  # (each call extends that state's cache by one scale)
    assert torch.allclose(forked, next_logits(fresh), atol=1e-6)
    assert torch.equal(forked, next_logits(state))  # and the fork left the original's cache as it was


def test_verifiers_score_as_documented(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    labels = torch.tensor([1, 4, 9])
    classifier = ClassifierVerifier("digits-classifier")
    # a linear head on the digits-classifier's 64 pooled features
    head = {"weight": torch.randn(10, 64, generator=torch.Generator().manual_seed(1)), "bias": torch.zeros(10)}
    save_file(head, tmp_path / "head.safetensors")
    linear = LinearHeadVerifier("digits-classifier", str(tmp_path / "head.safetensors"))
    from diffusers_var.evaluation import load_image_model

    features = load_image_model("digits-classifier").features(images)
    expected = (features @ head["weight"].T).log_softmax(-1).gather(1, labels[:, None])[:, 0]
    assert torch.allclose(linear(images, labels), expected, atol=1e-5)
    # self-consistency: deterministic, 1 for an image against itself
    consistency = SelfConsistencyVerifier("digits-classifier", preview_scale=2)
    previews = images[::-1].copy()
    first, second = consistency(images, labels, previews=previews), consistency(images, labels, previews=previews)
    assert torch.equal(first, second)
    assert torch.allclose(consistency(images, labels, previews=images), torch.ones(3), atol=1e-5)
    # a weighted sum
    weighted = WeightedVerifier([(classifier, 1.0), (consistency, 0.5)])
    total = classifier(images, labels) + 0.5 * consistency(images, labels, previews=previews)
    assert torch.allclose(weighted(images, labels, previews=previews), total, atol=1e-6)
    assert weighted.preview_scale == 2


def test_self_consistency_searches_with_previews(search_pipe):
    verifier = SelfConsistencyVerifier("digits-classifier", preview_scale=1)
    for algorithm in ("random", "paths"):
        out = search_pipe([1, 2], verifier=verifier, algorithm=algorithm, budget=3, output_type="np")
        assert bool((out.scores >= out.first_scores).all()) and bool((out.scores <= 1 + 1e-5).all())


def test_bad_inputs_name_the_value_and_what_is_allowed(search_pipe, tmp_path):
    cases = [
        (dict(algorithm="beam"), "algorithm must be one of ('random', 'zero-order', 'paths')"),
        (dict(budget=0.5), "a finite number ≥ 1, got 0.5"),
        (dict(budget=True), "got True"),
        (dict(algorithm="paths", branch_scales=(5,)), "branch_scales must be scale indices in [0, 1]"),
        (dict(algorithm="paths", beam_width=3, branch_factor=3, budget=2), "costs"),
        (dict(algorithm="zero-order", budget=2, neighbours=3), "allows no round of 3 neighbours"),
        (dict(algorithm="zero-order", redraw_fraction=0), "redraw_fraction must be in (0, 1]"),
        (dict(algorithm="random", beam_width=2), "beam_width are not options of algorithm='random'"),
        (dict(verifier=None), "verifier is required"),
        (dict(output_type="latent"), "output_type must be 'pil', 'np' or 'pt'"),
    ]
    for kwargs, message in cases:
        kwargs = {"verifier": VERIFIER, **kwargs}
        with pytest.raises(ValueError) as error:
            search_pipe([1], **kwargs)
        assert message in str(error.value), (message, str(error.value))
    with pytest.raises(ValueError, match="needs a name for every class"):
        CLIPVerifier("digits-classifier", class_names=None)
    with pytest.raises(ValueError, match="weight"):
        save_file({"w": torch.zeros(2, 2)}, tmp_path / "bad.safetensors")
        LinearHeadVerifier("digits-classifier", str(tmp_path / "bad.safetensors"))


def test_search_sampler_counts_candidates_and_calls(pipe):
    sampler = SearchSampler(pipe, VERIFIER, "random", budget=3)
    out = sampler([1, 2], [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)])
    assert out.candidates == 6 and out.verifier_calls == 6 and out.total_budget_used == 6.0


def test_the_search_command_writes_images_and_a_report(tmp_path, capsys):
    import json

    from diffusers_var.cli import main as cli_main

    base = ["search", "--verifier", "digits-classifier", "--class-labels", "3", "7", "--num-per-class", "2"]
    base += ["--guidance-scale", "1.0", "--top-k", "0", "--top-p", "1.0", "--seed", "5"]
    cli_main([*base, "--algorithm", "random", "--budget", "3", "--output-dir", str(tmp_path / "found")])
    report = json.loads((tmp_path / "found" / "search_report.json").read_text())
    assert sorted(p.name for p in (tmp_path / "found").glob("*.png")) == ["3_0.png", "3_1.png", "7_0.png", "7_1.png"]
    assert report["images"] == 4 and report["budget_used_total"] == 12 and report["verifier_calls"] == 12
    assert all(r["score"] >= r["first_score"] for r in report["per_image"])
    # budget 1 writes generate's images: the same seeds per (class, index)
    cli_main([*base, "--budget", "1", "--output-dir", str(tmp_path / "one")])
    cli_main(["generate", *base[3:8], *base[8:], "--output-dir", str(tmp_path / "plain")])
    for name in ("3_0.png", "7_1.png"):
        one = np.asarray(PIL.Image.open(tmp_path / "one" / name))
        assert np.array_equal(one, np.asarray(PIL.Image.open(tmp_path / "plain" / name))), name
    # one-line errors
    (tmp_path / "mine.json").write_text("{}")
    for extra, message in [
        (["--algorithm", "random", "--beam-width", "2"], "--beam-width do not apply to --algorithm random"),
        (["--budget", "0.5"], "a finite number ≥ 1, got 0.5"),
        (["--report", str(tmp_path / "mine.json")], "is not a search report"),
    ]:
        with pytest.raises(SystemExit):
            cli_main([*base, *extra, "--output-dir", str(tmp_path / "x")])
        error = capsys.readouterr().err.strip().splitlines()
        assert message in error[-1] and error[-1].startswith("error:"), error


@pytest.mark.parametrize("algorithm", ["random", "paths"])
def test_soft_selection_draws_among_candidates_and_tends_to_the_best(search_pipe, algorithm):
    def run(temperature):
        return search_pipe(
            list(range(10)), verifier=VERIFIER, algorithm=algorithm, budget=8, output_type="np",
            generator=torch.Generator().manual_seed(4), selection_temperature=temperature,
        )  # fmt: skip

    best, cold, hot = run(None), run(1e-6), run(1e3)
    assert np.array_equal(cold.images, best.images)  # a temperature near 0 is the argmax
    assert np.array_equal(run(1e3).images, hot.images)  # deterministic for a generator
    assert float(hot.scores.mean()) < float(best.scores.mean())  # hot: close to a uniform pick
    with pytest.raises(ValueError, match="selection_temperature must be a number > 0"):
        run(0)


def test_the_search_example_runs_in_smoke_form(tmp_path):
    """examples/search/digits_search.py with 1 image per class and budgets 1 and 4: the table and the plot."""
    import importlib.util
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "search" / "digits_search.py"
    spec = importlib.util.spec_from_file_location("digits_search", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = module.main(["--output_dir", str(tmp_path), "--num_per_class", "1", "--budgets", "1", "4"])
    assert (tmp_path / "search.png").is_file()
    assert json.loads((tmp_path / "search.json").read_text()) == report
    algorithms = [(r["algorithm"], r["budget"]) for r in report["results"]]
    assert algorithms == [("random", 1), ("random", 4), ("zero-order", 4), ("paths", 1), ("paths", 4)]
    assert all(r["budget_used_per_image"] <= r["budget"] for r in report["results"])


def tiny_clip(folder) -> str:
    """A random CLIPModel with a character-level CLIP tokenizer and its processor, saved as a folder."""
    import json

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    chars = [chr(c) for c in range(33, 127)]
    vocab = {token: i for i, token in enumerate(chars + [c + "</w>" for c in chars])}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    end = vocab["<|endoftext|>"]
    text = dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=32, eos_token_id=end, pad_token_id=end,
                bos_token_id=vocab["<|startoftext|>"])  # fmt: skip
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)  # fmt: skip
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))
    size = {"shortest_edge": 32}
    processor = CLIPProcessor(CLIPImageProcessor(size=size, crop_size={"height": 32, "width": 32}), tokenizer)
    model.save_pretrained(folder / "clip")
    processor.save_pretrained(folder / "clip")
    return str(folder / "clip")


def test_clip_verifier_is_clip_zero_shot_over_the_class_names(tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    folder = tiny_clip(tmp_path / "tiny-clip")
    names = {i: f"digit {i}, number {i}" for i in range(10)}
    verifier = CLIPVerifier(folder, names)
    assert verifier.prompts[3] == "a photo of a digit 3"  # the first synonym
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    model, processor = CLIPModel.from_pretrained(folder), CLIPProcessor.from_pretrained(folder)
    inputs = processor(text=verifier.prompts, images=list(images), return_tensors="pt", padding=True)
    expected = model(**inputs).logits_per_image.log_softmax(-1)[[0, 1], [3, 8]]
    assert torch.allclose(verifier(images, torch.tensor([3, 8])), expected, atol=1e-5)
    with pytest.raises(ValueError, match="has names for 10 classes; the generator has 12"):
        verifier.check_classes(12)


def test_one_generator_splits_into_independent_images_and_candidates():
    from diffusers_var.search.algorithms import IMAGES, child_generators

    images = child_generators(torch.Generator().manual_seed(0), 4, IMAGES)
    seeds = [g.initial_seed() for g in images[1:]]
    for image in images:  # no image's candidates reuse another image's plain-sample seed
        candidates = [g.initial_seed() for g in child_generators(image, 4)[1:]]
        assert not set(candidates) & set(seeds)


def test_no_generator_follows_torch_manual_seed_without_reseeding_it(search_pipe):
    torch.manual_seed(0)
    first = search_pipe([1, 2], verifier=VERIFIER, budget=2, output_type="np").images
    after_first = torch.rand(1)
    torch.manual_seed(0)
    second = search_pipe([1, 2], verifier=VERIFIER, budget=2, output_type="np").images
    assert np.array_equal(first, second) and torch.equal(torch.rand(1), after_first)


def test_more_bad_inputs_are_named(search_pipe, tmp_path):
    from diffusers_var.cli import main as cli_main

    with pytest.raises(ValueError, match="class ids"):
        SearchSampler(search_pipe, VERIFIER, "random", 2)([2.7], [torch.Generator()])
    with pytest.raises(ValueError, match="finite number ≥ 1, got inf"):
        SearchSampler(search_pipe, VERIFIER, "random", float("inf"))
    with pytest.raises(ValueError, match=r"preview at scale 2; it must be a scale before the last, in \[0, 1\]"):
        SearchSampler(search_pipe, SelfConsistencyVerifier("digits-classifier", preview_scale=2), "random", 2)
    with pytest.raises(ValueError, match="3 generators for num_images_per_prompt=1"):
        search_pipe(verifier=VERIFIER, generator=[torch.Generator() for _ in range(3)])
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(SystemExit):
        cli_main(["search", "--verifier", "digits-classifier", "--report", str(tmp_path / "folder.json")])


def test_soft_selection_works_with_generators_on_the_sampling_device(search_pipe):
    from diffusers_var.search.algorithms import choose, selection_generator

    selector = selection_generator(torch.Generator().manual_seed(0))
    assert selector.device.type == "cpu"  # draws on the CPU, where the scores are, whatever the sampling device
    chosen = choose(torch.tensor([[0.0, 5.0, 0.0]]), 1e-3, [selector])
    assert chosen.tolist() == [1]


def test_the_search_pipeline_loads_bundled_names_and_round_trips(tmp_path):
    pipe = VARSearchPipeline.from_pretrained("var-digits")
    assert isinstance(pipe, VARSearchPipeline) and pipe.get_label_ids("5") == [5]
    pipe.save_pretrained(tmp_path / "saved")
    loaded = VARSearchPipeline.from_pretrained(tmp_path / "saved")
    loaded.set_progress_bar_config(disable=True)
    out = loaded([5], verifier=ClassifierVerifier("digits-classifier"), budget=2, output_type="np")
    assert out.images.shape == (1, 32, 32, 3) and float(out.budget_used[0]) == 2.0

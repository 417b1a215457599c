"""``diffusers-var generate --datastore``: retrieval-augmented sampling from the command line.

The datastore here is a stand-in with :class:`~diffusers_var.retrieval.RetrievalDatastore`'s sampling API (label
names, counts, the tokenizer check, example draws, token maps), patched in where generate loads one, so the tests
need neither FAISS nor a feature model; the last test runs the command on a real datastore.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import tiny_pipeline

from diffusers_var import generate as generate_module
from diffusers_var.cli import main as cli_main
from diffusers_var.pipelines.retrieval import VARRetrievalPipeline

DIGITS_PATCH_NUMS, DIGITS_VOCAB = (1, 2, 3, 4, 6, 8), 256  # var-digits' tokenizer
STORE_LABELS = {"3": 6, "7": 6, "zebra crossing": 6}  # "zebra crossing" is no class of var-digits
FILES = [f"{stem}_{i}.png" for stem in ("3", "7", "zebra_crossing") for i in range(2)]


class FakeDatastore:
    """A datastore of ``labels`` (name → number of images) whose token maps are random codes of a tokenizer with
    ``patch_nums`` and ``vocab_size``; ``check_tokenizer`` accepts only such a tokenizer."""

    def __init__(self, labels: dict[str, int], patch_nums=DIGITS_PATCH_NUMS, vocab_size=DIGITS_VOCAB, seed=0):
        self.labels = [name for name, count in labels.items() for _ in range(count)]
        self.label_names = sorted(labels)
        self.tokenizer = (tuple(patch_nums), vocab_size)
        generator = torch.Generator().manual_seed(seed)
        self.maps = [torch.randint(vocab_size, (len(self.labels), p, p), generator=generator) for p in patch_nums]

    def count(self, name: str) -> int:
        return self.labels.count(name)

    def check_tokenizer(self, vqvae) -> None:
        if (tuple(vqvae.config.patch_nums), vqvae.config.vocab_size) != self.tokenizer:
            raise ValueError(
                "fake-store has no cached token maps for this tokenizer; add them with diffusers-var index"
            )

    def examples_of(self, name: str, k: int, generator=None) -> np.ndarray:
        rows = np.array([row for row, label in enumerate(self.labels) if label == name])
        if k > len(rows):
            raise ValueError(f"k={k} is more than the {len(rows)} images of label {name!r}.")
        return rows[torch.randperm(len(rows), generator=generator)[:k].numpy()]

    def neighbourhood(self, name: str, k: int, row=None, generator=None) -> np.ndarray:
        rows = np.array([row for row, label in enumerate(self.labels) if label == name])
        anchor = int(torch.randint(len(rows), (1,), generator=generator))
        others = np.delete(rows, anchor)
        if k > len(others):
            raise ValueError(f"k={k} is more than the {len(others)} images of label {name!r} (1 excluded).")
        return others[:k]

    def token_maps(self, vqvae, rows) -> list[torch.LongTensor]:
        self.check_tokenizer(vqvae)
        index = torch.as_tensor(np.asarray(rows, dtype=np.int64))
        return [m[index] for m in self.maps]


STORES = {
    "fake-store": lambda: FakeDatastore(STORE_LABELS),
    "other-tokenizer": lambda: FakeDatastore(STORE_LABELS, patch_nums=(1, 2, 4), vocab_size=32),
    "unsafe-names": lambda: FakeDatastore({"a b": 4, "a_b": 4}),
    "tiny-store": lambda: FakeDatastore({"digit 3": 3, "digit 5": 3}, patch_nums=(1, 2, 4), vocab_size=32),
}


REAL_LOADER = generate_module._load_datastore


def load_datastore(path):
    """The stand-ins by name; any other path is a real datastore folder."""
    return STORES[path]() if path in STORES else REAL_LOADER(path)


@pytest.fixture(autouse=True)
def fake_datastores(monkeypatch):
    monkeypatch.setattr(generate_module, "_load_datastore", load_datastore)


def run(*args) -> str:
    """The CLI's stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli_main(["generate", "--model", "var-digits", "--seed", "5", "--num-per-class", "2", "--batch-size", "4",
                  *args])  # fmt: skip
    return out.getvalue()


def pixels(path) -> np.ndarray:
    return np.asarray(PIL.Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    """Plain generate's images of classes 3 and 7 (no datastore), in the batches the retrieval runs use."""
    folder = tmp_path_factory.mktemp("plain")
    run("--class-labels", "3", "7", "--output-dir", str(folder))
    return folder


@pytest.fixture(scope="module")
def retrieval_run(tmp_path_factory):
    """Every label of the datastore, with the default λ: (folder, stdout)."""
    folder = tmp_path_factory.mktemp("retrieval")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(generate_module, "_load_datastore", load_datastore)
        out = run("--datastore", "fake-store", "--output-dir", str(folder))
    return folder, out


def test_files_are_named_by_label_and_unseen_labels_are_announced(retrieval_run, plain_dir):
    from diffusers_var.generate import written_by_us

    folder, out = retrieval_run
    assert sorted(p.name for p in folder.iterdir()) == FILES  # the work folder is gone: the run is complete
    assert out.splitlines() == [
        "Labels var-digits never trained on, drawn from the null class and neighbours alone: 'zebra crossing'"
    ]
    assert written_by_us(folder / "zebra_crossing_0.png")
    with PIL.Image.open(folder / "zebra_crossing_1.png") as image:
        assert image.getexif()[0x010E] == "var-digits label='zebra crossing' index=1 seed=5"
    # the default λ moves the images of known labels away from plain sampling's (the same seeds)
    assert any(not np.array_equal(pixels(folder / n), pixels(plain_dir / n)) for n in FILES[:4])


def test_weight_zero_gives_plain_generate_images(plain_dir, tmp_path):
    """λ = 0 is plain sampling token for token, and a label the model knows keeps its class's seeds."""
    run("--datastore", "fake-store", "--class-labels", "3", "7", "--retrieval-weight", "0",
        "--output-dir", str(tmp_path / "out"), "--output-npz", str(tmp_path / "s.npz"))  # fmt: skip
    for name in FILES[:4]:
        assert np.array_equal(pixels(tmp_path / "out" / name), pixels(plain_dir / name)), name
    with np.load(tmp_path / "s.npz") as npz:  # labels the model knows: their class ids
        assert npz["arr_1"].tolist() == [3, 3, 7, 7]
        assert np.array_equal(npz["arr_0"], np.stack([pixels(plain_dir / name) for name in FILES[:4]]))


def test_the_flags_reach_the_pipeline(tmp_path, monkeypatch):
    seen = []
    call = VARRetrievalPipeline.__call__

    def spy(self, *args, **kwargs):
        seen.append(kwargs)
        return call(self, *args, **kwargs)

    monkeypatch.setattr(VARRetrievalPipeline, "__call__", spy)
    run("--datastore", "fake-store", "--class-labels", "zebra crossing", "7", "--num-neighbours", "5",
        "--retrieval-weight", "0.25", "--num-per-class", "1", "--output", str(tmp_path / "g.png"))  # fmt: skip
    assert len(seen) == 1 and seen[0]["class_labels"] == ["zebra crossing", "7"]
    assert isinstance(seen[0]["datastore"], FakeDatastore)
    assert {k: seen[0][k] for k in ("num_neighbours", "retrieval_mode", "retrieval_weight")} == {
        "num_neighbours": 5, "retrieval_mode": "training_free", "retrieval_weight": 0.25,
    }  # fmt: skip
    assert "retrieval_guidance_scale" not in seen[0]


def test_the_grid_has_a_row_per_label_and_a_killed_run_resumes(retrieval_run, tmp_path, monkeypatch):
    """Killed after its first batch, the same command finishes the run without redoing it; the grid's cells are the
    images of the one-go run (same batches)."""
    from diffusers_var.generate import GUTTER, MIN_CELL

    args = ["--datastore", "fake-store", "--output", str(tmp_path / "grid.png")]
    call, calls = VARRetrievalPipeline.__call__, []

    def killed_after_one_batch(self, *a, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(kwargs["class_labels"])
        return call(self, *a, **kwargs)

    monkeypatch.setattr(VARRetrievalPipeline, "__call__", killed_after_one_batch)
    with pytest.raises(SystemExit) as exit_info:
        run(*args)
    assert exit_info.value.code == 130 and not (tmp_path / "grid.png").exists()

    def counting(self, *a, **kwargs):
        calls.append(kwargs["class_labels"])
        return call(self, *a, **kwargs)

    monkeypatch.setattr(VARRetrievalPipeline, "__call__", counting)
    assert run(*args).splitlines()[-1] == str(tmp_path / "grid.png")
    assert calls == [["3", "3", "7", "7"], ["zebra crossing", "zebra crossing"]]  # the first batch once
    grid, cell = pixels(tmp_path / "grid.png"), MIN_CELL
    left, top = grid.shape[1] - 2 * (cell + GUTTER), grid.shape[0] - 3 * (cell + GUTTER)
    assert top == GUTTER  # three rows (labels) and no title band
    for row, stem in enumerate(("3", "7", "zebra_crossing")):
        for index in range(2):
            y, x = top + row * (cell + GUTTER), left + index * (cell + GUTTER)
            expected = pixels(retrieval_run[0] / f"{stem}_{index}.png")
            assert np.array_equal(grid[y : y + cell : cell // 32, x : x + cell : cell // 32], expected), (stem, index)


def test_two_processes_share_the_batches(retrieval_run, tmp_path, monkeypatch):
    """As two processes would (one after the other here): rank 0 does batch 0 and waits for batch 1, rank 1 does
    batch 1, and rank 0 started again finishes; the files are the one-process run's."""
    folder = tmp_path / "out"
    args = ["--datastore", "fake-store", "--output-dir", str(folder)]
    for rank, code in ((0, 1), (1, None), (0, None)):
        monkeypatch.setattr(generate_module, "_process_state", lambda device, r=rank: (r, 2, device, lambda: None))
        if code is None:
            run(*args)
        else:
            with pytest.raises(SystemExit) as exit_info:
                run(*args)
            assert exit_info.value.code == code
    assert sorted(p.name for p in folder.iterdir()) == FILES
    for name in FILES:
        assert (folder / name).read_bytes() == (retrieval_run[0] / name).read_bytes(), name


def test_progressive_ends_with_the_sample(retrieval_run, tmp_path):
    from diffusers_var.generate import GUTTER, MIN_CELL

    run("--datastore", "fake-store", "--progressive", "--output", str(tmp_path / "scales.png"))
    grid, cell = pixels(tmp_path / "scales.png"), MIN_CELL
    last = grid.shape[1] - (cell + GUTTER)
    top = grid.shape[0] - 6 * (cell + GUTTER)
    for row, name in enumerate(FILES):
        y = top + row * (cell + GUTTER)
        sample = grid[y : y + cell : cell // 32, last : last + cell : cell // 32]
        assert np.array_equal(sample, pixels(retrieval_run[0] / name)), name


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--class-labels", "5"], "The datastore has no label(s) ['5']; it has ['3', '7', 'zebra crossing']."),
        (["--class-labels", "3", "3"], "--class-labels names '3' twice"),
        (["--retrieval-weight", "1.5"], "--retrieval-weight must lie in [0, 1], got 1.5."),
        (["--retrieval-weight", "-0.1"], "--retrieval-weight must lie in [0, 1], got -0.1."),
        (["--retrieval-weight", "nan"], "--retrieval-weight must be finite"),
        (
            ["--num-neighbours", "6"],
            "label '3' has only 6 image(s) in fake-store (one is the anchor the neighbours are near); pass "
            "--num-neighbours 5 or less",
        ),
        (["--datastore", "other-tokenizer"], "fake-store has no cached token maps for this tokenizer"),
        (["--retrieval-mode", "trained"], "--retrieval-mode trained needs a model trained with retrieval attention"),
        (["--retrieval-guidance-scale", "2"], "--retrieval-guidance-scale belongs to --retrieval-mode trained or"),
        (["--rejection-classifier", "digits-classifier"], "--datastore and --rejection-classifier do not combine"),
        (["--output-npz", "x.npz"], "the model has none for 'zebra crossing'; write those labels with --output-dir"),
        (["--datastore", "unsafe-names", "--output-dir", "out"], "'a b' and 'a_b' would both write a_b_<index>.png"),
    ],
)
def test_bad_input_is_one_line_before_any_sampling(extra, message, tmp_path, monkeypatch, capsys):
    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before checking the input")

    monkeypatch.setattr(VARRetrievalPipeline, "__call__", no_sampling)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["generate", "--model", "var-digits", "--datastore", "fake-store", *extra])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]  # besides loading progress bars
    assert exit_info.value.code == 2 and len(errors) == 1 and err.strip().endswith(errors[0]), err
    assert message in errors[0], err
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")], "a work folder was left behind"


@pytest.mark.parametrize(
    "extra",
    [["--num-neighbours", "3"], ["--retrieval-weight", "0"], ["--retrieval-mode", "training_free"],
     ["--num-neighbours", "2", "--retrieval-guidance-scale", "1"]],
)  # fmt: skip
def test_retrieval_flags_need_a_datastore(extra, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["generate", "--model", "var-digits", "--output", str(tmp_path / "g.png"), *extra])
    flags = [word for word in extra if word.startswith("--")]
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {', '.join(flags)} configure retrieval; add --datastore DIR."


def test_label_names_become_safe_distinct_file_names():
    from diffusers_var.generate import SampleLabel, check_distinct_files, file_stem

    assert [file_stem(n) for n in ("zebra crossing", "A?B/c", "n01440764", "a.b-c_d", "café")] == [
        "zebra_crossing", "A_B_c", "n01440764", "a.b-c_d", "caf_",
    ]  # fmt: skip

    def labels(*names):
        return [SampleLabel(n, n, file_stem(n), 0, None) for n in names]

    check_distinct_files(labels("a b", "ab", "a-b"))
    for pair in (("a b", "a?b"), ("Cat", "cat")):  # equal once made safe; equal but for case
        with pytest.raises(ValueError, match="would both write"):
            check_distinct_files(labels(*pair))


def test_combined_mode_is_the_default_for_a_model_with_retrieval_attention(tmp_path, monkeypatch, capsys):
    model = tmp_path / "model"
    tiny_pipeline(num_neighbours=2).save_pretrained(model)
    seen = []
    call = VARRetrievalPipeline.__call__

    def spy(self, *args, **kwargs):
        seen.append(kwargs)
        return call(self, *args, **kwargs)

    monkeypatch.setattr(VARRetrievalPipeline, "__call__", spy)
    args = ["generate", "--model", str(model), "--datastore", "tiny-store", "--num-per-class", "1"]
    cli_main([*args, "--retrieval-guidance-scale", "1.5", "--output-dir", str(tmp_path / "out")])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["digit_3_0.png", "digit_5_0.png"]
    keys = ("num_neighbours", "retrieval_mode", "retrieval_guidance_scale", "retrieval_weight")
    assert {k: seen[0][k] for k in keys} == {
        "num_neighbours": 2, "retrieval_mode": "combined", "retrieval_guidance_scale": 1.5, "retrieval_weight": 0.8,
    }  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:  # the attention alone has no λ
        cli_main(
            [*args, "--retrieval-mode", "trained", "--retrieval-weight", "0.5", "--output", str(tmp_path / "g.png")]
        )
    assert exit_info.value.code == 2 and len(seen) == 1  # refused before any sampling
    assert "--retrieval-weight is λ of --retrieval-mode training_free or combined" in capsys.readouterr().err


def test_a_real_datastore(tmp_path, capsys):
    """The same command on a datastore built by diffusers-var index (FAISS, a feature model, cached token maps)."""
    from diffusers_var.retrieval import build_datastore

    rng = np.random.default_rng(0)
    for label, count in (("3", 5), ("zebra crossing", 5)):  # 4 neighbours (the default) and the anchor
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(count):
            PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                tmp_path / "images" / label / f"{i}.png"
            )
    store = tmp_path / "store"
    build_datastore(str(tmp_path / "images"), "digits-classifier", store, tokenizer="var-digits", progress=False)
    out = run("--datastore", str(store), "--output-dir", str(tmp_path / "out"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "3_0.png",
        "3_1.png",
        "zebra_crossing_0.png",
        "zebra_crossing_1.png",
    ]
    assert "'zebra crossing'" in out
    tiny = tmp_path / "tiny"
    tiny_pipeline().save_pretrained(tiny)  # another tokenizer
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["generate", "--model", str(tiny), "--datastore", str(store), "--output", str(tmp_path / "g.png")])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and "has no cached token maps for this tokenizer" in error, error

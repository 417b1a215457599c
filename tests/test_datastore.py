"""The retrieval datastore (`diffusers-var index`): building, resuming, loading, exact search with exclusions,
examples of a label, the token-map cache, and the errors."""

from __future__ import annotations

import json
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import tiny_vqvae

from diffusers_var.cli import main as cli_main
from diffusers_var.evaluation.image_models import load_image_model
from diffusers_var.hub import load_vqvae
from diffusers_var.pretrained import bundled_model_path
from diffusers_var.retrieval import RetrievalDatastore, build_datastore, image_hash, tokenizer_fingerprint
from diffusers_var.retrieval import datastore as datastore_module
from diffusers_var.training.data import preprocess_image

LABELS = ("3", "cat", "dog")
PER_LABEL = 12
COLOURS = {"3": (200, 40, 40), "cat": (40, 200, 40), "dog": (40, 40, 200)}


def write_image_folder(root: Path, seed: int = 0, per_label: int = PER_LABEL, size: int = 32) -> Path:
    """One sub-folder per label of noisy images around a label colour (distinct embeddings, no ties)."""
    rng = np.random.default_rng(seed)
    for label in LABELS:
        (root / label).mkdir(parents=True)
        for i in range(per_label):
            pixels = np.clip(np.array(COLOURS[label]) + rng.normal(0, 50, (size, size, 3)), 0, 255).astype(np.uint8)
            PIL.Image.fromarray(pixels).save(root / label / f"{i:02d}.png")
    return root


def folder_images(root: Path) -> list[tuple[str, str, PIL.Image.Image]]:
    """(source, label, image) in the datastore's row order: sorted labels, sorted files."""
    return [
        (f"{label}/{path.name}", label, PIL.Image.open(path).convert("RGB"))
        for label in sorted(LABELS)
        for path in sorted((root / label).glob("*.png"))
    ]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("datastore")
    images = write_image_folder(root / "images")
    store = build_datastore(str(images), "digits-classifier", root / "store", progress=False)
    return images, store


# -- building and loading ----------------------------------------------------------------------------------------


def test_build_and_load_round_trip(built):
    images, built_store = built
    store = RetrievalDatastore.load(built_store.path)
    expected = folder_images(images)
    assert len(store) == len(expected) == 3 * PER_LABEL
    assert store.label_names == sorted(LABELS) and all(store.count(label) == PER_LABEL for label in LABELS)
    assert store.labels == [label for _, label, _ in expected]
    assert store.dataset["source"][:] == [source for source, _, _ in expected]
    assert store.dataset["image_hash"][:] == [image_hash(image) for _, _, image in expected]
    np.testing.assert_array_equal(store.rows_of_label("cat"), np.arange(PER_LABEL, 2 * PER_LABEL))
    assert store.rows_of_label("cat").dtype == np.int64
    # the stored image is the file's own encoding, decoding to the same pixels
    assert np.array_equal(np.asarray(store.dataset[5]["image"].convert("RGB")), np.asarray(expected[5][2]))

    # the embeddings are the feature model's features, L2-normalised, as computed outside
    model = load_image_model("digits-classifier")
    features = model.features(np.stack([np.asarray(image) for _, _, image in expected])).double().numpy()
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    embeddings = np.asarray(store.dataset.with_format("numpy")["embedding"][:])
    assert embeddings.dtype == np.float32 and embeddings.shape == (len(store), store.embedding_dim)
    np.testing.assert_allclose(embeddings, features, atol=1e-5)
    np.testing.assert_allclose(store.embed([image for _, _, image in expected[:4]]), embeddings[:4], atol=1e-5)

    metadata = json.loads((store.path / "datastore.json").read_text())
    assert metadata["written_by"] == "diffusers-var index" and metadata["num_images"] == len(store)
    assert metadata["labels"] == {label: PER_LABEL for label in sorted(LABELS)}
    assert metadata["feature_model"]["spec"] == "digits-classifier" and metadata["embedding_dim"] == 64
    assert len(metadata["feature_model"]["weights_sha256"]) == 64 and metadata["tokenizers"] == {}
    assert not (store.path.parent / "store.partial").exists()
    copy = pickle.loads(pickle.dumps(store))  # as a DataLoader worker started by spawn gets it
    assert copy.labels == store.labels and np.array_equal(
        copy.nearest(embeddings[:2], 3)[0], store.nearest(embeddings[:2], 3)[0]
    )
    assert not [p for p in store.path.parent.iterdir() if p.name.startswith(".")]  # no staging left


def test_image_hash_is_the_pixels_and_size_not_the_file():
    pixels = np.random.default_rng(0).integers(0, 256, (2, 3, 3), dtype=np.uint8)
    image = PIL.Image.fromarray(pixels)
    assert image_hash(image) == image_hash(pixels) == image_hash(image.convert("RGBA"))
    assert image_hash(image) != image_hash(PIL.Image.fromarray(pixels.reshape(3, 2, 3)))  # same bytes, other size
    assert len(image_hash(image)) == 64


def test_exif_orientation_is_applied_as_datasets_applies_it(tmp_path):
    """A photo with an EXIF rotation: the datastore hashes, embeds and tokenizes the rotated pixels, the ones a
    training sample (decoded by datasets) has, so that the sample is excluded from its own neighbours."""
    from datasets import Image

    pixels = np.random.default_rng(3).integers(0, 256, (32, 24, 3), dtype=np.uint8)
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    for label in ("a", "b"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(2):
            PIL.Image.fromarray(np.roll(pixels, i + 3 * (label == "b"), axis=0)).save(
                tmp_path / "images" / label / f"{i}.jpg", exif=exif, quality=95
            )
    store = build_datastore(str(tmp_path / "images"), "digits-classifier", tmp_path / "store", progress=False)
    path = tmp_path / "images" / "a" / "0.jpg"
    as_training_sees_it = Image().decode_example({"path": str(path), "bytes": None})
    assert as_training_sees_it.size == (32, 24)  # rotated by datasets
    assert store.dataset[0]["image_hash"] == image_hash(as_training_sees_it)


# -- search ----------------------------------------------------------------------------------------------------------


def test_exact_search_agrees_with_brute_force(built):
    _, store = built
    embeddings = np.asarray(store.dataset.with_format("numpy")["embedding"][:])
    queries = np.random.default_rng(1).normal(size=(5, store.embedding_dim)).astype(np.float32)
    queries = np.concatenate([queries / np.linalg.norm(queries, axis=1, keepdims=True), embeddings[[3, 20]]])
    rows, scores = store.nearest(queries, k=7)
    assert rows.shape == scores.shape == (7, 7) and rows.dtype == np.int64 and scores.dtype == np.float32
    brute = queries @ embeddings.T
    np.testing.assert_array_equal(rows, np.argsort(-brute, axis=1, kind="stable")[:, :7])
    np.testing.assert_allclose(scores, np.take_along_axis(brute, rows, axis=1), atol=1e-5)
    # torch queries and one vector work the same
    torch_rows, _ = store.nearest(torch.from_numpy(queries), k=7)
    np.testing.assert_array_equal(torch_rows, rows)
    np.testing.assert_array_equal(store.nearest(queries[0], k=7)[0], rows[:1])


def test_excluded_hashes_keep_an_image_out_of_its_own_neighbours(built):
    images, store = built
    source, _, image = folder_images(images)[14]
    rows, scores = store.nearest([image], k=3)
    assert rows[0, 0] == 14 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    kept, kept_scores = store.nearest([image, image], k=3, exclude_hashes=[{image_hash(image)}, set()])
    assert 14 not in kept[0] and list(kept[0]) == list(rows[0, 1:]) + [kept[0, 2]] and kept[1, 0] == 14
    assert kept_scores[0, 0] == pytest.approx(scores[0, 1])
    # a hash twice in the store (a duplicate image) leaves out every copy
    store._hash_rows()[image_hash(image)].append(20)
    try:
        assert not {14, 20} & set(store.nearest([image], k=5, exclude_hashes=[{image_hash(image)}])[0][0])
    finally:
        store._hash_rows()[image_hash(image)].remove(20)
    with pytest.raises(ValueError, match="exclude_hashes has 1 sets for 2 queries"):
        store.nearest([image, image], k=3, exclude_hashes=[{image_hash(image)}])


def test_examples_of_a_label_are_reproducible_distinct_and_can_follow_a_query(built):
    images, store = built
    draw = [store.examples_of("dog", 5, generator=torch.Generator().manual_seed(seed)) for seed in (0, 0, 1)]
    np.testing.assert_array_equal(draw[0], draw[1])
    assert not np.array_equal(draw[0], draw[2])
    expected = store.rows_of_label("dog")[torch.randperm(PER_LABEL, generator=torch.Generator().manual_seed(0))[:5]]
    np.testing.assert_array_equal(draw[0], expected)
    assert len(set(draw[0])) == 5 and set(draw[0]) <= set(store.rows_of_label("dog"))
    assert sorted(store.examples_of("dog", PER_LABEL)) == list(store.rows_of_label("dog"))

    # nearest to a query: the label's rows ranked by inner product, best first; an image works as the query
    embeddings = np.asarray(store.dataset.with_format("numpy")["embedding"][:])
    query = embeddings[2]  # a "3", asked for its nearest "dog"s
    dogs = store.rows_of_label("dog")
    np.testing.assert_array_equal(
        store.examples_of("dog", 4, query=query), dogs[np.argsort(-(embeddings[dogs] @ query))[:4]]
    )
    _, _, dog = folder_images(images)[30]
    assert store.examples_of("dog", 1, query=dog)[0] == 30
    left_out = store.examples_of("dog", 3, query=dog, exclude_hashes={image_hash(dog)})
    assert 30 not in left_out and len(left_out) == 3
    with pytest.raises(ValueError, match=r"k=12 is more than the 11 images of label 'dog' \(1 excluded\)"):
        store.examples_of("dog", PER_LABEL, exclude_hashes={image_hash(dog)})


def test_bad_queries_and_labels_are_named(built):
    _, store = built
    with pytest.raises(ValueError, match=r"Unknown label 'horse': this datastore's labels are '3', 'cat', 'dog'"):
        store.examples_of("horse", 2)
    with pytest.raises(ValueError, match="Unknown label 'horse'"):
        store.count("horse")
    with pytest.raises(ValueError, match="k=13 is more than the 12 images of label 'cat'; ask for at most 12"):
        store.examples_of("cat", 13)
    with pytest.raises(ValueError, match="k must be an integer ≥ 1, got 0"):
        store.nearest(np.zeros((1, 64), np.float32), k=0)
    with pytest.raises(ValueError, match="k=37 is more than the 36 images"):
        store.nearest(np.zeros((1, 64), np.float32), k=37)
    with pytest.raises(ValueError, match=r"shape \(2, 10\) do not fit this datastore's 64-d embeddings"):
        store.nearest(np.zeros((2, 10), np.float32), k=1)


# -- resuming --------------------------------------------------------------------------------------------------------


def test_an_interrupted_build_resumes_from_its_finished_chunks(tmp_path, monkeypatch):
    images = write_image_folder(tmp_path / "images")
    monkeypatch.setattr(datastore_module, "CHUNK_SIZE", 8)  # 36 images: chunks of 8, 8, 8, 8, 4
    embed_chunk = datastore_module._embed_chunk
    calls = []

    def interrupted(model, pixels, batch_size):
        calls.append(len(pixels))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return embed_chunk(model, pixels, batch_size)

    monkeypatch.setattr(datastore_module, "_embed_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_datastore(str(images), "digits-classifier", tmp_path / "store", progress=False)
    partial = tmp_path / "store.partial"
    assert not (tmp_path / "store").exists() and sorted(p.name for p in partial.glob("chunk-*")) == ["chunk-00000"]

    # other arguments do not resume it (and leave it alone)
    other = shutil.copytree(bundled_model_path("digits-classifier"), tmp_path / "other-classifier")
    with pytest.raises(
        ValueError, match=r"store.partial holds an interrupted build with other arguments .*feature_model"
    ):
        build_datastore(str(images), str(other), tmp_path / "store", progress=False)
    assert (partial / "chunk-00000").is_dir()

    def counted(model, pixels, batch_size):
        calls.append(len(pixels))
        return embed_chunk(model, pixels, batch_size)

    calls.clear()
    monkeypatch.setattr(datastore_module, "_embed_chunk", counted)
    resumed = build_datastore(str(images), "digits-classifier", tmp_path / "store", progress=False)
    assert calls == [8, 8, 8, 4]  # the first chunk was not embedded again
    assert not partial.exists()
    straight = build_datastore(str(images), "digits-classifier", tmp_path / "straight", progress=False)
    for column in ("label", "image_hash", "source"):
        assert resumed.dataset[column][:] == straight.dataset[column][:]
    a, b = (np.asarray(s.dataset.with_format("numpy")["embedding"][:]) for s in (resumed, straight))
    np.testing.assert_array_equal(a, b)
    assert resumed.metadata["embeddings_sha256"] == straight.metadata["embeddings_sha256"]


def test_a_finished_datastore_is_not_rebuilt_and_other_arguments_are_refused(built, monkeypatch):
    images, store = built
    monkeypatch.setattr(datastore_module, "_embed_chunk", lambda *a: pytest.fail("embedded again"))
    again = build_datastore(str(images), "digits-classifier", store.path, progress=False)
    assert len(again) == len(store)
    with pytest.raises(ValueError, match=r"already holds a datastore of --images .*images --features digits-class"):
        build_datastore(str(images.parent), "digits-classifier", store.path, progress=False)


# -- token maps ------------------------------------------------------------------------------------------------------


def test_token_cache_equals_tokenize_and_is_added_without_embedding_again(built, tmp_path, monkeypatch):
    images, built_store = built
    path = tmp_path / "store"
    shutil.copytree(built_store.path, path)
    store = RetrievalDatastore.load(path)
    vqvae = tiny_vqvae()  # 8 px: the 32 px images are resized, as training does
    with pytest.raises(
        ValueError, match=r"has no cached token maps for this tokenizer .*it has: none.*--tokenizer <model>"
    ):
        store.token_maps(vqvae)
    store.add_tokenizer(vqvae, batch_size=10, progress=False)
    pixels = torch.stack(
        [preprocess_image(image, vqvae.image_size, center_crop=True) for _, _, image in folder_images(images)]
    )
    with torch.no_grad():
        expected = vqvae.tokenize(pixels)
    maps = RetrievalDatastore.load(path).token_maps(vqvae)
    assert [m.dtype for m in maps] == [torch.long] * 3 and all(torch.equal(m, e) for m, e in zip(maps, expected))
    rows = np.array([30, 2, 2])
    assert all(torch.equal(m, e[rows]) for m, e in zip(store.token_maps(vqvae, rows), expected))
    assert all(torch.equal(m, e[rows]) for m, e in zip(store.token_maps(vqvae, torch.from_numpy(rows)), expected))
    fingerprint = tokenizer_fingerprint(vqvae)
    assert (path / "tokens" / f"{fingerprint}.safetensors").is_file() and len(fingerprint) == 16

    # the fingerprint is the config and weights: a reloaded copy matches (in any dtype: generate --dtype bf16 loads
    # the same tokenizer in bf16), another tokenizer does not
    vqvae.save_pretrained(tmp_path / "vqvae")
    store.check_tokenizer(load_vqvae(tmp_path / "vqvae"))
    store.check_tokenizer(load_vqvae(tmp_path / "vqvae").to(torch.bfloat16))
    other = tiny_vqvae(seed=1)
    with pytest.raises(ValueError, match=rf"it has: {fingerprint} \(MultiScaleVQVAE, patch_nums \[1, 2, 4\]\)"):
        store.check_tokenizer(other)

    # the index command on the finished datastore only adds the new tokenizer's maps
    monkeypatch.setattr(datastore_module, "_embed_chunk", lambda *a: pytest.fail("embedded again"))
    again = build_datastore(str(images), "digits-classifier", path, tokenizer=other, progress=False)
    again.check_tokenizer(other)
    assert set(RetrievalDatastore.load(path).tokenizers) == {fingerprint, tokenizer_fingerprint(other)}


# -- damaged or foreign files ----------------------------------------------------------------------------------------


def test_an_index_that_is_not_the_datasets_is_refused(built, tmp_path):
    import faiss

    _, store = built
    for count, message in (
        (len(store), "does not hold this dataset's embeddings"),
        (5, "has 5 elements while the dataset has 36"),
    ):
        copy = shutil.copytree(store.path, tmp_path / f"copy{count}")
        index = faiss.IndexFlatIP(store.embedding_dim)
        index.add(np.random.default_rng(0).normal(size=(count, store.embedding_dim)).astype(np.float32))
        faiss.write_index(index, str(copy / "embedding.faiss"))
        with pytest.raises(ValueError, match=rf"{message}.*Rebuild it with diffusers-var index"):
            RetrievalDatastore.load(copy)


def test_a_feature_model_with_other_weights_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    images = write_image_folder(tmp_path / "images", per_label=2)
    classifier = shutil.copytree(bundled_model_path("digits-classifier"), tmp_path / "classifier")
    store = build_datastore(str(images), str(classifier), tmp_path / "store", progress=False)
    weights = load_file(classifier / "model.safetensors")
    save_file({k: v + 1 if v.is_floating_point() else v for k, v in weights.items()}, classifier / "model.safetensors")
    image = PIL.Image.open(images / "cat" / "00.png")
    with pytest.raises(ValueError, match="now has weights .* but .* was built with weights .*rebuild the datastore"):
        RetrievalDatastore.load(store.path).embed([image])


def test_bad_inputs_name_the_value(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "flat").mkdir()
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    images = write_image_folder(tmp_path / "images", per_label=1)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    (tmp_path / "o5.partial").mkdir()
    broken = write_image_folder(tmp_path / "broken", per_label=1)
    (broken / "cat" / "zz.png").write_text("not a png")
    cases = [
        (str(tmp_path / "missing"), tmp_path / "o1", rf"--images {tmp_path / 'missing'} does not exist"),
        (str(tmp_path / "empty"), tmp_path / "o2", "holds no images .* in class sub-folders"),
        (str(tmp_path / "flat"), tmp_path / "o3", "holds no images .* in class sub-folders"),
        (str(images), foreign, rf"--output {foreign} already holds files that are not a datastore"),
        (str(images), tmp_path / "o5", r"o5.partial exists and was not made by diffusers-var index; move it away"),
        (str(broken), tmp_path / "o6", "cat/zz.png: cannot read this image .*; remove or replace it"),
        ("no-such-dataset-here", tmp_path / "o7", "'no-such-dataset-here' is neither an existing folder nor a dataset"),
    ]
    for source, output, message in cases:
        with pytest.raises(ValueError, match=message):
            build_datastore(source, "digits-classifier", output, progress=False)
    assert (foreign / "notes.txt").read_text() == "mine" and sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    with pytest.raises(ValueError, match="--batch-size must be an integer ≥ 1, got 0"):
        build_datastore(str(images), "digits-classifier", tmp_path / "o4", batch_size=0)
    with pytest.raises(ValueError, match="not a retrieval datastore"):
        RetrievalDatastore.load(foreign)


def test_without_faiss_the_error_says_what_to_install(built, monkeypatch):
    images, store = built
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss then raises ImportError
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        RetrievalDatastore.load(store.path)
    with pytest.raises(ImportError, match="pip install 'diffusers-var\\[retrieval\\]'"):
        build_datastore(str(images), "digits-classifier", store.path.parent / "new", progress=False)


# -- datasets as input ---------------------------------------------------------------------------------------------


def test_a_saved_dataset_with_class_labels_is_indexed_by_label_name(tmp_path):
    from datasets import ClassLabel, Dataset, DatasetDict, Features
    from datasets import Image as ImageFeature

    rng = np.random.default_rng(0)
    pictures = [PIL.Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(6)]
    features = Features({"img": ImageFeature(), "digit": ClassLabel(names=["zero", "one"])})
    dataset = Dataset.from_dict({"img": pictures, "digit": [0, 1, 1, 0, 1, 1]}, features=features)
    DatasetDict({"train": dataset, "test": dataset.select([0])}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "store").mkdir()  # an empty folder is a fine place for a datastore
    with pytest.raises(ValueError, match=r"has no column 'image' \(its columns: \['img', 'digit'\]\).*--image-column"):
        build_datastore(str(tmp_path / "saved"), "digits-classifier", tmp_path / "store", label_column="digit")
    store = build_datastore(
        str(tmp_path / "saved"), "digits-classifier", tmp_path / "store", image_column="img", label_column="digit",
        progress=False,
    )  # fmt: skip
    assert store.labels == ["zero", "one", "one", "zero", "one", "one"] and store.count("one") == 4
    assert store.dataset["source"][:] == [f"train/{i}" for i in range(6)]
    assert store.dataset["image_hash"][:] == [image_hash(p) for p in pictures]


# -- the command -----------------------------------------------------------------------------------------------------


def test_the_index_command_builds_with_a_bundled_tokenizer_and_errors_are_one_line(tmp_path, capsys):
    images = write_image_folder(tmp_path / "images", per_label=3)
    args = ["index", "--images", str(images), "--features", "digits-classifier", "--output", str(tmp_path / "store")]
    cli_main([*args, "--tokenizer", "var-digits", "--batch-size", "4"])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == (
        f"{tmp_path / 'store'}: 9 images, 3 labels, 64-d embeddings (digits-classifier), token maps of 1 tokenizer(s)"
    )
    store = RetrievalDatastore.load(tmp_path / "store")
    vqvae = load_vqvae(bundled_model_path("var-digits"))
    assert [tuple(m.shape) for m in store.token_maps(vqvae)] == [(9, pn, pn) for pn in vqvae.config.patch_nums]

    missing = str(tmp_path / "nowhere")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["index", "--images", missing, "--features", "digits-classifier", "--output", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: --images {missing} does not")

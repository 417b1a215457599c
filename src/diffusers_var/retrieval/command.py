"""``diffusers-var index``: build a retrieval datastore of real images: their embeddings, an exact FAISS index and,
with ``--tokenizer``, their cached token maps.

Usage::

    diffusers-var index --images digits/train --features digits-classifier --output digits-store
    diffusers-var index --images digits/train --features digits-classifier --output digits-store --tokenizer var-digits
    diffusers-var index --images imagenet-train/ --features facebook/dinov2-base --output in1k-store --batch-size 256

``--images``: an image folder with one sub-folder per class (the label is the sub-folder's name), a datasets
``save_to_disk`` folder (its train split), or a dataset name in the local cache. ``--features``: the feature model
(a transformers image model folder, repo id or bundled name, or ``inception=PATH``), as for ``diffusers-var
evaluate``. ``--tokenizer``: a VARPipeline (folder or bundled name) or MultiScaleVQVAE whose token maps of every
image are cached for retrieval-augmented training.

An interrupted build resumes from its last finished chunk of images when the same command runs again (they wait in
``OUTPUT.partial``); the datastore appears in one step once complete. Rerunning the command on a finished datastore
with a new ``--tokenizer`` only adds that tokenizer's token maps.
"""

from __future__ import annotations

import argparse

from .datastore import RetrievalDatastore, build_datastore


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, help="an image folder of class sub-folders, or a dataset")
    parser.add_argument("--features", required=True, help="the feature model that embeds the images")
    parser.add_argument("--output", required=True, help="the datastore folder")
    parser.add_argument("--tokenizer", default=None, help="a pipeline or tokenizer whose token maps are cached")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    parser.add_argument("--image-column", default="image", help="a dataset's image column (default: image)")
    parser.add_argument("--label-column", default="label", help="a dataset's label column (default: label)")


def run(args: argparse.Namespace) -> RetrievalDatastore:
    """Run the command; returns the datastore."""
    store = build_datastore(
        args.images,
        args.features,
        args.output,
        tokenizer=args.tokenizer,
        batch_size=args.batch_size,
        image_column=args.image_column,
        label_column=args.label_column,
    )
    tokens = f", token maps of {len(store.tokenizers)} tokenizer(s)" if store.tokenizers else ""
    print(
        f"{store.path}: {len(store)} images, {len(store.label_names)} labels, {store.embedding_dim}-d embeddings "
        f"({store.feature_model['spec']}){tokens}"
    )
    return store


def main(argv: list[str] | None = None) -> None:
    """``python -m diffusers_var.retrieval.command ...``: the same as ``diffusers-var index ...``."""
    from ..cli import command_main

    command_main("index", argv)


if __name__ == "__main__":
    main()

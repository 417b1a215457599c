"""Retrieval for VAR (retrieval-augmented generation, after Re-Imagen): a datastore of real images with their
embeddings, an exact nearest-neighbour index and cached token maps (:mod:`.datastore`, built by
``diffusers-var index``)."""

from .datastore import RetrievalDatastore, build_datastore, image_hash, tokenizer_fingerprint

__all__ = ["RetrievalDatastore", "build_datastore", "image_hash", "tokenizer_fingerprint"]

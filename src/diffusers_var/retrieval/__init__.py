"""Retrieval for VAR (retrieval-augmented generation, after Re-Imagen): a datastore of real images with their
embeddings, an exact nearest-neighbour index and cached token maps (:mod:`.datastore`, built by
``diffusers-var index``); training-free mixing of the next-scale distribution with the neighbours' codes
(:mod:`.mixing`); what a sampling call retrieved and how the loop uses it (:mod:`.conditioning`). The pipeline is
:class:`~diffusers_var.VARRetrievalPipeline`."""

from .conditioning import RETRIEVAL_MODES, RetrievalConditioning
from .datastore import RetrievalDatastore, build_datastore, image_hash, tokenizer_fingerprint
from .mixing import RETRIEVAL_SCHEDULES, retrieval_weights, retrieved_token_distribution

__all__ = [
    "RETRIEVAL_MODES",
    "RETRIEVAL_SCHEDULES",
    "RetrievalConditioning",
    "RetrievalDatastore",
    "build_datastore",
    "image_hash",
    "retrieval_weights",
    "retrieved_token_distribution",
    "tokenizer_fingerprint",
]

"""Training with retrieval conditioning (Re-Imagen): each sample's neighbours come from a datastore of real images.

A sample of label ``y`` is conditioned on the ``k`` images of ``y`` in the datastore nearest to it (in the
datastore's embedding), never itself (its pixels' hash is excluded, so a copy under another file name is excluded
too). Near neighbours make copying their codes the way to lower the loss, a mechanism that does not depend on the
class and so carries over to classes the model never saw; sampling draws an anchor image and takes its neighbours
the same way (:meth:`RetrievalDatastore.neighbourhood`). The transformer drops a sample's neighbours with
``neighbour_dropout_prob`` (and its class with ``class_dropout_prob``), so that it learns the plain task and the
class-free, neighbours-only one, which sampling uses for classes it never saw and guidance contrasts against.
"""

from __future__ import annotations

import numpy as np
import torch

from ..models.transformer import VARConfig, VARTransformer
from ..models.vqvae import MultiScaleVQVAE
from .data import ImageClassDataset


class NeighbourDataset(torch.utils.data.Dataset):
    """An :class:`ImageClassDataset` whose items also hold ``neighbour_rows`` (k,): datastore rows of the k real
    images of the item's label nearest to it, itself excluded."""

    def __init__(self, base: ImageClassDataset, datastore, class_names: list[str], num_neighbours: int):
        from ..retrieval.datastore import image_hash

        self.base, self.datastore, self.class_names, self.num_neighbours = base, datastore, class_names, num_neighbours
        self._image_hash = image_hash

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self.base[index]
        row = self.base.dataset[int(index)]
        name = self.class_names[int(item["class_labels"])]
        image = row[self.base.image_column]
        own = self._image_hash(image)
        in_store = self.datastore.rows_of_hash(own)
        if in_store:
            rows = self.datastore.neighbourhood(name, self.num_neighbours, row=in_store[0])
        else:  # not in the datastore: embedded here (slower), then the same nearest-of-its-label search
            query = self.datastore.embed([image])[0]
            rows = self.datastore.examples_of(name, self.num_neighbours, query=query, exclude_hashes={own})
        item["neighbour_rows"] = torch.as_tensor(np.asarray(rows), dtype=torch.long)
        return item


def check_retrieval_training(datastore, vqvae: MultiScaleVQVAE, class_names: list[str] | None, k: int) -> None:
    """Before step one: the datastore has this tokenizer's token pyramids and, for every trained label, at least
    k images besides the sample itself."""
    if not class_names:
        raise ValueError(
            "Retrieval training draws neighbours by label name: the data needs a label column with names (an image "
            "folder's sub-folders, or a ClassLabel column)."
        )
    datastore.check_tokenizer(vqvae)
    missing = [n for n in class_names if n not in datastore.label_names]
    if missing:
        raise ValueError(
            f"The datastore has no images of label(s) {missing[:10]} of the training data; build it from the same "
            f"images (diffusers-var index --images <train data> ...). It has {datastore.label_names[:10]}."
        )
    few = {n: datastore.count(n) for n in class_names if datastore.count(n) < k + 1}
    if few:
        raise ValueError(
            f"--num_neighbours {k} needs at least {k + 1} datastore images per label (k besides the sample itself); "
            f"these have fewer: {few}. Lower --num_neighbours or add images."
        )


@torch.no_grad()
def neighbour_codes(datastore, vqvae: MultiScaleVQVAE, rows: torch.LongTensor) -> torch.Tensor:
    """Datastore rows (B, k) → the code embeddings of their token pyramids, (B, k, L, Cvae)."""
    batch, k = rows.shape
    maps = datastore.token_maps(vqvae, rows.flatten().cpu().numpy())
    device = vqvae.device
    return vqvae.code_embeddings([m.to(device).view(batch, k, *m.shape[1:]) for m in maps])


def add_retrieval_layers(transformer: VARTransformer, num_neighbours: int) -> VARTransformer:
    """A retrieval transformer (``num_neighbours`` > 0) holding ``transformer``'s weights, its new retrieval
    attention freshly initialised with zero gates: it samples exactly like ``transformer`` until trained. For
    fine-tuning a plain (e.g. converted official) model with retrieval."""
    if transformer.config.num_neighbours:
        transformer.config.num_neighbours = num_neighbours
        return transformer
    config = VARConfig.from_dict({**transformer.config.to_dict(), "num_neighbours": num_neighbours})
    model = VARTransformer(config).to(transformer.device, transformer.dtype).train(transformer.training)
    report = model.load_state_dict(transformer.state_dict(), strict=False)
    new = ("neighbour_attn.", "neighbour_proj.", "neighbour_norm.", "neighbour_key_value.")
    if report.unexpected_keys or any(not any(part in key for part in new) for key in report.missing_keys):
        raise ValueError(f"Could not carry the weights over: {report}.")
    return model

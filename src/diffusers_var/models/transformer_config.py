"""VARConfig: the configuration of a :class:`~diffusers_var.VARTransformer` (what its ``config.json`` holds)."""

from __future__ import annotations

from transformers import PretrainedConfig


class VARConfig(PretrainedConfig):
    r"""Configuration of a :class:`VARTransformer`. The defaults are VAR-d16.

    Args:
        num_classes: number of classes; the class embedding has one more row, the null class used for guidance.
        vocab_size: codebook size V of the tokenizer.
        latent_channels: code dimension Cvae of the tokenizer.
        patch_nums: side of each scale's token map, coarse to fine.
        depth, embed_dim, num_heads, mlp_ratio: transformer size.
        norm_eps: LayerNorm epsilon.
        shared_adaln: one AdaLN projection for all blocks plus a learned per-block offset (VAR-d36-s).
        attn_l2_norm: L2-normalise queries and keys and learn a per-head logit scale.
        class_dropout_prob: in training, the chance that a label is replaced by the null class (for guidance).
        dropout, attention_dropout, drop_path_rate: regularisation in training.
        label_smoothing: label smoothing of the training loss.
        initializer_range: std of the truncated-normal init; ``None`` means sqrt(1 / (3·embed_dim)).
        init_adaln, init_adaln_gamma, init_head: scales of the AdaLN, AdaLN gates and head at init.
        num_neighbours: retrieval conditioning (after Re-Imagen): 0 (default) is the plain VAR model; k > 0 adds, in
            every block, attention from each scale's positions to the codes of k retrieved real images at that scale
            (their code embeddings, with the scale and position codes). Its output gates start at zero, so a new
            retrieval model starts as the plain one, and without neighbours it *is* the plain one.
        neighbour_dropout_prob: in training, the chance that a sample's neighbours are all dropped (the model then
            learns the plain task too, which guidance on retrieval contrasts against).

    Example:
        ```py
        >>> from diffusers_var import VARConfig, VARTransformer
        >>> config = VARConfig(num_classes=10, vocab_size=64, latent_channels=8, patch_nums=(1, 2, 4),
        ...                    depth=2, embed_dim=64, num_heads=2)
        >>> model = VARTransformer(config)
        >>> model.num_tokens
        21
        ```
    """

    model_type = "var"
    # the names transformers' tools and tests look for
    attribute_map = {"hidden_size": "embed_dim", "num_attention_heads": "num_heads", "num_hidden_layers": "depth"}

    def __init__(
        self,
        num_classes: int = 1000,
        vocab_size: int = 4096,
        latent_channels: int = 32,
        patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
        depth: int = 16,
        embed_dim: int = 1024,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-6,
        shared_adaln: bool = False,
        attn_l2_norm: bool = True,
        class_dropout_prob: float = 0.1,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        drop_path_rate: float = 0.0,
        label_smoothing: float = 0.0,
        initializer_range: float | None = None,
        init_adaln: float = 0.5,
        init_adaln_gamma: float = 1e-5,
        init_head: float = 0.02,
        num_neighbours: int = 0,
        neighbour_dropout_prob: float = 0.1,
        **kwargs,
    ):
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}.")
        if len(patch_nums) < 2 or list(patch_nums) != sorted(set(patch_nums)):
            raise ValueError(f"patch_nums must be at least two strictly increasing sides, got {tuple(patch_nums)}.")
        if isinstance(num_neighbours, bool) or not isinstance(num_neighbours, int) or num_neighbours < 0:
            raise ValueError(
                f"num_neighbours must be an integer ≥ 0 (0: no retrieval conditioning), got {num_neighbours!r}."
            )
        if not 0 <= neighbour_dropout_prob <= 1:
            raise ValueError(f"neighbour_dropout_prob must lie in [0, 1], got {neighbour_dropout_prob!r}.")
        self.num_classes = num_classes
        self.vocab_size = vocab_size
        self.latent_channels = latent_channels
        self.patch_nums = [int(p) for p in patch_nums]
        self.depth = depth
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.norm_eps = norm_eps
        self.shared_adaln = shared_adaln
        self.attn_l2_norm = attn_l2_norm
        self.class_dropout_prob = class_dropout_prob
        self.dropout = dropout
        self.attention_dropout = attention_dropout
        self.drop_path_rate = drop_path_rate
        self.label_smoothing = label_smoothing
        self.initializer_range = initializer_range
        self.init_adaln = init_adaln
        self.init_adaln_gamma = init_adaln_gamma
        self.init_head = init_head
        self.num_neighbours = num_neighbours
        self.neighbour_dropout_prob = neighbour_dropout_prob
        super().__init__(**kwargs)

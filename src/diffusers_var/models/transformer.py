"""VARTransformer: the class-conditional next-scale prediction transformer of VAR.

Shapes: B batch, L = Σ pn² tokens over all scales, C = ``embed_dim``, V = ``vocab_size``, Cvae = ``latent_channels``.
Position 0 .. first_l − 1 hold the class token(s); every later scale's positions hold the word-embedded f̂ of all
coarser scales, area-pooled to that scale. A position sees every position of its own and coarser scales.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput

from ..remote_code import package_only
from .kv_cache import VARKVCache, VARLayerCache, VARNeighbours
from .loading import load_strictly
from .transformer_config import VARConfig

# exp(logit_scale) is capped at 100, as in the official model; float32 log keeps the clamp bit-identical
_MAX_LOGIT_SCALE = torch.tensor(100.0).log().item()


def scale_level_ids(patch_nums, device: torch.device | None = None) -> torch.LongTensor:
    """Scale index of each of the L positions, (L,). Built on the host and copied once."""
    sizes = torch.tensor([p * p for p in patch_nums])
    return torch.repeat_interleave(torch.arange(len(sizes)), sizes).to(device)


@dataclass
class VARTransformerOutput(ModelOutput):
    """Output of :meth:`VARTransformer.forward`.

    Attributes:
        loss: cross-entropy over all L positions, when ``labels`` are given.
        logits: (B, L, V) next-scale logits; with a ``kv_cache``, (B, pn², V) for the one scale computed.
        cache: the :class:`VARKVCache` a cached call filled (``None`` in teacher forcing). Named as transformers
            5.24 names it (earlier versions say ``past_key_values``; 5.24 renames that keyword to ``cache``).
        hidden_states: the input of the first block and the output of every block, when asked for.
        attentions: each block's attention weights (B, H, queries, keys), when asked for. In teacher forcing the
            keys are all L positions and the block-causal mask zeroes the finer scales; in a cached call they are
            the positions of every scale so far.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: VARKVCache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention written out, returning the weights: (B, L, H, d) output and (B, H, L, keys) weights."""
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = weights.softmax(dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class QKVProjection(nn.Linear):
    """The fused query/key/value projection. Its bias is the attention's (keys have none), passed in, so that the
    weight is only read inside this module's call, where offload and casting hooks place it."""

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(hidden, self.weight, bias)


class VARAttention(nn.Module):
    """Multi-head self-attention; keys carry no bias. With ``attn_l2_norm``, cosine attention with a learned scale.

    ``config._attn_implementation`` picks the kernel (``"sdpa"`` by default, or ``"eager"``); asking for the
    attention weights runs the eager path for that call.
    """

    is_causal = False  # the block-causal mask is passed explicitly

    def __init__(self, config: VARConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.head_dim = config.embed_dim // config.num_heads
        self.l2_norm = config.attn_l2_norm
        self.qkv = QKVProjection(config.embed_dim, 3 * config.embed_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(config.embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(config.embed_dim))
        if self.l2_norm:
            self.logit_scale = nn.Parameter(torch.full((1, self.num_heads, 1, 1), math.log(4.0)))
            self.scale = 1.0
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.out_proj = nn.Linear(config.embed_dim, config.embed_dim)
        self.out_proj.init_role = "residual_out"
        self.attention_dropout = config.attention_dropout
        self.out_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def forward(
        self,
        hidden: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        kv_cache: VARLayerCache | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length, channels = hidden.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = self.qkv(hidden, bias).view(batch, length, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, d)
        if self.l2_norm:
            query = F.normalize(query, dim=-1) * self.logit_scale.clamp_max(_MAX_LOGIT_SCALE).exp()
            key = F.normalize(key, dim=-1)
        if kv_cache is not None:
            key, value = kv_cache.update(key, value)
        implementation = "eager" if output_attentions else self.config._attn_implementation
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        out, weights = attention(
            self,
            query,
            key,
            value,
            attn_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scale,
            is_causal=False,
        )
        out = self.out_dropout(self.out_proj(out.reshape(batch, length, channels)))
        return out, weights if output_attentions else None


class VARMLP(nn.Module):
    def __init__(self, config: VARConfig):
        super().__init__()
        hidden = round(config.embed_dim * config.mlp_ratio)
        self.fc1 = nn.Linear(config.embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, config.embed_dim)
        self.fc2.init_role = "residual_out"
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(F.gelu(self.fc1(hidden), approximate="tanh")))


class VARNeighbourAttention(nn.Module):
    """Attention from the sequence to the retrieved neighbours' token pyramids (a retrieval model's extra step).

    Each scale's positions attend to the k neighbours' codes *of the same scale* (all their positions there): the
    neighbours say what that scale's tokens look like for this label, wherever they sit, at a fraction of the cost of
    attending to every scale (Σ k·pn⁴ instead of k·L² products). Keys and values are the neighbours' encoded codes,
    projected once per call for all blocks (:meth:`VARTransformer.neighbour_keys_values`). The output passes a
    learned per-channel ``gate`` that starts at zero, so a freshly added retrieval step changes nothing until it is
    trained; rows whose neighbours are dropped (``row_mask`` False) get exactly nothing from it.
    """

    def __init__(self, config: VARConfig):
        super().__init__()
        channels = config.embed_dim
        self.num_heads = config.num_heads
        self.head_dim = channels // config.num_heads
        self.norm = nn.LayerNorm(channels, eps=config.norm_eps, elementwise_affine=False)
        self.query = nn.Linear(channels, channels)
        self.out_proj = nn.Linear(channels, channels)
        self.out_proj.init_role = "residual_out"
        self.gate = nn.Parameter(torch.zeros(channels))

    def forward(
        self,
        hidden: torch.Tensor,
        neighbours: VARNeighbours,
        scales: list[tuple[int, int, int]],
    ) -> torch.Tensor:
        """``scales``: (scale index, begin, end) of each scale's positions in ``hidden``."""
        batch, length, channels = hidden.shape
        query = self.query(self.norm(hidden)).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        out = torch.cat(
            [
                F.scaled_dot_product_attention(query[:, :, begin:end], neighbours.keys[si], neighbours.values[si])
                for si, begin, end in scales
            ],
            dim=2,
        )
        out = self.out_proj(out.transpose(1, 2).reshape(batch, length, channels))
        return out * self.gate * neighbours.row_mask.to(hidden.dtype).view(-1, 1, 1)


class DropPath(nn.Module):
    """Stochastic depth: drop a sample's whole residual branch in training, rescaling the survivors."""

    def __init__(self, prob: float):
        super().__init__()
        self.prob = prob

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.training or self.prob == 0.0:
            return hidden
        keep = hidden.new_empty(hidden.shape[0], *([1] * (hidden.ndim - 1))).bernoulli_(1 - self.prob)
        return hidden * keep / (1 - self.prob)


class VARBlock(GradientCheckpointingLayer):
    """Pre-norm transformer block whose LayerNorms are modulated by the class (AdaLN, with gates).

    ``modulation`` is the class embedding (B, C), or with shared AdaLN the shared projection (B, 1, 6, C) to which
    this block adds its ``scale_shift_table``.
    """

    def __init__(self, config: VARConfig, layer_idx: int, drop_path: float):
        super().__init__()
        channels = config.embed_dim
        self.norm = nn.LayerNorm(channels, eps=config.norm_eps, elementwise_affine=False)
        self.attn = VARAttention(config, layer_idx)
        self.mlp = VARMLP(config)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if config.num_neighbours:
            self.neighbour_attn = VARNeighbourAttention(config)
        if config.shared_adaln:
            self.scale_shift_table = nn.Parameter(torch.randn(1, 1, 6, channels) / channels**0.5)
        else:
            self.adaln = nn.Linear(channels, 6 * channels)
            self.adaln.init_role = "adaln"

    def forward(
        self,
        hidden: torch.Tensor,
        modulation: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        kv_cache: VARLayerCache | None = None,
        output_attentions: bool = False,
        neighbours: VARNeighbours | None = None,
        neighbour_scales: list[tuple[int, int, int]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``kv_cache``: this block's part of the cache (sampling), ``None`` in teacher forcing. ``neighbours``: a
        retrieval model's neighbours (or ``None``); ``neighbour_scales``: the (scale index, begin, end) of each
        scale's positions in ``hidden``."""
        if kv_cache is not None and kv_cache.modulation is not None:  # sampling: projected at the first scale
            modulation = kv_cache.modulation
        else:
            if hasattr(self, "scale_shift_table"):
                modulation = self.scale_shift_table + modulation
            else:
                modulation = self.adaln(F.silu(modulation)).view(-1, 1, 6, hidden.shape[-1])
            if kv_cache is not None:
                kv_cache.modulation = modulation
        gate_attn, gate_mlp, scale_attn, scale_mlp, shift_attn, shift_mlp = modulation.unbind(2)
        normed = self.norm(hidden) * (1 + scale_attn) + shift_attn
        attended, weights = self.attn(normed, attn_mask, kv_cache, output_attentions)
        hidden = hidden + self.drop_path(attended * gate_attn)
        if neighbours is not None:
            hidden = hidden + self.drop_path(self.neighbour_attn(hidden, neighbours, neighbour_scales))
        hidden = hidden + self.drop_path(self.mlp(self.norm(hidden) * (1 + scale_mlp) + shift_mlp) * gate_mlp)
        return hidden, weights


class VARPreTrainedModel(PreTrainedModel):
    config_class = VARConfig
    base_model_prefix = "var"
    main_input_name = "class_labels"
    supports_gradient_checkpointing = True
    _no_split_modules = ["VARBlock"]
    _supports_sdpa = True

    @classmethod
    @package_only
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """``PreTrainedModel.from_pretrained``, strict: missing, unexpected or mis-shaped weights (a damaged file,
        or a config.json that disagrees with it) raise a ValueError naming the file and the keys, where transformers
        would warn and initialise them randomly. ``output_loading_info=True`` returns the report instead, and
        ``ignore_mismatched_sizes=True`` accepts mis-shaped weights, as in transformers."""

        def build_on_meta(folder):
            config = kwargs.get("config")
            return cls(config if isinstance(config, PretrainedConfig) else cls.config_class.from_pretrained(folder))

        return load_strictly(super().from_pretrained, pretrained_model_name_or_path, model_args, kwargs, build_on_meta)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # transformers only hands over modules that own parameters directly, so each linear layer carries its role
        # (``init_role``) instead of its parent block rescaling it afterwards.
        config = self.config
        std = config.initializer_range or math.sqrt(1 / config.embed_dim / 3)
        if isinstance(module, nn.Linear):
            weight = _trunc_normal_like(module.weight, std)
            role = getattr(module, "init_role", None)
            if role == "residual_out":
                weight = weight / math.sqrt(2 * config.depth)
            elif role == "adaln":
                weight = weight * _adaln_gains(config, module.out_features // 6).view(-1, 1).to(weight)
            elif role == "head":
                weight = weight * config.init_head
            elif role == "head_adaln":
                weight = weight * config.init_adaln
            init.copy_(module.weight, weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.trunc_normal_(module.weight, std=std)
        elif isinstance(module, VARAttention):
            init.zeros_(module.q_bias)
            init.zeros_(module.v_bias)
            if module.l2_norm:
                init.constant_(module.logit_scale, math.log(4.0))
        elif isinstance(module, VARNeighbourAttention):
            init.zeros_(module.gate)  # a new retrieval step starts switched off: the model begins as the plain one
        elif isinstance(module, VARBlock) and hasattr(module, "scale_shift_table"):
            table = torch.randn_like(module.scale_shift_table) / module.scale_shift_table.shape[-1] ** 0.5
            gains = _adaln_gains(config, table.shape[-1]).view(1, 1, 6, -1)
            init.copy_(module.scale_shift_table, table * gains)
        elif isinstance(module, VARTransformer):
            init.trunc_normal_(module.pos_start, std=std)
            init.trunc_normal_(module.position_embedding, std=std)


def _trunc_normal_like(tensor: torch.Tensor, std: float) -> torch.Tensor:
    return torch.nn.init.trunc_normal_(torch.empty_like(tensor), std=std)


def _adaln_gains(config: VARConfig, channels: int) -> torch.Tensor:
    """Init gains of the six AdaLN chunks: small for the two gates, ``init_adaln`` for scales and shifts."""
    gains = torch.full((6, channels), config.init_adaln)
    gains[:2] = config.init_adaln_gamma
    return gains.flatten()


class VARTransformer(VARPreTrainedModel):
    r"""The VAR transformer: logits for every scale's token map given the class and all coarser scales.

    Training runs all scales at once under a block-causal mask (:meth:`forward`); sampling runs one scale at a time
    against a preallocated KV cache, also through :meth:`forward` (``kv_cache=``, ``scale_index=``), so hooks see it.

    Example:
        ```py
        >>> import torch
        >>> from diffusers_var import VARConfig, VARTransformer
        >>> config = VARConfig(num_classes=10, vocab_size=64, latent_channels=8, patch_nums=(1, 2, 4),
        ...                    depth=2, embed_dim=64, num_heads=2)
        >>> model = VARTransformer(config).eval()
        >>> inputs = torch.randn(2, 21 - 1, 8)  # (B, L - first_l, Cvae)
        >>> out = model(torch.tensor([3, 7]), inputs, labels=torch.randint(64, (2, 21)))
        >>> out.logits.shape, out.loss.ndim
        (torch.Size([2, 21, 64]), 0)
        ```
    """

    def __init__(self, config: VARConfig):
        super().__init__(config)
        channels = config.embed_dim
        self.class_embedding = nn.Embedding(config.num_classes + 1, channels)
        self.pos_start = nn.Parameter(torch.zeros(1, self.first_l, channels))
        self.position_embedding = nn.Parameter(torch.zeros(1, self.num_tokens, channels))
        self.level_embedding = nn.Embedding(len(config.patch_nums), channels)
        self.input_proj = nn.Linear(config.latent_channels, channels)
        if config.shared_adaln:
            self.shared_adaln = nn.Linear(channels, 6 * channels)
        drop_paths = torch.linspace(0, config.drop_path_rate, config.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(VARBlock(config, i, drop_paths[i]) for i in range(config.depth))
        self.head_norm = nn.LayerNorm(channels, eps=config.norm_eps, elementwise_affine=False)
        self.head_adaln = nn.Linear(channels, 2 * channels)
        self.head_adaln.init_role = "head_adaln"
        self.head = nn.Linear(channels, config.vocab_size)
        self.head.init_role = "head"
        if config.num_neighbours:
            # the neighbours' codes, projected apart from the sequence's inputs (they are residual codes, not f̂)
            self.neighbour_proj = nn.Linear(config.latent_channels, channels)
            self.neighbour_norm = nn.LayerNorm(channels, eps=config.norm_eps, elementwise_affine=False)
            self.neighbour_key_value = nn.Linear(channels, 2 * channels)
        self.post_init()

    # -- geometry of the token pyramid; derived, never stored, so from_pretrained cannot leave it uninitialised ------

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return tuple(self.config.patch_nums)

    @property
    def first_l(self) -> int:
        return self.config.patch_nums[0] ** 2

    @property
    def num_tokens(self) -> int:
        return sum(p * p for p in self.config.patch_nums)

    @property
    def begin_ends(self) -> list[tuple[int, int]]:
        """[begin, end) of each scale's positions in the L-long sequence."""
        ends = torch.tensor([p * p for p in self.config.patch_nums]).cumsum(0).tolist()
        return [(end - p * p, end) for p, end in zip(self.config.patch_nums, ends)]

    def level_ids(self, device: torch.device | None = None) -> torch.LongTensor:
        """Scale index of each position, (L,). Kept per device after the first call: copying it from the host at
        every scale would make the device wait each time (not a buffer, so from_pretrained cannot leave it empty)."""
        cache = self.__dict__.setdefault("_level_ids_per_device", {})
        key = (str(device), tuple(self.config.patch_nums))
        if key not in cache:
            cache[key] = scale_level_ids(self.config.patch_nums, device)
        return cache[key]

    def block_causal_mask(self, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
        """(L, L) additive mask: 0 where the key's scale ≤ the query's scale, −inf elsewhere."""
        levels = self.level_ids(device)
        visible = levels[:, None] >= levels[None, :]
        return torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))

    # -- pieces shared by training and sampling ----------------------------------------------------------------------

    def _check_class_labels(self, class_labels: torch.Tensor, check_range: bool = True) -> None:
        if class_labels.ndim != 1 or class_labels.is_floating_point() or class_labels.dtype == torch.bool:
            raise ValueError(
                f"class_labels must be a 1-D integer tensor of class ids, got shape {tuple(class_labels.shape)} of "
                f"{class_labels.dtype}."
            )
        if (
            check_range
            and class_labels.numel()
            and (class_labels.min() < 0 or class_labels.max() > self.config.num_classes)
        ):
            raise ValueError(
                f"class_labels must lie in [0, {self.config.num_classes}] ({self.config.num_classes} is the null "
                f"class), got min {int(class_labels.min())}, max {int(class_labels.max())}."
            )

    def _modulation(self, condition: torch.Tensor, cached: dict | None = None) -> torch.Tensor:
        """What the blocks' AdaLN reads: the condition, or with shared AdaLN its shared projection. ``cached``: a
        KV cache's :meth:`~VARKVCache.modulations_for` dict, which keeps the projection between scales."""
        if not self.config.shared_adaln:
            return condition
        if cached is not None and "shared" in cached:
            return cached["shared"]
        modulation = self.shared_adaln(F.silu(condition)).view(-1, 1, 6, self.config.embed_dim)
        if cached is not None:
            cached["shared"] = modulation
        return modulation

    def _logits(self, hidden: torch.Tensor, condition: torch.Tensor, cached: dict | None = None) -> torch.Tensor:
        if cached is not None and "head" in cached:
            scale_shift = cached["head"]
        else:
            scale_shift = self.head_adaln(F.silu(condition)).view(-1, 1, 2, self.config.embed_dim)
            if cached is not None:
                cached["head"] = scale_shift
        scale, shift = scale_shift.unbind(2)
        return self.head(self.head_norm(hidden) * (1 + scale) + shift).float()

    def _position_codes(self, begin: int, end: int, device: torch.device) -> torch.Tensor:
        levels = self.level_ids(device)[begin:end]
        return self.level_embedding(levels).unsqueeze(0) + self.position_embedding[:, begin:end]

    def _class_tokens(self, condition: torch.Tensor) -> torch.Tensor:
        return condition.unsqueeze(1).expand(-1, self.first_l, -1) + self.pos_start

    def drop_class_labels(self, class_labels: torch.LongTensor) -> torch.LongTensor:
        """Replace labels by the null class with probability ``class_dropout_prob`` (training only)."""
        if not self.training or self.config.class_dropout_prob <= 0:
            return class_labels
        dropped = torch.rand(class_labels.shape, device=class_labels.device) < self.config.class_dropout_prob
        return torch.where(
            dropped,
            torch.full_like(class_labels, self.config.num_classes),
            class_labels,
        )

    @torch.no_grad()
    def resize_class_embedding(self, num_classes: int, generator: torch.Generator | None = None) -> None:
        """Change the number of classes for fine-tuning, keeping the learned null class (guidance) row.

        The first ``min(old, new)`` class rows are kept; new rows get the model's init. ``config.num_classes``
        follows, so the resized model saves and reloads as such.
        """
        if num_classes < 1:
            raise ValueError(f"num_classes must be ≥ 1, got {num_classes}.")
        old = self.class_embedding.weight
        old_classes = old.shape[0] - 1
        std = self.config.initializer_range or math.sqrt(1 / self.config.embed_dim / 3)
        weight = torch.empty(num_classes + 1, old.shape[1], dtype=old.dtype, device=old.device)
        torch.nn.init.trunc_normal_(weight, std=std, generator=generator)
        kept = min(old_classes, num_classes)
        weight[:kept] = old[:kept]
        weight[num_classes] = old[old_classes]
        self.class_embedding = nn.Embedding.from_pretrained(weight, freeze=False)
        self.config.num_classes = num_classes

    # -- retrieval conditioning (num_neighbours > 0) ---------------------------------------------------------------

    @property
    def has_retrieval(self) -> bool:
        """Whether the model was built with retrieval conditioning (``config.num_neighbours > 0``)."""
        return bool(self.config.num_neighbours)

    def drop_neighbours(self, neighbour_mask: torch.BoolTensor) -> torch.BoolTensor:
        """Drop each row's neighbours with probability ``neighbour_dropout_prob`` (training only)."""
        if not self.training or self.config.neighbour_dropout_prob <= 0:
            return neighbour_mask
        kept = torch.rand(neighbour_mask.shape, device=neighbour_mask.device) >= self.config.neighbour_dropout_prob
        return neighbour_mask & kept

    def neighbour_keys_values(
        self,
        neighbour_codes: torch.Tensor,
        neighbour_mask: torch.BoolTensor | None = None,
        batch_size: int | None = None,
    ) -> VARNeighbours:
        """The neighbours' keys and values per scale, each (B, H, k·pn², d), that every block's retrieval attention
        reads, for ``neighbour_codes`` (B, k, L, Cvae): the codebook vectors of k retrieved images' tokens at every
        scale (:meth:`MultiScaleVQVAE.code_embeddings`), each position given the same scale and position codes as
        the sequence. ``neighbour_mask`` (B,) says which rows use them (default: all)."""
        if not self.has_retrieval:
            raise ValueError(
                "This transformer has no retrieval conditioning (config.num_neighbours=0): sample with training-free "
                "retrieval (retrieval_mode='training_free'), or train one with train_var.py --num_neighbours k."
            )
        batch = neighbour_codes.shape[0]
        if (
            neighbour_codes.ndim != 4
            or neighbour_codes.shape[1] < 1
            or tuple(neighbour_codes.shape[2:]) != (self.num_tokens, self.config.latent_channels)
        ):
            raise ValueError(
                f"neighbour_codes must have shape (B, k, {self.num_tokens}, {self.config.latent_channels}) (k ≥ 1 "
                f"neighbours, every position of patch_nums={self.patch_nums}, Cvae), got "
                f"{tuple(neighbour_codes.shape)}."
            )
        if batch_size is not None and batch != batch_size:
            raise ValueError(
                f"neighbour_codes hold neighbours for {batch} rows, but the batch has {batch_size}: give each row its "
                "own (B, k, L, Cvae)."
            )
        if neighbour_mask is None:
            neighbour_mask = torch.ones(batch, dtype=torch.bool, device=neighbour_codes.device)
        elif tuple(neighbour_mask.shape) != (batch,) or neighbour_mask.dtype != torch.bool:
            raise ValueError(f"neighbour_mask must be a ({batch},) bool tensor, got {tuple(neighbour_mask.shape)}.")
        words = self.neighbour_proj(neighbour_codes.to(self.neighbour_proj.weight.dtype))
        memory = self.neighbour_norm(words + self._position_codes(0, self.num_tokens, words.device).unsqueeze(1))
        k, heads, head_dim = memory.shape[1], self.config.num_heads, self.config.embed_dim // self.config.num_heads
        key, value = self.neighbour_key_value(memory).view(batch, k, -1, 2, heads, head_dim).unbind(3)
        key, value = key.permute(0, 3, 1, 2, 4), value.permute(0, 3, 1, 2, 4)  # (B, H, k, L, d)
        keys = [key[:, :, :, begin:end].flatten(2, 3) for begin, end in self.begin_ends]
        values = [value[:, :, :, begin:end].flatten(2, 3) for begin, end in self.begin_ends]
        return VARNeighbours(keys, values, neighbour_mask)

    # -- embeddings, as transformers' tools expect them ------------------------------------------------------------

    def get_input_embeddings(self) -> nn.Embedding:
        """The embedding of the model's discrete input, ``class_labels`` (its ``main_input_name``): one row per class
        and the null class. It is what ``enable_input_require_grads()`` hooks: every position's input carries the
        class (the class tokens and the AdaLN condition), so gradient checkpointing works over a frozen base (PEFT).
        (The token maps enter as continuous f̂ features through ``input_proj``, the official ``word_embed``.)"""
        return self.class_embedding

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.class_embedding = value

    def resize_token_embeddings(self, *args, **kwargs):
        """Not applicable: VAR's discrete inputs are its classes, and ``vocab_size`` is the tokenizer's codebook (the
        output head), which a resize would corrupt. Use :meth:`resize_class_embedding` to change the classes."""
        raise NotImplementedError(
            "VARTransformer has no input token vocabulary to resize (vocab_size is the tokenizer's codebook). To "
            "change the number of classes, use resize_class_embedding(num_classes)."
        )

    # -- the forward pass: every scale at once (training), or one scale against the KV cache (sampling) ------------

    def forward(
        self,
        class_labels: torch.LongTensor,
        next_scale_inputs: torch.Tensor | None = None,
        labels: torch.LongTensor | list[torch.LongTensor] | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        *,
        output_attentions: bool | None = None,
        kv_cache: VARKVCache | None = None,
        scale_index: int | None = None,
        neighbour_codes: torch.Tensor | None = None,
        neighbour_mask: torch.BoolTensor | None = None,
    ) -> VARTransformerOutput | tuple:
        r"""Next-scale logits: teacher-forced for all L positions, or cached for one scale.

        Args:
            class_labels: (B,) class ids; ``num_classes`` is the null class. Dropped for guidance in training.
            next_scale_inputs: teacher forcing: (B, L − first_l, Cvae), from
                :meth:`MultiScaleVQVAE.next_scale_inputs`. Cached: this scale's input, f̂ so far area-pooled to the
                scale (B, pn², Cvae), from :meth:`MultiScaleVQVAE.scale_input`; ``None`` for scale 0.
            labels: target token ids for the loss: (B, L) (all token maps flattened and concatenated), or the
                list of (B, pn, pn) token maps that ``MultiScaleVQVAE.tokenize`` returns. Teacher forcing only.
            output_hidden_states, output_attentions, return_dict: as in transformers; ``None`` takes the config's.
                Attention weights come from the eager kernel, whatever ``attn_implementation`` says.
            kv_cache: a :class:`VARKVCache` (:meth:`allocate_kv_cache`) to sample one scale at a time, as
                transformers models take a ``cache``; filled in place and returned as the output's ``cache``.
            scale_index: with ``kv_cache``, the scale to predict; scales run in order from 0.
            neighbour_codes: a retrieval model only: (B, k, L, Cvae), the code embeddings of k retrieved images'
                token pyramids (:meth:`MultiScaleVQVAE.code_embeddings`). ``None``: no retrieval, exactly the plain
                model. In a cached call they are encoded once, at the first call that passes them, and kept in the
                cache for the later scales. In training a row's neighbours are dropped with
                ``neighbour_dropout_prob``.
            neighbour_mask: (B,) bool, the rows that use their neighbours (default all), e.g. False for the rows
                that guidance on retrieval contrasts against.

        Example:
            ```py
            >>> cache = model.allocate_kv_cache(batch_size=2)
            >>> logits = model(class_labels, None, kv_cache=cache, scale_index=0).logits  # (2, 1, V)
            ```
        """
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if kv_cache is None:
            if scale_index is not None:
                raise ValueError("scale_index selects a scale of a cached call; pass kv_cache as well.")
            self._check_class_labels(class_labels)
            condition = self.class_embedding(self.drop_class_labels(class_labels))
            hidden = self._teacher_forcing_tokens(condition, next_scale_inputs)
            mask = self.block_causal_mask(hidden.dtype, hidden.device)
            neighbours = None
            if neighbour_codes is not None:
                if neighbour_mask is None:
                    neighbour_mask = torch.ones(class_labels.shape[0], dtype=torch.bool, device=hidden.device)
                neighbours = self.neighbour_keys_values(
                    neighbour_codes, self.drop_neighbours(neighbour_mask), class_labels.shape[0]
                )
            neighbour_scales = [(si, begin, end) for si, (begin, end) in enumerate(self.begin_ends)]
        else:
            if labels is not None:
                raise ValueError("labels (a training loss) need teacher forcing: call without kv_cache.")
            self._check_class_labels(class_labels, check_range=False)  # per scale: no device sync
            condition = self.class_embedding(class_labels)
            hidden = self._scale_tokens(condition, next_scale_inputs, kv_cache, scale_index)
            mask = None  # a scale sees all of itself and every cached coarser scale
            if neighbour_codes is not None and kv_cache.neighbours is None:
                kv_cache.neighbours = self.neighbour_keys_values(neighbour_codes, neighbour_mask, class_labels.shape[0])
            neighbours = kv_cache.neighbours
            neighbour_scales = [(scale_index, 0, hidden.shape[1])]
        cached = None if kv_cache is None else kv_cache.modulations_for(class_labels)
        modulation = self._modulation(condition, cached)
        all_hidden = (hidden,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for i, block in enumerate(self.blocks):
            layer_cache = None if kv_cache is None else kv_cache.layers[i]
            hidden, weights = block(
                hidden, modulation, mask, layer_cache, output_attentions, neighbours, neighbour_scales
            )
            if output_hidden_states:
                all_hidden += (hidden,)
            if output_attentions:
                all_attentions += (weights,)
        if kv_cache is not None:
            kv_cache.advance(hidden.shape[1])
        logits = self._logits(hidden, condition, cached)
        loss = None if labels is None else self._loss(logits, labels)
        output = VARTransformerOutput(
            loss=loss,
            logits=logits,
            cache=kv_cache,
            hidden_states=all_hidden,
            attentions=all_attentions,
        )
        return output if return_dict else output.to_tuple()

    def _teacher_forcing_tokens(self, condition: torch.Tensor, next_scale_inputs: torch.Tensor | None) -> torch.Tensor:
        """All L positions: the class token(s), then every finer scale's word-embedded input, plus position codes."""
        batch = condition.shape[0]
        expected = (batch, self.num_tokens - self.first_l, self.config.latent_channels)
        if next_scale_inputs is None or tuple(next_scale_inputs.shape) != expected:
            got = None if next_scale_inputs is None else tuple(next_scale_inputs.shape)
            raise ValueError(
                f"next_scale_inputs must have shape {expected} (B, L - first_l, Cvae) for patch_nums="
                f"{self.patch_nums}, got {got}."
            )
        words = self.input_proj(next_scale_inputs.to(condition.dtype))
        tokens = torch.cat((self._class_tokens(condition), words), dim=1)
        return tokens + self._position_codes(0, self.num_tokens, condition.device)

    def _scale_tokens(
        self,
        condition: torch.Tensor,
        scale_input: torch.Tensor | None,
        kv_cache: VARKVCache,
        scale_index: int | None,
    ) -> torch.Tensor:
        """One scale's positions: the class token(s) at scale 0, else the word-embedded input, plus position codes."""
        if scale_index is None or not 0 <= scale_index < len(self.patch_nums):
            raise ValueError(f"scale_index must be in [0, {len(self.patch_nums)}) with a kv_cache, got {scale_index}.")
        begin, end = self.begin_ends[scale_index]
        if kv_cache.length != begin:
            raise ValueError(
                f"Scale {scale_index} needs the first {begin} positions cached; the cache holds {kv_cache.length}."
            )
        if scale_index == 0:
            tokens = self._class_tokens(condition)
        else:
            side = self.patch_nums[scale_index]
            expected = (condition.shape[0], side * side, self.config.latent_channels)
            if scale_input is None or tuple(scale_input.shape) != expected:
                got = None if scale_input is None else tuple(scale_input.shape)
                raise ValueError(f"Scale {scale_index} needs an input of shape {expected} (B, pn², Cvae), got {got}.")
            tokens = self.input_proj(scale_input.to(condition.dtype))
        return tokens + self._position_codes(begin, end, condition.device)

    def _loss(self, logits: torch.Tensor, labels: torch.LongTensor | list[torch.LongTensor]) -> torch.Tensor:
        if isinstance(labels, (list, tuple)):
            labels = torch.cat([t.flatten(1) for t in labels], dim=1)
        batch = logits.shape[0]
        if tuple(labels.shape) != (batch, self.num_tokens):
            raise ValueError(f"labels must have shape ({batch}, {self.num_tokens}), got {tuple(labels.shape)}.")
        return F.cross_entropy(
            logits.view(-1, self.config.vocab_size),
            labels.reshape(-1),
            label_smoothing=self.config.label_smoothing,
        )

    # -- sampling: one scale at a time -----------------------------------------------------------------------------

    def allocate_kv_cache(self, batch_size: int, dtype: torch.dtype | None = None, device=None) -> VARKVCache:
        """A cache for sampling ``batch_size`` sequences (with guidance: twice the images)."""
        return VARKVCache(self.config, batch_size, dtype or self.dtype, device or self.device)

    def forward_scale(
        self,
        class_labels: torch.LongTensor,
        scale_index: int,
        scale_input: torch.Tensor | None,
        kv_cache: VARKVCache,
    ) -> torch.Tensor:
        r"""Logits (B, pn², V) for scale ``scale_index``: a shorthand for ``self(class_labels, scale_input,
        kv_cache=kv_cache, scale_index=scale_index).logits`` (through ``forward``, so hooks see it)."""
        return self(class_labels, scale_input, kv_cache=kv_cache, scale_index=scale_index, return_dict=True).logits

"""diffusers-var: VAR (Visual AutoRegressive modeling) for diffusers and transformers.

The public API: ``MultiScaleVQVAE`` (tokenizer), ``VARConfig``/``VARTransformer`` (next-scale predictor, also
reachable through ``AutoConfig``/``AutoModel``), ``VARScaleScheduler`` (guidance and sampling), ``VARPipeline``,
``VARInpaintPipeline`` (zero-shot editing), ``VARSearchPipeline`` (inference-time search) and
``VARRetrievalPipeline`` (retrieval-augmented sampling); ``bundled_model_path``
finds the models shipped in the package (``VARPipeline.from_pretrained("var-digits")``).
"""

from transformers import AutoConfig, AutoModel

from .models.transformer import (
    VARConfig,
    VARKVCache,
    VARTransformer,
    VARTransformerOutput,
)
from .models.vqvae import MultiScaleVQVAE, MultiScaleVQVAEOutput
from .pipelines.inpaint import VARInpaintPipeline
from .pipelines.retrieval import VARRetrievalPipeline, VARRetrievalPipelineOutput
from .pipelines.search import VARSearchPipeline, VARSearchPipelineOutput
from .pipelines.var import VARPipeline, VARPipelineOutput
from .pretrained import BUNDLED_MODELS, bundled_model_path
from .schedulers.scale import VARScaleScheduler, VARSchedulerOutput
from .validation import NonFiniteError

__version__ = "0.1.0"

AutoConfig.register(VARConfig.model_type, VARConfig, exist_ok=True)
AutoModel.register(VARConfig, VARTransformer, exist_ok=True)

__all__ = [
    "BUNDLED_MODELS",
    "MultiScaleVQVAE",
    "MultiScaleVQVAEOutput",
    "NonFiniteError",
    "VARConfig",
    "VARInpaintPipeline",
    "VARRetrievalPipeline",
    "VARRetrievalPipelineOutput",
    "VARKVCache",
    "VARPipeline",
    "VARPipelineOutput",
    "VARScaleScheduler",
    "VARSearchPipeline",
    "VARSearchPipelineOutput",
    "VARSchedulerOutput",
    "VARTransformer",
    "VARTransformerOutput",
    "bundled_model_path",
]

"""diffusers' common model tests (tests/models/testing_utils: ModelTesterMixin, TrainingTesterMixin,
MemoryTesterMixin; tests/models/autoencoders/testing_utils.py: AutoencoderTesterMixin), unmodified, run on
diffusers_var.MultiScaleVQVAE with a tiny configuration (modelled on tests/models/autoencoders/test_models_autoencoder_kl.py)."""

import torch

from diffusers.utils.torch_utils import randn_tensor

from diffusers_tests.models.autoencoders.testing_utils import AutoencoderTesterMixin
from diffusers_tests.models.testing_utils import (
    BaseModelTesterConfig,
    MemoryTesterMixin,
    ModelTesterMixin,
    TrainingTesterMixin,
)
from diffusers_tests.testing_utils import enable_full_determinism, torch_device

from diffusers_var import MultiScaleVQVAE

enable_full_determinism()


class MultiScaleVQVAETesterConfig(BaseModelTesterConfig):
    @property
    def model_class(self):
        return MultiScaleVQVAE

    @property
    def main_input_name(self) -> str:
        return "images"

    @property
    def output_shape(self):
        return (3, 8, 8)

    @property
    def generator(self):
        return torch.Generator("cpu").manual_seed(0)

    def get_init_dict(self):
        return {
            "ch": 16,
            "ch_mult": (1, 2),
            "num_res_blocks": 1,
            "norm_num_groups": 8,
            "z_channels": 8,
            "vocab_size": 32,
            "patch_nums": (1, 2, 4),
        }

    def get_dummy_inputs(self):
        batch_size = 4
        image = randn_tensor((batch_size, 3, 8, 8), generator=self.generator, device=torch_device)
        return {"images": image.clamp(-1, 1)}  # the tokenizer takes images in [-1, 1]


class TestMultiScaleVQVAE(MultiScaleVQVAETesterConfig, ModelTesterMixin, TrainingTesterMixin):
    def test_gradient_checkpointing_is_applied(self):
        # as test_models_autoencoder_kl.py does: the classes that carry `gradient_checkpointing`
        expected_set = {"Encoder", "Decoder"}
        super().test_gradient_checkpointing_is_applied(expected_set=expected_set)


class TestMultiScaleVQVAEMemory(MultiScaleVQVAETesterConfig, MemoryTesterMixin):
    """Memory optimization tests."""


class TestMultiScaleVQVAESlicingTiling(MultiScaleVQVAETesterConfig, AutoencoderTesterMixin):
    """Slicing, tiling and norm-group tests for autoencoders."""

"""diffusers' PipelineTesterMixin (tests/pipelines/test_pipelines_common.py), unmodified, run on
diffusers_var.VARPipeline with tiny components (modelled on tests/pipelines/dit/test_dit.py)."""

import unittest

import numpy as np
import torch

from diffusers_tests.pipelines.pipeline_params import (
    CLASS_CONDITIONED_IMAGE_GENERATION_BATCH_PARAMS,
    CLASS_CONDITIONED_IMAGE_GENERATION_PARAMS,
)
from diffusers_tests.pipelines.test_pipelines_common import PipelineTesterMixin
from diffusers.utils import is_xformers_available

from diffusers_tests.testing_utils import enable_full_determinism, torch_device

from diffusers_var import MultiScaleVQVAE, VARConfig, VARPipeline, VARScaleScheduler, VARTransformer

enable_full_determinism()

PATCH_NUMS = (1, 2, 4)


class VARPipelineFastTests(PipelineTesterMixin, unittest.TestCase):
    pipeline_class = VARPipeline
    params = CLASS_CONDITIONED_IMAGE_GENERATION_PARAMS
    # as DiT's test removes what its __call__ lacks: VAR samples one step per scale (no num_inference_steps) and
    # takes no initial latents
    required_optional_params = PipelineTesterMixin.required_optional_params - {"num_inference_steps", "latents"}
    batch_params = CLASS_CONDITIONED_IMAGE_GENERATION_BATCH_PARAMS

    def get_dummy_components(self):
        torch.manual_seed(0)
        transformer = VARTransformer(
            VARConfig(
                num_classes=10,
                vocab_size=32,
                latent_channels=8,
                patch_nums=PATCH_NUMS,
                depth=2,
                embed_dim=32,
                num_heads=2,
            )
        )
        torch.manual_seed(0)
        vqvae = MultiScaleVQVAE(
            ch=16,
            ch_mult=(1, 2),
            num_res_blocks=1,
            norm_num_groups=8,
            z_channels=8,
            vocab_size=32,
            patch_nums=PATCH_NUMS,
        )
        scheduler = VARScaleScheduler(patch_nums=PATCH_NUMS)
        # as DiT's test: the modules only (id2label is a pipeline parameter, diffusers' `pipe.parameters`)
        return {"vqvae": vqvae.eval(), "transformer": transformer.eval(), "scheduler": scheduler}

    def get_dummy_inputs(self, device, seed=0):
        if str(device).startswith("mps"):
            generator = torch.manual_seed(seed)
        else:
            generator = torch.Generator(device=device).manual_seed(seed)
        inputs = {
            "class_labels": [1],
            "generator": generator,
            "top_k": 8,
            "output_type": "np",
        }
        return inputs

    def test_inference(self):
        device = "cpu"

        components = self.get_dummy_components()
        pipe = self.pipeline_class(**components)
        pipe.to(device)
        pipe.set_progress_bar_config(disable=None)

        inputs = self.get_dummy_inputs(device)
        image = pipe(**inputs).images

        self.assertEqual(image.shape, (1, 8, 8, 3))
        self.assertTrue(np.isfinite(image).all() and image.min() >= 0 and image.max() <= 1)

    def test_inference_batch_single_identical(self):
        # DiT's override, without copying `num_inference_steps` (VAR has none) into the batched inputs
        self._test_inference_batch_single_identical(expected_max_diff=1e-3, additional_params_copy_to_batched_inputs=[])

    @unittest.skipIf(
        torch_device != "cuda" or not is_xformers_available(),
        reason="XFormers attention is only available with CUDA and `xformers` installed",
    )
    def test_xformers_attention_forwardGenerator_pass(self):
        self._test_xformers_attention_forwardGenerator_pass(expected_max_diff=1e-3)

"""transformers 5.24.0's common model tests (ModelTesterMixin) and ConfigTester, unmodified, run on
diffusers_var.VARTransformer / VARConfig with a tiny configuration (modelled on an upstream model test file)."""

import unittest

from transformers.testing_utils import require_torch, torch_device
from transformers.utils import is_torch_available

from transformers_tests.test_configuration_common import ConfigTester
from transformers_tests.test_modeling_common import ModelTesterMixin, floats_tensor, ids_tensor

if is_torch_available():
    import torch

    from diffusers_var import VARConfig, VARTransformer


class VARTransformerModelTester:
    def __init__(
        self,
        parent,
        batch_size=2,
        num_classes=10,
        vocab_size=32,
        latent_channels=8,
        patch_nums=(1, 2, 4),
        depth=2,
        embed_dim=32,
        num_heads=2,
        is_training=True,
        use_labels=True,
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.num_classes = num_classes
        self.vocab_size = vocab_size
        self.latent_channels = latent_channels
        self.patch_nums = patch_nums
        self.depth = depth
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.is_training = is_training
        self.use_labels = use_labels
        # names ModelTesterMixin reads
        self.seq_length = sum(p * p for p in patch_nums)  # L = 21
        self.first_l = patch_nums[0] ** 2
        self.num_hidden_layers = depth
        self.num_attention_heads = num_heads
        self.hidden_size = embed_dim

    def get_config(self):
        return VARConfig(
            num_classes=self.num_classes,
            vocab_size=self.vocab_size,
            latent_channels=self.latent_channels,
            patch_nums=self.patch_nums,
            depth=self.depth,
            embed_dim=self.embed_dim,
            num_heads=self.num_heads,
        )

    def prepare_config_and_inputs(self):
        # class ids in [0, num_classes] (num_classes is the null class)
        class_labels = ids_tensor([self.batch_size], self.num_classes + 1)
        next_scale_inputs = floats_tensor([self.batch_size, self.seq_length - self.first_l, self.latent_channels])
        labels = ids_tensor([self.batch_size, self.seq_length], self.vocab_size) if self.use_labels else None
        return self.get_config(), class_labels, next_scale_inputs, labels

    def create_and_check_model(self, config, class_labels, next_scale_inputs, labels):
        model = VARTransformer(config).to(torch_device).eval()
        with torch.no_grad():
            result = model(class_labels, next_scale_inputs)
            self.parent.assertEqual(result.logits.shape, (self.batch_size, self.seq_length, self.vocab_size))
            result = model(class_labels, next_scale_inputs, labels=labels)
            self.parent.assertEqual(result.loss.ndim, 0)

    def prepare_config_and_inputs_for_common(self):
        config, class_labels, next_scale_inputs, _ = self.prepare_config_and_inputs()
        return config, {"class_labels": class_labels, "next_scale_inputs": next_scale_inputs}


@require_torch
class VARTransformerModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (VARTransformer,) if is_torch_available() else ()
    # the standard hooks an upstream model test file uses for a model with a second required input and its own
    # loss (not in any transformers head mapping): without them, test_eager_matches_sdpa_inference_* only pass the
    # main input and the training tests get no labels (see logs/transformer_nohooks.log)
    additional_model_inputs = ["next_scale_inputs"]

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels:
            batch_size = inputs_dict["class_labels"].shape[0]
            # deterministic, as upstream hooks make them (e.g. torch.zeros), so two calls give equal inputs
            inputs_dict["labels"] = torch.zeros(
                batch_size, self.model_tester.seq_length, dtype=torch.long, device=torch_device
            )
        return inputs_dict

    def setUp(self):
        self.model_tester = VARTransformerModelTester(self)
        self.config_tester = ConfigTester(
            self,
            config_class=VARConfig,
            has_text_modality=True,
            num_classes=10,
            vocab_size=32,
            latent_channels=8,
            patch_nums=[1, 2, 4],
            depth=2,
            embed_dim=32,
            num_heads=2,
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model(self):
        config_and_inputs = self.model_tester.prepare_config_and_inputs()
        self.model_tester.create_and_check_model(*config_and_inputs)

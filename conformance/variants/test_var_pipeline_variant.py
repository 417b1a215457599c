"""Diagnostic variant (not part of the main counts): the pipeline suite with the class labels VAR's API is designed
for, to show that the batch failures of test_var_pipeline.py come from DiT-style test inputs only: class_labels=1
(an int) instead of DiT's [1], so batching gives [1, 1] rather than the nested [[1], [1]]."""

import test_var_pipeline as base


class VARPipelineVariantTests(base.VARPipelineFastTests):
    def get_dummy_inputs(self, device, seed=0):
        inputs = super().get_dummy_inputs(device, seed)
        inputs["class_labels"] = 1
        return inputs


class VARPipelineLayerwiseCastingTests(base.VARPipelineFastTests):
    """Only for test_layerwise_casting_inference (DiT's test, like the mixin, leaves it off; it is a no-op pass
    there). Run with -k layerwise_casting."""

    test_layerwise_casting = True

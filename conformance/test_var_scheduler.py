"""EXTRA (beyond the three requested suites): diffusers' SchedulerCommonTest (tests/schedulers/test_schedulers.py),
unmodified, on diffusers_var.VARScaleScheduler, modelled on tests/schedulers/test_scheduler_vq_diffusion.py.
The common scheduler tests drive the diffusion API (set_timesteps(num_inference_steps), step(residual, t, sample),
add_noise); VAR's scheduler steps scale by scale on logits, so most failures here are expected by design."""

# the module, not the class: a unittest.TestCase imported by name would be collected (and pass vacuously) too
from diffusers_tests.schedulers import test_schedulers as common

from diffusers_var import VARScaleScheduler


class VARScaleSchedulerTest(common.SchedulerCommonTest):
    scheduler_classes = (VARScaleScheduler,)
    # VAR runs exactly one step per scale: the tests' default of 50 inference steps is refused
    forward_default_kwargs = (("num_inference_steps", 3),)

    def get_scheduler_config(self, **kwargs):
        config = {"patch_nums": (1, 2, 4)}
        config.update(**kwargs)
        return config

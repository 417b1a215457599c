"""Zero-shot editing (VARInpaintPipeline) and per-scale previews; parity with the official notebook is in
test_parity.py."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_images, tiny_pipeline

from diffusers_var import VARInpaintPipeline, VARPipeline
from diffusers_var.pipelines.image_inputs import keep_masks


@pytest.fixture
def inpaint():
    tiny = tiny_pipeline()
    return VARInpaintPipeline(**tiny.components, **tiny.parameters)  # diffusers' idiom: the models and the names


def images01(batch: int = 2) -> torch.Tensor:
    return (tiny_images(batch) + 1) / 2


def lower_half(size: int = 8) -> torch.Tensor:
    mask = torch.zeros(size, size)
    mask[size // 2 :] = 1
    return mask


def test_kept_tokens_are_the_input_s_and_the_rest_is_sampled(inpaint):
    image = images01()
    tokens = inpaint.vqvae.tokenize(image * 2 - 1)
    out = inpaint(
        image=image, mask_image=lower_half(), class_labels=[3, None], generator=torch.Generator().manual_seed(0)
    )
    keep = keep_masks(lower_half()[None, None], tuple(inpaint.vqvae.config.patch_nums))
    changed = 0
    for kept, given, effective in zip(keep, tokens, out.token_maps):
        kept = kept.expand_as(given)
        assert torch.equal(effective[kept], given[kept])
        changed += int((effective[~kept] != given[~kept]).sum())
    assert changed > 0  # the regenerated region is sampled, not copied
    assert torch.equal(out.class_labels, torch.tensor([3, 10]))  # None: the null class, pure in-painting


def test_nothing_to_regenerate_gives_the_tokenizer_s_reconstruction(inpaint):
    image = images01()
    out = inpaint(
        image=image, mask_image=torch.zeros(8, 8), output_type="pt", generator=torch.Generator().manual_seed(1)
    )
    tokens = inpaint.vqvae.tokenize(image * 2 - 1)
    assert all(torch.equal(a, b) for a, b in zip(out.token_maps, tokens))
    assert torch.allclose(out.images, (inpaint.vqvae.detokenize(tokens) + 1) / 2, atol=1e-6)


def test_keep_masks_resize_the_mask_from_its_own_size(inpaint):
    patch_nums = tuple(inpaint.vqvae.config.patch_nums)
    mask = (torch.rand(1, 1, 13, 7, generator=torch.Generator().manual_seed(0)) > 0.5).float()  # not the image's size
    for side, kept in zip(patch_nums, keep_masks(mask, patch_nums)):
        expected = F.interpolate(1 - mask, size=(side, side), mode="bilinear", align_corners=False)[:, 0] > 0.5
        assert torch.equal(kept, torch.ones_like(expected) if side * side <= 3 else expected)


def test_inputs_in_every_form_give_the_same_edit(inpaint):
    image, mask = images01(1), lower_half()
    kwargs = dict(class_labels="digit 5", output_type="pt")  # names work too
    reference = inpaint(image=image, mask_image=mask, generator=torch.Generator().manual_seed(2), **kwargs)
    array = image[0].permute(1, 2, 0).numpy()
    pil_image = PIL.Image.fromarray((array * 255).round().astype(np.uint8))
    forms = [
        dict(image=image[0], mask_image=mask[None]),
        dict(image=array, mask_image=mask.numpy()[..., None]),
        dict(image=[pil_image], mask_image=PIL.Image.fromarray((mask.numpy() * 255).astype(np.uint8))),
        dict(image_token_maps=inpaint.vqvae.tokenize(image * 2 - 1), mask_image=mask[None, None]),
    ]
    for i, form in enumerate(forms):
        out = inpaint(generator=torch.Generator().manual_seed(2), **form, **kwargs)
        if i == 2:  # uint8 PIL pixels: the tokens may differ where rounding moves a code; the kept mask is the same
            assert out.images.shape == reference.images.shape
            continue
        assert all(torch.equal(a, b) for a, b in zip(out.token_maps, reference.token_maps)), i


def test_one_image_with_several_classes_is_edited_once_per_class(inpaint):
    out = inpaint(image=images01(1), mask_image=lower_half(), class_labels=[0, 5, 9], output_type="pt")
    assert out.images.shape[0] == 3 and out.class_labels.tolist() == [0, 5, 9]


def test_one_mask_broadcasts_and_num_images_per_prompt_repeats(inpaint):
    out = inpaint(
        image=images01(2), mask_image=lower_half(), class_labels=np.int64(7), num_images_per_prompt=3, output_type="np"
    )
    assert out.images.shape == (6, 8, 8, 3) and out.class_labels.tolist() == [7] * 6
    assert torch.equal(out.token_maps[0][:3], out.token_maps[0][:1].expand(3, -1, -1))  # the 1×1 scale is kept


def test_components_are_shared_and_bundled_names_load():
    pipe = VARPipeline.from_pretrained("var-digits")
    edit = VARInpaintPipeline(**pipe.components)  # the models, shared; class ids work
    assert edit.transformer is pipe.transformer and edit.vqvae is pipe.vqvae
    with pytest.raises(ValueError, match=r"\*\*pipe.parameters"):
        edit(image=torch.zeros(3, 32, 32), mask_image=torch.zeros(32, 32), class_labels="5")
    edit = VARInpaintPipeline(**pipe.components, **pipe.parameters)  # and the class names
    assert edit.get_label_ids("5") == [5]
    loaded = VARInpaintPipeline.from_pretrained("var-digits")
    assert isinstance(loaded, VARInpaintPipeline) and loaded.vqvae.image_size == 32


def test_bad_inputs_name_the_value_and_what_is_allowed(inpaint):
    image, mask = images01(2), lower_half()
    cases = [
        (dict(image=torch.rand(2, 3, 16, 16), mask_image=mask), "is 16×16 px, but this model works on 8×8"),
        (dict(image=torch.rand(2, 4, 8, 8), mask_image=mask), "image must have 3 channels"),
        (dict(image=np.random.rand(8, 8, 1), mask_image=mask), "image must have 3 channels"),
        (dict(image=image * 255, mask_image=mask), "This looks like [0, 255]"),
        (dict(image=image, mask_image=mask * 2), "mask_image must lie in [0, 1]"),
        (dict(image=image, mask_image=mask - 0.5), "mask_image must lie in [0, 1]"),
        (dict(image=image, mask_image=torch.rand(3, 8, 8)), "mask_image must have 1 channel"),
        (dict(image=image, mask_image=np.random.rand(8, 8, 3)), "mask_image must have 1 channel"),
        (dict(image=image, mask_image=PIL.Image.new("RGB", (8, 8), "red")), "a mask has 1 channel"),
        (dict(image=image, mask_image=torch.rand(3, 1, 8, 8)), "3 masks for 2 images"),
        (dict(image=image), "mask_image is required"),
        (dict(mask_image=mask), "Pass either image"),
        (dict(image=image, mask_image=mask, class_labels=[1, 2, 3]), "3 class labels for 2 images"),
        (dict(image=image, mask_image=mask, class_labels=[1.5, 2]), "1.5"),
        (dict(image=image, mask_image=mask, top_k=-1), "top_k"),
        (dict(image=image, mask_image=mask, output_type="jpg"), "output_type"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError) as error:
            inpaint(**kwargs)
        assert message in str(error.value), (message, str(error.value))


def test_output_scales_are_the_image_after_each_scale(pipe):
    out = pipe(class_labels=[1, 2], output_type="pt", output_scales=True, generator=torch.Generator().manual_seed(0))
    assert len(out.scale_images) == len(pipe.vqvae.config.patch_nums)
    assert torch.equal(out.scale_images[-1], out.images)
    first = pipe.vqvae.token_maps_to_fhat([out.token_maps[0]] + [torch.zeros_like(t) for t in out.token_maps[1:]])
    assert not torch.equal(out.scale_images[0], out.images)  # coarse first
    plain = pipe(class_labels=[1, 2], output_type="pt", generator=torch.Generator().manual_seed(0))
    assert torch.equal(plain.images, out.images) and plain.scale_images is None  # previews change nothing
    assert first.shape[0] == 2
    images, labels, token_maps, scale_images = pipe(class_labels=[1], output_scales=True, return_dict=False)
    assert len(scale_images) == len(token_maps)


def editing_example():
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "editing" / "digits_editing.py"
    spec = importlib.util.spec_from_file_location("digits_editing", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_class_edits_of_real_digits_are_read_as_the_new_class():
    """The lower half of held-out digits regenerated as each other class (default sampling): an SVC trained on the
    real digits gives the new class far more probability than the original digit or an unconditional in-painting."""
    module = editing_example()  # (puts examples/digits on the path)
    from prepare_data import load_digits_split

    pipe = VARInpaintPipeline.from_pretrained("var-digits")
    pipe.set_progress_bar_config(disable=True)
    _, _, images, labels = load_digits_split()
    figures = module.editing_figures(pipe, images[40:60], labels[40:60], batch_size=256)  # 180 edits
    assert figures["edits"] == 180
    assert figures["gain_over_original"] >= 0.10 and figures["gain_over_unconditional_inpainting"] >= 0.10, figures


def test_the_editing_example_runs_in_smoke_form(tmp_path):
    """examples/editing/digits_editing.py on 4 held-out digits: every picture and figure is written."""
    import json

    module = editing_example()
    report = module.main(["--output_dir", str(tmp_path), "--max_images", "4", "--batch_size", "64"])
    names = ("inpainting", "outpainting", "class_edit", "reconstructions", "progressive")
    assert all((tmp_path / f"{name}.png").is_file() for name in names)
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert report["editing"]["edits"] == 4 * 9 and 0 <= report["editing"]["p_target_after_edit_mean"] <= 1
    assert report["reconstruction"]["tokenizer"]["token_accuracy"] == [1.0] * 6


def test_float_pil_masks_keep_their_values_and_integer_ones_are_refused():
    from diffusers_var.pipelines.image_inputs import prepare_mask

    values = np.zeros((8, 8), np.float32)
    values[4:] = 1.0
    assert torch.equal(prepare_mask(PIL.Image.fromarray(values, "F")), prepare_mask(values))
    with pytest.raises(ValueError, match="mode I"):
        prepare_mask(PIL.Image.fromarray(values.astype(np.int32), "I"))

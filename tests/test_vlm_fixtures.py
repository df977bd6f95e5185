"""The tiny VLM fixtures of ``helpers.vlm_models`` train unsplit: images reach the loss, text-only works."""

import pytest
import torch
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from helpers.vlm_models import IMAGES_PER_SAMPLE, VLM_CASES, unbuilt_vlm_types


def _part(model, path):
    for name in path.split("."):
        model = getattr(model, name)
    return model


@pytest.mark.parametrize("model_type", sorted(VLM_CASES))
def test_vlm_fixture_trains_with_images_reaching_the_vision_tower_and_text_only(model_type):
    case = VLM_CASES[model_type]
    model, batch = case()
    text_only = case.batch(model, with_images=False)
    assert "pixel_values" not in text_only and text_only["input_ids"].shape[1] < batch["input_ids"].shape[1]
    loss = model(**text_only).loss
    loss.backward()
    assert torch.isfinite(loss)
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in _part(model, case.vision_tower).parameters() if p.grad is not None]
    assert any(g.abs().sum() > 0 for g in grads), "no image reached the loss"
    for path in (case.projector, case.language_model):
        if path is not None:
            assert isinstance(_part(model, path), torch.nn.Module)
    _assert_rows_follow_the_layout(case, batch)


def _assert_rows_follow_the_layout(case, batch):
    pixels = batch["pixel_values"]
    n_images = sum(min(c, 1) if not case.multi_image else c for c in IMAGES_PER_SAMPLE)
    if case.layout == "per_image":
        assert pixels.shape[0] == n_images
    elif case.layout == "per_sample":
        assert pixels.shape[0] == batch["input_ids"].shape[0]
    else:
        grid = batch[case.grid_key]
        assert grid.shape == (n_images, 3) and pixels.shape[0] == int(grid.prod(-1).sum())
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()




def test_every_image_text_to_text_type_is_built_or_has_a_reason():
    unbuilt = unbuilt_vlm_types()
    assert set(unbuilt) | set(VLM_CASES) == set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)
    assert not set(unbuilt) & set(VLM_CASES)
    assert all(reason for reason in unbuilt.values())

"""The patched stage forwards: tensor in, tensor out, same numbers as the unsplit model (one process)."""

import pytest
import torch

from custom_models import CustomModel
from hf_models import tiny_batch, tiny_model
from hf_parity import sequential_parity
from hf_pp.architectures import module_fqns_per_stage
from hf_pp.functional import build_stage_modules
from hf_pp.hf_patching import patch_hf_model_for_pp

KEY_ARCHITECTURES = ["llama", "qwen2", "mistral", "gemma", "gemma2", "gemma3_text", "qwen3_moe", "cohere", "granite"]


@pytest.mark.parametrize("model_type", KEY_ARCHITECTURES)
@pytest.mark.parametrize("num_stages", [2, 4])
def test_stages_run_in_sequence_match_unsplit_loss_and_grads(model_type, num_stages):
    assert sequential_parity(model_type, num_stages) is None


def test_patching_touches_instances_not_classes():
    model = tiny_model("llama")
    cls_forward = type(model).forward
    parts = build_stage_modules(model, module_fqns_per_stage(model, 2), [0, 1])
    assert type(model).forward is cls_forward and "forward" not in model.__dict__
    assert all("forward" in part.__dict__ and "forward" in part.model.__dict__ for part in parts)


def test_first_stage_gives_hidden_states_last_gives_logits_with_logits_to_keep():
    model = tiny_model("llama")
    input_ids, mask, _ = tiny_batch(2, 6)
    first, last = build_stage_modules(model, module_fqns_per_stage(model, 2), [0, 1])
    hidden = first(input_ids, attention_mask=mask)
    assert isinstance(hidden, torch.Tensor) and hidden.shape == (2, 6, model.config.hidden_size)
    logits = last(hidden, attention_mask=mask)
    assert logits.shape == (2, 6, model.config.vocab_size)
    torch.testing.assert_close(last(hidden, attention_mask=mask, logits_to_keep=2), logits[:, -2:])
    torch.testing.assert_close(model(input_ids, attention_mask=mask).logits, logits, rtol=1e-5, atol=1e-6)


def test_explicit_position_ids_match_unsplit():
    model = tiny_model("qwen2")
    input_ids, mask, _ = tiny_batch(2, 6)
    position_ids = torch.arange(3, 9)[None].expand(2, -1)
    expected = model(input_ids, attention_mask=mask, position_ids=position_ids).logits
    hidden = input_ids
    for part in build_stage_modules(model, module_fqns_per_stage(model, 2), [0, 1]):
        hidden = part(hidden, attention_mask=mask, position_ids=position_ids)
    torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-6)


def test_inner_only_patch_leaves_wrapper_forward():
    model = tiny_model("llama")
    patch_hf_model_for_pp(model, patch_inner_model=True, patch_causal_lm_model=False)
    assert "forward" in model.model.__dict__ and "forward" not in model.__dict__
    hidden = model.model(tiny_batch(1, 4)[0])
    assert isinstance(hidden, torch.Tensor) and hidden.shape == (1, 4, model.config.hidden_size)


def test_wrapper_only_patch_reads_unpatched_decoder_output():
    model = tiny_model("llama")
    input_ids = tiny_batch(1, 4)[0]
    expected = model(input_ids).logits
    patch_hf_model_for_pp(model, patch_inner_model=False, patch_causal_lm_model=True)
    torch.testing.assert_close(model(input_ids), expected)


def test_custom_model_with_both_flags_off_is_left_alone():
    model = CustomModel(16, 8, 2)
    parts = build_stage_modules(model, [["embedding", "layers.0"], ["layers.1", "output_proj"]], [0, 1],
                                patch_inner_model=False, patch_causal_lm_model=False)
    assert all("forward" not in part.__dict__ for part in parts)

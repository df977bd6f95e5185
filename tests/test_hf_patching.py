"""The patched stage forwards: tensor in, tensor out, same numbers as the unsplit model (one process)."""

import pytest
import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from helpers.custom_models import CustomModel
from helpers.distributed import run_distributed
from helpers.hf_models import tiny_batch, tiny_model
from helpers.hf_parity import schedule_step_parity, sequential_parity
from hf_pp.errors import PipelineConfigError
from hf_pp.architectures import module_fqns_per_stage
from hf_pp.functional import build_stage_modules
from hf_pp.hf_patching import patch_hf_model_for_pp

KEY_ARCHITECTURES = ["llama", "qwen2", "mistral", "gemma", "gemma2", "gemma3_text", "qwen3_moe", "cohere", "granite"]


@pytest.mark.parametrize("model_type", KEY_ARCHITECTURES)
@pytest.mark.parametrize("num_stages", [2, 4])
def test_stages_run_in_sequence_match_unsplit_loss_and_grads(model_type, num_stages):
    assert sequential_parity(model_type, num_stages) is None


# Each once failed the sweep: an unbuildable tiny config (bailing_hybrid, cohere_compass_text), a per-forward
# shared_kv_states dict (gemma4_unified_text), a muP head divisor and a conv_mask per layer (inkling_text).
@pytest.mark.parametrize("model_type", ["bailing_hybrid", "cohere_compass_text", "gemma4_unified_text", "inkling_text"])
def test_diagnosed_architectures_match_unsplit_over_four_stages(model_type):
    assert sequential_parity(model_type, 4) is None


@pytest.mark.parametrize("model_type, overrides, vocab", [
    ("inkling_text", {"unpadded_vocab_size": 90}, 90),  # head padded past the vocabulary: logits cut back
    ("cohere_compass_text", {"logit_scale": None}, 96),  # no logit scale at all
])
def test_split_logits_follow_optional_quirks(model_type, overrides, vocab):
    model = tiny_model(model_type, **overrides)
    input_ids, mask, _ = tiny_batch(2, 8, vocab=vocab)
    expected = model(input_ids, attention_mask=mask).logits
    assert expected.shape[-1] == vocab
    hidden = input_ids
    for part in build_stage_modules(model, module_fqns_per_stage(model, 2), [0, 1]):
        hidden = part(hidden, attention_mask=mask)
    torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-6)


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


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])  # gemma2: sliding and full masks, eager (real tensors)
def test_unpadded_masks_are_built_once_per_stage_and_shape(model_type, monkeypatch):
    import hf_pp.hf_patching as patching

    model = tiny_model(model_type)
    parts = build_stage_modules(model, module_fqns_per_stage(model, 2), [0, 1])
    built, build = [], patching.build_mask_mapping
    monkeypatch.setattr(patching, "build_mask_mapping", lambda *a, **k: built.append(a[1].shape) or build(*a, **k))

    def split_logits(input_ids, **kwargs):
        hidden = input_ids
        for part in parts:
            hidden = part(hidden, **kwargs)
        return hidden

    for seq in (6, 9, 6, 9):
        input_ids, _, _ = tiny_batch(2, seq)
        torch.testing.assert_close(split_logits(input_ids), model(input_ids).logits, rtol=1e-5, atol=1e-6)
    assert len(built) == 4  # two shapes x two stages
    # A padding mask belongs to its batch, and given positions may start a new sequence: built on every call.
    input_ids, mask, _ = tiny_batch(2, 6)
    torch.testing.assert_close(split_logits(input_ids, attention_mask=mask), model(input_ids, attention_mask=mask).logits,
                               rtol=1e-5, atol=1e-6)
    positions = torch.arange(2, 8)[None].expand(2, -1)
    torch.testing.assert_close(split_logits(input_ids, position_ids=positions),
                               model(input_ids, position_ids=positions).logits, rtol=1e-5, atol=1e-6)
    assert len(built) == 8


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


def _mask_mapping(model, input_ids, attention_mask):
    """``{attention type: mask}`` built as Gemma 2's own forward builds it."""
    kwargs = dict(config=model.config, inputs_embeds=model.model.embed_tokens(input_ids), attention_mask=attention_mask,
                  cache=None, position_ids=torch.arange(input_ids.shape[1])[None])
    return {"full_attention": create_causal_mask(**kwargs), "sliding_attention": create_sliding_window_causal_mask(**kwargs)}


def _run_stages(parts, input_ids, **kwargs):
    hidden = input_ids
    for part in parts:
        hidden = part(hidden, **kwargs)
    return hidden


def test_precomputed_causal_mask_mapping_gives_the_same_logits():
    model = tiny_model("gemma2")  # sliding and full attention layers alternate, window 5 < 10 tokens
    input_ids, mask, _ = tiny_batch(4, 10)
    mapping = _mask_mapping(model, input_ids, mask)
    expected = model(input_ids, attention_mask=mask).logits
    torch.testing.assert_close(model(input_ids, attention_mask=mapping).logits, expected)  # what the model builds
    parts = build_stage_modules(model, module_fqns_per_stage(model, 2), [0, 1])
    built_here = _run_stages(parts, input_ids, attention_mask=mask)
    assert torch.equal(_run_stages(parts, input_ids, causal_mask_mapping=mapping), built_here)
    # As in Hugging Face forwards, an attention_mask that is a mapping is one.
    assert torch.equal(_run_stages(parts, input_ids, attention_mask=mapping), built_here)
    torch.testing.assert_close(built_here, expected, rtol=1e-5, atol=1e-6)


def test_causal_mask_mapping_is_used_over_attention_mask():
    model = tiny_model("gemma2")
    input_ids, mask, _ = tiny_batch(4, 10)
    mapping = _mask_mapping(model, input_ids, mask)
    parts = build_stage_modules(model, module_fqns_per_stage(model, 2), [0, 1])
    expected = _run_stages(parts, input_ids, attention_mask=mask)
    no_window = {"full_attention": mapping["full_attention"], "sliding_attention": mapping["full_attention"]}
    got = _run_stages(parts, input_ids, attention_mask=mask, causal_mask_mapping=no_window)
    assert (got - expected).abs().max() > 1e-3
    # Only positions past the window see the difference: the first 5 tokens attend to the same keys.
    torch.testing.assert_close(got[:, :5], expected[:, :5])


def test_causal_mask_mapping_without_a_stage_layer_type_is_refused():
    model = tiny_model("gemma2")
    input_ids, mask, _ = tiny_batch(4, 10)
    mapping = _mask_mapping(model, input_ids, mask)
    first, _ = build_stage_modules(model, module_fqns_per_stage(model, 2), [0, 1])
    with pytest.raises(PipelineConfigError, match=r"no mask for attention type\(s\) \['sliding_attention'\]"):
        first(input_ids, causal_mask_mapping={"full_attention": mapping["full_attention"]})


def _mapping_schedule_worker(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh

    input_ids, mask, _ = tiny_batch(4, 10)
    mapping = _mask_mapping(tiny_model("gemma2"), input_ids, mask)
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("pp",))
    return schedule_step_parity(mesh, "gemma2", step_kwargs={"causal_mask_mapping": mapping})[0]


def test_causal_mask_mapping_through_1f1b_matches_unsplit():
    # schedule.step splits every mask of the mapping into microbatches, like the padding mask.
    assert run_distributed(_mapping_schedule_worker, 2, timeout_s=600) == [None, None]

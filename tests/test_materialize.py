"""Per-stage materialisation: a meta-device model, each stage reading only its own tensors."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hf_pp.safetensors_reader as reader
from hf_pp.architectures import module_fqns_per_stage
from hf_pp.errors import PipelineConfigError
from hf_pp.functional import build_stage_modules
from hf_pp.materialize import (
    check_dtype_runs, materialize_stage, meta_model, meta_model_from_pretrained, missing_checkpoint_tensors,
    resolve_dtype,
)
from hf_pp.preflight import check_model_weights
from hf_pp.safetensors_reader import CheckpointIndex
from hf_pp.split import copy_stage_module
from helpers.trainer_fixtures import tiny_llama


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def saved(request, tmp_path_factory):
    """(directory, the model saved there): sharded into many small files, like a real checkpoint."""
    model = tiny_llama(num_layers=4, tie=request.param)
    directory = str(tmp_path_factory.mktemp("ckpt"))
    model.save_pretrained(directory, max_shard_size="30KB")
    return directory, model


def _record_reads(monkeypatch) -> list:
    reads = []
    original = reader._read_tensor

    def recording(f, entry, target):
        reads.append(entry)
        return original(f, entry, target)

    monkeypatch.setattr(reader, "_read_tensor", recording)
    return reads


@pytest.mark.parametrize("num_stages", [2, 4])
def test_each_stage_reads_exactly_its_tensors_and_matches_the_whole_model(saved, num_stages, monkeypatch):
    directory, whole = saved
    assert len([f for f in os.listdir(directory) if f.endswith(".safetensors")]) > 1
    meta = meta_model_from_pretrained(directory)
    assert all(p.is_meta for p in meta.parameters())
    index = CheckpointIndex(directory)
    by_entry = {entry: key for key, entry in index.entries.items()}
    reference = dict(whole.state_dict())
    reference.update(dict(whole.named_buffers()))
    fqns = module_fqns_per_stage(meta, num_stages)
    for stage, stage_fqns in enumerate(fqns):
        reads = _record_reads(monkeypatch)
        (part,) = build_stage_modules(meta, fqns, [stage], "cpu", weights_dir=directory)
        held = dict(part.state_dict())
        held.update(dict(part.named_buffers()))
        # No tensor of another stage is ever read, and nothing is read twice.
        read_keys = [by_entry[e] for e in reads]
        assert len(read_keys) == len(set(read_keys))
        tied_source = {"model.embed_tokens.weight"} if "lm_head.weight" in held and whole.config.tie_word_embeddings else set()
        assert set(read_keys) <= set(held) | tied_source, f"stage {stage} read {set(read_keys) - set(held)}"
        assert not any(p.is_meta for p in part.parameters()) and not any(b.is_meta for b in part.buffers())
        for name, tensor in held.items():
            torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0, msg=f"stage {stage} {name}")
    # The stages together hold every tensor.
    covered = set().union(*(set(copy_stage_module(meta, f).state_dict()) for f in fqns))
    assert covered == set(whole.state_dict())


def test_stage_forward_after_materialisation_matches_whole_model(saved):
    directory, whole = saved
    meta = meta_model_from_pretrained(directory)
    fqns = module_fqns_per_stage(meta, 2)
    first, last = build_stage_modules(meta, fqns, [0, 1], "cpu", weights_dir=directory)
    ids = torch.randint(1, 64, (2, 9))
    with torch.no_grad():
        logits = last(first(ids))
        torch.testing.assert_close(logits, whole(ids).logits)


def test_load_in_bfloat16_casts_like_from_pretrained(saved):
    directory, whole = saved
    meta = meta_model_from_pretrained(directory, dtype="bfloat16")
    part = materialize_stage(copy_stage_module(meta, module_fqns_per_stage(meta, 2)[1]), "cpu", CheckpointIndex(directory))
    assert part.lm_head.weight.dtype == torch.bfloat16
    torch.testing.assert_close(part.lm_head.weight, whole.lm_head.weight.to(torch.bfloat16), rtol=0, atol=0)
    # Rotary frequencies are recomputed on the device, as from_pretrained does.
    torch.testing.assert_close(part.model.rotary_emb.inv_freq, whole.model.rotary_emb.inv_freq)


def test_random_init_without_checkpoint_is_seeded_per_stage_and_like_the_model_class():
    config = tiny_llama().config
    torch.manual_seed(5)
    a = build_stage_modules(meta_model(config), module_fqns_per_stage(meta_model(config), 2), [0, 1], "cpu")
    torch.manual_seed(5)
    b = build_stage_modules(meta_model(config), module_fqns_per_stage(meta_model(config), 2), [1], "cpu")
    torch.testing.assert_close(a[1].lm_head.weight, b[0].lm_head.weight, rtol=0, atol=0)  # replicas agree
    assert not torch.equal(a[0].model.layers[0].mlp.up_proj.weight, a[1].model.layers[2].mlp.up_proj.weight)
    std = a[1].lm_head.weight.std().item()
    assert abs(std - config.initializer_range) < 0.005
    assert torch.equal(a[1].model.norm.weight, torch.ones_like(a[1].model.norm.weight))


def test_lora_on_a_meta_model_gets_peft_init_and_base_weights(saved):
    from peft import LoraConfig, get_peft_model

    from hf_pp.peft_utils import make_adapter_initializer

    directory, whole = saved
    peft_model = get_peft_model(meta_model_from_pretrained(directory), LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    base = peft_model.get_base_model()
    assert missing_checkpoint_tensors(base, CheckpointIndex(directory)) == []
    fqns = module_fqns_per_stage(base, 2)
    parts = build_stage_modules(base, fqns, [0, 1], "cpu", weights_dir=directory,
                                init_adapters=make_adapter_initializer(peft_model.peft_config))
    q = parts[0].model.layers[0].self_attn.q_proj
    assert torch.equal(q.base_layer.weight, whole.model.layers[0].self_attn.q_proj.weight)
    assert torch.count_nonzero(q.lora_B.default.weight) == 0 and q.lora_A.default.weight.std() > 0
    head = parts[1].lm_head
    assert torch.equal(head.base_layer.weight, whole.lm_head.weight)
    with torch.no_grad():  # B = 0: the adapted model starts as the base model
        ids = torch.randint(1, 64, (1, 7))
        torch.testing.assert_close(parts[1](parts[0](ids)), whole(ids).logits)


def test_adapters_that_need_base_weights_are_refused_before_the_split(saved):
    from peft import IA3Config, LoraConfig, get_peft_model

    from hf_pp.peft_utils import check_adapters_can_initialize, check_peft_config_can_initialize

    directory, _ = saved
    dora = LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)
    ia3 = IA3Config(target_modules=["k_proj"], feedforward_modules=[])
    for config in (dora, ia3, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa")):
        with pytest.raises(PipelineConfigError, match="meta device"):
            check_peft_config_can_initialize(config)
    for config in (dora, ia3):  # a PeftModel the user built on the meta device
        peft_model = get_peft_model(meta_model_from_pretrained(directory), config)
        with pytest.raises(PipelineConfigError, match="meta device"):
            check_adapters_can_initialize(peft_model, peft_model.peft_config)


def test_missing_tensors_are_named(saved, tmp_path):
    directory, whole = saved
    state = {k: v.contiguous() for k, v in whole.state_dict().items()
             if k not in ("model.layers.3.mlp.down_proj.weight", "model.norm.weight", "lm_head.weight")}
    broken = tmp_path / "broken"
    broken.mkdir()
    save_file(state, str(broken / "model.safetensors"))
    whole.config.save_pretrained(str(broken))
    meta = meta_model_from_pretrained(str(broken))
    with pytest.raises(PipelineConfigError, match=r"model\.layers\.3\.mlp\.down_proj\.weight.*model\.norm\.weight"):
        check_model_weights(meta, "cpu", str(broken))
    fqns = module_fqns_per_stage(meta, 2)
    build_stage_modules(meta, fqns, [0], "cpu", weights_dir=str(broken))  # stage 0 has what it needs
    with pytest.raises(PipelineConfigError, match="lacks tensors this stage needs.*down_proj"):
        build_stage_modules(meta, fqns, [1], "cpu", weights_dir=str(broken))


def test_bad_directories_and_dtypes_get_clear_errors(saved, tmp_path):
    directory, whole = saved
    with pytest.raises(PipelineConfigError, match="no config.json"):
        meta_model_from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(whole.config.to_dict()))
    with pytest.raises(PipelineConfigError, match="safetensors"):
        CheckpointIndex(str(tmp_path))
    with pytest.raises(PipelineConfigError, match="cannot run torch.float8_e4m3fn"):
        check_dtype_runs(torch.float8_e4m3fn, "cpu")
    with pytest.raises(PipelineConfigError, match="floating-point"):
        check_dtype_runs(torch.int64, "cpu")
    with pytest.raises(PipelineConfigError, match="not one of"):
        resolve_dtype("float64")
    with pytest.raises(PipelineConfigError, match="already has weights"):
        build_stage_modules(whole, module_fqns_per_stage(whole, 2), [0], "cpu", weights_dir=directory)
    # A checkpoint of another config: shapes disagree.
    other = tiny_llama(num_layers=4)
    other.config.hidden_size = 16
    with pytest.raises(PipelineConfigError, match="shape"):
        small = AutoModelForCausalLM.from_config(other.config)
        small_dir = tmp_path / "small"
        small.save_pretrained(str(small_dir))
        meta = meta_model_from_pretrained(directory)
        materialize_stage(meta, "cpu", CheckpointIndex(str(small_dir)))


def test_reader_fills_cpu_tensors_in_place(saved):
    directory, whole = saved
    index = CheckpointIndex(directory)
    target = torch.empty_like(whole.model.norm.weight)
    pointer = target.data_ptr()
    index.read_into({"model.norm.weight": target})
    assert target.data_ptr() == pointer and torch.equal(target, whole.model.norm.weight)
    loaded = load_file(index.entries["model.norm.weight"].path)
    assert torch.equal(loaded["model.norm.weight"], target)

"""Real checkpoints in and out: mixture-of-experts layouts through transformers' own conversion, per stage,
saves in the layout save_pretrained writes, and hub ids resolved from an offline cache."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers.distributed import run_distributed
from helpers.hf_models import tiny_batch, tiny_model
from hf_pp.architectures import module_fqns_per_stage
from hf_pp.checkpoint import stage_state_dict
from hf_pp.errors import PipelineConfigError
from hf_pp.functional import build_stage_modules
from hf_pp.materialize import meta_model_from_pretrained
from hf_pp.safetensors_reader import CheckpointIndex

# Every causal-LM type of the sweep whose on-disk layout differs from memory in transformers 5.24
# (a WeightConverter in its conversion mapping: experts stored one by one, fused in memory), but the two
# hf_pp refuses to split at all (deepseek_v4's hyper-connections, hrm_text's recurrent cycles: see
# docs/architectures.md).
CONVERTED_MODEL_TYPES = [
    "afmoe", "axk1", "axk2", "bailing_hybrid", "beam", "cohere2_moe", "deepseek_v2", "deepseek_v3", "deepseek_v32",
    "dots1", "dots3_note_text", "ernie4_5_moe", "exaone_moe", "flex_olmo", "flint", "glm4_moe",
    "glm4_moe_lite", "glm_moe_dsa", "hy_v3", "kimi_linear", "kolibri1", "laguna", "lara_mini",
    "longcat_flash", "mellum", "mimo_v2_flash", "minimax", "minimax_m2", "mixtral", "olmo_hybrid", "qwen2_moe",
    "qwen3_5_moe_text", "qwen3_moe", "qwen3_next", "sarvam_mla", "sarvam_moe", "solar_open", "olmoe",
    "hunyuan_v1_moe", "phimoe",
]
# Trained through PipelineTrainer against Trainer (a spread of routers, MLA and shared experts).
TRAINED_MODEL_TYPES = ["mixtral", "qwen3_moe", "olmoe", "deepseek_v3", "qwen2_moe", "glm4_moe",
                       # and MoE types whose files already hold the in-memory layout (fused or per-module)
                       "deepseek_v2", "gpt_oss", "granitemoe", "jetmoe"]


def _disk_tensors(directory: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(directory, name)))
    return tensors


def _has_converter(model) -> bool:
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter

    return any(isinstance(t, WeightConverter) for t in get_model_conversion_mapping(model))


@pytest.mark.slow
@pytest.mark.parametrize("model_type", CONVERTED_MODEL_TYPES)
def test_each_stage_of_a_converted_checkpoint_holds_from_pretrained_tensors_and_saves_them_back(tmp_path, model_type):
    model = tiny_model(model_type)
    assert _has_converter(model), f"{model_type} no longer converts its checkpoint: update CONVERTED_MODEL_TYPES"
    for layout in ("original", "fused"):
        directory = str(tmp_path / layout)
        model.save_pretrained(directory, max_shard_size="40KB", save_original_format=layout == "original")
        disk = _disk_tensors(directory)
        if layout == "original":
            assert set(disk) != set(model.state_dict()), "the original layout differs from the model's names"
        reference = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").state_dict()
        meta = meta_model_from_pretrained(directory)
        for pp in (2, 4):
            fqns = module_fqns_per_stage(meta, pp)
            index = CheckpointIndex(directory)
            saved: dict[str, torch.Tensor] = {}
            for stage in range(pp):
                (part,) = build_stage_modules(meta, fqns, [stage], "cpu", weights_dir=index)
                for name, tensor in part.state_dict().items():
                    torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0,
                                               msg=lambda m: f"{layout} pp={pp} stage {stage} {name}: {m}")
                saved.update(stage_state_dict([part]))
            # What the stages write together is what save_pretrained wrote (its default, original layout).
            original = _disk_tensors(str(tmp_path / "original"))
            assert set(saved) == set(original), f"{layout} pp={pp}: {sorted(set(saved) ^ set(original))[:6]}"
            for name, tensor in saved.items():
                torch.testing.assert_close(tensor, original[name], rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


def test_a_missing_expert_tensor_is_named(tmp_path):
    model = tiny_model("mixtral")
    model.save_pretrained(str(tmp_path))
    path = tmp_path / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["model.layers.1.block_sparse_moe.experts.2.w1.weight"]
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
    meta = meta_model_from_pretrained(str(tmp_path))
    fqns = module_fqns_per_stage(meta, 2)
    with pytest.raises(PipelineConfigError, match="model.layers.1.mlp.experts.gate_up_proj"):
        build_stage_modules(meta, fqns, [0, 1], "cpu", weights_dir=str(tmp_path))


# ---- hub ids -----------------------------------------------------------------
def fake_hub_cache(hub_dir: str, repo_id: str, model, max_shard_size: str = "40KB") -> str:
    """A huggingface_hub cache holding ``model`` as ``repo_id`` (what a download would have left), sharded."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = os.path.join(hub_dir, "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", commit)
    model.save_pretrained(snapshot, max_shard_size=max_shard_size)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)
    return snapshot


def test_a_hub_id_loads_per_stage_reading_only_the_shards_of_each_stage(tmp_path):
    cache = str(tmp_path / "hub")
    snapshot = fake_hub_cache(cache, "org/tiny-moe", tiny_model("mixtral"))
    hub = {"cache_dir": cache, "local_files_only": True}
    with open(os.path.join(snapshot, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    assert len(set(weight_map.values())) > 3
    reference = AutoModelForCausalLM.from_pretrained("org/tiny-moe", **hub).state_dict()
    meta = meta_model_from_pretrained("org/tiny-moe", **hub)
    fqns = module_fqns_per_stage(meta, 2)
    for stage in range(2):
        index = CheckpointIndex("org/tiny-moe", **hub)
        (part,) = build_stage_modules(meta, fqns, [stage], "cpu", weights_dir=index)
        for name, tensor in part.state_dict().items():
            torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0)
        own = set(stage_state_dict([part]))  # its tensors in the on-disk names
        assert index.files_used == {weight_map[k] for k in own}, f"stage {stage} opened {index.files_used}"


def test_a_hub_id_missing_offline_says_which_and_how_to_fetch(tmp_path):
    with pytest.raises(PipelineConfigError, match="org/absent"):
        meta_model_from_pretrained("org/absent", cache_dir=str(tmp_path), local_files_only=True)
    with pytest.raises(PipelineConfigError, match="from_pretrained_kwargs takes the keywords"):
        from hf_pp.materialize import check_hub_kwargs

        check_hub_kwargs({"dtype": "bfloat16"})


# ---- through the trainer: Trainer parity, saves, hub ids ------------------------
COMMON = dict(max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, save_strategy="no",
              report_to="none", use_cpu=True, seed=0, disable_tqdm=True, max_grad_norm=1.0)


class _Batches(torch.utils.data.Dataset):
    def __init__(self):
        ids, mask, labels = tiny_batch(batch=16, seq=10)
        self.rows = [{"input_ids": i, "attention_mask": m, "labels": lab} for i, m, lab in zip(ids, mask, labels)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _trained(trainer, output_dir):
    trainer.train()
    trainer.save_model(output_dir)
    return [h for h in trainer.state.log_history if "loss" in h]


def _pipeline_worker(rank, world_size, root, model_types, hub_id):
    from hf_pp import PipelineTrainer, PipelineTrainingArguments

    out = {}
    for model_type in model_types:
        args = PipelineTrainingArguments(output_dir=os.path.join(root, "runs"), pp_size=2, **COMMON)
        trainer = PipelineTrainer(model=os.path.join(root, "src", model_type), args=args, train_dataset=_Batches())
        out[model_type] = _trained(trainer, os.path.join(root, "pp", model_type))
    # A hub id, resolved from the offline cache this process was started with (HF_HOME, HF_HUB_OFFLINE=1).
    args = PipelineTrainingArguments(output_dir=os.path.join(root, "runs"), pp_size=2, **{**COMMON, "max_steps": 1})
    trainer = PipelineTrainer(model=hub_id, args=args, train_dataset=_Batches(),
                              from_pretrained_kwargs={"revision": "main"})
    out["hub"] = ({n: p.detach().clone() for n, p in trainer.model.original_named_parameters()},
                  sorted(trainer._pp_weights_dir.files_used))
    return out


@pytest.mark.slow
def test_pipeline_trainer_on_converted_checkpoints_and_a_hub_id_matches_trainer(tmp_path, monkeypatch):
    from transformers import Trainer, TrainingArguments

    references = {}
    for model_type in TRAINED_MODEL_TYPES:
        source = str(tmp_path / "src" / model_type)
        tiny_model(model_type).save_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, attn_implementation="eager")
        trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "ref-runs"), **COMMON),
                          train_dataset=_Batches())
        references[model_type] = _trained(trainer, str(tmp_path / "ref" / model_type))
    hub_home = tmp_path / "home"
    fake_hub_cache(str(hub_home / "hub"), "org/tiny-moe", tiny_model("qwen3_moe"), max_shard_size="20KB")
    monkeypatch.setenv("HF_HOME", str(hub_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    per_rank = run_distributed(_pipeline_worker, 2, str(tmp_path), TRAINED_MODEL_TYPES, "org/tiny-moe", timeout_s=600)
    for model_type in TRAINED_MODEL_TYPES:
        ref_logs = references[model_type]
        for rank, out in enumerate(per_rank):
            for key in ("loss", "grad_norm"):
                torch.testing.assert_close(torch.tensor([h[key] for h in out[model_type]]),
                                           torch.tensor([h[key] for h in ref_logs]), rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"{model_type} rank {rank} {key}: {m}")
        # The pipelined save holds what Trainer's save_model wrote for the same weights: keys and tensors.
        ours, theirs = _disk_tensors(str(tmp_path / "pp" / model_type)), _disk_tensors(str(tmp_path / "ref" / model_type))
        assert set(ours) == set(theirs), f"{model_type}: {sorted(set(ours) ^ set(theirs))[:6]}"
        for name, tensor in ours.items():
            torch.testing.assert_close(tensor, theirs[name], rtol=1e-5, atol=1e-5, msg=lambda m: f"{model_type} {name}: {m}")
    snapshot = next((hub_home / "hub" / "models--org--tiny-moe" / "snapshots").iterdir())
    reference = AutoModelForCausalLM.from_pretrained(str(snapshot)).state_dict()
    with open(snapshot / "model.safetensors.index.json") as f:
        all_files = set(json.load(f)["weight_map"].values())
    opened = [set(out["hub"][1]) for out in per_rank]
    assert opened[0] != opened[1] and opened[0] | opened[1] == all_files, opened  # each rank its own shards
    for out in per_rank:
        assert out["hub"][0], "every rank holds a stage"
        for name, tensor in out["hub"][0].items():
            torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0, msg=lambda m: f"hub {name}: {m}")
    shutil.rmtree(tmp_path / "runs", ignore_errors=True)


def test_the_planner_takes_a_hub_id_from_the_offline_cache(tmp_path):
    import subprocess
    import sys

    fake_hub_cache(str(tmp_path / "hub"), "org/tiny-moe", tiny_model("mixtral"))
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "hf_pp", "plan", "org/tiny-moe", "--pp", "2"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "MixtralForCausalLM" in done.stdout and "model.layers.2-3" in done.stdout, done.stdout
    missing = subprocess.run([sys.executable, "-m", "hf_pp", "plan", "org/absent", "--pp", "2"], env=env,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "offline" in missing.stderr and "org/absent" in missing.stderr, missing.stderr


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=4, n_head=4, n_positions=64))


@pytest.mark.parametrize("kind", ["tied_llama", "gpt2_conv1d", "bf16_llama", "bf16_mixtral"])
def test_stage_saves_equal_save_pretrained_for_tied_conv1d_and_bf16_models(tmp_path, kind):
    from helpers.trainer_fixtures import tiny_llama

    model = {"tied_llama": lambda: tiny_llama(tie=True), "gpt2_conv1d": _tiny_gpt2,
             "bf16_llama": lambda: tiny_llama().to(torch.bfloat16),
             "bf16_mixtral": lambda: tiny_model("mixtral").to(torch.bfloat16)}[kind]()
    directory = str(tmp_path / "saved")
    model.save_pretrained(directory)
    original = _disk_tensors(directory)
    meta = meta_model_from_pretrained(directory)
    fqns = module_fqns_per_stage(meta, 2)
    parts = build_stage_modules(meta, fqns, [0, 1], "cpu", weights_dir=directory)
    from hf_pp.grads import tied_copies_to_skip
    from hf_pp.split import tied_parameter_groups

    saved = stage_state_dict(parts, drop=tied_copies_to_skip(tied_parameter_groups(meta)))  # as save_model drops
    assert set(saved) == set(original), sorted(set(saved) ^ set(original))[:6]
    for name, tensor in saved.items():
        assert tensor.dtype == original[name].dtype, name
        torch.testing.assert_close(tensor, original[name], rtol=0, atol=0, msg=lambda m: f"{kind} {name}: {m}")


def test_a_conversion_transformers_cannot_invert_names_the_tensor_and_version(monkeypatch):
    import transformers.core_model_loading as loading

    from hf_pp.weight_conversion import original_layout

    def broken(model, state_dict):
        raise RuntimeError("cannot split model.layers.0.mlp.experts.gate_up_proj")

    monkeypatch.setattr(loading, "revert_weight_conversion", broken)
    with pytest.raises(PipelineConfigError, match=r"transformers 5\.\d+\.\d+ could not write MixtralForCausalLM.*gate_up_proj"):
        original_layout(tiny_model("mixtral"), {"model.norm.weight": torch.ones(32)})

"""PEFT adapters across pipeline stages: same training as Trainer + PEFT, exported as a normal adapter
that reproduces the pipeline's logits; methods or setups the stages cannot hold are refused clearly."""

import os

import pytest
import torch
import torch.nn as nn
from peft import (
    IA3Config, LoKrConfig, LoraConfig, PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig,
    get_peft_model,
)
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import ModulesToSaveWrapper
from transformers import Trainer, TrainingArguments

from helpers.distributed import run_distributed
from hf_pp import PipelineTrainer, PipelineTrainingArguments
from hf_pp.errors import PipelineConfigError
from hf_pp.peft_utils import (
    active_adapter_name, adapter_subdir, check_peft_config_can_initialize, check_peft_model_can_split,
    save_pipeline_adapter,
)
from helpers.trainer_fixtures import CountingDataset, pad_collator, tiny_llama

COMMON = dict(
    max_steps=6, gradient_accumulation_steps=2, per_device_train_batch_size=4, max_grad_norm=0.5,
    learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
    disable_tqdm=True,
)

ADAPTERS = {
    "lora_all_linear": lambda: LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0),
    "dora_head": lambda: LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], use_dora=True,
                                    modules_to_save=["lm_head"]),
    "ia3": lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    # On a model with tied input/output embeddings (frozen: they must get no gradient).
    "lora_tied_model": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"]),
    # A trained copy of the embeddings, on the first stage only.
    "lora_embed_save": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                          modules_to_save=["embed_tokens"]),
    "lokr": lambda: LoKrConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
    # An adapter not called "default": saved under its own name, in its subdirectory, as PEFT does.
    "lora_named_adapter": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj"]),
}
ADAPTER_NAMES = {"lora_named_adapter": "sql"}
# Fixed-length samples, one eval batch: the pipeline's logits on it are compared with the exported adapter's.
PROBE = CountingDataset(size=4, min_len=8, max_len=8, seed=3)


def peft_llama(kind: str, num_layers: int = 4):
    # eager: at lr 1e-2 Adam turns sdpa's different float reassociation into weight differences just over this
    # file's 1e-5 bound; sdpa itself is held to Trainer by test_trainer_parity.
    model = tiny_llama(num_layers, tie=kind == "lora_tied_model", attn_implementation="eager")
    torch.manual_seed(1)  # the same adapter initialisation in every process
    return get_peft_model(model, ADAPTERS[kind](), adapter_name=ADAPTER_NAMES.get(kind, "default"))


def _probe_logits(model) -> torch.Tensor:
    batch = pad_collator([PROBE[i] for i in range(len(PROBE))])
    with torch.no_grad():
        return model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _trainable(model) -> dict:
    return {n.replace("base_model.model.", "", 1): p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _reference(kind, output_dir):
    model = peft_llama(kind)
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=output_dir, **COMMON),
                      train_dataset=CountingDataset(), data_collator=pad_collator)
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h], _trainable(model)


def _pipeline_worker(rank, world_size, output_dir, kinds, schedule):
    results = {}
    for kind in kinds:
        args = PipelineTrainingArguments(output_dir=output_dir, pp_size=world_size, pp_schedule=schedule, **COMMON)
        trainer = PipelineTrainer(model=peft_llama(kind), args=args, train_dataset=CountingDataset(),
                                  data_collator=pad_collator)
        trainer.train()
        trainable = {n: p.detach().clone() for n, p in trainer.model.original_named_parameters() if p.requires_grad}
        frozen_with_grad = [n for n, p in trainer.model.original_named_parameters() if not p.requires_grad and p.grad is not None]
        optimized = sum(len(g["params"]) for g in trainer.optimizer.param_groups)
        adapter_dir = os.path.join(output_dir, f"adapter-{kind}")
        trainer.save_model(adapter_dir)
        logits = torch.as_tensor(trainer.predict(PROBE).predictions)
        results[kind] = dict(logs=[h for h in trainer.state.log_history if "loss" in h], trainable=trainable,
                             frozen_with_grad=frozen_with_grad, optimized=optimized, adapter_dir=adapter_dir,
                             logits=logits)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("world_size,schedule", [(2, "1f1b"), (4, "1f1b"), (2, "interleaved_1f1b")])
def test_peft_pipeline_matches_trainer_and_exports_a_normal_adapter(tmp_path, world_size, schedule):
    kinds = list(ADAPTERS)  # every method at pp=2 and pp=4 with 1F1B, and interleaved
    per_rank = run_distributed(_pipeline_worker, world_size, str(tmp_path), kinds, schedule, timeout_s=600)
    for kind in kinds:
        ref_logs, ref_trainable = _reference(kind, str(tmp_path / f"ref-{kind}"))
        seen = {}
        for rank, out in enumerate(per_rank):
            r = out[kind]
            for key in ("loss", "grad_norm"):
                torch.testing.assert_close(torch.tensor([h[key] for h in r["logs"]]),
                                           torch.tensor([h[key] for h in ref_logs]), rtol=1e-5, atol=1e-7,
                                           msg=lambda m: f"{kind} rank {rank} {key}: {m}")
            assert r["frozen_with_grad"] == [], f"{kind}: frozen base weights got gradients"
            assert r["optimized"] == len(r["trainable"]), f"{kind}: optimizer holds non-adapter parameters"
            seen.update(r["trainable"])
        assert sorted(seen) == sorted(ref_trainable), f"{kind}: adapters missing from the stages"
        # atol 1e-5 as in test_trainer_parity: Adam divides by sqrt(v), so float reassociation in a
        # near-zero gradient element can move that weight by a few 1e-6 (losses above are rtol 1e-5).
        for name, value in seen.items():
            torch.testing.assert_close(value, ref_trainable[name], rtol=1e-5, atol=1e-5, msg=lambda m: f"{kind} {name}: {m}")
        # The exported directory is an ordinary adapter: load it in this process onto a fresh base model.
        name = ADAPTER_NAMES.get(kind, "default")
        adapter_dir = adapter_subdir(per_rank[0][kind]["adapter_dir"], name)
        assert sorted(f for f in os.listdir(adapter_dir) if f.startswith("adapter_")) == [
            "adapter_config.json", "adapter_model.safetensors"], f"{kind}: {os.listdir(adapter_dir)}"
        loaded = PeftModel.from_pretrained(tiny_llama(tie=kind == "lora_tied_model", attn_implementation="eager"),
                                           adapter_dir, adapter_name=name)
        loaded_params = {n.replace("base_model.model.", "", 1): p for n, p in loaded.named_parameters()}
        for pname, value in ref_trainable.items():
            torch.testing.assert_close(loaded_params[pname], value, rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{kind} loaded {pname}: {m}")
        # Round trip: the loaded adapter, and the base model with it merged in, give the pipeline's logits.
        logits = per_rank[0][kind]["logits"]
        for rank, out in enumerate(per_rank):
            torch.testing.assert_close(out[kind]["logits"], logits, rtol=0, atol=0, msg=lambda m: f"{kind} rank {rank}: {m}")
        torch.testing.assert_close(_probe_logits(loaded), logits, rtol=1e-5, atol=1e-6, msg=lambda m: f"{kind} loaded: {m}")
        merged = loaded.merge_and_unload()
        left = [n for n, m in merged.named_modules() if isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper))]
        assert not isinstance(merged, PeftModel) and left == [], f"{kind}: adapter modules left after merging: {left}"
        torch.testing.assert_close(_probe_logits(merged), logits, rtol=1e-5, atol=1e-6, msg=lambda m: f"{kind} merged: {m}")


# Clipping must act in the DP runs (LoRA grad norms here are about 0.2-0.35).
DP_COMMON = {**COMMON, "max_grad_norm": 0.1}


def _dp_peft_worker(rank, world_size, output_dir, modes):
    out = {}
    for mode in modes:
        args = PipelineTrainingArguments(output_dir=output_dir, pp_size=2, pp_data_parallel=mode, **DP_COMMON)
        trainer = PipelineTrainer(model=peft_llama("lora_all_linear"), args=args, train_dataset=CountingDataset(),
                                  data_collator=pad_collator)
        trainer.train()
        adapter_dir = os.path.join(output_dir, f"adapter-{mode}")
        trainer.save_model(adapter_dir)
        out[mode] = [h for h in trainer.state.log_history if "loss" in h], adapter_dir
    return out


@pytest.mark.slow
def test_lora_with_pp2_x_dp2_fsdp_and_ddp_matches_trainer_on_the_global_batch(tmp_path):
    model = peft_llama("lora_all_linear")
    ref_args = {**DP_COMMON, "per_device_train_batch_size": 2 * DP_COMMON["per_device_train_batch_size"]}
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "ref"), **ref_args),
                      train_dataset=CountingDataset(), data_collator=pad_collator)
    trainer.train()
    ref_logs, ref_trainable = [h for h in trainer.state.log_history if "loss" in h], _trainable(model)
    assert all(h["grad_norm"] > DP_COMMON["max_grad_norm"] for h in ref_logs), "clipping must act in this test"
    modes = ("fsdp", "ddp")
    for rank, out in enumerate(run_distributed(_dp_peft_worker, 4, str(tmp_path), modes, timeout_s=600)):
        for mode in modes:
            logs, adapter_dir = out[mode]
            for key in ("loss", "grad_norm"):
                torch.testing.assert_close(torch.tensor([h[key] for h in logs]), torch.tensor([h[key] for h in ref_logs]),
                                           rtol=1e-5, atol=1e-7, msg=lambda m: f"{mode} rank {rank} {key}: {m}")
    for mode in modes:
        loaded = PeftModel.from_pretrained(tiny_llama(attn_implementation="eager"),
                                           os.path.join(str(tmp_path), f"adapter-{mode}"))
        for name, value in loaded.named_parameters():
            short = name.replace("base_model.model.", "", 1)
            if "lora_" in name:
                torch.testing.assert_close(value, ref_trainable[short], rtol=1e-5, atol=1e-5,
                                           msg=lambda m: f"{mode} {name}: {m}")


# ---- parameter counts -------------------------------------------------------------------------------
COUNTED = ("lora_all_linear", "lora_embed_save", "ia3")


def _counts_worker(rank, world_size, build_on):
    from torch.distributed.device_mesh import init_device_mesh

    from hf_pp import AutoPipeline
    from hf_pp.losses import causal_lm_loss

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("pp",))
    out = {}
    for kind in COUNTED:
        model = peft_llama(kind)
        ap = AutoPipeline(mesh, pp_batch_size=2, dp_axis_names=None)
        ap.build(model if build_on == "peft_model" else model.get_base_model(), loss_fn=causal_lm_loss)
        out[kind] = dict(trainable=ap.get_total_param_count(trainable_only=True), total=ap.get_total_param_count(),
                         stages=ap.get_stage_param_counts(trainable_only=True))
    return out


def _assert_counts_match_peft(per_rank, capsys):
    for kind in COUNTED:
        model = peft_llama(kind)
        trainable, total = model.get_nb_trainable_parameters()
        capsys.readouterr()
        model.print_trainable_parameters()
        printed = capsys.readouterr().out
        assert f"trainable params: {trainable:,} || all params: {total:,}" in printed, printed
        for rank, counts in enumerate(per_rank):
            assert counts[kind]["trainable"] == trainable, f"{kind} rank {rank}: {counts[kind]} vs PEFT {trainable}"
            assert counts[kind]["total"] == total, f"{kind} rank {rank}: {counts[kind]} vs PEFT {total}"
            assert sum(counts[kind]["stages"]) == trainable and all(c > 0 for c in counts[kind]["stages"]), counts[kind]


@pytest.mark.slow
def test_autopipeline_trainable_count_equals_print_trainable_parameters(capsys):
    # AutoPipeline splits the Hugging Face model inside the PeftModel (as PipelineTrainer does).
    _assert_counts_match_peft(run_distributed(_counts_worker, 2, "base_model"), capsys)


@pytest.mark.slow
def test_autopipeline_builds_a_peft_model_itself_and_counts_like_peft(capsys):
    _assert_counts_match_peft(run_distributed(_counts_worker, 2, "peft_model"), capsys)


# ---- what cannot be split is refused, before any collective --------------------------------------------
PROMPT_LEARNING = {
    "PROMPT_TUNING": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "PREFIX_TUNING": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "P_TUNING": lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16),
}


@pytest.mark.parametrize("method", sorted(PROMPT_LEARNING))
def test_prompt_learning_is_refused_naming_the_method_and_what_works(method):
    config = PROMPT_LEARNING[method]()
    with pytest.raises(PipelineConfigError, match=rf"{method}, a prompt-learning method.*LoRA.*IA3.*LoKr"):
        check_peft_model_can_split(get_peft_model(tiny_llama(), config))
    # The same refusal when PipelineTrainer(peft_config=...) would build it on the meta device.
    with pytest.raises(PipelineConfigError, match=rf"{method}, a prompt-learning method"):
        check_peft_config_can_initialize(PROMPT_LEARNING[method]())


def _two_adapters():
    model = peft_llama("lora_all_linear")
    model.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj"]))
    return model


def _adapter_outside_stages():
    base = tiny_llama()
    base.value_head = nn.Linear(32, 1)  # e.g. a value head added by hand: in no pipeline stage
    return get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "value_head"]))


def test_several_adapters_are_refused_naming_them():
    model = _two_adapters()
    with pytest.raises(PipelineConfigError, match=r"adapters \['default', 'other'\].*exactly one.*delete_adapter"):
        check_peft_model_can_split(model)
    with pytest.raises(PipelineConfigError, match="exactly one"):
        active_adapter_name(model)
    # save refuses before its first collective: here there is no process group at all to reach.
    with pytest.raises(PipelineConfigError, match="exactly one"):
        save_pipeline_adapter("unused", model, [model.get_base_model()], None)
    model.delete_adapter("other")
    check_peft_model_can_split(model)
    assert active_adapter_name(peft_llama("lora_named_adapter")) == "sql"


def test_adapters_on_modules_no_stage_holds_are_refused_naming_them():
    with pytest.raises(PipelineConfigError, match=r"no pipeline stage holds: \['value_head'\]"):
        check_peft_model_can_split(_adapter_outside_stages())
    # An explicit stage plan: layer 3 left out names its adapted projections.
    plan = [["model.embed_tokens", "model.layers.0", "model.layers.1"], ["model.layers.2", "model.norm", "lm_head"]]
    with pytest.raises(PipelineConfigError, match=r"model\.layers\.3\.self_attn\.q_proj"):
        check_peft_model_can_split(peft_llama("lora_all_linear"), plan)
    check_peft_model_can_split(peft_llama("lora_all_linear"), plan[:1] + [plan[1] + ["model.layers.3"]])
    check_peft_model_can_split(tiny_llama(), plan)  # not a PeftModel: nothing to refuse


BAD_MODELS = {
    "prompt_tuning": (lambda: get_peft_model(tiny_llama(), PROMPT_LEARNING["PROMPT_TUNING"]()), "PROMPT_TUNING"),
    "two_adapters": (_two_adapters, "exactly one"),
    "outside_stages": (_adapter_outside_stages, "no pipeline stage holds"),
}


def _refusal_worker(rank, world_size, output_dir):
    messages = {}
    for case, (build, _) in BAD_MODELS.items():
        args = PipelineTrainingArguments(output_dir=output_dir, pp_size=world_size, **COMMON)
        try:
            PipelineTrainer(model=build(), args=args, train_dataset=CountingDataset(), data_collator=pad_collator)
            messages[case] = None
        except PipelineConfigError as exc:
            messages[case] = str(exc)
    return messages


@pytest.mark.slow
def test_pipeline_trainer_refuses_unsplittable_peft_models_on_every_rank_alike(tmp_path):
    per_rank = run_distributed(_refusal_worker, 2, str(tmp_path), timeout_s=300)
    for case, (_, expected) in BAD_MODELS.items():
        assert per_rank[0][case] is not None and expected in per_rank[0][case], f"{case}: {per_rank[0][case]}"
        assert per_rank[1][case] == per_rank[0][case], case

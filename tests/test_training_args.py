"""PipelineTrainingArguments parse like TrainingArguments and refuse what pipelining cannot do."""

import json
from dataclasses import dataclass, field

import pytest
import torch
from accelerate.parallelism_config import ParallelismConfig
from transformers import HfArgumentParser

from hf_pp import PipelineConfigError, PipelineTrainer, PipelineTrainingArguments
from helpers.trainer_fixtures import tiny_llama

BASE = dict(output_dir="unused", report_to="none", use_cpu=True)


def test_parse_from_command_line_and_json(tmp_path):
    parser = HfArgumentParser(PipelineTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses([
        "--output_dir", "o", "--pp_size", "2", "--pp_schedule", "Interleaved1F1B", "--pp_layers_per_stage", "2",
        "--pp_microbatch_size", "2", "--per_device_train_batch_size", "8", "--pp_patch_inner_model", "false",
        "--report_to", "none", "--use_cpu",
    ])
    assert (args.pp_size, args.pp_schedule, args.pp_layers_per_stage, args.pp_patch_inner_model) == (2, "Interleaved1F1B", 2, False)
    assert args.pp_num_microbatches == 4
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"output_dir": "o", "pp_size": 4, "pp_schedule": "gpipe", "report_to": "none", "use_cpu": True}))
    (from_json,) = parser.parse_json_file(str(path))
    assert from_json.pp_size == 4 and from_json.pp_schedule == "gpipe"
    as_dict = args.to_dict()
    assert as_dict["pp_size"] == 2 and as_dict["pp_schedule"] == "Interleaved1F1B"
    assert "pp_size" in args.to_json_string()


def test_defaults_are_plain_trainer():
    args = PipelineTrainingArguments(**BASE)
    assert args.pp_size == 1 and args.pp_schedule == "1f1b" and args.pp_microbatch_size == 1


@pytest.mark.parametrize("kwargs, chosen", [
    (dict(pp_size=2, per_device_train_batch_size=8), 1),  # the bubble outweighs a microbatch's fixed cost
    (dict(pp_size=2, per_device_train_batch_size=64, pp_balance_seq_len=128), 2),  # many short samples
    (dict(pp_size=2, per_device_train_batch_size=64), 1),  # at the default 512 tokens
    (dict(pp_size=2, per_device_train_batch_size=64, pp_balance_seq_len=128, auto_find_batch_size=True), 1),
    (dict(pp_size=2, per_device_train_batch_size=6, pp_schedule="dual_pipe_v", pp_balance_seq_len=16), 1),  # m >= 4
    (dict(per_device_train_batch_size=64, pp_balance_seq_len=128), 1),  # no pipeline
])
def test_unset_microbatch_size_is_chosen_and_a_set_one_kept(kwargs, chosen):
    from hf_pp.cost_model import choose_microbatch_size, microbatch_step_estimate

    args = PipelineTrainingArguments(**BASE, **kwargs)
    assert args.pp_microbatch_size == chosen
    assert args.pp_num_microbatches == args.per_device_train_batch_size // chosen
    if args.pp_size > 1 and not args.auto_find_batch_size:
        seq = args.pp_balance_seq_len or 512
        assert chosen == choose_microbatch_size(args.per_device_train_batch_size, 2, seq, schedule=args.pp_schedule)
        if chosen > 1:  # chosen because the estimate says so: clearly faster than microbatches of one sample
            assert microbatch_step_estimate(64, chosen, 2, seq) < 0.98 * microbatch_step_estimate(64, 1, 2, seq)
    for size in (1, 2):  # set by the user: kept as given
        assert PipelineTrainingArguments(**BASE, **kwargs, pp_microbatch_size=size).pp_microbatch_size == size


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(pp_size=0), "pp_size must be at least 1"),
        (dict(pp_size=2, pp_schedule="2f2b"), "Unknown pipeline schedule"),
        (dict(pp_size=2, per_device_train_batch_size=6, pp_microbatch_size=4), "divisible by pp_microbatch_size"),
        (dict(pp_size=2, pp_microbatch_size=0), "pp_microbatch_size must be at least 1"),
        (dict(pp_size=2, pp_round_virtual_stages="nearest"), "'up', 'down'"),
        (dict(pp_size=2, fsdp="full_shard"), r'pp_data_parallel="fsdp".*parallelize_fn'),
        (dict(pp_size=2, fp16=True), "use bf16=True"),
    ],
)
def test_invalid_pipeline_settings_are_refused(kwargs, match):
    with pytest.raises(PipelineConfigError, match=match):
        PipelineTrainingArguments(**BASE, **kwargs)


def test_deepspeed_is_refused_with_pipelining():
    with pytest.raises(PipelineConfigError, match="deepspeed") as info:
        PipelineTrainingArguments(**BASE, pp_size=2, deepspeed={"train_batch_size": 1})
    # The message names what to use instead.
    for alternative in ('pp_data_parallel="fsdp"', 'pp_data_parallel="ddp"', "parallelize_fn", "pp_size=1"):
        assert alternative in str(info.value), (alternative, str(info.value))


def test_parallelism_config_is_refused_with_pipelining():
    with pytest.raises(PipelineConfigError, match=r"parallelism_config cannot be combined with pp_size > 1.*pp_\*"
                                                  r".*parallelize_fn"):
        PipelineTrainingArguments(**BASE, pp_size=2, parallelism_config=ParallelismConfig(dp_shard_size=2))


@dataclass
class GenerationArguments(PipelineTrainingArguments):
    """As a project mixing in Seq2SeqTrainingArguments' generation field would have it."""

    predict_with_generate: bool = field(default=False)


def test_predict_with_generate_is_refused_with_pipelining():
    assert GenerationArguments(**BASE, pp_size=1, predict_with_generate=True).predict_with_generate
    assert not GenerationArguments(**BASE, pp_size=2).predict_with_generate
    with pytest.raises(PipelineConfigError, match="predict_with_generate is not supported with pp_size > 1"):
        GenerationArguments(**BASE, pp_size=2, predict_with_generate=True)


@pytest.mark.parametrize(
    "world_size,kwargs,trainer_kwargs,match",
    [
        ("3", dict(pp_size=2), {}, "not divisible by pp_size=2"),
        ("8", dict(pp_size=8), {}, "larger than the model's 4 layers"),
        ("2", dict(pp_size=2), {"optimizers": ("an optimizer", None)}, "optimizer_cls_and_kwargs"),
    ],
)
def test_trainer_preflight_errors_before_any_process_group(monkeypatch, world_size, kwargs, trainer_kwargs, match):
    args = PipelineTrainingArguments(**BASE, **kwargs)
    monkeypatch.setenv("WORLD_SIZE", world_size)  # as torchrun would; no process group is started
    with pytest.raises(PipelineConfigError, match=match):
        PipelineTrainer(model=tiny_llama(), args=args, **trainer_kwargs)


def _llama_without_plan():
    model = tiny_llama()
    model.config.base_model_pp_plan = None  # as for an architecture transformers ships no pipeline plan for
    return model


@pytest.mark.parametrize("make_model", [_llama_without_plan, lambda: torch.nn.Sequential(torch.nn.Linear(2, 2))],
                         ids=["hf_without_plan", "plain_module"])
def test_model_without_a_split_asks_for_module_fqns_per_model_part(monkeypatch, make_model):
    args = PipelineTrainingArguments(**BASE, pp_size=2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(PipelineConfigError) as info:
        PipelineTrainer(model=make_model(), args=args)
    message = str(info.value)
    assert "PipelineTrainer(..., module_fqns_per_model_part=" in message, message
    assert "pp_balance='layers'" in message and "pp_patch_inner_model=False" in message, message


def test_explicit_plan_is_refused_with_a_balancing_mode(monkeypatch):
    args = PipelineTrainingArguments(**BASE, pp_size=2, pp_balance="params")
    monkeypatch.setenv("WORLD_SIZE", "2")
    plan = [["model.embed_tokens", "model.layers.0", "model.layers.1"], ["model.layers.2", "model.layers.3", "lm_head"]]
    with pytest.raises(PipelineConfigError, match="pp_balance='params' computes the stage plan itself"):
        PipelineTrainer(model=tiny_llama(), args=args, module_fqns_per_model_part=plan)


def test_explicit_plan_is_validated_before_any_process_group(monkeypatch):
    args = PipelineTrainingArguments(**BASE, pp_size=2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(PipelineConfigError, match="module_fqns_per_model_part has 3 stages, not a multiple of pp_size=2"):
        PipelineTrainer(model=tiny_llama(), args=args, module_fqns_per_model_part=[["model.embed_tokens"]] * 3)

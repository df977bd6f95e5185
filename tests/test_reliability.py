"""Bad input gets the same clear error on every rank, and nobody hangs.

One 2-rank spawn runs the whole matrix in a loop (each case must raise
PipelineConfigError with its message on both ranks; a case that reached a
collective on one rank only would hang the spawn, bounded by its guard).
"""

import os
import time
from contextlib import contextmanager

import pytest
import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.loss.loss_utils import ForCausalLMLoss

from helpers.distributed import run_distributed
from hf_pp import PipelineConfigError, PipelineTrainer, PipelineTrainingArguments
from hf_pp.parallelize import fsdp_parallelize_fn
from hf_pp.reliability import NonFiniteLossError
from test_data_parallel import resharding_parallelize_fn
from helpers.trainer_fixtures import CountingDataset, pad_collator, tiny_llama

BASE = dict(per_device_train_batch_size=2, max_steps=2, report_to="none", use_cpu=True, disable_tqdm=True,
            save_strategy="no", logging_strategy="no")


class ListDataset(Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _no_labels(features):
    batch = pad_collator(features)
    del batch["labels"]
    return batch


def _short_labels(features):
    batch = pad_collator(features)
    batch["labels"] = batch["labels"][:, :-1]
    return batch


def _tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2))


def _plain_module():
    return torch.nn.Sequential(torch.nn.Embedding(64, 16), torch.nn.Linear(16, 64))


def _fn_without_axis_keywords(model, world_mesh, moe_mesh=None, *, pp_enabled, dp_axis_names):
    return model


def _mixtral_with_router_loss():
    from helpers.hf_models import tiny_model

    return tiny_model("mixtral", output_router_logits=True)


@contextmanager
def _environment(overrides: dict[str, str]):
    """These environment variables for the block (a launch as torchrun would describe it), then the old ones."""
    saved = {name: os.environ.get(name) for name in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


# name -> (expected message part, argument overrides, trainer overrides); "rank" in a value makes it per rank.
ARG_CASES = {
    "pp_size_zero": ("pp_size must be at least 1", dict(pp_size=0)),
    "microbatch_zero": ("pp_microbatch_size must be at least 1", dict(pp_microbatch_size=0)),
    "round_bad": ("pp_round_virtual_stages must be", dict(pp_round_virtual_stages="sideways")),
    "dp_mode_bad": ("pp_data_parallel must be one of", dict(pp_data_parallel="zero3")),
    "schedule_unknown": ("nope", dict(pp_schedule="nope")),
    "batch_not_divisible": ("must be divisible by pp_microbatch_size", dict(per_device_train_batch_size=3, pp_microbatch_size=2)),
    "fp16": ("fp16 is not supported", dict(fp16=True)),
    "deepspeed": ("deepspeed cannot be combined", dict(deepspeed="ds.json")),
    "trainer_fsdp": ("fsdp cannot be combined", dict(fsdp="full_shard")),
}

TRAINER_CASES = {
    "world_not_divisible": ("not divisible by pp_size=4", dict(pp_size=4), {}),
    "cpu_without_use_cpu": ("2 processes were launched, but TrainingArguments runs 1", dict(use_cpu=False), {}),
    "more_stages_than_layers": ("larger than the model's 1 layers", {}, dict(layers=1)),
    "no_model": ("needs `model`", {}, dict(model=None)),
    "model_and_model_init": ("either `model` or `model_init`", {}, dict(model_init=lambda: tiny_llama())),
    "prebuilt_optimizer": ("optimizer built before the split", {}, dict(optimizer=True)),
    "too_few_microbatches": ("needs at least 2 microbatches", dict(per_device_train_batch_size=1), {}),
    # pp_microbatch_size set: left unset, the size is chosen among those the schedule accepts (5: one microbatch).
    "interleaved_rounds": ("multiple of", dict(pp_schedule="interleaved_1f1b", per_device_train_batch_size=5,
                                               pp_microbatch_size=1), {}),
    "layers_per_stage": ("layers", dict(pp_layers_per_stage=3), {}),
    "compile_backend": ("is not a torch.compile backend", dict(torch_compile_backend="no-such-backend"), {}),
    "checkpointing_zero_bubble": ("activation_checkpointing under ZBVZeroBubble",
                                  dict(activation_checkpointing=True, pp_schedule="zbv_zero_bubble",
                                       per_device_train_batch_size=4), {}),
    "fsdp_reshard_zero_bubble": ("reshard_after_forward=True", dict(pp_schedule="zbv_zero_bubble", per_device_train_batch_size=4),
                                 dict(parallelize_fn=fsdp_parallelize_fn(reshard_after_forward=True))),
    # Model types hf_pp cannot split by itself: refused by kind, before any layer count.
    "encoder_decoder": ("T5ForConditionalGeneration is an encoder-decoder model", {}, dict(make_model=_tiny_t5)),
    "module_without_plan": ("module_fqns_per_model_part=[[...], [...]]", {}, dict(make_model=_plain_module)),
    "schedule_needs_stages_per_rank": ("Multi-stage schedules need at least 2 stages per rank",
                                       dict(pp_schedule="interleaved_1f1b", pp_layers_per_stage=2), {}),
    "parallelize_fn_signature": ("lacks the keywords ['cp_axis_name', 'tp_axis_name', 'ep_axis_name']", {},
                                 dict(parallelize_fn=_fn_without_axis_keywords)),
    "user_fsdp_reshard_zero_bubble": ("reshard after forward", dict(pp_schedule="zbv_zero_bubble", per_device_train_batch_size=4),
                                      dict(parallelize_fn=resharding_parallelize_fn)),
    "empty_dataset": ("train_dataset is empty", {}, dict(dataset=ListDataset([]))),
    "drop_last_no_batch": ("fewer than one batch", dict(dataloader_drop_last=True, per_device_train_batch_size=4),
                           dict(dataset=CountingDataset(size=3))),
    "first_sample_too_long": ("max_position_embeddings=64", {}, dict(dataset=ListDataset([{"input_ids": [1] * 70}] * 4))),
    "first_sample_label_length": ("input_ids but 2 labels",
                                  {}, dict(dataset=ListDataset([{"input_ids": [1, 2, 3], "labels": [1, 2]}] * 4))),
    # Silently different results: the router loss Trainer would add; one checkpoint published by each node.
    "moe_router_aux_loss": ("config.output_router_logits=True and router_aux_loss_coef=0.001", {},
                            dict(make_model=_mixtral_with_router_loss)),
    "save_on_each_node_two_nodes": ("save_on_each_node=True with pp_size=2 (LOCAL_WORLD_SIZE=1 < WORLD_SIZE=2",
                                    dict(save_on_each_node=True), dict(env={"LOCAL_WORLD_SIZE": "1"})),
    # Nodes of different sizes: as torchrun would describe a launch of 1 + 2 processes.
    "ranks_disagree_node_size": ("processes_per_node: rank 0=1, rank 1=2", {}, dict(env={"LOCAL_WORLD_SIZE": "rank1"})),
    "ranks_disagree_batch": ("args.per_device_train_batch_size: rank 0=2, rank 1=4",
                             dict(per_device_train_batch_size="rank"), {}),
    "ranks_disagree_seed": ("model.weights.", {}, dict(seed="rank")),
    "ranks_disagree_invalid_on_one": ("Ranks disagree", dict(per_device_train_batch_size="rank1"), {}),
    # Found batch by batch, inside the training step (identical on both ranks: same batch).
    "batch_too_long": ("more than max_position_embeddings=64",
                       {}, dict(dataset=ListDataset([{"input_ids": [1, 2, 3]}] * 2 + [{"input_ids": [1] * 70}] * 2))),
    "batch_without_labels": ("needs 'labels'", {}, dict(collator=_no_labels)),
    "batch_label_shape": ("labels have shape", {}, dict(collator=_short_labels)),
    "short_last_batch": ("cannot be cut into microbatches of pp_microbatch_size=2",
                         dict(pp_schedule="gpipe", pp_microbatch_size=2, max_steps=-1, num_train_epochs=1),
                         dict(dataset=CountingDataset(size=5))),
}


NAN = {"add": 0.0}
NAN_ARGS = dict(max_steps=4, per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1, report_to="none",
                use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0)


def nan_at_step_2_loss(outputs, labels, num_items_in_batch=None):
    """Causal-LM loss plus a constant: nan in step 2 only; gradients stay finite."""
    logits = getattr(outputs, "logits", outputs)
    return ForCausalLMLoss(logits, labels, 64, num_items_in_batch=num_items_in_batch) + NAN["add"]


class NanInStep2(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        NAN["add"] = float("nan") if state.global_step + 1 == 2 else 0.0


def _nan_run(trainer_cls, args):
    trainer = trainer_cls(model=tiny_llama(2), args=args, train_dataset=CountingDataset(size=16), data_collator=pad_collator,
                          compute_loss_func=nan_at_step_2_loss, callbacks=[NanInStep2()])
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _nan_worker(output_dir):
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("hf_pp.reliability").addHandler(handler)
    out = {"losses": _nan_run(PipelineTrainer, PipelineTrainingArguments(output_dir, pp_size=2, **NAN_ARGS))}
    out["warnings"] = records
    try:
        _nan_run(PipelineTrainer, PipelineTrainingArguments(output_dir, pp_size=2, pp_raise_on_nan_inf=True, **NAN_ARGS))
        out["error"] = "no error"
    except NonFiniteLossError as exc:
        out["error"] = str(exc)
    return out


def _per_rank(value, rank):
    return {"rank": 2 * (rank + 1), "rank1": 1 + rank}.get(value, value) if isinstance(value, str) else value


def _matrix_worker(rank, world_size, output_dir):
    seen = {}
    for name, (expected, overrides) in ARG_CASES.items():
        try:
            PipelineTrainingArguments(output_dir=output_dir, **{**BASE, "pp_size": 2, **overrides})
            seen[name] = "no error"
        except PipelineConfigError as exc:
            seen[name] = str(exc)
    for name, (expected, overrides, extra) in TRAINER_CASES.items():
        start = time.perf_counter()
        fields = {**BASE, "pp_size": 2, **{k: _per_rank(v, rank) for k, v in overrides.items()}}
        try:
            args = PipelineTrainingArguments(output_dir=output_dir, **fields)
            seed = rank if extra.get("seed") == "rank" else 0
            if "make_model" in extra:
                model = extra["make_model"]()
            else:
                model = tiny_llama(extra.get("layers", 4), seed=seed) if "model" not in extra else extra["model"]
            kwargs = {}
            if extra.get("optimizer"):
                kwargs["optimizers"] = (torch.optim.SGD(model.parameters(), lr=0.1), None)
            if "model_init" in extra:
                kwargs["model_init"] = extra["model_init"]
            with _environment({k: str(_per_rank(v, rank)) for k, v in extra.get("env", {}).items()}):
                trainer = PipelineTrainer(model=model, args=args,
                                          train_dataset=extra.get("dataset", CountingDataset(size=16)),
                                          data_collator=extra.get("collator", pad_collator),
                                          parallelize_fn=extra.get("parallelize_fn"), **kwargs)
            trainer.train()
            seen[name] = "no error"
        except PipelineConfigError as exc:
            seen[name] = str(exc)
        seen[name + ":s"] = time.perf_counter() - start
    seen["nan"] = _nan_worker(output_dir)
    return seen


@pytest.fixture(scope="module")
def per_rank(tmp_path_factory):
    """One 2-rank spawn for the whole module: the misconfiguration matrix, then the nan runs."""
    return run_distributed(_matrix_worker, 2, str(tmp_path_factory.mktemp("reliability")), timeout_s=120)


@pytest.mark.slow
def test_nan_loss_keeps_trainer_logging_and_is_reported_with_step_and_stage(per_rank, tmp_path):
    NAN["add"] = 0.0
    reference = _nan_run(Trainer, TrainingArguments(str(tmp_path), **NAN_ARGS))
    for rank, seen in enumerate(per_rank):
        torch.testing.assert_close(torch.tensor(seen["nan"]["losses"]), torch.tensor(reference), rtol=1e-5, atol=1e-6)
        assert "Non-finite loss at optimizer step 2" in seen["nan"]["error"], seen["nan"]["error"]
        assert "computed by stage 1" in seen["nan"]["error"]
    # Only the rank with the last stage warns (once per pipeline).
    assert per_rank[0]["nan"]["warnings"] == []
    assert any("optimizer step 2" in w and "stage 1" in w for w in per_rank[1]["nan"]["warnings"]), per_rank[1]["nan"]


@pytest.mark.slow
def test_every_misconfiguration_raises_the_same_clear_error_on_every_rank(per_rank):
    cases = {**{k: v[0] for k, v in ARG_CASES.items()}, **{k: v[0] for k, v in TRAINER_CASES.items()}}
    assert len(cases) >= 25
    wrong = []
    for name, expected in cases.items():
        messages = [seen[name] for seen in per_rank]
        if any(expected not in m for m in messages):
            wrong.append(f"{name}: expected {expected!r}, got {messages}")
        elif not name.startswith("ranks_disagree") and messages[0] != messages[1]:
            wrong.append(f"{name}: ranks got different messages {messages}")
    assert not wrong, "\n".join(wrong)
    # Each case fails fast: checks, not timeouts.
    slow = {name: [round(seen[name + ":s"], 1) for seen in per_rank] for name in TRAINER_CASES
            if any(seen[name + ":s"] > 60 for seen in per_rank)}
    assert not slow, f"cases that took over 60 s: {slow}"

"""PipelineTrainer reproduces Trainer: same logged losses and grad norms, same final weights."""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from helpers.distributed import run_distributed
from hf_pp import PipelineTrainer, PipelineTrainingArguments
from helpers.trainer_fixtures import CountingDataset, pad_collator, tiny_llama

COMMON = dict(
    max_steps=8, gradient_accumulation_steps=2, per_device_train_batch_size=4, max_grad_norm=1.0,
    learning_rate=3e-3, lr_scheduler_type="cosine", warmup_steps=2, logging_steps=1, save_strategy="no",
    report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
)


def _reference(output_dir, tie=False, data_collator=pad_collator):
    """Trainer on one process, COMMON arguments: (log_history, named parameters, TrainOutput)."""
    trainer = Trainer(
        model=tiny_llama(tie=tie), args=TrainingArguments(output_dir=output_dir, **COMMON),
        train_dataset=CountingDataset(), data_collator=data_collator,
    )
    result = trainer.train()
    return trainer.state.log_history, dict(trainer.model.named_parameters(remove_duplicate=False)), result


def _pipeline_worker(rank, world_size, output_dir, runs):
    out = {}
    for pp_size, schedule, tie in runs:
        args = PipelineTrainingArguments(output_dir=output_dir, pp_size=pp_size, pp_schedule=schedule, **COMMON)
        trainer = PipelineTrainer(model=tiny_llama(tie=tie), args=args, train_dataset=CountingDataset(), data_collator=pad_collator)
        result = trainer.train()
        params = {n: p.detach().clone() for n, p in trainer.model.original_named_parameters()}
        out[(schedule, tie)] = (trainer.state.log_history, params, (result.global_step, result.training_loss))
    return out


def _assert_same_run(ref, got, label):
    ref_logs, ref_params, ref_result = ref
    logs, params, (global_step, training_loss) = got
    ref_steps = [h for h in ref_logs if "loss" in h]
    steps = [h for h in logs if "loss" in h]
    assert [h["step"] for h in steps] == [h["step"] for h in ref_steps], label
    assert [sorted(h) for h in logs] == [sorted(h) for h in ref_logs], f"{label}: log_history shape differs"
    for key in ("loss", "grad_norm", "learning_rate"):
        torch.testing.assert_close(torch.tensor([h[key] for h in steps]), torch.tensor([h[key] for h in ref_steps]),
                                   rtol=1e-5, atol=1e-7, msg=lambda m: f"{label} {key}: {m}")
    assert global_step == ref_result.global_step == 8
    assert training_loss == pytest.approx(ref_result.training_loss, rel=1e-5)
    for name, value in params.items():
        torch.testing.assert_close(value, ref_params[name].detach(), rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{label} {name}: {m}")
    return len(params)


@pytest.mark.slow
@pytest.mark.parametrize(
    "world_size,runs",
    [
        (2, [(2, "1f1b", False), (2, "gpipe", False), (2, "interleaved_1f1b", False),
             (2, "interleaved_zero_bubble", False), (2, "1f1b", True), (2, "zbv_zero_bubble", True)]),
        (4, [(4, "1f1b", False), (4, "1f1b", True)]),
    ],
)
def test_pipeline_trainer_matches_trainer(tmp_path, world_size, runs):
    references = {tie: _reference(str(tmp_path / f"ref{tie}"), tie) for tie in {t for _, _, t in runs}}
    per_rank = run_distributed(_pipeline_worker, world_size, str(tmp_path / "pp"), runs, timeout_s=600)
    for pp_size, schedule, tie in runs:
        reference, covered = references[tie], set()
        for rank, out in enumerate(per_rank):
            _assert_same_run(reference, out[(schedule, tie)], f"pp={pp_size} {schedule} tied={tie} rank {rank}")
            covered |= set(out[(schedule, tie)][1])

        assert covered == set(reference[1]), "the stages together must hold every parameter"
        if tie:
            copies = [out[(schedule, tie)][1] for out in per_rank]
            embed = next(c["model.embed_tokens.weight"] for c in copies if "model.embed_tokens.weight" in c)
            head = next(c["lm_head.weight"] for c in copies if "lm_head.weight" in c)
            assert torch.equal(embed, head), "tied copies drifted apart"


def _dp_worker(rank, world_size, output_dir, modes):
    from torch.distributed.tensor import DTensor

    out = {}
    for mode, schedule, *tie in modes:
        tie = bool(tie and tie[0])
        args = PipelineTrainingArguments(output_dir=output_dir, pp_size=2, pp_data_parallel=mode, pp_schedule=schedule,
                                         **COMMON)
        trainer = PipelineTrainer(model=tiny_llama(tie=tie), args=args, train_dataset=CountingDataset(),
                                  data_collator=pad_collator)
        result = trainer.train()
        # FSDP holds shards: gather each weight (every rank takes part, in the same order).
        params = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                  for n, p in trainer.model.original_named_parameters()}
        out[(mode, schedule, tie)] = (trainer.state.log_history, params, (result.global_step, result.training_loss),
                                 trainer._pp.dp_rank)
        trainer.save_model(os.path.join(output_dir, f"{mode}-{schedule}-{tie}"))  # all ranks; shards gathered per stage
    return out


@pytest.mark.slow
def test_pp2_x_dp2_matches_trainer_on_the_same_global_batch(tmp_path):
    """4 ranks = 2 pipelines of 2 stages; each pipeline reads its own half of every global batch.
    DDP-style averaging and FSDP2 sharding inside the stages both equal the one-process run."""
    ref_args = {**COMMON, "per_device_train_batch_size": 2 * COMMON["per_device_train_batch_size"]}
    references = {}
    for tie in (False, True):
        trainer = Trainer(model=tiny_llama(tie=tie), args=TrainingArguments(output_dir=str(tmp_path / "ref"), **ref_args),
                          train_dataset=CountingDataset(), data_collator=pad_collator)
        result = trainer.train()
        references[tie] = (trainer.state.log_history, dict(trainer.model.named_parameters(remove_duplicate=False)), result)
    modes = [("ddp", "1f1b", False), ("fsdp", "1f1b", False), ("fsdp", "interleaved_1f1b", False), ("ddp", "1f1b", True),
             ("fsdp", "1f1b", True)]
    per_rank = run_distributed(_dp_worker, 4, str(tmp_path / "pp"), modes, timeout_s=600)
    for mode in modes:
        reference = references[mode[2]]
        assert sorted(out[mode][3] for out in per_rank) == [0, 0, 1, 1]
        for rank, out in enumerate(per_rank):
            _assert_same_run(reference, out[mode][:3], f"pp=2 x dp=2 {mode} rank {rank}")
        saved = AutoModelForCausalLM.from_pretrained(tmp_path / "pp" / f"{mode[0]}-{mode[1]}-{mode[2]}")
        for name, value in saved.named_parameters():
            torch.testing.assert_close(value, reference[1][name].detach(), rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"saved {mode} {name}: {m}")


def _bf16_worker(rank, world_size, output_dir):
    args = PipelineTrainingArguments(output_dir=output_dir, pp_size=2, bf16=True, **COMMON)
    trainer = PipelineTrainer(model=tiny_llama(), args=args, train_dataset=CountingDataset(), data_collator=pad_collator)
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


@pytest.mark.slow
def test_bf16_autocast_applies_to_the_stages_as_in_trainer(tmp_path):
    def trainer_logs(bf16):
        args = TrainingArguments(output_dir=str(tmp_path / f"ref{bf16}"), bf16=bf16, **COMMON)
        trainer = Trainer(model=tiny_llama(), args=args, train_dataset=CountingDataset(), data_collator=pad_collator)
        trainer.train()
        return [h for h in trainer.state.log_history if "loss" in h]

    bf16, fp32 = trainer_logs(True), trainer_logs(False)
    got = run_distributed(_bf16_worker, 2, str(tmp_path / "pp"))[0]
    assert got[0]["loss"] == pytest.approx(bf16[0]["loss"], rel=1e-6)
    # bf16 rounding separates the runs from fp32; the pipeline follows Trainer's bf16 run.
    assert abs(got[0]["grad_norm"] - bf16[0]["grad_norm"]) < 0.1 * abs(bf16[0]["grad_norm"] - fp32[0]["grad_norm"])
    torch.testing.assert_close(torch.tensor([h["loss"] for h in got]), torch.tensor([h["loss"] for h in bf16]),
                               rtol=1e-3, atol=0)


def test_pp_size_1_is_exactly_trainer(tmp_path):
    """One process, pp_size=1: PipelineTrainer is Trainer (same logs, grad norms and final weights)."""
    reference = _reference(str(tmp_path / "ref"))
    args = PipelineTrainingArguments(output_dir=str(tmp_path / "pp1"), pp_size=1, **COMMON)
    trainer = PipelineTrainer(model=tiny_llama(), args=args, train_dataset=CountingDataset(), data_collator=pad_collator)
    result = trainer.train()
    assert trainer._pp is None and type(trainer.model).__name__ == "LlamaForCausalLM"
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters(remove_duplicate=False)}
    assert set(params) == set(reference[1])
    _assert_same_run(reference, (trainer.state.log_history, params, (result.global_step, result.training_loss)), "pp=1")


# Optimizers built the Trainer way (args.optim, optimizer_cls_and_kwargs) and the progress bar on.
# SGD at a large rate moves the weights far enough for the final-weight check to tell runs apart.
SGD = dict(optim="sgd", learning_rate=0.3)
VARIANTS = {
    "optim_sgd": (SGD, {}),
    "optimizer_cls_and_kwargs": ({}, {"optimizer_cls_and_kwargs": (torch.optim.SGD, {"lr": 0.3, "momentum": 0.9})}),
    "progress_bar": ({"disable_tqdm": False}, {}),
    "label_smoothing": ({"label_smoothing_factor": 0.1}, {}),
    # Trainer calls model_init in __init__ and again at the start of train(): a fresh model for each run.
    "model_init": ({}, {"model_init": lambda: tiny_llama()}),
}


def _variant_trainer(cls, args_cls, output_dir, name, model):
    extra_args, trainer_kwargs = VARIANTS[name]
    args = args_cls(output_dir=output_dir, **{**COMMON, **extra_args}, **({"pp_size": 2} if cls is PipelineTrainer else {}))
    model = None if "model_init" in trainer_kwargs else model
    return cls(model=model, args=args, train_dataset=CountingDataset(), data_collator=pad_collator, **trainer_kwargs)


def _variant_worker(rank, world_size, output_dir, names):
    from transformers.trainer_callback import ProgressCallback

    out = {}
    for name in names:
        trainer = _variant_trainer(PipelineTrainer, PipelineTrainingArguments, f"{output_dir}/{name}", name, tiny_llama())
        result = trainer.train()
        stage_params = {id(p) for _, p in trainer.model.original_named_parameters()}
        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        params = {n: p.detach().clone() for n, p in trainer.model.original_named_parameters()}
        progress = any(isinstance(cb, ProgressCallback) for cb in trainer.callback_handler.callbacks)
        out[name] = ((trainer.state.log_history, params, (result.global_step, result.training_loss)),
                     type(optimizer).__name__, in_optimizer == stage_params, progress)
        if name == "model_init":
            # A second train() starts again from a fresh model (the first run's weights would give other losses).
            trainer.train()
            out["model_init_again"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return out


@pytest.mark.slow
def test_optimizer_the_trainer_way_and_progress_bar_match_trainer(tmp_path):
    names = list(VARIANTS)
    references = {}
    for name in names:
        trainer = _variant_trainer(Trainer, TrainingArguments, str(tmp_path / f"ref-{name}"), name, tiny_llama())
        result = trainer.train()
        references[name] = (trainer.state.log_history, dict(trainer.model.named_parameters()), result,
                            type(trainer.optimizer.optimizer).__name__)
    assert references["optim_sgd"][3] == references["optimizer_cls_and_kwargs"][3] == "SGD"
    per_rank = run_distributed(_variant_worker, 2, str(tmp_path / "pp"), names, timeout_s=600)
    for name in names:
        for rank, out in enumerate(per_rank):
            run, optimizer_name, only_stage_params, progress = out[name]
            label = f"pp=2 {name} rank {rank}"
            assert optimizer_name == references[name][3], label
            assert only_stage_params, f"{label}: the optimizer must hold exactly this rank's stage parameters"
            assert progress == (name == "progress_bar"), label
            _assert_same_run(references[name][:3], run, label)
    for rank, out in enumerate(per_rank):
        first_run = [h["loss"] for h in out["model_init"][0][0] if "loss" in h]
        assert out["model_init_again"] == pytest.approx(first_run, rel=1e-6), f"rank {rank}: train() must re-create the model"
    smoothed = [h["loss"] for h in references["label_smoothing"][0] if "loss" in h]
    plain = [h["loss"] for h in references["progress_bar"][0] if "loss" in h]
    # Near-uniform logits of a fresh model: smoothing moves the loss by ~5e-4 relative, far above rtol 1e-5.
    assert smoothed[0] != pytest.approx(plain[0], rel=1e-4), "label smoothing must change the loss"


class TokenMLP(torch.nn.Module):
    """Not a Hugging Face model: embedding, residual MLP blocks, head. Tensor in, tensor out, and a
    pipeline stage holds None (or no blocks) for the other stages' modules."""

    def __init__(self, vocab: int = 64, hidden: int = 32, num_blocks: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.LayerNorm(hidden), torch.nn.Linear(hidden, hidden), torch.nn.Tanh())
            for _ in range(num_blocks)
        )
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, input_ids, attention_mask=None):
        x = self.embed(input_ids) if self.embed is not None else input_ids
        for block in self.blocks or ():
            x = x + block(x)
        return self.head(x) if self.head is not None else x


TOKEN_MLP_PLAN = [["embed", "blocks.0", "blocks.1"], ["blocks.2", "blocks.3", "head"]]


def token_loss(logits, labels, num_items_in_batch=None):
    """Trainer's compute_loss_func contract: summed CE over the label tokens / items of the optimizer step."""
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                                             reduction="sum")
    return loss / (num_items_in_batch if num_items_in_batch is not None else labels.ne(-100).sum())


def _custom_model_worker(rank, world_size, output_dir):
    from hf_pp import PipelineConfigError

    args = PipelineTrainingArguments(output_dir=output_dir, pp_size=2, **COMMON)
    kwargs = dict(args=args, train_dataset=CountingDataset(), data_collator=pad_collator, compute_loss_func=token_loss)
    with pytest.raises(PipelineConfigError) as refused:
        PipelineTrainer(model=TokenMLP(), **kwargs)
    trainer = PipelineTrainer(model=TokenMLP(), module_fqns_per_model_part=TOKEN_MLP_PLAN, **kwargs)
    result = trainer.train()
    params = {n: p.detach().clone() for n, p in trainer.model.original_named_parameters()}
    return str(refused.value), (trainer.state.log_history, params, (result.global_step, result.training_loss))


@pytest.mark.slow
def test_custom_module_trains_with_an_explicit_plan_and_is_refused_without(tmp_path):
    trainer = Trainer(model=TokenMLP(), args=TrainingArguments(output_dir=str(tmp_path / "ref"), **COMMON),
                      train_dataset=CountingDataset(), data_collator=pad_collator, compute_loss_func=token_loss)
    result = trainer.train()
    reference = (trainer.state.log_history, dict(trainer.model.named_parameters()), result)
    per_rank = run_distributed(_custom_model_worker, 2, str(tmp_path / "pp"), timeout_s=600)
    covered = set()
    for rank, (refusal, run) in enumerate(per_rank):
        assert "TokenMLP is not a Hugging Face model" in refusal, refusal
        assert "PipelineTrainer(..., module_fqns_per_model_part=" in refusal, refusal
        _assert_same_run(reference, run, f"TokenMLP pp=2 rank {rank}")
        stage = {n for n in reference[1] if any(n.startswith(f + ".") for f in TOKEN_MLP_PLAN[rank])}
        assert set(run[1]) == stage, f"rank {rank} must hold exactly its stage's parameters"
        covered |= set(run[1])
    assert covered == set(reference[1])


def _few_schedules_worker(rank, world_size, output_dir):
    import hf_pp.runtime

    hf_pp.runtime.SCHEDULES_KEPT = 2  # CountingDataset batches have up to 8 lengths: most schedules get evicted
    args = PipelineTrainingArguments(output_dir=output_dir, pp_size=2, **COMMON)
    trainer = PipelineTrainer(model=tiny_llama(), args=args, train_dataset=CountingDataset(), data_collator=pad_collator)
    result = trainer.train()
    params = {n: p.detach().clone() for n, p in trainer.model.original_named_parameters()}
    return (trainer.state.log_history, params, (result.global_step, result.training_loss)), len(trainer._pp._schedules)


@pytest.mark.slow
def test_schedules_evicted_by_shape_are_rebuilt_and_training_still_matches_trainer(tmp_path):
    reference = _reference(str(tmp_path / "ref"))
    for rank, (got, kept) in enumerate(run_distributed(_few_schedules_worker, 2, str(tmp_path / "pp"))):
        assert kept == 2, f"rank {rank} kept {kept} schedules"
        _assert_same_run(reference, got, f"rank {rank}, two schedules kept")


def _more_schedules_worker(rank, world_size, output_dir, runs):
    out = {}
    for label, attn, overrides in runs:
        args = PipelineTrainingArguments(output_dir=output_dir, pp_size=2, **{**COMMON, **overrides})
        trainer = PipelineTrainer(model=tiny_llama(attn_implementation=attn), args=args, train_dataset=CountingDataset(),
                                  data_collator=pad_collator)
        result = trainer.train()
        params = {n: p.detach().clone() for n, p in trainer.model.original_named_parameters()}
        out[label] = (trainer.state.log_history, params, (result.global_step, result.training_loss))
    return out


@pytest.mark.slow
def test_pipeline_trainer_matches_trainer_with_dualpipev_looped_bfs_a_csv_schedule_and_sdpa(tmp_path):
    """Training (not only evaluation) under DualPipeV, looped BFS and a user's CSV schedule, and with the
    attention users get by default (sdpa) instead of eager."""
    from test_functional_parity import _looped_csv

    runs = [("dual_pipe_v", "eager", dict(pp_schedule="dual_pipe_v")),
            ("looped_bfs", "eager", dict(pp_schedule="looped_bfs")),
            ("csv", "eager", dict(pp_schedule_csv=_looped_csv(2, COMMON["per_device_train_batch_size"]))),
            ("sdpa", "sdpa", dict(pp_schedule="1f1b"))]
    references = {}
    for attn in ("eager", "sdpa"):
        trainer = Trainer(model=tiny_llama(attn_implementation=attn),
                          args=TrainingArguments(output_dir=str(tmp_path / f"ref-{attn}"), **COMMON),
                          train_dataset=CountingDataset(), data_collator=pad_collator)
        result = trainer.train()
        references[attn] = (trainer.state.log_history, dict(trainer.model.named_parameters()), result)
    per_rank = run_distributed(_more_schedules_worker, 2, str(tmp_path / "pp"), runs, timeout_s=600)
    for label, attn, _ in runs:
        for rank, out in enumerate(per_rank):
            _assert_same_run(references[attn], out[label], f"{label} rank {rank}")

"""activation_checkpointing under pipelining: layers recompute in the backward, results stay Trainer's."""

import pytest
import torch

from helpers.distributed import run_distributed
from hf_pp import PipelineConfigError, PipelineTrainer, PipelineTrainingArguments
from hf_pp.activation_checkpointing import (
    check_activation_checkpointing, disable_activation_checkpointing, enable_activation_checkpointing,
)
from hf_pp.preflight import validate_pipeline_setup
from hf_pp.split import copy_stage_module
from test_trainer_parity import COMMON, _reference
from helpers.trainer_fixtures import CountingDataset, lora_pipeline_losses, pad_collator, tiny_llama

# COMMON: 8 optimizer steps x 2 accumulation steps x 4 samples at microbatch 1.
MICROBATCHES_RUN = 8 * 2 * 4


def test_every_n_layers_counts_layers_of_the_unsplit_model_on_a_later_stage():
    model = tiny_llama(num_layers=4)
    stage = copy_stage_module(model, ["model.layers.2", "model.layers.3", "model.norm", "lm_head"])
    assert enable_activation_checkpointing([stage], every_n_layers=2) == [2]
    assert [layer.gradient_checkpointing for layer in stage.model.layers] == [True, False]
    disable_activation_checkpointing([stage])
    assert not any(layer.gradient_checkpointing for layer in stage.model.layers)
    with pytest.raises(PipelineConfigError, match="every_n_layers must be at least 1"):
        enable_activation_checkpointing([stage], every_n_layers=0)


def test_checkpointed_stage_gives_the_same_gradients():
    ids = torch.randint(1, 64, (2, 9))

    def grads(checkpointed: bool):
        model = tiny_llama(num_layers=2).train()
        if checkpointed:
            enable_activation_checkpointing([model])
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters()}

    plain, checkpointed = grads(False), grads(True)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved_1f1b"])
def test_reentrant_checkpointing_is_refused_before_any_communication(tmp_path, schedule):
    args = PipelineTrainingArguments(output_dir=str(tmp_path), pp_size=2, use_cpu=True, report_to="none",
                                     per_device_train_batch_size=4, pp_schedule=schedule, activation_checkpointing=True,
                                     activation_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(PipelineConfigError, match="use_reentrant=True cannot run under pipelining"):
        validate_pipeline_setup(tiny_llama(), args, {}, world_size=2)
    with pytest.raises(PipelineConfigError, match="does not support activation checkpointing"):
        check_activation_checkpointing(torch.nn.Linear(2, 2), None)


@pytest.mark.parametrize("schedule,name", [("zbv_zero_bubble", "ZBVZeroBubble"),
                                           ("interleaved_zero_bubble", "InterleavedZeroBubble")])
def test_checkpointing_under_a_split_backward_schedule_is_refused(tmp_path, schedule, name):
    args = PipelineTrainingArguments(output_dir=str(tmp_path), pp_size=2, use_cpu=True, report_to="none",
                                     per_device_train_batch_size=4, pp_schedule=schedule, activation_checkpointing=True)
    with pytest.raises(PipelineConfigError, match=f"activation_checkpointing under {name} recomputes"):
        validate_pipeline_setup(tiny_llama(), args, {}, world_size=2)


def _count_mlp_calls(trainer) -> dict:
    """Calls of each stage layer's MLP with real (not shape-inference) inputs, while gradients are on.

    A pre-hook: checkpointing's recompute stops as soon as the saved tensors are back, before the MLP returns.
    """
    counts = {}
    for part in trainer.model.parts:
        for name, module in part.named_modules():
            if name.endswith(".mlp"):
                counts[name] = 0

                def hook(module, inputs, name=name):
                    if torch.is_grad_enabled() and inputs[0].device.type != "meta":
                        counts[name] += 1

                module.register_forward_pre_hook(hook)
    return counts


def _worker(rank, world_size, output_dir):
    out = {}
    for schedule in ("1f1b", "interleaved_1f1b"):
        for checkpointing in (True, False):
            args = PipelineTrainingArguments(output_dir=output_dir, pp_size=2, pp_schedule=schedule,
                                             activation_checkpointing=checkpointing, **COMMON)
            trainer = PipelineTrainer(model=tiny_llama(), args=args, train_dataset=CountingDataset(),
                                      data_collator=pad_collator)
            calls = _count_mlp_calls(trainer)
            trainer.train()
            assert trainer.model.is_activation_checkpointing == checkpointing
            params = {n: p.detach().clone() for n, p in trainer.model.original_named_parameters()}
            out[schedule, checkpointing] = (trainer.state.log_history, params, calls)
    # Frozen embeddings feed the first checkpointed layer: its adapters must still get gradients.
    out["lora"] = [lora_pipeline_losses(output_dir, COMMON, activation_checkpointing=c) for c in (True, False)]
    return out


@pytest.mark.slow
def test_activation_checkpointing_at_pp2_recomputes_every_layer_and_matches_trainer(tmp_path):
    ref_logs, ref_params, _ = _reference(str(tmp_path / "ref"))
    ref_steps = [h for h in ref_logs if "loss" in h]
    for rank, out in enumerate(run_distributed(_worker, 2, str(tmp_path / "pp"), timeout_s=600)):
        for schedule in ("1f1b", "interleaved_1f1b"):
            logs, params, calls = out[schedule, True]
            plain_calls = out[schedule, False][2]
            label = f"rank {rank} {schedule}"
            # Each layer ran once more per training microbatch than without checkpointing: its recompute (under
            # interleaving, a later stage's layer also recomputed a few times more, at most one per input shape).
            extra = {name: calls[name] - plain_calls[name] for name in calls}
            assert calls and all(MICROBATCHES_RUN <= n <= MICROBATCHES_RUN + 8 for n in extra.values()), (
                label, calls, plain_calls)
            steps = [h for h in logs if "loss" in h]
            for key in ("loss", "grad_norm"):
                torch.testing.assert_close(torch.tensor([h[key] for h in steps]),
                                           torch.tensor([h[key] for h in ref_steps]), rtol=1e-5, atol=1e-7,
                                           msg=lambda m: f"{label} {key}: {m}")
            for name, value in params.items():
                torch.testing.assert_close(value, ref_params[name].detach(), rtol=1e-5, atol=1e-5,
                                           msg=lambda m: f"{label} {name}: {m}")
        checkpointed, plain = out["lora"]
        torch.testing.assert_close(torch.tensor(checkpointed), torch.tensor(plain), rtol=1e-5, atol=1e-7)
        assert checkpointed[-1] < checkpointed[0], "the adapters must learn through the checkpointed layers"

"""1F1B and GPipe stages send the input gradients of a step's last backward before computing its weight
gradients (hf_pp.schedules.InputGradsFirstStage): the gradients and losses are bitwise those of torch's full
backward, with tied weights, LoRA adapters and at pp=4; the split is skipped under activation checkpointing,
with compiled layers and by schedules that are not single-stage."""

import types

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

from helpers.custom_models import token_ce_loss
from helpers.distributed import run_distributed
from helpers.trainer_fixtures import tiny_llama
from hf_pp import AutoPipeline
from hf_pp.activation_checkpointing import enable_activation_checkpointing
from hf_pp.schedules import InputGradsFirstStage, splits_last_backward

BATCH, SEQ = 8, 6


def _build(world_size: int, schedule: str, *, tie: bool = False, lora: bool = False, layers: int = 4):
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("pp",))
    model = tiny_llama(num_layers=layers, tie=tie)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    ap = AutoPipeline(mesh, pp_schedule=schedule, pp_batch_size=BATCH, pp_balance="layers", device="cpu")
    ap.build(model, loss_fn=token_ce_loss(BATCH * SEQ))
    return ap


def _step(ap, ids, split: bool) -> dict:
    """Gradients, losses and how many weight passes ran after the schedule sent the input gradients, with the
    split as the schedule set it (``split``) or switched off."""
    info = ap.info
    weight_passes = 0
    for stage in info.stages:
        stage.split_last_backward = split and stage.enabled_by_schedule
        run_weights = type(stage).backward_weight_one_chunk

        def counted(self, *args, _run=run_weights, **kwargs):
            nonlocal weight_passes
            weight_passes += 1
            return _run(self, *args, **kwargs)

        stage.backward_weight_one_chunk = types.MethodType(counted, stage)
    losses = []
    ap.step(ids, target=ids if info.has_last_stage else None, losses=losses)
    grads = {name: p.grad.clone() for part in info.model_parts for name, p in part.named_parameters()
             if p.grad is not None}
    for part in info.model_parts:
        part.zero_grad(set_to_none=True)
    for stage in info.stages:
        del stage.backward_weight_one_chunk
    return {"grads": grads, "losses": [loss.detach().clone() for loss in losses], "weight_passes": weight_passes}


def _compare(rank, world_size, cases):
    torch.manual_seed(1)
    ids = torch.randint(1, 64, (BATCH, SEQ))
    results = {}
    for name, schedule, options in cases:
        ap = _build(world_size, schedule, **{k: v for k, v in options.items() if k != "checkpointing"})
        if options.get("checkpointing"):
            enable_activation_checkpointing(ap.info.model_parts)
        stages = ap.info.stages
        for stage in stages:
            stage.enabled_by_schedule = stage.split_last_backward
        full, split = _step(ap, ids, split=False), _step(ap, ids, split=True)
        results[name] = {
            "stage_class": all(isinstance(s, InputGradsFirstStage) for s in stages),
            "enabled_by_schedule": all(s.enabled_by_schedule for s in stages),
            "same_grad_names": sorted(full["grads"]) == sorted(split["grads"]),
            "bitwise_equal": all(torch.equal(full["grads"][k], split["grads"][k]) for k in full["grads"])
            and all(torch.equal(a, b) for a, b in zip(full["losses"], split["losses"])),
            "has_grads": len(full["grads"]) > 0,
            "weight_passes_full": full["weight_passes"],
            "weight_passes_split": split["weight_passes"],
            "first_stage_only": all(s.is_first for s in stages),
        }
    return results


def _expect_split(result: dict) -> None:
    assert result["stage_class"] and result["has_grads"] and result["same_grad_names"]
    assert result["bitwise_equal"]
    assert result["weight_passes_full"] == 0
    # The first stage sends no input gradients: only later stages split their last backward, once per step.
    assert result["weight_passes_split"] == (0 if result["first_stage_only"] else 1)


@pytest.mark.slow
def test_split_last_backward_gives_bitwise_the_full_backward_at_pp2():
    cases = [
        ("1f1b", "1f1b", {}),
        ("1f1b tied", "1f1b", {"tie": True}),
        ("gpipe", "gpipe", {}),
        ("1f1b lora", "1f1b", {"lora": True}),
        ("1f1b checkpointing", "1f1b", {"checkpointing": True}),
        ("interleaved", "interleaved_1f1b", {}),
    ]
    per_rank = run_distributed(_compare, 2, cases)
    for rank, results in enumerate(per_rank):
        for name in ("1f1b", "1f1b tied", "gpipe", "1f1b lora"):
            assert results[name]["enabled_by_schedule"], (rank, name)
            _expect_split(results[name])
        # Checkpointed layers would be recomputed by a separate weight pass: no split, the same gradients.
        checkpointed = results["1f1b checkpointing"]
        assert checkpointed["bitwise_equal"] and checkpointed["weight_passes_split"] == 0
        # Multi-stage schedules order their own backward passes: the stages are never switched on.
        interleaved = results["interleaved"]
        assert not interleaved["enabled_by_schedule"] and interleaved["weight_passes_split"] == 0
        assert interleaved["bitwise_equal"]


@pytest.mark.slow
def test_split_last_backward_gives_bitwise_the_full_backward_at_pp4():
    per_rank = run_distributed(_compare, 4, [("1f1b", "1f1b", {"layers": 4}), ("gpipe", "gpipe", {"layers": 4})])
    for results in per_rank:
        for result in results.values():
            assert result["enabled_by_schedule"]
            _expect_split(result)


def test_no_split_where_layers_are_checkpointed_or_compiled():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = tiny_llama(num_layers=2)
    assert splits_last_backward(model)
    model.model.layers[0] = checkpoint_wrapper(model.model.layers[0])
    assert not splits_last_backward(model)
    model = tiny_llama(num_layers=2)
    enable_activation_checkpointing([model], every_n_layers=2)  # layer 0 checkpointed, layer 1 not
    assert not splits_last_backward(model)
    from hf_pp.compile import compile_stage_layers

    model = tiny_llama(num_layers=2)
    compile_stage_layers([model], backend="eager")  # compiled code donates buffers: no graph kept for a weight pass
    assert not splits_last_backward(model)
    model = tiny_llama(num_layers=2)
    model.model.layers[1].compile(backend="eager")
    assert not splits_last_backward(model)

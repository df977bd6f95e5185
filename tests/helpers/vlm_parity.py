"""Parity of split vision-language models against the unsplit model (issue 24).

:func:`vlm_sequential_parity` runs the patched stage modules of a tiny VLM one after another in one
process, one sample per microbatch (so every microbatch gets exactly its own images); the real 1F1B
schedule on gloo ranks is :func:`vlm_schedule_parity_worker`. Both compare the loss and every parameter
gradient (the vision tower's included) with the unsplit model's own forward.
"""

from __future__ import annotations

import traceback

import torch

from hf_pp.architectures import stage_layout
from hf_pp.errors import PipelineConfigError
from hf_pp.functional import build_stage_modules, plan_stage_fqns
from hf_pp.schedules import resolve_schedule
from hf_pp.losses import causal_lm_loss, count_loss_tokens
from hf_pp.multimodal import multimodal_stage_inputs

from .hf_parity import ATOL, RTOL, compare_grads
from .vlm_models import VLM_CASES

__all__ = ["vlm_reference", "microbatch", "vlm_sequential_parity", "split_parity", "vlm_schedule_parity_worker",
           "vision_grads"]

_TEXT = ("input_ids", "labels", "attention_mask")


def vlm_reference(model, batch: dict):
    """Loss (token mean over the batch) and gradients of the unsplit model, through its own forward."""
    model.zero_grad(set_to_none=True)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    loss = causal_lm_loss(model(**inputs, use_cache=False).logits, batch["labels"])
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def microbatch(value, start: int, stop: int):
    """Rows ``start:stop`` of a stage kwarg (a tensor, or a dict of them), as the schedule cuts it."""
    if isinstance(value, dict):
        return {k: v[start:stop] for k, v in value.items()}
    return value[start:stop]


def vision_grads(grads: dict, vision_tower: str) -> int:
    """How many of the vision tower's parameters got a nonzero gradient (0 means no image reached it)."""
    prefix = vision_tower + "."
    return sum(1 for n, g in grads.items() if n.startswith(prefix) and bool(g.abs().sum() > 0))


def vlm_sequential_parity(model_type: str, num_stages: int) -> str | None:
    """All stages in one process, one sample per microbatch; None on parity, else the reason."""
    case = VLM_CASES[model_type]
    try:
        model, batch = case()
    except Exception as err:  # noqa: BLE001 - the sweep records every failure with its reason
        return f"error: {traceback.format_exception_only(type(err), err)[-1].strip()[:300]}"
    return split_parity(model, batch, num_stages, case.vision_tower)


def split_parity(model, batch: dict, num_stages: int, vision_tower: str) -> str | None:
    """``model`` split into ``num_stages`` run one after another on ``batch``, one sample per microbatch, against
    the unsplit model: None when the loss and every gradient agree, else the reason."""
    try:
        ref_loss, ref_grads = vlm_reference(model, batch)
        if not vision_grads(ref_grads, vision_tower):
            return "the unsplit model's vision tower got no gradient: the images do not reach it"
        fqns, _ = plan_stage_fqns(model, num_stages, resolve_schedule("1f1b"))  # with the pipeline's checks
        parts = build_stage_modules(model, fqns, list(range(num_stages)))
        kwargs = multimodal_stage_inputs(parts[0], stage_layout(model).multimodal, batch)
        kwargs.setdefault("attention_mask", batch["attention_mask"]) if "causal_mask_mapping" not in kwargs else None
        n_items = count_loss_tokens(batch["labels"])
        total = torch.zeros(())
        for i in range(batch["input_ids"].shape[0]):
            hidden = batch["input_ids"][i:i + 1]
            mb = {k: microbatch(v, i, i + 1) for k, v in kwargs.items()}
            for part in parts:
                hidden = part(hidden, **mb)
            loss = causal_lm_loss(hidden, batch["labels"][i:i + 1], num_items_in_batch=n_items)
            loss.backward()
            total = total + loss.detach()
        if not torch.allclose(total, ref_loss, rtol=RTOL, atol=ATOL):
            return f"loss differs: {total.item():.6f} vs unsplit {ref_loss.item():.6f}"
        return compare_grads(parts, ref_grads)
    except Exception as err:  # noqa: BLE001 - the sweep records every failure with its reason
        return f"error: {traceback.format_exception_only(type(err), err)[-1].strip()[:300]}"


def vlm_schedule_step_parity(mesh, model_type: str) -> str | None:
    """One 1F1B step (one sample per microbatch) of a tiny VLM on the 1-D ``mesh`` against the unsplit model."""
    from hf_pp.functional import pipeline_model

    case = VLM_CASES[model_type]
    model, batch = case()
    ref_loss, ref_grads = vlm_reference(model, batch)
    n_items = count_loss_tokens(batch["labels"])
    samples = batch["input_ids"].shape[0]
    schedule, parts, has_first, has_last, _ = pipeline_model(
        model, mesh, None, pp_axis_name="pp", dp_axis_names=None, layers_per_stage=None,
        pipeline_parallel_schedule="1f1b", pipeline_parallel_schedule_csv=None, microbatch_size=1,
        local_batch_size=samples, device="cpu",
        loss_fn=lambda logits, y: causal_lm_loss(logits, y, num_items_in_batch=n_items),
    )
    kwargs = multimodal_stage_inputs(parts[0], stage_layout(model).multimodal, batch)
    if "causal_mask_mapping" not in kwargs:
        kwargs.setdefault("attention_mask", batch["attention_mask"])
    losses: list[torch.Tensor] = []
    args = (batch["input_ids"],) if has_first else ()
    schedule.step(*args, target=batch["labels"] if has_last else None, losses=losses, **kwargs)
    if has_last:
        loss = torch.stack(losses).sum()
        if not torch.allclose(loss, ref_loss, rtol=RTOL, atol=ATOL):
            return f"loss differs: {loss.item():.6f} vs unsplit {ref_loss.item():.6f}"
    return compare_grads(parts, ref_grads)


def vlm_schedule_parity_worker(rank: int, world_size: int, model_types: list[str]) -> dict[str, str | None]:
    """On every rank: each VLM type's 1F1B step against the unsplit model (``{type: None or reason}``)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("pp",))
    results = {}
    for model_type in model_types:
        try:
            results[model_type] = vlm_schedule_step_parity(mesh, model_type)
        except PipelineConfigError as err:  # raised on every rank alike, before any collective
            results[model_type] = f"refused: {err}"
    return results

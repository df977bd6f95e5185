"""Parity of split Hugging Face models against the unsplit model.

:func:`sequential_parity` runs the patched stage modules one after another
in one process (fast, good for debugging); :func:`schedule_parity_worker`
runs the real 1F1B schedule on gloo ranks for many architectures in one
process group. Both compare the loss and every parameter gradient with the
unsplit model (fp32, rtol 1e-4, atol 1e-5).
"""

from __future__ import annotations

import traceback

import torch

from hf_pp.architectures import check_support, module_fqns_per_stage
from hf_pp.functional import build_stage_modules
from hf_pp.split import validate_stage_fqns
from hf_pp.losses import causal_lm_loss, count_loss_tokens

from .hf_models import tiny_batch, tiny_config, tiny_model

__all__ = ["RTOL", "ATOL", "reference", "compare_grads", "sequential_parity", "schedule_step_parity",
           "schedule_parity_worker"]

RTOL, ATOL = 1e-4, 1e-5
BATCH, SEQ = 4, 10


def reference(model, input_ids, attention_mask, labels):
    """Loss and gradients of the unsplit model, through its own Hugging Face forward."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    loss = causal_lm_loss(logits, labels)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def compare_grads(parts, ref_grads) -> str | None:
    """First gradient mismatch between stage parts and the reference, as text; None when all match."""
    for part in parts:
        for name, param in part.named_parameters():
            ref = ref_grads.get(name)
            got = param.grad
            if ref is None and got is None:
                continue
            ref = torch.zeros_like(param) if ref is None else ref
            got = torch.zeros_like(param) if got is None else got
            if not torch.allclose(got, ref, rtol=RTOL, atol=ATOL):
                return f"grad of {name} differs (max abs diff {(got - ref).abs().max().item():.2e})"
    return None


def _build(model_type: str, num_stages: int):
    # Ask the registry before building: unsupported (e.g. multimodal) models can be slow to build.
    info = check_support(tiny_config(model_type))
    if not info.supported:
        return None, info.reason
    return tiny_model(model_type), None


def sequential_parity(model_type: str, num_stages: int) -> str | None:
    """Run all stages in one process; None on parity, else the reason it fails."""
    try:
        model, reason = _build(model_type, num_stages)
        if model is None:
            return f"unsupported: {reason}"
        input_ids, mask, labels = tiny_batch(BATCH, SEQ)
        ref_loss, ref_grads = reference(model, input_ids, mask, labels)
        fqns = module_fqns_per_stage(model, num_stages)
        validate_stage_fqns(model, fqns)  # as pipeline_model does, so both checks fail alike
        parts = build_stage_modules(model, fqns, list(range(num_stages)))
        hidden = input_ids
        for part in parts:
            hidden = part(hidden, attention_mask=mask)
        loss = causal_lm_loss(hidden, labels)
        loss.backward()
        if not torch.allclose(loss, ref_loss, rtol=RTOL, atol=ATOL):
            return f"loss differs: {loss.item():.6f} vs unsplit {ref_loss.item():.6f}"
        return compare_grads(parts, ref_grads)
    except Exception as err:  # noqa: BLE001 - the sweep records every failure with its reason
        last = traceback.format_exception_only(type(err), err)[-1].strip()
        return f"error: {last[:300]}"


def schedule_step_parity(mesh, model_type: str, module_fqns: list[list[str]] | None = None,
                         step_kwargs: dict | None = None):
    """One 1F1B step of ``model_type`` on the 1-D ``mesh`` against the unsplit model.

    ``module_fqns``: an explicit ``module_fqns_per_model_part`` (else the
    model's own plan splits it); ``step_kwargs``: what ``schedule.step`` gets
    besides the batch (default: the padding ``attention_mask`` of :func:`tiny_batch`).
    Returns ``(None on parity else reason, this rank's stage parts)``.
    """
    from hf_pp.functional import pipeline_model

    input_ids, mask, labels = tiny_batch(BATCH, SEQ)
    n_items = count_loss_tokens(labels)
    model = tiny_model(model_type)
    ref_loss, ref_grads = reference(model, input_ids, mask, labels)
    schedule, parts, has_first, has_last, _ = pipeline_model(
        model, mesh, None, pp_axis_name="pp", dp_axis_names=None, layers_per_stage=None,
        pipeline_parallel_schedule="1f1b", pipeline_parallel_schedule_csv=None, microbatch_size=1,
        local_batch_size=BATCH, device="cpu",
        loss_fn=lambda logits, y: causal_lm_loss(logits, y, num_items_in_batch=n_items),
        module_fqns_per_model_part=module_fqns,
    )
    losses: list[torch.Tensor] = []
    args = (input_ids,) if has_first else ()
    step_kwargs = {"attention_mask": mask} if step_kwargs is None else step_kwargs
    schedule.step(*args, target=labels if has_last else None, losses=losses, **step_kwargs)
    if has_last:
        loss = torch.stack(losses).sum()
        if not torch.allclose(loss, ref_loss, rtol=RTOL, atol=ATOL):
            return f"loss differs: {loss.item():.6f} vs unsplit {ref_loss.item():.6f}", parts
    return compare_grads(parts, ref_grads), parts


def schedule_parity_worker(rank: int, world_size: int, model_types: list[str]) -> dict[str, str | None]:
    """On every rank: for each model type, train one 1F1B step and compare with the unsplit model.

    Returns ``{model_type: None on parity, else reason}`` as seen by this rank.
    Every rank builds the same models and runs the same schedules, so an
    error here (not a mismatch) fails the whole run rather than hang it.
    """
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("pp",))
    return {model_type: schedule_step_parity(mesh, model_type)[0] for model_type in model_types}

"""Tied input/output embeddings across the first and last stage train like the unsplit model.

Three architectures whose small variants tie embeddings, pp=2 and pp=4, 1F1B,
3 AdamW steps: the first stage's embedding and the last stage's lm_head copy
stay bitwise equal to each other and equal the unsplit run.

The spec's loop (``schedule.step(...)`` then ``optimizer.step()``, no other
call) on a tied Llama and Gemma 2, through AutoPipeline and through
``functional.pipeline_model``: every gradient equals the unsplit model's after
one step and after two accumulated steps, and an extra ``sync_tied_grads()``
changes nothing.
"""

import copy

import pytest
import torch
import torch.nn as nn

from helpers.distributed import run_distributed
from helpers.hf_models import TIED_MODEL_TYPES, tiny_batch, tiny_model
from helpers.hf_parity import ATOL, RTOL
from hf_pp.losses import causal_lm_loss, count_loss_tokens
from hf_pp.errors import PipelineConfigError
from hf_pp.tied import (
    TiedGradientSync,
    TiedWeights,
    detach_tied_gradient_sync,
    plan_tied_weights,
    sync_tied_gradients,
    sync_tied_grads_in_step,
    tied_gradient_sync_of,
)

STEPS, BATCH, SEQ, LR = 3, 4, 10, 1e-2
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _unsplit_run(model, input_ids, mask, labels):
    model = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    for _ in range(STEPS):
        opt.zero_grad()
        causal_lm_loss(model(input_ids=input_ids, attention_mask=mask).logits, labels).backward()
        opt.step()
    return model.get_parameter(EMBED).detach()


def _tied_worker(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh

    from hf_pp.functional import pipeline_model, plan_stage_fqns
    from hf_pp.schedules import resolve_schedule

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("pp",))
    input_ids, mask, labels = tiny_batch(BATCH, SEQ)
    n_items = count_loss_tokens(labels)
    out = {}
    for model_type in TIED_MODEL_TYPES:
        model = tiny_model(model_type, tie_word_embeddings=True)
        assert model.get_parameter(EMBED) is model.get_parameter(HEAD)
        expected = _unsplit_run(model, input_ids, mask, labels)
        fqns, ranks = plan_stage_fqns(model, world_size, resolve_schedule("1f1b", None))
        tied = plan_tied_weights(model, fqns, ranks, mesh.get_group())
        schedule, parts, has_first, has_last, _ = pipeline_model(
            model, mesh, None, pp_axis_name="pp", dp_axis_names=None, layers_per_stage=None,
            pipeline_parallel_schedule="1f1b", pipeline_parallel_schedule_csv=None, microbatch_size=1,
            local_batch_size=BATCH, device="cpu",
            loss_fn=lambda logits, y: causal_lm_loss(logits, y, num_items_in_batch=n_items),
            sync_tied_grads_in_step=False,  # the trainer's way: one explicit sum per optimizer step
        )
        assert tied_gradient_sync_of(schedule) is None
        opt = torch.optim.AdamW([p for part in parts for p in part.parameters()], lr=LR)
        for _ in range(STEPS):
            opt.zero_grad()
            args = (input_ids,) if has_first else ()
            schedule.step(*args, target=labels if has_last else None, attention_mask=mask)
            sync_tied_gradients(parts, tied)
            opt.step()
        mine = {n: p.detach().clone() for part in parts for n, p in part.named_parameters() if n in (EMBED, HEAD)}
        out[model_type] = (mine, expected, tied.ranks)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("pp", [2, 4])
def test_tied_embedding_copies_stay_identical_and_match_unsplit(pp):
    per_rank = run_distributed(_tied_worker, pp, timeout_s=300)
    for model_type in TIED_MODEL_TYPES:
        embed = per_rank[0][model_type][0][EMBED]
        head = per_rank[pp - 1][model_type][0][HEAD]
        expected = per_rank[0][model_type][1]
        assert per_rank[0][model_type][2] == [(0, pp - 1)]  # only first and last rank take part
        assert torch.equal(embed, head), f"{model_type}: the two copies drifted apart"
        torch.testing.assert_close(embed, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{model_type}: {m}")


def test_one_rank_holding_both_copies_sums_them_locally():
    """V-style layouts put the first and last stage on one rank: the sum needs no communication."""
    emb, head = nn.Embedding(4, 3), nn.Linear(3, 4, bias=False)
    head.weight = nn.Parameter(emb.weight.detach().clone())
    emb.weight.grad, head.weight.grad = torch.full((4, 3), 1.0), torch.full((4, 3), 2.0)
    tied = TiedWeights([("embed.weight", "head.weight")], [(0,)], [None])
    sync_tied_gradients([nn.ModuleDict({"embed": emb}), nn.ModuleDict({"head": head})], tied)
    assert torch.equal(emb.weight.grad, torch.full((4, 3), 3.0))
    assert torch.equal(head.weight.grad, emb.weight.grad) and head.weight.grad is not emb.weight.grad


def test_untied_model_needs_no_sync():
    model = tiny_model("llama")
    fqns = [["model.embed_tokens", "model.layers.0", "model.layers.1"], ["model.layers.2", "model.layers.3", "model.norm", "lm_head"]]
    assert plan_tied_weights(model, fqns, [(0,), (1,)]).groups == []


# ---- the spec's loop: schedule.step, then the optimizer, nothing else ----------------------------------
SPEC_MODEL_TYPES = ["llama", "gemma2"]


def _reference(model, batches, loss_fn):
    """The unsplit model's gradients (every name, tied ones included) after each accumulated batch, and its
    tied weight after one AdamW step on the accumulated gradient."""
    model = copy.deepcopy(model)
    grads = []
    for input_ids, mask, labels in batches:
        loss_fn(model(input_ids=input_ids, attention_mask=mask).logits, labels).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters(remove_duplicate=False)})
    torch.optim.AdamW(model.parameters(), lr=LR).step()
    return grads, model.get_parameter(EMBED).detach().clone()


def _spec_pipeline(api, model, mesh, schedule_name, loss_fn):
    """``(schedule, parts, has_first, has_last, AutoPipeline or None)`` built the way the spec shows."""
    from hf_pp import AutoPipeline
    from hf_pp.functional import pipeline_model

    if api == "autopipeline":
        ap = AutoPipeline(mesh, pp_schedule=schedule_name, pp_batch_size=BATCH, dp_axis_names=None, device="cpu")
        ap.build(model, loss_fn=loss_fn)
        return ap.info.schedule, ap.parts, ap.info.has_first_stage, ap.info.has_last_stage, ap
    schedule, parts, has_first, has_last, _ = pipeline_model(
        model, mesh, None, pp_axis_name="pp", dp_axis_names=None, layers_per_stage=None,
        pipeline_parallel_schedule=schedule_name, pipeline_parallel_schedule_csv=None, microbatch_size=1,
        local_batch_size=BATCH, device="cpu", loss_fn=loss_fn,
    )
    return schedule, parts, has_first, has_last, None


def _grad_mismatches(parts, expected, what):
    bad = []
    for part in parts:
        for n, p in part.named_parameters():
            if p.grad is None:
                bad.append(f"{what} {n}: no gradient")
            elif not torch.allclose(p.grad, expected[n], rtol=RTOL, atol=ATOL):
                bad.append(f"{what} {n}: max diff {(p.grad - expected[n]).abs().max().item():.3g}")
    return bad


def _spec_loop_worker(rank, world_size, cases):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("pp",))
    batches = [tiny_batch(BATCH, SEQ, seed=seed) for seed in (1, 2)]
    n_items = sum(count_loss_tokens(labels) for _, _, labels in batches)  # both batches make one optimizer step

    def loss_fn(logits, labels):
        return causal_lm_loss(logits, labels, num_items_in_batch=n_items)

    report = {}
    for model_type, api, schedule_name in cases:
        what = f"{model_type}/{api}/{schedule_name}"
        model = tiny_model(model_type, tie_word_embeddings=True)
        assert model.get_parameter(EMBED) is model.get_parameter(HEAD), what
        expected, stepped = _reference(model, batches, loss_fn)
        schedule, parts, has_first, has_last, ap = _spec_pipeline(api, model, mesh, schedule_name, loss_fn)
        opt = torch.optim.AdamW([p for part in parts for p in part.parameters()], lr=LR)
        bad = []
        for i, (input_ids, mask, labels) in enumerate(batches):
            args = (input_ids,) if has_first else ()
            schedule.step(*args, target=labels if has_last else None, attention_mask=mask)
            bad += _grad_mismatches(parts, expected[i], f"{what} step {i + 1}:")
            if ap is not None:
                ap.sync_tied_grads()  # the older API's extra call must not add the copies twice
                bad += _grad_mismatches(parts, expected[i], f"{what} step {i + 1} + sync_tied_grads:")
        opt.step()
        for part in parts:
            for n, p in part.named_parameters():
                if n in (EMBED, HEAD) and not torch.allclose(p.detach(), stepped, rtol=RTOL, atol=ATOL):
                    bad.append(f"{what} {n} after AdamW: max diff {(p.detach() - stepped).abs().max().item():.3g}")
        held = sorted(n for part in parts for n, _ in part.named_parameters() if n in (EMBED, HEAD))
        report[what] = (bad, held)
    return report


@pytest.mark.slow
@pytest.mark.parametrize("pp", [2, 4])
def test_spec_loop_on_tied_models_matches_unsplit_grads_with_no_extra_call(pp):
    """schedule.step twice (accumulating), then AdamW: every gradient and the tied weight equal the unsplit
    model's, through AutoPipeline and functional.pipeline_model; at pp=2 also ZBV, whose V layout puts
    both copies on rank 0 (a local sum)."""
    cases = [(model_type, api, "1f1b") for model_type in SPEC_MODEL_TYPES for api in ("autopipeline", "functional")]
    if pp == 2:
        cases.append(("llama", "autopipeline", "zbv_zero_bubble"))
    per_rank = run_distributed(_spec_loop_worker, pp, cases, timeout_s=240)
    for case in cases:
        what = "/".join(case)
        held = [per_rank[r][what][1] for r in range(pp)]
        if case[2] == "zbv_zero_bubble":
            assert held == [[HEAD, EMBED], []], held  # both copies on one rank
        else:
            assert held[0] == [EMBED] and held[-1] == [HEAD], held
        for rank in range(pp):
            bad = per_rank[rank][what][0]
            assert not bad, f"rank {rank}: " + "; ".join(bad[:6])


class _AccumulatingSchedule:
    """Stands in for a torch schedule: each step adds its gradients into the copies as autograd does, then,
    with ``scale_grads``, divides every whole gradient by the number of microbatches as torch does."""

    def __init__(self, params, grads_per_step, scale_grads=False):
        self.params, self.grads_per_step, self.calls = params, grads_per_step, 0
        self.scale_grads, self._n_microbatches, self._has_backward = scale_grads, 2, True

    def step(self):
        if self._has_backward:
            for p, g in zip(self.params, self.grads_per_step[self.calls]):
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.add_(g)
            if self.scale_grads:
                for p in self.params:
                    p.grad.div_(self._n_microbatches)
        self.calls += 1
        return "output"


def _two_copies_and_an_untied_weight():
    embed, head = nn.Embedding(4, 3), nn.Linear(3, 4)
    head.weight = nn.Parameter(embed.weight.detach().clone())
    parts = [nn.ModuleDict({"embed": embed}), nn.ModuleDict({"head": head})]
    sync = TiedGradientSync(parts, TiedWeights([("embed.weight", "head.weight")], [(0,)], [None]))
    return embed.weight, head.weight, head.bias, sync


@pytest.mark.parametrize("scale_grads", [False, True])
def test_step_sums_only_the_gradient_it_added(scale_grads):
    """Accumulating over two steps gives the unsplit sum, each step's share once; a tied weight is divided by
    scale_grads exactly as an untied one is (torch divides the whole accumulated gradient every step)."""
    emb, head, bias, sync = _two_copies_and_an_untied_weight()
    g = torch.Generator().manual_seed(0)
    steps = [[torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g), torch.randn(4, generator=g)]
             for _ in range(2)]
    schedule = _AccumulatingSchedule([emb, head, bias], steps, scale_grads)
    sync_tied_grads_in_step(schedule, sync)
    assert tied_gradient_sync_of(schedule) is sync
    n = 2 if scale_grads else 1
    tied, untied = torch.zeros(4, 3), torch.zeros(4)
    for a, b, u in steps:
        assert schedule.step() == "output"
        # What the unsplit model holds: the copies' shares added, the same arithmetic as the untied bias.
        tied, untied = (tied + a + b) / n, (untied + u) / n
        torch.testing.assert_close(bias.grad, untied)
        torch.testing.assert_close(emb.grad, tied)
        assert torch.equal(emb.grad, head.grad) and emb.grad is not head.grad


def test_step_without_backward_or_failing_leaves_gradients_alone():
    emb, head, bias, sync = _two_copies_and_an_untied_weight()
    schedule = _AccumulatingSchedule([emb, head, bias], [[torch.ones(4, 3), torch.ones(4, 3), torch.ones(4)]])
    sync_tied_grads_in_step(schedule, sync)
    emb.grad, head.grad = torch.full((4, 3), 2.0), torch.full((4, 3), 2.0)
    schedule._has_backward = False  # what schedule.eval() sets around its call of step
    schedule.step()
    assert torch.equal(emb.grad, torch.full((4, 3), 2.0)) and torch.equal(head.grad, emb.grad)
    schedule._has_backward, schedule.grads_per_step = True, []  # the next step raises (IndexError)
    with pytest.raises(IndexError):
        schedule.step()
    assert torch.equal(emb.grad, torch.full((4, 3), 2.0)) and torch.equal(head.grad, emb.grad)


def test_detach_gives_back_the_plain_step_and_attaching_twice_is_refused():
    emb, head, bias, sync = _two_copies_and_an_untied_weight()
    schedule = _AccumulatingSchedule([emb, head, bias], [[torch.ones(4, 3), 2 * torch.ones(4, 3), torch.ones(4)]])
    sync_tied_grads_in_step(schedule, sync)
    with pytest.raises(PipelineConfigError, match="already sums tied gradients"):
        sync_tied_grads_in_step(schedule, sync)
    detach_tied_gradient_sync(schedule)
    detach_tied_gradient_sync(schedule)  # nothing attached: nothing to do
    assert tied_gradient_sync_of(schedule) is None and "step" not in vars(schedule)
    schedule.step()
    assert torch.equal(emb.grad, torch.ones(4, 3)) and torch.equal(head.grad, 2 * torch.ones(4, 3))  # not summed

"""Tied input/output embeddings across the first and last stage train like the unsplit model.

Three architectures whose small variants tie embeddings, pp=2 and pp=4, 1F1B,
3 AdamW steps: the first stage's embedding and the last stage's lm_head copy
stay bitwise equal to each other and equal the unsplit run.
"""

import copy

import pytest
import torch
import torch.nn as nn

from distributed import run_distributed
from hf_models import TIED_MODEL_TYPES, tiny_batch, tiny_model
from hf_parity import ATOL, RTOL
from hf_pp.losses import causal_lm_loss, count_loss_tokens
from hf_pp.tied import TiedWeights, plan_tied_weights, sync_tied_gradients

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
        )
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

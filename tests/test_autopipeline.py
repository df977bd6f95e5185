"""AutoPipeline on gloo ranks: whole-pipeline inspection equals the unsplit
model, clipping equals torch's clip_grad_norm_ on the unsplit model (norm 2
and inf, tied and untied weights), also at pp=2 x dp=2 with tied weights
(mesh axes in either order), and bad input fails clearly."""

import copy
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

from helpers.custom_models import CustomModel, custom_model_fqns, token_ce_loss
from helpers.distributed import run_distributed
from hf_pp import AutoPipeline
from hf_pp.errors import PipelineConfigError

BATCH, SEQ, VOCAB, HIDDEN, LAYERS, MAX_NORM = 8, 6, 32, 16, 8, 1e-2


def _model(tied: bool, kind: str = "custom"):
    torch.manual_seed(0)
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(num_hidden_layers=LAYERS, hidden_size=HIDDEN, intermediate_size=32, num_attention_heads=2,
                             num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=tied)
        return LlamaForCausalLM(config)
    model = CustomModel(VOCAB, HIDDEN, LAYERS)
    if tied:
        model.output_proj.weight = model.embedding.weight  # (vocab, hidden) both
    else:
        model.layers[0].norm1.weight.requires_grad_(False)  # a frozen weight: trainable counts differ
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)


def _recording_parallelize_fn(seen: list):
    """A parallelize_fn that changes nothing and records the dp_axis_names it was given."""

    def parallelize(part, world_mesh, moe_mesh, *, pp_enabled, dp_axis_names, **kwargs):
        seen.append(dp_axis_names)
        return part

    return parallelize


def _check_case(mesh, name: str, per_rank: int, tied: bool, world_size: int, kind: str = "custom",
                default_dp: bool = False) -> dict:
    model = _model(tied, kind)
    hf = kind != "custom"  # Hugging Face models: the default plan and the patched forwards
    plan = None if hf else custom_model_fqns(world_size * per_rank, LAYERS)
    # default_dp: leave dp_axis_names at its default ("dp",), which a pp-only mesh lacks: no data parallelism.
    dp = {} if default_dp else {"dp_axis_names": None}
    ap = AutoPipeline(mesh, pp_schedule=name, pp_batch_size=BATCH, module_fqns_per_model_part=plan,
                      patch_inner_model=hf, patch_causal_lm_model=hf, device="cpu", **dp)
    seen: list = []
    ap.build(model, loss_fn=token_ce_loss(BATCH * SEQ), parallelize_fn=_recording_parallelize_fn(seen))
    assert seen == [None] * per_rank  # every stage, told there is no DP axis to use
    if hf:
        plan = ap.list_stage_modules()
        assert plan[0][0] == "model.embed_tokens" and "lm_head" in plan[-1] and len(plan) == world_size * per_rank
    # Whole-pipeline counts and module lists, the same on every rank, equal to the unsplit model.
    unique = {id(p): p for p in model.parameters()}.values()
    assert ap.get_total_param_count() == sum(p.numel() for p in unique)
    assert ap.get_total_param_count(trainable_only=True) == sum(p.numel() for p in unique if p.requires_grad)
    assert sum(ap.get_stage_param_counts()) == ap.get_total_param_count()
    assert ap.list_stage_modules() == plan
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    for stage, part in zip(ap.info.stages, ap.parts):
        fqns = plan[stage.stage_index]
        expected = sorted(n for n in names if any(n == f or n.startswith(f + ".") for f in fqns))
        assert sorted(n for n, _ in part.named_parameters()) == expected, (name, stage.stage_index)
        assert ap.stage_ranks()[stage.stage_index] == dist.get_rank()
    assert ap.info.enabled and ap.info.has_first_stage == (0 in [s.stage_index for s in ap.info.stages])

    # Reference: the unsplit model on the whole batch, clipped by torch.
    x, y = _batch()
    ref = copy.deepcopy(model)
    out = ref(x)
    F.cross_entropy(getattr(out, "logits", out).flatten(0, 1), y.flatten()).backward()
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters(remove_duplicate=False) if p.grad is not None}

    losses = []
    assert ap.step(x, target=y, losses=losses) is None  # no merged outputs unless asked for
    assert (ap._tied_sync is not None) == tied  # tied copies live on two stages in every case here
    ap.sync_tied_grads()
    saved = [[p.grad.clone() if p.grad is not None else None for p in part.parameters()] for part in ap.parts]
    totals = {}
    for norm_type in (2.0, float("inf")):
        for part, grads in zip(ap.parts, saved):
            for p, g in zip(part.parameters(), grads):
                p.grad = None if g is None else g.clone()
        for n, p in ref.named_parameters():
            p.grad = ref_grads[n].clone() if n in ref_grads else None
        ref_total = torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM, norm_type)
        assert ref_total > MAX_NORM  # clipping really happens
        total = ap.clip_grad_norm(MAX_NORM, norm_type)
        torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=0)
        clipped = {n: p.grad for n, p in ref.named_parameters(remove_duplicate=False)}
        for part in ap.parts:
            for n, p in part.named_parameters():
                if clipped[n] is None:
                    assert p.grad is None, n
                else:
                    torch.testing.assert_close(p.grad, clipped[n], rtol=1e-5, atol=1e-9, msg=lambda m: f"{name} {n}: {m}")
        totals[norm_type] = total.item()
    # Asked for, the last stage returns the whole batch's output, merged from its microbatches.
    merged = ap.step(x, target=y, return_outputs=True)
    if ap.info.has_last_stage:
        torch.testing.assert_close(merged, getattr(out, "logits", out), rtol=1e-5, atol=1e-6)
    else:
        assert merged is None
    return {"totals": totals, "summary": ap.debug_summary(), "table": ap.pretty_print_stages(max_modules_per_stage=3)}


def _errors(mesh) -> dict:
    messages = {}
    ap = AutoPipeline(mesh, pp_batch_size=8, dp_axis_names=None, patch_inner_model=False, patch_causal_lm_model=False)
    assert not ap.info.enabled
    for method, call in {
        "parts": lambda: ap.parts, "step": lambda: ap.step(torch.zeros(8, 2)), "counts": ap.get_stage_param_counts,
        "modules": ap.list_stage_modules, "clip": lambda: ap.clip_grad_norm(1.0), "summary": ap.debug_summary,
        "picture": lambda: ap.visualize_current_schedule("x.png"),
    }.items():
        with pytest.raises(PipelineConfigError, match="call AutoPipeline"):
            call()
        messages[method] = "ok"
    with pytest.raises(PipelineConfigError, match="needs loss_fn"):
        ap.build(_model(False))
    with pytest.raises(PipelineConfigError, match="no axis named 'pipe'"):
        AutoPipeline(mesh, pp_axis_name="pipe")
    with pytest.raises(PipelineConfigError, match="multiple of pp_microbatch_size"):
        AutoPipeline(mesh, pp_batch_size=6, pp_microbatch_size=4)
    plan = custom_model_fqns(dist.get_world_size(), LAYERS)
    built = AutoPipeline(mesh, pp_batch_size=8, dp_axis_names=None, module_fqns_per_model_part=plan,
                         patch_inner_model=False, patch_causal_lm_model=False).build(_model(False), loss_fn=token_ce_loss(1))
    for bad in (0, -1.0):
        with pytest.raises(PipelineConfigError, match="max_norm > 0"):
            built.clip_grad_norm(bad)
    with pytest.raises(PipelineConfigError, match="positive, finite divisor"):
        built.scale_grads_by_divisor(0)
    return messages


def _hf_worker(rank, world_size, cases):
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("pp",))
    return {f"{name}/{per_rank}/{'tied' if tied else 'untied'}": _check_case(mesh, name, per_rank, tied, world_size, "llama")
            for name, per_rank, tied in cases}


def _worker(rank, world_size, cases):
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("pp",))
    results = {f"{name}/{per_rank}/{'tied' if tied else 'untied'}": _check_case(mesh, name, per_rank, tied, world_size)
               for name, per_rank, tied in cases}
    results["errors"] = _errors(mesh)
    if rank == 0:
        fd, path = tempfile.mkstemp(suffix=".png")
        os.close(fd)
        ap = AutoPipeline(mesh, pp_schedule=cases[-1][0], pp_batch_size=BATCH, dp_axis_names=None,
                          module_fqns_per_model_part=custom_model_fqns(world_size * cases[-1][1], LAYERS),
                          patch_inner_model=False, patch_causal_lm_model=False)
        # build is collective: the other ranks build the same pipeline below
        ap.build(_model(False), loss_fn=token_ce_loss(1))
        ap.visualize_current_schedule(path)
        with open(path, "rb") as f:
            results["png"] = f.read(24)
        os.remove(path)
    else:
        AutoPipeline(mesh, pp_schedule=cases[-1][0], pp_batch_size=BATCH, dp_axis_names=None,
                     module_fqns_per_model_part=custom_model_fqns(world_size * cases[-1][1], LAYERS),
                     patch_inner_model=False, patch_causal_lm_model=False).build(_model(False), loss_fn=token_ce_loss(1))
    return results


def _assert_same_on_every_rank(per_rank):
    keys = [k for k in per_rank[0] if k not in ("errors", "png")]
    for key in keys:
        assert all(r[key]["totals"] == per_rank[0][key]["totals"] for r in per_rank), key
        assert all(r[key]["table"] == per_rank[0][key]["table"] for r in per_rank), key
    if "png" not in per_rank[0]:
        return
    png = per_rank[0]["png"]
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert 600 <= width <= 6000 and 150 <= height <= 2000


@pytest.mark.slow
def test_pp2_counts_modules_and_clipping_match_unsplit():
    per_rank = run_distributed(_worker, 2, [("1f1b", 1, False), ("1f1b", 1, True), ("zbv_zero_bubble", 2, True)])
    _assert_same_on_every_rank(per_rank)
    summary = per_rank[0]["zbv_zero_bubble/2/tied"]["summary"]
    assert "ZBVZeroBubble" in summary and "tied weights" in summary and "embedding.weight = output_proj.weight" in summary
    table = per_rank[1]["1f1b/1/untied"]["table"]
    assert table.splitlines()[0].startswith("Stage 0 (rank 0):") and "layers.0-3" in table


@pytest.mark.slow
def test_pp4_virtual_stages_counts_modules_and_clipping_match_unsplit():
    per_rank = run_distributed(_worker, 4, [("interleaved_1f1b", 2, False), ("interleaved_1f1b", 2, True)])
    _assert_same_on_every_rank(per_rank)
    table = per_rank[3]["interleaved_1f1b/2/tied"]["table"]
    assert "Stage 7 (rank 3)" in table and "Stage 4 (rank 0)" in table


@pytest.mark.slow
def test_tiny_llama_pp2_and_virtual_stages_match_unsplit():
    per_rank = run_distributed(_hf_worker, 2, [("1f1b", 1, False), ("1f1b", 1, True), ("interleaved_1f1b", 2, True)])
    _assert_same_on_every_rank(per_rank)
    assert "lm_head" in per_rank[0]["1f1b/1/tied"]["summary"]


@pytest.mark.slow
def test_tiny_llama_pp4_virtual_stages_tied_match_unsplit():
    per_rank = run_distributed(_hf_worker, 4, [("interleaved_1f1b", 2, True)])
    _assert_same_on_every_rank(per_rank)
    assert "Stage 7 (rank 3)" in per_rank[0]["interleaved_1f1b/2/tied"]["table"]


def _default_dp_worker(rank, world_size):
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("pp",))
    return {"1f1b/1/tied": _check_case(mesh, "1f1b", 1, True, world_size, default_dp=True)}


@pytest.mark.slow
def test_default_dp_axis_on_pp_only_mesh_means_no_data_parallelism():
    """dp_axis_names keeps its default ("dp",) on a mesh without that axis: stages get no DP axes and
    the pipeline's gradients and clipping equal the unsplit model's on the whole batch."""
    _assert_same_on_every_rank(run_distributed(_default_dp_worker, 2))


def _check_dp_case(mesh) -> dict:
    """pp=2 x dp=2, tied tiny Llama, 1F1B; the global batch is 2 * BATCH rows, replica d trains on rows
    [d * BATCH, (d + 1) * BATCH) with its own loss (mean CE over its BATCH * SEQ tokens).

    Expected: after sync_tied_grads each replica holds the unsplit model's gradients on its half; after
    averaging over DP by hand (DDP's arithmetic: AutoPipeline leaves it to the caller), the unsplit
    model's gradients on the whole global batch, and clip_grad_norm equals torch's on those.
    """
    model = _model(True, "llama")
    dp_rank, dp_group = mesh["dp"].get_local_rank(), mesh["dp"].get_group()
    ap = AutoPipeline(mesh, pp_schedule="1f1b", pp_batch_size=BATCH, device="cpu")  # default dp_axis_names ("dp",)
    seen: list = []
    ap.build(model, loss_fn=token_ce_loss(BATCH * SEQ), parallelize_fn=_recording_parallelize_fn(seen))
    assert seen == [("dp",)]
    assert ap._tied_sync is not None

    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (2 * BATCH, SEQ), generator=g)
    y = torch.randint(0, VOCAB, (2 * BATCH, SEQ), generator=g)
    mine = slice(dp_rank * BATCH, (dp_rank + 1) * BATCH)

    def reference(rows):
        ref = copy.deepcopy(model)
        loss = F.cross_entropy(ref(x[rows]).logits.flatten(0, 1), y[rows].flatten())
        loss.backward()
        return loss.detach(), ref

    half_loss, half = reference(mine)
    _, full = reference(slice(None))

    losses = []
    ap.step(x[mine], target=y[mine], losses=losses)
    if ap.info.has_last_stage:
        torch.testing.assert_close(torch.stack(losses).sum(), half_loss, rtol=1e-5, atol=1e-7)
    ap.sync_tied_grads()
    tied_norm = None
    for reference_model, what in ((half, "half batch"), (None, "global batch")):
        if reference_model is None:
            for part in ap.parts:
                for p in part.parameters():
                    dist.all_reduce(p.grad, group=dp_group)
                    p.grad.div_(mesh["dp"].size())
            reference_model = full
        expected = {n: p.grad for n, p in reference_model.named_parameters(remove_duplicate=False)}
        for part in ap.parts:
            for n, p in part.named_parameters():
                torch.testing.assert_close(p.grad, expected[n], rtol=1e-5, atol=1e-7, msg=lambda m: f"{what} {n}: {m}")
                if tied_norm is None and n in ("model.embed_tokens.weight", "lm_head.weight"):
                    tied_norm = p.grad.norm().item()  # this replica's own (half-batch) tied gradient

    assert tied_norm is not None  # at pp=2 every rank holds one copy: the embedding or lm_head
    saved = [[p.grad.clone() for p in part.parameters()] for part in ap.parts]
    full_grads = {n: p.grad.clone() for n, p in full.named_parameters()}
    totals = {}
    for norm_type in (2.0, float("inf")):
        for part, grads in zip(ap.parts, saved):
            for p, grad in zip(part.parameters(), grads):
                p.grad = grad.clone()
        for n, p in full.named_parameters():
            p.grad = full_grads[n].clone()
        ref_total = torch.nn.utils.clip_grad_norm_(full.parameters(), MAX_NORM, norm_type)
        assert ref_total > MAX_NORM  # clipping really happens
        total = ap.clip_grad_norm(MAX_NORM, norm_type)
        torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=0)
        clipped = {n: p.grad for n, p in full.named_parameters(remove_duplicate=False)}
        for part in ap.parts:
            for n, p in part.named_parameters():
                torch.testing.assert_close(p.grad, clipped[n], rtol=1e-5, atol=1e-9, msg=lambda m: f"clipped {n}: {m}")
        totals[norm_type] = total.item()
    return {"dp_rank": dp_rank, "pp_rank": mesh["pp"].get_local_rank(), "tied_norm": tied_norm, "totals": totals}


def _dp_worker(rank, world_size, orders):
    sizes = {"pp": 2, "dp": 2}
    return {order: _check_dp_case(init_device_mesh("cpu", tuple(sizes[a] for a in order), mesh_dim_names=order))
            for order in orders}


@pytest.mark.slow
def test_pp2_dp2_tied_llama_syncs_each_replica_and_matches_unsplit():
    orders = [("pp", "dp"), ("dp", "pp")]
    per_rank = run_distributed(_dp_worker, 4, orders)
    for order in orders:
        results = [r[order] for r in per_rank]
        # Rank layout of the mesh: row-major over the axes in their given order.
        if order == ("pp", "dp"):
            assert [(r["pp_rank"], r["dp_rank"]) for r in results] == [(0, 0), (0, 1), (1, 0), (1, 1)]
        else:
            assert [(r["pp_rank"], r["dp_rank"]) for r in results] == [(0, 0), (1, 0), (0, 1), (1, 1)]
        by_replica = {}
        for r in results:
            by_replica.setdefault(r["dp_rank"], []).append(r["tied_norm"])
        # Within a replica both tied copies hold one summed gradient; the replicas' halves differ.
        assert all(len(norms) == 2 and norms[0] == norms[1] for norms in by_replica.values())
        assert by_replica[0][0] != pytest.approx(by_replica[1][0], rel=1e-3)
        assert all(r["totals"] == results[0]["totals"] for r in results)
    for norm_type, total in per_rank[0][orders[0]]["totals"].items():
        assert total == pytest.approx(per_rank[0][orders[1]]["totals"][norm_type], rel=1e-5)


def _fake_cuda(monkeypatch, count: int, current: int = 0, local_rank: str | None = None):
    """A process that sees ``count`` GPUs (none when 0), with LOCAL_RANK as torchrun would set it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)


@pytest.mark.parametrize("count, current, local_rank, expected", [
    (8, 0, "3", "cuda:3"),     # torchrun on an 8-GPU node: each local rank on its own GPU, not all on GPU 0
    (8, 0, "0", "cuda:0"),
    (1, 0, "5", "cuda:0"),     # the launcher gave each process one GPU (CUDA_VISIBLE_DEVICES per rank)
    (4, 2, None, "cuda:2"),    # no LOCAL_RANK: the current device, e.g. chosen by torch.cuda.set_device
    (0, 0, "3", "cpu"),        # no CUDA
    (0, 0, None, "cpu"),
])
def test_default_device_follows_local_rank(monkeypatch, count, current, local_rank, expected):
    from hf_pp.mesh import default_device

    _fake_cuda(monkeypatch, count, current, local_rank)
    assert default_device() == torch.device(expected)


@pytest.mark.parametrize("local_rank, match", [("4", "LOCAL_RANK=4 but this process sees 4 GPUs"),
                                                ("x", "LOCAL_RANK='x' is not a local rank"),
                                                ("-1", "LOCAL_RANK='-1' is not a local rank")])
def test_default_device_refuses_a_local_rank_without_its_gpu(monkeypatch, local_rank, match):
    from hf_pp.mesh import default_device

    _fake_cuda(monkeypatch, 4, 0, local_rank)
    with pytest.raises(PipelineConfigError, match=match) as err:
        default_device()
    assert "pass device explicitly" in str(err.value)

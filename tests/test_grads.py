"""hf_pp.grads in one process: the same numbers as torch's clip_grad_norm_,
tied copies counted once, and clear errors for bad arguments."""

import copy

import pytest
import torch
import torch.nn as nn

from hf_pp.errors import PipelineConfigError
from hf_pp.grads import clip_grad_norm, scale_grads_by_divisor, total_grad_norm


def _net_with_grads(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    net(torch.randn(4, 5)).pow(2).sum().backward()
    return net


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.5, float("inf")])
@pytest.mark.parametrize("max_norm", [1e-2, 1e6])
def test_clip_matches_torch_on_split_parts(norm_type, max_norm):
    net = _net_with_grads()
    ref = copy.deepcopy(net)
    for p, q in zip(net.parameters(), ref.parameters()):
        q.grad = p.grad.clone()
    ref_total = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm, norm_type)
    parts = [net[0], net[2]]  # two "stages" in one process
    total = clip_grad_norm(parts, max_norm, norm_type)
    torch.testing.assert_close(total, ref_total, rtol=1e-6, atol=0)
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)


@pytest.mark.parametrize("norm_type", [2.0, float("inf")])
def test_tied_copies_are_counted_once(norm_type):
    """Two stage copies of one tied weight, each holding the summed gradient, count as one parameter."""
    torch.manual_seed(0)
    emb, head = nn.Embedding(6, 4), nn.Linear(4, 6, bias=False)
    head.weight = emb.weight
    x = torch.randint(0, 6, (3, 5))
    head(emb(x)).sum().backward()
    ref_total = torch.nn.utils.clip_grad_norm_([emb.weight], 1e-3, norm_type)
    first, last = nn.ModuleDict({"embed": nn.Embedding(6, 4)}), nn.ModuleDict({"head": nn.Linear(4, 6, bias=False)})
    ref_grad_before = emb.weight.grad / (torch.clamp(1e-3 / (ref_total + 1e-6), max=1.0))
    for part_param in (first["embed"].weight, last["head"].weight):
        part_param.grad = ref_grad_before.clone()
    tied = [["embed.weight", "head.weight"]]
    assert total_grad_norm([first, last], norm_type) > ref_total * 1.1 or norm_type == float("inf")
    total = clip_grad_norm([first, last], 1e-3, norm_type, tied_groups=tied)
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=0)
    torch.testing.assert_close(first["embed"].weight.grad, emb.weight.grad, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(last["head"].weight.grad, emb.weight.grad, rtol=1e-5, atol=1e-9)


def test_scale_grads_by_divisor_divides_every_grad():
    net = _net_with_grads()
    before = [p.grad.clone() for p in net.parameters()]
    scale_grads_by_divisor([net[0], net[2]], 8)
    for p, g in zip(net.parameters(), before):
        torch.testing.assert_close(p.grad, g / 8)


def test_no_grads_gives_zero_norm():
    assert total_grad_norm([nn.Linear(2, 2)]).item() == 0.0


def _frozen_stage_on_meta() -> nn.Module:
    """A stage with no gradient at all (e.g. a head-only stage under LoRA), on a device that is not the CPU."""
    with torch.device("meta"):
        stage = nn.Linear(2, 2).requires_grad_(False)
    stage.register_buffer("scale", torch.ones(2, device="meta"))
    return stage


def test_a_stage_without_gradients_reduces_on_its_own_device(monkeypatch):
    """NCCL refuses CPU tensors: the zero a gradient-free rank contributes must live on the stage's device."""
    reduced = []
    monkeypatch.setattr("hf_pp.grads.dist.all_reduce", lambda tensor, **kwargs: reduced.append(tensor.device))
    pp_group = object()  # stands in for the pipeline group; the collective above is a recorder
    for norm_type in (2.0, float("inf")):
        assert total_grad_norm([_frozen_stage_on_meta()], norm_type, pp_group=pp_group).device.type == "meta"
    assert clip_grad_norm([_frozen_stage_on_meta()], 1.0, pp_group=pp_group).device.type == "meta"
    buffers_only = nn.Module()
    buffers_only.register_buffer("steps", torch.zeros(1, device="meta"))
    assert total_grad_norm([nn.Module(), buffers_only], pp_group=pp_group).device.type == "meta"
    assert [d.type for d in reduced] == ["meta"] * 4


def test_the_caller_names_the_device_of_the_norm():
    assert total_grad_norm([_frozen_stage_on_meta()], device="cpu").device == torch.device("cpu")
    assert total_grad_norm([nn.Module()]).device == torch.device("cpu")  # no tensor at all: the CPU
    net = _net_with_grads()
    torch.testing.assert_close(total_grad_norm([net], device="cpu"), total_grad_norm([net]))
    assert total_grad_norm([net], device="meta").device.type == "meta"  # the gradients' terms go to the named device


@pytest.mark.parametrize("bad", [0, -1.0, None, True])
def test_clip_rejects_non_positive_max_norm(bad):
    with pytest.raises(PipelineConfigError, match="max_norm > 0"):
        clip_grad_norm([_net_with_grads()], bad)


def test_bad_divisor_and_norm_type_are_refused():
    net = _net_with_grads()
    for bad in (0, -2, float("inf")):
        with pytest.raises(PipelineConfigError, match="positive, finite divisor"):
            scale_grads_by_divisor([net], bad)
    with pytest.raises(PipelineConfigError, match="norm_type must be positive"):
        total_grad_norm([net], -1)


def test_error_if_nonfinite():
    net = _net_with_grads()
    net[0].weight.grad[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm([net], 1.0, error_if_nonfinite=True)


def _dtensor_case(mesh, norm_type):
    """pp=2 x dp=2: each pipeline rank holds one stage whose weight grad is a DTensor sharded
    over dp (FSDP2's layout) and whose bias grad is replicated; compare with the full tensors."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    g = torch.Generator().manual_seed(0)
    full = [(torch.randn(6, 3, generator=g), torch.randn(6, generator=g)) for _ in range(2)]  # per stage
    ref = [torch.zeros_like(t, requires_grad=True) for stage in full for t in stage]
    for r, t in zip(ref, [t for stage in full for t in stage]):
        r.grad = t.clone()
    ref_total = torch.nn.utils.clip_grad_norm_(ref, 0.1, norm_type)

    stage = mesh["pp"].get_local_rank()
    lin = nn.Linear(3, 6)
    dp = mesh["dp"]
    lin.weight = nn.Parameter(distribute_tensor(torch.zeros(6, 3), dp, [Shard(0)]))
    lin.bias = nn.Parameter(distribute_tensor(torch.zeros(6), dp, [Replicate()]))
    lin.weight.grad = distribute_tensor(full[stage][0].clone(), dp, [Shard(0)])
    lin.bias.grad = distribute_tensor(full[stage][1].clone(), dp, [Replicate()])
    total = clip_grad_norm([lin], 0.1, norm_type, pp_group=mesh["pp"].get_group())
    torch.testing.assert_close(total, ref_total, rtol=1e-6, atol=0)
    dp_rank = dp.get_local_rank()
    torch.testing.assert_close(lin.weight.grad.to_local(), ref[2 * stage].grad[3 * dp_rank: 3 * dp_rank + 3], rtol=1e-6, atol=0)
    torch.testing.assert_close(lin.bias.grad.to_local(), ref[2 * stage + 1].grad, rtol=1e-6, atol=0)
    return total.item()


def _dtensor_worker(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
    return [_dtensor_case(mesh, norm_type) for norm_type in (2.0, float("inf"))]


@pytest.mark.slow
def test_dtensor_shards_across_pp_and_dp_match_full_norm():
    from helpers.distributed import run_distributed

    totals = run_distributed(_dtensor_worker, 4)
    assert all(t == totals[0] for t in totals)

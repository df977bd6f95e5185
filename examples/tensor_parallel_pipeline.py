"""Your own parallelize_fn: tensor parallelism inside each pipeline stage (pp=2 x tp=2 on 4 ranks).

Launch (CPU):
    torchrun --nproc-per-node 4 examples/tensor_parallel_pipeline.py

What it shows: AutoPipeline calls `parallelize_fn(part, world_mesh, moe_mesh,
pp_enabled=..., dp_axis_names=..., tp_axis_name=...)` on every stage module.
Here it applies torch's `parallelize_module` to each decoder layer of the
stage: q/k/v and gate/up projections split by columns, o/down projections by
rows, over the "tp" axis of a ("pp", "tp") mesh. The loss and weights are
then checked against the same steps on the unsplit model in this process.
"""

from __future__ import annotations

import copy
import datetime

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from transformers import LlamaConfig, LlamaForCausalLM

from hf_pp import AutoPipeline

LAYER_PLAN = {
    "self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
    "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
    "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel(),
}


def tensor_parallel(model, world_mesh, moe_mesh=None, *, pp_enabled, dp_axis_names, tp_axis_name=None, **_):
    """Shard every decoder layer of this stage over the tp axis (attention heads split across tp ranks)."""
    tp_mesh = world_mesh[tp_axis_name]
    for layer in model.model.layers:  # only this stage's layers
        parallelize_module(layer, tp_mesh, LAYER_PLAN)
    return model


def main() -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    pp_size, tp_size = 2, 2
    if world != pp_size * tp_size:  # checked on every rank, before any collective
        dist.destroy_process_group()
        raise SystemExit(f"This example runs pp={pp_size} x tp={tp_size} = {pp_size * tp_size} ranks, but the world "
                         f"size is {world}; launch it with torchrun --nproc-per-node {pp_size * tp_size}.")
    mesh = init_device_mesh("cpu", (pp_size, tp_size), mesh_dim_names=("pp", "tp"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, use_cache=False, attn_implementation="eager")
    model = LlamaForCausalLM(config)
    reference = copy.deepcopy(model)
    batch, seq = 8, 16
    tokens = batch * (seq - 1)

    def loss_fn(logits, labels):  # sum over the microbatch / tokens of the whole batch
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), reduction="sum") / tokens

    ap = AutoPipeline(mesh, pp_axis_name="pp", dp_axis_names=None, tp_axis_name="tp", pp_schedule="1f1b",
                      pp_batch_size=batch).build(model, loss_fn=loss_fn, parallelize_fn=tensor_parallel)
    optimizer = torch.optim.AdamW([p for part in ap.parts for p in part.parameters()], lr=1e-3)
    ref_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    data = torch.randint(0, config.vocab_size, (3, batch, seq), generator=torch.Generator().manual_seed(1))
    for step, ids in enumerate(data):
        optimizer.zero_grad()
        losses = []
        ap.step(ids, target=ids, losses=losses)
        ap.clip_grad_norm(1.0)
        optimizer.step()
        ref_optimizer.zero_grad()
        ref_loss = loss_fn(reference(ids).logits, ids)
        ref_loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        ref_optimizer.step()
        if losses and mesh["tp"].get_local_rank() == 0:  # one printer per value
            print(f"[rank {rank}] step {step} loss {torch.stack(losses).sum().item():.6f} "
                  f"(unsplit {ref_loss.item():.6f})", flush=True)
    ref_params = dict(reference.named_parameters())
    worst = 0.0
    for part in ap.parts:
        for name, p in part.named_parameters():
            full = p.full_tensor() if isinstance(p, DTensor) else p
            worst = max(worst, (full - ref_params[name]).abs().max().item())
    print(f"[rank {rank}] max |pipeline x tp - unsplit| weight difference: {worst:.2e}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

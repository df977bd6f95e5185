"""Pipeline-parallel training of a custom (non-Hugging-Face) PyTorch model.

Launch (CPU, gloo):
    torchrun --nproc-per-node 2 examples/custom_model_pipeline.py
    torchrun --nproc-per-node 4 examples/custom_model_pipeline.py --schedule interleaved_1f1b

What it shows: the functional API on any nn.Module. We name the modules of
each stage (`layered_model_fqns_per_stage`), `pipeline_model` cuts the model
(each rank keeps only its stages, under their original parameter names) and
builds a torch schedule; every rank then calls `schedule.step` with the same
batch. The printed loss is the true loss of the whole batch, and at the end
the pipeline's weights are checked against the same training done unsplit.
"""

from __future__ import annotations

import argparse
import copy
import datetime

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

from hf_pp.functional import pipeline_model
from hf_pp.schedules import resolve_schedule
from hf_pp.stage_math import layered_model_fqns_per_stage


class Block(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        # batch_first: the pipeline splits microbatches along dim 0. No biases:
        # the key bias has a zero gradient, whose float noise AdamW would amplify.
        self.attention = nn.MultiheadAttention(hidden_size, num_heads=8, batch_first=True, bias=False)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, 4 * hidden_size), nn.GELU(), nn.Linear(4 * hidden_size, hidden_size))
        self.norm1 = nn.LayerNorm(hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)

    def forward(self, x):
        x = self.norm1(x + self.attention(x, x, x, need_weights=False)[0])
        return self.norm2(x + self.mlp(x))


class CustomModel(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, num_layers: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, hidden_size)
        self.layers = nn.ModuleList([Block(hidden_size) for _ in range(num_layers)])
        self.output_proj = nn.Linear(hidden_size, vocab_size)

    def forward(self, x):
        # Pipeline-friendly: a stage holds None for the modules of other stages.
        if self.embedding is not None:
            x = self.embedding(x)
        for layer in self.layers or ():
            x = layer(x)
        return self.output_proj(x) if self.output_proj is not None else x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedule", default="1f1b")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("pp",))

    torch.manual_seed(0)  # the same initial model on every rank
    model = CustomModel(args.vocab, args.hidden, args.layers)
    reference = copy.deepcopy(model)
    stages_per_rank = 1 if resolve_schedule(args.schedule).single_stage else 2
    plan = layered_model_fqns_per_stage(
        world * stages_per_rank, [f"layers.{i}" for i in range(args.layers)], first=["embedding"], last=["output_proj"]
    )
    tokens = args.batch * args.seq

    def loss_fn(logits, targets):
        # Sum over this microbatch / tokens of the whole batch: the microbatch
        # losses add up to the batch mean, so no gradient rescaling is needed.
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum") / tokens

    schedule, parts, has_first, has_last, _ = pipeline_model(
        model, mesh, None, pp_axis_name="pp", dp_axis_names=None, layers_per_stage=None,
        pipeline_parallel_schedule=args.schedule, pipeline_parallel_schedule_csv=None,
        microbatch_size=1, local_batch_size=args.batch, device="cpu", loss_fn=loss_fn,
        module_fqns_per_model_part=plan, patch_inner_model=False, patch_causal_lm_model=False,
    )
    del model  # each rank now holds only its stages
    print(f"[rank {rank}] stages {[n for n, _ in parts[0].named_children()]} ... "
          f"{sum(p.numel() for part in parts for p in part.parameters()):,} parameters", flush=True)

    # A learnable toy task: predict the next token of a repeating sequence.
    data = torch.arange(args.seq + 1).repeat(args.batch, 1) % 17
    inputs, targets = data[:, :-1], data[:, 1:]
    optimizer = torch.optim.AdamW([p for part in parts for p in part.parameters()], lr=3e-3)
    ref_optimizer = torch.optim.AdamW(reference.parameters(), lr=3e-3)
    for step in range(args.steps):
        optimizer.zero_grad()
        losses: list[torch.Tensor] = []
        schedule.step(*((inputs,) if has_first else ()), target=targets if has_last else None, losses=losses)
        optimizer.step()
        ref_optimizer.zero_grad()
        F.cross_entropy(reference(inputs).flatten(0, 1), targets.flatten()).backward()
        ref_optimizer.step()
        if has_last and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {torch.stack(losses).sum().item():.4f}", flush=True)

    ref_params = dict(reference.named_parameters())
    worst = max((p - ref_params[n]).abs().max().item() for part in parts for n, p in part.named_parameters())
    worst_t = torch.tensor(worst)
    dist.all_reduce(worst_t, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(f"max |pipeline - unsplit| over all weights after {args.steps} steps: {worst_t.item():.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

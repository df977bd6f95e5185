"""What small microbatches cost in themselves, on the unsplit model, and what batching the weight gradients buys.

The efficiency target of ``pipeline_efficiency.py`` takes as ideal the unsplit
step of the whole batch, scaled by the bubble; that assumes m microbatches of
batch/m samples cost what one batch costs. This script measures that
assumption on one process and one thread (no pipeline, nothing to wait for):
the benchmark Llama's forward + backward of one batch, run as m microbatches
with gradient accumulation, three ways:

- **accumulated**: plain autograd, as every pipeline stage runs it;
- **weight grads deferred**: each linear layer's weight gradient is left out
  of the backward and computed once per step, one matmul over the inputs and
  output gradients of all m microbatches (what a zero-bubble schedule's
  separate weight pass could at best do if it batched its microbatches);
- **accumulated in place**: each microbatch adds its weight gradient into
  ``.grad`` with one ``addmm`` instead of a new tensor plus an add.

"bound" = time(one batch) / time(m microbatches): the efficiency a pipeline
with no bubble loss, no imbalance and free transfers would reach against that
ideal. Every variant's gradients are checked against plain autograd.

Usage:
    python benchmarks/microbatch_cost.py                   # batch 8 x 128 tokens, m = 1, 2, 4, 8
    python benchmarks/microbatch_cost.py --batch 16 --microbatches 1 4 16
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import add_model_args, check_layout_args, make_batch, median, model_size, sum_ce_loss, timed_steps, tiny_llama  # noqa: E402

VARIANTS = ("accumulated", "weight grads deferred", "accumulated in place")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser)
    parser.add_argument("--batch", type=int, default=8, help="samples per step")
    parser.add_argument("--microbatches", type=int, nargs="+", default=[1, 2, 4, 8], help="microbatch counts")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=7)
    args = parser.parse_args(argv)
    check_layout_args(parser, args, ("layers", "hidden", "vocab", "seq", "batch", "steps"), [])  # no pipeline here
    for m in args.microbatches:
        if m < 1 or args.batch % m:
            parser.error(f"--batch {args.batch} is not divisible into {m} microbatches")
    return args


def _linear_weight_grad_function(torch, on_weight_grad):
    """An autograd function for ``x @ W.T`` whose backward returns only the input gradient and hands
    ``(weight, x, dy)`` (2-D) to ``on_weight_grad`` instead."""

    class Linear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight):
            ctx.save_for_backward(x, weight)
            return x @ weight.t()

        @staticmethod
        def backward(ctx, dy):
            x, weight = ctx.saved_tensors
            on_weight_grad(weight, x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]))
            return dy @ weight, None

    return Linear


def build_variant(torch, size, variant: str):
    """``(model, finish)``: the benchmark Llama with its bias-free linears' forwards replaced (this instance only),
    and what to run after the last microbatch's backward."""
    model = tiny_llama(size)
    pending: dict = {}

    def add_in_place(weight, x, dy):
        if weight.grad is None:
            weight.grad = dy.t() @ x
        else:
            weight.grad.addmm_(dy.t(), x)

    def defer(weight, x, dy):
        pending.setdefault(weight, []).append((x, dy))

    def finish() -> None:
        for weight, saved in pending.items():
            grad = torch.cat([dy for _, dy in saved]).t() @ torch.cat([x for x, _ in saved])
            weight.grad = grad if weight.grad is None else weight.grad + grad
        pending.clear()

    if variant != "accumulated":
        function = _linear_weight_grad_function(torch, defer if variant == "weight grads deferred" else add_in_place)
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is None:
                module.forward = lambda x, weight=module.weight: function.apply(x, weight)
    return model, finish


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(1)
    size = model_size(args)
    ids, labels = make_batch(args.batch, size)
    loss_fn = sum_ce_loss(args.batch * size.seq)
    models = {variant: build_variant(torch, size, variant) for variant in VARIANTS}

    def run(variant: str, microbatches: int, keep_grads: bool = False) -> None:
        model, finish = models[variant]
        for chunk_ids, chunk_labels in zip(ids.chunk(microbatches), labels.chunk(microbatches)):
            loss_fn(model(input_ids=chunk_ids).logits, chunk_labels).backward()
        finish()
        if not keep_grads:
            model.zero_grad(set_to_none=True)

    # The variants compute the same gradients (checked once, at the largest m).
    m = max(args.microbatches)
    grads = {}
    for variant in VARIANTS:
        run(variant, m, keep_grads=True)
        grads[variant] = [p.grad.clone() for p in models[variant][0].parameters()]
        models[variant][0].zero_grad(set_to_none=True)
    same = all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for v in VARIANTS[1:] for a, b in zip(grads[v], grads[VARIANTS[0]]))

    times = {}
    for _ in range(2):  # two rounds, interleaved, so load that comes and goes hits every row alike
        for variant in VARIANTS:
            for microbatches in args.microbatches:
                step = timed_steps(lambda: run(variant, microbatches), args.warmup, args.steps)
                times.setdefault((variant, microbatches), []).extend(step)
    one_batch = median(times[("accumulated", 1)])
    print(f"# Microbatch cost: {size}, batch {args.batch}, one process, 1 thread (median of {2 * args.steps} steps)\n")
    print("| variant | m | samples per microbatch | step (s) | vs one batch | bound on efficiency |")
    print("|---|---|---|---|---|---|")
    for variant in VARIANTS:
        for microbatches in args.microbatches:
            step = median(times[(variant, microbatches)])
            print(f"| {variant} | {microbatches} | {args.batch // microbatches} | {step:.3f} | {step / one_batch:.3f} | "
                  f"{one_batch / step:.2f} |")
    print(f"\ngradients of every variant equal plain autograd's (rtol 1e-4): {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()

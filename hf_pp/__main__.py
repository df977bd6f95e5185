"""Command line: ``python -m hf_pp plan CONFIG_OR_MODEL_DIR --pp-size 4`` (also ``hf-pp plan ...``)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

__all__ = ["main"]

# Kept in step with hf_pp.balance.BALANCE_MODES / DEFAULT_BALANCE (a test checks), so --help needs no torch import.
BALANCE_MODES = ("auto", "layers", "params", "time")
DEFAULT_BALANCE = "auto"

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf_pp", description="hf_pp tools (no process group needed).")
    sub = parser.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="dry-run a pipeline layout: stages, memory, bubble, schedule picture")
    plan.add_argument("source", help="model directory, hub id (org/name, from the cache or the hub), config JSON file, "
                      "or a built-in example (tiny-llama, tiny-llama-tied)")
    plan.add_argument("--pp-size", type=int, required=True, help="number of pipeline ranks")
    plan.add_argument("--schedule", default="1f1b", help="pipeline schedule name (default 1f1b)")
    plan.add_argument("--schedule-csv", default=None, help="a CSV schedule instead of a named one")
    plan.add_argument("--layers-per-stage", type=int, default=None)
    plan.add_argument("--round-virtual-stages", choices=("up", "down"), default=None)
    plan.add_argument("--microbatches", type=int, default=None, help="microbatches per step (default: 2 x pp size)")
    plan.add_argument("--batch-size", type=int, default=None,
                      help="samples per step and pipeline, instead of --microbatches: plan the microbatch size "
                           "PipelineTrainingArguments chooses when pp_microbatch_size is unset")
    plan.add_argument("--dtype", choices=tuple(_DTYPES), default="float32", help="parameter dtype for the memory estimate")
    plan.add_argument("--balance", choices=BALANCE_MODES, default=DEFAULT_BALANCE,
                      help="where to cut the layers (pp_balance): balanced forward+backward FLOPs estimated from the "
                           "config (auto, the default, as training does), same count per stage (layers; the report "
                           "shows auto's estimate beside it), balanced parameters, or balanced forward+backward time "
                           "profiled here on the CPU")
    plan.add_argument("--seq-len", type=int, default=None,
                      help="tokens per sample that --balance auto estimates and time profiles (default 512, capped "
                           "by the model)")
    plan.add_argument("--microbatch-size", type=int, default=1,
                      help="samples per microbatch when estimating or profiling (default 1)")
    plan.add_argument("--out", default="schedule.png", help="schedule picture path (default schedule.png)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for a configuration error)."""
    args = _parser().parse_args(argv)
    import torch

    from .errors import PipelineConfigError
    from .planner import format_plan, load_config, meta_model, plan_pipeline

    try:
        model = meta_model(load_config(args.source), getattr(torch, _DTYPES[args.dtype]))
        plan = plan_pipeline(
            model, args.pp_size, args.schedule, layers_per_stage=args.layers_per_stage,
            n_microbatches=args.microbatches, schedule_csv=args.schedule_csv,
            round_to_pp_multiple=args.round_virtual_stages, picture=args.out, balance=args.balance,
            balance_seq_len=args.seq_len, balance_microbatch_size=args.microbatch_size, batch_size=args.batch_size,
        )
    except PipelineConfigError as err:
        print(f"hf_pp plan: {err}", file=sys.stderr)
        return 2
    print(format_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())

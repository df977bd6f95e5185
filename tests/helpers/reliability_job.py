"""A short pipeline training run where one rank fails on purpose (for tests/test_reliability_faults.py).

    cd tests    # a module of the helpers package: run it with -m from tests/
    torchrun --nproc-per-node 2 -m helpers.reliability_job --fail-rank 1 --mode raise --at-step 2 --marker X
    torchrun --nproc-per-node 2 -m helpers.reliability_job --mode kill-in-save --at-step 4 --save-steps 2 --output-dir D
    torchrun --nproc-per-node 2 -m helpers.reliability_job --mode none --save-steps 2 --resume --output-dir D
    torchrun --nnodes 2 --nproc-per-node 2 --node-rank N ... -m helpers.reliability_job --mode none --pp-size 4 --layers 4

Modes: "raise" / "kill" (SIGKILL) inside step ``--at-step``; "kill-in-save": SIGKILL while writing the
weights of ``checkpoint-<at-step>``; "none": no failure. Rank 0 writes the logged losses to
``<output-dir>/losses.json`` when training finishes.
"""

import argparse
import json
import os
import signal

from transformers import TrainerCallback

import hf_pp.checkpoint
from hf_pp import PipelineTrainer, PipelineTrainingArguments

from .trainer_fixtures import CountingDataset, pad_collator, tiny_llama


class Fail(TrainerCallback):
    """Fails inside step ``at_step`` (after the batch is fetched, before the schedule runs)."""

    def __init__(self, mode, at_step):
        self.mode, self.at_step = mode, at_step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 != self.at_step:
            return
        if self.mode == "raise":
            raise RuntimeError("deliberate failure")
        if self.mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)


def kill_while_saving(step: int) -> None:
    """This process dies (SIGKILL) when it starts writing its weight shard of ``checkpoint-<step>``."""
    real = hf_pp.checkpoint.save_file

    def save_file(tensors, path, metadata=None):
        if f"checkpoint-{step}" in path:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(tensors, path, metadata=metadata)

    hf_pp.checkpoint.save_file = save_file


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--fail-rank", type=int, default=1)
    parser.add_argument("--mode", choices=["raise", "kill", "kill-in-save", "none"], default="raise")
    parser.add_argument("--at-step", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--save-steps", type=int, default=0, help="0: no checkpoints")
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --output-dir")
    parser.add_argument("--timeout", type=int, default=30)
    parser.add_argument("--marker", default="")  # lets the test find leftover processes
    parser.add_argument("--output-dir", default="/tmp/hf_pp_reliability_job")
    parser.add_argument("--pp-size", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2, help="per_device_train_batch_size (of one pipeline)")
    parser.add_argument("--layers", type=int, default=2)
    cli = parser.parse_args()
    saving = dict(save_strategy="steps", save_steps=cli.save_steps) if cli.save_steps else dict(save_strategy="no")
    args = PipelineTrainingArguments(
        output_dir=cli.output_dir, pp_size=cli.pp_size, per_device_train_batch_size=cli.batch, max_steps=cli.max_steps,
        report_to="none",
        use_cpu=True, disable_tqdm=True, logging_steps=1, ddp_timeout=cli.timeout, seed=0, **saving,
    )
    failing = int(os.environ["RANK"]) == cli.fail_rank
    callbacks = [Fail(cli.mode, cli.at_step)] if failing and cli.mode in ("raise", "kill") else []
    if failing and cli.mode == "kill-in-save":
        kill_while_saving(cli.at_step)
    trainer = PipelineTrainer(model=tiny_llama(cli.layers), args=args, train_dataset=CountingDataset(16),
                              data_collator=pad_collator, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=True if cli.resume else None)
    if trainer.is_world_process_zero():
        with open(os.path.join(cli.output_dir, "losses.json"), "w") as f:
            json.dump({h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}, f)


if __name__ == "__main__":
    main()  # no teardown here: PipelineTrainer frees its process groups at exit itself

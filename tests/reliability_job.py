"""A short pipeline training run where one rank fails on purpose (for tests/test_reliability_faults.py).

    torchrun --nproc-per-node 2 tests/reliability_job.py --fail-rank 1 --mode raise --at-step 2 --marker X
"""

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(__file__))

from transformers import TrainerCallback  # noqa: E402

from hf_pp import PipelineTrainer, PipelineTrainingArguments  # noqa: E402
from trainer_fixtures import CountingDataset, pad_collator, tiny_llama  # noqa: E402


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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--fail-rank", type=int, default=1)
    parser.add_argument("--mode", choices=["raise", "kill"], default="raise")
    parser.add_argument("--at-step", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=30)
    parser.add_argument("--marker", default="")  # lets the test find leftover processes
    parser.add_argument("--output-dir", default="/tmp/hf_pp_reliability_job")
    cli = parser.parse_args()
    args = PipelineTrainingArguments(
        output_dir=cli.output_dir, pp_size=2, per_device_train_batch_size=2, max_steps=4, report_to="none",
        use_cpu=True, disable_tqdm=True, save_strategy="no", logging_steps=1, ddp_timeout=cli.timeout,
    )
    callbacks = [Fail(cli.mode, cli.at_step)] if int(os.environ["RANK"]) == cli.fail_rank else []
    trainer = PipelineTrainer(model=tiny_llama(2), args=args, train_dataset=CountingDataset(16),
                              data_collator=pad_collator, callbacks=callbacks)
    trainer.train()


if __name__ == "__main__":
    main()

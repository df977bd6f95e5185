"""Without torchrun's agent to kill the job, the surviving rank itself names the rank that failed, in bounded time."""

import os
import time

import pytest

from helpers.distributed import run_distributed
from hf_pp import PipelineTrainer, PipelineTrainingArguments
from helpers.reliability_job import Fail
from helpers.trainer_fixtures import CountingDataset, pad_collator, tiny_llama

DDP_TIMEOUT_S = 30


def _peer_worker(rank, world_size, output_dir, mode):
    args = PipelineTrainingArguments(
        output_dir=output_dir, pp_size=2, per_device_train_batch_size=2, max_steps=4, report_to="none", use_cpu=True,
        disable_tqdm=True, save_strategy="no", logging_steps=1, ddp_timeout=DDP_TIMEOUT_S,
    )
    callbacks = [Fail(mode, 2)] if rank == 1 else []
    trainer = PipelineTrainer(model=tiny_llama(2), args=args, train_dataset=CountingDataset(16),
                              data_collator=pad_collator, callbacks=callbacks)
    start = time.monotonic()
    try:
        trainer.train()
        message = "finished"
    except Exception as exc:  # noqa: BLE001 - the message is what the test checks
        message = f"{type(exc).__name__}: {exc}"
    with open(os.path.join(output_dir, f"rank{rank}.txt"), "w") as f:
        f.write(f"{time.monotonic() - start:.1f}\n{message}")
    return message


def _read(tmp_path, rank):
    elapsed, message = (tmp_path / f"rank{rank}.txt").read_text().split("\n", 1)
    return float(elapsed), message


@pytest.mark.slow
def test_peer_of_a_raising_rank_raises_rank_failed_error_naming_it(tmp_path):
    run_distributed(_peer_worker, 2, str(tmp_path), "raise", timeout_s=120)
    assert _read(tmp_path, 1)[1] == "RuntimeError: deliberate failure"
    elapsed, message = _read(tmp_path, 0)
    assert message.startswith("RankFailedError: rank 1 failed in step 2: RuntimeError: deliberate failure"), message
    assert "rank 0 stopped because its collectives with that rank broke" in message
    assert elapsed < DDP_TIMEOUT_S + 30, elapsed


@pytest.mark.slow
def test_peer_of_a_killed_rank_names_it_as_gone(tmp_path):
    # The killed rank never reports: the harness says so; the survivor's own words are in its file.
    with pytest.raises(AssertionError, match=r"ranks \[1\] of 2 did not finish"):
        run_distributed(_peer_worker, 2, str(tmp_path), "kill", timeout_s=120)
    elapsed, message = _read(tmp_path, 0)
    assert message.startswith("RankFailedError: rank 1 failed in step 2: its process is gone"), message
    assert elapsed < DDP_TIMEOUT_S + 30, elapsed

"""Training checkpoints under pipelining: atomic, complete per rank, and resuming continues exactly."""

import os
import shutil

import pytest
import torch
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

import hf_pp.checkpoint
from helpers.distributed import run_distributed
from hf_pp import PipelineTrainer, PipelineTrainingArguments
from hf_pp.errors import PipelineConfigError
from hf_pp.reliability import RankFailedError
from helpers.trainer_fixtures import CountingDataset, pad_collator, tiny_llama

# 24 samples, 8 per optimizer step: 3 steps per epoch, so step 4 is inside a reshuffled epoch.
COMMON = dict(
    max_steps=8, gradient_accumulation_steps=2, per_device_train_batch_size=4, learning_rate=3e-3,
    lr_scheduler_type="cosine", warmup_steps=2, max_grad_norm=1.0, logging_steps=1, save_strategy="steps",
    save_steps=2, save_total_limit=2, report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
)


class StopAfter(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True  # the checkpoint of this step is still written


class SimulatedCrash(RuntimeError):
    pass


def _trainer(output_dir, pp_size, schedule="1f1b", num_layers=4, callbacks=None, tie=False):
    args = PipelineTrainingArguments(output_dir=output_dir, pp_size=pp_size, pp_schedule=schedule, **COMMON)
    return PipelineTrainer(model=tiny_llama(num_layers, tie=tie), args=args, train_dataset=CountingDataset(size=24),
                           data_collator=pad_collator, callbacks=callbacks)


def _run(trainer, **kwargs):
    trainer.train(**kwargs)
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    return losses, {n: p.detach().clone() for n, p in trainer.model.original_named_parameters()}


def _crash_while_saving(step, rank):
    """Rank 0 writes its weight shard of ``checkpoint-<step>``, then every rank dies before rank 1 writes."""
    real = hf_pp.checkpoint.save_file

    def save_file(tensors, path, metadata=None):
        if f"checkpoint-{step}" in path:
            if rank == 0:
                real(tensors, path, metadata=metadata)
            raise SimulatedCrash(path)
        return real(tensors, path, metadata=metadata)

    return save_file


def _resume_worker(rank, world_size, root):
    out = {}
    straight = os.path.join(root, "straight")
    out["straight"] = _run(_trainer(straight, 2))
    out["straight_dirs"] = sorted(os.listdir(straight))
    out["checkpoint_files"] = sorted(os.listdir(os.path.join(straight, "checkpoint-8")))

    # Stop after step 4, then resume from the last checkpoint in a fresh trainer.
    interrupted = os.path.join(root, "interrupted")
    stopped = _trainer(interrupted, 2, callbacks=[StopAfter(4)])
    _run(stopped)
    kept = os.path.join(root, "kept", "checkpoint-4")  # save_total_limit rotates it away later
    legacy = os.path.join(root, "legacy", "checkpoint-4")  # the same state as hf_pp 0.1 wrote it
    if rank == 0:
        shutil.copytree(os.path.join(interrupted, "checkpoint-4"), kept)
        shutil.copytree(kept, legacy, ignore=shutil.ignore_patterns("pipeline_optimizer"))
    torch.distributed.barrier()
    legacy_state = hf_pp.checkpoint.optimizer_state_by_fqn(stopped.optimizer, stopped.model.original_named_parameters())
    torch.save(legacy_state, os.path.join(legacy, f"optimizer.pp{stopped._pp.pp_rank:03d}.pt"))
    torch.distributed.barrier()
    out["resumed"] = _run(_trainer(interrupted, 2), resume_from_checkpoint=True)
    out["legacy"] = _run(_trainer(os.path.join(root, "legacy"), 2), resume_from_checkpoint=legacy)

    # A crash between two ranks' shard writes of checkpoint-6 leaves nothing resume picks;
    # resuming (with another schedule: state is keyed by FQN) continues from checkpoint-4.
    crashed = os.path.join(root, "crashed")
    real_save_file, hf_pp.checkpoint.save_file = hf_pp.checkpoint.save_file, _crash_while_saving(6, rank)
    try:
        # Each rank dies in save_file; whichever fails second is told which rank failed first.
        with pytest.raises((SimulatedCrash, RankFailedError)):
            _trainer(crashed, 2).train()
    finally:
        hf_pp.checkpoint.save_file = real_save_file
    torch.distributed.barrier()
    out["crashed_dirs"] = sorted(os.listdir(crashed))
    out["crashed_last"] = os.path.basename(get_last_checkpoint(crashed))
    out["after_crash"] = _run(_trainer(crashed, 2, "interleaved_1f1b"), resume_from_checkpoint=True)

    # Bad checkpoints fail on every rank, naming what is wrong.
    errors = {}
    for case, remove in (("weights", "model-00002-of-00002.safetensors"), ("optimizer", "pipeline_optimizer/.metadata")):
        broken = os.path.join(root, f"broken-{case}", "checkpoint-4")
        if rank == 0:
            shutil.copytree(kept, broken)
            os.remove(os.path.join(broken, remove))
        torch.distributed.barrier()
        with pytest.raises(PipelineConfigError) as info:
            _trainer(os.path.dirname(broken), 2).train(resume_from_checkpoint=broken)
        errors[case] = str(info.value)
    with pytest.raises(PipelineConfigError) as info:
        _trainer(os.path.join(root, "other"), 2, num_layers=6).train(
            resume_from_checkpoint=kept)
    errors["other_model"] = str(info.value)
    out["errors"] = errors
    return out


def _resume_other_pp_worker(rank, world_size, checkpoint, output_dir):
    trainer = _trainer(output_dir, 4)
    return _run(trainer, resume_from_checkpoint=checkpoint)


def _assert_continues(reference, got, label):
    ref_losses, ref_params = reference
    losses, params = got
    resumed_steps = [s for s in sorted(ref_losses) if s > 4]
    assert [s for s in sorted(losses) if s > 4] == resumed_steps, label
    torch.testing.assert_close(torch.tensor([losses[s] for s in resumed_steps]),
                               torch.tensor([ref_losses[s] for s in resumed_steps]), rtol=1e-6, atol=0,
                               msg=lambda m: f"{label}: {m}")
    for name, value in params.items():
        torch.testing.assert_close(value, ref_params[name], rtol=1e-6, atol=1e-7, msg=lambda m: f"{label} {name}: {m}")


@pytest.mark.slow
def test_resume_continues_exactly_and_saves_atomically(tmp_path):
    per_rank = run_distributed(_resume_worker, 2, str(tmp_path), timeout_s=600)
    # Parameters of the whole straight run (each rank returns its own stages').
    reference = (per_rank[0]["straight"][0], {n: v for out in per_rank for n, v in out["straight"][1].items()})
    for rank, out in enumerate(per_rank):
        assert out["straight"][0] == reference[0], "every rank logs the true loss"
        assert len(reference[0]) == 8
        # save_total_limit=2 keeps the last two; no staging directory is left behind.
        assert out["straight_dirs"] == ["checkpoint-6", "checkpoint-8"], out["straight_dirs"]
        for expected in ("pipeline_optimizer", "rng_state_0.pth", "rng_state_1.pth",
                         "scheduler.pt", "trainer_state.json", "model.safetensors.index.json",
                         "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "config.json"):
            assert expected in out["checkpoint_files"], expected
        _assert_continues(reference, out["resumed"], f"rank {rank} resumed")
        _assert_continues(reference, out["legacy"], f"rank {rank} resumed from an hf_pp 0.1 checkpoint")
        assert out["crashed_last"] == "checkpoint-4"
        assert ".tmp-checkpoint-6" in out["crashed_dirs"] and "checkpoint-6" not in out["crashed_dirs"]
        _assert_continues(reference, out["after_crash"], f"rank {rank} resumed after a crash, interleaved")
        assert "model-00002-of-00002.safetensors (written by pipeline rank 1) missing" in out["errors"]["weights"]
        assert "pipeline_optimizer/.metadata" in out["errors"]["optimizer"]
        assert "another model" in out["errors"]["other_model"] and "ranks [1]" in out["errors"]["other_model"]

    # The same checkpoint, written at pp=2, resumes at pp=4 (weights and optimizer state by FQN).
    checkpoint = str(tmp_path / "kept" / "checkpoint-4")
    per_rank4 = run_distributed(_resume_other_pp_worker, 4, checkpoint, str(tmp_path / "pp4"), timeout_s=600)
    for rank, got in enumerate(per_rank4):
        _assert_continues(reference, got, f"pp=4 rank {rank} resumed from a pp=2 checkpoint")


def _tied_resume_worker(rank, world_size, root):
    straight = _run(_trainer(os.path.join(root, "straight"), 2, tie=True))
    interrupted = os.path.join(root, "interrupted")
    stopped = _run(_trainer(interrupted, 2, callbacks=[StopAfter(4)], tie=True))
    resumed = _run(_trainer(interrupted, 2, tie=True), resume_from_checkpoint=True)
    return straight, stopped, resumed


@pytest.mark.slow
def test_resume_with_tied_embeddings_continues_exactly(tmp_path):
    """pp=2, tied embeddings: the first and last stage each hold the shared matrix; after a resume
    both copies come back from the checkpoint and training continues as if never stopped."""
    per_rank = run_distributed(_tied_resume_worker, 2, str(tmp_path), timeout_s=600)
    params = {n: v for straight, _, _ in per_rank for n, v in straight[1].items()}
    reference = (per_rank[0][0][0], params)
    assert len(reference[0]) == 8
    assert "model.embed_tokens.weight" in per_rank[0][0][1] and "lm_head.weight" in per_rank[1][0][1]
    for rank, (straight, stopped, resumed) in enumerate(per_rank):
        assert straight[0] == reference[0], "every rank logs the true loss"
        assert sorted(stopped[0]) == [1, 2, 3, 4]
        _assert_continues(reference, resumed, f"tied rank {rank} resumed")
    embed, head = per_rank[0][2][1]["model.embed_tokens.weight"], per_rank[1][2][1]["lm_head.weight"]
    assert torch.equal(embed, head), "the tied copies drifted apart after resuming"


def _visibility_worker(rank, world_size, root):
    """Every rank runs in a directory of its own choosing, with the same relative output_dir ("out"): rank 1
    in another directory stands for a node whose file system does not hold what rank 0's holds."""
    shared, elsewhere = os.path.join(root, "shared"), os.path.join(root, f"node-of-rank-{rank}")
    os.makedirs(elsewhere, exist_ok=True)
    args = dict(COMMON, max_steps=2, save_steps=2)

    def trainer():
        return PipelineTrainer(model=tiny_llama(), args=PipelineTrainingArguments(output_dir="out", pp_size=2, **args),
                               train_dataset=CountingDataset(size=24), data_collator=pad_collator)

    os.makedirs(shared, exist_ok=True)
    os.chdir(shared)
    trainer().train()
    checkpoint = os.path.join("out", "checkpoint-2")
    files = sorted(os.listdir(os.path.join(checkpoint, "pipeline_optimizer")))

    def copy_without(name, *remove):
        """A copy of the checkpoint in rank 1's own directory (same relative path), lacking ``remove``."""
        target = os.path.join(root, name)
        if rank == 0:
            shutil.copytree(os.path.join(shared, checkpoint), os.path.join(target, checkpoint))
            for path in remove:
                os.remove(os.path.join(target, checkpoint, path))
        torch.distributed.barrier()
        return target

    errors = {}

    def error_of(case, where, resume):
        os.chdir(where)
        with pytest.raises(PipelineConfigError) as info:
            trainer().train(resume_from_checkpoint=resume)
        errors[case] = str(info.value)
        os.chdir(shared)

    # Rank 1's file system has no checkpoint at all: resume_from_checkpoint=True finds none there.
    error_of("last_checkpoint", shared if rank == 0 else elsewhere, True)
    # ... or the directory passed is not there for rank 1.
    error_of("directory", shared if rank == 0 else elsewhere, checkpoint)
    # Rank 1 sees a copy without pipeline rank 1's weight shard, then one without rank 1's optimizer state.
    no_weights = copy_without("no-weights", "model-00002-of-00002.safetensors")
    error_of("weight_shard", shared if rank == 0 else no_weights, checkpoint)
    no_state = copy_without("no-state", os.path.join("pipeline_optimizer", "__1_0.distcp"))
    error_of("optimizer_shard", shared if rank == 0 else no_state, checkpoint)
    # Every rank sees the same checkpoint, which lacks rank 1's optimizer state.
    error_of("missing_everywhere", no_state, checkpoint)
    return files, errors


@pytest.mark.slow
def test_checkpoint_files_some_ranks_cannot_see_are_named_before_any_read(tmp_path):
    """A checkpoint directory on a file system not every rank shares, and a checkpoint missing a rank's shard:
    every rank raises the same error, naming the ranks that cannot see the files and who writes them."""
    (files, errors), (_, errors1) = run_distributed(_visibility_worker, 2, str(tmp_path), timeout_s=300)
    assert errors == errors1, "every rank raises the same error"
    assert "__0_0.distcp" in files and "__1_0.distcp" in files, files  # each rank writes its own state
    assert "ranks [0] find out/checkpoint-2; ranks [1] find none" in errors["last_checkpoint"], errors
    assert "ranks [1] cannot see out/checkpoint-2, which ranks [0] see" in errors["directory"], errors
    assert ("ranks [1] cannot see model-00002-of-00002.safetensors (written by pipeline rank 1), which ranks [0] "
            "see") in errors["weight_shard"], errors
    assert ("ranks [1] cannot see pipeline_optimizer/__1_0.distcp (written by rank 1), which ranks [0] see"
            in errors["optimizer_shard"]), errors
    assert "has no pipeline_optimizer/__1_0.distcp (written by rank 1)" in errors["missing_everywhere"], errors

"""The multi-rank examples in the docstrings of hf_pp's public classes run as written, on 2 ranks.

(`>>>` examples are doctested by test_docstrings.py; these ``::`` blocks need a process group.)
"""

import os
import textwrap

import pytest
import torch

from helpers.distributed import run_distributed
from hf_pp import AutoPipeline, PipelineTrainer


def first_example_block(doc: str) -> str:
    """The first literal block (the indented lines after a line ending in ``::``) of a docstring."""
    lines = doc.splitlines()
    start = next(i for i, line in enumerate(lines) if line.rstrip().endswith("::"))
    base = len(lines[start]) - len(lines[start].lstrip())
    block = []
    for line in lines[start + 1:]:
        if line.strip() and len(line) - len(line.lstrip()) <= base:
            break
        block.append(line)
    return textwrap.dedent("\n".join(block)).strip()


def test_the_blocks_are_found():
    assert first_example_block(AutoPipeline.__doc__).startswith("mesh = init_device_mesh(")
    assert "PipelineTrainer(model=model" in first_example_block(PipelineTrainer.__doc__)


def _examples_worker(rank, world_size, workdir):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import hf_pp
    from hf_pp.losses import causal_lm_loss
    from helpers.trainer_fixtures import CountingDataset, pad_collator, tiny_llama

    os.chdir(workdir)  # the examples write to relative paths ("out")
    ids = torch.randint(1, 64, (8, 12), generator=torch.Generator().manual_seed(0))
    scope = dict(vars(hf_pp), init_device_mesh=init_device_mesh, dist=dist, model=tiny_llama(), loss_fn=causal_lm_loss,
                 input_ids=ids, labels=ids)
    exec(compile(first_example_block(AutoPipeline.__doc__), "AutoPipeline.__doc__", "exec"), scope)
    out = {"enabled": scope["ap"].info.enabled, "norm": float(scope["norm"]), "losses": len(scope["losses"])}
    scope = dict(vars(hf_pp), torch=torch, model=tiny_llama(), ds=CountingDataset(size=16), collator=pad_collator)
    exec(compile(first_example_block(PipelineTrainer.__doc__), "PipelineTrainer.__doc__", "exec"), scope)
    out["trainer_steps"] = scope["trainer"].state.global_step
    return out


@pytest.mark.slow
def test_autopipeline_and_pipeline_trainer_examples_run_on_2_ranks(tmp_path, capfd):
    per_rank = run_distributed(_examples_worker, 2, str(tmp_path), timeout_s=300)
    for rank, out in enumerate(per_rank):
        assert out["enabled"] and out["norm"] > 0, out
        assert out["losses"] == (8 if rank == 1 else 0), out  # one loss per microbatch, on the last stage
        assert out["trainer_steps"] == 6, out  # 16 samples / batch 8 = 2 steps per epoch, 3 epochs
    assert "stage" in capfd.readouterr().out.lower()  # rank 0 printed the stage table

"""Memory that does not depend on timing: after the split no rank keeps the unsplit model, and many distinct
sequence lengths keep the number of live pipeline stages at the cache's bound."""

from __future__ import annotations

import gc
import weakref

import pytest

from helpers.distributed import run_distributed
from helpers.trainer_fixtures import CountingDataset, pad_collator, tiny_llama
from hf_pp import PipelineTrainer, PipelineTrainingArguments

COMMON = dict(per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1, save_strategy="no",
              report_to="none", use_cpu=True, seed=0, disable_tqdm=True)


def _released_worker(rank, world_size, output_dir):
    from torch.distributed.pipelining import PipelineStage

    import hf_pp.runtime

    model = tiny_llama()
    unsplit = weakref.ref(model)
    weights = [weakref.ref(p) for p in model.parameters()]
    args = PipelineTrainingArguments(output_dir=output_dir, pp_size=2, max_steps=20, **COMMON)
    # 20 batches of one sample each, every one of another length (5 ... 24 tokens).
    data = CountingDataset(size=40, min_len=5, max_len=24, seed=rank * 0)
    lengths = sorted({len(data[i]["input_ids"]) for i in range(40)})
    trainer = PipelineTrainer(model=model, args=args, train_dataset=data, data_collator=pad_collator)
    del model
    gc.collect()
    freed_before_training = unsplit() is None and all(w() is None for w in weights)
    trainer.train()
    gc.collect()
    live_stages = sum(isinstance(o, PipelineStage) for o in gc.get_objects())
    return (freed_before_training, len(lengths), len(trainer._pp._schedules), live_stages,
            hf_pp.runtime.SCHEDULES_KEPT * len(trainer._pp.stage_ids))


@pytest.mark.slow
def test_the_unsplit_model_is_freed_and_live_stages_stay_at_the_bound(tmp_path):
    for rank, (freed, lengths, kept, live, bound) in enumerate(run_distributed(_released_worker, 2, str(tmp_path))):
        assert freed, f"rank {rank}: the unsplit model is still referenced after the split"
        assert lengths >= 15, lengths  # many shapes went through the pipeline
        assert kept <= 8 and live <= bound, f"rank {rank}: {kept} schedules, {live} live stages (bound {bound})"

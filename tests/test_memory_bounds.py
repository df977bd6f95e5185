"""Memory that does not depend on timing: after the split no rank keeps the unsplit model, many distinct
sequence lengths keep the number of live pipeline stages at the cache's bound, and a cached evaluation schedule
keeps no activations of its last batch."""

from __future__ import annotations

import gc
import weakref

import pytest

from helpers.distributed import run_distributed
from helpers.trainer_fixtures import CountingDataset, pad_collator, tiny_llama
from hf_pp import PipelineTrainer, PipelineTrainingArguments
from peft import get_peft_model_state_dict

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
    trainer = PipelineTrainer(model=model, args=args, train_dataset=data, data_collator=pad_collator,
                              eval_dataset=CountingDataset(size=6, min_len=5, max_len=24, seed=1))
    del model
    gc.collect()
    freed_before_training = unsplit() is None and all(w() is None for w in weights)
    trainer.train()
    gc.collect()
    live_stages = sum(isinstance(o, PipelineStage) for o in gc.get_objects())
    trainer.evaluate()
    eval_stages = [s for schedule in trainer._pp_eval_schedules.values() for s in schedule._stages]
    # What the cached eval schedules still hold of their last batch (forward cache, outputs), tensors.
    held = sum(len(s.fwd_cache) + len(s.output_chunks) for s in eval_stages)
    return (freed_before_training, len(lengths), len(trainer._pp._schedules), live_stages,
            hf_pp.runtime.SCHEDULES_KEPT * len(trainer._pp.stage_ids), len(eval_stages), held)


@pytest.mark.slow
def test_the_unsplit_model_is_freed_and_live_stages_stay_at_the_bound(tmp_path):
    results = run_distributed(_released_worker, 2, str(tmp_path))
    for rank, (freed, lengths, kept, live, bound, eval_stages, held) in enumerate(results):
        assert freed, f"rank {rank}: the unsplit model is still referenced after the split"
        assert lengths >= 15, lengths  # many shapes went through the pipeline
        assert kept <= 8 and live <= bound, f"rank {rank}: {kept} schedules, {live} live stages (bound {bound})"
        assert eval_stages > 0 and held == 0, f"rank {rank}: eval schedules hold {held} microbatches' outputs"


def _peft_released_worker(rank, world_size, output_dir):
    from peft import LoraConfig, get_peft_model
    from safetensors import safe_open

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    expected_keys = set(get_peft_model_state_dict(model))
    base = weakref.ref(model.get_base_model())
    weights = [weakref.ref(p) for p in model.parameters()]
    args = PipelineTrainingArguments(output_dir=output_dir, pp_size=2, max_steps=1, **COMMON)
    trainer = PipelineTrainer(model=model, args=args, train_dataset=CountingDataset(size=4), data_collator=pad_collator)
    del model
    gc.collect()
    alive = (base() is not None, sum(w() is not None for w in weights))
    trainer.train()
    trainer.save_model(f"{output_dir}/adapter")  # the trainer's adapter bookkeeping still names every key
    with safe_open(f"{output_dir}/adapter/adapter_model.safetensors", "pt") as f:
        saved = set(f.keys())
    return alive, len(weights), saved == expected_keys


@pytest.mark.slow
def test_an_in_memory_peft_model_is_freed_after_the_split(tmp_path):
    """The trainer keeps a weightless copy of the PeftModel for its adapter bookkeeping, not the model."""
    for rank, ((base_alive, alive), count, keys_equal) in enumerate(
            run_distributed(_peft_released_worker, 2, str(tmp_path))):
        assert count > 0 and not base_alive and alive == 0, f"rank {rank}: {alive} of {count} PeftModel tensors live"
        assert keys_equal, f"rank {rank}: the saved adapter's keys differ from PEFT's own"


def _autopipeline_released_worker(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh

    from hf_pp import AutoPipeline

    model = tiny_llama()
    unsplit, weights = weakref.ref(model), [weakref.ref(p) for p in model.parameters()]
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("pp",))
    ap = AutoPipeline(mesh, pp_batch_size=4, dp_axis_names=None, device="cpu").build(
        model, loss_fn=lambda logits, labels: logits.float().mean())
    del model
    gc.collect()
    return unsplit() is None, sum(w() is not None for w in weights), sum(p.numel() for p in ap.parts[0].parameters())


@pytest.mark.slow
def test_autopipeline_keeps_no_reference_to_the_unsplit_model():
    for freed, alive, held in run_distributed(_autopipeline_released_worker, 2):
        assert freed and alive == 0 and held > 0

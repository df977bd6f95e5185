"""Data accounting on pp=2 x dp=2: one epoch consumes every sample exactly once per data-parallel group,
whatever the batch size, gradient accumulation and drop-last; plus the 4-rank-only misconfigurations."""

import pytest
from torch.utils.data import Dataset

from helpers.distributed import run_distributed
from hf_pp import PipelineConfigError, PipelineTrainer, PipelineTrainingArguments
from helpers.trainer_fixtures import CountingDataset, pad_collator, tiny_llama

# (dataset size, per-device batch, gradient accumulation, drop last): sizes that do not divide evenly.
RUNS = [(22, 2, 2, False), (23, 3, 1, True), (21, 2, 3, False)]


class IdDataset(Dataset):
    """Sample i starts with two tokens that encode i."""

    def __init__(self, size):
        self.size = size

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        return {"input_ids": [i // 60 + 1, i % 60 + 1, 61, 62]}


class RecordingTrainer(PipelineTrainer):
    def training_step(self, model, inputs, num_items_in_batch=None):
        ids, labels = inputs["input_ids"], inputs["labels"]
        for row in range(ids.shape[0]):
            if (labels[row] != -100).any():  # repeats that fill the last batch carry no label
                self.consumed.append(int(ids[row, 0] - 1) * 60 + int(ids[row, 1] - 1))
        return super().training_step(model, inputs, num_items_in_batch)


def _worker(rank, world_size, output_dir):
    out = {}
    for size, batch, accum, drop in RUNS:
        args = PipelineTrainingArguments(
            output_dir=output_dir, pp_size=2, per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
            dataloader_drop_last=drop, num_train_epochs=1, learning_rate=1e-3, report_to="none", use_cpu=True,
            disable_tqdm=True, save_strategy="no", logging_strategy="no", seed=0,
        )
        trainer = RecordingTrainer(model=tiny_llama(2), args=args, train_dataset=IdDataset(size), data_collator=pad_collator)
        trainer.consumed = []
        trainer.train()
        out[(size, batch, accum, drop)] = trainer.consumed
    errors = {}
    for name, pp_size in [("world_not_divisible_by_3", 3), ("more_stages_than_layers", 4)]:
        try:
            args = PipelineTrainingArguments(output_dir=output_dir, pp_size=pp_size, per_device_train_batch_size=2,
                                             report_to="none", use_cpu=True, max_steps=1)
            PipelineTrainer(model=tiny_llama(3), args=args, train_dataset=CountingDataset(8),
                            data_collator=pad_collator)
            errors[name] = "no error"
        except PipelineConfigError as exc:
            errors[name] = str(exc)
    return out, errors


@pytest.mark.slow
def test_one_epoch_consumes_every_sample_once_per_dp_group_and_4_rank_misconfigurations(tmp_path):
    per_rank = run_distributed(_worker, 4, str(tmp_path), timeout_s=180)
    for run in RUNS:
        size, batch, _, drop = run
        # rank = pp_rank * dp_size + dp_rank: ranks 0 and 2 are DP replica 0, ranks 1 and 3 replica 1.
        assert per_rank[0][0][run] == per_rank[2][0][run] and per_rank[1][0][run] == per_rank[3][0][run], run
        consumed = per_rank[0][0][run] + per_rank[1][0][run]
        assert len(consumed) == len(set(consumed)), f"{run}: a sample was consumed twice"
        expected = size // (2 * batch) * (2 * batch) if drop else size
        assert len(consumed) == expected and set(consumed) <= set(range(size)), (run, sorted(consumed))
    for rank, (_, errors) in enumerate(per_rank):
        assert "not divisible by pp_size=3" in errors["world_not_divisible_by_3"], (rank, errors)
        assert "pp_size=4 is larger than the model's 3 layers" in errors["more_stages_than_layers"], (rank, errors)

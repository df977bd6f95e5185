"""NEFTune (neftune_noise_alpha) under pipelining: noise on the stage that holds the embeddings, removed after."""

import pytest

from helpers.distributed import run_distributed
from hf_pp import PipelineTrainer, PipelineTrainingArguments
from test_trainer_parity import COMMON
from helpers.trainer_fixtures import CountingDataset, pad_collator, tiny_llama


def _worker(rank, world_size, output_dir):
    out = {}
    for alpha in (None, 5.0):
        args = PipelineTrainingArguments(output_dir=output_dir, pp_size=2, neftune_noise_alpha=alpha, **COMMON)
        trainer = PipelineTrainer(model=tiny_llama(), args=args, train_dataset=CountingDataset(),
                                  data_collator=pad_collator)
        trainer.train()
        embeddings = trainer.model.get_input_embeddings()
        out[alpha] = {
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "holds_embeddings": any(e is embeddings for p in trainer.model.parts for e in p.modules()),
            "left_behind": hasattr(embeddings, "neftune_noise_alpha") or bool(embeddings._forward_hooks),
        }
    return out


@pytest.mark.slow
def test_neftune_noises_the_first_stage_embeddings_and_is_removed_after_training(tmp_path):
    per_rank = run_distributed(_worker, 2, str(tmp_path), timeout_s=300)
    assert [out[5.0]["holds_embeddings"] for out in per_rank] == [True, False]  # rank 0 holds stage 0
    for rank, out in enumerate(per_rank):
        plain, noisy = out[None]["losses"], out[5.0]["losses"]
        assert len(plain) == len(noisy) == 8
        # Same weights and data at step 1: only the noise on the embeddings can change the loss.
        assert abs(noisy[0] - plain[0]) > 1e-4, (rank, plain[0], noisy[0])
        assert not out[5.0]["left_behind"], f"rank {rank}: the NEFTune hook outlived train()"
    assert per_rank[0][5.0]["losses"] == per_rank[1][5.0]["losses"]  # one loss per pipeline, shared

"""save_model under pipelining writes one Hugging Face directory that from_pretrained loads in one process."""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from helpers.distributed import run_distributed
from hf_pp import PipelineTrainer, PipelineTrainingArguments
from hf_pp.checkpoint import missing_checkpoint_files, publish_checkpoint, staging_dir
from hf_pp.errors import PipelineConfigError
from helpers.trainer_fixtures import CountingDataset, pad_collator, tiny_llama

# The examples' offline character tokenizer: a real PreTrainedTokenizerFast, built without downloads
# (examples/ is on pytest's pythonpath, setup.cfg).
from tiny_data import char_tokenizer

ARGS = dict(
    max_steps=3, per_device_train_batch_size=4, per_device_eval_batch_size=4, learning_rate=3e-3, save_strategy="no",
    report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
)


def _save_worker(rank, world_size, root, runs):
    out = {}
    for pp_size, schedule, tie, with_tokenizer in runs:
        label = f"pp{pp_size}-{schedule}-tie{int(tie)}"
        args = PipelineTrainingArguments(output_dir=os.path.join(root, label), pp_size=pp_size, pp_schedule=schedule, **ARGS)
        trainer = PipelineTrainer(model=tiny_llama(tie=tie), args=args, train_dataset=CountingDataset(),
                                  data_collator=pad_collator, processing_class=char_tokenizer() if with_tokenizer else None)
        trainer.train()
        target = os.path.join(root, label, "final")
        trainer.save_model(target)
        with pytest.raises(PipelineConfigError, match="is a file"):
            trainer.save_model(os.path.join(target, "config.json"))
        predicted = trainer.predict(CountingDataset(size=10, seed=1))
        params = {n: p.detach().clone() for n, p in trainer.model.original_named_parameters()}
        out[label] = (target, params, predicted.predictions, predicted.metrics["test_loss"])
    return out


def _check_saved(per_rank, label, with_tokenizer=False):
    target = per_rank[0][label][0]
    files = sorted(os.listdir(target))
    assert "config.json" in files and "model.safetensors.index.json" in files, files
    assert "generation_config.json" in files, files
    tokenizer_files = {"tokenizer.json", "tokenizer_config.json"}
    if with_tokenizer:
        assert tokenizer_files <= set(files), files
        saved, built = AutoTokenizer.from_pretrained(target), char_tokenizer()
        assert saved.get_vocab() == built.get_vocab() and saved.pad_token == built.pad_token
        assert saved("a b")["input_ids"] == built("a b")["input_ids"]
    else:
        assert not tokenizer_files & set(files), files
    loaded = AutoModelForCausalLM.from_pretrained(target)
    loaded_params = loaded.state_dict()  # names tied copies (lm_head.weight) too
    for rank_out in per_rank:
        for name, value in rank_out[label][1].items():
            torch.testing.assert_close(loaded_params[name], value, rtol=0, atol=0, msg=lambda m: f"{label} {name}: {m}")
    reference = Trainer(model=loaded, args=TrainingArguments(output_dir=os.path.join(target, "ref"), **ARGS),
                        data_collator=pad_collator).predict(CountingDataset(size=10, seed=1))
    for rank, rank_out in enumerate(per_rank):
        _, _, predictions, loss = rank_out[label]
        assert predictions.shape == reference.predictions.shape, f"{label} rank {rank}"
        torch.testing.assert_close(torch.from_numpy(predictions), torch.from_numpy(reference.predictions),
                                   rtol=1e-5, atol=1e-5, msg=lambda m: f"{label} rank {rank}: {m}")
        assert loss == pytest.approx(reference.metrics["test_loss"], rel=1e-5), label
    return loaded


@pytest.mark.slow
def test_save_model_loads_in_one_process_pp2(tmp_path):
    # (pp_size, schedule, tied embeddings, processing_class given)
    runs = [(2, "1f1b", False, False), (2, "interleaved_1f1b", False, True), (2, "1f1b", True, False)]
    _check_runs(run_distributed(_save_worker, 2, str(tmp_path), runs, timeout_s=600), runs)


@pytest.mark.slow
def test_save_model_loads_in_one_process_pp4(tmp_path):
    runs = [(4, "1f1b", False, False), (4, "1f1b", True, False)]
    _check_runs(run_distributed(_save_worker, 4, str(tmp_path), runs, timeout_s=600), runs)


def _check_runs(per_rank, runs):
    for pp_size, schedule, tie, with_tokenizer in runs:
        loaded = _check_saved(per_rank, f"pp{pp_size}-{schedule}-tie{int(tie)}", with_tokenizer)
        assert loaded.config.tie_word_embeddings == tie
        if tie:
            assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def _save_on_each_node_worker(rank, world_size, output_dir):
    """``(should_save, checkpoints this rank published)`` of a one-node run with save_on_each_node=True."""
    import hf_pp.trainer_checkpoint as saving

    published, publish = [], saving.publish_checkpoint

    def recording(staged, final_dir):
        published.append(os.path.basename(final_dir))
        publish(staged, final_dir)

    saving.publish_checkpoint = recording  # in this spawned rank only
    args = PipelineTrainingArguments(output_dir=output_dir, pp_size=2, save_on_each_node=True, save_total_limit=1,
                                     **{**ARGS, "max_steps": 2, "save_strategy": "steps", "save_steps": 1})
    trainer = PipelineTrainer(model=tiny_llama(2), args=args, train_dataset=CountingDataset(16),
                              data_collator=pad_collator)
    trainer.train()
    return args.should_save, published


@pytest.mark.slow
def test_save_on_each_node_on_one_node_publishes_each_checkpoint_once(tmp_path):
    # On one node local rank 0 is rank 0: it alone publishes and rotates, as with save_on_each_node=False.
    per_rank = run_distributed(_save_on_each_node_worker, 2, str(tmp_path), timeout_s=300)
    assert per_rank == [(True, ["checkpoint-1", "checkpoint-2"]), (False, [])], per_rank
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2"]  # no staging directory left; save_total_limit=1 rotated
    assert missing_checkpoint_files(str(tmp_path / "checkpoint-2")) == []


def test_publish_checkpoint_replaces_atomically(tmp_path):
    final = str(tmp_path / "checkpoint-4")
    for content in ("old", "new"):
        staged = staging_dir(final)
        os.makedirs(staged)
        (tmp_path / os.path.basename(staged) / "scheduler.pt").write_text(content)
        publish_checkpoint(staged, final)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-4"]
    assert (tmp_path / "checkpoint-4" / "scheduler.pt").read_text() == "new"


def test_missing_checkpoint_files_knows_the_distributed_checkpoint_layout(tmp_path):
    (tmp_path / "model.safetensors").write_text("")
    assert missing_checkpoint_files(str(tmp_path)) == ["scheduler.pt", "pipeline_optimizer/.metadata"]
    (tmp_path / "pipeline_optimizer").mkdir()
    (tmp_path / "pipeline_optimizer" / ".metadata").write_text("")
    (tmp_path / "scheduler.pt").write_text("")
    assert missing_checkpoint_files(str(tmp_path)) == []


def test_missing_checkpoint_files_names_them(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}'
    )
    (tmp_path / "model-00001-of-00002.safetensors").write_text("")
    (tmp_path / "optimizer.pp001.pt").write_text("")
    assert missing_checkpoint_files(str(tmp_path)) == [
        "model-00002-of-00002.safetensors", "scheduler.pt", "optimizer.pp000.pt",
    ]

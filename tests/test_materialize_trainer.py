"""PipelineTrainer from a model directory or a meta-device model: each rank builds only its stages."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from helpers.distributed import run_distributed
from hf_pp import PipelineTrainer, PipelineTrainingArguments
from hf_pp.errors import PipelineConfigError
from hf_pp.materialize import meta_model
from test_trainer_parity import COMMON, _assert_same_run
from helpers.trainer_fixtures import CountingDataset, pad_collator, tiny_llama

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)


def _saved(tmp_path, tie=False) -> str:
    directory = str(tmp_path / f"model{int(tie)}")
    tiny_llama(tie=tie).save_pretrained(directory, max_shard_size="40KB")
    return directory


def _reference(directory, output_dir, peft=False):
    model = AutoModelForCausalLM.from_pretrained(directory)
    if peft:
        model = get_peft_model(model, LoraConfig(**LORA))
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=output_dir, **COMMON),
                      train_dataset=CountingDataset(), data_collator=pad_collator)
    result = trainer.train()
    return trainer.state.log_history, dict(trainer.model.named_parameters(remove_duplicate=False)), result


def _from_directory_worker(rank, world_size, directory, output_dir):
    args = PipelineTrainingArguments(output_dir=output_dir, pp_size=2, **COMMON)
    trainer = PipelineTrainer(model=directory, args=args, train_dataset=CountingDataset(), data_collator=pad_collator)
    assert not any(p.is_meta for part in trainer.model.parts for p in part.parameters())
    result = trainer.train()
    trainer.save_model(output_dir)
    params = {n: p.detach().clone() for n, p in trainer.model.original_named_parameters()}
    return trainer.state.log_history, params, (result.global_step, result.training_loss)


@pytest.mark.slow
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_training_from_a_directory_matches_trainer_on_from_pretrained(tmp_path, tie):
    directory = _saved(tmp_path, tie)
    reference = _reference(directory, str(tmp_path / "ref"))
    per_rank = run_distributed(_from_directory_worker, 2, directory, str(tmp_path / "pp"), timeout_s=300)
    covered = set()
    for rank, got in enumerate(per_rank):
        _assert_same_run(reference, got, f"rank {rank}")
        covered |= set(got[1])
    assert covered == set(reference[1])
    saved = AutoModelForCausalLM.from_pretrained(str(tmp_path / "pp"))
    for name, value in saved.state_dict().items():
        torch.testing.assert_close(value, reference[1][name].detach(), rtol=1e-5, atol=1e-5, msg=name)


def _lora_worker(rank, world_size, directory, output_dir):
    args = PipelineTrainingArguments(output_dir=output_dir, pp_size=2, **COMMON)
    trainer = PipelineTrainer(model=directory, args=args, peft_config=LoraConfig(**LORA),
                              train_dataset=CountingDataset(), data_collator=pad_collator)
    trainer.train()
    trainer.save_model(output_dir)
    trainable = sorted(n for n, p in trainer.model.original_named_parameters() if p.requires_grad)
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], trainable


@pytest.mark.slow
def test_lora_on_a_directory_starts_from_the_base_model_and_exports_an_adapter(tmp_path):
    directory = _saved(tmp_path)
    ref_logs, ref_params, _ = _reference(directory, str(tmp_path / "ref"), peft=True)
    out = str(tmp_path / "pp")
    per_rank = run_distributed(_lora_worker, 2, directory, out, timeout_s=300)
    losses = per_rank[0][0]
    ref_losses = [h["loss"] for h in ref_logs if "loss" in h]
    # LoRA's B starts at zero: the first step sees exactly the base model (A's random draw differs).
    assert losses[0] == pytest.approx(ref_losses[0], rel=1e-5)
    assert losses[-1] < losses[0] and all(torch.isfinite(torch.tensor(losses)))
    trainable = set(per_rank[0][1]) | set(per_rank[1][1])
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == sum(1 for n, p in ref_params.items() if p.requires_grad)
    # The exported adapter loads onto the base model in one process.
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(directory), out)
    assert any(torch.count_nonzero(p) for n, p in adapted.named_parameters() if "lora_B" in n)


def _meta_replicas_worker(rank, world_size, output_dir):
    torch.manual_seed(0)
    args = PipelineTrainingArguments(output_dir=output_dir, pp_size=2, **{**COMMON, "max_steps": 2})
    trainer = PipelineTrainer(model=meta_model(tiny_llama().config), args=args, train_dataset=CountingDataset(),
                              data_collator=pad_collator)
    before = {n: p.detach().clone() for n, p in trainer.model.original_named_parameters()}
    trainer.train()
    after = {n: p.detach().clone() for n, p in trainer.model.original_named_parameters()}
    return before, after


@pytest.mark.slow
def test_meta_model_stages_start_identical_on_every_data_parallel_replica(tmp_path):
    # (pp, dp) = (2, 2): rank = pp_rank * 2 + dp_rank, so ranks 0/1 hold stage 0 and 2/3 stage 1.
    per_rank = run_distributed(_meta_replicas_worker, 4, str(tmp_path / "pp"), timeout_s=400)
    for a, b in ((0, 1), (2, 3)):
        for phase in (0, 1):
            ours, theirs = per_rank[a][phase], per_rank[b][phase]
            assert ours.keys() == theirs.keys() and ours
            for name in ours:
                torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0, msg=name)
    stage0, stage1 = per_rank[0][0], per_rank[2][0]
    assert "model.embed_tokens.weight" in stage0 and "lm_head.weight" in stage1
    assert not set(stage0) & set(stage1)


def _missing_worker(rank, world_size, directory, output_dir):
    args = PipelineTrainingArguments(output_dir=output_dir, pp_size=2, **COMMON)
    try:
        PipelineTrainer(model=directory, args=args, train_dataset=CountingDataset(), data_collator=pad_collator)
    except PipelineConfigError as error:
        return str(error)
    return None


@pytest.mark.slow
def test_a_checkpoint_missing_tensors_is_refused_on_every_rank(tmp_path):
    from safetensors.torch import save_file

    model = tiny_llama()
    broken = tmp_path / "broken"
    model.config.save_pretrained(str(broken))
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if "layers.3." not in k},
              str(broken / "model.safetensors"))
    messages = run_distributed(_missing_worker, 2, str(broken), str(tmp_path / "pp"), timeout_s=200)
    for message in messages:
        assert message is not None and "model.layers.3.self_attn.q_proj.weight" in message


def test_one_process_accepts_a_directory_and_a_meta_model(tmp_path):
    directory = _saved(tmp_path)
    args = PipelineTrainingArguments(output_dir=str(tmp_path / "out"), **{**COMMON, "max_steps": 1})
    trainer = PipelineTrainer(model=directory, args=args, train_dataset=CountingDataset(), data_collator=pad_collator)
    torch.testing.assert_close(trainer.model.lm_head.weight, AutoModelForCausalLM.from_pretrained(directory).lm_head.weight)
    trainer = PipelineTrainer(model=meta_model(tiny_llama().config), args=args, train_dataset=CountingDataset(),
                              data_collator=pad_collator, peft_config=LoraConfig(**LORA))
    assert not any(p.is_meta for p in trainer.model.parameters())
    trainer.train()
    with pytest.raises(PipelineConfigError, match="pp_load_dtype"):
        PipelineTrainingArguments(output_dir=str(tmp_path / "out"), pp_load_dtype="int8")


def _autopipeline_worker(rank, world_size, directory):
    from torch.distributed.device_mesh import init_device_mesh

    from hf_pp import AutoPipeline
    from hf_pp.losses import causal_lm_loss

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("pp",))
    batch = CountingDataset(size=4, min_len=9, max_len=9)
    ids = torch.tensor([item["input_ids"] for item in batch])
    tokens = int(ids[:, 1:].numel())
    ap = AutoPipeline(mesh, pp_batch_size=4, dp_axis_names=None, device="cpu").build(
        directory, loss_fn=lambda logits, labels: causal_lm_loss(logits, labels, num_items_in_batch=tokens))
    losses = []
    ap.step(ids, target=ids, losses=losses)
    grads = {n: p.grad.clone() for part in ap.parts for n, p in part.named_parameters()}
    return sum(float(l) for l in losses) if ap.info.has_last_stage else None, grads, ap.get_total_param_count()


@pytest.mark.slow
def test_autopipeline_builds_from_a_directory_with_the_unsplit_numbers(tmp_path):
    directory = _saved(tmp_path, tie=True)
    whole = AutoModelForCausalLM.from_pretrained(directory)
    ids = torch.tensor([item["input_ids"] for item in CountingDataset(size=4, min_len=9, max_len=9)])
    loss = whole(ids, labels=ids).loss
    loss.backward()
    per_rank = run_distributed(_autopipeline_worker, 2, directory, timeout_s=200)
    assert per_rank[1][0] == pytest.approx(loss.item(), rel=1e-5)
    assert per_rank[0][2] == sum(p.numel() for p in whole.parameters())
    reference = dict(whole.named_parameters(remove_duplicate=False))
    for _, grads, _ in per_rank:
        for name, grad in grads.items():
            if name in ("model.embed_tokens.weight", "lm_head.weight"):
                continue  # tied copies: each holds its share until sync_tied_grads
            torch.testing.assert_close(grad, reference[name].grad, rtol=1e-4, atol=1e-6, msg=name)

"""Decoder classifiers under PipelineTrainer equal Trainer: ``*ForSequenceClassification`` (training, evaluation,
saving, reloading, LoRA, pp x dp, AutoPipeline) and ``*ForTokenClassification``."""

import glob
import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import (
    AutoModelForSequenceClassification, AutoModelForTokenClassification, LlamaConfig, LlamaForSequenceClassification,
    LlamaForTokenClassification, Trainer, TrainingArguments,
)

from helpers.distributed import run_distributed
from hf_pp import PipelineTrainer, PipelineTrainingArguments
from hf_pp.errors import PipelineConfigError
from helpers.trainer_fixtures import PAD, CountingDataset, pad_collator

COMMON = dict(
    max_steps=6, gradient_accumulation_steps=2, per_device_train_batch_size=4, per_device_eval_batch_size=4,
    max_grad_norm=1.0, learning_rate=3e-3, lr_scheduler_type="cosine", warmup_steps=1, logging_steps=1,
    save_strategy="no", report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
)
# problem type -> (num_labels, label of a sequence starting at token s)
PROBLEMS = {
    "single_label_classification": (3, lambda start: start % 3),
    "regression": (1, lambda start: start / 64.0),
    "multi_label_classification": (3, lambda start: [float(start % 2), float(start % 3 == 0), float(start > 32)]),
}


def tiny_classifier(problem: str) -> LlamaForSequenceClassification:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD, num_labels=PROBLEMS[problem][0],
        attn_implementation="eager", use_cache=False,
    )
    return LlamaForSequenceClassification(config)


def classification_data(problem: str, size: int, seed: int) -> list[dict]:
    """CountingDataset's sequences (random lengths), each with one label."""
    label_of = PROBLEMS[problem][1]
    return [{"input_ids": item["input_ids"], "labels": label_of(item["input_ids"][0])}
            for item in CountingDataset(size=size, seed=seed).items]


def collator(padding_side: str):
    def collate(features):
        longest = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), longest), PAD, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            span = slice(0, n) if padding_side == "right" else slice(longest - n, longest)
            ids[row, span], mask[row, span] = torch.tensor(f["input_ids"]), 1
        labels = torch.tensor([f["labels"] for f in features])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


def accuracy_or_error(prediction):
    predictions, labels = prediction.predictions, prediction.label_ids
    if labels.ndim == 2:  # multi-label: one yes/no per label
        return {"accuracy": float(((predictions > 0) == (labels > 0.5)).mean())}
    if predictions.shape[-1] == 1:
        return {"abs_error": float(np.abs(predictions[:, 0] - labels).mean())}
    return {"accuracy": float((predictions.argmax(-1) == labels).mean())}


def tiny_gpt2_classifier():
    """Another layout: "transformer.h", learned positions; no dropout (one process and the stages would differ)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=4, n_head=4, n_positions=64, pad_token_id=PAD, num_labels=3,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, attn_implementation="eager")
    return GPT2ForSequenceClassification(config)


def _run(trainer_cls, args_cls, output_dir, problem, padding_side, lora, make_model=None, **pp):
    args = args_cls(output_dir=output_dir, **COMMON, **pp)
    model = make_model() if make_model is not None else tiny_classifier(problem)
    if lora:  # task SEQ_CLS: PEFT also trains (and saves) the score head whole
        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, lora_dropout=0.0, target_modules="all-linear"))
    trainer = trainer_cls(model=model, args=args, train_dataset=classification_data(problem, 48, 0),
                          eval_dataset=classification_data(problem, 10, 1), data_collator=collator(padding_side),
                          compute_metrics=accuracy_or_error)
    trainer.train()
    metrics = trainer.evaluate()
    predictions = trainer.predict(classification_data(problem, 6, 2)).predictions
    logs = [{k: h[k] for k in ("loss", "grad_norm")} for h in trainer.state.log_history if "loss" in h]
    saved = f"{output_dir}/final"
    trainer.save_model(saved)
    return trainer, logs, metrics, predictions, saved


# (schedule, problem, padding side, LoRA)
RUNS = [("1f1b", "single_label_classification", "right", False),
        ("interleaved_1f1b", "single_label_classification", "left", False),
        ("gpipe", "regression", "right", False), ("looped_bfs", "multi_label_classification", "right", False),
        ("zbv_zero_bubble", "single_label_classification", "right", True)]


def _pipeline_worker(rank, world_size, output_dir, runs):
    out = {}
    for schedule, problem, padding_side, lora in runs:
        trainer, logs, metrics, predictions, saved = _run(
            PipelineTrainer, PipelineTrainingArguments, f"{output_dir}/{schedule}", problem, padding_side, lora,
            pp_size=2, pp_schedule=schedule,
        )
        params = {n: p.detach().clone() for n, p in trainer.model.original_named_parameters()}
        out[schedule] = (logs, metrics, predictions, params, saved)
    # The saved directory, read back stage by stage (each rank reads only its tensors): the same evaluation.
    schedule, problem, padding_side, _ = runs[0]
    args = PipelineTrainingArguments(output_dir=f"{output_dir}/reloaded", pp_size=2, pp_schedule=schedule, **COMMON)
    reloaded = PipelineTrainer(model=out[schedule][4], args=args, eval_dataset=classification_data(problem, 10, 1),
                               data_collator=collator(padding_side), compute_metrics=accuracy_or_error)
    out["reloaded"] = ([type(part).__name__ for part in reloaded.model.parts], reloaded.evaluate())
    return out


def _saved_tensors(directory, lora):
    """Every tensor of the saved model (or adapter), whatever the sharding (the pipeline writes a shard per stage)."""
    files = sorted(glob.glob(f"{directory}/{'adapter_model' if lora else 'model'}*.safetensors"))
    assert files, directory
    return {name: tensor for path in files for name, tensor in load_file(path).items()}


@pytest.mark.slow
def test_sequence_classifier_trains_evaluates_and_saves_as_trainer(tmp_path):
    references = {}
    for schedule, problem, padding_side, lora in RUNS:
        trainer, logs, metrics, predictions, saved = _run(Trainer, TrainingArguments, str(tmp_path / f"ref-{schedule}"),
                                                          problem, padding_side, lora)
        params = dict(trainer.model.get_base_model().named_parameters() if lora else trainer.model.named_parameters())
        references[schedule] = (logs, metrics, predictions, params, saved)
    per_rank = run_distributed(_pipeline_worker, 2, str(tmp_path / "pp"), RUNS, timeout_s=600)
    for schedule, problem, padding_side, lora in RUNS:
        ref_logs, ref_metrics, ref_predictions, ref_params, ref_saved = references[schedule]
        covered = set()
        for rank, out in enumerate(per_rank):
            logs, metrics, predictions, params, saved = out[schedule]
            label = f"{schedule} {problem} {padding_side}-padded{' LoRA' if lora else ''}, rank {rank}"
            assert len(logs) == len(ref_logs) == 6, label
            for key in ("loss", "grad_norm"):
                torch.testing.assert_close(torch.tensor([h[key] for h in logs]), torch.tensor([h[key] for h in ref_logs]),
                                           rtol=1e-5, atol=1e-6, msg=lambda m: f"{label} {key}: {m}")
            metric = "eval_accuracy" if problem != "regression" else "eval_abs_error"
            for key in ("eval_loss", metric):
                assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-5), (label, key)
            np.testing.assert_allclose(predictions, ref_predictions, rtol=1e-4, atol=1e-6, err_msg=label)
            for name, value in params.items():
                torch.testing.assert_close(value, ref_params[name].detach(), rtol=1e-5, atol=1e-5,
                                           msg=lambda m: f"{label} {name}: {m}")
            covered |= set(params)
        assert covered == set(ref_params), "the stages together must hold every parameter, the head included"
        written, expected = _saved_tensors(saved, lora), _saved_tensors(ref_saved, lora)
        assert sorted(written) == sorted(expected), schedule
        for name, value in written.items():
            torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-5, msg=lambda m: f"saved {name}: {m}")
        if not lora:
            assert type(AutoModelForSequenceClassification.from_pretrained(saved)).__name__ == "LlamaForSequenceClassification"
    for rank, out in enumerate(per_rank):
        metrics = out[RUNS[0][0]][1]
        classes, reloaded = out["reloaded"]
        assert classes == ["LlamaForSequenceClassification"], f"rank {rank}: {classes}"
        assert reloaded["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-6), f"rank {rank}"
        assert reloaded["eval_accuracy"] == metrics["eval_accuracy"], f"rank {rank}"


def test_sequence_classifier_without_pad_token_is_refused_before_any_process_group(monkeypatch, tmp_path):
    model = tiny_classifier("single_label_classification")
    model.config.pad_token_id = None
    args = PipelineTrainingArguments(output_dir=str(tmp_path), pp_size=2, use_cpu=True, report_to="none",
                                     per_device_train_batch_size=4)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun would; no process group is started
    with pytest.raises(PipelineConfigError, match="has no pad_token_id.*set model.config.pad_token_id"):
        PipelineTrainer(model=model, args=args, train_dataset=classification_data("single_label_classification", 8, 0))


def _ddp_trainer_worker(rank, world_size, output_dir):
    """Trainer itself, data parallel over 2 processes: what a user of Trainer + DDP gets today."""
    _, logs, metrics, _, _ = _run(Trainer, TrainingArguments, output_dir, "single_label_classification", "right", False)
    _, token_logs, token_metrics = _token_run(Trainer, TrainingArguments, f"{output_dir}/token")
    return {"sequence": (logs, metrics["eval_loss"]), "token": (token_logs, token_metrics["eval_loss"])}


def _pp_dp_worker(rank, world_size, output_dir, modes):
    out = {}
    for mode in modes:
        pp = dict(pp_size=2, pp_data_parallel=mode)
        _, logs, metrics, _, _ = _run(PipelineTrainer, PipelineTrainingArguments, f"{output_dir}/{mode}",
                                      "single_label_classification", "right", False, **pp)
        out["sequence", mode] = (logs, metrics["eval_loss"])
        _, token_logs, token_metrics = _token_run(PipelineTrainer, PipelineTrainingArguments, f"{output_dir}/t{mode}", **pp)
        out["token", mode] = (token_logs, token_metrics["eval_loss"])
    return out


@pytest.mark.slow
def test_pp2_x_dp2_classifiers_match_trainer_with_ddp(tmp_path):
    """Each replica's loss is its own batch mean, scaled as Trainer scales it across devices
    (the model's loss ignores the token count): compare with Trainer on 2 data-parallel processes."""
    references = run_distributed(_ddp_trainer_worker, 2, str(tmp_path / "ddp"), timeout_s=300)[0]
    per_rank = run_distributed(_pp_dp_worker, 4, str(tmp_path / "pp"), ["ddp", "fsdp"], timeout_s=600)
    for kind, mode in [(kind, mode) for kind in ("sequence", "token") for mode in ("ddp", "fsdp")]:
        reference = references[kind]
        for rank, out in enumerate(per_rank):
            logs, eval_loss = out[kind, mode]
            label = f"{kind} classifier, pp=2 x dp=2 {mode} rank {rank}"
            for key in ("loss", "grad_norm"):
                torch.testing.assert_close(torch.tensor([h[key] for h in logs]), torch.tensor([h[key] for h in reference[0]]),
                                           rtol=1e-5, atol=1e-6, msg=lambda m: f"{label} {key}: {m}")
            assert eval_loss == pytest.approx(reference[1], rel=1e-5), label


@pytest.mark.parametrize("mode", ["params", "time"])
@pytest.mark.parametrize("kind", ["sequence", "token"])
def test_balanced_split_of_a_classifier_puts_the_score_head_on_the_last_stage(mode, kind):
    from hf_pp.balance import balanced_module_fqns
    from hf_pp.schedules import resolve_schedule

    model = tiny_classifier("single_label_classification") if kind == "sequence" else tiny_token_classifier()
    plan = balanced_module_fqns(model, 2, resolve_schedule("1f1b", None), mode, microbatch_size=1, seq_len=16, device="cpu")
    assert "score" in plan[-1] and "model.embed_tokens" in plan[0]
    assert sum(f.startswith("model.layers.") for stage in plan for f in stage) == 4


def _autopipeline_worker(rank, world_size):
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh

    from hf_pp import AutoPipeline
    from hf_pp.hf_patching import last_token_index

    model = tiny_classifier("single_label_classification")
    batch = collator("left")(classification_data("single_label_classification", 8, 0))
    ids, labels = batch["input_ids"], batch["labels"]
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("pp",))
    ap = AutoPipeline(mesh, pp_batch_size=8, dp_axis_names=None).build(
        model, loss_fn=lambda logits, target: F.cross_entropy(logits, target, reduction="sum") / 8)
    try:
        ap.step(ids, target=labels, attention_mask=batch["attention_mask"])
        refused = "no error"
    except PipelineConfigError as error:
        refused = str(error)
    losses = []
    ap.step(ids, target=labels, losses=losses, attention_mask=batch["attention_mask"],
            last_token_index=last_token_index(ids, PAD))
    grads = {n: p.grad.clone() for part in ap.parts for n, p in part.named_parameters()}
    return refused, float(sum(losses)) if losses else None, grads


@pytest.mark.slow
def test_autopipeline_step_of_a_classifier_needs_last_token_index_and_then_matches_unsplit():
    reference = tiny_classifier("single_label_classification")
    batch = collator("left")(classification_data("single_label_classification", 8, 0))
    loss = reference(**batch).loss  # Hugging Face's own forward: the mean over the batch
    loss.backward()
    per_rank = run_distributed(_autopipeline_worker, 2, timeout_s=300)
    for rank, (refused, _, grads) in enumerate(per_rank):
        assert "needs last_token_index" in refused, f"rank {rank}: {refused}"  # every rank, before the schedule
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference.get_parameter(name).grad, rtol=1e-5, atol=1e-7,
                                       msg=lambda m: f"rank {rank} {name}: {m}")
    assert per_rank[1][1] == pytest.approx(loss.item(), rel=1e-6)
    assert sorted(set(per_rank[0][2]) | set(per_rank[1][2])) == sorted(n for n, _ in reference.named_parameters())


# ---- token classification -------------------------------------------------------------------------------------

def tiny_token_classifier(arch: str = "llama"):
    torch.manual_seed(0)
    if arch == "gpt2":  # another layout: "transformer.h", learned positions, a head named "classifier"
        from transformers import GPT2Config, GPT2ForTokenClassification

        config = GPT2Config(vocab_size=64, n_embd=32, n_layer=4, n_head=4, n_positions=64, pad_token_id=PAD, num_labels=3,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, classifier_dropout=0.0, use_cache=False,
                            attn_implementation="eager")
        return GPT2ForTokenClassification(config)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD, num_labels=3, attn_implementation="eager",
        use_cache=False, classifier_dropout=0.0,  # no dropout: Trainer and the stages would draw different masks
    )
    return LlamaForTokenClassification(config)


def token_collate(features):
    """``pad_collator``'s batch, each token labelled by its id mod 3 (the first token's is -100), pads -100."""
    batch = pad_collator(features)
    labels = (batch["input_ids"] % 3).masked_fill(batch["attention_mask"] == 0, -100)
    labels[:, 0] = -100
    return {**batch, "labels": labels}


def token_accuracy(prediction):
    predicted, labels = prediction.predictions.argmax(-1), prediction.label_ids
    mask = labels != -100
    return {"accuracy": float((predicted[mask] == labels[mask]).mean())}


def _token_run(trainer_cls, args_cls, output_dir, arch="llama", **pp):
    trainer = trainer_cls(model=tiny_token_classifier(arch), args=args_cls(output_dir=output_dir, **COMMON, **pp),
                          train_dataset=CountingDataset(size=48), eval_dataset=CountingDataset(size=10, seed=1),
                          data_collator=token_collate, compute_metrics=token_accuracy)
    trainer.train()
    metrics = trainer.evaluate()
    logs = [{k: h[k] for k in ("loss", "grad_norm")} for h in trainer.state.log_history if "loss" in h]
    trainer.save_model(f"{output_dir}/final")
    return trainer, logs, metrics


# (architecture, schedule)
TOKEN_RUNS = [("llama", "1f1b"), ("llama", "interleaved_1f1b"), ("gpt2", "1f1b")]


def _token_worker(rank, world_size, output_dir, runs):
    out = {}
    for arch, schedule in runs:
        trainer, logs, metrics = _token_run(PipelineTrainer, PipelineTrainingArguments, f"{output_dir}/{arch}-{schedule}",
                                            arch, pp_size=2, pp_schedule=schedule)
        out[arch, schedule] = (logs, metrics, {n: p.detach().clone() for n, p in trainer.model.original_named_parameters()})
    return out


@pytest.mark.slow
def test_token_classifier_trains_evaluates_and_saves_as_trainer(tmp_path):
    references = {}
    for arch in {arch for arch, _ in TOKEN_RUNS}:
        trainer, logs, metrics = _token_run(Trainer, TrainingArguments, str(tmp_path / f"ref-{arch}"), arch)
        references[arch] = (logs, metrics, dict(trainer.model.named_parameters()))
    per_rank = run_distributed(_token_worker, 2, str(tmp_path / "pp"), TOKEN_RUNS, timeout_s=600)
    for arch, schedule in TOKEN_RUNS:
        ref_logs, ref_metrics, ref_params = references[arch]
        covered = set()
        for rank, out in enumerate(per_rank):
            logs, metrics, params = out[arch, schedule]
            label = f"{arch} token classifier {schedule} rank {rank}"
            for key in ("loss", "grad_norm"):
                torch.testing.assert_close(torch.tensor([h[key] for h in logs]), torch.tensor([h[key] for h in ref_logs]),
                                           rtol=1e-5, atol=1e-6, msg=lambda m: f"{label} {key}: {m}")
            for key in ("eval_loss", "eval_accuracy"):
                assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-5), (label, key)
            for name, value in params.items():
                torch.testing.assert_close(value, ref_params[name].detach(), rtol=1e-5, atol=1e-5,
                                           msg=lambda m: f"{label} {name}: {m}")
            covered |= set(params)
        assert covered == set(ref_params), (arch, schedule)
        reloaded = AutoModelForTokenClassification.from_pretrained(tmp_path / "pp" / f"{arch}-{schedule}" / "final")
        assert type(reloaded).__name__ == {"llama": "LlamaForTokenClassification", "gpt2": "GPT2ForTokenClassification"}[arch]
        for name, value in reloaded.named_parameters():
            torch.testing.assert_close(value, ref_params[name].detach(), rtol=1e-5, atol=1e-5, msg=lambda m: f"saved {name}: {m}")


def test_planner_shows_a_saved_classifier_with_its_head_on_the_last_stage(tmp_path):
    """`python -m hf_pp plan <dir>` builds the class the directory's config names, so the head is the classifier's."""
    import subprocess
    import sys

    tiny_classifier("single_label_classification").save_pretrained(tmp_path)
    done = subprocess.run([sys.executable, "-m", "hf_pp", "plan", str(tmp_path), "--pp", "2"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "LlamaForSequenceClassification" in done.stdout and "score" in done.stdout, done.stdout
    assert "lm_head" not in done.stdout


def _gpt2_worker(rank, world_size, output_dir):
    _, logs, metrics, predictions, _ = _run(PipelineTrainer, PipelineTrainingArguments, output_dir,
                                            "single_label_classification", "right", False, tiny_gpt2_classifier, pp_size=2)
    return logs, metrics, predictions


@pytest.mark.slow
def test_gpt2_sequence_classifier_matches_trainer(tmp_path):
    _, ref_logs, ref_metrics, ref_predictions, _ = _run(Trainer, TrainingArguments, str(tmp_path / "ref"),
                                                        "single_label_classification", "right", False, tiny_gpt2_classifier)
    for rank, (logs, metrics, predictions) in enumerate(run_distributed(_gpt2_worker, 2, str(tmp_path / "pp"), timeout_s=300)):
        for key in ("loss", "grad_norm"):
            torch.testing.assert_close(torch.tensor([h[key] for h in logs]), torch.tensor([h[key] for h in ref_logs]),
                                       rtol=1e-5, atol=1e-6, msg=lambda m: f"rank {rank} {key}: {m}")
        assert metrics["eval_loss"] == pytest.approx(ref_metrics["eval_loss"], rel=1e-5), rank
        np.testing.assert_allclose(predictions, ref_predictions, rtol=1e-4, atol=1e-6, err_msg=f"rank {rank}")

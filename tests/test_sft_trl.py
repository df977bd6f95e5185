"""PipelineSFTTrainer reproduces trl.SFTTrainer on one process: losses, grad norms, entropy,
mean_token_accuracy, num_tokens, evaluation and final weights, for TRL's data kinds and options."""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")

from helpers.distributed import run_distributed  # noqa: E402
from hf_pp import PipelineConfigError  # noqa: E402
from helpers.sft_fixtures import (  # noqa: E402
    VOCAB_SIZE, char_tokenizer, conversational_dataset, prompt_completion_dataset, text_dataset,
)
from helpers.trainer_fixtures import tiny_llama  # noqa: E402

COMMON = dict(
    max_steps=4, per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=3e-3, max_grad_norm=1.0,
    logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
    dataloader_drop_last=True, per_device_eval_batch_size=4, max_length=48, bf16=False,
)
EVAL = dict(eval_strategy="steps", eval_steps=2)

# name: (data set, SFTConfig options, LoRA?)
CASES = {
    "prompt_completion": ("prompt_completion", EVAL, False),
    "assistant_only": ("conversational", {"assistant_only_loss": True}, False),
    "packing": ("text", {"packing": True, "max_length": 32, **EVAL}, False),
    "lora": ("prompt_completion", {}, True),
    "dft": ("prompt_completion", {"loss_type": "dft"}, False),
}
TRAIN_KEYS = ("loss", "grad_norm", "learning_rate", "entropy", "mean_token_accuracy", "num_tokens")
EVAL_KEYS = ("eval_loss", "eval_entropy", "eval_mean_token_accuracy")


def _datasets(kind: str):
    make = {"prompt_completion": prompt_completion_dataset, "conversational": conversational_dataset,
            "text": text_dataset}[kind]
    return make(seed=0), make(count=16, seed=1)


def _trainer(case: str, output_dir: str, pipeline: dict | None, dp: int = 1):
    """SFTTrainer (pipeline=None) or PipelineSFTTrainer with the case's data and options."""
    from peft import LoraConfig

    kind, options, lora = CASES[case]
    train, evaluation = _datasets(kind)
    config = {**COMMON, **options}
    if pipeline is None and dp > 1:  # one process reading the global batch of dp replicas
        config["per_device_train_batch_size"] *= dp
        config["per_device_eval_batch_size"] *= dp
    kwargs = dict(train_dataset=train, processing_class=char_tokenizer(),
                  eval_dataset=evaluation if "eval_strategy" in options else None,
                  peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
                  if lora else None)
    # eager: TRL's packed batch is one flattened row and ours are rows, which sdpa runs through other kernels
    # (different float reassociation, just over the 1e-5 weight bound after AdamW); eager gives both the same sums.
    model = tiny_llama(vocab_size=VOCAB_SIZE, attn_implementation="eager")
    if pipeline is None:
        return trl.SFTTrainer(model=model, args=trl.SFTConfig(output_dir=output_dir, **config), **kwargs)
    from hf_pp import PipelineSFTConfig, PipelineSFTTrainer

    return PipelineSFTTrainer(model=model, args=PipelineSFTConfig(output_dir=output_dir, **config, **pipeline),
                              **kwargs)


def _run(trainer) -> tuple[list[dict], dict[str, torch.Tensor]]:
    trainer.train()
    model = trainer.model
    if hasattr(model, "get_base_model"):  # a PeftModel: the names the stages keep are the base model's
        model = model.get_base_model()
    named = model.original_named_parameters() if hasattr(model, "original_named_parameters") else model.named_parameters()
    return trainer.state.log_history, {n: p.detach().clone() for n, p in named}


def _pipeline_worker(rank, world_size, output_dir, runs):
    out = {}
    for case, pipeline in runs:
        trainer = _trainer(case, output_dir, pipeline, dp=world_size // pipeline["pp_size"])
        out[(case, pipeline["pp_schedule"])] = _run(trainer)
    return out


def _assert_same(reference, got, label):
    (ref_logs, ref_params), (logs, params) = reference, got
    for keys in (TRAIN_KEYS, EVAL_KEYS):
        ref_rows = [h for h in ref_logs if keys[0] in h]
        rows = [h for h in logs if keys[0] in h]
        assert [h["step"] for h in rows] == [h["step"] for h in ref_rows], f"{label}: logged steps differ"
        for key in keys:
            torch.testing.assert_close(torch.tensor([float(h[key]) for h in rows]),
                                       torch.tensor([float(h[key]) for h in ref_rows]), rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{label} {key}: {m}")
    assert {k for h in logs for k in h} == {k for h in ref_logs for k in h}, f"{label}: logged keys differ"
    for name, value in params.items():
        torch.testing.assert_close(value, ref_params[name], rtol=1e-5, atol=1e-5, msg=lambda m: f"{label} {name}: {m}")
    return set(params)


def _check_runs(tmp_path, runs, world_size):
    dp = world_size // runs[0][1]["pp_size"]
    references = {case: _run(_trainer(case, str(tmp_path / f"ref-{case}"), None, dp=dp)) for case in {c for c, _ in runs}}
    per_rank = run_distributed(_pipeline_worker, world_size, str(tmp_path / "pp"), runs, timeout_s=600)
    for case, pipeline in runs:
        covered = set()
        for rank, out in enumerate(per_rank):
            covered |= _assert_same(references[case], out[(case, pipeline["pp_schedule"])],
                                    f"{case} {pipeline} rank {rank}")
        assert covered == set(references[case][1]), f"{case}: the stages together hold every parameter"
        assert any("mean_token_accuracy" in h for h in references[case][0]), "the reference logs TRL's metrics"


@pytest.mark.slow
def test_pipeline_sft_trainer_matches_sft_trainer_at_pp2(tmp_path):
    one_f_one_b = {"pp_size": 2, "pp_schedule": "1f1b"}
    runs = [(case, one_f_one_b) for case in CASES]
    runs += [(case, {"pp_size": 2, "pp_schedule": "interleaved_1f1b"}) for case in CASES]
    _check_runs(tmp_path, runs, world_size=2)


@pytest.mark.slow
def test_pipeline_sft_trainer_at_pp2_x_dp2_matches_one_process_on_the_global_batch(tmp_path):
    runs = [(case, {"pp_size": 2, "pp_schedule": "1f1b"}) for case in CASES]
    _check_runs(tmp_path, runs, world_size=4)


def _packed_logits_worker(rank, world_size):
    trainer = _trainer("packing", "unused", {"pp_size": 2, "pp_schedule": "1f1b"})
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    _, logits, _ = trainer.prediction_step(trainer.model, dict(batch), prediction_loss_only=False)
    return {key: batch[key] for key in ("input_ids", "position_ids", "attention_mask")}, logits


@pytest.mark.slow
def test_packed_rows_keep_documents_apart():
    """Each document's logits in a packed row equal the same document run alone through the unsplit model."""
    batch, logits = run_distributed(_packed_logits_worker, 2, timeout_s=300)[0]
    model = tiny_llama(vocab_size=VOCAB_SIZE, attn_implementation="eager").eval()
    documents = 0
    for row in range(batch["input_ids"].shape[0]):
        starts = (batch["position_ids"][row] == 0).nonzero().flatten().tolist()
        length = int(batch["attention_mask"][row].sum())
        bounds = [s for s in starts if s < length] + [length]
        for begin, end in zip(bounds, bounds[1:]):
            with torch.no_grad():
                alone = model(input_ids=batch["input_ids"][row:row + 1, begin:end]).logits[0]
            torch.testing.assert_close(logits[row, begin:end], alone, rtol=1e-5, atol=1e-5)
            documents += 1
    assert documents > batch["input_ids"].shape[0], "the rows must hold several documents each"


def _refused(options: dict, **kwargs) -> str:
    from hf_pp import PipelineSFTConfig, PipelineSFTTrainer

    args = PipelineSFTConfig(output_dir="unused", **{**COMMON, "pp_size": 2, **options})
    try:
        PipelineSFTTrainer(model=tiny_llama(vocab_size=VOCAB_SIZE), args=args, train_dataset=text_dataset(),
                           processing_class=char_tokenizer(), **kwargs)
    except PipelineConfigError as err:
        return str(err)
    raise AssertionError(f"{options} {kwargs} was accepted")


def _refused_by_pipeline_trainer(data_collator) -> str:
    from hf_pp import PipelineTrainer, PipelineTrainingArguments

    args = PipelineTrainingArguments(output_dir="unused", pp_size=2, max_steps=1, per_device_train_batch_size=2,
                                     use_cpu=True, report_to="none")
    try:
        PipelineTrainer(model=tiny_llama(vocab_size=VOCAB_SIZE), args=args, data_collator=data_collator,
                        train_dataset=[{"input_ids": [5, 6, 7]}] * 4).train()
    except PipelineConfigError as err:
        return str(err)
    raise AssertionError(f"{data_collator} was accepted")


def _flattened_rows(features):
    """A collator that flattens like DataCollatorWithFlattening but is not one: caught batch by batch."""
    ids = torch.tensor([[t for f in features for t in f["input_ids"]]])
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(ids.shape[1])[None],
            "cu_seq_lens_q": torch.tensor([0, 3, 6], dtype=torch.int32)}


def _refusal_worker(rank, world_size):
    from transformers import DataCollatorWithFlattening

    return [
        _refused_by_pipeline_trainer(DataCollatorWithFlattening()),
        _refused_by_pipeline_trainer(_flattened_rows),
        _refused({"padding_free": True}),
        _refused({"activation_offloading": True}),
        _refused({"packing": True}, data_collator=trl.trainer.sft_trainer.DataCollatorForLanguageModeling(pad_token_id=0)),
        _refused({}, data_collator=DataCollatorWithFlattening()),
    ]


@pytest.mark.slow
def test_options_that_cannot_be_pipelined_are_refused_on_every_rank():
    for messages in run_distributed(_refusal_worker, 2, timeout_s=300):
        trainer_flattening, flattened_batch, padding_free, offloading, packing_collator, flattening = messages
        assert "DataCollatorWithFlattening" in trainer_flattening and "packed rows" in trainer_flattening
        assert "padding-free batch" in flattened_batch and "cu_seq_lens_q" in flattened_batch
        assert "padding_free=True" in padding_free and "packing=True" in padding_free
        assert "activation_offloading=True" in offloading
        assert "drop data_collator" in packing_collator
        assert "DataCollatorWithFlattening" in flattening and "PipelineSFTTrainer" in flattening


def test_sft_config_composes_with_hf_argument_parser():
    from transformers import HfArgumentParser

    from hf_pp import PipelineSFTConfig

    (args,) = HfArgumentParser(PipelineSFTConfig).parse_args_into_dataclasses(
        ["--output_dir", "out", "--pp_size", "2", "--pp_schedule", "interleaved_1f1b", "--packing", "true",
         "--per_device_train_batch_size", "4", "--report_to", "none", "--use_cpu", "true"])
    assert (args.pp_size, args.pp_schedule, args.packing, args.pp_num_microbatches) == (2, "interleaved_1f1b", True, 4)
    assert isinstance(args, trl.SFTConfig)


def test_hf_pp_imports_without_trl_and_says_how_to_install_it():
    import subprocess
    import sys

    code = ("import sys; sys.modules['trl'] = None; import hf_pp; print(hf_pp.PipelineTrainer.__name__)\n"
            "try:\n    hf_pp.PipelineSFTTrainer\nexcept ImportError as err:\n    print(err)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "PipelineTrainer" in done.stdout and "pip install hf_pp[trl]" in done.stdout, done.stdout

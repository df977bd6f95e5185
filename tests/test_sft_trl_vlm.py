"""PipelineSFTTrainer reproduces trl.SFTTrainer on a vision-language model: TRL's own VLM path (a processor as
``processing_class``, so ``DataCollatorForVisionLanguageModeling`` builds pixels and placeholder tokens on the fly)
on conversations with random images and a few without one; losses, grad norms, TRL's metrics, evaluation and
final weights equal one process at pp=2 (issue 24)."""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")

from helpers.distributed import run_distributed  # noqa: E402
from helpers.vlm_sft_fixtures import image_conversations, llava_model, llava_processor  # noqa: E402
from hf_pp import PipelineConfigError  # noqa: E402

COMMON = dict(
    max_steps=4, per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=3e-3, max_grad_norm=1.0,
    logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
    dataloader_drop_last=True, per_device_eval_batch_size=4, max_length=96, bf16=False,
    eval_strategy="steps", eval_steps=2,
)
# name: (SFTConfig options, LoRA?)
CASES = {
    "full": ({}, False),
    "assistant_only_lora": ({"assistant_only_loss": True}, True),
}
TRAIN_KEYS = ("loss", "grad_norm", "learning_rate", "entropy", "mean_token_accuracy", "num_tokens")
EVAL_KEYS = ("eval_loss", "eval_entropy", "eval_mean_token_accuracy")


def _lora():
    from peft import LoraConfig

    # LoRA on the language model's attention, the projector trained whole, the vision tower frozen.
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=r".*language_model.*\.(q_proj|v_proj)",
                      modules_to_save=["multi_modal_projector"])


def _trainer(case: str, output_dir: str, pipeline: dict | None):
    """SFTTrainer (pipeline=None) or PipelineSFTTrainer on the tiny Llava, with the case's options."""
    options, lora = CASES[case]
    model = llava_model()
    kwargs = dict(train_dataset=image_conversations(seed=0), eval_dataset=image_conversations(count=8, seed=1),
                  processing_class=llava_processor(model), peft_config=_lora() if lora else None)
    if pipeline is None:
        return trl.SFTTrainer(model=model, args=trl.SFTConfig(output_dir=output_dir, **COMMON, **options), **kwargs)
    from hf_pp import PipelineSFTConfig, PipelineSFTTrainer

    args = PipelineSFTConfig(output_dir=output_dir, **COMMON, **options, **pipeline)
    return PipelineSFTTrainer(model=model, args=args, **kwargs)


def _run(trainer) -> tuple[list[dict], dict[str, torch.Tensor]]:
    assert isinstance(trainer.data_collator, trl.trainer.sft_trainer.DataCollatorForVisionLanguageModeling)
    trainer.train()
    model = trainer.model
    if hasattr(model, "get_base_model"):  # a PeftModel: the names the stages keep are the base model's
        model = model.get_base_model()
    named = model.original_named_parameters() if hasattr(model, "original_named_parameters") else model.named_parameters()
    return trainer.state.log_history, {n: p.detach().clone() for n, p in named}


def _pipeline_worker(rank, world_size, output_dir, runs):
    return {(case, pipeline["pp_schedule"]): _run(_trainer(case, f"{output_dir}/{case}", pipeline))
            for case, pipeline in runs}


def _assert_same(reference, got, label) -> set[str]:
    (ref_logs, ref_params), (logs, params) = reference, got
    for keys in (TRAIN_KEYS, EVAL_KEYS):
        ref_rows, rows = [h for h in ref_logs if keys[0] in h], [h for h in logs if keys[0] in h]
        assert [h["step"] for h in rows] == [h["step"] for h in ref_rows], f"{label}: logged steps differ"
        for key in keys:
            torch.testing.assert_close(torch.tensor([float(h[key]) for h in rows]),
                                       torch.tensor([float(h[key]) for h in ref_rows]), rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{label} {key}: {m}")
    assert {k for h in logs for k in h} == {k for h in ref_logs for k in h}, f"{label}: logged keys differ"
    for name, value in params.items():
        torch.testing.assert_close(value, ref_params[name], rtol=1e-5, atol=1e-5, msg=lambda m: f"{label} {name}: {m}")
    return set(params)


@pytest.mark.slow
def test_pipeline_sft_trainer_matches_sft_trainer_on_a_vlm_at_pp2(tmp_path):
    runs = [("full", {"pp_size": 2, "pp_schedule": "1f1b"}),
            ("assistant_only_lora", {"pp_size": 2, "pp_schedule": "1f1b"})]
    references = {case: _run(_trainer(case, str(tmp_path / f"ref-{case}"), None)) for case, _ in runs}
    per_rank = run_distributed(_pipeline_worker, 2, str(tmp_path / "pp"), runs, timeout_s=600)
    for case, pipeline in runs:
        covered = set()
        for rank, out in enumerate(per_rank):
            covered |= _assert_same(references[case], out[(case, pipeline["pp_schedule"])], f"{case} rank {rank}")
        assert covered == set(references[case][1]), f"{case}: the stages together hold every parameter"
    ref_logs, ref_params = references["full"]
    assert any("mean_token_accuracy" in h for h in ref_logs), "the reference logs TRL's metrics"
    vision = [n for n in ref_params if "vision_tower" in n]
    assert vision and any(not torch.equal(ref_params[n], llava_model().state_dict()[n]) for n in vision), \
        "the images reach the loss: the vision tower trains"

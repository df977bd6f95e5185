"""PipelineSFTTrainer reproduces trl.SFTTrainer on vision-language models (tiny Llava and Qwen2.5-VL): TRL's own
VLM path (a processor as ``processing_class``, so ``DataCollatorForVisionLanguageModeling`` builds pixels and
placeholder tokens on the fly) on conversations with random images and a few without one; losses, grad norms,
TRL's metrics, evaluation and final weights equal one process at pp=2 (issue 24)."""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")

from helpers.distributed import run_distributed  # noqa: E402
from helpers.vlm_sft_fixtures import image_conversations, vlm_model, vlm_processor  # noqa: E402
from hf_pp import PipelineConfigError  # noqa: E402

COMMON = dict(
    max_steps=4, per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=3e-3, max_grad_norm=1.0,
    logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
    dataloader_drop_last=True, per_device_eval_batch_size=4, max_length=96, bf16=False,
    eval_strategy="steps", eval_steps=2,
)
# name: (model type, SFTConfig options, LoRA?, pipeline options)
CASES = {
    "llava": ("llava", {}, False, {"pp_schedule": "1f1b"}),
    # Microbatches of 2 samples (some with an image, some without), 2 virtual stages per rank.
    "qwen2_5_vl_assistant_only_lora": ("qwen2_5_vl", {"assistant_only_loss": True}, True,
                                       {"pp_schedule": "interleaved_1f1b", "pp_microbatch_size": 2}),
}
PROJECTOR = {"llava": "multi_modal_projector", "qwen2_5_vl": "merger"}
TRAIN_KEYS = ("loss", "grad_norm", "learning_rate", "entropy", "mean_token_accuracy", "num_tokens")
EVAL_KEYS = ("eval_loss", "eval_entropy", "eval_mean_token_accuracy")


def _lora(model_type: str):
    from peft import LoraConfig

    # LoRA on the language model's attention, the projector trained whole, the vision tower frozen.
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=r".*language_model.*\.(q_proj|v_proj)",
                      modules_to_save=[PROJECTOR[model_type]])


def _trainer(case: str, output_dir: str, pipelined: bool, **options):
    """SFTTrainer or PipelineSFTTrainer (pp=2) on the case's tiny VLM, with its options (and ``options``)."""
    model_type, sft_options, lora, pipeline = CASES[case]
    model = vlm_model(model_type)
    kwargs = dict(train_dataset=image_conversations(seed=0), eval_dataset=image_conversations(count=8, seed=1),
                  processing_class=vlm_processor(model_type, model), peft_config=_lora(model_type) if lora else None)
    config = {**COMMON, **sft_options, **options}
    if not pipelined:
        return trl.SFTTrainer(model=model, args=trl.SFTConfig(output_dir=output_dir, **config), **kwargs)
    from hf_pp import PipelineSFTConfig, PipelineSFTTrainer

    args = PipelineSFTConfig(output_dir=output_dir, pp_size=2, **config, **pipeline)
    return PipelineSFTTrainer(model=model, args=args, **kwargs)


def _run(trainer) -> tuple[list[dict], dict[str, torch.Tensor]]:
    assert isinstance(trainer.data_collator, trl.trainer.sft_trainer.DataCollatorForVisionLanguageModeling)
    trainer.train()
    model = trainer.model
    if hasattr(model, "get_base_model"):  # a PeftModel: the names the stages keep are the base model's
        model = model.get_base_model()
    named = model.original_named_parameters() if hasattr(model, "original_named_parameters") else model.named_parameters()
    return trainer.state.log_history, {n: p.detach().clone() for n, p in named}


def _pipeline_worker(rank, world_size, output_dir, cases):
    runs = {case: _run(_trainer(case, f"{output_dir}/{case}", pipelined=True)) for case in cases}
    return {"runs": runs, "refusal": _refusal_message()}


@pytest.fixture(scope="module")
def pipeline_results(tmp_path_factory):
    """Each rank's results of one 2-rank job: the parity runs of every case, then the refusal (one spawn)."""
    return run_distributed(_pipeline_worker, 2, str(tmp_path_factory.mktemp("pp")), list(CASES), timeout_s=600)


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
def test_pipeline_sft_trainer_matches_sft_trainer_on_vlms_at_pp2(tmp_path, pipeline_results):
    references = {case: _run(_trainer(case, str(tmp_path / f"ref-{case}"), pipelined=False)) for case in CASES}
    for case, (model_type, _, lora, _) in CASES.items():
        covered = set()
        for rank, out in enumerate(pipeline_results):
            covered |= _assert_same(references[case], out["runs"][case], f"{case} rank {rank}")
        assert covered == set(references[case][1]), f"{case}: the stages together hold every parameter"
        ref_logs, ref_params = references[case]
        assert any("mean_token_accuracy" in h for h in ref_logs), "the reference logs TRL's metrics"
        # The images reach the loss: the (unfrozen) vision tower or the LoRA run's projector trains.
        trained = [n for n in ref_params if (f"{PROJECTOR[model_type]}.modules_to_save" if lora else "vision") in n]
        initial = dict(vlm_model(model_type).named_parameters())
        assert trained and any(not torch.equal(ref_params[n], initial[n.replace("modules_to_save.default.", "")])
                               for n in trained), case


def test_vlm_batches_mix_samples_with_and_without_images():
    """The fixtures give what the parity test needs: TRL's VLM collator, batches where some samples have no image,
    as many placeholders per image as the model's image features (checked in vlm_processor)."""
    for case in CASES:
        trainer = _trainer(case, "unused", pipelined=False, max_steps=1)
        assert isinstance(trainer.data_collator, trl.trainer.sft_trainer.DataCollatorForVisionLanguageModeling)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        image_id = trainer.model.config.image_token_id
        with_images = (batch["input_ids"] == image_id).any(-1).tolist()
        assert with_images == [True, True, True, False], (case, with_images)


def _refusal_message() -> str:
    from helpers.sft_fixtures import text_dataset
    from hf_pp import PipelineSFTConfig, PipelineSFTTrainer

    model = vlm_model("qwen2_5_vl")
    args = PipelineSFTConfig(output_dir="unused", pp_size=2, **{**COMMON, "eval_strategy": "no", "packing": True,
                                                                "max_length": 32})
    try:  # text-only data on a VLM: TRL packs it (it refuses packing image data itself)
        PipelineSFTTrainer(model=model, args=args, train_dataset=text_dataset(),
                           processing_class=vlm_processor("qwen2_5_vl", model))
    except PipelineConfigError as err:
        return str(err)
    raise AssertionError("packing=True with a VLM was accepted")


@pytest.mark.slow
def test_packed_rows_with_a_vlm_are_refused_on_every_rank(pipeline_results):
    """Packed rows keep documents apart by position_ids, which Qwen-VL's forward replaces with its 3-D positions
    (measured: losses and grad norms differ from trl.SFTTrainer's padding-free batch)."""
    for message in (out["refusal"] for out in pipeline_results):
        assert "packing=True" in message and "vision-language model" in message and "packing=False" in message

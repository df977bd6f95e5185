"""PipelineTrainer reproduces Trainer on vision-language models (issue 24): tiny Qwen2.5-VL and Llava, batches
that mix samples with and without images, gradient accumulation, full fine-tuning and LoRA, from the model or from
its directory (read per stage); the saved directory reloads with ``from_pretrained`` and generates."""

import pytest
import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from helpers.distributed import run_distributed
from helpers.vlm_models import VLM_CASES

COMMON = dict(
    max_steps=4, gradient_accumulation_steps=2, per_device_train_batch_size=4, max_grad_norm=1.0, learning_rate=3e-3,
    logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
    train_sampling_strategy="sequential", remove_unused_columns=False,
)


class PrebuiltBatches(Dataset):
    """Rows of prebuilt 4-sample batches (as a processor + collator gives them); :func:`collate` gives each back."""

    def __init__(self, model_type: str, batches: int = 8):
        case = VLM_CASES[model_type]
        model = case.model()
        # Every other batch has no image at all; the others mix samples with none, one and two images.
        self.batches = [case.batch(model, with_images=i % 2 == 0, seed=i) for i in range(batches)]

    def __len__(self):
        return 4 * len(self.batches)

    def __getitem__(self, i):
        return (i // 4, i % 4)


def make_collator(dataset: PrebuiltBatches):
    def collate(items):
        index = items[0][0]
        if [row for _, row in items] != [0, 1, 2, 3] or any(b != index for b, _ in items):
            raise AssertionError(f"the sampler gave {items}")
        return {k: v.clone() for k, v in dataset.batches[index].items()}
    return collate


PROJECTOR = {"qwen2_5_vl": "merger", "llava": "multi_modal_projector"}


def _lora(model_type):
    from peft import LoraConfig

    # LoRA on the language model's attention, the projector trained whole, the vision tower frozen.
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=r".*language_model.*\.(q_proj|v_proj)",
                      modules_to_save=[PROJECTOR[model_type]])


def _reference(output_dir, model_type, lora):
    from peft import get_peft_model

    data = PrebuiltBatches(model_type)
    model = VLM_CASES[model_type].model()
    if lora:
        model = get_peft_model(model, _lora(model_type))
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=output_dir, **COMMON), train_dataset=data,
                      data_collator=make_collator(data))
    trainer.train()
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return trainer.state.log_history, params


def _pipeline_worker(rank, world_size, output_dir, runs):
    from hf_pp import PipelineTrainer, PipelineTrainingArguments

    out = {}
    for model_type, lora in runs:
        data = PrebuiltBatches(model_type)
        args = PipelineTrainingArguments(output_dir=f"{output_dir}/{model_type}-{lora}", pp_size=world_size,
                                         pp_balance="layers", **COMMON)
        # "dir": the same initial model, read per stage from its save_pretrained directory.
        model = f"{output_dir}/{model_type}-init" if lora == "dir" else VLM_CASES[model_type].model()
        trainer = PipelineTrainer(model=model, args=args, train_dataset=data, data_collator=make_collator(data),
                                  peft_config=_lora(model_type) if lora is True else None)
        trainer.train()
        params = {n: p.detach().clone() for n, p in trainer.model.original_named_parameters() if p.requires_grad}
        if lora is False:
            trainer.save_model(f"{output_dir}/{model_type}-saved")
        out[(model_type, lora)] = (trainer.state.log_history, params)
    return out


def _assert_same(ref, got, label):
    ref_logs, ref_params = ref
    logs, params = got
    ref_steps, steps = [h for h in ref_logs if "loss" in h], [h for h in logs if "loss" in h]
    assert len(steps) == len(ref_steps) == COMMON["max_steps"], label
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor([h[key] for h in steps]), torch.tensor([h[key] for h in ref_steps]),
                                   rtol=1e-5, atol=1e-7, msg=lambda m: f"{label} {key}: {m}")
    for name, value in params.items():
        key = name if name in ref_params else f"base_model.model.{name}"
        torch.testing.assert_close(value, ref_params[key], rtol=1e-5, atol=1e-5, msg=lambda m: f"{label} {name}: {m}")
    return len(params)


@pytest.mark.slow
def test_pipeline_trainer_matches_trainer_on_vlms_full_and_lora(tmp_path):
    runs = [("qwen2_5_vl", False), ("llava", False), ("qwen2_5_vl", True), ("llava", True), ("qwen2_5_vl", "dir")]
    VLM_CASES["qwen2_5_vl"].model().save_pretrained(tmp_path / "pp" / "qwen2_5_vl-init")
    per_rank = run_distributed(_pipeline_worker, 2, str(tmp_path / "pp"), runs, timeout_s=900)
    for model_type, lora in runs:
        ref = _reference(str(tmp_path / "ref"), model_type, lora is True)
        checked = sum(_assert_same(ref, rank[(model_type, lora)], f"{model_type} lora={lora}") for rank in per_rank)
        assert checked == len(ref[1]), (model_type, lora)  # every trained parameter was on one of the ranks
        if lora is True:  # the vision tower stayed frozen, the projector trained whole, LoRA on the language model
            trained = list(ref[1])
            projector = [n for n in trained if f"{PROJECTOR[model_type]}.modules_to_save" in n]
            assert projector and all("lora_" in n or n in projector for n in trained), trained
            assert any("language_model" in n and "lora_A" in n for n in trained)
    # The saved directory is a Hugging Face one: it reloads whole and generates.
    for model_type in ("qwen2_5_vl", "llava"):
        from transformers import AutoModelForImageTextToText

        saved = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "pp" / f"{model_type}-saved"))
        trained = dict(per_rank[0][(model_type, False)][1], **per_rank[1][(model_type, False)][1])
        for name, param in saved.named_parameters():
            torch.testing.assert_close(param, trained[name], rtol=0, atol=0, msg=lambda m: f"{model_type} {name}: {m}")
        batch = PrebuiltBatches(model_type).batches[0]
        inputs = {k: v[:1] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v for k, v in batch.items()
                  if k != "labels"}
        if model_type == "qwen2_5_vl":  # the first sample's one image
            grid = batch["image_grid_thw"][:1]
            inputs.update(pixel_values=batch["pixel_values"][: int(grid.prod())], image_grid_thw=grid)
        else:
            inputs["pixel_values"] = batch["pixel_values"][:1]
        out = saved.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert out.shape == (1, inputs["input_ids"].shape[1] + 3)

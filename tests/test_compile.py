"""torch_compile under pipelining: each stage's decoder layers compiled in place, same results as eager
(Trainer for a full fine-tune, the eager pipeline for LoRA)."""

import pytest
import torch

from helpers.distributed import run_distributed
from hf_pp import PipelineConfigError, PipelineTrainer, PipelineTrainingArguments
from hf_pp.compile import check_compile_options, compile_stage_layers
from hf_pp.preflight import validate_pipeline_setup
from test_trainer_parity import COMMON, _reference
from helpers.trainer_fixtures import CountingDataset, lora_pipeline_losses, pad_collator, tiny_llama


def fixed_length_collator(features, length: int = 12):
    """Every batch padded to the dataset's longest sample (12): one shape, so each stage compiles once."""
    batch = pad_collator(features)
    pad = length - batch["input_ids"].shape[1]
    return {k: torch.nn.functional.pad(v, (0, pad), value=-100 if k == "labels" else 0) for k, v in batch.items()}


def test_compile_stage_layers_compiles_every_layer_and_keeps_names_and_outputs():
    model = tiny_llama(num_layers=3).eval()
    ids = torch.randint(1, 64, (2, 7))
    names = list(model.state_dict())
    with torch.no_grad():
        eager = model(input_ids=ids).logits
    assert compile_stage_layers([model], backend="eager") == 3
    assert list(model.state_dict()) == names  # checkpoints and optimizer keys see no wrapper
    assert all(hasattr(layer.forward, "_torchdynamo_orig_callable") for layer in model.model.layers)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, eager)


@pytest.mark.parametrize("backend,mode,message", [
    ("no-such-backend", None, "torch_compile_backend='no-such-backend' is not a torch.compile backend"),
    ("inductor", "fastest", "torch_compile_mode='fastest' is not a torch.compile mode"),
])
def test_unknown_compile_backend_or_mode_is_refused_before_any_communication(tmp_path, backend, mode, message):
    with pytest.raises(PipelineConfigError, match=message):
        check_compile_options(backend, mode)
    args = PipelineTrainingArguments(output_dir=str(tmp_path), pp_size=2, torch_compile_backend=backend,
                                     torch_compile_mode=mode, use_cpu=True, report_to="none")
    with pytest.raises(PipelineConfigError, match=message):
        validate_pipeline_setup(tiny_llama(), args, {}, world_size=2)


def _compiled_worker(rank, world_size, output_dir):
    import torch._dynamo

    torch._dynamo.reset()
    args = PipelineTrainingArguments(output_dir=output_dir, pp_size=2, pp_schedule="1f1b", torch_compile=True, **COMMON)
    trainer = PipelineTrainer(model=tiny_llama(), args=args, train_dataset=CountingDataset(),
                              data_collator=fixed_length_collator)
    trainer.train()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    params = {n: p.detach().clone() for n, p in trainer.model.original_named_parameters()}
    return trainer.state.log_history, params, graphs, *(lora_pipeline_losses(output_dir, COMMON, fixed_length_collator, torch_compile=c) for c in (True, False))


@pytest.mark.slow
def test_torch_compile_at_pp2_compiles_each_stage_and_matches_eager_trainer(tmp_path):
    ref_logs, ref_params, _ = _reference(str(tmp_path / "ref"), data_collator=fixed_length_collator)
    ref_steps = [h for h in ref_logs if "loss" in h]
    per_rank = run_distributed(_compiled_worker, 2, str(tmp_path / "pp"), timeout_s=600)
    for rank, (logs, params, graphs, lora_compiled, lora_eager) in enumerate(per_rank):
        assert graphs > 0, f"rank {rank} compiled nothing"
        # LoRA layers inside the compiled decoder layers: the same losses as the eager pipeline.
        torch.testing.assert_close(torch.tensor(lora_compiled), torch.tensor(lora_eager), rtol=1e-4, atol=1e-6)
        steps = [h for h in logs if "loss" in h]
        for key in ("loss", "grad_norm"):
            torch.testing.assert_close(torch.tensor([h[key] for h in steps]), torch.tensor([h[key] for h in ref_steps]),
                                       rtol=1e-4, atol=1e-6, msg=lambda m: f"rank {rank} {key}: {m}")
        for name, value in params.items():
            torch.testing.assert_close(value, ref_params[name].detach(), rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"rank {rank} {name}: {m}")

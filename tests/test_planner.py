"""The dry-run planner: one process, no process group, no download; its
memory estimate matches what the split stages really hold."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_pp.__main__ import main
from hf_pp.planner import format_plan, load_config, meta_model, plan_pipeline
from hf_pp.split import copy_stage_module


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_cli_prints_table_memory_bubble_and_writes_png(tmp_path, capsys):
    out = tmp_path / "plan.png"
    assert main(["plan", "tiny-llama", "--pp-size", "4", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "schedule 1F1B, pp_size 4, 4 stages (1 per rank), 8 microbatches" in text
    assert "model.embed_tokens, model.layers.0-1, model.rotary_emb" in text
    assert "model.layers.6-7, model.norm, lm_head" in text
    assert "rank 3:" in text and "expected bubble: 27.3%" in text and "in the drawn schedule: 27.3%" in text
    width, height = _png_size(out)
    assert width >= 600 and height >= 150


def test_interleaved_plan_from_config_json_and_model_dir(tmp_path):
    config = load_config("tiny-llama")
    config.save_pretrained(tmp_path / "model")
    fields = config.to_dict()
    (tmp_path / "config.json").write_text(json.dumps(fields))
    for source in (str(tmp_path / "model"), str(tmp_path / "config.json")):
        plan = plan_pipeline(meta_model(load_config(source)), 2, "interleaved_1f1b", layers_per_stage=2,
                             n_microbatches=4, picture=str(tmp_path / "i.png"))
        assert plan.stage_ids_per_rank == [(0, 2), (1, 3)]
        assert [len([f for f in s if ".layers." in f]) for s in plan.fqns_per_stage] == [2, 2, 2, 2]
        assert plan.expected_bubble == pytest.approx(1 / 9)
        assert plan.simulated_bubble == pytest.approx(1 / 9)
    assert _png_size(tmp_path / "i.png")[0] >= 600


@pytest.mark.parametrize("example,schedule,pp_size", [("tiny-llama", "1f1b", 4), ("tiny-llama-tied", "zbv", 2)])
def test_memory_estimate_matches_measured_param_and_grad_bytes(example, schedule, pp_size):
    config = load_config(example)
    plan = plan_pipeline(meta_model(config), pp_size, schedule)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    ids = torch.randint(0, config.vocab_size, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters(remove_duplicate=False)}
    assert sum(f.params for f in plan.facts) == sum(p.numel() for p in model.parameters())
    for stage, fqns in enumerate(plan.fqns_per_stage):
        part = copy_stage_module(model, fqns)
        measured = sum(p.numel() * p.element_size() for p in part.parameters())
        measured += sum(grads[n].numel() * grads[n].element_size() for n, _ in part.named_parameters())
        mem = plan.stage_memory(stage)
        assert mem["weights"] + mem["grads"] == pytest.approx(measured, rel=0.10)
    if example.endswith("tied"):  # first and last stage each hold the tied matrix
        assert plan.facts[0].bytes_held > plan.facts[0].params * 4 - 1
        assert plan.facts[-1].bytes_held > plan.facts[-1].params * 4


@pytest.mark.parametrize("batch, seq, chosen", [(64, 128, 2), (8, 128, 1), (64, 2048, 1)])
def test_cli_plans_the_microbatch_size_training_chooses_for_a_batch(tmp_path, capsys, batch, seq, chosen):
    from hf_pp import PipelineTrainingArguments

    args = PipelineTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, pp_size=2,
                                     per_device_train_batch_size=batch, pp_balance_seq_len=seq)
    assert args.pp_microbatch_size == chosen  # the planner and training choose alike
    assert main(["plan", "tiny-llama", "--pp-size", "2", "--batch-size", str(batch), "--seq-len", str(seq),
                 "--out", str(tmp_path / "x.png")]) == 0
    text = capsys.readouterr().out
    assert f"{batch // chosen} microbatches" in text
    assert f"microbatch size chosen for a batch of {batch}: {chosen} ({batch // chosen} microbatches)" in text
    assert main(["plan", "tiny-llama", "--pp-size", "2", "--batch-size", "8", "--microbatches", "8",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "not both" in capsys.readouterr().err


def test_bad_input_exits_with_a_message(tmp_path, capsys):
    assert main(["plan", "no-such-model", "--pp-size", "2", "--out", str(tmp_path / "x.png")]) == 2
    assert "neither a built-in example" in capsys.readouterr().err
    assert main(["plan", "tiny-llama", "--pp-size", "3", "--layers-per-stage", "3", "--out", str(tmp_path / "x.png")]) == 2
    assert "round_to_pp_multiple" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    assert main(["plan", str(tmp_path / "bad.json"), "--pp-size", "2"]) == 2
    assert "model_type" in capsys.readouterr().err


def test_format_plan_lists_every_stage():
    plan = plan_pipeline(meta_model(load_config("tiny-llama")), 2, "interleaved_1f1b")
    text = format_plan(plan)
    assert all(f"    {s}    {s % 2}" in text for s in range(4))

"""pp_balance: the partition is optimal, "params" and "time" cut where they should, every rank agrees on
the cut, training through a balanced split still equals Trainer, and bad options get a clear error."""

import itertools
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from torch.distributed.device_mesh import init_device_mesh

from helpers.distributed import run_distributed
from hf_pp import AutoPipeline, PipelineTrainer, PipelineTrainingArguments
from hf_pp.__main__ import main
from hf_pp.balance import balance_stages, check_balance_options, param_costs, partition_layers
from hf_pp.errors import PipelineConfigError
from hf_pp.losses import causal_lm_loss
from hf_pp.planner import meta_model, plan_pipeline
from hf_pp.profiling import time_costs
from hf_pp.schedules import resolve_schedule
from hf_pp.stage_math import check_layer_ranges, split_layers_evenly
from test_trainer_parity import COMMON, _assert_same_run
from helpers.trainer_fixtures import CountingDataset, pad_collator, tiny_llama

BIG_VOCAB = 4096  # embeddings and head each ~14 layers' worth of parameters at hidden 32


def _brute_force_bottleneck(costs, num_stages, first, last):
    """Smallest max stage cost over every way to cut (end stages may be empty, middle ones not)."""
    n, best = len(costs), float("inf")
    for cuts in itertools.combinations_with_replacement(range(n + 1), num_stages - 1):
        bounds = [0, *cuts, n]
        ranges = [range(bounds[s], bounds[s + 1]) for s in range(num_stages)]
        if any(not r for r in ranges[1:-1]):
            continue
        stage = [sum(costs[i] for i in r) for r in ranges]
        stage[0] += first
        stage[-1] += last
        best = min(best, max(stage))
    return best


def test_partition_is_optimal_against_brute_force():
    rng = random.Random(0)
    for _ in range(150):
        n, num = rng.randint(2, 8), rng.randint(2, 4)
        if num - 2 > n:
            continue
        costs = [rng.choice([1.0, 2.0, 3.5, rng.random() * 5]) for _ in range(n)]
        first, last = rng.random() * 6, rng.random() * 6
        ranges = partition_layers(costs, num, first, last)
        check_layer_ranges(ranges, n, num, first_holds_more=True, last_holds_more=True)
        stage = [sum(costs[i] for i in r) for r in ranges]
        stage[0] += first
        stage[-1] += last
        assert max(stage) == pytest.approx(_brute_force_bottleneck(costs, num, first, last), rel=1e-9), (costs, num)


def test_uniform_costs_give_the_even_split():
    for n, num in [(8, 2), (8, 4), (6, 3), (7, 2)]:
        ranges = partition_layers([1.0] * n, num, first_may_be_empty=False, last_may_be_empty=False)
        assert [len(r) for r in ranges] == [len(r) for r in split_layers_evenly(n, num)]


def test_partition_refuses_an_empty_middle_stage_and_bad_costs():
    with pytest.raises(PipelineConfigError, match="would leave a stage empty.*use at most 4 stages"):
        partition_layers([1.0, 1.0], 5, 1.0, 1.0)
    with pytest.raises(PipelineConfigError, match="finite and non-negative"):
        partition_layers([1.0, float("nan")], 2)
    with pytest.raises(PipelineConfigError, match="Stage 1 of 3 would be empty"):
        check_layer_ranges([range(0, 2), range(2, 2), range(2, 4)], 4, 3, first_holds_more=True, last_holds_more=True)
    with pytest.raises(PipelineConfigError, match="exactly one stage in order"):
        check_layer_ranges([range(0, 2), range(1, 4)], 4, 2)


def _big_vocab_meta(tie=False, layers=8):
    config = LlamaConfig(vocab_size=32768, hidden_size=256, intermediate_size=688, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=tie)
    return meta_model(config)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_params_counts_embeddings_and_head_and_moves_layers_off_the_ends(tie):
    model = _big_vocab_meta(tie)
    costs = param_costs(model)
    embed = 32768 * 256
    assert costs.first == embed
    assert costs.last == embed + 256  # the head (a tied head is a copy on the last stage) + final norm
    assert len(set(costs.layers)) == 1
    plan = balance_stages(model, 4, resolve_schedule("1f1b"), "params")
    layers = [len(r) for r in plan.layer_ranges]
    assert sum(layers) == 8 and layers[0] < 2 and layers[-1] < 2, layers
    # The head stage alone is the floor; the even split puts two more layers (16% more) on it.
    assert max(plan.stage_costs()) == costs.last < 0.9 * max(plan.even_stage_costs())
    # The plan is a normal plan: embeddings first, head last, rotary everywhere, original FQNs.
    assert plan.fqns_per_stage[0][0] == "model.embed_tokens" and "lm_head" in plan.fqns_per_stage[-1]
    assert all("model.rotary_emb" in stage for stage in plan.fqns_per_stage)


def test_time_profile_sees_the_heavy_head_and_shares_figures_of_identical_layers():
    torch.manual_seed(0)
    # 32768 classes: the head is ~50 layers' worth of matmul, so a loaded machine's noise cannot hide it.
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32768, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, use_cache=False))
    state = torch.random.get_rng_state()
    costs = time_costs(model, microbatch_size=1, seq_len=64)
    assert torch.equal(torch.random.get_rng_state(), state), "profiling must leave the caller's random state alone"
    assert costs.unit == "seconds" and len(costs.layers) == 3 and len(set(costs.layers)) == 1
    assert costs.last > 2 * costs.layers[0] > 0, costs
    # The model itself is untouched: still whole, still trainable, no grads left behind.
    assert all(p.grad is None for p in model.parameters())


def test_time_balance_works_on_a_meta_model():
    config = LlamaConfig(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    plan = balance_stages(meta_model(config), 2, resolve_schedule("1f1b"), "time")
    assert sum(len(r) for r in plan.layer_ranges) == 6
    assert len(plan.layer_ranges[0]) >= len(plan.layer_ranges[1]), "the head stage should get fewer layers"


def test_bad_balance_options_get_clear_errors(tmp_path):
    with pytest.raises(PipelineConfigError,
                       match=r"pp_balance must be one of \('auto', 'layers', 'params', 'time'\), got 'flops'"):
        PipelineTrainingArguments(output_dir=str(tmp_path), pp_size=2, pp_balance="flops", use_cpu=True)
    with pytest.raises(PipelineConfigError, match="pp_balance_seq_len must be at least 1"):
        PipelineTrainingArguments(output_dir=str(tmp_path), pp_size=2, pp_balance="time", pp_balance_seq_len=0,
                                  use_cpu=True)
    with pytest.raises(PipelineConfigError, match="computes the stage plan itself"):
        check_balance_options("time", [["a"], ["b"]])
    with pytest.raises(PipelineConfigError, match="balances Hugging Face models"):
        balance_stages(torch.nn.Linear(2, 2), 2, resolve_schedule("1f1b"), "params")
    with pytest.raises(PipelineConfigError, match="longer than the model's max_position_embeddings=64"):
        balance_stages(meta_model(tiny_llama().config), 2, resolve_schedule("1f1b"), "time", seq_len=65)
    # 5 stages over 2 layers cannot be balanced without an empty middle stage.
    with pytest.raises(PipelineConfigError):
        plan_pipeline(meta_model(tiny_llama(num_layers=2).config), 5, balance="params")


def test_planner_shows_each_mode(capsys, tmp_path):
    config = tmp_path / "big_vocab.json"
    config.write_text('{"model_type": "llama", "vocab_size": 32768, "hidden_size": 256, "intermediate_size": 688, '
                      '"num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 4}')
    assert main(["plan", str(config), "--pp-size", "4", "--balance", "params", "--out", str(tmp_path / "p.png")]) == 0
    text = capsys.readouterr().out
    assert "pp_balance=params: parameters held per stage" in text
    assert "largest stage" in text and "with layers spread evenly" in text
    assert main(["plan", str(config), "--pp-size", "2", "--balance", "time", "--seq-len", "32",
                 "--out", str(tmp_path / "t.png")]) == 0
    text = capsys.readouterr().out
    assert "pp_balance=time: estimated forward+backward per microbatch per stage" in text and " ms" in text
    with pytest.raises(SystemExit):  # argparse names the choices
        main(["plan", str(config), "--pp-size", "2", "--balance", "flops"])


def _reference(output_dir):
    trainer = Trainer(model=tiny_llama(vocab_size=BIG_VOCAB), args=TrainingArguments(output_dir=output_dir, **COMMON),
                      train_dataset=CountingDataset(), data_collator=pad_collator)
    result = trainer.train()
    return trainer.state.log_history, dict(trainer.model.named_parameters(remove_duplicate=False)), result


def _balanced_worker(rank, world_size, output_dir, runs):
    out = {}
    for balance, schedule in runs:
        args = PipelineTrainingArguments(output_dir=output_dir, pp_size=world_size, pp_schedule=schedule,
                                         pp_balance=balance, **COMMON)
        trainer = PipelineTrainer(model=tiny_llama(vocab_size=BIG_VOCAB), args=args, train_dataset=CountingDataset(),
                                  data_collator=pad_collator)
        result = trainer.train()
        params = {n: p.detach().clone() for n, p in trainer.model.original_named_parameters()}
        layers = sorted({int(n.split(".")[2]) for n in params if n.startswith("model.layers.")})
        out[balance, schedule] = (trainer.state.log_history, params, (result.global_step, result.training_loss)), layers
    if world_size != 2:
        return out
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("pp",))
    with pytest.raises(PipelineConfigError, match="pp_balance must be one of"):
        AutoPipeline(mesh, pp_balance="memory")
    ap = AutoPipeline(mesh, pp_schedule="interleaved_1f1b", pp_batch_size=4, dp_axis_names=None, pp_balance="params")
    ap.build(tiny_llama(vocab_size=BIG_VOCAB), loss_fn=causal_lm_loss)
    out["autopipeline"] = _layers_of(ap)
    # The default ("auto", 512 tokens capped at the model's 64) cuts without any collective, alike on every rank;
    # an explicit plan with the default is used as given.
    out["autopipeline auto"] = _layers_of(AutoPipeline(mesh, pp_batch_size=4, dp_axis_names=None).build(
        tiny_llama(vocab_size=BIG_VOCAB), loss_fn=causal_lm_loss))
    uneven = [["model.embed_tokens", "model.layers.0", "model.layers.1", "model.layers.2", "model.rotary_emb"],
              ["model.layers.3", "model.norm", "lm_head", "model.rotary_emb"]]
    out["autopipeline explicit"] = _layers_of(AutoPipeline(
        mesh, pp_batch_size=4, dp_axis_names=None, module_fqns_per_model_part=uneven).build(tiny_llama(), loss_fn=causal_lm_loss))
    return out


def _layers_of(ap):
    return sorted({int(n.split(".")[2]) for part in ap.parts for n, _ in part.named_parameters() if n.startswith("model.layers.")})


@pytest.mark.slow
@pytest.mark.parametrize(
    "world_size,runs,expected_layers",
    [
        # pp=2 interleaved: 4 stages over 4 layers; "params" leaves the embedding stage (0, rank 0) and the head
        # stage (3, rank 1) without layers, so rank 0 holds layers 2-3 (stage 2) and rank 1 layers 0-1 (stage 1).
        # "auto" (the default; its length from the first collated batch) leaves the head (~14 layers' worth of
        # FLOPs at hidden 32) alone on rank 1.
        (2, [("params", "interleaved_1f1b"), ("time", "1f1b"), ("auto", "1f1b")],
         {("params", "interleaved_1f1b"): [[2, 3], [0, 1]], ("auto", "1f1b"): [[0, 1, 2, 3], []]}),
        (4, [("params", "1f1b")], {("params", "1f1b"): [[], [0, 1], [2, 3], []]}),
    ],
    ids=["pp2", "pp4"],
)
def test_balanced_training_matches_trainer(tmp_path, world_size, runs, expected_layers):
    reference = _reference(str(tmp_path / "ref"))
    per_rank = run_distributed(_balanced_worker, world_size, str(tmp_path / "pp"), runs, timeout_s=600)
    for run in runs:
        held = [out[run][1] for out in per_rank]
        # Every rank cut the model the same way: each layer on exactly one rank, in order.
        assert sorted(i for layers in held for i in layers) == list(range(4)), (run, held)
        if run in expected_layers:
            assert held == expected_layers[run], (run, held)
        covered = set()
        for rank, out in enumerate(per_rank):
            _assert_same_run(reference, out[run][0], f"{run} rank {rank}")
            covered |= set(out[run][0][1])
        assert covered == set(reference[1])
    if world_size == 2:  # AutoPipeline(pp_balance=...) cuts where PipelineTrainer does
        assert [out["autopipeline"] for out in per_rank] == expected_layers["params", "interleaved_1f1b"]
        assert [out["autopipeline auto"] for out in per_rank] == expected_layers["auto", "1f1b"]
        assert [out["autopipeline explicit"] for out in per_rank] == [[0, 1, 2], [3]]

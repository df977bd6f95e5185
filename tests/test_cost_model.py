"""pp_balance="auto", the default: its matmul FLOPs are the ones torch counts, it cuts where a balance of
counted FLOPs cuts when the work is compute-bound, moves layers off a heavy LM head, keeps the even split where
nothing is heavy, never leaves a stage empty, and behaves as "layers" wherever it cannot or need not balance."""

import functools
import inspect
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from hf_pp import AutoPipeline, PipelineTrainingArguments
from hf_pp import __main__ as cli
from hf_pp.balance import (
    BALANCE_MODES, DEFAULT_BALANCE, balance_stages, balanced_module_fqns, check_balance_options, estimate_seq_len,
    first_batch_seq_len, partition_layers,
)
from hf_pp.cost_model import ELEMENT_FLOPS, CostModelError, attention_dims, expert_share, flop_costs, plan_work
from hf_pp.errors import PipelineConfigError
from hf_pp.layout import stage_facts
from hf_pp.planner import meta_model, plan_pipeline
from hf_pp.preflight import validate_pipeline_setup
from hf_pp.schedules import resolve_schedule
from hf_pp.split import validate_stage_fqns
from hf_pp.stage_math import split_layers_evenly
from helpers.trainer_fixtures import CountingDataset, pad_collator, tiny_llama

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=100, use_cache=False)
# Tiny configs of each kind of layer the cost model reads: GQA, Conv1D (GPT-2), routed experts, a shared expert,
# multi-head latent attention with a dense first layer.
KINDS = {
    "llama": {},
    "gpt2": dict(n_embd=64, n_inner=128, n_layer=2, n_head=4),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=64, moe_intermediate_size=32),
    "deepseek_v3": dict(n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1, moe_intermediate_size=32,
                        kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=1,
                        topk_group=1, num_key_value_heads=4),
}


def _config(model_type: str = "llama", **fields):
    return AutoConfig.for_model(model_type, **{**SMALL, **KINDS.get(model_type, {}), **fields})


def _big_llama(vocab: int, layers: int = 8, intermediate: int = 1024, tie: bool = False, seq: int = 128) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=seq,
                       tie_word_embeddings=tie, use_cache=False)


def _counted_flops(model: torch.nn.Module, batch: int, seq: int) -> dict[str, int]:
    """FLOPs torch's FlopCounterMode counts per module (FQN) in forward + backward of a causal-LM loss."""
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        logits = model(input_ids=ids).logits
        F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten()).backward()
    root = type(model).__name__ + "."
    return {k[len(root):]: sum(v.values()) for k, v in counter.get_flop_counts().items() if k.startswith(root)}


def _layer_counts(ranges) -> list[int]:
    return [len(r) for r in ranges]


# ---- the FLOPs are torch's own count -----------------------------------------------------------------
@pytest.mark.parametrize("model_type", list(KINDS))
def test_matmul_flops_equal_what_torch_counts_per_piece(model_type):
    torch.manual_seed(0)
    # Eager attention and experts: every matmul is one torch counts (no fused kernel it has no formula for).
    model = AutoModelForCausalLM.from_config(_config(model_type), attn_implementation="eager",
                                             experts_implementation="eager").train()
    counted = _counted_flops(model, batch=2, seq=16)
    work = plan_work(model, microbatch_size=2, seq_len=16)
    layers = [name for name in counted if name.count(".") == 2 and name.rsplit(".", 1)[-1].isdigit()]
    assert len(layers) == len(work.layers) == 2, counted.keys()
    # Each layer's matmuls (projections, routed and shared experts, MLA) and attention scores, exactly.
    assert [counted[name] for name in layers] == [w.flops for w in work.layers]
    assert work.first.flops == 0  # a gather
    assert work.last.flops == counted["lm_head"]
    if model_type == "deepseek_v3":  # its first layer is dense, the second routes to 2 of 4 experts
        assert work.layers[0].flops != work.layers[1].flops


# ---- where the work is compute-bound, "auto" cuts as a balance of counted FLOPs --------------------
@functools.lru_cache(maxsize=None)
def _counted_piece_flops(vocab: int) -> tuple[float, tuple[float, ...], float]:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_big_llama(vocab), attn_implementation="eager").train()
    counted = _counted_flops(model, batch=1, seq=128)
    layers = tuple(float(counted[f"model.layers.{i}"]) for i in range(8))
    return float(counted.get("model.embed_tokens", 0)), layers, float(counted["lm_head"])


@pytest.mark.parametrize("schedule,pp_size", [("1f1b", 2), ("1f1b", 4), ("interleaved_1f1b", 2)])
@pytest.mark.parametrize("vocab", [1024, 8192, 32768])
def test_auto_cuts_where_a_balance_of_counted_flops_cuts_when_compute_bound(vocab, schedule, pp_size):
    meta = meta_model(_big_llama(vocab))
    plan = balance_stages(meta, pp_size, resolve_schedule(schedule), "auto", seq_len=128)
    work = plan_work(meta, microbatch_size=1, seq_len=128)
    # Compute-bound: memory-bound work is a small part of each layer and of the head + loss, and the
    # embeddings (a gather: memory-bound only) weigh less than one layer.
    assert all(ELEMENT_FLOPS * w.elements < 0.15 * w.cost() for w in (*work.layers, work.last))
    assert work.first.cost() < work.layers[0].cost()
    first, layers, last = _counted_piece_flops(vocab)
    counted_cut = partition_layers(layers, len(plan.layer_ranges), first, last)
    assert plan.layer_ranges == counted_cut, (vocab, _layer_counts(plan.layer_ranges), _layer_counts(counted_cut))


# ---- concrete cuts ---------------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_a_large_vocabulary_moves_layers_off_the_head_stage(tie):
    model = meta_model(_big_llama(32768, intermediate=688, tie=tie, seq=512))
    plan = balance_stages(model, 2, resolve_schedule("1f1b"), "auto", seq_len=128)
    first, last = _layer_counts(plan.layer_ranges)
    assert first + last == 8 and last < first, (first, last)
    assert max(plan.stage_costs()) < 0.9 * max(plan.even_stage_costs())
    # The LM head + loss over 32768 tokens is several layers' worth of work; the embeddings are not.
    costs = plan.costs
    assert costs.last > 4 * costs.layers[0] > 4 * costs.first
    assert balanced_module_fqns(model, 2, resolve_schedule("1f1b"), "auto", seq_len=128) == plan.fqns_per_stage


@pytest.mark.parametrize("schedule,pp_size", [("1f1b", 2), ("1f1b", 4), ("gpipe", 2), ("interleaved_1f1b", 2), ("zbv", 2)])
@pytest.mark.parametrize("model", ["vocab 1024, hidden 256", "the tests' tiny llama"])
def test_a_small_vocabulary_keeps_the_even_split(model, schedule, pp_size):
    meta = meta_model(_big_llama(1024, seq=2048)) if model.startswith("vocab") else tiny_llama()
    spec = resolve_schedule(schedule)
    for seq_len in (None, 12):  # the default length (512, capped) and a short training batch
        plan = balance_stages(meta, pp_size, spec, "auto", seq_len=seq_len)
        assert plan.layer_ranges == split_layers_evenly(sum(_layer_counts(plan.layer_ranges)), len(plan.layer_ranges))
        # The cut changes nothing, so no plan is handed down: the pipeline is built exactly as with "layers".
        assert balanced_module_fqns(meta, pp_size, spec, "auto", seq_len=seq_len) is None


def test_moe_and_gqa_costs_follow_their_shapes():
    def layer(model_type, **fields):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(_config(model_type, **fields))
        return plan_work(model, microbatch_size=1, seq_len=64).layers[-1]

    # Routed experts cost their top-k share: one more routed expert adds the same work each time.
    top = [layer("mixtral", num_experts_per_tok=k).flops for k in (1, 2, 3, 4)]
    assert top[0] < top[1] < top[2] < top[3] and top[1] - top[0] == pytest.approx(top[3] - top[2])
    # top-4 of 4 experts is a dense MLP four experts wide: the experts' whole weight on every token.
    dense = layer("mixtral", num_experts_per_tok=4, num_local_experts=4).flops
    assert layer("mixtral", num_experts_per_tok=2, num_local_experts=8).flops < dense
    # Fewer KV heads: smaller K/V projections; the attention scores still have every query head.
    assert layer("llama", num_key_value_heads=1).flops < layer("llama", num_key_value_heads=4).flops
    assert attention_dims(_config("llama", num_key_value_heads=1)) == attention_dims(_config("llama")) == (4, 16, 16)
    assert attention_dims(_config("deepseek_v3")) == (4, 16, 8)  # MLA: qk = nope + rope dims, v its own


def test_a_model_it_cannot_cost_is_cut_as_layers_with_a_warning_naming_what_is_missing():
    config = _config("mixtral", num_hidden_layers=4)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    share = expert_share(config)
    config.num_experts_per_tok = 0  # as a config without top-k (the field cannot be unset)
    with pytest.raises(CostModelError, match="cannot cost the experts of MixtralExperts: the config has no "
                                             "num_experts_per_tok"):
        flop_costs(model, microbatch_size=1, seq_len=8)
    with pytest.warns(UserWarning, match=r"no num_experts_per_tok .*; cutting as pp_balance='layers'"):
        plan = balance_stages(model, 2, resolve_schedule("1f1b"), "auto", seq_len=8)
    assert plan.mode == "layers" and plan.costs is None and _layer_counts(plan.layer_ranges) == [2, 2]
    with pytest.warns(UserWarning, match="cutting as pp_balance='layers'"):
        assert balanced_module_fqns(model, 2, resolve_schedule("1f1b"), "auto", seq_len=8) is None
    assert share(model.model.layers[0].mlp.experts) == 0.5


# ---- never an empty stage ---------------------------------------------------------------------------
@pytest.mark.parametrize("schedule,pp_size,layers,layers_per_stage", [
    ("1f1b", 4, 4, None), ("interleaved_1f1b", 2, 4, None), ("interleaved_1f1b", 2, 8, 1), ("looped_bfs", 2, 8, 2),
    ("interleaved_zero_bubble", 4, 8, 1), ("zbv", 2, 4, None), ("dual_pipe_v", 2, 8, None),
])
@pytest.mark.parametrize("vocab", [64, 32768])
def test_no_stage_is_left_empty(vocab, schedule, pp_size, layers, layers_per_stage):
    model = meta_model(_big_llama(vocab, layers=layers, intermediate=688))
    plan = balance_stages(model, pp_size, resolve_schedule(schedule), "auto", layers_per_stage=layers_per_stage,
                          seq_len=128)
    ranges = plan.layer_ranges
    assert [i for r in ranges for i in r] == list(range(layers))  # each layer once, in order
    assert all(len(r) >= 1 for r in ranges[1:-1]), _layer_counts(ranges)  # every middle stage runs a layer
    assert all(f.params_held > 0 for f in stage_facts(model, plan.fqns_per_stage))  # the ends hold embeddings / head
    validate_stage_fqns(model, plan.fqns_per_stage)


# ---- the default, and where it behaves as "layers" ---------------------------------------------------
def test_auto_is_the_default_everywhere(tmp_path):
    assert DEFAULT_BALANCE == "auto" and BALANCE_MODES[0] == "auto"
    assert PipelineTrainingArguments(output_dir=str(tmp_path), report_to="none").pp_balance == "auto"
    assert inspect.signature(AutoPipeline).parameters["pp_balance"].default == "auto"
    assert inspect.signature(plan_pipeline).parameters["balance"].default == "auto"
    # The command line keeps its own copy (so --help imports no torch): the same modes, the same default.
    assert (cli.BALANCE_MODES, cli.DEFAULT_BALANCE) == (BALANCE_MODES, DEFAULT_BALANCE)


UNEVEN = [["model.embed_tokens", "model.layers.0", "model.layers.1", "model.layers.2", "model.rotary_emb"],
          ["model.layers.3", "model.norm", "lm_head", "model.rotary_emb"]]


def test_an_explicit_plan_with_the_default_balance_is_used_as_given(tmp_path):
    check_balance_options(DEFAULT_BALANCE, UNEVEN)  # never refused
    plan = plan_pipeline(tiny_llama(), 2, module_fqns_per_model_part=UNEVEN)
    assert plan.fqns_per_stage == UNEVEN and plan.balance is None
    args = PipelineTrainingArguments(output_dir=str(tmp_path), pp_size=2, per_device_train_batch_size=2, report_to="none")
    # PipelineTrainer's checks: all pass (the plan with the default pp_balance among them) up to the last one,
    # which sees that this one process is no launch of two.
    with pytest.raises(PipelineConfigError, match="2 processes were launched"):
        validate_pipeline_setup(tiny_llama(), args, {}, world_size=2, module_fqns_per_model_part=UNEVEN)
    with pytest.raises(PipelineConfigError, match="pp_balance='params' computes the stage plan itself"):
        validate_pipeline_setup(tiny_llama(), PipelineTrainingArguments(
            output_dir=str(tmp_path), pp_size=2, per_device_train_batch_size=2, report_to="none", pp_balance="params",
        ), {}, world_size=2, module_fqns_per_model_part=UNEVEN)


def test_models_without_a_plan_get_the_layers_behaviour():
    spec = resolve_schedule("1f1b")
    assert balanced_module_fqns(torch.nn.Sequential(torch.nn.Linear(2, 2)), 2, spec, "auto") is None
    model = tiny_llama()
    model.config.base_model_pp_plan = None  # an architecture transformers ships no pipeline plan for
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: "layers" would ask for the plan the same way
        assert balanced_module_fqns(model, 2, spec, "auto") is None


# ---- the sequence length, and the same answer on every rank ------------------------------------------
def test_sequence_length_and_the_answer_are_the_same_wherever_they_are_computed():
    meta = meta_model(_big_llama(32768, seq=256))
    assert estimate_seq_len(meta) == 256 and estimate_seq_len(meta, 64) == 64
    assert estimate_seq_len(meta, 4096) == 256  # an estimate caps the length instead of refusing it
    with pytest.raises(PipelineConfigError, match="pp_balance_seq_len must be at least 1"):
        estimate_seq_len(meta, 0)
    # A collator that draws random numbers: the first batch's length is still the same, and training's
    # random stream is left alone, so every rank (same data, same collator) computes the same length.
    def masking_collator(features):
        batch = pad_collator(features)
        batch["input_ids"] = batch["input_ids"].masked_fill(torch.rand(batch["input_ids"].shape) < 0.1, 3)
        return batch

    state = torch.random.get_rng_state()
    lengths = {first_batch_seq_len(CountingDataset(), masking_collator, 4) for _ in range(3)}
    assert lengths == {max(len(CountingDataset()[i]["input_ids"]) for i in range(4))}
    assert torch.equal(torch.random.get_rng_state(), state)
    # The costs are arithmetic on shapes: a meta model and a real one, computed twice, agree bit for bit.
    torch.manual_seed(0)
    real = AutoModelForCausalLM.from_config(_big_llama(1024, layers=2, seq=256))
    small = meta_model(_big_llama(1024, layers=2, seq=256))
    assert flop_costs(real, microbatch_size=2, seq_len=64) == flop_costs(small, microbatch_size=2, seq_len=64) \
        == flop_costs(small, microbatch_size=2, seq_len=64)


# ---- the planner shows both ------------------------------------------------------------------------
def test_planner_prints_the_auto_estimate_next_to_the_even_split(tmp_path, capsys):
    config = tmp_path / "big_vocab.json"
    config.write_text(json.dumps({"model_type": "llama", **_big_llama(32768).to_diff_dict()}))
    assert cli.main(["plan", str(config), "--pp-size", "2", "--seq-len", "128", "--out", str(tmp_path / "a.png")]) == 0
    text = capsys.readouterr().out
    assert "pp_balance=auto: estimated forward+backward FLOPs per microbatch per stage (1 x 128 tokens" in text
    assert "stage 0: 8 layers" in text and "(with layers spread evenly: 4 layers" in text
    assert "slowest stage" in text and "with layers spread evenly" in text and "(stage 1)" in text and "% less)" in text
    assert cli.main(["plan", str(config), "--pp-size", "2", "--seq-len", "128", "--balance", "layers",
                     "--out", str(tmp_path / "l.png")]) == 0
    text = capsys.readouterr().out
    assert "pp_balance=layers: estimated forward+backward FLOPs per microbatch per stage, as pp_balance=auto" in text
    assert "stage 0: 4 layers" in text and "(with pp_balance=auto: 8 layers" in text and "% more)" in text


@pytest.mark.parametrize("kind", ["sequence", "token", "gpt2 token"])
def test_classifier_heads_are_costed_and_stay_on_the_last_stage(kind):
    from test_classifiers import tiny_classifier, tiny_token_classifier

    model = {"sequence": lambda: tiny_classifier("single_label_classification"), "token": tiny_token_classifier,
             "gpt2 token": lambda: tiny_token_classifier("gpt2")}[kind]()
    work = plan_work(model, microbatch_size=1, seq_len=16)
    head = "score" if hasattr(model, "score") else "classifier"
    assert work.last.flops == 6 * 16 * getattr(model, head).weight.numel()  # its matmul, trainable
    plan = balance_stages(model, 2, resolve_schedule("1f1b"), "auto", seq_len=16)
    assert head in plan.fqns_per_stage[-1] and _layer_counts(plan.layer_ranges) == [2, 2]

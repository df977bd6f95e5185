"""The architectures registry and the parity sweep over every planned Hugging Face causal LM.

The sweep enumerates model types at test time (tests/helpers/hf_models.py), checks
each split in one process (fast), then trains every model that passed under
the real 1F1B schedule on gloo ranks, pp=2 and pp=4, in ONE process group per
pp size. With HF_PP_WRITE_DOCS=1 (`make docs`) it writes docs/architectures.md (architecture -> pass / why not);
otherwise it fails when any row differs from that committed table (a lost pass, even one hidden by a new one).
"""

import os
import re
import time
import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlavaConfig, OPTConfig, T5Config

from helpers.distributed import run_distributed
from helpers.hf_models import sweep_model_types, tiny_config, tiny_llava, tiny_model, tiny_t5
from helpers.hf_parity import schedule_parity_worker, schedule_step_parity, sequential_parity
from hf_pp.architectures import check_support, module_fqns_per_stage, stage_layout
from hf_pp.errors import PipelineConfigError
from hf_pp.functional import plan_stage_fqns
from hf_pp.hf_patching import patch_hf_model_for_pp
from hf_pp.schedules import resolve_schedule

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs", "architectures.md")
README = os.path.join(os.path.dirname(__file__), "..", "README.md")
MIN_OWN_PLAN_PASSING = 5  # popular causal LMs whose config has no base_model_pp_plan
OWN_PLAN_PASS = "pass (own plan)"


def test_encoder_decoder_and_audio_models_are_refused_by_name_and_vlms_supported():
    assert check_support(T5Config()).reason.startswith("T5Config is an encoder-decoder model")
    assert check_support(LlavaConfig()).supported and check_support(tiny_llava()).supported
    info = check_support(tiny_config("phi4_multimodal"))
    assert not info.supported and "Phi4MultimodalConfig also takes audio (audio_config)" in info.reason


@pytest.mark.parametrize("build, words", [
    (tiny_t5, "T5ForConditionalGeneration is an encoder-decoder model"),
])
def test_unsupported_models_are_refused_by_name_before_layer_counts(build, words):
    model = build()  # 2 decoder layers: 4 stages would otherwise fail on the layer count first
    with pytest.raises(PipelineConfigError, match=words):
        plan_stage_fqns(model, 4, resolve_schedule("1f1b"))
    with pytest.raises(PipelineConfigError, match=words):
        plan_stage_fqns(model, 2, resolve_schedule("interleaved_1f1b"))


def test_gemma4_unified_kv_sharing_across_layers_is_refused_with_its_reason():
    assert check_support(tiny_config("gemma4_unified_text")).supported  # num_kv_shared_layers=0
    info = check_support(tiny_config("gemma4_unified_text", num_kv_shared_layers=2))
    assert not info.supported and "num_kv_shared_layers > 0" in info.reason and "shared_kv_states" in info.reason


def test_model_without_plan_asks_for_explicit_fqns():
    info = check_support(OPTConfig())
    assert not info.supported and "module_fqns_per_model_part" in info.reason


def test_more_stages_than_layers_is_refused():
    model = tiny_model("llama")
    with pytest.raises(PipelineConfigError, match="5 pipeline stages but LlamaForCausalLM has only 4"):
        module_fqns_per_stage(model, 5)


def test_plan_puts_embeddings_first_head_last_rotary_everywhere():
    fqns = module_fqns_per_stage(tiny_model("llama"), 4)
    assert fqns[0] == ["model.embed_tokens", "model.layers.0", "model.rotary_emb"]
    assert fqns[1] == ["model.layers.1", "model.rotary_emb"]
    assert fqns[3] == ["model.layers.3", "model.norm", "lm_head", "model.rotary_emb"]
    assert stage_layout(tiny_model("gpt2")).layers == "h"  # a plan of our own


def test_use_cache_is_turned_off_with_a_warning():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, use_cache=True))
    with pytest.warns(UserWarning, match="use_cache=True is not supported"):
        patch_hf_model_for_pp(model, patch_inner_model=True, patch_causal_lm_model=True)
    assert model.config.use_cache is False
    with pytest.raises(PipelineConfigError, match="KV cache"):
        model(torch.tensor([[1, 2]]), cache=object())


# Uneven on purpose: the model's own plan would give two layers to each stage.
UNEVEN_LLAMA = [
    ["model.embed_tokens", "model.rotary_emb", "model.layers.0", "model.layers.1", "model.layers.2"],
    ["model.rotary_emb", "model.layers.3", "model.norm", "lm_head"],
]


def _uneven_llama_worker(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("pp",))
    reason, parts = schedule_step_parity(mesh, "llama", UNEVEN_LLAMA)
    layers = sorted({name.split(".")[2] for part in parts for name, _ in part.named_parameters()
                     if name.startswith("model.layers.")})
    return reason, layers


def test_explicit_module_fqns_override_splits_hf_model_and_matches_unsplit():
    model = tiny_model("llama")
    fqns, ranks = plan_stage_fqns(model, 2, resolve_schedule("1f1b"), module_fqns_per_model_part=UNEVEN_LLAMA)
    assert fqns == UNEVEN_LLAMA and ranks == [(0,), (1,)]
    assert run_distributed(_uneven_llama_worker, 2, timeout_s=600) == [(None, ["0", "1", "2"]), (None, ["3"])]


def _cell(result: str) -> str:
    """A result as one table cell (no pipes, no line breaks)."""
    return " ".join(result.replace("|", "/").split())


def _table_lines(rows: dict[str, str]) -> list[str]:
    """docs/architectures.md for these sweep results."""
    passing = sum(r.startswith("pass") for r in rows.values())
    own = sum(r == OWN_PLAN_PASS for r in rows.values())
    lines = [
        "# Supported architectures",
        "",
        "Generated by `tests/test_architectures.py::test_every_planned_architecture_matches_unsplit_under_1f1b`:",
        "every causal-LM model type of the installed transformers whose config has a `base_model_pp_plan`,",
        "plus those hf_pp has plans of its own for (marked *own plan*). **pass** = under the real 1F1B schedule",
        "on gloo ranks, pp=2 and pp=4, the loss and every parameter gradient equal the unsplit model",
        "(fp32, rtol 1e-4, atol 1e-5, right padding in the attention mask).",
        "",
        f"{passing} of {len(rows)} pass ({own} with plans of hf_pp's own); every other one is refused by",
        "`hf_pp.architectures.check_support` with the reason shown. Regenerate with `make docs`; the sweep fails",
        "when its results differ from this table.",
        "",
        "Mixture-of-experts routers: the pipelined forward returns logits only, so the router auxiliary",
        "(load-balancing) loss cannot be added on the last stage. `PipelineTrainer` refuses a model whose own",
        "forward would add it under `Trainer` (`config.output_router_logits=True` and a non-zero",
        "`router_aux_loss_coef`); with `output_router_logits=False` the routers learn through the language-model",
        "loss. The sweep compares against the unsplit model with `output_router_logits=False`. Tied input/output",
        "embeddings are supported (see `hf_pp.tied`).",
        "",
        "| architecture | result |",
        "|---|---|",
    ]
    return lines + [f"| {mt} | {_cell(r)} |" for mt, r in rows.items()]


def _write_table(rows: dict[str, str], seconds: float) -> None:
    passing = sum(r.startswith("pass") for r in rows.values())
    print(f"architecture sweep: {passing} of {len(rows)} pass in {seconds:.0f} s")
    if os.environ.get("HF_PP_WRITE_DOCS"):  # `make docs`; a plain test run leaves the tree clean
        with open(DOCS, "w") as f:
            f.write("\n".join(_table_lines(rows)) + "\n")


def documented_rows(path: str = DOCS) -> dict[str, str]:
    """``{architecture: result}`` of the table in the committed docs/architectures.md, in its order."""
    with open(path) as f:
        cells = [[c.strip() for c in line.strip()[1:-1].split("|")] for line in f if line.startswith("| ")]
    return {mt: result for mt, result in cells[1:]}  # cells[0] is the header


def table_differences(rows: dict[str, str], documented: dict[str, str]) -> list[str]:
    """How the sweep's results differ from the documented table, lost passes first; empty when they agree."""
    now = {mt: _cell(r) for mt, r in rows.items()}
    lost = [mt for mt, r in documented.items() if r.startswith("pass") and not now.get(mt, "").startswith("pass")]
    differences = [f"{mt} no longer passes: {now.get(mt, 'no longer swept')}" for mt in lost]
    differences += [f"{mt} is {now[mt]!r}, documented {documented.get(mt, 'nowhere')!r}"
                    for mt in now if mt not in lost and now[mt] != documented.get(mt)]
    differences += [f"{mt} is documented but no longer swept" for mt in documented if mt not in now and mt not in lost]
    return differences


def test_architectures_doc_is_what_the_sweep_writes_and_readme_repeats_its_count():
    # The summary line and prose come from the table itself: a hand edit of the count shows here, fast.
    documented = documented_rows()
    with open(DOCS) as f:
        written = f.read().splitlines()
    assert written == _table_lines(documented), "docs/architectures.md was edited by hand: run `make docs`"
    passing = sum(r.startswith("pass") for r in documented.values())
    with open(README) as f:
        claims = re.findall(r"\*\*(\d+) of (\d+) pass\*\*", f.read())
    documented_claim = (str(passing), str(len(documented)))
    assert claims == [documented_claim], f"README.md claims {claims} (N of M pass), the doc {documented_claim}"


def test_table_differences_catch_a_lost_pass_hidden_by_a_new_one():
    documented = {"a": "pass", "b": "pass", "c": "unsupported: why"}
    swapped = {"a": "pass", "b": "1F1B pp=2: loss | differs", "c": "pass"}  # same count, another set
    assert table_differences(swapped, documented) == [
        "b no longer passes: 1F1B pp=2: loss / differs", "c is 'pass', documented 'unsupported: why'",
    ]
    assert table_differences({"a": "pass"}, documented) == [
        "b no longer passes: no longer swept", "c is documented but no longer swept",
    ]
    assert table_differences(dict(documented), documented) == []


@pytest.mark.slow
def test_every_planned_architecture_matches_unsplit_under_1f1b():
    start = time.time()
    from hf_pp.architectures import OWN_PLANS

    documented = documented_rows()  # the committed table, read before `make docs` rewrites it
    rows: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mt in sweep_model_types():
            reason = sequential_parity(mt, 2) or sequential_parity(mt, 4)
            rows[mt] = "pass" if reason is None else reason
    candidates = [mt for mt, r in rows.items() if r == "pass"]
    for pp in (2, 4):
        per_rank = run_distributed(schedule_parity_worker, pp, candidates, timeout_s=900)
        for mt in candidates:
            reasons = [r[mt] for r in per_rank if r[mt] is not None]
            if reasons:
                rows[mt] = f"1F1B pp={pp}: {reasons[0]}"
    for mt in rows:
        if mt in OWN_PLANS and rows[mt] == "pass":
            rows[mt] = OWN_PLAN_PASS
    _write_table(rows, time.time() - start)
    passing = [mt for mt, r in rows.items() if r.startswith("pass")]
    documented_passing = [mt for mt, r in documented.items() if r.startswith("pass")]
    # The documented count is the floor, and the very same architectures must pass: a regression hidden by a
    # new pass elsewhere is caught too. `make docs` records an intended change (review its diff) instead.
    differences = table_differences(rows, documented)
    if os.environ.get("HF_PP_WRITE_DOCS"):
        print("\n".join(["changes to docs/architectures.md:"] + differences) if differences else "no changes")
    else:
        assert len(passing) >= len(documented_passing), differences
        heading = "the sweep differs from docs/architectures.md (fix it, or run `make docs` if intended):"
        assert not differences, "\n".join([heading] + differences)
    assert len([mt for mt, r in rows.items() if r == OWN_PLAN_PASS]) >= MIN_OWN_PLAN_PASSING, rows
    assert all(r.strip() for r in rows.values())
    # What passes in one process must pass under the real schedule too.
    assert not [mt for mt, r in rows.items() if r.startswith("1F1B")], rows
    # Every row that does not pass is one the registry refuses, with that very reason: no error, no
    # "loss differs", no unsupported row that check_support would let through.
    unexplained = {}
    for mt, r in rows.items():
        if r.startswith("pass"):
            continue
        info = check_support(tiny_config(mt))
        if info.supported or not info.reason.strip() or r != f"unsupported: {info.reason}":
            unexplained[mt] = r
    assert not unexplained, unexplained

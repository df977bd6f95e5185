"""Settings whose result pipelining would silently change are refused before any process group, exactly
when they would change it: the mixture-of-experts router loss, and save_on_each_node across nodes.

Each run builds the trainer in this one process with ``WORLD_SIZE`` set as torchrun would; a setting that
passes every check meets the last one (this process is not a real launch), which names itself.
"""

import pytest
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification

from helpers.hf_models import tiny_config, tiny_model
from hf_pp import PipelineConfigError, PipelineTrainer, PipelineTrainingArguments
from hf_pp.preflight import check_save_on_each_node
from helpers.trainer_fixtures import tiny_llama

BASE = dict(output_dir="unused", report_to="none", use_cpu=True, pp_size=2, per_device_train_batch_size=2)
PASSED_EVERY_CHECK = "2 processes were launched, but TrainingArguments runs 1"


def _preflight_error(monkeypatch, model, env: dict[str, str] | None = None, trainer_kwargs: dict | None = None,
                     **overrides) -> str:
    """The message PipelineTrainer raises before any process group, as rank 0 of 2 would."""
    args = PipelineTrainingArguments(**BASE, **overrides)  # before WORLD_SIZE: TrainingArguments would launch
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    with pytest.raises(PipelineConfigError) as info:
        PipelineTrainer(model=model, args=args, **(trainer_kwargs or {}))
    return str(info.value)


def _mixtral_lora():
    return get_peft_model(tiny_model("mixtral", output_router_logits=True),
                          LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))


@pytest.mark.parametrize("make_model", [lambda: tiny_model("mixtral", output_router_logits=True), _mixtral_lora],
                         ids=["mixtral", "mixtral_lora"])
def test_moe_router_loss_that_trainer_would_add_is_refused_with_what_to_change(monkeypatch, make_model):
    message = _preflight_error(monkeypatch, make_model())
    assert "MixtralForCausalLM has config.output_router_logits=True and router_aux_loss_coef=0.001" in message, message
    for remedy in ("model.config.output_router_logits=False", "router_aux_loss_coef=0", "pp_size=1"):
        assert remedy in message, (remedy, message)


def _no_loss(logits, labels, num_items_in_batch=None):
    return logits.sum() * 0


def _zero_coef_mixtral():
    model = tiny_model("mixtral", output_router_logits=True)
    model.router_aux_loss_coef = 0.0  # what the forward multiplies by (copied from the config when built)
    return model


# Trainer adds no router loss term in any of these, so pipelining loses nothing.
ACCEPTED = {
    "output_router_logits_false": (lambda: tiny_model("mixtral", output_router_logits=False), {}, {}),
    "coef_zero_in_config": (lambda: tiny_model("mixtral", output_router_logits=True, router_aux_loss_coef=0.0), {}, {}),
    "coef_zero_on_model": (_zero_coef_mixtral, {}, {}),
    # Trainer pops the labels for these and computes the loss from the logits itself.
    "compute_loss_func": (lambda: tiny_model("mixtral", output_router_logits=True), {},
                          dict(compute_loss_func=_no_loss)),
    "label_smoothing": (lambda: tiny_model("mixtral", output_router_logits=True), dict(label_smoothing_factor=0.1), {}),
    # The classifier heads never add the router loss to theirs.
    "sequence_classifier": (lambda: AutoModelForSequenceClassification.from_config(
        tiny_config("mixtral", output_router_logits=True, num_labels=2)), {}, {}),
    # DeepSeek-V3's causal LM ignores output_router_logits.
    "moe_without_router_loss": (lambda: tiny_model("deepseek_v3", output_router_logits=True), {}, {}),
}


@pytest.mark.parametrize("name", ACCEPTED)
def test_moe_without_a_router_loss_term_is_accepted(monkeypatch, name):
    make_model, overrides, trainer_kwargs = ACCEPTED[name]
    message = _preflight_error(monkeypatch, make_model(), trainer_kwargs=trainer_kwargs, **overrides)
    assert PASSED_EVERY_CHECK in message, message


@pytest.mark.parametrize("env, words", [
    ({"LOCAL_WORLD_SIZE": "1"}, "LOCAL_WORLD_SIZE=1 < WORLD_SIZE=2: the ranks span several nodes"),
    ({}, "LOCAL_WORLD_SIZE is not set"),
], ids=["two_nodes", "unknown_nodes"])
def test_save_on_each_node_across_nodes_is_refused_with_what_to_change(monkeypatch, env, words):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    message = _preflight_error(monkeypatch, tiny_llama(), env=env, save_on_each_node=True)
    assert message.startswith("save_on_each_node=True with pp_size=2") and words in message, message
    assert "Set save_on_each_node=False" in message, message


def test_save_on_each_node_on_one_node_is_accepted(monkeypatch):
    default = PipelineTrainingArguments(**BASE)
    message = _preflight_error(monkeypatch, tiny_llama(), env={"LOCAL_WORLD_SIZE": "2"}, save_on_each_node=True)
    assert PASSED_EVERY_CHECK in message, message
    check_save_on_each_node(default, 8, local_world_size=1)  # the default never looks at the nodes

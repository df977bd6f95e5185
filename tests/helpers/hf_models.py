"""Tiny Hugging Face causal LMs built from configs (no weights are downloaded).

:func:`sweep_model_types` enumerates, at test time, every causal-LM model type
of the installed transformers whose config has a ``base_model_pp_plan``,
plus the model types hf_pp has plans of its own for. :func:`tiny_config`
shrinks a model type's default config to a few thousand parameters.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from hf_pp.architectures import OWN_PLANS

__all__ = ["sweep_model_types", "tiny_config", "tiny_model", "tiny_batch", "tiny_t5", "tiny_llava", "TIED_MODEL_TYPES"]

VOCAB, HIDDEN, LAYERS = 96, 32, 4
# Model types whose tied-embedding variant the tied-gradient tests train.
TIED_MODEL_TYPES = ["llama", "qwen2", "gemma"]

# Set only where the default config has the attribute; sizes keep every shape consistent
# (4 heads x head_dim 8 = hidden 32, GQA with 2 KV heads, 4 experts of which 2 are routed per token).
_SMALL = dict(
    vocab_size=VOCAB, hidden_size=HIDDEN, n_embd=HIDDEN, d_model=HIDDEN, intermediate_size=64, ffn_hidden_size=64,
    n_inner=64, num_hidden_layers=LAYERS, n_layer=LAYERS, num_layers=LAYERS,
    num_attention_heads=4, n_head=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
    n_positions=64, moe_intermediate_size=32, shared_expert_intermediate_size=32, expert_intermediate_size=32,
    num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, num_experts_per_token=2, moe_topk=2, n_shared_experts=1,
    kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, qk_head_dim=16, v_head_dim=8,
    first_k_dense_replace=1, n_group=1, topk_group=1, sliding_window=5, rotary_dim=8,
    linear_num_heads=2, linear_head_dim=8, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
    linear_num_value_heads=2, router_jitter_noise=0.0, input_jitter_noise=0.0,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, use_cache=False, output_router_logits=False,
    tie_word_embeddings=False,
)
# Quirk values far from 1 (and a soft-cap close to the logits' size), so a missed quirk shows in the numbers.
_QUIRK_VALUES = dict(embedding_multiplier=3.0, logits_scaling=4.0, logit_scale=0.5, final_logit_softcapping=0.05)
# Default configs that cannot build a model at all, and what they lack.
_BUILDABLE = {
    # rope_parameters defaults to {} but the rotary module reads one entry per layer type (M-RoPE sections
    # summing to head_dim / 2); mixed layer types so the sliding-window mask is exercised as well.
    "cohere_compass_text": dict(
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0, "mrope_section": [2, 1, 1]},
        },
    ),
}


def sweep_model_types() -> list[str]:
    """Causal-LM model types with a config plan, then those with a plan of hf_pp's own."""
    planned = [
        mt for mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        if mt in CONFIG_MAPPING and getattr(CONFIG_MAPPING[mt], "base_model_pp_plan", None)
    ]
    own = [mt for mt in OWN_PLANS if mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in planned]
    return planned + own


def tiny_config(model_type: str, **overrides):
    """A tiny, dropout-free, cache-free config of ``model_type`` (eager attention, fp32)."""
    cls = CONFIG_MAPPING[model_type]
    known = cls().to_dict()  # hasattr() raises on per-layer attributes of heterogeneous configs
    kwargs = {k: v for k, v in {**_SMALL, **_QUIRK_VALUES}.items() if k in known}
    # Configs that store a setting under their own name (attribute_map, e.g. n_group -> num_expert_group)
    # get it there, unless that name is set directly.
    aliases = getattr(cls, "attribute_map", None) or {}
    for key, value in {**_SMALL, **_QUIRK_VALUES}.items():
        target = aliases.get(key)
        if key not in known and target in known and target not in kwargs:
            kwargs[target] = value
    if known.get("kv_lora_rank"):  # multi-head latent attention keeps one KV head per query head
        kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
    for key, value in known.items():
        # Dropout would make the split and unsplit runs draw different random masks.
        if isinstance(value, float) and ("dropout" in key or "pdrop" in key):
            kwargs[key] = 0.0
    kwargs.update(_BUILDABLE.get(model_type, {}))
    kwargs.update(overrides)
    config = cls(**kwargs)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and len(layer_types) != LAYERS:
        config.layer_types = list(layer_types[:LAYERS])
    config._attn_implementation = "eager"
    return config


def tiny_model(model_type: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A fp32 ``AutoModelForCausalLM`` from :func:`tiny_config`, identically initialised for a seed."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), attn_implementation="eager")
    return model.float().train()


def tiny_batch(batch: int = 4, seq: int = 10, seed: int = 1, vocab: int = VOCAB):
    """``(input_ids, attention_mask, labels)`` with right padding in half of the rows."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (batch, seq), generator=g)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(0, batch, 2):
        attention_mask[row, seq - 2 - row % 4 :] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return input_ids, attention_mask, labels


def tiny_t5() -> torch.nn.Module:
    """A 2-layer T5 (encoder-decoder), for the refusals."""
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=2,
                                               num_decoder_layers=2, num_heads=4))


def tiny_llava() -> torch.nn.Module:
    """A Llava (vision-language) with a 2-layer Llama text model and a 1-layer CLIP vision tower."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    text = tiny_config("llama", num_hidden_layers=2)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=8, patch_size=4)
    return LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision, image_token_index=VOCAB - 1))

"""The numbers the memory estimate needs, read from a model built on the meta device (no weights
are allocated or downloaded; a hub model needs only its config.json)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ModelShape:
    params: int
    """All parameters (shared ones once, adapters included), logical sizes (4-bit weights count as
    their matrix)."""
    trainable: int
    """Parameters that get gradients and optimizer states under the chosen tuning."""
    quantizable: int
    """Linear weights a 4-bit load quantizes (all linear layers but the output head)."""
    embedding: int
    """Input embedding parameters."""
    largest_layer: int
    """Parameters of the biggest repeated block (what FSDP / ZeRO-3 gather at once)."""
    largest_module: int
    """Parameters held directly by one module, the largest (usually the embedding or the LM head):
    ZeRO-3 gathers a module's parameters whole, the way DeepSpeed's estimator counts."""
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    expert_block: int = 0
    """Routed-expert parameters of the biggest block (MoE: the fused 3-D expert weights), which
    expert parallelism splits over its ranks."""


def model_config(cfg):
    """The transformers config of the model the run would train (the tiny default or a HF model)."""
    if cfg.model.name_or_path:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(
            cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code
        )
    from transformers import LlamaConfig

    from distft.models.tiny import build_tokenizer

    m = cfg.model
    return LlamaConfig(
        vocab_size=len(build_tokenizer()),
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads,
        max_position_embeddings=m.max_position_embeddings,
        tie_word_embeddings=True,
    )


def _meta_model(cfg, config):
    from transformers import AutoModelForCausalLM

    from distft.methods import METHODS

    auto = getattr(METHODS.get(cfg.method.name), "auto_class", None) or AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(config, trust_remote_code=cfg.model.trust_remote_code)


def _trainable_after_tuning(cfg, model) -> int | None:
    """Apply the tuning transform to the meta model to count what it trains (None if it cannot
    run on the meta device)."""
    from distft.tuning import TUNINGS

    tuning = TUNINGS[cfg.tuning.name]
    if not tuning.adapter:
        return sum(p.numel() for p in _unique(model) if p.requires_grad)
    try:
        with torch.device("meta"):
            tuned = tuning.apply(model, cfg)
        return sum(p.numel() for p in _unique(tuned) if p.requires_grad)
    except Exception:  # noqa: BLE001 - a transform that needs real weights: fall back to LoRA's count
        return None


def _unique(model) -> list[torch.nn.Parameter]:
    seen, out = set(), []
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _lora_count(model, r: int, head) -> int:
    return sum(
        r * (m.in_features + m.out_features)
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and m is not head
    )


def model_shape(cfg) -> ModelShape:
    from distft.models.layers import decoder_layers

    config = model_config(cfg)
    model = _meta_model(cfg, config)
    params = _unique(model)
    total = sum(p.numel() for p in params)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head else None
    embed = model.get_input_embeddings()
    quantizable = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head
    )
    blocks = decoder_layers(model)
    largest, expert_block = max(
        ((sum(p.numel() for p in b.parameters()), routed_experts(b)) for b in blocks), default=(total, 0)
    )
    largest_module = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    trainable = _trainable_after_tuning(cfg, model)
    if trainable is None:
        trainable = _lora_count(model, getattr(cfg.tuning, "r", 8), head)
    from distft.tuning import TUNINGS

    if TUNINGS[cfg.tuning.name].adapter:
        total += trainable  # adapters add their own parameters to the frozen base
    heads = int(config.num_attention_heads)
    return ModelShape(
        params=total,
        trainable=trainable,
        quantizable=quantizable,
        embedding=embed.weight.numel() if embed is not None else 0,
        largest_layer=largest,
        largest_module=largest_module,
        layers=int(config.num_hidden_layers),
        hidden=int(config.hidden_size),
        intermediate=int(getattr(config, "intermediate_size", 4 * config.hidden_size)),
        heads=heads,
        kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        vocab=int(config.vocab_size),
        expert_block=expert_block,
    )


def routed_experts(block: torch.nn.Module) -> int:
    """Parameters of a block's routed experts: transformers 5 keeps them as 3-D tensors (one row
    per expert) in an `experts` module; a shared expert is an ordinary MLP."""
    return sum(p.numel() for n, p in block.named_parameters() if p.dim() == 3 and ".experts." in f".{n}")

"""Where the prunable Linear layers live in each supported architecture.

Adding an architecture means adding an entry to `ARCHITECTURES` (and a test case), nothing else. Module names are
relative to one layer of the `nn.ModuleList` named by `layers`, and are matched exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .modeling_blockprune import base_model_type


@dataclass(frozen=True)
class AttentionSpec:
    """Names of one attention block's projections, relative to its layer, and how generation caches it.

    Args:
        query (`str`), key (`str`), value (`str`), output (`str`): the projections' module paths in the layer.
        sets_cache_length (`bool`, *optional*, defaults to `False`):
            Its keys and values are cached at generation and the cache reads the sequence length from them (a
            decoder's self-attention). With no head left its cached keys are empty, transformers' cache then reports
            length 0 and positions restart at every step, so compaction keeps one zero placeholder head instead.
            BART's cross-attention caches the encoder's keys but never gives the length: it may lose every head.
    """

    query: str
    key: str
    value: str
    output: str
    sets_cache_length: bool = False

    def paths(self) -> dict[str, str]:
        """`{"query": ..., "key": ..., "value": ..., "output": ...}`: the projections' paths by role."""
        return {"query": self.query, "key": self.key, "value": self.value, "output": self.output}


@dataclass(frozen=True)
class FFNSpec:
    """Names of the FFN input (hidden -> intermediate) and output (intermediate -> hidden) projections."""

    input: str
    output: str


@dataclass(frozen=True)
class LayerStackSpec:
    """One stack of identical layers: the path suffix of its `nn.ModuleList` and what each layer holds."""

    layers: str
    attentions: tuple[AttentionSpec, ...]
    ffn: FFNSpec | None
    num_heads_attribute: str = "num_attention_heads"


_BERT_LIKE = (
    LayerStackSpec(
        layers="encoder.layer",
        attentions=(
            AttentionSpec(
                "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"
            ),
        ),
        ffn=FFNSpec("intermediate.dense", "output.dense"),
    ),
)

_BART_SELF = AttentionSpec("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
_BART_DECODER_SELF = AttentionSpec(*_BART_SELF.paths().values(), sets_cache_length=True)
_BART_CROSS = AttentionSpec(
    "encoder_attn.q_proj", "encoder_attn.k_proj", "encoder_attn.v_proj", "encoder_attn.out_proj"
)

ARCHITECTURES: dict[str, tuple[LayerStackSpec, ...]] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "distilbert": (
        LayerStackSpec(
            layers="transformer.layer",
            attentions=(AttentionSpec("attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin"),),
            ffn=FFNSpec("ffn.lin1", "ffn.lin2"),
            num_heads_attribute="n_heads",
        ),
    ),
    "bart": (
        LayerStackSpec(
            layers="encoder.layers",
            attentions=(_BART_SELF,),
            ffn=FFNSpec("fc1", "fc2"),
            num_heads_attribute="encoder_attention_heads",
        ),
        LayerStackSpec(
            layers="decoder.layers",
            attentions=(_BART_DECODER_SELF, _BART_CROSS),
            ffn=FFNSpec("fc1", "fc2"),
            num_heads_attribute="decoder_attention_heads",
        ),
    ),
}


def stack_specs(model: nn.Module, config) -> tuple[LayerStackSpec, ...]:
    """Return the layer stacks to prune in `model`: the user's patterns from `config`, else the built-in map.

    An attention named by patterns is taken to set the KV-cache length when the model can generate (its placeholder
    head, if it loses every head, is exact either way).

    Raises:
        `ValueError`: the model type has no built-in map and the config names no modules.
    """
    if config.layers_pattern is not None:
        attention = ()
        if config.attention_modules is not None:
            attention = (AttentionSpec(*config.attention_modules, sets_cache_length=can_generate(model)),)
        ffn = None if config.ffn_modules is None else FFNSpec(*config.ffn_modules)
        return (LayerStackSpec(config.layers_pattern, attention, ffn, config.num_heads_attribute),)
    model_type = base_model_type(getattr(getattr(model, "config", None), "model_type", None))
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"hf_blockprune has no module map for model_type {model_type!r}; supported: {sorted(ARCHITECTURES)}. "
            "For another architecture, pass `layers_pattern` (e.g. 'encoder.layer'), `attention_modules` "
            "(query key value output, relative to a layer) and `ffn_modules` (input output) in BlockPruningConfig."
        )
    return ARCHITECTURES[model_type]


def can_generate(model: nn.Module) -> bool:
    """Whether `model` can `generate()` (transformers' `can_generate`), hence may cache its attention."""
    method = getattr(model, "can_generate", None)
    return bool(method()) if callable(method) else False


def find_layer_lists(model: nn.Module, suffix: str) -> list[tuple[str, nn.ModuleList]]:
    """Return every `nn.ModuleList` in `model` whose dotted name is `suffix` or ends with `.suffix`."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and (name == suffix or name.endswith("." + suffix))
    ]

"""The one description of a transformer layer's structure that every part of hf_blockprune reads.

A layer holds attention blocks (query, key, value and output projections, query and key/value head counts) and a
feed-forward block (one or several input projections combined element-wise, one output projection). Adding an
architecture means adding an entry to `ARCHITECTURES` (and a test case), nothing else; a user's module patterns in
`BlockPruningConfig` build the same description. Module names are relative to one layer of the `nn.ModuleList` named
by `layers`, and are matched exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .modeling_blockprune import base_model_type


@dataclass(frozen=True)
class AttentionSpec:
    """One attention block of a layer: its projections (paths relative to the layer), head counts and cache role.

    Query heads are rows of the query projection and columns of the output projection; key/value heads are rows of
    the key and value projections. With grouped-query attention (`num_kv_heads` fewer than `num_heads`), key/value
    head `g` serves the `num_heads / num_kv_heads` consecutive query heads `g * group ... (g + 1) * group - 1`: a query
    head may be pruned alone, and a key/value head goes when its whole query group has gone.

    Args:
        query (`str`), key (`str`), value (`str`), output (`str`): the projections' module paths in the layer.
        num_heads (`str`, *optional*, defaults to `"num_attention_heads"`):
            The model-config attribute holding the number of query heads.
        num_kv_heads (`str`, *optional*):
            The model-config attribute holding the number of key/value heads (grouped-query attention, e.g.
            `"num_key_value_heads"`); `None`: as many as query heads. The head size is the query projection's output
            size divided by the number of query heads.
        sets_cache_length (`bool`, *optional*, defaults to `False`):
            Its keys and values are cached at generation and the cache reads the sequence length from them (a
            decoder's self-attention). With no keys cached, transformers' cache reports length 0 and positions
            restart at every step: removed, it caches one zero key of size 1 per position (`RemovedAttention`), and
            where it cannot be removed compaction keeps one zero placeholder head. BART's cross-attention caches the
            encoder's keys but never gives the length.
        fused (`str`, *optional*):
            Path of one projection computing query, key and value (GPT-2's `c_attn`, ModernBERT's `Wqkv`), whose
            outputs are the query heads, then the key/value heads' keys, then their values. `query`, `key` and `value`
            are then `<fused>.query`, `<fused>.key`, `<fused>.value`: the parts it is split into while masked (see
            `AttentionSpec.fused_qkv`).
        head_rows (`tuple[str, ...]`, *optional*):
            Other projections with one block of output rows per query head, sliced with the kept heads (DeBERTa-v2's
            `pos_key_proj` / `pos_query_proj`, which project the relative-position embeddings); paths a layer does
            not have are skipped. They are not masked: a pruned head's query, key and value rows are, which removes
            its use of them.
        needs_a_head (`bool`, *optional*, defaults to `False`):
            The attention code divides by its head count (DeBERTa-v2): with no head left it keeps one zero
            placeholder head, as `sets_cache_length` does, unless it is `removable`.
        input_norm (`str`, *optional*):
            A norm whose output only this attention reads (a pre-norm layer's, Llama's `input_layernorm`): removed
            with it (replaced by an `nn.Identity`, whose output nothing reads).
        removable (`bool`, *optional*, defaults to `True`):
            With no head left, compaction replaces the attention module (`module_path`) by a
            `RemovedAttention`, which returns `(constant, None)` as transformers' attention modules do and, if it
            `sets_cache_length`, keeps the cache length; `False` (an attention described by the user's module
            patterns, whose calling convention is not known): it keeps empty projections, or a placeholder head.
    """

    query: str
    key: str
    value: str
    output: str
    sets_cache_length: bool = False
    num_heads: str = "num_attention_heads"
    num_kv_heads: str | None = None
    fused: str | None = None
    head_rows: tuple[str, ...] = ()
    needs_a_head: bool = False
    removable: bool = True
    input_norm: str | None = None

    @classmethod
    def fused_qkv(cls, fused: str, output: str, **kwargs) -> AttentionSpec:
        """The spec of an attention whose query, key and value come out of one projection at path `fused`."""
        return cls(f"{fused}.query", f"{fused}.key", f"{fused}.value", output, fused=fused, **kwargs)

    @property
    def module_path(self) -> str:
        """Path of the attention module itself (holding the head-count attributes): the projections' parent."""
        return (self.fused or self.query).rpartition(".")[0]

    @property
    def keeps_a_head(self) -> bool:
        """Whether compaction keeps one zero placeholder head when every head goes (see `sets_cache_length`)."""
        return not self.removable and (self.sets_cache_length or self.needs_a_head)

    def paths(self) -> dict[str, str]:
        """`{"query": ..., "key": ..., "value": ..., "output": ...}`: the projections' paths by role."""
        return {"query": self.query, "key": self.key, "value": self.value, "output": self.output}

    @property
    def grouped(self) -> bool:
        """Whether key/value heads are counted apart from query heads (grouped-query attention)."""
        return self.num_kv_heads is not None


@dataclass(frozen=True)
class FFNSpec:
    """The feed-forward block of a layer: input projections (hidden -> intermediate) and one output projection.

    Neuron `i` is row `i` of every input projection and column `i` of the output projection. One input is the classic
    FFN (`act(W_1 x) -> W_2`); several inputs are combined element-wise, as in a gated MLP (`act(gate x) * (up x) ->
    down`, Llama).

    Args:
        input (`str` or `tuple[str, ...]`): the input projection path, or the paths of all input projections (the
            gate first).
        output (`str`): the output projection path.
        activation (`str`, *optional*): path of the activation module applied to the (single) input projection's
            output, relative to the layer. Compaction needs it only to fold the constant output of a neuron whose
            input row was masked but whose output column was not (block granularity); `None`: try the paths of
            every built-in entry.
        fused (`str`, *optional*): path of one projection computing every input (ModernBERT's `Wi`), its output cut
            into equal chunks in the order of `input`; the input paths are then `<fused>.<name>`, the parts it is
            split into while masked.
        input_norm (`str`, *optional*): a norm whose output only this FFN reads (Llama's `post_attention_layernorm`),
            removed with it (see `AttentionSpec.input_norm`).
    """

    input: str | tuple[str, ...]
    output: str
    activation: str | None = None
    fused: str | None = None
    input_norm: str | None = None

    @property
    def inputs(self) -> tuple[str, ...]:
        """The input projections' paths (one, or several for a gated MLP)."""
        return (self.input,) if isinstance(self.input, str) else tuple(self.input)


@dataclass(frozen=True)
class LayerStackSpec:
    """One stack of identical layers: the path suffix of its `nn.ModuleList` and what each layer holds.

    Args:
        layers (`str`): the path suffix of the `nn.ModuleList`.
        attentions (`tuple[AttentionSpec, ...]`): the attention blocks of each layer.
        ffn (`FFNSpec`, *optional*): the feed-forward block of each layer.
        droppable (`bool`, *optional*, defaults to `False`): a layer is `x + f(norm(x))` for each sublayer (pre-norm,
            as in Llama and GPT-2), the stack's length is `config.num_hidden_layers` and its code reads the layer index
            only to address the KV cache (and `config.layer_types`): a layer whose sublayers were all removed, adding
            exactly 0, is dropped at compaction and the config gets fewer layers. Post-norm layers (BERT, BART) still
            normalize the stream when empty: they stay.
        index_flags (`tuple[str, ...]`, *optional*): config flags that, when set, make the layer's code depend on its
            index (GPT-2's `scale_attn_by_inverse_layer_idx`): no layer is dropped then.
        position_table (`str`, *optional*): path suffix of a position-embedding table (GPT-2's `wpe`) into which a
            constant that dropped first layers add can be folded (each token reads one row of it, once).
    """

    layers: str
    attentions: tuple[AttentionSpec, ...]
    ffn: FFNSpec | None
    droppable: bool = False
    index_flags: tuple[str, ...] = ()
    position_table: str | None = None


def _bert_like(activation: str = "intermediate.intermediate_act_fn") -> tuple[LayerStackSpec, ...]:
    attention = AttentionSpec(
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"
    )
    return (LayerStackSpec("encoder.layer", (attention,), FFNSpec("intermediate.dense", "output.dense", activation)),)


def _bart_like() -> tuple[LayerStackSpec, ...]:
    def attention(prefix: str, heads: str, sets_cache_length: bool = False) -> AttentionSpec:
        paths = (f"{prefix}.q_proj", f"{prefix}.k_proj", f"{prefix}.v_proj", f"{prefix}.out_proj")
        return AttentionSpec(*paths, sets_cache_length=sets_cache_length, num_heads=heads)

    ffn = FFNSpec("fc1", "fc2", "activation_fn")
    return (
        LayerStackSpec("encoder.layers", (attention("self_attn", "encoder_attention_heads"),), ffn),
        LayerStackSpec(
            "decoder.layers",
            (
                attention("self_attn", "decoder_attention_heads", sets_cache_length=True),
                attention("encoder_attn", "decoder_attention_heads"),
            ),
            ffn,
        ),
    )


def _llama_like() -> tuple[LayerStackSpec, ...]:
    """Decoder layers with grouped-query attention (RoPE, which is per head) and a gated MLP (gate, up -> down)."""
    attention = AttentionSpec(
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        sets_cache_length=True, num_kv_heads="num_key_value_heads", input_norm="input_layernorm",
    )
    ffn = FFNSpec(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", input_norm="post_attention_layernorm")
    return (LayerStackSpec("layers", (attention,), ffn, droppable=True),)


def _deberta_v2() -> tuple[LayerStackSpec, ...]:
    """Disentangled attention: the relative-position projections have head rows, and the code divides by the head
    count (a layer keeps a zero head when it loses every head)."""
    attention = AttentionSpec(
        "attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj", "attention.output.dense",
        head_rows=("attention.self.pos_key_proj", "attention.self.pos_query_proj"), needs_a_head=True,
    )
    ffn = FFNSpec("intermediate.dense", "output.dense", "intermediate.intermediate_act_fn")
    return (LayerStackSpec("encoder.layer", (attention,), ffn),)


def _gpt2() -> tuple[LayerStackSpec, ...]:
    """`Conv1D` projections (weights stored transposed) and a fused `c_attn` (query, key, value)."""
    attention = AttentionSpec.fused_qkv("attn.c_attn", "attn.c_proj", sets_cache_length=True, input_norm="ln_1")
    ffn = FFNSpec("mlp.c_fc", "mlp.c_proj", "mlp.act", input_norm="ln_2")
    return (LayerStackSpec("h", (attention,), ffn, droppable=True,
                           index_flags=("scale_attn_by_inverse_layer_idx",), position_table="wpe"),)


def _modernbert() -> tuple[LayerStackSpec, ...]:
    """A fused `Wqkv` and a GLU whose one input projection `Wi` gives `act(input) * gate`."""
    attention = AttentionSpec.fused_qkv("attn.Wqkv", "attn.Wo", input_norm="attn_norm")
    ffn = FFNSpec(("mlp.Wi.input", "mlp.Wi.gate"), "mlp.Wo", "mlp.act", fused="mlp.Wi", input_norm="mlp_norm")
    return (LayerStackSpec("layers", (attention,), ffn),)


# One entry per model type (`config.model_type`). Each family's knowledge lives here and nowhere else: everything
# downstream (scores, FLOPs, compaction, the card, the saved loader) reads these descriptions.
ARCHITECTURES: dict[str, tuple[LayerStackSpec, ...]] = {
    "bert": _bert_like(),
    "roberta": _bert_like(),
    "xlm-roberta": _bert_like(),
    "electra": _bert_like(),
    "distilbert": (
        LayerStackSpec(
            layers="transformer.layer",
            attentions=(
                AttentionSpec(
                    "attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin", num_heads="n_heads"
                ),
            ),
            ffn=FFNSpec("ffn.lin1", "ffn.lin2", "ffn.activation"),
        ),
    ),
    "bart": _bart_like(),
    "deberta-v2": _deberta_v2(),
    "gpt2": _gpt2(),
    "modernbert": _modernbert(),
    "llama": _llama_like(),
    "mistral": _llama_like(),
    "qwen2": _llama_like(),
}


@dataclass(frozen=True)
class StreamSpec:
    """What carries an architecture's residual stream (the hidden size) besides the layers' projections.

    Every layer reads the stream through its attention's query, key and value projections and its FFN's input
    projections, and writes it through their output projections (the `LayerStackSpec`). Besides those, the stream
    runs through embedding tables (one column per channel) and norms; hidden-size pruning masks the norms so that
    they normalize over the kept channels only, which is what the compacted model computes. What reads the stream
    outside the layers (a pooler, a task head, an LM head) is found by a probe forward pass
    (`hf_blockprune.structure.stream`), not listed here.

    Args:
        embeddings (`tuple[str, ...]`): path suffixes of the `nn.Embedding` tables whose width is the stream (word,
            position, token type), matched like `LayerStackSpec.layers`.
        layer_norms (`tuple[str, ...]`): norms of a layer that read the stream, relative to the layer (one tuple for
            every stack; a path a stack's layers lack is skipped, e.g. BART's encoder has no cross-attention norm).
        outer_norms (`tuple[str, ...]`): path suffixes of the norms outside the layers (on the embeddings, after the
            last layer).
        sources (`tuple[str, ...]`): path suffixes of projections that start the stream without a norm after them
            (ELECTRA's `embeddings_project`, present when its `embedding_size` differs from the hidden size): their
            output is masked itself, and the embeddings and norms before them, of another width, are not part of the
            stream.
    """

    embeddings: tuple[str, ...]
    layer_norms: tuple[str, ...]
    outer_norms: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()


_BERT_STREAM = StreamSpec(
    ("embeddings.word_embeddings", "embeddings.position_embeddings", "embeddings.token_type_embeddings"),
    ("attention.output.LayerNorm", "output.LayerNorm"),
    ("embeddings.LayerNorm",),
)
_LLAMA_STREAM = StreamSpec(("embed_tokens",), ("input_layernorm", "post_attention_layernorm"), ("norm",))

# One entry per model type whose hidden size can be pruned exactly; `HIDDEN_UNSUPPORTED` says why the others cannot
# (yet). Models of a type listed here are still probed before anything changes (`hf_blockprune.structure.stream`).
STREAMS: dict[str, StreamSpec] = {
    "bert": _BERT_STREAM,
    "roberta": _BERT_STREAM,
    "xlm-roberta": _BERT_STREAM,
    "electra": StreamSpec(_BERT_STREAM.embeddings, _BERT_STREAM.layer_norms, _BERT_STREAM.outer_norms,
                          ("embeddings_project",)),
    "distilbert": StreamSpec(
        ("embeddings.word_embeddings", "embeddings.position_embeddings"),
        ("sa_layer_norm", "output_layer_norm"),
        ("embeddings.LayerNorm",),
    ),
    "gpt2": StreamSpec(("wte", "wpe"), ("ln_1", "ln_2"), ("ln_f",)),
    "bart": StreamSpec(
        ("shared", "encoder.embed_tokens", "decoder.embed_tokens", "encoder.embed_positions",
         "decoder.embed_positions"),
        ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"),
        ("encoder.layernorm_embedding", "decoder.layernorm_embedding"),
    ),
    "llama": _LLAMA_STREAM,
    "mistral": _LLAMA_STREAM,
    "qwen2": _LLAMA_STREAM,
}
HIDDEN_UNSUPPORTED: dict[str, str] = {
    "deberta-v2": (
        "its relative-position embeddings are projected by the attention's own key and query projections, so their "
        "width is tied to the hidden size in a way hf_blockprune does not describe yet"
    ),
    "modernbert": "hf_blockprune does not describe its residual stream yet (its first layer has no attention norm)",
}


# Model types whose attention cannot be compacted exactly, and why: refused before anything changes, also when the
# user describes the layers with module patterns.
_SHARED_BIAS = (
    "its relative-position bias is computed once per stack with one row per head and added in every layer, so a "
    "layer cannot keep its own heads"
)
_ALIBI = "its ALiBi slopes go to heads by their position in the full head count, so removing heads shifts them"
_MODEL_WIDE_HEADS = (
    "its attention cuts the fused query-key-value output at the model-wide head count (`config.num_attention_heads`), "
    "so a layer cannot keep its own heads"
)
UNSUPPORTED: dict[str, str] = {
    **dict.fromkeys(("t5", "mt5", "umt5", "longt5", "switch_transformers"), _SHARED_BIAS),
    **dict.fromkeys(("bloom", "mpt"), _ALIBI),
    "phi3": _MODEL_WIDE_HEADS,
}


def known_activation_paths() -> list[str]:
    """The FFN activation paths of every built-in entry, for layers described by patterns (tried in order)."""
    paths = [stack.ffn.activation for specs in ARCHITECTURES.values() for stack in specs if stack.ffn]
    return list(dict.fromkeys(path for path in paths if path))


@dataclass(frozen=True)
class ModulePatterns:
    """A user's description of the layers of an architecture without a built-in entry (`BlockPruningConfig`'s
    `layers_pattern`, `attention_modules`, `ffn_modules`, `num_heads_attribute`, `num_kv_heads_attribute`).

    Example:
        >>> ModulePatterns.of({"layers_pattern": "blocks", "ffn_modules": ["fc1", "fc2"]}).ffn_modules
        ('fc1', 'fc2')
        >>> ModulePatterns.of({"pruning_method": "topk"}) is None  # no patterns: the built-in map
        True
    """

    layers_pattern: str
    attention_modules: tuple[str, ...] | None = None
    ffn_modules: tuple[str, ...] | None = None
    num_heads_attribute: str = "num_attention_heads"
    num_kv_heads_attribute: str | None = None

    @classmethod
    def of(cls, config) -> ModulePatterns | None:
        """The patterns of a `BlockPruningConfig` (or its dict, as recorded in a model config); `None` if it names no
        layers (the built-in map applies)."""
        if config is None or isinstance(config, ModulePatterns):
            return config
        read = config.get if isinstance(config, dict) else lambda name, default=None: getattr(config, name, default)
        if read("layers_pattern") is None:
            return None
        as_tuple = lambda value: None if value is None else tuple(value)  # noqa: E731
        return cls(read("layers_pattern"), as_tuple(read("attention_modules")), as_tuple(read("ffn_modules")),
                   read("num_heads_attribute") or "num_attention_heads", read("num_kv_heads_attribute"))


def _pattern_stack(model: nn.Module, patterns: ModulePatterns) -> LayerStackSpec:
    attention = ()
    if patterns.attention_modules is not None:
        options = dict(sets_cache_length=can_generate(model), num_heads=patterns.num_heads_attribute,
                       num_kv_heads=patterns.num_kv_heads_attribute, removable=False)
        modules = patterns.attention_modules
        build = AttentionSpec.fused_qkv if len(modules) == 2 else AttentionSpec  # 2: a fused QKV, then output
        attention = (build(*modules, **options),)
    ffn = None
    if patterns.ffn_modules is not None:
        *inputs, output = patterns.ffn_modules
        ffn = FFNSpec(inputs[0] if len(inputs) == 1 else tuple(inputs), output)
    return LayerStackSpec(patterns.layers_pattern, attention, ffn)


def stack_specs(model: nn.Module, patterns: ModulePatterns | None) -> tuple[LayerStackSpec, ...]:
    """Return the layer stacks to prune in `model`: the user's `patterns`, else the built-in map.

    An attention named by patterns is taken to set the KV-cache length when the model can generate (its placeholder
    head, if it loses every head, is exact either way).

    Raises:
        `ValueError`: the model type has no built-in map and no patterns are given, or its attention cannot be
            compacted exactly (`UNSUPPORTED`) and the patterns would prune it.
    """
    model_type = base_model_type(getattr(getattr(model, "config", None), "model_type", None))
    if model_type in UNSUPPORTED and (patterns is None or patterns.attention_modules is not None):
        raise ValueError(
            f"hf_blockprune cannot prune the attention heads of {model_type!r} models exactly: "
            f"{UNSUPPORTED[model_type]}. Prune only the FFN: `layers_pattern` and `ffn_modules` without "
            "`attention_modules`."
        )
    if patterns is not None:
        return (_pattern_stack(model, patterns),)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"hf_blockprune has no module map for model_type {model_type!r}; supported: {sorted(ARCHITECTURES)}. "
            "For another architecture, pass `layers_pattern` (e.g. 'encoder.layer'), `attention_modules` "
            "(query key value output, relative to a layer) and `ffn_modules` (input(s) then output) in "
            "BlockPruningConfig (and `num_kv_heads_attribute` for grouped-query attention)."
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

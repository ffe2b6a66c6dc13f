"""Find a model's residual stream (its hidden size) for hidden-size pruning, and prove by a probe that masking it is
exact.

The architecture's `StreamSpec` names the embedding tables, the norms and any projection that starts the stream
(`sources`); the layers' specs name the projections that read and write the stream inside the layers. What reads it
outside the layers (a pooler, a task head, an LM head) is found, and the rest is checked, by one probe forward pass in
eval mode: every norm's (and source's) output is zeroed on a random half of the channels, as a masked norm does
(`hf_blockprune.pruning.norm.MaskedNorm`), and each projection's input is looked at. A projection whose input is
exactly zero on those channels reads the stream (views, copies and gathers of it keep the zeros); one that reads a
tensor of the same width which is not zero there (a pooler's output) does not.

Hidden-size pruning is refused, naming the module, where the probe shows it would not be exact:

- a projection of a layer's description reads a tensor no norm (or source) has masked;
- a projection of the stream's width outside the layers did not run in the probe (it cannot be told apart);
- a projection shares its weight with an embedding table but does not read the stream (BERT's tied MLM decoder reads
  its transform's output);
- the model's output is the stream itself (a bare encoder, the transformer of a sentence-transformers model): pruning
  would change the width of what it returns. Secondary outputs that are the stream (hidden states, BART's
  `encoder_last_hidden_state`) do get narrower, with the kept channels' values.
"""

from __future__ import annotations

import torch
from torch import nn

from .architectures import HIDDEN_UNSUPPORTED, STREAMS
from .layers import has_module
from .model_structure import ModelStructure, StreamStructure
from .modeling_blockprune import base_model_type, is_constant_output
from .projections import is_projection, linear_weight
from .wrappers import transformers_model

PROBE_TOKENS = 8  # tokens of the probe sequence
PROBE_SEED = 0  # the probe's channels and tokens do not depend on the global random state


def _named(model: nn.Module, suffix: str) -> list[tuple[str, nn.Module]]:
    return [(name, module) for name, module in model.named_modules(remove_duplicate=False)
            if name == suffix or name.endswith("." + suffix)]


def _unique(pairs: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    seen, unique = set(), []
    for name, module in pairs:
        if id(module) not in seen:
            seen.add(id(module))
            unique.append((name, module))
    return unique


def _in_layers(name: str, layer_names: list[str]) -> bool:
    return any(name == layer or name.startswith(layer + ".") for layer in layer_names)


def _in_width(module: nn.Module) -> int:
    return linear_weight(module).shape[1]


def _layer_paths(structure: ModelStructure) -> tuple[list[str], list[str]]:
    """`(readers, writers)` inside the layers, by path from the root: the fused module where projections are fused."""
    readers, writers = [], []
    for layer in structure.layers:
        for attention in layer.attentions:
            spec = attention.spec
            readers += [f"{layer.name}.{path}" for path in ([spec.fused] if spec.fused else
                                                             [spec.query, spec.key, spec.value])]
        ffn = layer.stack.ffn
        if ffn is not None and not layer.ffn_removed:
            readers += [f"{layer.name}.{path}" for path in ([ffn.fused] if ffn.fused else ffn.inputs)]
        # a sublayer removed at compaction reads nothing, but its `ConstantOutput` still writes the stream
        writers += [f"{layer.name}.{spec.output}" for spec in layer.stack.attentions]
        writers += [f"{layer.name}.{ffn.output}"] if ffn is not None else []
    return readers, writers


def probe_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """The inputs of the probe forward pass: one sequence of `PROBE_TOKENS` token ids (its last the EOS token, which
    BART's classification head reads), two choices of it for a multiple-choice model.

    Example:
        >>> from transformers import BertConfig, BertForMultipleChoice
        >>> model = BertForMultipleChoice(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
        ...                                          num_attention_heads=4, intermediate_size=37))
        >>> probe_inputs(model)["input_ids"].shape
        torch.Size([1, 2, 8])
    """
    config = model.config
    generator = torch.Generator().manual_seed(PROBE_SEED)
    ids = torch.randint(3, max(int(config.vocab_size), 4), (1, PROBE_TOKENS), generator=generator)
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, int) and 0 <= eos < int(config.vocab_size):
        ids = torch.where(ids == eos, torch.full_like(ids, 3 if eos != 3 else 4), ids)
        ids[0, -1] = eos
    if type(model).__name__.endswith("ForMultipleChoice"):
        ids = ids[:, None].repeat(1, 2, 1)
    device = next(model.parameters()).device
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def _refuse(reason: str) -> ValueError:
    return ValueError(f"Cannot prune the hidden size of this model exactly: {reason}. Leave `prune_hidden` off.")


def _spec(model: nn.Module, structure: ModelStructure):
    model_type = base_model_type(getattr(getattr(transformers_model(model), "config", None), "model_type", None))
    if structure.patterns is not None:
        raise _refuse("its layers are described by module patterns, and hidden-size pruning needs a built-in "
                      "description of the residual stream (embeddings and norms, `STREAMS`)")
    if model_type in HIDDEN_UNSUPPORTED:
        raise _refuse(f"{model_type!r}: {HIDDEN_UNSUPPORTED[model_type]}")
    if model_type not in STREAMS:
        raise _refuse(f"hf_blockprune has no description of the residual stream of {model_type!r} models "
                      f"(supported: {sorted(STREAMS)})")
    return STREAMS[model_type]


def _stream_modules(model: nn.Module, structure: ModelStructure):
    """`(embeddings, norms, sources)` as `(path, module)` lists, found from the architecture's `StreamSpec`."""
    spec = _spec(model, structure)
    layer_names = [layer.name for layer in structure.layers]
    embeddings = _unique([pair for suffix in spec.embeddings for pair in _named(model, suffix)
                          if isinstance(pair[1], nn.Embedding)])
    outer = [pair for suffix in spec.outer_norms for pair in _named(model, suffix)
             if not _in_layers(pair[0], layer_names)]
    sources = _unique([pair for suffix in spec.sources for pair in _named(model, suffix) if is_projection(pair[1])])
    norms = []
    for layer in structure.layers:
        owner = model.get_submodule(layer.name)
        found = [(f"{layer.name}.{path}", owner.get_submodule(path)) for path in spec.layer_norms
                 if has_module(owner, path) and not isinstance(owner.get_submodule(path), nn.Identity)]
        if not found and (layer.attentions or (layer.stack.ffn is not None and not layer.ffn_removed)):
            raise _refuse(f"{layer.name} has none of the norms {list(spec.layer_norms)}")  # (a layer emptied has none)
        norms += found
    size = norms[-1][1].weight.shape[-1]  # the last layer's last norm
    if sources:  # the embeddings and their norm live in another space, which the sources project from
        embeddings = [pair for pair in embeddings if pair[1].weight.shape[1] == size]
        outer = [pair for pair in outer if getattr(pair[1], "weight", None) is None
                 or pair[1].weight.shape[-1] == size]
    norms = _unique(outer + norms)
    if not embeddings and not sources:
        raise _refuse(f"no embedding table named like {list(spec.embeddings)}")
    return embeddings, norms, sources


def _hidden_size(embeddings, norms, sources) -> int:
    size = norms[-1][1].weight.shape[-1]  # the last layer's last norm
    for name, module in sources:
        if linear_weight(module).shape[0] != size:
            raise _refuse(f"{name} writes {linear_weight(module).shape[0]} features, not the hidden size {size}")
    for name, module in norms + embeddings:
        weight = getattr(module, "weight", None)
        width = None if weight is None else weight.shape[-1]
        if width != size:
            raise _refuse(f"{name} has width {width}, not the hidden size {size}, and no projection between them is "
                          "described (`StreamSpec.sources`)")
    return size


class _Probe:
    """Hooks of the probe: norms zero the dropped channels of their outputs; projections record what they read."""

    def __init__(self, model: nn.Module, norms, size: int, sources=()):
        generator = torch.Generator().manual_seed(PROBE_SEED)
        device = next(model.parameters()).device
        self.dropped = torch.randperm(size, generator=generator)[: size // 2].to(device)
        self.keep = torch.ones(size, dtype=torch.bool, device=device)
        self.keep[self.dropped] = False
        self.size = size
        self.reads: dict[str, bool] = {}  # projection path -> its input was zero on the dropped channels
        self.handles = [module.register_forward_hook(self._zero) for _, module in norms + list(sources)]
        for name, module in model.named_modules():
            if is_projection(module):
                self.handles.append(module.register_forward_pre_hook(self._recorder(name)))

    def _zero(self, module, args, output):
        return output * self.keep.to(output.dtype)

    def zero_on_dropped(self, tensor) -> bool:
        """Whether `tensor` has the stream's width, is exactly zero on the dropped channels, and not elsewhere."""
        if not isinstance(tensor, torch.Tensor) or tensor.ndim == 0 or tensor.shape[-1] != self.size:
            return False
        dropped = tensor.index_select(-1, self.dropped)
        return bool((dropped == 0).all()) and bool((tensor[..., self.keep] != 0).any())

    def _recorder(self, name: str):
        def record(module, args):
            value = self.zero_on_dropped(args[0]) if args else False
            self.reads[name] = self.reads.get(name, True) and value
        return record

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _outputs(outputs) -> list[tuple[str, torch.Tensor]]:
    if isinstance(outputs, torch.Tensor):
        return [("output", outputs)]
    items = outputs.items() if hasattr(outputs, "items") else enumerate(outputs)
    return [(str(key), value) for key, value in items if isinstance(value, torch.Tensor)]


@torch.no_grad()
def _run_probe(model: nn.Module, norms, size: int, sources) -> tuple[_Probe, object]:
    probe = _Probe(model, norms, size, sources)
    training = model.training
    inner = transformers_model(model)  # the model itself, or the one inside a sentence-transformers model
    try:
        model.eval()
        outputs = inner(**probe_inputs(inner))
    except Exception as error:  # the probe's inputs do not suit this model: say so, do not guess
        raise _refuse(f"a probe forward pass (one sequence of {PROBE_TOKENS} tokens) failed with "
                      f"{type(error).__name__}: {error}") from error
    finally:
        probe.remove()
        model.train(training)
    return probe, outputs


def _check_layer_readers(probe: _Probe, readers: list[str]) -> None:
    for path in readers:
        if not probe.reads.get(path, False):
            raise _refuse(f"{path} reads a tensor that no norm (or source) of the stream has masked (or did not run "
                          "in a probe forward pass), so its pruned channels would not be zero while masked")


def _outer_readers(model: nn.Module, probe: _Probe, layer_names: list[str], embeddings, sources) -> list[str]:
    tables = {id(module.weight): name for name, module in embeddings}
    source_names = {name for name, _ in sources}
    readers = []
    for name, module in _unique(list(model.named_modules())):
        if not is_projection(module) or _in_layers(name, layer_names) or name in source_names:
            continue
        tied = tables.get(id(getattr(module, "weight", None)))
        if name not in probe.reads and (_in_width(module) == probe.size or tied):
            raise _refuse(f"{name} did not run in a probe forward pass, so whether it reads the hidden stream is "
                          "unknown")
        if probe.reads.get(name):
            readers.append(name)
        elif tied:
            raise _refuse(f"{name} shares its weight with the embedding table {tied} but reads a tensor that is not "
                          "the hidden stream (e.g. a masked-LM head's transform), so the two cannot be sliced alike")
    return readers


def find_stream(model: nn.Module, structure: ModelStructure) -> StreamStructure:
    """Find and check the residual stream of `model` (see the module docstring); changes nothing.

    Args:
        model (`nn.Module`): a transformers model of an architecture in `STREAMS`, not masked yet.
        structure (`ModelStructure`): its structure (`structure_of(model)`); a stream it already holds (a model
            whose hidden size was compacted before) gives the original channel indices.

    Returns:
        `StreamStructure`: the stream, its paths from the model's root.

    Raises:
        `ValueError`: the hidden size of this model cannot be pruned exactly, and why (see the module docstring).

    Example:
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> from hf_blockprune.structure.discovery import structure_of
        >>> model = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
        ...                                                  num_attention_heads=4, intermediate_size=37))
        >>> stream = find_stream(model, structure_of(model))
        >>> stream.size, stream.norms[0], [path for path in stream.readers if "layer" not in path]
        (32, 'bert.embeddings.LayerNorm', ['bert.pooler.dense'])
    """
    embeddings, norms, sources = _stream_modules(model, structure)
    size = _hidden_size(embeddings, norms, sources)
    layer_readers, writers = _layer_paths(structure)
    probe, outputs = _run_probe(model, norms, size, sources)
    _check_layer_readers(probe, layer_readers)
    layer_names = [layer.name for layer in structure.layers]
    outer = _outer_readers(model, probe, layer_names, embeddings, sources)
    main = _outputs(outputs)[:1]  # the task output (logits), or the bare model's last hidden state
    returned = [key for key, value in main if probe.zero_on_dropped(value)]
    if returned:
        raise _refuse(f"its output {returned[0]!r} is the hidden stream itself, so pruning the hidden size would "
                      "change the width of what the model returns (a sentence-transformers model's embedding size is "
                      "what users index); prune a model with a task head, or prune heads and neurons only")
    for path in writers:
        module = model.get_submodule(path)
        width = module.out_features if is_constant_output(module) else linear_weight(module).shape[0]
        if width != size:
            raise _refuse(f"{path} writes {width} features, not the hidden size {size}")
    previous = structure.stream
    channels = previous.channels if previous is not None else tuple(range(size))
    original = previous.original_size if previous is not None else size
    source_names = tuple(name for name, _ in sources)
    return StreamStructure(channels, tuple(name for name, _ in embeddings), tuple(name for name, _ in norms),
                           tuple(layer_readers + outer), tuple(writers) + source_names, original, source_names)

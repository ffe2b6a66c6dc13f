"""Shared helpers for the Trainer-level tests."""

from __future__ import annotations

import torch
from transformers import Trainer

from hf_blockprune import BlockPruningCallback, BlockPruningConfig, BlockPruningTrainer, apply_block_pruning
from hf_blockprune.pruning.layer import BlockScores
from hf_blockprune.pruning.model import block_scores, set_threshold
from hf_blockprune.pruning.schedule import cubic_lambda, cubic_threshold, schedule_progress
from hf_blockprune.structure.discovery import prunable_layers

from conftest import DECODERS, ENCODER_DECODERS, GATED_FFN, VOCAB, tiny_dataset, tiny_model, training_args

# Block sizes that divide the tiny models (hidden 32 = 4 heads x 8, FFN 37).
TINY_PRESETS = {
    "hybrid": dict(attention_block_size=[8, 8]),
    "struct": {},
    "block": dict(attention_block_size=[8, 8], ffn_block_size=[1, 1]),
}


def make_trainer(route, arch, config, output_dir, trainer_class=Trainer, model=None, **arg_overrides):
    """A trainer with block pruning through `route`: "trainer" (the subclass) or "callback"."""
    model = model if model is not None else tiny_model(arch)
    args = training_args(output_dir, **arg_overrides)
    data = tiny_dataset(arch)
    if route == "trainer":
        return BlockPruningTrainer(model=model, args=args, train_dataset=data, pruning_config=config)
    return trainer_class(model=model, args=args, train_dataset=data, callbacks=[BlockPruningCallback(config)])


def schedule_values(step: int, total_steps: int, config: BlockPruningConfig) -> tuple[float, float]:
    """`(threshold, lambda)` that the schedule of `config` gives at `step` of `total_steps`."""
    progress = schedule_progress(step, total_steps, config.initial_warmup, config.final_warmup)
    return (cubic_threshold(progress, config.initial_threshold, config.final_threshold),
            cubic_lambda(progress, config.final_lambda))


def effective_scores(model) -> list[torch.Tensor]:
    """Every score tensor as the masks see them, detached."""
    return [s.effective_scores().detach().clone() for s in block_scores(model)]


def masks(model) -> list[torch.Tensor]:
    """Every binary mask of the model."""
    with torch.no_grad():
        return [s.mask().clone() for s in block_scores(model)]


def topk_density(model, fraction: float) -> float:
    """The exact density top-k gives at `fraction`: round(f * n) blocks kept in each score grid."""
    kept = total = 0.0
    for scores in block_scores(model):
        n = scores.scores.numel()
        kept += round(fraction * n) * scores.weights_per_block
        total += n * scores.weights_per_block
    return kept / total


def preset_config(preset, arch=None, **overrides) -> BlockPruningConfig:
    """A preset sized for the tiny models (of `arch`: a gated FFN is pruned by neurons, even with `block`)."""
    values = {**TINY_PRESETS[preset], **overrides}
    if arch in GATED_FFN and preset == "block":
        values["ffn_granularity"] = "neuron"
    return BlockPruningConfig.from_preset(preset, **values)


DEAD, ALIVE = -1e4, 1e4


def model_inputs(arch, labels=False):
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, 6:] = 0
    inputs = {"input_ids": ids, "attention_mask": attention_mask}
    if arch in ENCODER_DECODERS:
        inputs["decoder_input_ids" if not labels else "labels"] = ids[:, :5].clone()
    elif arch in DECODERS:
        if labels:
            inputs["labels"] = ids.masked_fill(attention_mask == 0, -100)
    elif labels:
        inputs["labels"] = torch.tensor([0, 1])
    return inputs


def model_outputs(model, inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    names = ("logits", "hidden_states", "encoder_hidden_states", "decoder_hidden_states")
    tensors = []
    for name in names:
        value = getattr(out, name, None)
        tensors += list(value) if isinstance(value, tuple) else [] if value is None else [value]
    return tensors


def layer_map(model) -> list[int] | None:
    """The original index of each layer of a decoder whose compaction dropped layers, else `None`."""
    maps = (getattr(model.config, "blockprune_layout", None) or {}).get("layer_map")
    return next(iter(maps.values())) if maps else None


def without_dropped_layers(expected: list[torch.Tensor], model, before: list[int] | None = None) -> list[torch.Tensor]:
    """`model_outputs` of a masked decoder as its compacted `model` returns them when compaction dropped layers
    (`config.blockprune_layout["layer_map"]`): the hidden states of the dropped layers left out (the last, the final
    norm's output, stays). `before`: the `layer_map` of the model `expected` came from, if it had dropped layers."""
    kept = layer_map(model)  # the decoders that drop layers have one stack
    if kept is None or kept == before:
        return expected
    kept = [before.index(index) for index in kept] if before else kept
    logits, states = expected[0], expected[1:]
    # a layer kept before dropped ones outputs the state after them (their constants folded into it); the first entry
    # (the embeddings) the state before the first layer kept
    return [logits, states[kept[0]], *[states[index] for index in kept[1:]], states[-1]]


def plain_parameter_count(model) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if not name.endswith("scores"))


def biased_model(arch, seed=0):
    """A tiny model whose biases are all non-zero (transformers initialises them to zero)."""
    model = tiny_model(arch, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return model.eval()


def kill_scores(scores: BlockScores) -> None:
    """Mask every block of `scores`, whatever the method (top-k keeps a fraction of each grid)."""
    with torch.no_grad():
        scores.scores.fill_(DEAD)
    if scores.method == "topk":
        scores.set_threshold(0.0)


def random_masks(model, preset, method, seed, force_empty):
    """Random scores; with `force_empty`, the first layer loses every head and the last every FFN neuron."""
    arch = model.config.model_type
    apply_block_pruning(model, preset_config(preset, arch, pruning_method=method))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for scores in block_scores(model):
            scores.scores.copy_(torch.randn(scores.scores.shape, generator=gen))
    set_threshold(model, 0.5)
    if force_empty:
        layers = prunable_layers(model)
        for attention in layers[0].attentions:  # value rows and output columns: no constant is left to fold
            kill_scores(attention.value.scores_module)
            kill_scores(attention.output.scores_module)
        kill_scores(layers[-1].ffn_input.scores_module)
    return model

"""LoRA layers (peft) under block masks: the mask applies to the effective weight, base plus low-rank delta.

A projection that peft wrapped in a LoRA `Linear` is masked like a plain `nn.Linear`: `MaskedLinear` reads its
effective weight `W + sum_a scaling_a * B_a @ A_a` (`dense_weight`), so what trains is what compaction keeps. The base
weight stays frozen and unchanged; the adapters and the scores train. `unwrap` takes the LoRA layer out (merging its
delta into the base weight, or dropping it), which is what peft's `merge_and_unload()` and compaction do.
"""

from __future__ import annotations

import torch
from torch import nn

try:  # peft is a dependency; the guard keeps the loader-free parts importable without it
    from peft.tuners.lora import LoraLayer
except ImportError:  # pragma: no cover
    LoraLayer = ()


def is_lora_layer(module: nn.Module) -> bool:
    """Whether `module` is a peft LoRA layer (it wraps a base layer and holds `lora_A` / `lora_B`)."""
    return bool(LoraLayer) and isinstance(module, LoraLayer)


def active_lora_adapters(layer: nn.Module) -> list[str]:
    """The adapters of a LoRA layer whose delta is in its output now: active, not disabled, not merged."""
    if layer.disable_adapters or layer.merged:
        return []
    return [name for name in layer.active_adapters if name in layer.lora_A]


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The `(out, in)` weight `module` computes with: an `nn.Linear`'s weight, a LoRA layer's base weight plus the
    deltas of its active adapters (with their gradient to the adapters)."""
    if not is_lora_layer(module):
        return module.weight
    weight = module.get_base_layer().weight
    for name in active_lora_adapters(module):
        weight = weight + module.get_delta_weight(name).to(weight.dtype)
    return weight


def has_lora_dropout(module: nn.Module) -> bool:
    """Whether a LoRA layer applies a dropout to its adapters' input (then its delta is computed apart)."""
    return is_lora_layer(module) and any(
        not isinstance(module.lora_dropout[name], nn.Identity) for name in active_lora_adapters(module)
    )


def lora_delta_output(module: nn.Module, hidden_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`sum_a F.linear(dropout_a(x), mask * delta_a)`: the adapters' masked share of the output, with their dropout."""
    output = 0
    for name in active_lora_adapters(module):
        delta = module.get_delta_weight(name)
        output = output + nn.functional.linear(module.lora_dropout[name](hidden_states), delta * mask.to(delta.dtype))
    return output


def unwrap(module: nn.Module, merge: bool, safe_merge: bool = False, adapter_names=None) -> nn.Module:
    """A LoRA layer's base layer, with the adapters' deltas merged into its weight if `merge`; other modules as
    they are."""
    if not is_lora_layer(module):
        return module
    if merge:
        module.merge(safe_merge=safe_merge, adapter_names=adapter_names)
    return module.get_base_layer()


def check_lora_base(path: str, module: nn.Module) -> None:
    """Refuse a LoRA layer whose base layer is not an `nn.Linear` (a `Conv1D`: `ValueError`); others pass."""
    base = module.get_base_layer() if is_lora_layer(module) else None
    if base is not None and type(base) is not nn.Linear:
        raise ValueError(
            f"{path} is a LoRA layer over a {type(base).__name__}: block pruning masks LoRA layers over nn.Linear "
            "only (not Conv1D). Leave this module out of the LoRA `target_modules`."
        )


def check_lora_layer(path: str, module: nn.Module, config) -> None:
    """Refuse a LoRA layer that block masks cannot act on exactly.

    Raises:
        `ValueError`: its base layer is not an `nn.Linear`, it uses a weight-decomposed variant (DoRA), or `config`
            asks for the filled stage (it zeroes masked blocks of the weight, which a frozen base weight plus a
            low-rank delta cannot do).
    """
    check_lora_base(path, module)
    if any(module.use_dora.get(name, False) for name in module.lora_A):
        raise ValueError(f"{path} uses DoRA (`use_dora=True`), which block pruning does not support: use plain LoRA.")
    if getattr(config, "fills", False):
        raise ValueError(
            f"{path} is a LoRA layer: the filled stage (`fill_after`, preset 'hybrid-filled') zeroes masked blocks of "
            "the weight, which a frozen base weight plus a low-rank adapter cannot do. Use 'hybrid' or 'struct', or "
            "set `fill_after=1.0` (no filled stage)."
        )

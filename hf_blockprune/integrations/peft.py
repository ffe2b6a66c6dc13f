"""peft (LoRA) with block pruning: LoRA layers under the masks, and PEFT models' checkpoints and compacted saves.

A projection that peft wrapped in a LoRA `Linear` is masked like a plain `nn.Linear`: `MaskedLinear` reads its
effective weight `W + sum_a scaling_a * B_a @ A_a` (`dense_weight`), so what trains is what compaction keeps. The base
weight stays frozen and unchanged; the adapters and the scores train. `unwrap` takes the LoRA layer out (merging its
delta into the base weight, or dropping it), which is what peft's `merge_and_unload()` and compaction do.

peft saves only the adapters (`adapter_model.safetensors`), so a checkpoint of a masked PEFT model also gets
`blockprune_state.safetensors`: the mask scores, their thresholds and the density controller's state, everything a
resumed run needs besides the adapters (the base weights are frozen and come from the base model). The compacted model
is saved from a copy whose adapters are merged into the masked weights (`merged_copy`): a plain compacted model.

Imported by `hf_blockprune.integrations` when peft is installed; it registers `LoraLinear` (`WRAPPED_LINEARS`),
`check_lora_base` (`MODULE_CHECKS`) and `PeftWrapper` (`MODEL_WRAPPERS`) with the core.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn

from ..pruning.layer import WRAPPED_LINEARS, WrappedLinear
from ..pruning.model import CONFIG_ATTRIBUTE, TARGETS_ATTRIBUTE, is_block_pruned, rename_legacy_keys
from ..structure.layers import MODULE_CHECKS
from ..structure.wrappers import MODEL_WRAPPERS, ModelWrapper

PRUNING_STATE_NAME = "blockprune_state.safetensors"


def is_lora_layer(module: nn.Module) -> bool:
    """Whether `module` is a peft LoRA layer (it wraps a base layer and holds `lora_A` / `lora_B`)."""
    return isinstance(module, LoraLayer)


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


def is_peft_model(model: nn.Module) -> bool:
    """Whether `model` is a `peft.PeftModel` (e.g. made by `get_peft_model`)."""
    return isinstance(model, PeftModel)


def is_peft_model_class(cls: type) -> bool:
    """Whether `cls` is `peft.PeftModel` or a subclass."""
    return isinstance(cls, type) and issubclass(cls, PeftModel)


def _is_pruning_key(key: str) -> bool:
    return ".block_scores." in f".{key}" or key.split(".", 1)[0] == TARGETS_ATTRIBUTE


def pruning_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The entries of `model.state_dict()` that hf_blockprune adds: mask scores, their buffers, the controller's."""
    return {key: value for key, value in model.state_dict().items() if _is_pruning_key(key)}


def save_pruning_state(model: nn.Module, save_directory: str | os.PathLike) -> None:
    """Write `pruning_state(model)` to `<save_directory>/blockprune_state.safetensors`."""
    from safetensors.torch import save_file

    state = {key: value.detach().contiguous().cpu() for key, value in pruning_state(model).items()}
    save_file(state, str(Path(save_directory) / PRUNING_STATE_NAME), metadata={"format": "pt"})


def load_pruning_state(model: nn.Module, directory: str | os.PathLike) -> None:
    """Load `blockprune_state.safetensors` of a checkpoint folder into the masked `model`.

    Raises:
        `ValueError`: the folder has no such file (a checkpoint of the adapters alone would restart the scores), or its
            entries do not match the model's masks.
    """
    from safetensors.torch import load_file

    path = Path(directory) / PRUNING_STATE_NAME
    if not path.is_file():
        raise ValueError(
            f"{directory} holds the adapters of a block-pruned PEFT model but no {PRUNING_STATE_NAME} (mask scores): "
            "it was not written by a pruning run, and resuming from it would restart the masks. Resume from a "
            "checkpoint written by BlockPruningTrainer or BlockPruningCallback."
        )
    state = rename_legacy_keys(load_file(str(path)))
    expected = set(pruning_state(model))
    if set(state) != expected:
        difference = sorted(expected ^ set(state))[:5]
        raise ValueError(
            f"{path} does not match this model's masks (e.g. {difference}): build the model and the pruning config "
            "as in the run that wrote it."
        )
    model.load_state_dict(state, strict=False)


def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of a masked PEFT model with every adapter merged (peft's `merge_and_unload()`), masks kept: the masked
    transformers model computing what the adapted model computes."""
    clone = copy.deepcopy(model)
    merged = clone.merge_and_unload()
    config = getattr(model, CONFIG_ATTRIBUTE, None)
    if config is not None:
        setattr(merged, CONFIG_ATTRIBUTE, config)
    return merged


class LoraLinear(WrappedLinear):
    """A peft LoRA layer over an `nn.Linear`, as `MaskedLinear` masks it (see the module docstring)."""

    def applies(self, module: nn.Module) -> bool:
        return is_lora_layer(module)

    def weight(self, module: nn.Module) -> torch.Tensor:
        return dense_weight(module)

    def linear(self, module: nn.Module) -> nn.Linear:
        return module.get_base_layer()

    def separate_delta(self, module: nn.Module) -> bool:
        return has_lora_dropout(module)

    def delta_output(self, module: nn.Module, hidden_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return lora_delta_output(module, hidden_states, mask)

    def unwrap(self, module: nn.Module, merge: bool, safe_merge: bool = False, adapter_names=None) -> nn.Module:
        return unwrap(module, merge, safe_merge, adapter_names)

    def check(self, path: str, module: nn.Module, config) -> None:
        check_lora_layer(path, module, config)


def _load_adapter(self, model_id, adapter_name, *args, **kwargs):
    """`PeftModel.load_adapter` of a PEFT model in a save mode: the Trainer resumes through it, so the checkpoint's
    mask scores and controller state are loaded too."""
    result = type(self)._blockprune_saving_of.load_adapter(self, model_id, adapter_name, *args, **kwargs)
    if is_block_pruned(self) and os.path.isdir(model_id):
        load_pruning_state(self, model_id)
    return result


class PeftWrapper(ModelWrapper):
    """A `peft.PeftModel` in a pruning run: its adapters merged for compaction, its mask scores saved and loaded
    beside the adapters in checkpoints."""

    name = "peft"
    checks_own_checkpoints = True  # `load_pruning_state` refuses a checkpoint without the scores

    def applies(self, model: nn.Module) -> bool:
        return is_peft_model(model)

    def applies_to_class(self, cls: type) -> bool:
        return is_peft_model_class(cls)

    def compaction_copy(self, model: nn.Module) -> nn.Module:
        return merged_copy(model)

    def after_checkpoint_save(self, model: nn.Module, save_directory) -> None:
        save_pruning_state(model, save_directory)  # peft saved the adapters only

    def class_methods(self, saving_of: type) -> dict:
        return {"load_adapter": _load_adapter}


WRAPPED_LINEARS.append(LoraLinear())
MODULE_CHECKS.append(check_lora_base)  # before the structure reads a projection's shape
MODEL_WRAPPERS.append(PeftWrapper())

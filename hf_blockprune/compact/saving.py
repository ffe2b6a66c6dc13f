"""Save compacted models so they load anywhere, load them back, and export dense copies.

Two kinds of folder come out of a pruning run, and plain transformers mistakes neither for a dense model:

- a compacted model has the model type `blockpruned_<type>` and an `auto_map` to the loader saved beside it
  (`modeling_blockprune.py`): plain transformers asks for `trust_remote_code=True`, `from_pretrained` here needs none;
- a masked training checkpoint (weights and mask scores) has the model type `blockprune_masked_checkpoint` (the real
  one is kept under `blockprune_checkpoint`), which plain transformers refuses; `hf-blockprune compact` and
  `load_masked_checkpoint` read it, and the Trainer resumes from it as from any checkpoint.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
from pathlib import Path

import torch
import transformers
from torch import nn

from ..pruning.config import BlockPruningConfig
from ..pruning.model import CONFIG_ATTRIBUTE, is_block_pruned, split_projections
from ..pruning.report import parameter_counts
from ..structure.discovery import structure_of
from ..structure.layers import PrunableLayer
from ..structure.model_structure import LAYOUT_ATTRIBUTE, PRUNING_CONFIG_KEY
from ..structure.modeling_blockprune import (
    as_block_pruned,
    base_class,
    base_model_type,
    block_pruned_class,
    block_pruned_config_class,
)
from ..structure.projections import fuse_projections
from ..structure.wrappers import MODEL_WRAPPERS, ModelWrapper, model_wrapper
from .atomic import atomic_directory, recover_interrupted_save
from .card_metadata import CARD_DATA_ATTRIBUTE, make_record_public, public_settings, public_stages
from .compaction import compact_model
from .model_card import write_model_card
from .stages import FINE_TUNING, MOVEMENT_PRUNING, STAGES_KEY, add_stage

logger = logging.getLogger(__name__)

MASKED_MODEL_TYPE = "blockprune_masked_checkpoint"
MASKED_RECORD_KEY = "blockprune_checkpoint"


def plain_class(model_class: type) -> type:
    """The transformers class behind an hf_blockprune class (`BlockPruned<X>`, or `X` in a save mode -> `X`)."""
    return base_class(model_class)


SCORE_SUFFIX = "block_scores.scores"
SCORE_CUT_SUFFIX = "block_scores.score_cut"


def is_masked_checkpoint(path: str | os.PathLike) -> bool:
    """Whether the local folder `path` holds mask scores (a training checkpoint, not a compacted model)."""
    try:
        return any(key.endswith(SCORE_SUFFIX) for key in weight_names(Path(path)))
    except (OSError, ValueError):
        return False


def weight_names(path: Path) -> list[str]:
    """The tensor names of a local checkpoint folder (`model.safetensors`, possibly sharded), without loading them."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        return list(json.loads(index.read_text())["weight_map"])
    if not (path / "model.safetensors").is_file():
        return []
    with safe_open(str(path / "model.safetensors"), framework="pt") as weights:
        return list(weights.keys())


def refuse_non_finite(model: nn.Module, save_directory: str | os.PathLike) -> None:
    """Raise `ValueError` naming the first floating parameter or buffer of `model` that holds NaN or inf values.

    Args:
        model (`nn.Module`): the model about to be written.
        save_directory (`str` or `os.PathLike`): where it would go (named in the error).
    """
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if not tensor.is_floating_point():
            continue
        # a score cut is logit(threshold): -inf or +inf for a threshold of 0 or 1 (keep all, keep none), never NaN
        bad = torch.isnan(tensor).any() if name.endswith(SCORE_CUT_SUFFIX) else ~torch.isfinite(tensor).all()
        if bad:
            raise ValueError(
                f"`{name}` holds NaN or inf values: the model was not saved and nothing was written to "
                f"{save_directory}."
            )


def is_compacted(model: nn.Module) -> bool:
    """Whether `model` was compacted by hf_blockprune (its config records a `blockprune_layout`)."""
    return getattr(getattr(model, "config", None), LAYOUT_ATTRIBUTE, None) is not None


def compacted_copy(model: nn.Module, pruning_config: BlockPruningConfig | None = None,
                   run: dict | None = None) -> nn.Module:
    """A compacted copy of `model` (masked, or compacted and possibly re-masked); `model` itself is left as it is.

    The copy's config records `pruning_config` (if given) and the stage that made it (see `_record_stage`), after the
    ones `model` records; `run` is what the Trainer run tells (`steps`, `teacher`), by default from the card data
    attached to `model`.
    """
    if not is_block_pruned(model) and not is_compacted(model):
        raise ValueError("save_compacted expects a model masked by hf_blockprune, or one it compacted already.")
    wrapper = model_wrapper(model)
    clone = copy.deepcopy(model) if wrapper is None else wrapper.compaction_copy(model)  # LoRA: adapters merged
    dense_counts = parameter_counts(clone)
    clone.__class__ = plain_class(type(clone))
    if not is_block_pruned(clone):
        compacted = as_block_pruned(clone)
    else:
        compacted = compact_model(clone)  # with the BlockPruned classes
        # a model compacted before keeps the size of the original dense model
        getattr(compacted.config, LAYOUT_ATTRIBUTE).setdefault("dense_parameters", dense_counts)
    if pruning_config is not None:
        setattr(compacted.config, PRUNING_CONFIG_KEY, pruning_config.to_dict())
    run = (getattr(model, CARD_DATA_ATTRIBUTE, None) or {}).get("training") if run is None else run
    _record_stage(compacted, model, run or {})
    return compacted


def _record_stage(compacted: nn.Module, model: nn.Module, run: dict) -> None:
    """Record in `compacted.config` the stage that made it from `model`: the block movement pruning of a masked model
    (its pruning config), or the fine-tuning of a compacted one by a Trainer run (pruning off); nothing for a
    compacted model saved again without training. `run` gives the run's `steps` and `teacher` (see `run_card_data`).
    """
    masked = is_block_pruned(model)
    if masked:
        settings = public_settings(getattr(compacted.config, PRUNING_CONFIG_KEY, None))
        stage = {"method": MOVEMENT_PRUNING, "settings": settings, **run}
    elif run.get("steps"):
        stage = {"method": FINE_TUNING, **run}
    else:
        return
    add_stage(compacted.config, stage, public_stages(model.config, masked=masked))


def save_compacted(
    model: nn.Module,
    save_directory: str | os.PathLike,
    pruning_config: BlockPruningConfig | None = None,
    processing_class=None,
    model_card: bool = True,
    *,
    card_data: dict | None = None,
) -> nn.Module:
    """Compact `model` (a copy; the masked model is left as it is) and save it so that it loads anywhere.

    Writes `model.safetensors`, `config.json` (model type `blockpruned_<type>`, with `blockprune_layout`, the pruning
    config, the stages that made the model (`blockprune_stages`, see `hf_blockprune.compact.stages`: this save adds the
    pruning of a masked model, or the fine-tuning of a compacted one that `card_data["training"]` tells) and an
    `auto_map`), `modeling_blockprune.py` (so plain transformers loads it with `trust_remote_code=True`
    and refuses it without), `README.md` (the model card) and `pruning_layout.png`, plus `processing_class` if given.
    A save killed midway leaves the old model or the new one, never a mix of their files (see `atomic_directory`);
    other entries of the folder are left alone. A sentence-transformers model (e.g. `SentenceTransformer`) is saved by
    its own `save` with its transformer compacted (see `hf_blockprune.integrations.sentence_transformers`).

    Args:
        model (`nn.Module`): a masked model (or an already compacted one).
        save_directory (`str` or `os.PathLike`): where to save.
        pruning_config (`BlockPruningConfig`, *optional*): recorded in the config and the card; defaults to the one
            the model was masked with.
        processing_class (*optional*): a tokenizer or processor to save alongside.
        model_card (`bool`, *optional*, defaults to `True`): write `README.md` and the figure.
        card_data (`dict`, *optional*): the run's evaluation results, datasets, ... for the card's Hub metadata (see
            `write_model_card`).

    Returns:
        `nn.Module`: the compacted model that was saved.

    Raises:
        `ValueError`: a parameter or buffer holds NaN or inf values (nothing is written), or the model is not masked.

    Example:
        >>> import os
        >>> import tempfile
        >>> import torch
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> from hf_blockprune import BlockPruningConfig, apply_block_pruning, is_block_pruned, save_compacted
        >>> model = BertForSequenceClassification(BertConfig(
        ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37))
        >>> config = BlockPruningConfig.from_preset("struct", initial_threshold=0.5, mask_init_value=1.0)
        >>> model = apply_block_pruning(model, config)  # a block is kept while sigmoid(score) > 0.5
        >>> with torch.no_grad():  # as training could leave them: 2 heads of layer 0 below the threshold
        ...     model.bert.encoder.layer[0].attention.self.query.scores_module.scores[:2] = -1.0
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     compacted = save_compacted(model, tmp)
        ...     print(sorted(os.listdir(tmp)))
        ['README.md', 'config.json', 'model.safetensors', 'modeling_blockprune.py', 'pruning_layout.png']
        >>> compacted.bert.encoder.layer[0].attention.self.query.out_features  # 2 heads of 8 left
        16
        >>> is_block_pruned(model)  # the masked model is left as it was
        True
    """
    pruning_config = pruning_config or getattr(model, CONFIG_ATTRIBUTE, None)
    wrapper = model_wrapper(model)  # e.g. a SentenceTransformer: its transformer compacted, saved by its own `save`
    saved = None if wrapper is None else wrapper.save_compacted(
        model, save_directory, pruning_config=pruning_config, processing_class=processing_class,
        model_card=model_card, card_data=card_data)
    if saved is not None:
        return saved
    card_data = {**getattr(model, CARD_DATA_ATTRIBUTE, {}), **(card_data or {})}
    compacted = compacted_copy(model, pruning_config, card_data.get("training"))
    refuse_non_finite(compacted, save_directory)
    with atomic_directory(save_directory) as staging:
        if model_card:
            write_model_card(staging, compacted, card_data=card_data)
        make_record_public(compacted.config)  # no local path (the teacher's) in config.json
        compacted.save_pretrained(staging)
        if processing_class is not None:
            processing_class.save_pretrained(staging)
    logger.info("Saved the compacted model to %s", save_directory)
    return compacted


def architecture_class(config) -> type:
    """The transformers class named by `config.architectures` (with any `BlockPruned` prefix removed)."""
    names = getattr(config, "architectures", None) or []
    for name in names:
        base = getattr(transformers, name.removeprefix("BlockPruned"), None)
        if isinstance(base, type):
            return base
    raise ValueError(f"config.architectures is {names!r}: cannot tell which transformers class to build.")


def from_pretrained(path: str | os.PathLike, model_class: type | None = None, **kwargs) -> nn.Module:
    """Load a model saved by `save_compacted` (or a Trainer of hf_blockprune), without remote code.

    A local folder that an interrupted save left is first completed or cleaned (`recover_interrupted_save`).

    Args:
        path (`str` or `os.PathLike`): the saved folder (or Hub id).
        model_class (`type`, *optional*): the transformers class to build (default: from `config.architectures`).
        **kwargs: passed to `from_pretrained` (`dtype`, `device_map`, ...).

    Raises:
        `ValueError`: the folder holds no compacted model, or its weights do not match its recorded layout.

    Example:
        >>> import tempfile
        >>> import torch
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> from hf_blockprune import BlockPruningConfig, apply_block_pruning, from_pretrained, save_compacted
        >>> model = BertForSequenceClassification(BertConfig(
        ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37))
        >>> config = BlockPruningConfig.from_preset("struct", initial_threshold=0.5, mask_init_value=1.0)
        >>> model = apply_block_pruning(model, config)  # a block is kept while sigmoid(score) > 0.5
        >>> with torch.no_grad():  # as training could leave them: 2 heads of layer 0 below the threshold
        ...     model.bert.encoder.layer[0].attention.self.query.scores_module.scores[:2] = -1.0
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = save_compacted(model, tmp, model_card=False)
        ...     loaded = from_pretrained(tmp)
        >>> type(loaded).__name__
        'BlockPrunedBertForSequenceClassification'
        >>> [layer.attention.self.query.out_features for layer in loaded.bert.encoder.layer]
        [16, 32]
    """
    if Path(path).is_dir():
        recover_interrupted_save(path)
        _refuse_masked_checkpoint(path)
    config = read_model_config(path)
    if getattr(config, LAYOUT_ATTRIBUTE, None) is None:
        raise ValueError(
            f"{path} has no `{LAYOUT_ATTRIBUTE}` in its config.json: it is not a model compacted by hf_blockprune. "
            "Load it with transformers' from_pretrained."
        )
    cls = block_pruned_class(model_class or architecture_class(config))  # saves its loading code again
    try:
        model = cls.from_pretrained(path, config=config, **kwargs)
    except RuntimeError as error:
        if "mismatch" not in str(error).lower():
            raise
        raise ValueError(
            f"The weights in {path} do not match the pruning layout recorded in its config.json "
            f"(`{LAYOUT_ATTRIBUTE}`): the folder was modified or mixed with another model's files.\n{error}"
        ) from None
    structure_of(model)  # found once, from the layout, and kept with the model
    return model


def _refuse_masked_checkpoint(path: str | os.PathLike) -> None:

    if is_masked_checkpoint(path):
        raise ValueError(
            f"{path} is a masked training checkpoint (weights and mask scores, written before training ended), not a "
            f"compacted model. Compact it with `hf-blockprune compact {path} OUTPUT_DIR` and load OUTPUT_DIR, or load "
            f"it masked (to evaluate or inspect it) with `hf_blockprune.load_masked_checkpoint({str(path)!r})`."
        )


def _slot_rows(slots: list[int | None], head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(small rows, dense rows)`: where each real slot of a compacted projection goes in the dense one."""
    pairs = [(slot, head) for slot, head in enumerate(slots) if head is not None]  # zero slots are left out
    small = [slot * head_dim + i for slot, _ in pairs for i in range(head_dim)]
    dense = [head * head_dim + i for _, head in pairs for i in range(head_dim)]
    return torch.tensor(small, dtype=torch.long), torch.tensor(dense, dtype=torch.long)


def _zero_sublayer(inputs: list[nn.Linear], output: nn.Linear) -> None:
    """A removed sublayer in the dense copy: zero input rows (and biases) and output columns; its constant is the
    output bias, which the dense copy took from the `ConstantOutput` (same name, same shape)."""
    for linear in inputs:
        linear.weight.zero_()
        if linear.bias is not None:
            linear.bias.zero_()
    output.weight.zero_()


@torch.no_grad()
def _scatter_layer(dense: PrunableLayer, small: PrunableLayer) -> None:
    """Copy a compacted layer's weights into the zeroed rows and columns of its dense counterpart."""
    kept = {attention.spec.query: attention for attention in small.attentions}
    for dense_attention in dense.attentions:
        attention = kept.get(dense_attention.spec.query)
        if attention is None:  # removed at compaction
            heads = [dense_attention.query, dense_attention.key, dense_attention.value]
            _zero_sublayer(heads + list(dense_attention.head_rows.values()), dense_attention.output)
            continue
        query_rows = _slot_rows(attention.slots, attention.head_dim)
        kv_rows = _slot_rows(attention.kv_slots, attention.head_dim)
        pairs = [(dense_attention.query, attention.query, query_rows), (dense_attention.key, attention.key, kv_rows),
                 (dense_attention.value, attention.value, kv_rows)]
        pairs += [(dense_attention.head_rows[path], module, query_rows)
                  for path, module in attention.head_rows.items()]
        for dense_linear, linear, rows in pairs:
            _copy_rows(dense_linear, linear, *rows)
        _copy_cols(dense_attention.output, attention.output, *query_rows)
    if dense.has_ffn and not small.has_ffn:  # removed at compaction
        _zero_sublayer(dense.ffn_inputs, dense.ffn_output)
    if small.has_ffn:
        kept = torch.arange(small.ffn_input.out_features)  # neurons are interchangeable: pack them first
        for dense_linear, linear in zip(dense.ffn_inputs, small.ffn_inputs, strict=True):
            _copy_rows(dense_linear, linear, kept, kept)
        _copy_cols(dense.ffn_output, small.ffn_output, kept, kept)


def _copy_rows(dense: nn.Linear, small: nn.Linear, small_rows: torch.Tensor, dense_rows: torch.Tensor) -> None:
    dense.weight.zero_()
    dense.weight[dense_rows] = small.weight[small_rows]
    if dense.bias is not None:
        dense.bias.zero_()
        dense.bias[dense_rows] = small.bias[small_rows]


def _copy_cols(dense: nn.Linear, small: nn.Linear, small_cols: torch.Tensor, dense_cols: torch.Tensor) -> None:
    dense.weight.zero_()
    dense.weight[:, dense_cols] = small.weight[:, small_cols]
    if dense.bias is not None:
        dense.bias.copy_(small.bias)


@torch.no_grad()
def export_dense(model: nn.Module, save_directory: str | os.PathLike, processing_class=None) -> nn.Module:
    """Save a full-size, zero-padded copy of a pruned model that plain `from_pretrained` loads (no remote code).

    The copy computes the same function as the pruned model but is not faster: use it only for tools that cannot run
    remote code.

    Args:
        model (`nn.Module`): a masked or compacted model.
        save_directory (`str` or `os.PathLike`): where to save.
        processing_class (*optional*): a tokenizer or processor to save alongside.

    Returns:
        `nn.Module`: the dense model that was saved.

    Raises:
        `ValueError`: a parameter or buffer holds NaN or inf values (nothing is written).

    Example:
        >>> import tempfile
        >>> import torch
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> from hf_blockprune import BlockPruningConfig, apply_block_pruning, export_dense
        >>> model = BertForSequenceClassification(BertConfig(
        ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37))
        >>> config = BlockPruningConfig.from_preset("struct", initial_threshold=0.5, mask_init_value=1.0)
        >>> model = apply_block_pruning(model, config).eval()  # a block is kept while sigmoid(score) > 0.5
        >>> inputs = torch.tensor([[1, 2, 3, 4]])
        >>> with torch.no_grad():  # as training could leave them: 2 heads of layer 0 below the threshold
        ...     model.bert.encoder.layer[0].attention.self.query.scores_module.scores[:2] = -1.0
        ...     masked_logits = model(input_ids=inputs).logits
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = export_dense(model, tmp)
        ...     dense = BertForSequenceClassification.from_pretrained(tmp)  # plain transformers, no remote code
        >>> query = dense.bert.encoder.layer[0].attention.self.query
        >>> query.weight.shape, bool((query.weight[:16] == 0).all())  # full size, the 2 pruned heads zero
        (torch.Size([32, 32]), True)
        >>> with torch.no_grad():
        ...     torch.allclose(dense(input_ids=inputs).logits, masked_logits, atol=1e-5)
        True
    """
    compacted = compacted_copy(model)
    base = plain_class(type(compacted))
    dense = base(dense_config(compacted.config)).to(dtype=next(compacted.parameters()).dtype)
    small_state = {k: v for k, v in compacted.state_dict().items()}
    dense_state = dense.state_dict()
    for key, value in small_state.items():
        if key in dense_state and dense_state[key].shape == value.shape:
            dense_state[key].copy_(value)
    # fused projections and Conv1D are scattered part by part, as nn.Linear
    structure = structure_of(compacted)
    structure_of(dense, structure.patterns)  # the dense layers: the same stacks, every head (no layout)
    small_layers, dense_layers = split_projections(compacted), split_projections(dense)
    for small, full in zip(small_layers, dense_layers, strict=True):
        _scatter_layer(full, small)
    fuse_projections(dense)
    refuse_non_finite(dense, save_directory)
    with atomic_directory(save_directory) as staging:
        dense.save_pretrained(staging)
        if processing_class is not None:
            processing_class.save_pretrained(staging)
    return dense


def dense_config(config) -> transformers.PretrainedConfig:
    """A copy of a compacted model's config that describes the original dense model (plain class, no layout)."""
    config = copy.deepcopy(config)
    config.__class__ = base_class(type(config))
    for key in (LAYOUT_ATTRIBUTE, PRUNING_CONFIG_KEY, STAGES_KEY, "auto_map"):
        if hasattr(config, key):
            delattr(config, key)
    return config


def read_model_config(path: str | os.PathLike) -> transformers.PretrainedConfig:
    """The model config of a local folder (or Hub id), with a clear error when there is none.

    Reads what plain `AutoConfig` refuses without remote code: compacted models (`blockpruned_<type>`, given their
    `BlockPruned` config class) and masked training checkpoints (their real model type restored).
    """
    if os.path.exists(path) and not (Path(path) / "config.json").is_file():
        raise ValueError(f"{path} has no config.json: it is not a saved model folder.")
    looks_local = Path(path).is_absolute() or str(path).startswith((".", "~")) or str(path).count("/") > 1
    if looks_local and not os.path.exists(path):
        raise ValueError(f"{path} does not exist.")
    try:
        config_dict, _ = transformers.PretrainedConfig.get_config_dict(path)
        config_class = _config_class(config_dict)
        if config_class is None:  # a model type transformers does not know (e.g. remote code): AutoConfig decides
            return transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ValueError(f"Cannot read a model config from {path}: {error}") from None
    return config_class.from_dict(config_dict, name_or_path=str(path))


def _config_class(config_dict: dict) -> type | None:
    """The config class for a saved config dict (unmarked in place if it is a masked checkpoint's), or `None`."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    record = config_dict.pop(MASKED_RECORD_KEY, None)
    if config_dict.get("model_type") == MASKED_MODEL_TYPE and isinstance(record, dict):
        config_dict["model_type"] = record.get("model_type")
        if record.get("auto_map"):
            config_dict["auto_map"] = record["auto_map"]
    model_type = base_model_type(config_dict.get("model_type"))
    if model_type not in CONFIG_MAPPING:
        return None
    config_dict.pop("model_type")
    if config_dict.get(LAYOUT_ATTRIBUTE) is not None:
        return block_pruned_config_class(CONFIG_MAPPING[model_type])
    return CONFIG_MAPPING[model_type]


def mark_masked_checkpoint(save_directory: str | os.PathLike) -> None:
    """Give the `config.json` of a masked checkpoint a model type plain transformers refuses (the real one kept).

    Plain `from_pretrained` would otherwise build the dense model and re-initialise every masked layer (their weights
    are saved under other names, next to the scores). `read_model_config` undoes the mark.
    """
    path = Path(save_directory) / "config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    if config.get("model_type") == MASKED_MODEL_TYPE:
        return
    config[MASKED_RECORD_KEY] = {"model_type": config.get("model_type"), "auto_map": config.pop("auto_map", None)}
    config["model_type"] = MASKED_MODEL_TYPE
    temporary = path.with_name(f".{path.name}.blockprune-tmp")
    temporary.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, path)


def _save_pretrained(self, save_directory, is_main_process: bool = True, state_dict=None, **kwargs):
    """`save_pretrained` of a model in a save mode (see `checkpoint_on_save` and `compact_on_save`)."""
    if getattr(self, "_blockprune_compact_on_save", False):
        if not is_main_process:
            return
        if state_dict is not None:
            logger.info("Compacting from the live model; the state_dict passed to save_pretrained is not used.")
        save_compacted(self, save_directory)
        return
    saving_of = type(self)._blockprune_saving_of
    if is_main_process and is_block_pruned(self):
        refuse_non_finite(self, save_directory)  # e.g. `save_model()` after a run stopped on NaN scores
    wrapper = model_wrapper(self) or ModelWrapper()
    wrapper.save_pretrained(saving_of, self, save_directory, is_main_process, state_dict, **kwargs)
    if is_main_process and is_block_pruned(self):
        mark_masked_checkpoint(save_directory)
        wrapper.after_checkpoint_save(self, save_directory)  # e.g. a PEFT model's scores beside its adapters


_SAVING_CLASSES: dict[type, type] = {}


def _set_save_mode(model: nn.Module, compact: bool) -> nn.Module:
    current = getattr(type(model), "_blockprune_saving_of", type(model))
    if current not in _SAVING_CLASSES:
        # the same name (and module) as the class it extends: transformers reads class names (e.g. causal-LM checks)
        _SAVING_CLASSES[current] = type(
            current.__name__,
            (current,),
            {
                "save_pretrained": _save_pretrained,
                **{name: method for wrapper in MODEL_WRAPPERS if wrapper.applies_to_class(current)
                   for name, method in wrapper.class_methods(current).items()},
                "_blockprune_saving_of": current,
                "_blockprune_base": plain_class(current),
                "__module__": current.__module__,
                "__qualname__": current.__qualname__,
                "__doc__": current.__doc__,
            },
        )
    model.__class__ = _SAVING_CLASSES[current]
    model._blockprune_compact_on_save = compact
    return model


def checkpoint_on_save(model: nn.Module) -> nn.Module:
    """Make `model.save_pretrained` (hence the Trainer's checkpoints) write a marked masked checkpoint, in place.

    The weights and scores are saved as usual, for resuming; `config.json` then gets the model type
    `blockprune_masked_checkpoint` (see `mark_masked_checkpoint`). The trainer and the callback call this when training
    starts.
    """
    return _set_save_mode(model, compact=False)


def compact_on_save(model: nn.Module) -> nn.Module:
    """Make `model.save_pretrained` (hence `Trainer.save_model`) write the compacted model, in place.

    The model stays masked (it can still be evaluated or trained); only what it saves changes. `restore_save` undoes
    it. The trainer and the callback call this when training ends, so checkpoints written during training keep their
    scores (for resuming) and the final `trainer.save_model()` writes the small model.
    """
    return _set_save_mode(model, compact=True)


def restore_save(model: nn.Module) -> nn.Module:
    """Undo `checkpoint_on_save` or `compact_on_save`: the model gets its own class and `save_pretrained` again."""
    saving_of = getattr(type(model), "_blockprune_saving_of", None)
    if saving_of is not None:
        model.__class__ = saving_of
        model.__dict__.pop("_blockprune_compact_on_save", None)
    return model

"""`BlockPruningConfig`: every knob of block movement pruning in one dataclass."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

PRUNING_METHODS = ("topk", "sigmoid_threshold")
MASK_INITS = ("constant", "fisher")
SPEEDUP_COST_MODELS = ("flops", "latency")
ATTENTION_GRANULARITIES = ("block", "head")
FFN_GRANULARITIES = ("neuron", "block")

# Values a method implies when neither the user nor a preset sets them. For `topk` the threshold is the kept
# fraction of blocks (1.0 keeps everything); for `sigmoid_threshold` it is compared with `sigmoid(score)`.
METHOD_DEFAULTS: dict[str, dict[str, float]] = {
    "topk": {"initial_threshold": 1.0, "final_threshold": 0.5, "final_lambda": 0.0},
    "sigmoid_threshold": {"initial_threshold": 0.0, "final_threshold": 0.1, "final_lambda": 50.0},
}

# With a target density, soft movement pruning keeps a block when its score is positive and starts every score at
# 0.5: a block needs ~50 steps of consistent push at the default mask learning rate to leave (or come back), short
# enough for runs of a few hundred steps and long enough that one noisy batch does not flip it.
TARGET_DEFAULTS: dict[str, float] = {"initial_threshold": 0.5, "final_threshold": 0.5, "mask_init_value": 0.5}

# The paper's recipes (Lagunas et al. 2021, section 4): what each preset sets unless the user overrides it.
PRESETS: dict[str, dict[str, Any]] = {
    "hybrid": {
        "pruning_method": "sigmoid_threshold",
        "attention_granularity": "block",
        "attention_block_size": [32, 32],
        "ffn_granularity": "neuron",
    },
    "struct": {
        "pruning_method": "sigmoid_threshold",
        "attention_granularity": "head",
        "ffn_granularity": "neuron",
    },
    "block": {
        "pruning_method": "sigmoid_threshold",
        "attention_granularity": "block",
        "attention_block_size": [32, 32],
        "ffn_granularity": "block",
        "ffn_block_size": [32, 32],
    },
}

PRESETS["hybrid-filled"] = {**PRESETS["hybrid"], "fill_after": 0.8}

# `pruning_preset="none"`: fine-tune (and distil) without pruning, e.g. the second stage on a compacted model.
NO_PRUNING = "none"

# The fields that ask for pruning. A config that sets none of them (e.g. a script's `HfArgumentParser` given no pruning
# flag) prunes nothing; the others (distillation, custom module names) are meaningful without pruning.
PRUNING_FIELDS = (
    "pruning_method", "attention_granularity", "attention_block_size", "ffn_granularity", "ffn_block_size",
    "initial_threshold", "final_threshold", "final_lambda", "mask_init_value", "mask_init", "fill_after",
    "target_density", "target_density_attention", "target_density_ffn", "target_density_hidden", "target_speedup",
    "snapshot_densities",
    "snapshot_speedups",
)

# Defaults for the fields a preset may set, applied last.
_FALLBACKS: dict[str, Any] = {
    "pruning_method": "sigmoid_threshold",
    "attention_granularity": "block",
    "attention_block_size": [32, 32],
    "ffn_granularity": "neuron",
    "ffn_block_size": [32, 32],
    "mask_init": "constant",
}


@dataclass
class BlockPruningConfig:
    """Configuration of block movement pruning (Lagunas et al., *Block Pruning For Faster Transformers*, 2021).

    Every field is also a command-line flag when the class is given to `transformers.HfArgumentParser`. Fields left
    at `None` take their value from `pruning_preset` if one is named, then from the pruning method's defaults.

    Args:
        pruning_preset (`str`, *optional*):
            One of the paper's recipes: `"hybrid"` (attention 32x32 blocks + FFN neurons), `"hybrid-filled"` (hybrid,
            then the surviving heads are made dense again for the last 20% of training), `"struct"` (whole heads +
            FFN neurons) or `"block"` (32x32 blocks everywhere). Explicitly set fields override the preset.
            `"none"` prunes nothing: the trainer and the callback then fine-tune (and distil, with a teacher) as a
            plain Trainer would, and a compacted model keeps its layout and loading code when saved. A config that
            names no preset and sets no pruning field (method, granularity, threshold, lambda, target, `fill_after`)
            is `"none"` too, so a script whose parser holds `BlockPruningConfig` runs unpruned without pruning flags.
        pruning_method (`str`, *optional*, defaults to `"sigmoid_threshold"`):
            `"topk"` keeps the top fraction of blocks of each matrix by score (hard movement pruning; the
            threshold is that fraction) or `"sigmoid_threshold"` keeps a block when `sigmoid(score) > threshold`
            (soft movement pruning, driven by the regularization).
        attention_granularity (`str`, *optional*, defaults to `"block"`):
            `"block"`: one score per `attention_block_size` block of Q, K, V and the output projection;
            `"head"`: one score per head, shared by its Q, K and V rows and its output-projection columns.
        attention_block_size (`list[int]`, *optional*, defaults to `[32, 32]`):
            `(rows, cols)` of an attention block; must divide the attention matrices.
        ffn_granularity (`str`, *optional*, defaults to `"neuron"`):
            `"neuron"`: one score per FFN neuron, shared by row i of the FFN input projection and column i of the
            output projection; `"block"`: one score per `ffn_block_size` block of each FFN matrix.
        ffn_block_size (`list[int]`, *optional*, defaults to `[32, 32]`):
            `(rows, cols)` of an FFN block when `ffn_granularity="block"`.
        ffn_round_to (`int`, *optional*, defaults to 1):
            Keep a multiple of this many FFN neurons in every layer (e.g. 8 or 64, the tile of an accelerator's
            matrix units): each layer's count is rounded to the nearest multiple, the highest-scored neurons kept (a
            layer that keeps all its neurons keeps them all). Densities and targets then land within half a multiple
            per layer. Neuron granularity only.
        prune_hidden (`bool`, *optional*, defaults to `False`):
            Also prune channels of the hidden size (the residual stream that every layer reads and writes): one score
            per channel for the whole model, under the same method, schedule and penalty as the other scores.
            Exact: while masked, the norms of the stream normalize over the kept channels only, and compaction
            slices the embeddings, norms and every projection that reads or writes the stream (see
            `hf_blockprune.pruning.norm`). Refused, before anything changes, for a model where that would not be
            exact, or whose output is the stream itself (a bare encoder, a sentence-transformers model); not yet
            with a target density or speedup, nor with layer-wise distillation.
        initial_threshold (`float`, *optional*):
            Threshold during the initial warmup (top-k: 1.0, sigmoid: 0.0).
        final_threshold (`float`, *optional*):
            Threshold reached at the end of the cubic schedule (top-k: 0.5, sigmoid: 0.1).
        initial_warmup (`float`, *optional*, defaults to 0.1):
            Fraction of the training steps spent at `initial_threshold` before the cubic schedule starts.
        final_warmup (`float`, *optional*, defaults to 0.3):
            Fraction of the training steps spent at `final_threshold` at the end of training.
        final_lambda (`float`, *optional*):
            Weight of the L1 penalty on `sigmoid(scores)` once ramped in (top-k: 0, sigmoid: 50). It ramps in on
            the same cubic curve as the threshold.
        mask_scores_learning_rate (`float`, *optional*, defaults to 1e-2):
            Learning rate of the mask scores, independent of the model's (the paper uses 1e-2 vs 3e-5).
        mask_init_value (`float`, *optional*):
            Initial value of every score: 0.0 (sigmoid 0.5 keeps every block at the start), or 0.5 with a target
            density and soft movement pruning (the threshold is then 0.5 throughout, i.e. a block is kept while its
            score is positive).
        mask_init (`str`, *optional*, defaults to `"constant"`):
            How the scores start: `"constant"` (every score at `mask_init_value`) or `"fisher"`: before the first
            step, the Fisher information of every block's mask is measured on `calibration_examples` training
            examples (the squared gradient of the loss with respect to the mask, summed over batches; see
            `hf_blockprune.pruning.importance`), and each score starts at `mask_init_value + r`, `r` its importance
            rank among the scores of its kind (attention or FFN) scaled to [-1, 1] (with a fixed `final_lambda`
            and soft movement pruning, where the cut stays at the constant start, `mask_init_value + (r + 1)`, so that
            no block starts below it). A short run then starts from a sensible ranking instead of a tie. It helps
            where the model already knows the task (a fine-tuned model pruned with distillation: +1.8 points on
            SST-2 at 3x) and hurts where its head is untrained (the ranking is then noise that the run must undo).
            A resumed run keeps its checkpoint's scores.
        calibration_examples (`int`, *optional*, defaults to 256):
            Training examples (a seeded random subset, in batches of the training batch size) that
            `mask_init="fisher"` measures the importance on.
        target_density (`float`, *optional*):
            Fraction of prunable weights to keep at the end, instead of a fixed `final_lambda`. Top-k keeps exactly
            that fraction of each matrix; soft movement pruning steers a Lagrange multiplier on the expected density
            (see `hf_blockprune.pruning.targets`). The target follows the cubic schedule from 1.
        target_density_attention (`float`, *optional*):
            Target for the attention blocks alone (with or without `target_density_ffn`; not with `target_density`).
        target_density_ffn (`float`, *optional*):
            Target for the FFN blocks alone.
        target_density_hidden (`float`, *optional*):
            With `prune_hidden` and a target: the fraction of hidden channels to keep. By default the hidden size
            takes half of the reduction on a log scale: `sqrt(target_density)` of its channels, or `1 /
            sqrt(target_speedup)`; the heads and neurons then take what is left (`target_density` divided by the
            hidden fraction, or the densities that meet the speedup at that hidden width). The target densities of
            attention and FFN blocks count their blocks at full width, the hidden fraction apart.
        target_speedup (`float`, *optional*):
            Wished speedup on the FLOPs cost model (`hf_blockprune.compact.flops`), turned into one target density for
            attention and FFN at the start of training; not with the target densities.
            The cost counts what compaction keeps: with blocks inside heads (`hybrid`) or neurons (`block`), the cut
            is placed on the heads and neurons that keep a surviving block (a head costs its whole size while any of
            its value and output blocks survives), so the saved model has the asked cost; a kept head or neuron
            keeps all of its blocks. Not with `pruning_method="topk"` and blocks (refused: top-k cannot place that
            cut).
        speedup_sequence_length (`int`, *optional*, defaults to 128):
            Sequence length at which `target_speedup` is computed (attention scores grow with its square).
        speedup_cost_model (`str`, *optional*, defaults to `"flops"`):
            What `target_speedup` is a ratio of: `"flops"` (the FLOPs cost model, the same on every machine) or
            `"latency"`: time measured on the training device when training starts, at `speedup_batch_size` x
            `speedup_sequence_length` tokens (a table of compacted variants of the model, see
            `hf_blockprune.compact.latency`; saved as `latency_table.json` in the output directory), so that the
            saved model is `target_speedup` times faster in measured time at that shape on that kind of device.
        speedup_batch_size (`int`, *optional*, defaults to 1):
            Batch size the latency table is measured at (`speedup_cost_model="latency"`).
        latency_table (`str`, *optional*):
            Path of a latency table saved by an earlier run (or `hf_blockprune.compact.latency.LatencyTable.save`)
            to use instead of measuring one.
        snapshot_densities (`list[float]`, *optional*):
            Also save the model compacted, into `<output_dir>/snapshot-density-<d>`, the first time the target's
            schedule reaches each of these densities (several sparsity levels from one run; see
            `hf_blockprune.training.snapshots`). Needs `target_density` or `target_speedup`; each value between the
            final target and 1.
        snapshot_speedups (`list[float]`, *optional*):
            The same at the densities where the cost model gives these speedups, into
            `<output_dir>/snapshot-speedup-<s>x`. Needs `target_speedup`; each value in (1, `target_speedup`].
        teacher_model (`str`, *optional*):
            Path or Hub id of a dense teacher fine-tuned on the same task, to distil from while pruning (or pass a
            model as `teacher_model=` to the trainer or callback).
        distillation_alpha (`float`, *optional*, defaults to 0.9):
            Weight of the distillation term: `alpha * KD + (1 - alpha) * task loss` (the paper's 0.9).
        distillation_temperature (`float`, *optional*, defaults to 2.0):
            Softmax temperature `T` of the distillation term (the paper's 2).
        layer_distillation_weight (`float`, *optional*, defaults to 0.0):
            Weight `beta` of layer-wise distillation (as in CoFi, Xia et al. 2022): `beta` times the mean, over the
            layers, of the relative squared distance `||h_s - h_t||^2 / ||h_t||^2` between the student's and the
            teacher's hidden states after each layer (non-padding positions), added to the loss. Needs a teacher
            with the student's number of layers and hidden size (pruning keeps both). 0 switches it off.
        target_rate (`float`, *optional*, defaults to 0.05):
            Step size of the log-multiplier update per optimizer step: with a 10% relative density gap the
            multiplier grows by 0.5% per step, i.e. doubles in about 140 steps.
        target_penalty_ratio (`float`, *optional*, defaults to 1.0):
            With a target and soft movement pruning: the most the penalty may pull on the scores, as a multiple of
            the task loss's pull (gradient norms over each group's scores); the multiplier is held below it. It keeps
            the multiplier from running away while the expected density lags the schedule (the scores cannot move
            faster than their learning rate), so the task, not the penalty, ranks the scores (see
            `hf_blockprune.pruning.targets`). 0 removes the bound.
        target_per_stack (`bool`, *optional*, defaults to `True`):
            In a model with several layer stacks (an encoder and a decoder), each stack meets the target density
            on its own (one score cut per stack), so that no stack can lose all its blocks; `False` shares one cut
            across the stacks, letting the scores decide how much each keeps (a stack may then be emptied).
        fill_after (`float`, *optional*):
            Hybrid-filled: fraction of the training steps after which the heads that survived become dense again
            (their masked blocks restart from zero and train), dead heads stay removed, the FFN masks are frozen and
            the regularization stops. Must be at least `1 - final_warmup`, when the threshold has reached its final
            value. `None` (default): no filled stage, unless the preset has one; `1.0` switches it off whatever the
            preset (on `"hybrid-filled"`, a `None` takes the preset's 0.8).
        fill_learning_rate (`float`, *optional*):
            Learning rate of the model's weights when the filled stage starts (the paper fine-tunes the filled model
            at 3e-5); the Trainer's schedule then goes on from it (a linear decay reaches 0 at the end, as before).
            `None` (default): the schedule goes on unchanged. Only with a filled stage.
        layers_pattern (`str`, *optional*):
            For architectures without a built-in map: dotted path (suffix) of the `nn.ModuleList` of layers.
        attention_modules (`list[str]`, *optional*):
            With `layers_pattern`: the Q, K, V and output projection names, relative to a layer; or two names, a
            fused QKV projection (its outputs: the query heads, then the keys, then the values, as GPT-2's `c_attn`)
            and the output projection. `nn.Linear` or transformers' `Conv1D`.
        ffn_modules (`list[str]`, *optional*):
            With `layers_pattern`: the FFN input projection name(s) then the output projection name, relative to a
            layer: two names for a classic FFN (`fc1 fc2`), three for a gated MLP (`gate_proj up_proj down_proj`).
        num_heads_attribute (`str`, *optional*, defaults to `"num_attention_heads"`):
            With `layers_pattern`: the model-config attribute holding the number of (query) heads.
        num_kv_heads_attribute (`str`, *optional*):
            With `layers_pattern`: the model-config attribute holding the number of key/value heads, for grouped-query
            attention (e.g. `"num_key_value_heads"`); `None`: as many as query heads.

    Example:
        >>> from hf_blockprune import BlockPruningConfig
        >>> config = BlockPruningConfig.from_preset("hybrid", attention_block_size=[8, 8])
        >>> config.pruning_method, config.attention_granularity, config.attention_block_size, config.ffn_granularity
        ('sigmoid_threshold', 'block', [8, 8], 'neuron')
        >>> config.final_threshold, config.final_lambda  # the method's defaults: no field sets them
        (0.1, 50.0)
        >>> BlockPruningConfig.from_preset("struct", target_density=0.5).mask_init_value  # with a target: from 0.5
        0.5
        >>> BlockPruningConfig().enabled  # no preset and no pruning field: prunes nothing
        False
    """

    pruning_preset: str | None = field(
        default=None,
        metadata={
            "help": "Paper recipe: hybrid, hybrid-filled, struct or block; none (the default when no pruning flag is "
                    "given) fine-tunes without pruning.",
            "choices": sorted(PRESETS) + [NO_PRUNING],
        },
    )
    pruning_method: str | None = field(
        default=None,
        metadata={"help": "topk (hard movement) or sigmoid_threshold (soft movement).", "choices": PRUNING_METHODS},
    )
    attention_granularity: str | None = field(
        default=None, metadata={"help": "Attention scores per block or per head.", "choices": ATTENTION_GRANULARITIES}
    )
    attention_block_size: list[int] | None = field(
        default=None, metadata={"help": "Attention block shape as two ints: rows cols (e.g. 32 32)."}
    )
    ffn_granularity: str | None = field(
        default=None, metadata={"help": "FFN scores per neuron or per block.", "choices": FFN_GRANULARITIES}
    )
    ffn_block_size: list[int] | None = field(
        default=None, metadata={"help": "FFN block shape as two ints when ffn_granularity=block."}
    )
    ffn_round_to: int = field(
        default=1, metadata={"help": "Keep a multiple of this many FFN neurons per layer (e.g. 8; 1: any count)."}
    )
    prune_hidden: bool = field(
        default=False,
        metadata={"help": "Also prune channels of the hidden size (the residual stream), one score per channel for "
                          "the whole model; exact (the norms normalize over the kept channels)."},
    )
    initial_threshold: float | None = field(default=None, metadata={"help": "Threshold before the cubic schedule."})
    final_threshold: float | None = field(default=None, metadata={"help": "Threshold at the end of the schedule."})
    initial_warmup: float = field(
        default=0.1, metadata={"help": "Fraction of training steps held at initial_threshold."}
    )
    final_warmup: float = field(default=0.3, metadata={"help": "Fraction of training steps held at final_threshold."})
    final_lambda: float | None = field(
        default=None, metadata={"help": "Final weight of the L1 regularization on sigmoid(scores)."}
    )
    mask_scores_learning_rate: float = field(default=1e-2, metadata={"help": "Learning rate of the mask scores."})
    mask_init_value: float | None = field(default=None, metadata={"help": "Initial value of the mask scores."})
    mask_init: str | None = field(
        default=None,
        metadata={"help": "How the scores start: constant (mask_init_value) or fisher (ranked by the Fisher "
                          "information of each block's mask on calibration_examples training examples).",
                  "choices": MASK_INITS},
    )
    calibration_examples: int = field(
        default=256, metadata={"help": "Training examples mask_init=fisher measures the importance on."}
    )
    fill_after: float | None = field(
        default=None,
        metadata={"help": "Hybrid-filled: fraction of training after which surviving heads are made dense again."},
    )
    fill_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the weights from the start of the filled stage (the paper's 3e-5)."},
    )
    target_density: float | None = field(
        default=None, metadata={"help": "Fraction of prunable weights to keep (instead of final_lambda)."}
    )
    target_density_attention: float | None = field(
        default=None, metadata={"help": "Fraction of attention weights to keep."}
    )
    target_density_ffn: float | None = field(default=None, metadata={"help": "Fraction of FFN weights to keep."})
    target_density_hidden: float | None = field(
        default=None,
        metadata={"help": "With prune_hidden and a target: fraction of hidden channels to keep (default: the square "
                          "root of the target density, or 1 / sqrt(target_speedup))."},
    )
    target_speedup: float | None = field(
        default=None, metadata={"help": "Wished speedup on the FLOPs cost model (sets the target densities)."}
    )
    speedup_sequence_length: int = field(
        default=128, metadata={"help": "Sequence length for the target_speedup cost model."}
    )
    speedup_cost_model: str = field(
        default="flops",
        metadata={"help": "What target_speedup is a ratio of: flops (cost model) or latency (measured on the training "
                          "device at speedup_batch_size x speedup_sequence_length).", "choices": SPEEDUP_COST_MODELS},
    )
    speedup_batch_size: int = field(default=1, metadata={"help": "Batch size of the latency cost model."})
    latency_table: str | None = field(
        default=None, metadata={"help": "A saved latency table to use instead of measuring one."}
    )
    target_rate: float = field(default=0.05, metadata={"help": "Step size of the density controller."})
    target_penalty_ratio: float = field(
        default=1.0,
        metadata={"help": "Bound of the density multiplier: the penalty's pull on the scores at most this times the "
                          "task loss's (0: no bound)."},
    )
    target_per_stack: bool = field(
        default=True,
        metadata={"help": "With several layer stacks (encoder, decoder): each stack meets the target on its own."},
    )
    snapshot_densities: list[float] | None = field(
        default=None,
        metadata={"help": "Also save compacted snapshots when the schedule reaches these densities."},
    )
    snapshot_speedups: list[float] | None = field(
        default=None,
        metadata={"help": "Also save compacted snapshots when the schedule reaches these speedups (target_speedup)."},
    )
    teacher_model: str | None = field(
        default=None, metadata={"help": "Path or Hub id of a dense teacher to distil from."}
    )
    distillation_alpha: float = field(default=0.9, metadata={"help": "Weight of the distillation loss."})
    distillation_temperature: float = field(default=2.0, metadata={"help": "Distillation softmax temperature."})
    layer_distillation_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of layer-wise distillation: the relative distance of the student's hidden states "
                          "to the teacher's, after every layer (0: off)."},
    )
    layers_pattern: str | None = field(
        default=None, metadata={"help": "Custom architectures: path suffix of the ModuleList of layers."}
    )
    attention_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Custom architectures: Q K V O module names relative to a layer (or fused QKV, then O)."},
    )
    ffn_modules: list[str] | None = field(
        default=None, metadata={"help": "Custom architectures: FFN in and out module names relative to a layer."}
    )
    num_heads_attribute: str = field(
        default="num_attention_heads", metadata={"help": "Custom architectures: config attribute with the head count."}
    )
    num_kv_heads_attribute: str | None = field(
        default=None,
        metadata={"help": "Custom architectures, grouped-query attention: config attribute with the KV head count."},
    )

    def __post_init__(self):
        self._validate_finite()
        if self._resolve_no_pruning():
            if self.ffn_round_to != 1:
                raise ValueError("`ffn_round_to` rounds the kept FFN neurons: it needs a pruning preset.")
            if self.prune_hidden:
                raise ValueError("`prune_hidden` prunes channels of the hidden size: it needs a pruning preset.")
            self._validate_fractions()
            self._validate_distillation()
            self._validate_custom_modules()
            self._validate_fill_learning_rate()
            return
        self._resolve_defaults()
        self._validate_choices()
        self._validate_block_sizes()
        self._validate_rounding()
        self._validate_schedule()
        self._validate_targets()
        self._validate_hidden()
        self._validate_snapshots()
        self._validate_custom_modules()
        self._validate_fill_learning_rate()

    def _validate_fill_learning_rate(self):
        if self.fill_learning_rate is None:
            return
        if not self.fill_learning_rate > 0:
            raise ValueError(f"`fill_learning_rate` must be > 0, got {self.fill_learning_rate}.")
        if not self.fills:
            raise ValueError(
                "`fill_learning_rate` is the learning rate of the filled stage, and this config has none: use the "
                "'hybrid-filled' preset or set `fill_after` (e.g. 0.8), or leave `fill_learning_rate` out."
            )

    @property
    def enabled(self) -> bool:
        """Whether this config prunes (`False` for `pruning_preset="none"`)."""
        return self.pruning_preset != NO_PRUNING

    def _resolve_no_pruning(self) -> bool:
        given = [name for name in PRUNING_FIELDS if getattr(self, name) is not None]
        self.no_pruning_implied = self.pruning_preset is None and not given  # not a field: not saved, not a flag
        if self.no_pruning_implied:
            self.pruning_preset = NO_PRUNING
        if self.pruning_preset != NO_PRUNING:
            return False
        if given:
            raise ValueError(
                f"`pruning_preset='{NO_PRUNING}'` prunes nothing, but {', '.join(f'`{n}`' for n in given)} "
                "asks for pruning: name a preset (hybrid, hybrid-filled, struct, block) or drop those fields."
            )
        return True

    @property
    def fills(self) -> bool:
        """Whether training ends with the filled stage (`fill_after` set and below 1)."""
        return self.enabled and self.fill_after is not None and self.fill_after < 1.0

    @property
    def has_target(self) -> bool:
        """Whether a target density or speedup replaces the fixed regularization weight."""
        names = ("target_density", "target_density_attention", "target_density_ffn", "target_speedup")
        return any(getattr(self, name) is not None for name in names)

    def hidden_density(self) -> float | None:
        """With `prune_hidden` and a target: the fraction of hidden channels to keep (`target_density_hidden`, else
        half of the reduction on a log scale); `None` otherwise."""
        if not (self.prune_hidden and self.has_target):
            return None
        if self.target_density_hidden is not None:
            return self.target_density_hidden
        if self.target_speedup is not None:
            return 1.0 / math.sqrt(self.target_speedup)
        overall = self.target_density
        if overall is None:
            overall = min(value for value in (self.target_density_attention, self.target_density_ffn)
                          if value is not None)
        return math.sqrt(overall)

    def cuts_on_units(self, kind: str) -> bool:
        """Whether the `kind` (`"attention"` or `"ffn"`) blocks are cut on the units compaction keeps: a
        `target_speedup` with blocks inside heads or neurons (see `hf_blockprune.pruning.targets.UnitSet`). A unit
        kept by that cut keeps all of its blocks, since it costs its whole size in the compacted model."""
        granularity = self.attention_granularity if kind == "attention" else self.ffn_granularity
        return (self.enabled and self.target_speedup is not None and self.pruning_method == "sigmoid_threshold"
                and granularity == "block")

    def density_targets(self) -> dict[str, float]:
        """The final target per group: `{"all": t}` or `{"attention": a, "ffn": f}` (either may be absent); with
        `prune_hidden`, also `"hidden"` (the fraction of channels, see `hidden_density`), the others then divided by
        it (capped at 1)."""
        hidden = self.hidden_density()
        share = 1.0 if hidden is None else hidden
        if self.target_density is not None:
            targets = {"all": min(self.target_density / share, 1.0)}
        else:
            pairs = (("attention", self.target_density_attention), ("ffn", self.target_density_ffn))
            targets = {group: min(value / share, 1.0) for group, value in pairs if value is not None}
        if hidden is not None:
            targets["hidden"] = hidden
        return targets

    def _validate_targets(self):
        for name in ("target_density", "target_density_attention", "target_density_ffn"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"`{name}` is a fraction of weights kept and must be in (0, 1], got {value}.")
        per_kind = self.target_density_attention is not None or self.target_density_ffn is not None
        if self.target_density is not None and per_kind:
            raise ValueError(
                "`target_density` sets one target for all blocks; use it or `target_density_attention` / "
                "`target_density_ffn`, not both."
            )
        if self.target_speedup is not None:
            if not self.target_speedup > 1.0:
                raise ValueError(f"`target_speedup` must be > 1, got {self.target_speedup}.")
            if self.target_density is not None or per_kind:
                raise ValueError("`target_speedup` sets the target densities itself; do not also give them.")
            blocks = [kind for kind, granularity in (("attention", self.attention_granularity),
                                                      ("ffn", self.ffn_granularity)) if granularity == "block"]
            if self.pruning_method == "topk" and blocks:
                raise ValueError(
                    f"`target_speedup` with pruning_method='topk' and {' and '.join(blocks)} blocks cannot keep its "
                    "promise: top-k keeps a fraction of the blocks of each matrix, and compaction keeps every head or "
                    "neuron with a surviving block, so the saved model would be much slower than asked. Use "
                    "pruning_method='sigmoid_threshold' (the presets' default: the cut is then placed on the heads "
                    "and neurons compaction keeps), or head/neuron granularity (`struct`), or a `target_density`."
                )
        self._validate_distillation()

    def _validate_hidden(self):
        if self.target_density_hidden is not None:
            if not (self.prune_hidden and self.has_target):
                raise ValueError("`target_density_hidden` is the hidden share of a target: it needs `prune_hidden` "
                                 "and a `target_density` or `target_speedup`.")
            if not 0.0 < self.target_density_hidden <= 1.0:
                raise ValueError("`target_density_hidden` is a fraction of hidden channels kept and must be in "
                                 f"(0, 1], got {self.target_density_hidden}.")
        if not self.prune_hidden:
            return
        if self.target_speedup is not None and self.speedup_cost_model == "latency":
            raise ValueError(
                "`prune_hidden` with `speedup_cost_model='latency'` is not supported yet: the latency table times "
                "heads and neurons at the full hidden size. Use the FLOPs cost model (the default)."
            )
        if self.snapshot_densities or self.snapshot_speedups:
            raise ValueError(
                "`prune_hidden` with snapshots is not supported yet: when a snapshot is due depends on the hidden "
                "width and the heads and neurons together, which the snapshot schedule does not model. Drop "
                "`snapshot_densities` / `snapshot_speedups`, or save models of several speedups from separate runs."
            )
        if self.layer_distillation_weight > 0:
            raise ValueError(
                "`prune_hidden` with layer-wise distillation is not supported yet: the student's hidden states lose "
                "channels the teacher's keep. Set `layer_distillation_weight=0`."
            )

    def _validate_snapshots(self):
        densities, speedups = self.snapshot_densities or [], self.snapshot_speedups or []
        if not (densities or speedups):
            return
        if not self.has_target:
            raise ValueError(
                "`snapshot_densities` / `snapshot_speedups` are taken as the schedule of a target passes them: set "
                "`target_density` or `target_speedup`."
            )
        if densities and self.target_density is None and self.target_speedup is None:
            raise ValueError(
                "`snapshot_densities` need one target density for all blocks (`target_density` or `target_speedup`), "
                "not separate attention and FFN targets."
            )
        for value in densities:
            floor = self.target_density or 0.0
            if not floor <= value < 1.0:
                raise ValueError(f"A snapshot density must be in [target_density, 1) = [{floor:g}, 1), got {value}.")
        if speedups and self.target_speedup is None:
            raise ValueError("`snapshot_speedups` need `target_speedup` (the schedule is a speedup's).")
        for value in speedups:
            if not 1.0 < value <= self.target_speedup:
                raise ValueError(
                    f"A snapshot speedup must be in (1, target_speedup] = (1, {self.target_speedup:g}], got {value}."
                )

    def _validate_fractions(self):
        """The fields with defaults, checked whether or not the config prunes."""
        for name in ("initial_warmup", "final_warmup"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"`{name}` is a fraction of the training steps in [0, 1), got {getattr(self, name)}.")
        if self.initial_warmup + self.final_warmup >= 1.0:
            raise ValueError(
                f"`initial_warmup` + `final_warmup` must be below 1 to leave steps for the cubic schedule, got "
                f"{self.initial_warmup} + {self.final_warmup}."
            )
        if not self.mask_scores_learning_rate > 0.0:
            raise ValueError(f"`mask_scores_learning_rate` must be > 0, got {self.mask_scores_learning_rate}.")
        if self.speedup_sequence_length < 1:
            raise ValueError(f"`speedup_sequence_length` must be >= 1, got {self.speedup_sequence_length}.")
        if self.speedup_batch_size < 1:
            raise ValueError(f"`speedup_batch_size` must be >= 1, got {self.speedup_batch_size}.")
        if self.speedup_cost_model not in SPEEDUP_COST_MODELS:
            raise ValueError(
                f"`speedup_cost_model` must be one of {list(SPEEDUP_COST_MODELS)}, got {self.speedup_cost_model!r}."
            )
        if self.latency_table is not None and self.speedup_cost_model != "latency":
            raise ValueError("`latency_table` is the latency cost model's table: set `speedup_cost_model='latency'`.")
        if not self.target_rate > 0:
            raise ValueError(f"`target_rate` must be > 0, got {self.target_rate}.")
        if not self.target_penalty_ratio >= 0:
            raise ValueError(f"`target_penalty_ratio` must be >= 0 (0: no bound), got {self.target_penalty_ratio}.")
        if not (isinstance(self.calibration_examples, int) and self.calibration_examples >= 1):
            raise ValueError(f"`calibration_examples` must be an integer >= 1, got {self.calibration_examples!r}.")

    def _validate_distillation(self):
        if not 0.0 <= self.distillation_alpha <= 1.0:
            raise ValueError(f"`distillation_alpha` must be in [0, 1], got {self.distillation_alpha}.")
        if not self.distillation_temperature > 0:
            raise ValueError(f"`distillation_temperature` must be > 0, got {self.distillation_temperature}.")
        if not self.layer_distillation_weight >= 0:
            raise ValueError(f"`layer_distillation_weight` must be >= 0, got {self.layer_distillation_weight}.")

    def _validate_finite(self):
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"`{item.name}` must be a finite number, got {value}.")

    def _resolve_defaults(self):
        if self.pruning_preset is not None:
            if self.pruning_preset not in PRESETS:
                raise ValueError(
                    f"`pruning_preset` must be one of {sorted(PRESETS)}, got {self.pruning_preset!r}."
                )
            for name, value in PRESETS[self.pruning_preset].items():
                if getattr(self, name) is None:
                    setattr(self, name, list(value) if isinstance(value, list) else value)
        for name, value in _FALLBACKS.items():
            if getattr(self, name) is None:
                setattr(self, name, list(value) if isinstance(value, list) else value)
        if self.pruning_method == "sigmoid_threshold" and self.has_target:
            for name, value in TARGET_DEFAULTS.items():
                if getattr(self, name) is None:
                    setattr(self, name, value)
        if self.mask_init_value is None:
            self.mask_init_value = 0.0
        if self.pruning_method in METHOD_DEFAULTS:
            for name, value in METHOD_DEFAULTS[self.pruning_method].items():
                if getattr(self, name) is None:
                    setattr(self, name, value)

    def _validate_choices(self):
        for name, choices in (
            ("pruning_method", PRUNING_METHODS),
            ("mask_init", MASK_INITS),
            ("attention_granularity", ATTENTION_GRANULARITIES),
            ("ffn_granularity", FFN_GRANULARITIES),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"`{name}` must be one of {list(choices)}, got {getattr(self, name)!r}.")

    def _validate_rounding(self):
        if not (isinstance(self.ffn_round_to, int) and self.ffn_round_to >= 1):
            raise ValueError(f"`ffn_round_to` must be an integer >= 1, got {self.ffn_round_to!r}.")
        if self.ffn_round_to > 1 and self.ffn_granularity != "neuron":
            raise ValueError(
                f"`ffn_round_to={self.ffn_round_to}` rounds the kept FFN neurons, which needs "
                "`ffn_granularity='neuron'` (blocks do not remove whole neurons)."
            )

    def _validate_block_sizes(self):
        for name in ("attention_block_size", "ffn_block_size"):
            value = getattr(self, name)
            if len(value) != 2 or not all(isinstance(v, int) and v > 0 for v in value):
                raise ValueError(f"`{name}` must be two positive integers (rows, cols), got {value!r}.")
            setattr(self, name, [int(v) for v in value])

    def _validate_schedule(self):
        if self.pruning_method == "topk":
            for name in ("initial_threshold", "final_threshold"):
                if not 0.0 < getattr(self, name) <= 1.0:
                    raise ValueError(
                        f"`{name}` is the kept fraction of blocks with pruning_method='topk' and must be in (0, 1], "
                        f"got {getattr(self, name)}."
                    )
        else:
            for name in ("initial_threshold", "final_threshold"):
                if not 0.0 <= getattr(self, name) < 1.0:
                    raise ValueError(
                        f"`{name}` is compared with sigmoid(score) and must be in [0, 1), got {getattr(self, name)}."
                    )
        self._validate_fractions()
        if not (self.final_lambda >= 0.0 and math.isfinite(self.final_lambda)):
            raise ValueError(f"`final_lambda` must be a finite number >= 0, got {self.final_lambda}.")
        if not math.isfinite(self.mask_init_value):
            raise ValueError(f"`mask_init_value` must be a finite number, got {self.mask_init_value}.")
        if self.fill_after is not None and not (1.0 - self.final_warmup <= self.fill_after <= 1.0):
            raise ValueError(
                f"`fill_after` must be in [1 - final_warmup, 1) = [{1.0 - self.final_warmup:g}, 1) so that the masks "
                f"have reached the final threshold when the filled stage starts, or 1.0 for no filled stage; got "
                f"{self.fill_after}."
            )

    def _validate_custom_modules(self):
        given = [self.attention_modules is not None, self.ffn_modules is not None]
        if self.layers_pattern is None:
            if any(given):
                raise ValueError("`attention_modules` and `ffn_modules` need `layers_pattern` (the ModuleList path).")
            return
        if self.attention_modules is not None and len(self.attention_modules) not in (2, 4):
            raise ValueError(
                "`attention_modules` must name 4 modules (query key value output), or 2 (a fused query-key-value "
                f"projection, then output), got {self.attention_modules!r}."
            )
        if self.ffn_modules is not None and len(self.ffn_modules) < 2:
            raise ValueError(
                "`ffn_modules` must name the input projection(s) then the output projection (2 names, or 3 for a "
                f"gated MLP: gate up down), got {self.ffn_modules!r}."
            )
        if not any(given):
            raise ValueError("`layers_pattern` needs `attention_modules` and/or `ffn_modules`.")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> BlockPruningConfig:
        """Build the config of one of the paper's recipes (`"hybrid"`, `"struct"`, `"block"`), with overrides.

        Args:
            name (`str`): the preset name.
            **overrides: any other field of the config.
        """
        return cls(pruning_preset=name, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """Return the resolved fields as a plain, JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BlockPruningConfig:
        """Rebuild a config from `to_dict()` output, ignoring keys this version does not know."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

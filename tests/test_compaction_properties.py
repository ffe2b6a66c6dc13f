"""Property-based tests of compaction: for random block shapes, methods and masks, with empty first and last layers,
the compacted model (and its saved and reloaded copy, and a second round of pruning on it) computes what the masked
model computes, costs what the FLOPs model predicted, and BART generates the same tokens.

By default each property runs a fixed number of drawn cases (derandomized: the same cases on every run) plus the
explicit examples; set the environment variable `HF_BLOCKPRUNE_FUZZ_EXAMPLES` (e.g. 300) for that many randomized
cases per property, with shrinking of a failure.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

import hf_blockprune
from hf_blockprune import BlockPruningConfig, apply_block_pruning, compact_model, save_compacted
from hf_blockprune.compact.flops import model_flops
from hf_blockprune.pruning.layer import MaskedLinear
from hf_blockprune.pruning.model import block_scores, set_threshold
from hf_blockprune.structure.discovery import prunable_layers
from hf_blockprune.structure.model_structure import LAYOUT_ATTRIBUTE

from conftest import ARCHS, DECODERS, GATED_FFN, GENERATIVE, GROUPED, auto_class, tiny_config
from helpers import kill_scores, layer_map, model_inputs, model_outputs, without_dropped_layers

# Hypothesis keeps a cache in `.hypothesis/` under the working directory: keep the repository clean.
if "HYPOTHESIS_STORAGE_DIRECTORY" not in os.environ:
    set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "hf_blockprune_hypothesis"))

FUZZ_ENV = "HF_BLOCKPRUNE_FUZZ_EXAMPLES"
FUZZ_EXAMPLES = int(os.environ.get(FUZZ_ENV, "0")) or None
FUZZ = settings(
    deadline=None,
    derandomize=FUZZ_EXAMPLES is None,
    database=None,
    # Shrinking a failure costs minutes at a fraction of a second per example: only the long search shrinks.
    phases=[Phase.explicit, Phase.generate] + ([Phase.shrink] if FUZZ_EXAMPLES else []),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Sized so that the file runs in well under a minute on 2 busy CPU cores (one thread: about 0.2 s per forward and
# reload example, 0.4 s per two-round example, 0.3 s per generation example).
FORWARD_EXAMPLES = settings(FUZZ, max_examples=FUZZ_EXAMPLES or 50)
TWO_ROUND_EXAMPLES = settings(FUZZ, max_examples=FUZZ_EXAMPLES or 30)
GENERATE_EXAMPLES = settings(FUZZ, max_examples=FUZZ_EXAMPLES or 40)

HIDDEN, HEAD_DIM = 32, 8  # 4 heads of 8 in every tiny config
SEQ_LEN = 12  # of the FLOPs model
FFN_SIZE_FIELDS = {arch: ("intermediate_size",) for arch in ARCHS} | {
    "distilbert": ("hidden_dim",),
    "bart": ("encoder_ffn_dim", "decoder_ffn_dim"),
    "gpt2": ("n_inner",),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for these tiny models: on a busy machine, several threads waiting on each other make
    every small matmul (and so each generation) tens of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def divisors(n: int) -> list[int]:
    """The positive divisors of `n`."""
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class LayerKill:
    """What one layer loses entirely: the attention blocks in `attentions` (through their value rows or output
    columns), and with `ffn` every FFN neuron (through the input rows or the output columns)."""

    attentions: tuple[int, ...] = ()
    heads_via: str = "value"
    ffn: bool = False
    ffn_via: str = "input"


@dataclass(frozen=True)
class Round:
    """One round of masking: block shapes (`None`: whole heads / neurons), method, threshold, scores and kills."""

    attention_block: tuple[int, int] | None
    ffn_block: tuple[int, int] | None
    method: str
    threshold: float
    seed: int
    kills: tuple[LayerKill, ...]  # one per prunable layer (BART: encoder 0, 1, decoder 0, 1)

    def pruning_config(self, **extra) -> BlockPruningConfig:
        """The `BlockPruningConfig` of this round (with the fields `extra`, e.g. `prune_hidden=True`)."""
        return BlockPruningConfig(
            pruning_method=self.method,
            attention_granularity="head" if self.attention_block is None else "block",
            attention_block_size=list(self.attention_block or (1, 1)),
            ffn_granularity="neuron" if self.ffn_block is None else "block",
            ffn_block_size=list(self.ffn_block or (1, 1)),
            **extra,
        )


@dataclass(frozen=True)
class Case:
    """One drawn tiny model (architecture, FFN size, attention implementation) and its first round of masking."""

    arch: str
    ffn_size: int
    attn_implementation: str
    first: Round


def _layer_kills(num_attentions: int):
    return st.builds(
        LayerKill,
        attentions=st.sampled_from([(), *[(i,) for i in range(num_attentions)], tuple(range(num_attentions))]),
        heads_via=st.sampled_from(["value", "output"]),
        ffn=st.booleans(),
        ffn_via=st.sampled_from(["input", "output"]),
    )


@st.composite
def rounds(draw, arch: str, attention_sides: list[int], ffn_sides: list[int]) -> Round:
    """A random `Round` whose block sides are drawn from `attention_sides` and `ffn_sides` (or whole units), and which
    empties any part of every (first or last) layer of the encoder and decoder."""
    attention_block = draw(st.none() | st.tuples(st.sampled_from(attention_sides), st.sampled_from(attention_sides)))
    ffn_block = None  # a gated FFN is pruned by neurons only
    if arch not in GATED_FFN:
        ffn_block = draw(st.none() | st.tuples(st.sampled_from(ffn_sides), st.sampled_from(ffn_sides)))
    method = draw(st.sampled_from(["topk", "sigmoid_threshold"]))
    threshold = draw(st.sampled_from([0.2, 0.5, 0.8]))
    attentions_per_layer = [1, 1, 2, 2] if arch == "bart" else [1, 1]
    kills = tuple(draw(_layer_kills(n)) for n in attentions_per_layer)
    return Round(attention_block, ffn_block, method, threshold, draw(st.integers(0, 2**16)), kills)


@st.composite
def cases(draw, archs=tuple(ARCHS)) -> Case:
    """A random `Case`: block shapes that divide the tiny weights (FFN of 37: only 1x1 blocks; of 40: up to 8x8)."""
    arch = draw(st.sampled_from(archs))
    ffn_size = draw(st.sampled_from([37, 40]))
    # blocks divide every projection: grouped-query key/value projections are 8 (Mistral) or 16 rows
    attention_sides = divisors(HEAD_DIM if arch in GROUPED else HIDDEN)
    first = draw(rounds(arch, attention_sides, divisors(math.gcd(ffn_size, HIDDEN))))
    implementations = ["eager"] if arch == "deberta-v2" else ["eager", "sdpa"]  # DeBERTa-v2 has no sdpa
    return Case(arch, ffn_size, draw(st.sampled_from(implementations)), first)


def two_round_cases():
    """A `Case` and a second `Round` for its compacted model (projections as wide as a multiple of the head size,
    FFNs of any size: block sides that divide the head size, 1x1 FFN blocks)."""
    return cases().flatmap(lambda case: st.tuples(st.just(case), rounds(case.arch, divisors(HEAD_DIM), [1])))


def build_model(case: Case):
    """A tiny random model of `case.arch` with non-zero biases, in eval mode."""
    config = tiny_config(case.arch)
    for name in FFN_SIZE_FIELDS[case.arch]:
        setattr(config, name, case.ffn_size)
    torch.manual_seed(case.first.seed)
    model = auto_class(case.arch).from_config(config, attn_implementation=case.attn_implementation)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.1)
    return model.eval()


def _kill(linear) -> None:
    if isinstance(linear, MaskedLinear):  # a compacted attention or FFN with nothing left has no scores
        kill_scores(linear.scores_module)


def _kill_layer(layer, kill: LayerKill) -> None:
    for index in kill.attentions:
        if index >= len(layer.attentions):  # removed at an earlier compaction
            continue
        attention = layer.attentions[index]
        _kill(attention.value if kill.heads_via == "value" else attention.output)
    if kill.ffn and layer.has_ffn:
        _kill(layer.ffn_input if kill.ffn_via == "input" else layer.ffn_output)


def mask(model, round_: Round, **extra):
    """`model` masked with the random scores of `round_` at its threshold (`extra`: more config fields, whose scores
    are drawn too), its chosen layers emptied."""
    apply_block_pruning(model, round_.pruning_config(**extra))
    generator = torch.Generator().manual_seed(round_.seed)
    with torch.no_grad():
        for scores in block_scores(model):
            scores.scores.copy_(torch.randn(scores.scores.shape, generator=generator))
    set_threshold(model, round_.threshold)
    layers = prunable_layers(model)
    kills = round_.kills[:len(layers)] if _dropped(model) else round_.kills  # for the layers an earlier round left
    for layer, kill in zip(layers, kills, strict=True):
        _kill_layer(layer, kill)
    return model


def _dropped(model) -> bool:
    return bool((getattr(model.config, LAYOUT_ATTRIBUTE, None) or {}).get("layer_map"))


def by_original_layer(layout: dict) -> dict:
    """The layer entries of a layout keyed by the layers' original paths (a layer list compaction shortened is mapped
    back through `"layer_map"`)."""
    maps = layout.get("layer_map", {})
    entries = {}
    for name, entry in layout["layers"].items():
        stack, _, index = name.rpartition(".")
        entries[f"{stack}.{maps[stack][int(index)]}" if stack in maps else name] = entry
    return entries


def padded_inputs(arch: str) -> dict:
    """A batch of two sequences, the second padded (encoder and, for BART, decoder side)."""
    inputs = model_inputs(arch)
    if arch == "bart":
        decoder_mask = torch.ones_like(inputs["decoder_input_ids"])
        decoder_mask[1, 3:] = 0
        inputs["decoder_attention_mask"] = decoder_mask
    return inputs


def assert_same_outputs(actual_model, expected: list[torch.Tensor], inputs: dict, before=None) -> None:
    expected = without_dropped_layers(expected, actual_model, before)  # a layer left with nothing may have gone
    for actual, wanted in zip(model_outputs(actual_model, inputs), expected, strict=True):
        torch.testing.assert_close(actual, wanted, atol=1e-5, rtol=1e-5)


def save_and_reload(model, case: Case):
    """`save_compacted(model)` into a temporary folder, loaded back with `hf_blockprune.from_pretrained`."""
    with tempfile.TemporaryDirectory() as folder:
        save_compacted(model, folder, model_card=False)
        return hf_blockprune.from_pretrained(folder, attn_implementation=case.attn_implementation).eval()


def compact_and_check(model, case: Case, as_compacted=lambda outputs: outputs):
    """Compact `model` (masked) and check that it, and its saved and reloaded copy, compute the masked function and
    cost the FLOPs predicted for it (`as_compacted`: the masked outputs as the compacted model returns them). Returns
    the compacted model."""
    inputs = padded_inputs(case.arch)
    expected = as_compacted(model_outputs(model, inputs))
    predicted = model_flops(model, SEQ_LEN, kept_only=True)
    before = layer_map(model)  # a model compacted before may have dropped layers already
    reloaded = save_and_reload(model, case)
    compacted = compact_model(model)
    assert_same_outputs(compacted, expected, inputs, before)
    assert_same_outputs(reloaded, expected, inputs, before)
    assert model_flops(compacted, SEQ_LEN) == predicted
    return compacted


NO_KILL = LayerKill()
EMPTY_FIRST_DECODER_LAYER = Case(
    "bart", 37, "sdpa", Round((8, 8), None, "sigmoid_threshold", 0.5, 3, (NO_KILL, NO_KILL, LayerKill((0,)), NO_KILL))
)
EVERYTHING_EMPTY = Case("bart", 40, "eager", Round(None, (4, 8), "topk", 0.5, 5, (
    LayerKill((0,), "output", True), LayerKill((0,), "value", True, "output"),
    LayerKill((0, 1), "value", True), LayerKill((0, 1), "output", True, "output"),
)))
EMPTY_LAST_DECODER_LAYER = Round((8, 4), (1, 1), "sigmoid_threshold", 0.5, 7,
                                 (NO_KILL, NO_KILL, NO_KILL, LayerKill((0, 1), "value", True)))


@FORWARD_EXAMPLES
@given(case=cases())
@example(case=EMPTY_FIRST_DECODER_LAYER)
@example(case=EVERYTHING_EMPTY)
def test_compacted_and_reloaded_models_compute_the_masked_function(case):
    compact_and_check(mask(build_model(case), case.first), case)


@TWO_ROUND_EXAMPLES
@given(case_and_second=two_round_cases())
@example(case_and_second=(EMPTY_FIRST_DECODER_LAYER, EMPTY_LAST_DECODER_LAYER))
def test_a_compacted_model_pruned_again_compacts_to_the_masked_function(case_and_second):
    case, second = case_and_second
    once = save_and_reload(mask(build_model(case), case.first), case)
    layout = getattr(once.config, LAYOUT_ATTRIBUTE)
    if not any(record["heads"] for entry in layout["layers"].values() for record in entry["attention"]) and not any(
            entry["ffn"]["size"] for entry in layout["layers"].values()):
        with pytest.raises(ValueError, match="Nothing left to prune"):
            mask(once, second)
        return
    twice = compact_and_check(mask(once, second), case)
    composed = getattr(twice.config, LAYOUT_ATTRIBUTE)
    assert composed["dense_parameters"] == layout["dense_parameters"]
    first = by_original_layer(layout)
    for name, entry in by_original_layer(composed).items():
        for record, before in zip(entry["attention"], first[name]["attention"], strict=True):
            assert set(record["heads"]) <= set(before["heads"])  # original indices, a subset of the first round's
            assert record.get("removed", False) == (not record["heads"])  # a sublayer with no head left is removed
            if before.get("removed"):
                assert record == before


GENERATE_SETTINGS = [(1, True), (1, False), (2, True), (3, True), (3, False)]  # (num_beams, use_cache)


EMPTY_FIRST_LLAMA_LAYER = Case(
    "llama", 37, "sdpa", Round(None, None, "sigmoid_threshold", 0.5, 11, (LayerKill((0,), "output", True), NO_KILL))
)


def generation_inputs(arch: str) -> dict:
    """Prompts for `generate()`: BART's encoder inputs (the second padded), or left-padded decoder prompts."""
    inputs = padded_inputs(arch)
    if arch not in DECODERS:
        del inputs["decoder_input_ids"], inputs["decoder_attention_mask"]
        return inputs
    mask = inputs["attention_mask"].flip(1)  # left padding, as generation with a decoder-only model wants
    return {"input_ids": inputs["input_ids"].masked_fill(mask == 0, 0), "attention_mask": mask}


@GENERATE_EXAMPLES
@given(case=cases(archs=GENERATIVE))
@example(case=EMPTY_FIRST_DECODER_LAYER)
@example(case=EVERYTHING_EMPTY)
@example(case=EMPTY_FIRST_LLAMA_LAYER)
def test_generative_models_generate_the_same_tokens_after_compaction(case):
    model = mask(build_model(case), case.first)
    assert_same_generation(model, compact_model(copy.deepcopy(model)), generation_inputs(case.arch))


def assert_same_generation(model, compacted, inputs: dict) -> None:
    """`generate()` of `compacted` gives the tokens and scores of the masked `model` (greedy and beam, with and
    without cache)."""
    for num_beams, use_cache in GENERATE_SETTINGS:
        settings_ = dict(max_new_tokens=6, num_beams=num_beams, do_sample=False, use_cache=use_cache,
                         return_dict_in_generate=True, output_scores=True, pad_token_id=0)
        expected = model.generate(**inputs, **settings_)
        actual = compacted.generate(**inputs, **settings_)
        assert torch.equal(actual.sequences, expected.sequences), (num_beams, use_cache)
        for step, (scores, wanted) in enumerate(zip(actual.scores, expected.scores, strict=True)):
            torch.testing.assert_close(scores, wanted, atol=1e-4, rtol=1e-4, msg=f"{num_beams=} {use_cache=} {step=}")

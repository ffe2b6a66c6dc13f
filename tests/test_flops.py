import copy

import pytest

from hf_blockprune import apply_block_pruning, compact_model
from hf_blockprune.compact.flops import FlopsBreakdown, model_flops, predicted_speedup
from hf_blockprune.pruning.model import set_threshold
from hf_blockprune.structure.discovery import prunable_layers

from conftest import ARCHS, tiny_model
from helpers import biased_model, kill_scores, preset_config, random_masks

HIDDEN, FFN, VOCAB = 32, 37, 99

# Per architecture: attention blocks (BART: 2 encoder self, 2 decoder self, 2 cross), FFNs, and the fixed Linears as
# (tokens seen: "T" or 1, in, out).
SHAPES = {
    "bert": (2, 2, [(1, HIDDEN, HIDDEN), (1, HIDDEN, 2)]),  # pooler, classifier
    "roberta": (2, 2, [(1, HIDDEN, HIDDEN), (1, HIDDEN, 2)]),  # classifier.dense, classifier.out_proj
    "xlm-roberta": (2, 2, [(1, HIDDEN, HIDDEN), (1, HIDDEN, 2)]),
    "distilbert": (2, 2, [(1, HIDDEN, HIDDEN), (1, HIDDEN, 2)]),  # pre_classifier, classifier
    "electra": (2, 2, [("T", 16, HIDDEN), (1, HIDDEN, HIDDEN), (1, HIDDEN, 2)]),  # embeddings_project, head
    "bart": (6, 4, [("T", HIDDEN, VOCAB)]),  # lm_head on every decoder token
    "llama": (2, 2, [("T", HIDDEN, VOCAB)]),
    "qwen2": (2, 2, [("T", HIDDEN, VOCAB)]),
    "mistral": (2, 2, [("T", HIDDEN, VOCAB)]),
    "deberta-v2": (2, 2, [(1, HIDDEN, HIDDEN), (1, HIDDEN, 2)]),  # pooler, classifier
    "modernbert": (2, 2, [(1, HIDDEN, HIDDEN), (1, HIDDEN, 2)]),  # head.dense, classifier (on the pooled token)
    "gpt2": (2, 2, [("T", HIDDEN, VOCAB)]),
}
# Key/value width (grouped-query attention: 2 key/value heads of 8, Mistral's tiny config 1) and FFN input matrices
# (a gated MLP has two: gate and up).
KV_WIDTH = {"llama": 16, "qwen2": 16, "mistral": 8}
FFN_INPUTS = {"llama": 2, "qwen2": 2, "mistral": 2, "modernbert": 2}
# Projections with one block of rows per head besides Q, K, V (DeBERTa-v2's pos_key_proj and pos_query_proj, counted
# at the sequence length)
HEAD_ROWS = {"deberta-v2": 2}


def hand_flops(arch: str, seq_len: int) -> FlopsBreakdown:
    blocks, ffns, fixed = SHAPES[arch]
    kv_width, ffn_inputs = KV_WIDTH.get(arch, HIDDEN), FFN_INPUTS.get(arch, 1)
    return FlopsBreakdown(
        attention_projections=blocks * 2 * seq_len * HIDDEN * ((2 + HEAD_ROWS.get(arch, 0)) * HIDDEN + 2 * kv_width),
        attention_scores=blocks * 2 * 2 * seq_len * seq_len * HIDDEN,
        ffn=ffns * (ffn_inputs + 1) * 2 * seq_len * HIDDEN * FFN,
        fixed=sum(2 * (seq_len if tokens == "T" else tokens) * i * o for tokens, i, o in fixed),
    )


def test_dense_bert_flops_match_the_hand_count():
    flops, seq_len = model_flops(tiny_model("bert"), 12), 12
    assert flops.attention_projections == 2 * 4 * (2 * seq_len * 32 * 32)  # 2 layers x Q, K, V, O
    assert flops.attention_scores == 2 * 2 * (2 * seq_len * seq_len * 32)  # 2 layers x (QK^T, probs V)
    assert flops.ffn == 2 * (2 * seq_len * 32 * 37 + 2 * seq_len * 37 * 32)
    assert flops.fixed == 2 * 32 * 32 + 2 * 32 * 2  # pooler and classifier read the first token only
    assert flops.total == 196_608 + 36_864 + 113_664 + 2_176


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("seq_len", [1, 12, 50])
def test_dense_flops_match_the_hand_count_for_every_architecture(arch, seq_len):
    assert model_flops(tiny_model(arch), seq_len) == hand_flops(arch, seq_len)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_masked_model_costs_the_dense_cost_unless_kept_only(arch):
    model = random_masks(biased_model(arch), "struct", "topk", 0, force_empty=True)
    assert model_flops(model, 12) == hand_flops(arch, 12)
    assert model_flops(model, 12, kept_only=True).total < hand_flops(arch, 12).total


# (preset, pruning method, seed, force empty layers): heads dead through V rows or O columns, partial heads (block
# granularity, kept whole by compaction), neurons pruned through either projection.
CASES = [
    ("struct", "topk", 0, False),
    ("struct", "sigmoid_threshold", 1, True),
    ("hybrid", "sigmoid_threshold", 2, True),
    ("hybrid", "topk", 3, False),
    ("block", "sigmoid_threshold", 4, True),
]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("preset, method, seed, force_empty", CASES)
def test_kept_only_flops_of_a_masked_model_are_the_flops_of_its_compaction(arch, preset, method, seed, force_empty):
    masked = random_masks(biased_model(arch, seed), preset, method, seed, force_empty)
    predicted = model_flops(masked, 12, kept_only=True)
    compacted = compact_model(copy.deepcopy(masked))
    assert model_flops(compacted, 12) == predicted
    assert model_flops(compacted, 12, kept_only=True) == predicted
    assert predicted.fixed == hand_flops(arch, 12).fixed
    assert predicted_speedup(tiny_model(arch), masked, 12) == predicted_speedup(masked, compacted, 12) > 1.0


@pytest.mark.parametrize("arch", ARCHS)
def test_each_dead_head_and_pruned_neuron_removes_its_share(arch):
    model = apply_block_pruning(tiny_model(arch), preset_config("struct", pruning_method="topk"))
    set_threshold(model, 1.0)
    layer = prunable_layers(model)[0]
    kill_scores(layer.attentions[0].value.scores_module)  # every head of the first attention block
    set_threshold(model, 0.75, kind="ffn")  # round(0.75 * 37) = 28 neurons per FFN
    dense, kept = hand_flops(arch, 12), model_flops(model, 12, kept_only=True)
    blocks = SHAPES[arch][0]
    # the attention is removed at compaction (a decoder's self-attention too: it caches zero keys of size 1)
    assert kept.attention_projections == dense.attention_projections * (blocks - 1) // blocks
    assert kept.attention_scores == dense.attention_scores * (blocks - 1) // blocks
    assert kept.ffn == dense.ffn * 28 // 37


def test_sequence_length_must_be_positive():
    with pytest.raises(ValueError, match="seq_len"):
        model_flops(tiny_model("bert"), 0)

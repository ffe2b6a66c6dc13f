import contextlib
import re

import pytest
import torch
import torch.distributed as dist
from torch import nn
from transformers import (
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

from hf_blockprune import (
    BlockPruningConfig,
    apply_block_pruning,
    compact_model,
    is_block_pruned,
    remove_block_pruning,
    sparsity_report,
)
from hf_blockprune.compact.compaction import compaction_plan
from hf_blockprune.pruning.layer import MaskedLinear
from hf_blockprune.pruning.model import block_scores, set_threshold
from hf_blockprune.structure.discovery import prunable_layers
from hf_blockprune.structure.model_structure import PRUNING_CONFIG_KEY

from conftest import ENCODER_DECODERS, GATED_FFN, VOCAB, tiny_config, tiny_model
from helpers import TINY_PRESETS, biased_model, kill_scores, preset_config, random_masks


def _inputs(arch):
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "decoder_input_ids": ids[:, :5]} if arch in ENCODER_DECODERS else {"input_ids": ids}


@pytest.mark.parametrize("preset", sorted(TINY_PRESETS))
def test_fully_kept_masks_change_nothing_and_remove_restores_plain_linears(arch, preset):
    model = tiny_model(arch).eval()
    inputs = _inputs(arch)
    reference = model(**inputs).logits
    apply_block_pruning(model, preset_config(preset, arch))
    assert is_block_pruned(model)
    torch.testing.assert_close(model(**inputs).logits, reference)
    remove_block_pruning(model)
    assert not is_block_pruned(model) and not any("scores" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(model(**inputs).logits, reference)
    assert not hasattr(model.config, PRUNING_CONFIG_KEY)  # apply then remove leaves the model as it was


def test_remove_gives_a_compacted_model_back_the_record_of_its_compaction():
    model = compact_model(apply_block_pruning(tiny_model("bert"), preset_config("struct", "bert")))
    stage_1 = getattr(model.config, PRUNING_CONFIG_KEY)
    assert stage_1["pruning_preset"] == "struct"
    apply_block_pruning(model, preset_config("hybrid", "bert"))
    assert getattr(model.config, PRUNING_CONFIG_KEY)["pruning_preset"] == "hybrid"
    remove_block_pruning(model)
    assert getattr(model.config, PRUNING_CONFIG_KEY) == stage_1


def test_every_prunable_linear_is_wrapped(arch):
    model = apply_block_pruning(tiny_model(arch), BlockPruningConfig(attention_block_size=[8, 8]))
    layers = prunable_layers(model)
    expected_attention = {"bart": 3}.get(arch, 1)
    assert sum(len(layer.attentions) for layer in layers) == 2 * expected_attention
    wrapped = sum(isinstance(m, MaskedLinear) for m in model.modules())
    ffn_linears = 3 if arch in GATED_FFN else 2  # gate, up -> down
    assert wrapped == 4 * 2 * expected_attention + ffn_linears * len(layers)


def test_masked_weight_zeroes_exactly_the_masked_blocks():
    model = apply_block_pruning(tiny_model("bert"), BlockPruningConfig(pruning_method="topk",
                                                                        attention_block_size=[8, 16]))
    query = model.bert.encoder.layer[0].attention.self.query
    with torch.no_grad():
        query.scores_module.scores.copy_(torch.tensor([[4.0, 3.0], [2.0, 1.0], [0.0, -1.0], [-2.0, -3.0]]))
    set_threshold(model, 0.5)
    zero_blocks = (query.masked_weight() == 0).view(4, 8, 2, 16).all(dim=(1, 3))
    assert zero_blocks.tolist() == [[False, False], [False, False], [True, True], [True, True]]


def test_ffn_neuron_score_is_shared_by_row_and_column():
    model = apply_block_pruning(tiny_model("bert"), BlockPruningConfig(pruning_method="topk"))
    layer = model.bert.encoder.layer[0]
    assert layer.intermediate.dense.scores_module is layer.output.dense.scores_module
    with torch.no_grad():
        layer.intermediate.dense.scores_module.scores.copy_(torch.arange(37.0))
    set_threshold(model, 10 / 37)
    rows_kept = layer.intermediate.dense.masked_weight().abs().sum(1) > 0
    cols_kept = layer.output.dense.masked_weight().abs().sum(0) > 0
    assert torch.equal(rows_kept, cols_kept) and int(rows_kept.sum()) == 10


def test_scores_are_saved_once_per_shared_group():
    model = apply_block_pruning(tiny_model("bert"), BlockPruningConfig.from_preset("struct"))
    names = [n for n, _ in model.named_parameters() if n.endswith("scores")]
    assert len(names) == 2 * 2  # per layer: one head vector, one neuron vector
    assert len(list(block_scores(model))) == 4


def test_unknown_model_type_lists_supported_types_and_how_to_pass_patterns():
    model = OPTForCausalLM(OPTConfig(num_hidden_layers=1, hidden_size=32, ffn_dim=37, num_attention_heads=4,
                                     word_embed_proj_dim=32, vocab_size=VOCAB))
    with pytest.raises(ValueError, match=r"supported: \['bart', 'bert'.*layers_pattern"):
        apply_block_pruning(model, BlockPruningConfig.from_preset("struct"))


def test_user_patterns_override_the_map():
    model = tiny_model("bert")
    config = BlockPruningConfig.from_preset("struct", layers_pattern="encoder.layer",
                                            ffn_modules=["intermediate.dense", "output.dense"])
    apply_block_pruning(model, config)
    assert sum(isinstance(m, MaskedLinear) for m in model.modules()) == 4
    assert not isinstance(model.bert.encoder.layer[0].attention.self.query, MaskedLinear)


BLOCK_SIZE_ERRORS = [
    ("attention_block_size", dict(attention_block_size=[5, 8]), "bert.encoder.layer.0.attention.self.query", "32x32"),
    ("ffn_block_size", dict(ffn_granularity="block", ffn_block_size=[2, 2]), "bert.encoder.layer.0.intermediate.dense",
     "37x32"),
]


@pytest.mark.parametrize("field, settings, path, shape", BLOCK_SIZE_ERRORS, ids=["attention", "ffn"])
def test_block_size_that_does_not_divide_names_the_field_the_module_and_the_shape(field, settings, path, shape):
    model = tiny_model("bert")
    with pytest.raises(ValueError, match=rf"`{field}` .* does not divide the {shape} weight of {re.escape(path)}"):
        apply_block_pruning(model, BlockPruningConfig(pruning_method="topk", **settings))
    assert not is_block_pruned(model)  # refused before any layer was wrapped


def tiny_llama(num_key_value_heads: int) -> LlamaForCausalLM:
    """A tiny Llama (4 query heads of 8) with `num_key_value_heads` key/value heads."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=num_key_value_heads,
                                        max_position_embeddings=64))


LLAMA_ATTENTION = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]


def test_grouped_query_attention_patterns_without_the_kv_head_count_are_refused_naming_the_field():
    model = tiny_llama(num_key_value_heads=2)
    config = BlockPruningConfig.from_preset("struct", layers_pattern="layers", attention_modules=LLAMA_ATTENTION)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj has 16 .*grouped-query.*"
                                         r"num_kv_heads_attribute"):
        apply_block_pruning(model, config)
    assert not is_block_pruned(model)
    config = BlockPruningConfig.from_preset("struct", layers_pattern="layers", attention_modules=LLAMA_ATTENTION,
                                            num_kv_heads_attribute="num_key_value_heads")
    assert is_block_pruned(apply_block_pruning(model, config))


def test_a_head_count_that_does_not_divide_the_projections_is_refused():
    model = tiny_model("bert")
    model.config.odd_heads = 5
    config = BlockPruningConfig.from_preset("struct", layers_pattern="encoder.layer", num_heads_attribute="odd_heads",
                                            attention_modules=["attention.self.query", "attention.self.key",
                                                               "attention.self.value", "attention.output.dense"])
    with pytest.raises(ValueError, match=r"attention\.self\.query has 32 output features, which 5 heads do not "
                                         r"divide.*num_heads_attribute"):
        apply_block_pruning(model, config)


# GPT-2 described by patterns that do not fit it: the fused c_attn named as separate projections, a LayerNorm as FFN
GPT2_PATTERNS = [
    (dict(attention_modules=["attn.c_attn", "attn.c_attn", "attn.c_attn", "attn.c_proj"]),
     r"transformer\.h\.0\.attn\.c_proj reads 32 features but transformer\.h\.0\.attn\.c_attn makes 96"),
    (dict(ffn_modules=["ln_2", "mlp.c_proj"]), r"transformer\.h\.0\.ln_2 is a \S*LayerNorm, not an nn\.Linear"),
]


@pytest.mark.parametrize("modules, match", GPT2_PATTERNS, ids=["fused_named_apart", "not_a_projection"])
def test_modules_that_do_not_fit_are_refused_with_their_path_and_what_is_wrong(modules, match):
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=VOCAB, bos_token_id=0,
                                       eos_token_id=0))
    config = BlockPruningConfig.from_preset("struct", layers_pattern="h", **modules)
    with pytest.raises(ValueError, match=match):
        apply_block_pruning(model, config)
    assert not is_block_pruned(model)


def test_a_model_on_the_meta_device_is_refused():
    with torch.device("meta"):
        model = BertForSequenceClassification(tiny_config("bert"))
    with pytest.raises(ValueError, match=r"on the meta device.*materialize the weights"):
        apply_block_pruning(model, BlockPruningConfig.from_preset("struct"))


@contextlib.contextmanager
def wrapped(model, wrapper: str, store):
    """`model` in `nn.DataParallel`, or in DDP over a one-process gloo group (rendezvous in the file `store`)."""
    if wrapper == "DataParallel":
        yield nn.DataParallel(model)
        return
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield nn.parallel.DistributedDataParallel(model)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("wrapper", ["DataParallel", "DistributedDataParallel"])
def test_a_model_wrapped_for_data_parallelism_is_refused_naming_model_module(wrapper, tmp_path):
    config = BlockPruningConfig.from_preset("struct")
    masked = apply_block_pruning(tiny_model("bert"), config)
    message = rf"{wrapper}: pass the model inside it \(`model\.module`\)"
    with wrapped(tiny_model("bert"), wrapper, tmp_path / "a") as parallel, pytest.raises(ValueError, match=message):
        apply_block_pruning(parallel, config)
    with wrapped(masked, wrapper, tmp_path / "b") as parallel, pytest.raises(ValueError, match=message):
        compact_model(parallel)


def test_a_config_that_prunes_nothing_is_refused():
    with pytest.raises(ValueError, match="prunes nothing.*preset"):
        apply_block_pruning(tiny_model("bert"), BlockPruningConfig(pruning_preset="none"))


@pytest.mark.parametrize("preset", ["struct", "block"])
def test_a_compacted_model_is_masked_by_its_remaining_heads_and_neurons(preset):
    model = random_masks(biased_model("bart"), "struct", "sigmoid_threshold", 0, force_empty=True)
    kill_scores(prunable_layers(model)[2].attentions[0].value.scores_module)  # decoder layer 0: removed
    plans = compaction_plan(model)
    compact_model(model)

    apply_block_pruning(model, preset_config(preset))
    for layer, plan in zip(prunable_layers(model), plans, strict=True):
        kept_heads = [kept for kept, removed in zip(plan.heads, plan.removed, strict=True) if not removed]
        for attention, kept in zip(layer.attentions, kept_heads, strict=True):  # a removed attention is gone
            assert attention.real_heads == len(kept) > 0 and attention.heads == kept
            assert isinstance(attention.value, MaskedLinear)
            if preset == "struct":
                assert attention.value.scores_module.scores.shape == (len(kept),)
        assert layer.has_ffn != plan.ffn_removed and isinstance(layer.ffn_input, MaskedLinear) == bool(plan.neurons)
    assert [attention.spec.query for attention in prunable_layers(model)[2].attentions] == ["encoder_attn.q_proj"]
    report = sparsity_report(model)
    assert [entry["num_heads"] for entry in report] == [
        [len(h) for h, removed in zip(plan.heads, plan.removed) if not removed] for plan in plans]
    with torch.no_grad():
        model(**_inputs("bart"))


def test_applying_twice_is_an_error():
    model = apply_block_pruning(tiny_model("bert"), BlockPruningConfig(attention_block_size=[8, 8]))
    with pytest.raises(ValueError, match="already"):
        apply_block_pruning(model, BlockPruningConfig(attention_block_size=[8, 8]))


def test_a_compacted_model_with_nothing_left_to_prune_is_refused():
    model = apply_block_pruning(biased_model("bert"), BlockPruningConfig.from_preset("struct"))
    for scores in block_scores(model):
        kill_scores(scores)
    set_threshold(model, 0.5)
    compact_model(model)
    with pytest.raises(ValueError, match="Nothing left to prune"):
        apply_block_pruning(model, BlockPruningConfig.from_preset("struct"))

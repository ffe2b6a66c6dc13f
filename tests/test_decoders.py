"""Decoder-only language models (Llama, Qwen2, Mistral): grouped-query attention, gated MLPs, causal-LM training with
distillation, and generation of the compacted model with every kind of cache."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer
from transformers.trainer_pt_utils import LabelSmoother

import hf_blockprune
from hf_blockprune import BlockPruningCallback, BlockPruningConfig, BlockPruningTrainer, apply_block_pruning
from hf_blockprune.compact.compaction import LAYOUT_ATTRIBUTE, compact_model, compaction_plan
from hf_blockprune.pruning.model import set_threshold
from hf_blockprune.structure.discovery import prunable_layers
from hf_blockprune.training.distillation import distillation_term

from conftest import DECODERS, GROUPED, tiny_dataset, tiny_model, training_args
from helpers import ALIVE, DEAD, biased_model, model_inputs, model_outputs, random_masks, without_dropped_layers

HEAD_DIM = 8


def _left_padded_prompts() -> dict:
    ids = torch.randint(3, 99, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def _struct_masked(arch: str, query_heads: list[list[float]], neurons_alive: int | None = None):
    """A biased tiny decoder masked per head with the given scores (one list per layer), top-k off."""
    model = biased_model(arch)
    apply_block_pruning(model, BlockPruningConfig.from_preset("struct", pruning_method="sigmoid_threshold"))
    set_threshold(model, 0.5)
    with torch.no_grad():
        for layer, scores in zip(prunable_layers(model), query_heads, strict=True):
            layer.attentions[0].query.scores_module.scores.copy_(torch.tensor(scores))
            if neurons_alive is not None:
                ffn = layer.ffn_input.scores_module.scores
                ffn.fill_(DEAD)
                ffn[:neurons_alive] = ALIVE
    return model


def test_uneven_query_groups_are_padded_with_zero_slots_and_compute_the_masked_function():
    # layer 0: key/value head 0 keeps query heads 0 and 1, head 1 keeps only query head 3 (padded by a zero slot);
    # layer 1: every head goes (the attention is removed; its zero keys of size 1 keep the cache length)
    model = _struct_masked("llama", [[ALIVE, ALIVE, DEAD, ALIVE], [DEAD] * 4], neurons_alive=11)  # layer 1 stays
    inputs = model_inputs("llama")
    expected = model_outputs(model, inputs)
    plan = compaction_plan(model)
    assert plan[0].slots == [[0, 1, 3, None]] and plan[0].kv_slots == [[0, 1]]
    assert plan[1].slots == [[]] and plan[1].removed == [True] and plan[1].placeholders == [False]
    compact_model(model)
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.out_features == 4 * HEAD_DIM and attention.k_proj.out_features == 2 * HEAD_DIM
    assert attention.num_key_value_groups == 2
    assert type(model.model.layers[1].self_attn).__name__ == "RemovedAttention"
    for got, want in zip(model_outputs(model, inputs), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    layout = getattr(model.config, LAYOUT_ATTRIBUTE)
    assert layout["version"] == 6
    record = layout["layers"]["model.layers.0"]["attention"][0]
    assert record["heads"] == [0, 1, 3] and record["slots"] == [0, 1, 3, None] and record["kv_heads"] == [0, 1]
    assert layout["layers"]["model.layers.0"]["ffn"]["inputs"] == ["mlp.gate_proj", "mlp.up_proj"]


def test_a_whole_group_goes_with_its_key_value_head():
    model = _struct_masked("llama", [[DEAD, DEAD, ALIVE, DEAD], [ALIVE] * 4])
    compact_model(model)
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.out_features == attention.k_proj.out_features == attention.v_proj.out_features == HEAD_DIM
    assert getattr(model.config, LAYOUT_ATTRIBUTE)["layers"]["model.layers.0"]["attention"][0]["kv_heads"] == [1]


def test_a_head_whose_value_bias_cannot_be_folded_stays_and_no_output_bias_is_added():
    # Qwen2: biased value projection, biasless output projection. A head whose value rows are all masked outputs its
    # value bias: with no output bias to fold it into, compaction keeps it (exactly), and adds no bias.
    model = biased_model("qwen2")
    apply_block_pruning(model, BlockPruningConfig.from_preset("hybrid", attention_block_size=[8, 8],
                                                              pruning_method="sigmoid_threshold"))
    set_threshold(model, 0.5)
    attention = prunable_layers(model)[0].attentions[0]
    with torch.no_grad():
        for linear in (attention.query, attention.key, attention.output):
            linear.scores_module.scores.fill_(ALIVE)
        attention.value.scores_module.scores.fill_(ALIVE)
        attention.value.scores_module.scores[:1] = DEAD  # value rows of key/value head 0 (query heads 0 and 1)
        attention.output.scores_module.scores[:, :1] = DEAD  # output columns of query head 0
    inputs = model_inputs("qwen2")
    expected = model_outputs(model, inputs)
    assert compaction_plan(model)[0].heads == [[1, 2, 3]]  # head 1 is constant but stays; head 0 adds zero: goes
    assert hf_blockprune.sparsity_report(model)[0]["heads_pruned"] == [[0]]  # the report agrees with compaction
    compact_model(model)
    assert model.model.layers[0].self_attn.o_proj.bias is None
    assert model.config.num_hidden_layers == 1  # layer 1 lost every unit and added nothing: dropped
    for got, want in zip(model_outputs(model, inputs), without_dropped_layers(expected, model), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_block_granularity_on_a_gated_ffn_is_refused_before_anything_changes():
    model = tiny_model("llama")
    config = BlockPruningConfig.from_preset("block", attention_block_size=[8, 8], ffn_block_size=[1, 1])
    with pytest.raises(ValueError, match=r"model\.layers\.0 has a gated FFN .*ffn_granularity='neuron'"):
        apply_block_pruning(model, config)
    assert not hf_blockprune.is_block_pruned(model)


@pytest.mark.parametrize("arch", DECODERS)
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("emptied", [1, 0], ids=["last-attention-removed", "first-attention-removed"])
def test_compacted_decoders_generate_the_masked_tokens_with_dynamic_and_static_caches(arch, cache, emptied):
    # the cache reads its length from layer 0's keys: removed there, its zero keys of size 1 must give it
    heads = [[ALIVE, DEAD, DEAD, ALIVE], [ALIVE, DEAD, DEAD, ALIVE]]
    heads[emptied] = [DEAD] * 4
    model = _struct_masked(arch, heads, neurons_alive=11).eval()
    compacted = compact_model(copy.deepcopy(model))
    assert [type(module).__name__ for module in compacted.modules()].count("RemovedAttention") == 1
    prompts = _left_padded_prompts()
    for num_beams in (1, 3):
        settings = dict(max_new_tokens=6, num_beams=num_beams, do_sample=False, pad_token_id=0,
                        return_dict_in_generate=True, output_scores=True)
        if cache == "static":
            settings["cache_implementation"] = "static"
        expected = model.generate(**prompts, **settings)
        actual = compacted.generate(**prompts, **settings)
        assert torch.equal(actual.sequences, expected.sequences), num_beams
        for got, want in zip(actual.scores, expected.scores, strict=True):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_causal_lm_distillation_counts_the_positions_whose_next_token_is_a_label():
    torch.manual_seed(0)
    student, teacher = torch.randn(1, 4, 5), torch.randn(1, 4, 5)
    labels = torch.tensor([[7, 8, -100, -100]])  # positions 0 (predicts 8) counts; 1, 2 (predict -100) and 3 do not
    shifted = distillation_term({"logits": student}, {"logits": teacher}, labels, 2.0, shifted_labels=True)
    only_first = distillation_term({"logits": student[:, :1]}, {"logits": teacher[:, :1]}, None, 2.0)
    torch.testing.assert_close(shifted, only_first)
    nothing = torch.tensor([[7, -100, -100, -100]])
    assert distillation_term({"logits": student}, {"logits": teacher}, nothing, 2.0, shifted_labels=True) == 0.0


@pytest.mark.parametrize("arch", DECODERS)
@pytest.mark.parametrize("route", ["trainer", "callback"])
def test_a_causal_lm_fine_prunes_with_a_teacher_saves_and_reloads_with_equal_generations(arch, route, tmp_path):
    teacher = tiny_model(arch, seed=1)
    teacher.save_pretrained(tmp_path / "teacher")
    config = BlockPruningConfig.from_preset("struct", pruning_method="topk", final_threshold=0.5, final_warmup=0.3,
                                            teacher_model=str(tmp_path / "teacher"), distillation_alpha=0.5)
    args = training_args(tmp_path / "out", max_steps=12, learning_rate=1e-3, logging_steps=4)
    data = tiny_dataset(arch, size=32)
    if route == "trainer":
        trainer = BlockPruningTrainer(model=tiny_model(arch), args=args, train_dataset=data, pruning_config=config)
    else:
        trainer = Trainer(model=tiny_model(arch), args=args, train_dataset=data,
                          callbacks=[BlockPruningCallback(config)])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert all(torch.isfinite(torch.tensor(losses)))
    masked = trainer.model.eval()
    prompts = _left_padded_prompts()
    settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    expected = masked.generate(**prompts, **settings)
    trainer.save_model(tmp_path / "pruned")
    saved = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert saved["model_type"] == f"blockpruned_{arch}" and saved["auto_map"]["AutoModelForCausalLM"]
    for loaded in (hf_blockprune.from_pretrained(tmp_path / "pruned"),
                   AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", trust_remote_code=True)):
        assert torch.equal(loaded.eval().generate(**prompts, **settings), expected)
    card = (tmp_path / "pruned" / "README.md").read_text()
    assert ("KV " in card) == (arch in GROUPED) and "AutoModelForCausalLM" in card


def test_label_smoothing_shifts_the_labels_of_a_compacted_causal_lm(tmp_path):
    # transformers' Trainer picks the causal-LM label smoother by the model's `_get_name()`
    model = compact_model(_struct_masked("llama", [[ALIVE, DEAD, ALIVE, ALIVE], [ALIVE] * 4]))
    assert type(model).__name__ == "BlockPrunedLlamaForCausalLM" and model._get_name() == "LlamaForCausalLM"
    model.eval()  # no dropout: the two computations below see the same logits
    batch = model_inputs("llama", labels=True)
    trainer = Trainer(model=model, args=training_args(tmp_path, label_smoothing_factor=0.1),
                      train_dataset=tiny_dataset("llama", size=8))
    smoothed = trainer.compute_loss(model, dict(batch))
    outputs = model(**{k: v for k, v in batch.items() if k != "labels"})
    shifted = LabelSmoother(epsilon=0.1)(outputs, batch["labels"], shift_labels=True)
    torch.testing.assert_close(smoothed, shifted)


def test_the_filled_stage_on_grouped_query_attention_keeps_the_key_value_heads_of_surviving_groups():
    from hf_blockprune.pruning.filling import fill_surviving_heads

    model = random_masks(biased_model("llama", 3), "hybrid", "sigmoid_threshold", 3, force_empty=False)
    kept = compaction_plan(model)
    fill_surviving_heads(model)
    inputs = model_inputs("llama")
    expected = model_outputs(model, inputs)
    assert [plan.kv_slots for plan in compaction_plan(model)] == [plan.kv_slots for plan in kept]
    for layer in prunable_layers(model):
        attention = layer.attentions[0]
        alive_kv = attention.key.full_mask().view(attention.num_kv_heads, -1).any(dim=1)
        live_queries = attention.query.full_mask().view(attention.num_heads, -1).any(dim=1)
        assert alive_kv.tolist() == live_queries.view(attention.num_kv_heads, -1).any(dim=1).tolist()
    compact_model(model)
    for got, want in zip(model_outputs(model, inputs), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

"""LoRA (peft) models under block pruning: the mask acts on the effective weight, the base stays frozen, checkpoints
resume exactly, and the save is the merged, compacted model."""

import copy
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer

import hf_blockprune
from hf_blockprune import BlockPruningCallback, BlockPruningConfig, BlockPruningTrainer, apply_block_pruning
from hf_blockprune.integrations.peft import PRUNING_STATE_NAME
from hf_blockprune.pruning.layer import MaskedLinear
from hf_blockprune.pruning.model import block_scores, is_block_pruned, set_threshold
from hf_blockprune.tasks.data import load_sst2
from hf_blockprune.tasks.defaults import offline_minilm_path

from conftest import tiny_dataset, tiny_model, training_args

TARGETS = ["query", "value", "intermediate.dense"]  # attention and FFN projections; key and outputs stay plain
PRESET = dict(attention_block_size=[8, 8], pruning_method="topk", final_threshold=0.5, final_warmup=0.3)


def _lora_bert(seed: int = 0, dropout: float = 0.0):
    torch.manual_seed(seed)
    model = get_peft_model(tiny_model("bert", seed),
                           LoraConfig(task_type="SEQ_CLS", target_modules=TARGETS, r=4, lora_dropout=dropout))
    with torch.no_grad():  # peft starts B at zero: give the adapters a delta so that the tests see it
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return model


def _inputs():
    return torch.randint(3, 99, (2, 12), generator=torch.Generator().manual_seed(3))


def _trainer(route, model, output_dir, **overrides):
    config = BlockPruningConfig.from_preset("hybrid", **PRESET)
    args = training_args(output_dir, **{"max_steps": 20, "learning_rate": 1e-2, **overrides})
    data = tiny_dataset("bert")
    if route == "trainer":
        return BlockPruningTrainer(model=model, args=args, train_dataset=data, pruning_config=config)
    return Trainer(model=model, args=args, train_dataset=data, callbacks=[BlockPruningCallback(config)])


@pytest.mark.parametrize("route", ["trainer", "callback"])
def test_a_lora_model_fine_prunes_and_saves_the_merged_compacted_model(route, tmp_path):
    model = _lora_bert(dropout=0.1)
    # the parameter objects stay when the layers are wrapped (their names change)
    frozen = [(p, p.detach().clone()) for p in model.parameters() if not p.requires_grad]
    adapters = [(p, p.detach().clone()) for name, p in model.named_parameters() if "lora_" in name]
    trainer = _trainer(route, model, tmp_path / "out", save_strategy="steps", save_steps=10)
    trainer.train()

    assert len(frozen) > 20 and all(torch.equal(p, before) for p, before in frozen)
    assert adapters and all(not torch.equal(p, before) for p, before in adapters)
    assert (tmp_path / "out" / "checkpoint-10" / PRUNING_STATE_NAME).is_file()
    masked = trainer.model.eval()
    with torch.no_grad():
        expected = masked(input_ids=_inputs()).logits
    trainer.save_model(tmp_path / "pruned")
    assert json.loads((tmp_path / "pruned" / "config.json").read_text())["model_type"] == "blockpruned_bert"
    dense_parameters = sum(p.numel() for p in tiny_model("bert").parameters())
    for loaded in (hf_blockprune.from_pretrained(tmp_path / "pruned"),
                   AutoModelForSequenceClassification.from_pretrained(tmp_path / "pruned", trust_remote_code=True)):
        assert sum(p.numel() for p in loaded.parameters()) < dense_parameters
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(input_ids=_inputs()).logits, expected, atol=1e-5, rtol=1e-5)


def test_merge_and_unload_keeps_the_masks_and_equals_the_masked_adapted_model():
    model = apply_block_pruning(_lora_bert(), BlockPruningConfig.from_preset("hybrid", **PRESET)).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for scores in block_scores(model):
            scores.scores.copy_(torch.randn(scores.scores.shape, generator=generator))
    set_threshold(model, 0.5)
    with torch.no_grad():
        expected = model(input_ids=_inputs()).logits
    merged = copy.deepcopy(model).merge_and_unload()
    assert is_block_pruned(merged) and not any("lora_" in name for name, _ in merged.named_parameters())
    assert all(type(m.base_layer) is torch.nn.Linear for m in merged.modules() if isinstance(m, MaskedLinear))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=_inputs()).logits, expected, atol=1e-5, rtol=1e-5)


def test_the_lora_dropout_sees_the_input_as_in_peft():
    # all blocks kept: the masked layer in training mode must compute what peft's LoRA layer does, dropout included
    model = _lora_bert(dropout=0.5)
    reference = copy.deepcopy(model).train()
    apply_block_pruning(model, BlockPruningConfig.from_preset("hybrid", **PRESET))
    set_threshold(model, 1.0)
    model.train()
    torch.manual_seed(5)
    actual = model(input_ids=_inputs()).logits
    torch.manual_seed(5)
    expected = reference(input_ids=_inputs()).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def _final_state(trainer) -> dict:
    return {name: value.detach().clone() for name, value in trainer.model.state_dict().items()}


@pytest.mark.parametrize("route", ["trainer", "callback"])
def test_a_resumed_lora_run_ends_equal_to_the_uninterrupted_one(route, tmp_path):
    settings = dict(save_strategy="steps", save_steps=10)
    whole = _trainer(route, _lora_bert(dropout=0.1), tmp_path / "whole", **settings)
    whole.train()
    resumed = _trainer(route, _lora_bert(dropout=0.1), tmp_path / "whole", **settings)
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-10"))
    expected, actual = _final_state(whole), _final_state(resumed)
    assert set(actual) == set(expected) and any(".block_scores.scores" in name for name in actual)
    for name, value in actual.items():
        torch.testing.assert_close(value, expected[name], atol=1e-6, rtol=1e-6, msg=name)


def test_resuming_from_adapters_without_the_pruning_state_is_refused(tmp_path):
    trainer = _trainer("trainer", _lora_bert(), tmp_path / "out", save_strategy="steps", save_steps=10)
    trainer.train()
    (tmp_path / "out" / "checkpoint-10" / PRUNING_STATE_NAME).unlink()
    resumed = _trainer("trainer", _lora_bert(), tmp_path / "out")
    with pytest.raises(ValueError, match="no blockprune_state.safetensors .* restart the masks"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-10"))


@pytest.mark.parametrize(
    "lora, preset, match",
    [
        (dict(use_dora=True), "hybrid", "DoRA"),
        ({}, "hybrid-filled", "filled stage"),
    ],
)
def test_lora_layers_block_masks_cannot_act_on_are_refused_before_anything_changes(lora, preset, match):
    model = get_peft_model(tiny_model("bert"), LoraConfig(task_type="SEQ_CLS", target_modules=TARGETS, r=4, **lora))
    with pytest.raises(ValueError, match=match):
        apply_block_pruning(model, BlockPruningConfig.from_preset(preset, attention_block_size=[8, 8]))
    assert not is_block_pruned(model)


def test_lora_on_a_fused_projection_is_refused():
    model = get_peft_model(tiny_model("gpt2"), LoraConfig(target_modules=["c_attn"], r=4, fan_in_fan_out=True))
    with pytest.raises(ValueError, match="LoRA layer over a Conv1D"):
        apply_block_pruning(model, BlockPruningConfig.from_preset("struct"))
    assert not is_block_pruned(model)


@pytest.mark.slow
@pytest.mark.parametrize("route", ["trainer", "callback"])
def test_the_lora_wrapped_minilm_fine_prunes_on_real_sst2(route, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(offline_minilm_path())
    data = load_sst2(train_size=256)["train"].map(
        lambda batch: tokenizer(batch["sentence"], truncation=True, max_length=48, padding="max_length"),
        batched=True, remove_columns=["sentence"],
    )
    model = AutoModelForSequenceClassification.from_pretrained(offline_minilm_path(), num_labels=2)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value", "dense"], r=8))
    config = BlockPruningConfig.from_preset("struct", pruning_method="topk", final_threshold=0.5, final_warmup=0.2)
    args = training_args(tmp_path / "out", max_steps=16, learning_rate=1e-3, per_device_train_batch_size=16)
    if route == "trainer":
        trainer = BlockPruningTrainer(model=model, args=args, train_dataset=data, pruning_config=config)
    else:
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[BlockPruningCallback(config)])
    trainer.train()
    sentences = ["a gripping, beautifully acted film", "dull and far too long"]
    batch = tokenizer(sentences, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = trainer.model.eval()(**batch).logits
    trainer.save_model(tmp_path / "pruned")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "pruned", trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, atol=1e-4, rtol=1e-4)
    dense = AutoModelForSequenceClassification.from_pretrained(offline_minilm_path(), num_labels=2)
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in dense.parameters())

"""Save, load (with hf_blockprune and with plain transformers), export dense, model card, push."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from transformers import AutoModelForSequenceClassification, Trainer

import hf_blockprune
from hf_blockprune.compact.model_card import CARD_MARKER, FIGURE_NAME
from hf_blockprune.compact.saving import (
    MASKED_MODEL_TYPE,
    checkpoint_on_save,
    export_dense,
    read_model_config,
    save_compacted,
)

from conftest import ARCHS, auto_class
from helpers import biased_model, make_trainer, model_inputs, model_outputs, preset_config, random_masks

AUTO_CLASS = {arch: auto_class(arch).__name__ for arch in ARCHS}


def _masked(arch, preset="struct", method="topk", seed=0):
    return random_masks(biased_model(arch, seed), preset, method, seed, force_empty=True)


def _load_with_plain_transformers(path, arch, inputs_file, tmp_path):
    """Load in a subprocess where hf_blockprune cannot be imported; return its outputs."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["hf_blockprune"] = None  # importing it now fails
        import torch, transformers
        inputs = torch.load({str(inputs_file)!r})
        cls = getattr(transformers, {AUTO_CLASS[arch]!r})
        model = cls.from_pretrained({str(path)!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True)
        torch.save([out.logits] + list(out.hidden_states if out.get("hidden_states") is not None
                                        else out.encoder_hidden_states), {str(tmp_path / "out.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, capture_output=True, text=True)
    return torch.load(tmp_path / "out.pt")


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_with_the_library_and_with_plain_transformers(arch, tmp_path):
    model = _masked(arch)
    inputs = model_inputs(arch)
    expected = model_outputs(model, inputs)
    save_compacted(model, tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert "auto_map" in config and "blockprune_layout" in config and "blockprune_config" in config
    assert hf_blockprune.is_block_pruned(model)  # the masked model is left as it was

    loaded = hf_blockprune.from_pretrained(tmp_path / "model").eval()
    for got, want in zip(model_outputs(loaded, inputs), expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in loaded.parameters()) < sum(
        p.numel() for n, p in model.named_parameters() if not n.endswith("scores"))

    torch.save(inputs, tmp_path / "inputs.pt")
    remote = _load_with_plain_transformers(tmp_path / "model", arch, tmp_path / "inputs.pt", tmp_path)
    hidden = [o for o in expected[1:]][: len(remote) - 1]
    for got, want in zip(remote, [expected[0]] + hidden):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_reloaded_model_saves_again_with_its_loading_code(tmp_path):
    model = _masked("bert")
    inputs = model_inputs("bert")
    expected = model_outputs(model, inputs)[0]
    save_compacted(model, tmp_path / "first")
    hf_blockprune.from_pretrained(tmp_path / "first").save_pretrained(tmp_path / "second")
    assert (tmp_path / "second" / "modeling_blockprune.py").is_file()
    torch.save(inputs, tmp_path / "inputs.pt")
    remote = _load_with_plain_transformers(tmp_path / "second", "bert", tmp_path / "inputs.pt", tmp_path)
    torch.testing.assert_close(remote[0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["bert", "distilbert", "bart", "qwen2", "mistral"])
def test_dense_export_loads_with_plain_from_pretrained(arch, tmp_path):
    model = _masked(arch, preset="hybrid", method="sigmoid_threshold")
    inputs = model_inputs(arch)
    expected = model_outputs(model, inputs)[0]
    export_dense(model, tmp_path / "dense")
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "auto_map" not in config and "blockprune_layout" not in config
    import transformers

    cls = getattr(transformers, AUTO_CLASS.get(arch, "AutoModelForSequenceClassification"))
    dense = cls.from_pretrained(tmp_path / "dense").eval()
    torch.testing.assert_close(model_outputs(dense, inputs)[0], expected, atol=1e-5, rtol=1e-5)


def test_weights_that_do_not_match_the_layout_fail_to_load(tmp_path):
    save_compacted(_masked("bert"), tmp_path / "model")
    path = tmp_path / "model" / "config.json"
    config = json.loads(path.read_text())
    layer = config["blockprune_layout"]["layers"]["bert.encoder.layer.0"]  # layer 1's FFN was removed: no weights
    layer["ffn"]["size"] += 3
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not match the pruning layout"):
        hf_blockprune.from_pretrained(tmp_path / "model")


def test_loading_a_folder_without_layout_says_so(tmp_path):
    biased_model("bert").save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="not a model compacted by hf_blockprune"):
        hf_blockprune.from_pretrained(tmp_path / "plain")


def test_a_failed_save_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    target = tmp_path / "model"
    save_compacted(_masked("bert", seed=1), target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("hf_blockprune.compact.saving.write_model_card", broken)
    with pytest.raises(OSError, match="disk full"):
        save_compacted(_masked("bert", seed=2), target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging folder left behind


def test_model_card_tells_what_was_pruned(tmp_path):
    model = _masked("bert")
    save_compacted(model, tmp_path / "model")
    card = (tmp_path / "model" / "README.md").read_text()
    assert CARD_MARKER in card
    for text in ("AutoModelForSequenceClassification", "prunable linear weights", "bert.encoder.layer.0",
                 "bert.encoder.layer.1", FIGURE_NAME, '"pruning_method": "topk"', "Base model"):
        assert text in card
    assert "| `bert.encoder.layer.0` | 0: [] (removed) |" in card and "*removed*" in card  # it lost every head
    assert "| `bert.encoder.layer.1` | " in card and " | 0 (removed) |" in card  # and the last layer every neuron
    assert (tmp_path / "model" / FIGURE_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("route", ["trainer", "callback"])
def test_trainer_run_ends_with_a_compacted_output_dir_that_loads_both_ways(route, tmp_path):
    config = preset_config("struct", pruning_method="topk", final_threshold=0.5, final_warmup=0.2)
    trainer = make_trainer(route, "bert", config, tmp_path, max_steps=20, save_strategy="steps", save_steps=10)
    trainer.train()
    trainer.save_model()
    checkpoint = json.loads((tmp_path / "checkpoint-20" / "config.json").read_text())
    assert "blockprune_layout" not in checkpoint  # checkpoints keep the scores, to resume
    assert hf_blockprune.BlockPruningConfig.from_dict(checkpoint["blockprune_config"]) == config
    inputs = model_inputs("bert")
    expected = model_outputs(trainer.model.eval(), inputs)[0]
    loaded = hf_blockprune.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(model_outputs(loaded, inputs)[0], expected, atol=1e-5, rtol=1e-5)
    layers = loaded.config.blockprune_layout["layers"].values()
    assert sum(len(entry["attention"][0]["heads"]) for entry in layers) == 4
    remote = AutoModelForSequenceClassification.from_pretrained(tmp_path, trust_remote_code=True).eval()
    torch.testing.assert_close(model_outputs(remote, inputs)[0], expected, atol=1e-5, rtol=1e-5)


class _FakeHub:
    """Stands in for the Hub API at the HTTP boundary: records what would be uploaded."""

    def __init__(self):
        self.uploaded = None

    def create_repo(self, repo_id, **kwargs):
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, repo_id, folder_path, **kwargs):
        from pathlib import Path

        self.uploaded = {p.name: p.read_bytes() for p in Path(folder_path).iterdir() if p.is_file()}
        return "https://hub.invalid/commit"


def test_push_to_hub_uploads_the_compacted_folder_with_its_card(tmp_path, monkeypatch):
    hub = _FakeHub()
    monkeypatch.setattr("transformers.trainer.hf_api", lambda: hub)
    config = preset_config("struct", pruning_method="topk", final_threshold=0.5, final_warmup=0.2)
    trainer = make_trainer("trainer", "bert", config, tmp_path, max_steps=10, hub_model_id="me/pruned",
                           hub_token="not-a-token")
    trainer.train()
    trainer.push_to_hub()
    expected_files = {"model.safetensors", "config.json", "modeling_blockprune.py", "README.md", FIGURE_NAME}
    assert expected_files <= set(hub.uploaded)
    assert CARD_MARKER.encode() in hub.uploaded["README.md"]
    assert b"blockprune_layout" in hub.uploaded["config.json"]


def test_saving_during_a_new_training_run_keeps_scores_again(tmp_path):
    config = preset_config("hybrid")
    trainer = make_trainer("callback", "bert", config, tmp_path, max_steps=4)
    trainer.train()
    assert trainer.model._blockprune_compact_on_save
    assert type(trainer.model).__name__ == "BertForSequenceClassification"  # transformers reads class names
    assert isinstance(trainer, Trainer)
    trainer.args.max_steps = 8
    trainer.args.save_strategy = "steps"
    trainer.args.save_steps = 8
    trainer.train()
    saved = json.loads((tmp_path / "checkpoint-8" / "config.json").read_text())
    assert "blockprune_layout" not in saved and saved["model_type"] == MASKED_MODEL_TYPE


def test_a_masked_checkpoint_points_to_compaction_and_loads_masked(tmp_path):
    trainer = make_trainer("trainer", "bert", preset_config("struct", target_density=0.5), tmp_path, max_steps=4,
                           save_strategy="steps", save_steps=4)
    trainer.train()
    checkpoint = tmp_path / "checkpoint-4"
    with pytest.raises(ValueError, match="masked training checkpoint.*hf-blockprune compact.*load_masked_checkpoint"):
        hf_blockprune.from_pretrained(checkpoint)
    masked = hf_blockprune.load_masked_checkpoint(checkpoint)
    inputs = model_inputs("bert")
    with torch.no_grad():
        torch.testing.assert_close(masked(**inputs).logits, trainer.model.eval()(**inputs).logits)


def test_dense_export_of_a_model_with_a_removed_attention(tmp_path):
    """Decoder layer 0 loses every self-attention head: compaction removes it (its zero keys of size 1 keep the cache
    length); the dense export zeroes it and computes the same function."""
    from transformers import BartForConditionalGeneration

    from hf_blockprune.pruning.model import prunable_layers

    from helpers import kill_scores

    model = random_masks(biased_model("bart"), "struct", "sigmoid_threshold", seed=3, force_empty=False)
    decoder_first = next(layer for layer in prunable_layers(model) if ".decoder." in layer.name)
    kill_scores(decoder_first.attentions[0].value.scores_module)
    inputs = model_inputs("bart")
    expected = model_outputs(model.eval(), inputs)
    export_dense(model, tmp_path / "dense")
    dense = BartForConditionalGeneration.from_pretrained(tmp_path / "dense").eval()
    for a, b in zip(expected, model_outputs(dense, inputs)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    save_compacted(model, tmp_path / "small")  # the card says it was removed
    card = (tmp_path / "small" / "README.md").read_text()
    assert f"| `{decoder_first.name}` | 0: [] (removed); " in card and "*removed*" in card


# ---------------------------------------------------- what plain transformers does with the folders a run leaves


def _plain_load(path, **kwargs):
    return AutoModelForSequenceClassification.from_pretrained(path, **kwargs)


@pytest.mark.parametrize("kwargs", [{}, {"ignore_mismatched_sizes": True}, {"trust_remote_code": False}])
def test_plain_transformers_refuses_a_compacted_folder_without_remote_code(kwargs, tmp_path):
    """Before: a size-mismatch RuntimeError, or (following its hint) pruned layers silently re-initialised."""
    save_compacted(_masked("bert"), tmp_path, model_card=False)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "blockpruned_bert"
    assert saved["auto_map"]["AutoConfig"] == "modeling_blockprune.BlockPrunedBertConfig"
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        _plain_load(tmp_path, **kwargs)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        transformers.AutoConfig.from_pretrained(tmp_path)


def test_a_compacted_model_keeps_its_model_type_through_plain_save_pretrained(tmp_path):
    """Loaded with remote code and saved again by plain transformers (e.g. a Trainer without hf_blockprune), the
    folder still carries the loader and the model type that keeps plain loading from mistaking it."""
    model = _masked("bert").eval()
    inputs = model_inputs("bert")
    expected = model_outputs(model, inputs)[0]
    save_compacted(model, tmp_path / "a", model_card=False)
    remote = _plain_load(tmp_path / "a", trust_remote_code=True)
    remote.save_pretrained(tmp_path / "b")
    saved = json.loads((tmp_path / "b" / "config.json").read_text())
    assert saved["model_type"] == "blockpruned_bert" and "AutoConfig" in saved["auto_map"]
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        _plain_load(tmp_path / "b")
    for loaded in (hf_blockprune.from_pretrained(tmp_path / "b"), _plain_load(tmp_path / "b", trust_remote_code=True)):
        torch.testing.assert_close(model_outputs(loaded.eval(), inputs)[0], expected, atol=1e-5, rtol=1e-5)
    compacted = hf_blockprune.compact_model(_masked("bert"))  # compact_model's result saves its loader too
    compacted.save_pretrained(tmp_path / "c")
    assert json.loads((tmp_path / "c" / "config.json").read_text())["model_type"] == "blockpruned_bert"
    assert (tmp_path / "c" / "modeling_blockprune.py").is_file()


def test_folders_saved_before_the_compacted_model_type_still_load(tmp_path):
    """Layout-v1 folders: model type `bert`, an `auto_map` without `AutoConfig`."""
    model = _masked("bert").eval()
    inputs = model_inputs("bert")
    expected = model_outputs(model, inputs)[0]
    save_compacted(model, tmp_path, model_card=False)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["model_type"] = "bert"
    del saved["auto_map"]["AutoConfig"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    for loaded in (hf_blockprune.from_pretrained(tmp_path), _plain_load(tmp_path, trust_remote_code=True)):
        torch.testing.assert_close(model_outputs(loaded.eval(), inputs)[0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("route", ["trainer", "callback"])
def test_plain_transformers_refuses_a_masked_checkpoint(route, tmp_path):
    """Before: it loaded, with every masked layer freshly initialised (the weights are saved under other names)."""
    config = preset_config("struct", target_density=0.5)
    trainer = make_trainer(route, "bert", config, tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    trainer.train()
    checkpoint = tmp_path / "checkpoint-4"
    saved = json.loads((checkpoint / "config.json").read_text())
    assert saved["model_type"] == MASKED_MODEL_TYPE and saved["blockprune_checkpoint"]["model_type"] == "bert"
    with pytest.raises(ValueError, match=MASKED_MODEL_TYPE):
        _plain_load(checkpoint)
    # hf_blockprune reads it (the CLI's compact too), and the Trainer resumes from it
    masked = hf_blockprune.load_masked_checkpoint(checkpoint)
    inputs = model_inputs("bert")
    with torch.no_grad():
        torch.testing.assert_close(masked(**inputs).logits, trainer.model.eval()(**inputs).logits)
    resumed = make_trainer(route, "bert", config, tmp_path, max_steps=6, save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.state.global_step == 6
    assert json.loads((tmp_path / "checkpoint-6" / "config.json").read_text())["model_type"] == MASKED_MODEL_TYPE


def test_a_re_pruned_compacted_model_checkpoint_keeps_its_loader_record(tmp_path):
    """A compacted model pruned again: its checkpoint's real model type and auto_map come back when it is read."""
    save_compacted(_masked("bert"), tmp_path / "first", model_card=False)
    compacted = hf_blockprune.from_pretrained(tmp_path / "first")
    hf_blockprune.apply_block_pruning(compacted, preset_config("hybrid"))
    checkpoint_on_save(compacted).save_pretrained(tmp_path / "checkpoint")
    saved = json.loads((tmp_path / "checkpoint" / "config.json").read_text())
    assert saved["model_type"] == MASKED_MODEL_TYPE and "auto_map" not in saved
    config = read_model_config(tmp_path / "checkpoint")
    assert type(config).__name__ == "BlockPrunedBertConfig" and "AutoConfig" in config.auto_map
    masked = hf_blockprune.load_masked_checkpoint(tmp_path / "checkpoint")
    inputs = model_inputs("bert")
    torch.testing.assert_close(model_outputs(masked, inputs)[0], model_outputs(compacted.eval(), inputs)[0])


@pytest.mark.parametrize("route", ["trainer", "callback"])
def test_a_compacted_model_loaded_with_remote_code_is_pruned_again(route, tmp_path):
    """What a patched run_glue.py with `--trust_remote_code` does with a compacted folder: the remote classes are
    pruned again, and the saved model composes the two layouts."""
    save_compacted(_masked("bert"), tmp_path / "first", model_card=False)
    first = json.loads((tmp_path / "first" / "config.json").read_text())["blockprune_layout"]
    remote = _plain_load(tmp_path / "first", trust_remote_code=True)
    assert type(remote.config).__name__ == "BlockPrunedBertConfig"
    config = preset_config("struct", pruning_method="topk", final_threshold=0.5, final_warmup=0.2)
    trainer = make_trainer(route, "bert", config, tmp_path / "second", model=remote, max_steps=6)
    trainer.train()
    trainer.save_model()
    second = json.loads((tmp_path / "second" / "config.json").read_text())
    assert second["model_type"] == "blockpruned_bert"
    for name, entry in second["blockprune_layout"]["layers"].items():
        assert set(entry["attention"][0]["heads"]) <= set(first["layers"][name]["attention"][0]["heads"])
    inputs = model_inputs("bert")
    expected = model_outputs(trainer.model.eval(), inputs)[0]
    for loaded in (hf_blockprune.from_pretrained(tmp_path / "second"),
                   _plain_load(tmp_path / "second", trust_remote_code=True)):
        torch.testing.assert_close(model_outputs(loaded.eval(), inputs)[0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("route", ["trainer", "callback"])
def test_an_architecture_without_a_map_saves_with_its_card_through_module_patterns(route, tmp_path):
    """DeBERTa-v2 named by module patterns: `save_model()` used to crash in the model card (which counted parameters
    through the built-in map) and leave the output folder empty."""
    torch.manual_seed(0)
    model = transformers.DebertaV2ForSequenceClassification(transformers.DebertaV2Config(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    config = preset_config(
        "struct", pruning_method="topk", final_threshold=0.5, final_warmup=0.2, layers_pattern="encoder.layer",
        attention_modules=["attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj",
                           "attention.output.dense"],
        ffn_modules=["intermediate.dense", "output.dense"])
    trainer = make_trainer(route, "bert", config, tmp_path, model=model, max_steps=6)
    trainer.train()
    trainer.save_model()
    assert "deberta-v2" in (tmp_path / "README.md").read_text()
    inputs = model_inputs("bert")
    expected = model_outputs(trainer.model.eval(), inputs)[0]
    for loaded in (hf_blockprune.from_pretrained(tmp_path), _plain_load(tmp_path, trust_remote_code=True)):
        torch.testing.assert_close(model_outputs(loaded.eval(), inputs)[0], expected, atol=1e-5, rtol=1e-5)

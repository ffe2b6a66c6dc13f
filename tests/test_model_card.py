"""The model card as a huggingface_hub ModelCard: metadata, run data, and both routes keeping it (create_model_card,
push_to_hub at the HTTP boundary)."""

import json
import re
from pathlib import Path

import huggingface_hub
import pytest
import transformers
from huggingface_hub import ModelCard
from transformers import Trainer

import hf_blockprune
from hf_blockprune import BlockPruningConfig
from hf_blockprune.compact import card_figure, card_metadata
from hf_blockprune.compact.card_metadata import (
    LOCAL_FILE,
    LOCAL_MODEL,
    TAGS,
    hub_id,
    last_eval_results,
    pipeline_tag,
    run_card_data,
)
from hf_blockprune.compact.model_card import CARD_MARKER, update_model_card
from hf_blockprune.compact.saving import save_compacted
from hf_blockprune.training.trainer_patches import keep_model_card

from conftest import tiny_dataset, tiny_model
from helpers import make_trainer, preset_config, random_masks

RUN = {"eval_results": {"accuracy": 0.875, "loss": 0.31}, "datasets": ["nyu-mll/glue"], "dataset_config": "sst2",
       "dataset_split": "validation", "model_name": "bert-pruned"}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test reaches the Hub: huggingface_hub refuses HTTP, and the Hub cache holds no card."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(card_metadata, "try_to_load_from_cache", lambda *args, **kwargs: None)


def _saved_card(folder, arch="bert", name_or_path="", card_data=None, teacher=None) -> ModelCard:
    model = random_masks(tiny_model(arch), "struct", "topk", seed=0, force_empty=False)
    model.config._name_or_path = name_or_path
    config = preset_config("struct", arch, pruning_method="topk", teacher_model=teacher)
    save_compacted(model, folder, pruning_config=config, card_data=card_data)
    return ModelCard.load(Path(folder) / "README.md")


def test_the_card_parses_and_carries_the_hub_metadata(tmp_path):
    card = _saved_card(tmp_path, name_or_path="google-bert/bert-base-uncased", card_data=RUN)
    data = card.data
    assert data.library_name == "transformers" and data.tags == TAGS
    assert data.base_model == "google-bert/bert-base-uncased" and data.pipeline_tag == "text-classification"
    assert data.datasets == ["nyu-mll/glue"] and data.model_name == "bert-pruned" and data.license is None
    results = {result.metric_type: result for result in data.eval_results}
    assert results["accuracy"].metric_value == 0.875 and results["loss"].metric_value == 0.31
    assert {(r.task_type, r.dataset_type, r.dataset_config, r.dataset_split) for r in results.values()} == {
        ("text-classification", "nyu-mll/glue", "sst2", "validation")}
    # the body is the human-readable card, with the results
    for text in (CARD_MARKER, "| `bert.encoder.layer.0` |", "pruning_layout.png", "## Loading", "| accuracy | 0.875 |",
                 "[google-bert/bert-base-uncased](https://huggingface.co/google-bert/bert-base-uncased)"):
        assert text in card.text


def test_without_run_data_only_what_the_model_tells_is_written(tmp_path):
    card = _saved_card(tmp_path)
    assert set(card.data.to_dict()) == {"library_name", "tags", "pipeline_tag"}
    assert "No evaluation was recorded" in card.text and "**Base model:** not recorded" in card.text


def test_results_without_a_dataset_stay_in_the_body(tmp_path):
    card = _saved_card(tmp_path, card_data={"eval_results": {"f1": 0.5}})
    assert "model-index" not in card.data.to_dict()  # the Hub rejects results without a dataset
    assert "| f1 | 0.5 |" in card.text


@pytest.mark.parametrize("candidate, expected", [
    ("bert-base-uncased", "bert-base-uncased"),
    ("google-bert/bert-base-uncased", "google-bert/bert-base-uncased"),
    ("/abs/path/to/model", None),
    ("runs/exp/model", None),
    ("./model", None),
    ("~/model", None),
    ("", None),
    (None, None),
])
def test_hub_id(candidate, expected):
    assert hub_id(candidate) == expected


def test_an_existing_local_folder_is_never_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "owner" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert hub_id("owner/name") is None and hub_id(str(tmp_path)) is None


def _base_folder(path: Path, metadata: str) -> str:
    path.mkdir()
    (path / "README.md").write_text(f"---\n{metadata}\n---\n# the dense model\n")
    return str(path)


@pytest.mark.parametrize("case", ["local folder with a card", "local folder without a card", "teacher", "hub id",
                                  "local path passed as finetuned_from"])
def test_base_model_is_a_hub_id_or_left_out(case, tmp_path):
    base, teacher, card_data = "", None, None
    expected = {"base_model": None, "license": None}
    if case == "local folder with a card":
        base = _base_folder(tmp_path / "dense", "license: apache-2.0\nbase_model: google-bert/bert-base-uncased")
        expected = {"base_model": "google-bert/bert-base-uncased", "license": "apache-2.0"}
    elif case == "local folder without a card":
        base = str(tmp_path)
    elif case == "teacher":
        teacher, expected["base_model"] = "textattack/bert-base-uncased-SST-2", "textattack/bert-base-uncased-SST-2"
    elif case == "hub id":
        base, expected["base_model"] = "google-bert/bert-base-uncased", "google-bert/bert-base-uncased"
    else:
        base, card_data = str(tmp_path), {"base_model": str(tmp_path)}
    card = _saved_card(tmp_path / "out", name_or_path=base, card_data=card_data, teacher=teacher)
    assert {"base_model": card.data.base_model, "license": card.data.license} == expected
    assert str(tmp_path) not in card.content  # no local path anywhere in the card


def test_the_hyperparameters_name_a_local_teacher_and_table_without_their_paths(tmp_path):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    model = random_masks(tiny_model("bert"), "struct", "topk", seed=0, force_empty=False)
    for name, teacher_model in (("local", str(teacher)), ("hub", "textattack/bert-base-uncased-SST-2")):
        config = preset_config("struct", pruning_method="topk", teacher_model=teacher_model, target_speedup=2.0,
                               speedup_cost_model="latency", latency_table=str(tmp_path / "latency_table.json"))
        save_compacted(model, tmp_path / name, pruning_config=config)
    local, hub = ((tmp_path / name / "README.md").read_text() for name in ("local", "hub"))
    assert str(tmp_path) not in local and str(tmp_path) not in hub
    assert f'"teacher_model": "{LOCAL_MODEL}"' in local and f'"latency_table": "{LOCAL_FILE}"' in local
    assert '"teacher_model": "textattack/bert-base-uncased-SST-2"' in hub  # a Hub id is public: it stays


def test_license_of_a_hub_base_model_comes_from_the_hub_cache(tmp_path, monkeypatch):
    readme = Path(_base_folder(tmp_path / "cached", "license: mit")) / "README.md"
    monkeypatch.setattr(card_metadata, "try_to_load_from_cache", lambda repo_id, filename: str(readme))
    card = _saved_card(tmp_path / "out", name_or_path="owner/dense")
    assert card.data.base_model == "owner/dense" and card.data.license == "mit"


@pytest.mark.parametrize("model_class, expected", [
    ("BertForSequenceClassification", "text-classification"),
    ("BertForQuestionAnswering", "question-answering"),
    ("BertForTokenClassification", "token-classification"),
    ("BertForMaskedLM", "fill-mask"),
    ("BertForMultipleChoice", None),
    ("BertModel", None),
    ("LlamaForCausalLM", "text-generation"),
    ("GPT2LMHeadModel", "text-generation"),
    ("BartForConditionalGeneration", "text2text-generation"),
    ("ViTForImageClassification", "image-classification"),
])
def test_pipeline_tag_of_the_model_class(model_class, expected):
    cls = getattr(transformers, model_class)
    model = cls.__new__(cls)  # the tag depends on the class only
    assert pipeline_tag(model) == expected


def test_a_summarization_run_tags_a_seq2seq_model_summarization(tmp_path):
    card = _saved_card(tmp_path, arch="bart", card_data={"task": "summarization"})
    assert card.data.pipeline_tag == "summarization"
    assert pipeline_tag(tiny_model("bart"), task="text-classification") == "text2text-generation"


LOG_HISTORY = [
    {"loss": 0.9, "learning_rate": 1e-3, "epoch": 0.5, "step": 5},
    {"eval_loss": 0.8, "eval_accuracy": 0.5, "eval_runtime": 0.1, "epoch": 0.5, "step": 5},
    {"loss": 0.7, "epoch": 1.0, "step": 10},
    {"eval_loss": 0.6, "eval_accuracy": 0.75, "eval_runtime": 0.1, "eval_samples_per_second": 160.0,
     "eval_steps_per_second": 20.0, "epoch": 1.0, "step": 10},
    {"train_runtime": 3.0, "train_loss": 0.8, "epoch": 1.0, "step": 10},
]


def test_last_eval_results():
    assert last_eval_results(LOG_HISTORY) == {"loss": 0.6, "accuracy": 0.75}
    assert last_eval_results(LOG_HISTORY[:1]) == {} and last_eval_results([]) == {}
    assert last_eval_results([{"eval_f1": 80.0, "eval_exact_match": 70.0, "step": 3}]) == {"f1": 80.0,
                                                                                           "exact_match": 70.0}


def test_run_card_data_from_create_model_card_arguments():
    data = run_card_data(LOG_HISTORY, "user/bert-pruned", tasks="text-classification", dataset_tags="glue",
                         dataset="GLUE SST2", dataset_args="sst2", finetuned_from="bert-base-uncased", tags="mine",
                         language=None)
    assert data == {"eval_results": {"loss": 0.6, "accuracy": 0.75}, "training": {"steps": 10},
                    "model_name": "bert-pruned",
                    "base_model": "bert-base-uncased", "tags": ["mine"], "task": "text-classification",
                    "datasets": ["glue"], "dataset_name": "GLUE SST2", "dataset_config": "sst2"}
    assert run_card_data() == {}


def test_update_merges_into_our_card_and_leaves_other_cards_alone(tmp_path):
    _saved_card(tmp_path / "ours")
    assert update_model_card(tmp_path / "ours", {**RUN, "tags": ["extra"], "license": "mit"})
    card = ModelCard.load(tmp_path / "ours" / "README.md")
    assert card.data.tags == TAGS + ["extra"] and card.data.license == "mit"
    assert card.data.eval_results[0].dataset_type == "nyu-mll/glue" and card.data.model_name == "bert-pruned"
    assert "| accuracy | 0.875 |" in card.text and "No evaluation was recorded" not in card.text
    assert card.text.count(CARD_MARKER) == 1 and "## Kept structure" in card.text
    (tmp_path / "other").mkdir()
    foreign = "---\nlicense: mit\n---\n# someone else's card\n"
    (tmp_path / "other" / "README.md").write_text(foreign)
    assert not update_model_card(tmp_path / "other", RUN) and not update_model_card(tmp_path / "missing", RUN)
    assert (tmp_path / "other" / "README.md").read_text() == foreign


# ------------------------------------------------------------------------------ the trainer and the callback routes


class EvaluateLikeRunQA(Trainer):
    """Shaped like run_qa.py's QuestionAnsweringTrainer: its own evaluate logs `eval_*` metrics without a loss."""

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        metrics = {"eval_exact_match": 61.0, "eval_f1": 70.5}
        self.log(metrics)
        return metrics


ROUTES = {"trainer": ("trainer", Trainer), "callback": ("callback", Trainer),
          "callback, Trainer subclass": ("callback", EvaluateLikeRunQA)}


def _trained(route, output_dir, **arg_overrides):
    name, trainer_class = ROUTES[route]
    config = preset_config("struct", pruning_method="topk", final_threshold=0.5, final_warmup=0.2)
    trainer = make_trainer(name, "bert", config, output_dir, trainer_class=trainer_class, max_steps=4,
                           **arg_overrides)
    trainer.eval_dataset = tiny_dataset("bert", size=8)
    trainer.train()
    return trainer, trainer.evaluate()


def _expected_metrics(metrics: dict) -> dict:
    return {key.removeprefix("eval_"): value for key, value in metrics.items()
            if key.startswith("eval_") and not key.endswith(("runtime", "per_second"))}


@pytest.mark.parametrize("route", ROUTES)
def test_create_model_card_keeps_our_card_with_the_run_metadata(route, tmp_path):
    trainer, metrics = _trained(route, tmp_path)
    trainer.save_model()
    saved = ModelCard.load(tmp_path / "README.md")
    for name, value in _expected_metrics(metrics).items():  # the save already knows the last evaluation
        assert f"| {name} | {value:.4g} |" in saved.text
    trainer.create_model_card(dataset_tags="glue", dataset="GLUE SST2", dataset_args="sst2",
                              tasks="text-classification", license="apache-2.0", tags=["sst2"])
    card = ModelCard.load(tmp_path / "README.md")
    assert CARD_MARKER in card.text and "generated_from_trainer" not in card.content
    data = card.data
    assert data.tags == TAGS + ["sst2"] and data.license == "apache-2.0" and data.datasets == ["glue"]
    assert data.pipeline_tag == "text-classification" and data.base_model is None
    assert {r.metric_type: r.metric_value for r in data.eval_results} == _expected_metrics(metrics)
    assert {(r.dataset_type, r.dataset_name, r.dataset_config) for r in data.eval_results} == {
        ("glue", "GLUE SST2", "sst2")}


@pytest.mark.parametrize("route", ["trainer", "callback"])
def test_a_run_distilled_from_a_local_teacher_keeps_its_path_out_of_the_card(route, tmp_path):
    """The stock scripts pass `--teacher_model <folder>`: neither the card nor the saved config.json holds the path."""
    tiny_model("bert", seed=1).save_pretrained(tmp_path / "teacher")
    config = preset_config("struct", pruning_method="topk", final_threshold=0.5, final_warmup=0.2,
                           teacher_model=str(tmp_path / "teacher"))
    trainer = make_trainer(route, "bert", config, tmp_path / "out", max_steps=2)
    trainer.train()
    trainer.save_model()
    card = (tmp_path / "out" / "README.md").read_text()
    assert str(tmp_path) not in card and f'"teacher_model": "{LOCAL_MODEL}"' in card
    saved = json.loads((tmp_path / "out" / "config.json").read_text())  # pushed to the Hub with the card
    assert str(tmp_path) not in json.dumps(saved) and saved["blockprune_config"]["teacher_model"] == LOCAL_MODEL


@pytest.mark.parametrize("route", ["trainer", "callback"])
def test_a_stage_2_card_says_it_was_pruned_then_fine_tuned(route, tmp_path):
    """README's second stage: the compacted model fine-tuned with pruning off, distilled from a teacher."""
    tiny_model("bert", seed=1).save_pretrained(tmp_path / "teacher")
    first, _ = _trained(route, tmp_path / "stage1")
    first.save_model()
    stage_2 = BlockPruningConfig(pruning_preset="none", teacher_model=str(tmp_path / "teacher"))
    trainer = make_trainer(route, "bert", stage_2, tmp_path / "stage2", max_steps=3,
                           model=hf_blockprune.from_pretrained(tmp_path / "stage1"))
    trainer.eval_dataset = tiny_dataset("bert", size=8)
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model()
    card = ModelCard.load(tmp_path / "stage2" / "README.md").text
    assert "### Stage 1: pruning" in card and "### Stage 2: fine-tuning" in card
    pruned, tuned = (json.loads(block) for block in re.findall(r"```json\n(.*?)\n```", card, re.DOTALL))
    assert pruned["pruning_method"] == "topk" and pruned["steps"] == 4  # stage 1's settings, not stage 2's
    assert tuned == {"steps": 3, "teacher": LOCAL_MODEL}
    assert f"no further pruning, distilled from {LOCAL_MODEL}, 3 training steps" in card
    assert "after stage 2 (fine-tuning)" in card and f"| loss | {metrics['eval_loss']:.4g} |" in card
    assert str(tmp_path) not in card


@pytest.mark.parametrize("route", ["trainer", "callback"])
def test_a_folder_without_our_card_gets_the_trainers_card(route, tmp_path):
    trainer = make_trainer(route, "bert", preset_config("struct"), tmp_path, max_steps=1)
    trainer.create_model_card()
    assert "generated_from_trainer" in ModelCard.load(tmp_path / "README.md").data.tags


def test_keep_model_card_wraps_once(tmp_path):
    trainer = make_trainer("callback", "bert", preset_config("struct"), tmp_path)
    wrapped = trainer.create_model_card
    assert wrapped.keeps_pruning_card and keep_model_card(trainer).create_model_card is wrapped


class _Hub:
    """Stands in for `huggingface_hub.HfApi` at the HTTP boundary: records the repo and the README.md uploaded."""

    def __init__(self):
        self.repos, self.uploads = [], []

    def create_repo(self, api, repo_id, **kwargs):
        self.repos.append(repo_id)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, api, *, repo_id, folder_path, **kwargs):
        self.uploads.append({"repo_id": repo_id, "files": sorted(p.name for p in Path(folder_path).iterdir()),
                             "README.md": (Path(folder_path) / "README.md").read_text()})
        return "https://hub.invalid/commit"


@pytest.mark.parametrize("route", ROUTES)
def test_push_to_hub_uploads_our_card(route, tmp_path, monkeypatch):
    hub = _Hub()
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda api, *a, **k: hub.create_repo(api, *a, **k))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda api, **k: hub.upload_folder(api, **k))
    trainer, metrics = _trained(route, tmp_path, push_to_hub=True, hub_model_id="user/repo", hub_token="x")
    trainer.push_to_hub(dataset_tags="glue", tasks="text-classification")
    assert hub.repos == ["user/repo"] and [upload["repo_id"] for upload in hub.uploads] == ["user/repo"]
    assert {"README.md", "config.json", "model.safetensors", "pruning_layout.png"} <= set(hub.uploads[0]["files"])
    card = ModelCard(hub.uploads[0]["README.md"])
    assert CARD_MARKER in card.text and "generated_from_trainer" not in card.content
    assert card.data.tags == TAGS and card.data.datasets == ["glue"] and card.data.model_name == "repo"
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == _expected_metrics(metrics)



def test_the_layout_figure_leaves_the_users_matplotlib_backend_and_figures_alone(tmp_path):
    """A save inside a notebook must not switch its inline plots off (the figure was drawn with `pyplot` after
    `matplotlib.use("Agg")`)."""
    import matplotlib
    import matplotlib.pyplot as plt

    before = matplotlib.get_backend()
    figure = plt.figure()
    try:
        matplotlib.use("svg")  # a backend that is neither the default nor Agg stands in for the notebook's
        card_figure.write_figure(tmp_path / "layout.png", [{"layer": "layer.0", "heads": [[0, 2]], "ffn_size": 3}],
                                num_heads=4, ffn_total=8)
        assert matplotlib.get_backend() == "svg"
        assert plt.get_fignums() == [figure.number]
        assert (tmp_path / "layout.png").read_bytes()[:4] == b"\x89PNG"
    finally:
        plt.close(figure)
        matplotlib.use(before)

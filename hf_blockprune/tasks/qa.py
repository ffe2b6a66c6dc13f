"""Extractive question answering (SQuAD format): features for training and evaluation, answer extraction, EM / F1.

The usual recipe: a long context is split into overlapping windows (`max_length`, `doc_stride`); a training window
is labelled with the answer's token span, or with the first token when the answer is not inside it; at evaluation
the best-scoring valid span over every window of an example is the predicted answer, and the official SQuAD v1.1
exact-match and F1 are computed against all the gold answers.
"""

from __future__ import annotations

import collections
import re
import string

import numpy as np


def _windows(examples: dict, tokenizer, max_length: int, doc_stride: int) -> dict:
    pad_right = tokenizer.padding_side == "right"
    questions = [q.lstrip() for q in examples["question"]]
    contexts = examples["context"]
    return tokenizer(
        questions if pad_right else contexts,
        contexts if pad_right else questions,
        truncation="only_second" if pad_right else "only_first",
        max_length=max_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding="max_length",
    )


def _context_index(tokenizer) -> int:
    return 1 if tokenizer.padding_side == "right" else 0


def prepare_train_features(examples: dict, tokenizer, max_length: int = 384, doc_stride: int = 128) -> dict:
    """Tokenize a batch of SQuAD examples into training windows labelled with `start_positions` / `end_positions`.

    Args:
        examples (`dict`): a batch with `question`, `context` and `answers` (`{"text": [...], "answer_start": [...]}`).
        tokenizer: a fast tokenizer (offsets are needed).
        max_length (`int`, *optional*, defaults to 384): tokens per window, question included.
        doc_stride (`int`, *optional*, defaults to 128): tokens shared by consecutive windows of a context.
    """
    features = _windows(examples, tokenizer, max_length, doc_stride)
    sample_map = features.pop("overflow_to_sample_mapping")
    offsets = features.pop("offset_mapping")
    context_id = _context_index(tokenizer)
    features["start_positions"], features["end_positions"] = [], []
    for i, window_offsets in enumerate(offsets):
        answers = examples["answers"][sample_map[i]]
        ids = features["input_ids"][i]
        start = end = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
        if answers["answer_start"]:
            start_char = answers["answer_start"][0]
            end_char = start_char + len(answers["text"][0])
            sequence_ids = features.sequence_ids(i)
            context = [k for k, s in enumerate(sequence_ids) if s == context_id]
            first, last = context[0], context[-1]
            if window_offsets[first][0] <= start_char and window_offsets[last][1] >= end_char:
                start = next(k for k in range(first, last + 1) if window_offsets[k][1] > start_char)
                end = next(k for k in range(last, first - 1, -1) if window_offsets[k][0] < end_char)
        features["start_positions"].append(start)
        features["end_positions"].append(end)
    return features


def prepare_validation_features(examples: dict, tokenizer, max_length: int = 384, doc_stride: int = 128) -> dict:
    """Tokenize a batch of SQuAD examples into evaluation windows.

    Each window keeps `example_id` (the example's `id`) and an `offset_mapping` where tokens outside the context are
    `None`, which `postprocess_predictions` needs to map spans back to text.
    """
    features = _windows(examples, tokenizer, max_length, doc_stride)
    sample_map = features.pop("overflow_to_sample_mapping")
    context_id = _context_index(tokenizer)
    features["example_id"] = []
    for i in range(len(features["input_ids"])):
        sequence_ids = features.sequence_ids(i)
        features["example_id"].append(examples["id"][sample_map[i]])
        features["offset_mapping"][i] = [
            offset if sequence_ids[k] == context_id else None for k, offset in enumerate(features["offset_mapping"][i])
        ]
    return features


def postprocess_predictions(examples, features, start_logits: np.ndarray, end_logits: np.ndarray,
                            n_best: int = 20, max_answer_length: int = 30) -> dict[str, str]:
    """The predicted answer text of every example: the best valid span over all its windows.

    A span is valid when both ends are context tokens, the end is not before the start and it is at most
    `max_answer_length` tokens long; its score is `start_logit + end_logit`.

    Args:
        examples: the raw examples (`id`, `context`).
        features: their evaluation windows (`prepare_validation_features`), in the order of the logits.
        start_logits (`np.ndarray`): `(num_windows, seq_len)`.
        end_logits (`np.ndarray`): `(num_windows, seq_len)`.
        n_best (`int`, *optional*, defaults to 20): start and end candidates considered per window.
        max_answer_length (`int`, *optional*, defaults to 30): longest answer, in tokens.

    Returns:
        `dict[str, str]`: example id -> answer text (`""` when no window has a valid span).
    """
    windows = collections.defaultdict(list)
    for index, example_id in enumerate(features["example_id"]):
        windows[example_id].append(index)
    offsets_of = features["offset_mapping"]
    answers = {}
    for example in examples:
        best_score, best_text = -np.inf, ""
        for index in windows[example["id"]]:
            offsets = offsets_of[index]
            starts = np.argsort(start_logits[index])[-1:-n_best - 1:-1]
            ends = np.argsort(end_logits[index])[-1:-n_best - 1:-1]
            for s in starts:
                for e in ends:
                    if s >= len(offsets) or e >= len(offsets) or offsets[s] is None or offsets[e] is None:
                        continue
                    if e < s or e - s + 1 > max_answer_length:
                        continue
                    score = start_logits[index][s] + end_logits[index][e]
                    if score > best_score:
                        best_score, best_text = score, example["context"][offsets[s][0]:offsets[e][1]]
        answers[example["id"]] = best_text
    return answers


def normalize_answer(text: str) -> str:
    """SQuAD's normalization: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _f1(prediction: str, truth: str) -> float:
    predicted, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = collections.Counter(predicted) & collections.Counter(gold)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """SQuAD v1.1 exact match and F1 (in %), each the best over an example's gold answers, averaged over examples.

    Args:
        predictions (`dict[str, str]`): example id -> predicted text.
        references (`dict[str, list[str]]`): example id -> gold answer texts.

    Raises:
        `ValueError`: an example of `references` has no prediction.
    """
    missing = [key for key in references if key not in predictions]
    if missing:
        raise ValueError(f"No prediction for {len(missing)} example(s), e.g. {missing[0]!r}.")
    exact = [max(float(normalize_answer(predictions[k]) == normalize_answer(t)) for t in golds)
             for k, golds in references.items()]
    f1 = [max(_f1(predictions[k], t) for t in golds) for k, golds in references.items()]
    return {"exact_match": 100.0 * float(np.mean(exact)), "f1": 100.0 * float(np.mean(f1))}

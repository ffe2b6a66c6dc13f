"""Tiny random-init models of every supported architecture, and a tiny dataset to train them on."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    BartConfig,
    BertConfig,
    DebertaV2Config,
    DistilBertConfig,
    ElectraConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    ModernBertConfig,
    Qwen2Config,
    RobertaConfig,
    TrainingArguments,
    XLMRobertaConfig,
)

ARCHS = ["bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta-v2", "modernbert", "bart", "llama",
         "qwen2", "mistral", "gpt2"]
ENCODER_DECODERS = ("bart",)
GROUPED = ("llama", "qwen2", "mistral")  # grouped-query attention (multi-query for Mistral), gated MLP
DECODERS = GROUPED + ("gpt2",)  # causal LMs
GENERATIVE = ENCODER_DECODERS + DECODERS
GATED_FFN = GROUPED + ("modernbert",)  # gate, up -> down (ModernBERT: one fused input): neuron scores only
VOCAB = 99
SEQ_LEN = 12

# Odd sizes catch shape bugs: hidden 32 with 4 heads of 8, FFN of 37.
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
               max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2)


def tiny_config(arch: str):
    """A tiny config of `arch` with no dropout (so runs are deterministic)."""
    if arch == "bert":
        return BertConfig(**_COMMON)
    if arch == "roberta":
        return RobertaConfig(**{**_COMMON, "max_position_embeddings": 70}, pad_token_id=1)
    if arch == "xlm-roberta":
        return XLMRobertaConfig(**{**_COMMON, "max_position_embeddings": 70}, pad_token_id=1)
    if arch == "electra":
        return ElectraConfig(**_COMMON, embedding_size=16)
    if arch == "distilbert":
        return DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=37,
                                max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, num_labels=2)
    if arch == "bart":
        return BartConfig(
            vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=64,
            dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0,
            eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
        )
    if arch == "deberta-v2":  # relative attention with its own position projections (share_att_key=False)
        return DebertaV2Config(**_COMMON, relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=8,
                               max_relative_positions=16, share_att_key=False)
    if arch == "modernbert":  # biases on (off by default) so that compaction must fold them
        return ModernBertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64, global_attn_every_n_layers=2, local_attention=8, attention_bias=True,
            mlp_bias=True, attention_dropout=0.0, mlp_dropout=0.0, embedding_dropout=0.0, classifier_dropout=0.0,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2, num_labels=2,
        )
    if arch == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_inner=37, n_positions=64,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, bos_token_id=1,
                          eos_token_id=2)
    if arch in DECODERS:
        # 4 query heads of 8 over 2 key/value heads (Mistral: 1, multi-query); Llama without biases, Qwen2 with
        # biased q/k/v and a biasless output projection
        decoder = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=64, attention_dropout=0.0, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
        if arch == "llama":
            return LlamaConfig(**decoder, num_key_value_heads=2)
        if arch == "qwen2":
            return Qwen2Config(**decoder, num_key_value_heads=2)
        return MistralConfig(**decoder, num_key_value_heads=1, sliding_window=None)
    raise ValueError(arch)


def auto_class(arch: str):
    """The auto class of the tiny test models of `arch`: sequence classification, seq2seq LM or causal LM."""
    if arch in ENCODER_DECODERS:
        return AutoModelForSeq2SeqLM
    return AutoModelForCausalLM if arch in DECODERS else AutoModelForSequenceClassification


def tiny_model(arch: str, seed: int = 0):
    """A tiny random-init model: sequence classification, conditional generation (BART) or causal LM (decoders)."""
    torch.manual_seed(seed)
    return auto_class(arch).from_config(tiny_config(arch))


def tiny_dataset(arch: str, size: int = 64, seed: int = 0) -> list[dict]:
    """Random token sequences; the label is whether token 7 appears (learnable), a copy task for BART, the sequence
    itself for causal LMs."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(size):
        ids = torch.randint(3, VOCAB, (SEQ_LEN,), generator=gen)
        if arch in ENCODER_DECODERS:
            rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:6].clone()})
        elif arch in DECODERS:  # language modelling of the sequence itself
            rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
        else:
            rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": int((ids == 7).any())})
    return rows


def training_args(output_dir, **overrides) -> TrainingArguments:
    """Quiet CPU TrainingArguments for tests."""
    defaults = dict(
        output_dir=str(output_dir), per_device_train_batch_size=8, learning_rate=1e-3, max_steps=50,
        logging_steps=10, save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, seed=0,
        lr_scheduler_type="constant", dataloader_num_workers=0,
    )
    defaults.update(overrides)
    return TrainingArguments(**defaults)


# The long Trainer-loop tests (densities, targets) run one grouped-query decoder: Qwen2 and Mistral differ from Llama
# in biases and key/value head count only, which the compaction, generation and save tests cover, and
# tests/test_decoders.py trains each of them through both routes.
TRAINING_ARCHS = [arch for arch in ARCHS if arch not in ("qwen2", "mistral")]


@pytest.fixture(params=TRAINING_ARCHS)
def arch(request):
    """Each supported architecture in turn (one grouped-query decoder, see `TRAINING_ARCHS`)."""
    return request.param

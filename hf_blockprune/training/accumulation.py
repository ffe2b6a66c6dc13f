"""Weight each micro-batch's loss so that gradient accumulation equals one larger batch.

transformers 5 counts the labelled items of all the micro-batches of an optimizer step (`num_items_in_batch`, summed
over processes when `average_tokens_across_devices`) and, when the model's `forward` takes `**kwargs`, passes that
count to the model and does *not* divide the loss by the number of accumulation steps, on the assumption that the
model normalised its loss by the count. BERT, BART and most encoder models ignore it and return a per-micro-batch
mean, so the accumulated gradient comes out `gradient_accumulation_steps` times too large (and gradient clipping
then changes the run). The pruning terms added to the loss must be scaled the same way as the task loss.

hf_blockprune therefore keeps the count away from the model (which returns its per-micro-batch mean) and weights the
whole training loss of micro-batch `i` (task, distillation and regularization) by `n_i / N`, with `n_i` its labelled
items counted as the Trainer counts them and `N` the Trainer's `num_items_in_batch`. Summed over the micro-batches of
a step this is the mean over the whole batch, token-weighted for sequence outputs, for any split.
"""

from __future__ import annotations

import torch
from torch import nn

IGNORE_INDEX = -100


def loss_shifts_labels(model: nn.Module) -> bool:
    """Whether the model's loss compares position `t` with label `t + 1` (decoder-only causal LMs), as the Trainer
    decides it when it counts items."""
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    config = getattr(model, "config", None)
    return LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss and not getattr(
        config, "is_encoder_decoder", False
    )


def labelled_items(inputs: dict, shift: bool) -> torch.Tensor | None:
    """Number of labelled items of one micro-batch, counted as `Trainer._get_num_items_in_batch` counts them.

    Args:
        inputs (`dict`): the micro-batch given to the model (`labels`, and `shift_labels` if the collator made them).
        shift (`bool`): count `labels[..., 1:]` (causal language models).

    Returns:
        `torch.Tensor` or `None`: a 0-dim count, or `None` when the micro-batch has no label tensor.
    """
    labels = inputs.get("shift_labels")
    if labels is None:
        labels = inputs.get("labels")
        if torch.is_tensor(labels) and shift:
            labels = labels[..., 1:]
    if not torch.is_tensor(labels):
        return None
    return labels.ne(IGNORE_INDEX).sum()


def micro_batch_weight(inputs: dict, num_items_in_batch, shift: bool) -> torch.Tensor | None:
    """`n_i / N` for one micro-batch (see the module docstring), or `None` if it cannot be computed.

    Args:
        inputs (`dict`): the micro-batch.
        num_items_in_batch (`torch.Tensor` or `int`): the Trainer's count over the whole optimizer step.
        shift (`bool`): as for `labelled_items`.
    """
    items = labelled_items(inputs, shift)
    if items is None or num_items_in_batch is None:
        return None
    total = torch.as_tensor(num_items_in_batch, device=items.device)
    return items.to(torch.float32) / total.clamp(min=1).to(torch.float32)

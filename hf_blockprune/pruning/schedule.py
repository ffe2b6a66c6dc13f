"""Cubic sparsity schedule (Zhu & Gupta 2017, as used by movement pruning): pure functions of the step."""

from __future__ import annotations


def schedule_progress(step: int, total_steps: int, initial_warmup: float, final_warmup: float) -> float:
    """Fraction of the cubic phase done at `step`, in [0, 1].

    Args:
        step (`int`): optimizer steps done so far.
        total_steps (`int`): optimizer steps of the whole run.
        initial_warmup (`float`): fraction of `total_steps` held at the initial value.
        final_warmup (`float`): fraction of `total_steps` held at the final value.
    """
    start = initial_warmup * total_steps
    end = (1.0 - final_warmup) * total_steps
    # 1) initial warmup: hold the initial value
    if step <= start:
        return 0.0
    # 3) final warmup: hold the final value
    if step >= end:
        return 1.0
    # 2) cubic phase: linear progress, bent by the callers
    return (step - start) / (end - start)


def cubic_threshold(progress: float, initial: float, final: float) -> float:
    """`final + (initial - final) * (1 - progress) ** 3`."""
    return final + (initial - final) * (1.0 - progress) ** 3


def cubic_lambda(progress: float, final_lambda: float) -> float:
    """Regularization weight ramped in on the same curve: `final_lambda * (1 - (1 - progress) ** 3)`."""
    return final_lambda * (1.0 - (1.0 - progress) ** 3)


import pytest
import torch

from hf_blockprune.pruning.binarizers import binarize


@pytest.mark.parametrize("fraction, kept", [(1.0, 10), (0.5, 5), (0.26, 3), (0.0, 0)])
def test_topk_keeps_the_largest_scores(fraction, kept):
    scores = torch.arange(10.0).flip(0).reshape(2, 5)
    mask = binarize(scores, "topk", torch.tensor(0.0), fraction)
    assert int(mask.sum()) == kept
    assert torch.equal(mask.flatten()[:kept], torch.ones(kept))


def test_sigmoid_threshold_mask():
    scores = torch.tensor([-3.0, -1.0, 0.0, 2.0])
    mask = binarize(scores, "sigmoid_threshold", torch.logit(torch.tensor(0.3)), 1.0)
    assert mask.tolist() == [0.0, 0.0, 1.0, 1.0]


def test_sigmoid_threshold_stays_exact_where_the_sigmoid_saturates():
    scores = torch.tensor([30.0, 40.0])
    mask = binarize(scores, "sigmoid_threshold", torch.tensor(35.0), 1.0)
    assert mask.tolist() == [0.0, 1.0]


@pytest.mark.parametrize("method", ["topk", "sigmoid_threshold"])
def test_gradient_is_straight_through(method):
    scores = torch.randn(3, 4, requires_grad=True)
    upstream = torch.randn(3, 4)
    (binarize(scores, method, torch.tensor(0.5), 0.5) * upstream).sum().backward()
    assert torch.equal(scores.grad, upstream)

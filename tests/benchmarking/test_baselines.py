from __future__ import annotations

import torch

from codiemb_st import MultiPositiveCachedInfoNCELoss
from measurement.baselines import naive_multi_positive_infonce
from measurement.data import column_features, word_texts


def test_naive_multi_positive_baseline_equals_the_cached_loss(tiny_model):
    """The benchmark's baseline computes the same loss and gradients as the loss it is compared with."""
    columns = [word_texts(6, 4, seed=0)] + [word_texts(6, 8, seed=1 + c) for c in range(3)]  # 2 positives, 1 negative
    features = column_features(tiny_model, columns, "cpu")

    def loss_and_grads(loss_fn):
        tiny_model.zero_grad(set_to_none=True)
        loss = loss_fn([dict(f) for f in features], None)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in tiny_model.parameters() if p.grad is not None]

    naive_loss, naive_grads = loss_and_grads(naive_multi_positive_infonce(tiny_model, num_positives=2, scale=50.0))
    cached = MultiPositiveCachedInfoNCELoss(tiny_model, num_positives=2, temperature=0.02, mini_batch_size=4)
    cached_loss, cached_grads = loss_and_grads(cached)
    torch.testing.assert_close(naive_loss, cached_loss, atol=1e-5, rtol=1e-5)
    assert len(naive_grads) == len(cached_grads)
    for naive_grad, cached_grad in zip(naive_grads, cached_grads):
        torch.testing.assert_close(naive_grad, cached_grad, atol=1e-5, rtol=1e-4)

"""``sample_labels``: draws follow softmax(logits), ignored positions stay ignored."""

import torch

from ginger_hf import sample_labels


def test_frequencies_follow_the_softmax_and_zero_probabilities_are_never_drawn():
    logits = torch.tensor([2.0, 0.0, -1.0, float("-inf"), 1.0, 0.5])
    probs = torch.softmax(logits, -1)
    rows = 200_000
    labels = torch.zeros(rows, dtype=torch.long)
    labels[::10] = -100
    drawn = sample_labels(logits.expand(rows, -1), labels, generator=torch.Generator().manual_seed(0))
    assert torch.equal(drawn[::10], labels[::10])  # ignored positions untouched
    kept = drawn[labels != -100]
    counts = torch.bincount(kept, minlength=logits.numel()).double()
    expected = probs.double() * kept.numel()
    sigma = (expected * (1 - probs.double())).sqrt()
    assert counts[3] == 0  # -inf logit: probability 0
    assert ((counts - expected).abs() <= 5 * sigma.clamp_min(1)).all(), (counts, expected)


def test_draws_depend_on_the_generator_only():
    logits = torch.randn(4, 7, 50)
    labels = torch.zeros(4, 7, dtype=torch.long)
    a = sample_labels(logits, labels, generator=torch.Generator().manual_seed(3))
    b = sample_labels(logits, labels, generator=torch.Generator().manual_seed(3))
    c = sample_labels(logits, labels, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert ((a >= 0) & (a < 50)).all()

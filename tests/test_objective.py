"""Reductions and the objective: per-sample energies, accumulation equivalence, metrics."""

import pytest
import torch
from torch import nn

from betakd import energies, features, weighting
from betakd.objective import DistillationObjective, masked_mean, per_sample_mean, token_counts


def test_per_sample_mean_matches_a_loop():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0])
    index = torch.tensor([0, 0, 2, 2, 2])
    got = per_sample_mean(values, index, num_samples=3)
    torch.testing.assert_close(got, torch.tensor([1.5, 0.0, 17 / 3]))
    assert token_counts(index, 3).tolist() == [2, 0, 3]


def test_masked_mean():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[True, False, True], [False, False, False]])
    torch.testing.assert_close(masked_mean(v, m), torch.tensor([2.0, 0.0]))


def test_samples_without_tokens_are_left_out_even_with_nan():
    obj = DistillationObjective(weighting.build("task", ["ce", "fkl"]))
    ce = torch.tensor([1.0, float("nan")], requires_grad=True)
    kd = torch.tensor([0.5, float("nan")], requires_grad=True)
    out = obj(ce, {"fkl": kd}, counts=torch.tensor([3, 0]))
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(ce.grad).all()
    torch.testing.assert_close(out.loss, torch.tensor(1.5))


def test_token_reduction_weighs_samples_by_token_count():
    obj = DistillationObjective(weighting.build("equal", ["ce", "fkl"]), reduction="token")
    out = obj(torch.tensor([1.0, 2.0]), {"fkl": torch.zeros(2)}, counts=torch.tensor([1, 3]))
    torch.testing.assert_close(out.loss, torch.tensor((1.0 * 1 + 2.0 * 3) / 4))


def test_metrics_per_channel():
    obj = DistillationObjective(weighting.build("closed_form", ["ce", "fkl"]))
    out = obj(torch.tensor([1.0, 1.0]), {"fkl": torch.tensor([0.5, 0.25])})
    m = out.metrics
    assert m["fkl/beta_min"] == pytest.approx(1.0) and m["fkl/beta_max"] == pytest.approx(2.0)
    assert m["fkl/beta_mean"] == pytest.approx(1.5) and m["fkl/beta_std"] == pytest.approx(0.5)
    assert m["fkl/energy"] == pytest.approx(0.375) and m["fkl/weighted"] == pytest.approx(0.5)
    assert m["ce/beta_mean"] == 1.0 and m["fkl/at_bound"] == 0.0
    assert m["loss"] == pytest.approx(float(out.loss))


def test_channel_mismatch_is_a_clear_error():
    obj = DistillationObjective(weighting.build("equal", ["ce", "fkl"]))
    with pytest.raises(ValueError, match=r"missing \['fkl'\], unexpected \['rkl'\]"):
        obj(torch.ones(2), {"rkl": torch.ones(2)})
    with pytest.raises(ValueError, match="first channel must be 'ce'"):
        DistillationObjective(weighting.build("equal", ["fkl", "ce"]))


# ----------------------------------------------------------------- accumulation equivalence


class TinyStudent(nn.Module):
    """Logits and features from inputs; enough to exercise every channel."""

    def __init__(self, dim=6, vocab=9):
        super().__init__()
        self.body = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return self.head(h), h


def make_batch(seed=0, batch=8, tokens=5, dim=6, vocab=9):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, dim, generator=g)
    teacher_logits = torch.randn(batch, tokens, vocab, generator=g) * 2
    teacher_feats = torch.randn(batch, tokens, 4, generator=g)
    labels = torch.randint(0, vocab, (batch, tokens), generator=g)
    # Ragged supervision: sample i supervises its first 1 + i % tokens tokens.
    mask = torch.arange(tokens)[None, :] < (1 + torch.arange(batch) % tokens)[:, None]
    rep = torch.randn(batch, 3, generator=g)
    return x, teacher_logits, teacher_feats, labels, mask, rep


def loss_on(student, head, obj, batch, rows, num_items):
    x, t_logits, t_feats, labels, mask, rep = (v[rows] for v in batch)
    logits, h = student(x)
    sel = mask.nonzero(as_tuple=True)
    sample_index = sel[0]
    b = len(rows)
    ce = per_sample_mean(
        nn.functional.cross_entropy(logits[sel], labels[sel], reduction="none"), sample_index, b
    )
    kd = per_sample_mean(energies.get("cosine_probs")(logits[sel], t_logits[sel]), sample_index, b)
    feat = head(h, t_feats)
    counts = token_counts(sample_index, b)
    return obj(ce, {"cosine_probs": kd, "feat": feat}, rep, counts=counts, num_items=num_items)


WEIGHTINGS = [
    ("equal", {}),
    ("fixed", {"weights": {"cosine_probs": 3.0, "feat": 0.5}}),
    ("task", {"weight_ce": True}),
    ("instance", {"input_dim": 3, "hidden": 8}),
    ("closed_form", {"per": "sample"}),
]


@pytest.mark.parametrize("reduction", ["sample", "token"])
@pytest.mark.parametrize("name,opts", WEIGHTINGS)
def test_two_micro_batches_of_four_equal_one_batch_of_eight(name, opts, reduction):
    batch = make_batch()

    def gradients(splits):
        torch.manual_seed(0)
        student = TinyStudent()
        head = features.FeatureChannel(teacher_dim=4, student_dim=6)
        obj = DistillationObjective(
            weighting.build(name, ["ce", "cosine_probs", "feat"], **opts), reduction
        )
        if name == "instance":  # leave the zero-initialised output layer
            nn.init.normal_(obj.weighting.net[-1].weight, std=0.5)
        mask = batch[4]
        total = mask.sum() if reduction == "token" else mask.shape[0]
        params = [*student.parameters(), *head.parameters(), *obj.parameters()]
        loss_sum = 0.0
        for rows in splits:
            out = loss_on(student, head, obj, batch, rows, num_items=total)
            out.loss.backward()
            loss_sum += float(out.loss)
        return loss_sum, [p.grad.clone() for p in params]

    full_loss, full = gradients([torch.arange(8)])
    acc_loss, acc = gradients([torch.arange(4), torch.arange(4, 8)])
    assert acc_loss == pytest.approx(full_loss, abs=1e-6)
    for g_full, g_acc in zip(full, acc):
        torch.testing.assert_close(g_acc, g_full, rtol=0, atol=1e-6)

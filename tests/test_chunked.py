"""Chunked logit channels against the dense path: values and gradients, every energy."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from betakd import chunked, energies
from betakd.objective import per_sample_mean
from betakd.teachers.targets import (
    LOG_TAIL_FLOOR,
    HiddenStateLogits,
    TopKLogits,
    dense_from_topk,
    topk_summary,
)

N, H, H_T, V, V_T = 53, 16, 12, 300, 320  # teacher lm_head has 20 padding rows
RTOL, ATOL = 1e-5, 1e-7


def make_case(seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    case = {
        "hidden": torch.randn(N, H, generator=g),
        "weight": torch.randn(V, H, generator=g) * 0.5,
        "bias": torch.randn(V, generator=g) * 0.1 if bias else None,
        "t_hidden": torch.randn(N, H_T, generator=g),
        "t_weight": torch.randn(V_T, H_T, generator=g) * 0.5,
        "labels": torch.randint(0, V, (N,), generator=g),
        # Random per-token upstream weights stand in for per-sample means and betas.
        "w_energy": torch.rand(N, generator=g) + 0.1,
        "w_ce": torch.rand(N, generator=g) + 0.1,
    }
    for key in ("hidden", "weight", "bias"):
        if case[key] is not None:
            case[key].requires_grad_(True)
    return case


def student_params(case):
    return [p for p in (case["hidden"], case["weight"], case["bias"]) if p is not None]


def dense_values(case, fn):
    logits = F.linear(case["hidden"], case["weight"], case["bias"])
    teacher = F.linear(case["t_hidden"], case["t_weight"][:V])
    ce = F.cross_entropy(logits, case["labels"], reduction="none")
    return ce, fn(logits, teacher)


def chunked_values(case, fn, chunk_size, compile=False, single_pass=False, teacher=None):
    """CE and the energy ``fn`` chunked (default teacher: the case's hidden states)."""
    teacher = teacher or HiddenStateLogits(case["t_hidden"], case["t_weight"])
    out = chunked.chunked_channels(
        case["hidden"],
        case["weight"],
        {None: teacher},
        energies={"kd": fn},
        labels=case["labels"],
        bias=case["bias"],
        chunk_size=chunk_size,
        compile=compile,
        upstream=upstream_weights(case) if single_pass else None,
    )
    return out.ce, out.energies["kd"]


def upstream_weights(case):
    """The loss's gradient with respect to the [CE, energy] columns of values_and_grads."""
    return torch.stack([case["w_ce"], case["w_energy"]], dim=1)


def values_and_grads(case, compute):
    ce, energy = compute()
    loss = (case["w_ce"] * ce).sum() + (case["w_energy"] * energy).sum()
    grads = torch.autograd.grad(loss, student_params(case))
    return ce.detach(), energy.detach(), grads


def assert_close(got, want):
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL * want.abs().max().item() + 1e-9)


@pytest.mark.parametrize("single_pass", [False, True], ids=["recompute", "single_pass"])
@pytest.mark.parametrize("name", energies.names())
def test_every_energy_matches_dense_values_and_gradients(name, single_pass):
    case = make_case()
    options = {"temperature": 2.0} if "temperature" in energies.options(name) else {}
    fn = energies.get(name, **options)
    dense = values_and_grads(case, lambda: dense_values(case, fn))
    chunk = values_and_grads(
        case, lambda: chunked_values(case, fn, chunk_size=16, single_pass=single_pass)
    )
    assert chunk[1].dtype == torch.float32 and chunk[1].shape == (N,)
    assert_close(chunk[0], dense[0])
    assert_close(chunk[1], dense[1])
    for got, want in zip(chunk[2], dense[2]):
        assert_close(got, want)


@pytest.mark.parametrize("single_pass", [False, True], ids=["recompute", "single_pass"])
@pytest.mark.parametrize("chunk_size", [1, 7, N, 1000])
def test_chunk_sizes_that_do_not_divide_n(chunk_size, single_pass):
    case = make_case(seed=1, bias=False)
    fn = energies.get("cosine_probs")
    dense = values_and_grads(case, lambda: dense_values(case, fn))
    chunk = values_and_grads(
        case, lambda: chunked_values(case, fn, chunk_size, single_pass=single_pass)
    )
    assert len(chunk[2]) == 2  # hidden and weight; no bias
    for got, want in zip([chunk[0], chunk[1], *chunk[2]], [dense[0], dense[1], *dense[2]]):
        assert_close(got, want)


@pytest.mark.parametrize("single_pass", [False, True], ids=["recompute", "single_pass"])
def test_compile_path_pads_the_last_chunk_without_changing_results(monkeypatch, single_pass):
    # torch.compile replaced by the identity: checks the static-shape padding quickly.
    compiled_shapes = []

    def fake_compile(fn, **_):
        def wrapper(student, *rest):
            compiled_shapes.append(tuple(student.shape))
            return fn(student, *rest)

        return wrapper

    monkeypatch.setattr(torch, "compile", fake_compile)
    case = make_case(seed=9)
    fn = energies.get("jsd", temperature=1.5)
    dense = values_and_grads(case, lambda: dense_values(case, fn))
    chunk = values_and_grads(
        case, lambda: chunked_values(case, fn, 20, compile=True, single_pass=single_pass)
    )
    assert set(compiled_shapes) == {(20, V)}  # 53 tokens: 20 + 20 + 13 padded to 20
    for got, want in zip([chunk[0], chunk[1], *chunk[2]], [dense[0], dense[1], *dense[2]]):
        assert_close(got, want)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("BETAKD_SLOW_TESTS"), reason="set BETAKD_SLOW_TESTS=1")
def test_real_torch_compile_matches_dense():
    case = make_case(seed=10)
    fn = energies.get("fkl", temperature=2.0)
    dense = values_and_grads(case, lambda: dense_values(case, fn))
    chunk = values_and_grads(case, lambda: chunked_values(case, fn, 16, compile=True))
    for got, want in zip([chunk[0], chunk[1], *chunk[2]], [dense[0], dense[1], *dense[2]]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("single_pass", [False, True], ids=["recompute", "single_pass"])
def test_autocast_recomputes_logits_like_the_forward(single_pass):
    # Backward runs outside the caller's autocast (as in a trainer); the recomputation
    # must restore it, or float32 logits in backward would not match the forward's. The
    # single pass takes its gradients under the caller's autocast, like the dense path.
    case = make_case(seed=11)
    fn = energies.get("fkl")
    results = []
    for compute in (dense_values, chunked_values):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if compute is dense_values:
                ce, energy = compute(case, fn)
            else:
                ce, energy = compute(case, fn, 16, single_pass=single_pass)
            loss = (case["w_ce"] * ce).sum() + (case["w_energy"] * energy).sum()
        results.append(torch.autograd.grad(loss, student_params(case)))
    # Hidden-state gradients are row-wise, so they match to bfloat16 rounding (about
    # 6e-3 off without the fix); lm_head gradients are summed over chunks in float32.
    for got, want, tol in zip(*reversed(results), (1e-3, 1e-2, 1e-2)):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())


def test_ce_only_equals_cross_entropy():
    case = make_case(seed=2)
    out = chunked.chunked_channels(
        case["hidden"], case["weight"], labels=case["labels"], bias=case["bias"], chunk_size=10
    )
    logits = F.linear(case["hidden"], case["weight"], case["bias"])
    want = F.cross_entropy(logits, case["labels"], reduction="none")
    assert out.energies == {}
    assert_close(out.ce, want)
    (got_grad,) = torch.autograd.grad(out.ce.mean(), case["weight"])
    (want_grad,) = torch.autograd.grad(want.mean(), case["weight"])
    assert_close(got_grad, want_grad)


def test_several_energies_share_one_pass_and_only_needed_grads_are_built():
    case = make_case(seed=3)
    case["weight"].requires_grad_(False)  # a frozen lm_head (e.g. LoRA) gets no gradient
    fns = {"fkl": energies.get("fkl"), "rkl": energies.get("rkl", temperature=3.0)}
    out = chunked.chunked_channels(
        case["hidden"],
        case["weight"],
        {None: HiddenStateLogits(case["t_hidden"], case["t_weight"])},
        energies=fns,
        bias=case["bias"],
        chunk_size=9,
    )
    assert out.ce is None and list(out.energies) == ["fkl", "rkl"]
    loss = out.energies["fkl"].sum() + 2 * out.energies["rkl"].sum()
    (got,) = torch.autograd.grad(loss, case["hidden"])
    logits = F.linear(case["hidden"], case["weight"], case["bias"])
    teacher = F.linear(case["t_hidden"], case["t_weight"][:V])
    want_loss = fns["fkl"](logits, teacher).sum() + 2 * fns["rkl"](logits, teacher).sum()
    (want,) = torch.autograd.grad(want_loss, case["hidden"])
    assert_close(got, want)


def test_per_sample_reduction_matches_objective():
    case = make_case(seed=4)
    sample_index = torch.sort(torch.randint(0, 5, (N,))).values
    out = chunked.chunked_channels(
        case["hidden"], case["weight"], labels=case["labels"], bias=case["bias"]
    )
    ce, kd = out.per_sample(sample_index, 5)
    assert kd == {}
    torch.testing.assert_close(ce, per_sample_mean(out.ce, sample_index, 5))


# ----------------------------------------------------------------------------- packing


def test_pack_and_next_token_targets():
    labels = torch.tensor([[-100, -100, 5, 6, 7], [-100, 8, 9, -100, -100]])
    hidden = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    mask, targets = chunked.next_token_targets(labels)
    assert mask.tolist() == [[False, True, True, True, False], [True, True, False, False, False]]
    packed = chunked.pack(hidden, mask)
    assert packed.hidden.shape == (5, 3) and packed.num_samples == 2
    assert packed.sample_index.tolist() == [0, 0, 0, 1, 1]
    assert targets[mask].tolist() == [5, 6, 7, 8, 9]
    torch.testing.assert_close(packed.hidden[3], hidden[1, 0])
    with pytest.raises(ValueError, match="bool"):
        chunked.pack(hidden, mask.long())


def test_end_to_end_per_sample_from_batched_hidden_states():
    g = torch.Generator().manual_seed(5)
    batch, length = 3, 9
    hidden = torch.randn(batch, length, H, generator=g, requires_grad=True)
    t_hidden = torch.randn(batch, length, H_T, generator=g)
    weight = torch.randn(V, H, generator=g)
    t_weight = torch.randn(V_T, H_T, generator=g)
    labels = torch.randint(0, V, (batch, length), generator=g)
    labels[:, :4] = -100
    labels[2, 6:] = -100
    mask, targets = chunked.next_token_targets(labels)
    student, teacher = chunked.pack(hidden, mask), chunked.pack(t_hidden, mask)
    out = chunked.chunked_channels(
        student.hidden,
        weight,
        {None: HiddenStateLogits(teacher.hidden, t_weight)},
        energies={"fkl": energies.get("fkl")},
        labels=targets[mask],
        chunk_size=4,
    )
    ce, kd = out.per_sample(student.sample_index, batch)
    logits = hidden @ weight.T
    t_logits = t_hidden @ t_weight[:V].T
    token_ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    token_kd = energies.get("fkl")(logits.flatten(0, 1), t_logits.flatten(0, 1)).view(batch, -1)
    m = mask.float()
    torch.testing.assert_close(ce, (token_ce * m).sum(1) / m.sum(1))
    torch.testing.assert_close(kd["fkl"], (token_kd * m).sum(1) / m.sum(1))


# ----------------------------------------------------------------------------- sparse teacher


def test_topk_reconstruction_sums_to_one_and_keeps_the_listed_entries():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(8, V, generator=g) * 3
    log_p = torch.log_softmax(logits, dim=-1)
    top, ids, tail = topk_summary(logits, 20)
    dense = dense_from_topk(top, ids, tail, V)
    torch.testing.assert_close(dense.exp().sum(-1), torch.ones(8))
    torch.testing.assert_close(dense.gather(1, ids), top)
    # The stored tail is the exact remaining mass, spread evenly over the other tokens.
    exact_tail = 1 - log_p.gather(1, ids).exp().sum(-1, keepdim=True)
    others = torch.ones_like(dense, dtype=torch.bool).scatter_(1, ids, False)
    torch.testing.assert_close(
        dense[others].view(8, V - 20), (exact_tail / (V - 20)).log().expand(8, V - 20)
    )
    # One rule for every range of rows: a chunk of rows is the same rows of the whole.
    teacher = TopKLogits(top, ids, tail, V)
    torch.testing.assert_close(teacher.logits(3, 7, V), dense[3:7], rtol=0, atol=0)


@pytest.mark.parametrize("single_pass", [False, True], ids=["recompute", "single_pass"])
def test_topk_with_full_vocabulary_equals_dense_teacher(single_pass):
    case = make_case(seed=7)
    t_logits = F.linear(case["t_hidden"], case["t_weight"][:V])
    top, ids, tail = topk_summary(t_logits, V)
    for name in ("fkl", "jsd", "cosine_probs"):
        fn = energies.get(name)
        dense = values_and_grads(case, lambda fn=fn: dense_values(case, fn))
        sparse_teacher = TopKLogits(top, ids, tail, V)

        def compute(fn=fn, teacher=sparse_teacher):
            return chunked_values(case, fn, 11, single_pass=single_pass, teacher=teacher)

        sparse = values_and_grads(case, compute)
        torch.testing.assert_close(sparse[1], dense[1], rtol=1e-5, atol=1e-6)
        for got, want in zip(sparse[2], dense[2]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_topk_without_tail_mass_is_floored_and_keeps_every_kl_finite():
    log_p = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0]]), dim=-1)
    no_tail = torch.tensor([float("-inf")])
    dense = dense_from_topk(log_p, torch.tensor([[0, 1, 2]]), no_tail, 5)
    assert torch.isfinite(dense).all()
    torch.testing.assert_close(dense[0, 3:], torch.full((2,), LOG_TAIL_FLOOR - math.log(2)))
    torch.testing.assert_close(dense.exp().sum(-1), torch.ones(1))
    for name in ("fkl", "rkl", "jsd"):
        value = energies.get(name)(torch.zeros(1, 5), dense)
        assert torch.isfinite(value).all(), name


# ----------------------------------------------------------------------------- single pass


def counting(fn):
    """The energy, counting its calls (one per chunk and pass)."""
    calls = []

    def wrapped(student, teacher):
        calls.append(student.shape[0])
        return fn(student, teacher)

    return wrapped, calls


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_single_pass_evaluates_each_chunk_once_and_allows_a_scaled_loss(scale):
    case = make_case(seed=12)
    fn, calls = counting(energies.get("fkl"))
    dense = values_and_grads(case, lambda: dense_values(case, energies.get("fkl")))
    ce, energy = chunked_values(case, fn, chunk_size=10, single_pass=True)
    assert len(calls) == 6  # 53 tokens in chunks of 10, in the forward pass only
    loss = scale * ((case["w_ce"] * ce).sum() + (case["w_energy"] * energy).sum())
    grads = torch.autograd.grad(loss, student_params(case))
    assert len(calls) == 6  # backward returned the gradients computed in the forward pass
    for got, want in zip(grads, dense[2]):
        assert_close(got, scale * want)


def test_single_pass_recomputes_when_the_loss_is_another_one():
    # The upstream gradient the single pass assumed is not the one backward receives
    # (as when a diagnostic differentiates one channel alone): exact gradients anyway.
    case = make_case(seed=13)
    fn, calls = counting(energies.get("jsd"))
    ce, energy = chunked_values(case, fn, chunk_size=10, single_pass=True)
    other = torch.rand(N, generator=torch.Generator().manual_seed(0))
    loss = (other * energy).sum() + ce.sum()
    grads = torch.autograd.grad(loss, student_params(case))
    assert len(calls) == 12  # six chunks in forward, six recomputed in backward
    logits = F.linear(case["hidden"], case["weight"], case["bias"])
    teacher = F.linear(case["t_hidden"], case["t_weight"][:V])
    want_loss = (other * energies.get("jsd")(logits, teacher)).sum() + F.cross_entropy(
        logits, case["labels"], reduction="sum"
    )
    for got, want in zip(grads, torch.autograd.grad(want_loss, student_params(case))):
        assert_close(got, want)


def test_single_pass_without_gradients_only_computes_values():
    case = make_case(seed=14)
    fn, calls = counting(energies.get("fkl"))
    with torch.no_grad():
        ce, energy = chunked_values(case, fn, chunk_size=10, single_pass=True)
    dense_ce, dense_energy = dense_values(case, energies.get("fkl"))
    assert len(calls) == 6 and not energy.requires_grad
    assert_close(energy, dense_energy.detach())
    assert_close(ce, dense_ce.detach())


# ----------------------------------------------------------------------------- errors


def test_input_errors_are_clear():
    case = make_case(seed=8)
    fn = {"fkl": energies.get("fkl")}
    with pytest.raises(ValueError, match="need a teacher"):
        chunked.chunked_channels(case["hidden"], case["weight"], energies=fn)
    with pytest.raises(ValueError, match="nothing to compute"):
        chunked.chunked_channels(case["hidden"], case["weight"])
    short = HiddenStateLogits(case["t_hidden"][:5], case["t_weight"])
    with pytest.raises(ValueError, match="align the answer tokens"):
        chunked.chunked_channels(case["hidden"], case["weight"], {None: short}, energies=fn)
    small = HiddenStateLogits(case["t_hidden"], case["t_weight"][:10])
    with pytest.raises(ValueError, match="fewer than"):
        chunked.chunked_channels(case["hidden"], case["weight"], {None: small}, energies=fn)
    with pytest.raises(ValueError, match="must lie in"):
        dense_from_topk(torch.zeros(1, 2), torch.tensor([[0, V]]), torch.zeros(1), V)
    with pytest.raises(ValueError, match="upstream must have shape"):
        chunked.chunked_channels(
            case["hidden"],
            case["weight"],
            labels=case["labels"],
            upstream=torch.ones(N, 2),
        )


def test_single_pass_twice_through_a_retained_graph():
    # The stored gradients serve the first backward; a second one recomputes, exactly.
    case = make_case(seed=15)
    fn, calls = counting(energies.get("fkl"))
    dense = values_and_grads(case, lambda: dense_values(case, energies.get("fkl")))
    ce, energy = chunked_values(case, fn, chunk_size=10, single_pass=True)
    loss = (case["w_ce"] * ce).sum() + (case["w_energy"] * energy).sum()
    first = torch.autograd.grad(loss, student_params(case), retain_graph=True)
    second = torch.autograd.grad(loss, student_params(case))
    assert len(calls) == 12  # six chunks in forward, six recomputed for the second
    for got_first, got_second, want in zip(first, second, dense[2]):
        assert_close(got_first, want)
        assert_close(got_second, want)


@pytest.mark.parametrize("single_pass", [False, True])
def test_energies_of_two_teachers_read_each_its_own_logits(single_pass):
    """Each energy against its own teacher, a chunk at a time, equals the dense energies
    of the student's logits against that teacher's full logits (values and gradients)."""
    case = make_case(seed=3)
    g = torch.Generator().manual_seed(4)
    other_hidden, other_weight = torch.randn(N, 8, generator=g), torch.randn(V, 8, generator=g)
    fkl, cosine = energies.get("fkl"), energies.get("cosine_logits")
    weights = torch.stack([case["w_ce"], case["w_energy"], case["w_energy"].flip(0)], dim=1)

    def dense():
        logits = F.linear(case["hidden"], case["weight"], case["bias"])
        first = F.linear(case["t_hidden"], case["t_weight"][:V])
        second = F.linear(other_hidden, other_weight)
        ce = F.cross_entropy(logits, case["labels"], reduction="none")
        return torch.stack([ce, fkl(logits, first), cosine(logits, second)], dim=1)

    def chunks():
        out = chunked.chunked_channels(
            case["hidden"],
            case["weight"],
            {
                "big": HiddenStateLogits(case["t_hidden"], case["t_weight"]),
                "ocr": HiddenStateLogits(other_hidden, other_weight),
            },
            energies={"big/fkl": fkl, "ocr/cosine": cosine},
            energy_teachers={"big/fkl": "big", "ocr/cosine": "ocr"},
            labels=case["labels"],
            bias=case["bias"],
            chunk_size=7,
            upstream=weights if single_pass else None,
        )
        assert list(out.energies) == ["big/fkl", "ocr/cosine"]
        return torch.stack([out.ce, out.energies["big/fkl"], out.energies["ocr/cosine"]], dim=1)

    results = []
    for compute in (dense, chunks):
        values = compute()
        grads = torch.autograd.grad((weights * values).sum(), student_params(case))
        results.append((values.detach(), grads))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, rtol=RTOL, atol=1e-6)
    for g_got, g_want in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)


def test_several_teachers_need_each_energys_teacher():
    case = make_case()
    big = HiddenStateLogits(case["t_hidden"], case["t_weight"])
    fkl = {"kd": energies.get("fkl")}
    # One teacher: every energy reads it, named or not.
    alone = chunked.chunked_channels(case["hidden"], case["weight"], {"big": big}, energies=fkl)
    named = chunked.chunked_channels(
        case["hidden"], case["weight"], {"big": big}, energies=fkl, energy_teachers={"kd": "big"}
    )
    torch.testing.assert_close(alone.energies["kd"], named.energies["kd"], rtol=0, atol=0)
    teachers = {"big": big, "small": HiddenStateLogits(case["t_hidden"] * 0.5, case["t_weight"])}
    with pytest.raises(ValueError, match=r"energy_teachers must name the teacher of \['kd'\]"):
        chunked.chunked_channels(
            case["hidden"], case["weight"], teachers, energies={"kd": energies.get("fkl")}
        )
    with pytest.raises(ValueError, match=r"unknown teachers \['ocr'\]"):
        chunked.chunked_channels(
            case["hidden"],
            case["weight"],
            teachers,
            energies={"kd": energies.get("fkl")},
            energy_teachers={"kd": "ocr"},
        )

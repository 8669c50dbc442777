"""Cross-tokenizer distillation: alignment by text, the shared vocabulary and the
per-group losses, each against an independent computation."""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from betakd import energies
from betakd.cross_tokenizer import group_loss
from betakd.cross_tokenizer.alignment import (
    TokenGroups,
    TokenizedAnswer,
    align_answers,
    align_spans,
    tokenize_answer,
)
from betakd.cross_tokenizer.groups import AnswerTranslator, group_runs, tokenized_run
from betakd.cross_tokenizer.vocabulary import SharedVocabulary
from betakd.testing.tiny_tokenizer import DEFAULT_TEXTS, TURN_END, train_tokenizer

# --------------------------------------------------------------------------- tokenizers


@pytest.fixture(scope="module")
def student_tokenizer():
    return train_tokenizer(vocab_size=512)


@pytest.fixture(scope="module")
def teacher_tokenizer():
    # Other merges (another corpus) and a smaller vocabulary: words split differently.
    texts = (*DEFAULT_TEXTS[::-1], "redder reddish shapes colours", "é日本 ünïcode")
    return train_tokenizer(texts, vocab_size=400)


def sentencepiece_style_tokenizer() -> PreTrainedTokenizerFast:
    """A Metaspace BPE (``▁word``), as SentencePiece vocabularies spell a leading space."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", TURN_END], show_progress=False
    )
    backend.train_from_iterator(list(DEFAULT_TEXTS), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=TURN_END, unk_token="<unk>")


# --------------------------------------------------------------------------- alignment


def spans_of(pieces: list[str]) -> tuple[tuple[int, int], ...]:
    out, at = [], 0
    for piece in pieces:
        out.append((at, at + len(piece)))
        at += len(piece)
    return tuple(out)


def test_same_pieces_align_one_to_one():
    spans = spans_of(["The", " shape", " is", " red", "."])
    s, t = align_spans(spans, spans)
    assert s == t == [(i, i + 1) for i in range(5)]


def test_a_word_split_by_one_side_forms_one_group():
    student = spans_of(["The", " shape", " is", " red", "dish", "."])
    teacher = spans_of(["The", " sh", "ape", " is", " reddish", "."])
    s, t = align_spans(student, teacher)
    assert s == [(0, 1), (1, 2), (2, 3), (3, 5), (5, 6)]
    assert t == [(0, 1), (1, 3), (3, 4), (4, 5), (5, 6)]


def test_crossing_splits_merge_until_both_sides_end_together():
    # "abcd": student "ab" + "cd", teacher "a" + "bc" + "d": no common end before 4.
    s, t = align_spans(spans_of(["ab", "cd"]), spans_of(["a", "bc", "d"]))
    assert s == [(0, 2)] and t == [(0, 3)]


def test_tokens_sharing_one_character_stay_in_one_group():
    # Byte-level BPE splits "é" into two tokens with the same character span (0, 1).
    s, t = align_spans(((0, 1), (0, 1), (1, 2)), ((0, 1), (1, 2)))
    assert s == [(0, 2), (2, 3)] and t == [(0, 1), (1, 2)]


def test_real_tokenizers_with_unicode_and_whitespace(student_tokenizer, teacher_tokenizer):
    text = "The  reddish shape, é日本 \t ünïcode!" + TURN_END
    a = tokenize_answer(student_tokenizer, text)
    b = tokenize_answer(teacher_tokenizer, text)
    assert a.ids != b.ids  # the two tokenizers split this text differently
    groups = align_answers(a, b)
    assert groups.unaligned_student == groups.unaligned_teacher == 0
    for (s0, s1), (t0, t1) in zip(groups.student, groups.teacher, strict=True):
        # Each group's tokens decode to the same text on both sides.
        assert student_tokenizer.decode(a.ids[s0:s1]) == teacher_tokenizer.decode(b.ids[t0:t1])
    assert any(s1 - s0 != t1 - t0 for (s0, s1), (t0, t1) in zip(groups.student, groups.teacher))


def test_identical_tokenizers_give_the_identity(student_tokenizer):
    a = tokenize_answer(student_tokenizer, "A small yellow rectangle." + TURN_END)
    assert align_answers(a, a) == TokenGroups.identity(len(a.ids))


def test_different_end_markers_pair_as_one_last_group():
    student = TokenizedAnswer("red<|im_end|>", (5, 9), ((0, 3), (3, 13)), (False, True))
    teacher = TokenizedAnswer("red</s>", (7, 8, 2), ((0, 2), (2, 3), (3, 7)), (False, False, True))
    groups = align_answers(student, teacher)
    assert groups.student == ((0, 1), (1, 2)) and groups.teacher == ((0, 2), (2, 3))


def test_text_after_a_difference_is_counted_unaligned():
    student = TokenizedAnswer("red.", (1, 2), ((0, 3), (3, 4)), (False, False))
    teacher = TokenizedAnswer("red!", (1, 3), ((0, 3), (3, 4)), (False, False))
    groups = align_answers(student, teacher)
    assert groups.student == ((0, 1),) and groups.unaligned_student == 1
    assert groups.unaligned_teacher == 1


def test_slow_tokenizers_are_refused():
    class Slow:
        is_fast = False

    with pytest.raises(ValueError, match="fast tokenizer"):
        tokenize_answer(Slow(), "red")


# --------------------------------------------------------------------------- vocabulary


def test_same_tokenizer_shares_everything(student_tokenizer):
    size = len(student_tokenizer)
    shared = SharedVocabulary.between(student_tokenizer, student_tokenizer, size, size)
    assert shared.identical and shared.unshared_student.numel() == 0


def test_shared_tokens_spell_the_same_text(student_tokenizer, teacher_tokenizer):
    shared = SharedVocabulary.between(
        student_tokenizer, teacher_tokenizer, len(student_tokenizer), len(teacher_tokenizer)
    )
    assert 0 < len(shared) < len(teacher_tokenizer) and not shared.identical
    for s, t in zip(shared.student_ids.tolist(), shared.teacher_ids.tolist(), strict=True):
        assert student_tokenizer.convert_ids_to_tokens(
            s
        ) == teacher_tokenizer.convert_ids_to_tokens(t)
    # Every text present in both vocabularies is paired.
    both = set(student_tokenizer.get_vocab()) & set(teacher_tokenizer.get_vocab())
    assert len(shared) == len(both)


def test_byte_level_and_sentencepiece_spellings_of_a_space_match(student_tokenizer):
    sp = sentencepiece_style_tokenizer()
    shared = SharedVocabulary.between(student_tokenizer, sp, len(student_tokenizer), len(sp))
    pairs = dict(zip(shared.teacher_ids.tolist(), shared.student_ids.tolist(), strict=True))
    sp_vocab = sp.get_vocab()
    assert "▁shape" in sp_vocab and "Ġshape" in student_tokenizer.get_vocab()
    assert pairs[sp_vocab["▁shape"]] == student_tokenizer.get_vocab()["Ġshape"]
    assert pairs[sp_vocab[TURN_END]] == student_tokenizer.get_vocab()[TURN_END]


def test_ids_beyond_a_models_rows_are_left_out(student_tokenizer):
    size = len(student_tokenizer)
    shared = SharedVocabulary.between(student_tokenizer, student_tokenizer, size, 300)
    assert int(shared.teacher_ids.max()) < 300 and int(shared.student_ids.max()) < 300


# --------------------------------------------------------------------------- losses


def direct_sorted_l1(a: list[float], b: list[float]) -> float:
    a, b = sorted(a, reverse=True), sorted(b, reverse=True)
    width = max(len(a), len(b))
    a += [0.0] * (width - len(a))
    b += [0.0] * (width - len(b))
    return sum(abs(x - y) for x, y in zip(a, b, strict=True))


def direct_jsd(p: list[float], q: list[float]) -> float:
    """0.5 KL(q || m) + 0.5 KL(p || m), m = (p + q) / 2, terms of zero mass dropped."""
    m = [(x + y) / 2 for x, y in zip(p, q, strict=True)]
    kl = lambda a: sum(x * math.log(x / z) for x, z in zip(a, m, strict=True) if x > 0)  # noqa: E731
    return 0.5 * kl(q) + 0.5 * kl(p)


def softmax(row: list[float]) -> list[float]:
    top = max(row)
    e = [math.exp(x - top) for x in row]
    return [x / sum(e) for x in e]


def direct_hybrid(zs, rs, zt, rt, pairs, vs, vt) -> list[float]:
    """The hybrid loss with JSD, built entry by entry in float64."""
    out = []
    for g in range(len(zs)):
        ps = [p * math.exp(rs[g]) for p in softmax(zs[g])]
        pt = [p * math.exp(rt[g]) for p in softmax(zt[g])]
        shared_s = [ps[i] for i, _ in pairs]
        shared_t = [pt[j] for _, j in pairs]
        row_s = [*shared_s, 1 - sum(shared_s)]
        row_t = [*shared_t, 1 - sum(shared_t)]
        w = sum(softmax(zt[g])[j] for _, j in pairs)
        outside_s = [ps[i] for i in range(vs) if i not in {a for a, _ in pairs}]
        outside_t = [pt[j] for j in range(vt) if j not in {b for _, b in pairs}]
        out.append(w * direct_jsd(row_s, row_t) + (1 - w) * direct_sorted_l1(outside_s, outside_t))
    return out


@pytest.fixture
def group_case():
    g = torch.Generator().manual_seed(0)
    vs, vt = 7, 9
    pairs = [(0, 3), (2, 0), (3, 1), (6, 8)]
    shared = SharedVocabulary(
        torch.tensor([a for a, _ in pairs]),
        torch.tensor([b for _, b in pairs]),
        vs,
        vt,
        # Longest shared prefixes, made up (index 4: the bucket).
        student_prefix=torch.tensor([0, 0, 1, 2, 2, 4, 3]),
        teacher_prefix=torch.tensor([1, 2, 0, 0, 1, 4, 3, 2, 3]),
    )
    zs = torch.randn(4, vs, generator=g)
    zt = torch.randn(4, vt, generator=g)
    rs = torch.tensor([0.0, -0.3, -1.2, 0.0])
    rt = torch.tensor([0.0, -0.8, 0.0, -0.1])
    return zs, rs, zt, rt, pairs, shared


def test_hybrid_matches_the_direct_formula(group_case):
    zs, rs, zt, rt, pairs, shared = group_case
    got = group_loss.hybrid(energies.get("jsd"), zs, rs, zt, rt, shared)
    want = direct_hybrid(zs.tolist(), rs.tolist(), zt.tolist(), rt.tolist(), pairs, 7, 9)
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["jsd", "fkl", "cosine_probs", "rkl"])
def test_identical_vocabularies_give_the_energy_exactly(name):
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(5, 11, generator=g), torch.randn(5, 11, generator=g)
    ids = torch.arange(11)
    shared = SharedVocabulary(ids, ids, 11, 11)
    fn = energies.get(name)
    zero = torch.zeros(5)
    assert torch.equal(group_loss.hybrid(fn, zs, zero, zt, zero, shared), fn(zs, zt))


def test_hybrid_is_zero_at_a_match_and_positive_elsewhere(group_case):
    _, _, zt, rt, _, _ = group_case
    ids = torch.arange(9)
    shared = SharedVocabulary(ids[:6], ids[:6], 9, 9)
    fn = energies.get("jsd")
    same = group_loss.hybrid(fn, zt, rt, zt, rt, shared)
    torch.testing.assert_close(same, torch.zeros(4), atol=1e-6, rtol=0)
    other = group_loss.hybrid(fn, zt.flip(1), rt, zt, rt, shared)
    assert (other > 1e-3).all()


def test_uld_is_zero_on_equal_distributions_and_blind_to_permutations():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(3, 10, generator=g)
    rest = torch.tensor([0.0, -0.5, -2.0])
    torch.testing.assert_close(group_loss.uld(z, rest, z, rest), torch.zeros(3))
    permuted = z[:, torch.randperm(10, generator=g)]
    # The documented limit: a permutation of the teacher's distribution costs nothing.
    torch.testing.assert_close(group_loss.uld(permuted, rest, z, rest), torch.zeros(3))
    # Different vocabulary sizes: the shorter side is padded with zeros.
    wide = torch.cat([z, torch.full((3, 4), -30.0)], dim=1)
    torch.testing.assert_close(
        group_loss.uld(wide, rest, z, rest), torch.zeros(3), atol=1e-6, rtol=0
    )


def test_sorted_l1_matches_the_direct_sum():
    g = torch.Generator().manual_seed(4)
    a, b = torch.rand(3, 5, generator=g), torch.rand(3, 8, generator=g)
    want = [direct_sorted_l1(x, y) for x, y in zip(a.tolist(), b.tolist(), strict=True)]
    torch.testing.assert_close(group_loss.sorted_l1(a, b), torch.tensor(want))


@pytest.mark.parametrize("loss", group_loss.LOSSES)
def test_gradients_match_finite_differences(group_case, loss):
    zs, rs, zt, rt, _, shared = group_case
    fn = energies.get("jsd")

    def value(z: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        if loss == "uld":
            return group_loss.uld(z, r, zt, rt).sum()
        if loss == "prefix":  # no rest: its gradient is zero
            return group_loss.prefix(fn, z, zt, shared).sum() + 0 * r.sum()
        return group_loss.hybrid(fn, z, r, zt, rt, shared).sum()

    z, r = zs.double().requires_grad_(True), rs.double().requires_grad_(True)
    grad_z, grad_r = torch.autograd.grad(value(z.float(), r.float()), (z, r))
    eps = 1e-3
    for tensor, grad in ((zs, grad_z), (rs, grad_r)):
        numeric = torch.zeros_like(tensor, dtype=torch.float64)
        for index in range(tensor.numel()):
            plus, minus = tensor.clone().flatten(), tensor.clone().flatten()
            plus[index] += eps
            minus[index] -= eps
            plus, minus = plus.view_as(tensor), minus.view_as(tensor)
            args = ((plus, rs), (minus, rs)) if tensor is zs else ((zs, plus), (zs, minus))
            numeric.view(-1)[index] = (value(*args[0]) - value(*args[1])).double() / (2 * eps)
        torch.testing.assert_close(grad, numeric, rtol=2e-2, atol=3e-4)


def test_empty_buckets_keep_gradients_finite():
    ids = torch.arange(4)
    shared = SharedVocabulary(ids, ids, 4, 4)
    zs = torch.randn(2, 4).requires_grad_(True)
    zt = torch.randn(2, 4)
    # One multi-token group forces the bucket column; the one-token group's bucket is empty.
    rest = torch.tensor([0.0, -0.7])
    value = group_loss.hybrid(energies.get("fkl"), zs, rest, zt, rest, shared)
    (grad,) = torch.autograd.grad(value.sum(), zs)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()


def test_chunked_group_values_equal_the_whole_batch(group_case):
    """Chunks of groups under activation checkpointing: the values and every gradient of
    the groups computed at once."""
    from betakd.teachers import HiddenStateLogits

    _, rs, _, rt, _, shared = group_case
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(4, 6, generator=g, requires_grad=True)
    weight = torch.randn(7, 6, generator=g, requires_grad=True)
    bias = torch.randn(7, generator=g, requires_grad=True)
    rest = rs.clone().requires_grad_(True)
    teacher = HiddenStateLogits(torch.randn(4, 5, generator=g), torch.randn(9, 5, generator=g))
    fn = energies.get("jsd")

    def loss(zs, r_s, zt, r_t):
        return group_loss.hybrid(fn, zs, r_s, zt, r_t, shared)

    upstream = torch.linspace(0.5, 2.0, 4)
    whole = loss(
        torch.nn.functional.linear(hidden, weight, bias), rest, teacher.logits(0, 4, 9), rt
    )
    want = torch.autograd.grad(whole, (hidden, weight, bias, rest), upstream)
    chunked_values = group_loss.chunked_group_values(
        loss, hidden, weight, bias, rest, teacher, rt, 9, chunk_size=3
    )
    got = torch.autograd.grad(chunked_values, (hidden, weight, bias, rest), upstream)
    torch.testing.assert_close(chunked_values, whole)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_a_sampled_spelling_gets_spans_from_decoding(student_tokenizer, teacher_tokenizer):
    """An answer spelt in pieces the tokenizer would not choose (as a sampled answer may
    be): its spans come from decoding growing prefixes, and it still aligns."""
    canonical = student_tokenizer("The shape is red.", add_special_tokens=False)["input_ids"]
    pieces = [
        i
        for word in canonical
        for i in student_tokenizer(student_tokenizer.decode([word]), add_special_tokens=False)[
            "input_ids"
        ]
    ]
    spelled = student_tokenizer.convert_tokens_to_ids(list("The")) + canonical[1:]
    assert spelled != canonical and pieces == canonical
    run = tokenized_run(student_tokenizer, spelled)
    assert run.text == "The shape is red." and run.spans[:3] == ((0, 1), (1, 2), (2, 3))
    teacher_ids = teacher_tokenizer("The shape is red.", add_special_tokens=False)["input_ids"]
    groups = group_runs(spelled, teacher_ids, student_tokenizer, teacher_tokenizer)
    assert groups.unaligned_student == 0 and groups.student[0] == (0, 3)


def test_answers_are_translated_by_text(student_tokenizer, teacher_tokenizer):
    stop = student_tokenizer.convert_tokens_to_ids(TURN_END)
    answer = student_tokenizer("A green triangle.", add_special_tokens=False)["input_ids"]
    translate = AnswerTranslator(student_tokenizer, teacher_tokenizer, {stop})
    ended = translate(torch.tensor([*answer, stop])).tolist()
    want = teacher_tokenizer("A green triangle.", add_special_tokens=False)["input_ids"]
    assert ended == [*want, teacher_tokenizer.eos_token_id]
    assert translate(torch.tensor(answer)).tolist() == want  # cut short: no end token


def test_prefix_keys_are_the_longest_shared_prefixes(student_tokenizer, teacher_tokenizer):
    shared = SharedVocabulary.between(
        student_tokenizer, teacher_tokenizer, len(student_tokenizer), len(teacher_tokenizer)
    )
    spelled = {i: t for t, i in student_tokenizer.get_vocab().items()}
    shared_tokens = [spelled[i] for i in shared.student_ids.tolist()]
    special = set(student_tokenizer.all_special_tokens)
    for i in range(len(student_tokenizer)):
        token = spelled[i]
        if token in special:
            continue
        # By brute force: the longest shared token that starts this token's text.
        want = max((t for t in shared_tokens if token.startswith(t) and t not in special), key=len)
        assert shared_tokens[shared.student_prefix[i]] == want


def test_prefix_loss_against_a_direct_projection():
    """Vocabularies of 5 and 4 tokens, 3 shared; each token's probability added to its
    prefix key by hand, then JSD by its formula."""
    shared = SharedVocabulary(
        torch.tensor([0, 1, 2]), torch.tensor([0, 1, 3]), 5, 4,
        student_prefix=torch.tensor([0, 1, 2, 1, 3]), teacher_prefix=torch.tensor([0, 1, 0, 2]),
    )  # fmt: skip
    g = torch.Generator().manual_seed(6)
    zs, zt = torch.randn(3, 5, generator=g), torch.randn(3, 4, generator=g)
    got = group_loss.prefix(energies.get("jsd"), zs, zt, shared)
    want = []
    for s_row, t_row in zip(zs.tolist(), zt.tolist(), strict=True):
        ps, pt = softmax(s_row), softmax(t_row)
        s_proj = [ps[0], ps[1] + ps[3], ps[2], ps[4]]
        t_proj = [pt[0] + pt[2], pt[1], pt[3], 0.0]
        want.append(direct_jsd(s_proj, t_proj))
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(
        group_loss.prefix(energies.get("jsd"), zs.requires_grad_(True), zt, shared).sum(), zs
    )
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("name", ["jsd", "cosine_probs"])
def test_prefix_loss_with_one_vocabulary_is_the_energy(name):
    g = torch.Generator().manual_seed(7)
    zs, zt = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    ids = torch.arange(9)
    fn = energies.get(name)
    shared = SharedVocabulary(ids, ids, 9, 9, ids, ids)
    assert torch.equal(group_loss.prefix(fn, zs, zt, shared), fn(zs, zt))

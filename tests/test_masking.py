"""Pure-function tests of service/masking/masking.py (no service, no Redis).

Statistical checks use a binomial standard-error bound: an observed share
p_hat over n independent trials must satisfy |p_hat - p| <= 5 * sqrt(p(1-p)/n)
(5 sigma; a correct implementation fails such a check with probability below
1e-6), and every such check runs over at least 10**5 candidate tokens.
The hash is deterministic, so these tests are also reproducible run to run.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from service.masking.masking import IGNORE_INDEX, MaskSpec, Vocab, mask_batch, mask_tokens, sample_ids

SIGMAS = 5.0
VOCAB_SIZE = 1000
# Special ids scattered through the vocabulary, not just 0..4.
SPECIAL_IDS = (3, 17, 250, 511, 742, 999)
MASK_ID = 250
PAD_ID = 17
VOCAB = Vocab.build(VOCAB_SIZE, SPECIAL_IDS, mask_id=MASK_ID, pad_id=PAD_ID)
IS_SPECIAL = np.zeros(VOCAB_SIZE, dtype=bool)
IS_SPECIAL[list(SPECIAL_IDS)] = True
N_ORDINARY = VOCAB_SIZE - len(SPECIAL_IDS)


def within(observed: float, expected: float, n: int, sigmas: float = SIGMAS) -> bool:
    """|observed - expected| within ``sigmas`` binomial standard errors over n trials."""
    se = math.sqrt(expected * (1 - expected) / n)
    return abs(observed - expected) <= sigmas * se


def make_batch(b: int, seq_len: int, seed: int = 0, special_share: float = 0.1):
    """Random ids (specials sprinkled in), random lengths, garbage beyond each length."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB_SIZE, size=(b, seq_len)).astype(np.int32)
    sprinkle = rng.random((b, seq_len)) < special_share
    ids[sprinkle] = rng.choice(np.array(SPECIAL_IDS, dtype=np.int32), size=int(sprinkle.sum()))
    lengths = rng.integers(1, seq_len + 1, size=b).astype(np.int64)
    seq_ids = rng.choice(10**9, size=b, replace=False).astype(np.int64)
    return ids, lengths, seq_ids


def candidates_of(ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    real = np.arange(ids.shape[1])[None, :] < lengths[:, None]
    return real & ~IS_SPECIAL[ids]


@pytest.fixture(scope="module")
def big():
    """About 1.4 * 10**5 candidate tokens."""
    ids, lengths, seq_ids = make_batch(1200, 256, seed=11)
    cand = candidates_of(ids, lengths)
    assert cand.sum() >= 10**5
    return ids, lengths, seq_ids, cand


def run(ids, lengths, seq_ids, *, seed=1234, epoch=0, spec=None, vocab=VOCAB):
    return mask_tokens(ids, lengths, seq_ids, seed=seed, epoch=epoch, spec=spec or MaskSpec(), vocab=vocab)


# ---- selection -------------------------------------------------------------


@pytest.mark.parametrize("p", [0.05, 0.15, 0.3, 0.5, 0.8])
def test_selection_rate_matches_probability(big, p):
    ids, lengths, seq_ids, cand = big
    _, labels, _ = run(ids, lengths, seq_ids, spec=MaskSpec(mlm_probability=p))
    selected = labels != IGNORE_INDEX
    n = int(cand.sum())
    rate = selected[cand].mean()
    assert within(rate, p, n), f"selection rate {rate:.5f} vs p={p} over {n} candidates"


def test_special_tokens_and_pads_never_selected(big):
    ids, lengths, seq_ids, cand = big
    for p in (0.15, 0.6, 1.0):
        _, labels, _ = run(ids, lengths, seq_ids, spec=MaskSpec(mlm_probability=p))
        selected = labels != IGNORE_INDEX
        assert not selected[~cand].any(), f"p={p}: a special token or pad position was selected"
    # the batch really contains specials inside the real region, and pads
    real = np.arange(ids.shape[1])[None, :] < lengths[:, None]
    assert (real & IS_SPECIAL[ids]).sum() > 1000
    assert (~real).sum() > 1000


def test_p_zero_selects_nothing(big):
    ids, lengths, seq_ids, _ = big
    out, labels, attn = run(ids, lengths, seq_ids, spec=MaskSpec(mlm_probability=0.0))
    assert (labels == IGNORE_INDEX).all()
    real = attn.astype(bool)
    np.testing.assert_array_equal(out[real], ids[real])
    assert (out[~real] == PAD_ID).all()


def test_p_one_selects_every_candidate(big):
    ids, lengths, seq_ids, cand = big
    out, labels, _ = run(ids, lengths, seq_ids, spec=MaskSpec(mlm_probability=1.0))
    selected = labels != IGNORE_INDEX
    np.testing.assert_array_equal(selected, cand)
    np.testing.assert_array_equal(labels[cand], ids[cand])


# ---- replacement -----------------------------------------------------------


def split_shares(ids, out, labels):
    selected = labels != IGNORE_INDEX
    orig, new = ids[selected], out[selected]
    n = int(selected.sum())
    masked = new == MASK_ID
    kept = new == orig
    randomised = ~masked & ~kept
    return n, masked.mean(), randomised.mean(), kept.mean()


@pytest.mark.parametrize(
    "mask_ratio,random_ratio", [(0.8, 0.1), (0.5, 0.3), (0.0, 1.0), (1.0, 0.0), (0.0, 0.0)]
)
def test_replacement_split(big, mask_ratio, random_ratio):
    ids, lengths, seq_ids, cand = big
    spec = MaskSpec(mlm_probability=1.0, mask_ratio=mask_ratio, random_ratio=random_ratio)
    out, labels, _ = run(ids, lengths, seq_ids, spec=spec)
    n, masked, randomised, kept = split_shares(ids, out, labels)
    assert n >= 10**5
    keep_ratio = 1.0 - mask_ratio - random_ratio
    # A random draw equal to the original token reads as "kept": probability 1/N_ORDINARY.
    exp_random = random_ratio * (1 - 1 / N_ORDINARY)
    exp_kept = keep_ratio + random_ratio / N_ORDINARY
    for name, obs, exp in (("mask", masked, mask_ratio), ("random", randomised, exp_random), ("keep", kept, exp_kept)):
        assert within(obs, exp, n), f"{name} share {obs:.5f}, expected {exp:.5f} over {n} selected tokens"


def test_default_split_is_80_10_10_at_usual_rate(big):
    ids, lengths, seq_ids, cand = big
    # Pool several epochs at p=0.15 so that well over 10**5 candidates are tried.
    tot = np.zeros(3)
    n_sel = 0
    n_cand = 0
    for epoch in range(5):
        out, labels, _ = run(ids, lengths, seq_ids, epoch=epoch)
        n, m, r, k = split_shares(ids, out, labels)
        tot += n * np.array([m, r, k])
        n_sel += n
        n_cand += int(cand.sum())
    assert n_cand >= 5 * 10**5 and n_sel > 5 * 10**4
    m, r, k = tot / n_sel
    assert within(m, 0.8, n_sel)
    assert within(r, 0.1 * (1 - 1 / N_ORDINARY), n_sel)
    assert within(k, 0.1 + 0.1 / N_ORDINARY, n_sel)


def test_random_replacements_are_ordinary_and_uniform(big):
    ids, lengths, seq_ids, _ = big
    out, labels, _ = run(ids, lengths, seq_ids, spec=MaskSpec(mlm_probability=1.0, mask_ratio=0.0, random_ratio=1.0))
    selected = labels != IGNORE_INDEX
    drawn = out[selected]
    assert not IS_SPECIAL[drawn].any(), "a random replacement drew a special token"
    assert ((drawn >= 0) & (drawn < VOCAB_SIZE)).all()
    # Uniform over the ordinary ids: chi-square with df = N_ORDINARY - 1, accepted
    # below its mean + 5 standard deviations (sd = sqrt(2 df)).
    counts = np.bincount(drawn, minlength=VOCAB_SIZE)[~IS_SPECIAL]
    expected = len(drawn) / N_ORDINARY
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    df = N_ORDINARY - 1
    assert chi2 < df + SIGMAS * math.sqrt(2 * df), f"chi2={chi2:.1f} for df={df}"
    assert (counts > 0).all()


def test_unselected_positions_are_untouched_and_pads_carry_pad_id(big):
    ids, lengths, seq_ids, _ = big
    before = ids.copy()
    out, labels, attn = run(ids, lengths, seq_ids, spec=MaskSpec(mlm_probability=0.4))
    np.testing.assert_array_equal(ids, before)  # the input is not modified in place
    real = attn.astype(bool)
    unselected = labels == IGNORE_INDEX
    np.testing.assert_array_equal(out[real & unselected], ids[real & unselected])
    assert (out[~real] == PAD_ID).all()
    assert out.dtype == np.int32 and labels.dtype == np.int32


# ---- labels and attention --------------------------------------------------


def test_labels_are_original_ids_exactly_where_selected(big):
    ids, lengths, seq_ids, cand = big
    out, labels, _ = run(ids, lengths, seq_ids, spec=MaskSpec(mlm_probability=0.3))
    selected = labels != IGNORE_INDEX
    assert selected.any()
    np.testing.assert_array_equal(labels[selected], ids[selected])
    assert (labels[~selected] == IGNORE_INDEX).all()
    # every changed position is a selected one
    changed = out != np.where(np.arange(ids.shape[1])[None, :] < lengths[:, None], ids, PAD_ID)
    assert not (changed & ~selected).any()
    # no label is ever a special id
    assert not IS_SPECIAL[labels[selected]].any()


def test_attention_mask_is_positions_below_length():
    ids, lengths, seq_ids = make_batch(64, 40, seed=5)
    lengths[0], lengths[1] = 40, 1
    _, _, attn = run(ids, lengths, seq_ids)
    expected = (np.arange(40)[None, :] < lengths[:, None]).astype(np.uint8)
    np.testing.assert_array_equal(attn, expected)
    assert attn.shape == ids.shape


# ---- determinism -----------------------------------------------------------


def test_same_inputs_same_output_regardless_of_batch_composition():
    ids, lengths, seq_ids = make_batch(48, 64, seed=21)
    spec = MaskSpec(mlm_probability=0.4)
    full = run(ids, lengths, seq_ids, seed=99, epoch=3, spec=spec)
    # again, identical
    again = run(ids.copy(), lengths.copy(), seq_ids.copy(), seed=99, epoch=3, spec=MaskSpec(mlm_probability=0.4))
    for a, b in zip(full, again):
        np.testing.assert_array_equal(a, b)
    # shuffled batch: row k of the output moves with its sequence
    perm = np.random.default_rng(0).permutation(48)
    shuffled = run(ids[perm], lengths[perm], seq_ids[perm], seed=99, epoch=3, spec=spec)
    for a, b in zip(full, shuffled):
        np.testing.assert_array_equal(a[perm], b)
    # each sequence alone, and inside a batch with unrelated other sequences
    others, other_lengths, other_ids = make_batch(10, 64, seed=22)
    for k in (0, 7, 47):
        alone = run(ids[k : k + 1], lengths[k : k + 1], seq_ids[k : k + 1], seed=99, epoch=3, spec=spec)
        mixed_ids = np.concatenate([others[:5], ids[k : k + 1], others[5:]])
        mixed_len = np.concatenate([other_lengths[:5], lengths[k : k + 1], other_lengths[5:]])
        mixed_seq = np.concatenate([other_ids[:5], seq_ids[k : k + 1], other_ids[5:]])
        mixed = run(mixed_ids, mixed_len, mixed_seq, seed=99, epoch=3, spec=spec)
        for a, b, c in zip(full, alone, mixed):
            np.testing.assert_array_equal(a[k], b[0])
            np.testing.assert_array_equal(a[k], c[5])


def test_mask_depends_on_sequence_id():
    ids, lengths, _ = make_batch(1, 512, seed=3)
    lengths[:] = 512
    a = run(ids, lengths, np.array([1]), spec=MaskSpec(mlm_probability=0.5))[1]
    b = run(ids, lengths, np.array([2]), spec=MaskSpec(mlm_probability=0.5))[1]
    assert not np.array_equal(a != IGNORE_INDEX, b != IGNORE_INDEX)


def test_different_epoch_gives_independent_masks(big):
    ids, lengths, seq_ids, cand = big
    p = 0.3
    spec = MaskSpec(mlm_probability=p)
    s0 = run(ids, lengths, seq_ids, epoch=0, spec=spec)[1] != IGNORE_INDEX
    s1 = run(ids, lengths, seq_ids, epoch=1, spec=spec)[1] != IGNORE_INDEX
    assert not np.array_equal(s0, s1)
    # independent draws: selected in both epochs at rate p**2
    n = int(cand.sum())
    both = (s0 & s1)[cand].mean()
    assert within(both, p * p, n), f"overlap {both:.5f} vs p^2={p * p:.5f}"


@pytest.mark.parametrize("spec", [MaskSpec(mlm_probability=0.3), MaskSpec(mlm_probability=0.3, unit="span")],
                         ids=["token", "span"])  # fmt: skip
def test_an_epoch_per_row_masks_each_row_as_its_own_epochs_batch(spec):
    ids, lengths, seq_ids = make_batch(48, 64, seed=5)
    epochs = np.repeat(np.array([2, 0, 7]), 16)
    np.random.default_rng(1).shuffle(epochs)  # rows of three epochs, interleaved
    ws = np.random.default_rng(2).random(ids.shape) < 0.3 if spec.unit != "token" else None
    joined = mask_batch(ids, lengths, seq_ids, seed=9, epoch=epochs, spec=spec, vocab=VOCAB, word_start=ws)
    for e in (0, 2, 7):
        rows = np.flatnonzero(epochs == e)
        alone = mask_batch(ids[rows], lengths[rows], seq_ids[rows], seed=9, epoch=e, spec=spec, vocab=VOCAB,
                           word_start=None if ws is None else ws[rows])  # fmt: skip
        assert np.array_equal(joined.input_ids[rows], alone.input_ids)
        assert np.array_equal(joined.labels[rows], alone.labels)
    same = mask_batch(ids, lengths, seq_ids, seed=9, epoch=np.full(48, 7), spec=spec, vocab=VOCAB, word_start=ws)
    assert np.array_equal(same.labels, mask_batch(ids, lengths, seq_ids, seed=9, epoch=7, spec=spec, vocab=VOCAB,
                                                  word_start=ws).labels)  # fmt: skip


def test_different_seed_gives_different_masks(big):
    ids, lengths, seq_ids, _ = big
    a = run(ids, lengths, seq_ids, seed=0)[1]
    b = run(ids, lengths, seq_ids, seed=1)[1]
    c = run(ids, lengths, seq_ids, seed=(1 << 64) - 1)[1]
    assert not np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_different_spec_gives_different_masks(big):
    ids, lengths, seq_ids, cand = big
    base = run(ids, lengths, seq_ids, spec=MaskSpec(0.15, 0.8, 0.1))
    other = run(ids, lengths, seq_ids, spec=MaskSpec(0.15, 0.7, 0.2))
    s0 = base[1] != IGNORE_INDEX
    s1 = other[1] != IGNORE_INDEX
    assert not np.array_equal(s0, s1)
    # not a subset shift: the two selections overlap at about p**2 (independent)
    n = int(cand.sum())
    assert within((s0 & s1)[cand].mean(), 0.15**2, n)
    # and the digest that folds the spec in differs, and is stable
    assert MaskSpec(0.15, 0.8, 0.1).key() == MaskSpec().key()
    assert MaskSpec(0.15, 0.8, 0.1).key() != MaskSpec(0.15, 0.7, 0.2).key()
    assert MaskSpec(0.15).key() != MaskSpec(0.2).key()


@pytest.mark.parametrize(
    "kwargs", [dict(mlm_probability=-0.1), dict(mlm_probability=1.5), dict(mask_ratio=-0.1),
               dict(random_ratio=-0.2), dict(mask_ratio=0.8, random_ratio=0.3)],  # fmt: skip
)
def test_invalid_spec_rejected(kwargs):
    with pytest.raises(ValueError):
        MaskSpec(**kwargs)


def test_vocab_build_marks_mask_and_pad_special():
    v = Vocab.build(50, [7], mask_id=30, pad_id=41)
    assert set(np.flatnonzero(v.is_special)) == {7, 30, 41}
    assert len(v.ordinary_ids) == 47 and not set(v.ordinary_ids) & {7, 30, 41}


# ---- sample_ids ------------------------------------------------------------


def test_sample_ids_deterministic_and_in_range():
    for n in (1, 2, 7, 742, 10**6, (1 << 32) - 1):
        a = sample_ids(5, 3, 256, n)
        b = sample_ids(5, 3, 256, n)
        np.testing.assert_array_equal(a, b)
        assert a.shape == (256,) and a.dtype == np.int64
        assert a.min() >= 0 and a.max() < n
    assert (sample_ids(5, 3, 100, 1) == 0).all()
    # large ids really reach the top of the range
    assert sample_ids(1, 0, 1000, (1 << 32) - 1).max() > 1 << 31


def test_sample_ids_depend_on_seed_and_index():
    base = sample_ids(5, 3, 64, 10**6)
    assert not np.array_equal(base, sample_ids(6, 3, 64, 10**6))
    assert not np.array_equal(base, sample_ids(5, 4, 64, 10**6))
    # large seeds are accepted and distinct
    assert not np.array_equal(sample_ids((1 << 64) - 1, 3, 64, 10**6), sample_ids((1 << 63) - 1, 3, 64, 10**6))


def test_sample_ids_uniform():
    n_seq = 97
    draws = np.concatenate([sample_ids(42, k, 500, n_seq) for k in range(400)])  # 2 * 10**5 draws
    counts = np.bincount(draws, minlength=n_seq)
    expected = len(draws) / n_seq
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    df = n_seq - 1
    # chi-square: mean df, sd sqrt(2 df); accept below mean + 5 sd
    assert chi2 < df + SIGMAS * math.sqrt(2 * df), f"chi2={chi2:.1f}, df={df}"
    # within one batch positions are independent too: no id repeats far more than chance
    one = sample_ids(7, 0, 10_000, 10**9)
    assert len(np.unique(one)) >= 9990


@pytest.mark.parametrize("n", [0, -1, 1 << 32])
def test_sample_ids_rejects_bad_range(n):
    with pytest.raises(ValueError):
        sample_ids(0, 0, 4, n)


@pytest.mark.parametrize(("span_p", "span_max"), [(0.2, 10), (0.5, 3), (0.05, 64), (0.9, 1)])
def test_span_length_draws_are_the_exact_inverse_cdf(span_p, span_max):
    """The table-driven draw equals the plain inverse CDF on the hash's 53-bit
    uniform, hashes right at and around every CDF point included, and never
    exceeds span_max (not even for the largest hash)."""
    from service.masking.units import _length_draws
    from service.masking.rng import uniform01

    cdf, _ = MaskSpec(span_p=span_p, span_max=span_max).span_lengths()
    assert cdf[-1] == 1.0
    rng = np.random.default_rng(5)
    h = rng.integers(0, 2**64, size=100_000, dtype=np.uint64)
    points = np.floor(cdf * 2.0**53).astype(np.uint64)
    around = np.concatenate([points - np.uint64(1), points, points + np.uint64(1)]) % np.uint64(2**53)
    h = np.concatenate([h, around << np.uint64(11), (around << np.uint64(11)) | np.uint64(2047),
                        np.array([0, 2**64 - 1], dtype=np.uint64)])  # fmt: skip
    got = _length_draws(span_p, span_max)(h)
    want = np.searchsorted(cdf, uniform01(h.copy()), side="left") + 1
    np.testing.assert_array_equal(got, want)
    assert got.min() >= 1 and got.max() <= span_max


def test_equal_specs_have_one_digest_whatever_came_first():
    """1 and 1.0, -0.0 and 0.0 are the same config: the same digest (so the same masks and
    static-cache ids on every replica) in whichever order a process first meets them."""
    from service.masking import masking

    for a, b in ((dict(mask_ratio=-0.0), dict(mask_ratio=0.0)), (dict(mlm_probability=1), dict(mlm_probability=1.0))):
        masking._digest.cache_clear()
        first = MaskSpec(**a).key(), MaskSpec(**b).key()
        masking._digest.cache_clear()
        second = MaskSpec(**b).key(), MaskSpec(**a).key()
        assert first[0] == first[1] == second[0] == second[1], (a, b)


@pytest.mark.parametrize("count", ["bernoulli", "exact"])
@pytest.mark.parametrize("p", [1e-19, 5e-324])
def test_span_at_a_vanishing_rate_selects_nothing(p, count):
    """A rate below 2**-33 selects nothing (as for tokens), instead of overflowing the layout."""
    ids = np.full((4, 64), 10, dtype=np.int32)
    m = mask_batch(ids, np.full(4, 64), np.arange(4), seed=1, epoch=0, spec=MaskSpec(p, unit="span", count=count),
                   vocab=Vocab.build(100, [0, 1, 2, 3], 3, 1), word_start=np.ones((4, 64), dtype=bool))  # fmt: skip
    assert not m.selected.any()

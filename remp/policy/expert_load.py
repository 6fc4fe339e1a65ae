"""How a batch of tokens loads the experts of a mixture-of-experts layer, in expectation.

The cost model (`remp.policy.analytic`) needs two numbers per layer and step: how many distinct
experts a batch activates (their weights are read once per step, whoever asks for them), and,
under expert parallelism, what the most loaded GPU holds: its distinct active experts (bytes)
and its token-expert pairs (FLOPs), since every GPU waits for the slowest at the combine.

Routing is taken as uniform and independent per token (each token picks `top_k` of
`num_experts` experts): the balance the router's auxiliary loss trains for. Real routing is
skewed, which makes expert parallelism's most loaded GPU worse than this; the model is
optimistic for EP there (`remp.policy.analytic` lists it among what is not modelled).
"""
from __future__ import annotations

import math
from statistics import NormalDist


def active_share(tokens: float, num_experts: int, top_k: int) -> float:
    """Probability that a given expert is chosen by at least one of `tokens` tokens."""
    if tokens <= 0:
        return 0.0
    return 1.0 - (1.0 - top_k / num_experts) ** tokens


def distinct_experts(tokens: float, num_experts: int, top_k: int) -> float:
    """Expected number of distinct experts `tokens` tokens activate: the experts whose weights a
    step reads. 1 token activates top_k; a large batch activates all of them."""
    return num_experts * active_share(tokens, num_experts, top_k)


def max_active_per_rank(tokens: float, num_experts: int, top_k: int, ranks: int) -> float:
    """Expected active experts on the most loaded of `ranks` ranks that hold num_experts / ranks
    experts each: the expected maximum of `ranks` independent Binomial(num_experts / ranks, p)
    counts, p = active_share (exact for the binomials; treating the ranks as independent is the
    approximation). E[max] = sum over j < n of 1 - F(j) ** ranks. One token or more activates
    top_k experts, so some rank holds at least ceil(top_k / ranks) of them, which the independent
    counts can fall short of when few are active."""
    per_rank = num_experts // ranks
    p = active_share(tokens, num_experts, top_k)
    if p >= 1.0:
        return float(per_rank)
    if p <= 0.0:
        return 0.0
    expected, cdf, pmf = 0.0, 0.0, (1.0 - p) ** per_rank
    for j in range(per_rank):
        cdf += pmf
        expected += 1.0 - min(cdf, 1.0) ** ranks
        pmf *= (per_rank - j) / (j + 1) * p / (1.0 - p)
    floor = min(per_rank, math.ceil(top_k / ranks)) if tokens >= 1 else 0
    return max(expected, floor)


def max_pairs_per_rank(pairs: float, ranks: int) -> float:
    """Expected token-expert pairs on the most loaded of `ranks` ranks when `pairs` pairs fall on
    them uniformly: the mean plus the expected maximum of `ranks` standard normals (Blom's
    approximation) times the binomial standard deviation, within [mean, pairs]."""
    if ranks <= 1 or pairs <= 0:
        return max(pairs, 0.0)
    mean = pairs / ranks
    z = NormalDist().inv_cdf((ranks - 0.375) / (ranks + 0.25))
    return min(pairs, mean + z * math.sqrt(pairs * (1.0 / ranks) * (1.0 - 1.0 / ranks)))

"""Quantizers, collision fix, report: each pinned by a slow obvious reference or a property."""

from __future__ import annotations

import math

import pytest
import torch

from recsys.quant.collisions import next_free_suffix, rebalance_last_level, resolve_collisions
from recsys.quant.kmeans import balanced_assign, kmeans, nearest
from recsys.quant.multi_expert import MultiExpertQuantizer, orthogonality_penalty, train_multi_expert
from recsys.quant.report import level_stats, recon_errors
from recsys.quant.rq_kmeans import RQKMeans
from recsys.quant.rq_vae import RQVAE, train_rqvae


def clustered(n: int = 300, d: int = 8, k: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * 3
    return centers[torch.randint(k, (n,), generator=g)] + torch.randn(n, d, generator=g)


@pytest.mark.parametrize("n,k", [(1, 1), (1, 4), (7, 3), (50, 16)])
def test_nearest_matches_brute_force(n, k):
    g = torch.Generator().manual_seed(n * 31 + k)
    x, c = torch.randn(n, 5, generator=g), torch.randn(k, 5, generator=g)
    ref = torch.tensor([min(range(k), key=lambda j: float(((x[i] - c[j]) ** 2).sum())) for i in range(n)])
    assert torch.equal(nearest(x, c), ref)


def test_balanced_assignment_respects_capacity_and_is_complete():
    x = clustered(200, k=2)  # two big clusters, 16 codes: unbalanced k-means would crowd some codes
    g = torch.Generator().manual_seed(0)
    res = kmeans(x, 16, g, balanced=True)
    counts = torch.bincount(res.assign, minlength=16)
    assert counts.sum() == 200 and counts.max() <= math.ceil(200 / 16)
    a = balanced_assign(x, res.centroids, 13)
    assert torch.bincount(a, minlength=16).max() <= 13 and (a >= 0).all()
    with pytest.raises(ValueError, match="capacity"):
        balanced_assign(x, res.centroids, 5)


def test_kmeans_recovers_separated_clusters():
    g = torch.Generator().manual_seed(1)
    centers = torch.tensor([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0]])
    label = torch.arange(90) % 3
    x = centers[label] + 0.1 * torch.randn(90, 2, generator=g)
    res = kmeans(x, 3, torch.Generator().manual_seed(0))
    # same partition up to renaming: every true cluster maps to exactly one code
    pairs = set(zip(label.tolist(), res.assign.tolist()))
    assert len(pairs) == 3 and len({p[1] for p in pairs}) == 3


@pytest.mark.parametrize("balanced", [False, True])
def test_rq_kmeans_reconstruction_improves_with_each_level(balanced):
    x = clustered(400, d=8)
    q = RQKMeans(levels=4, codebook_size=8, balanced=balanced, seed=0)
    codes = q.fit(x)
    errs = recon_errors(x, q.reconstructions(codes))
    assert codes.shape == (400, 4) and codes.min() >= 0 and codes.max() < 8
    assert errs[0] < 1.0  # better than reconstructing with zeros
    assert all(b < a for a, b in zip(errs, errs[1:])), errs


def test_rq_kmeans_encode_reproduces_fit_codes_and_same_seed_same_codes():
    x = clustered(250)
    a, b = RQKMeans(3, 8, seed=5), RQKMeans(3, 8, seed=5)
    ca, cb = a.fit(x), b.fit(x)
    assert torch.equal(ca, cb) and torch.equal(a.codebooks, b.codebooks)
    assert torch.equal(a.encode(x), ca)
    restored = RQKMeans.from_state(a.state())
    assert torch.equal(restored.encode(x[:7]), ca[:7])
    assert not torch.equal(RQKMeans(3, 8, seed=6).fit(x), ca)  # the seed matters (k-means++ draws)


def reference_collision_fix(codes: torch.Tensor) -> torch.Tensor:
    seen: dict[tuple, int] = {}
    out = []
    for row in codes.tolist():
        t = tuple(row)
        out.append(row + [seen.get(t, 0)])
        seen[t] = seen.get(t, 0) + 1
    return torch.tensor(out, dtype=torch.int64).view(-1, codes.shape[1] + 1)


@pytest.mark.parametrize("n,k", [(0, 2), (1, 2), (2, 1), (60, 2), (500, 4)])
def test_collision_fix_makes_tuples_unique_and_matches_reference(n, k):
    codes = torch.randint(k, (n, 2), generator=torch.Generator().manual_seed(n))
    fixed, stats = resolve_collisions(codes)
    assert torch.equal(fixed, reference_collision_fix(codes))
    assert len(torch.unique(fixed, dim=0)) == n
    if n:
        shared = sum(1 for r in codes.tolist() if codes.tolist().count(r) > 1)
        assert stats.collision_rate == pytest.approx(shared / n)


def reference_rebalance(codes: torch.Tensor, costs: torch.Tensor) -> torch.Tensor:
    """Obvious version: per prefix holding a repeated tuple, take (cost, item, code) triples in sorted order."""
    rows, k = codes.tolist(), costs.shape[1]
    out = [list(r) for r in rows]
    prefixes: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        prefixes.setdefault(tuple(r[:-1]), []).append(i)
    for items in prefixes.values():
        if len({tuple(rows[i]) for i in items}) == len(items):
            continue
        triples = sorted((float(costs[i, c]), i, c) for i in items for c in range(k))
        done, used = set(), set()
        for _, i, c in triples:
            if i not in done and c not in used and len(done) < min(len(items), k):
                done.add(i)
                used.add(c)
                out[i][-1] = c
    return torch.tensor(out, dtype=torch.int64).view(-1, codes.shape[1])


@pytest.mark.parametrize("n,m,k", [(0, 2, 4), (1, 2, 4), (2, 1, 3), (40, 2, 8), (300, 3, 4), (50, 2, 1)])
def test_rebalance_last_level_matches_reference_and_separates_small_groups(n, m, k):
    gen = torch.Generator().manual_seed(n + m + k)
    codes = torch.randint(k, (n, m), generator=gen)
    codes[:, :-1] //= 2  # fewer prefixes: more collisions
    costs = torch.rand(n, k, generator=gen)
    got = rebalance_last_level(codes, costs)
    assert torch.equal(got, reference_rebalance(codes, costs))
    assert torch.equal(got[:, :-1], codes[:, :-1])
    prefix = torch.cat([codes[:, :-1], torch.zeros(n, 1, dtype=torch.int64)], 1)  # m = 1: one empty prefix
    _, inv, counts = torch.unique(prefix, dim=0, return_inverse=True, return_counts=True)
    small = counts[inv] <= k
    # every item of a prefix group with at most K items now has a tuple of its own
    _, full_inv, full_counts = torch.unique(got, dim=0, return_inverse=True, return_counts=True)
    assert (full_counts[full_inv][small] == 1).all()
    assert torch.equal(rebalance_last_level(codes, costs), got)  # deterministic


def test_rebalance_leaves_collision_free_codes_alone_and_refuses_bad_shapes():
    codes = torch.tensor([[0, 1], [0, 2], [1, 1]])
    assert torch.equal(rebalance_last_level(codes, torch.rand(3, 4)), codes)
    with pytest.raises(ValueError, match="share N"):
        rebalance_last_level(codes, torch.rand(2, 4))
    with pytest.raises(ValueError, match="only 2 columns"):
        rebalance_last_level(codes, torch.rand(3, 2))


def test_last_level_costs_agree_with_each_quantizers_encode():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(200, 6, generator=gen)
    rq = RQKMeans(2, 8, iters=5, seed=0)
    rq.fit(x)
    vae = RQVAE(6, 16, 4, 2, 8)
    vae.init_codebooks(x, torch.Generator().manual_seed(0))
    me = MultiExpertQuantizer(6, 3, 2, 8)
    train_multi_expert(me, x, epochs=1, batch_size=64, lr=1e-2, beta=0.25, orth_weight=1.0, seed=0, progress=False)
    for q in (rq, vae, me):
        codes = q.encode(x)
        costs = q.last_level_costs(x, codes)
        assert costs.shape == (200, 8)
        assert torch.equal(costs.argmin(1), codes[:, -1]), q.method


def test_next_free_suffix_for_new_items():
    fixed = torch.tensor([[1, 2, 0], [1, 2, 1], [0, 0, 0]])
    got = next_free_suffix(fixed, torch.tensor([[1, 2], [5, 5], [1, 2]]))
    assert got.tolist() == [2, 0, 3]


def test_level_stats_perplexity_and_utilisation():
    codes = torch.tensor([[0, 0], [1, 0], [2, 0], [3, 0]])
    s = level_stats(codes, [4, 8])
    assert s[0]["perplexity"] == pytest.approx(4.0) and s[0]["utilisation"] == 1.0
    assert s[1]["perplexity"] == pytest.approx(1.0) and s[1]["utilisation"] == 1 / 8
    assert s[1]["items_per_code_max"] == 4


def test_rq_vae_trains_deterministically_and_loss_drops():
    x = clustered(256, d=8)
    runs = []
    for _ in range(2):
        m = RQVAE(8, 32, 4, levels=2, codebook_size=8)
        hist = train_rqvae(m, x, epochs=6, batch_size=64, lr=3e-3, beta=0.25, seed=3, progress=False)
        runs.append((m.encode(x), hist))
    (c1, h1), (c2, h2) = runs
    assert torch.equal(c1, c2) and h1 == h2
    assert c1.shape == (256, 2) and c1.min() >= 0 and c1.max() < 8
    assert h1[-1]["recon"] < h1[0]["recon"]
    assert all(math.isfinite(r["loss"]) for r in h1)
    restored = RQVAE.from_state(m.state())
    assert torch.equal(restored.encode(x), c2)


def test_rq_vae_reseeds_dead_codes():
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)).repeat(10, 1)  # 4 distinct points
    m = RQVAE(4, 8, 2, levels=1, codebook_size=32)
    hist = train_rqvae(m, x, epochs=3, batch_size=40, lr=1e-3, beta=0.25, seed=0, progress=False)
    # 32 codes seeded by k-means on 4 distinct points: most win no point and are re-seeded each epoch
    unused = [round((1 - h["utilisation"]) * 32) for h in hist]
    assert [h["dead_codes_reseeded"] for h in hist[:-1]] == unused[:-1]
    assert unused[0] > 0


def test_orthogonality_penalty_matches_reference():
    v = torch.randn(3, 2, 7, generator=torch.Generator().manual_seed(0))
    flat = v.reshape(6, 7)
    ref = sum((float(flat[i] @ flat[j]) - (1.0 if i == j else 0.0)) ** 2 for i in range(6) for j in range(6))
    assert float(orthogonality_penalty(v)) == pytest.approx(ref, rel=1e-5)


def test_orthogonality_penalty_drives_vvt_to_identity():
    x = clustered(256, d=12)
    x = (x - x.mean(0)) / x.std()
    final = {}
    for w in (0.0, 10.0):
        m = MultiExpertQuantizer(12, experts=3, proj_dim=4, codebook_size=8)  # E * p = 12 <= d
        hist = train_multi_expert(m, x, epochs=30, batch_size=128, lr=1e-2, beta=0.25, orth_weight=w, seed=0,
                                  progress=False)
        final[w] = float(orthogonality_penalty(m.v.detach()))
    start = hist[0]["orthogonality"]
    flat = m.v.detach().reshape(12, 12)
    assert final[10.0] < 0.05 * start and final[10.0] < 0.1 * final[0.0], (start, final)
    assert (flat @ flat.T - torch.eye(12)).abs().max() < 0.1
    codes = m.encode(x)
    assert codes.shape == (256, 3) and codes.max() < 8

"""Synthetic requests with a planted click model whose true probability is known.

The world (all draws vectorised numpy, seeded; every stage has its own stream so
changing one knob leaves the others' draws alone):

* users 1..U with a latent category preference ``pref[u] ~ Dirichlet(alpha)``, an age
  bucket, a region and a segment (= their favourite category);
* items 1..I with a category and a Zipf popularity (plus a hidden quality for likes);
* an event log: each user has a heavy-tailed number of events (lognormal or Pareto,
  capped at ``max_history``) spread over their active window; an event's category
  follows ``pref[u]`` with sticky sessions (it repeats the previous category with
  probability ``stickiness``), its item is popularity-weighted inside the category, its
  kind is click / like / purchase with decreasing rates, its action a dwell bucket;
* requests: ``1 + Poisson(requests_per_user - 1)`` per user at random times, each with
  ``candidates_per_request`` candidates (part from the user's preferred categories,
  part by popularity).

Histories come from :func:`recsys.data.ingest.attach_history`, the same code path as
real event logs. The planted click probability of candidate ``i`` of request ``r``
then depends only on what a ranker can see (``W = signal_window`` most recent events
of the first kind, the item id, a user feature)::

    aff  = log((n_W(cat_i) + 1) / (W_r + C) * C)     share of the candidate's category in
                                                     the last W events vs a uniform share
    rec  = exp(-k / recency_scale)                   k = events since that category was last seen
                                                     (0 if not in the last W)
    pop  = standardised log popularity of the item
    feat = E[age_bucket(u), cat_i],  E ~ N(0, w_user_feature)
    P(click) = sigmoid(click_bias + w_aff aff + w_rec rec + w_pop pop + feat)
                                                     (+ long_range_weight * long, off by default: see
                                                     ``long_range_term``, a signal only a history longer
                                                     than ``long_range_window`` events carries)
    P(like | click) = sigmoid(like_bias + w_like_quality quality_i + w_like_aff aff)
    P(like) = P(click) P(like | click);  like = 0 when click = 0

Labels are Bernoulli draws of these, so the oracle AUC (true probability vs label)
bounds what any model can reach on the same rows.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import polars as pl

from recsys.data.config import HistoryDist, SyntheticConfig
from recsys.data.ingest import SPLIT_CODES, attach_history, time_split
from recsys.data.jagged import Jagged
from recsys.data.parquet_io import RequestColumns
from recsys.data.schema import DataSchema, SparseFeature

T0 = 1_700_000_000  # first second of the synthetic timeline
NUM_AGE_BUCKETS = 7
NUM_REGIONS = 16
SPARSE_FEATURES = ("user_segment", "age_bucket", "region", "hour_bucket")
DENSE_FEATURES = ("activity", "recent_activity")


def synthetic_schema(cfg: SyntheticConfig) -> DataSchema:
    """The schema of generated rows (ids: users/items/categories from 1, 0 unused = OOV)."""
    sparse = [SparseFeature("user_segment", cfg.num_categories + 1),
              SparseFeature("age_bucket", NUM_AGE_BUCKETS + 1),
              SparseFeature("region", NUM_REGIONS + 1),
              SparseFeature("hour_bucket", 25)]
    return DataSchema(sparse=sparse, dense=list(DENSE_FEATURES), sequences=list(cfg.sequences),
                      tasks=list(cfg.tasks), num_items=cfg.num_items + 1, num_categories=cfg.num_categories + 1,
                      num_actions=cfg.num_actions, has_true_prob=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def sample_rowwise(cum: np.ndarray, rows: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Column index drawn from row ``rows[n]`` of a row-wise CDF ``cum [G, K]`` with uniforms ``u [N]``.

    Offsetting row g's CDF by g makes one increasing array, so one searchsorted draws
    from N different distributions with no [N, K] temporary.
    """
    g, k = cum.shape
    flat = (np.arange(g, dtype=np.float64)[:, None] + cum).ravel()
    idx = np.searchsorted(flat, rows + u, side="right") - rows * k
    return np.minimum(idx, k - 1)


@dataclass
class World:
    """The hidden truth of one seed."""

    pref: np.ndarray
    """[U+1, C] category preference of each user (row 0 unused); column j is category j + 1."""
    user_start: np.ndarray
    """[U+1] first second of each user's active window."""
    age: np.ndarray
    """[U+1] age bucket 1..7."""
    region: np.ndarray
    """[U+1] region 1..16."""
    item_category: np.ndarray
    """[I+1] category 1..C (row 0 unused)."""
    item_pop: np.ndarray
    """[I+1] popularity weight (sums to 1 over 1..I)."""
    item_quality: np.ndarray
    """[I+1] hidden quality ~ N(0, 1), drives likes."""
    feat_effect: np.ndarray
    """[8, C+1] planted (age bucket x category) effect on the click logit."""
    t_end: int
    """Last second of the timeline."""


def make_world(cfg: SyntheticConfig, rng: np.random.Generator) -> World:
    u, i, c = cfg.num_users, cfg.num_items, cfg.num_categories
    if i < c:
        raise ValueError(f"synthetic.num_items ({i}) must be >= num_categories ({c})")
    pref = np.zeros((u + 1, c))
    pref[1:] = rng.dirichlet(np.full(c, cfg.preference_concentration), size=u)
    span = int(cfg.time_span_days * 86400)
    user_start = np.zeros(u + 1, dtype=np.int64)
    user_start[1:] = T0 + (rng.random(u) * 0.5 * span).astype(np.int64)
    age = np.concatenate([[0], rng.integers(1, NUM_AGE_BUCKETS + 1, size=u)])
    region = np.concatenate([[0], rng.integers(1, NUM_REGIONS + 1, size=u)])
    cats = np.concatenate([rng.permutation(c) + 1, rng.integers(1, c + 1, size=i - c)])  # every category non-empty
    item_category = np.concatenate([[0], rng.permutation(cats)])
    rank = rng.permutation(i) + 1
    pop = 1.0 / rank.astype(np.float64) ** cfg.zipf_exponent
    item_pop = np.concatenate([[0.0], pop / pop.sum()])
    item_quality = np.concatenate([[0.0], rng.standard_normal(i)])
    feat_effect = rng.standard_normal((NUM_AGE_BUCKETS + 1, c + 1)) * cfg.w_user_feature
    return World(pref, user_start, age, region, item_category, item_pop, item_quality, feat_effect, T0 + span)


def cold_item_mask(cfg: SyntheticConfig, world: World) -> np.ndarray:
    """``[I+1]`` bool: the ``cold_item_fraction`` of items held out of training (own seeded stream).

    Never cold: each category's highest item id and item I (the samplers' closing entries), so
    every category keeps a warm item and a zero-popularity item can never be drawn by rounding.
    """
    mask = np.zeros(len(world.item_category), dtype=bool)
    if cfg.cold_item_fraction <= 0:
        return mask
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed).spawn(6)[5])
    items = np.arange(1, len(world.item_category))
    protected = np.zeros_like(mask)
    last_of_cat = np.zeros(cfg.num_categories + 1, dtype=np.int64)
    np.maximum.at(last_of_cat, world.item_category[items], items)
    protected[last_of_cat[1:]] = True
    protected[-1] = True
    pool = items[~protected[items]]
    mask[rng.choice(pool, size=min(len(pool), int(round(cfg.cold_item_fraction * len(items)))), replace=False)] = True
    return mask


def warm_world(world: World, cold: np.ndarray) -> World:
    """The same world with cold items' popularity set to 0 (the samplers never draw them)."""
    pop = np.where(cold, 0.0, world.item_pop)
    return dataclasses.replace(world, item_pop=pop / pop.sum())


class _ItemSampler:
    """Draws items by popularity, globally or inside given categories (one searchsorted each)."""

    def __init__(self, world: World) -> None:
        items = np.arange(1, len(world.item_category))
        order = np.lexsort((items, world.item_category[1:]))
        self.items_by_cat = items[order]
        cat = world.item_category[self.items_by_cat]
        pop = world.item_pop[self.items_by_cat]
        cat_total = np.bincount(cat, weights=pop)
        cum = np.cumsum(pop)
        start = np.searchsorted(cat, cat, side="left")
        within = (cum - (cum[start] - pop[start])) / cat_total[cat]
        within[np.r_[cat[1:] != cat[:-1], True]] = 1.0  # last item of a category closes it exactly
        self.flat = cat + within
        self.global_cum = np.cumsum(world.item_pop[1:])
        self.global_cum[-1] = 1.0

    def in_category(self, cat: np.ndarray, u: np.ndarray) -> np.ndarray:
        idx = np.searchsorted(self.flat, cat + u, side="right")
        return self.items_by_cat[np.minimum(idx, len(self.flat) - 1)]

    def by_popularity(self, u: np.ndarray) -> np.ndarray:
        return np.minimum(np.searchsorted(self.global_cum, u, side="right"), len(self.global_cum) - 1) + 1


def _history_lengths(cfg: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    if cfg.history_dist == HistoryDist.lognormal:
        n = cfg.history_median * np.exp(cfg.history_sigma * rng.standard_normal(cfg.num_users))
    else:
        n = cfg.history_median * (1.0 + rng.pareto(cfg.history_pareto_alpha, size=cfg.num_users))
    return np.minimum(np.floor(n), cfg.max_history).astype(np.int64)


def _pref_cdf(world: World) -> np.ndarray:
    """``[U+1, C]`` row-wise CDF of each user's category preference, last column exactly 1."""
    cum = np.cumsum(world.pref, axis=1)
    cum[:, -1] = 1.0
    return cum


def make_event_log(cfg: SyntheticConfig, world: World, rng: np.random.Generator) -> pl.DataFrame:
    """The behaviour log: user_id, item_id, category, action, kind, timestamp, event_idx (time-sorted per user)."""
    n_u = _history_lengths(cfg, rng)
    user = np.repeat(np.arange(1, cfg.num_users + 1), n_u)
    n = len(user)
    start = world.user_start[user]
    ts = start + (rng.random(n) * (world.t_end - start)).astype(np.int64)
    order = np.lexsort((ts, user))
    user, ts = user[order], ts[order]
    # sticky categories: a "fresh" draw from pref at session starts, copied forward otherwise
    fresh = rng.random(n) >= cfg.stickiness
    fresh[np.r_[True, user[1:] != user[:-1]]] = True
    fresh_idx = np.flatnonzero(fresh)
    cat = np.zeros(n, dtype=np.int64)
    cat[fresh_idx] = sample_rowwise(_pref_cdf(world), user[fresh_idx], rng.random(fresh_idx.size)) + 1
    cat = cat[np.maximum.accumulate(np.where(fresh, np.arange(n), 0))]
    item = _ItemSampler(world).in_category(cat, rng.random(n))
    kind_cum = np.cumsum(cfg.kind_rates)
    kind_id = np.minimum(np.searchsorted(kind_cum, rng.random(n) * kind_cum[-1], side="right"),
                         len(cfg.sequences) - 1)
    # dwell / strength bucket: longer on categories the user likes
    share = np.minimum(world.pref[user, cat - 1] * cfg.num_categories, 4.0)
    action = 1 + np.minimum(np.floor(rng.exponential(1.0 + share / 2.0)), cfg.num_actions - 2).astype(np.int64)
    kinds = np.asarray(cfg.sequences, dtype=object)
    return pl.DataFrame({"user_id": user, "item_id": item, "category": world.item_category[item],
                         "action": action, "kind": pl.Series(kinds[kind_id], dtype=pl.String),
                         "timestamp": ts, "event_idx": np.arange(n, dtype=np.int64)})


def _planted_click_terms(cfg: SyntheticConfig, hist_cat: Jagged, cand_req: np.ndarray,
                         cand_cat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(affinity, recency) of every candidate from the last ``signal_window`` events of its request."""
    c = cfg.num_categories + 1
    recent = hist_cat.tail(cfg.signal_window)
    row = recent.row_ids()
    pos_from_end = recent.offsets[row + 1] - 1 - np.arange(len(row))  # 0 = most recent
    key = row * c + recent.values
    order = np.lexsort((pos_from_end, key))
    key, pos_from_end = key[order], pos_from_end[order]
    cand_key = cand_req * c + cand_cat
    lo = np.searchsorted(key, cand_key, side="left")
    count = np.searchsorted(key, cand_key, side="right") - lo
    n_recent = recent.lengths[cand_req]
    aff = np.log((count + 1.0) / (n_recent + cfg.num_categories) * cfg.num_categories)
    if len(key):
        first = pos_from_end[np.minimum(lo, len(key) - 1)]  # the smallest position of that key
        rec = np.where(count > 0, np.exp(-first / cfg.recency_scale), 0.0)
    else:
        rec = np.zeros(len(cand_key))
    return aff, rec


def long_range_term(hist_cat: Jagged, window: int, cand_req: np.ndarray, cand_cat: np.ndarray) -> np.ndarray:
    """``[N]`` 1.0 where candidate n's category is among its request's events *older* than the last
    ``window`` ones and not among the last ``window`` (information only a long history holds), else 0."""
    lengths = hist_cat.lengths
    row = hist_cat.row_ids()
    old = (np.arange(len(row)) - hist_cat.offsets[row]) < (lengths[row] - window)  # [E] older than the window
    big = int(max(hist_cat.values.max(initial=0), cand_cat.max(initial=0))) + 1
    key = row * big + hist_cat.values
    cand_key = cand_req * big + cand_cat
    in_old = np.isin(cand_key, key[old])
    in_recent = np.isin(cand_key, key[~old])
    return (in_old & ~in_recent).astype(np.float64)


@dataclass
class SyntheticData:
    """Generated request rows plus what only the generator knows."""

    schema: DataSchema
    columns: RequestColumns
    split: np.ndarray
    """[R] int8 split codes (0 train, 1 valid, 2 test)."""
    num_events: int
    """Rows of the behaviour event log."""
    timings: dict[str, float]


def _make_requests(cfg: SyntheticConfig, world: World, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(req_user [R], req_ts [R])``: ``1 + Poisson(requests_per_user - 1)`` requests per user at uniform
    times of their active window, sorted by (user, ts)."""
    n_req = 1 + rng.poisson(cfg.requests_per_user - 1, size=cfg.num_users)
    req_user = np.repeat(np.arange(1, cfg.num_users + 1), n_req)
    start = world.user_start[req_user]
    req_ts = start + (rng.random(len(req_user)) * (world.t_end - start)).astype(np.int64)
    order = np.lexsort((req_ts, req_user))
    return req_user[order], req_ts[order]


def _draw_candidates(cfg: SyntheticConfig, world: World, cold: np.ndarray, events: pl.DataFrame,
                     req_user: np.ndarray, req_ts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``[R * K]`` candidate item ids, K per request in request order: part from the user's preferred
    categories, part by popularity; cold items only among test requests' candidates."""
    r, k = len(req_user), cfg.candidates_per_request
    cand_user = req_user[np.repeat(np.arange(r), k)]
    sampler = _ItemSampler(world)
    from_pref = rng.random(r * k) < cfg.candidate_pref_fraction
    pref_cat = sample_rowwise(_pref_cdf(world), cand_user, rng.random(r * k)) + 1
    u_cat, u_pop = rng.random(r * k), rng.random(r * k)  # same draw order as one np.where(...) call
    cand_item = np.where(from_pref, sampler.in_category(pref_cat, u_cat), sampler.by_popularity(u_pop))
    if cold.any():  # cold items only among test candidates: other rows draw the same uniforms from warm items
        warm = _ItemSampler(warm_world(world, cold))
        not_test = np.repeat(time_split(req_ts, cfg.valid_fraction, cfg.test_fraction) != SPLIT_CODES["test"], k)
        warm_item = np.where(from_pref, warm.in_category(pref_cat, u_cat), warm.by_popularity(u_pop))
        cand_item = np.where(not_test, warm_item, cand_item)
        if cold[cand_item[not_test]].any() or cold[events["item_id"].to_numpy()].any():
            raise AssertionError("synthetic: a cold item was drawn outside the test candidates")
    return cand_item


def _planted_labels(cfg: SyntheticConfig, world: World, cols: RequestColumns, cand_req: np.ndarray,
                    cand_user: np.ndarray, cand_item: np.ndarray, cand_cat: np.ndarray,
                    rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``task -> (label [N] bool, true probability [N] float64)`` of the planted click / like model
    (see the module docstring) for the N candidates, labels drawn from ``rng``."""
    first_kind = cfg.sequences[0]
    aff, rec = _planted_click_terms(cfg, cols[DataSchema.seq_col(first_kind, "category")], cand_req, cand_cat)
    log_pop = np.log(world.item_pop[1:])
    pop = (np.log(world.item_pop[cand_item]) - log_pop.mean()) / log_pop.std()
    feat = world.feat_effect[world.age[cand_user], cand_cat]
    logit = cfg.click_bias + cfg.w_affinity * aff + cfg.w_recency * rec + cfg.w_popularity * pop + feat
    if cfg.long_range_weight:  # off by default: the default rows stay byte-identical
        logit = logit + cfg.long_range_weight * long_range_term(
            cols[DataSchema.seq_col(first_kind, "category")], cfg.long_range_window, cand_req, cand_cat)
    p_click = _sigmoid(logit)
    q_like = _sigmoid(cfg.like_bias + cfg.w_like_quality * world.item_quality[cand_item] + cfg.w_like_affinity * aff)
    n = len(cand_item)
    click = rng.random(n) < p_click
    like = click & (rng.random(n) < q_like)
    return {"click": (click, p_click), "like": (like, p_click * q_like)}


def _add_request_columns(cfg: SyntheticConfig, world: World, cols: RequestColumns, req_user: np.ndarray,
                         req_ts: np.ndarray, cand_item: np.ndarray, cand_cat: np.ndarray,
                         labels: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Adds to ``cols`` (which holds the histories) the per-request columns (ids, user features, dense
    activity) and the candidate columns ``[R, K]`` as jagged ones, one label and probability per task."""
    r, k = len(req_user), cfg.candidates_per_request
    lengths = np.full(r, k, dtype=np.int64)
    hist_len = sum(cols[DataSchema.seq_col(s, "ts")].lengths for s in cfg.sequences)
    ts_first = cols[DataSchema.seq_col(cfg.sequences[0], "ts")]
    recent = (ts_first.values >= np.repeat(req_ts - 86400, ts_first.lengths)).astype(np.int64)
    recent_count = np.bincount(ts_first.row_ids(), weights=recent, minlength=r)
    cols.update({
        "request_id": np.arange(r, dtype=np.int64),
        "user_id": req_user.astype(np.int64),
        "request_ts": req_ts,
        "user_segment": (np.argmax(world.pref, axis=1) + 1)[req_user].astype(np.int64),
        "age_bucket": world.age[req_user].astype(np.int64),
        "region": world.region[req_user].astype(np.int64),
        "hour_bucket": (1 + (req_ts // 3600) % 24).astype(np.int64),
        "activity": (np.log1p(hist_len) / np.log1p(cfg.max_history)).astype(np.float32),
        "recent_activity": (np.log1p(recent_count) / 4.0).astype(np.float32),
        "cand_item_id": Jagged.from_lengths(cand_item.astype(np.int64), lengths),
        "cand_category": Jagged.from_lengths(cand_cat.astype(np.int64), lengths),
    })
    for task in cfg.tasks:
        lab, prob = labels[task]
        cols[f"cand_label_{task}"] = Jagged.from_lengths(lab.astype(np.float32), lengths)
        cols[f"cand_prob_{task}"] = Jagged.from_lengths(prob.astype(np.float32), lengths)


def generate(cfg: SyntheticConfig) -> SyntheticData:
    """Generates every request row of ``cfg`` (deterministic given ``cfg.seed``).

    Streams of ``SeedSequence(cfg.seed).spawn(5)``: 0 world, 1 event log, 2 requests, 3 candidates,
    4 labels (the cold-item mask has its own, see :func:`cold_item_mask`).
    """
    t0 = time.perf_counter()
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(5)]
    world = make_world(cfg, streams[0])
    cold = cold_item_mask(cfg, world)
    events = make_event_log(cfg, warm_world(world, cold) if cold.any() else world, streams[1])
    t_events = time.perf_counter()

    req_user, req_ts = _make_requests(cfg, world, streams[2])
    cols: RequestColumns = attach_history(events, req_user, req_ts, cfg.sequences)
    t_history = time.perf_counter()

    cand_item = _draw_candidates(cfg, world, cold, events, req_user, req_ts, streams[3])
    cand_req = np.repeat(np.arange(len(req_user)), cfg.candidates_per_request)
    cand_cat = world.item_category[cand_item]
    labels = _planted_labels(cfg, world, cols, cand_req, req_user[cand_req], cand_item, cand_cat, streams[4])
    _add_request_columns(cfg, world, cols, req_user, req_ts, cand_item, cand_cat, labels)
    split = time_split(req_ts, cfg.valid_fraction, cfg.test_fraction)
    t_done = time.perf_counter()
    timings = {"events_s": t_events - t0, "history_s": t_history - t_events, "candidates_s": t_done - t_history}
    return SyntheticData(synthetic_schema(cfg), cols, split, len(events), timings)

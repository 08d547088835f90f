"""Training losses of embedding retrieval: sampled softmax with logQ correction, full softmax.

Shapes: ``B`` training targets (one per (request, position) of the causal history, flattened), ``D``
vector width, ``N`` uniformly sampled negatives shared by the batch, ``I`` catalog rows (row = item id,
row 0 = padding).

Sampled softmax (Yi et al., RecSys 2019). Row ``b`` scores the columns ``[targets of the batch | sampled]``:

    logit[b, j] = u_b . v_j / tau - log q_j          (every column, the row's own target included)
    loss_b      = logsumexp_j logit[b, j] - logit[b, b]

``log q_j`` is the log of how often item ``j`` shows up among the columns of its source: for in-batch
targets, ``log(B * p_j)`` with ``p_j`` its frequency in the training stream (the caller passes it: it
knows the stream); for the ``N`` uniform draws over ``1..I-1``, ``log(N / (I - 1))`` (computed here).
Without the correction, popular items, which are negatives more often, are pushed down too much.
The row's own target is corrected too, as in the paper's equation and TensorFlow's ``subtract_log_q``:
the correction is a property of the column, not of the row.

Accidental hits: a column other than ``b`` whose item equals ``b``'s target (the same item as another
row's target, or a uniform draw of it) is a positive counted as a negative; it is masked (``-inf``).

Full softmax: when the catalog is small (``I <= full_softmax_max_items``) every item is a column and no
sampling or correction is needed; ``retrieval_loss`` picks between the two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from recsys.errors import InputError


@dataclass
class RetrievalLossConfig:
    temperature: float = 0.05
    """tau: logits are u.v / tau (vectors are expected L2-normalised)."""
    num_negatives: int = 512
    """N: uniform negatives drawn per batch (shared by all rows), on top of the in-batch targets."""
    full_softmax_max_items: int = 4096
    """Catalogs with at most this many rows use the exact full softmax instead of sampling."""

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise InputError(f"retrieval loss: temperature must be > 0, got {self.temperature}")
        if self.num_negatives < 0:
            raise InputError(f"retrieval loss: num_negatives must be >= 0, got {self.num_negatives}")


def sampled_softmax_loss(user: torch.Tensor, target_ids: torch.Tensor, target_vecs: torch.Tensor,
                         target_log_q: torch.Tensor, sampled_ids: torch.Tensor | None = None,
                         sampled_vecs: torch.Tensor | None = None, sampled_log_q: torch.Tensor | None = None,
                         temperature: float = 1.0) -> torch.Tensor:
    """Per-row loss ``[B]``.

    ``user [B, D]``, ``target_ids [B]``, ``target_vecs [B, D]``, ``target_log_q [B]`` (in-batch sampling
    log-probability of each target); optional ``sampled_ids [N]``, ``sampled_vecs [N, D]``,
    ``sampled_log_q [N]``. Column ``b`` of row ``b`` is the positive.
    """
    b = user.shape[0]
    if target_ids.shape != (b,) or target_vecs.shape != user.shape or target_log_q.shape != (b,):
        raise InputError(f"sampled softmax: user {tuple(user.shape)}, target_ids {tuple(target_ids.shape)}, "
                         f"target_vecs {tuple(target_vecs.shape)}, target_log_q {tuple(target_log_q.shape)} "
                         "must be [B, D], [B], [B, D], [B]")
    col_ids, col_vecs, col_log_q = target_ids, target_vecs, target_log_q
    if sampled_ids is not None:
        n = sampled_ids.shape[0]
        if sampled_vecs is None or sampled_log_q is None or sampled_vecs.shape != (n, user.shape[1]) \
                or sampled_log_q.shape != (n,):
            raise InputError("sampled softmax: sampled_ids [N] needs sampled_vecs [N, D] and sampled_log_q [N]")
        col_ids = torch.cat([target_ids, sampled_ids])
        col_vecs = torch.cat([target_vecs, sampled_vecs])
        col_log_q = torch.cat([target_log_q, sampled_log_q])
    logits = user @ col_vecs.T / temperature - col_log_q  # [B, B + N]
    own = torch.arange(b, device=user.device)
    hit = col_ids.unsqueeze(0) == target_ids.unsqueeze(1)  # [B, B + N]
    hit[own, own] = False  # the positive itself stays
    logits = logits.masked_fill(hit, float("-inf"))
    return torch.logsumexp(logits, dim=1) - logits[own, own]


def deduplicated_sampled_softmax_loss(user: torch.Tensor, target_ids: torch.Tensor, item_vecs: torch.Tensor,
                                      target_log_q: torch.Tensor, sampled_ids: torch.Tensor | None = None,
                                      sampled_log_q: torch.Tensor | None = None, temperature: float = 1.0
                                      ) -> torch.Tensor:
    """Per-row loss ``[B]`` equal to :func:`sampled_softmax_loss` with ``target_vecs = item_vecs[target_ids]`` and
    ``sampled_vecs = item_vecs[sampled_ids]``, computed over ``U`` distinct in-batch items instead of ``B`` columns.

    With one target per history position, ``B`` (tens of thousands of positions) is far above the number of
    distinct items among them, and the ``[B, B + N]`` logits and hit mask dominate the step. The ``c_u`` columns
    of item ``u`` have one logit per row, so they are one column with ``log c_u`` added; for a row whose target
    is ``u`` the other copies are accidental hits, so its own column counts once. Exact when ``target_log_q``
    is a function of the item (the stream frequency the trainer passes is); otherwise the materialised form.
    ``item_vecs [I, D]``; logits ``[B, U + N]``.
    """
    uniq, inverse, counts = torch.unique(target_ids, return_inverse=True, return_counts=True)
    b, u = target_ids.shape[0], uniq.shape[0]
    first = torch.full((u,), b, dtype=torch.int64, device=user.device).scatter_reduce_(
        0, inverse, torch.arange(b, device=user.device), reduce="amin")
    uniq_log_q = target_log_q[first]
    if not torch.equal(uniq_log_q[inverse], target_log_q):  # a per-row log q: columns of one item differ
        return sampled_softmax_loss(user, target_ids, item_vecs[target_ids], target_log_q, sampled_ids,
                                    None if sampled_ids is None else item_vecs[sampled_ids], sampled_log_q,
                                    temperature)
    logits = user @ item_vecs[uniq].T / temperature - uniq_log_q  # [B, U]
    own = torch.arange(b, device=user.device)
    positive = logits[own, inverse]
    weighted = logits + counts.to(logits.dtype).log()
    weighted[own, inverse] = positive  # the row's own item: its own column only, the other copies are hits
    if sampled_ids is not None:
        if sampled_log_q is None or sampled_log_q.shape != sampled_ids.shape:
            raise InputError("sampled softmax: sampled_ids [N] needs sampled_log_q [N]")
        sampled = user @ item_vecs[sampled_ids].T / temperature - sampled_log_q  # [B, N]
        sampled = sampled.masked_fill(sampled_ids.unsqueeze(0) == target_ids.unsqueeze(1), float("-inf"))
        weighted = torch.cat([weighted, sampled], dim=1)
    return torch.logsumexp(weighted, dim=1) - positive


def full_softmax_loss(user: torch.Tensor, target_ids: torch.Tensor, item_vecs: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """Per-row loss ``[B]`` over every catalog row: ``user [B, D]``, ``target_ids [B]`` in ``1..I-1``,
    ``item_vecs [I, D]`` (row 0 = padding, never a column)."""
    logits = (user @ item_vecs.T / temperature).clone()  # [B, I]
    logits[:, 0] = float("-inf")
    return torch.nn.functional.cross_entropy(logits, target_ids, reduction="none")


def uniform_negatives(num_items: int, n: int, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` item ids drawn uniformly with replacement from ``1..num_items-1`` and their ``log q [n]``
    (``log(n / (num_items - 1))``, the expected count of any item among the draws)."""
    if num_items < 2:
        raise InputError(f"uniform negatives need a catalog beyond the padding row, got {num_items} rows")
    ids = torch.randint(1, num_items, (n,), generator=generator, device=device)
    return ids, torch.full((n,), math.log(n / (num_items - 1)), device=device)


def retrieval_loss(user: torch.Tensor, target_ids: torch.Tensor, target_log_q: torch.Tensor,
                   item_vecs: torch.Tensor, cfg: RetrievalLossConfig,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean loss over the ``B`` rows: full softmax for a small catalog (``item_vecs [I, D]``,
    ``I <= cfg.full_softmax_max_items``), otherwise sampled softmax over the in-batch targets and
    ``cfg.num_negatives`` uniform draws."""
    num_items = item_vecs.shape[0]
    if target_ids.numel() and (int(target_ids.min()) < 1 or int(target_ids.max()) >= num_items):
        raise InputError(f"retrieval loss: target ids must be in [1, {num_items}), got "
                         f"[{int(target_ids.min())}, {int(target_ids.max())}]")
    if num_items <= cfg.full_softmax_max_items:
        return full_softmax_loss(user, target_ids, item_vecs, cfg.temperature).mean()
    sampled = sampled_log_q = None
    if cfg.num_negatives:
        sampled, sampled_log_q = uniform_negatives(num_items, cfg.num_negatives, generator, user.device)
    return deduplicated_sampled_softmax_loss(user, target_ids, item_vecs, target_log_q, sampled, sampled_log_q,
                                             cfg.temperature).mean()

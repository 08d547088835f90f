"""Residual k-means quantizer (RQ-KMeans): L levels of K codes, each level k-means on the previous residual.

``r_0 = x``; level l: ``c_l = argmin_k ||r_l - C_l[k]||``, ``r_{l+1} = r_l - C_l[c_l]``
(ALGORITHMS.md §3). Shapes: ``x [N, d]``, codebooks ``[L, K, d]``, codes ``[N, L]`` int64.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm import tqdm

from recsys.quant.kmeans import balanced_assign, kmeans, nearest, sq_dist


class RQKMeans:
    """Fit with :meth:`fit`; :meth:`encode` assigns codes to any vectors (greedy nearest per level)."""

    method = "rq_kmeans"

    def __init__(self, levels: int, codebook_size: int, iters: int = 25, balanced: bool = False, seed: int = 0) -> None:
        if levels < 1 or codebook_size < 1:
            raise ValueError(f"rq_kmeans needs levels >= 1 and codebook_size >= 1, got {levels}, {codebook_size}")
        self.levels, self.codebook_size, self.iters, self.balanced, self.seed = \
            levels, codebook_size, iters, balanced, seed
        self.codebooks: torch.Tensor | None = None

    @property
    def cardinality(self) -> list[int]:
        """Codes per column of ``encode``'s output."""
        return [self.codebook_size] * self.levels

    def fit(self, x: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """Fits the codebooks on ``x [N, d]``; returns the training codes ``[N, L]`` (balanced if configured).

        ``progress``: a tqdm bar over the levels x Lloyd iterations (a level that converges early jumps ahead).
        """
        gen = torch.Generator().manual_seed(self.seed)
        r = x.float()
        books, codes = [], []
        with tqdm(total=self.levels * self.iters, desc="rq_kmeans", unit="iter", disable=not progress,
                  leave=False) as bar:
            for lvl in range(self.levels):
                bar.set_postfix(level=f"{lvl + 1}/{self.levels}")
                res = kmeans(r, self.codebook_size, gen, iters=self.iters, balanced=self.balanced,
                             on_iter=bar.update)
                bar.update((lvl + 1) * self.iters - bar.n)
                books.append(res.centroids)
                codes.append(res.assign)
                r = r - res.centroids[res.assign]
        self.codebooks = torch.stack(books)  # [L, K, d]
        return torch.stack(codes, 1)

    def _books(self) -> torch.Tensor:
        if self.codebooks is None:
            raise RuntimeError("RQKMeans: call fit() (or from_state) before encode/decode")
        return self.codebooks

    def encode(self, x: torch.Tensor, balanced: bool = False) -> torch.Tensor:
        """``x [N, d]`` -> codes ``[N, L]`` (nearest code per level; ``balanced`` caps each code at ceil(N/K))."""
        r = x.float()
        out = []
        for book in self._books():
            c = balanced_assign(r, book, -(-r.shape[0] // len(book))) if balanced else nearest(r, book)
            out.append(c)
            r = r - book[c]
        return torch.stack(out, 1) if out else torch.zeros(x.shape[0], 0, dtype=torch.int64)

    def last_level_costs(self, x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """``[N, K]`` squared error of every last-level code given the first L-1 ``codes [N, L]`` of ``x [N, d]``."""
        books = self._books()
        r = x.float() - sum((books[lvl][codes[:, lvl]] for lvl in range(self.levels - 1)),
                            torch.zeros(x.shape[0], books.shape[-1]))
        return sq_dist(r, books[-1])

    def reconstructions(self, codes: torch.Tensor) -> list[torch.Tensor]:
        """``codes [N, L]`` -> the reconstruction after 1, 2, ..., L levels (each ``[N, d]``)."""
        books = self._books()
        acc = torch.zeros(codes.shape[0], books.shape[-1])
        out = []
        for lvl in range(self.levels):
            acc = acc + books[lvl][codes[:, lvl]]
            out.append(acc)
        return out

    def state(self) -> dict[str, Any]:
        return {"method": self.method, "levels": self.levels, "codebook_size": self.codebook_size,
                "codebooks": self._books().clone()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RQKMeans:
        q = cls(int(state["levels"]), int(state["codebook_size"]))
        q.codebooks = state["codebooks"].float()
        return q

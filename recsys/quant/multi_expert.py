"""Multi-expert parallel quantizer (STORE-style, ALGORITHMS.md §3).

E experts; expert e projects the item vector with its own matrix ``V_e [p, d]`` and
quantizes the projection in its own codebook ``C_e [K, p]`` -- in parallel, not residually --
giving E codes per item. The reconstruction is ``x_hat = sum_e V_e^T q_e``; the loss is

    ||x - x_hat||^2 + sum_e (||sg[z_e] - q_e||^2 + beta ||z_e - sg[q_e]||^2) + w_orth ||V V^T - I||_F^2

where ``V [E*p, d]`` stacks every expert's rows: the penalty makes each projection
orthonormal *and* the experts mutually orthogonal (diverse); it can reach 0 only when
``E * p <= d``. Shapes: ``x [N, d]``, ``z [N, E, p]``, codes ``[N, E]``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from recsys.quant.kmeans import kmeans, nearest, sq_dist


def orthogonality_penalty(v: torch.Tensor) -> torch.Tensor:
    """``||V V^T - I||_F^2`` of ``v [E, p, d]`` stacked to ``[E*p, d]``."""
    flat = v.reshape(-1, v.shape[-1])
    gram = flat @ flat.T
    return (gram - torch.eye(gram.shape[0], dtype=gram.dtype)).pow(2).sum()


class MultiExpertQuantizer(nn.Module):
    method = "multi_expert"

    def __init__(self, in_dim: int, experts: int, proj_dim: int, codebook_size: int) -> None:
        super().__init__()
        if min(in_dim, experts, proj_dim, codebook_size) < 1:
            raise ValueError("multi_expert sizes (in_dim, experts, proj_dim, codebook_size) must all be >= 1")
        self.dims = {"in_dim": in_dim, "experts": experts, "proj_dim": proj_dim, "codebook_size": codebook_size}
        self.v = nn.Parameter(torch.randn(experts, proj_dim, in_dim) / in_dim ** 0.5)
        self.codebooks = nn.Parameter(torch.zeros(experts, codebook_size, proj_dim))

    @property
    def cardinality(self) -> list[int]:
        return [self.dims["codebook_size"]] * self.dims["experts"]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("epd,nd->nep", self.v, x)  # [N, E, p]

    def assign(self, z: torch.Tensor) -> torch.Tensor:
        """``z [N, E, p]`` -> codes ``[N, E]``."""
        return torch.stack([nearest(z[:, e].detach(), self.codebooks[e].detach()) for e in range(z.shape[1])], 1)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.assign(self.project(x.float()))

    @torch.no_grad()
    def last_level_costs(self, x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """``[N, K]`` squared error of every code of the last expert for ``x [N, d]`` (experts are parallel:
        ``codes`` is not needed, it is taken for the common quantizer signature)."""
        return sq_dist(self.project(x.float())[:, -1], self.codebooks[-1])

    @torch.no_grad()
    def reconstructions(self, codes: torch.Tensor) -> list[torch.Tensor]:
        """``sum_{e' <= e} V_e'^T q_e'`` for e = 1..E, each ``[N, d]``."""
        acc = torch.zeros(codes.shape[0], self.dims["in_dim"])
        out = []
        for e in range(self.dims["experts"]):
            acc = acc + self.codebooks[e][codes[:, e]] @ self.v[e]
            out.append(acc.clone())
        return out

    def state(self) -> dict[str, Any]:
        return {"method": self.method, **self.dims, "weights": {k: v.detach().clone() for k, v in self.state_dict().items()}}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> MultiExpertQuantizer:
        m = cls(*(int(state[k]) for k in ("in_dim", "experts", "proj_dim", "codebook_size")))
        m.load_state_dict(state["weights"])
        return m.eval()


def train_multi_expert(model: MultiExpertQuantizer, x: torch.Tensor, *, epochs: int, batch_size: int, lr: float,
                       beta: float, orth_weight: float, seed: int, progress: bool = True) -> list[dict[str, float]]:
    """Trains ``model`` on ``x [N, d]``; codebooks start as per-expert k-means of the first batch's
    projections. Returns one loss record per epoch (including the orthogonality penalty)."""
    gen = torch.Generator().manual_seed(seed)
    x = x.float()
    history = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.no_grad():
            model.v.copy_(torch.randn(model.v.shape, generator=gen) / model.dims["in_dim"] ** 0.5)
            first = x[torch.randperm(len(x), generator=gen)[: max(batch_size, model.dims["codebook_size"])]]
            z = model.project(first)
            for e in range(model.dims["experts"]):
                model.codebooks[e].copy_(kmeans(z[:, e], model.dims["codebook_size"], gen, iters=10).centroids)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        bar = tqdm(range(epochs), desc="multi_expert", unit="epoch", disable=not progress, leave=False)
        for epoch in bar:
            sums = {"loss": 0.0, "recon": 0.0, "vq": 0.0, "orthogonality": 0.0}
            n = 0
            for idx in torch.randperm(len(x), generator=gen).split(batch_size):
                xb = x[idx]
                z = model.project(xb)  # [B, E, p]
                codes = model.assign(z)
                q = torch.stack([model.codebooks[e][codes[:, e]] for e in range(z.shape[1])], 1)  # [B, E, p]
                q_st = z + (q - z).detach()
                recon = (torch.einsum("nep,epd->nd", q_st, model.v) - xb).pow(2).sum(1).mean()
                vq = ((q - z.detach()).pow(2) + beta * (z - q.detach()).pow(2)).sum((1, 2)).mean()
                orth = orthogonality_penalty(model.v)
                loss = recon + vq + orth_weight * orth
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                for k, v in (("loss", loss), ("recon", recon), ("vq", vq), ("orthogonality", orth)):
                    sums[k] += float(v.detach())
                n += 1
            rec = {k: v / max(n, 1) for k, v in sums.items()}
            rec["epoch"] = epoch
            history.append(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", orth=f"{rec['orthogonality']:.4f}")
    model.eval()
    return history

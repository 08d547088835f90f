"""RQ-VAE: MLP encoder -> residual vector quantization (L codebooks) -> MLP decoder.

Loss per batch (ALGORITHMS.md §3)::

    ||x - dec(z_q)||^2 + sum_l ||sg[r_l] - e_l||^2 + beta * sum_l ||r_l - sg[e_l]||^2

with ``z = enc(x)``, ``r_0 = z``, ``e_l = C_l[argmin_k ||r_l - C_l[k]||]``, ``r_{l+1} = r_l - e_l``
and the straight-through ``z_q = z + sg(sum_l e_l - z)``. Codebooks start as k-means of the
first batch's residuals; a code unused during an epoch is re-seeded with a random residual
of the last batch. Shapes: ``x [N, d]``, ``z [N, Dz]``, codebooks ``[L, K, Dz]``, codes ``[N, L]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from recsys.quant.kmeans import kmeans, nearest, sq_dist


def _mlp(i: int, h: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h), nn.SiLU(), nn.Linear(h, o))


@dataclass
class VQOut:
    z_q: torch.Tensor
    """[N, Dz] straight-through quantized latent."""
    codes: torch.Tensor
    """[N, L] int64."""
    codebook_loss: torch.Tensor
    commit_loss: torch.Tensor
    residuals: list[torch.Tensor]
    """Per level the residual it quantized, each [N, Dz] (detached)."""


class RQVAE(nn.Module):
    method = "rq_vae"

    def __init__(self, in_dim: int, hidden: int, code_dim: int, levels: int, codebook_size: int) -> None:
        super().__init__()
        if min(in_dim, hidden, code_dim, levels, codebook_size) < 1:
            raise ValueError("rq_vae sizes (in_dim, hidden, code_dim, levels, codebook_size) must all be >= 1")
        self.dims = {"in_dim": in_dim, "hidden": hidden, "code_dim": code_dim, "levels": levels,
                     "codebook_size": codebook_size}
        self.encoder = _mlp(in_dim, hidden, code_dim)
        self.decoder = _mlp(code_dim, hidden, in_dim)
        self.codebooks = nn.Parameter(torch.randn(levels, codebook_size, code_dim) * 0.1)

    @property
    def cardinality(self) -> list[int]:
        return [self.dims["codebook_size"]] * self.dims["levels"]

    def quantize(self, z: torch.Tensor) -> VQOut:
        r = z
        total = torch.zeros_like(z)
        codes, residuals = [], []
        cb_loss = commit = z.new_zeros(())
        for book in self.codebooks:
            c = nearest(r.detach(), book.detach())
            e = book[c]
            cb_loss = cb_loss + (e - r.detach()).pow(2).sum(1).mean()
            commit = commit + (r - e.detach()).pow(2).sum(1).mean()
            residuals.append(r.detach())
            codes.append(c)
            total = total + e
            r = r - e.detach()
        z_q = z + (total - z).detach()
        return VQOut(z_q, torch.stack(codes, 1), cb_loss, commit, residuals)

    @torch.no_grad()
    def init_codebooks(self, x: torch.Tensor, gen: torch.Generator) -> None:
        """k-means of the residuals of the batch ``x [B, d]``, level by level."""
        r = self.encoder(x)
        for lvl in range(self.dims["levels"]):
            res = kmeans(r, self.dims["codebook_size"], gen, iters=10)
            self.codebooks[lvl].copy_(res.centroids)
            r = r - res.centroids[res.assign]

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x [N, d]`` -> codes ``[N, L]``."""
        return self.quantize(self.encoder(x.float())).codes

    @torch.no_grad()
    def last_level_costs(self, x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """``[N, K]`` latent squared error of every last-level code given the first L-1 ``codes [N, L]``."""
        r = self.encoder(x.float())
        for lvl in range(self.dims["levels"] - 1):
            r = r - self.codebooks[lvl][codes[:, lvl]]
        return sq_dist(r, self.codebooks[-1])

    @torch.no_grad()
    def reconstructions(self, codes: torch.Tensor) -> list[torch.Tensor]:
        """Decoded partial sums of the first 1..L code vectors, each ``[N, d]``."""
        acc = torch.zeros(codes.shape[0], self.dims["code_dim"])
        out = []
        for lvl in range(self.dims["levels"]):
            acc = acc + self.codebooks[lvl][codes[:, lvl]]
            out.append(self.decoder(acc))
        return out

    def state(self) -> dict[str, Any]:
        return {"method": self.method, **self.dims, "weights": {k: v.detach().clone() for k, v in self.state_dict().items()}}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RQVAE:
        m = cls(*(int(state[k]) for k in ("in_dim", "hidden", "code_dim", "levels", "codebook_size")))
        m.load_state_dict(state["weights"])
        return m.eval()


def train_rqvae(model: RQVAE, x: torch.Tensor, *, epochs: int, batch_size: int, lr: float, beta: float,
                seed: int, progress: bool = True) -> list[dict[str, float]]:
    """Trains ``model`` on ``x [N, d]``; returns one loss record per epoch (also printed).

    Deterministic for a seed (its own generator for init, shuffling and re-seeding; the
    global torch RNG is forked, so the caller's stream is untouched).
    """
    gen = torch.Generator().manual_seed(seed)
    x = x.float()
    history = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for mod in model.modules():  # re-initialise from the seed so the seed alone decides the result
            if isinstance(mod, nn.Linear):
                mod.reset_parameters()
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        first = x[torch.randperm(len(x), generator=gen)[: max(batch_size, model.dims["codebook_size"])]]
        model.init_codebooks(first, gen)
        bar = tqdm(range(epochs), desc="rq_vae", unit="epoch", disable=not progress, leave=False)
        for epoch in bar:
            used = torch.zeros(model.dims["levels"], model.dims["codebook_size"], dtype=torch.bool)
            sums = {"loss": 0.0, "recon": 0.0, "codebook": 0.0, "commit": 0.0}
            n_batches = 0
            last: VQOut | None = None
            for idx in torch.randperm(len(x), generator=gen).split(batch_size):
                xb = x[idx]
                out = model.quantize(model.encoder(xb))
                recon = (model.decoder(out.z_q) - xb).pow(2).sum(1).mean()
                loss = recon + out.codebook_loss + beta * out.commit_loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                for lvl in range(model.dims["levels"]):
                    used[lvl, out.codes[:, lvl]] = True
                for k, v in (("loss", loss), ("recon", recon), ("codebook", out.codebook_loss),
                             ("commit", out.commit_loss)):
                    sums[k] += float(v.detach())
                n_batches += 1
                last = out
            reseeded = 0
            if last is not None and epoch < epochs - 1:  # dead codes: re-seed from the last batch's residuals
                with torch.no_grad():
                    for lvl in range(model.dims["levels"]):
                        dead = torch.nonzero(~used[lvl]).flatten()
                        if len(dead):
                            pool = last.residuals[lvl]
                            pick = torch.randint(len(pool), (len(dead),), generator=gen)
                            model.codebooks[lvl, dead] = pool[pick]
                            reseeded += len(dead)
            rec = {k: v / max(n_batches, 1) for k, v in sums.items()}
            rec.update(epoch=epoch, dead_codes_reseeded=reseeded,
                       utilisation=float(used.float().mean()))
            history.append(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", recon=f"{rec['recon']:.4f}")
    model.eval()
    return history

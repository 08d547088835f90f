"""VQ memory: exact attention when every key is its own code; O(1) append == rebuild; fixed state size."""

from __future__ import annotations

import pytest
import torch

from recsys.longseq.memory import VQMemory, exact_attention


def make_memory(in_dim: int = 6, key_dim: int = 4, value_dim: int = 5, m: int = 16, seed: int = 0) -> VQMemory:
    torch.manual_seed(seed)
    return VQMemory(in_dim, key_dim, value_dim, m).eval()


def distinct_feats(n_distinct: int, n: int, in_dim: int = 6, seed: int = 0) -> torch.Tensor:
    """``n`` events drawn (with repeats) from ``n_distinct`` distinct feature rows."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(n_distinct, in_dim, generator=g)
    return table[torch.randint(0, n_distinct, (n,), generator=g)]


def own_codes(mem: VQMemory, feats: torch.Tensor) -> None:
    """Codebook := the distinct keys of ``feats``, repeated to fill M (a repeat is never the first
    argmax): every key is its own codeword."""
    with torch.no_grad():
        keys = torch.unique(mem.keys(feats), dim=0)
        mem.codebook.copy_(keys[torch.arange(mem.codebook_size) % keys.shape[0]])


@pytest.mark.parametrize("lengths,n_cand", [
    ([0], [1]),             # empty memory, one query
    ([1], [3]),             # one event
    ([40, 0, 7], [1, 4, 9]),  # several users, repeats of the same key, an empty user
])
def test_memory_read_equals_exact_attention_when_every_key_is_its_own_code(lengths, n_cand):
    mem = make_memory(m=16)
    g = torch.Generator().manual_seed(1)
    pool = distinct_feats(10, 10)  # 10 distinct events (<= M), drawn with repeats by every user
    feats = [pool[torch.randint(0, 10, (n,), generator=g)] for n in lengths]
    all_feats = torch.cat(feats)
    own_codes(mem, pool)
    owner = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    with torch.no_grad():
        state = mem.build(all_feats, owner, len(lengths))
        q = torch.randn(sum(n_cand), 4, generator=g)
        owner_c = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(n_cand))
        out, lse = mem.read(q, state, owner_c)
        c0 = 0
        for b, f in enumerate(feats):
            ref_out, ref_lse = exact_attention(q[c0:c0 + n_cand[b]], mem.keys(f), mem.value(f), mem.scale)
            torch.testing.assert_close(out[c0:c0 + n_cand[b]], ref_out, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(lse[c0:c0 + n_cand[b]], ref_lse, rtol=1e-5, atol=1e-5)
            c0 += n_cand[b]


def test_memory_with_fewer_codes_is_attention_over_codewords():
    """M < distinct keys: the read equals exact attention with each key replaced by its codeword."""
    mem = make_memory(m=3)
    feats = distinct_feats(20, 50)
    with torch.no_grad():
        codes = mem.assign(mem.keys(feats))
        state = mem.build(feats, torch.zeros(50, dtype=torch.int64), 1)
        q = torch.randn(5, 4)
        out, lse = mem.read(q, state, torch.zeros(5, dtype=torch.int64))
        ref_out, ref_lse = exact_attention(q, mem.codewords()[codes], mem.value(feats), mem.scale)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    # nearest codeword, checked the slow way
    assert torch.equal(codes, torch.cdist(mem.keys(feats), mem.codewords()).argmin(-1))


@pytest.mark.parametrize("n0,steps", [(0, 1), (0, 30), (25, 1), (25, 17)])
def test_append_equals_recomputation(n0, steps):
    mem = make_memory(m=8)
    feats = torch.randn(n0 + steps, 6)
    with torch.no_grad():
        state = mem.build(feats[:n0], torch.zeros(n0, dtype=torch.int64), 1) if n0 else mem.empty_state()
        for i in range(n0, n0 + steps):  # one event at a time
            state = mem.append(state, feats[i:i + 1])
        full = mem.build(feats, torch.zeros(n0 + steps, dtype=torch.int64), 1)
    torch.testing.assert_close(state.sums, full.sums, rtol=1e-5, atol=1e-5)
    assert torch.equal(state.counts, full.counts)
    assert float(state.counts.sum()) == n0 + steps


def test_state_size_does_not_grow_with_history():
    mem = make_memory(m=16)
    sizes = []
    with torch.no_grad():
        for n in (1, 100, 20_000):
            state = mem.build(torch.randn(n, 6), torch.zeros(n, dtype=torch.int64), 1)
            state = mem.append(state, torch.randn(3, 6))
            sizes.append(state.nbytes)
    assert sizes[0] == sizes[1] == sizes[2] == 16 * (5 + 1) * 4  # M x (Dv + 1) fp32


def test_training_straight_through_keeps_values_and_reaches_keys():
    mem = make_memory(m=4).train()
    feats = torch.randn(30, 6)
    owner = torch.zeros(30, dtype=torch.int64)
    q = torch.randn(2, 4)
    state = mem.build(feats, owner, 1)
    assert state.key_sums is not None
    out, lse = mem.read(q, state, torch.zeros(2, dtype=torch.int64))
    (out.sum() + lse.sum()).backward()
    assert mem.key.weight.grad is not None and mem.key.weight.grad.abs().sum() > 0
    with torch.no_grad():
        out_eval, lse_eval = mem.eval().read(q, mem.build(feats, owner, 1), torch.zeros(2, dtype=torch.int64))
    torch.testing.assert_close(out, out_eval)
    torch.testing.assert_close(lse, lse_eval)


def test_append_rejects_a_batch_of_states():
    mem = make_memory()
    with torch.no_grad():
        state = mem.build(torch.randn(4, 6), torch.tensor([0, 0, 1, 1]), 2)
    with pytest.raises(ValueError, match="one user"):
        mem.append(state, torch.randn(1, 6))

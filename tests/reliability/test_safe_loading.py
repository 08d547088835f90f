"""Safe loading: pickled code payloads are refused (not executed), corrupt / torn checkpoints are never used,
and a checkpoint of another model names the mismatching keys and shapes."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from recsys.quant.artifact import SemanticIds
from recsys.reliability.checkpoint import (
    CheckpointError,
    CheckpointManager,
    load_checkpoint,
    load_model_state,
)
from recsys.reliability.faults import parse_fault


class Payload:
    """Unpickling this calls ``open(marker, "w")``: creates the marker file (a stand-in for any code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def good_state(step: int) -> dict:
    torch.manual_seed(step)
    return {"model": {"w": torch.randn(4, 3), "b": torch.zeros(3)}, "step": step, "config": {"name": "x"}}


def write_malicious(path: Path, marker: Path) -> None:
    torch.save({"model": {"w": torch.zeros(1)}, "step": 99, "evil": Payload(marker)}, path)


def test_payload_is_live_when_unpickled_unsafely(tmp_path):
    """The control: the same file *does* run code under weights_only=False, so the refusal below is real."""
    marker = tmp_path / "pwned"
    write_malicious(tmp_path / "evil.pt", marker)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def test_malicious_checkpoint_is_refused_and_resume_falls_back(tmp_path, capsys):
    marker = tmp_path / "pwned"
    mgr = CheckpointManager(tmp_path / "ckpt", keep=5)
    mgr.save(3, good_state(3))
    write_malicious(mgr.dir / "step_7.pt", marker)  # newest, no digest sidecar (a foreign file)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint(mgr.dir / "step_7.pt")
    path, state = mgr.load_latest()
    assert path.name == "step_3.pt" and state["step"] == 3
    assert "skipping unusable" in capsys.readouterr().out
    assert not marker.exists()


def test_malicious_sid_artifact_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    write_malicious(tmp_path / "sids.pt", marker)
    with pytest.raises(pickle.UnpicklingError):
        SemanticIds.load(tmp_path / "sids.pt")
    assert not marker.exists()


def test_bit_flip_is_caught_by_the_digest(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=3)
    mgr.save(1, good_state(1))
    p2 = mgr.save(2, good_state(2))
    raw = bytearray(p2.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # inside tensor bytes: torch.load alone would load this silently
    p2.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupt: SHA-256"):
        load_checkpoint(p2)
    path, state = mgr.load_latest()
    assert path.name == "step_1.pt" and torch.equal(state["model"]["w"], good_state(1)["model"]["w"])


def test_torn_final_file_and_stale_temps(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=3)
    mgr.save(1, good_state(1))
    p2 = mgr.save(2, good_state(2))
    p2.with_name(p2.name + ".sha256").unlink()  # e.g. written by an older version: no digest
    p2.write_bytes(p2.read_bytes()[: p2.stat().st_size // 2])
    stale = tmp_path / ".step_3.pt.tmp-999999"
    stale.write_bytes(b"half")
    path, _ = mgr.load_latest()
    assert path.name == "step_1.pt" and not stale.exists()


def test_keep_prunes_checkpoints_and_digests(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    for s in (1, 2, 3, 4):
        mgr.save(s, good_state(s))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_3.pt", "step_3.pt.sha256", "step_4.pt",
                                                          "step_4.pt.sha256"]
    assert load_checkpoint(tmp_path / "step_4.pt")["step"] == 4


def test_other_model_config_names_keys_and_shapes():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    state = {"0.weight": torch.zeros(4, 5), "0.bias": torch.zeros(4), "2.weight": torch.zeros(2, 4)}
    with pytest.raises(ValueError) as e:
        load_model_state(model, state, "ckpt.pt")
    msg = str(e.value)
    assert "ckpt.pt" in msg and "missing keys (2): ['1.bias', '1.weight']" in msg
    assert "unexpected keys (1): ['2.weight']" in msg
    assert "0.weight: checkpoint (4, 5) vs model (4, 3)" in msg
    load_model_state(model, model.state_dict(), "self")  # a matching state loads


def test_fault_spec_errors_name_the_problem():
    assert parse_fault("checkpoint.mid_write@3") == ("checkpoint.mid_write", 3)
    with pytest.raises(ValueError, match="unknown fault point 'nope'"):
        parse_fault("nope")
    with pytest.raises(ValueError, match="must be an integer"):
        parse_fault("checkpoint.mid_write@x")

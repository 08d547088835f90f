"""The device a job runs on: one setting (``auto`` / ``cpu`` / ``cuda``) shared by training, scoring and
evaluation, refused clearly when CUDA is asked for and absent."""
from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING

from recsys.errors import InputError

if TYPE_CHECKING:
    import torch


class Device(str, Enum):
    auto = "auto"  # CUDA when this machine has it, else CPU
    cpu = "cpu"
    cuda = "cuda"


def resolve_device(choice: Device | str, key: str = "device") -> torch.device:
    """The ``torch.device`` for a ``device`` setting; ``key`` names the setting in the error."""
    import torch  # here, not at module level: config modules import ``Device`` before torch is needed

    choice = Device(getattr(choice, "value", choice))
    if choice == Device.cuda and not torch.cuda.is_available():
        raise InputError(f"{key}=cuda but no CUDA device is available; use {key}=cpu or {key}=auto")
    if choice == Device.auto:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice.value)

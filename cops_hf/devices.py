"""Where and in which precision inference runs: the `--device` / `--dtype` pair shared by the CLI and the app.

The names are checked here, with one-line errors that say what to pass instead, so that a missing GPU never
surfaces as a torch traceback. torch is imported only when a device or dtype is resolved.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("fp32", "bf16", "fp16")
"""The `--dtype` choices: float32, bfloat16, float16."""


def resolve_dtype(name: str | None) -> torch.dtype:
    """The torch dtype of a `DTYPE_NAMES` entry (`None` means fp32)."""
    import torch

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name is None:
        return torch.float32
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPE_NAMES)}")
    return dtypes[name]


def resolve_device(name: str | None) -> torch.device:
    """The torch device called `name` ("cpu", "cuda", "cuda:1", "mps"), checked to exist on this machine.

    `None` picks the first CUDA GPU when there is one, else the CPU.

    Raises:
        ValueError: an unknown name, or a GPU this machine does not have (one line, saying what to use).
    """
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            reason = (
                f"this torch build ({torch.__version__}) has no CUDA support"
                if torch.version.cuda is None
                else "no CUDA GPU is visible"
            )
            raise ValueError(f"--device {name}: {reason}; use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name}: only {count} CUDA GPU(s) visible (cuda:0..cuda:{count - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {name!r}; use cpu, cuda or cuda:N")
    return device


__all__ = ["DTYPE_NAMES", "resolve_device", "resolve_dtype"]

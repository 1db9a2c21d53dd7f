"""Device and dtype resolution: the one place ``"auto"`` is turned into something concrete.

``resolve_device("auto")`` is ``cuda`` when a GPU is visible (the current device under
``torch.distributed``), else ``cpu``; other names pass through. ``resolve_dtype("auto", device)``
is float32 on a CPU and, on CUDA, the model's own half precision: float16 for checkpoints in the
official layout (the released model ran fp16 weights under fp16 autocast), bfloat16 for the rest
(``model.checkpoint.native_cuda_dtype``).
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> a visible GPU or the CPU; ``"cpu"``, ``"cuda"``, ``"cuda:N"`` as given."""
    if isinstance(name, torch.device):
        return name
    if name != "auto":
        try:
            return torch.device(name)
        except RuntimeError:
            raise ValueError(f"device {name!r} is not understood; expected auto, cpu, cuda or cuda:N") from None
    if not torch.cuda.is_available():
        return torch.device("cpu")
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cuda")


def resolve_dtype(name: str | torch.dtype = "auto", device: str | torch.device = "cpu",
                  cuda_default: torch.dtype = torch.bfloat16) -> torch.dtype:
    """``"auto"`` -> ``cuda_default`` on CUDA, float32 elsewhere; else one of :data:`DTYPES`."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return cuda_default if resolve_device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not understood; expected auto or one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")

"""Array backends for k-center greedy: NumPy on CPU; CuPy on a CUDA GPU (optional extra `gpu`), else torch on CUDA.

The greedy loops in `tasks.selection.greedy` are written once against the small `Backend` interface;
each backend spells its few operations in its own library.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

Array = Any  # numpy.ndarray, cupy.ndarray or torch.Tensor, depending on the backend


class Backend(Protocol):
    """The few array operations whose spelling differs between NumPy, CuPy and torch."""

    name: str
    is_gpu: bool
    check_every: int  # greedy steps between host-side stop checks
    has_bfloat16: bool

    def from_host(self, a: np.ndarray, dtype: str = "float32") -> Array: ...
    def to_host(self, a: Array) -> np.ndarray: ...
    def empty(self, n: int, dtype: str) -> Array: ...
    def full(self, n: int, value: float) -> Array: ...
    def f32(self, a: Array) -> Array: ...
    def index(self, values: list[int] | np.ndarray) -> Array: ...
    def argmax(self, v: Array) -> Array: ...  # shape (1,), first maximum, stays on device
    def matvec(self, m: Array, v: Array, out: Array) -> None: ...
    def minimum(self, a: Array, b: Array) -> None: ...  # a = min(a, b) in place
    def rowmin(self, m: Array) -> Array: ...
    def row_smallest(self, m: Array, k: int) -> Array: ...  # each row's k smallest values, in no order
    def nonzero(self, mask: Array) -> tuple[Array, Array]: ...
    def free_bytes(self) -> int: ...
    def matmul_eps(self) -> float: ...  # extra relative error of reduced-precision GEMM modes


def _host_free_bytes() -> int:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ArrayModuleBackend:
    """NumPy or CuPy: both follow the NumPy API, so one class serves both."""

    xp: Any
    name: str = "numpy"
    is_gpu: bool = False
    check_every: int = 64
    has_bfloat16: bool = False

    def from_host(self, a: np.ndarray, dtype: str = "float32") -> Array:
        # Converted on the host so that only the storage dtype crosses to a GPU; a float32
        # C-contiguous input is not copied: the CPU path reads (never writes) the caller's matrix.
        return self.xp.asarray(np.ascontiguousarray(a, dtype=dtype))

    def to_host(self, a: Array) -> np.ndarray:
        return a if self.xp is np else self.xp.asnumpy(a)

    def empty(self, n: int, dtype: str) -> Array:
        return self.xp.empty(n, dtype=dtype)

    def full(self, n: int, value: float) -> Array:
        return self.xp.full(n, value, dtype=np.float32)

    def f32(self, a: Array) -> Array:
        return a.astype(np.float32, copy=False)

    def index(self, values: list[int] | np.ndarray) -> Array:
        return self.xp.asarray(np.asarray(values, dtype=np.int64))

    def argmax(self, v: Array) -> Array:
        return self.xp.reshape(v.argmax(), (1,))

    def matvec(self, m: Array, v: Array, out: Array) -> None:
        if m.dtype == out.dtype:
            self.xp.matmul(m, v, out=out)
        else:
            out[...] = m @ v

    def minimum(self, a: Array, b: Array) -> None:
        self.xp.minimum(a, b, out=a)

    def rowmin(self, m: Array) -> Array:
        return m.min(axis=1)

    def nonzero(self, mask: Array) -> tuple[Array, Array]:
        return self.xp.nonzero(mask)

    def row_smallest(self, m: Array, k: int) -> Array:
        return self.xp.partition(m, k - 1, axis=1)[:, :k]

    def free_bytes(self) -> int:
        if self.is_gpu:
            return int(self.xp.cuda.runtime.memGetInfo()[0])
        return _host_free_bytes()

    def matmul_eps(self) -> float:
        # CuPy opts into TF32 (10 mantissa bits) only through this environment variable.
        return 2.0**-10 if self.is_gpu and os.environ.get("CUPY_TF32") == "1" else 0.0


@dataclass(frozen=True)
class TorchBackend:
    """torch on any device: the GPU fallback without CuPy, and on CPU the GPU loop's test bed."""

    device: str = "cuda"
    name: str = "torch"
    check_every: int = 64
    has_bfloat16: bool = True

    @property
    def is_gpu(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def _torch(self) -> Any:
        import torch

        return torch

    def from_host(self, a: np.ndarray, dtype: str = "float32") -> Array:
        torch = self._torch
        host = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
        # Cast before the transfer: the device never holds a float32 copy of a half matrix.
        return host.to(getattr(torch, dtype)).to(self.device)

    def to_host(self, a: Array) -> np.ndarray:
        return a.cpu().numpy()

    def empty(self, n: int, dtype: str) -> Array:
        torch = self._torch
        return torch.empty(n, dtype=getattr(torch, dtype), device=self.device)

    def full(self, n: int, value: float) -> Array:
        torch = self._torch
        return torch.full((n,), value, dtype=torch.float32, device=self.device)

    def f32(self, a: Array) -> Array:
        return a.float()

    def index(self, values: list[int] | np.ndarray) -> Array:
        torch = self._torch
        return torch.as_tensor(np.asarray(values, dtype=np.int64), device=self.device)

    def argmax(self, v: Array) -> Array:
        return v.argmax().view(1)  # documented: the first of equal maxima

    def matvec(self, m: Array, v: Array, out: Array) -> None:
        torch = self._torch
        if m.dtype == out.dtype:
            torch.mv(m, v, out=out)
        else:
            # Half-precision storage: cuBLAS accumulates in float32, the N-vector is rounded once.
            out.copy_(torch.mv(m, v))

    def minimum(self, a: Array, b: Array) -> None:
        self._torch.minimum(a, b, out=a)

    def rowmin(self, m: Array) -> Array:
        return m.amin(dim=1)

    def nonzero(self, mask: Array) -> tuple[Array, Array]:
        rows, cols = mask.nonzero(as_tuple=True)
        return rows, cols

    def row_smallest(self, m: Array, k: int) -> Array:
        return m.topk(k, dim=1, largest=False, sorted=False).values

    def free_bytes(self) -> int:
        if self.is_gpu:
            return int(self._torch.cuda.mem_get_info(self.device)[0])
        return _host_free_bytes()

    def matmul_eps(self) -> float:
        # TF32 (precision "high"/"medium") rounds GEMM inputs to 10 mantissa bits.
        return 2.0**-10 if self._torch.get_float32_matmul_precision() != "highest" else 0.0


# An NVIDIA driver's control device (Linux), or the GPU paravirtualisation device of WSL 2.
DRIVER_DEVICES = ("/dev/nvidiactl", "/dev/dxg")


def nvidia_driver_present() -> bool:
    """Whether this machine has an NVIDIA driver: without one no CUDA GPU can be visible, and
    'auto' need not import torch (2 s in the flow's process) to find that out."""
    return any(os.path.exists(path) for path in DRIVER_DEVICES)


def _cupy_backend() -> ArrayModuleBackend | None:
    try:
        import cupy
    except ImportError:
        return None
    try:
        if cupy.cuda.runtime.getDeviceCount() == 0:
            return None
    except cupy.cuda.runtime.CUDARuntimeError:
        return None
    return ArrayModuleBackend(cupy, name="cupy", is_gpu=True)


def _torch_cuda_backend() -> TorchBackend | None:
    try:
        import torch
    except ImportError:
        return None
    return TorchBackend("cuda") if torch.cuda.is_available() else None


def resolve_backend(device: str = "auto") -> Backend:
    """'cpu' -> NumPy; 'cuda' -> CuPy, else torch on CUDA; 'auto' -> 'cuda' when a GPU is seen."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda'; got {device!r}")
    if device == "cuda" or (device == "auto" and nvidia_driver_present()):
        gpu = _cupy_backend() or _torch_cuda_backend()
        if gpu is not None:
            return gpu
        if device == "cuda":
            raise RuntimeError(
                "device='cuda' was requested but no CUDA GPU is visible to CuPy or torch; "
                "use device='cpu' (or 'auto'), or install the 'gpu' extra on a GPU machine"
            )
    return ArrayModuleBackend(np)

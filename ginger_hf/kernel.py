"""The C++ CPU kernel of the two streaming passes: built once with the system compiler, loaded with ctypes.

``_cpu_kernel.cpp`` is plain C++17 with no torch headers, compiled with ``-O3 -march=native``
into ``~/.cache/ginger_hf`` (or ``$GINGER_HF_CACHE``) the first time it is needed (30-45 s;
``scripts/setup.sh`` does it ahead). ``GINGER_HF_KERNEL=0`` turns it off; without a
compiler the eager torch passes run instead. One call per pass covers every block of a
dtype pair, split over ``torch.get_num_threads()`` threads. Any rank works.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["available", "applies", "why_not", "pass1", "pass2", "solve_refresh", "solve_keep"]

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_SOURCE = Path(__file__).with_name("_cpu_kernel.cpp")
# Below this many elements in a call, one thread does the whole pass.
_SERIAL_ELEMENTS = 1 << 16
_STATS = ("gram", "uc", "um", "cc", "cm", "mm", "gg")  # the order the kernel's StatsView reads
_COEFS = ("scale", "along", "lr", "decay", "rho", "v_c", "shrink", "shift", "v_u")  # ... and its CoefView
_lib = None
_tried = False
_lock = threading.Lock()


def _cache_dir() -> Path:
    root = os.environ.get("GINGER_HF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "ginger_hf"
    )
    return Path(root)


def _build() -> ctypes.CDLL | None:
    """Compile ``_cpu_kernel.cpp`` once per source/compiler/CPU and load it; ``None`` if impossible."""
    if os.environ.get("GINGER_HF_KERNEL", "1") == "0" or not _SOURCE.exists():
        return None
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        return None
    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-pthread"]
    flags.append("-march=native" if platform.machine() in ("x86_64", "AMD64") else "-mcpu=native")
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    cpu = ""
    try:
        cpu = next((line for line in open("/proc/cpuinfo") if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    key = hashlib.sha256("\0".join([_SOURCE.read_text(), cxx, version, " ".join(flags), cpu]).encode()).hexdigest()[:16]
    lib = _cache_dir() / f"ginger_cpu_{key}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
        os.close(fd)
        try:
            proc = subprocess.run([cxx, *flags, str(_SOURCE), "-o", tmp], capture_output=True, text=True)
            if proc.returncode != 0:
                warnings.warn(f"ginger_hf: could not build the CPU kernel, using the torch path:\n{proc.stderr[-2000:]}")
                return None
            os.replace(tmp, lib)  # atomic: concurrent builders (e.g. DDP ranks) do not clash
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    dll = ctypes.CDLL(str(lib))
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    dll.ginger_pass1.argtypes = [i, i, i, i, p, p, f, p, p, i]
    dll.ginger_pass2.argtypes = [i, i, i, i, p, p, f, p, p, i, p]
    dll.ginger_max_rank.restype = i
    dll.ginger_solve_refresh.argtypes = [i, i, p, p, p, p, p, p, p, ctypes.c_int64, p, i]
    dll.ginger_solve_keep.argtypes = [i, i, p, p, p, p, p, p, p, ctypes.c_int64, p]
    return dll


def _get() -> ctypes.CDLL | None:
    global _lib, _tried
    if not _tried:
        with _lock:
            if not _tried:
                try:
                    _lib = _build()
                except Exception as exc:  # a broken toolchain must not break training
                    warnings.warn(f"ginger_hf: CPU kernel unavailable ({exc!r}); using the torch path")
                    _lib = None
                _tried = True
    return _lib


def available() -> bool:
    """Whether the compiled CPU kernel is in use (builds it on first call)."""
    return _get() is not None


def why_not(p: Tensor, m: Tensor, U: Tensor, g: Tensor, c: Tensor | None) -> str | None:
    """Why the kernel cannot run this tensor's passes, or ``None`` if it can."""
    lib = _get()
    if lib is None:
        return "no C++ CPU kernel (no compiler found, or GINGER_HF_KERNEL=0)"
    if p.device.type != "cpu":
        return f"the C++ kernel runs on CPU only, not {p.device.type}"
    if m.dtype not in _DTYPES or U.dtype != m.dtype or p.dtype not in _DTYPES or g.dtype != p.dtype or (
            c is not None and c.dtype != p.dtype):
        return f"the C++ kernel takes float32/bfloat16, not parameters {p.dtype} with state {m.dtype}"
    if not all(t.is_contiguous() for t in (p, m, U)):
        return "the C++ kernel needs contiguous tensors"
    if U.shape[0] > lib.ginger_max_rank():
        return f"the C++ kernel takes ranks up to {lib.ginger_max_rank()}, not {U.shape[0]}"
    return None


def applies(p: Tensor, m: Tensor, U: Tensor, g: Tensor, c: Tensor | None) -> bool:
    """Whether the kernel can run this tensor's passes (CPU, float32/bfloat16, contiguous, rank <= 64)."""
    return why_not(p, m, U, g, c) is None


def _blocks(jobs, refresh: list[bool]) -> tuple[Tensor, Tensor, int]:
    """Per-block ``(k, refresh, ustride)`` rows of every job's tensor (built at once), and a thread count."""
    views = [job[0] for job in jobs]
    counts = torch.tensor([t.B for t in views])
    per_tensor = torch.tensor([[t.k, int(r), t.B * t.k] for t, r in zip(views, refresh)], dtype=torch.int64)
    blocks = per_tensor.repeat_interleave(counts, dim=0)
    work = sum(t.B * t.k for t in views)
    return blocks, work, 1 if work < _SERIAL_ELEMENTS else torch.get_num_threads()


def _pointers(jobs, columns) -> Tensor:
    """Per-block data pointers: ``columns`` are functions of a job's tensor view (``None``: 0). Built at once:
    block ``b`` of a tensor starts ``b * k`` elements after the tensor's own pointer."""
    views = [job[0] for job in jobs]
    counts = torch.tensor([t.B for t in views])
    first = torch.cumsum(counts, 0) - counts
    index = torch.arange(int(counts.sum())) - first.repeat_interleave(counts)  # block index within its tensor
    cols = []
    for col in columns:
        xs = [col(t) for t in views]
        base = torch.tensor([0 if x is None else x.data_ptr() for x in xs], dtype=torch.int64)
        step = torch.tensor([0 if x is None else t.k * x.element_size() for t, x in zip(views, xs)], dtype=torch.int64)
        cols.append(base.repeat_interleave(counts) + index * step.repeat_interleave(counts))
    return torch.stack(cols, 1).contiguous()


def _groups(jobs, key):
    groups: dict[tuple, list] = {}
    for job in jobs:
        t = job[0]
        groups.setdefault((_DTYPES[t.m.dtype], _DTYPES[t.p.dtype], t.n), []).append(job)
    return groups.items()


def pass1(jobs, w1: float, layouts) -> None:
    """Pass 1 of ``(view, out)`` jobs (``ginger_hf.fused._Tensor``, ``(B, width)`` float64 sums, zeroed)."""
    lib = _get()
    for (sdt, pdt, n), group in _groups(jobs, None):
        layout = layouts[n]
        blocks, _, nt = _blocks(group, [t.c is not None for t, _ in group])
        ptrs = _pointers(group, [lambda t: t.U, lambda t: t.m, lambda t: t.g, lambda t: t.c])
        out = torch.zeros(blocks.shape[0], layout.width, dtype=torch.float64)
        offsets = _offsets(layout, _STATS)
        rc = lib.ginger_pass1(sdt, pdt, n, blocks.shape[0], blocks.data_ptr(), ptrs.data_ptr(), w1, out.data_ptr(),
                              offsets.data_ptr(), nt)
        if rc != 0:
            raise RuntimeError(f"ginger_hf CPU kernel pass 1 failed ({rc})")
        for (_, dest), part in zip(group, out.split([t.B for t, _ in group])):
            dest.copy_(part)


def pass2(jobs, w1: float, layouts) -> int:
    """Pass 2 of ``(view, coefs, rotate)`` jobs; returns the number of coordinates the ``rho`` clip cut."""
    lib = _get()
    clipped = 0
    for (sdt, pdt, n), group in _groups(jobs, None):
        lay = layouts[n]
        blocks, _, nt = _blocks(group, [r for _, _, r in group])
        ptrs = _pointers(group, [lambda t: t.U, lambda t: t.m, lambda t: t.g, lambda t: t.p, lambda t: t.c])
        coefs = torch.cat([c for _, c, _ in group]).to(torch.float32).contiguous()
        offsets = _offsets(lay, _COEFS)
        count = ctypes.c_int64(0)
        rc = lib.ginger_pass2(sdt, pdt, n, blocks.shape[0], blocks.data_ptr(), ptrs.data_ptr(), w1, coefs.data_ptr(),
                              offsets.data_ptr(), nt, ctypes.byref(count))
        if rc != 0:
            raise RuntimeError(f"ginger_hf CPU kernel pass 2 failed ({rc})")
        clipped += count.value
    return clipped


def _offsets(layout, names) -> Tensor:
    return torch.tensor([layout.width] + [layout.offsets[k][0] for k in names], dtype=torch.int64)


# Per-block parameters of the small solves, in the order the kernel reads them (NPARAM).
_PARAMS = ("beta2", "damping", "relative_damping", "power", "debias", "k", "momentum_debias", "tolerance", "debias_e")


def _solve_args(bl, layout, clay, stats: Tensor) -> list[Tensor]:
    """The solves' common inputs, contiguous: stats, stats offsets, s, R, e, per-block parameters, coefficient
    offsets. The caller keeps the list alive through the call (the kernel reads their addresses)."""
    params = torch.stack([getattr(bl, name) for name in _PARAMS], 1)
    tensors = [stats, _offsets(layout, _STATS), bl.s, bl.R, bl.e, params, _offsets(clay, _COEFS)]
    return [x.contiguous() for x in tensors]


def _addresses(args: list[Tensor]) -> list[int]:
    """Addresses of ``_solve_args`` up to the per-block parameters (the coefficient offsets come last in the calls)."""
    return [x.data_ptr() for x in args[:-1]]


def solve_refresh(bl, layout, clay, stats: Tensor) -> dict[str, Tensor]:
    """``ginger_hf.solve.solve_refresh`` for blocks on the CPU, block by block in C++ (threads)."""
    n, N = layout.n, stats.shape[0]
    width = clay.width + n + n * n + 4
    out = torch.zeros(N, width, dtype=torch.float64)
    args = _solve_args(bl, layout, clay, stats)
    nt = 1 if N < 256 else torch.get_num_threads()
    rc = _get().ginger_solve_refresh(n, N, *_addresses(args), out.data_ptr(), width, args[-1].data_ptr(), nt)
    if rc != 0:
        raise RuntimeError(f"ginger_hf CPU kernel solve failed ({rc})")
    rest = out[:, clay.width:]
    result = {name: clay.view(out, name) for name in ("scale", "along", "v_c", "shrink", "shift", "v_u")}
    result.update(s=rest[:, :n], R=rest[:, n : n + n * n].reshape(N, n, n), e=rest[:, n + n * n],
                  rotate=rest[:, n + n * n + 1] > 0, update_sq=rest[:, n + n * n + 2], span_sq=rest[:, n + n * n + 3])
    return result


def solve_keep(bl, layout, clay, stats: Tensor) -> dict[str, Tensor]:
    """``ginger_hf.solve.solve_keep`` for blocks on the CPU, in C++."""
    n, N = layout.n, stats.shape[0]
    width = clay.width + 3
    out = torch.zeros(N, width, dtype=torch.float64)
    args = _solve_args(bl, layout, clay, stats)
    rc = _get().ginger_solve_keep(n, N, *_addresses(args), out.data_ptr(), width, args[-1].data_ptr())
    if rc != 0:
        raise RuntimeError(f"ginger_hf CPU kernel keep solve failed ({rc})")
    return dict(scale=clay.view(out, "scale"), shrink=clay.view(out, "shrink"), update_sq=out[:, clay.width],
                span_sq=out[:, clay.width + 1], e=out[:, clay.width + 2])

"""The C++ CPU kernel of the Ginger step: built once with the system compiler, loaded with ctypes.

``_cpu_kernel.cpp`` is plain C++17 with no torch headers, compiled with ``-O3 -march=native``
into ``~/.cache/ginger_hf`` (or ``$GINGER_HF_CACHE``) the first time it is needed (30-45 s;
``scripts/setup.sh`` does it ahead). ``GINGER_HF_KERNEL=0`` turns it off; without a
compiler the eager torch passes run instead. One call per pass covers every block of a
dtype pair, split over ``torch.get_num_threads()`` threads. Any rank up to ``MAX_RANK`` works.
The tables passed to the kernel are built by field name from ``kernel_interface``, whose C++
header the build generates; a library of another interface version is refused at load.

``step`` runs a whole step in one call (``ginger_hf.fused`` uses it for many small blocks); the
two passes and the batched solves between them (``pass1``, ``solve_refresh``/``solve_keep``,
``pass2``) serve huge blocks, which they split between threads, and sharded tensors, whose sums
are completed across ranks between the passes.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from . import kernel_interface as _abi
from .kernel_interface import RECORDS, REFRESH_OUT, refresh_out
from .solve import SOLVE_PARAMS

__all__ = ["available", "applies", "why_not", "pass1", "pass2", "solve_refresh", "solve_keep", "step",
           "takes_whole_step", "SOLVE_PARAMS"]

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_SOURCE = Path(__file__).with_name("_cpu_kernel.cpp")
_HEADERS = tuple(Path(__file__).with_name(h) for h in  # included by the source, beside it
                 ("_cpu_eigh.h", "_cpu_solve.h", "_cpu_simd.h", "_cpu_passes.h", "_cpu_batch.h"))
# Below this many elements in a call, one thread does the whole pass.
_SERIAL_ELEMENTS = 1 << 16
_lib = None
_tried = False
_lock = threading.Lock()


def _cache_dir() -> Path:
    root = os.environ.get("GINGER_HF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "ginger_hf"
    )
    return Path(root)


def _build() -> ctypes.CDLL | None:
    """Compile ``_cpu_kernel.cpp`` once per source/interface/compiler/CPU and load it; ``None`` if impossible.

    The interface header is generated from ``kernel_interface`` into the build directory, so the library's
    name changes with the interface; one whose compiled ``kAbiVersion`` is not ``kernel_interface.ABI_VERSION``
    anyway (a stale or foreign file) is refused with an error naming it."""
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
    header = _abi.cpp_header()
    texts = [_SOURCE.read_text(), *(h.read_text() for h in _HEADERS), header]
    key = hashlib.sha256("\0".join([*texts, cxx, version, " ".join(flags), cpu]).encode()).hexdigest()[:16]
    lib = _cache_dir() / f"ginger_cpu_{key}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
        os.close(fd)
        try:
            with tempfile.TemporaryDirectory(dir=lib.parent) as include:
                Path(include, "ginger_interface.h").write_text(header)
                for extra in (["-fopenmp"], []):  # OpenMP: torch's thread pool; without it, std::threads
                    proc = subprocess.run([cxx, *flags, *extra, "-I", include, str(_SOURCE), "-o", tmp],
                                          capture_output=True, text=True)
                    if proc.returncode == 0:
                        break
            if proc.returncode != 0:
                warnings.warn(f"ginger_hf: could not build the CPU kernel, using the torch path:\n{proc.stderr[-2000:]}")
                return None
            os.replace(tmp, lib)  # atomic: concurrent builders (e.g. DDP ranks) do not clash
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    dll = ctypes.CDLL(str(lib))
    built = dll.ginger_abi_version() if hasattr(dll, "ginger_abi_version") else None
    if built != _abi.ABI_VERSION:
        raise RuntimeError(f"the CPU kernel at {lib} has interface version {built}, this package needs "
                           f"{_abi.ABI_VERSION}: delete the file to rebuild it")
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    dll.ginger_pass1.argtypes = [i, i, i, i, p, p, f, p, p, i]
    dll.ginger_pass2.argtypes = [i, i, i, i, p, p, f, p, p, i, p]
    dll.ginger_solve_refresh.argtypes = [i, i, p, p, p, p, p, p, p, p, i]
    dll.ginger_solve_keep.argtypes = [i, i, p, p, p, p, p, p, p, p]
    dll.ginger_step.argtypes = [i, i, i, i, p, p, f, p, p, p, p, i, p]
    dll.ginger_rank_one_eigh.argtypes = [i, p, p, ctypes.c_double, p, p]
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
    if U.shape[0] > _abi.MAX_RANK:
        return f"the C++ kernel takes ranks up to {_abi.MAX_RANK}, not {U.shape[0]}"
    return None


def applies(p: Tensor, m: Tensor, U: Tensor, g: Tensor, c: Tensor | None) -> bool:
    """Whether the kernel can run this tensor's passes (CPU, float32/bfloat16, contiguous, rank <= ``MAX_RANK``)."""
    return why_not(p, m, U, g, c) is None


@dataclass(frozen=True)
class _BlockIndex:
    """Where each block of a list of ``(B, k)`` tensors sits: its tensor (``owner``), its index in that
    tensor (``local``), its ``k``. Depends on shapes only, so it is built once per parameter set (``_index``)."""

    owner: Tensor  # (nb,) int64
    local: Tensor  # (nb,) int64
    k: Tensor  # (nb,) int64
    ustride: Tensor  # (nb,) int64: B * k, the distance between rows of U
    work: int


@functools.lru_cache(maxsize=256)
def _index(shapes: tuple[tuple[int, int], ...]) -> _BlockIndex:
    counts = torch.tensor([B for B, _ in shapes], dtype=torch.int64)
    ks = torch.tensor([k for _, k in shapes], dtype=torch.int64)
    owner = torch.repeat_interleave(torch.arange(len(shapes)), counts)
    first = torch.cumsum(counts, 0) - counts
    local = torch.arange(owner.numel()) - first[owner]
    return _BlockIndex(owner, local, ks[owner], (counts * ks)[owner], sum(B * k for B, k in shapes))


def _threads(work: int) -> int:
    return 1 if work < _SERIAL_ELEMENTS else torch.get_num_threads()


def _blocks(shapes: tuple[tuple[int, int], ...], refresh: tuple[bool, ...]) -> tuple[Tensor, int]:
    """Per-block ``(k, refresh, ustride)`` rows of tensors of these shapes, and a thread count."""
    return _block_rows(shapes, refresh), _threads(_index(shapes).work)


@functools.lru_cache(maxsize=256)
def _block_rows(shapes: tuple[tuple[int, int], ...], refresh: tuple[bool, ...]) -> Tensor:
    ix = _index(shapes)
    columns = dict(k=ix.k, refresh=torch.tensor(refresh, dtype=torch.int64)[ix.owner], ustride=ix.ustride)
    return torch.stack([columns[name] for name in RECORDS["BlockRow"]], 1).contiguous()


def _shapes(jobs) -> tuple[tuple[int, int], ...]:
    return tuple((job[0].B, job[0].k) for job in jobs)


def _pointers(jobs, names: tuple[str, ...]) -> Tensor:
    """Per-block data pointers of the jobs' views' ``names`` (``None``: address 0): block ``b`` of a tensor
    starts ``b * k`` elements after the tensor's own pointer."""
    ix = _index(_shapes(jobs))
    xs = [[getattr(job[0], name) for name in names] for job in jobs]
    base = torch.tensor([[0 if x is None else x.data_ptr() for x in row] for row in xs], dtype=torch.int64)
    step = torch.tensor([[0 if x is None else job[0].k * x.element_size() for x in row] for job, row in zip(jobs, xs)],
                        dtype=torch.int64)
    return (base[ix.owner] + ix.local[:, None] * step[ix.owner]).contiguous()


_WORKSPACE: dict[tuple, Tensor] = {}


def workspace(tag: str, rows: int, width: int, dtype=torch.float64, zero: bool = True) -> Tensor:
    """A reused ``(rows, width)`` CPU buffer for one step's temporaries (fresh multi-MB buffers every step
    cost page faults). Valid until the next call with the same tag and shape: a step consumes it before returning."""
    key = (tag, rows, width, dtype)
    buf = _WORKSPACE.get(key)
    if buf is None:
        if len(_WORKSPACE) > 64:  # parameter sets come and go (tests): keep the cache small
            _WORKSPACE.clear()
        buf = _WORKSPACE[key] = torch.empty(rows, width, dtype=dtype)
    return buf.zero_() if zero else buf


def block_owner(sizes: tuple[int, ...]) -> Tensor:
    """The tensor index of each block, for tensors of ``sizes`` blocks (cached: a gather, not a repeat)."""
    return _index(tuple((B, 1) for B in sizes)).owner


def _groups(jobs):
    groups: dict[tuple, list] = {}
    for job in jobs:
        t = job[0]
        groups.setdefault((_DTYPES[t.m.dtype], _DTYPES[t.p.dtype], t.n), []).append(job)
    return groups.items()


def pass1(jobs, w1: float, layouts) -> None:
    """Pass 1 of ``(view, slot)`` jobs (``ginger_hf.step_batch.TensorView``; ``slot`` a one-element list that gets the
    tensor's ``(B, width)`` float64 sums, a view into one buffer per kernel call)."""
    lib = _get()
    for (sdt, pdt, n), group in _groups(jobs):
        layout = layouts[n]
        blocks, nt = _blocks(_shapes(group), tuple(t.c is not None for t, _ in group))
        ptrs = _pointers(group, RECORDS["Pass1Ptr"])
        out = workspace(f"pass1 {sdt} {pdt} {n}", blocks.shape[0], layout.width)
        offsets = _offsets(layout, "StatsAt")
        rc = lib.ginger_pass1(sdt, pdt, n, blocks.shape[0], blocks.data_ptr(), ptrs.data_ptr(), w1, out.data_ptr(),
                              offsets.data_ptr(), nt)
        if rc != 0:
            raise RuntimeError(f"ginger_hf CPU kernel pass 1 failed ({rc})")
        for (_, slot), part in zip(group, out.split([t.B for t, _ in group])):
            slot[0] = part


def pass2(jobs, w1: float, layouts) -> int:
    """Pass 2 of ``(view, coefs, rotate)`` jobs; returns the number of coordinates the ``rho`` clip cut."""
    lib = _get()
    clipped = 0
    for (sdt, pdt, n), group in _groups(jobs):
        lay = layouts[n]
        blocks, nt = _blocks(_shapes(group), tuple(bool(r) for _, _, r in group))
        ptrs = _pointers(group, RECORDS["Pass2Ptr"])
        coefs = torch.cat([c for _, c, _ in group]).to(torch.float32).contiguous()
        offsets = _offsets(lay, "CoefAt")
        count = ctypes.c_int64(0)
        rc = lib.ginger_pass2(sdt, pdt, n, blocks.shape[0], blocks.data_ptr(), ptrs.data_ptr(), w1, coefs.data_ptr(),
                              offsets.data_ptr(), nt, ctypes.byref(count))
        if rc != 0:
            raise RuntimeError(f"ginger_hf CPU kernel pass 2 failed ({rc})")
        clipped += count.value
    return clipped


# A whole step in one call (``step``) deals whole blocks to threads: it is used when no block holds more
# than this share of the work (rows of weight matrices), else the two passes split the big blocks.
_WHOLE_STEP_SHARE = 0.125


def takes_whole_step(views, states) -> bool:
    """Whether ``step`` can run this step: every tensor on the kernel, small state float64 and contiguous, and
    blocks small enough to deal out whole to the threads."""
    if not views or any(t.backend != "kernel" for t in views):
        return False
    for st in states:
        if any(st[name].dtype != torch.float64 or not st[name].is_contiguous() for name in ("s", "R", "e")):
            return False
    work = sum(t.B * t.k for t in views)
    return max(t.k for t in views) <= _WHOLE_STEP_SHARE * work or torch.get_num_threads() == 1


def step(jobs, w1: float, layouts, clays) -> tuple[list[Tensor], list[tuple[bool, bool]], int]:
    """A whole step of ``(view, state, params)`` jobs in C++, block by block (pass 1, the small solve, pass 2).

    ``params``: each tensor's ``Param`` values by name (``kernel_interface.RECORDS["Param"]``). Updates the
    state in place (not the counters). Returns each job's per-block ``Result`` rows ``(B, 4)`` (update_sq,
    span_sq, grad_sq, untouched), whether its gradient and its curvature vector were finite (a tensor with a
    non-finite gradient is not touched; one with a non-finite curvature vector steps without refreshing), and
    the count of coordinates the ``rho`` clip cut.
    """
    lib = _get()
    results: list[Tensor | None] = [None] * len(jobs)
    finite: list[tuple[bool, bool] | None] = [None] * len(jobs)
    clipped = 0
    order = {id(job): i for i, job in enumerate(jobs)}
    param_names = RECORDS["Param"]
    for (sdt, pdt, n), group in _groups(jobs):
        tensors = torch.tensor([_tensor_row(t, st) for t, st, _ in group], dtype=torch.int64)
        params = torch.tensor([[row[name] for name in param_names] for _, _, row in group], dtype=torch.float64)
        sizes = [t.B for t, _, _ in group]
        out = workspace(f"step {sdt} {pdt} {n}", sum(sizes), len(RECORDS["Result"]), zero=False)
        flags = torch.zeros(len(group), len(RECORDS["Finite"]), dtype=torch.int64)
        nt = _threads(sum(t.B * t.k for t, _, _ in group))
        count = ctypes.c_int64(0)
        rc = lib.ginger_step(sdt, pdt, n, len(group), tensors.data_ptr(), params.data_ptr(), w1,
                             _offsets(layouts[n], "StatsAt").data_ptr(), _offsets(clays[n], "CoefAt").data_ptr(),
                             out.data_ptr(), flags.data_ptr(), nt, ctypes.byref(count))
        if rc != 0:
            raise RuntimeError(f"ginger_hf CPU kernel step failed ({rc})")
        clipped += count.value
        grad, curvature = RECORDS["Finite"].index("grad"), RECORDS["Finite"].index("curvature")
        for job, part, ok in zip(group, out.split(sizes), flags.tolist()):
            results[order[id(job)]] = part
            finite[order[id(job)]] = (bool(ok[grad]), bool(ok[curvature]))
    return results, finite, clipped


def _tensor_row(t, st) -> list[int]:
    """A tensor's ``TensorRow``: its blocks, and the addresses of its data and small state (0: no c)."""
    values = dict(B=t.B, k=t.k, refresh=t.c is not None, U=t.U.data_ptr(), m=t.m.data_ptr(), g=t.g.data_ptr(),
                  p=t.p.data_ptr(), c=0 if t.c is None else t.c.data_ptr(), s=st["s"].data_ptr(),
                  R=st["R"].data_ptr(), e=st["e"].data_ptr())
    return [values[name] for name in RECORDS["TensorRow"]]


_OFFSETS: dict[tuple, Tensor] = {}


def _offsets(layout, record: str) -> Tensor:
    """The layout's width and the places of its named parts, as the kernel's ``record`` (StatsAt, CoefAt) reads them."""
    key = (type(layout).__name__, layout.n, record)
    if key not in _OFFSETS:
        _OFFSETS[key] = torch.tensor([layout.width if name == "width" else layout.offsets[name][0]
                                      for name in RECORDS[record]], dtype=torch.int64)
    return _OFFSETS[key]


def rank_one_eigh(d: Tensor, z: Tensor, rho: float) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh(diag(d) + rho z z^T)`` by the kernel's closed form (the refresh's eigenproblem)."""
    d, z = d.double().contiguous(), z.double().contiguous()
    m = d.numel()
    lam, V = torch.empty(m, dtype=torch.float64), torch.empty(m, m, dtype=torch.float64)
    if _get().ginger_rank_one_eigh(m, d.data_ptr(), z.data_ptr(), rho, lam.data_ptr(), V.data_ptr()) != 0:
        raise ValueError(f"rank_one_eigh: size must be 1..{_abi.MAX_RANK + 1} and rho >= 0, got {m} and {rho}")
    return lam, V


def _solve_args(bl, layout, clay, stats: Tensor) -> list[Tensor]:
    """The solves' inputs, contiguous, in the calls' order: stats, their places, s, R, e, the per-block
    ``SOLVE_PARAMS``, then (after ``out``) the coefficients' places. The caller keeps them alive through the call."""
    params = torch.stack([getattr(bl, name) for name in SOLVE_PARAMS], 1)
    tensors = [stats, _offsets(layout, "StatsAt"), bl.s, bl.R, bl.e, params]
    return [x.contiguous() for x in tensors]


def solve_refresh(bl, layout, clay, stats: Tensor) -> dict[str, Tensor]:
    """``ginger_hf.solve.solve_refresh`` for blocks on the CPU, block by block in C++ (threads)."""
    n, N = layout.n, stats.shape[0]
    places, width = refresh_out(n)
    out = workspace(f"refresh {n}", N, clay.width + width)
    args = _solve_args(bl, layout, clay, stats)
    nt = 1 if N < 256 else torch.get_num_threads()
    rc = _get().ginger_solve_refresh(n, N, *(x.data_ptr() for x in args), out.data_ptr(),
                                     _offsets(clay, "CoefAt").data_ptr(), nt)
    if rc != 0:
        raise RuntimeError(f"ginger_hf CPU kernel solve failed ({rc})")
    rest = out[:, clay.width:]
    result = {name: clay.view(out, name) for name in ("scale", "along", "v_c", "shrink", "shift", "v_u")}
    result.update({name: rest[:, at] if (a, b) == (0, 0) else rest[:, at : at + places[name][1]]
                   for name, (a, b, _) in REFRESH_OUT for at in (places[name][0],)})
    result.update(R=result["R"].reshape(N, n, n), rotate=result["rotate"] > 0)
    return result


def solve_keep(bl, layout, clay, stats: Tensor) -> dict[str, Tensor]:
    """``ginger_hf.solve.solve_keep`` for blocks on the CPU, in C++."""
    n, N = layout.n, stats.shape[0]
    out = workspace(f"keep {n}", N, clay.width + len(RECORDS["KeepOut"]))
    args = _solve_args(bl, layout, clay, stats)
    rc = _get().ginger_solve_keep(n, N, *(x.data_ptr() for x in args), out.data_ptr(),
                                  _offsets(clay, "CoefAt").data_ptr())
    if rc != 0:
        raise RuntimeError(f"ginger_hf CPU kernel keep solve failed ({rc})")
    result = {name: out[:, clay.width + i] for i, name in enumerate(RECORDS["KeepOut"])}
    return dict(result, scale=clay.view(out, "scale"), shrink=clay.view(out, "shrink"))

"""Run an unmodified training script with ``--optim ginger`` available.

    python -m ginger_hf.run SCRIPT.py [script args...]
    python -m ginger_hf.run -m some.module [module args...]
    torchrun --nproc_per_node 2 -m ginger_hf.run SCRIPT.py ...
    accelerate launch -m ginger_hf.run SCRIPT.py ...

Registers ``optim="ginger"`` with transformers (``ginger_hf.register``), then runs the
script as ``__main__`` with ``sys.argv`` and ``sys.path[0]`` set as ``python SCRIPT.py``
would, so its ``HfArgumentParser`` accepts ``--optim ginger``.
"""

from __future__ import annotations

import os
import runpy
import sys

USAGE = "usage: python -m ginger_hf.run SCRIPT.py [args...]  |  python -m ginger_hf.run -m MODULE [args...]"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or (argv[0] == "-m" and len(argv) < 2):
        print(USAGE, file=sys.stderr)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)

    import ginger_hf

    try:
        ginger_hf.register()
    except ImportError as e:  # torch-only install: say which extra, not a traceback
        print(f"ginger_hf.run: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    _run(argv)
    _destroy_process_group()


def _destroy_process_group() -> None:
    """Scripts rarely destroy the process group the Trainer made; gloo then aborts at exit (SIGABRT)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _run(argv: list[str]) -> None:
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]  # runpy puts the module's file path in argv[0]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        script = argv[0]
        if not os.path.isfile(script):
            print(f"ginger_hf.run: no such script: {script}\n{USAGE}", file=sys.stderr)
            raise SystemExit(2)
        sys.argv = argv
        sys.path[0] = os.path.dirname(os.path.abspath(script))
        runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()

"""The command line of :func:`~gpytorch_tp.distributed.precompute_kernel`, for ``python -m`` and ``torchrun``.

::

    torchrun --nproc-per-node 4 -m gpytorch_tp.distributed.precompute \\
        --kernel kernel.pt --inputs X.pt --out K/

The kernel file holds a kernel saved with ``torch.save(kernel, "kernel.pt")``
(loaded with ``torch.load(..., weights_only=False)``, which runs pickled code:
load only files you trust); the inputs files hold tensors ``(N, d)``.  Started
without ``torchrun`` it runs in one process.  Run again with the same
arguments, it computes only the tiles a stopped run left unfinished.
"""

from __future__ import annotations

import argparse
import sys

import torch

from .driver import precompute_kernel
from .launch import init_from_env

__all__ = ["main", "parser"]


def parser() -> argparse.ArgumentParser:
    """The command line's arguments."""
    p = argparse.ArgumentParser(
        prog="python -m gpytorch_tp.distributed.precompute",
        description="Compute a kernel matrix (NNGP and NTK) into a store on disk, shared over the ranks of "
        "torchrun (or in one process). Rerun with the same arguments to finish a stopped run.",
    )
    p.add_argument("--kernel", required=True, help="file of a kernel saved with torch.save (trusted: it is unpickled)")
    p.add_argument("--inputs", required=True, help="file of the inputs x1, a tensor (N, d) saved with torch.save")
    p.add_argument("--others", default=None, help="file of the inputs x2 for K(x1, x2) (default: K(x1, x1))")
    p.add_argument("--out", required=True, help="directory of the store (shared by every rank)")
    p.add_argument("--tile-size", type=int, default=None, help="items per side of a tile (default: by the kernel)")
    p.add_argument(
        "--device", default=None, help="device of the evaluation (default: cuda:LOCAL_RANK with NCCL, else cpu)"
    )
    p.add_argument("--backend", default=None, choices=("gloo", "nccl"), help="torch.distributed backend under torchrun")
    p.add_argument("--timeout", type=float, default=300, help="seconds any exchange between ranks may wait")
    p.add_argument("--overwrite", action="store_true", help="replace a store of a different matrix at --out")
    p.add_argument("--no-sync", action="store_true", help="do not flush each tile to the disk before logging it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = parser().parse_args(argv)
    rank, world_size = init_from_env(args.backend, args.timeout)
    try:
        if args.device is not None:
            device = torch.device(args.device)
        elif world_size > 1 and torch.distributed.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        kernel = torch.load(args.kernel, map_location=device, weights_only=False)
        x1 = torch.load(args.inputs, map_location=device, weights_only=True)
        x2 = None if args.others is None else torch.load(args.others, map_location=device, weights_only=True)
        report = precompute_kernel(
            kernel.to(device),
            x1,
            x2,
            path=args.out,
            tile_size=args.tile_size,
            progress=False if args.no_progress else None,
            overwrite=args.overwrite,
            sync=not args.no_sync,
            timeout=args.timeout,
        )
        print(
            f"rank {rank}/{world_size}: computed {len(report.computed)} of {report.tiles} tiles "
            f"({report.done_before} finished before) in {report.seconds:.1f} s -> {args.out}",
            file=sys.stderr,
        )
    finally:
        if world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

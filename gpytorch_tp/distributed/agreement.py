"""What the ranks of a process group must agree on, and the few collectives that check it, each with a timeout.

A distributed kernel matrix is only one matrix if every rank evaluates the same
kernel on the same inputs.  :func:`fingerprint` reduces what a rank holds to
checksums (SHA-256) of named parts: the inputs ``x1`` and ``x2``, the
hyperparameters (the kernel's ``state_dict``), the architecture and evaluation
options, the arguments of the call and the environment (device type, dtype,
PyTorch version).  :func:`agree` gathers every rank's fingerprint and raises
:class:`RankMismatchError`, on every rank, naming the parts that differ and
which ranks hold which.

Every collective here waits at most ``timeout`` (:func:`all_gather_bytes`,
:func:`broadcast_bytes`, :func:`all_reduce`): a rank that never arrives gives
:class:`GroupTimeoutError`, and a rank that died gives :class:`GroupFailureError`,
both naming the step, instead of a hang.
"""

from __future__ import annotations

import datetime
import hashlib
import json

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "GroupFailureError",
    "GroupTimeoutError",
    "RankMismatchError",
    "agree",
    "all_gather_bytes",
    "all_reduce",
    "broadcast_bytes",
    "fingerprint",
    "tensor_checksum",
]

# What each part of a fingerprint is called in an error message.
PART_NAMES = {
    "x1": "the inputs x1",
    "x2": "the inputs x2",
    "hyperparameters": "the hyperparameters (the kernel's state_dict)",
    "architecture": "the architecture or evaluation options (repr of the kernel, input_shape, tile_pairs, ...)",
    "arguments": "the arguments of the call (path, tile_size, kinds)",
    "environment": "the environment (device type, dtype, PyTorch version)",
}


class RankMismatchError(ValueError):
    """The ranks of a process group disagree on what they compute (inputs, hyperparameters, arguments).

    ``differences`` maps each part that differs to its checksum on each rank.
    """

    def __init__(self, message: str, differences: dict[str, list[str]]):
        super().__init__(message)
        self.differences = differences


class GroupTimeoutError(TimeoutError):
    """A collective of the process group did not complete in time: a rank never arrived."""


class GroupFailureError(RuntimeError):
    """A collective of the process group failed: a rank died or left."""


def tensor_checksum(x: Tensor | None) -> str | None:
    """SHA-256 of a tensor's dtype, shape and values (``None`` for ``None``)."""
    if x is None:
        return None
    x = x.detach()
    digest = hashlib.sha256(f"{x.dtype}|{tuple(x.shape)}|".encode())
    data = x.cpu().contiguous()
    if data.dtype == torch.bfloat16:
        data = data.view(torch.int16)
    digest.update(data.numpy().tobytes())
    return digest.hexdigest()


def _text_checksum(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _state_checksum(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update((tensor_checksum(value) if torch.is_tensor(value) else repr(value)).encode())
    return digest.hexdigest()


def _architecture_description(kernel: torch.nn.Module) -> str:
    parts = [type(kernel).__module__ + "." + type(kernel).__qualname__, repr(kernel)]
    options = getattr(kernel, "options", None)
    if options is not None:
        parts.append(repr(options.replace(progress=None, memory_budget=None)))
    for name in ("input_dim", "psd_projection"):
        parts.append(f"{name}={getattr(kernel, name, None)!r}")
    active = getattr(kernel, "active_dims", None)
    parts.append(f"active_dims={None if active is None else active.tolist()}")
    return "\n".join(parts)


def fingerprint(kernel: torch.nn.Module, x1: Tensor, x2: Tensor | None, arguments: dict) -> dict[str, str | None]:
    """Checksums of everything a rank's share of a kernel matrix depends on, by part.

    :param kernel: the kernel (a ``torch.nn.Module``).
    :param x1: the row inputs.
    :param x2: the column inputs (``None``: ``x1``).
    :param arguments: the call's other arguments that all ranks must share (JSON-serialisable).
    :return: ``{"x1", "x2", "hyperparameters", "architecture", "arguments", "environment"}`` to
        hexadecimal SHA-256 digests (``x2``: ``None`` for ``K(X, X)``).
    """
    environment = f"device={x1.device.type}|dtype={x1.dtype}|torch={torch.__version__}"
    return {
        "x1": tensor_checksum(x1),
        "x2": tensor_checksum(x2),
        "hyperparameters": _state_checksum(kernel),
        "architecture": _text_checksum(_architecture_description(kernel)),
        "arguments": _text_checksum(json.dumps(arguments, sort_keys=True)),
        "environment": _text_checksum(environment),
    }


def _group_device(group: dist.ProcessGroup | None) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _wait(work, timeout: datetime.timedelta, step: str) -> None:
    rank = dist.get_rank()
    try:
        work.wait(timeout=timeout)
    except Exception as error:  # gloo and NCCL raise RuntimeError subclasses of their own
        text = str(error)
        if "timed out" in text.lower() or "timeout" in type(error).__name__.lower():
            raise GroupTimeoutError(
                f"rank {rank}: timed out after {timeout.total_seconds():g} s waiting for the other ranks at "
                f"'{step}': a rank did not arrive (not started, stuck, or not calling the same function "
                f"with the same arguments); nothing was written for this step ({type(error).__name__}: {text})"
            ) from error
        raise GroupFailureError(
            f"rank {rank}: the process group failed at '{step}': a rank probably died or left the group "
            f"({type(error).__name__}: {text})"
        ) from error


def all_gather_bytes(
    payload: bytes, group: dist.ProcessGroup | None, timeout: datetime.timedelta, step: str
) -> list[bytes]:
    """Every rank's ``payload``, in rank order, within ``timeout`` (``step`` names the step in errors)."""
    device = _group_device(group)
    size = dist.get_world_size(group)
    length = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    lengths = [torch.zeros_like(length) for _ in range(size)]
    _wait(dist.all_gather(lengths, length, group=group, async_op=True), timeout, step)
    longest = max(int(n.item()) for n in lengths)
    data = torch.zeros(max(1, longest), dtype=torch.uint8)
    if payload:
        data[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    data = data.to(device)
    gathered = [torch.zeros_like(data) for _ in range(size)]
    _wait(dist.all_gather(gathered, data, group=group, async_op=True), timeout, step)
    return [bytes(g.cpu()[: int(n.item())].numpy().tobytes()) for g, n in zip(gathered, lengths)]


def broadcast_bytes(
    payload: bytes | None, src: int, group: dist.ProcessGroup | None, timeout: datetime.timedelta, step: str
) -> bytes:
    """``payload`` of rank ``src`` (a global rank) on every rank, within ``timeout``."""
    device = _group_device(group)
    length = torch.tensor([0 if payload is None else len(payload)], dtype=torch.int64, device=device)
    _wait(dist.broadcast(length, src, group=group, async_op=True), timeout, step)
    data = torch.zeros(max(1, int(length.item())), dtype=torch.uint8)
    if dist.get_rank() == src and payload:
        data[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    data = data.to(device)
    _wait(dist.broadcast(data, src, group=group, async_op=True), timeout, step)
    return bytes(data.cpu()[: int(length.item())].numpy().tobytes())


def all_reduce(
    tensor: Tensor,
    group: dist.ProcessGroup | None,
    timeout: datetime.timedelta,
    step: str,
    op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
) -> Tensor:
    """``tensor`` reduced over the ranks (in place, contiguous), within ``timeout``; every rank gets the same values."""
    if not tensor.is_contiguous():
        raise ValueError(f"all_reduce needs a contiguous tensor ('{step}')")
    _wait(dist.all_reduce(tensor, op=op, group=group, async_op=True), timeout, step)
    return tensor


def agree(mine: dict[str, str | None], group: dist.ProcessGroup | None, timeout: datetime.timedelta) -> None:
    """Check that every rank of ``group`` has the same fingerprint; else :class:`RankMismatchError` on every rank."""
    gathered = [
        json.loads(b)
        for b in all_gather_bytes(json.dumps(mine, sort_keys=True).encode(), group, timeout, "checksum agreement")
    ]
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(len(gathered)))
    differences = {}
    for part in mine:
        values = [g.get(part) for g in gathered]
        if len(set(values)) > 1:
            differences[part] = values
    if not differences:
        return
    lines = []
    for part, values in differences.items():
        holders: dict[str | None, list[int]] = {}
        for rank, value in zip(ranks, values):
            holders.setdefault(value, []).append(rank)
        described = "; ".join(
            f"rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}: "
            f"{'none' if v is None else v[:12]}"
            for v, r in holders.items()
        )
        lines.append(f"{PART_NAMES.get(part, part)} differ ({described})")
    raise RankMismatchError(
        f"rank {dist.get_rank()}: the {len(ranks)} ranks of the process group disagree, so they would not compute "
        "one kernel matrix: " + "; ".join(lines) + ". Give every rank the same kernel, inputs and arguments "
        "(load them from the same files, seed any random generation identically).",
        differences,
    )

"""The Monte Carlo (empirical) NNGP kernel or NTK of any finite-width torch network."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from gpytorch.kernels import Kernel
from linear_operator.operators import LinearOperator
from torch import Tensor, nn

from ..empirical import network_jacobian
from ..state import KINDS
from .tensor_program_kernel import check_feature_sizes

__all__ = ["MonteCarloKernel"]

ParameterScales = Mapping[str, float] | Callable[[nn.Module], Mapping[str, float]]


class MonteCarloKernel(Kernel):
    r"""Empirical NNGP kernel or NTK of random finite networks, as a GPyTorch kernel.

    ``network_factory()`` builds one randomly initialised ``torch.nn.Module``
    mapping items ``(N, d)`` to outputs ``(N, m)`` (or ``(N,)``).  With
    :math:`f^{(s)}` the network of sample :math:`s = 1, \dots, S`:

    .. math::

        K_\text{NNGP}(x, x') = \frac{1}{S m} \sum_{s=1}^{S} \sum_{k=1}^{m} f^{(s)}_k(x) f^{(s)}_k(x'), \qquad
        K_\text{NTK}(x, x') = \frac{1}{S m} \sum_{s, k} \sum_p s_p\,
            \partial_{\theta_p} f^{(s)}_k(x)\, \partial_{\theta_p} f^{(s)}_k(x'),

    with :math:`s_p` the ``parameter_scales`` (1 by default: the plain tangent
    kernel of the parameters as the network holds them).  The outputs of a
    network are i.i.d. given its last hidden layer, so a wide readout
    (``m > 1``) averages out much of the sampling noise at the cost of one
    network.  It works for any architecture, with or without a closed form
    (max pooling, softmax attention with :math:`1/\sqrt{n}` logits, custom
    layers), and converges to the exact kernel as width and ``n_samples`` grow:
    the sampling error of the NNGP falls like :math:`1/\sqrt{S m}`, the
    finite-width bias like :math:`1/n`.

    Networks are built in a forked random state seeded from ``seed`` and the
    sample index, so the kernel is a fixed function of its inputs (every call
    sees the same ``n_samples`` networks, and ``K(X, X)`` is positive
    semi-definite and consistent with ``K(X, x*)``).  Build them on the CPU:
    they are moved to the inputs' device and dtype.  Items are pushed through
    the networks in chunks, and parameter Jacobians (``torch.func.jacrev``)
    are formed for chunks of items whose size keeps them within
    ``memory_budget``.

    :param network_factory: ``() -> torch.nn.Module``, called once per sample
        and evaluation (e.g. ``lambda: MyNet(width=512)``, or
        ``lambda: architecture.to_module(d, 512)``).
    :param kind: ``"nngp"`` or ``"ntk"``.
    :param n_samples: number of random networks :math:`S`.
    :param seed: seed of the networks' initialisations.
    :param parameter_scales: NTK only: per-parameter learning-rate factors
        :math:`s_p`, a mapping from parameter names (``named_parameters``) to
        floats, or a function of the network giving one (e.g.
        :func:`gpytorch_tp.conversion.ntk_parameter_scales`, which makes a
        standard-parameterised module's NTK that of its NTK parameterisation).
    :param chunk_size: items per forward pass / Jacobian (``None``: chosen from ``memory_budget``).
    :param memory_budget: bytes a Jacobian chunk may take (default 256 MiB).
    :param train_mode: evaluate the networks in training mode (default: eval
        mode, so dropout is off; BatchNorm then uses its initial running
        statistics, i.e. does nothing).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from gpytorch_tp.kernels import MonteCarloKernel
        >>> def net():  # max pooling over pairs of units: no closed-form kernel
        ...     return nn.Sequential(nn.Linear(3, 256), nn.Unflatten(1, (128, 2)), nn.AdaptiveMaxPool1d(1),
        ...                          nn.Flatten(), nn.Linear(128, 1))
        >>> k = MonteCarloKernel(net, n_samples=8)
        >>> k(torch.randn(5, 3)).to_dense().shape
        torch.Size([5, 5])
    """

    has_lengthscale = False

    def __init__(
        self,
        network_factory: Callable[[], nn.Module],
        kind: str = "nngp",
        n_samples: int = 16,
        seed: int = 0,
        *,
        parameter_scales: ParameterScales | None = None,
        chunk_size: int | None = None,
        memory_budget: int = 2**28,
        train_mode: bool = False,
        **kwargs,
    ):
        if not callable(network_factory) or isinstance(network_factory, nn.Module):
            raise TypeError(
                "network_factory must be a function returning a new random network (e.g. lambda: MyNet()), "
                f"got {type(network_factory).__name__}"
            )
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
        if chunk_size is not None and int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        if memory_budget <= 0:
            raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget}")
        if parameter_scales is not None and kind != "ntk":
            raise ValueError("parameter_scales only applies to kind='ntk'")
        super().__init__(**kwargs)
        self.network_factory = network_factory
        self.kind = kind
        self.n_samples = n_samples
        self.seed = int(seed)
        self.parameter_scales = parameter_scales
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self.memory_budget = int(memory_budget)
        self.train_mode = bool(train_mode)

    # -- the random networks ---------------------------------------------------------------------

    def sample_seeds(self) -> list[int]:
        """The seed of each sample's initialisation (a fixed function of ``seed``)."""
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randint(0, 2**62, (self.n_samples,), generator=generator).tolist()

    def network(
        self, sample: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> nn.Module:
        """The network of sample ``sample`` (``0 <= sample < n_samples``)."""
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.sample_seeds()[sample])
            network = self.network_factory()
        if not isinstance(network, nn.Module):
            raise TypeError(f"network_factory must return a torch.nn.Module, got {type(network).__name__}")
        network = network.to(dtype=dtype, device=device)
        return network.train(self.train_mode)

    def _scales(self, network: nn.Module) -> Mapping[str, float] | None:
        scales = self.parameter_scales
        return scales(network) if callable(scales) else scales

    # -- evaluation ------------------------------------------------------------------------------

    def __call__(
        self, x1: Tensor, x2: Tensor | None = None, diag: bool = False, last_dim_is_batch: bool = False, **params
    ) -> Tensor | LinearOperator:
        check_feature_sizes(self, x1, x2)
        return super().__call__(x1, x2, diag=diag, last_dim_is_batch=last_dim_is_batch, **params)

    def forward(self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False, **params) -> Tensor:
        if last_dim_is_batch:
            raise ValueError("MonteCarloKernel does not support last_dim_is_batch=True")
        for name, x in (("x1", x1), ("x2", x2)):
            if not x.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
            if not torch.isfinite(x).all():
                raise ValueError(f"{name} contains NaN or infinite values")
        if x1.shape[-1] != x2.shape[-1]:
            raise ValueError(f"x1 has {x1.shape[-1]} features per item but x2 has {x2.shape[-1]}")
        if diag and x1.shape[-2] != x2.shape[-2]:
            raise ValueError(f"diag=True needs as many items in x1 as in x2, got {x1.shape[-2]} and {x2.shape[-2]}")
        same = x1 is x2 or (x1.shape == x2.shape and torch.equal(x1, x2))
        batch = torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2])
        n1, n2 = x1.shape[-2], x2.shape[-2]
        out_shape = (*batch, n1) if diag else (*batch, n1, n2)
        if math.prod(out_shape) == 0:
            # Nothing to evaluate (0 points or an empty batch): an empty result, as GPyTorch's own kernels
            # give, without building a network (whose output size cannot be checked on no items);
            # attached to the inputs for autograd (they are finite: checked above).
            return x1.new_zeros(out_shape) + 0 * (x1.sum() + x2.sum())
        # Flattened batch (reshape(-1, ...) cannot infer a size for 0 points).
        flat1 = x1.expand(*batch, n1, x1.shape[-1]).reshape(math.prod(batch), n1, x1.shape[-1])
        flat2 = flat1 if same else x2.expand(*batch, n2, x2.shape[-1]).reshape(math.prod(batch), n2, x2.shape[-1])
        total = None
        for sample in range(self.n_samples):
            network = self.network(sample, dtype=x1.dtype, device=x1.device)
            value = torch.stack([self._one_network(network, a, b, diag, same) for a, b in zip(flat1, flat2)])
            total = value if total is None else total + value
        total = total / self.n_samples
        return total.reshape(*batch, *total.shape[1:])

    def _one_network(self, network: nn.Module, x1: Tensor, x2: Tensor, diag: bool, same: bool) -> Tensor:
        if self.kind == "nngp":
            f1 = self._outputs(network, x1)
            f2 = f1 if same else self._outputs(network, x2)
            if diag:
                return (f1 * f2).sum(-1) / f1.shape[-1]
            return f1 @ f2.transpose(-1, -2) / f1.shape[-1]
        return self._ntk(network, x1, x2, diag, same)

    def _outputs(self, network: nn.Module, x: Tensor) -> Tensor:
        chunk = self.chunk_size or 1024
        outs = []
        for start in range(0, x.shape[0], chunk):
            out = network(x[start : start + chunk])
            outs.append(out.unsqueeze(-1) if out.dim() == 1 else out)
        out = torch.cat(outs)
        if out.dim() != 2 or out.shape[0] != x.shape[0]:
            raise ValueError(
                f"the network maps {tuple(x.shape)} inputs to {tuple(out.shape)}; MonteCarloKernel needs "
                "outputs (N, m) or (N,)"
            )
        return out

    def _ntk(self, network: nn.Module, x1: Tensor, x2: Tensor, diag: bool, same: bool) -> Tensor:
        scales = self._scales(network)
        n_params = sum(p.numel() for p in network.parameters() if p.requires_grad)
        n_outputs = self._outputs(network, x1[:1]).shape[-1]
        # jacrev keeps a few copies of each chunk's (items, outputs, parameters) Jacobian.
        per_item = 3 * n_outputs * n_params * x1.element_size()
        chunk = self.chunk_size or max(1, self.memory_budget // max(per_item, 1))
        # Without input gradients, nothing of the Jacobians needs to be kept for autograd.
        grad = torch.is_grad_enabled() and (x1.requires_grad or x2.requires_grad)
        with torch.set_grad_enabled(grad):

            def jac(x: Tensor) -> Tensor:
                return network_jacobian(network, x, scales)

            if diag:
                parts = []
                for start in range(0, x1.shape[0], chunk):
                    j1 = jac(x1[start : start + chunk])
                    j2 = j1 if same else jac(x2[start : start + chunk])
                    parts.append(torch.einsum("imp,imp->i", j1, j2))
                return torch.cat(parts) / n_outputs
            starts1 = range(0, x1.shape[0], chunk)
            starts2 = range(0, x2.shape[0], chunk)
            if len(starts1) == 1 and (same or len(starts2) == 1):
                j1 = jac(x1)
                j2 = j1 if same else jac(x2)
                return torch.einsum("imp,jmp->ij", j1, j2) / n_outputs
            # Memory-bounded: tiles of (chunk x chunk) items, Jacobians recomputed per tile.
            rows = []
            for a in starts1:
                j1 = jac(x1[a : a + chunk])
                row = [torch.einsum("imp,jmp->ij", j1, jac(x2[b : b + chunk])) for b in starts2]
                rows.append(torch.cat(row, -1))
            return torch.cat(rows, -2) / n_outputs

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, n_samples={self.n_samples}, seed={self.seed}"

"""Finite-width networks of an architecture and their empirical kernels.

The kernels of this package are limits; these functions give the finite-width
quantities they are limits of:

* :func:`~gpytorch_tp.layers.finite_network.build_network` -- the ``torch.nn``
  network of an architecture at a given width, with the matching
  (NTK-parameterised) initialisation (defined with the layers, which build
  networks with it; re-exported here);
* :func:`empirical_nngp` -- the output covariance over random initialisations;
* :func:`empirical_ntk` -- the parameter-gradient inner product of one network
  (:func:`network_jacobian` -- its parameter Jacobian).

:class:`~gpytorch_tp.kernels.MonteCarloKernel` turns these into a GPyTorch
kernel for any network factory, and :meth:`Layer.to_module
<gpytorch_tp.layers.Layer.to_module>` is ``build_network`` as a method.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from .layers.finite_network import build_network

__all__ = ["build_network", "empirical_nngp", "empirical_ntk", "network_jacobian"]


def empirical_nngp(
    network_factory: Callable[[int], nn.Module], x1: Tensor, x2: Tensor | None = None, n_networks: int = 16
) -> Tensor:
    """Output covariance ``mean f(x1) f(x2)^T`` over ``n_networks`` random networks.

    The outputs of a network are i.i.d. given its hidden features, so the
    covariance is also averaged over the output units.

    :param network_factory: ``seed -> network``.
    """
    x2 = x1 if x2 is None else x2
    total = None
    with torch.no_grad():
        for seed in range(n_networks):
            network = network_factory(seed)
            f1, f2 = network(x1), network(x2)
            cov = f1 @ f2.transpose(-1, -2) / f1.shape[-1]
            total = cov if total is None else total + cov
    return total / n_networks


def network_jacobian(
    network: nn.Module,
    x: Tensor,
    parameter_scales: Mapping[str, float] | None = None,
) -> Tensor:
    r"""Parameter Jacobian of ``network`` at the items ``x``: ``(N, m, P)`` for ``m`` outputs.

    Each parameter's columns are multiplied by :math:`\sqrt{s_p}` with
    ``s_p = parameter_scales[name]`` (missing names: 1), so that inner products
    of rows are the tangent kernel of gradient descent with per-parameter
    learning rates :math:`\eta s_p`.  Parameters that do not require gradients
    are left out.
    """
    params = {name: p.detach() for name, p in network.named_parameters() if p.requires_grad}
    scales = dict(parameter_scales or {})
    unknown = set(scales) - set(params)
    if unknown:
        raise KeyError(f"parameter_scales names parameters the network does not train: {sorted(unknown)}")

    def outputs(p: dict[str, Tensor], items: Tensor) -> Tensor:
        out = torch.func.functional_call(network, p, (items,))
        return out.unsqueeze(-1) if out.dim() == 1 else out

    jac = torch.func.jacrev(outputs)(params, x)  # name -> (N, m, *shape)
    columns = []
    for name, j in jac.items():
        j = j.reshape(j.shape[0], j.shape[1], -1)
        scale = scales.get(name, 1.0)
        columns.append(j if scale == 1.0 else j * math.sqrt(scale))
    return torch.cat(columns, dim=-1)


def empirical_ntk(
    network: nn.Module,
    x1: Tensor,
    x2: Tensor | None = None,
    parameter_scales: Mapping[str, float] | None = None,
) -> Tensor:
    r"""Empirical NTK :math:`\frac{1}{m}\sum_k \langle \nabla_\theta f_k(x_1), \nabla_\theta f_k(x_2) \rangle`.

    Averaged over the ``m`` output units (cross-unit terms vanish at infinite
    width).  ``parameter_scales`` weights each parameter's gradients (see
    :func:`network_jacobian`).
    """
    j1 = network_jacobian(network, x1, parameter_scales)
    j2 = j1 if x2 is None else network_jacobian(network, x2, parameter_scales)
    return torch.einsum("imp,jmp->ij", j1, j2) / j1.shape[1]

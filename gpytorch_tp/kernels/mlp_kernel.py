"""Preset: the kernel of a fully connected network."""

from __future__ import annotations

import copy

import torch
from gpytorch.priors import Prior

from ..layers import Layer, LayerNorm, Linear, Sequential, nonlinearity_from_name
from .tensor_program_kernel import TensorProgramKernel

__all__ = ["MLPKernel"]

# Weight variances that keep the pre-activation variance constant through depth
# (He et al. 2015 for the ReLU family); 1 for everything else.
_VARIANCE_PRESERVING = {"relu": 2.0, "abs": 1.0}


class MLPKernel(TensorProgramKernel):
    r"""NNGP kernel or NTK of an infinitely wide multilayer perceptron.

    The network has ``depth`` hidden layers and a linear readout:

    .. math::

        f(x) = L_{D+1} \circ \phi \circ L_D \circ \cdots \circ \phi \circ L_1 (x), \qquad
        L_\ell(z) = \sigma_{w,\ell} W_\ell z / \sqrt{n_{\ell - 1}} + \sigma_{b,\ell} b_\ell,

    in the NTK parameterisation (:class:`~gpytorch_tp.layers.Linear`).  Each
    layer has its own learnable :math:`\sigma_{w,\ell}^2` and :math:`\sigma_{b,\ell}^2`.
    Use it inside :class:`gpytorch.kernels.ScaleKernel` to learn an output scale.

    :param depth: number of hidden layers (nonlinearities); 0 gives a linear kernel.
    :param nonlinearity: a name (``"relu"``, ``"leaky_relu"``, ``"abs"``, ``"erf"``,
        ``"gelu"``, ``"sin"``, ``"cos"``, ``"sign"``, ``"step"``, ``"identity"``,
        ``"tanh"``, ``"sigmoid"``, ``"silu"``, ``"softplus"``) or a layer instance.
    :param kind: ``"nngp"`` or ``"ntk"``.
    :param weight_variance: starting :math:`\sigma_w^2` of every layer (default 2 for
        ReLU, 1 otherwise).
    :param bias_variance: starting :math:`\sigma_b^2` of every layer (default 0.1).
    :param layer_norm: apply :class:`~gpytorch_tp.layers.LayerNorm` to every
        hidden pre-activation.
    :param weight_variance_prior: prior applied to every layer's weight variance.
    :param bias_variance_prior: prior applied to every layer's bias variance.
    :param nonlinearity_kwargs: extra arguments of a named nonlinearity (e.g.
        ``{"negative_slope": 0.2}`` for ``"leaky_relu"``).
    :param kwargs: passed to :class:`TensorProgramKernel` (``input_dim``,
        ``batch_shape``, ``active_dims``, ``tile_pairs``).

    Example:
        >>> import torch, gpytorch
        >>> from gpytorch_tp import MLPKernel
        >>> covar = gpytorch.kernels.ScaleKernel(MLPKernel(depth=3, nonlinearity="relu", kind="ntk"))
        >>> covar(torch.randn(5, 4)).to_dense().shape
        torch.Size([5, 5])
    """

    def __init__(
        self,
        depth: int = 2,
        nonlinearity: str | Layer = "relu",
        kind: str = "nngp",
        *,
        weight_variance: float | None = None,
        bias_variance: float = 0.1,
        layer_norm: bool = False,
        weight_variance_prior: Prior | None = None,
        bias_variance_prior: Prior | None = None,
        nonlinearity_kwargs: dict | None = None,
        **kwargs,
    ):
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise ValueError(f"depth must be a non-negative integer, got {depth!r}")
        template = nonlinearity_from_name(nonlinearity, **(nonlinearity_kwargs or {}))
        if weight_variance is None:
            weight_variance = _VARIANCE_PRESERVING.get(getattr(template, "name", ""), 1.0)
        batch_shape = torch.Size(kwargs.get("batch_shape") or [])

        def dense() -> Linear:
            return Linear(
                weight_variance,
                bias_variance,
                weight_variance_prior=copy.deepcopy(weight_variance_prior),
                bias_variance_prior=copy.deepcopy(bias_variance_prior),
                batch_shape=batch_shape,
            )

        layers: list[Layer] = []
        for i in range(depth):
            layers.append(dense())
            if layer_norm:
                layers.append(LayerNorm())
            layers.append(template if i == 0 else copy.deepcopy(template))
        layers.append(dense())
        super().__init__(Sequential(*layers), kind=kind, **kwargs)
        self.depth = depth

"""Preset: the kernel of a fully connected network."""

from __future__ import annotations

import copy

import torch
from gpytorch.priors import Prior
from torch import Tensor

from ..layers import Identity, Layer, LayerNorm, LeakyReLU, Linear, Sequential, Sign, Step
from .presets import check_depth, hyperparameter_batch_shape, nonlinearity_and_weight_variance
from .tensor_program_kernel import TensorProgramKernel

__all__ = ["MLPKernel"]

# Positively homogeneous nonlinearities (phi(c u) = c^a phi(u), c > 0): rescaling a
# layer's output only rescales the rest of the recursion (see ``normalize``).
_HOMOGENEOUS = (LeakyReLU, Identity, Step, Sign)


class MLPKernel(TensorProgramKernel):
    r"""NNGP kernel or NTK of an infinitely wide multilayer perceptron.

    The network has ``depth`` hidden layers and a linear readout:

    .. math::

        f(x) = L_{D+1} \circ \phi \circ L_D \circ \cdots \circ \phi \circ L_1 (x), \qquad
        L_\ell(z) = \sigma_{w,\ell} W_\ell z / \sqrt{n_{\ell - 1}} + \sigma_{b,\ell} b_\ell,

    in the NTK parameterisation (:class:`~gpytorch_tp.layers.Linear`).  Each
    layer has its own learnable :math:`\sigma_{w,\ell}^2` and :math:`\sigma_{b,\ell}^2`.
    Use it inside :class:`gpytorch.kernels.ScaleKernel` to learn an output scale.

    **Normalised kernel (for ScaleKernel, BoTorch).**  With ``normalize=True`` the
    kernel is the correlation of the network outputs (of the NTK, for ``kind="ntk"``):

    .. math::

        \hat k(x, x') = \frac{k(x, x')}{\sqrt{k(x, x)\, k(x', x')}}, \qquad
        \hat k(x, x) = 1 .

    The raw kernel has scales that the marginal likelihood cannot tell apart
    from the ScaleKernel's outputscale or from each other.  Multiplying the
    readout's :math:`(\sigma_{w,D+1}^2, \sigma_{b,D+1}^2)` by :math:`c`
    multiplies :math:`K` and :math:`\Theta` by :math:`c`, exactly like an
    outputscale.  For a positively homogeneous :math:`\phi` of degree :math:`a`
    (:math:`\phi(cu) = c^a \phi(u)`: ReLU, leaky ReLU, abs, identity with
    :math:`a = 1`; step, sign with :math:`a = 0`) every layer has such a
    direction: :math:`\sigma_{w,\ell}^2 \to \sigma_{w,\ell}^2 c_\ell / c_{\ell-1}^a`,
    :math:`\sigma_{b,\ell}^2 \to c_\ell \sigma_{b,\ell}^2` (:math:`c_0 = 1`)
    scales :math:`K_\ell` and :math:`\Theta_\ell` by :math:`c_\ell`, and the
    kernel by :math:`c_{D+1}`.  With ``layer_norm``, scaling a hidden layer's
    :math:`\sigma_w^2` and :math:`\sigma_b^2` together changes nothing after
    the LayerNorm.  :math:`\hat k` is invariant under all of these, so with
    ``normalize=True`` the weight variances they make redundant are held fixed
    at their starting values (every layer's for a homogeneous :math:`\phi` or
    with ``layer_norm``, the readout's otherwise), which loses no generality.
    What is learned (the bias variances, and the hidden weight variances of a
    non-homogeneous :math:`\phi`) only shapes the correlation; the scale
    belongs to the ScaleKernel alone, whose outputscale is then the prior
    variance of :math:`f(x)` at every :math:`x` (with standardised outcomes, the
    quantity BoTorch's priors are written for), and no fit can trade it against
    weight variances.

    ``normalize`` is off by default: the raw kernel is the covariance of the
    network, the object that neural-tangents, the finite-width limit tests and the
    training dynamics (:meth:`nngp_and_ntk`, which always returns the raw pair)
    are about.  Turn it on whenever the kernel sits inside a ScaleKernel, as in
    Bayesian optimisation.

    **Centre the inputs.**  The kernel depends on :math:`x` through inner
    products, so the origin is a special point.  BoTorch's ``Normalize(d)`` maps
    the search box to :math:`[0, 1]^d`, where every pair of points subtends a
    small angle at the origin and the kernel correlates all of them strongly (a
    very long "lengthscale"); use ``Normalize(d, center=0.0)``
    (:math:`[-1/2, 1/2]^d`).  Since the outputscale is now the signal variance,
    a prior on it means what it says: with standardised outcomes
    ``ScaleKernel(..., outputscale_prior=LogNormalPrior(0.0, 1.0),
    outputscale_constraint=GreaterThan(1e-4))`` (the floor keeps the prior's
    log density defined).  The benchmark in ``docs/benchmarks.md`` shows each
    step: on Hartmann-6 the raw kernel on the unit cube collapses (signal
    variance driven to ~0, noise to 0.6-0.8 of the data's variance) at most
    fits, as ``ScaleKernel(InfiniteWidthBNNKernel(3))`` does; normalised and
    centred it collapses at a few early fits; with the outputscale prior at
    none.  A prior does not rescue a kernel that carries its own scale (checked
    on ``InfiniteWidthBNNKernel``): the fit holds the outputscale near the
    prior's mode and shrinks the kernel's own variances instead.

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
    :param normalize: return the correlation kernel :math:`\hat k` above and fix
        the weight variances it does not depend on (default ``False``).
    :param kwargs: passed to :class:`TensorProgramKernel` (``input_dim``,
        ``batch_shape``, ``active_dims``, ``tile_pairs``).

    Example:
        >>> import torch, gpytorch
        >>> from gpytorch_tp import MLPKernel
        >>> covar = gpytorch.kernels.ScaleKernel(MLPKernel(depth=3, nonlinearity="relu", kind="ntk"))
        >>> covar(torch.randn(5, 4)).to_dense().shape
        torch.Size([5, 5])
        >>> bo_covar = gpytorch.kernels.ScaleKernel(MLPKernel(depth=3, normalize=True))
        >>> bo_covar.base_kernel(torch.randn(3, 4), diag=True)
        tensor([1., 1., 1.], grad_fn=<...>)
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
        normalize: bool = False,
        **kwargs,
    ):
        check_depth(depth, minimum=0)
        template, weight_variance = nonlinearity_and_weight_variance(nonlinearity, nonlinearity_kwargs, weight_variance)
        batch_shape = hyperparameter_batch_shape(kwargs)

        normalize = bool(normalize)
        scale_free_hidden = normalize and (layer_norm or isinstance(template, _HOMOGENEOUS))

        def dense(fix_weight: bool) -> Linear:
            return Linear(
                weight_variance,
                bias_variance,
                weight_variance_prior=None if fix_weight else copy.deepcopy(weight_variance_prior),
                bias_variance_prior=copy.deepcopy(bias_variance_prior),
                learn_weight_variance=False if fix_weight else None,
                batch_shape=batch_shape,
            )

        layers: list[Layer] = []
        for i in range(depth):
            layers.append(dense(scale_free_hidden))
            if layer_norm:
                layers.append(LayerNorm())
            layers.append(template if i == 0 else copy.deepcopy(template))
        layers.append(dense(normalize))
        super().__init__(Sequential(*layers), kind=kind, **kwargs)
        self.depth = depth
        self.normalize = normalize

    def _dense_forward(self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False) -> Tensor:
        k = super()._dense_forward(x1, x2, diag=diag, last_dim_is_batch=last_dim_is_batch)
        if not self.normalize:
            return k
        # A zero self-variance (zero input, no bias) has no correlation; it gets 0, not NaN.
        tiny = torch.finfo(k.dtype).tiny
        if x1 is x2 or (x1.shape == x2.shape and torch.equal(x1, x2)):
            # The self-variances are the diagonal already computed; k / k keeps the graph.
            if diag:
                return k / k.clamp_min(tiny)
            s = k.diagonal(dim1=-2, dim2=-1).clamp_min(tiny).rsqrt()
            return k * s.unsqueeze(-1) * s.unsqueeze(-2)
        s1 = super()._dense_forward(x1, x1, diag=True, last_dim_is_batch=last_dim_is_batch).clamp_min(tiny).rsqrt()
        s2 = super()._dense_forward(x2, x2, diag=True, last_dim_is_batch=last_dim_is_batch).clamp_min(tiny).rsqrt()
        if diag:
            return k * s1 * s2
        return k * s1.unsqueeze(-1) * s2.unsqueeze(-2)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", normalize=True" if self.normalize else "")

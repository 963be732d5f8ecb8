r"""Elementwise nonlinearities.

A nonlinearity :math:`\phi` applied to centred Gaussian pre-activations with
pair covariance :math:`\Sigma = [[k_{11}, k_{12}], [k_{12}, k_{22}]]` maps the
state by

.. math::

    K \leftarrow V_\phi(\Sigma) = E[\phi(u) \phi(v)], \qquad
    \Theta \leftarrow V_{\phi'}(\Sigma)\, \Theta, \quad
    V_{\phi'}(\Sigma) = E[\phi'(u) \phi'(v)], \qquad (u, v) \sim N(0, \Sigma).

Closed forms are used where they exist; any other function is integrated by
quadrature (:class:`Elementwise`).

The closed forms are evaluated in terms of the determinant
:math:`k_{11} k_{22} - k_{12}^2` (:func:`~gpytorch_tp.numerics.pair_determinant`,
error-free products) or the distance-like :math:`(k_{11} - |k_{12}|) + (k_{22} - |k_{12}|)`,
with arcsines as ``atan2``: no cancellation at correlation :math:`\pm 1`, so they
are accurate to round-off of their floating-point inputs at every variance
(tested 1e-8 to 1e8), finite, with gradients finite at correlation one, and a
pair of an item with itself gives exactly the self moment's formula.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn

from ..finite import Pointwise
from ..numerics import arccos_item_factors, arccos_moments, fused_arccos_moments, pair_determinant
from ..quadrature import gaussian_pair_moment
from ..state import KernelState, per_item, self_position_variances
from ..tanh_moments import tanh_derivative_pair_moment, tanh_pair_moment
from .base import Layer
from .closed_form_moments import erf_item_factors, erf_moments, erf_self_moment, gelu_moments, sinh_cosh_moments
from .nonlinearity_registry import TorchEquivalent, nonlinearity_from_name, register_nonlinearity

__all__ = [
    "GELU",
    "Abs",
    "ELU",
    "Cos",
    "Elementwise",
    "Erf",
    "Identity",
    "LeakyReLU",
    "Mish",
    "Nonlinearity",
    "ReLU",
    "SiLU",
    "Sigmoid",
    "Sign",
    "Sin",
    "Softplus",
    "Step",
    "Tanh",
    "variance_preserving_weight_variance",
]


class Nonlinearity(TorchEquivalent, Layer):
    """Base class: an elementwise function of Gaussian pre-activations.

    Subclasses define :meth:`function` (the torch function, used by the
    finite-width network), :meth:`pair_moments` and :meth:`self_moment`; a
    registered one (:func:`register_nonlinearity`) declares the torch operations
    it converts from (:class:`TorchEquivalent`).
    """

    name: str = "nonlinearity"

    def function(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def pair_moments(self, k11: Tensor, k22: Tensor, k12: Tensor, derivative: bool) -> tuple[Tensor, Tensor | None]:
        """``(E[phi(u) phi(v)], E[phi'(u) phi'(v)] or None)``.

        The second is computed only when ``derivative`` is true; ``None`` there
        means the derivative vanishes almost everywhere.
        """
        raise NotImplementedError  # pragma: no cover - abstract

    def self_moment(self, k: Tensor) -> Tensor:
        """``E[phi(u)^2]`` for ``u ~ N(0, k)``."""
        return self.pair_moments(k, k, k, False)[0]

    def _self_covariance(self, covariance: Tensor, first: Tensor, second: Tensor) -> Tensor:
        return self.pair_moments(first, second, covariance, False)[0]

    def item_factors(self, k11: Tensor, k22: Tensor) -> tuple | None:
        """Per-item tensors from which :meth:`fused_pair_moments` computes the pair moments elementwise.

        ``None`` (the default): this nonlinearity has no fused form.
        """
        return None

    def fused_pair_moments(
        self, k12: Tensor, factors: tuple, derivative: bool
    ) -> tuple[Tensor, Tensor | None]:  # pragma: no cover - abstract
        """:meth:`pair_moments` as pure elementwise operations on ``k12`` and the :meth:`item_factors`."""
        raise NotImplementedError

    def fusion_split(self, state: KernelState) -> tuple[KernelState, tuple] | None:
        if state.all_position_pairs:
            return None
        factors = self.item_factors(*state.position_variances())
        if factors is None:
            return None
        self._check_input(state)
        var1, var2 = per_item(self.self_moment, state.var1), per_item(self.self_moment, state.var2)
        return state.after_coordinatewise(var1=var1, var2=var2), factors

    def fused_pairs(
        self, cross: Tensor, ntk: Tensor | None, args: tuple, track_ntk: bool
    ) -> tuple[Tensor, Tensor | None]:
        value, derivative = self.fused_pair_moments(cross, args, track_ntk and ntk is not None)
        return value, _next_ntk(derivative, ntk)

    def _check_input(self, state: KernelState) -> None:
        if not state.gaussian:
            raise ValueError(
                f"{type(self).__name__} needs centred Gaussian pre-activations, i.e. the output of a "
                "Linear layer (or of sums and normalisations of such); it was applied to the network "
                "input or to the output of another nonlinearity. Put a Linear layer before it."
            )
        if state.track_ntk and state.ntk_feature_coupled:
            raise NotImplementedError(
                f"{type(self).__name__} directly after LayerNorm(elementwise_affine=True): the NTK of the "
                "per-unit gains is correlated with the pre-activations, which this recursion does not track. "
                "Put a Linear layer in between, or use LayerNorm(elementwise_affine=False)."
            )

    def forward(self, state: KernelState) -> KernelState:
        self._check_input(state)
        need_derivative = state.track_ntk and state.ntk is not None
        k11, k22 = state.position_variances()
        cross, derivative = self.pair_moments(k11, k22, state.cross, need_derivative)
        ntk = _next_ntk(derivative, state.ntk)
        if state.all_position_pairs:
            # Each item's covariance between its own positions is a pair moment too.
            grid_ndim = len(state.positions)
            var1 = per_item(self._self_covariance, state.var1, *self_position_variances(state.var1, grid_ndim))
            var2 = per_item(self._self_covariance, state.var2, *self_position_variances(state.var2, grid_ndim))
        else:
            var1, var2 = per_item(self.self_moment, state.var1), per_item(self.self_moment, state.var2)
        return state.after_coordinatewise(cross=cross, var1=var1, var2=var2, ntk=ntk)

    def finite_module(self, in_shape: tuple[int, ...], width: int) -> tuple[nn.Module, tuple[int, ...]]:
        return Pointwise(self.function, type(self).__name__), in_shape


def _next_ntk(derivative: Tensor | None, ntk: Tensor | None) -> Tensor | None:
    """``V_phi' * Theta``; ``None`` (identically zero) when either factor is (``derivative`` is computed only with an NTK)."""
    return None if derivative is None or ntk is None else derivative * ntk


@register_nonlinearity
class LeakyReLU(Nonlinearity):
    r"""Leaky ReLU :math:`\phi(u) = \max(u, 0) + a \min(u, 0)`.

    With the arc-cosine kernels :math:`J_1 = E[\mathrm{relu}(u)\mathrm{relu}(v)]`
    and :math:`J_0 = P(u > 0, v > 0)`:

    .. math::

        V_\phi = (1 - a)^2 J_1 + a k_{12}, \qquad V_{\phi'} = (1 - a)^2 J_0 + a,

    with :math:`J_1 = (\sqrt{k_{11} k_{22} - k_{12}^2} + (\pi - \theta) k_{12}) / 2\pi`,
    :math:`J_0 = (\pi - \theta) / 2\pi` and :math:`\theta = \arccos(k_{12} / \sqrt{k_{11} k_{22}})`.
    Gradients are exact and finite also at correlation :math:`\pm 1`.

    :param negative_slope: :math:`a`; 0 gives ReLU, -1 gives :math:`|u|`, 1 the identity.
    """

    name = "leaky_relu"
    torch_functions = (nn.functional.leaky_relu,)
    torch_modules = (nn.LeakyReLU,)
    torch_arguments = (("negative_slope", 0.01), ("inplace", False))

    def __init__(self, negative_slope: float = 0.01):
        super().__init__()
        negative_slope = float(negative_slope)
        if not math.isfinite(negative_slope):
            raise ValueError(f"negative_slope must be finite, got {negative_slope}")
        self.negative_slope = negative_slope

    def function(self, x: Tensor) -> Tensor:
        return torch.where(x > 0, x, self.negative_slope * x)

    def pair_moments(self, k11: Tensor, k22: Tensor, k12: Tensor, derivative: bool) -> tuple[Tensor, Tensor | None]:
        return self._from_arccos(k12, *arccos_moments(k11, k22, k12), derivative)

    def _from_arccos(self, k12: Tensor, j1: Tensor, j0: Tensor, derivative: bool) -> tuple[Tensor, Tensor | None]:
        a = self.negative_slope
        value = j1 if a == 0 else (1 - a) ** 2 * j1 + a * k12
        if not derivative:
            return value, None
        return value, (j0 if a == 0 else (1 - a) ** 2 * j0 + a)

    def item_factors(self, k11: Tensor, k22: Tensor) -> tuple:
        return arccos_item_factors(k11, k22)

    def fused_pair_moments(self, k12: Tensor, factors: tuple, derivative: bool) -> tuple[Tensor, Tensor | None]:
        return self._from_arccos(k12, *fused_arccos_moments(k12, factors), derivative)

    def self_moment(self, k: Tensor) -> Tensor:
        return (1 + self.negative_slope**2) / 2 * k

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope:g}"


@register_nonlinearity
class ReLU(LeakyReLU):
    r"""Rectified linear unit :math:`\max(u, 0)` (arc-cosine kernel of degree 1, Cho & Saul 2009).

    .. math::

        V_\phi = \frac{\sqrt{k_{11} k_{22} - k_{12}^2} + (\pi - \theta) k_{12}}{2\pi}, \qquad
        V_{\phi'} = \frac{\pi - \theta}{2\pi}.
    """

    name = "relu"
    torch_functions = (torch.relu, nn.functional.relu)
    torch_methods = ("relu",)
    torch_modules = (nn.ReLU,)
    torch_arguments = (("inplace", False),)

    def __init__(self):
        super().__init__(negative_slope=0.0)

    def function(self, x: Tensor) -> Tensor:
        return torch.relu(x)

    def extra_repr(self) -> str:
        return ""


@register_nonlinearity
class Abs(LeakyReLU):
    r"""Absolute value :math:`|u|`: :math:`V_\phi = 4 J_1 - k_{12}`, :math:`V_{\phi'} = 1 - 2\theta/\pi`."""

    name = "abs"
    torch_functions = (torch.abs,)
    torch_methods = ("abs",)

    def __init__(self):
        super().__init__(negative_slope=-1.0)

    def function(self, x: Tensor) -> Tensor:
        return torch.abs(x)

    def extra_repr(self) -> str:
        return ""


@register_nonlinearity
class Step(Nonlinearity):
    r"""Heaviside step :math:`1[u > 0]`: :math:`V_\phi = (\pi - \theta) / 2\pi`.

    Its derivative vanishes almost everywhere, so no gradient reaches the layers
    below: the NTK restarts from zero after this layer.  A zero-variance input
    (identically 0) gives 0, as ``1[0 > 0] = 0``.  A function of the correlation
    only, evaluated as ReLU's derivative kernel (:func:`~gpytorch_tp.numerics.arccos_moments`),
    so the same at every variance.
    """

    name = "step"

    def function(self, x: Tensor) -> Tensor:
        return (x > 0).to(x.dtype)

    def pair_moments(self, k11: Tensor, k22: Tensor, k12: Tensor, derivative: bool) -> tuple[Tensor, Tensor | None]:
        _, j0 = arccos_moments(k11, k22, k12)
        degenerate = (k11 == 0) | (k22 == 0)
        return torch.where(degenerate, torch.zeros_like(j0), j0), None

    def self_moment(self, k: Tensor) -> Tensor:
        return torch.where(k > 0, torch.full_like(k, 0.5), torch.zeros_like(k))


@register_nonlinearity
class Sign(Nonlinearity):
    r"""Sign function: :math:`V_\phi = 1 - 2\theta/\pi = (2/\pi) \arcsin(c)`.

    Its derivative vanishes almost everywhere, so the NTK restarts from zero
    after this layer.
    """

    name = "sign"

    def function(self, x: Tensor) -> Tensor:
        return torch.sign(x)

    def pair_moments(self, k11: Tensor, k22: Tensor, k12: Tensor, derivative: bool) -> tuple[Tensor, Tensor | None]:
        _, j0 = arccos_moments(k11, k22, k12)
        return 4 * j0 - 1, None

    def self_moment(self, k: Tensor) -> Tensor:
        return (k > 0).to(k.dtype)


@register_nonlinearity
class Erf(Nonlinearity):
    r"""Error function (Williams 1997):

    .. math::

        V_\phi = \frac{2}{\pi} \arcsin \frac{2 k_{12}}{\sqrt{(1 + 2 k_{11})(1 + 2 k_{22})}}, \qquad
        V_{\phi'} = \frac{4}{\pi} \frac{1}{\sqrt{(1 + 2 k_{11})(1 + 2 k_{22}) - 4 k_{12}^2}}.

    Evaluated as :math:`V_\phi = (2/\pi) \operatorname{atan2}(2 k_{12}, \sqrt N)`,
    :math:`V_{\phi'} = (4/\pi) / \sqrt N` with the radicand
    :math:`N = 1 + 2 k_{11} + 2 k_{22} + 4 (k_{11} k_{22} - k_{12}^2)` (positive
    terms; the difference of products cancels to noise at correlation one from
    variance ~1e4 in float32 on).
    """

    name = "erf"
    torch_functions = (torch.erf, torch.special.erf)
    torch_methods = ("erf",)

    def function(self, x: Tensor) -> Tensor:
        return torch.erf(x)

    def pair_moments(self, k11: Tensor, k22: Tensor, k12: Tensor, derivative: bool) -> tuple[Tensor, Tensor | None]:
        return self.fused_pair_moments(k12, self.item_factors(k11, k22), derivative)

    def item_factors(self, k11: Tensor, k22: Tensor) -> tuple:
        return erf_item_factors(k11, k22)

    def fused_pair_moments(self, k12: Tensor, factors: tuple, derivative: bool) -> tuple[Tensor, Tensor | None]:
        return erf_moments(k12, factors, derivative)  # also the reference (pair_moments): autograd-safe

    def self_moment(self, k: Tensor) -> Tensor:
        return erf_self_moment(k)


@register_nonlinearity
class GELU(Nonlinearity):
    r"""Gaussian error linear unit, exact form :math:`u \Phi(u)` (PyTorch's default ``GELU``).

    With :math:`a = k_{11}, b = k_{22}, r = k_{12}`, :math:`D = (1 + a)(1 + b) - r^2`
    and :math:`\rho = r / \sqrt{(1 + a)(1 + b)}` (derived with Stein's lemma):

    .. math::

        V_\phi = \frac{r}{4} + \frac{r \arcsin\rho}{2\pi}
                 + \frac{ab + r^2 \left(\frac{1}{1+a} + \frac{1}{1+b} - 1\right)}{2\pi\sqrt{D}},

        V_{\phi'} = \frac14 + \frac{\arcsin\rho}{2\pi}
                 + \frac{r}{2\pi\sqrt{D}} \left(\frac{1}{1+a} + \frac{1}{1+b}\right)
                 + \frac{r}{2\pi D^{3/2}}.
    """

    name = "gelu"
    torch_functions = (nn.functional.gelu,)
    torch_modules = (nn.GELU,)
    torch_arguments = (("approximate", "none"),)

    def function(self, x: Tensor) -> Tensor:
        return nn.functional.gelu(x)

    def pair_moments(self, k11: Tensor, k22: Tensor, k12: Tensor, derivative: bool) -> tuple[Tensor, Tensor | None]:
        return gelu_moments(k11, k22, k12, pair_determinant(k11, k22, k12), derivative)

    def self_moment(self, k: Tensor) -> Tensor:
        return gelu_moments(k, k, k, torch.zeros_like(k), False)[0]

    @classmethod
    def from_torch(cls, approximate: str = "none") -> Layer:
        # The tanh approximation has no closed form: quadrature.
        return cls() if approximate == "none" else Elementwise(_gelu_tanh, name="gelu_tanh")


def _gelu_tanh(x: Tensor) -> Tensor:
    return nn.functional.gelu(x, approximate="tanh")


@register_nonlinearity
class Sin(Nonlinearity):
    r"""Sine: :math:`V_\phi = e^{-(k_{11} + k_{22})/2} \sinh k_{12}`, :math:`V_{\phi'} = e^{-(k_{11} + k_{22})/2} \cosh k_{12}`.

    Evaluated through the distance-like :math:`d = (k_{11} - |k_{12}|) + (k_{22} - |k_{12}|)`
    (exact differences near correlation :math:`\pm 1`), as
    :math:`e^{-d/2} (1 \mp e^{-2|k_{12}|}) / 2`: accurate at every variance,
    where ``exp(k12 - (k11 + k22) / 2)`` inherits the rounding of the large sum.
    """

    name = "sin"
    torch_functions = (torch.sin,)
    torch_methods = ("sin",)
    #: 1 for :class:`Cos`, the sine shifted by a quarter period: sinh and cosh swap roles.
    quarter_shift = 0

    def function(self, x: Tensor) -> Tensor:
        return torch.sin(x)

    def pair_moments(self, k11: Tensor, k22: Tensor, k12: Tensor, derivative: bool) -> tuple[Tensor, Tensor | None]:
        return sinh_cosh_moments(k11, k22, k12, derivative, cosh_first=self.quarter_shift == 1)

    def self_moment(self, k: Tensor) -> Tensor:
        # (1 -+ e^{-2k}) / 2; expm1 keeps the sine's small-variance digits.
        return -torch.expm1(-2 * k) / 2 if self.quarter_shift == 0 else (1 + torch.exp(-2 * k)) / 2


@register_nonlinearity
class Cos(Sin):
    r"""Cosine :math:`\sin(u + \pi/2)`: :math:`V_\phi = e^{-(k_{11} + k_{22})/2} \cosh k_{12}`.

    :math:`V_{\phi'} = e^{-(k_{11} + k_{22})/2} \sinh k_{12}`, evaluated as :class:`Sin` is.
    """

    name = "cos"
    torch_functions = (torch.cos,)
    torch_methods = ("cos",)
    quarter_shift = 1

    def function(self, x: Tensor) -> Tensor:
        return torch.cos(x)


@register_nonlinearity
class Identity(TorchEquivalent, Layer):
    """The identity map; accepts any state and changes nothing."""

    name = "identity"

    def function(self, x: Tensor) -> Tensor:
        return x

    def forward(self, state: KernelState) -> KernelState:
        return state

    def finite_module(self, in_shape: tuple[int, ...], width: int) -> tuple[nn.Module, tuple[int, ...]]:
        return nn.Identity(), in_shape


class Elementwise(Nonlinearity):
    r"""Any elementwise function, integrated numerically.

    :math:`V_\phi` and :math:`V_{\phi'}` are evaluated with a tensor-product
    trapezoidal rule of ``num_quadrature_points`` nodes per dimension on
    :math:`[-8.5, 8.5]` (float64) in the standard normal variables of
    :math:`u = \sqrt{k_{11}} z_1`, :math:`v = \sqrt{k_{22}} (c z_1 + \sqrt{1 - c^2} z_2)`
    (see :func:`gpytorch_tp.quadrature.gaussian_rule`).
    Gradients with respect to the covariance use Price's theorem
    (:math:`\partial V / \partial k_{12} = E[\phi'\phi']`,
    :math:`\partial V / \partial k_{11} = E[\phi''(u)\phi(v)]/2`), so they are
    finite also at correlation one.  Derivatives of ``fn`` come from autograd
    unless ``derivative`` is given.

    Accuracy (relative error of :math:`V_\phi` for tanh, measured against nested
    adaptive integration; both variances equal to :math:`k`, correlation 0.5-0.99):

    ========  ==========  ==========  ==========
    points    k = 1       k = 3       k = 10
    ========  ==========  ==========  ==========
    64        5e-14       3e-8        6e-5
    96        1e-15       5e-13       2e-7
    128       1e-15       6e-16       5e-10
    ========  ==========  ==========  ==========

    The error grows with the pre-activation variance because a saturating
    function of :math:`\sqrt{k} z` varies on a scale :math:`1/\sqrt{k}`; raise
    ``num_quadrature_points`` for large weight variances or deep stacks.
    Derivative kernels (used by the NTK and by gradients) involve higher
    derivatives of :math:`\phi` and need more points for the same accuracy
    (at :math:`k = 4` the third-derivative moments reach 2e-7 with 96 points,
    1e-3 with 64).  Functions with kinks or jumps converge slowly; prefer a
    closed-form layer for them.  Cost: ``num_quadrature_points**2`` function
    evaluations per pair of inputs (and per derivative order).

    :param fn: elementwise torch function (e.g. ``torch.tanh``). Lambdas work but
        make the kernel unpicklable; use a module-level function to pickle.
    :param derivative: optional first derivative of ``fn``.
    :param num_quadrature_points: nodes per dimension (default 96).
    :param name: display name.
    """

    name = "elementwise"
    #: Integrate on Gauss-Legendre panels split where ``u = 0`` and ``v = 0`` (for a ``fn``
    #: smooth except at 0, such as :class:`ELU`): the trapezoidal rule converges slowly there.
    split_at_zero = False

    def __init__(
        self,
        fn: Callable[[Tensor], Tensor],
        derivative: Callable[[Tensor], Tensor] | None = None,
        num_quadrature_points: int = 96,
        name: str | None = None,
    ):
        super().__init__()
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        if derivative is not None and not callable(derivative):
            raise TypeError(f"derivative must be callable, got {type(derivative).__name__}")
        if int(num_quadrature_points) < 2:
            raise ValueError(f"num_quadrature_points must be at least 2, got {num_quadrature_points}")
        self.fn = fn
        self.derivative = derivative
        self.num_quadrature_points = int(num_quadrature_points)
        if name is not None:
            self.name = name

    def function(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def derivatives(self, x: Tensor, order: int) -> Tensor | None:
        """Closed-form ``order``-th derivative of ``fn`` at ``x``, or ``None`` to use autograd."""
        return None

    def pair_moments(self, k11: Tensor, k22: Tensor, k12: Tensor, derivative: bool) -> tuple[Tensor, Tensor | None]:
        options = {
            "derivative_fn": self.derivative,
            "derivatives": self.derivatives,
            "num_points": self.num_quadrature_points,
        }
        if self.split_at_zero:
            options["split_at_zero"] = True
        value = gaussian_pair_moment(k11, k22, k12, self.fn, order=0, **options)
        if not derivative:
            return value, None
        return value, gaussian_pair_moment(k11, k22, k12, self.fn, order=1, **options)

    def extra_repr(self) -> str:
        return f"{self.name}, num_quadrature_points={self.num_quadrature_points}"


def _softplus(x: Tensor) -> Tensor:
    return nn.functional.softplus(x)


def _silu(x: Tensor) -> Tensor:
    return nn.functional.silu(x)


def _sigmoid_derivatives(x: Tensor, order: int) -> Tensor | None:
    """Derivatives of the logistic sigmoid, as polynomials in ``s = sigmoid(x)``."""
    s = torch.sigmoid(x)
    if order == 0:
        return s
    d1 = s * (1 - s)
    if order == 1:
        return d1
    if order == 2:
        return d1 * (1 - 2 * s)
    if order == 3:
        return d1 * (1 - 6 * d1)
    if order == 4:
        return d1 * (1 - 2 * s) * (1 - 12 * d1)
    return None


class _ScaledTanh(Elementwise):
    r""":math:`\phi(x) = b + g \tanh(s x)`: in closed form through tanh's erf expansion (default), or by quadrature.

    tanh is odd, so for a centred Gaussian pair :math:`V_\phi = b^2 + g^2
    E[\tanh(sU)\tanh(sV)]` and :math:`V_{\phi'} = g^2 s^2 E[\tanh'(sU)\tanh'(sV)]`,
    the closed forms of :func:`~gpytorch_tp.tanh_moments.tanh_pair_moment` and
    :func:`~gpytorch_tp.tanh_moments.tanh_derivative_pair_moment` on the covariance
    scaled by :math:`s^2`.
    """

    offset = 0.0  # b
    gain = 1.0  # g
    inner = 1.0  # s

    def __init__(self, fn: Callable[[Tensor], Tensor], num_quadrature_points: int | None = None):
        super().__init__(fn, num_quadrature_points=96 if num_quadrature_points is None else num_quadrature_points)
        self.expansion = num_quadrature_points is None

    def pair_moments(self, k11: Tensor, k22: Tensor, k12: Tensor, derivative: bool) -> tuple[Tensor, Tensor | None]:
        if not self.expansion:
            return super().pair_moments(k11, k22, k12, derivative)
        scale = self.inner**2
        if scale != 1.0:
            k11, k22, k12 = k11 * scale, k22 * scale, k12 * scale
        if self.offset**2 == self.gain**2 != 0.0:
            # b^2 + g^2 T = g^2 (1 + T): positive terms where T -> -1 (sigmoid at correlation -1).
            value = tanh_pair_moment(k11, k22, k12, plus_one=True) * self.gain**2
        else:
            value = tanh_pair_moment(k11, k22, k12)
            if self.gain != 1.0 or self.offset != 0.0:
                value = value * self.gain**2 + self.offset**2
        if not derivative:
            return value, None
        return value, tanh_derivative_pair_moment(k11, k22, k12) * (self.gain * self.inner) ** 2

    def extra_repr(self) -> str:
        return "erf expansion" if self.expansion else super().extra_repr()


@register_nonlinearity
class Tanh(_ScaledTanh):
    r"""Hyperbolic tangent: in closed form through an erf expansion (default), or by quadrature.

    By default :math:`\tanh(x)` is written as :math:`\sum_{k=1}^{6} c_k
    \operatorname{erf}(a_k x)` (a fit with error below 4.9e-7 for every real
    :math:`x`, 8.5e-7 for the derivative), so that :math:`V_\phi` and
    :math:`V_{\phi'}` are sums of 36 closed-form terms
    (:func:`~gpytorch_tp.tanh_moments.tanh_pair_moment`,
    :func:`~gpytorch_tp.tanh_moments.tanh_derivative_pair_moment`): accurate to
    1e-6 and 2e-6 at every variance, hundreds of times cheaper than the
    quadrature, with exact analytic gradients.

    :param num_quadrature_points: ``None`` (default) for the closed form; a
        number of points for the trapezoidal rule of :class:`Elementwise`
        instead (more accurate at moderate variances: 2e-7 with 96 points up to
        variance 10, see ``docs/mlp.md``).
    """

    name = "tanh"
    torch_functions = (torch.tanh, nn.functional.tanh)
    torch_methods = ("tanh",)
    torch_modules = (nn.Tanh,)

    def __init__(self, num_quadrature_points: int | None = None):
        super().__init__(torch.tanh, num_quadrature_points)

    def derivatives(self, x: Tensor, order: int) -> Tensor | None:
        t = torch.tanh(x)
        if order == 0:
            return t
        d1 = 1 - t * t
        if order == 1:
            return d1
        if order == 2:
            return -2 * t * d1
        if order == 3:
            return -2 * d1 * (1 - 3 * t * t)
        if order == 4:
            return 8 * t * d1 * (2 - 3 * t * t)
        return None


@register_nonlinearity
class Sigmoid(_ScaledTanh):
    r"""Logistic sigmoid: in closed form through :class:`Tanh`'s erf expansion (default), or by quadrature.

    :math:`\sigma(x) = (1 + \tanh(x/2)) / 2`, so :math:`V_\sigma = 1/4 +
    E[\tanh(U/2)\tanh(V/2)]/4` and :math:`V_{\sigma'} = E[\tanh'(U/2)\tanh'(V/2)]/16`
    (see :class:`_ScaledTanh`), accurate to 2.5e-7 and 1.3e-7.

    :param num_quadrature_points: ``None`` (default) for the closed form; a
        number of points for the trapezoidal rule of :class:`Elementwise` instead.
    """

    name = "sigmoid"
    torch_functions = (torch.sigmoid, nn.functional.sigmoid)
    torch_methods = ("sigmoid",)
    torch_modules = (nn.Sigmoid,)
    offset = gain = inner = 0.5

    def __init__(self, num_quadrature_points: int | None = None):
        super().__init__(torch.sigmoid, num_quadrature_points)

    def derivatives(self, x: Tensor, order: int) -> Tensor | None:
        return _sigmoid_derivatives(x, order)


@register_nonlinearity
class SiLU(Elementwise):
    """SiLU / swish :math:`u\\sigma(u)`, by quadrature (see :class:`Elementwise`)."""

    name = "silu"
    torch_functions = (nn.functional.silu,)
    torch_modules = (nn.SiLU,)
    torch_arguments = (("inplace", False),)

    def __init__(self, num_quadrature_points: int = 96):
        super().__init__(_silu, num_quadrature_points=num_quadrature_points)

    def derivatives(self, x: Tensor, order: int) -> Tensor | None:
        # (x s)^(n) = n s^(n-1) + x s^(n)
        if order == 0:
            return _silu(x)
        if order > 4:
            return None
        return order * _sigmoid_derivatives(x, order - 1) + x * _sigmoid_derivatives(x, order)


@register_nonlinearity
class Softplus(Elementwise):
    """Softplus :math:`\\log(1 + e^u)`, by quadrature (see :class:`Elementwise`)."""

    name = "softplus"
    torch_functions = (nn.functional.softplus,)
    torch_modules = (nn.Softplus,)
    torch_arguments = (("beta", 1.0), ("threshold", 20.0))

    def __init__(self, num_quadrature_points: int = 96):
        super().__init__(_softplus, num_quadrature_points=num_quadrature_points)

    def derivatives(self, x: Tensor, order: int) -> Tensor | None:
        if order == 0:
            return _softplus(x)
        return _sigmoid_derivatives(x, order - 1)

    @classmethod
    def from_torch(cls, beta: float = 1.0, threshold: float = 20.0) -> Layer | None:
        # threshold only switches to the identity where the two agree to round-off.
        return cls() if beta == 1 else None


@register_nonlinearity
class ELU(Elementwise):
    r"""ELU: :math:`u` for :math:`u > 0`, :math:`\alpha (e^u - 1)` otherwise, by quadrature.

    :math:`\phi'` jumps at 0 (or, for :math:`\alpha = 1`, :math:`\phi''`), so the
    Gauss-Legendre panels of :class:`Elementwise` split at 0 (``split_at_zero``)
    are used: with the default points :math:`V_\phi` and :math:`V_{\phi'}` are
    accurate to ~1e-10 for variances up to 10.

    :param alpha: the negative saturation value :math:`-\alpha` (``nn.ELU``'s ``alpha``).
    """

    name = "elu"
    torch_functions = (nn.functional.elu,)
    torch_modules = (nn.ELU,)
    torch_arguments = (("alpha", 1.0), ("inplace", False))
    split_at_zero = True

    def __init__(self, alpha: float = 1.0, num_quadrature_points: int = 96):
        alpha = float(alpha)
        if not math.isfinite(alpha):
            raise ValueError(f"alpha must be finite, got {alpha}")
        super().__init__(partial(nn.functional.elu, alpha=alpha), num_quadrature_points=num_quadrature_points)
        self.alpha = alpha

    def derivatives(self, x: Tensor, order: int) -> Tensor:
        if order == 0:
            return nn.functional.elu(x, self.alpha)
        # exp of the clamped input: no overflow on the unused branch.
        return torch.where(x > 0, 1.0 if order == 1 else 0.0, self.alpha * torch.exp(x.clamp(max=0.0)))

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}, num_quadrature_points={self.num_quadrature_points}"


def _mish_derivative(x: Tensor) -> Tensor:
    # d/dx [x tanh(softplus(x))] = tanh(sp) + x (1 - tanh(sp)^2) sigmoid(x)
    t = torch.tanh(nn.functional.softplus(x))
    return t + x * (1 - t * t) * torch.sigmoid(x)


@register_nonlinearity
class Mish(Elementwise):
    r"""Mish :math:`u \tanh(\log(1 + e^u))` by quadrature (:class:`Elementwise`); higher derivatives by autograd."""

    name = "mish"
    torch_functions = (nn.functional.mish,)
    torch_modules = (nn.Mish,)
    torch_arguments = (("inplace", False),)

    def __init__(self, num_quadrature_points: int = 96):
        super().__init__(nn.functional.mish, derivative=_mish_derivative, num_quadrature_points=num_quadrature_points)


# Weight variances that keep the pre-activation variance constant through depth
# (He et al. 2015 for the ReLU family); 1 for everything else.
_VARIANCE_PRESERVING = {"relu": 2.0, "abs": 1.0}


def variance_preserving_weight_variance(nonlinearity: Layer) -> float:
    """The weight variance that keeps pre-activation variances constant through depth (2 for ReLU, else 1)."""
    return _VARIANCE_PRESERVING.get(getattr(nonlinearity, "name", ""), 1.0)

r"""The Gaussian process of an infinitely wide network at any time of its training.

A wide network :math:`f(\cdot\,; \theta)` trained by gradient descent on a
squared loss moves like its linearisation around the initial parameters
(Lee et al. 2019, arXiv 1902.06720).  With :math:`\Theta` the NTK and
:math:`K` the NNGP kernel, the network function at training time :math:`t` is

.. math::

    f_t(x) = f_0(x) + A_t(x)\,\bigl(Y - f_0(X)\bigr), \qquad
    A_t(x) = \Theta(x, X)\, M^{-1} \bigl(I - e^{-\eta M t}\bigr), \qquad
    M = \Theta(X, X) + \lambda I,

where :math:`f_0 \sim \mathcal{GP}(0, K)` is the network at initialisation,
:math:`(X, Y)` the training data, :math:`\eta` the learning rate and
:math:`\lambda \ge 0` an optional ridge (see :class:`TrainedNetworkGP`).  Being
linear in the Gaussian :math:`f_0`, :math:`f_t` is a Gaussian process with

.. math::

    \mu_t(x) &= A_t(x)\, Y, \\
    \Sigma_t(x, x') &= K(x, x') + A_t(x) \bigl(K(X, X) + s I\bigr) A_t(x')^\top
        - A_t(x) K(X, x') - K(x, X) A_t(x')^\top ,

(:math:`s` is the variance of optional per-network target noise, 0 by default).
Discrete gradient descent with :math:`k` steps replaces
:math:`e^{-\eta M t}` by :math:`(I - \eta M)^k`.  Training only the readout
layer replaces :math:`\Theta` by :math:`K`; at :math:`t = \infty` with
:math:`s = \lambda = \sigma^2` this is the ordinary GP posterior with noise
variance :math:`\sigma^2`.

Everything is computed from one eigendecomposition :math:`M = V \operatorname{diag}(\mu) V^\top`,
made once and reused for all times and test sets:
:math:`M^{-1}(I - e^{-\eta M t}) = V \operatorname{diag}\bigl(-\operatorname{expm1}(-\eta \mu t)/\mu\bigr) V^\top`,
whose entries tend to :math:`\eta t` as :math:`\mu \to 0`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
from gpytorch.distributions import MultitaskMultivariateNormal, MultivariateNormal
from gpytorch.kernels import Kernel
from linear_operator import to_dense
from linear_operator.operators import (
    DenseLinearOperator,
    DiagLinearOperator,
    IdentityLinearOperator,
    KroneckerProductLinearOperator,
)
from torch import Tensor

from .early_stopping import StoppingTime, search_stopping_time
from .evaluation import evaluate
from .kernels.tensor_program_kernel import TensorProgramKernel
from .layers.base import Layer

__all__ = ["LOSSES", "TRAINED", "ExpectedLoss", "StoppingTime", "TrainedNetworkGP"]

TRAINED = ("all", "readout")
LOSSES = ("half_sum", "mse")

KernelLike = Layer | TensorProgramKernel | Kernel | Callable | tuple


class ExpectedLoss(NamedTuple):
    """Expected squared-error loss of a network drawn from the trained ensemble.

    ``loss = bias + variance``: ``bias`` is the loss of the ensemble mean and
    ``variance`` the expected spread of one network around it.
    """

    loss: Tensor
    bias: Tensor
    variance: Tensor


def _is_kernel_callable(obj) -> bool:
    return isinstance(obj, Kernel) or callable(obj)


class TrainedNetworkGP:
    r"""Distribution of an infinitely wide network trained by gradient descent.

    The network starts from its random initialisation (the NNGP prior) and is
    trained on ``(train_x, train_y)`` by gradient flow (``t``) or by gradient
    descent (``steps``) on the squared loss.  Calling the object gives the
    distribution of the network function at the requested training time(s),
    on any inputs; see the module docstring for the formulas.

    **Loss and learning rate.**  With ``loss="half_sum"`` (default) the loss is
    :math:`L = \tfrac12 \sum_{i,k} (f_k(x_i) - y_{ik})^2` and gradient descent is
    :math:`\theta \leftarrow \theta - \eta \nabla_\theta L`; gradient flow is
    :math:`\dot\theta = -\eta \nabla_\theta L`, so only the product
    :math:`\eta t` matters.  ``loss="mse"`` is ``torch.nn.MSELoss()``:
    :math:`L = \frac{1}{n m} \sum_{i,k} (f_k(x_i) - y_{ik})^2`, equivalent to
    ``half_sum`` with learning rate :math:`2\eta / (n m)`.  The parameters are
    those of the NTK parameterisation (:class:`~gpytorch_tp.layers.Linear`):
    standard normal weights, scaled in the forward pass.

    **Regulariser and noise.**  ``noise`` :math:`= \lambda` adds
    :math:`\tfrac{\lambda}{2} \lVert \theta - \theta_0 \rVert^2` to the loss
    (weight decay towards the initial parameters), which adds :math:`\lambda I`
    to the training NTK.  ``target_noise`` :math:`= s` (default: equal to
    ``noise``) trains each network of the ensemble on its own noisy targets
    :math:`Y + \varepsilon`, :math:`\varepsilon \sim N(0, s I)`.  With
    ``noise = target_noise = sigma^2``, the readout-trained ensemble at
    :math:`t = \infty` is exactly the GP posterior with noise variance
    :math:`\sigma^2`; with all layers trained the mean is the NTK's kernel
    ridge regression, but the covariance is not a GP posterior's.  The
    predicted outputs are the network's (noise-free) function values.

    **Outputs.**  ``train_y`` of shape ``(n,)`` gives a
    :class:`~gpytorch.distributions.MultivariateNormal`; shape ``(n, m)`` gives
    a :class:`~gpytorch.distributions.MultitaskMultivariateNormal` with mean
    ``(N, m)``: the ``m`` output units are independent and share the
    covariance (the covariance operator is ``Sigma_t kron I_m``, interleaved).
    A tensor of times of shape ``S`` adds batch dimensions ``S`` in front.

    **Numerics.**  The training kernels and one eigendecomposition of
    :math:`M` are computed once (lazily) and cached; the kernels of the last
    test set are cached too.  :math:`t = \infty` alone uses a Cholesky
    factorisation of :math:`M` when one exists.  Kernels are evaluated without
    gradient tracking: the predictions are not differentiable with respect to
    kernel hyperparameters.

    :param train_x: training inputs, ``(n, d)``.
    :param train_y: training targets, ``(n,)`` or ``(n, m)``.
    :param kernel: the network, one of: an architecture
        (:class:`~gpytorch_tp.layers.Layer`); a
        :class:`~gpytorch_tp.TensorProgramKernel` (its architecture gives both
        kernels, whatever its ``kind``); a pair ``(nngp, ntk)`` of GPyTorch
        kernels or callables ``(x1, x2) -> (N1, N2) tensor``; or, with
        ``trained="readout"``, a single NNGP kernel.
    :param learning_rate: :math:`\eta > 0`.
    :param trained: ``"all"`` (every layer trained: NTK dynamics) or
        ``"readout"`` (only the last layer: :math:`\Theta = K`).
    :param noise: ridge :math:`\lambda \ge 0` (see above).
    :param target_noise: target-noise variance :math:`s \ge 0`; default ``noise``.
    :param loss: ``"half_sum"`` or ``"mse"`` (see above).
    :param dtype: working dtype (default ``torch.float64``).
    :param psd_tolerance: relative tolerance below which negative eigenvalues
        of the training kernels are treated as round-off (else ``ValueError``).

    Example:
        >>> import torch
        >>> from gpytorch_tp import TrainedNetworkGP
        >>> from gpytorch_tp.layers import Linear, ReLU, Sequential
        >>> net = Sequential(Linear(2.0, 0.1), ReLU(), Linear(1.0, 0.1))
        >>> x = torch.linspace(-2, 2, 8).unsqueeze(-1)
        >>> gp = TrainedNetworkGP(x, torch.sin(x).squeeze(-1), net, learning_rate=0.1)
        >>> dist = gp(torch.randn(5, 1), t=torch.tensor([0.0, 10.0, float("inf")]))
        >>> dist.mean.shape, dist.covariance_matrix.shape
        (torch.Size([3, 5]), torch.Size([3, 5, 5]))
        >>> gp.max_learning_rate > 0
        True
    """

    def __init__(
        self,
        train_x: Tensor,
        train_y: Tensor,
        kernel: KernelLike,
        *,
        learning_rate: float = 1.0,
        trained: str = "all",
        noise: float = 0.0,
        target_noise: float | None = None,
        loss: str = "half_sum",
        dtype: torch.dtype = torch.float64,
        psd_tolerance: float = 1e-6,
    ):
        if trained not in TRAINED:
            raise ValueError(f"trained must be one of {TRAINED}, got {trained!r}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.trained = trained
        self.loss = loss
        self.dtype = dtype
        self.learning_rate = _positive_finite(learning_rate, "learning_rate")
        self.noise = _nonnegative_finite(noise, "noise")
        self.target_noise = self.noise if target_noise is None else _nonnegative_finite(target_noise, "target_noise")
        self.psd_tolerance = _nonnegative_finite(psd_tolerance, "psd_tolerance")
        self._nngp_fn, self._ntk_fn = self._kernel_functions(kernel)

        self.train_x = self._check_x(train_x, "train_x", expected_d=None)
        if not torch.is_tensor(train_y):
            raise TypeError(f"train_y must be a torch.Tensor, got {type(train_y).__name__}")
        if not (train_y.is_floating_point() or train_y.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"train_y must be real-valued, got {train_y.dtype}")
        if train_y.dim() not in (1, 2):
            raise ValueError(f"train_y must have shape (n,) or (n, m), got {tuple(train_y.shape)}")
        if train_y.shape[0] != self.train_x.shape[0]:
            raise ValueError(f"train_x has {self.train_x.shape[0]} points but train_y has {train_y.shape[0]} rows")
        if train_y.dim() == 2 and train_y.shape[1] < 1:
            raise ValueError("train_y has no outputs (shape (n, 0))")
        train_y = train_y.to(device=self.train_x.device, dtype=dtype)
        if not bool(torch.isfinite(train_y).all()):
            raise ValueError("train_y contains NaN or infinite values")
        self.single_output = train_y.dim() == 1
        self.train_y = train_y.unsqueeze(-1) if self.single_output else train_y
        self.num_train, self.num_outputs = self.train_y.shape
        # Rate of the gradient flow of 1/2 sum (f - y)^2 that the chosen loss amounts to.
        self._rate = self.learning_rate * (1.0 if loss == "half_sum" else 2.0 / (self.num_train * self.num_outputs))

        with torch.no_grad():
            k_train, ntk_train = self._kernels(self.train_x, None, diag=False)
        self.train_nngp = _symmetrise(k_train)
        self.train_ntk = _symmetrise(ntk_train)
        self._check_psd(self.train_nngp, "NNGP kernel")
        self._eig: tuple[Tensor, Tensor] | None = None
        self._chol: Tensor | None | bool = None  # None: not tried; False: failed
        self._test_cache: tuple | None = None

    # ------------------------------------------------------------------ kernels

    def _kernel_functions(self, kernel):
        """(nngp_fn, ntk_fn or None), each ``(x1, x2 or None, diag) -> Tensor``."""
        readout = self.trained == "readout"
        if isinstance(kernel, Layer):
            arch = kernel

            def both(x1, x2, diag):
                return evaluate(arch, x1, x2, diag=diag, ntk=not readout)

            return ("both", both), None
        if isinstance(kernel, TensorProgramKernel):
            tp = kernel

            def both(x1, x2, diag):
                if readout:
                    return tp.nngp_and_ntk(x1, x2, diag=diag)[0], None
                return tp.nngp_and_ntk(x1, x2, diag=diag)

            return ("both", both), None
        if isinstance(kernel, tuple | list):
            if len(kernel) != 2:
                raise ValueError(f"kernel as a sequence must be a pair (nngp, ntk), got {len(kernel)} items")
            nngp, ntk = kernel
            if not _is_kernel_callable(nngp):
                raise TypeError(f"the NNGP kernel must be a gpytorch Kernel or a callable, got {type(nngp).__name__}")
            if ntk is None:
                if not readout:
                    raise ValueError('trained="all" needs an NTK; pass (nngp_kernel, ntk_kernel)')
                return _wrap_kernel(nngp), None
            if not _is_kernel_callable(ntk):
                raise TypeError(f"the NTK must be a gpytorch Kernel or a callable, got {type(ntk).__name__}")
            return _wrap_kernel(nngp), (None if readout else _wrap_kernel(ntk))
        if _is_kernel_callable(kernel):
            if not readout:
                raise ValueError(
                    'a single kernel only describes readout training; use trained="readout", or pass an '
                    "architecture, a TensorProgramKernel or an (nngp, ntk) pair"
                )
            return _wrap_kernel(kernel), None
        raise TypeError(
            "kernel must be a gpytorch_tp Layer, a TensorProgramKernel, an (nngp, ntk) pair of kernels or "
            f"callables, or (for readout training) one kernel; got {type(kernel).__name__}"
        )

    def _kernels(self, x1: Tensor, x2: Tensor | None, diag: bool) -> tuple[Tensor, Tensor]:
        """(NNGP, NTK) between x1 and x2 in the working dtype; NTK := NNGP for readout training."""
        if isinstance(self._nngp_fn, tuple):
            k, ntk = self._nngp_fn[1](x1, x2, diag)
        else:
            k = self._nngp_fn(x1, x2, diag)
            ntk = None if self._ntk_fn is None else self._ntk_fn(x1, x2, diag)
        if self.trained == "readout":
            ntk = k
        k, ntk = (self._as_matrix(m, x1, x2, diag, name) for m, name in ((k, "NNGP kernel"), (ntk, "NTK")))
        return k, ntk

    def _as_matrix(self, value, x1: Tensor, x2: Tensor | None, diag: bool, name: str) -> Tensor:
        value = to_dense(value) if not torch.is_tensor(value) else value
        value = value.to(self.dtype)
        n1 = x1.shape[0]
        n2 = n1 if x2 is None else x2.shape[0]
        expected = (n1,) if diag else (n1, n2)
        if tuple(value.shape) != expected:
            raise ValueError(f"the {name} returned shape {tuple(value.shape)}, expected {expected}")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"the {name} contains NaN or infinite values")
        return value

    def _check_x(self, x: Tensor, name: str, expected_d: int | None) -> Tensor:
        if not torch.is_tensor(x):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {x.dtype}")
        if x.dim() != 2:
            raise ValueError(
                f"{name} must have shape (n, d), got {tuple(x.shape)} (use x.unsqueeze(-1) for 1-d inputs)"
            )
        if x.shape[0] < 1:
            raise ValueError(f"{name} has no points")
        if expected_d is not None and x.shape[1] != expected_d:
            raise ValueError(f"{name} has {x.shape[1]} features but train_x has {expected_d}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or infinite values")
        return x.detach().to(self.dtype)

    def _check_psd(self, matrix: Tensor, name: str) -> Tensor:
        evals = torch.linalg.eigvalsh(matrix)
        self._raise_if_not_psd(evals, name)
        return evals

    def _raise_if_not_psd(self, evals: Tensor, name: str) -> None:
        scale = evals.abs().max().clamp_min(torch.finfo(self.dtype).tiny)
        lowest = evals.min()
        if lowest < -self.psd_tolerance * scale:
            raise ValueError(
                f"the training {name} is not positive semi-definite: smallest eigenvalue {lowest.item():.3g} "
                f"(largest {scale.item():.3g}, relative tolerance {self.psd_tolerance:g})"
            )

    # ------------------------------------------------------------ factorisations

    @property
    def _eigen(self) -> tuple[Tensor, Tensor]:
        """Eigenvalues (clamped at 0) and eigenvectors of ``M = Theta(X, X) + noise I``."""
        if self._eig is None:
            matrix = self.train_ntk + self.noise * torch.eye(
                self.num_train, dtype=self.dtype, device=self.train_ntk.device
            )
            evals, evecs = torch.linalg.eigh(matrix)
            ntk_vals = evals - self.noise  # eigenvalues of Theta(X, X) itself
            self._raise_if_not_psd(ntk_vals, "NTK" if self.trained == "all" else "NNGP kernel")
            ntk_vals = ntk_vals.clamp_min(0.0)
            evals = ntk_vals + self.noise
            # Directions the training kernel cannot resolve from zero are its exact null space:
            # Theta(x, X) v = 0 there, so they take no part in training.
            self._null = evals <= self.num_train * torch.finfo(self.dtype).eps * evals.max()
            self._eig = (evals, evecs)
            self._eig_y = evecs.transpose(-1, -2) @ self.train_y
            k_eig = evecs.transpose(-1, -2) @ self.train_nngp @ evecs
            self._eig_k = _symmetrise(k_eig)
            self._eig_ntk_vals = ntk_vals
        return self._eig

    @property
    def _cholesky(self) -> Tensor | None:
        if self._chol is None:
            matrix = self.train_ntk + self.noise * torch.eye(
                self.num_train, dtype=self.dtype, device=self.train_ntk.device
            )
            factor, info = torch.linalg.cholesky_ex(matrix)
            self._chol = factor if int(info) == 0 else False
        return self._chol if self._chol is not False else None

    @property
    def eigenvalues(self) -> Tensor:
        r"""Eigenvalues of :math:`M = \Theta(X, X) + \lambda I`, ascending (the rates of training are ``eta * mu``)."""
        return self._eigen[0]

    @property
    def max_learning_rate(self) -> float:
        r"""Largest stable learning rate of gradient descent, :math:`2 / \mu_{\max}` in the chosen loss's units.

        With a learning rate at or above it, discrete gradient descent diverges
        (:math:`|1 - \eta \mu_{\max}| \ge 1`); gradient flow has no such limit.
        """
        mu_max = float(self._eigen[0].max())
        if mu_max <= 0:
            return math.inf
        return 2.0 / mu_max * (self.learning_rate / self._rate)

    # -------------------------------------------------------------------- times

    def _times(self, t, steps) -> tuple[Tensor, bool]:
        """Times as a float tensor, and whether they count discrete steps."""
        if (t is None) == (steps is None):
            raise ValueError("give exactly one of t (gradient flow time) or steps (gradient descent steps)")
        discrete = steps is not None
        value = steps if discrete else t
        name = "steps" if discrete else "t"
        if torch.is_tensor(value):
            if value.is_complex() or value.dtype == torch.bool:
                raise TypeError(f"{name} must be real, got {value.dtype}")
            times = value.detach().to(device=self.train_x.device, dtype=torch.float64)
        else:  # Python numbers and lists: straight to float64 (no float32 rounding on the way)
            times = torch.as_tensor(value, dtype=torch.float64, device=self.train_x.device)
        if bool(torch.isnan(times).any()):
            raise ValueError(f"{name} contains NaN")
        if bool((times < 0).any()):
            raise ValueError(f"{name} must be non-negative, got minimum {times.min().item():g}")
        if discrete:
            finite = times[torch.isfinite(times)]
            if bool((finite != finite.round()).any()):
                raise ValueError("steps must be whole numbers (or inf)")
        return times, discrete

    def _filter(self, times: Tensor, discrete: bool) -> Tensor:
        r"""``h(mu, t)``: eigenvalues of :math:`M^{-1}(I - e^{-\eta M t})` (or with ``(I - eta M)^k``), ``(*S, n)``."""
        return self._spectral(times, discrete)[0]

    def _spectral(self, times: Tensor, discrete: bool) -> tuple[Tensor, Tensor]:
        r"""``(h, decay)`` per time and eigenvalue, each ``(T, n)``.

        ``decay`` is :math:`e^{-\eta \mu t}` (or :math:`(1 - \eta \mu)^k`), the factor by which a
        residual along the eigenvector shrinks; ``h = (1 - decay) / mu``, with the limit
        ``eta t`` (``eta k``) as ``mu -> 0``.  Both are formed without cancellation:
        ``1 - decay`` through ``expm1`` / ``log1p``.  Directions of the exact null space
        (see :attr:`_null`) are not trained: ``h = 0``, ``decay = 1``.
        """
        mu, _ = self._eigen
        rate = self._rate
        tt = times.to(device=mu.device, dtype=self.dtype).unsqueeze(-1)
        infinite = torch.isinf(tt)
        finite_t = torch.where(infinite, torch.zeros_like(tt), tt)
        positive = mu > 0
        safe_mu = torch.where(positive, mu, torch.ones_like(mu))
        if discrete:
            step = rate * mu
            if float(step.max()) >= 2.0:
                if bool(infinite.any()):
                    raise ValueError(
                        f"gradient descent with learning rate {self.learning_rate:g} diverges (the largest stable "
                        f"learning rate is {self.max_learning_rate:.6g}), so it has no limit as steps -> inf"
                    )
                if bool((tt > 0).any()):
                    warnings.warn(
                        f"learning rate {self.learning_rate:g} is above the largest stable learning rate "
                        f"{self.max_learning_rate:.6g}: gradient descent diverges",
                        RuntimeWarning,
                        stacklevel=4,
                    )
            k = finite_t
            base = 1.0 - step  # (n,)
            # (1 - step)^k = sign * |1 - step|^k; k = 0 gives 1 also where the base is 0
            log_abs = torch.log(base.abs())  # -inf where base == 0
            exponent = torch.where(k > 0, k * torch.where(base != 0, log_abs, torch.zeros_like(log_abs)), 0.0)
            power_abs = torch.where((k > 0) & (base == 0), torch.zeros_like(exponent), torch.exp(exponent))
            odd = torch.remainder(k, 2.0) == 1
            decay = torch.where((base < 0) & odd, -power_abs, power_abs)
            # 1 - (1 - step)^k without cancellation where 0 < step < 1
            small = (base > 0) & positive
            log_base = torch.log1p(-torch.where(small, step, torch.zeros_like(step)))
            one_minus = torch.where(small, -torch.expm1(k * log_base), 1.0 - decay)
            h = torch.where(positive, one_minus / safe_mu, rate * k)
        else:
            z = rate * finite_t * mu
            decay = torch.exp(-z)
            h = torch.where(positive, -torch.expm1(-z) / safe_mu, (rate * finite_t).expand_as(z))
        h = torch.where(infinite, torch.where(positive, 1.0 / safe_mu, torch.zeros_like(mu)), h)
        decay = torch.where(infinite, torch.where(positive, torch.zeros_like(mu), torch.ones_like(mu)), decay)
        h = torch.where(self._null, torch.zeros_like(h), h)
        decay = torch.where(self._null, torch.ones_like(decay), decay)
        return h, decay

    # -------------------------------------------------------------- prediction

    def _test_kernels(self, x: Tensor, diag: bool) -> tuple[Tensor, Tensor, Tensor]:
        """K(x, x) (or its diagonal), K(X, x), Theta(x, X) for test inputs, cached for the last x."""
        cache = self._test_cache
        if cache is not None and cache[0].shape == x.shape and torch.equal(cache[0], x) and (cache[1] or diag):
            _, full, k_xx, k_Xx, ntk_xX = cache
            return (k_xx.diagonal() if (diag and full) else k_xx), k_Xx, ntk_xX
        with torch.no_grad():
            k_xx, _ = self._kernels(x, None, diag=diag)
            k_xX, ntk_xX = self._kernels(x, self.train_x, diag=False)
        if not diag:
            k_xx = _symmetrise(k_xx)
        self._test_cache = (x, not diag, k_xx, k_xX.transpose(-1, -2), ntk_xX)
        return k_xx, k_xX.transpose(-1, -2), ntk_xX

    def _parts(self, x: Tensor | None, diag: bool):
        """Pieces of the prediction in the eigenbasis: (K(x, x), P = Theta(x, X) V, Q = V^T K(X, x))."""
        _, evecs = self._eigen
        if x is None:
            k_xx = self.train_nngp.diagonal() if diag else self.train_nngp
            p = evecs * self._eig_ntk_vals  # Theta(X, X) V = V diag(mu - noise)
            q = self._eig_k @ evecs.transpose(-1, -2)  # V^T K(X, X)
            return k_xx, p, q
        k_xx, k_Xx, ntk_xX = self._test_kernels(x, diag)
        return k_xx, ntk_xX @ evecs, evecs.transpose(-1, -2) @ k_Xx

    def _resolve_x(self, x: Tensor | None) -> Tensor | None:
        if x is None:
            return None
        return self._check_x(x, "x", self.train_x.shape[1]).to(self.train_x.device)

    def mean_and_covariance(
        self,
        x: Tensor | None = None,
        t: float | Tensor | None = None,
        *,
        steps: float | Tensor | None = None,
        diag: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Mean ``(*S, N, m)`` and covariance ``(*S, N, N)`` (``(*S, N)`` with ``diag``) as tensors.

        Same arguments as :meth:`__call__`; the covariance is shared by the ``m`` outputs.
        """
        x = self._resolve_x(x)
        times, discrete = self._times(t, steps)
        shape = times.shape
        flat = times.reshape(-1)
        if not discrete and bool(torch.isinf(flat).all()) and self._eig is None and self._cholesky is not None:
            mean, cov = self._predict_cholesky(x, diag)
            mean = mean.expand(flat.shape[0], *mean.shape)
            cov = cov.expand(flat.shape[0], *cov.shape)
        else:
            mean, cov = self._predict_eigen(x, flat, discrete, diag)
        return mean.reshape(*shape, *mean.shape[1:]), cov.reshape(*shape, *cov.shape[1:])

    def _predict_eigen(self, x, times, discrete, diag):
        h = self._filter(times, discrete)  # (T, n)
        k_xx, p, q = self._parts(x, diag)
        r = p.unsqueeze(0) * h.unsqueeze(-2)  # (T, N, n) = Theta(x, X) V diag(h)
        c = self._eig_k + self.target_noise * torch.eye(self.num_train, dtype=self.dtype, device=r.device)
        return _assemble(r, self._eig_y, c, q, k_xx, diag)

    def _predict_cholesky(self, x, diag):
        factor = self._cholesky
        if x is None:
            k_xx = self.train_nngp.diagonal() if diag else self.train_nngp
            k_Xx, ntk_xX = self.train_nngp, self.train_ntk
        else:
            k_xx, k_Xx, ntk_xX = self._test_kernels(x, diag)
        a = torch.cholesky_solve(ntk_xX.transpose(-1, -2), factor).transpose(-1, -2)  # Theta(x, X) M^-1
        c = self.train_nngp + self.target_noise * torch.eye(self.num_train, dtype=self.dtype, device=a.device)
        mean, cov = _assemble(a.unsqueeze(0), self.train_y, c, k_Xx, k_xx, diag)
        return mean[0], cov[0]

    def __call__(
        self,
        x: Tensor | None = None,
        t: float | Tensor | None = None,
        *,
        steps: float | Tensor | None = None,
        diag: bool = False,
    ) -> MultivariateNormal:
        r"""Distribution of the network function on ``x`` after training for ``t`` (or ``steps``).

        :param x: inputs ``(N, d)``; ``None`` means the training inputs (using the cached kernels).
        :param t: gradient-flow time(s): a number or a tensor of any shape ``S``, ``>= 0``, ``inf`` allowed.
        :param steps: instead of ``t``, number(s) of gradient-descent steps with the learning rate.
        :param diag: only the marginal variances (a diagonal covariance).
        :return: a :class:`~gpytorch.distributions.MultivariateNormal` with batch shape ``S``
            and event shape ``(N,)``, or for ``m`` outputs a
            :class:`~gpytorch.distributions.MultitaskMultivariateNormal` with event shape ``(N, m)``.
        """
        mean, cov = self.mean_and_covariance(x, t, steps=steps, diag=diag)
        if self.single_output:
            mean = mean.squeeze(-1)
            return MultivariateNormal(mean, DiagLinearOperator(cov) if diag else DenseLinearOperator(cov))
        m = self.num_outputs
        if diag:
            operator = DiagLinearOperator(cov.repeat_interleave(m, dim=-1))
        else:
            eye = IdentityLinearOperator(m, batch_shape=cov.shape[:-2], dtype=cov.dtype, device=cov.device)
            operator = KroneckerProductLinearOperator(DenseLinearOperator(cov), eye)
        return MultitaskMultivariateNormal(mean, operator, interleaved=True)

    predict = __call__

    # ------------------------------------------------------------------ losses

    def expected_loss(
        self,
        t: float | Tensor | None = None,
        *,
        steps: float | Tensor | None = None,
        x: Tensor | None = None,
        y: Tensor | None = None,
    ) -> ExpectedLoss:
        r"""Expected loss of one trained network, ``E[L](t) = bias + variance``, for each time.

        The loss is the training loss's data term (``loss="half_sum"``:
        :math:`\tfrac12 \sum (f - y)^2`; ``"mse"``: the mean of :math:`(f - y)^2`
        over the ``N m`` entries) of the network's function on ``x`` against
        ``y``.  Default: the training inputs and the given training targets
        (without target noise or the ridge term) -- the predicted training loss
        curve.  ``bias`` is the loss of the ensemble mean,
        ``variance`` the summed predictive variance (times ``m``, scaled alike).

        :return: :class:`ExpectedLoss` of tensors shaped like the times.
        """
        times, discrete = self._times(t, steps)
        shape = times.shape
        flat = times.reshape(-1)
        if (x is None) != (y is None):
            if x is None:
                raise ValueError("give x together with y")
            raise ValueError("give y together with x")
        if x is None:
            bias, variance = self._train_loss_terms(*self._spectral(flat, discrete))
            count = self.num_train * self.num_outputs
        else:
            x = self._resolve_x(x)
            y = self._check_targets(y, x.shape[0])
            terms = self._loss_terms(x, y)
            bias, variance = terms(self._filter(flat, discrete))
            count = y.numel()
        scale = 0.5 if self.loss == "half_sum" else 1.0 / count
        bias, variance = scale * bias, scale * variance
        return ExpectedLoss((bias + variance).reshape(shape), bias.reshape(shape), variance.reshape(shape))

    def _check_targets(self, y: Tensor, n: int) -> Tensor:
        if not torch.is_tensor(y):
            raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
        y = y.to(device=self.train_x.device, dtype=self.dtype)
        if self.single_output and y.dim() == 1:
            y = y.unsqueeze(-1)
        if tuple(y.shape) != (n, self.num_outputs):
            expected = (n,) if self.single_output else (n, self.num_outputs)
            raise ValueError(f"y has shape {tuple(y.shape)}, expected {expected}")
        if not bool(torch.isfinite(y).all()):
            raise ValueError("y contains NaN or infinite values")
        return y

    def _train_loss_terms(self, h: Tensor, decay: Tensor) -> tuple[Tensor, Tensor]:
        """Sum of squared mean residuals and m * trace(covariance) on the training set.

        On the training inputs the prediction is diagonal in the eigenbasis:
        ``Theta(X, X) V diag(h) V^T = V diag(e) V^T`` with ``e = (mu - noise) h``,
        the mean residual is ``-(1 - e) V^T Y`` and
        ``trace Sigma_t = sum_a (1 - e_a)^2 (V^T K V)_aa + s e_a^2``: sums of
        squares, where ``1 - e = noise * h + decay`` is formed without cancellation,
        so the loss is accurate however small it gets.
        """
        e = self._eig_ntk_vals * h  # (T, n); h came from _spectral, so the eigenbasis exists
        one_minus = self.noise * h + decay
        bias = (one_minus.unsqueeze(-1) * self._eig_y).pow(2).sum((-1, -2))
        trace = (one_minus.pow(2) * self._eig_k.diagonal()).sum(-1) + self.target_noise * e.pow(2).sum(-1)
        return bias, self.num_outputs * trace

    def _loss_terms(self, x: Tensor, y: Tensor) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
        """``h -> (sum of squared mean residuals, m * trace Sigma_t)`` on (x, y), O(n^2) per time."""
        k_xx, p, q = self._parts(x, diag=True)
        gram = p.transpose(-1, -2) @ p  # P^T P
        c = self._eig_k + self.target_noise * torch.eye(self.num_train, dtype=self.dtype, device=p.device)
        quad = gram * c
        lin = (p * q.transpose(-1, -2)).sum(-2)  # sum_i P_ia Q_ai
        trace_k = k_xx.sum()
        b = self._eig_y
        m = self.num_outputs

        def terms(h: Tensor) -> tuple[Tensor, Tensor]:
            mean = (p.unsqueeze(0) * h.unsqueeze(-2)) @ b  # (T, N, m)
            bias = (mean - y).pow(2).sum((-1, -2))
            trace = trace_k + torch.einsum("ta,ab,tb->t", h, quad, h) - 2 * h @ lin
            return bias, m * trace.clamp_min(0.0)

        return terms

    def optimal_stopping_time(
        self,
        x: Tensor,
        y: Tensor,
        *,
        discrete: bool = False,
        criterion: str = "expected",
        points_per_decade: int = 50,
    ) -> StoppingTime:
        r"""The training time at which the predicted loss on ``(x, y)`` is smallest (early stopping).

        :param x: held-out inputs ``(N, d)``.
        :param y: their targets, shaped like ``train_y``'s rows.
        :param discrete: search over whole numbers of gradient-descent steps instead of flow times.
        :param criterion: ``"expected"`` (expected loss of one network: bias + variance) or
            ``"mean"`` (loss of the ensemble mean: bias only).
        :param points_per_decade: density of the logarithmic search grid; the best grid
            point is then refined (golden-section search in log time, or exhaustively over steps).
        :return: :class:`StoppingTime` (time or steps, predicted loss there, loss at ``inf``).
        """
        if criterion not in ("expected", "mean"):
            raise ValueError(f"criterion must be 'expected' or 'mean', got {criterion!r}")
        x = self._resolve_x(x)
        y = self._check_targets(y, x.shape[0])
        terms = self._loss_terms(x, y)
        scale = 0.5 if self.loss == "half_sum" else 1.0 / y.numel()

        def loss(times: Tensor) -> Tensor:
            bias, variance = terms(self._filter(times, discrete))
            return scale * (bias + (variance if criterion == "expected" else 0.0))

        return search_stopping_time(
            loss, self._eigen[0][~self._null], self._rate, discrete=discrete, points_per_decade=points_per_decade
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n={self.num_train}, outputs={self.num_outputs}, trained={self.trained!r}, "
            f"learning_rate={self.learning_rate:g}, noise={self.noise:g}, target_noise={self.target_noise:g}, "
            f"loss={self.loss!r})"
        )


# ---------------------------------------------------------------------- helpers


def _assemble(r: Tensor, b: Tensor, c: Tensor, q: Tensor, k_xx: Tensor, diag: bool) -> tuple[Tensor, Tensor]:
    """mean = R b; cov = K(x, x) + R C R^T - R Q - (R Q)^T (diagonal only with ``diag``).

    ``R = A_t(x) V`` (T, N, n), ``b = V^T Y``, ``C = V^T (K + sI) V``, ``Q = V^T K(X, x)``
    (or the same without the change of basis).
    """
    mean = r @ b
    rc = r @ c
    if diag:
        cov = k_xx + (rc * r).sum(-1) - 2 * (r * q.transpose(-1, -2)).sum(-1)
        cov = cov.clamp_min(0.0)
    else:
        rq = r @ q
        cov = k_xx + rc @ r.transpose(-1, -2) - rq - rq.transpose(-1, -2)
        cov = _symmetrise(cov)
        # variances that vanish (fitted training points) can come out as -1e-17: round-off
        cov.diagonal(dim1=-2, dim2=-1).clamp_(min=0.0)
    return mean, cov


def _symmetrise(matrix: Tensor) -> Tensor:
    return (matrix + matrix.transpose(-1, -2)) / 2


def _wrap_kernel(kernel) -> Callable[[Tensor, Tensor | None, bool], Tensor]:
    """A GPyTorch kernel or a callable as ``(x1, x2 or None, diag) -> tensor``."""
    if isinstance(kernel, Kernel):

        def evaluate_kernel(x1, x2, diag):
            x2 = x1 if x2 is None else x2
            return to_dense(kernel(x1, x2, diag=diag))

        return evaluate_kernel

    def evaluate_callable(x1, x2, diag):
        if diag:
            return torch.as_tensor(kernel(x1, x1)).diagonal()
        return torch.as_tensor(kernel(x1, x1 if x2 is None else x2))

    return evaluate_callable


def _positive_finite(value, name: str) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return value


def _nonnegative_finite(value, name: str) -> float:
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a non-negative finite number, got {value}")
    return value

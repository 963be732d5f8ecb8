"""Base classes of the layers: variance hyperparameters, and :class:`Layer`, a map from kernel state to kernel state."""

from __future__ import annotations

import functools
import math

import torch
from gpytorch.constraints import GreaterThan, Interval
from gpytorch.module import Module
from gpytorch.priors import Prior
from torch import Tensor, nn

from ..state import KernelState, per_item
from .finite_network import build_network, finite_sequence

__all__ = ["Layer", "VarianceModule", "WeightBiasVariances", "standard_deviation", "variance_property"]


class VarianceModule(Module):
    """A GPyTorch module whose hyperparameters are variances.

    Each is registered with :meth:`register_variance`: a raw parameter of shape
    ``batch_shape`` behind a positivity constraint, an optional prior and a
    property of the same name (:func:`variance_property`).  The base of every
    :class:`Layer`, and of :class:`WeightBiasVariances`.
    """

    def register_variance(
        self,
        name: str,
        value: float | Tensor,
        *,
        batch_shape: torch.Size = torch.Size(),
        prior: Prior | None = None,
        constraint: Interval | None = None,
        learnable: bool | None = None,
        allow_zero: bool = True,
    ) -> None:
        """Register a variance hyperparameter ``name``.

        A learnable variance is stored as ``raw_<name>`` behind ``constraint``
        (default ``GreaterThan(1e-6)``, or a floor a hundred times below a smaller
        starting value, see :func:`default_variance_floor`), like GPyTorch's lengthscales.  A variance
        of exactly 0 cannot sit behind a positive constraint, so it is stored as a
        fixed buffer unless ``learnable=True`` is asked for explicitly (an error).
        """
        given = torch.as_tensor(value, dtype=torch.float64)  # before any rounding to the default dtype
        value = torch.as_tensor(value, dtype=torch.get_default_dtype())
        if not torch.isfinite(value).all():
            raise ValueError(f"{type(self).__name__}: {name} must be finite, got {value.tolist()}")
        if (value < 0).any():
            raise ValueError(f"{type(self).__name__}: {name} must be non-negative, got {value.tolist()}")
        is_zero = bool((value == 0).any())
        if is_zero and not allow_zero:
            raise ValueError(f"{type(self).__name__}: {name} must be positive, got {value.tolist()}")
        if learnable is None:
            learnable = not is_zero
        if learnable and is_zero:
            raise ValueError(
                f"{type(self).__name__}: {name}=0 cannot be learned behind a positive constraint; "
                "give a small positive starting value or learnable=False"
            )
        value = value.expand(batch_shape).clone() if value.dim() == 0 else value.clone()
        self._variance_names = (*getattr(self, "_variance_names", ()), name)
        self._remember_exact(name, given.expand(batch_shape) if given.dim() == 0 else given)
        if not learnable:
            if prior is not None:
                raise ValueError(f"{type(self).__name__}: a prior on the fixed {name} has no effect")
            self.register_buffer(f"fixed_{name}", value)
            return
        if constraint is None:
            constraint = GreaterThan(default_variance_floor(given))
        raw_name = f"raw_{name}"
        self.register_parameter(raw_name, nn.Parameter(torch.zeros_like(value)))
        self.register_constraint(raw_name, constraint)
        if prior is not None:
            if not isinstance(prior, Prior):
                raise TypeError(f"{name}_prior must be a gpytorch.priors.Prior, got {type(prior).__name__}")
            self.register_prior(
                f"{name}_prior",
                prior,
                functools.partial(_prior_value, name=name),
                functools.partial(_prior_setter, name=name),
            )
        self._set_variance(name, given.expand_as(value) if given.dim() == 0 else given)

    def get_variance(self, name: str) -> Tensor:
        raw = getattr(self, f"raw_{name}", None)
        if raw is None:
            return getattr(self, f"fixed_{name}")
        # Transformed once per evaluation, not once per tile (see ``state.per_item``).
        return per_item(getattr(self, f"raw_{name}_constraint").transform, raw)

    def _remember_exact(self, name: str, value: float | Tensor) -> None:
        # The value as given, in float64: a layer built in float32 and then
        # converted with ``.double()`` gets it back exactly (see ``_apply``).
        exact = getattr(self, "_exact_variances", None)
        if exact is None:
            exact = self._exact_variances = {}
        exact[name] = torch.as_tensor(value, dtype=torch.float64).detach().cpu().clone()

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        for name, exact in getattr(self, "_exact_variances", {}).items():
            current = self.get_variance(name).detach()
            if current.dtype != torch.float64 or exact.numel() not in (1, current.numel()):
                continue
            # Restore only values that are the given ones up to float32 rounding.
            target = exact.to(current.device).expand_as(current)
            if torch.allclose(current, target, rtol=1e-6, atol=0.0) and not torch.equal(current, target):
                with torch.no_grad():
                    self._set_variance(name, target)
        return result

    def _set_variance(self, name: str, value: float | Tensor) -> None:
        raw = getattr(self, f"raw_{name}", None)
        reference = raw if raw is not None else getattr(self, f"fixed_{name}")
        given = value
        # Straight to the parameter's dtype: a Python float must not pass through float32 first.
        value = torch.as_tensor(value, dtype=reference.dtype, device=reference.device)
        if not torch.isfinite(value).all() or (value < 0).any():
            raise ValueError(f"{type(self).__name__}: {name} must be finite and non-negative, got {value.tolist()}")
        self._remember_exact(name, given)
        if raw is None:
            getattr(self, f"fixed_{name}").copy_(value.expand_as(reference))
            return
        constraint = getattr(self, f"raw_{name}_constraint")
        if (value <= constraint.lower_bound.to(value)).any():
            raise ValueError(
                f"{type(self).__name__}: {name}={value.tolist()} is at or below its constraint's lower "
                f"bound {constraint.lower_bound.item():g}"
            )
        self.initialize(**{f"raw_{name}": constraint.inverse_transform(value.expand_as(reference))})

    def extra_repr(self) -> str:
        parts = []
        for name in getattr(self, "_variance_names", ()):
            value = self.get_variance(name)
            shown = f"{value.item():.4g}" if value.numel() == 1 else f"shape {tuple(value.shape)}"
            parts.append(f"{name}={shown}")
        return ", ".join(parts)


class Layer(VarianceModule):
    """A layer of an infinitely wide network.

    Subclasses implement :meth:`forward`, a pure map ``KernelState -> KernelState``
    written with elementwise operations over the item axes (so it serves both the
    full and the diagonal pairing), and :meth:`finite_module`, which builds the
    finite-width ``torch.nn`` layer whose infinite-width limit it is.

    Hyperparameters are registered with :meth:`~VarianceModule.register_variance`:
    a raw parameter of shape ``batch_shape`` behind a positivity constraint, an
    optional prior and a property of the same name.
    """

    def __call__(self, state: KernelState) -> KernelState:  # type: ignore[override]
        # gpytorch.Module.__call__ only accepts tensor-like outputs.
        return self.forward(state)

    def forward(self, state: KernelState) -> KernelState:  # pragma: no cover - abstract
        raise NotImplementedError

    #: Whether the layer needs every pair of positions of two items (pooling
    #: mixes positions), not only aligned ones; see :class:`~gpytorch_tp.state.KernelState`.
    needs_all_position_pairs: bool = False

    #: Whether the layer's operations act on whole blocks of position pairs at
    #: once (attention multiplies T x T' matrices), so that a tile of the
    #: kernel matrix should count every position pair of a pair of sequences
    #: (rather than one step's, as the step-by-step recurrent layers).
    acts_on_position_blocks: bool = False

    #: Whether the layer applies weight matrices, so that its output width is infinite.
    has_weights: bool = False

    def fusion_split(self, state: KernelState) -> tuple[KernelState, tuple] | None:
        """This layer's per-item work, for a fused run of layers (see :mod:`gpytorch_tp.fusion`).

        Returns the state after the layer with everything but ``cross`` and
        ``ntk`` updated (those are left as they came in), and the tensors that
        :meth:`fused_pairs` needs (per-item factors, hyperparameters); ``None``
        (the default) when this layer's pair work is not elementwise.
        """
        return None

    def fused_pairs(
        self, cross: Tensor, ntk: Tensor | None, args: tuple, track_ntk: bool
    ) -> tuple[Tensor, Tensor | None]:
        """The pair work of :meth:`forward` as a pure elementwise function, for ``torch.compile``.

        :param args: what :meth:`fusion_split` returned alongside the state.
        """
        raise NotImplementedError(f"{type(self).__name__} has no fused pair work")  # pragma: no cover

    def finite_module(self, in_shape: tuple[int, ...], width: int) -> tuple[nn.Module, tuple[int, ...]]:
        """A finite-width torch module with this layer's initialisation.

        :param in_shape: shape of the incoming features: ``(features,)``, or
            ``(channels, *grid)`` for features on a grid of positions.
        :param width: width (channels) of the layer's output (where it has any choice).
        :return: the module and the shape of its output features.
        """
        raise NotImplementedError(f"{type(self).__name__} has no finite-width counterpart yet")

    def _finite_network(
        self, in_shape: tuple[int, ...], width: int, out_shape: tuple[int, ...] | None
    ) -> tuple[nn.Module, tuple[int, ...]]:
        """The finite module of this layer as a whole network (that of a one-layer ``Sequential``)."""
        return finite_sequence((self,), in_shape, width, out_shape=out_shape)

    def to_module(
        self,
        in_shape: int | tuple[int, ...],
        width: int,
        out_features: int | None = 1,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        seed: int | None = None,
    ) -> nn.Module:
        """The finite-width ``torch.nn`` network whose infinite-width limit this architecture is.

        Every hidden layer gets ``width`` units (channels), the last one
        ``out_features``; parameters are i.i.d. standard normal in the NTK
        parameterisation (each layer scales by its standard deviations over
        the square root of its fan-in), so the output covariance over random
        networks tends to the NNGP kernel, and the inner product of the
        parameter gradients to the NTK, as ``width`` grows.  Inputs on a grid
        (``in_shape=(C, H, W)``) are taken flattened, as the kernels take them.
        See :func:`~gpytorch_tp.layers.finite_network.build_network` (this method) and
        :meth:`TensorProgramKernel.to_module <gpytorch_tp.TensorProgramKernel.to_module>`.
        """
        return build_network(self, in_shape, width, out_features, dtype=dtype, device=device, seed=seed)


DEFAULT_VARIANCE_FLOOR = 1e-6


def default_variance_floor(value: Tensor) -> float:
    """Lower bound of a learnable variance's default constraint.

    ``1e-6``, like GPyTorch's positive hyperparameters, unless the starting value is
    that small or smaller: then a hundredth of it, so that every positive value a
    user can give is a valid starting point (``1e-6`` itself included, which float32
    stores just below ``1e-6``).
    """
    smallest = float(torch.as_tensor(value, dtype=torch.float64).min())
    return min(DEFAULT_VARIANCE_FLOOR, 0.01 * smallest)


def variance_property(name: str) -> property:
    """The property ``name`` of a variance registered with :meth:`VarianceModule.register_variance` (get and set)."""

    def get(layer: VarianceModule) -> Tensor:
        return layer.get_variance(name)

    def set_(layer: VarianceModule, value: float | Tensor) -> None:
        layer._set_variance(name, value)

    return property(get, set_, doc=f"The {name.replace('_', ' ')} (constrained, possibly batched).")


def _prior_value(module: VarianceModule, name: str) -> Tensor:
    # Module-level (not a lambda) so that kernels with priors pickle.
    return module.get_variance(name)


def _prior_setter(module: VarianceModule, value: Tensor, name: str) -> None:
    module._set_variance(name, value)


def standard_deviation(variance: Tensor) -> float:
    """Scalar standard deviation of a (possibly batched) variance, for finite networks."""
    if variance.numel() != 1:
        raise ValueError("finite-width networks are built for kernels without a batch_shape")
    return math.sqrt(float(variance))


class WeightBiasVariances(VarianceModule):
    r"""The weight variance :math:`\sigma_w^2 > 0` and bias variance :math:`\sigma_b^2 \ge 0` of one weight layer.

    The base of :class:`~gpytorch_tp.layers.Linear` and :class:`~gpytorch_tp.layers.Conv`
    (one registration for both), and on its own the hyperparameters of a dense
    layer whose recursion a kernel runs itself
    (:class:`~gpytorch_tp.BatchNormMLPKernel`).  A bias variance of exactly 0 is
    held fixed unless ``learn_bias_variance=True`` (an error).

    :param weight_variance: :math:`\sigma_w^2` (default 1).
    :param bias_variance: :math:`\sigma_b^2` (default 0.1).
    :param weight_variance_prior: optional prior on :math:`\sigma_w^2`.
    :param bias_variance_prior: optional prior on :math:`\sigma_b^2`.
    :param weight_variance_constraint: constraint (default ``GreaterThan(1e-6)``, lower for smaller starting values).
    :param bias_variance_constraint: constraint (default ``GreaterThan(1e-6)``, lower for smaller starting values).
    :param learn_weight_variance: learn :math:`\sigma_w^2` (default: yes).
    :param learn_bias_variance: learn :math:`\sigma_b^2` (default: yes unless 0).
    :param batch_shape: shape of each hyperparameter.

    Example:
        >>> variances = WeightBiasVariances(2.0, 0.0)
        >>> variances.weight_variance, variances.bias_variance
        (tensor(2..., grad_fn=<...>), tensor(0.))
    """

    def __init__(
        self,
        weight_variance: float | Tensor = 1.0,
        bias_variance: float | Tensor = 0.1,
        *,
        weight_variance_prior: Prior | None = None,
        bias_variance_prior: Prior | None = None,
        weight_variance_constraint: Interval | None = None,
        bias_variance_constraint: Interval | None = None,
        learn_weight_variance: bool | None = None,
        learn_bias_variance: bool | None = None,
        batch_shape: torch.Size = torch.Size(),
    ):
        super().__init__()
        self.register_variance(
            "weight_variance",
            weight_variance,
            batch_shape=batch_shape,
            prior=weight_variance_prior,
            constraint=weight_variance_constraint,
            learnable=learn_weight_variance,
            allow_zero=False,
        )
        self.register_variance(
            "bias_variance",
            bias_variance,
            batch_shape=batch_shape,
            prior=bias_variance_prior,
            constraint=bias_variance_constraint,
            learnable=learn_bias_variance,
        )

    weight_variance = variance_property("weight_variance")

    bias_variance = variance_property("bias_variance")

    def standard_deviations(self) -> tuple[float, float]:
        """``(sigma_w, sigma_b)`` as numbers, for the initialisation of a finite network."""
        return standard_deviation(self.weight_variance.detach()), standard_deviation(self.bias_variance.detach())

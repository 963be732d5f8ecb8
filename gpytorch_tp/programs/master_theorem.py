r"""The master theorem on a traced program: NNGP kernel and NTK of its output, as a layer.

For two inputs :math:`x, x'` every pair of G-vars has a covariance, by the recursion

.. math::

    \operatorname{Cov}(W_a h_a(x), W_b h_b(x')) = [W_a = W_b]\; \sigma_W^2 \sum_k r_k\, E[h_{a,k}(x)\, h_{b,k}(x')],
    \qquad \operatorname{Cov}(b, b) = \sigma_b^2,

(:math:`r_k`: the width fractions of the blocks the two vectors share; rows of one matrix that do
not overlap are independent weights), and an NTK (Yang, *Tensor Programs II*; NTK
parameterisation :math:`W h / \sqrt{n}`, as :class:`~gpytorch_tp.layers.Linear`)

.. math::

    \Theta(W h_a, W h_b) = \sigma_W^2 \sum_k r_k \Bigl(E[h_{a,k} h_{b,k}']
        + \sum_{i, j} E[\partial_i h_{a,k}\, \partial_j h_{b,k}']\; \Theta(g_i, g_j')\Bigr),
    \qquad \Theta(b, b) = \sigma_b^2,

summed over the G-vars :math:`g_i` each H-var depends on, so a weight used several times
contributes once per pair of its uses.  The NTK recursion assumes the gradient independence of
Tensor Programs II, exact for programs without transposed weights whose readout weights are used
only by the readout (every program the tracer accepts).

The expectations are over the joint Gaussian of the G-vars they involve: the covariance itself for
G-vars, the closed forms of the layer library for one nonlinearity of one G-var on both sides,
products of independent factors split into their groups, and otherwise
:func:`~gpytorch_tp.programs.gaussian.gaussian_moments` (quadrature).
"""

from __future__ import annotations

import functools
import re

import torch
from torch import Tensor, nn

from ..layers.base import Layer
from ..layers.elementwise import Nonlinearity
from ..layers.nonlinearity_registry import torch_operations
from ..state import KernelState, per_item, unit_dims
from .gaussian import gaussian_moments
from .program import (
    PRODUCT_NAMES,
    Apply,
    Bias,
    Expr,
    GVar,
    InputFeatures,
    Program,
    Sum,
    UnitParameter,
    Value,
    WidthMean,
    aligned_pieces,
    is_item_scalar,
    leaves,
)

__all__ = ["CompiledProgram"]


@functools.lru_cache(maxsize=4096)
def _closed_form(expr: Expr) -> tuple[Nonlinearity, GVar] | None:
    """The nonlinearity layer and its G-var when ``expr`` is ``phi(g)`` for a registered nonlinearity ``phi``.

    Cached by expression (a program's expressions are few and immutable): it is asked once per tile.
    """
    if not isinstance(expr, Apply) or not expr.args or not isinstance(expr.args[0], GVar):
        return None
    extra, keywords = expr.args[1:], dict(expr.kwargs)
    if any(isinstance(a, (GVar, Apply, Sum, WidthMean)) for a in (*extra, *keywords.values())):
        return None
    functions, methods, _ = torch_operations()
    cls = functions.get(expr.fn)
    if cls is None and getattr(expr.fn, "__objclass__", None) is torch._C.TensorBase:
        cls = methods.get(expr.fn.__name__)  # x.relu(): a tensor method
    if cls is None:
        return None
    try:
        layer = cls.from_torch_call(tuple(extra), keywords)
    except (TypeError, ValueError):
        return None  # arguments the layer does not take: integrated by quadrature instead
    return (layer, expr.args[0]) if isinstance(layer, Nonlinearity) else None


def _replay(expr, values: dict[GVar, Tensor], scalar):
    """``expr`` evaluated on sample values of its G-vars (the torch calls the network made, replayed).

    ``scalar(s)`` gives the value of a per-item number ``s`` (a :class:`WidthMean`), shaped to broadcast
    against the sample values.
    """
    if isinstance(expr, GVar):
        return values[expr]
    if isinstance(expr, WidthMean):
        return scalar(expr)
    if isinstance(expr, Apply):
        args = [_replay(a, values, scalar) for a in expr.args]
        kwargs = {k: _replay(v, values, scalar) for k, v in expr.kwargs}
        return expr.fn(*args, **kwargs)
    if isinstance(expr, Sum):
        total = 0.0
        for c, e in expr.terms:  # no passes over the points for additions of 0 and products by 1
            total = _plus(total, _times(_replay(c, values, scalar), _replay(e, values, scalar)))
        return total
    return expr


def _is_random(expr) -> bool:
    """An expression of G-vars (random coordinates), not a constant or a number per item."""
    return isinstance(expr, (GVar, Apply, Sum)) and not is_item_scalar(expr)


def _square_base(expr):
    """``e`` when ``expr`` is ``e * e``, ``e ** 2`` or ``square(e)``; else None."""
    if not isinstance(expr, Apply) or expr.kwargs:
        return None
    name = getattr(expr.fn, "__name__", "")
    if name in PRODUCT_NAMES and len(expr.args) == 2 and expr.args[0] == expr.args[1]:
        return expr.args[0]
    if name in ("pow", "__pow__") and len(expr.args) == 2 and expr.args[1] == 2:
        return expr.args[0]
    if name == "square" and len(expr.args) == 1:
        return expr.args[0]
    return None


def _factors(expr: Expr) -> list[Expr]:
    """The factors of a product (``a * b * c``), or the expression itself."""
    if isinstance(expr, Apply) and getattr(expr.fn, "__name__", "") in PRODUCT_NAMES and not expr.kwargs:
        if len(expr.args) == 2 and not is_item_scalar(expr):
            return [f for a in expr.args for f in (_factors(a) if _is_random(a) else [a])]
    return [expr]


def _product(factors: list) -> Expr | float:
    """The product expression of ``factors`` (1.0 for none; the numbers 1.0 dropped)."""
    factors = [f for f in factors if not (isinstance(f, (int, float)) and f == 1)]
    if not factors:
        return 1.0
    return functools.reduce(lambda a, b: Apply(torch.mul, (a, b)), factors)


@functools.lru_cache(maxsize=4096)
def _separable(expr) -> bool:
    """Whether a sum has a term that is a product of independent factors (at any depth of nested sums).

    Distributing the product over such a sum gives expectations of independent groups of fewer G-vars.
    """
    if isinstance(expr, Sum):
        return any(_is_random(t) and _separable(t) for _, t in expr.terms)
    factors = [f for f in _factors(expr) if _is_random(f)]
    if len(factors) < 2:
        return False
    return _factor_groups(tuple(factors)) > 1 or any(isinstance(f, Sum) and _separable(f) for f in factors)


def _factor_groups(factors: tuple) -> int:
    """The number of groups of factors linked by shared atoms."""
    keys = [{_atom_key(a) for g in leaves(f) for a, _ in g.terms} for f in factors]
    groups: list[set] = []
    for k in keys:
        joined = [g for g in groups if g & k]
        groups = [g for g in groups if not (g & k)] + [set(k).union(*joined)]
    return len(groups)


def _distributed(factors1: list, factors2: list):
    """``(e1, e2)`` with a separable sum among the factors distributed over its terms, or None."""
    for side, factors in ((0, factors1), (1, factors2)):
        for i, f in enumerate(factors):
            if isinstance(f, Sum) and _separable(f):
                rest = factors[:i] + factors[i + 1 :]
                expanded = Sum(tuple((c, _product([t, *rest])) for c, t in f.terms))
                other = _product(factors2 if side == 0 else factors1)
                return (expanded, other) if side == 0 else (other, expanded)
    return None


_POLYNOMIAL_NAMES = PRODUCT_NAMES | {
    "add",
    "__add__",
    "__radd__",
    "sub",
    "__sub__",
    "__rsub__",
    "rsub",
    "neg",
    "__neg__",
}


@functools.lru_cache(maxsize=4096)
def _polynomial(expr) -> bool:
    """Whether ``expr`` is a polynomial in its G-vars (sums, products, squares and integer powers)."""
    if isinstance(expr, GVar) or is_item_scalar(expr):
        return True
    if isinstance(expr, Sum):
        return all(_polynomial(e) for _, e in expr.terms)
    if not isinstance(expr, Apply) or expr.kwargs:
        return False
    name = getattr(expr.fn, "__name__", "")
    if name in ("pow", "__pow__") and len(expr.args) == 2:
        power = expr.args[1]
        integer = isinstance(power, (int, float)) and float(power).is_integer() and power >= 0
        return integer and _polynomial(expr.args[0])
    if name in _POLYNOMIAL_NAMES or name == "square":
        return all(_polynomial(a) for a in expr.args)
    return False


def _transposed(value):
    """A pair moment of (x_j, x_i) for (x_i, x_j): its two pair axes swapped; None where they are not the last two."""
    if not torch.is_tensor(value) or value.dim() == 0 or value.numel() == 1:
        return value
    return value.transpose(-1, -2) if value.dim() >= 2 else None


def _same_nonlinearity(a: Nonlinearity, b: Nonlinearity) -> bool:
    return type(a) is type(b) and a.extra_repr() == b.extra_repr()


def _atom_key(atom) -> tuple:
    return (atom.weight.name, atom.rows)


def _zero_vector(expr) -> bool:
    return isinstance(expr, GVar) and not expr.terms


def _zero(x) -> bool:
    return isinstance(x, float) and x == 0.0


# Sums and scalings that skip the additions of 0 and products by 1 (each a whole tile's tensor otherwise).
def _plus(total, term):
    return term if _zero(total) else total + term


def _times(factor, term):
    return term if isinstance(factor, (int, float)) and factor == 1 else factor * term


class _Recursion:
    """The master theorem for one tile of pairs (or one side's items): memoised covariances and NTKs.

    :param kernel: the input kernel by pairing: ``"12"`` (the pairs) and, in a side's recursion, ``"11"``.
    :param like: a tensor of the dtype and device of the results.
    :param sides: the recursions of the two sides' own items (pairings ``"11"`` and ``"22"``), shared by all
        tiles of a row or column (``state.per_item``); ``None`` in a side's recursion itself.
    """

    def __init__(
        self,
        kernel: dict,
        like: Tensor,
        variances: dict[str, Tensor],
        sides: dict | None = None,
        track_ntk: bool = False,
        mirror: bool = False,
    ):
        self.kernel = kernel
        # The tile's two sides hold the same items in the same order (a diagonal tile of K(X, X)): the moments of
        # (e2, e1) are those of (e1, e2) transposed, E[e1(x_i) e2(x_j)] = E[e2(x_j) e1(x_i)].
        self.mirror = mirror and like.dim() >= 2 and like.shape[-1] == like.shape[-2]
        # With the NTK, every moment of the pairs is asked for again with its derivatives: compute both at once.
        self.track_ntk = track_ntk
        self.like = like
        self.variances = variances
        self.sides = sides
        self.cov_memo: dict = {}
        self.ntk_memo: dict = {}
        self.moment_memo: dict = {}
        self.scalar_memo: dict = {}
        self.integral_memo: dict = {}

    # -- numbers per item ----------------------------------------------------------------------

    def scalar(self, expr, side: str):
        """The value of a per-item number (or constant) at the items of ``side`` ("1" or "2")."""
        if isinstance(expr, (int, float)):
            return expr
        if self.sides is not None:
            return self.sides["11" if side == "1" else "22"].scalar(expr, "1")
        if expr not in self.scalar_memo:
            self.scalar_memo[expr] = self._own_scalar(expr)
        return self.scalar_memo[expr]

    def _own_scalar(self, expr):
        like = self.like
        if isinstance(expr, WidthMean):
            total = 0.0
            for block in expr.value.blocks:
                part = self.mean(block.expr)
                if not _zero(part):
                    total = total + (block.width / expr.value.width) * part
            return torch.as_tensor(total, dtype=like.dtype, device=like.device)
        if isinstance(expr, Apply):
            args = [self.scalar(a, "1") for a in expr.args]
            kwargs = {k: self.scalar(v, "1") for k, v in expr.kwargs}
            if not any(torch.is_tensor(a) for a in (*args, *kwargs.values())):
                args[0] = torch.as_tensor(args[0], dtype=like.dtype, device=like.device)
            return expr.fn(*args, **kwargs)
        raise TypeError(f"not a number per item: {expr!r}")

    def scalar_mean(self, expr, side: str):
        """``E[expr]`` at the items of ``side``: the expression of one factor of a product of independent ones."""
        if self.sides is not None:
            return self.sides["11" if side == "1" else "22"].mean(expr)
        return self.mean(expr)

    def mean(self, expr):
        """``E[expr]`` at one item (a side's own recursion): the width average of a block."""
        if is_item_scalar(expr):
            return self.scalar(expr, "1")
        if isinstance(expr, GVar):
            return 0.0  # G-vars are centred (UnitParameter atoms are 0 at initialisation)
        if isinstance(expr, Sum):
            total = 0.0
            for c, e in expr.terms:
                part = self.mean(e)
                if not _zero(part):
                    total = total + self.scalar(c, "1") * part
            return total
        base = _square_base(expr)
        if base is not None:
            return self.moments(base, base, "11", derivatives=False)[0]
        factors = _factors(expr)
        random = [f for f in factors if _is_random(f)]
        constant = 1.0
        for f in factors:
            if not _is_random(f):
                constant = constant * self.scalar(f, "1")
        if len(random) == 2:  # a second moment: the closed forms apply
            return constant * self.moments(random[0], random[1], "11", derivatives=False)[0]
        return self._integrate(factors, [], "11", derivatives=False)[0]

    # -- covariances ---------------------------------------------------------------------------

    def atom_cov(self, a, b, pairing: str):
        if a.weight.name != b.weight.name or isinstance(a, UnitParameter):
            return 0.0
        if a.rows != b.rows:
            # Aligned coordinates k of the two atoms are rows a.start + k and b.start + k: different rows, so
            # independent weights, even where the ranges overlap (the width average does not see the shift).
            return 0.0
        variance = self.variances[a.weight.name]
        if isinstance(a, Bias):
            return variance
        key = (a.source, b.source, pairing)
        if key not in self.cov_memo:
            self.cov_memo[key] = self.source_moment(a.source, b.source, pairing)
        moment = self.cov_memo[key]
        return 0.0 if _zero(moment) else variance * moment

    def gcov(self, g1: GVar, g2: GVar, pairing: str):
        if self.sides is not None and pairing != "12":
            return self.sides[pairing].gcov(g1, g2, "11")
        total = 0.0
        for a, ca in g1.terms:
            for b, cb in g2.terms:
                term = self.atom_cov(a, b, pairing)
                if not _zero(term):
                    total = _plus(total, _times(self.scalar(ca, "1"), _times(self.scalar(cb, "2"), term)))
        return total

    def source_moment(self, v1: Value, v2: Value, pairing: str):
        total = 0.0
        for fraction, e1, e2 in aligned_pieces(v1, v2):
            if _zero_vector(e1) or _zero_vector(e2):
                continue  # zero padding of a convolution's patch
            if isinstance(e1, InputFeatures) and isinstance(e2, InputFeatures):
                term = self.kernel[pairing]
                if e1.step is not None:  # sequences and images: the input kernel of the position pair
                    term = term[(..., *e1.position, *e2.position)]
            elif isinstance(e1, InputFeatures) or isinstance(e2, InputFeatures):
                term = 0.0  # the input and hidden features do not share the fan-in of one weight
            else:
                term = self.moments(e1, e2, pairing, derivatives=False)[0]
            if not _zero(term):
                total = _plus(total, _times(fraction, term))
        return total

    # -- expectations --------------------------------------------------------------------------

    def moments(self, e1: Expr, e2: Expr, pairing: str, derivatives: bool):
        """``E[e1 e2]`` and, with ``derivatives`` (pairing "12" only), ``{(g_i, g_j): E[d_i e1 d_j e2']}``."""
        if self.sides is not None and pairing != "12":
            return self.sides[pairing].moments(e1, e2, "11", derivatives)
        if pairing == "12" and self.track_ntk and not derivatives:
            return self.moments(e1, e2, pairing, True)[0], {}
        key = (e1, e2, pairing, derivatives)
        if key not in self.moment_memo:
            mirrored = self._mirrored(self.moment_memo, (e2, e1, pairing, derivatives))
            self.moment_memo[key] = mirrored if mirrored is not None else self._moments(e1, e2, pairing, derivatives)
        return self.moment_memo[key]

    def _mirrored(self, memo: dict, swapped: tuple):
        """The moments of the swapped pair of expressions, transposed, where a diagonal tile already has them."""
        if not self.mirror or swapped[2] != "12" or swapped[0] == swapped[1] or swapped not in memo:
            return None
        value, pairs = memo[swapped]
        transposed = {(gj, gi): _transposed(e) for (gi, gj), e in pairs.items()}
        value = _transposed(value)
        if value is None or any(e is None for e in transposed.values()):
            return None
        return value, transposed

    def _moments(self, e1: Expr, e2: Expr, pairing: str, derivatives: bool):
        if not _is_random(e1) or not _is_random(e2):
            # A constant term of a sum (``h - mean(h)``): E[c e'] = c E[e'], no derivative pairs.
            return self.scalar_mean(e1, "1") * self.scalar_mean(e2, "2"), {}
        if isinstance(e1, Sum) or isinstance(e2, Sum):
            return self._bilinear(e1, e2, pairing, derivatives)
        closed = self._closed_moments(e1, e2, pairing, derivatives)
        return closed if closed is not None else self._by_groups(e1, e2, pairing, derivatives)

    def _bilinear(self, e1: Expr, e2: Expr, pairing: str, derivatives: bool):
        """The moments of sums, term by term."""
        terms1 = e1.terms if isinstance(e1, Sum) else ((1.0, e1),)
        terms2 = e2.terms if isinstance(e2, Sum) else ((1.0, e2),)
        value: object = 0.0
        mixed: dict = {}
        for c1, f1 in terms1:
            for c2, f2 in terms2:
                part, pairs = self.moments(f1, f2, pairing, derivatives)
                c = self.scalar(c1, "1") * self.scalar(c2, "2")
                if not _zero(part):
                    value = value + c * part
                for key, expectation in pairs.items():
                    mixed[key] = mixed.get(key, 0.0) + c * expectation
        return value, mixed

    def _closed_moments(self, e1: Expr, e2: Expr, pairing: str, derivatives: bool):
        """The moments of two G-vars, or of one closed-form nonlinearity of a G-var on both sides; else None."""
        if isinstance(e1, GVar) and isinstance(e2, GVar):
            return self.gcov(e1, e2, pairing), ({(e1, e2): 1.0} if derivatives else {})
        closed1, closed2 = _closed_form(e1), _closed_form(e2)
        if not (closed1 and closed2) or not _same_nonlinearity(closed1[0], closed2[0]):
            return None
        layer, g1, g2 = closed1[0], closed1[1], closed2[1]
        first, second = {"11": ("11", "11"), "22": ("22", "22"), "12": ("11", "22")}[pairing]
        like = self.like
        # Per-item variances stay per item ((N1, 1) and (1, N2)): the layers broadcast them, as in a network.
        k11, k22, k12 = (
            torch.as_tensor(k, dtype=like.dtype, device=like.device)
            for k in (self.gcov(g1, g1, first), self.gcov(g2, g2, second), self.gcov(g1, g2, pairing))
        )
        value, derivative = layer.pair_moments(k11, k22, k12, derivatives)
        return value, ({(g1, g2): derivative} if derivatives else {})

    def _by_groups(self, e1: Expr, e2: Expr, pairing: str, derivatives: bool):
        """Factors in independent groups of G-vars are integrated group by group, and multiplied."""
        factors1, factors2 = _factors(e1), _factors(e2)
        constant = 1.0
        for side, factors in (("1", factors1), ("2", factors2)):
            for f in factors:
                if not _is_random(f):
                    constant = constant * self.scalar(f, side)
        factors1 = [f for f in factors1 if _is_random(f)]
        factors2 = [f for f in factors2 if _is_random(f)]
        distributed = _distributed(factors1, factors2)
        if distributed is not None:
            # A sum whose terms are products of independent factors (a gated state (1 - z) n + z h): its
            # terms' moments split into independent groups of fewer variables, each one memoised.
            value, mixed = self._bilinear(*distributed, pairing, derivatives)
            if isinstance(constant, float) and constant == 1.0:
                return value, mixed
            return constant * value, {key: constant * e for key, e in mixed.items()}
        parts = []
        for group1, group2 in self._groups([leaves(f) for f in factors1], [leaves(f) for f in factors2]):
            first, second = [factors1[i] for i in group1], [factors2[i] for i in group2]
            key = (tuple(first), tuple(second), pairing, derivatives)
            if key not in self.integral_memo:
                mirrored = self._mirrored(self.integral_memo, (tuple(second), tuple(first), pairing, derivatives))
                self.integral_memo[key] = (
                    mirrored if mirrored is not None else self._integrate(first, second, pairing, derivatives)
                )
            parts.append(self.integral_memo[key])
        value: object = constant
        for part, _ in parts:
            value = value * part
        mixed: dict = {}
        # A derivative pair lies in one group (pairs across groups have independent weights: no NTK term);
        # the other groups contribute their values.
        for c, (_, pairs) in enumerate(parts):
            others: object = constant
            for d, (part, _) in enumerate(parts):
                if d != c:
                    others = others * part
            for key, expectation in pairs.items():
                mixed[key] = mixed.get(key, 0.0) + expectation * others
        return value, mixed

    def _groups(self, leaves1: list, leaves2: list) -> list[tuple[list[int], list[int]]]:
        """Groups of factors whose G-vars are linked (share an atom), across both sides."""
        nodes = [("1", i, g) for i, ls in enumerate(leaves1) for g in ls] + [
            ("2", i, g) for i, ls in enumerate(leaves2) for g in ls
        ]
        parent = list(range(len(leaves1) + len(leaves2)))

        def find(i):
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        def index(side, i):
            return i if side == "1" else len(leaves1) + i

        keys = [({_atom_key(a) for a, _ in g.terms}) for _, _, g in nodes]
        for x in range(len(nodes)):
            for y in range(x + 1, len(nodes)):
                if keys[x] & keys[y]:
                    parent[find(index(nodes[x][0], nodes[x][1]))] = find(index(nodes[y][0], nodes[y][1]))
        groups: dict[int, tuple[list[int], list[int]]] = {}
        for i in range(len(leaves1)):
            groups.setdefault(find(index("1", i)), ([], []))[0].append(i)
        for i in range(len(leaves2)):
            groups.setdefault(find(index("2", i)), ([], []))[1].append(i)
        return list(groups.values())

    def _integrate(self, f1: list[Expr], f2: list[Expr], pairing: str, derivatives: bool):
        """``E[prod f1 * prod f2]`` (and derivative pairs) for one linked group, closed form where one exists."""
        if len(f1) == 1 and len(f2) == 1:
            closed = self._closed_moments(f1[0], f2[0], pairing, derivatives)
            if closed is not None:
                return closed
        side1 = list(dict.fromkeys(g for f in f1 for g in leaves(f)))
        side2 = list(dict.fromkeys(g for f in f2 for g in leaves(f)))
        if pairing == "12":
            variables = [("1", g) for g in side1] + [("2", g) for g in side2]
        else:  # both sides at the same input: a G-var is one variable
            variables = [("0", g) for g in dict.fromkeys(side1 + side2)]
        if not variables:
            return 1.0, {}
        cov = self._joint_covariance(variables, pairing)
        index1 = [variables.index(("1" if pairing == "12" else "0", g)) for g in side1]
        index2 = [variables.index(("2" if pairing == "12" else "0", g)) for g in side2]

        def product(factors, gvars, side):
            def scalar(s):
                value = self.scalar(s, side)
                return value.unsqueeze(-1) if torch.is_tensor(value) else value  # the points' axis

            def evaluate(*points):
                values = dict(zip(gvars, points))
                out = 1.0
                for f in factors:
                    out = out * _replay(f, values, scalar)
                return out

            return evaluate

        value, mixed = gaussian_moments(
            cov,
            product(f1, side1, "1"),
            product(f2, side2, "2"),
            index1,
            index2,
            derivatives=derivatives and pairing == "12",
            hermite=all(_polynomial(f) for f in (*f1, *f2)),
        )
        pairs = {}
        if derivatives and pairing == "12":
            for i, gi in enumerate(side1):
                for j, gj in enumerate(side2):
                    pairs[(gi, gj)] = mixed[..., i, j]
        return value, pairs

    def _joint_covariance(self, variables: list[tuple[str, GVar]], pairing: str) -> Tensor:
        def pairing_of(s, t):
            if pairing != "12":
                return pairing
            return {"11": "11", "22": "22", "12": "12", "21": "12"}[s + t]

        entries = []
        for s, g in variables:
            row = []
            for t, h in variables:
                if s == "2" and t == "1":
                    value = self.gcov(h, g, "12")  # Cov(g(x'), h(x)) of the pair (x, x')
                else:
                    value = self.gcov(g, h, pairing_of(s, t))
                row.append(value)
            entries.append(row)
        like = self.like
        reference = like  # of this recursion's own pairing: the tile's pairs, or one side's items
        shape = torch.broadcast_shapes(reference.shape, *(torch.as_tensor(v).shape for row in entries for v in row))

        def dense(v):
            return torch.as_tensor(v, dtype=like.dtype, device=like.device).expand(shape)

        rows = [torch.stack([dense(v) for v in row], -1) for row in entries]
        return torch.stack(rows, -2)

    # -- NTK -------------------------------------------------------------------------------------

    def atom_ntk(self, a, b):
        if a.weight.name != b.weight.name or a.rows != b.rows:
            return 0.0
        if isinstance(a, UnitParameter):
            # The perturbation of p in p * factor: tangent E[factor factor'] (learning rate 1).
            if isinstance(a.factor, (int, float)) and isinstance(b.factor, (int, float)):
                return float(a.factor) * float(b.factor)
            return self.moments(a.factor, b.factor, "12", derivatives=False)[0]
        variance = self.variances[a.weight.name]
        if isinstance(a, Bias):
            return variance
        key = (a.source, b.source)
        if key not in self.ntk_memo:
            self.ntk_memo[key] = self._source_tangent(a.source, b.source)
        inner = self.ntk_memo[key]
        moment = self.atom_cov(a, b, "12")
        if _zero(moment) and _zero(inner):
            return 0.0
        return moment + (0.0 if _zero(inner) else variance * inner)

    def gntk(self, g1: GVar, g2: GVar):
        total = 0.0
        for a, ca in g1.terms:
            for b, cb in g2.terms:
                term = self.atom_ntk(a, b)
                if not _zero(term):
                    total = _plus(total, _times(self.scalar(ca, "1"), _times(self.scalar(cb, "2"), term)))
        return total

    def _source_tangent(self, v1: Value, v2: Value):
        total = 0.0
        for fraction, e1, e2 in aligned_pieces(v1, v2):
            if isinstance(e1, InputFeatures) or isinstance(e2, InputFeatures) or _zero_vector(e1) or _zero_vector(e2):
                continue  # the input and zero padding have no parameters
            _refuse_gains_inside_functions(e1)
            _refuse_gains_inside_functions(e2)
            _, pairs = self.moments(e1, e2, "12", derivatives=True)
            for (gi, gj), expectation in pairs.items():
                tangent = self.gntk(gi, gj)
                if not _zero(tangent) and not _zero(expectation):
                    total = _plus(total, _times(fraction, expectation * tangent))
        return total


def _inside_functions(expr) -> tuple[GVar, ...]:
    """The G-vars of ``expr`` that are arguments of a function (not terms of its linear part)."""
    if isinstance(expr, Sum):
        return tuple(g for _, e in expr.terms for g in _inside_functions(e))
    return leaves(expr) if isinstance(expr, Apply) else ()


def _refuse_gains_inside_functions(expr: Expr) -> None:
    """A per-unit gain's NTK term is E[factor factor'] only where a matrix takes the gained vector directly.

    Inside a nonlinearity it is E[phi'(y) factor phi'(y') factor'], correlated with the pre-activation,
    which the recursion does not compute (the shift's term, factor 1, is exact everywhere).
    """
    for g in _inside_functions(expr):
        for atom, _ in g.terms:
            if isinstance(atom, UnitParameter) and not isinstance(atom.factor, (int, float)):
                raise NotImplementedError(
                    f"the NTK of the per-unit gain {atom.weight.name!r} directly inside a nonlinearity or product: "
                    "its gradient is correlated with the pre-activation, which the compiled recursion does not "
                    "track. Put a dense layer between the gain and the nonlinearity, or drop the gain "
                    "(elementwise_affine=False); the NNGP kernel is not affected."
                )


def _without_positions(t: Tensor, position_ndim: int) -> Tensor:
    """A tensor of the pairs' and items' shape: its position-pair axes indexed away."""
    return t[(..., *([0] * (2 * position_ndim)))] if position_ndim else t


def _side_recursion(variance: Tensor, position_ndim: int, names: tuple[str, ...], *values: Tensor) -> _Recursion:
    """The recursion of one side's own items (the self pairings), computed once per row of tiles."""
    like = _without_positions(variance, position_ndim)
    return _Recursion({"11": variance}, like, dict(zip(names, values)))


def _attribute(name: str) -> str:
    return re.sub(r"\W", "_", name) + "_variance"


class CompiledProgram(Layer):
    r"""The infinite-width kernels of a traced network (a :class:`~gpytorch_tp.programs.program.Program`).

    Maps the input state (:math:`\langle x, x' \rangle / d`) to the NNGP kernel and NTK of the
    network output by the master theorem (module docstring).  Each weight matrix and bias of the
    network is one variance hyperparameter, ``<parameter name>_variance`` (dots as underscores):
    :math:`\sigma_W^2` (the entries' variance times the fan-in) for matrices, :math:`\sigma_b^2`
    for biases.

    :param program: the traced program.
    :param variances: the starting variance of every weight, by parameter name.
    :param learnable: learn the variances (default: those that are not 0).
    """

    def __init__(self, program: Program, variances: dict[str, float], learnable: bool | None = None):
        super().__init__()
        self.program = program
        self.variance_names = {}
        for weight in program.weights:
            if weight.unit:
                continue  # learning rate 1, no variance (Weight.unit)
            attribute = _attribute(weight.name)
            self.variance_names[weight.name] = attribute
            self.register_variance(
                attribute, float(variances[weight.name]), learnable=learnable, allow_zero=weight.bias
            )

    def variance(self, parameter: str) -> Tensor:
        """The variance of the module's parameter ``parameter`` (its name in ``named_parameters``)."""
        if parameter not in self.variance_names:
            raise KeyError(f"{parameter!r} is not a weight of the program; its weights: {list(self.variance_names)}")
        return self.get_variance(self.variance_names[parameter])

    def parameter_scales(self, network: nn.Module) -> dict[str, float]:
        """Per-parameter NTK factors for ``network`` (the traced module's class at any width).

        ``network`` holds weights of variance ``sigma^2 / fan_in``; the NTK parameterisation's tangent
        kernel weighs their gradients by ``sigma^2 / fan_in`` (biases by ``sigma_b^2``), as
        :class:`~gpytorch_tp.kernels.MonteCarloKernel`'s ``parameter_scales`` takes them:
        ``MonteCarloKernel(factory, "ntk", parameter_scales=layer.parameter_scales)``.
        """
        parameters = dict(network.named_parameters())
        scales = {}
        for weight in self.program.weights:
            if weight.name not in parameters:
                raise KeyError(f"the network has no parameter {weight.name!r} of the traced program")
            if weight.unit:
                scales[weight.name] = 1.0
                continue
            value = float(self.variance(weight.name).detach().reshape(-1)[0])
            # The fan-in of the given network's parameter (its own width): C k_h k_w for a convolution.
            scales[weight.name] = value if weight.bias else value / parameters[weight.name][0].numel()
        return scales

    @property
    def needs_all_position_pairs(self) -> bool:
        # A program over time steps or pixels may pair any position of one item with any of the other.
        return bool(self.program.positions)

    def forward(self, state: KernelState) -> KernelState:
        positions = self.program.positions
        sequence = bool(positions)
        if tuple(state.positions) != positions:
            if self.program.steps is not None:
                takes = f"sequences of {self.program.steps} steps"
            elif self.program.grid is not None:
                takes = f"images of {self.program.grid[0]} x {self.program.grid[1]} pixels"
            else:
                takes = "feature vectors"
            raise ValueError(
                f"this compiled program takes {takes}, got items with positions {state.positions} "
                "(sequences need the kernel's input_shape=(T, d) and sequence=True; images input_shape=(C, H, W))"
            )
        if sequence and any(v is not None and bool((v == 0).any()) for v in (state.valid1, state.valid2)):
            raise ValueError("compiled programs take full-length sequences: these have padding steps")
        # Broadcast against the pairs' and items' axes only: the step axes are indexed away (sequences).
        variances = {
            name: unit_dims(self.get_variance(attribute), state.item_ndim)
            for name, attribute in self.variance_names.items()
        }
        names = tuple(variances)
        values = tuple(variances.values())
        sides = {
            "11": per_item(_side_recursion, state.var1, len(positions), names, *values),
            "22": per_item(_side_recursion, state.var2, len(positions), names, *values),
        }
        like = _without_positions(state.cross, len(positions))
        mirror = state.same_inputs and not state.diagonal
        recursion = _Recursion({"12": state.cross}, like, variances, sides, track_ntk=state.track_ntk, mirror=mirror)
        out = self.program.output

        # The results' shapes: the pairs' and items', without the step axes of sequences (a readout ends the program).
        shapes = [_without_positions(t, len(positions)) for t in (state.cross, state.var1, state.var2)]

        def dense(value, reference: Tensor) -> Tensor:
            value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
            return value.expand(torch.broadcast_shapes(value.shape, reference.shape))

        cross = dense(recursion.gcov(out, out, "12"), shapes[0])
        var1 = dense(recursion.gcov(out, out, "11"), shapes[1])
        var2 = dense(recursion.gcov(out, out, "22"), shapes[2])
        ntk = dense(recursion.gntk(out, out), shapes[0]) if state.track_ntk else None
        if sequence:
            state = state.replace(positions=(), all_position_pairs=False, valid1=None, valid2=None)
        return state.after_weights(cross=cross, var1=var1, var2=var2, ntk=ntk)

    def finite_module(self, in_shape: tuple[int, ...], width: int) -> tuple[nn.Module, tuple[int, ...]]:
        raise NotImplementedError(
            "a compiled program's finite network is the module it was traced from (at its own widths)"
        )

    def extra_repr(self) -> str:
        return f"{len(self.program.weights)} weights; " + super().extra_repr()

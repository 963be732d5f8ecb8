"""What the ranks of tests/test_distributed_gp.py run (run_local pickles these by name), and the one-process reference.

``exact_gp_run`` is the same training and prediction script on every rank and in
the test's own process (no group): the test compares them.
"""

from __future__ import annotations

import time

import gpytorch
import torch

from gpytorch_tp import CNNKernel, MLPKernel
from gpytorch_tp.distributed import GroupTimeoutError, RankMismatchError, ShardedKernel, ShardedKernelOperator
from gpytorch_tp.distributed import sharded, traffic

DTYPE = torch.float64
CG_TOLERANCE, CG_ITERATIONS = 1e-4, 500


def base_kernel(family: str, matrix_free: bool = True):
    if family == "mlp":
        return MLPKernel(depth=2, kind="ntk", matrix_free=matrix_free).double()
    if family == "cnn":
        return CNNKernel(input_shape=(1, 4, 4), depth=2, kind="nngp", matrix_free=matrix_free).double()
    raise ValueError(family)


def data(case: dict, shift: float = 0.0):
    """Training inputs, targets and test inputs of a case (the same on every rank unless ``shift``)."""
    g = torch.Generator().manual_seed(case["seed"])
    d = case["d"]
    x = torch.rand(case["n"], d, generator=g, dtype=DTYPE) * 2 - 1
    y = torch.sin(3 * x[:, 0]) + 0.5 * x[:, -1] + 0.05 * torch.randn(case["n"], generator=g, dtype=DTYPE)
    x_test = torch.rand(case["m"], d, generator=g, dtype=DTYPE) * 2 - 1
    return x + shift, y, x_test


class ExactGPModel(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, covar_module):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ZeroMean()
        self.covar_module = covar_module

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def build(case: dict, sharded_kernel: bool = True, matrix_free: bool = True, shift: float = 0.0, timeout=20):
    x, y, x_test = data(case, shift)
    kernel = base_kernel(case["family"], matrix_free)
    if sharded_kernel:
        kernel = ShardedKernel(kernel, timeout=timeout)
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    likelihood.noise = case["noise"]
    covar_module = gpytorch.kernels.ScaleKernel(kernel).double()
    covar_module.outputscale = case["outputscale"]
    model = ExactGPModel(x, y, likelihood, covar_module)
    return model, likelihood, x, y, x_test


def _grads(model) -> dict:
    return {
        name.replace("base_kernel.base_kernel.", "base_kernel."): (
            torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
        )
        for name, p in model.named_parameters()
    }


def exact_gp_run(case: dict, cg: bool = True, seed: int = 7, shift: float = 0.0) -> dict:
    """One MLL forward and backward, an Adam step, the loss again, then predictions; what each gave."""
    if "min_tile" in case:
        sharded.MIN_SHARD_TILE = case["min_tile"]
    model, likelihood, x, y, x_test = build(case, shift=shift)
    model.train()
    likelihood.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    traffic.reset()
    with (
        gpytorch.settings.max_cholesky_size(0 if cg else 10**6),
        # A tolerance GPyTorch's CG reaches: its residual levels off near 1e-5 (it restarts once the
        # squared residual is below 1e-10), and idle iterations there only amplify round-off.
        gpytorch.settings.cg_tolerance(CG_TOLERANCE),
        gpytorch.settings.eval_cg_tolerance(CG_TOLERANCE),
        gpytorch.settings.max_cg_iterations(CG_ITERATIONS),
    ):
        torch.manual_seed(seed)  # GPyTorch's probe vectors: the same on every rank
        covariance = model.covar_module(x).evaluate_kernel()
        loss = -mll(model(x), y)
        loss.backward()
        grads = _grads(model)
        optimizer.step()
        optimizer.zero_grad()
        loss_after = -mll(model(x), y)
        counted = {"products": traffic.products, "gradients": traffic.gradients, "bytes": traffic.bytes}
        model.eval()
        likelihood.eval()
        with torch.no_grad():
            prediction = likelihood(model(x_test))
            mean, variance = prediction.mean, prediction.variance
    state = {k.replace("base_kernel.base_kernel.", "base_kernel."): v for k, v in model.state_dict().items()}
    return {
        "loss": loss.detach(),
        "grads": grads,
        "loss_after": loss_after.detach(),
        "state": state,
        "mean": mean,
        "variance": variance,
        "operator": type(covariance.base_linear_op).__name__,
        "traffic": counted,
    }


def one_process_runs(cases: dict) -> dict:
    """The reference: ``exact_gp_run`` of every case in one process (CG and, for the MLP, Cholesky)."""
    runs = {name: exact_gp_run(case) for name, case in cases.items()}
    runs["mlp_cholesky"] = exact_gp_run(cases["mlp"], cg=False)
    return runs


def operator_products(case: dict) -> dict:
    """``K @ V`` and the gradient of ``sum(U * (K @ V))`` of the (sharded) operator, and the rank's share."""
    if "min_tile" in case:
        sharded.MIN_SHARD_TILE = case["min_tile"]
    x, _, x_test = data(case)
    kernel = ShardedKernel(base_kernel(case["family"]), timeout=20)
    g = torch.Generator().manual_seed(11)
    v = torch.randn(case["n"], 3, generator=g, dtype=DTYPE)
    u = torch.randn(case["n"], 3, generator=g, dtype=DTYPE)
    operator = kernel(x).evaluate_kernel()
    product = operator @ v
    grads = operator._bilinear_derivative(u, v)
    names = [name for name, _ in kernel.base_kernel.named_parameters()]
    cross = kernel(x_test, x).evaluate_kernel()
    with torch.no_grad():
        cross_dense = cross.to_dense()
    return {
        "type": type(operator).__name__,
        "product": product,
        "param_grads": dict(zip(names, grads[2:])),
        "tiles": [t.index for t in operator.share()] if isinstance(operator, ShardedKernelOperator) else None,
        "grid": len(operator.tile_grid()) if isinstance(operator, ShardedKernelOperator) else None,
        "cross_product": cross @ v,
        "cross_dense": cross_dense,
    }


def gp_scenarios(cases: dict, tiny: dict) -> dict:
    """One run of two ranks for several tests: exact GPs (CG and Cholesky), operator products, disagreements."""
    rank = torch.distributed.get_rank()
    results = {"runs": {}, "operators": {}, "messages": {}}
    for name, case in cases.items():
        results["runs"][name] = exact_gp_run(case)
        results["operators"][name] = operator_products(case)
    results["runs"]["mlp_cholesky"] = exact_gp_run(cases["mlp"], cg=False)
    results["operators"]["tiny"] = operator_products(tiny)
    case = cases["mlp"]
    try:  # different inputs on rank 1
        exact_gp_run(case, shift=1e-3 * rank)
    except RankMismatchError as error:
        results["messages"]["inputs"] = str(error)
    try:  # different seeds, hence different probe vectors
        exact_gp_run(case, seed=rank)
    except RankMismatchError as error:
        results["messages"]["probes"] = str(error)
    # Rank 1 never takes the product: rank 0 must time out, not hang.
    if rank == 0:
        x, _, _ = data(case)
        operator = ShardedKernel(base_kernel("mlp"), timeout=2)(x).evaluate_kernel()
        started = time.monotonic()
        try:
            operator @ torch.ones(case["n"], 1, dtype=DTYPE)
        except GroupTimeoutError as error:
            results["messages"]["timeout"] = (time.monotonic() - started, str(error))
    else:
        time.sleep(4)
    return results

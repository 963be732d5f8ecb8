"""The distributed exact GP (issue 20, item 2): ShardedKernel on 2 local processes, gloo over 127.0.0.1.

1. ExactMarginalLogLikelihood in CG mode (max_cholesky_size(0)): the loss, the hyperparameters'
   gradients, the loss after an Adam step and the predictions (mean, variance) are the same on
   both ranks, bit for bit, and equal to one process without a group (the ordinary matrix-free
   path) to 1e-8 relative, for an MLP NTK and a CNN NNGP; the predictions also equal the dense
   posterior computed here by torch.linalg; in Cholesky mode the loss and gradients equal a
   dense model's.
2. The operator itself: K @ V, the bilinear-form gradients and K(X*, X) against dense
   computations; the tiles are shared out disjointly; a rank with no tiles still takes part.
3. Ranks with different inputs, or different random probe vectors, get a clear error; a rank
   that never takes part gives a timeout, not a hang.
4. posterior_from_store against a dense posterior.

Every run of processes is bounded (run_local's timeout, collectives' timeouts).
"""

from __future__ import annotations

import distributed_gp_workers as workers
import gpytorch
import pytest
import torch

from gpytorch_tp.distributed import (
    ShardedKernel,
    posterior_from_store,
    precompute_kernel,
    product_exchange_bytes,
    run_local,
)
from gpytorch_tp.evaluation import TiledKernelOperator
from gpytorch_tp.evaluation.workers import intra_op_threads

# Conjugate gradients amplify round-off: the ranks' sums add the tiles in another order than one
# process does, and on an ill-conditioned K + noise I that difference (1e-16) grows with the
# iterations to 1e-6 and more, as it does between two block sizes in one process.  The cases are
# conditioned (outputscale, noise) so that CG's own sensitivity stays below the 1e-8 checked here
# (condition numbers about 12).
CASES = {
    # 8 tile rows: 36 tiles shared out
    "mlp": dict(family="mlp", n=120, m=15, d=3, seed=0, min_tile=16, noise=0.5, outputscale=0.05),
    # 4x4 images: 10 tiles
    "cnn": dict(family="cnn", n=60, m=8, d=16, seed=1, min_tile=16, noise=1.0, outputscale=0.69),
}
TINY = dict(family="mlp", n=10, m=4, d=3, seed=2, noise=0.5, outputscale=0.05)  # one tile: rank 1 has none


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.fixture(scope="module")
def two_ranks():
    """One run of two processes for all the tests (each start costs seconds)."""
    return run_local(workers.gp_scenarios, 2, args=(CASES, TINY), timeout=240, group_timeout=20)


@pytest.fixture(scope="module")
def one_process():
    """The same script in one fresh process (a group of one rank: nothing shared out).

    Fresh, because GPyTorch's settings and generators are global: what earlier tests of this
    session left behind must not change the reference.
    """
    (runs,) = run_local(workers.one_process_runs, 1, args=(CASES,), timeout=120, group_timeout=20)
    return runs


def _dense_posterior(case: dict, state: dict):
    """The exact posterior of the trained hyperparameters, from dense kernel matrices and torch.linalg."""
    model, likelihood, x, y, x_test = workers.build(case, sharded_kernel=False, matrix_free=False)
    model.load_state_dict(state)
    with torch.no_grad():
        k = model.covar_module(x).to_dense()
        k_cross = model.covar_module(x_test, x).to_dense()
        k_test = model.covar_module(x_test, diag=True)
        noise = likelihood.noise.item()
        system = k + noise * torch.eye(len(x), dtype=k.dtype)
        mean = k_cross @ torch.linalg.solve(system, y)
        latent = k_test - (k_cross * torch.linalg.solve(system, k_cross.T).T).sum(-1)
    return mean, latent + noise


@pytest.mark.parametrize("name", ["mlp", "cnn", "mlp_cholesky"])
def test_two_ranks_train_and_predict_as_one_process(two_ranks, one_process, name):
    one = one_process[name]
    ranks = [result["runs"][name] for result in two_ranks]
    if name != "mlp_cholesky":
        assert one["operator"] == "TiledKernelOperator"  # no group: the ordinary matrix-free path
        assert all(r["operator"] == "ShardedKernelOperator" for r in ranks)
    for key in ("loss", "loss_after", "mean", "variance"):
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # every rank the same bits
        assert relative(ranks[0][key], one[key]) < 1e-8, (key, ranks[0][key], one[key])
    assert one["grads"].keys() == ranks[0]["grads"].keys()
    for parameter, reference in one["grads"].items():
        assert torch.equal(ranks[0]["grads"][parameter], ranks[1]["grads"][parameter]), parameter
        assert relative(ranks[0]["grads"][parameter], reference) < 1e-8, parameter
        assert reference.abs().max() > 0, parameter  # a gradient that was taken
    for key, value in one["state"].items():
        assert torch.allclose(ranks[0]["state"][key], value, rtol=1e-8, atol=0), key
    # The predictions are the exact posterior's (checked independently of GPyTorch): to round-off
    # with Cholesky, to CG's tolerance (1e-4) with CG.
    mean, variance = _dense_posterior(CASES[name.split("_")[0]], one["state"])
    bound = 1e-9 if name == "mlp_cholesky" else 1e-4
    assert relative(ranks[0]["mean"], mean) < bound
    assert relative(ranks[0]["variance"], variance) < bound
    if name != "mlp_cholesky":
        # The products went through the sharded path, each summed by one all-reduce.
        counted = ranks[0]["traffic"]
        assert counted["products"] > 3 and counted["gradients"] >= 1
        n = CASES[name]["n"]
        assert counted["bytes"] > counted["products"] * product_exchange_bytes(n, 1) / 2


def test_cholesky_mode_loss_and_gradients_are_the_dense_models(one_process, two_ranks):
    # In Cholesky mode the loss is exact: compare with a dense model's, by autograd.
    case = CASES["mlp"]
    model, likelihood, x, y, _ = workers.build(case, sharded_kernel=False, matrix_free=False)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    model.train()
    with gpytorch.settings.max_cholesky_size(10**6), gpytorch.settings.fast_computations(False, False, False):
        loss = -mll(model(x), y)  # exact, whatever settings earlier tests left
    loss.backward()
    two = two_ranks[0]["runs"]["mlp_cholesky"]
    assert relative(two["loss"], loss.detach()) < 1e-10
    for name, p in model.named_parameters():
        assert relative(two["grads"][name], p.grad) < 1e-9, name


@pytest.mark.parametrize("name", ["mlp", "cnn", "tiny"])
def test_the_sharded_operator_against_dense_products(two_ranks, name):
    case = TINY if name == "tiny" else CASES[name]
    x, _, x_test = workers.data(case)
    kernel = workers.base_kernel(case["family"], matrix_free=False)
    ranks = [result["operators"][name] for result in two_ranks]
    assert all(r["type"] == "ShardedKernelOperator" for r in ranks)
    g = torch.Generator().manual_seed(11)
    v = torch.randn(case["n"], 3, generator=g, dtype=torch.float64)
    u = torch.randn(case["n"], 3, generator=g, dtype=torch.float64)
    dense = kernel(x).to_dense()
    (u * (dense @ v)).sum().backward()
    with torch.no_grad():
        cross = kernel(x_test, x).to_dense()
    for r in ranks:
        assert relative(r["product"], dense.detach() @ v) < 1e-12
        assert relative(r["cross_product"], cross @ v) < 1e-12
        assert relative(r["cross_dense"], cross) < 1e-12
        for parameter, p in kernel.named_parameters():
            assert relative(r["param_grads"][parameter], p.grad) < 1e-10, parameter
    # The tiles were shared out: disjoint, all of them.
    shares = [set(r["tiles"]) for r in ranks]
    assert not shares[0] & shares[1] and shares[0] | shares[1] == set(range(ranks[0]["grid"]))
    if name == "tiny":
        assert shares[1] == set()  # one tile: rank 1 had none and still took part in every sum
    else:
        assert shares[0] and shares[1]


def test_ranks_that_disagree_or_never_come_get_clear_errors(two_ranks):
    for result in two_ranks:
        messages = result["messages"]
        assert "disagree" in messages["inputs"] and "the inputs x1 differ" in messages["inputs"]
        probes = messages["probes"]
        assert "the right-hand sides of K @ V differ between the ranks" in probes
        assert "torch.manual_seed" in probes
    seconds, text = two_ranks[0]["messages"]["timeout"]
    assert seconds < 10 and "timed out after 2 s" in text


def test_one_process_without_a_group_is_the_wrapped_kernel():
    case = TINY
    x, _, x_test = workers.data(case)
    wrapped = ShardedKernel(workers.base_kernel("mlp"))
    plain = workers.base_kernel("mlp")
    assert not wrapped.sharded()
    operator = wrapped(x).evaluate_kernel()
    assert type(operator) is TiledKernelOperator
    assert torch.equal(operator.to_dense(), plain(x).evaluate_kernel().to_dense())
    assert torch.equal(wrapped(x_test, x, diag=False).to_dense(), plain(x_test, x).to_dense())
    with pytest.raises(TypeError, match="needs a kernel with block_covariance.*ScaleKernel"):
        ShardedKernel(gpytorch.kernels.RBFKernel())
    with pytest.raises(RuntimeError, match="not initialised"):
        ShardedKernel(plain, group=object()).sharded()


# -- the precomputed-kernel path ----------------------------------------------------------------


def test_posterior_from_store_is_the_dense_posterior(tmp_path):
    case = dict(TINY, n=40, m=7)
    x, y, x_test = workers.data(case)
    kernel = workers.base_kernel("mlp", matrix_free=False)
    with intra_op_threads(1):
        precompute_kernel(kernel, x, path=tmp_path / "train", tile_size=16, progress=False)
        precompute_kernel(kernel, x_test, x, path=tmp_path / "cross", tile_size=16, progress=False)
        precompute_kernel(kernel, x_test, path=tmp_path / "test", tile_size=16, progress=False)
    noise = 0.03
    with torch.no_grad():
        nngp, ntk = kernel.nngp_and_ntk(x)
        nngp_cross, ntk_cross = kernel.nngp_and_ntk(x_test, x)
        test_diagonal = kernel.nngp_and_ntk(x_test, diag=True)[1]
    system = ntk + noise * torch.eye(len(x), dtype=ntk.dtype)
    mean = ntk_cross @ torch.linalg.solve(system, y)
    variance = test_diagonal - (ntk_cross * torch.linalg.solve(system, ntk_cross.T).T).sum(-1)
    posterior = posterior_from_store(
        tmp_path / "train", tmp_path / "cross", y, noise, kind="ntk", test_diagonal=test_diagonal
    )
    assert relative(posterior.mean, mean) < 1e-10 and relative(posterior.variance, variance) < 1e-9
    assert relative(ntk_cross @ posterior.weights, mean) < 1e-10
    # The diagonal read from a store of K(X*, X*), and the NNGP.
    from_store = posterior_from_store(
        tmp_path / "train", tmp_path / "cross", y, noise, kind="ntk", test_diagonal=tmp_path / "test"
    )
    assert relative(from_store.variance, variance) < 1e-9
    nngp_mean = nngp_cross @ torch.linalg.solve(nngp + noise * torch.eye(len(x), dtype=ntk.dtype), y)
    assert (
        relative(posterior_from_store(tmp_path / "train", tmp_path / "cross", y, noise, kind="nngp").mean, nngp_mean)
        < 1e-10
    )
    # Stores that do not belong together, and bad arguments.
    with pytest.raises(ValueError, match="choose one with kind="):
        posterior_from_store(tmp_path / "train", tmp_path / "cross", y, noise)
    precompute_kernel(kernel, x_test, 1.1 * x, path=tmp_path / "other_cross", tile_size=16, progress=False)
    with pytest.raises(ValueError, match="not computed against the training inputs"):
        posterior_from_store(tmp_path / "train", tmp_path / "other_cross", y, noise, kind="ntk")
    with pytest.raises(ValueError, match="is a rectangle"):
        posterior_from_store(tmp_path / "cross", tmp_path / "cross", y, noise, kind="ntk")
    with pytest.raises(ValueError, match="40 training targets"):
        posterior_from_store(tmp_path / "train", tmp_path / "cross", y[:5], noise, kind="ntk")
    # Duplicate training inputs and no noise: K(X, X) is singular.
    twice = torch.cat([x[:3], x[:3]])
    precompute_kernel(kernel, twice, path=tmp_path / "singular", progress=False)
    precompute_kernel(kernel, x_test, twice, path=tmp_path / "singular_cross", progress=False)
    with pytest.raises(ValueError, match="not positive definite"):
        posterior_from_store(tmp_path / "singular", tmp_path / "singular_cross", y[:6], 0.0, kind="ntk")

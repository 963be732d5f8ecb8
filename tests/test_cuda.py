"""The main kernels on a CUDA device agree with the CPU (float32 and float64); skipped without a GPU."""

from __future__ import annotations

import warnings

import gpytorch
import pytest
import torch

from gpytorch_tp import CNNKernel, MLPKernel, RNNKernel
from gpytorch_tp.evaluation import TiledKernelOperator

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

KERNELS = {
    "mlp_relu_ntk": (lambda **kw: MLPKernel(depth=3, kind="ntk", **kw), 5),
    "mlp_erf_nngp": (lambda **kw: MLPKernel(depth=2, nonlinearity="erf", **kw), 5),
    "cnn_flatten_ntk": (lambda **kw: CNNKernel((2, 5, 5), depth=2, kind="ntk", readout="flatten", **kw), 50),
    "cnn_pool_nngp": (lambda **kw: CNNKernel((1, 4, 4), depth=1, readout="global_avg_pool", **kw), 16),
    "rnn_last_ntk": (lambda **kw: RNNKernel((6, 2), kind="ntk", **kw), 12),
    "rnn_mean_nngp": (lambda **kw: RNNKernel((4, 2), nonlinearity="erf", readout="mean", **kw), 8),
}
TOLERANCE = {torch.float32: 2e-4, torch.float64: 1e-10}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", list(KERNELS))
def test_kernel_on_cuda_equals_cpu(name, dtype):
    make, d = KERNELS[name]
    generator = torch.Generator().manual_seed(0)
    x1 = torch.randn(40, d, generator=generator, dtype=dtype)
    x2 = torch.randn(25, d, generator=generator, dtype=dtype)
    cpu = make().to(dtype)
    cuda = make().to(dtype=dtype, device="cuda")
    cuda.load_state_dict(cpu.state_dict())
    for a, b in ((x1, None), (x1, x2)):
        expected = cpu(a, b).to_dense()
        got = cuda(a.cuda(), None if b is None else b.cuda()).to_dense()
        assert got.device.type == "cuda" and got.dtype == dtype
        scale = float(expected.abs().max())
        assert torch.allclose(got.cpu(), expected, rtol=0, atol=TOLERANCE[dtype] * scale)
    diag = cuda(x1.cuda(), diag=True).cpu()
    assert torch.allclose(diag, cpu(x1, diag=True), rtol=0, atol=TOLERANCE[dtype] * float(diag.abs().max()))
    # Gradients on the device are finite and equal the CPU's.
    for kernel, x in ((cpu, x1), (cuda, x1.cuda())):
        kernel.zero_grad()
        kernel(x).to_dense().sum().backward()
    for p_cpu, p_cuda in zip(cpu.parameters(), cuda.parameters()):
        assert torch.isfinite(p_cuda.grad).all()
        assert torch.allclose(p_cuda.grad.cpu(), p_cpu.grad, rtol=50 * TOLERANCE[dtype], atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_matrix_free_operator_on_cuda(dtype):
    x = torch.randn(300, 4, dtype=dtype)
    v = torch.randn(300, 3, dtype=dtype)
    dense = MLPKernel(depth=2).to(dtype)
    free = MLPKernel(depth=2, matrix_free=True, memory_budget=2**20).to(dtype=dtype, device="cuda")
    op = free(x.cuda()).evaluate_kernel()
    assert isinstance(op, TiledKernelOperator) and op._held_matrix() is None
    expected = dense(x).to_dense() @ v
    got = (op @ v.cuda()).cpu()
    assert torch.allclose(got, expected, rtol=0, atol=TOLERANCE[dtype] * 300 * float(expected.abs().max()))


def test_multi_device_kernel_wraps_the_matrix_free_kernel():
    devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    x = torch.randn(200, 3, dtype=torch.float64)
    for matrix_free in (False, True):
        base = MLPKernel(depth=2, matrix_free=matrix_free).double().cuda()
        kernel = gpytorch.kernels.MultiDeviceKernel(base, device_ids=devices, output_device=devices[0])
        expected = MLPKernel(depth=2).double()(x).to_dense()
        got = kernel(x.cuda()).to_dense().cpu()
        assert torch.allclose(got, expected, atol=1e-10 * float(expected.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_fused_kernel_on_cuda_equals_the_layer_by_layer_path(dtype):
    # fused=True compiles the dense/ReLU/erf runs with torch.compile (Triton on a GPU); a compiler
    # failure only warns and falls back, so that warning is an error here.
    x1 = torch.randn(300, 5, dtype=dtype, device="cuda")
    x2 = torch.randn(200, 5, dtype=dtype, device="cuda")
    for nonlinearity in ("relu", "erf"):
        reference = MLPKernel(depth=3, nonlinearity=nonlinearity).to(dtype=dtype, device="cuda")
        fused = MLPKernel(depth=3, nonlinearity=nonlinearity, fused=True).to(dtype=dtype, device="cuda")
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            for b in (None, x2):
                for e, g in zip(reference.nngp_and_ntk(x1, b), fused.nngp_and_ntk(x1, b)):
                    assert g.device.type == "cuda"
                    assert torch.allclose(g, e, rtol=0, atol=TOLERANCE[dtype] * float(e.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_fused_gradients_on_cuda_equal_the_layer_by_layer_path(dtype):
    # On CUDA, fused=True also compiles the backward of the runs (see fusion.fuses_gradients).
    generator = torch.Generator().manual_seed(0)
    x1 = torch.randn(300, 5, generator=generator, dtype=dtype).cuda()
    x2 = torch.cat([torch.randn(199, 5, generator=generator, dtype=dtype).cuda(), x1[:1]])  # one duplicate
    weights = torch.randn(300, 200, generator=generator, dtype=dtype).cuda()
    for nonlinearity, kind in (("relu", "ntk"), ("erf", "nngp")):
        grads = []
        for fused in (False, True):
            kernel = MLPKernel(depth=3, kind=kind, nonlinearity=nonlinearity, fused=fused).to(
                dtype=dtype, device="cuda"
            )
            inputs = [x1.clone().requires_grad_(True), x2.clone().requires_grad_(True)]
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)
                value = (kernel(*inputs).to_dense() * weights).sum()
                grads.append(torch.autograd.grad(value, [*inputs, *kernel.parameters()]))
        for e, g in zip(*grads):
            assert torch.isfinite(g).all()
            assert torch.allclose(g, e, rtol=0, atol=TOLERANCE[dtype] * float(e.abs().max()))

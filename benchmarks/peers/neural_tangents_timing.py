#!/usr/bin/env python
"""Time infinite-width kernels computed by the peer library neural-tangents.

Run this with the python of a separate neural-tangents virtualenv (it imports
jax and neural_tangents only; never torch or gpytorch_tp), e.g.::

    /work/nt-venv/bin/python benchmarks/peers/neural_tangents_timing.py \
        --family mlp --depth 5 --dim 32 --n 1000 4000 --repeats 3 \
        --kinds nngp ntk --save-kernel /tmp/nt_mlp.npz

    /work/nt-venv/bin/python benchmarks/peers/neural_tangents_timing.py \
        --family cnn --depth 3 --image-size 8 --channels 3 \
        --readout global_avg_pool --n 200 --batch-sizes 50 100

For every n it times the symmetric kernel ``kernel_fn(X, None, get)`` in float64
under several execution configurations (plain ``jax.jit`` and ``nt.batch`` with
a few batch sizes), after one untimed warm-up call per configuration (the
warm-up includes compilation).  The configuration with the lowest median time
is reported per n; every configuration's numbers are kept in ``all_configs``.
Human-readable progress goes to stderr; the last line of stdout is one JSON
object.

Inputs are X ~ N(0, 1) from ``numpy.random.default_rng(seed)``, of shape
``(n, *input_shape)``: ``(n, dim)`` for the MLP, ``(n, H, W, C)`` (NHWC, the
layout of stax.Conv's default dimension numbers) for the CNN.  A caller that
lays images out otherwise (e.g. channel-major ``(n, C * H * W)``) draws the
same numbers with the same call and transposes them.

Configurations whose kernel blocks would need more than ``--max-block-gib``
(an estimate: block items squared x numbers stored per pair of items x a few
live float64 tensors) are skipped and listed in ``skipped_configs``: the plain
``jit`` of a CNN with pooling at n = 1000 would need hundreds of GiB.
"""

import argparse
import importlib.metadata
import json
import math
import os
import resource
import statistics
import sys
import time

# Keep TensorFlow (pulled in by neural-tangents) and XLA quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax

jax.config.update("jax_enable_x64", True)

import neural_tangents as nt
import numpy as np
from neural_tangents import stax

# --------------------------------------------------------------------------
# Model families.  Each builder takes the parsed args and returns
# (kernel_fn, input_shape_without_batch, description dict).  To add a family
# (e.g. "cnn"), write a builder, register it in FAMILIES and, if it needs its
# own options, add them in `add_family_arguments`.
# --------------------------------------------------------------------------


def build_mlp(args):
    """Depth-`depth` ReLU MLP in NTK parameterisation with a scalar readout.

    `depth` hidden blocks Dense(width) -> Relu, then Dense(1): `depth`
    nonlinearities in total.  The width is irrelevant for the infinite-width
    kernels, it is only there because stax.Dense requires one.
    """
    w_std, b_std = math.sqrt(2.0), args.b_std
    layers = []
    for _ in range(args.depth):
        layers += [stax.Dense(args.width, W_std=w_std, b_std=b_std, parameterization="ntk"), stax.Relu()]
    layers.append(stax.Dense(1, W_std=w_std, b_std=b_std, parameterization="ntk"))
    _, _, kernel_fn = stax.serial(*layers)
    desc = {
        "depth": args.depth,
        "dim": args.dim,
        "W_std": w_std,
        "b_std": b_std,
        "parameterization": "ntk",
        "nonlinearity": "relu",
    }
    return kernel_fn, (args.dim,), desc


def build_cnn(args):
    """Depth-`depth` ReLU CNN in NTK parameterisation with a scalar readout.

    `depth` blocks Conv(width, (k, k), padding='SAME') -> Relu, then
    GlobalAvgPool() or Flatten(), then Dense(1).  Inputs are NHWC images of
    `image_size` x `image_size` pixels and `channels` channels.
    """
    w_std, b_std = math.sqrt(2.0), args.b_std
    k = args.filter_size
    layers = []
    for _ in range(args.depth):
        layers += [
            stax.Conv(args.width, (k, k), padding="SAME", W_std=w_std, b_std=b_std, parameterization="ntk"),
            stax.Relu(),
        ]
    readout = {"global_avg_pool": stax.GlobalAvgPool, "flatten": stax.Flatten}[args.readout]
    layers += [readout(), stax.Dense(1, W_std=w_std, b_std=b_std, parameterization="ntk")]
    _, _, kernel_fn = stax.serial(*layers)
    pixels = args.image_size**2
    desc = {
        "depth": args.depth,
        "image_size": args.image_size,
        "channels": args.channels,
        "filter_size": k,
        "padding": "SAME",
        "readout": args.readout,
        "W_std": w_std,
        "b_std": b_std,
        "parameterization": "ntk",
        "nonlinearity": "relu",
        "layout": "NHWC",
        # Numbers neural-tangents stores per pair of images: all pixel
        # pairs with pooling, aligned pixels only with Flatten.
        "numbers_per_pair": pixels**2 if args.readout == "global_avg_pool" else pixels,
    }
    return kernel_fn, (args.image_size, args.image_size, args.channels), desc


FAMILIES = {
    "mlp": build_mlp,
    "cnn": build_cnn,
}


def add_family_arguments(parser):
    """Options used by one or more families (ignored by the others)."""
    g = parser.add_argument_group("architecture")
    g.add_argument(
        "--depth",
        type=int,
        default=None,
        help="number of hidden/conv blocks = nonlinearities (default 5 for mlp, 3 for cnn)",
    )
    g.add_argument("--dim", type=int, default=32, help="input dimension (default 32)")
    g.add_argument(
        "--width",
        type=int,
        default=512,
        help="nominal finite width given to stax (no effect on the infinite-width kernel)",
    )
    g.add_argument("--b-std", type=float, default=0.1, help="bias standard deviation (default 0.1)")
    g.add_argument("--image-size", type=int, default=8, help="cnn: images are image-size x image-size (default 8)")
    g.add_argument("--channels", type=int, default=3, help="cnn: input channels (default 3)")
    g.add_argument("--filter-size", type=int, default=3, help="cnn: filters are filter-size x filter-size (default 3)")
    g.add_argument(
        "--readout",
        choices=["global_avg_pool", "flatten"],
        default="global_avg_pool",
        help="cnn: readout before the dense output layer",
    )


# --------------------------------------------------------------------------
# Timing helpers.
# --------------------------------------------------------------------------


def block(tree):
    """Wait until every array in a pytree of jax arrays has been computed."""
    for leaf in jax.tree_util.tree_leaves(tree):
        leaf.block_until_ready()
    return tree


def peak_rss_gib():
    """Peak resident memory of this process so far, GiB.

    VmHWM from /proc/self/status where available: ru_maxrss survives execve
    on Linux, so a script started by a large parent process (fork + exec)
    would report the parent's peak instead of its own.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # KiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# Float64 tensors of a kernel block that are alive at once (NNGP, NTK, the
# covariances and intermediates of a layer), for the memory estimate.
LIVE_BLOCK_TENSORS = 8


def block_gib(items, numbers_per_pair):
    """Estimated memory of an items x items kernel block, GiB."""
    return items**2 * numbers_per_pair * 8 * LIVE_BLOCK_TENSORS / 2**30


def make_configs(kernel_fn, n, batch_sizes, numbers_per_pair=1, max_block_gib=float("inf")):
    """Named callables f(x, get) computing the symmetric kernel of x.

    Returns (configs, skipped): configurations whose blocks are estimated to
    need more than `max_block_gib` are left out and named in `skipped`.
    """
    configs, skipped = [], []

    def fits(name, items):
        gib = block_gib(items, numbers_per_pair)
        if gib > max_block_gib:
            skipped.append(f"{name} (~{gib:.0f} GiB estimated)")
            return False
        return True

    jitted = jax.jit(kernel_fn, static_argnames="get")
    if fits("jit", n):
        configs.append(("jit", lambda x, get: jitted(x, None, get=get)))
    for bs in batch_sizes:
        # nt.batch needs n divisible by the batch size; batch == n is the
        # unbatched case again.
        if bs >= n or n % bs:
            continue
        name = f"nt.batch(batch_size={bs})"
        if not fits(name, bs):
            continue
        # nt.batch jits the per-block kernel itself; device_count=0 means no
        # pmap (a single CPU device here).
        batched = nt.batch(kernel_fn, batch_size=bs, device_count=0, store_on_device=True)
        configs.append((name, lambda x, get, f=batched: f(x, None, get=get)))
    return configs, skipped


def time_config(fn, x, get, repeats, warmup_x=None):
    """One warm-up (compile) call, then `repeats` timed calls.

    The warm-up runs on `warmup_x` if given (for nt.batch: leading rows that
    make whole batches, so the per-block function is compiled for the same
    block shape), else on `x`.
    """
    t0 = time.perf_counter()
    block(fn(x if warmup_x is None else warmup_x, get))
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        block(fn(x, get))
        times.append(time.perf_counter() - t0)
    return first, times


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=sorted(FAMILIES), default="mlp")
    add_family_arguments(p)
    p.add_argument(
        "--n", type=int, nargs="+", default=[1000, 4000], help="numbers of inputs to time (default 1000 4000)"
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--kinds", nargs="+", choices=["nngp", "ntk"], default=["nngp", "ntk"], help="kernels to compute")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="numpy seed for X ~ N(0, 1); X for a smaller n is the leading rows of X for a larger n",
    )
    p.add_argument(
        "--batch-sizes",
        type=int,
        nargs="*",
        default=[250, 500, 1000, 2000],
        help="nt.batch sizes to try besides plain jit (those not dividing n are skipped); pass none to disable",
    )
    p.add_argument("--save-kernel", metavar="PATH.npz", help="save X and the kernels for the first n")
    p.add_argument(
        "--warmup-n",
        type=int,
        default=None,
        help="warm nt.batch configurations up on the first "
        "warmup-n inputs only (rounded up to whole batches; "
        "compilation is per block shape, so this compiles "
        "the same function at a fraction of the cost); "
        "plain jit always warms up on all n (default: all n)",
    )
    p.add_argument(
        "--max-block-gib",
        type=float,
        default=4.0,
        help="skip configurations whose kernel blocks are estimated to need more memory than this (default 4)",
    )
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.depth is None:
        args.depth = {"mlp": 5, "cnn": 3}[args.family]
    kernel_fn, input_shape, desc = FAMILIES[args.family](args)
    get = tuple(args.kinds)
    rng_seed = args.seed

    results = []
    for i, n in enumerate(args.n):
        x = np.random.default_rng(rng_seed).standard_normal((n,) + input_shape)
        per_config = []
        configs, skipped = make_configs(
            kernel_fn, n, args.batch_sizes, desc.get("numbers_per_pair", 1), args.max_block_gib
        )
        for name in skipped:
            print(f"[n={n}] skipped {name}: over --max-block-gib {args.max_block_gib}", file=sys.stderr, flush=True)
        if not configs:
            raise SystemExit(f"n={n}: every configuration is over --max-block-gib; pass smaller --batch-sizes")
        for name, fn in configs:
            warmup_x = None
            if args.warmup_n is not None and name != "jit":
                bs = int(name.split("=")[1].rstrip(")"))
                m = min(n, bs * max(1, -(-args.warmup_n // bs)))
                warmup_x = x[:m] if m < n else None
            first, times = time_config(fn, x, get, args.repeats, warmup_x)
            rec = {
                "config": name,
                "seconds_first_call": first,
                "warmup_n": n if warmup_x is None else len(warmup_x),
                "seconds_best": min(times),
                "seconds_median": statistics.median(times),
                "seconds_all": times,
            }
            per_config.append(rec)
            print(
                f"[n={n}] {name}: first {first:.3f}s, best "
                f"{rec['seconds_best']:.3f}s, median "
                f"{rec['seconds_median']:.3f}s, peak RSS so far "
                f"{peak_rss_gib():.2f} GiB",
                file=sys.stderr,
                flush=True,
            )

        if i == 0 and args.save_kernel:
            # The plain jit, or where it does not fit the fastest nt.batch.
            by_name = dict(configs)
            name = "jit" if "jit" in by_name else min(per_config, key=lambda r: r["seconds_median"])["config"]
            out = block(by_name[name](x, get))
            np.savez(
                args.save_kernel,
                X=x,
                seed=rng_seed,
                family=args.family,
                config_json=json.dumps(desc),
                **{k: np.asarray(getattr(out, k)) for k in get},
            )
            print(f"saved kernels for n={n} to {args.save_kernel}", file=sys.stderr)

        fastest = min(per_config, key=lambda r: r["seconds_median"])
        results.append(
            {
                "n": n,
                "seconds_best": fastest["seconds_best"],
                "seconds_median": fastest["seconds_median"],
                "config": fastest["config"],
                "peak_rss_gib_so_far": round(peak_rss_gib(), 3),
                "all_configs": per_config,
                "skipped_configs": skipped,
            }
        )

    summary = {
        "library": "neural-tangents",
        "version": nt.__version__,
        "jax": jax.__version__,
        "jaxlib": importlib.metadata.version("jaxlib"),
        "backend": jax.default_backend(),
        "dtype": "float64",
        "family": args.family,
        "kinds": list(get),
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "model": desc,
        "results": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

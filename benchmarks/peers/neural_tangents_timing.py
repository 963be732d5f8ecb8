#!/usr/bin/env python
"""Time infinite-width kernels computed by the peer library neural-tangents.

Run this with the python of a separate neural-tangents virtualenv (it imports
jax and neural_tangents only; never torch or gpytorch_tp), e.g.::

    /work/nt-venv/bin/python benchmarks/peers/neural_tangents_timing.py \
        --family mlp --depth 5 --dim 32 --n 1000 4000 --repeats 3 \
        --kinds nngp ntk --save-kernel /tmp/nt_mlp.npz

For every n it times the symmetric kernel ``kernel_fn(X, None, get)`` in float64
under several execution configurations (plain ``jax.jit`` and ``nt.batch`` with
a few batch sizes), after one untimed warm-up call per configuration (the
warm-up includes compilation).  The configuration with the lowest median time
is reported per n; every configuration's numbers are kept in ``all_configs``.
Human-readable progress goes to stderr; the last line of stdout is one JSON
object.
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

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
import neural_tangents as nt  # noqa: E402
from neural_tangents import stax  # noqa: E402


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
        layers += [stax.Dense(args.width, W_std=w_std, b_std=b_std,
                              parameterization="ntk"),
                   stax.Relu()]
    layers.append(stax.Dense(1, W_std=w_std, b_std=b_std,
                             parameterization="ntk"))
    _, _, kernel_fn = stax.serial(*layers)
    desc = {"depth": args.depth, "dim": args.dim, "W_std": w_std,
            "b_std": b_std, "parameterization": "ntk",
            "nonlinearity": "relu"}
    return kernel_fn, (args.dim,), desc


FAMILIES = {
    "mlp": build_mlp,
}


def add_family_arguments(parser):
    """Options used by one or more families (ignored by the others)."""
    g = parser.add_argument_group("architecture")
    g.add_argument("--depth", type=int, default=5,
                   help="number of hidden blocks / nonlinearities (default 5)")
    g.add_argument("--dim", type=int, default=32,
                   help="input dimension (default 32)")
    g.add_argument("--width", type=int, default=512,
                   help="nominal finite width given to stax (no effect on "
                        "the infinite-width kernel)")
    g.add_argument("--b-std", type=float, default=0.1,
                   help="bias standard deviation (default 0.1)")


# --------------------------------------------------------------------------
# Timing helpers.
# --------------------------------------------------------------------------

def block(tree):
    """Wait until every array in a pytree of jax arrays has been computed."""
    for leaf in jax.tree_util.tree_leaves(tree):
        leaf.block_until_ready()
    return tree


def peak_rss_gib():
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def make_configs(kernel_fn, n, batch_sizes):
    """Named callables f(x, get) computing the symmetric kernel of x."""
    jitted = jax.jit(kernel_fn, static_argnames="get")
    configs = [("jit", lambda x, get: jitted(x, None, get=get))]
    for bs in batch_sizes:
        # nt.batch needs n divisible by the batch size; batch == n is the
        # unbatched case again.
        if bs >= n or n % bs:
            continue
        # nt.batch jits the per-block kernel itself; device_count=0 means no
        # pmap (a single CPU device here).
        batched = nt.batch(kernel_fn, batch_size=bs, device_count=0,
                           store_on_device=True)
        configs.append((f"nt.batch(batch_size={bs})",
                        lambda x, get, f=batched: f(x, None, get=get)))
    return configs


def time_config(fn, x, get, repeats):
    """One warm-up (compile) call, then `repeats` timed calls."""
    t0 = time.perf_counter()
    block(fn(x, get))
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
    p.add_argument("--n", type=int, nargs="+", default=[1000, 4000],
                   help="numbers of inputs to time (default 1000 4000)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--kinds", nargs="+", choices=["nngp", "ntk"],
                   default=["nngp", "ntk"], help="kernels to compute")
    p.add_argument("--seed", type=int, default=0,
                   help="numpy seed for X ~ N(0, 1); X for a smaller n is "
                        "the leading rows of X for a larger n")
    p.add_argument("--batch-sizes", type=int, nargs="*",
                   default=[250, 500, 1000, 2000],
                   help="nt.batch sizes to try besides plain jit (those not "
                        "dividing n are skipped); pass none to disable")
    p.add_argument("--save-kernel", metavar="PATH.npz",
                   help="save X and the kernels for the first n")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    kernel_fn, input_shape, desc = FAMILIES[args.family](args)
    get = tuple(args.kinds)
    rng_seed = args.seed

    results = []
    for i, n in enumerate(args.n):
        x = np.random.default_rng(rng_seed).standard_normal(
            (n,) + input_shape)
        per_config = []
        for name, fn in make_configs(kernel_fn, n, args.batch_sizes):
            first, times = time_config(fn, x, get, args.repeats)
            rec = {"config": name,
                   "seconds_first_call": first,
                   "seconds_best": min(times),
                   "seconds_median": statistics.median(times),
                   "seconds_all": times}
            per_config.append(rec)
            print(f"[n={n}] {name}: first {first:.3f}s, best "
                  f"{rec['seconds_best']:.3f}s, median "
                  f"{rec['seconds_median']:.3f}s, peak RSS so far "
                  f"{peak_rss_gib():.2f} GiB", file=sys.stderr, flush=True)

        if i == 0 and args.save_kernel:
            out = block(jax.jit(kernel_fn, static_argnames="get")(
                x, None, get=get))
            np.savez(args.save_kernel, X=x, seed=rng_seed,
                     family=args.family, config_json=json.dumps(desc),
                     **{k: np.asarray(getattr(out, k)) for k in get})
            print(f"saved kernels for n={n} to {args.save_kernel}",
                  file=sys.stderr)

        fastest = min(per_config, key=lambda r: r["seconds_median"])
        results.append({"n": n,
                        "seconds_best": fastest["seconds_best"],
                        "seconds_median": fastest["seconds_median"],
                        "config": fastest["config"],
                        "peak_rss_gib_so_far": round(peak_rss_gib(), 3),
                        "all_configs": per_config})

    summary = {"library": "neural-tangents",
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
               "results": results}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

"""`gpu-momentum demo`: the README's first example, then a ResNet-50-sized flat update."""

import time

import numpy as np

from .backends import (BackendUnavailableError, available_backends, backend_named,
                       backend_names)
from .cli import CommandError, at_least_one
from .flat import FlatParams
from .optimizer import MomentumSGD
from .shapes import resnet50_shapes


def add_demo_command(commands):
    parser = commands.add_parser(
        "demo", help="minimise x**2, then update a ResNet-50-sized flat buffer",
        description=__doc__)
    parser.add_argument("--backend", default="auto", choices=("auto", *backend_names()),
                        help="backend for the flat-buffer update (default auto: the best "
                             "available)")
    parser.add_argument("--steps", type=at_least_one, default=50,
                        help="timed steps of the flat-buffer update (at least 1; default "
                             "50)")
    parser.set_defaults(run=run_demo)


def minimise_x_squared():
    """The plain-Python loop users know, run by the library: prints x each iteration."""
    x = np.array([5.0])
    opt = MomentumSGD(x, lr=0.1, momentum=0.9)
    for _ in range(10):
        opt.step(2 * x)  # the gradient of x**2
        print(x[0])


def run_demo(args):
    name = available_backends()[0] if args.backend == "auto" else args.backend
    try:
        backend = backend_named(name)
    except BackendUnavailableError as error:  # before any output: nothing half done
        raise CommandError(f"{error} (available: {', '.join(available_backends())})")
    print("Minimising f(x) = x**2 from x = 5 (lr 0.1, momentum 0.9):")
    minimise_x_squared()

    rng = np.random.default_rng(0)
    layers = [backend.asarray(rng.standard_normal(s, dtype=np.float32))
              for s in resnet50_shapes()]
    flat = FlatParams.from_arrays(layers)
    backend.assign(flat.grad, rng.standard_normal(flat.data.size, dtype=np.float32))
    opt = MomentumSGD(flat, lr=0.01, momentum=0.9, backend=name)
    opt.step()  # compiles the kernel for this dtype
    backend.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        opt.step()
    backend.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    n = flat.data.size
    print(f"\nResNet-50 parameters ({len(flat)} tensors, {n:,} float32 elements) in one "
          f"flat buffer, backend {name!r} (available: {available_backends()}):")
    print(f"  {seconds * 1e3:.2f} ms per step, {20 * n / seconds / 1e9:.1f} GB/s "
          f"(20 bytes moved per element: read p, g, v; write p, v)")
    return 0

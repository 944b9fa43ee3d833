"""The MLP of bf16_training.py trained with a float32 velocity and with an 8-bit one (FP8
E4M3 codes, one float32 scale per 256 elements), side by side: loss against step, as a
PNG.

The same data (1024 points in 32 dimensions labelled by a random teacher network) and
student (32 -> 64 tanh -> 10, softmax cross-entropy, full batch, every layer in one
FlatParams) as examples/bf16_training.py, with float32 parameters and with bfloat16 ones
(stochastic rounding), each with both velocities. The FP8 velocity holds 1 + 4/256 bytes
per element instead of 4.

    python examples/fp8_velocity.py [--steps 3000] [--output fp8_velocity.png]

writes the PNG where --output says (by default fp8_velocity.png in the current folder).
Needs ml_dtypes and matplotlib: `pip install -e ".[bf16,bench]"` from the checkout.
"""

import argparse
import os
import sys

import numpy as np

from bf16_training import CLASSES, HIDDEN, INPUTS, LR, MOMENTUM, data, train
from gpu_momentum.cli import at_least_one
from gpu_momentum.precision import FLOAT8_BYTES_PER_ELEMENT

# (label, param dtype, precision, velocity dtype)
RUNS = [("float32 params, float32 velocity", "float32", "nearest", "float32"),
        ("float32 params, FP8 velocity", "float32", "nearest", "float8_e4m3fn"),
        ("bfloat16 params (stochastic), float32 velocity", "bfloat16", "stochastic",
         "float32"),
        ("bfloat16 params (stochastic), FP8 velocity", "bfloat16", "stochastic",
         "float8_e4m3fn")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=at_least_one, default=3000,
                        help="training steps per run (at least 1; default 3000)")
    parser.add_argument("--output", "--out", default="fp8_velocity.png", metavar="PNG",
                        help="where to write the plot (default: fp8_velocity.png in the "
                             "current folder)")
    args = parser.parse_args(argv)
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        parser.error(f"cannot write {args.output!r}: folder {folder!r} does not exist")
    try:
        import matplotlib
        import ml_dtypes
    except ImportError as error:
        parser.error(f"{error.name} is missing: pip install -e \".[bf16,bench]\" from the "
                     f"checkout")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, labels = data()
    dtypes = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
    figure, axis = plt.subplots(figsize=(8, 5))
    for label, dtype, precision, velocity_dtype in RUNS:
        losses = train(dtypes[dtype], precision, args.steps, x, labels,
                       velocity_dtype=velocity_dtype)
        state = FLOAT8_BYTES_PER_ELEMENT if velocity_dtype != "float32" else 4
        print(f"{label:48s} velocity {state:.3f} B/element, loss after {args.steps} "
              f"steps: {losses[-1]:.4f}")
        wide = velocity_dtype == "float32"  # dashed: the FP8 runs run along them
        axis.plot(np.arange(1, args.steps + 1), losses, label=label,
                  linewidth=1.6 if wide else 2.4, linestyle="--" if wide else "-",
                  zorder=3 if wide else 2)
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("step")
    axis.set_ylabel("training loss (cross-entropy)")
    axis.set_title(f"MLP {INPUTS}-{HIDDEN}-{CLASSES} from scratch, momentum SGD "
                   f"(lr {LR}, momentum {MOMENTUM}): float32 and FP8 E4M3 velocities")
    axis.title.set_fontsize(9)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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

import sys

import numpy as np

from bf16_training import (CLASSES, HIDDEN, INPUTS, LR, MOMENTUM, data, plot_arguments,
                           plot_losses, save_plot, train)
from gpu_momentum.precision import FLOAT8_BYTES_PER_ELEMENT

# (label, param dtype, precision, velocity dtype)
RUNS = [("float32 params, float32 velocity", "float32", "nearest", "float32"),
        ("float32 params, FP8 velocity", "float32", "nearest", "float8_e4m3fn"),
        ("bfloat16 params (stochastic), float32 velocity", "bfloat16", "stochastic",
         "float32"),
        ("bfloat16 params (stochastic), FP8 velocity", "bfloat16", "stochastic",
         "float8_e4m3fn")]


def main(argv=None):
    args, plt, ml_dtypes = plot_arguments(__doc__.split("\n\n")[0], "fp8_velocity.png",
                                          argv)
    x, labels = data()
    dtypes = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
    figure, axis = plt.subplots(figsize=(8, 5))
    for label, dtype, precision, velocity_dtype in RUNS:
        losses = train(dtypes[dtype], precision, args.steps, x, labels,
                       velocity_dtype=velocity_dtype)
        state = FLOAT8_BYTES_PER_ELEMENT if velocity_dtype != "float32" else 4
        print(f"{label:48s} velocity {state:.3f} B/element, loss after {args.steps} "
              f"steps: {losses[-1]:.4f}")
        plot_losses(axis, losses, label, wide=velocity_dtype == "float32")
    save_plot(figure, axis, f"MLP {INPUTS}-{HIDDEN}-{CLASSES} from scratch, momentum SGD "
              f"(lr {LR}, momentum {MOMENTUM}): float32 and FP8 E4M3 velocities",
              args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())

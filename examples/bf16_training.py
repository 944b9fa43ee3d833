"""A small MLP trained from scratch with bfloat16 parameters in each precision mode, beside
the same training in float32: loss against step, as a PNG.

The data are made here: 1024 points in 32 dimensions, labelled (10 classes) by a random
"teacher" network the student does not know. The student (32 -> 64 tanh -> 10, softmax
cross-entropy) is trained full-batch with momentum SGD, every layer in one FlatParams,
one fused update per step. Its forward and backward passes compute in float32 from the
stored parameters (bfloat16 runs: widened), and hand the optimizer gradients in the
parameters' dtype, as a bfloat16 model would.

    python examples/bf16_training.py [--steps 3000] [--output bf16_training.png]

writes the PNG where --output says (by default bf16_training.png in the current folder;
docs/bf16_training.png is the one the documentation shows). Needs ml_dtypes and
matplotlib: `pip install -e ".[bf16,bench]"` from the checkout.
"""

import argparse
import os
import sys

import numpy as np

import gpu_momentum as gm
from gpu_momentum.cli import at_least_one

SAMPLES, INPUTS, HIDDEN, CLASSES = 1024, 32, 64, 10
LR, MOMENTUM = 0.05, 0.9
RUNS = [("float32", "float32", None), ("bfloat16, nearest", "bfloat16", "nearest"),
        ("bfloat16, stochastic", "bfloat16", "stochastic"),
        ("bfloat16, kahan", "bfloat16", "kahan"), ("bfloat16, master", "bfloat16", "master")]


def data(seed=0):
    """(inputs, labels): Gaussian points labelled by a random two-layer teacher."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((SAMPLES, INPUTS)).astype(np.float32)
    teacher = (rng.standard_normal((INPUTS, 2 * HIDDEN)) / np.sqrt(INPUTS),
               rng.standard_normal((2 * HIDDEN, CLASSES)) / np.sqrt(2 * HIDDEN))
    return x, np.argmax(np.tanh(x @ teacher[0]) @ teacher[1], axis=1)


def initial_layers(seed=1):
    """The student's initial weights and biases, float32 (the same for every run)."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((INPUTS, HIDDEN)) / np.sqrt(INPUTS)).astype(np.float32),
            np.zeros(HIDDEN, np.float32),
            (rng.standard_normal((HIDDEN, CLASSES)) / np.sqrt(HIDDEN)).astype(np.float32),
            np.zeros(CLASSES, np.float32)]


def loss_and_gradients(layers, x, labels):
    """Mean cross-entropy and its gradients, in float32."""
    w1, b1, w2, b2 = (layer.astype(np.float32) for layer in layers)
    hidden = np.tanh(x @ w1 + b1)
    logits = hidden @ w2 + b2
    logits -= logits.max(axis=1, keepdims=True)
    probabilities = np.exp(logits)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    loss = -np.log(probabilities[np.arange(len(labels)), labels]).mean()
    delta = probabilities
    delta[np.arange(len(labels)), labels] -= 1
    delta /= len(labels)
    back = (delta @ w2.T) * (1 - hidden**2)
    return float(loss), [x.T @ back, back.sum(axis=0), hidden.T @ delta, delta.sum(axis=0)]


def train(dtype, precision, steps, x, labels, velocity_dtype=None):
    """The loss before each step of one run (velocity_dtype: None for the default)."""
    flat = gm.FlatParams.from_arrays([layer.astype(dtype) for layer in initial_layers()])
    options = {} if precision is None else {"precision": precision}
    if velocity_dtype is not None:
        options["velocity_dtype"] = velocity_dtype
    opt = gm.MomentumSGD(flat, lr=LR, momentum=MOMENTUM, seed=7, **options)
    losses = []
    for _ in range(steps):
        loss, grads = loss_and_gradients(flat.params, x, labels)
        losses.append(loss)
        for view, grad in zip(flat.grads, grads):
            view[...] = grad.astype(dtype)
        opt.step()
    return losses


def plot_arguments(description, default_png, argv):
    """(parsed --steps/--output, matplotlib.pyplot, ml_dtypes) for a loss-plot example,
    the output folder checked before minutes of training (named as given)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=at_least_one, default=3000,
                        help="training steps per run (at least 1; default 3000)")
    parser.add_argument("--output", "--out", default=default_png, metavar="PNG",
                        help=f"where to write the plot (default: {default_png} in the "
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

    return args, plt, ml_dtypes


def plot_losses(axis, losses, label, wide, **style):
    """One run's losses against step; `wide` runs are drawn dashed, on top, as the
    reference the others run along."""
    axis.plot(np.arange(1, len(losses) + 1), losses, label=label,
              linewidth=1.6 if wide else 2.4, linestyle="--" if wide else "-",
              zorder=3 if wide else 2, **style)


def save_plot(figure, axis, title, output):
    """Log-log axes, labels, grid and legend; the PNG written to `output`."""
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("step")
    axis.set_ylabel("training loss (cross-entropy)")
    axis.set_title(title)
    axis.title.set_fontsize(9)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(output, dpi=110)
    print(f"wrote {output}")


def main(argv=None):
    args, plt, ml_dtypes = plot_arguments(__doc__.split("\n\n")[0], "bf16_training.png",
                                          argv)
    x, labels = data()
    dtypes = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
    figure, axis = plt.subplots(figsize=(8, 5))
    for label, dtype, precision in RUNS:
        losses = train(dtypes[dtype], precision, args.steps, x, labels)
        print(f"{label:22s} loss after {args.steps} steps: {losses[-1]:.4f}")
        wide = dtype == "float32"
        plot_losses(axis, losses, label, wide, color="black" if wide else None)
    save_plot(figure, axis, f"MLP {INPUTS}-{HIDDEN}-{CLASSES} from scratch, momentum SGD "
              f"(lr {LR}, momentum {MOMENTUM}), bfloat16 parameters by precision",
              args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`gpu-momentum bench` (also `python -m bench` in a checkout): throughput of every backend
beside NumPy, torch.optim.SGD and CuPy, and beside the memory roofline measured in the
same run; and each backend with 100 parameter groups against one group."""

import argparse
import os
import sys

from gpu_momentum.cli import CommandError, OneLineErrorParser, run_command

from .data import FLOAT32_VELOCITY, VELOCITY_DTYPES

WORKLOADS = ["resnet50", "transformer", "groups", "torch-resnet50", "torch-gpt2",
             "torch-cnn", "overhead"]
FULL = {"sizes": list(range(16, 29)), "workloads": WORKLOADS, "samples": 25,
        "max_time": 3.0}
QUICK = {"sizes": [16, 18, 20, 22], "workloads": ["resnet50", "groups", "torch-resnet50"],
         "samples": 5, "max_time": 0.25}


def log2_sizes(text):
    """'20' -> [20]; '16:28' -> [16, ..., 28] (exponents of two)."""
    low, _, high = text.partition(":")
    try:
        low, high = int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"Invalid size value: {text!r} (give a power-of-two "
                                         f"exponent such as 20, or a range such as 16:28)")
    if not 0 <= low <= high <= 40:
        raise argparse.ArgumentTypeError(f"Invalid size value: {text!r} (exponents must "
                                         f"satisfy 0 <= low <= high <= 40)")
    return list(range(low, high + 1))


def positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"Invalid value: {text!r} (must be > 0)")
        return value
    return parse


def add_arguments(parser):
    parser.add_argument("--quick", action="store_true",
                        help=f"a short run: sizes 2**{QUICK['sizes']}, the ResNet-50 list "
                             f"(flat, and as torch Parameters) and the groups comparison "
                             f"(at 2**{QUICK['sizes'][-1]}), "
                             f"{QUICK['samples']} samples (under a minute on 2 cores)")
    parser.add_argument("--sizes", type=log2_sizes, nargs="+", metavar="LOG2",
                        help="exponents of two, or ranges LOW:HIGH (default 16:28; "
                             "capped by free host and device memory)")
    parser.add_argument("--dtypes", nargs="+", default=["float32"],
                        choices=["bfloat16", "float16", "float32", "float64"],
                        help="parameter dtypes (default float32). bfloat16 and float16 "
                             "add the library's precision modes, one row each, and one "
                             "with a 16-bit velocity; bfloat16 needs ml_dtypes")
    parser.add_argument("--velocity-dtypes", nargs="+", default=[FLOAT32_VELOCITY],
                        choices=list(VELOCITY_DTYPES),
                        help="the library's velocities (default float32). float32: the "
                             "update's compute dtype (float64 for float64 params), with "
                             "the 16-bit velocity row of 16-bit params; float8_e4m3fn: E4M3 "
                             "codes with a float32 scale per block, a row for float32 "
                             "params and one per precision mode of 16-bit ones, each with "
                             "its elements/s over the float32 velocity's (give both); "
                             "needs ml_dtypes")
    parser.add_argument("--workloads", nargs="*", choices=WORKLOADS + ["torch", "none"],
                        help="many-tensor workloads (default: all; none, or the option alone: leave "
                             "them out). "
                             "groups: the library's backends over 100 equal segments at "
                             "the largest size (at most 2**26), with 1 and with 100 "
                             "parameter groups. torch-resnet50, torch-gpt2, torch-cnn (a "
                             "small CNN; torch: all three): "
                             "gpu_momentum.torch.SGD's opt.step() against torch.optim."
                             "SGD's over those shapes as nn.Parameters with gradients, "
                             "constant lr and with OneCycleLR stepped every step. "
                             "overhead: per-step time of every backend and peer from "
                             "2**10 to 2**20 elements, wall clock with one "
                             "synchronisation per loop of steps")
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"],
                        choices=["cpu", "cuda"],
                        help="where to run (default both; cuda needs CuPy and a GPU)")
    parser.add_argument("--threads", type=positive(int),
                        default=len(os.sched_getaffinity(0)),
                        help="CPU threads for Numba and torch (default: all cores)")
    parser.add_argument("--samples", type=positive(int),
                        help="samples per candidate and size (default 25)")
    parser.add_argument("--max-time", type=positive(float), metavar="SECONDS",
                        help="seconds per candidate and size before taking fewer samples "
                             "(default 3)")
    parser.add_argument("--json", metavar="PATH", help="write every row and the setup here")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of GB/s against size")
    parser.add_argument("--save", metavar="DIR",
                        help="write DIR/<device>.json, .png and .txt (the table)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--ranks", type=positive(int), nargs="+", metavar="N",
                        help="instead: ShardedMomentumSGD on N MPI ranks against "
                             "MomentumSGD plus an allreduce, one mpiexec job per N (sizes "
                             "from --sizes, default 2**20, 2**22, 2**24; the first of "
                             "--dtypes; cuda with --devices cuda): "
                             "gpu_momentum.bench.distributed")


def add_bench_command(commands):
    parser = commands.add_parser("bench", help="throughput against NumPy, torch, CuPy and "
                                               "the memory roofline", description=__doc__)
    add_arguments(parser)
    parser.set_defaults(run=run_bench)


def options_from(args):
    """The run's Options, with --quick choosing the defaults not given explicitly."""
    from .measure import Sampling
    from .run import Options

    preset = QUICK if args.quick else FULL
    sizes = sorted({e for group in (args.sizes or [preset["sizes"]]) for e in group})
    workloads = preset["workloads"] if args.workloads is None else args.workloads
    if "none" in workloads and len(workloads) > 1:
        raise CommandError(f"--workloads none leaves every workload out: it takes no "
                           f"others (got {' '.join(workloads)})")
    workloads = [name for name in workloads if name != "none"]
    workloads = [name for workload in workloads for name in (
        ("torch-resnet50", "torch-gpt2", "torch-cnn") if workload == "torch" else
        (workload,))]
    sampling = Sampling(samples=args.samples or preset["samples"],
                        min_samples=min(5, args.samples or 5),
                        warmup_s=0.02 if args.quick else 0.2,
                        max_time_s=args.max_time or preset["max_time"])
    return Options(sizes=tuple(2**e for e in sizes), dtypes=tuple(args.dtypes),
                   workloads=tuple(dict.fromkeys(workloads)),
                   devices=tuple(dict.fromkeys(args.devices)), threads=args.threads,
                   sampling=sampling,
                   velocity_dtypes=tuple(dict.fromkeys(args.velocity_dtypes)))


def run_bench(args):
    import dataclasses

    from . import report
    from .run import run

    if args.ranks:
        if args.velocity_dtypes != [FLOAT32_VELOCITY]:
            raise CommandError(f"--ranks runs ShardedMomentumSGD, which has a float32 "
                               f"velocity only (got --velocity-dtypes "
                               f"{' '.join(args.velocity_dtypes)})")
        return run_ranks(args)
    options = options_from(args)
    # Fail now, not after minutes of measuring.
    try:
        from tqdm import tqdm
        if args.plot or args.save:
            import matplotlib  # noqa: F401
    except ImportError as error:
        raise CommandError(f"the benchmark needs tqdm and matplotlib ({error}): install "
                           f"the bench extra from the checkout: pip install -e \".[bench]\"")
    for path in (args.json, args.plot):
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder and not os.path.isdir(folder):
            raise CommandError(f"cannot write {path!r}: folder {folder!r} does not exist")
    if args.save and os.path.exists(args.save) and not os.path.isdir(args.save):
        raise CommandError(f"cannot write into --save {args.save!r}: it is not a folder")
    with tqdm(total=0, unit="run", disable=args.no_progress or None,
              file=sys.stderr) as progress:
        result = run(options, progress)
    used = dataclasses.asdict(options)
    used["quick"] = args.quick
    report.finish(result, used)
    table = report.table(result)
    print(table)

    try:
        write_results(args, result, table)
    except OSError as error:
        raise CommandError(f"cannot write the results: {error}")
    return 0


def write_results(args, result, table):
    """The files --save, --json and --plot ask for."""
    from . import report

    paths = []
    if args.save:
        os.makedirs(args.save, exist_ok=True)
        base = os.path.join(args.save, report.result_name(result))
        paths += [("json", base + ".json"), ("plot", base + ".png"), ("table", base + ".txt")]
    paths += [(kind, path) for kind, path in (("json", args.json), ("plot", args.plot))
              if path]
    for kind, path in paths:
        if kind == "json":
            report.write_json(result, path)
        elif kind == "plot":
            report.plot(result, path)
        else:
            with open(path, "w", encoding="utf-8") as out:
                out.write(table + "\n")
        print(f"wrote {path}")


def run_ranks(args):
    """`--ranks`: the distributed benchmark, one MPI job per rank count."""
    from .distributed import launch

    argv = ["--dtype", args.dtypes[0] if args.dtypes[0] != "float16" else "float32",
            "--device", "cuda" if args.devices == ["cuda"] else "cpu"]
    if args.sizes:
        argv += ["--sizes", *map(str, sorted({e for group in args.sizes for e in group}))]
    if args.samples:
        argv += ["--samples", str(args.samples)]
    if args.json:
        argv += ["--json", args.json]
    try:
        return launch(args.ranks, argv)
    except SystemExit as refusal:  # launch's refusals (no mpiexec) are one message
        if isinstance(refusal.code, str):
            raise CommandError(refusal.code) from None
        raise


def main(argv=None):
    parser = OneLineErrorParser(prog="python -m bench", description=__doc__)
    add_arguments(parser)
    parser.set_defaults(run=run_bench)
    return run_command(parser.parse_args(argv), parser.prog)

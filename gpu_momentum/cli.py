"""`gpu-momentum`: the command line (also `python -m gpu_momentum`)."""

import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="gpu-momentum", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    from .demo import add_demo_command
    add_demo_command(commands)
    from .compile_kernels import add_compile_command
    add_compile_command(commands)
    from .bench.command import add_bench_command
    add_bench_command(commands)

    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

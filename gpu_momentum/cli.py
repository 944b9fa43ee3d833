"""`gpu-momentum`: the command line (also `python -m gpu_momentum`)."""

import argparse
import sys

# The exit status of every user error, as argparse's own.
USAGE_ERROR = 2


class CommandError(Exception):
    """A user error a command found while running (an unavailable backend, a folder that
    does not exist): printed as one line, `<prog> <command>: error: ...`, exit status 2."""


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, `<prog>: error: ...`, with exit status
    2, and a pointer to --help instead of the usage block."""

    def error(self, message):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def at_least_one(text):
    """An argparse type: an integer >= 1 (a count of steps, samples or ranks)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r} (an integer >= 1)")
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r} (must be at least 1)")
    return value


def run_command(args, prog):
    """Runs the parsed command; a CommandError becomes one line on stderr and status 2."""
    try:
        return args.run(args)
    except CommandError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return USAGE_ERROR


def main(argv=None):
    parser = OneLineErrorParser(prog="gpu-momentum", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    from .demo import add_demo_command
    add_demo_command(commands)
    from .compile_kernels import add_compile_command
    add_compile_command(commands)
    from .bench.command import add_bench_command
    add_bench_command(commands)

    args = parser.parse_args(argv)
    return run_command(args, f"{parser.prog} {args.command}")


if __name__ == "__main__":
    sys.exit(main())

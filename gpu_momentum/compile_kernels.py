"""`gpu-momentum compile`: the cupy backend's CUDA C module compiled ahead of time.

Compiles the exact source and options CuPy's RawModule receives with NVRTC for one
architecture (no GPU needed), writes the cubin and PTX (every entry point is in both) and
prints registers and spills per entry point. Exits 1 when any entry point spills.
"""

import os
import sys

from .cli import CommandError

# What `compile` needs beyond the package: NVRTC through cuda-bindings, and the CUDA
# binary utilities that cuda-pathfinder finds. The CUDA extras bring both.
CUDA_EXTRA_HINT = ('install the CUDA extra from the checkout: pip install -e ".[cuda13]" '
                   '(or ".[cuda12]")')


def add_compile_command(commands):
    parser = commands.add_parser(
        "compile", help="compile the CUDA C kernels for an architecture and report "
                        "registers and spills", description=__doc__)
    parser.add_argument("--arch", default="sm_90",
                        help="target architecture, e.g. sm_80 or sm_90 (any NVRTC supports; "
                             "default sm_90)")
    parser.add_argument("--out", required=True,
                        help="directory for momentum.<arch>.cubin and momentum.<arch>.ptx")
    parser.set_defaults(run=run_compile)


def run_compile(args):
    from .kernels.cuda_source import module_options
    from .kernels.cuda_toolchain import CompileError, compile_module, nvrtc_version

    try:
        module = compile_module(args.arch)
    except ImportError as error:
        raise CommandError(f"the CUDA compiler packages are missing ({error}): "
                           f"{CUDA_EXTRA_HINT}")
    except (ValueError, CompileError) as error:
        raise CommandError(str(error))
    stem = os.path.join(args.out, f"momentum.{module.arch}")
    try:
        os.makedirs(args.out, exist_ok=True)
        with open(f"{stem}.cubin", "wb") as f:
            f.write(module.cubin)
        with open(f"{stem}.ptx", "w", encoding="utf-8") as f:
            f.write(module.ptx)
    except OSError as error:
        raise CommandError(f"cannot write into --out {args.out!r}: {error}")

    version = ".".join(map(str, nvrtc_version()))
    print(f"momentum.cu for {module.arch} with NVRTC {version}, RawModule options: "
          f"{' '.join(module_options())}")
    header = ("entry point", "registers", "spill stores", "spill loads", "stack", "symbol")
    rows = [(expression, k.registers, f"{k.spill_store_bytes} B", f"{k.spill_load_bytes} B",
             f"{k.stack_frame_bytes} B", k.lowered_name)
            for expression, k in module.kernels.items()]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    print(f"wrote {stem}.cubin and {stem}.ptx")
    spilling = [e for e, k in module.kernels.items()
                if k.spill_store_bytes or k.spill_load_bytes]
    if spilling:
        print(f"gpu-momentum compile: {', '.join(spilling)} spill registers on "
              f"{module.arch}", file=sys.stderr)
        return 1
    return 0

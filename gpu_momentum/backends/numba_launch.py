"""Prepared launches of compiled Numba CUDA kernels: the driver's launch without the
dispatcher on the step path.

Calling a configured Numba kernel (`kernel[grid, block, stream](*args)`) types every
argument, looks the compiled overload up, and flattens each array through its CUDA array
interface, about 4 us per array argument. A `PreparedLaunch` does that once: it finds the
compiled kernel of the arguments' types, flattens them with the kernel's own argument
packing (numba's `_Kernel._prepare_args`: an array becomes meminfo, parent, size,
itemsize, data pointer, shape and strides; a scalar its ctypes value), and later calls
repack only the arguments that are other objects than the ones last packed (compared by
identity; one of other types prepares again), then launch the kernel's function handle through cuda.core's `launch`, as
numba does.

`launcher(configured)` is the one switch: a PreparedLaunch on a GPU, the configured
dispatcher itself in the CUDA simulator, which has no driver.
"""

LAUNCH_WITH = {"kernel_of": None, "launch": None}  # None: numba's (tests put fakes here)


def launcher(configured):
    """A callable launching `configured` (a Numba kernel with its grid, block and stream
    set) on its arguments: prepared on a GPU, the dispatcher in the CUDA simulator."""
    from numba.core import config

    if config.ENABLE_CUDASIM and LAUNCH_WITH["kernel_of"] is None:
        return configured
    return PreparedLaunch(configured)


def compiled_kernel(configured, args):
    """numba's compiled kernel (`_Kernel`) of `configured` for the types of `args`,
    compiled by one dispatcher launch if it is not yet."""
    dispatcher = configured.dispatcher
    types = tuple(dispatcher.typeof_pyval(value) for value in args)
    if types not in dispatcher.overloads:
        configured(*args)
    return dispatcher.overloads[types]


def launch_function():
    """cuda.core's `launch` and a factory of its LaunchConfig(grid, block)."""
    from cuda.core import LaunchConfig, launch

    return launch, lambda grid, block: LaunchConfig(grid=grid, block=block, shmem_size=0)


class PreparedLaunch:
    """`prepared(*args)` launches the configured kernel on `args`: the first call finds the
    compiled kernel and packs every argument; each later call repacks only the arguments
    that are other objects than the last call's (same types expected: the kernel's).
    packed_arguments counts the arguments packed, for tests of the step path's work."""

    __slots__ = ("configured", "kernel", "function", "values", "spans", "flat", "launch",
                 "launch_config", "stream", "packed_arguments")

    def __init__(self, configured):
        self.configured = configured
        self.kernel = self.values = None
        self.stream = configured.stream
        self.packed_arguments = 0

    def _pack(self, index, value):
        """The flattened kernel arguments of argument `index` holding `value`."""
        out = []
        self.kernel._prepare_args(self.kernel.argument_types[index], value, self.stream,
                                  [], out)
        self.packed_arguments += 1
        return out

    def _prepare(self, args):
        kernel_of = LAUNCH_WITH["kernel_of"] or compiled_kernel
        self.kernel = kernel_of(self.configured, args)
        launch, make_config = LAUNCH_WITH["launch"] or launch_function()
        self.launch = launch
        self.launch_config = make_config(self.configured.griddim,
                                         self.configured.blockdim)
        self.function = self.kernel._codelibrary.get_cufunc().kernel
        self.values = list(args)
        self.spans, self.flat = [], []
        for index, value in enumerate(args):
            packed = self._pack(index, value)
            self.spans.append((len(self.flat), len(self.flat) + len(packed)))
            self.flat.extend(packed)

    def __call__(self, *args):
        if self.values is None:
            self._prepare(args)
        else:
            values, flat = self.values, self.flat
            for index, value in enumerate(args):
                if value is not values[index]:
                    if (self.configured.dispatcher.typeof_pyval(value)
                            != self.kernel.argument_types[index]):
                        self._prepare(args)  # another overload's types
                        break
                    begin, end = self.spans[index]
                    flat[begin:end] = self._pack(index, value)
                    values[index] = value
        self.launch(self.stream, self.launch_config, self.function, *self.flat)

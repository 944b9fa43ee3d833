"""Prepared launches of compiled Numba CUDA kernels: the driver's launch without the
dispatcher on the step path.

Calling a configured Numba kernel (`kernel[grid, block, stream](*args)`) types every
argument, looks the compiled overload up, and flattens each array through its CUDA array
interface, about 4 us per array argument. A `PreparedLaunch` does that once: it finds the
compiled kernel of the arguments' types, flattens them with the kernel's own argument
packing (numba's `_Kernel._prepare_args`: an array becomes meminfo, parent, size,
itemsize, data pointer, shape and strides; a scalar its ctypes value), and later calls
repack only the arguments that are other objects than the ones last packed (compared by
identity; one of another type prepares the launch again), then launch the kernel's
function handle through cuda.core's `launch`, as numba does.

`launcher(configured)` is the one switch: a PreparedLaunch through `NumbaDriver` on a GPU,
the configured dispatcher itself in the CUDA simulator, which has no driver. Tests put
another driver in DRIVER to count the work of the prepared path without a GPU.
"""

import numpy as np

DRIVER = {"override": None}  # a driver standing in for NumbaDriver (tests), or None


class NumbaDriver:
    """numba-cuda's compiled kernels, their argument packing, and cuda.core's launch."""

    @staticmethod
    def compiled(configured, args):
        """(kernel, function handle, launch config, stream) of `configured` (a kernel
        with its grid, block and stream set) for the types of `args`: the compiled
        kernel, compiled (not launched) if it is not yet."""
        from cuda.core import LaunchConfig

        dispatcher = configured.dispatcher
        kernel = dispatcher.compile(tuple(dispatcher.typeof_pyval(value) for value in args))
        config = LaunchConfig(grid=configured.griddim, block=configured.blockdim,
                              shmem_size=configured.sharedmem)
        return kernel, kernel._codelibrary.get_cufunc().kernel, config, configured.stream

    @staticmethod
    def type_of(configured, value):
        return configured.dispatcher.typeof_pyval(value)

    @staticmethod
    def argument_type(kernel, index):
        return kernel.argument_types[index]

    @staticmethod
    def pack(kernel, index, value, stream):
        """Argument `index` holding `value`, flattened as the kernel's launch does."""
        flat = []
        kernel._prepare_args(kernel.argument_types[index], value, stream, [], flat)
        return flat

    @staticmethod
    def launch(stream, config, function, flat):
        from cuda.core import launch

        launch(stream, config, function, *flat)


def launcher(configured):
    """A callable launching `configured` (a Numba kernel with its grid, block and stream
    set) on its arguments: prepared on a GPU, the dispatcher in the CUDA simulator."""
    from numba.core import config

    driver = DRIVER["override"]
    if driver is None:
        if config.ENABLE_CUDASIM:
            return configured
        driver = NumbaDriver
    return PreparedLaunch(configured, driver)


class PreparedLaunch:
    """`prepared(*args)` launches the configured kernel on `args`: the first call finds the
    compiled kernel and packs every argument; each later call repacks only the arguments
    that are other objects than the last call's. packed_arguments counts the arguments
    packed (the step path's work)."""

    __slots__ = ("configured", "driver", "kernel", "function", "config", "stream",
                 "values", "spans", "flat", "packed_arguments")

    def __init__(self, configured, driver):
        self.configured, self.driver = configured, driver
        self.values = None
        self.packed_arguments = 0

    def _pack(self, index, value):
        self.packed_arguments += 1
        return self.driver.pack(self.kernel, index, value, self.stream)

    def _prepare(self, args):
        self.kernel, self.function, self.config, self.stream = self.driver.compiled(
            self.configured, args)
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
            driver, values, flat = self.driver, self.values, self.flat
            for index, value in enumerate(args):
                last = values[index]
                if value is last:
                    continue
                # A NumPy scalar of the last one's class has its type (the step count);
                # anything else is typed again.
                if not (isinstance(value, np.generic) and type(value) is type(last)) and (
                        driver.type_of(self.configured, value)
                        != driver.argument_type(self.kernel, index)):
                    self._prepare(args)  # another overload's types
                    break
                begin, end = self.spans[index]
                flat[begin:end] = self._pack(index, value)
                values[index] = value
        self.driver.launch(self.stream, self.config, self.function, self.flat)

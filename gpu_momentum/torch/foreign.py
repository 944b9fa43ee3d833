"""A Bucket of parameters whose storage a wrapper owns (storage.lives_elsewhere): FSDP2's
DTensor shards, ZeroRedundancyOptimizer's bucket views, FSDP1's flat parameters with
use_orig_params=True. They are never moved: each step copies their current values and
gradients into the flat buffers (one torch._foreach_copy_ each), runs the one fused
launch, and copies the new values back where they live. The cost over an owned buffer is
those three copies per step; velocities and precision buffers live in the flat buffers
as for owned parameters, and a DTensor parameter's state holds them as DTensors."""

import torch

from .buckets import Bucket
from .grad_views import zero_in_place
from .storage import as_state_of, is_dtensor, local_of
from .tensors import data_ptr, dense, segment


class ForeignGrads:
    """The gradient side of a ForeignBucket: flat gradient segments that each step's
    gradients are copied into. Each `p.grad` stays the object torch or the wrapper made,
    and zero_grad() is torch's."""

    def __init__(self, params, grad, offsets, device):
        self.params, self.grad = params, grad
        self.views = [segment(grad, o, local_of(p)) for o, p in zip(offsets, params)]

    def cleared_by_view(self):
        return {}

    def commit(self, old_views):
        pass  # the gradients stay where they are

    def unwatch(self):
        pass  # no hooks

    def reshaped(self):
        return False

    def zero_grad(self, set_to_none, adopt, capturing=False):
        """torch's zero_grad of each parameter."""
        for p in self.params:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    zero_in_place(p.grad)

    def gather(self, foreign):
        """Copies the gradients [(index, local gradient)] into their segments, one
        launch."""
        if foreign:
            torch._foreach_copy_([self.views[index] for index, _ in foreign],
                                 [grad for _, grad in foreign])


class ForeignBucket(Bucket):
    """The parameters of one (backend, device, dtype) whose storage a wrapper owns,
    updated where they live (see the module's docstring)."""

    gradient_views = ForeignGrads

    def __init__(self, backend, device, dtype, params, groups, counted, check_nonfinite,
                 precision):
        super().__init__(backend, device, dtype, params, groups, counted, check_nonfinite,
                         precision, likes=[local_of(p) for p in params])
        self.local_velocity = self.velocity_views
        self.velocity_views = list(map(as_state_of, params, self.local_velocity))
        if self.buffer_views is not None:
            self.local_buffers = self.buffer_views
            self.buffer_views = list(map(as_state_of, params, self.local_buffers))

    def check_state(self, state):
        """Bucket.check_state, and a DTensor parameter's state tensors are DTensors (as
        torch.optim.SGD's and torch.distributed.checkpoint's are)."""
        super().check_state(state)
        for index, p in enumerate(self.params):
            if not is_dtensor(p):
                continue
            for key, tensor, view in self._state_pairs(state, index):
                if tensor is not None and tensor is not view and not is_dtensor(tensor):
                    raise TypeError(f"Invalid {key} value: a {type(tensor).__name__} for "
                                    f"a DTensor parameter (a DTensor placed as the "
                                    f"parameter is, as torch.optim.SGD keeps it)")

    def fill(self, state):
        """Copies the momentum and precision buffers in `state` into the flat buffers
        (values and gradients are copied at each step)."""
        for index in range(len(self.params)):
            for _, tensor, view in self._state_pairs(state, index):
                if tensor is not None:
                    view.copy_(dense(tensor))

    def commit(self, state, old_views, step_count):
        """Points the state at the flat buffers; the parameters stay where they are."""
        for index in range(len(self.params)):
            self._point_state(state, index)
        self.ptrs = self._where()
        self._write_counters(step_count, 0)

    def _where(self):
        return [(data_ptr(t), t.shape) for t in map(local_of, self.params)]

    def in_place(self):
        """Whether each parameter still lives where it did when packed."""
        return self._where() == self.ptrs

    def prepare(self):
        """Which parameters have a gradient (`.grad` not None, as in torch), and their
        local gradients [(index, gradient)], checked."""
        grads = [p.grad for p in self.params]
        present = [grad is not None for grad in grads]
        if present != self.present:
            self.present = present
            self.table_stale = True
        gathered = []
        for index, grad in enumerate(grads):
            if grad is None:
                continue
            local, view = dense(local_of(grad)), self.grads.views[index]
            if local.shape != view.shape or local.device != view.device or \
                    local.dtype != view.dtype:
                raise RuntimeError(f"a parameter's .grad ({local.dtype}, local shape "
                                   f"{tuple(local.shape)}, on {local.device}) does not "
                                   f"match the parameter ({view.dtype}, local shape "
                                   f"{tuple(view.shape)}, on {view.device})")
            gathered.append((index, local))
        return gathered

    def launch(self, *args, **kwargs):
        """Bucket.launch between copying the parameters' values in and the new values
        back where they live."""
        where = [local_of(p) for p in self.params]
        if where:
            torch._foreach_copy_(self.param_views, where)
        skipped = super().launch(*args, **kwargs)
        if where:
            torch._foreach_copy_(where, self.param_views)
        return skipped

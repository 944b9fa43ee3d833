"""The gradient side of a flat buffer: each parameter's `.grad` a view of the flat gradient,
and the hooks that tell which parameters received a gradient since `zero_grad()`.

torch's None `.grad` is kept as a meaning, not as a value: a post-accumulate-grad hook on
each parameter marks it when autograd accumulates into its `.grad`; one that received
nothing since `zero_grad(set_to_none=True)` is "cleared" (its `.grad` a zero view) and
counts as having no gradient. DDP writes the reduced gradient of a parameter this process
did not use into its view in place, without autograd: each view has its own version
counter, and a check queued at the end of each backward pass counts such a write as a
gradient. A backward captured into a CUDA graph zeroes the cleared views first, in the
graph (a gradient hook on each CUDA parameter)."""

import weakref

import torch

from .tensors import data_ptr, dense, segment

_ENGINE = torch.autograd.Variable._execution_engine


class Reshaped(Exception):
    """A parameter has a new shape over the same memory: its views must be made again."""


class GradientViews:
    """The flat gradient of one buffer's parameters, the view of it that is each one's
    `.grad`, which of them are cleared, and the hooks that keep that up to date."""

    def __init__(self, params, grad, offsets, device):
        self.params, self.grad = params, grad
        # The segments the kernels read: where a gradient that is not (or no longer) a view
        # is copied to. The views given to the parameters as .grad start over the same
        # memory; `p.grad.data = g` or `p.grad.set_(g)` moves one elsewhere (the same
        # object), which a step notices by its data pointer (attached()).
        self.slots = [segment(grad, o, p) for o, p in zip(offsets, params)]
        # .data: each gradient view with a version counter of its own (views share their
        # base's), so that an in-place write into one parameter's gradient shows.
        self.views = [slot.data for slot in self.slots]
        self.ptrs = list(map(data_ptr, self.views))
        # Parameters whose .grad is their view but which torch would show None: zeroed by
        # zero_grad(set_to_none=True), no gradient accumulated since (the hooks say).
        self.cleared = [False] * len(params)
        self.versions = None  # of the gradient views when last zeroed or pointed at
        self.unwatched = list(range(len(params)))  # no hook yet (frozen when packed)
        self.hooks = []
        weakref.finalize(self, _remove_hooks, self.hooks)
        self.backward_pending = False  # a hook ran in this backward: check at its end
        # On CUDA: whether the current stream is being captured into a CUDA graph, and
        # whether the graph being captured zeroes the flat gradient itself (its replays
        # must, before the captured backward accumulates into a cleared view).
        self.capturing = capture_check(device)
        self.zeroed_in_graph = False

    def cleared_by_view(self):
        """{id(gradient view): whether cleared}: what a new packing needs of these views
        (a parameter's .grad that is one of them keeps its meaning)."""
        return {id(view): cleared for view, cleared in zip(self.views, self.cleared)}

    def commit(self, old_views):
        """Points each parameter's .grad that was a view of the replaced buffers at its
        new view (the bucket copied its values; any other gradient object stays, as torch
        never replaces one), then hooks the parameters. `old_views`: cleared_by_view() of the
        buffers replaced."""
        for index, p in enumerate(self.params):
            grad = p.grad
            view = self.views[index]
            cleared = old_views.get(id(grad))
            if grad is not None and grad.shape == view.shape and cleared is not None:
                p.grad = view  # the bucket's fill() copied its values
                self.cleared[index] = bool(cleared)
            elif cleared:
                p.grad = None  # what it stood for, now that no view of its shape can
        self.watch()
        self.versions = [view._version for view in self.views]

    def watch(self):
        """Hooks each parameter that requires a gradient and has no hook yet: after
        autograd accumulates into its .grad (in place or not) it has a gradient; on CUDA,
        before it does, a cleared view is zeroed inside a CUDA graph capture."""
        if not self.unwatched:
            return
        still = []
        for index in self.unwatched:
            p = self.params[index]
            if p.requires_grad:
                self.hooks.append(p.register_post_accumulate_grad_hook(
                    _hook(self, "received", index)))
                if self.capturing is not None:
                    self.hooks.append(p.register_hook(
                        _hook(self, "accumulating", index)))
            else:
                still.append(index)  # frozen: no hook can be registered yet
        self.unwatched = still

    def unwatch(self):
        """Removes the hooks (these buffers are replaced)."""
        _remove_hooks(self.hooks)
        self.unwatched = list(range(len(self.params)))

    def accumulating(self, index):
        """Parameter `index`'s gradient hook on CUDA, before autograd accumulates into its
        .grad. Inside a CUDA graph capture a cleared view is zeroed first, in the graph:
        zero_grad() left it zero, but each replay finds the last replay's gradient there
        (with torch's None the graph would write a new gradient, not add to one). The
        whole buffer while no parameter has a gradient (one memset), else this view."""
        if not self.cleared[index] or self.zeroed_in_graph or not self.capturing():
            return
        if all(self.cleared):
            self.grad.zero_()
            self.zeroed_in_graph = True
        else:
            self.views[index].zero_()

    def received(self, index):
        """Parameter `index`'s hook: autograd accumulated a gradient into its .grad. The
        first in a backward pass queues the check of what others write during it."""
        self.cleared[index] = False
        if not self.backward_pending:
            self.backward_pending = True
            # Queued from a callback, so that it runs after the callbacks queued in this
            # backward so far (DDP's reduction, queued from DDP's hooks, which run after
            # this one).
            try:
                _ENGINE.queue_callback(lambda: _ENGINE.queue_callback(self.backward_done))
            except RuntimeError:  # an engine that takes no callbacks: no check, and
                self.backward_pending = False  # never a failed backward

    def backward_done(self):
        """At the end of a backward pass in which some parameter received a gradient: a
        cleared gradient view that was written in place during it holds a gradient too.
        DDP (gradient_as_bucket_view=False) writes the reduced gradient of a parameter
        this process did not use, and torch.optim.SGD would update it (DDP hands it a
        gradient in place of its None)."""
        self.backward_pending = False
        if not any(self.cleared):
            return
        for index, cleared in enumerate(self.cleared):
            view = self.views[index]
            if cleared and view._version != self.versions[index] and \
                    self.params[index].grad is view:
                self.cleared[index] = False

    def zero_grad(self, set_to_none, adopt, capturing=False):
        """Zeroes the flat gradient in one call; each hooked parameter's .grad that is
        its view stays so. set_to_none=True: every parameter then has no gradient until
        autograd accumulates one (an unhooked, frozen one gets None, as in torch); False:
        one that had a gradient has a zero one, one that had none has none. `adopt`: a
        None .grad, or one that is a view of another buffer, becomes the view too; else
        it gets what torch gives it (None, or zeroed in place), and a standalone one
        still becomes the view. `capturing`: this zeroing is in a CUDA graph, so its
        replays zero the buffer before a backward captured after it."""
        self.watch()  # parameters thawed since they were packed
        self.reattach()
        self.grad.zero_()
        self.zeroed_in_graph = capturing
        unwatched = set(self.unwatched)
        for index, p in enumerate(self.params):
            grad = p.grad
            view = self.views[index]
            if grad is view:
                if set_to_none and index in unwatched:
                    p.grad = None
                continue
            watched = index not in unwatched
            if grad is None:
                if watched and adopt:
                    self._point(index, view)
                    self.cleared[index] = True
            elif set_to_none:
                if watched and (adopt or _replaceable(grad, view)):
                    self._point(index, view)
                else:
                    p.grad = None
            else:  # torch zeroes it, and it stays a gradient
                if _replaceable(_detached(grad), view):
                    self._point(index, view)
                else:
                    grad.zero_()  # DDP's bucket views: DDP keeps its own
                self.cleared[index] = False
        if set_to_none:
            self.cleared = [True] * len(self.params)
        self.versions = [view._version for view in self.views]
        self.backward_pending = False  # (a failed backward runs no callbacks)

    def attached(self):
        """Whether every gradient view is still over its segment of the flat gradient
        (the common step: one data pointer per view)."""
        return list(map(data_ptr, self.views)) == self.ptrs

    def detached(self):
        """Per parameter, whether its gradient view was moved off its segment
        (`p.grad.data = g`, `p.grad.set_(g)`): the object is still `.grad`, its values are
        elsewhere."""
        return [data_ptr(view) != ptr for view, ptr in zip(self.views, self.ptrs)]

    def reattach(self):
        """Puts each moved gradient view back over its segment (in zero_grad(), which
        zeroes or drops the values: the object stays the parameter's .grad, and the next
        backward accumulates into the flat buffer again)."""
        if self.attached():
            return
        for view, slot, moved in zip(self.views, self.slots, self.detached()):
            if moved:
                view.data = slot

    def reshaped(self):
        """Whether a parameter has a new shape over the same memory (see Reshaped)."""
        return any(p.shape != view.shape for p, view in zip(self.params, self.views))

    def _point(self, index, view):
        p = self.params[index]
        if p.shape != view.shape:
            raise Reshaped
        p.grad = view

    def gather(self, foreign):
        """Copies gradients that live outside the flat buffer (and views moved off it)
        into it, in one launch. Each stays its parameter's .grad, as torch never
        replaces a gradient object at a step."""
        if not foreign:
            return
        torch._foreach_copy_([self.slots[index] for index, _ in foreign],
                             [dense(grad) for _, grad in foreign])


def _replaceable(grad, view):
    """Whether `grad` may be replaced by `view` (same values) as the parameter's .grad: a
    standalone dense tensor no graph and no other buffer owns (autograd's, or one the
    user assigned). DDP's bucket views and gradients with a graph stay."""
    return (grad._base is None and not grad.requires_grad and grad.layout == torch.strided
            and grad.shape == view.shape and grad.dtype == view.dtype
            and grad.device == view.device)


def _detached(grad):
    """torch's zero_grad(set_to_none=False) on a gradient before it zeroes it."""
    if grad.grad_fn is not None:
        grad.detach_()
    else:
        grad.requires_grad_(False)
    return grad


def zero_in_place(grad):
    """torch's zero_grad(set_to_none=False) of a gradient."""
    _detached(grad).zero_()


def _hook(views, method, index):
    """A hook of parameter `index` that calls `views.<method>(index)`: the
    post-accumulate-grad hook ("received") or the gradient hook ("accumulating"). It holds
    its GradientViews weakly, and they remove it when they go; it is not saved with the
    tensor (torch.save of a model warns of a gradient hook that is not so marked)."""
    held = weakref.ref(views)

    @torch.utils.hooks.unserializable_hook
    def hook(tensor):
        views = held()
        if views is not None:
            getattr(views, method)(index)
    return hook


def capture_check(device):
    """The function that tells whether the current stream is being captured into a CUDA
    graph, for buffers on `device`; None where no graph can be captured."""
    return torch.cuda.is_current_stream_capturing if device.type == "cuda" else None


def _remove_hooks(handles):
    for handle in handles:
        handle.remove()
    handles.clear()


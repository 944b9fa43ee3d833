"""`ShardedMomentumSGD`: ZeRO-1 sharding of MomentumSGD over the ranks of an MPI
communicator (see the package's docstring)."""

import hashlib

import numpy as np

from ..arrays import describe, type_name
from ..backends import check_arrays
from ..flat import FlatParams
from ..groups import GROUP_OPTIONS
from ..hyperparams import flag, inverse_grad_scale
from ..optimizer import MomentumSGD
from .agreement import agree, check_comm, checksum, content_digest, first_difference
from .collectives import make_collectives, transport_for
from .shard import ShardUpdate, check_sharded_precision, shard_bounds


class _Whole:
    """A ShardedMomentumSGD as gpu_momentum.checkpoint sees an optimizer: the whole
    buffer's state in host memory. To save, it holds the gathered state; to load, the
    state read goes through the sharded optimizer's checks, and `restore` waits until
    every rank agreed."""

    backend = "cpu"  # what it hands over is in host memory
    precision = "nearest"  # the only one sharding takes (check_sharded_precision)

    def __init__(self, sharded, state=None):
        self._sharded, self._state = sharded, state
        self.restore = self.identity = None  # of the state read, once it passed the checks
        self.flat = sharded.flat
        self.velocity_dtype = sharded.shard_optimizer.velocity_dtype
        if state is None:  # to load: what the reader expects, without a whole velocity
            self.param = sharded.param
            self.velocity = np.broadcast_to(np.zeros((), sharded.velocity.dtype),
                                            describe("param", sharded.param).shape)
        else:
            self.param = sharded.shard_optimizer.array_backend.to_numpy(sharded.param)
            self.velocity = state["velocity"]

    def state_dict(self):
        return dict(self._state)

    def load_state_dict(self, state, params=None):
        self.restore, self.identity = self._sharded._checked_state(state, params)


def _identity_values(what, identity):
    """agree's values comparing the (step count, content digest) of the state each rank
    loads (zeros on a rank whose checks failed: its error decides then)."""
    step_count, digest = identity or (0, 0)
    return {f"step_count of {what}": (step_count, lambda: step_count),
            f"content of {what} (digest)": (digest, lambda: f"{digest:014x}")}


def _forward(name, settable=False):
    """A property of the rank's shard optimizer, as MomentumSGD has it."""
    doc = getattr(MomentumSGD, name).__doc__ if isinstance(
        getattr(MomentumSGD, name, None), property) else None
    setter = (lambda self, value: setattr(self._local, name, value)) if settable else None
    return property(lambda self: getattr(self._local, name), setter, doc=doc)


class ShardedMomentumSGD:
    """MomentumSGD over the ranks of an MPI communicator, each updating its shard of the
    flat buffer (ZeRO stage 1): identical results to one process fed the average gradient,
    the velocity (the optimizer's memory) and the update's memory traffic divided by N.

    params: a FlatParams (or one contiguous array) of the same layout and the same initial
    values on every rank; the constructor compares layouts and options across ranks and
    the values by a position-sensitive checksum (agreement.checksum), and refuses a
    mismatch with an error naming the first rank that differs. comm: an mpi4py
    intracommunicator (mpi4py.MPI.COMM_WORLD). Every other
    keyword is MomentumSGD's (lr, momentum, dampening, weight_decay, l1, nesterov,
    maximize, style, decoupled_weight_decay, groups, skip_nonfinite, backend; formulas,
    first steps and groups as there) and must be the same on every rank. collectives: "auto" (NCCL for GPU arrays, MPI for host arrays),
    "nccl", or "mpi" (on GPU arrays only with a CUDA-aware MPI; each collective then waits
    for the stream).

    `velocity` is this rank's shard of the velocity, `shard` its (start, stop) in the flat
    buffer, `shards` every rank's. The constructor, `step`, `state_dict`,
    `load_state_dict`, `save` and `load` are collective: every rank calls them, in the
    same order. Each first checks its arguments on every rank and agrees on the outcome
    (one small host allreduce, never waiting for a device): when a rank's check fails,
    or what must be the same on every rank differs (a step's hyperparameters as they are
    then, capturable or not; the step count and content digest of the state a load read),
    every rank raises and nothing changes anywhere.
    """

    def __init__(self, params, *, comm, collectives="auto", **options):
        # **options: exactly MomentumSGD's keyword arguments (lr, momentum, ..., groups,
        # skip_nonfinite, backend), checked by it, so that every option it has or gains
        # works here too.
        self.comm = check_comm(comm)
        rank, ranks = comm.Get_rank(), comm.Get_size()
        error = description = None
        try:
            buffer = params.data if isinstance(params, FlatParams) else params
            info = describe("params", buffer)
            size = int(np.prod(info.shape, dtype=np.int64))
            self.shards = shard_bounds(size, ranks, info.dtype.itemsize)
            self._local = ShardUpdate(params, self.shards[rank], **options)
            check_sharded_precision(self._local)
            transport = transport_for(collectives, info.on_device)
            description = self._description(params, info, transport)
        except Exception as failure:  # every rank must hear of it
            error = failure
        agree(comm, error)
        first_difference(comm, description)
        self.flat = self._local.flat
        self.param = buffer  # the whole buffer, as given
        self._whole = buffer.reshape(size)  # the same, 1-D: what the collectives move
        backend = self._local.array_backend
        self._collectives = make_collectives(comm, self.shards, transport, backend,
                                             self._whole)
        self._scratch = backend.zeros(self._local.velocity.shape, info.dtype)
        self._fingerprint = None  # of the hyperparameters, for the steps' agreement
        self._fingerprint_version = None  # the hyperparameters_version it digests

    def _description(self, params, info, transport):
        """What must be the same on every rank (compared in this order)."""
        flat = params if isinstance(params, FlatParams) else None
        local = self._local
        return {"dtype": str(info.dtype), "shape": tuple(info.shape),
                "segment shapes": None if flat is None else flat.shapes,
                "segment offsets": None if flat is None else flat.offsets,
                "segment names": None if flat is None else flat.names,
                "backend": local.backend, "collectives": transport,
                "hyperparameters": local.hyperparameters(),
                "groups": [group["params"] for group in local.param_groups],
                "skip_nonfinite": local.skip_nonfinite,
                "initial parameter values (checksum)": checksum(
                    local.array_backend, params.data if flat else params)}

    @property
    def velocity(self):
        """This rank's shard of the velocity (elements `shard` of the flat buffer)."""
        return self._local.velocity

    @property
    def shard(self):
        """(start, stop) of this rank's shard in the flat buffer."""
        return self.shards[self._collectives.rank]

    @property
    def collectives(self):
        """The transport of the collectives: "mpi" or "nccl"."""
        return self._collectives.transport

    @property
    def shard_optimizer(self):
        """This rank's ShardUpdate: the MomentumSGD over `shard` that `step` drives
        between its collectives. Its `update(shard_grad, inv_grad_scale)` is a step's
        update alone (what the distributed benchmark times); anything that changes it on
        one rank alone leaves the ranks out of step."""
        return self._local

    @property
    def collective_calls(self):
        """The Collectives object making this optimizer's collective calls on its
        communicator (`collectives` is its transport's name); every rank calls each of
        them, in the same order."""
        return self._collectives

    def _hyperparameter_fingerprint(self):
        """A 56-bit digest of every group's hyperparameters, recomputed after a change."""
        version = self._local.hyperparameters_version
        if self._fingerprint is None or self._fingerprint_version != version:
            text = repr(self._local.hyperparameters()).encode()
            self._fingerprint = int.from_bytes(hashlib.blake2b(text, digest_size=7)
                                               .digest(), "little")
            self._fingerprint_version = version
        return self._fingerprint

    def step(self, grad=None, *, grad_scale=1.0, grads_reduced=False):
        """One collective step: reduce-scatter this rank's `grad` (default: the
        FlatParams' gradient buffer; the whole buffer's gradient) so that the rank gets
        the average of its shard over ranks, update the shard (divided by `grad_scale`, as
        MomentumSGD.step), all-gather the parameters.

        grads_reduced=True: `grad` is already the average over ranks, the same on every
        rank (DDP's): no reduce-scatter. Every rank must pass the same grad_scale and
        grads_reduced, and have the same hyperparameters; a difference is refused before
        anything moves. With skip_nonfinite, a NaN or inf in any rank's gradient makes
        every rank skip the step."""
        error = None
        try:
            grads_reduced = flag("grads_reduced", grads_reduced)
            inv_grad_scale = self._inverse_grad_scale(grad_scale, grads_reduced)
            grad = self._local.gradient(grad)
            check_arrays(self._local.array_backend, self.param, grad, None)
        except Exception as failure:  # every rank must hear of it
            error = failure
            grads_reduced, grad_scale = False, 1.0
        scale = float(grad_scale)
        agree(self.comm, error, {
            "grads_reduced": (int(grads_reduced), lambda: grads_reduced),
            "grad_scale": (int(np.float64(scale).view(np.int64)), lambda: scale),
            "hyperparameters": (self._hyperparameter_fingerprint(),
                                self._local.hyperparameters)})
        start, stop = self.shard
        grad = grad.reshape(self._whole.shape)
        if grads_reduced:
            shard_grad = grad[start:stop]
        else:
            self._collectives.reduce_scatter(grad, self._scratch)
            shard_grad = self._scratch
        agree_skip = self._collectives.agree_skip if self.skip_nonfinite else None
        self._local.update(shard_grad, inv_grad_scale, agree_skip)
        self._collectives.all_gather(self._whole)

    def _inverse_grad_scale(self, grad_scale, grads_reduced):
        """What the update multiplies the shard's gradient by: 1 / grad_scale, and 1 / N
        more for a sum over N ranks; checked as MomentumSGD checks grad_scale, that
        product included."""
        dtype = describe("param", self.param).dtype
        inverse = inverse_grad_scale(grad_scale, dtype)
        ranks = self.comm.Get_size()
        if grads_reduced or ranks == 1:
            return inverse
        try:
            inverse_grad_scale(float(grad_scale) * ranks, dtype)
        except ValueError as error:
            raise ValueError(f"Invalid grad_scale value: {grad_scale!r} (the update divides "
                             f"the sum over {ranks} ranks by {ranks} * grad_scale, which "
                             f"must pass the same check: {error})") from None
        return inverse / ranks

    def state_dict(self):
        """Collective: the whole optimizer's state, as `MomentumSGD.state_dict()` gives it
        (any MomentumSGD or ShardedMomentumSGD of this layout loads it), with the velocity
        gathered from every rank's shard into host memory on every rank."""
        state = self._local.state_dict()
        state["velocity"] = self._gathered_velocity(root=None)
        return state

    def _gathered_velocity(self, root):
        """The whole velocity in host memory: on every rank (root None), else on `root`
        alone (None elsewhere)."""
        from mpi4py.util.dtlib import from_numpy_dtype

        shard = np.ascontiguousarray(self._local.array_backend.to_numpy(self.velocity))
        collectives = self._collectives
        whole = (np.empty(self.param.shape, shard.dtype)
                 if root is None or root == collectives.rank else None)
        target = None if whole is None else [whole, collectives.counts, collectives.starts,
                                             from_numpy_dtype(shard.dtype)]
        if root is None:
            self.comm.Allgatherv(shard, target)
        else:
            self.comm.Gatherv(shard, target, root=root)
        return whole

    def load_state_dict(self, state, params=None):
        """Collective: restores a whole optimizer's state (`state_dict()` of a MomentumSGD
        or ShardedMomentumSGD of this layout, on any number of ranks) and, given `params`
        (the whole flat buffer), the parameters. Each rank keeps its shard of the
        velocity. Checked on every rank first: when one rank's check fails, or the ranks
        were given different states (step counts, or contents: `content_digest` of the
        state and params), every rank raises and nothing changes anywhere."""
        error = restore = identity = None
        try:
            restore, identity = self._checked_state(state, params)
        except Exception as failure:  # every rank must hear of it
            error = failure
        agree(self.comm, error, _identity_values("the state given", identity))
        restore()

    def _checked_state(self, state, params):
        """Checks a whole state (and params) on this rank alone; returns the collective
        function that restores them (every rank calls it once all ranks agreed) and
        (step count, content_digest of state and params), which the ranks compare."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type_name(state)}")
        shard_state = dict(state)
        if "velocity" in state:
            shard_state["velocity"] = self._shard_of("velocity", state["velocity"])
        shard_params = None if params is None else self._shard_of("params", params)
        restore_shard = self._local.checked_state(shard_state, shard_params)

        def restore():
            restore_shard()
            if params is not None:
                self._collectives.all_gather(self._whole)

        # What every rank must have alike, or each would restore a state of its own.
        identity = (int(state["step_count"]), content_digest(
            self._local.array_backend, state, {"velocity": state.get("velocity"),
                                               "params": params}))
        return restore, identity

    def save(self, path):
        """Collective: writes a checkpoint of the whole optimizer and parameters, in
        gpu_momentum.checkpoint's format: the very file a MomentumSGD writes, so that
        `MomentumSGD.load` and `ShardedMomentumSGD.load` on any number of ranks read it.
        Rank 0 gathers the velocity into its host memory and writes the file, atomically
        (temporary file, fsync, rename); when that fails, every rank raises. Ranks
        loading it on other machines need a filesystem shared with rank 0."""
        from ..checkpoint import save_checkpoint

        state = self._local.state_dict()
        state["velocity"] = self._gathered_velocity(root=0)
        error = None
        if self._collectives.rank == 0:
            try:
                save_checkpoint(_Whole(self, state), path)
            except Exception as failure:  # every rank must hear of it
                error = failure
        agree(self.comm, error)

    def load(self, path):
        """Collective: restores params and state from a checkpoint of a MomentumSGD or of
        a ShardedMomentumSGD on any number of ranks, resharded: every rank reads the file
        (into host memory), checks it as MomentumSGD.load does and keeps its shard; when
        one rank's check fails, or the ranks read different checkpoints (their step
        counts, or contents: `content_digest` of the state and parameters read, so that
        copies of one checkpoint agree wherever they lie), every rank raises and nothing
        changes anywhere."""
        from ..checkpoint import load_checkpoint

        error = whole = None
        try:
            whole = _Whole(self)
            load_checkpoint(whole, path)
        except Exception as failure:  # every rank must hear of it
            error = failure
        identity = None if whole is None else whole.identity
        agree(self.comm, error, _identity_values("the checkpoint read", identity))
        whole.restore()

    def _shard_of(self, name, array):
        """This rank's shard of `array`, a whole buffer of the flat buffer's shape."""
        info, want = describe(name, array), describe("param", self.param)
        if info.shape != want.shape or not info.contiguous:
            raise ValueError(f"{name} has shape {info.shape}; this optimizer's state covers "
                             f"the whole buffer, of shape {want.shape} (contiguous)")
        size = self._whole.shape[0]
        start, stop = self.shard
        return array.reshape(size)[start:stop]

    def __repr__(self):
        own = self._local.hyperparameters()[0]
        fields = ", ".join(f"{k}={v!r}" for k, v in own.items())
        return (f"ShardedMomentumSGD({fields}, rank={self._collectives.rank} of "
                f"{self._collectives.size}, shard={self.shard}, backend={self.backend!r}, "
                f"collectives={self.collectives!r}, step_count={self.step_count})")


# What a MomentumSGD has, of this rank's shard optimizer: the hyperparameters, settable
# between steps (the same on every rank), and what it reports.
for _name in (*GROUP_OPTIONS, "maximize"):
    setattr(ShardedMomentumSGD, _name, _forward(_name, settable=True))
for _name in ("style", "decoupled_weight_decay", "param_groups", "step_count",
              "skipped_steps", "last_step_skipped", "velocity_initialized",
              "skip_nonfinite", "backend"):
    setattr(ShardedMomentumSGD, _name, _forward(_name))
del _name

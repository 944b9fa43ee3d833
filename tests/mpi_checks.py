"""Checks of gpu_momentum.distributed, run on every rank of one `mpiexec -n N` (started by
tests/test_distributed.py with N = 3, 2 and 1, in that order, as
`python -m mpi4py tests/mpi_checks.py OUT_DIR [CHECKPOINT_IN]`, so that a rank that
raises aborts the job instead of leaving the others in a collective).

Each rank writes OUT_DIR/rank<r>.json: per case, what the test asserts (errors against
the single-process MomentumSGD fed the average gradient, digests of the parameters after
every step, shard and velocity sizes, counters, the exceptions of the error table and
whether anything changed). Rank 0 also writes OUT_DIR/sharded.npz, a checkpoint of a
sharded run that the next N loads (CHECKPOINT_IN), continuing as if uninterrupted.
"""

import hashlib
import json
import os
import sys

import numpy as np
from mpi4py import MPI

import gpu_momentum as gm
from configs import GROUP_CONFIGS, LR_SCHEDULE, SEGMENT_NAMES, SEGMENT_SIZES
from gpu_momentum.distributed import ShardedMomentumSGD, cuda_aware_mpi_reason

COMM = MPI.COMM_WORLD
RANK, RANKS = COMM.Get_rank(), COMM.Get_size()
LAST = RANKS - 1  # the rank that misbehaves in the error table
STEPS = 12


def gradients(size, step, dtype=np.float64, seed=0):
    """Every rank's gradient of one step (scaled apart so that the summation order shows
    in the last bits)."""
    return [(np.random.default_rng([seed, step, rank]).standard_normal(size) * (1 + rank))
            .astype(dtype) for rank in range(RANKS)]


def average(grads):
    total = grads[0].copy()
    for grad in grads[1:]:
        total += grad
    return total / RANKS


def model(dtype=np.float64, seed=1):
    rng = np.random.default_rng(seed)
    return gm.FlatParams.from_arrays([rng.standard_normal(size).astype(dtype)
                                      for size in SEGMENT_SIZES], names=list(SEGMENT_NAMES))


def digest(array):
    return hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=8).hexdigest()


def relative_error(got, want):
    """max |got - want| / max |want|: elementwise relative errors are unbounded where a
    parameter passes near zero, so the bound is taken against the buffer's scale."""
    if want.size == 0:
        return 0.0
    return float(np.abs(got.astype(np.float64) - want).max() / max(np.abs(want).max(),
                                                                    1e-300))


class Lockstep:
    """A sharded optimizer and the single-process reference, stepped alike."""

    def __init__(self, sharded, reference, sharded_param, reference_param):
        self.sharded, self.reference = sharded, reference
        self.param, self.reference_param = sharded_param, reference_param
        self.result = {"digests": [], "error": 0.0, "velocity_error": 0.0,
                       "bitwise": True, "shard": list(sharded.shard),
                       "shards": [list(s) for s in sharded.shards],
                       "velocity_size": int(sharded.velocity.size)}

    def set(self, **change):
        for optimizer in (self.sharded, self.reference):
            for name, value in change.items():
                setattr(optimizer, name, value)

    def step(self, grads, **options):
        reduced = options.pop("grads_reduced", False)
        mine = average(grads) if reduced else grads[RANK]
        self.sharded.step(mine, grads_reduced=reduced, **options)
        self.reference.step(average(grads), **options)
        self.compare()

    def compare(self):
        start, stop = self.sharded.shard
        result, got = self.result, self.param.reshape(-1)
        want = self.reference_param.reshape(-1)
        result["digests"].append(digest(got))
        result["error"] = max(result["error"], relative_error(got, want))
        velocity = self.reference.velocity.reshape(-1)[start:stop]
        result["velocity_error"] = max(result["velocity_error"],
                                       relative_error(self.sharded.velocity, velocity))
        result["bitwise"] &= (got.tobytes() == want.tobytes() and
                              self.sharded.velocity.tobytes() == velocity.tobytes())
        result.update(step_count=self.sharded.step_count,
                      reference_step_count=self.reference.step_count,
                      skipped_steps=self.sharded.skipped_steps,
                      reference_skipped_steps=self.reference.skipped_steps)


def grouped(config, dtype=np.float64):
    flat, reference_flat = model(dtype), model(dtype)
    options = {**config["options"], "lr": LR_SCHEDULE[0]}
    run = Lockstep(ShardedMomentumSGD(flat, comm=COMM, groups=config["groups"], **options),
                   gm.MomentumSGD(reference_flat, groups=config["groups"], **options),
                   flat.data, reference_flat.data)
    for step in range(STEPS):
        run.set(lr=LR_SCHEDULE[step % len(LR_SCHEDULE)])
        if step == 3:  # a per-group schedule
            for optimizer in (run.sharded, run.reference):
                for group in optimizer.param_groups:
                    group["lr"] *= 0.5
        run.step(gradients(flat.data.size, step, dtype))
    return run.result


def skipping():
    """skip_nonfinite with a loss scale: at step 4 only the last rank's gradient overflows
    (in the first element, which rank 0's shard holds): every rank skips."""
    flat, reference_flat = model(), model()
    options = dict(lr=0.05, momentum=0.9, style="torch", nesterov=True,
                   skip_nonfinite=True, groups=[{"params": ["head.w"], "lr": 0.01}])
    run = Lockstep(ShardedMomentumSGD(flat, comm=COMM, **options),
                   gm.MomentumSGD(reference_flat, **options), flat.data, reference_flat.data)
    skipped = []
    for step in range(STEPS):
        grads = [g * 1024 for g in gradients(flat.data.size, step)]
        if step in (0, 4):
            grads[LAST][0] = np.inf if step == 4 else np.nan  # a skipped first step too
        run.step(grads, grad_scale=1024.0)
        skipped.append(run.sharded.last_step_skipped)
    run.result["skipped"] = skipped
    return run.result


def reduced():
    """grads_reduced=True: every rank passes the average itself (as after DDP)."""
    flat, reference_flat = model(), model()
    options = dict(lr=0.05, momentum=0.9, weight_decay=0.01, l1=0.001)
    run = Lockstep(ShardedMomentumSGD(flat, comm=COMM, **options),
                   gm.MomentumSGD(reference_flat, **options), flat.data, reference_flat.data)
    for step in range(STEPS):
        run.step(gradients(flat.data.size, step), grads_reduced=True)
    return run.result


def single_array(size, dtype=np.float64, **options):
    """params as one array (segment 0) of `size` elements."""
    param = np.random.default_rng(5).standard_normal(size).astype(dtype)
    reference_param = param.copy()
    options = dict(lr=0.1, momentum=0.9, **options)
    run = Lockstep(ShardedMomentumSGD(param, comm=COMM, **options),
                   gm.MomentumSGD(reference_param, **options), param, reference_param)
    for step in range(STEPS):
        run.step(gradients(size, step, dtype))
    return run.result


def outcome(call, *watched):
    """{type, message, unchanged} of `call()` raising, with `watched` (arrays and
    optimizers) compared bit for bit before and after."""
    before = snapshot(*watched)
    try:
        call()
    except Exception as error:  # noqa: BLE001 - the test asserts the type
        return {"type": type(error).__name__, "message": str(error),
                "unchanged": snapshot(*watched) == before}
    return {"type": None, "message": None, "unchanged": snapshot(*watched) == before}


def snapshot(*watched):
    state = []
    for item in watched:
        if isinstance(item, np.ndarray):
            state.append(item.tobytes())
        else:
            state += [item.velocity.tobytes(), item.step_count, item.skipped_steps,
                      item.last_step_skipped, item.velocity_initialized, item.lr,
                      item.param_groups[0]["lr"] if item.param_groups else None]
    return state


def errors(out):
    results = {}
    options = dict(lr=0.1, momentum=0.9)

    def construct(flat, **change):
        return lambda: ShardedMomentumSGD(flat, comm=COMM, **{**options, **change})

    flat = model()
    if RANK == LAST:  # the odd rank out
        other = gm.FlatParams.from_arrays([np.ones(SEGMENT_SIZES[0]), np.ones(7)])
    else:
        other = gm.FlatParams.from_arrays([np.ones(SEGMENT_SIZES[0]), np.ones(5), np.ones(2)])
    results["layout"] = outcome(construct(other), other.data)
    perturbed = model()
    if RANK == LAST:
        perturbed.data[-1] = np.nextafter(perturbed.data[-1], 9.0)
    results["values"] = outcome(construct(perturbed), perturbed.data)
    results["options"] = outcome(construct(flat, lr=0.2 if RANK == LAST else 0.1), flat.data)
    results["bad-option"] = outcome(construct(flat, momentum=1.0 if RANK == LAST else 0.9),
                                    flat.data)
    results["bad-group"] = outcome(construct(flat, groups=[{"params": ["nope"]}] if
                                             RANK == LAST else None), flat.data)
    results["comm-null"] = outcome(lambda: ShardedMomentumSGD(flat, comm=MPI.COMM_NULL,
                                                              **options), flat.data)
    results["nccl-on-host"] = outcome(construct(flat, collectives="nccl"), flat.data)
    results["collectives-unknown"] = outcome(construct(flat, collectives="gloo"), flat.data)
    results["unknown-option"] = outcome(construct(flat, betas=(0.9, 0.99)) if RANK == LAST
                                        else construct(flat), flat.data)

    opt = ShardedMomentumSGD(flat, comm=COMM, skip_nonfinite=True, **options)
    for step in range(2):
        opt.step(gradients(flat.data.size, step)[RANK])
    grad = gradients(flat.data.size, 2)[RANK]
    mine = lambda value, others: value if RANK == LAST else others
    results["grads-reduced-differs"] = outcome(
        lambda: opt.step(grad, grads_reduced=mine(True, False)), flat.data, opt)
    results["grad-scale-differs"] = outcome(
        lambda: opt.step(grad, grad_scale=mine(2.0, 1.0)), flat.data, opt)
    results["grad-dtype"] = outcome(
        lambda: opt.step(mine(grad.astype(np.float32), grad)), flat.data, opt)
    results["grad-shape"] = outcome(lambda: opt.step(mine(grad[:-1], grad)), flat.data, opt)
    results["grad-is-param"] = outcome(lambda: opt.step(mine(flat.data, grad)), flat.data,
                                       opt)
    results["grad-scale-zero"] = outcome(lambda: opt.step(grad, grad_scale=0.0), flat.data,
                                         opt)
    # 1 / 6e37 is a normal float32, 1 / (N * 6e37) is not from N = 2 on.
    small = np.ones(8, np.float32)
    opt32 = ShardedMomentumSGD(small, comm=COMM, **options)
    results["grad-scale-over-ranks"] = outcome(
        lambda: opt32.step(np.ones(8, np.float32), grad_scale=6e37), small, opt32)

    def lr_on_one_rank():
        if RANK == LAST:
            opt.lr = 0.3
        try:
            opt.step(grad)
        finally:
            opt.lr = 0.1

    results["lr-on-one-rank"] = outcome(lr_on_one_rank, flat.data, opt)
    single = np.ones(9)
    results["grad-none-single-array"] = outcome(
        lambda: ShardedMomentumSGD(single, comm=COMM, **options).step(), single)

    state = opt.state_dict()
    if RANK == LAST:
        state["velocity"] = state["velocity"][:-1]
    results["state-velocity-shape"] = outcome(lambda: opt.load_state_dict(state),
                                              flat.data, opt)
    path = os.path.join(out, "errors.npz")
    opt.save(path)
    if RANK == LAST:  # this rank alone reads a damaged copy
        damaged = os.path.join(out, "damaged.npz")
        data = open(path, "rb").read()
        with open(damaged, "wb") as file:
            file.write(data[:len(data) // 2])
        path = damaged
    opt.step(gradients(flat.data.size, 3)[RANK])
    results["load-damaged-on-one-rank"] = outcome(lambda: opt.load(path), flat.data, opt)
    results["save-unwritable"] = outcome(
        lambda: opt.save(os.path.join(out, "missing-folder", "x.npz")), flat.data, opt)
    results["still-steps"] = outcome(lambda: opt.step(grad), )
    results["step_count_after"] = opt.step_count
    return results


def disagreements(out):
    """What the ranks must agree on beyond their own checks: initial values in their
    places, hyperparameters changed between capturable steps, and the checkpoint or state
    each loads. ({case: outcome} for the error table, {case: result} of the cases where
    the ranks agree.)"""
    results, agreeing = {}, {}
    options = dict(lr=0.1, momentum=0.9)
    mine = lambda value, others: value if RANK == LAST else others

    # Two segments of 30 float64 swapped: offsets 0 and 30, a multiple of 6 elements.
    first, second = np.arange(30.0), np.arange(30.0) ** 2
    swapped = gm.FlatParams.from_arrays(mine([second, first], [first, second]))
    results["values-swapped-segments"] = outcome(
        lambda: ShardedMomentumSGD(swapped, comm=COMM, **options), swapped.data)

    flat = model()
    captured = ShardedMomentumSGD(flat, comm=COMM, capturable=True,
                                  groups=[{"params": ["head.w"], "lr": 0.01}], **options)
    for step in range(2):
        captured.step(gradients(flat.data.size, step)[RANK])
    grad = gradients(flat.data.size, 2)[RANK]

    def changed_on_one_rank(change, undo):
        def call():
            if RANK == LAST:
                change()
            try:
                captured.step(grad)
            finally:
                undo()
        return call

    results["capturable-lr-on-one-rank"] = outcome(changed_on_one_rank(
        lambda: setattr(captured, "lr", 0.3), lambda: setattr(captured, "lr", 0.1)),
        flat.data, captured)
    group = captured.param_groups[0]
    results["capturable-group-lr-on-one-rank"] = outcome(changed_on_one_rank(
        lambda: group.update(lr=0.02), lambda: group.update(lr=0.01)), flat.data, captured)
    captured.lr = 0.05  # on every rank: agreed
    captured.step(grad)
    agreeing["capturable-lr-everywhere"] = {"step_count": captured.step_count,
                                            "lr": captured.lr, "digest": digest(flat.data)}

    # Checkpoints A (step 3), B (step 4) and C (step 4 from A with another gradient).
    paths = {name: os.path.join(out, f"agree-{name}.npz") for name in "ABC"}
    captured.save(paths["A"])
    captured.step(gradients(flat.data.size, 3)[RANK])
    captured.save(paths["B"])
    captured.load(paths["A"])
    captured.step(gradients(flat.data.size, 4)[RANK])
    captured.save(paths["C"])
    results["load-other-step-on-one-rank"] = outcome(
        lambda: captured.load(mine(paths["B"], paths["A"])), flat.data, captured)
    results["load-other-content-on-one-rank"] = outcome(
        lambda: captured.load(mine(paths["C"], paths["B"])), flat.data, captured)
    state = captured.state_dict()
    if RANK == LAST:
        state["velocity"][-1] = np.nextafter(state["velocity"][-1], 9.0)
    results["load-state-other-content-on-one-rank"] = outcome(
        lambda: captured.load_state_dict(state), flat.data, captured)

    # Every rank reads its own copy of B: the same checkpoint, wherever it lies.
    copy = os.path.join(out, f"agree-B-copy{RANK}.npz")
    with open(paths["B"], "rb") as source, open(copy, "wb") as target:
        target.write(source.read())
    captured.load(copy)
    agreeing["load-own-copies"] = {"step_count": captured.step_count,
                                   "digest": digest(flat.data)}
    captured.load_state_dict(captured.state_dict(), params=flat.data.copy())
    agreeing["load-state-everywhere"] = {"step_count": captured.step_count,
                                         "digest": digest(flat.data)}
    return results, agreeing


CHECKPOINT_OPTIONS = dict(lr=0.05, momentum=0.9, style="torch", dampening=0.1,
                          skip_nonfinite=True,
                          groups=[{"params": ["block.w", "head.b"], "lr": 0.02,
                                   "weight_decay": 0.01}])


def checkpoints(out, checkpoint_in):
    """Round trips: plain -> sharded, sharded -> plain (in this run), and the checkpoint
    of the previous run's N -> this N; each continues as its uninterrupted run."""
    results = {}
    flat, plain_flat = model(), model()
    sharded = ShardedMomentumSGD(flat, comm=COMM, **CHECKPOINT_OPTIONS)
    plain = gm.MomentumSGD(plain_flat, **CHECKPOINT_OPTIONS)
    size = flat.data.size

    # plain -> sharded: rank 0's plain run writes, every rank's sharded one loads.
    plain_path = os.path.join(out, "plain.npz")
    if RANK == 0:
        for step in range(4):
            plain.step(average(gradients(size, step)))
        plain.lr = 0.03
        plain.save(plain_path)
    COMM.Barrier()
    sharded.load(plain_path)
    plain.load(plain_path)
    run = Lockstep(sharded, plain, flat.data, plain_flat.data)
    run.compare()
    for step in range(4, 8):
        run.step(gradients(size, step))
    results["plain-to-sharded"] = run.result

    # sharded -> plain: the sharded run writes; a fresh plain one loads and goes on.
    sharded_path = os.path.join(out, "sharded.npz")
    sharded.save(sharded_path)
    resumed_flat = model(seed=7)
    resumed = gm.MomentumSGD(resumed_flat, **CHECKPOINT_OPTIONS)
    resumed.load(sharded_path)
    run = Lockstep(sharded, resumed, flat.data, resumed_flat.data)
    run.compare()
    for step in range(8, 11):
        run.step(gradients(size, step))
    results["sharded-to-plain"] = run.result
    results["sharded-to-plain"]["resumed_lr"] = resumed.lr

    # The previous run's checkpoint (saved on another number of ranks) -> this run.
    if checkpoint_in:
        again_flat, again_plain_flat = model(seed=8), model(seed=9)
        again = ShardedMomentumSGD(again_flat, comm=COMM, **CHECKPOINT_OPTIONS)
        again_plain = gm.MomentumSGD(again_plain_flat, **CHECKPOINT_OPTIONS)
        again.load(checkpoint_in)
        again_plain.load(checkpoint_in)
        run = Lockstep(again, again_plain, again_flat.data, again_plain_flat.data)
        run.compare()
        run.result["loaded_step_count"] = again.step_count
        for step in range(11, 15):
            run.step(gradients(size, step))
        results["resharded"] = run.result
    return results


def main():
    out = sys.argv[1]
    checkpoint_in = sys.argv[2] if len(sys.argv) > 2 else None
    results = {"ranks": RANKS, "rank": RANK}
    for config in GROUP_CONFIGS:
        results[f"groups-{config.id}"] = grouped(config.values[0])
    results["float32-classic-head-lr-l1"] = grouped(GROUP_CONFIGS[0].values[0], np.float32)
    results["skipping"] = skipping()
    results["grads-reduced"] = reduced()
    results["single-array"] = single_array(1001, style="torch", nesterov=True,
                                           weight_decay=0.01)
    results["tiny-skipping"] = single_array(3, skip_nonfinite=True)  # empty shards
    # 1200 float64 elements: equal shards on 1, 2 and 3 ranks (MPI's block collectives).
    results["equal-shards"] = single_array(1200, style="torch", dampening=0.2,
                                           skip_nonfinite=True)
    results["cuda_aware_mpi_reason"] = cuda_aware_mpi_reason()
    results["errors"] = errors(out)
    disagreed, results["agreements"] = disagreements(out)
    results["errors"].update(disagreed)
    results["checkpoints"] = checkpoints(out, checkpoint_in)
    with open(os.path.join(out, f"rank{RANK}.json"), "w") as file:
        json.dump(results, file)


if __name__ == "__main__":
    main()

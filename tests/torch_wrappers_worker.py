"""Two gloo ranks on the CPU train one small model under torch's distributed wrappers
(FSDP2's fully_shard, ZeroRedundancyOptimizer, FSDP1) with torch.optim.SGD and with
gpu_momentum.torch.SGD, and move optimizer state between the two through
torch.distributed.checkpoint under FSDP2. Each rank writes, per case, the full
parameters each optimizer ended with, how many times gpu_momentum.torch.SGD packed its
buffers, or the error the case raised, to OUT_DIR/rank<r>.pt.

    python tests/torch_wrappers_worker.py OUT_DIR PORT RANK [CASE ...]
                                        (tests/test_torch_wrappers.py starts one process
                                        per rank; no CASE: every case in CASES)
"""

import numba  # noqa: F401  (numba before torch: two OpenMP runtimes in one process stall)
import contextlib
import datetime
import os
import sys
import traceback

import torch
import torch.distributed as dist

STEPS = 10
RESUMED_STEPS = 5  # the checkpoint cases: STEPS before the save, these after the load
WORLD = 2
HYPERPARAMETERS = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}
DTYPES = {"float32": torch.float32, "float64": torch.float64}


class Cnn(torch.nn.Module):
    """Two convolutions and a linear head over 2x6x6 inputs."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(4, 4, 3)
        self.head = torch.nn.Linear(64, 3)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.tanh(self.conv2(x))
        return self.head(x.flatten(1))


class Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer1 = torch.nn.Linear(6, 16)
        self.layer2 = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.layer2(torch.relu(self.layer1(x)))))


MODELS = {"mlp": (Mlp, (6,)), "cnn": (Cnn, (2, 6, 6))}


def model(name, dtype):
    """The same initial weights on every rank and for every optimizer."""
    torch.manual_seed(0)
    return MODELS[name][0]().to(DTYPES[dtype])


def batches(name, dtype, rank, count, start=0):
    """This rank's data: (input, target) for steps start .. start + count - 1."""
    generator = torch.Generator().manual_seed(100 + rank)
    shape = MODELS[name][1]
    out = []
    for step in range(start + count):
        x = torch.randn(5, *shape, generator=generator, dtype=DTYPES[dtype])
        y = torch.randn(5, 3, generator=generator, dtype=DTYPES[dtype])
        if step >= start:
            out.append((x, y))
    return out


def train(forward_model, opt, data):
    for x, y in data:
        opt.zero_grad()
        torch.nn.functional.mse_loss(forward_model(x), y).backward()
        opt.step()


# The optimizers the case running now built (a ZeroRedundancyOptimizer's inner one).
BUILT = []


def built(opt):
    """Notes `opt` for counting_packs; returns it."""
    BUILT.append(getattr(opt, "optim", opt))
    return opt


@contextlib.contextmanager
def counting_packs():
    """Counts the packings of the flat buffers (SGD.pack_count) of the gpu_momentum
    optimizers built while the block runs: the count is what this yields, filled when
    the block ends. torch.optim.SGD counts none."""
    counter = {"packs": 0}
    BUILT.clear()
    try:
        yield counter
    finally:
        counter["packs"] = sum(getattr(opt, "pack_count", 0) for opt in BUILT)
        BUILT.clear()


def full_state(module):
    """The module's parameters as full (unsharded) tensors, by name; a collective."""
    out = {}
    for key, value in module.state_dict().items():
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()
        out[key] = value.detach().clone()
    return out


def fsdp2(name, dtype, per_layer):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    net = model(name, dtype)
    mesh = init_device_mesh("cpu", (WORLD,))
    if per_layer:
        for layer in net.children():
            fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


def run_fsdp2(optimizer_class, rank, name, dtype, per_layer):
    net = fsdp2(name, dtype, per_layer)
    opt = built(optimizer_class(net.parameters(), **HYPERPARAMETERS))
    train(net, opt, batches(name, dtype, rank, STEPS))
    return full_state(net)


def run_zero(optimizer_class, rank, name, dtype, bucket_view):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    net = model(name, dtype)
    ddp = DistributedDataParallel(net)
    opt = built(ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=optimizer_class,
                                        parameters_as_bucket_view=bucket_view,
                                        **HYPERPARAMETERS))
    train(ddp, opt, batches(name, dtype, rank, STEPS))
    return full_state(net)


def run_fsdp1(optimizer_class, rank, name, dtype, use_orig_params):
    from torch.distributed.fsdp import FullyShardedDataParallel

    net = FullyShardedDataParallel(model(name, dtype), use_orig_params=use_orig_params,
                                   device_id=torch.device("cpu"))  # (else it wants a GPU)
    opt = built(optimizer_class(net.parameters(), **HYPERPARAMETERS))
    train(net, opt, batches(name, dtype, rank, STEPS))
    return full_state(net)  # (FSDP1's default state dict is the full one)


def run_checkpoint(classes, rank, name, dtype, directory):
    """Trains under FSDP2 with classes[0], saves model and optimizer through
    torch.distributed.checkpoint, loads both into a fresh FSDP2 model with classes[1],
    trains on; the parameters at the end, and the momentum buffers the loaded optimizer
    reports right after the load (full tensors)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
        set_optimizer_state_dict)

    saved_class, loaded_class = classes
    net = fsdp2(name, dtype, per_layer=True)
    opt = built(saved_class(net.parameters(), **HYPERPARAMETERS))
    train(net, opt, batches(name, dtype, rank, STEPS))
    dcp.save({"model": get_model_state_dict(net),
              "optim": get_optimizer_state_dict(net, opt)}, checkpoint_id=directory)
    del net, opt

    net = fsdp2(name, dtype, per_layer=True)
    opt = built(loaded_class(net.parameters(), **HYPERPARAMETERS))
    state = {"model": get_model_state_dict(net),
             "optim": get_optimizer_state_dict(net, opt)}
    dcp.load(state, checkpoint_id=directory)
    set_model_state_dict(net, state["model"])
    set_optimizer_state_dict(net, opt, state["optim"])
    names = dict(net.named_parameters())
    momenta = {}
    for key, p in names.items():
        buffer = opt.state.get(p, {}).get("momentum_buffer")
        if buffer is not None:
            momenta[key] = (buffer.full_tensor() if hasattr(buffer, "full_tensor")
                            else buffer).detach().clone()
    train(net, opt, batches(name, dtype, rank, RESUMED_STEPS, start=STEPS))
    out = full_state(net)
    out.update({f"momentum_buffer/{key}": value for key, value in momenta.items()})
    return out


def cases():
    """Every case: its name and how it trains, given the optimizer class and the rank."""
    table = {}
    for name in MODELS:
        for dtype in DTYPES:
            for per_layer, kind in ((True, "per_layer"), (False, "root")):
                table[f"fsdp2-{kind}-{name}-{dtype}"] = (
                    lambda cls, rank, n=name, d=dtype, p=per_layer:
                    run_fsdp2(cls, rank, n, d, p))
            for bucket_view in (False, True):
                table[f"zero-bucket_view_{bucket_view}-{name}-{dtype}"] = (
                    lambda cls, rank, n=name, d=dtype, b=bucket_view:
                    run_zero(cls, rank, n, d, b))
            for orig in (False, True):
                table[f"fsdp1-use_orig_params_{orig}-{name}-{dtype}"] = (
                    lambda cls, rank, n=name, d=dtype, o=orig:
                    run_fsdp1(cls, rank, n, d, o))
    return table


CASES = cases()
# Checkpoint cases: (saved by, loaded by), model, dtype; "torch" -> "torch" is the
# reference of the other two directions.
CHECKPOINT_DIRECTIONS = [("gpu_momentum", "torch"), ("torch", "gpu_momentum"),
                         ("gpu_momentum", "gpu_momentum"), ("torch", "torch")]
CHECKPOINT_CASES = {f"dcp-{saved}_to_{loaded}-{name}-{dtype}": (saved, loaded, name, dtype)
                    for saved, loaded in CHECKPOINT_DIRECTIONS
                    for name, dtype in (("mlp", "float64"), ("cnn", "float32"))}


def attempt(function):
    """(result, None) or (None, the traceback): a case that raises on every rank at the
    same point (construction, a step) leaves the process group usable for the next."""
    try:
        return function(), None
    except Exception:  # noqa: BLE001  (the test reports it)
        return None, traceback.format_exc()


def run(rank, out_dir, port, names):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    from gpu_momentum.torch import SGD

    classes = {"torch": torch.optim.SGD, "gpu_momentum": SGD}
    results = {}
    for case in names or [*CASES, *CHECKPOINT_CASES]:
        outcome = {}
        if case in CHECKPOINT_CASES:
            saved, loaded, name, dtype = CHECKPOINT_CASES[case]
            directory = os.path.join(out_dir, case)
            with counting_packs() as counter:
                result, error = attempt(lambda: run_checkpoint(
                    (classes[saved], classes[loaded]), rank, name, dtype, directory))
            outcome["result"] = (result, error, counter["packs"])
        else:
            for label, cls in classes.items():
                with counting_packs() as counter:
                    result, error = attempt(lambda: CASES[case](cls, rank))
                outcome[label] = (result, error, counter["packs"])
        results[case] = outcome
        dist.barrier()
    dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    run(int(sys.argv[3]), sys.argv[1], int(sys.argv[2]), sys.argv[4:])

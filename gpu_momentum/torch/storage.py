"""Whose storage a parameter lives in: the optimizer's own flat buffers, storage of its
own (packed into a flat buffer), or storage a wrapper owns (FSDP2's DTensor shards,
ZeroRedundancyOptimizer's bucket views, FSDP1's flat parameters), which stays where it
is; and a tensor's local part (a DTensor's shard on this rank)."""

import weakref

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without torch.distributed
    DTensor = None

# The flat buffers of every Bucket alive: a parameter in one of them is the library's.
_OWN_BUFFERS = weakref.WeakSet()


def own_storage(flat):
    """Registers `flat`, a flat buffer of this library: parameters viewing it may be
    packed again (they are not a wrapper's)."""
    _OWN_BUFFERS.add(flat)


def is_dtensor(tensor):
    return DTensor is not None and isinstance(tensor, DTensor)


def local_of(tensor):
    """The part of `tensor` in this process's memory, sharing its storage: a DTensor's
    local shard, else the tensor itself, detached."""
    if is_dtensor(tensor):
        return tensor.to_local().detach()
    return tensor.detach()


def lives_elsewhere(p, moved=False):
    """Whether parameter `p`'s memory belongs to someone else, who may read it there or
    point `p` at it again: a DTensor (its shard is FSDP2's), or a view into a larger
    storage that is not one of this library's flat buffers (a wrapper's bucket or flat
    parameter). `moved`: `p` left a flat buffer after it was packed; then storage of
    its exact size that another tensor also holds (a one-parameter bucket of
    ZeroRedundancyOptimizer) is someone else's too. Such a parameter is updated where it
    lives, never moved."""
    if is_dtensor(p):
        return True
    storage = p.untyped_storage()
    address = storage.data_ptr()
    if any(flat.untyped_storage().data_ptr() == address for flat in _OWN_BUFFERS):
        return False
    if storage.nbytes() == p.numel() * p.element_size() and p.storage_offset() == 0:
        # Held by p's tensor and by `storage` here; a third holder is someone else.
        return moved and torch._C._storage_Use_Count(storage._cdata) > 2
    return True


def as_state_of(p, local):
    """`local`, a tensor of this process's shard of parameter `p`, as `p`'s state holds
    it: a DTensor with p's mesh, placements, shape and strides where p is one (as
    torch.optim.SGD's momentum buffers of a DTensor parameter are), else `local`."""
    if not is_dtensor(p):
        return local
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                              shape=p.shape, stride=p.stride())

"""Checkpoints of a MomentumSGD: one `.npz` file, written atomically, read without trust.

Format version 4 is NumPy's `.npz` (a zip of `.npy` arrays, stored uncompressed) holding
four to six arrays:

- `param`, `velocity`: the flat buffers, in host memory, of the optimizer's dtypes; an
  FP8 velocity (velocity dtype float8_e4m3fn) as `velocity_codes` (uint8, one per
  element) and `velocity_scales` (float32, one per block of 256) in place of `velocity`,
  which load across: an FP8 file into a float32 velocity dequantized, a float32 one into
  an FP8 velocity quantized (MomentumSGD.load_state_dict);
- with precision "kahan" `compensation` (of the param dtype), with "master" `master`
  (float32): the precision buffer;
- `meta`: UTF-8 JSON as uint8 bytes: `format` ("gpu-momentum checkpoint"), `version` (4),
  `state` (the `state_dict()` without its arrays: hyperparameters, precision, velocity
  dtype and seed, parameter groups, style, step and skip counts, whether each group's
  velocity is initialised), `layout` (segment `shapes`, `offsets` and `names` of the
  FlatParams, or null for a single array), `dtypes` (the dtype name of each array) and
  `sha256` of each array's data bytes;
- `meta_sha256`: the SHA-256 of `meta`'s bytes, as 64 ASCII hex digits (uint8).

bfloat16 arrays are stored as their bits, uint16 (`.npy` has no bfloat16); `dtypes` says
so. The version is the library's state version (gpu_momentum.state_format), which the
state in `meta` shares. Versions 3 (before precision modes: no precision buffer, no
`dtypes`, a state without precision, velocity_dtype and seed) and 2 (version 3 without
`meta_sha256`: its metadata carries no digest, so an edit of it that stays valid goes
unnoticed) are still read, as precision "nearest" with seed 0. The digests detect
corruption and careless edits, not forgery: they are not keyed. A checkpoint saved with
another precision than the optimizer's is refused, naming both.

Reading trusts nothing in the file and never calls `np.load` or unpickles:

- `zipfile` parses the zip's central directory through a file that hands out at most
  DIRECTORY_LIMIT bytes a read; the members must be exactly those of version 2, 3 or 4
  (with one precision buffer at most, and the FP8 pair or `velocity`), each stored or
  deflated, unencrypted, needing at most zip 4.5 (zip64) to extract;
- each member's declared size is checked against what this optimizer's layout allows
  before it is read; its `.npy` header (at most NPY_HEADER_LIMIT bytes) is parsed and its
  shape and dtype are checked before its array is allocated; its bytes are read or
  inflated in chunks of CHUNK bytes, never past the declared size, and a member whose
  stream holds more or fewer bytes, or whose CRC-32 differs, is refused;
- the metadata is at most META_LIMIT bytes plus four times the size of this optimizer's
  layout in JSON, its digest is checked before it is parsed (versions 3 and 4), and it
  must fit a strict schema (keys, types, integer ranges, list lengths) before anything
  uses it; then its precision must be the optimizer's, and the members its version's
  and precision's.

A load that fails for any reason the file gives raises CheckpointError and changes
nothing; a file that cannot be opened raises the OSError of the attempt. A load takes the
memory of the arrays the layout allows and of the metadata, plus a few MiB.

Writing goes through one temporary file per checkpoint path, `.<name>.tmp` in the same
folder, locked with flock while it is written (two saves of one path take turns), then
flushed, fsynced and renamed over the checkpoint; the folder is fsynced after. A crash
leaves the previous checkpoint intact and at most that one temporary file, which the next
save of the path reuses; an exception removes it.

The package: `format` (what a file holds and the metadata's schema), `reader` (the
hardened reader), `writer` (the atomic writer).
"""

from .format import FORMAT_NAME, META_LIMIT, CheckpointError
from .reader import CHUNK, DIRECTORY_LIMIT, NPY_HEADER_LIMIT, load_checkpoint
from .writer import save_checkpoint

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError", "FORMAT_NAME",
           "CHUNK", "DIRECTORY_LIMIT", "META_LIMIT", "NPY_HEADER_LIMIT"]

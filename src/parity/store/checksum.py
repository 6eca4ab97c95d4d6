"""Checksums of tensor data: written with every stored tensor, verified on every read.

Algorithm: XXH3 64-bit (``xxhash``) over the tensor's stored bytes (little-endian, C order, as
in the shard), written as ``"xxh3_64:<16 hex digits>"`` in the record's ``checksum`` field
(format 1.3). About 17 GB/s on one core: computed on the capture's writer thread, off the
forward pass, and once per record by a reader before the data is used. Not a defence against
someone who rewrites both data and manifest: it catches bit rot, truncation, a shard header
pointing at the wrong bytes, a copied-over file — corruption, not forgery.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

#: The only algorithm written and read.
ALGORITHM = "xxh3_64"
#: What a record's ``checksum`` field must look like.
PATTERN = re.compile(r"xxh3_64:[0-9a-f]{16}")


def checksum(array: np.ndarray) -> str:
    """The checksum of an array's bytes (made contiguous first), as stored in a record."""
    import xxhash

    data = np.ascontiguousarray(array)
    return f"{ALGORITHM}:{xxhash.xxh3_64_intdigest(memoryview(data.reshape(-1)).cast('B')):016x}"


def storage_array(tensor: Any) -> np.ndarray:
    """A contiguous CPU torch tensor as a read-only numpy array of its storage dtype (bfloat16 as
    uint16 bits), sharing the tensor's memory."""
    import torch

    if tensor.dtype == torch.bfloat16:
        array = tensor.view(torch.int16).numpy().view(np.uint16)
    else:
        array = tensor.numpy()
    array.flags.writeable = False
    return array

"""The wire format of a client's update.

An update is a :class:`PackedUpdate`, an ordinary ``dict`` of tensors that pickles (and
so travels through Ray) as one flat byte buffer plus a compressed list of its keys and
shapes. Pickling tensors one by one costs about 400 bytes and 0.1-0.2 ms each (a zip
archive per storage): 2% of a SmolLM2-135M r=8 q/v update, and more CPU time than the
training of a tiny-model client (see docs/benchmarks.md). :data:`TRANSFER_DTYPES` are the
dtypes an update may travel in (``federation.transfer_dtype``); the cast happens after
the noise (post-processing).
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["TRANSFER_DTYPES", "PackedUpdate", "tensor_bytes"]

TRANSFER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                   "float16": torch.float16}


def _unpack_update(spec: bytes, buffer: np.ndarray) -> PackedUpdate:
    dtype_name, entries = json.loads(zlib.decompress(spec))
    dtype = getattr(torch, dtype_name)
    flat = torch.from_numpy(np.array(buffer, dtype=np.uint8, copy=True)).view(dtype)
    out, pos = PackedUpdate(), 0
    for key, shape in entries:
        n = math.prod(shape)
        # each tensor gets its own storage: views of one buffer would each pickle the
        # whole buffer if someone copied them into a plain dict
        out[key] = flat[pos:pos + n].reshape(shape).clone()
        pos += n
    return out


class PackedUpdate(dict):
    """A client's update: a plain ``dict`` (key -> CPU tensor) that pickles as one flat
    byte buffer plus its zlib-compressed keys, shapes and dtype.

    Unpickling gives a ``PackedUpdate`` again whose tensors each own their storage. A
    mapping whose tensors differ in dtype or device pickles as a plain dict would.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        values = list(self.values())
        if (not values or len({v.dtype for v in values}) != 1
                or any(not torch.is_tensor(v) or v.device.type != "cpu" for v in values)):
            return (PackedUpdate, (dict(self),))
        dtype = values[0].dtype
        flat = torch.cat([v.detach().reshape(-1) for v in values])
        buffer = flat.view(torch.uint8).numpy()
        spec = zlib.compress(json.dumps(
            [str(dtype).removeprefix("torch."),
             [[k, list(v.shape)] for k, v in self.items()]]).encode())
        return (_unpack_update, (spec, buffer))


def tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes of the tensor payload (numel x element size, what is serialised as data)."""
    return int(sum(t.numel() * t.element_size() for t in tensors.values()))

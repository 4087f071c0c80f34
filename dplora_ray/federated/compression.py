"""Communication-efficient baselines for the client -> server direction (non-private).

* T-FedAvg (Xu et al. 2020, "Ternary compression for communication-efficient federated
  learning"): each update tensor ``u`` becomes ``a * t`` with ``t`` in {-1, 0, +1}:
  threshold ``Delta = 0.7 * mean(|u|)``, ``t = sign(u)`` where ``|u| > Delta`` (else 0),
  scale ``a = mean(|u|)`` over those entries (0 when there are none). The wire payload is
  the codes packed four to a byte (``uint8``, key ``<name>::codes``) plus the float32
  scale (key ``<name>::scale``): ``ceil(numel / 4) + 4`` bytes per tensor. The shapes
  are not sent: the server knows them from the global state.
* CMFL (Wang et al. 2019, "CMFL: Mitigating communication overhead for federated
  learning"): the relevance of a local update is the fraction of its entries whose sign
  equals that of the same entry of the last global update; a client whose relevance is
  below the threshold does not upload.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

__all__ = ["CODES_SUFFIX", "SCALE_SUFFIX", "cmfl_relevance", "cmfl_should_upload",
           "is_ternary_payload", "pack_codes", "ternary_bytes", "ternary_decode",
           "ternary_encode", "ternary_quantize", "unpack_codes"]

TERNARY_THRESHOLD = 0.7
CODES_SUFFIX = "::codes"
SCALE_SUFFIX = "::scale"
# 2-bit codes: 0 -> 0, 1 -> +1, 2 -> -1
_CODE_OF = {0: 0, 1: 1, -1: 2}


def ternary_quantize(u: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(ternary values t in {-1, 0, +1} as int8, scale a) for one tensor."""
    mag = u.detach().float().abs()
    delta = TERNARY_THRESHOLD * float(mag.mean()) if mag.numel() else 0.0
    mask = mag > delta
    scale = float(mag[mask].mean()) if bool(mask.any()) else 0.0
    t = (torch.sign(u.detach().float()) * mask).to(torch.int8)
    return t, scale


def pack_codes(t: torch.Tensor) -> torch.Tensor:
    """Flattened ternary values -> uint8, four 2-bit codes per byte (entry i in bits
    2*(i%4)..2*(i%4)+1 of byte i//4; the last byte is zero padded)."""
    flat = t.reshape(-1).to(torch.int16)
    codes = torch.where(flat < 0, torch.tensor(2, dtype=torch.int16), flat)
    pad = (-codes.numel()) % 4
    if pad:
        codes = torch.cat([codes, torch.zeros(pad, dtype=torch.int16)])
    codes = codes.reshape(-1, 4)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int16)
    return (codes << shifts).sum(dim=1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``numel`` ternary values as int8."""
    b = packed.reshape(-1).to(torch.int16)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int16)
    codes = ((b[:, None] >> shifts) & 3).reshape(-1)[:numel]
    return torch.where(codes == 2, torch.tensor(-1, dtype=torch.int16), codes).to(torch.int8)


def ternary_bytes(numel: int) -> int:
    """Wire bytes of one ternary tensor: the packed codes plus a float32 scale."""
    return math.ceil(numel / 4) + 4


def ternary_encode(update: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The wire payload of an update (keys in sorted order)."""
    out: dict[str, torch.Tensor] = {}
    for k in sorted(update):
        t, scale = ternary_quantize(update[k])
        out[k + CODES_SUFFIX] = pack_codes(t).contiguous()
        out[k + SCALE_SUFFIX] = torch.tensor([scale], dtype=torch.float32)
    return out


def is_ternary_payload(payload: Mapping[str, torch.Tensor]) -> bool:
    return any(k.endswith(CODES_SUFFIX) for k in payload)


def ternary_decode(payload: Mapping[str, torch.Tensor],
                   template: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dequantise a payload to float32 tensors shaped like ``template``."""
    out = {}
    for k, ref in template.items():
        if k + CODES_SUFFIX not in payload:
            raise ValueError(f"ternary payload lacks {k!r}")
        t = unpack_codes(payload[k + CODES_SUFFIX], ref.numel()).reshape(ref.shape)
        out[k] = t.float() * payload[k + SCALE_SUFFIX].float().reshape(())
    return out


def cmfl_relevance(update: Mapping[str, torch.Tensor],
                   last_global: Mapping[str, torch.Tensor]) -> float:
    """Fraction of all entries whose sign equals the last global update's (``sign(0)``
    is 0, so a zero matches only a zero)."""
    same = total = 0
    for k, u in update.items():
        same += int((torch.sign(u.float()) == torch.sign(last_global[k].float())).sum())
        total += u.numel()
    return same / total if total else 1.0


def cmfl_should_upload(update: Mapping[str, torch.Tensor],
                       last_global: Mapping[str, torch.Tensor] | None,
                       threshold: float) -> tuple[bool, float | None]:
    """(upload?, relevance): always upload when there is no previous global update."""
    if last_global is None:
        return True, None
    rel = cmfl_relevance(update, last_global)
    return rel >= threshold, rel

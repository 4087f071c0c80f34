"""The two kinds of randomness of a run, and every named stream of each, in one place.

**Public randomness** comes from the run ``seed`` (it is in ``config.yaml``, every sweep
file, every summary): data splits, partitions, cohorts, Poisson batch sampling, dropout,
LoRA init, the audit's canaries. Anyone may reproduce it; that is the point.

**Noise** comes from a secret :class:`NoiseKey`: 256 bits from the operating system's
entropy (:mod:`secrets`) drawn when a run starts, stored only in the run's
``checkpoint.pt`` (so a resumed run releases exactly what the killed one would have) and
never written anywhere else. Every Gaussian draw of a private release comes from a
``torch.Generator`` seeded with a keyed BLAKE2b hash of (key, named stream, round, client,
step) (:meth:`NoiseKey.generator`), so

* knowing the config, the seed and every other file of a run folder gives no
  information about the noise (each stream seed is a pseudo-random function of the key);
* the runs of a sweep draw independent keys, so two adapters released at different
  epsilons do not share a noise stream that a linear combination could cancel;
* a worker is handed only the derived key of its own (stream, round, client)
  (:meth:`NoiseKey.derive`): a one-way function, from which neither the run key nor any
  other client's noise can be recovered.

``privacy.noise_seed`` (research and tests only) replaces the secret with a key derived
from a public integer: noise is then reproducible, and NOT private against anyone who
knows that integer (see docs/privacy.md).

Limits, stated plainly: the generator that expands each 64-bit stream seed is PyTorch's
(Mersenne Twister on CPU, Philox on CUDA), not a cryptographic generator, as in Opacus
without ``secure_mode``; and the floating-point attack on Gaussian sampling (Mironov
2012; Jin et al. 2022) is not mitigated.

Invariants:
    * No function reads a global RNG; the same key and position give the same generator
      state on the same device type.
    * A key's value never appears in ``repr``/``str`` (so it cannot leak into a log or an
      error message); only :meth:`NoiseKey.to_hex` exposes it, for the checkpoint.
"""

from __future__ import annotations

import enum
import hashlib
import secrets
from typing import Any

import numpy as np

from dplora_ray.errors import PrivacyError

__all__ = [
    "NoiseKey",
    "NoiseStream",
    "PublicStream",
    "public_rng",
    "public_seed",
]

_KEY_BYTES = 32
_SEED_DOMAIN = b"dplora_ray.noise_seed/v1"


class PublicStream(enum.IntEnum):
    """Streams of the public ``seed`` (values are the ``SeedSequence`` spawn keys; they
    are part of what makes results reproducible, so they never change)."""

    COHORTS = 1  # the clients sampled in each round
    CLIENT = 2  # a client's batches and dropout in one round
    PREFLIGHT = 3  # the synthetic batch of the preflight (touches no data)


class NoiseStream(str, enum.Enum):
    """Streams of the secret noise key, one per place a private release draws noise."""

    DPSGD = "dpsgd.gradient"  # client: noise on the clipped per-example gradient sum
    PAPER = "paper.gradient"  # client: noise on the clipped batch gradients of A and B
    LOCAL = "local.update"  # client: noise on the clipped update before upload
    SERVER = "client.sum"  # server: noise on the sum of clipped client updates
    PREFLIGHT = "preflight"  # the preflight's private step on synthetic data


def public_seed(seed: int, stream: PublicStream, *position: int) -> int:
    """A 63-bit seed that depends only on (run seed, stream, position)."""
    ss = np.random.SeedSequence(int(seed), spawn_key=(int(stream), *(int(p) for p in position)))
    return int(ss.generate_state(1, np.uint64)[0] >> 1)


def public_rng(seed: int, stream: PublicStream, *position: int) -> np.random.Generator:
    return np.random.default_rng(public_seed(seed, stream, *position))


def _label(part: Any) -> bytes:
    if isinstance(part, NoiseStream):
        return b"s:" + part.value.encode()
    if isinstance(part, (int, np.integer)) and not isinstance(part, bool):
        return b"i:" + str(int(part)).encode()
    raise PrivacyError(f"noise stream positions must be a NoiseStream or integers. "
                       f"Found {part!r}.")


class NoiseKey:
    """A secret from which every noise stream of a run derives.

    Args:
        secret: 32 bytes.
        reproducible: True when the secret was derived from a public integer
            (``privacy.noise_seed``), i.e. when it is not secret at all.
    """

    __slots__ = ("_secret", "reproducible")

    def __init__(self, secret: bytes, reproducible: bool = False) -> None:
        if not isinstance(secret, (bytes, bytearray)) or len(secret) != _KEY_BYTES:
            raise PrivacyError(f"a noise key is {_KEY_BYTES} bytes")
        self._secret = bytes(secret)
        self.reproducible = bool(reproducible)

    # ------------------------------------------------------------------ making keys
    @classmethod
    def generate(cls) -> NoiseKey:
        """A fresh key from the operating system's entropy."""
        return cls(secrets.token_bytes(_KEY_BYTES))

    @classmethod
    def from_seed(cls, noise_seed: int) -> NoiseKey:
        """A PUBLIC, reproducible key (``privacy.noise_seed``): not private against
        anyone who knows ``noise_seed``."""
        digest = hashlib.blake2b(str(int(noise_seed)).encode(), key=_SEED_DOMAIN,
                                 digest_size=_KEY_BYTES).digest()
        return cls(digest, reproducible=True)

    @classmethod
    def from_hex(cls, text: str, reproducible: bool = False) -> NoiseKey:
        try:
            raw = bytes.fromhex(text)
        except (TypeError, ValueError):
            raise PrivacyError("the stored noise key is not hexadecimal") from None
        return cls(raw, reproducible)

    def to_hex(self) -> str:
        """The secret itself (for the checkpoint only)."""
        return self._secret.hex()

    # ------------------------------------------------------------------ using keys
    def _digest(self, parts: tuple[Any, ...], size: int) -> bytes:
        h = hashlib.blake2b(key=self._secret, digest_size=size)
        for p in parts:
            b = _label(p)
            h.update(len(b).to_bytes(2, "big") + b)  # length-prefixed: unambiguous
        return h.digest()

    def derive(self, *parts: NoiseStream | int) -> NoiseKey:
        """The key of a sub-tree of streams (e.g. one client's stream in one round);
        one-way: it reveals nothing about this key or its other sub-trees."""
        return NoiseKey(self._digest(parts, _KEY_BYTES), self.reproducible)

    def stream_seed(self, *parts: NoiseStream | int) -> int:
        """A 63-bit generator seed for one position."""
        return int.from_bytes(self._digest(parts, 8), "big") >> 1

    def generator(self, *parts: NoiseStream | int, device: Any = "cpu") -> Any:
        """A ``torch.Generator`` on ``device`` seeded for one position (e.g.
        ``key.generator(NoiseStream.LOCAL, round, client)``)."""
        import torch

        return torch.Generator(device=device).manual_seed(self.stream_seed(*parts))

    # ------------------------------------------------------------------ hiding it
    def __repr__(self) -> str:
        kind = "reproducible (privacy.noise_seed)" if self.reproducible else "secret"
        return f"NoiseKey(<{kind}>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, NoiseKey)
                and secrets.compare_digest(self._secret, other._secret))

    __hash__ = None  # type: ignore[assignment]  # keys are compared, never hashed

    def __reduce__(self):  # travels to Ray actors by value (memory only, never logged)
        return (NoiseKey, (self._secret, self.reproducible))

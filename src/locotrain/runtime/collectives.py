"""Every all-reduce of both runtimes: what it computes and the exact bytes each rank sends.

An all-reduce averages one flat float32 vector of n values over M ranks. How depends on the
codec, and the simulator charges exactly the bytes that the real runtime sends for the same
exchange (runtime/sim.py, runtime/torchdist.py both call `plan`). Q is the codec's round
trip (codecs.py); sums run in rank order, in float32, and divide by M at the end.

| codec | scheme | every rank gets | bytes each rank sends |
|---|---|---|---|
| fp32 | ring | (x_0 + ... + x_{M-1}) / M | 2(M-1) 4c, c = ceil(n / M) |
| bf16 | scatter | Q((Q(x_0) + ... + Q(x_{M-1})) / M) | 2(M-1) nbytes(c) |
| int8, fp4, M <= 8 | gather | (Q(x_0) + ... + Q(x_{M-1})) / M | (M-1) nbytes(n) |
| int8, fp4, M > 8 | scatter | Q((Q(x_0) + ... + Q(x_{M-1})) / M) | 2(M-1) nbytes(c) |

* ring: a ring all-reduce of the raw values (torch.distributed's all_reduce for real; the
  real sum order is the backend's, so real and simulated means agree to float round-off).
  The vector is padded to M chunks of c values; each rank sends 2(M-1) chunks.
* scatter: a quantised reduce-scatter, then an all-gather (the torchft layout, spec 11.2):
  every rank encodes its contribution once, rank j receives everyone's chunk j, decodes,
  sums, divides by M, encodes the mean chunk once more and all-gathers it. Chunks are c
  values, c a multiple of the codec's block, so chunk-wise encoding equals whole-vector
  encoding. Two roundings: for bf16 the second is at most 2^-9 relative, and the bytes are
  those of a ring all-reduce of bf16 values.
* gather: every rank encodes its contribution once and all-gathers the encoded bytes; every
  rank decodes all M and averages. One rounding per contribution and none on the mean (the
  spec's recommendation for small M, 11.3): for fp4 the relative error of the mean outer
  gradient stays that of one rounding (docs/algorithms.md gives the measured numbers). It
  sends (M-1) payloads per rank against 2(M-1)/M for a ring, so it pays while the payload is
  small against fp32's: beyond M = GATHER_MAX_M the scatter scheme takes over.

M = 1 exchanges nothing and returns the contribution with the scheme's roundings applied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..codecs import Codec

GATHER_MAX_M = 8


@dataclass(frozen=True)
class AllReduce:
    """One all-reduce of `numel` values over M ranks with `codec`."""
    scheme: str  # "ring" | "scatter" | "gather"
    M: int
    numel: int
    codec: Codec
    chunk: int  # values per rank chunk (ring, scatter); the whole vector for gather

    @property
    def bytes_per_rank(self) -> int:
        """Exact bytes every rank sends (all ranks send the same)."""
        if self.M == 1:
            return 0
        if self.scheme == "gather":
            return (self.M - 1) * self.codec.nbytes(self.numel)
        return 2 * (self.M - 1) * self.codec.nbytes(self.chunk)

    @property
    def hops(self) -> int:
        """Sequential ring steps, each paying the ring's latency once."""
        return (self.M - 1) if self.scheme == "gather" else 2 * (self.M - 1)

    @property
    def payload_bytes(self) -> int:
        """One rank's whole encoded contribution (the peak payload of a run)."""
        return self.codec.nbytes(self.numel)

    # -- the arithmetic, shared by both runtimes -----------------------------------------
    def reduce(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The mean every rank gets, from the M original contributions in rank order (the
        simulator's path; the real runtime reaches the same numbers by exchanging bytes).
        Phantom contributions (planner/phantom.py) have sizes and no values: the mean is a
        phantom like them, and the codec's arithmetic is skipped (the bytes are plan's)."""
        if getattr(parts[0], "phantom", False):
            return parts[0].clone()
        if self.scheme == "ring":
            return mean_in_rank_order(parts)
        quantised = mean_in_rank_order([self.codec.roundtrip(p) for p in parts])
        if self.scheme == "gather":
            return quantised
        return self.codec.roundtrip(quantised)

    def pad(self, flat: torch.Tensor) -> torch.Tensor:
        """The contribution padded with zeros to M chunks (zeros never change a scale)."""
        return F.pad(flat, (0, self.M * self.chunk - flat.numel()))


def mean_in_rank_order(parts: list[torch.Tensor]) -> torch.Tensor:
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    return total / len(parts)


def plan(codec: Codec, M: int, numel: int) -> AllReduce:
    if codec.lossless:
        scheme = "ring"
    elif codec.name == "bf16" or M > GATHER_MAX_M:
        scheme = "scatter"
    else:
        scheme = "gather"
    block = getattr(codec, "block", 1)
    if scheme == "gather":
        chunk = numel
    else:
        per_rank = -(-numel // M)
        chunk = -(-per_rank // block) * block if scheme == "scatter" else per_rank
    return AllReduce(scheme, M, numel, codec, chunk)

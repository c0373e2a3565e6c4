"""Secure aggregation (SecAgg+, Bell et al. 2020, after Bonawitz et al. 2017), no Flower.

The server learns only the sum of the surviving clients' quantized updates; dropped
clients' masks are recovered from Shamir shares held by their neighbours.

Messages (the full account, with who learns what, is docs/secagg.md):

* once per run, stage 0: client -> server :class:`AdvertiseKeys` (two long-term X25519
  public keys: one for share encryption, one for mask agreement);
* per round, exchange 1: server -> client :class:`RoundSetup` with the train request;
  client -> server :class:`MaskedInput` with the train reply (masked update plus its
  encrypted shares);
* per round, exchange 2: server -> survivor :class:`UnmaskRequest`; survivor -> server
  :class:`UnmaskResponse`.

Why two exchanges per round suffice, and why it is sound:

* No per-round key advertisement: per-round pairwise seeds are HKDF outputs of the
  long-term X25519 agreement, bound to (run, round, the round's fresh public seed, the
  pair). HKDF is one-way, so revealing one round's seed reveals nothing about the
  long-term secret or any other round (or a retry of the same round).
* What a client secret-shares each round is its fresh self-mask seed b_i and each of
  its round pairwise seeds s_ij, never a long-term key. This lets the shares ride on
  the masked-input reply: a client that drops before replying sent no masked input and
  no shares, and the masks its surviving neighbours j added for it are rebuilt from the
  shares of s_jd that j itself distributed. A client that replied but drops before
  unmasking is still in the sum; only its b_i must be rebuilt.
* Revelation rule, enforced by every client: shares of b_j only for survivors j, shares
  of s_jd only for pairs (survivor j, dropped d), one answer per round. A dropped
  client's b_d is never revealed, so its masked input (if it arrives late) stays masked;
  a survivor's mask with a surviving neighbour is never revealed, so no single masked
  input can be opened; and a survivor graph that splits (which would reveal partial sums)
  makes both sides abort.
"""

from .client import ClientSecAggSession
from .errors import SecAggAbort, SecAggError, SecAggProtocolError
from .graph import default_num_neighbours, default_threshold, num_neighbours, share_holders
from .messages import (
    AdvertiseKeys,
    MaskedInput,
    ParticipantKeys,
    RoundSetup,
    UnmaskRequest,
    UnmaskResponse,
)
from .quantize import (
    check_no_wrap,
    decode_sum,
    encode,
    max_bits,
    quantization_error_bound,
    step_size,
)
from .server import AggregateResult, ServerSecAggSession

__all__ = [
    "AdvertiseKeys",
    "AggregateResult",
    "ClientSecAggSession",
    "MaskedInput",
    "ParticipantKeys",
    "RoundSetup",
    "SecAggAbort",
    "SecAggError",
    "SecAggProtocolError",
    "ServerSecAggSession",
    "UnmaskRequest",
    "UnmaskResponse",
    "check_no_wrap",
    "decode_sum",
    "default_num_neighbours",
    "default_threshold",
    "encode",
    "max_bits",
    "num_neighbours",
    "quantization_error_bound",
    "share_holders",
    "step_size",
]

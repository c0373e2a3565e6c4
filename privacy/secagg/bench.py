"""Micro-benchmark: mask expansion speed and one in-process protocol round (no Flower).

Clients run one after another in this process, so ``round_s`` is the total compute of
all parties on one core; in a federation the clients' stage-1 work runs in parallel and
what a round costs in wall time is closer to ``server_s + max client time`` plus two
message round trips.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import numpy as np

from . import fast_stream
from .client import ClientSecAggSession
from .masks import FAST_CODE, add_mask, keystream, stream_code
from .messages import AdvertiseKeys, MaskedInput, RoundSetup, UnmaskRequest, UnmaskResponse
from .quantize import clip_l2, decode_sum, encode, max_bits, quantization_error_bound
from .server import ServerSecAggSession


def _best_of(repeats: int, fn: Any) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_masks(
    params: int, clients: int, *, dropouts: int = 0, repeats: int = 3, clip: float = 1.0
) -> dict[str, Any]:
    """Time mask expansion (GB/s) and one full protocol round for ``clients`` x ``params``.

    ``dropouts`` clients vanish after stage 0 (their masks must be recovered from
    shares). Messages go through ``to_bytes``/``from_bytes`` as they would on the wire.
    """
    if params < 1 or clients < 2:
        raise ValueError(f"need params >= 1 and clients >= 2, got {params} and {clients}")
    if not 0 <= dropouts < clients:
        raise ValueError(f"dropouts must be in [0, {clients - 1}], got {dropouts}")
    nbytes = 4 * params
    key = os.urandom(32)

    # Raw AES-256-CTR keystream into a reused buffer, through each code that gives it here
    # (OpenSSL's two, and ours where available; masks.stream_code: the one this process
    # chose draws every stream), and the mask added into a vector.
    zeros, out = bytes(nbytes), bytearray(nbytes + 16)
    code_s = {
        code: _best_of(repeats, lambda c=code: keystream(key, code=c).update_into(zeros, out))
        for code in ("gcm", "ctr")
    }
    if fast_stream.available():
        words = np.empty(params, dtype=np.uint32)
        code_s[FAST_CODE] = _best_of(repeats, lambda: fast_stream.apply(words, [(key, 0)]))
    chosen = stream_code()
    acc = np.zeros(params, dtype=np.uint32)
    add_s = _best_of(repeats, lambda: add_mask(acc, key, sign=1))
    # One client's encoding into a reused buffer, as a client does from round to round
    # (the protocol round below gives each client fresh buffers).
    bits = max_bits(clients)
    gen = np.random.default_rng(1)
    one_update = gen.normal(0.0, 0.01, size=params).astype(np.float32)
    # Untimed first calls: torch initializes its kernels on first use in a process (a
    # client pays that once, in its first round), and the working buffers are made then.
    for _ in range(3):
        encode(one_update, clip=clip, bits=bits, num_clients=clients, rng=gen, out=acc)
    encode_s = _best_of(repeats, lambda: encode(one_update, clip=clip, bits=bits,
                                                num_clients=clients, rng=gen, out=acc))

    run_id = 1
    sessions = {
        node: ClientSecAggSession(node_id=node, run_id=run_id) for node in range(1, clients + 1)
    }
    server = ServerSecAggSession(run_id=run_id)
    server.collect_advertisements(
        {
            node: AdvertiseKeys.from_bytes(s.advertise_keys().to_bytes())
            for node, s in sessions.items()
        }
    )
    rng = np.random.default_rng(0)
    updates = {node: rng.normal(0.0, 0.01, size=params).astype(np.float32) for node in sessions}

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    setup_bytes = server.begin_round(1, list(sessions), vector_length=params).to_bytes()
    timings["server_begin_round_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    encoded = {
        node: encode(u, clip=clip, bits=bits, num_clients=clients, rng=rng)
        for node, u in updates.items()
    }
    timings["clients_encode_s"] = time.perf_counter() - t0

    gone = set(list(sessions)[:dropouts])
    replies: dict[int, bytes] = {}
    client_mask_times = []
    for node, session in sessions.items():
        if node in gone:
            continue
        start = time.perf_counter()
        setup = RoundSetup.from_bytes(setup_bytes)
        replies[node] = session.share_keys_and_mask_input(setup, encoded[node]).to_bytes()
        client_mask_times.append(time.perf_counter() - start)
    timings["clients_share_and_mask_s"] = sum(client_mask_times)

    t0 = time.perf_counter()
    requests = server.collect_masked_inputs(
        {node: MaskedInput.from_bytes(data) for node, data in replies.items()}
    )
    request_bytes = {node: r.to_bytes() for node, r in requests.items()}
    timings["server_collect_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    responses = {
        node: sessions[node].unmask(UnmaskRequest.from_bytes(data)).to_bytes()
        for node, data in request_bytes.items()
    }
    timings["clients_unmask_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    result = server.finish_round(
        {node: UnmaskResponse.from_bytes(data) for node, data in responses.items()}
    )
    timings["server_finish_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    decoded = decode_sum(result.total, clip=clip, bits=bits, num_summed=len(result.contributors))
    timings["server_decode_s"] = time.perf_counter() - t0

    plain = np.sum([clip_l2(updates[n], clip) for n in result.contributors], axis=0)
    setup = RoundSetup.from_bytes(setup_bytes)
    server_s = (
        timings["server_begin_round_s"]
        + timings["server_collect_s"]
        + timings["server_finish_s"]
        + timings["server_decode_s"]
    )
    return {
        "params": params,
        "clients": clients,
        "dropouts": dropouts,
        "num_neighbours": setup.num_neighbours,
        "threshold": setup.threshold,
        "bits": bits,
        "stream_code": chosen,
        "mask_expand_gbps": nbytes / code_s[chosen] / 1e9,
        "gcm_code_expand_gbps": nbytes / code_s["gcm"] / 1e9,
        "ctr_code_expand_gbps": nbytes / code_s["ctr"] / 1e9,
        "vaes_code_expand_gbps": nbytes / code_s[FAST_CODE] / 1e9 if FAST_CODE in code_s else None,
        "mask_add_gbps": nbytes / add_s / 1e9,
        "encode_reused_buffer_s": encode_s,
        **timings,
        "client_share_and_mask_mean_s": float(np.mean(client_mask_times)),
        "server_s": server_s,
        "round_compute_s": sum(timings.values()),
        "upload_bytes_per_client": len(next(iter(replies.values()))),
        "max_abs_error": float(np.max(np.abs(decoded - plain))),
        "error_bound": quantization_error_bound(
            clip=clip, bits=bits, num_summed=len(result.contributors)
        ),
    }

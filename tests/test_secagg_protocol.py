"""The SecAgg+ protocol end to end: sums, dropouts, aborts, refusals, forged messages."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
from scipy.stats import chisquare

from consortia.privacy.secagg import (
    AdvertiseKeys,
    ClientSecAggSession,
    MaskedInput,
    RoundSetup,
    SecAggAbort,
    SecAggProtocolError,
    ServerSecAggSession,
    UnmaskRequest,
    UnmaskResponse,
    decode_sum,
    encode,
    max_bits,
    quantization_error_bound,
)
from consortia.privacy.secagg.bench import bench_masks
from consortia.privacy.secagg.quantize import clip_l2
from consortia.privacy.secagg.round_plan import RoundPlan

RUN_ID = 42
CLIP = 1.0


class Federation:
    """n in-process clients and a server; messages cross as bytes, as on the wire."""

    def __init__(self, n: int, *, first_id: int = 1000) -> None:
        self.clients = {
            node: ClientSecAggSession(node_id=node, run_id=RUN_ID)
            for node in range(first_id, first_id + n)
        }
        self.server = ServerSecAggSession(run_id=RUN_ID)
        adverts = {node: c.advertise_keys().to_bytes() for node, c in self.clients.items()}
        assert self.server.collect_advertisements(adverts) == sorted(self.clients)
        self.bits = max_bits(n)

    def setup(self, round_num: int, size: int, **kwargs: int) -> RoundSetup:
        setup = self.server.begin_round(round_num, list(self.clients), vector_length=size, **kwargs)
        return RoundSetup.from_bytes(setup.to_bytes())

    def mask(
        self, setup: RoundSetup, updates: dict[int, np.ndarray], skip: set[int] = frozenset()
    ) -> dict[int, bytes]:
        n = len(self.clients)
        return {
            node: self.clients[node]
            .share_keys_and_mask_input(
                setup, encode(updates[node], clip=CLIP, bits=self.bits, num_clients=n)
            )
            .to_bytes()
            for node in self.clients
            if node not in skip
        }

    def unmask(
        self, requests: dict[int, UnmaskRequest], skip: set[int] = frozenset()
    ) -> dict[int, bytes]:
        return {
            node: self.clients[node].unmask(UnmaskRequest.from_bytes(r.to_bytes())).to_bytes()
            for node, r in requests.items()
            if node not in skip
        }

    def run_round(
        self,
        round_num: int,
        size: int,
        *,
        drop_before_masking: set[int] = frozenset(),
        drop_before_unmasking: set[int] = frozenset(),
        **kwargs: int,
    ):
        rng = np.random.default_rng(round_num)
        updates = {node: rng.normal(0.0, 0.2, size=size) for node in self.clients}
        setup = self.setup(round_num, size, **kwargs)
        requests = self.server.collect_masked_inputs(self.mask(setup, updates, drop_before_masking))
        result = self.server.finish_round(self.unmask(requests, drop_before_unmasking))
        decoded = decode_sum(
            result.total, clip=CLIP, bits=self.bits, num_summed=len(result.contributors)
        )
        expected = np.sum([clip_l2(updates[n], CLIP) for n in result.contributors], axis=0)
        bound = quantization_error_bound(
            clip=CLIP, bits=self.bits, num_summed=len(result.contributors)
        )
        return result, decoded, expected, bound

    def ids(self) -> list[int]:
        return sorted(self.clients)


@pytest.mark.parametrize(
    ("n", "k", "t", "size"),
    [
        (2, None, None, 5),
        (3, 2, 3, 17),
        (5, 2, 2, 1000),
        (10, None, None, 3000),
        (16, 6, 4, 100),
        (31, None, None, 2000),
    ],
)
def test_unmasked_sum_equals_the_plaintext_sum_within_the_quantization_bound(n, k, t, size):
    fed = Federation(n)
    kwargs = {key: v for key, v in (("num_neighbours", k), ("threshold", t)) if v is not None}
    result, decoded, expected, bound = fed.run_round(1, size, **kwargs)
    assert result.contributors == tuple(fed.ids()) and result.dropped == ()
    assert np.max(np.abs(decoded - expected)) < bound


def test_several_rounds_reuse_the_long_term_keys_and_each_round_sums_correctly():
    fed = Federation(6)
    for round_num in (1, 2, 5):
        _, decoded, expected, bound = fed.run_round(round_num, 50)
        assert np.max(np.abs(decoded - expected)) < bound


def test_dropouts_before_masking_and_before_unmasking_down_to_the_threshold():
    # Complete graph (k = n - 1): every client's shares are held by all 6 clients, t = 4.
    fed = Federation(6)
    a, b = fed.ids()[1], fed.ids()[4]
    result, decoded, expected, bound = fed.run_round(
        1, 300, num_neighbours=5, threshold=4, drop_before_masking={a}, drop_before_unmasking={b}
    )
    assert result.dropped == (a,)
    assert b in result.contributors and len(result.unmask_responders) == 4
    assert np.max(np.abs(decoded - expected)) < bound


def test_dropouts_on_a_sparse_graph_recover_the_dropped_clients_pairwise_masks():
    fed = Federation(20)
    ids = fed.ids()
    # k = 4 gives a 4-connected graph: two losses keep it connected and leave each client
    # at least 3 of its 5 share holders (t = 3).
    result, decoded, expected, bound = fed.run_round(
        1,
        500,
        num_neighbours=4,
        threshold=3,
        drop_before_masking={ids[3]},
        drop_before_unmasking={ids[11]},
    )
    assert result.dropped == (ids[3],) and len(result.contributors) == 19
    assert np.max(np.abs(decoded - expected)) < bound


def test_too_few_unmask_responses_beyond_the_threshold_abort():
    fed = Federation(6)
    ids = fed.ids()
    with pytest.raises(SecAggAbort, match="threshold t=4"):
        fed.run_round(
            1,
            10,
            num_neighbours=5,
            threshold=4,
            drop_before_masking={ids[0]},
            drop_before_unmasking={ids[1], ids[2]},
        )


def test_too_few_masked_inputs_abort_before_any_unmasking():
    fed = Federation(6)
    ids = fed.ids()
    with pytest.raises(SecAggAbort, match="3 valid masked inputs, fewer than the threshold t=4"):
        fed.run_round(1, 10, num_neighbours=5, threshold=4, drop_before_masking=set(ids[:3]))


def test_a_split_survivor_graph_aborts_because_it_would_reveal_partial_sums():
    fed = Federation(10)
    setup = fed.setup(1, 10, num_neighbours=2, threshold=2)  # a ring
    ring = RoundPlan.from_setup(setup).graph
    # Removing two non-adjacent nodes cuts a ring into two arcs.
    first = fed.ids()[0]
    far = next(v for v in fed.ids() if v != first and v not in ring[first])
    replies = fed.mask(setup, {n: np.zeros(10) for n in fed.ids()}, skip={first, far})
    with pytest.raises(SecAggAbort, match="split"):
        fed.server.collect_masked_inputs(replies)


def test_each_masked_vector_alone_is_uniform_bytes():
    fed = Federation(5)
    size = 20_000
    setup = fed.setup(1, size)
    updates = {n: np.zeros(size) for n in fed.ids()}  # constant input: all structure is mask
    for data in fed.mask(setup, updates).values():
        masked = MaskedInput.from_bytes(data).masked
        counts = np.bincount(masked.view(np.uint8), minlength=256)
        assert chisquare(counts).pvalue > 1e-5
        top_bytes = np.bincount((masked >> 24).astype(np.uint8), minlength=256)
        assert chisquare(top_bytes).pvalue > 1e-5


def test_an_unmask_response_never_reveals_both_secrets_of_one_client():
    fed = Federation(12)
    ids = fed.ids()
    setup = fed.setup(1, 20, num_neighbours=4, threshold=3)
    updates = {n: np.zeros(20) for n in ids}
    requests = fed.server.collect_masked_inputs(fed.mask(setup, updates, skip={ids[2]}))
    for data in fed.unmask(requests).values():
        response = UnmaskResponse.from_bytes(data)
        self_mask_owners = set(response.self_mask_shares)
        pair_dropped = {d for _, d in response.pairwise_shares}
        assert ids[2] not in self_mask_owners
        assert pair_dropped <= {ids[2]}
        assert not self_mask_owners & pair_dropped


def test_client_state_survives_serialisation_between_masking_and_unmasking():
    fed = Federation(4)
    setup = fed.setup(1, 8)
    replies = fed.mask(setup, {n: np.zeros(8) for n in fed.ids()})
    requests = fed.server.collect_masked_inputs(replies)
    for node in fed.ids():
        state = fed.clients[node].to_state_bytes()
        fed.clients[node] = ClientSecAggSession.from_state_bytes(state)
    result = fed.server.finish_round(fed.unmask(requests))
    assert result.contributors == tuple(fed.ids())


def test_client_state_keeps_its_keys_agreements_and_round_and_reads_the_older_layout():
    import struct

    fed = Federation(5)
    node = fed.ids()[0]
    client = fed.clients[node]
    setup = fed.setup(1, 8)
    fed.mask(setup, {n: np.zeros(8) for n in fed.ids()})
    state = client.to_state_bytes()
    again = ClientSecAggSession.from_state_bytes(state)
    assert again.to_state_bytes() == state  # keys, agreements, last round, pending setup
    assert again.public_keys == client.public_keys
    assert again._masking_keys.agreements() == client._masking_keys.agreements() != {}
    # The layout before the agreements (CSAclient1): the private keys, the last round and
    # its seed, the pending setup. Still read, the agreements then made afresh.
    last_seed = client._last_round_seed
    v1 = (b"CSAclient1" + struct.pack(">QQq", node, RUN_ID, 1)
          + client._encryption_keys.private_bytes() + client._masking_keys.private_bytes()
          + bytes([len(last_seed)]) + last_seed + setup.to_bytes())
    old = ClientSecAggSession.from_state_bytes(v1)
    assert old.public_keys == client.public_keys and old._masking_keys.agreements() == {}
    assert old._last_round == 1 and old._pending == setup
    with pytest.raises(ValueError, match="not a ClientSecAggSession state"):
        ClientSecAggSession.from_state_bytes(b"CSAclient9" + state[10:])
    # A state cut short (a torn file) or with a damaged pending setup is refused, saying so.
    for bad in (state[:40], state[:120], v1[:60], state[:-3]):
        with pytest.raises(ValueError, match=r"state of \d+ bytes is truncated or corrupt"):
            ClientSecAggSession.from_state_bytes(bad)


def test_repr_of_sessions_and_messages_hides_key_material():
    fed = Federation(3)
    client = fed.clients[fed.ids()[0]]
    private = client._encryption_keys.private_bytes().hex()
    assert private not in repr(client) and "hidden" in repr(client)
    assert private not in repr(fed.server)


# Malformed, replayed and forged messages --------------------------------------------


@pytest.fixture
def masked_round():
    fed = Federation(5)
    setup = fed.setup(3, 16, num_neighbours=4, threshold=3)
    replies = fed.mask(setup, {n: np.zeros(16) for n in fed.ids()})
    return fed, setup, replies


def test_server_drops_a_masked_input_with_the_wrong_vector_length(masked_round):
    fed, _, replies = masked_round
    bad = fed.ids()[0]
    msg = MaskedInput.from_bytes(replies[bad])
    replies[bad] = dataclasses.replace(msg, masked=msg.masked[:-1]).to_bytes()
    requests = fed.server.collect_masked_inputs(replies)
    assert bad not in requests and "shape" in fed.server.rejected[bad]
    result = fed.server.finish_round(fed.unmask(requests))
    assert bad in result.dropped and bad in result.rejected


def test_server_drops_messages_from_unknown_nodes_or_for_the_wrong_round(masked_round):
    fed, _, replies = masked_round
    a, b = fed.ids()[:2]
    replies[99] = replies[a]  # arrives from a node that is not in the round
    msg = MaskedInput.from_bytes(replies[b])
    replies[b] = dataclasses.replace(msg, round_num=2).to_bytes()
    requests = fed.server.collect_masked_inputs(replies)
    assert "names node" in fed.server.rejected[99]
    assert "round 2" in fed.server.rejected[b]
    assert set(requests) == set(fed.ids()) - {b}


def test_server_drops_truncated_bytes_and_trailing_garbage(masked_round):
    fed, _, replies = masked_round
    a, b = fed.ids()[:2]
    replies[a] = replies[a][:-3]
    replies[b] = replies[b] + b"\x00"
    fed.server.collect_masked_inputs(replies)
    assert "bytes" in fed.server.rejected[a]
    assert "bytes" in fed.server.rejected[b]


def test_client_refuses_an_unmask_request_for_another_round(masked_round):
    fed, _, replies = masked_round
    requests = fed.server.collect_masked_inputs(replies)
    node = fed.ids()[0]
    wrong = dataclasses.replace(requests[node], round_num=4)
    with pytest.raises(SecAggProtocolError, match="round 4"):
        fed.clients[node].unmask(wrong)


def test_client_refuses_unknown_survivors_and_forged_or_tampered_shares(masked_round):
    fed, _, replies = masked_round
    requests = fed.server.collect_masked_inputs(replies)
    node = fed.ids()[0]
    client = fed.clients[node]
    request = requests[node]

    unknown = dataclasses.replace(request, survivors=(*request.survivors, 777))
    with pytest.raises(SecAggProtocolError, match="non-participants"):
        client.unmask(unknown)

    sender = next(iter(request.encrypted_shares))
    tampered = bytearray(request.encrypted_shares[sender])
    tampered[20] ^= 0x80
    shares = {**request.encrypted_shares, sender: bytes(tampered)}
    with pytest.raises(SecAggProtocolError, match="authentication"):
        client.unmask(dataclasses.replace(request, encrypted_shares=shares))

    # Shares a survivor addressed to someone else do not authenticate for this client.
    other = fed.ids()[1]
    stolen = {s: c for s, c in requests[other].encrypted_shares.items() if s != other}
    with pytest.raises(SecAggProtocolError, match="authentication"):
        client.unmask(dataclasses.replace(request, encrypted_shares=stolen))


def test_client_refuses_to_reveal_self_mask_shares_of_a_dropped_client(masked_round):
    fed, _, replies = masked_round
    ids = fed.ids()
    gone = ids[4]
    requests = fed.server.collect_masked_inputs(replies)
    node = ids[0]
    request = requests[node]
    # The server pretends `gone` dropped but still forwards its shares: refused.
    survivors = tuple(s for s in request.survivors if s != gone)
    with pytest.raises(SecAggProtocolError, match="not a survivor"):
        fed.clients[node].unmask(dataclasses.replace(request, survivors=survivors))


def test_client_answers_one_unmask_request_per_round(masked_round):
    fed, _, replies = masked_round
    requests = fed.server.collect_masked_inputs(replies)
    node = fed.ids()[0]
    fed.clients[node].unmask(requests[node])
    with pytest.raises(SecAggProtocolError, match="already answered"):
        fed.clients[node].unmask(requests[node])


def test_client_refuses_a_replayed_setup_but_accepts_a_retry_with_a_fresh_seed(masked_round):
    fed, setup, _ = masked_round
    client = fed.clients[fed.ids()[0]]
    zeros = np.zeros(16, dtype=np.uint32)
    with pytest.raises(SecAggProtocolError, match="replayed"):
        client.share_keys_and_mask_input(setup, zeros)
    older = dataclasses.replace(setup, round_num=2, round_seed=os.urandom(32))
    with pytest.raises(SecAggProtocolError, match="replayed"):
        client.share_keys_and_mask_input(older, zeros)
    retry = dataclasses.replace(setup, round_seed=os.urandom(32))
    assert client.share_keys_and_mask_input(retry, zeros).round_num == 3


def test_client_refuses_setups_for_other_runs_or_with_keys_that_are_not_its_own():
    fed = Federation(3)
    setup = fed.setup(1, 4)
    node = fed.ids()[0]
    client = fed.clients[node]
    zeros = np.zeros(4, dtype=np.uint32)
    with pytest.raises(SecAggProtocolError, match="run 7"):
        client.share_keys_and_mask_input(dataclasses.replace(setup, run_id=7), zeros)
    swapped = tuple(
        dataclasses.replace(p, masking_public_key=os.urandom(32)) if p.node_id == node else p
        for p in setup.participants
    )
    with pytest.raises(SecAggProtocolError, match="not its own"):
        client.share_keys_and_mask_input(dataclasses.replace(setup, participants=swapped), zeros)
    with pytest.raises(ValueError, match="expects 4"):
        client.share_keys_and_mask_input(setup, np.zeros(5, dtype=np.uint32))


def test_server_refuses_forged_advertisements_and_unregistered_participants():
    server = ServerSecAggSession(run_id=RUN_ID)
    honest = ClientSecAggSession(node_id=1, run_id=RUN_ID)
    other_run = ClientSecAggSession(node_id=2, run_id=RUN_ID + 1)
    accepted = server.collect_advertisements(
        {
            1: honest.advertise_keys().to_bytes(),
            2: other_run.advertise_keys(),
            3: honest.advertise_keys(),  # node 3 replays node 1's keys
            4: b"garbage",
        }
    )
    assert accepted == [1]
    assert set(server.rejected) == {2, 3, 4}
    with pytest.raises(ValueError, match=r"\[2\]"):
        server.begin_round(1, [1, 2], vector_length=3)


def test_server_drops_unmask_responses_that_claim_shares_they_should_not_have(masked_round):
    fed, _, replies = masked_round
    ids = fed.ids()
    requests = fed.server.collect_masked_inputs(replies)
    responses = fed.unmask(requests)
    liar = ids[0]
    msg = UnmaskResponse.from_bytes(responses[liar])
    forged = dict(msg.pairwise_shares)
    forged[(ids[1], ids[2])] = bytes(33)  # nobody dropped: no pairwise share is wanted
    responses[liar] = dataclasses.replace(msg, pairwise_shares=forged).to_bytes()
    result = fed.server.finish_round(responses)
    assert "unexpected pairwise share" in result.rejected[liar]
    assert liar in result.contributors and liar not in result.unmask_responders


def test_messages_reject_the_wrong_type_tag():
    advert = ClientSecAggSession(node_id=1, run_id=RUN_ID).advertise_keys().to_bytes()
    with pytest.raises(SecAggProtocolError, match="wrong message type"):
        RoundSetup.from_bytes(advert)
    with pytest.raises(SecAggProtocolError, match="not a consortia"):
        AdvertiseKeys.from_bytes(b"XXXX" + advert[4:])


def test_clients_and_server_on_different_stream_codes_agree_bit_for_bit(monkeypatch):
    """Each process draws the streams with the code it chose (masks.stream_code: OpenSSL's
    CTR or GCM code, or ours where available); a federation mixes them. The sum is the
    same, bit for bit, whichever code each party drew with, and a dropout's masks are
    recovered across codes."""
    from consortia.privacy.secagg import fast_stream, masks

    codes = ["ctr", "gcm"] + (["vaes"] if fast_stream.available() else [])
    monkeypatch.setattr(masks, "_chosen_code", masks._chosen_code)
    totals = []
    for server_code in codes:
        fed = Federation(6)
        rng = np.random.default_rng(5)
        updates = {node: rng.normal(0.0, 0.2, size=1003) for node in fed.clients}
        setup = fed.setup(1, 1003)
        replies = {}
        for i, node in enumerate(fed.ids()[1:]):  # the first client drops before masking
            masks.stream_code(codes[(i + codes.index(server_code)) % len(codes)])
            encoded = encode(updates[node], clip=CLIP, bits=fed.bits, num_clients=6,
                             rng=np.random.default_rng(node))
            replies[node] = fed.clients[node].share_keys_and_mask_input(setup, encoded).to_bytes()
        masks.stream_code(server_code)
        requests = fed.server.collect_masked_inputs(replies)
        result = fed.server.finish_round(fed.unmask(requests))
        assert result.dropped == (fed.ids()[0],)
        plain = np.sum([encode(updates[n], clip=CLIP, bits=fed.bits, num_clients=6,
                               rng=np.random.default_rng(n)) for n in fed.ids()[1:]],
                       axis=0, dtype=np.uint32)
        assert np.array_equal(result.total, plain)
        totals.append(result.total)
    assert all(np.array_equal(total, totals[0]) for total in totals)


def test_bench_masks_reports_speed_and_a_correct_round():
    report = bench_masks(20_000, 4, dropouts=1, repeats=1)
    assert report["mask_expand_gbps"] > 0 and report["mask_add_gbps"] > 0
    assert report["encode_reused_buffer_s"] > 0
    assert report["round_compute_s"] > 0
    assert report["max_abs_error"] < report["error_bound"]


def test_replies_one_at_a_time_give_the_sum_and_a_second_reply_changes_nothing():
    fed = Federation(n=6)
    ids = list(fed.clients)
    setup = fed.setup(1, 50)
    updates = {i: np.random.default_rng(i).normal(0.0, 0.1, size=50) for i in ids}
    replies = fed.mask(setup, updates)
    for src, reply in replies.items():
        assert fed.server.add_masked_input(src, reply)
    src, reply = next(iter(replies.items()))
    assert not fed.server.add_masked_input(src, reply)  # already summed: ignored
    assert src not in fed.server.rejected
    responses = fed.unmask(fed.server.unmask_requests())
    for src, response in responses.items():
        assert fed.server.add_unmask_response(src, response)
    assert not fed.server.add_unmask_response(src, response)
    result = fed.server.aggregate()
    assert result.contributors == tuple(sorted(ids)) and not result.rejected
    decoded = decode_sum(result.total, clip=CLIP, bits=fed.bits, num_summed=len(ids))
    expected = np.sum([clip_l2(updates[i], CLIP) for i in ids], axis=0)
    bound = quantization_error_bound(clip=CLIP, bits=fed.bits, num_summed=len(ids))
    assert np.max(np.abs(decoded - expected)) <= bound + 1e-9


def _holders_in(plan: RoundPlan, asked, owner: int) -> int:
    return len(set(plan.holders(owner)) & set(asked))


@pytest.mark.parametrize(("n", "drop"), [(5, 0), (10, 0), (30, 0), (30, 4), (100, 9)])
def test_a_cover_asks_fewer_survivors_and_holds_t_shares_of_every_secret(n, drop):
    fed = Federation(n)
    setup = fed.setup(1, 40)
    updates = {i: np.random.default_rng(i).normal(0.0, 0.1, size=40) for i in fed.ids()}
    plan = RoundPlan.from_setup(setup)
    # `drop` clients, every other one, each only where every client left keeps t holders
    # alive (the graph is drawn from fresh keys: a fixed choice hit 4 of one client's 6
    # holders in about 1 run in 60, a round no cover can unmask, which aborts).
    gone = set()
    for candidate in fed.ids()[1::2]:
        if len(gone) == drop:
            break
        left = [i for i in fed.ids() if i not in gone | {candidate}]
        if all(_holders_in(plan, left, j) >= setup.threshold for j in left):
            gone.add(candidate)
    assert len(gone) == drop
    for src, reply in fed.mask(setup, updates, gone).items():
        fed.server.add_masked_input(src, reply)
    requests = fed.server.unmask_requests(cover=True)
    survivors = [i for i in fed.ids() if i not in gone]
    assert set(requests) <= set(survivors)
    assert all(_holders_in(plan, requests, j) >= setup.threshold for j in survivors)
    if n >= 10:
        assert len(requests) < len(survivors)
    # Those asked alone unmask the round: the sum of the survivors, within the bound.
    result = fed.server.finish_round(fed.unmask(requests))
    assert result.contributors == tuple(survivors)
    assert result.unmask_responders == tuple(sorted(requests))
    decoded = decode_sum(result.total, clip=CLIP, bits=fed.bits, num_summed=len(survivors))
    expected = np.sum([clip_l2(updates[i], CLIP) for i in survivors], axis=0)
    bound = quantization_error_bound(clip=CLIP, bits=fed.bits, num_summed=len(survivors))
    assert np.max(np.abs(decoded - expected)) < bound


def test_when_some_of_the_cover_do_not_answer_the_others_are_asked_and_the_sum_is_right():
    fed = Federation(30)
    setup = fed.setup(1, 60)
    updates = {i: np.random.default_rng(i).normal(0.0, 0.1, size=60) for i in fed.ids()}
    for src, reply in fed.mask(setup, updates).items():
        fed.server.add_masked_input(src, reply)
    first = fed.server.unmask_requests(cover=True)
    silent = set(sorted(first)[:3])
    for src, response in fed.unmask(first, skip=silent).items():
        assert fed.server.add_unmask_response(src, response)
    assert fed.server.shares_missing()
    more = fed.server.more_unmask_requests()
    assert more and not set(more) & set(first)  # nobody is asked twice
    for src, response in fed.unmask(more).items():
        assert fed.server.add_unmask_response(src, response)
    assert not fed.server.shares_missing()
    assert fed.server.more_unmask_requests() == {}
    result = fed.server.aggregate()
    assert result.contributors == tuple(fed.ids())
    decoded = decode_sum(result.total, clip=CLIP, bits=fed.bits, num_summed=30)
    expected = np.sum([clip_l2(updates[i], CLIP) for i in fed.ids()], axis=0)
    assert np.max(np.abs(decoded - expected)) < quantization_error_bound(
        clip=CLIP, bits=fed.bits, num_summed=30)


def test_server_refuses_an_unmask_response_from_a_survivor_it_did_not_ask():
    fed = Federation(30)
    setup = fed.setup(1, 20)
    updates = {i: np.zeros(20) for i in fed.ids()}
    for src, reply in fed.mask(setup, updates).items():
        fed.server.add_masked_input(src, reply)
    asked = fed.server.unmask_requests(cover=True)
    other = next(i for i in fed.ids() if i not in asked)
    # The request it would have got, answered anyway (e.g. a replay of another's request).
    request = next(iter(asked.values()))
    forged = dataclasses.replace(request, encrypted_shares={})
    response = fed.clients[other].unmask(forged)
    assert not fed.server.add_unmask_response(other, response.to_bytes())
    assert "not asked" in fed.server.rejected[other]


def test_summing_and_removing_masks_as_replies_come_in_a_thread_gives_the_exact_sum():
    """What the server does while replies are out (server/secure_aggregation.py): each
    masked vector into the sum as it comes, each rebuilt mask out as soon as its seed is
    complete, in a worker thread, with dropouts at both stages. The total is exactly the
    survivors' encoded vectors summed modulo 2**32."""
    from concurrent.futures import ThreadPoolExecutor

    fed = Federation(12)
    size = 70_001  # several of the sum's chunks, and a partial last one
    setup = fed.setup(1, size, num_neighbours=6, threshold=3)
    rng = np.random.default_rng(3)
    encoded = {i: rng.integers(0, 2**fed.bits, size=size, dtype=np.uint32) for i in fed.ids()}
    gone = set(fed.ids()[2:9:6])  # two clients drop before masking
    with ThreadPoolExecutor(1) as worker:
        pending = []
        for node in fed.ids():
            if node in gone:
                continue
            reply = fed.clients[node].share_keys_and_mask_input(setup, encoded[node]).to_bytes()
            assert fed.server.add_masked_input(node, reply)
            pending.append(worker.submit(fed.server.sum_masked_inputs))
        requests = fed.server.unmask_requests(cover=True)
        pending.append(worker.submit(fed.server.remove_rebuilt_masks))  # nothing rebuilt yet
        silent = sorted(requests)[0]  # one asked client drops before unmasking
        for src, response in fed.unmask(requests, skip={silent}).items():
            assert fed.server.add_unmask_response(src, response)
            pending.append(worker.submit(fed.server.remove_rebuilt_masks))
        for src, response in fed.unmask(fed.server.more_unmask_requests()).items():
            assert fed.server.add_unmask_response(src, response)
            pending.append(worker.submit(fed.server.remove_rebuilt_masks))
        for done in pending:
            done.result()
    result = fed.server.aggregate()
    assert set(result.dropped) == gone
    expected = np.zeros(size, dtype=np.uint32)
    for node in result.contributors:
        expected += encoded[node]  # wraps modulo 2**32, as the masks do
    assert np.array_equal(result.total, expected)

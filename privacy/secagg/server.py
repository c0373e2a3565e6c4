"""The server side of the protocol: one method per stage.

Stage 0, once per run: :meth:`ServerSecAggSession.collect_advertisements`
Stage 1, every round:  :meth:`begin_round` gives the :class:`RoundSetup` to send with the
                       train request; :meth:`collect_masked_inputs` takes the replies and
                       gives one :class:`UnmaskRequest` per survivor
Stage 2, every round:  :meth:`finish_round` takes the unmask replies and gives the sum
                       (or, asking only a cover of the survivors, :meth:`shares_missing`
                       and :meth:`more_unmask_requests` between the replies and the sum)

Each of the last two also goes one reply at a time: :meth:`add_masked_input` then
:meth:`unmask_requests`; :meth:`add_unmask_response` (it rebuilds a seed as soon as t
shares of it are in) then :meth:`aggregate` (every mask still in, out in one pass). In
between, :meth:`sum_masked_inputs` and :meth:`remove_rebuilt_masks` do the work so far,
e.g. in a thread while replies are still coming in.

A message that fails validation counts as that client dropping out (its reason is kept
in :attr:`rejected`); too few survivors raises :class:`SecAggAbort`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from . import shamir
from .errors import SecAggAbort, SecAggProtocolError
from .graph import default_num_neighbours, default_threshold, is_connected
from .masks import add_masks
from .messages import (
    ROUND_SEED_LEN,
    AdvertiseKeys,
    MaskedInput,
    ParticipantKeys,
    RoundSetup,
    UnmaskRequest,
    UnmaskResponse,
)
from .round_plan import RoundPlan, pairwise_sign

_SUM_CHUNK = 1 << 16  # uint32 values: 256 KiB of the sum stays in cache while inputs go in
_MASK_WORKERS = min(8, os.cpu_count() or 1)  # threads removing the masks from the sum


@dataclass(frozen=True)
class AggregateResult:
    """The outcome of a round: the uint32 sum of the contributors' encoded updates.

    Decode it with ``quantize.decode_sum(total, ..., num_summed=len(contributors))``.
    """

    round_num: int
    total: np.ndarray = field(repr=False)
    contributors: tuple[int, ...]  # U1: whose masked input is in the sum
    dropped: tuple[int, ...]  # participants not in the sum
    unmask_responders: tuple[int, ...]  # U2: who helped to unmask
    rejected: dict[int, str]  # node -> why its message was refused this round


class ServerSecAggSession:
    """The server's secure-aggregation state for one run (honest-but-curious server)."""

    def __init__(self, *, run_id: int) -> None:
        self.run_id = run_id
        self.registered: dict[int, ParticipantKeys] = {}
        self._plan: RoundPlan | None = None
        self._stage = "idle"
        self._sum_lock = threading.Lock()  # the lists of vectors and masks to take in
        self._total_lock = threading.Lock()  # the running sum
        self._round_state()

    def _round_state(self) -> None:
        """Forget the last round's replies."""
        self.rejected: dict[int, str] = {}
        self._total: np.ndarray | None = None
        self._inputs: list[np.ndarray] = []  # accepted masked vectors not yet in _total
        self._survivors: tuple[int, ...] = ()
        self._sealed: dict[int, dict[int, bytes]] = {}  # sender -> its sealed shares
        self._self_mask_shares: dict[int, dict[int, bytes]] = {}  # owner -> point -> share
        self._pair_shares: dict[tuple[int, int], dict[int, bytes]] = {}  # (owner, dropped)
        self._responders: set[int] = set()
        self._asked: set[int] = set()  # survivors sent an unmask request
        self._holders: dict[int, list[int]] = {}  # survivor -> its surviving share holders
        self._holds: dict[int, list[int]] = {}  # survivor -> whose shares it holds
        self._to_remove: list[tuple[bytes, int]] = []  # (mask key, sign) rebuilt so far
        self._unmask_failure: str | None = None

    def __repr__(self) -> str:
        return (
            f"ServerSecAggSession(run_id={self.run_id}, registered={len(self.registered)}, "
            f"stage={self._stage!r})"
        )

    # Stage 0 ------------------------------------------------------------------------------

    def collect_advertisements(self, adverts: Mapping[int, AdvertiseKeys | bytes]) -> list[int]:
        """Register each client's public keys; keys are ``src`` node ids from the transport.

        Returns the node ids accepted now; refused ones are in :attr:`rejected`.
        """
        self.rejected = {}
        accepted = []
        for src, advert in adverts.items():
            try:
                msg = (
                    advert
                    if isinstance(advert, AdvertiseKeys)
                    else AdvertiseKeys.from_bytes(advert)
                )
                if msg.keys.node_id != src:
                    raise SecAggProtocolError(
                        f"AdvertiseKeys names node {msg.keys.node_id} but came from {src}",
                        node_id=src,
                    )
                if msg.run_id != self.run_id:
                    raise SecAggProtocolError(f"AdvertiseKeys for run {msg.run_id}", node_id=src)
            except SecAggProtocolError as exc:
                self.rejected[src] = exc.reason
                continue
            self.registered[src] = msg.keys
            accepted.append(src)
        return sorted(accepted)

    # Stage 1 ------------------------------------------------------------------------------

    def begin_round(
        self,
        round_num: int,
        participants: Sequence[int],
        *,
        vector_length: int,
        num_neighbours: int | None = None,
        threshold: int | None = None,
    ) -> RoundSetup:
        """The setup to send to every participant with its train request."""
        unknown = sorted(set(participants) - set(self.registered))
        if unknown:
            raise ValueError(f"participants {unknown} have not advertised keys in this run")
        ids = sorted(set(participants))
        if len(ids) < 2:
            raise SecAggAbort(f"round {round_num}: {len(ids)} participants, at least 2 needed")
        k = num_neighbours if num_neighbours is not None else default_num_neighbours(len(ids))
        t = threshold if threshold is not None else default_threshold(k)
        setup = RoundSetup(
            run_id=self.run_id,
            round_num=round_num,
            round_seed=os.urandom(ROUND_SEED_LEN),
            num_neighbours=k,
            threshold=t,
            vector_length=vector_length,
            participants=tuple(self.registered[i] for i in ids),
        )
        try:
            self._plan = RoundPlan.from_setup(setup)
        except SecAggProtocolError as exc:
            raise ValueError(exc.reason) from exc
        self._stage = "masking"
        self._round_state()
        return setup

    def collect_masked_inputs(
        self, replies: Mapping[int, MaskedInput | bytes]
    ) -> dict[int, UnmaskRequest]:
        """Sum the valid masked inputs; returns the unmask request for each survivor.

        ``replies`` maps the transport-level sender to its reply; absent participants
        and invalid replies are dropouts.
        """
        for src, reply in replies.items():
            self.add_masked_input(src, reply)
        return self.unmask_requests()

    def add_masked_input(self, src: int, reply: MaskedInput | bytes) -> bool:
        """Check one masked input and add its vector to the sum; False if refused (the
        reason is in :attr:`rejected`, and the sender counts as dropped) or if the sender's
        input is already in (a second one is ignored)."""
        plan = self._require("masking")
        if src in self._sealed:
            return False
        try:
            msg = self._check_masked_input(plan, src, reply)
        except SecAggProtocolError as exc:
            self.rejected[src] = exc.reason
            return False
        self._sealed[src] = msg.encrypted_shares
        with self._sum_lock:
            self._inputs.append(msg.masked)  # summed by sum_masked_inputs, then dropped
        return True

    def sum_masked_inputs(self) -> None:
        """Add the masked vectors taken so far into the running sum, and let them go.

        :meth:`aggregate` does it for any left; a caller may do it earlier, e.g. in a
        thread while the unmask requests are out (the vectors are fixed by then, and
        numpy releases the GIL while it adds). Chunk by chunk, so the sum's chunk stays
        in cache while every vector's slice goes into it.
        """
        self._work(remove_masks=False)

    def remove_rebuilt_masks(self) -> None:
        """Take the masks whose seeds are rebuilt so far out of the sum (after summing the
        masked vectors taken so far); :meth:`aggregate` removes the rest.

        A caller may do it in a thread while other unmask responses are still out: the
        sum is modulo 2**32, so the order of additions does not matter, and OpenSSL and
        numpy release the GIL while they expand and add.
        """
        self._work(remove_masks=True)

    def _work(self, *, remove_masks: bool) -> None:
        """Sum the vectors taken so far (and remove the masks rebuilt so far) into _total.

        Two locks: _sum_lock only guards the lists of what is to do, so that taking in a
        reply never waits on the sum; _total_lock is held while the sum changes.
        """
        with self._total_lock:
            with self._sum_lock:
                inputs, self._inputs = self._inputs, []
                masks: list[tuple[bytes, int]] = []
                if remove_masks:
                    masks, self._to_remove = self._to_remove, []
            if inputs:
                if self._total is None:
                    self._total = np.array(inputs.pop(), dtype=np.uint32)  # its own copy
                total = self._total
                for start in range(0, total.size, _SUM_CHUNK):
                    chunk = total[start:start + _SUM_CHUNK]
                    for vector in inputs:
                        # uint32 addition wraps modulo 2**32: the masks live in that group.
                        np.add(chunk, vector[start:start + _SUM_CHUNK], out=chunk)
            if masks:  # rebuilt only while unmasking, when at least t vectors are in
                add_masks(self._total, masks)

    def unmask_requests(self, *, cover: bool = False) -> dict[int, UnmaskRequest]:
        """Fix the survivors (every accepted masked input so far) and give each its request.

        ``cover=True`` asks only enough of them: a subset holding at least t shares of
        every survivor's secrets (:func:`_unmask_cover`), about t / (k + 1) of the
        survivors. What the server learns is the same; fewer clients reveal shares and
        fewer messages travel. Should some of them not answer, :meth:`shares_missing`
        says so and :meth:`more_unmask_requests` asks the others.
        """
        plan = self._require("masking")
        survivors = tuple(sorted(self._sealed))
        self._check_enough(plan, survivors, "masked inputs")
        self._survivors = survivors
        self._stage = "unmasking"
        dropped = set(plan.graph) - set(survivors)
        self._self_mask_shares = {j: {} for j in survivors}
        self._pair_shares = {(j, d): {} for j in survivors for d in plan.graph[j] if d in dropped}
        # Who holds whose shares among the survivors, both ways, once per round: a request
        # carries the shares its recipient holds (O(n k) in all, not n holder lists each).
        alive = set(survivors)
        self._holders = {j: [h for h in plan.holders(j) if h in alive] for j in survivors}
        self._holds = {h: [] for h in survivors}
        for j, hs in self._holders.items():
            for h in hs:
                self._holds[h].append(j)
        asked = (_unmask_cover(plan.threshold, survivors, self._holders, self._holds)
                 if cover else survivors)
        return self._requests(plan, sorted(asked))

    def shares_missing(self) -> bool:
        """Whether some secret the sum needs has fewer than t shares so far."""
        return bool(self._short_owners())

    def more_unmask_requests(self) -> dict[int, UnmaskRequest]:
        """Requests for the survivors not asked yet that hold shares of a secret still
        short of t (after a cover, when some of those asked did not answer); none when
        no secret is short."""
        helpers = {h for j in self._short_owners() for h in self._holders[j]}
        return self._requests(self._require("unmasking"),
                              [h for h in self._survivors if h in helpers and h not in self._asked])

    def _short_owners(self) -> set[int]:
        """Survivors with a secret the sum needs that has fewer than t shares so far."""
        t = self._require("unmasking").threshold
        short = {j for j, shares in self._self_mask_shares.items() if len(shares) < t}
        return short | {j for (j, _), shares in self._pair_shares.items() if len(shares) < t}

    def _requests(self, plan: RoundPlan, nodes: Sequence[int]) -> dict[int, UnmaskRequest]:
        setup, survivors = plan.setup, self._survivors
        self._asked.update(nodes)
        return {h: UnmaskRequest(setup.run_id, setup.round_num, setup.round_seed, survivors,
                                 {j: self._sealed[j][h] for j in self._holds[h]})
                for h in nodes}

    def _check_masked_input(
        self, plan: RoundPlan, src: int, reply: MaskedInput | bytes
    ) -> MaskedInput:
        setup = plan.setup
        msg = reply if isinstance(reply, MaskedInput) else MaskedInput.from_bytes(reply)
        if msg.node_id != src:
            raise SecAggProtocolError(f"MaskedInput names node {msg.node_id}", node_id=src)
        if src not in plan.graph:
            raise SecAggProtocolError("MaskedInput from a node not in this round", node_id=src)
        _check_round_binding("MaskedInput", msg, setup, src)
        if msg.masked.dtype != np.uint32 or msg.masked.shape != (setup.vector_length,):
            raise SecAggProtocolError(
                f"masked vector has shape {msg.masked.shape} and dtype {msg.masked.dtype}, "
                f"expected ({setup.vector_length},) uint32",
                node_id=src,
            )
        holders = plan.holders(src)
        if sorted(msg.encrypted_shares) != list(holders):
            raise SecAggProtocolError(
                f"shares addressed to {sorted(msg.encrypted_shares)}, expected its holders "
                f"{list(holders)}",
                node_id=src,
            )
        expected = plan.sealed_len(src)
        for h, sealed in msg.encrypted_shares.items():
            if len(sealed) != expected:
                raise SecAggProtocolError(
                    f"share ciphertext for {h} has {len(sealed)} bytes, expected {expected}",
                    node_id=src,
                )
        return msg

    # Stage 2 ------------------------------------------------------------------------------

    def finish_round(self, responses: Mapping[int, UnmaskResponse | bytes]) -> AggregateResult:
        """Reconstruct the masks to remove, remove them, and return the sum."""
        for src, response in responses.items():
            self.add_unmask_response(src, response)
        return self.aggregate()

    def add_unmask_response(self, src: int, response: UnmaskResponse | bytes) -> bool:
        """Take one unmask response; False if refused (reason in :attr:`rejected`) or if
        the sender has answered already (a second answer is ignored).

        A seed is rebuilt as soon as t shares of it are in (the first t, as
        :func:`shamir.combine` takes them); :meth:`aggregate` removes the masks.
        """
        plan = self._require("unmasking")
        if src in self._responders:
            return False
        try:
            msg = self._check_unmask_response(
                plan, src, response, set(self._survivors), self._pair_shares
            )
        except SecAggProtocolError as exc:
            self.rejected[src] = exc.reason
            return False
        t, point = plan.threshold, plan.share_point[src]
        complete: list[tuple[str, int, int | None, dict[int, bytes]]] = []
        for owner, share in msg.self_mask_shares.items():
            shares = self._self_mask_shares[owner]
            shares[point] = share
            if len(shares) == t:
                complete.append(("self-mask seed", owner, None, shares))
        for (owner, gone), share in msg.pairwise_shares.items():
            shares = self._pair_shares[(owner, gone)]
            shares[point] = share
            if len(shares) == t:
                complete.append((f"seed shared with dropped {gone}", owner, gone, shares))
        self._responders.add(src)
        if self._unmask_failure is None:
            try:
                for _, owner, gone, shares in complete:
                    seed = shamir.combine(shares, threshold=t)
                    if gone is None:
                        mask = (plan.self_mask_key(seed, owner), -1)
                    else:
                        # owner's input carries sign * mask that the absent peer never cancelled.
                        mask = (seed, -pairwise_sign(owner, gone))
                    with self._sum_lock:
                        self._to_remove.append(mask)
            except SecAggProtocolError as exc:
                self._unmask_failure = str(exc)  # the round is lost; aggregate() says why
        return True

    def aggregate(self) -> AggregateResult:
        """The sum, once every survivor's self mask and every mask it shared with a dropped
        client is out; :class:`SecAggAbort` if some seed has fewer than t shares."""
        plan = self._require("unmasking")
        self.sum_masked_inputs()
        with self._total_lock:
            total, self._total = self._total, None
        assert total is not None  # unmask_requests needs at least t inputs
        self._stage = "idle"  # success or abort, this round is over
        if self._unmask_failure is not None:
            raise SecAggAbort(f"round {plan.setup.round_num}: {self._unmask_failure}")
        for owner, shares in self._self_mask_shares.items():
            self._check_share_count(owner, "self-mask seed", shares, plan)
        for (owner, gone), shares in self._pair_shares.items():
            self._check_share_count(owner, f"seed shared with dropped {gone}", shares, plan)
        # The masks not removed yet in one pass over the sum, on every core (the clients
        # are done).
        with self._sum_lock:
            to_remove, self._to_remove = self._to_remove, []
        add_masks(total, to_remove, workers=_MASK_WORKERS)
        survivors = self._survivors
        return AggregateResult(
            round_num=plan.setup.round_num,
            total=total,
            contributors=survivors,
            dropped=tuple(sorted(set(plan.graph) - set(survivors))),
            unmask_responders=tuple(sorted(self._responders)),
            rejected=dict(self.rejected),
        )

    def _check_unmask_response(
        self,
        plan: RoundPlan,
        src: int,
        response: UnmaskResponse | bytes,
        survivors: set[int],
        needed_pairs: Mapping[tuple[int, int], object],
    ) -> UnmaskResponse:
        setup = plan.setup
        msg = (
            response
            if isinstance(response, UnmaskResponse)
            else UnmaskResponse.from_bytes(response)
        )
        if msg.node_id != src:
            raise SecAggProtocolError(f"UnmaskResponse names node {msg.node_id}", node_id=src)
        if src not in survivors:
            raise SecAggProtocolError(
                "UnmaskResponse from a node that is not a survivor", node_id=src
            )
        if src not in self._asked:
            raise SecAggProtocolError("UnmaskResponse from a node not asked", node_id=src)
        _check_round_binding("UnmaskResponse", msg, setup, src)
        for owner in msg.self_mask_shares:
            if owner not in survivors or src not in plan.holders(owner):
                raise SecAggProtocolError(f"unexpected self-mask share of {owner}", node_id=src)
        for owner, gone in msg.pairwise_shares:
            if (owner, gone) not in needed_pairs or src not in plan.holders(owner):
                raise SecAggProtocolError(
                    f"unexpected pairwise share for ({owner}, {gone})", node_id=src
                )
        return msg

    # Helpers ------------------------------------------------------------------------------

    def _require(self, stage: str) -> RoundPlan:
        if self._stage != stage or self._plan is None:
            raise RuntimeError(f"secagg server is at stage {self._stage!r}, not {stage!r}")
        return self._plan

    def _check_enough(self, plan: RoundPlan, survivors: tuple[int, ...], what: str) -> None:
        t = plan.threshold
        if len(survivors) < t:
            self._stage = "idle"
            raise SecAggAbort(
                f"round {plan.setup.round_num}: {len(survivors)} valid {what}, fewer than the "
                f"threshold t={t} (of {len(plan.graph)} participants)"
            )
        if not is_connected(survivors, plan.graph):
            self._stage = "idle"
            raise SecAggAbort(
                f"round {plan.setup.round_num}: the {len(survivors)} survivors' neighbour graph "
                "is split; unmasking would reveal partial sums"
            )

    @staticmethod
    def _check_share_count(
        owner: int, what: str, shares: Mapping[int, bytes], plan: RoundPlan
    ) -> None:
        if len(shares) < plan.threshold:
            raise SecAggAbort(
                f"round {plan.setup.round_num}: {len(shares)} of the {len(plan.holders(owner))} "
                f"holders returned shares of client {owner}'s {what}, threshold "
                f"t={plan.threshold}"
            )


def _unmask_cover(t: int, survivors: Sequence[int], holders: Mapping[int, list[int]],
                  helps: Mapping[int, list[int]]) -> set[int]:
    """Survivors to ask for shares: at least t holders of every survivor's secrets.
    ``holders[j]``: j's surviving share holders; ``helps[h]``: whose shares h holds.

    Greedy, survivor by survivor in id order: while one is short of t chosen holders, add
    the holder of its that would help the most survivors still short (ties: lower id).
    O(n k^2). A survivor with fewer than t surviving holders gets all of them (the round
    then fails when it aggregates, as it would with every survivor asked).
    """
    need = dict.fromkeys(survivors, t)
    chosen: set[int] = set()
    for j in survivors:
        while need[j] > 0:
            candidates = [h for h in holders[j] if h not in chosen]
            if not candidates:
                break
            best = max(candidates, key=lambda h: (sum(need[o] > 0 for o in helps[h]), -h))
            chosen.add(best)
            for o in helps[best]:
                need[o] -= 1
    return chosen


def _check_round_binding(kind: str, msg, setup: RoundSetup, src: int) -> None:
    """A message must be bound to this run, round and round seed (no replays, no mix-ups)."""
    if (msg.run_id, msg.round_num, msg.round_seed) != (
        setup.run_id,
        setup.round_num,
        setup.round_seed,
    ):
        raise SecAggProtocolError(
            f"{kind} for run {msg.run_id} round {msg.round_num} (or another round seed), "
            f"expected run {setup.run_id} round {setup.round_num}",
            node_id=src,
        )

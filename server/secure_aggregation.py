"""The server's side of secure aggregation on Flower's Message API.

Flower's own SecAgg+ runs only on the legacy strategy path and derives masks from a
32-bit seed (ANCHORS.md, flwr#7522), so the protocol is ours (`privacy/secagg/`) and this
module drives it over the Grid: keys once per run, then per round the train exchange
(which carries the round setup out and the masked updates back) and one unmask exchange
(two when some of the clients asked first do not answer).
The result is the weighted sum of the surviving clients' updates, which the workflow
turns into one aggregate for the strategy, so any rule that needs only the weighted sum
(FedAvg and the server optimizers) works unchanged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from consortia.config import RunConfig
from consortia.messages import (
    CONFIG,
    MASKED,
    REPORT,
    SECAGG,
    SECAGG_ADVERTISE,
    SECAGG_UNMASK,
    SecAggInstructions,
    TrainInstructions,
    TrainReport,
    decode_array,
    secagg_run_id,
    update_vector_order,
)
from consortia.privacy.dp import noise_for_budget
from consortia.privacy.dp.distributed import from_ring
from consortia.privacy.secagg import (
    MaskedInput,
    SecAggAbort,
    SecAggError,
    ServerSecAggSession,
    decode_sum,
    default_threshold,
    max_bits,
    num_neighbours,
    quantization_error_bound,
    share_holders,
)
from consortia.server.aggregates import UpdateSum
from consortia.server.directory import exchange, exchange_as_replied, expired_reason
from consortia.server.validation import ReplyOutcome, client_error_reason, report_outcome

log = logging.getLogger("consortia.server")


class _Background:
    """One worker thread for the server's work on the sum while replies are still out,
    done in the order given; :meth:`wait` returns once it is all done, and raises what
    went wrong in it."""

    def __enter__(self) -> _Background:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="consortia-secagg-sum")
        self._pending: list[Future] = []
        return self

    def run(self, work: Callable[[], None]) -> None:
        self._pending.append(self._pool.submit(work))

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        for done in pending:
            done.result()

    def __exit__(self, kind, error, traceback) -> None:
        self._pool.shutdown(wait=True)
        if kind is None:
            self.wait()


@dataclass
class SecureRoundResult:
    outcomes: list[ReplyOutcome]
    summed: UpdateSum | None  # None when the round was abandoned
    metrics: dict = field(default_factory=dict)


def noise_std_ratio(reports: list, threshold: int, floor: float) -> float:
    """Distributed DP: the sum's noise std over the target σ_floor·Δ₂: √(Σ σᵢ² / t) / σ_floor
    with each contributor's σᵢ as reported (a client above the floor topped its share up;
    one that reports none counts at the floor). √(m/t) when all sit at the floor."""
    sigmas = [r.noise_multiplier if r is not None and r.noise_multiplier else floor
              for r in reports]
    return (sum(max(s, floor) ** 2 for s in sigmas) / threshold) ** 0.5 / floor


# The chance that a user-level DP client's noisy vector passes encode_clip's bound.
NOISE_TAIL = 1e-12


def encode_clip(clip: float, ins: TrainInstructions, length: int) -> float:
    """The L2 clip of a round's encoding (quantize.encode): `clip` (secagg.clip), raised
    under user-level DP with the noise split among the clients so that it does not bind.

    Each such client sends its update clipped to user_clip, its clipping indicator
    (|b − 1/2| = 1/2) and Gaussian shares (std user_noise_std on each of the length − 1
    update values, user_count_noise_std on the indicator). An encoding clip below that
    vector's norm would scale it, noise share, update and indicator alike, by a factor that
    depends on the data: the sum would not be the Gaussian mechanism accounted (z·C noise
    for sensitivity C) and the adaptive clip would read a scaled fraction. The noise's
    norm is max(std)-Lipschitz, so it passes its root mean square by more than
    max(std)·√(2 ln(1/NOISE_TAIL)) with probability at most NOISE_TAIL."""
    if ins.user_clip is None or (ins.user_noise_std == 0 and ins.user_count_noise_std == 0):
        return clip
    std, count_std = ins.user_noise_std, ins.user_count_noise_std
    noise = (math.sqrt(std * std * (length - 1) + count_std * count_std)
             + max(std, count_std) * math.sqrt(2 * math.log(1 / NOISE_TAIL)))
    return max(clip, ins.user_clip + 0.5 + noise)


def protocol_parameters(cfg: RunConfig, participants: int) -> tuple[int, int, int]:
    """(k neighbours, t threshold, bits) for a round with `participants` clients."""
    sa = cfg.secagg
    k = num_neighbours(participants, sa.neighbours)
    holders = share_holders(participants, k)  # k + 1, or k for an odd k on an odd ring
    if sa.threshold is None:
        t = default_threshold(k)
    elif sa.threshold < 1:
        t = max(2, int(np.ceil(sa.threshold * holders)))
    else:
        t = int(sa.threshold)
    bits = sa.bits if sa.bits is not None else max_bits(participants)
    return k, min(t, holders), bits


class SecureAggregator:
    def __init__(self, cfg: RunConfig, run_id: str, timeout: float, dp_scale: float | None = None):
        self.cfg = cfg
        self.dp_scale = dp_scale  # distributed DP: clients send noisy integer gradient sums
        self.run_id = run_id
        self.timeout = timeout
        self.session = ServerSecAggSession(run_id=secagg_run_id(run_id))
        self.examples: dict[int, int] = {}  # node -> dataset size it advertised
        # node -> (why, its last report, status): clients that said they cannot train
        # another round (TrainReport.can_train_again: their ledger, or their policy's
        # max_rounds). They are left out of a round's
        # masking graph: asked, they would refuse, count as dropouts, and could abort the
        # round for the others, who would have spent ε on an update thrown away.
        self.cannot_pay: dict[int, tuple[str, TrainReport | None, str]] = {}

    def noise_floor(self) -> float | None:
        """Distributed DP: σ_floor, the least noise multiplier every client of a round adds
        (one value for all of them; a client whose own budget needs more adds more, and
        counts on the others for the floor only: NoiseShare). The configured σ, or the σ
        that fits privacy.epsilon_budget over the planned rounds at the highest sampling
        rate among the registered clients (batch / the fewest records advertised)."""
        if self.dp_scale is None:
            return None
        p = self.cfg.privacy
        if p.noise_multiplier is not None:
            return p.noise_multiplier
        rate = min(1.0, self.cfg.batch_size / min(self.examples.values()))
        return noise_for_budget(p.epsilon_budget, p.delta, rate,
                                self.cfg.planned_rounds_per_client, p.accountant)

    # -- stage 0: keys, once per node and run --------------------------------------------
    def register(self, grid: Grid, node_ids: list[int], train_config: ConfigRecord | None = None
                 ) -> dict[int, str]:
        """Ask nodes without keys to advertise theirs; returns node -> why it failed.
        `train_config`, the round's train instructions, goes with the request: a DP client
        answers whether its ledger can pay for such a round (a run resumed, clients who
        spent for the rounds it replays)."""
        new = [n for n in node_ids if n not in self.session.registered]
        if not new:
            return {}
        content = RecordDict({CONFIG: train_config or ConfigRecord({"run_id": self.run_id})})
        requests = [Message(content=content, dst_node_id=n, message_type=SECAGG_ADVERTISE)
                    for n in new]
        adverts, sizes, failed = {}, {}, {}
        for reply in exchange(grid, requests, self.timeout):
            src = reply.metadata.src_node_id
            if reply.has_error():
                failed[src] = f"key advertisement failed: {client_error_reason(reply.error.reason)}"
                continue
            try:
                record = reply.content[SECAGG]
                # The refusal a train request would get states the ledger's ε (a resumed
                # run's replayed rounds are in it): the round records it for this client.
                refusal = TrainReport.from_content(reply.content) \
                    if REPORT in reply.content else None
                adverts[src], sizes[src] = bytes(record["advertise"]), int(record["num_examples"])
                if record.get("can_train") is False:
                    self.cannot_pay[src] = self._cannot("its key advertisement", refusal)
            except (KeyError, TypeError, ValueError) as err:
                failed[src] = f"malformed key advertisement: {err!r}"
        accepted = self.session.collect_advertisements(adverts)
        failed.update({n: f"key advertisement refused: {why}"
                       for n, why in self.session.rejected.items()})
        for n in accepted:
            self.examples[n] = max(1, sizes[n])
        for n in new:
            if n not in accepted and n not in failed:
                failed[n] = "no key advertisement before the timeout"
        for n, why in failed.items():
            log.warning("secure aggregation: node %s: %s", n, why)
        return failed

    # -- one secure round --------------------------------------------------------------
    def run_round(self, grid: Grid, server_round: int, messages: list[Message],
                  arrays: ArrayRecord) -> SecureRoundResult:
        sampled = [m.metadata.dst_node_id for m in messages]
        failed = self.register(grid, sampled, messages[0].content.get(CONFIG) if messages else None)
        outcomes = [ReplyOutcome(n, "failed", why) for n, why in failed.items()]
        outcomes += [self._not_asked(n) for n in sampled if n in self.cannot_pay]
        messages = [m for m in messages if m.metadata.dst_node_id in self.session.registered
                    and m.metadata.dst_node_id not in self.cannot_pay]
        participants = [m.metadata.dst_node_id for m in messages]
        not_asked = {"secagg_not_asked": sum(n in self.cannot_pay for n in sampled)}
        if len(participants) < 3:
            why = f"{len(participants)} clients with keys that can pay for the round; 3 needed"
            outcomes += [ReplyOutcome(n, "failed", f"not asked: round abandoned: {why}")
                         for n in participants]
            return self._abandon(outcomes, why, secagg_participants=len(participants),
                                 **not_asked)

        names = update_vector_order(arrays.keys())
        unweighted = self.cfg.user_dp.enabled  # DP-FedAvg: unweighted sum + clip indicator
        shapes = {name: tuple(arrays[name].shape) for name in names}  # no need to read the values
        length = sum(math.prod(shape) for shape in shapes.values()) + int(unweighted)
        k, t, bits = protocol_parameters(self.cfg, len(participants))
        setup = self.session.begin_round(server_round, participants, vector_length=length,
                                         num_neighbours=k, threshold=t)
        scale = max(self.examples[n] for n in participants)
        floor = self.noise_floor()  # a σ search: once a round
        clip = self.cfg.secagg.clip
        if unweighted and messages:  # user-level DP: a noise share may ride in the vector
            clip = encode_clip(clip, TrainInstructions.from_content(messages[0].content)[1],
                               length)
        instructions = SecAggInstructions(setup=setup.to_bytes(), clip=clip,
                                          bits=bits, weight_scale=scale, unweighted=unweighted,
                                          dp_scale=self.dp_scale,
                                          dp_noise_floor=floor).to_config_record()
        for m in messages:  # strategies share one RecordDict among messages: copy per node
            content = RecordDict(dict(m.content.items()))
            content[SECAGG] = instructions
            m.content = content
        # The server's work on the sum runs in this thread while replies are still out: the
        # masked vectors go into the sum as they come in, and each mask comes out as soon
        # as its seed is rebuilt (numpy and OpenSSL work without the GIL).
        with _Background() as background:
            masked, by_node = set(), {}
            for replies in exchange_as_replied(grid, messages, self.timeout):
                for reply in replies:
                    outcome, masked_input = self._inspect(reply)
                    by_node[outcome.node_id] = outcome
                    # Only an input the session accepts is in the sum: one it refuses
                    # (wrong length, round, holders...) is a dropout like a missing one.
                    if masked_input is not None and \
                            self.session.add_masked_input(outcome.node_id, masked_input):
                        masked.add(outcome.node_id)
                background.run(self.session.sum_masked_inputs)
            for n in participants:
                by_node.setdefault(n, ReplyOutcome(n, "failed", expired_reason(self.timeout)))

            asked = 0  # clients sent an unmask request, both waves: an abandoned round's too
            try:
                requests = self.session.unmask_requests(cover=self.cfg.secagg.unmask == "cover")
                self._mark_rejected(by_node)
                asked = len(requests)
                answered = self._unmask(grid, requests, background)
                more = self.session.more_unmask_requests()  # some of the cover did not answer
                if more:
                    log.info("round %d: %d of %d asked to unmask answered; asking %d more",
                             server_round, len(answered), len(requests), len(more))
                    asked += len(more)
                    self._unmask(grid, more, background)
                background.wait()
                result = self.session.aggregate()
            except SecAggAbort as abort:
                self._mark_rejected(by_node)
                # Their updates were masked and sent (and, under local DP, their spend recorded),
                # but none reaches the model: the round is abandoned for everyone.
                for n, outcome in by_node.items():
                    if outcome.status == "trained":
                        by_node[n] = self._not_summed(outcome, f"round abandoned: {abort}")
                self._note_budgets(server_round, by_node)
                return self._abandon(outcomes + list(by_node.values()), str(abort),
                                     secagg_dropped=len(participants) - len(masked),
                                     secagg_participants=len(participants),
                                     secagg_unmask_asked=asked,
                                     secagg_neighbours=k, secagg_threshold=t,
                                     **self._bits_metric(bits), **not_asked)
        self._note_budgets(server_round, by_node)

        contributors = set(result.contributors)
        for n, outcome in by_node.items():
            if outcome.status == "trained" and n not in contributors:
                by_node[n] = self._not_summed(outcome, "not in the secure sum")
        weights = {n: 1.0 if unweighted or self.dp_scale else self.examples[n] / scale
                   for n in contributors}
        if self.dp_scale is not None:  # distributed DP: the noisy integer sum, centered
            total = from_ring(result.total).astype(np.float64)
        else:
            total = decode_sum(result.total, clip=clip, bits=bits,
                               num_summed=len(contributors))
        summed, offset = {}, 0
        for name in names:
            shape = shapes[name]
            size = math.prod(shape)
            summed[name] = total[offset:offset + size].reshape(shape)
            offset += size
        bound = quantization_error_bound(clip=clip, bits=bits,
                                         num_summed=len(contributors))
        metrics = {"secagg_status": "ok", "secagg_dropped": len(result.dropped),
                   "secagg_participants": len(participants), "secagg_unmask_asked": asked,
                   **not_asked,
                   "secagg_neighbours": k,
                   "secagg_threshold": t, **self._bits_metric(bits),
                   "secagg_error_bound": 0.0 if self.dp_scale else bound / sum(weights.values())}
        if self.dp_scale is not None:
            metrics["dp_noise_std_ratio"] = noise_std_ratio(
                [by_node[n].report for n in contributors], t, floor)
        log.info("round %d: secure sum of %d clients (%d dropped)", server_round,
                 len(contributors), len(result.dropped))
        update_sum = UpdateSum(
            total=summed, weight=sum(weights.values()), contributors=len(contributors),
            num_examples=sum(self.examples[n] for n in contributors),
            indicator=float(total[offset]) if unweighted else 0.0,
            expected_batch=sum(by_node[n].report.sample_rate * by_node[n].report.num_examples
                               for n in contributors) if self.dp_scale else 0.0)
        return SecureRoundResult(outcomes + list(by_node.values()), update_sum, metrics)

    def _unmask(self, grid: Grid, requests: dict, background: _Background) -> set[int]:
        """One unmask exchange; the nodes whose response the session took in. The masks
        whose seeds are rebuilt come out of the sum in the background as responses come."""
        unmask = [Message(RecordDict({SECAGG: ConfigRecord({"unmask_request": r.to_bytes()})}),
                          dst_node_id=n, message_type=SECAGG_UNMASK)
                  for n, r in requests.items()]
        answered = set()
        for replies in exchange_as_replied(grid, unmask, self.timeout):
            for reply in replies:
                src = reply.metadata.src_node_id
                if reply.has_error():
                    # One line, as a failed train reply's (Ray hands over its whole chained
                    # traceback; the client's refusal, e.g. forged shares, is one line of it).
                    reason = reply.error.reason
                    log.warning("secure aggregation: node %s failed to unmask: %s",
                                src, client_error_reason(reason))
                    log.debug("node %s's whole error: %s", src, reason)
                    continue
                try:
                    response = bytes(reply.content[SECAGG]["unmask"])
                except (KeyError, TypeError) as err:
                    log.warning("secure aggregation: node %s sent no unmask response: %r",
                                src, err)
                    continue
                if self.session.add_unmask_response(src, response):
                    answered.add(src)
                elif src in self.session.rejected:  # malformed, replayed or forged
                    log.warning("secure aggregation: refused node %s's unmask response: %s",
                                src, self.session.rejected[src])
            background.run(self.session.remove_rebuilt_masks)
        return answered

    def _note_budgets(self, server_round: int, by_node: dict[int, ReplyOutcome]) -> None:
        """Which clients said, in this round's replies, that they cannot train another
        round. They are not asked again by this process (a restart asks anew, through the
        key advertisement), so no reply takes one off the list."""
        for n, outcome in by_node.items():
            if outcome.report is not None and outcome.report.can_train_again is False:
                self.cannot_pay[n] = self._cannot(f"its round {server_round} reply",
                                                  outcome.report)

    @staticmethod
    def _cannot(said_in: str, report: TrainReport | None) -> tuple[str, TrainReport | None, str]:
        """(why, report, status) for a client that said it cannot train another round: its
        ledger cannot pay, or, when its report gives a reason (a refusal's, or a trained
        report's naming its policy's max_rounds), that reason and the status it implies."""
        if report is None or not report.reason:
            return (f"{said_in} said its privacy ledger cannot pay for another round", report,
                    "refused-budget")
        status = report.status if report.status != "trained" else "refused-policy"
        return f"{said_in} said it cannot train another round: {report.reason}", report, status

    def _not_asked(self, node: int) -> ReplyOutcome:
        """A sampled client left out of the round: recorded as the refusal it would have
        sent, with the ε its last report (or its advertised refusal) stated."""
        why, report, status = self.cannot_pay[node]
        reason = f"not asked: {why}"
        if report is not None:
            report = report.model_copy(update={"status": status, "reason": reason,
                                               "train_loss": None})
        return ReplyOutcome(node, status, reason, report)

    @staticmethod
    def _not_summed(outcome: ReplyOutcome, reason: str) -> ReplyOutcome:
        """A trained client whose share reached no revealed sum: its report stays as sent
        (under DP it spent before sending, whatever became of the share)."""
        return ReplyOutcome(outcome.node_id, "failed", reason, outcome.report)

    def _inspect(self, reply: Message) -> tuple[ReplyOutcome, MaskedInput | None]:
        outcome = report_outcome(reply)
        if outcome.status != "trained":
            return outcome, None
        node, report = outcome.node_id, outcome.report
        try:
            vector = decode_array(reply.content.array_records[MASKED]["vector"], copy=False)
            header = bytes(reply.content.config_records[SECAGG]["masked_input"])
            masked = MaskedInput.from_bytes(header, vector=vector)
        except (KeyError, TypeError, ValueError, SecAggError) as err:
            reason = f"malformed masked input: {getattr(err, 'reason', None) or err!r}"
            log.warning("secure aggregation: rejected node %s: %s", node, reason)
            return ReplyOutcome(node, "rejected", reason, report), None
        return ReplyOutcome(node, "trained", "", report), masked

    def _mark_rejected(self, by_node: dict[int, ReplyOutcome]) -> None:
        for n, why in self.session.rejected.items():
            if n in by_node and by_node[n].status == "trained":
                log.warning("secure aggregation: rejected node %s: %s", n, why)
                by_node[n] = ReplyOutcome(n, "rejected", why, by_node[n].report)

    def _bits_metric(self, bits: int) -> dict[str, int]:
        """secagg_bits for the round's row; none under distributed DP, whose clients put
        their noisy sums on the ring at the scale γ and never quantize with `bits`."""
        return {} if self.dp_scale is not None else {"secagg_bits": bits}

    @staticmethod
    def _abandon(outcomes: list[ReplyOutcome], reason: str, **metrics: int) -> SecureRoundResult:
        """`metrics`: the round's counts (secagg_dropped and secagg_unmask_asked, 0 unless
        given; secagg_not_asked; secagg_participants) and, once the round was set up, its k,
        t and bits, as a completed round's row has them (the console's table and the report
        read them)."""
        log.warning("secure aggregation round abandoned: %s; the global model stays as it was",
                    reason)
        return SecureRoundResult(outcomes, None, {
            "secagg_status": "aborted", "secagg_reason": reason, "secagg_dropped": 0,
            "secagg_unmask_asked": 0, **metrics})

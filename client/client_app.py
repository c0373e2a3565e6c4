"""The consortia ClientApp (Flower Message API): check the request, train, report.

The work is in named collaborators: the Site (policy, data, state), the LocalTrainer,
the PrivacyLedger, and SecAggClient when the server runs secure aggregation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from consortia.client.distributed import DistributedStep
from consortia.client.policy import asked
from consortia.client.secure_aggregation import SecAggClient
from consortia.client.site import Site
from consortia.client.trainer import LocalTrainer, round_seed
from consortia.messages import (
    ARRAYS,
    CONFIG,
    SECAGG,
    MessageSchemaError,
    SecAggInstructions,
    TrainInstructions,
    TrainReport,
    arrays_to_torch,
    torch_to_arrays,
    update_vector_order,
)
from consortia.privacy.dp import LedgerMismatchError, PrivacyLedger
from consortia.privacy.dp.user_level import add_noise_share, clip_indicator, clip_update
from consortia.privacy.secagg import RoundSetup
from consortia.tasks import Task, WeightsMismatch


def protect_update(ins: TrainInstructions, global_weights: dict, weights: dict, seed: int
                   ) -> tuple[dict, bool, float]:
    """User-level DP on the client: clip the whole update, add this client's noise share.

    Returns the new weights, whether the update was within the clip, and the clipping
    indicator with its share of the count noise (for adaptive clipping).
    """
    generator = torch.Generator().manual_seed(seed)
    delta = {k: (v.double() - global_weights[k].double()) for k, v in weights.items()}
    clipped, within = clip_update(delta, ins.user_clip)
    noised = add_noise_share(clipped, ins.user_noise_std, generator)
    indicator = clip_indicator(within) + ins.user_count_noise_std * float(
        torch.randn(1, generator=generator))
    new = {k: (global_weights[k].double() + d).to(weights[k].dtype) for k, d in noised.items()}
    return new, within, indicator


def planned_sigma(trainer: LocalTrainer, ins: TrainInstructions,
                  secagg: SecAggInstructions | None = None) -> float | None:
    """The σ this request would train with: the server's, or the one the client derives
    (local DP-SGD). Under distributed DP, the σ of the thinnest sum that may hold this
    client's share (its share and t − 1 at the round's floor, NoiseShare), the noise that
    actually protects it: at least the floor, and what its own budget asks if more."""
    if not ins.dp_enabled or trainer.ledger is None or ins.local_epochs == 0:
        return None
    if ins.privacy_mode != "distributed":
        return trainer.noise_multiplier(ins)
    if secagg is None or secagg.dp_noise_floor is None:
        return None  # refused further on, with its reason
    step = DistributedStep(trainer.client_id, trainer.task, trainer.dataset, trainer.ledger,
                           trainer.device)
    return step.sum_sigma(ins, secagg.dp_noise_floor, RoundSetup.from_bytes(secagg.setup).threshold)


def audit(site: Site, ins: TrainInstructions, server_round: int,
          secagg: SecAggInstructions | None, report: TrainReport | None = None, *,
          failure: Exception | None = None) -> None:
    """A line in the site's audit log (deployed sites keep one) for this request: what
    the report says, or that answering it failed (`failure`)."""
    if site.audit is None:
        return
    if failure is not None:
        said = {"decision": "failed", "reason": f"{type(failure).__name__}: {failure}"}
    else:
        said = {"decision": report.status, "reason": report.reason, "epsilon": report.epsilon,
                "noise_multiplier": report.noise_multiplier}
    site.audit.record(run=ins.run_id, server_round=server_round,
                      asked=asked(ins, server_round, secagg is not None), **said)


def max_rounds_reached(site: Site, run_id: str, pending: int = 0) -> str | None:
    """Why this site's policy refuses any further round of the run (max_rounds, counting
    `pending` rounds trained but not yet in the audit log), or None."""
    if site.policy is None or site.audit is None:
        return None
    return site.policy.max_rounds_refusal(run_id, site.audit.rounds_trained(run_id) + pending)


def said_if_last(site: Site, ins: TrainInstructions, report: TrainReport) -> TrainReport:
    """A trained report says it cannot train again when this round is the last its policy
    allows: a secure round then leaves it out rather than have it refuse there (a dropout
    that may abort the round for the others, who paid ε)."""
    if report.status != "trained" or (why := max_rounds_reached(site, ins.run_id, 1)) is None:
        return report
    return report.model_copy(update={"can_train_again": False, "reason": f"next round: {why}"})


def distributed_round(site: Site, context: Context, msg: Message, model: torch.nn.Module,
                      ins: TrainInstructions, secagg: SecAggInstructions | None,
                      server_round: int, ledger: PrivacyLedger | None) -> Message:
    """Distributed DP: one noisy integer gradient sum, only ever sent masked."""
    if secagg is None or secagg.dp_scale is None:
        report = TrainReport(client_id=site.client_id, status="refused-policy",
                             reason="distributed DP asked without secure aggregation: this "
                                    "client's noise share alone would not protect its records")
        return Message(report.to_content(), reply_to=msg)
    if ledger is None:
        report = TrainReport(client_id=site.client_id, status="refused-policy",
                             reason="distributed DP asked but this site has no privacy terms")
        return Message(report.to_content(), reply_to=msg)
    if secagg.dp_noise_floor is None:
        report = TrainReport(client_id=site.client_id, status="refused-policy",
                             reason="distributed DP asked without the round's noise floor: "
                                    "this client cannot count on the others' noise")
        return Message(report.to_content(), reply_to=msg)
    setup = RoundSetup.from_bytes(secagg.setup)
    step = DistributedStep(site.client_id, site.task, site.dataset, ledger, site.device,
                           site.privacy.max_epsilon_if_secagg_fails, site.seeded_noise)
    report, vector = step.run(model, ins, server_round,
                              names=update_vector_order(msg.content[ARRAYS].keys()),
                              scale=secagg.dp_scale, threshold=setup.threshold,
                              floor=secagg.dp_noise_floor)
    if vector is None:
        return Message(report.to_content(), reply_to=msg)
    report = said_if_last(site, ins, report)
    client = SecAggClient(context, site.secagg_state)
    return Message(client.content(report, *client.mask_vector(secagg, vector)), reply_to=msg)


def base_weights_refusal(task: Task, model: torch.nn.Module, expected: str | None) -> str | None:
    """Why this site will not train adapters for the run's base weights, or None.

    Adapters trained against other pretrained weights would be meaningless (or an attack)
    on the run's base, so a site whose base weights hash differently refuses.
    """
    own = task.base_sha256(model)
    if own == expected:
        return None
    if expected is None:
        return (f"the run names no base weights, but task {task.name!r} fine-tunes pretrained "
                f"weights (this site's sha256 {own})")
    if own is None:
        return f"the run names base weights {expected}, but task {task.name!r} has none"
    return (f"base weights differ: the run's sha256 is {expected}, this site's is {own}; "
            "install the same model package version as the server")


def can_afford_a_round(site: Site, ins: TrainInstructions
                       ) -> tuple[bool | None, TrainReport | None]:
    """Whether this site can train a round of the run the server describes (`ins`, sent
    with the key advertisement): its policy's max_rounds not reached (a resumed run) and
    its ledger able to pay; None when the ledger's answer is not known here: no DP, or
    distributed DP (its charge depends on each round's floor and threshold; its train
    replies say it instead). When it cannot, also the refusal a train request would get:
    the server records the ledger's ε from it (a resumed run's replayed rounds are
    already in the ledger)."""
    if (reason := max_rounds_reached(site, ins.run_id)) is not None:  # a resumed run
        return False, TrainReport(client_id=site.client_id, status="refused-policy",
                                  reason=reason)
    if not ins.dp_enabled or ins.local_epochs == 0 or ins.privacy_mode != "local":
        return None, None
    with site.ledger_held(True):
        try:
            ledger = site.open_ledger()
        except LedgerMismatchError:
            return None, None  # the train request refuses, with the reason
        if ledger is None:
            return None, None
        trainer = LocalTrainer(site.client_id, site.task, site.dataset, ledger, site.device)
        refusal = trainer.budget_refusal(ins)
        return refusal is None, refusal


def build_client_app(load_site: Callable[[Context], Site], mods: list | None = None) -> ClientApp:
    """The ClientApp for sites built by `load_site`; `mods` are Flower client mods."""
    app = ClientApp(mods=mods or [])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        site = load_site(context)
        server_round, ins = TrainInstructions.from_content(msg.content)
        secagg = SecAggInstructions.from_content(msg.content)
        try:
            with site.ledger_held(ins.dp_enabled):
                return answer(site, context, msg, server_round, ins, secagg)
        except Exception as err:
            # The server sees Flower's error reply; the site's own records say so too.
            audit(site, ins, server_round, secagg, failure=err)
            raise

    def answer(site: Site, context: Context, msg: Message, server_round: int,
               ins: TrainInstructions, secagg: SecAggInstructions | None) -> Message:
        """The train request's answer: refused, or trained (in the clear or masked)."""
        try:
            ledger = site.open_ledger() if ins.dp_enabled else None
        except LedgerMismatchError as err:  # damaged, or kept under other terms: no spend
            report = TrainReport(client_id=site.client_id, status="refused-policy",
                                 reason=f"this site's privacy ledger: {err}")
            audit(site, ins, server_round, secagg, report)
            return Message(report.to_content(), reply_to=msg)
        trainer = LocalTrainer(site.client_id, site.task, site.dataset, ledger, site.device,
                               seeded=site.seeded_noise)
        refusal = None
        if site.policy is not None:  # a deployed site's own policy (client/policy.py)
            refusal = site.policy.refusal(
                ins, secagg=secagg is not None,
                noise_multiplier=planned_sigma(trainer, ins, secagg),
                rounds_trained=site.audit.rounds_trained(ins.run_id) if site.audit else 0)
        refusal = refusal or site.policy_refusal(ins.task, ins.dp_enabled)
        if refusal is None and ins.dp_enabled and ins.local_epochs == 0:
            refusal = "DP with local_epochs = 0 is not a training round this site will account"
        if refusal is not None:
            report = TrainReport(client_id=site.client_id, status="refused-policy", reason=refusal)
            audit(site, ins, server_round, secagg, report)
            return Message(report.to_content(), reply_to=msg)

        model = site.model(ins.model_activation)
        refusal = base_weights_refusal(site.task, model, ins.base_sha256)
        global_weights = None
        if refusal is None:
            try:
                global_weights = arrays_to_torch(msg.content[ARRAYS])
                site.task.load_travelling_weights(model, global_weights)
            except WeightsMismatch as err:
                refusal = f"the global model does not fit this site's model: {err}"
        if refusal is not None:
            report = TrainReport(client_id=site.client_id, status="refused-policy", reason=refusal)
            audit(site, ins, server_round, secagg, report)
            return Message(report.to_content(), reply_to=msg)
        if ins.privacy_mode == "distributed":
            reply = distributed_round(site, context, msg, model, ins, secagg, server_round,
                                      trainer.ledger)
            audit(site, ins, server_round, secagg, TrainReport.from_content(reply.content))
            return reply
        report, weights = trainer.train(model, ins, server_round)
        report = said_if_last(site, ins, report)
        audit(site, ins, server_round, secagg, report)
        if weights is None:
            return Message(report.to_content(), reply_to=msg)
        if site.tamper_update is not None:
            weights = site.tamper_update(global_weights, weights, server_round)
        indicator = None
        if ins.user_clip is not None:
            weights, within, indicator = protect_update(
                ins, global_weights, weights,
                round_seed(site.seeded_noise, ins.seed, server_round, site.client_id, "user-dp"))
            report = report.model_copy(update={"within_clip": within})
        if secagg is None:
            return Message(report.to_content(torch_to_arrays(weights)), reply_to=msg)
        # Under secure aggregation only the masked update leaves this client (and the
        # clipping indicator rides inside it, not in the clear report).
        report = report.model_copy(update={"within_clip": None})
        client = SecAggClient(context, site.secagg_state)
        content = client.masked_content(report, secagg, msg.content[ARRAYS], weights, ins.seed,
                                        indicator)
        return Message(content, reply_to=msg)

    @app.query("identify")
    def identify(msg: Message, context: Context) -> Message:
        client_id = load_site(context).client_id
        return Message(RecordDict({"identity": ConfigRecord({"client_id": client_id})}),
                       reply_to=msg)

    @app.train("secagg_advertise")
    def advertise(msg: Message, context: Context) -> Message:
        run_id = str(msg.content[CONFIG]["run_id"])
        site = load_site(context)
        try:  # the run's train instructions, sent with the request
            _, ins = TrainInstructions.from_content(msg.content)
        except MessageSchemaError:  # none (a server of an older version): keys only
            ins = None
        can, refusal = (None, None) if ins is None else can_afford_a_round(site, ins)
        if can is not None and site.audit is not None:
            # What the site told the server of its ledger or policy goes in its own log,
            # as every train request's answer does.
            site.audit.record(run=ins.run_id, server_round=0, asked=asked(ins, 0, True),
                              decision="advertised", can_train=can,
                              reason=refusal.reason if refusal else "can train a round")
        content = SecAggClient(context, site.secagg_state).advertise(
            run_id, len(site.dataset), can, refusal)
        return Message(content, reply_to=msg)

    @app.train("secagg_unmask")
    def unmask(msg: Message, context: Context) -> Message:
        request = msg.content[SECAGG]["unmask_request"]
        site = load_site(context)
        return Message(SecAggClient(context, site.secagg_state).unmask(request), reply_to=msg)

    return app




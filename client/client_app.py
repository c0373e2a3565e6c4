"""The consortia ClientApp (Flower Message API): check the request, train, report.

The work is in named collaborators: the Site (policy, data, state), the LocalTrainer,
the PrivacyLedger, and SecAggClient when the server runs secure aggregation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from consortia.client.secure_aggregation import SecAggClient
from consortia.client.site import Site
from consortia.client.trainer import LocalTrainer, stable_seed
from consortia.messages import (
    ARRAYS,
    CONFIG,
    SECAGG,
    SecAggInstructions,
    TrainInstructions,
    TrainReport,
)
from consortia.privacy.dp.user_level import add_noise_share, clip_update
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
    indicator = float(within) + ins.user_count_noise_std * float(torch.randn(1, generator=generator))
    new = {k: (global_weights[k].double() + d).to(weights[k].dtype) for k, d in noised.items()}
    return new, within, indicator


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


def build_client_app(load_site: Callable[[Context], Site], mods: list | None = None) -> ClientApp:
    """The ClientApp for sites built by `load_site`; `mods` are Flower client mods."""
    app = ClientApp(mods=mods or [])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        site = load_site(context)
        server_round, ins = TrainInstructions.from_content(msg.content)
        secagg = SecAggInstructions.from_content(msg.content)
        refusal = site.policy_refusal(ins.task, ins.dp_enabled)
        if refusal is None and ins.dp_enabled and ins.local_epochs == 0:
            refusal = "DP with local_epochs = 0 is not a training round this site will account"
        if refusal is not None:
            report = TrainReport(client_id=site.client_id, status="refused-policy", reason=refusal)
            return Message(report.to_content(), reply_to=msg)

        model = site.task.build_model(ins.model_activation)
        refusal = base_weights_refusal(site.task, model, ins.base_sha256)
        if refusal is None:
            try:
                site.task.load_travelling_weights(model, msg.content[ARRAYS].to_torch_state_dict())
            except WeightsMismatch as err:
                refusal = f"the global model does not fit this site's model: {err}"
        if refusal is not None:
            report = TrainReport(client_id=site.client_id, status="refused-policy", reason=refusal)
            return Message(report.to_content(), reply_to=msg)
        trainer = LocalTrainer(site.client_id, site.task, site.dataset,
                               site.open_ledger() if ins.dp_enabled else None, site.device)
        report, weights = trainer.train(model, ins, server_round)
        if weights is None:
            return Message(report.to_content(), reply_to=msg)
        if site.tamper_update is not None or ins.user_clip is not None:
            global_weights = msg.content[ARRAYS].to_torch_state_dict()
        if site.tamper_update is not None:
            weights = site.tamper_update(global_weights, weights)
        indicator = None
        if ins.user_clip is not None:
            weights, within, indicator = protect_update(ins, global_weights, weights,
                                                        stable_seed(ins.seed, server_round,
                                                                    site.client_id, "user-dp"))
            report = report.model_copy(update={"within_clip": within})
        if secagg is None:
            return Message(report.to_content(ArrayRecord(weights)), reply_to=msg)
        # Under secure aggregation only the masked update leaves this client (and the
        # clipping indicator rides inside it, not in the clear report).
        report = report.model_copy(update={"within_clip": None})
        content = SecAggClient(context).masked_content(report, secagg, msg.content[ARRAYS],
                                                       weights, ins.seed, indicator)
        return Message(content, reply_to=msg)

    @app.query("identify")
    def identify(msg: Message, context: Context) -> Message:
        client_id = load_site(context).client_id
        return Message(RecordDict({"identity": ConfigRecord({"client_id": client_id})}),
                       reply_to=msg)

    @app.train("secagg_advertise")
    def advertise(msg: Message, context: Context) -> Message:
        run_id = str(msg.content[CONFIG]["run_id"])
        content = SecAggClient(context).advertise(run_id, len(load_site(context).dataset))
        return Message(content, reply_to=msg)

    @app.train("secagg_unmask")
    def unmask(msg: Message, context: Context) -> Message:
        request = msg.content[SECAGG]["unmask_request"]
        return Message(SecAggClient(context).unmask(request), reply_to=msg)

    return app




"""The consortia ClientApp (Flower Message API): check the request, train, report.

The work is in named collaborators: the Site (policy, data, state), the LocalTrainer,
the PrivacyLedger, and SecAggClient when the server runs secure aggregation.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from consortia.client.secure_aggregation import SecAggClient
from consortia.client.site import Site
from consortia.client.trainer import LocalTrainer
from consortia.messages import (
    ARRAYS,
    CONFIG,
    MASKED,
    SECAGG,
    SecAggInstructions,
    TrainInstructions,
    TrainReport,
)


def build_client_app(load_site: Callable[[Context], Site], mods: list | None = None) -> ClientApp:
    """The ClientApp for sites built by `load_site`; `mods` are Flower client mods."""
    app = ClientApp(mods=mods or [])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        site = load_site(context)
        server_round, ins = TrainInstructions.from_content(msg.content)
        secagg = SecAggInstructions.from_content(msg.content)
        refusal = site.policy_refusal(ins.task, ins.dp_enabled)
        if refusal is not None:
            report = TrainReport(client_id=site.client_id, status="refused-policy", reason=refusal)
            return Message(report.to_content(), reply_to=msg)

        model = site.task.build_model(ins.model_activation)
        model.load_state_dict(msg.content[ARRAYS].to_torch_state_dict())
        trainer = LocalTrainer(site.client_id, site.task, site.dataset,
                               site.open_ledger() if ins.dp_enabled else None, site.device)
        report, weights = trainer.train(model, ins, server_round)
        if weights is not None and site.tamper_update is not None:
            weights = site.tamper_update(msg.content[ARRAYS].to_torch_state_dict(), weights)
        if weights is None:
            return Message(report.to_content(), reply_to=msg)
        if secagg is None:
            return Message(report.to_content(ArrayRecord(weights)), reply_to=msg)
        # Under secure aggregation only the masked update leaves this client.
        vector, header = SecAggClient(context).mask_update(
            secagg, msg.content[ARRAYS], weights, report.num_examples, ins.seed)
        content = report.to_content()
        content[MASKED], content[SECAGG] = vector, header
        return Message(content, reply_to=msg)

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




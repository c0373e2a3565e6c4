"""The ClientApp as Ray ships it to the actors: serialized once per run, not per message.

Flower's simulation engine sends the ClientApp along with every message
(`actor.run.remote(app_fn, message, ...)`), and Ray pickles it each time: for our app
(the site factory with the run's whole config, the client mods, the train, identify and
secure-aggregation handlers, all closures pickled by value) that cost the driver 0.6 ms
a message and each actor about 0.1 ms to unpickle, ten times Flower's echo app.
`ShippedOnce` pickles the app once; each message then carries those bytes, and an actor
process unpickles them once and reuses the app for the rest of the run.

So within one actor process the ClientApp object (and the mods in it) is shared by all
the virtual clients that process serves. Ours keeps no state in it between calls: each
call builds its site from the node's context and reads its state from the message and
the client's state folder. Client mods passed to `run_simulation` must be stateless
likewise (or keep only per-process state).
"""

from __future__ import annotations

import hashlib

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from ray import cloudpickle

# Per process: the digest of an app's pickled bytes -> the app, unpickled once. An actor
# serves one run; a handful of entries is room enough for apps shipped side by side.
_UNPICKLED: dict[bytes, ClientApp] = {}
_MAX_APPS = 8


def _unpickled_once(digest: bytes, pickled: bytes) -> ClientApp:
    app = _UNPICKLED.get(digest)
    if app is None:
        if len(_UNPICKLED) >= _MAX_APPS:
            _UNPICKLED.clear()
        app = _UNPICKLED[digest] = cloudpickle.loads(pickled)
    return app


class ShippedOnce(ClientApp):
    """A ClientApp that runs `app` here and travels to other processes as `app`'s bytes,
    pickled once (see the module's docstring)."""

    def __init__(self, app: ClientApp):
        super().__init__()
        self._app = app
        self._pickled = cloudpickle.dumps(app)
        self._digest = hashlib.sha256(self._pickled).digest()

    def __call__(self, message: Message, context: Context) -> Message:
        return self._app(message, context)

    def __reduce__(self):
        return _unpickled_once, (self._digest, self._pickled)

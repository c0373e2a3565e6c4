"""How the simulation engine hands the server's messages to the virtual clients.

Flower's simulation engine (flwr 1.41, ``vce_api.add_messages_to_queue``) runs a thread
that, for every registered node, asks the link state for that node's next message, and
then sleeps 0.1 s. Each ask scans every stored message and re-validates it (expiry,
federation membership), so one pass costs nodes × stored messages checks under the
state's lock, and a message sent just after a pass waits up to 0.1 s:

- with 1,000 nodes and 100 messages out (a round that samples 100 of 1,000 clients),
  a pass is 100,000 checks while the server and the reply thread wait on the lock;
- every exchange waits 0.05 s on average before its first message leaves (a secure round
  has two exchanges, a plain one one).

Flower exposes no setting for either, so :func:`prompt_dispatch` puts in place, for the
length of a simulation, a drop-in for that one function: one pass over the stored
messages validates each once (Flower's own ``_check_stored_messages``) and hands out, as
Flower does, at most one undelivered message per node per pass, oldest first; the thread
wakes as soon as the server stores a message (and at least every 0.1 s, so expired
messages are still dropped on time) instead of sleeping a fixed 0.1 s. What each
client receives is unchanged; within a pass, nodes are served in the order the server
sent their messages (Flower serves them in the order the nodes were registered).

It needs Flower's in-memory link state (what simulations use); given any other state, a
Flower whose engine no longer has that function, or a state it fails to read mid-run,
it leaves the work to Flower's loop.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import get_args

from consortia.config import ConfigError, Dispatch

try:  # the timestamps Flower's link state writes; a Flower that moved it keeps its own loop
    from flwr.supercore.date import now
except ImportError:  # pragma: no cover
    now = None

log = logging.getLogger("consortia.simulations")
DISPATCHES: tuple[str, ...] = get_args(Dispatch)

# The longest the thread sleeps with nothing stored: Flower's own period, so messages
# whose time to live ran out are dropped no later than Flower drops them.
MAX_WAIT_S = 0.1
_ATTRIBUTES = ("lock", "message_ins_store", "_check_stored_messages", "store_message_ins")


def check_dispatch(value: str, what: str = "sim.dispatch") -> str:
    """`value` if it names a dispatch (as `sim.dispatch` does), else a ConfigError naming it."""
    if value not in DISPATCHES:
        raise ConfigError(f"{what} must be {' or '.join(DISPATCHES)} (as sim.dispatch), got "
                          f"{value!r}")
    return value


def _engine():
    """Flower's engine module, if it still has the function and the clock we rely on."""
    if now is None:  # pragma: no cover
        return None
    try:
        from flwr.server.superlink.fleet.vce import vce_api
    except ImportError:  # pragma: no cover - a Flower that moved its engine
        return None
    return vce_api if callable(getattr(vce_api, "add_messages_to_queue", None)) else None


def supported(state) -> bool:
    """Whether `state` is a link state this dispatcher knows how to read."""
    return all(hasattr(state, name) for name in _ATTRIBUTES)


def _wake_on_store(state) -> threading.Event:
    """An event set whenever the server stores a message into `state`."""
    stored = threading.Event()
    store = state.store_message_ins

    def store_and_wake(message):
        message_id = store(message)
        stored.set()
        return message_id

    store_and_wake.__wrapped__ = store  # type: ignore[attr-defined]
    state.store_message_ins = store_and_wake  # this instance only; its class is untouched
    return stored


def take_undelivered(state, nodes) -> list:
    """Flower's `get_message_ins(node, limit=1)` for every node in `nodes`, in one pass:
    each stored message is validated once, and every node gets at most its oldest
    undelivered message, which is marked delivered."""
    taken: dict[int, object] = {}
    with state.lock:
        state._check_stored_messages(set(state.message_ins_store))  # drops expired ones
        for message in state.message_ins_store.values():
            metadata = message.metadata
            node = metadata.dst_node_id
            if metadata.delivered_at == "" and node in nodes and node not in taken:
                taken[node] = message
        delivered_at = now().isoformat()
        for message in taken.values():
            message.metadata.delivered_at = delivered_at
    return list(taken.values())


def _dispatch(state, queue, nodes_mapping, f_stop, *, flower_loop) -> None:
    """The drop-in for `vce_api.add_messages_to_queue` (same arguments)."""
    if not supported(state):
        log.info("link state %s not known to the prompt dispatcher: Flower's loop runs",
                 type(state).__name__)
        flower_loop(state, queue, nodes_mapping, f_stop)
        return
    nodes = frozenset(nodes_mapping.keys())
    stored = _wake_on_store(state)
    while not f_stop.is_set():
        stored.clear()  # before the pass: a message stored during it wakes the next wait
        try:
            taken = take_undelivered(state, nodes)
        except Exception:  # a link state that changed under us: never strand the run
            log.exception("the prompt dispatcher could not read the link state; Flower's "
                          "loop takes over")
            flower_loop(state, queue, nodes_mapping, f_stop)
            return
        for message in taken:
            queue.put(message)
        stored.wait(MAX_WAIT_S)


@contextlib.contextmanager
def prompt_dispatch(enabled: bool = True) -> Iterator[bool]:
    """Within this block, Flower simulations started in this process dispatch promptly
    (see the module's docstring). Yields whether the drop-in is in place."""
    engine = _engine() if enabled else None
    if engine is None:
        yield False
        return
    flower_loop = engine.add_messages_to_queue

    def add_messages_to_queue(state, queue, nodes_mapping, f_stop):
        _dispatch(state, queue, nodes_mapping, f_stop, flower_loop=flower_loop)

    engine.add_messages_to_queue = add_messages_to_queue
    try:
        yield True
    finally:
        engine.add_messages_to_queue = flower_loop

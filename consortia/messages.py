"""The message schema between the ServerApp and the ClientApp, defined once for both.

A train request carries the global weights (ArrayRecord "arrays") and the round's
instructions (ConfigRecord "config"). A train reply carries the client's report
(ConfigRecord "report"), and, when it trained, its new weights (ArrayRecord "arrays")
and the MetricRecord "metrics" that Flower's strategies weight by "num-examples".
"""

from __future__ import annotations

from math import prod
from typing import TYPE_CHECKING, Literal

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from pydantic import BaseModel, ConfigDict, Field, ValidationError

if TYPE_CHECKING:
    import torch

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
REPORT = "report"
NUM_EXAMPLES = "num-examples"  # the key Flower's strategies weight by
SERVER_ROUND = "server-round"  # injected by Flower's strategies into every train config
PROXIMAL_MU = "proximal-mu"  # injected by Flower's FedProx

TrainStatus = Literal["trained", "refused-budget", "refused-policy"]


class MessageSchemaError(ValueError):
    pass


def record_of(content: RecordDict, key: str, kind: type):
    """content[key] if it is a record of `kind`, else None: what `content.config_records.get`
    (and the like) gives, without building a filtered copy of the content on every call."""
    record = content.get(key)
    return record if isinstance(record, kind) else None


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_config_record(self) -> ConfigRecord:
        return ConfigRecord({k: v for k, v in self.model_dump().items() if v is not None})

    @classmethod
    def from_config_record(cls, record: ConfigRecord | None, what: str):
        if record is None:
            raise MessageSchemaError(f"{what}: missing ConfigRecord")
        try:
            return cls.model_validate(dict(record))
        except ValidationError as err:
            raise MessageSchemaError(f"{what}: {err}") from None


class TrainInstructions(_Record):
    """What the server asks of a client for one round (ConfigRecord "config")."""

    model_config = ConfigDict(extra="ignore", frozen=True)  # Flower adds "server-round"

    run_id: str
    task: str
    model_activation: str
    local_epochs: int = Field(ge=0)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)
    momentum: float = Field(ge=0, lt=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    seed: int
    dp_enabled: bool
    max_grad_norm: float = Field(gt=0)
    noise_multiplier: float | None = Field(None, ge=0)  # None: the client derives it
    planned_rounds: int = Field(ge=1)
    base_model_sha256: str | None = None  # the run's round-0 checkpoint (site policies match it)
    proximal_mu: float = Field(0.0, ge=0)  # FedProx; Flower's strategy sends "proximal-mu"
    # User-level DP: clip the whole update to user_clip, add a noise share of this std.
    user_clip: float | None = Field(None, gt=0)
    user_noise_std: float = Field(0.0, ge=0)
    user_count_noise_std: float = Field(0.0, ge=0)
    # "distributed": one DP-SGD step whose noise is split among the clients and summed
    # under secure aggregation (privacy/dp/distributed.py).
    privacy_mode: Literal["local", "distributed"] = "local"
    # Opacus's per-sample gradients: module hooks, or ghost clipping (norms only).
    grad_sample_mode: Literal["hooks", "ghost"] = "hooks"
    physical_batch_size: int | None = Field(None, ge=1)  # virtual batches: memory, not DP
    # A pretrained model's frozen weights, which only adapters travel against: a client
    # whose own base weights hash differently refuses (tasks/adapters.py).
    base_sha256: str | None = None

    @classmethod
    def from_content(cls, content: RecordDict) -> tuple[int, TrainInstructions]:
        record = record_of(content, CONFIG, ConfigRecord)
        if record is None:
            raise MessageSchemaError("train instructions: missing ConfigRecord")
        data = dict(record)
        if PROXIMAL_MU in data:
            data["proximal_mu"] = data.pop(PROXIMAL_MU)
        try:
            instructions = cls.model_validate(data)
        except ValidationError as err:
            raise MessageSchemaError(f"train instructions: {err}") from None
        return int(record.get(SERVER_ROUND, 0)), instructions


class TrainReport(_Record):
    """What a client says about its round (ConfigRecord "report"), trained or refused."""

    client_id: str
    status: TrainStatus
    reason: str = ""
    num_examples: int = Field(0, ge=0)
    train_loss: float | None = None
    dp_enabled: bool = False
    accountant: str = ""
    delta: float | None = None
    epsilon: float | None = None  # cumulative, after this round
    epsilon_budget: float | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None  # the rate the ledger charged (Opacus's accountant)
    steps: int = Field(0, ge=0)  # cumulative DP-SGD steps in the client's ledger
    within_clip: bool | None = None  # user-level DP: the update was within user_clip
    privacy_mode: Literal["local", "distributed"] = "local"
    # Distributed DP: ε from this client's own noise shares alone (`epsilon` is against
    # everyone while secure aggregation holds).
    epsilon_if_secagg_fails: float | None = None
    # Distributed DP: the round's σ_floor; the ledger charges this client's share
    # (noise_multiplier) plus t − 1 shares at the floor (privacy/dp/distributed.NoiseShare).
    noise_floor: float | None = None
    grad_sample_mode: str | None = None  # DP: which Opacus mode computed the clipping
    # DP: whether this client's ledger can pay for one more round like this one (after
    # this round's spend). The server leaves a client that cannot out of a secure round's
    # masking graph rather than have it refuse there as a dropout; it would learn the same
    # bit from the refusal one round later.
    can_train_again: bool | None = None

    def to_content(self, arrays=None) -> RecordDict:
        content = RecordDict({REPORT: self.to_config_record()})
        if arrays is not None:
            content[ARRAYS] = arrays
            metrics = {NUM_EXAMPLES: self.num_examples}
            if self.train_loss is not None:
                metrics["train_loss"] = self.train_loss
            content[METRICS] = MetricRecord(metrics)
        return content

    @classmethod
    def from_content(cls, content: RecordDict) -> TrainReport:
        return cls.from_config_record(record_of(content, REPORT, ConfigRecord), "train report")


# Once per node and run, the server asks which client a node is (server/directory.py).
IDENTIFY = "query.identify"


# --- secure aggregation ---------------------------------------------------------------
# Message types: the advertisement (once per run) and the unmasking (once per round) are
# custom train actions; the masked update rides on the ordinary train reply.
SECAGG_ADVERTISE = "train.secagg_advertise"
SECAGG_UNMASK = "train.secagg_unmask"
SECAGG = "secagg"  # ConfigRecord: protocol message bytes and encoding parameters
MASKED = "masked"  # ArrayRecord: the masked uint32 update vector


class SecAggInstructions(_Record):
    """Rides with a train request (ConfigRecord "secagg") when secure aggregation is on."""

    setup: bytes  # privacy.secagg.RoundSetup
    clip: float = Field(gt=0)
    bits: int = Field(ge=2, le=31)
    weight_scale: int = Field(ge=1)  # client weight = num_examples / weight_scale, in (0, 1]
    unweighted: bool = False  # user-level DP: every client weighs 1, and the vector ends
    # with the client's clipping indicator (its share of the clipped count)
    # Distributed DP: γ, integer units per unit of gradient (the vector is the client's
    # noisy integer sum, not an encoded update), and σ_floor, the least noise multiplier
    # every client of the round adds (privacy/dp/distributed.NoiseShare).
    dp_scale: float | None = Field(None, gt=0, allow_inf_nan=False)
    dp_noise_floor: float | None = Field(None, gt=0, allow_inf_nan=False)

    @classmethod
    def from_content(cls, content: RecordDict) -> SecAggInstructions | None:
        record = record_of(content, SECAGG, ConfigRecord)
        return None if record is None else cls.from_config_record(record, "secagg instructions")


class MessageTooLarge(ValueError):
    pass


# Room for the config, report and framing of a train message beside its tensors.
MESSAGE_OVERHEAD_BYTES = 1 << 20


def message_bytes(arrays) -> int:
    """Bytes of the tensors an ArrayRecord carries (what dominates a train message)."""
    return sum(len(array.data) for array in arrays.values())


def check_message_size(arrays, what: str) -> int:
    """The tensors' bytes; MessageTooLarge if a message carrying them would pass gRPC's limit.

    Secure aggregation sends each value as one uint32, the same size as float32, so the
    plain and the masked messages are alike in size.
    """
    from flwr.common import GRPC_MAX_MESSAGE_LENGTH

    size = message_bytes(arrays)
    if size + MESSAGE_OVERHEAD_BYTES > GRPC_MAX_MESSAGE_LENGTH:
        raise MessageTooLarge(
            f"{what}: a train message would carry {size:,} bytes of tensors, over gRPC's "
            f"limit of {GRPC_MAX_MESSAGE_LENGTH:,} bytes (less {MESSAGE_OVERHEAD_BYTES:,} for "
            "the rest of the message); train fewer parameters (a LoRA task, a smaller "
            "model.lora_rank) or a smaller model")
    return size


def secagg_run_id(run_id: str) -> int:
    """The protocol's 64-bit run id, from the run's hex id (both sides compute it alike)."""
    return int(run_id, 16) & (2**64 - 1)


def update_vector_order(names) -> list[str]:
    """The order in which both sides flatten tensors into one update vector."""
    return sorted(names)


# --- tensors in records -----------------------------------------------------------------
# Flower stores each tensor as the bytes of `np.save` (Array.data) and decodes it with
# `np.load`, which parses the header's text (a Python literal) every time: most of the
# cost for the small tensors of a simulation, paid by every client and by the server for
# every reply. The headers of one model's tensors are the same in every message, so both
# directions keep the parsed (or written) header and copy only the data. The bytes and the
# arrays are exactly Flower's: numpy's own reader and writer decide on every header the
# first time it is seen, and on anything unusual (object dtypes, a data length that does
# not match the header).

_NPY_MAGIC = b"\x93NUMPY"
_NUMPY_STYPE = "numpy.ndarray"
_MAX_HEADERS = 1024  # distinct tensor layouts kept; a model has a handful
_read_headers: dict[bytes, tuple[np.dtype, tuple[int, ...], bool]] = {}
_written_headers: dict[tuple[str, tuple[int, ...], bool], bytes] = {}


def _remember(cache: dict, key, value) -> None:
    if len(cache) >= _MAX_HEADERS:
        cache.clear()
    cache[key] = value


def _is_fortran(array: np.ndarray) -> bool:
    return array.flags.f_contiguous and not array.flags.c_contiguous


def decode_array(array: Array, *, copy: bool = True) -> np.ndarray:
    """`array.numpy()`, the same values, dtype, shape and errors, without re-reading a header
    seen before. The result is a writable array of its own, as np.load's is; with
    copy=False, once the header is known, a read-only view on the message's bytes (for
    what only reads the values, like a masked vector summed into the aggregate)."""
    data = array.data
    if array.stype != _NUMPY_STYPE or data[:6] != _NPY_MAGIC or len(data) < 12:
        return array.numpy()
    size_bytes = 2 if data[6] == 1 else 4  # format 1.0: a 2-byte header length; 2.0, 3.0: 4
    offset = 8 + size_bytes + int.from_bytes(data[8:8 + size_bytes], "little")
    header = bytes(data[:offset])
    known = _read_headers.get(header)
    if known is None:
        value = array.numpy()  # numpy's reader: the reference, and its errors
        if not value.dtype.hasobject:
            _remember(_read_headers, header, (value.dtype, value.shape, _is_fortran(value)))
        return value
    dtype, shape, fortran = known
    count = prod(shape)
    if len(data) - offset != count * dtype.itemsize:
        return array.numpy()  # truncated or padded: numpy says what is wrong
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    shaped = flat.reshape(shape, order="F" if fortran else "C")
    return shaped.copy(order="K") if copy else shaped


def encode_array(value: np.ndarray) -> Array:
    """`Array(value)`: the same bytes as np.save writes, the header written once per layout."""
    if value.dtype.hasobject:
        return Array(value)  # np.save refuses it without pickle; Flower's error
    fortran = _is_fortran(value)
    key = (value.dtype.str, value.shape, fortran)
    header = _written_headers.get(key)
    if header is None:
        written = Array(np.empty(value.shape, dtype=value.dtype,
                                 order="F" if fortran else "C")).data
        header = written[:len(written) - value.nbytes]
        _remember(_written_headers, key, header)
    data = b"".join((header, _raw_bytes(value, fortran)))
    return Array(dtype=str(value.dtype), shape=tuple(value.shape), stype=_NUMPY_STYPE, data=data)


def _raw_bytes(value: np.ndarray, fortran: bool):
    """The values in file order, without a copy where they already lie that way (the
    caller's join makes the one copy; Array(ndarray) makes two: into a file object and out)."""
    if value.flags.c_contiguous and not fortran:
        try:
            return memoryview(value.reshape(-1)).cast("B")
        except (TypeError, ValueError, NotImplementedError):  # formats memoryview cannot cast
            pass
    return value.tobytes(order="F" if fortran else "C")


def arrays_to_torch(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """`record.to_torch_state_dict()`, decoded by `decode_array`."""
    import torch

    return {name: torch.from_numpy(decode_array(array)) for name, array in record.items()}


def torch_to_arrays(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    """`ArrayRecord(tensors)`, encoded by `encode_array`."""
    record = ArrayRecord()
    for name, tensor in tensors.items():
        record[name] = encode_array(tensor.detach().cpu().numpy())
    return record

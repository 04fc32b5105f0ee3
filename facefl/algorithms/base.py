"""What a federated algorithm declares: the one interface the server, the SDK and the simulator consult.

An algorithm is a subclass of :class:`Algorithm` in its own module of ``facefl.algorithms``, listed once in
:mod:`facefl.algorithms.registry`. It declares:

- ``hyperparams``: its pydantic model of the task's ``hyperparams`` (common local-training fields plus its
  own); the server validates a task's hyperparams with the chosen algorithm's model, so a 422 names the
  field, and devices parse the assignment's with the same model (unknown keys ignored);
- ``global_extra_prefixes`` and :meth:`Algorithm.initial_extras`: tensors its global model carries next
  to the backbone (FedFR's public classifier), built at task creation;
- :meth:`Algorithm.update_extras`: tensors an update carries that are not averaged (FedFace's class
  embedding), checked at intake by :meth:`Algorithm.check_update_extras`;
- :meth:`Algorithm.server_step`: what the server does after the weighted mean, with its state
  (:class:`ServerState`, stored as a blob with the model version, so it survives a restart);
- :meth:`Algorithm.device_state`: the part of that state one device may download (FedFace: its own row);
- :meth:`Algorithm.round_inputs`: what a device downloads before it trains (FedFR's public pack and bank);
- :meth:`Algorithm.local_update`: the device's local round, built on the shared loop of
  :mod:`facefl.algorithms.local`.

Every server-side hook has a default that is FedAvg's behaviour, so an algorithm states only what differs;
the local update of an algorithm that only changes the server step is FedAvg's (subclass ``FedAvg``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Protocol, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from facefl import codec
from facefl.data.public import PublicSet

if TYPE_CHECKING:  # the local loop imports torch and the models; only its types are needed here
    from facefl.algorithms.local import LocalJob

TensorDict = dict[str, np.ndarray]

__all__ = [
    "Algorithm",
    "AssignmentLike",
    "Hyperparams",
    "InputsClient",
    "RoundInputs",
    "ServerEnv",
    "ServerState",
    "ServerStepInputs",
    "ServerStepResult",
    "TrainResult",
]


H = TypeVar("H", bound="Hyperparams")


class Hyperparams(BaseModel):
    """The local-training hyper-parameters every algorithm shares (the device's SGD and CosFace head).

    An algorithm's model subclasses this one. ``extra="forbid"``: at task creation a key the chosen
    algorithm does not declare is refused (the registry names the algorithms it belongs to).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    local_epochs: Annotated[int, Field(ge=1, le=100)] = 1
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 32
    lr: Annotated[float, Field(gt=0, le=10)] = 0.05
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[float, Field(ge=0, le=1)] = 5e-4
    scale: Annotated[float, Field(gt=0, le=128)] = 30.0
    margin: Annotated[float, Field(ge=0, lt=1)] = 0.4
    # "adam": torch's Adam with lr and weight_decay (momentum unused). A strong pretrained network
    # fine-tunes better with it at a small lr (benchmarks/finetune_study.py)
    optimizer: Literal["sgd", "adam"] = "sgd"

    @classmethod
    def lenient(cls: type[H], hp: Mapping[str, Any]) -> H:
        """Parse a stored task's or an assignment's hyperparams: keys this model lacks are ignored (a
        task created before per-algorithm models stored every field; a newer server may add some).
        Invalid values raise ValueError (pydantic's ValidationError is one)."""
        known = {k: v for k, v in hp.items() if k in cls.model_fields and v is not None}
        return cls.model_validate(known)


@dataclass(frozen=True)
class ServerState:
    """An algorithm's server-side state after a round (FedFace: every device's class embedding; FedAdam:
    the moments). Stored as one safetensors blob (tensors + string metadata) referenced by the model
    version's ``server_state_key``; the next round's step receives its base version's state."""

    tensors: TensorDict
    metadata: dict[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        return codec.encode(self.tensors, metadata=self.metadata)

    @classmethod
    def decode(cls, data: bytes) -> ServerState:
        return cls(tensors=dict(codec.decode(data)), metadata=dict(codec.read_metadata(data)))


@dataclass(frozen=True)
class ServerStepInputs:
    """What the server step gets after the (weighted or robust) mean of the round's updates."""

    base: Mapping[str, np.ndarray]  # the round's base model version
    delta: TensorDict  # the mean of the updates (local - base), without the update extras
    extras: dict[str, TensorDict]  # device id -> that device's update extras (see update_extras)
    state: ServerState | None  # the base version's state (None: first round, or a stateless algorithm)
    hyperparams: Any  # the algorithm's own Hyperparams model


@dataclass(frozen=True)
class ServerStepResult:
    delta: TensorDict  # applied to the base: new version = base + delta
    state: ServerState | None = None  # stored with the new version


@dataclass(frozen=True)
class RoundInputs:
    """What a local update needs beyond the base weights (downloaded by :meth:`Algorithm.round_inputs`).

    FedFR: the public pack (images + identity labels) and this version's public feature bank.
    FedFace: the device's class embedding as the server last spread it out (None in its first round).
    """

    public: PublicSet | None = None
    bank_embeddings: np.ndarray | None = None
    class_embedding: np.ndarray | None = None


@dataclass(frozen=True)
class TrainResult:
    """What a round of local training produced; only ``delta``, ``num_samples`` and ``metrics`` are sent."""

    delta: dict[str, np.ndarray]
    num_samples: int
    metrics: dict[str, float]
    seconds: float


class AssignmentLike(Protocol):
    """What training needs from an assignment (``device_sdk.Assignment`` satisfies it)."""

    @property
    def architecture(self) -> str: ...

    @property
    def embedding_dim(self) -> int | None: ...

    @property
    def algorithm(self) -> str: ...

    @property
    def hyperparams(self) -> Mapping[str, Any]: ...


class InputsClient(Protocol):
    """The downloads :meth:`Algorithm.round_inputs` may use (``device_sdk.FederatedClient`` has them)."""

    def download_public_pack(self, task_id: int) -> PublicSet: ...

    def download_public_bank(self, version: int) -> tuple[np.ndarray, np.ndarray]: ...

    def download_class_embedding(self, version: int) -> np.ndarray | None: ...


class ServerEnv(Protocol):
    """What the server offers an algorithm at task creation (``server_api.services.public.Env``)."""

    def public_set(self, name: str, image_size: int) -> PublicSet: ...

    def embed(
        self,
        architecture: str,
        embedding_dim: int | None,
        weights: Mapping[str, np.ndarray],
        images: np.ndarray,
    ) -> np.ndarray: ...


class _Assignment(Protocol):
    @property
    def task_id(self) -> int: ...

    @property
    def base_version(self) -> int: ...


class Algorithm:
    """Base of every algorithm: FedAvg's behaviour everywhere; subclasses override what differs."""

    name: ClassVar[str]
    title: ClassVar[str]  # one line: what it is (CLI help, docs)
    hyperparams: ClassVar[type[Hyperparams]] = Hyperparams
    # names of non-backbone tensors in the global model (they always train; evaluation drops them)
    global_extra_prefixes: ClassVar[tuple[str, ...]] = ()
    # the local update devices run (the assignment's ``algorithm``): an algorithm that only changes the
    # server step reuses FedAvg's, so devices built before it was added can take part
    device_algorithm: ClassVar[str | None] = None
    # the local update trains one identity per device (FedFace)
    one_identity_per_device: ClassVar[bool] = False
    # the server needs only the weighted sum of the round's updates (no per-device tensor such as
    # FedFace's class embedding): what secure aggregation and differential privacy require
    updates_only_summed: ClassVar[bool] = True
    # values a driver (the simulator) suggests when the user gives none, e.g. FedProx's mu
    suggested: ClassVar[dict[str, Any]] = {}

    @property
    def wire_name(self) -> str:
        """The ``algorithm`` an assignment carries: the name of the local update devices run."""
        return self.device_algorithm or self.name

    # ------------------------------------------------------------------------------ task creation

    def check_task(self, hp: Any) -> None:
        """ValueError (naming ``hyperparams.<field>``) when a new task's hyperparams do not fit together;
        only at task creation: devices and stored tasks are not re-checked."""

    def public_set(self, hp: Any) -> str | None:
        """The public face set the server serves for this task (None: the algorithm uses none)."""
        return None

    def initial_extras(
        self, env: ServerEnv, hp: Any, architecture: str, embedding_dim: int, backbone: TensorDict
    ) -> TensorDict:
        """The global model's extra tensors at task creation (see ``global_extra_prefixes``)."""
        return {}

    # ---------------------------------------------------------------------------------- intake

    def update_extras(self, embedding_dim: int) -> dict[str, codec.TensorSpec]:
        """Tensors an update carries next to the delta that are not averaged: name -> expected spec."""
        return {}

    def check_update_extras(self, extras: TensorDict) -> None:
        """ValueError when an update's extras are unacceptable (their specs are already checked)."""

    # ----------------------------------------------------------------------------- aggregation

    def server_step(self, inputs: ServerStepInputs) -> ServerStepResult:
        """The new version's delta from the round's mean (FedAvg: the mean itself) and the new state."""
        return ServerStepResult(delta=inputs.delta, state=None)

    def device_state(self, state: ServerState, device_id: str) -> TensorDict | None:
        """The part of a version's server state one device may download (None: nothing for it)."""
        return None

    # ------------------------------------------------------------------------------ the device

    def round_inputs(self, client: InputsClient, assignment: _Assignment) -> RoundInputs | None:
        """Download what the local update needs besides the base model (None: nothing)."""
        return None

    def local_update(self, job: LocalJob) -> TrainResult:
        """One local round on the device, built on :mod:`facefl.algorithms.local` (FedAvg's is the
        CosFace training of the device's private head; algorithms that only change the server step
        subclass :class:`~facefl.algorithms.fedavg.FedAvg` and inherit it)."""
        raise NotImplementedError(f"{self.name} declares no local update")

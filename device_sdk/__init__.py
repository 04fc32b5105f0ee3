"""facefl device SDK: what an app embeds to take part in federated training of a face model.

Typical use::

    from device_sdk import FederatedClient, LocalDataset, Trainer, run_round

    with FederatedClient(server_url, token=token, device_id=device_id) as client:
        report = run_round(client, Trainer(), LocalDataset.from_folder("faces/", 64), "state/", task_id=1)

Only model deltas, sample counts and numeric training metrics leave the device; its images, its local
classifier and its credentials stay on it.
"""

from .admin import AdminClient
from .client import FederatedClient
from .dataset import LocalDataset
from .device import RoundHooks, RoundReport, fetch_round_inputs, run_round
from .errors import (
    APIError,
    AssignmentTimeout,
    AuthError,
    DuplicateUpload,
    FaceflError,
    InvalidRequest,
    MultipleFaces,
    NoFaceFound,
    NotFound,
    ProtocolError,
    RateLimited,
    RecognizerError,
    RoundClosed,
    SecureAggregationError,
    ServerError,
    TaskCompleted,
    TransportError,
    UnknownPerson,
    UpdateRejected,
    WaitTimeout,
)
from .recognizer import Identification, Recognizer, Threshold, Verification
from .records import (
    Assignment,
    DeviceCredentials,
    ModelVersion,
    RoundInfo,
    TaskInfo,
    TransferStats,
    UploadReceipt,
    WaitInstruction,
)
from .trainer import (
    AssignmentLike,
    RoundInputs,
    TrainConfig,
    Trainer,
    TrainResult,
    load_personalized_model,
)
from .transport import SharedTransport

__all__ = [
    "APIError",
    "AdminClient",
    "Assignment",
    "AssignmentLike",
    "AssignmentTimeout",
    "AuthError",
    "DeviceCredentials",
    "DuplicateUpload",
    "FaceflError",
    "FederatedClient",
    "Identification",
    "InvalidRequest",
    "LocalDataset",
    "ModelVersion",
    "MultipleFaces",
    "NoFaceFound",
    "NotFound",
    "ProtocolError",
    "RateLimited",
    "Recognizer",
    "RecognizerError",
    "RoundClosed",
    "RoundHooks",
    "RoundInfo",
    "RoundInputs",
    "RoundReport",
    "SecureAggregationError",
    "ServerError",
    "SharedTransport",
    "TaskCompleted",
    "TaskInfo",
    "Threshold",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TransferStats",
    "TransportError",
    "UnknownPerson",
    "UpdateRejected",
    "UploadReceipt",
    "Verification",
    "WaitInstruction",
    "WaitTimeout",
    "fetch_round_inputs",
    "load_personalized_model",
    "run_round",
]

"""The registry: every federated algorithm, by name. Adding one = its module + one line here.

The server (task validation, intake, aggregation, the downloads), the SDK (``Trainer``, ``run_round``)
and the simulator (``--algorithm`` choices and checks) look algorithms up here; the API's ``algorithm``
enum and the protocol docs' list are :data:`NAMES`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from facefl.algorithms.base import Algorithm, Hyperparams
from facefl.algorithms.fedadam import FedAdam
from facefl.algorithms.fedavg import FedAvg
from facefl.algorithms.fedavgm import FedAvgM
from facefl.algorithms.fedface import FedFace
from facefl.algorithms.fedfr import FedFR
from facefl.algorithms.fedprox import FedProx
from facefl.algorithms.fedyogi import FedYogi

__all__ = [
    "ALGORITHMS",
    "DEFAULT",
    "NAMES",
    "UnknownAlgorithm",
    "get",
    "global_extra_prefixes",
    "local_update_names",
    "markdown",
    "task_hyperparams",
]

ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        FedAvg(),
        FedProx(),
        FedFR(),
        FedFace(),
        FedAvgM(),
        FedAdam(),
        FedYogi(),
    )
}
NAMES: tuple[str, ...] = tuple(ALGORITHMS)
DEFAULT = "fedavg"


class UnknownAlgorithm(ValueError):
    pass


def _join(names: list[str] | tuple[str, ...]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def local_update_names() -> tuple[str, ...]:
    """The algorithms with a local update of their own (what an assignment's ``algorithm`` may say)."""
    return tuple(a.name for a in ALGORITHMS.values() if a.device_algorithm is None)


def get(name: str) -> Algorithm:
    """The algorithm called ``name`` (case-insensitive); UnknownAlgorithm (a ValueError) names the known."""
    algorithm = ALGORITHMS.get(name.lower())
    if algorithm is None:
        raise UnknownAlgorithm(
            f"unknown algorithm {name!r}: this version implements the local updates of "
            f"{_join(local_update_names())} (algorithms: {', '.join(NAMES)})"
        )
    return algorithm


def global_extra_prefixes() -> tuple[str, ...]:
    """Name prefixes of the non-backbone tensors any algorithm's global model may carry."""
    return tuple(dict.fromkeys(p for a in ALGORITHMS.values() for p in a.global_extra_prefixes))


def task_hyperparams(name: str, raw: Mapping[str, Any]) -> Hyperparams:
    """A new task's hyperparams validated by algorithm ``name``: ValueError with one line per problem,
    each naming ``hyperparams.<field>`` (a field of another algorithm says which one it belongs to).

    Strict about JSON types, like every request body of the API and the schema the API documents for
    them: ``true`` is not a learning rate and ``"5"`` not a batch size (an integer is a valid float).
    Devices parse an assignment's hyperparams leniently instead (:meth:`Hyperparams.lenient`)."""
    algorithm = get(name)
    model = algorithm.hyperparams
    problems = []
    for key in raw:
        if key not in model.model_fields:
            owners = [a.name for a in ALGORITHMS.values() if key in a.hyperparams.model_fields]
            problems.append(
                f"hyperparams.{key} applies to {_join(owners)} only"
                if owners
                else f"hyperparams.{key}: unknown hyper-parameter of {algorithm.name}"
            )
    if problems:
        raise ValueError("; ".join(problems))
    try:
        hp = model.model_validate(dict(raw), strict=True)
    except ValidationError as exc:
        raise ValueError(
            "; ".join(
                f"hyperparams.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" if e["loc"] else str(e["msg"])
                for e in exc.errors()
            )
        ) from None
    algorithm.check_task(hp)
    return hp


def markdown() -> str:
    """The protocol docs' table of algorithms (docs/protocol.md, between the ``algorithms`` markers;
    a test keeps it equal to this): ``python -m facefl.algorithms`` prints it."""
    common = set(Hyperparams.model_fields)
    lines = [
        "| `algorithm` | assignment's `algorithm` | own hyper-parameters (default) | what it is |",
        "|---|---|---|---|",
    ]
    for a in ALGORITHMS.values():
        own = [
            f"`{name}` ({'none' if f.default is None else f.default})"
            for name, f in a.hyperparams.model_fields.items()
            if name not in common
        ]
        lines.append(f"| `{a.name}` | `{a.wire_name}` | {', '.join(own) or '-'} | {a.title} |")
    return "\n".join(lines) + "\n"

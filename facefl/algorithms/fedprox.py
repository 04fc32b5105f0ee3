"""FedProx (Li et al., 2020): FedAvg aggregation plus a proximal term in the local objective.

The server side is FedAvg; the device adds mu/2 * ||w - w_global||^2 to its loss so that local models
stay near the round's global model under heterogeneous data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any

import torch
from pydantic import Field

from facefl.algorithms.fedavg import FedAvg, FedAvgHyperparams


def proximal_term(
    params: Iterable[tuple[str, torch.Tensor]], global_params: Mapping[str, torch.Tensor], mu: float
) -> torch.Tensor:
    """mu/2 * sum over named parameters of ||w - w_global||^2 (names absent from global are skipped)."""
    if mu < 0:
        raise ValueError(f"mu must be >= 0, got {mu}")
    total: torch.Tensor | None = None
    for name, w in params:
        g = global_params.get(name)
        if g is None:
            continue
        sq = (w - g.to(w.device, w.dtype)).pow(2).sum()
        total = sq if total is None else total + sq
    if total is None:
        return torch.zeros(())
    return 0.5 * mu * total


class FedProxHyperparams(FedAvgHyperparams):
    mu: Annotated[float, Field(ge=0, le=100)] = 0.0


class FedProx(FedAvg):
    """FedAvg's server step and local update, plus the proximal term on the device."""

    name = "fedprox"
    title = (
        "FedProx (Li et al., 2020): FedAvg plus a proximal term (mu/2) * squared distance to the global model"
    )
    hyperparams = FedProxHyperparams
    suggested = {"mu": 0.01}
    regularizer_metric = "prox_term"

    def check_task(self, hp: Any) -> None:
        if hp.mu <= 0:
            raise ValueError("fedprox needs hyperparams.mu > 0")

    def regularizer(self, hp: Any, model: torch.nn.Module) -> Callable[[], torch.Tensor] | None:
        if hp.mu <= 0:
            return None
        # mu/2 ||w - w_global||^2 against this round's global weights (a frozen copy)
        global_params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return lambda: proximal_term(model.named_parameters(), global_params, hp.mu)

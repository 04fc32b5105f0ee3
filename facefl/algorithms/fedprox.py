"""FedProx (Li et al., 2020): FedAvg aggregation plus a proximal term in the local objective.

The server side is FedAvg; the device adds mu/2 * ||w - w_global||^2 to its loss so that local models
stay near the round's global model under heterogeneous data.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch


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

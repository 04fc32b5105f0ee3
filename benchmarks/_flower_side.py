"""The Flower side of benchmarks/flower_compare.py, run by the Flower environment's interpreter.

    python benchmarks/_flower_side.py --clients 500 --rounds 3 --floats 1000 --num-cpus 1

Flower's simulation engine (``flwr.simulation.run_simulation``, Ray backend) with the Message API
(``ServerApp`` + ``ClientApp``) and its ``FedAvg`` strategy, every client sampled every round, no
evaluation. Each client returns the weights it received plus small noise (no training). Timing as on
the facefl side: start-up = from this process's start until the warm-up round has been aggregated; the
timed rounds run from there until the last one has been aggregated. Prints one JSON line.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
from collections.abc import Iterable  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--clients", type=int, default=500)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--floats", type=int, default=1000)
    p.add_argument("--num-cpus", type=float, default=1.0, help="Ray CPUs per client (actors = cores / this)")
    args = p.parse_args()
    n = args.clients
    aggregated_at: list[float] = []
    replies_per_round: list[int] = []

    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        arrays = msg.content["arrays"].to_numpy_ndarrays()
        rng = np.random.default_rng()
        new = [a + (rng.standard_normal(a.shape) * 1e-3).astype(a.dtype) for a in arrays]
        content = RecordDict({"arrays": ArrayRecord(new), "metrics": MetricRecord({"num-examples": 1})})
        return Message(content=content, reply_to=msg)

    class TimedFedAvg(FedAvg):
        def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> Any:
            replies = list(replies)
            replies_per_round.append(sum(1 for r in replies if r.has_content()))
            out = super().aggregate_train(server_round, replies)
            aggregated_at.append(time.perf_counter())
            return out

    server = ServerApp()

    @server.main()
    def server_main(grid: Grid, context: Context) -> None:
        strategy = TimedFedAvg(
            fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n
        )
        initial = ArrayRecord([np.zeros(args.floats, np.float32)])
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=args.warmup + args.rounds)

    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=n,
        backend_config={"client_resources": {"num_cpus": args.num_cpus, "num_gpus": 0.0}},
    )
    if len(aggregated_at) != args.warmup + args.rounds:
        raise SystemExit(
            f"flower: {len(aggregated_at)} rounds aggregated, expected {args.warmup + args.rounds}"
        )
    start = aggregated_at[args.warmup - 1]
    timed = aggregated_at[-1] - start
    edges = aggregated_at[args.warmup - 1 :]
    import flwr

    print(
        json.dumps(
            {
                "flwr": flwr.__version__,
                "clients": n,
                "rounds": args.rounds,
                "floats_per_update": args.floats,
                "num_cpus_per_client": args.num_cpus,
                "cpu_count": os.cpu_count(),
                "replies_per_round": replies_per_round,
                "startup_s": start - T0,
                "timed_s": timed,
                "updates_per_s": n * args.rounds * 1.0 / timed,
                "round_s": [b - a for a, b in itertools.pairwise(edges)],
            }
        )
    )


if __name__ == "__main__":
    main()

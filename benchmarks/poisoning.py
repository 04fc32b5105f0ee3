"""One hostile device against a real server with the default policy: what reaches the model.

    python benchmarks/poisoning.py [--json PATH]

Three scenarios, each a fresh ``small`` task (two reports per round) on a real uvicorn server (SQLite):
- ``huge_update``: device 1 uploads 0.001 everywhere, device 2 a finite float32 update of 1e38 everywhere,
  both with num_samples=10 (the case that used to turn the global model into Inf/NaN);
- ``greedy_weight``: device 1 uploads 0.01 with num_samples=10, device 2 0.02 claiming num_samples=10^9;
  the share of the mean device 2 gets is read back from the new model;
- ``bound_off``: the norm bound explicitly "off", one report per round, two rounds of 3e38 updates: the
  second aggregate would overflow float32.
Prints a table and writes JSON. Only 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from facefl import codec  # noqa: E402
from simulator.server import LocalServer  # noqa: E402

ADMIN = "poison-admin-token"
SECRET = "poison-enrollment-secret"
H = {"Authorization": f"Bearer {ADMIN}"}


class Server:
    def __init__(self, c: httpx.Client) -> None:
        self.c = c
        self.task_id = 0

    def task(self, policy: dict[str, Any]) -> dict[str, Any]:
        r = self.c.post("/v1/tasks", json={"name": "poison", "rounds": 3, "policy": policy}, headers=H)
        assert r.status_code == 201, r.text
        self.task_id = int(r.json()["id"])
        return dict(r.json())

    def device(self) -> dict[str, str]:
        r = self.c.post("/v1/devices", json={"enrollment_secret": SECRET})
        assert r.status_code == 201, r.text
        return {"Authorization": f"Bearer {r.json()['token']}"}

    def assignment(self, dev: dict[str, str]) -> dict[str, Any]:
        r = self.c.post("/v1/checkin", json={"task_id": self.task_id}, headers=dev)
        assert r.json()["action"] == "train", r.text
        return dict(r.json()["assignment"])

    def weights(self, version: int) -> dict[str, np.ndarray]:
        return codec.decode(self.c.get(f"/v1/models/{version}", headers=H).content)

    def upload(self, dev: dict[str, str], a: dict[str, Any], value: float, n: int) -> tuple[int, str]:
        body = codec.encode({k: np.full_like(v, value) for k, v in self.weights(a["base_version"]).items()})
        r = self.c.post(f"/v1/rounds/{a['round_id']}/updates?num_samples={n}", content=body,
                        headers={**dev, "X-Upload-Token": a["upload_token"]})  # fmt: skip
        return r.status_code, str(r.json().get("code", "")) if r.status_code != 202 else ""

    def round_status(self, round_id: int) -> dict[str, Any]:
        return dict(self.c.get(f"/v1/rounds/{round_id}", headers=H).json())

    def wait(self, round_id: int, statuses: tuple[str, ...], timeout: float = 60) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            r = self.round_status(round_id)
            if r["status"] in statuses:
                return r
            time.sleep(0.05)
        raise TimeoutError(f"round {round_id} not in {statuses}")


def huge_update(s: Server) -> dict[str, Any]:
    task = s.task({"target_reports": 2, "min_reports": 2})
    d1, d2 = s.device(), s.device()
    a1, a2 = s.assignment(d1), s.assignment(d2)
    honest, hostile = s.upload(d1, a1, 0.001, 10), s.upload(d2, a2, 1e38, 10)
    third = s.device()  # an honest device fills the round: the model moves by 0.001 only
    s.upload(third, s.assignment(third), 0.001, 10)
    r = s.wait(a1["round_id"], ("aggregated", "abandoned"))
    new = s.weights(r["result_version"]) if r["result_version"] else {}
    base = s.weights(a1["base_version"])
    shift = max(float(np.abs(new[k] - base[k]).max()) for k in base) if new else float("nan")
    return {"norm_bound": task["policy"]["update_norm_bound"], "honest": honest, "hostile": hostile,
            "round": r["status"], "all_finite": all(np.isfinite(v).all() for v in new.values()),
            "max_abs_shift": shift}  # fmt: skip


def greedy_weight(s: Server) -> dict[str, Any]:
    task = s.task({"target_reports": 2, "min_reports": 2})
    d1, d2 = s.device(), s.device()
    a1, a2 = s.assignment(d1), s.assignment(d2)
    codes = [s.upload(d1, a1, 0.01, 10), s.upload(d2, a2, 0.02, 10**9)]
    r = s.wait(a1["round_id"], ("aggregated",))
    base, new = s.weights(a1["base_version"]), s.weights(r["result_version"])
    step = float(np.median(np.concatenate([(new[k] - base[k]).ravel() for k in base])))
    share = (step - 0.01) / (0.02 - 0.01)  # the greedy device's weight in the mean
    return {"max_sample_weight": task["policy"]["max_sample_weight"], "codes": codes,
            "greedy_share": share, "uncapped_share": 1e9 / (1e9 + 10)}  # fmt: skip


def bound_off(s: Server) -> dict[str, Any]:
    s.task({"target_reports": 1, "min_reports": 1, "update_norm_bound": "off"})
    out: dict[str, Any] = {}
    for k in (1, 2):
        dev = s.device()
        a = s.assignment(dev)
        out[f"upload_{k}"] = s.upload(dev, a, 3e38, 1)
        r = s.wait(a["round_id"], ("aggregated", "abandoned"))
        out[f"round_{k}"] = r["status"]
        out[f"reason_{k}"] = r["metrics"].get("abandoned_reason", "")
    versions = s.c.get("/v1/models", headers=H, params={"task_id": s.task_id}).json()
    out["versions"] = [v["version"] for v in versions]
    out["all_served_finite"] = all(
        all(np.isfinite(w).all() for w in s.weights(v["version"]).values()) for v in versions
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "poisoning.json")
    args = p.parse_args(argv)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="facefl-poison-") as tmp:
        for name, scenario in (("huge_update", huge_update), ("greedy_weight", greedy_weight),
                               ("bound_off", bound_off)):  # fmt: skip
            with (
                LocalServer(Path(tmp) / name, admin_token=ADMIN, enrollment_secret=SECRET) as server,
                httpx.Client(base_url=server.base_url, timeout=60) as c,
            ):
                results[name] = scenario(Server(c))
            print(f"{name}: {results[name]}", file=sys.stderr)
    hu, gw, bo = results["huge_update"], results["greedy_weight"], results["bound_off"]
    print("| scenario | what the server did | model afterwards |")
    print("|---|---|---|")
    print(f"| 1e38 update, default policy (bound {hu['norm_bound']:g}) | hostile {hu['hostile'][0]} "
          f"{hu['hostile'][1]}, honest {hu['honest'][0]} | round {hu['round']}, finite {hu['all_finite']}, "
          f"max change {hu['max_abs_shift']:.4g} |")  # fmt: skip
    print(f"| num_samples=10^9 (cap {gw['max_sample_weight']}) | both {gw['codes'][0][0]} | greedy device's "
          f"share {gw['greedy_share']:.4f} (uncapped {gw['uncapped_share']:.8f}) |")  # fmt: skip
    print(f"| 3e38 twice, bound off | {bo['upload_1'][0]}, {bo['upload_2'][0]}; rounds {bo['round_1']}, "
          f"{bo['round_2']} ({bo['reason_2']}) | versions {bo['versions']}, "
          f"all finite {bo['all_served_finite']} |")  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

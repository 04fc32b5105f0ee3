"""The simulator's --update-encoding / --update-error-feedback: checked, passed into the task policy, and
used by the simulated devices' uploads (a real server, tiny model, synthetic data)."""

from __future__ import annotations

import argparse
from pathlib import Path

import httpx
import pytest

from device_sdk import AdminClient
from facefl import compression
from facefl.devmode import DEV_ADMIN_TOKEN
from facefl.models import build_backbone, state_to_numpy
from simulator.cli import add_arguments, main
from simulator.config import SimulationConfig
from simulator.run import simulate
from simulator.server import LocalServer


def test_the_option_offers_exactly_the_known_encodings() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    (action,) = [a for a in parser._actions if a.dest == "update_encoding"]
    assert tuple(action.choices or ()) == compression.ENCODINGS


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--update-error-feedback"], "--update-error-feedback needs a lossy --update-encoding"),
        (
            ["--update-encoding", "float32", "--update-error-feedback"],
            "--update-error-feedback needs a lossy --update-encoding",
        ),
    ],
)
def test_bad_combinations_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_an_unknown_encoding_is_refused_by_the_config() -> None:
    with pytest.raises(ValueError, match="--update-encoding must be one of"):
        SimulationConfig(update_encoding="int4").validate()


def test_devices_upload_in_the_tasks_encoding(tmp_path: Path) -> None:
    cfg = SimulationConfig(
        devices=3,
        rounds=2,
        model="tiny",
        ids_per_device=2,
        images_per_id=4,
        heldout_ids=4,
        workers=1,
        seed=3,
        update_encoding="int8",
        update_error_feedback=True,
        progress=False,
    )
    with LocalServer(tmp_path / "server") as server:
        cfg.server = server.base_url
        result = simulate(cfg, log=lambda _msg: None)
        assert [r.status for r in result.rounds] == ["aggregated", "aggregated"]
        with AdminClient(server.base_url, DEV_ADMIN_TOKEN) as admin:
            policy = admin.get_task(result.task_id).policy
        admin_headers = {"Authorization": f"Bearer {DEV_ADMIN_TOKEN}"}
        with httpx.Client(base_url=server.base_url, headers=admin_headers) as h:
            participants = [
                p for r in result.rounds for p in h.get(f"/v1/rounds/{r.round_id}/participants").json()
            ]
    assert policy["update_encoding"] == "int8" and policy["update_error_feedback"] is True
    # every stored upload has the size of an int8 update of the tiny model (the size depends on the
    # shapes only), well below its float32 size
    delta = state_to_numpy(build_backbone("tiny", seed=0))
    int8_bytes = compression.payload_bytes(delta, "int8")
    assert int8_bytes < compression.payload_bytes(delta, "float32")
    assert len(participants) == 6
    assert [p["update_bytes"] for p in participants] == [int8_bytes] * 6

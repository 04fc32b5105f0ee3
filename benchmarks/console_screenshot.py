#!/usr/bin/env python
"""A screenshot of the console's task page with real rounds (docs/console-task.png), taken by the same
browser driver as tests/server_api/test_console_browser.py: Debian's chromium + chromium-driver through
Selenium, headless.

    python benchmarks/console_screenshot.py [--out docs/console-task.png] [--devices 6 --rounds 4]
    python benchmarks/console_screenshot.py --server http://127.0.0.1:8000 --token dev-admin-token --task 1

Without --server it starts a real server (SQLite in a temporary directory) whose eval set is a folder of
generated faces, runs a real simulation on it (`facefl simulate` internals: small backbone, generated
faces, every version evaluated by the server), and photographs that task. With --server it logs in to a
running server and photographs --task (default: the newest). It logs in through the console's form.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

DEFAULT_OUT = REPO / "docs" / "console-task.png"
from facefl.devmode import DEV_ADMIN_TOKEN as ADMIN  # noqa: E402
from facefl.devmode import DEV_ENROLLMENT_SECRET as SECRET  # noqa: E402


def screenshot(base_url: str, token: str, task_id: int, out: Path, width: int, height: int) -> None:
    from selenium import webdriver
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={width},{height}",
        "--hide-scrollbars",
    ):
        options.add_argument(arg)
    browser = webdriver.Chrome(
        options=options, service=webdriver.ChromeService(executable_path="/usr/bin/chromedriver")
    )
    try:
        browser.get(f"{base_url}/console/tasks/{task_id}")
        browser.find_element(By.NAME, "token").send_keys(token)
        browser.find_element(By.CSS_SELECTOR, "form[action='/console/login'] button").click()
        if not browser.current_url.endswith(f"/console/tasks/{task_id}"):
            raise SystemExit(f"login failed: at {browser.current_url}")
        browser.find_element(By.CSS_SELECTOR, "table.rounds")
        out.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(out))
    finally:
        browser.quit()


def simulate_and_shoot(args: argparse.Namespace) -> None:
    from facefl.data import write_image_folder
    from simulator import SimulationConfig, simulate
    from simulator.server import LocalServer

    with tempfile.TemporaryDirectory(prefix="facefl-console-shot-") as tmp:
        eval_dir = write_image_folder(
            Path(tmp) / "heldout", range(500, 540), images_per_identity=5, image_size=64
        )
        server = LocalServer(
            Path(tmp) / "srv",
            admin_token=ADMIN,
            enrollment_secret=SECRET,
            extra_env={"FACEFL_EVAL_SETS": json.dumps({"heldout": str(eval_dir)})},
        ).start()
        try:
            result = simulate(
                SimulationConfig(
                    devices=args.devices,
                    rounds=args.rounds,
                    model="small",
                    data="synthetic",
                    ids_per_device=4,
                    images_per_id=8,
                    heldout_ids=20,
                    local_epochs=2,
                    server=server.base_url,
                    admin_token=ADMIN,
                    enrollment_secret=SECRET,
                    eval_set="heldout",
                    workers=2,
                    seed=1,
                    progress=False,
                    work_dir=str(Path(tmp) / "sim"),
                    dropout=args.dropout,
                    round_timeout_s=30.0,  # a round short of a dropped device closes soon
                )
            )
            print(result.table())
            screenshot(server.base_url, ADMIN, result.task_id, args.out, args.width, args.height)
        finally:
            server.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--server", help="photograph this running server instead of simulating one")
    p.add_argument("--token", default=ADMIN, help="its admin token (default: the dev one)")
    p.add_argument("--task", type=int, help="task id on --server (default: the newest)")
    p.add_argument("--devices", type=int, default=6)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.15, help="devices that train but never upload")
    p.add_argument("--width", type=int, default=1400)
    p.add_argument("--height", type=int, default=1250)
    args = p.parse_args(argv)
    if args.server is None:
        simulate_and_shoot(args)
    else:
        base = args.server.rstrip("/")
        task_id = args.task
        if task_id is None:
            tasks = httpx.get(f"{base}/v1/tasks", headers={"Authorization": f"Bearer {args.token}"}).json()
            task_id = max(int(t["id"]) for t in tasks)
        screenshot(base, args.token, task_id, args.out, args.width, args.height)
    print(f"screenshot: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""cloudlet-api: list/show latency (median of 20) against the same Glance call made directly, and
the service's peak RSS while it imports a small and a large package (it must not grow with the
package: uploads are spooled, verification and publishing stream).

The service runs in a child process (uwsgi's place) over real HTTP with keystonemiddleware; the
Keystone and Glance behind it are the test suite's stand-ins (tests/api/standins.py), in this
process. Packages are real (the engine's exporter) with an incompressible disk, so the upload
is as large as the package.

    .venv/bin/python benchmarks/api_service.py [--large-mib 1024] [--small-mib 64] [--json out]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cloudlet.basevm.package import export_base  # noqa: E402
from cloudlet.basevm.store import BaseStore  # noqa: E402
from cloudlet.home import CloudletHome  # noqa: E402
from cloudlet_nova import glance as cloudlet_glance  # noqa: E402
from tests.api import standins  # noqa: E402
from tests.api.conftest import Env, write_config  # noqa: E402
from tests.unit.test_basevm_store import make_base_dir  # noqa: E402
from tests.unit.test_overlay_format import write_sample  # noqa: E402

MiB = 1 << 20
SERVE = """
import sys, time
from cloudlet_api import deploy
from tests.api.standins import HTTPServer
server = HTTPServer(deploy.loadapp(deploy.configure([sys.argv[1]])))
print(server.url, flush=True)
while True:
    time.sleep(3600)
"""


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


class Service:
    def __init__(self, env: Env, state: Path, **options: object) -> None:
        conf = write_config(env, state, max_package_size=4096, **options)
        state.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVE, str(conf)], cwd=ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        self.url = self.proc.stdout.readline().strip()
        if not self.url:
            raise RuntimeError("cloudlet-api did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def package(root: Path, disk_mib: int) -> Path:
    """A real package whose disk is random (incompressible): the upload is disk_mib large."""
    staging = make_base_dir(root / "staging", seed=disk_mib, disk_mib=4)
    with open(staging / "disk.raw", "wb") as f:
        for _ in range(disk_mib):
            f.write(os.urandom(MiB))
    store = BaseStore(CloudletHome(root / "home"))
    base = store.add_from_directory(staging, f"web-{disk_mib}")
    path = export_base(store, base.id, root / f"web-{disk_mib}.cbase", threads=0)
    store.delete(base.id)
    return path


def median_ms(call, n: int = 20) -> float:
    call()  # warm: connections, auth_token's token cache
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def latency(env: Env, tmp: Path) -> dict[str, float]:
    cloud = env.cloud
    write_sample(tmp / "sample.overlay")  # a real overlay file: show reads its chunk map
    overlay_data = (tmp / "sample.overlay").read_bytes()
    for i in range(20):
        base_id = f"{i:064x}"
        disk = cloud.add_image("project-a", f"b{i}", cloudlet_glance.base_disk_properties(
            base_id, "m"))  # fmt: skip
        overlay = cloud.add_image("project-a", f"o{i}", cloudlet_glance.overlay_properties(
            base_id, disk), overlay_data)  # fmt: skip
    service = Service(env, tmp / "latency")
    try:
        s = requests.Session()
        api = {"X-Auth-Token": env.tokens["reader"]}
        out = {
            "list_overlays_ms": median_ms(lambda: s.get(f"{service.url}/overlays", headers=api)),
            "show_overlay_ms": median_ms(
                lambda: s.get(f"{service.url}/overlays/{overlay}", headers=api)),
            "glance_list_ms": median_ms(lambda: s.get(
                f"{cloud.glance_url}/v2/images?cloudlet_type=overlay", headers=api)),
            "glance_show_ms": median_ms(
                lambda: s.get(f"{cloud.glance_url}/v2/images/{overlay}", headers=api)),
        }  # fmt: skip
        assert s.get(f"{service.url}/overlays", headers=api).status_code == 200
    finally:
        service.stop()
    out["list_ratio"] = out["list_overlays_ms"] / out["glance_list_ms"]
    out["show_ratio"] = out["show_overlay_ms"] / out["glance_show_ms"]
    return out


def import_rss(env: Env, tmp: Path, disk_mib: int) -> dict[str, float]:
    path = package(tmp / f"pkg{disk_mib}", disk_mib)
    service = Service(env, tmp / f"state{disk_mib}")
    try:
        idle = peak_rss_mib(service.proc.pid)
        t0 = time.monotonic()
        with open(path, "rb") as f:
            resp = requests.post(f"{service.url}/bases/import", data=f, headers={
                "X-Auth-Token": env.tokens["member"],
                "Content-Type": "application/octet-stream"})  # fmt: skip
        resp.raise_for_status()
        task_id = resp.json()["task"]["id"]
        while True:
            task = requests.get(f"{service.url}/tasks/{task_id}",
                                headers={"X-Auth-Token": env.tokens["member"]}).json()["task"]
            if task["state"] != "running":
                break
            time.sleep(0.5)
        if task["state"] != "succeeded":
            raise RuntimeError(f"import failed: {task['error']}")
        return {"package_mib": path.stat().st_size / MiB, "seconds": time.monotonic() - t0,
                "rss_idle_mib": idle, "rss_peak_mib": peak_rss_mib(service.proc.pid)}
    finally:
        service.stop()
        path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small-mib", type=int, default=64)
    parser.add_argument("--large-mib", type=int, default=1024)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    cloud = standins.Cloud()
    keystone = standins.Keystone(cloud)
    standins.Glance(cloud)
    tokens = {r: cloud.identity(f"{r}-user", "project-a", r).token for r in ("reader", "member")}
    env = Env(cloud, keystone, tokens)
    with tempfile.TemporaryDirectory(prefix="api-bench-") as tmp:
        results = {"latency": latency(env, Path(tmp))}
        for mib in (args.small_mib, args.large_mib):
            results[f"import_{mib}"] = import_rss(env, Path(tmp), mib)
    small, large = results[f"import_{args.small_mib}"], results[f"import_{args.large_mib}"]
    results["rss_ratio_large_vs_small"] = large["rss_peak_mib"] / small["rss_peak_mib"]
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""Base create, overlay create and synthesis (early start) on each QEMU, and across them.

Runs the `cloudlet` command as a user does, on the test guest, once with the system QEMU and
once with bookworm-backports' (tools/qemu-backports/install.sh), then the cross-version cells:
a base of each QEMU imported and synthesized on the other. Prints wall times, the ratio of the
newer QEMU's to the system's (same run, same machine), and the pass/fail matrix. Real QEMU
guests under TCG: expect +-30 % between runs on a shared machine.

    .venv/bin/python benchmarks/qemu_versions.py [--machine pc|q35] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cloudlet.hypervisor.config import QEMU_BINARY, QEMU_ENV, qemu_version
from cloudlet.hypervisor.qemu import free_port

REPO = Path(__file__).resolve().parents[1]
GUEST = Path(os.environ.get("CLOUDLET_GUEST_DIR", Path.home() / ".cache/cloudlet/testguest"))


def run(home: Path, qemu: str, *args: str) -> tuple[float, subprocess.CompletedProcess]:
    env = dict(os.environ, CLOUDLET_HOME=str(home), **{QEMU_ENV: qemu})
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "cloudlet.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return time.monotonic() - started, done


def base_create(home: Path, qemu: str, machine: str) -> tuple[float, subprocess.CompletedProcess]:
    g = json.loads((GUEST / "guest.json").read_text())
    return run(
        home, qemu, "base", "create", str(GUEST / g["disk"]), "--name", "testguest",
        "--kernel", str(GUEST / g["kernel"]), "--initrd", str(GUEST / g["initrd"]),
        "--append", g["append"], "--memory", str(g["memory_mib"]),
        "--ready-marker", g["ready_marker"], "--machine", machine,
    )  # fmt: skip


def synthesize(home: Path, qemu: str, overlay: Path) -> tuple[float, subprocess.CompletedProcess]:
    port = free_port()
    return run(
        home, qemu, "synthesize", str(overlay), "--check-and-exit", "-f", f"tcp:{port}:8080",
        "--check-url", f"http://127.0.0.1:{port}/",
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machine", default="pc", help="machine type alias (pc, q35)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    installer = REPO / "tools" / "qemu-backports" / "install.sh"
    newer = subprocess.run(
        ["bash", str(installer)], capture_output=True, text=True, check=True
    ).stdout.split()[-1]
    qemus = {qemu_version(QEMU_BINARY): QEMU_BINARY, qemu_version(newer): newer}
    times: dict[str, dict[str, float]] = {}
    matrix: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="cloudlet-qemu-bench-") as tmp:
        work = Path(tmp)
        packages, overlays = {}, {}
        for version, qemu in qemus.items():
            home = work / f"home-{version}"
            t_base, done = base_create(home, qemu, args.machine)
            assert done.returncode == 0, done.stderr
            overlay = work / f"{version}.overlay"
            t_overlay, done = run(
                home, qemu, "overlay", "create", "testguest",
                "--script", str(REPO / "tools/demo/customize.sh"), "-o", str(overlay),
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            packages[version] = work / f"{version}.cbase"
            run(home, qemu, "base", "export", "testguest", str(packages[version]))
            overlays[version] = overlay
            times[version] = {"base create": t_base, "overlay create": t_overlay}
        for made, package in packages.items():
            for version, qemu in qemus.items():
                home = work / f"synth-{made}-on-{version}"
                _, imported = run(home, qemu, "base", "import", str(package))
                cell = f"base+overlay of {made} on {version}"
                if imported.returncode != 0:
                    matrix[cell] = "refused at import: " + imported.stderr.strip().splitlines()[-1]
                    continue
                t_synth, done = synthesize(home, qemu, overlays[made])
                ok = done.returncode == 0 and "ram-only state" in done.stdout
                matrix[cell] = f"pass ({t_synth:.1f} s)" if ok else "FAIL: " + done.stderr[-300:]
                if made == version:
                    times[version]["synthesize (early start, first answer)"] = t_synth
    older, newest = list(qemus)
    print(f"| step | QEMU {older} s | QEMU {newest} s | ratio {newest}/{older} |")
    print("|---|---|---|---|")
    for step in times[older]:
        a, b = times[older][step], times[newest].get(step, float("nan"))
        print(f"| {step} | {a:.1f} | {b:.1f} | {b / a:.2f} |")
    print()
    for cell, result in matrix.items():
        print(f"- {cell}: {result}")
    if args.json:
        args.json.write_text(json.dumps({"times": times, "matrix": matrix}, indent=1))


if __name__ == "__main__":
    main()

"""The wheel carries every room under `consortia.` and nothing at the top level but it."""

import platform
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ["server", "client", "strategies", "privacy", "simulations", "tasks"]


def test_wheel_holds_every_room_under_consortia(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("consortia-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"consortia"}
    # Every package in the source tree is in the wheel (the editable install would hide a gap).
    for room in ROOMS:
        for init in (ROOT / room).rglob("__init__.py"):
            rel = init.relative_to(ROOT).as_posix()
            assert f"consortia/{rel}" in names, f"{rel} missing from the wheel"
    assert "consortia/simulations/experiments/fmnist-dp.toml" in names
    assert "consortia/cli.py" in names
    assert not any(n.startswith("consortia/tests/") for n in names)
    # Our VAES mask code is built into the wheel where this build could build it (x86-64
    # with a C compiler; the extension is optional elsewhere).
    if platform.machine() == "x86_64" and shutil.which("cc"):
        assert any(n.startswith("consortia/privacy/secagg/_aesctr.") and n.endswith(".so")
                   for n in names)

"""The console's page ships in the wheel: it is served from the package, never from a CDN."""

import re
import subprocess
import sys
import zipfile
from pathlib import Path

from consortia.server.console.app import STATIC_TYPES

ROOT = Path(__file__).resolve().parents[1]
STATIC = ROOT / "server" / "console" / "static"


def test_wheel_carries_the_console_static_files(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("consortia-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in STATIC_TYPES:
        assert f"consortia/server/console/static/{name}" in names
    assert "consortia/server/store/models.py" in names


def test_page_loads_nothing_from_another_origin():
    for name in STATIC_TYPES:
        text = (STATIC / name).read_text()
        assert not re.search(r"(src|href)=[\"']?(https?:)?//", text), name
        assert "fetch(\"http" not in text and "import(" not in text

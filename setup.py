"""Package discovery for the room layout (see ../shared/ARCHITECTURE.md).

The repository's top-level rooms (server/, client/, ...) install as subpackages of one
import package, `consortia`, so a partner installing the SDK gets no top-level module
named `client` or `server`. The package list is generated, not written by hand: an
editable install can import a subpackage that a built wheel would silently leave out,
and tests/test_packaging.py builds the wheel to keep this honest.
"""

from setuptools import find_packages, setup

ROOMS = ["server", "client", "strategies", "privacy", "simulations", "tasks"]

packages = ["consortia"]
package_dir = {"consortia": "consortia"}
for room in ROOMS:
    packages.append(f"consortia.{room}")
    package_dir[f"consortia.{room}"] = room
    for sub in find_packages(room):
        packages.append(f"consortia.{room}.{sub}")
        package_dir[f"consortia.{room}.{sub}"] = f"{room}/{sub.replace('.', '/')}"

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"consortia.simulations": ["experiments/*.toml"],
                  "consortia.server.console": ["static/*"]},  # the console's page, vendored
    include_package_data=True,
)

"""Package discovery for the room layout (see ../shared/ARCHITECTURE.md).

The repository's top-level rooms (server/, client/, ...) install as subpackages of one
import package, `consortia`, so a partner installing the SDK gets no top-level module
named `client` or `server`. The package list is generated, not written by hand: an
editable install can import a subpackage that a built wheel would silently leave out,
and tests/test_packaging.py builds the wheel to keep this honest.
"""

import platform

from setuptools import Extension, find_packages, setup

ROOMS = ["server", "client", "strategies", "privacy", "simulations", "tasks"]

packages = ["consortia"]
package_dir = {"consortia": "consortia"}
for room in ROOMS:
    packages.append(f"consortia.{room}")
    package_dir[f"consortia.{room}"] = room
    for sub in find_packages(room):
        packages.append(f"consortia.{room}.{sub}")
        package_dir[f"consortia.{room}.{sub}"] = f"{room}/{sub.replace('.', '/')}"

# Our VAES draw of the secure-aggregation mask streams (privacy/secagg/_aesctr.c, loaded
# with ctypes by privacy/secagg/fast_stream.py). Optional: without a C compiler, or off
# x86-64, the install goes on and the masks are drawn with OpenSSL (the same streams).
ext_modules = []
if platform.machine().lower() in ("x86_64", "amd64"):
    ext_modules.append(Extension("consortia.privacy.secagg._aesctr",
                                 sources=["privacy/secagg/_aesctr.c"],
                                 extra_compile_args=["-O3"], optional=True))

setup(
    packages=packages,
    ext_modules=ext_modules,
    package_dir=package_dir,
    package_data={"consortia.simulations": ["experiments/*.toml"],
                  "consortia.server.console": ["static/*"]},  # the console's page, vendored
    include_package_data=True,
)

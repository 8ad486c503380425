"""What `pip install` gets: every subpackage and the top-level model_cards/ template inside the wheel."""

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).parent.parent


def test_the_wheel_holds_every_package_and_the_card_template(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("hf_siglip-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {str(path.parent.relative_to(REPO)) for path in (REPO / "hf_siglip").rglob("__init__.py")}
    missing = {package for package in packages if f"{package}/__init__.py" not in names}
    assert not missing, f"add {sorted(missing)} to [tool.setuptools] packages in pyproject.toml"
    for template in (REPO / "model_cards").glob("*.md"):
        assert f"hf_siglip/model_cards/{template.name}" in names

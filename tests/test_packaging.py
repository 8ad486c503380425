"""What `pip install` gets: every subpackage, the top-level model_cards/ template and the recipes inside the wheel, and
an install outside the repository that finds a recipe by name."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).parent.parent
RECIPES = REPO / "hf_siglip" / "recipes"


def test_the_wheel_holds_every_package_the_card_template_and_the_recipes(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("hf_siglip-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {str(path.parent.relative_to(REPO)) for path in (REPO / "hf_siglip").rglob("__init__.py")}
    missing = {package for package in packages if f"{package}/__init__.py" not in names}
    assert not missing, f"add {sorted(missing)} to [tool.setuptools] packages in pyproject.toml"
    for template in (REPO / "model_cards").glob("*.md"):
        assert f"hf_siglip/model_cards/{template.name}" in names
    recipes = sorted(path.relative_to(REPO).as_posix() for path in RECIPES.rglob("*.yaml"))
    assert "hf_siglip/recipes/siglip_from_scratch.yaml" in recipes  # the glob found the recipes (no fixed count)
    assert not set(recipes) - names, "add them to package-data in pyproject.toml"

    # installed where no clone is near: `--config NAME` and `hf-siglip recipes` read the installed copies
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    probe = ("import hf_siglip, hf_siglip.recipes as r; print(hf_siglip.__file__); "
             "print(r.recipe_path('fff_multi_positive')); print(r.load_recipe('siglip_from_scratch')['recipe'])")
    out = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.splitlines()
    assert out[0].startswith(str(site)) and out[1] == str(site / "hf_siglip" / "recipes" / "fff_multi_positive.yaml")
    assert out[2] == "siglip_from_scratch"
    listing = subprocess.run([sys.executable, "-m", "hf_siglip", "recipes"], cwd=elsewhere, env=env,
                             capture_output=True, text=True, timeout=120, check=True).stdout
    for path in RECIPES.rglob("*.yaml"):
        assert f"  {path.stem} " in listing
    config = subprocess.run([sys.executable, "-m", "hf_siglip", "recipes", "--path", "cpu_two_processes"],
                            cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120, check=True).stdout
    assert config.strip() == str(site / "hf_siglip" / "recipes" / "accelerate_configs" / "cpu_two_processes.yaml")

"""transformers' own shared model tests (`ModelTesterMixin`, `ConfigTester`) for the installed transformers version.

They come from that version's source distribution, which pip downloads from the package registry and which is
unpacked into a cache folder (`$HF_SIGLIP_UPSTREAM_TESTS`, else `~/.cache/hf_siglip/transformers-<version>-tests`);
nothing of it is copied into this repository. The upstream `tests/` folder is imported by path as the package
`transformers_upstream_tests`, so it never clashes with this repository's own tests.

The source distribution leaves out three folders that `test_modeling_common.py` / `test_configuration_common.py`
import from. Where a file is absent, a module of ours stands in, saying so:
- `exporters/test_export.py` (`ExportTesterMixin`, a base class of `ModelTesterMixin` with transformers' export
  tests): an empty mixin; our own `torch.export` / `torch.compile` tests live in test_transformers_conformance.py.
- `generation/test_utils.py` (`GenerationTesterMixin`, only checked with `issubclass`): an empty class; none of our
  models generates, so the mixin's check that a non-generative model's tester lacks it holds as upstream means it.
- `utils/test_configuration_utils.py` (`config_common_kwargs`, the non-default values `ConfigTester` sets on every
  config and reads back): a dict of our own of `PreTrainedConfig` fields with non-default values.

`python tests/upstream_tests.py` fetches the tests ahead of time (the Makefile's install target runs it).
"""

import importlib.util
import os
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import transformers

PACKAGE = "transformers_upstream_tests"


class UpstreamTestsUnavailable(RuntimeError):
    """The source distribution could not be obtained (no network, no registry): the conformance tests skip."""


def cache_dir() -> Path:
    override = os.environ.get("HF_SIGLIP_UPSTREAM_TESTS")
    if override:
        return Path(override)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "hf_siglip" / f"transformers-{transformers.__version__}-tests"


def fetch(version: str = transformers.__version__) -> Path:
    """The unpacked upstream `tests/` folder, downloading the source distribution first if the cache lacks it."""
    target = cache_dir()
    if (target / "tests" / "test_modeling_common.py").exists():
        return target / "tests"
    with tempfile.TemporaryDirectory() as download:
        command = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
                   "--retries", "1", "--timeout", "20",  # no registry: skip within a minute, not after pip's retries
                   "--no-binary", ":all:", f"transformers=={version}", "-d", download]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise UpstreamTestsUnavailable(f"pip download of transformers=={version} failed: {error}") from error
        archives = list(Path(download).glob("transformers-*.tar.gz"))
        if result.returncode or not archives:
            last = (result.stderr.strip().splitlines() or ["no archive"])[-1]
            raise UpstreamTestsUnavailable(
                f"could not download the transformers=={version} source distribution from the package registry: "
                f"{last}")
        partial = Path(tempfile.mkdtemp(prefix="partial-", dir=_ensure(target.parent)))
        with tarfile.open(archives[0]) as archive:
            prefix = f"transformers-{version}/tests/"
            members = [m for m in archive.getmembers()
                       if m.name.startswith(prefix) and m.isfile() and m.name.endswith(".py")]
            for member in members:
                member.name = "tests/" + member.name[len(prefix):]
            archive.extractall(partial, members=members, filter="data")
    if not (partial / "tests" / "test_modeling_common.py").exists():
        raise UpstreamTestsUnavailable(
            f"transformers {version}'s source distribution holds no tests/test_modeling_common.py")
    _ensure(target)
    os.replace(partial / "tests", target / "tests")  # atomic: a cache folder is complete or absent
    partial.rmdir()
    return target / "tests"


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _stand_in(name: str, doc: str, **attributes) -> None:
    module = types.ModuleType(f"{PACKAGE}.{name}", doc)
    module.__dict__.update(attributes)
    parent = sys.modules[f"{PACKAGE}.{name.rsplit('.', 1)[0]}"] if "." in name else sys.modules[PACKAGE]
    setattr(parent, name.rsplit(".", 1)[-1], module)
    sys.modules[module.__name__] = module


def _package(name: str, path: Path) -> None:
    if name in sys.modules:
        return
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(path)]
    sys.modules[name] = importlib.util.module_from_spec(spec)


class _ExportTesterMixin:
    """Stand-in: transformers' ExportTesterMixin is not in the source distribution (see the module docstring)."""


class _GenerationTesterMixin:
    """Stand-in: transformers' GenerationTesterMixin is not in the source distribution (see the module docstring)."""


# Non-default values of PreTrainedConfig fields (stand-in for upstream's config_common_kwargs, see above).
CONFIG_COMMON_KWARGS = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "tie_word_embeddings": False,
    "chunk_size_feed_forward": 5,
    "is_encoder_decoder": True,
    "problem_type": "regression",
    "id2label": {0: "label_a", 1: "label_b"},
    "label2id": {"label_a": 0, "label_b": 1},
}


def load() -> types.SimpleNamespace:
    """`modeling` (upstream test_modeling_common) and `configuration` (test_configuration_common) as modules."""
    tests = fetch()
    # test_configuration_common runs tests/__init__.py (empty upstream, left out of the sdist) through
    # direct_transformers_import, which then hands back the installed transformers: an empty file does the same.
    (tests / "__init__.py").touch()
    _package(PACKAGE, tests)
    stand_ins = {
        "exporters": ("exporters.test_export", {"ExportTesterMixin": _ExportTesterMixin}),
        "generation": ("generation.test_utils", {"GenerationTesterMixin": _GenerationTesterMixin}),
        "utils": ("utils.test_configuration_utils", {"config_common_kwargs": CONFIG_COMMON_KWARGS}),
    }
    for folder, (name, attributes) in stand_ins.items():
        if (tests / f"{name.replace('.', '/')}.py").exists():
            continue  # a later source distribution that ships the file: use the real one
        _package(f"{PACKAGE}.{folder}", tests / folder)
        if f"{PACKAGE}.{name}" not in sys.modules:
            _stand_in(name, f"Stand-in for upstream tests/{name.replace('.', '/')}.py, absent from the sdist.",
                      **attributes)
    modeling = importlib.import_module(f"{PACKAGE}.test_modeling_common")
    configuration = importlib.import_module(f"{PACKAGE}.test_configuration_common")
    return types.SimpleNamespace(modeling=modeling, configuration=configuration, path=tests)


if __name__ == "__main__":
    print(fetch())

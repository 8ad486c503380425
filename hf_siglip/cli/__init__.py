"""The `hf-siglip` command (:mod:`.main`) and the jobs behind it, one module each (as TRL's scripts)."""

from .main import main, parse_with_config

__all__ = ["main", "parse_with_config"]

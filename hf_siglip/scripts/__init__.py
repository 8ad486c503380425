"""The jobs behind the `hf-siglip` command, one module each (as TRL's scripts)."""

"""Silence one notice of transformers that is about its own defaults, not about any model.

transformers 5.x formats every config it loads for an info log (`from_dict`: `logger.info(f"Model config {config}")`,
built even when info is not shown). Formatting a `SiglipConfig` compares its text config with a *default*
`SiglipTextConfig()`, whose defaults are invalid (a 32,000-token vocabulary with CLIP's bos/eos ids 49406/49407), so
transformers warns "bos_token_id must be `None` or an integer within the vocabulary (between 0 and 31999), got
49406" (and eos, 49407) on loading any SiglipModel checkpoint, Google's included. The loaded model's own ids are
checked separately and still warn when wrong: only the two messages with exactly those default numbers are
dropped. `import hf_siglip` installs the filter; a process that never imports hf_siglip still prints them.
"""

import logging
import re

_DEFAULT_TEXT_CONFIG_NOTICE = re.compile(r"(bos|eos)_token_id must be `None` or an integer within the vocabulary "
                                         r"\(between 0 and 31999\), got (49406|49407)\b")


class _DefaultConfigNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _DEFAULT_TEXT_CONFIG_NOTICE.search(record.getMessage())


def quiet_default_config_notices() -> None:
    """Install the filter on transformers' configuration logger (once)."""
    logger = logging.getLogger("transformers.configuration_utils")
    if not any(isinstance(existing, _DefaultConfigNotice) for existing in logger.filters):
        logger.addFilter(_DefaultConfigNotice())

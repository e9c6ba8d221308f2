"""The transformers releases this package's test suite ran on, and the warning for the others.

This lives in the package, not in the model folder: a converted folder or a remote-code checkpoint is written once and
loaded for years, so it cannot know which releases were tested after it was saved. The package can; each release of
`ppllava_hf` states the range its CI ran, and `import ppllava_hf` warns once when the installed transformers is outside.
"""

import transformers
from packaging import version
from transformers.utils import logging


logger = logging.get_logger(__name__)

# The oldest and newest transformers releases (major.minor) CI ran the whole suite on; setup.cfg's minimum is the first.
TESTED_TRANSFORMERS = ("5.21", "5.25")

_warned_for: set[str] = set()


def warn_if_untested_transformers(installed: str | None = None) -> bool:
    """Warn, once per installed release, when transformers `installed` (default: the one imported) is outside
    `TESTED_TRANSFORMERS`; returns whether it is outside.

    Newer releases are allowed (CI's newest environment follows the registry), but one this package was never tested
    on gets a warning naming the tested range and how to install a tested release, so an incompatibility is not a silent
    surprise.
    """
    installed = installed or transformers.__version__
    release = version.parse(installed).release[:2]
    oldest, newest = (version.parse(bound).release[:2] for bound in TESTED_TRANSFORMERS)
    outside = not oldest <= release <= newest
    if outside and installed not in _warned_for:
        _warned_for.add(installed)
        logger.warning(
            f"ppllava_hf was tested with transformers {TESTED_TRANSFORMERS[0]} to {TESTED_TRANSFORMERS[1]}; you have "
            f"{installed}. If something fails, install a tested release (pip install 'transformers>="
            f"{TESTED_TRANSFORMERS[0]},<{newest[0]}.{newest[1] + 1}') and report the failure."
        )
    return outside


__all__ = ["TESTED_TRANSFORMERS", "warn_if_untested_transformers"]

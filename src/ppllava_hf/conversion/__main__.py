"""`python -m ppllava_hf.conversion`: see `ppllava_hf.conversion.cli`."""

from .cli import run


run()

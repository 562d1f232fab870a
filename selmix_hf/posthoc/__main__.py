"""``python -m selmix_hf.posthoc``: the command line of `selmix_hf.posthoc.cli`."""

from .cli import main

main()

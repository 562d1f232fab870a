"""Helpers shared by the benchmark scripts."""


def current_rss_kib() -> int:
    """This process's resident set size now (Linux), to subtract from the peak."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def versions() -> dict:
    """The library versions a result was measured with, so a rerun that differs can be traced to its environment."""
    import platform

    import torch
    import transformers

    import selmix_hf

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "selmix_hf": selmix_hf.__version__,
    }

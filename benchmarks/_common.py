"""Helpers shared by the benchmark scripts."""


def current_rss_kib() -> int:
    """This process's resident set size now (Linux), to subtract from the peak."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def versions() -> dict:
    """The versions a result was measured with (the card's, plus Python), so a differing rerun can be traced."""
    import platform

    from selmix_hf.cards import library_versions

    return {"python": platform.python_version(), **library_versions()}

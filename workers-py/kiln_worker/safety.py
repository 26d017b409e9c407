"""Safety verdicts: {"checked", "nsfw", "checker"} per output, or null when no check was asked.

The verdict is reported, not enforced: flagged images are kept as generated and the client (or
the API's policy) decides what to do with them. Both backends follow this.
"""

from __future__ import annotations

SYNTHETIC_CHECKER = "synthetic"
DEFAULT_SYNTHETIC_NSFW_WORD = "nsfw-test"


def verdict(nsfw: bool, checker: str, checked: bool = True) -> dict:
    return {"checked": bool(checked), "nsfw": bool(nsfw), "checker": checker}


class SyntheticSafetyChecker:
    """Flags an image nsfw iff the prompt contains the marker word (case-insensitive)."""

    def __init__(self, marker: str = DEFAULT_SYNTHETIC_NSFW_WORD):
        self.marker = marker.lower()

    def check(self, prompt: str, checker: str = SYNTHETIC_CHECKER) -> dict:
        """The verdict, naming `checker` (the backend passes its safety checker model's name, as
        the diffusers backend reports it)."""
        return verdict(bool(self.marker) and self.marker in prompt.lower(), checker)

"""LoRA directories: where LoRAs that are not in a backend's own catalog come from.

- `KILN_LORA_DIR` (set by the gpu-agent): trained LoRAs it fetched from S3, one file per LoRA
  named `<name with "/" replaced by "~">.safetensors` (the runtime's `loraFileName`; names cannot
  hold "~", so two names never share a file). The agent checks each file's sha256 and
  downloads to `<file>.part` and renames, so a `*.safetensors` file here is always complete.
- `KILN_SYNTHETIC_LORA_DIR` (synthetic backend only): every `*.safetensors` is a LoRA named by
  its file stem, as before.

Both are rescanned whenever a request names a LoRA the backend does not know, so a LoRA that
arrives after the worker started is usable at once, and `capabilities()` lists what is there now.
"""

from __future__ import annotations

import glob
import os

SUFFIX = ".safetensors"


def file_name(name: str) -> str:
    """The file a LoRA called `name` has in KILN_LORA_DIR (runtime: loraFileName)."""
    return name.replace("/", "~") + SUFFIX


def name_from_file(filename: str) -> str:
    """The LoRA name a KILN_LORA_DIR file stands for: every "~" was a "/"."""
    stem = os.path.basename(filename)[: -len(SUFFIX)]
    return stem.replace("~", "/")


def find(lora_dir: str | None, name: str) -> str | None:
    """The path of LoRA `name` in KILN_LORA_DIR, or None (exact lookup: no guessing about "--")."""
    if not lora_dir:
        return None
    path = os.path.join(lora_dir, file_name(name))
    return path if os.path.isfile(path) else None


def scan(lora_dir: str | None, *, by_stem: bool = False) -> dict[str, str]:
    """name → path for every complete LoRA file in `lora_dir` (empty when unset or missing).

    `by_stem` names each by its file stem (KILN_SYNTHETIC_LORA_DIR); otherwise by `name_from_file`.
    """
    if not lora_dir or not os.path.isdir(lora_dir):
        return {}
    found: dict[str, str] = {}
    for path in sorted(glob.glob(os.path.join(glob.escape(lora_dir), "*" + SUFFIX))):
        if not os.path.isfile(path):
            continue
        name = os.path.basename(path)[: -len(SUFFIX)] if by_stem else name_from_file(path)
        found.setdefault(name, path)
    return found

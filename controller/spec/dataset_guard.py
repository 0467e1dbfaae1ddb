"""Which files of a dataset folder may leave this machine, and which folders may not be one.

Only images and their caption sidecars are uploaded (an include list, not the folder): no
dotfiles, nothing else. A folder that is the home folder or ``/``, that holds ``.ssh`` or
``.config``, or that holds more files than ``dataset.max_files`` is refused before anything is
rented: such a path is a mistake, and shipping it would hand a stranger's machine the user's keys.
"""

from __future__ import annotations

import os
from pathlib import Path
from remote.dataset.ingest import IMAGE_EXTS

SENSITIVE = (".ssh", ".config", ".gnupg", ".aws")


def refusal(folder: Path, *, max_files: int) -> str | None:
    """Why ``folder`` must not be uploaded as a dataset, or None when it may."""
    where = folder.expanduser().resolve()
    if where == Path(where.anchor):
        return f"{where} is the root folder; give the folder of your images"
    if where == Path.home().resolve():
        return f"{where} is your home folder; give the folder of your images"
    held = [name for name in SENSITIVE if (where / name).exists()]
    if held:
        return (f"{where} holds {', '.join(held)} (keys and settings, never uploaded); "
                "give a folder of images only")
    count = 0
    for _, dirnames, filenames in os.walk(where):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        count += len(filenames)
        if count > max_files:
            return (f"{where} holds more than {max_files} files (dataset.max_files); "
                    "is this the right folder?")
    return None


def upload_filters(caption_ext: str) -> list[str]:
    """rsync filter rules that send images and ``.<caption_ext>`` sidecars and nothing else:
    no dotfile or dot folder, no other file (rsync(1) FILTER RULES: the first match wins)."""
    rules = ["- .*", "+ */"]
    for ext in sorted({*IMAGE_EXTS, f".{caption_ext}"}):
        either_case = "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in ext[1:])
        rules.append(f"+ *.{either_case}")
    return [*rules, "- *"]


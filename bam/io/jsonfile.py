"""Reading a JSON object from a file, with errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path

from bam.errors import BamError, first_line


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise BamError(f"{path}: file not found") from None
    except OSError as err:
        raise BamError(f"{path}: cannot be read ({err.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BamError(f"{path}: not valid JSON ({first_line(err)})") from None
    if not isinstance(data, dict):
        raise BamError(f"{path}: expected a JSON object")
    return data

"""Audit records: one JSON line per chat request. Text is hashed unless text logging is on."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path


def digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


class AuditLog:
    def __init__(self, path: Path, log_text: bool):
        self.path, self.log_text = path, log_text
        self.lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def text(self, value: str) -> str:
        return value if self.log_text else digest(value)

    def write(self, **record) -> None:
        line = json.dumps({"time": time.time(), **record}, separators=(",", ":"))
        with self.lock, open(self.path, "a") as f:
            f.write(line + "\n")

"""The participant's heartbeat file: what the agent writes and the Kubernetes probes read.

Standard library only: the probes import it every few seconds inside the pods.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

HEARTBEAT_FILE = "heartbeat.json"


def write_heartbeat(path: Path, site: str, status: str, round_no: int = 0) -> None:
    """A JSON object written atomically (temp file + rename), so a probe never reads half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"site": site, "status": status, "round": round_no, "time": time.time()}))
    os.replace(tmp, path)

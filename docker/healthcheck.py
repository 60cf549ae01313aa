"""Container health check: exit 0 when the server's /health answers 200, else 1.

Used by the images' HEALTHCHECK (no curl in them). It reads the same settings as the server:
SRR_PORT, SRR_HOST (a wildcard bind address is probed on loopback) and SRR_API_KEY (sent as a
bearer key, needed when SRR_PROTECT_METRICS is on). Standard library only.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

WILDCARD_HOSTS = {"", "0.0.0.0", "::", "[::]"}


def health_url() -> str:
    host = os.environ.get("SRR_HOST", "").strip()
    if host in WILDCARD_HOSTS:
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal
    port = os.environ.get("SRR_PORT", "8000").strip() or "8000"
    return f"http://{host}:{port}/health"


def main() -> int:
    request = urllib.request.Request(health_url())
    api_key = os.environ.get("SRR_API_KEY")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    timeout = float(os.environ.get("SRR_HEALTHCHECK_TIMEOUT", "5"))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status = response.status
    except urllib.error.HTTPError as exc:  # 503: engine dead; 401: wrong key
        status = exc.code
    except (OSError, ValueError) as exc:  # not listening yet, timeout, bad settings
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"unhealthy: /health returned {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

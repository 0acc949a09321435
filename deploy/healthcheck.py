"""Docker HEALTHCHECK: exit 0 when GET /ready answers 200 (model loaded, engine running)."""

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    port = os.environ.get("NLD_PORT", "8000")
    url = os.environ.get("NLD_HEALTH_URL", f"http://127.0.0.1:{port}/ready")
    try:
        with urllib.request.urlopen(url, timeout=float(os.environ.get("NLD_HEALTH_TIMEOUT", "5"))) as resp:
            return 0 if resp.status == 200 else 1
    except (urllib.error.URLError, OSError, ValueError) as e:
        print(f"not ready: {url}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""A call to the ownership API of a ``keygate serve`` the test started (blocking, urllib).

The subprocess rigs (tests/integration/test_serve.py, test_scale_out.py, test_workers.py) call it
the same way: the JSON body and status, the error's JSON too.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request


def api_call(http_port: int, context: ssl.SSLContext, method: str, path: str, token: str,
             body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"https://127.0.0.1:{http_port}/api/v1{path}", data=data, method=method,
                                 headers={"Authorization": f"Bearer {token}",
                                          **({"Content-Type": "application/json"} if data else {})})
    try:
        with urllib.request.urlopen(req, context=context, timeout=10) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")

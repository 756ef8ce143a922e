"""Calls to a ``keygate serve`` the test started, with a bearer token (blocking, urllib).

The subprocess rigs (tests/integration/test_serve.py, test_scale_out.py, test_workers.py) call the
ownership API the same way (:func:`api_call`: the JSON body and status, the error's JSON too), and
the NGSI gateway with :func:`bearer_call` (the body as bytes).
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request


def bearer_call(http_port: int, context: ssl.SSLContext, method: str, path: str, token: str,
                body: dict | None = None) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"https://127.0.0.1:{http_port}{path}", data=data, method=method,
                                 headers={"Authorization": f"Bearer {token}",
                                          **({"Content-Type": "application/json"} if data else {})})
    try:
        with urllib.request.urlopen(req, context=context, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def api_call(http_port: int, context: ssl.SSLContext, method: str, path: str, token: str,
             body: dict | None = None) -> tuple[int, dict]:
    status, text = bearer_call(http_port, context, method, f"/api/v1{path}", token, body)
    return status, json.loads(text or b"{}")

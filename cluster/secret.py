"""The cluster secret: what closes the internal plane (torch-free; router and workers import it).

The launcher makes one per cluster (or takes `cluster_secret` from the config) and hands it to routers and
workers inside their configs (pickled to Ray actors and router children, never in argv), and to a worker's
gRPC front end in its environment (`ENV`, removed from the environment as soon as the front end reads it).
From it come:
- the `WorkerService` token: every call carries `METADATA_KEY: worker_token(secret)` (router/channels.py);
  the front end refuses calls without it at once (UNAUTHENTICATED), Attach included;
- registry signatures: `sign_fields` over a worker's static info, written at register; readers that hold
  the secret ignore entries whose signature does not verify;
- the KV control channel's hello: an HMAC of the listener's fresh nonce (cluster/transport/control.py).
The secret itself never travels: only values derived from it with HMAC-SHA256. The gRPC pieces (server
guard, client interceptors) are in `cluster.grpc_auth`, so that this module imports no grpc.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from typing import Any

from cluster import env

ENV = env.CLUSTER_SECRET
METADATA_KEY = "x-pdserve-cluster-token"


def new_secret() -> str:
    """A fresh random secret (256 bits, URL-safe text)."""
    return secrets.token_urlsafe(32)


def mac(secret: str, purpose: str, data: bytes = b"") -> str:
    """HMAC-SHA256 of `data` under `secret`, bound to `purpose` so that one use's value is no other's."""
    return hmac.new(secret.encode(), purpose.encode() + b"\0" + data, hashlib.sha256).hexdigest()


def same(a: str | bytes, b: str | bytes) -> bool:
    """Constant-time equality."""
    return hmac.compare_digest(a.encode() if isinstance(a, str) else a, b.encode() if isinstance(b, str) else b)


def worker_token(secret: str) -> str:
    return mac(secret, "worker-service")


def sign_fields(secret: str, fields: Mapping[str, Any]) -> str:
    """A signature over a mapping of plain values (a registry entry's static fields)."""
    data = "\0".join(f"{k}={fields[k]}" for k in sorted(fields)).encode()
    return mac(secret, "registry", data)


def metadata_value(metadata: Any, key: str) -> str | None:
    """The value of `key` in a call's invocation metadata (a sequence of (key, value) pairs), or None."""
    for k, v in metadata or ():
        if k == key:
            return v if isinstance(v, str) else v.decode(errors="replace")
    return None


def pop_env_secret() -> str:
    """The secret handed over in the environment (`ENV`), removed from it so children do not inherit it."""
    return os.environ.pop(ENV, "")

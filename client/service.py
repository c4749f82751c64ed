"""The vggt-cache HTTP API as calls: status, spec, features, precompute, jobs.

`ServiceClient` (blocking) and `AsyncServiceClient` share everything but the sending, as
`client.http`'s transports do: one or more URLs, the bearer token (default from
`$VGGT_CACHE_API_TOKEN`), retries and fail-over. The CLI, training's start-up check,
`FeatureCache` and the tests all talk to the service through them.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Sequence
from typing import Any, overload

import httpx
import torch

from vggt_cache.client.http import DEFAULT_TIMEOUT, DOWN_S, AsyncTransport, ServiceError, Transport
from vggt_cache.client.spec import FeatureSpec
from vggt_cache.client.wire import decode_features

ENV_PREFIX = "VGGT_CACHE_"  # the service's settings as environment variables: VGGT_CACHE_<FLAG>
TOKEN_ENV = ENV_PREFIX + "API_TOKEN"
MAX_TOKEN_FILE_BYTES = 4096

Features = tuple[list[dict], dict[str, torch.Tensor]]  # /features items (each with its "request"), tensors


@overload
def as_spec(spec: FeatureSpec | dict) -> FeatureSpec: ...
@overload
def as_spec(spec: None) -> None: ...
def as_spec(spec: FeatureSpec | dict | None) -> FeatureSpec | None:
    """A FeatureSpec from a spec, its `to_dict()`, or `/status`'s spec (with its "digest")."""
    if spec is None or isinstance(spec, FeatureSpec):
        return spec
    if not isinstance(spec, dict):
        raise TypeError(f"spec must be a FeatureSpec or a dict, got {type(spec).__name__}")
    fields = dict(spec)
    digest = fields.pop("digest", None)
    out = FeatureSpec.from_dict(fields)
    if digest is not None and digest != out.digest:
        raise ValueError(f"spec digest {digest} does not match its fields (digest {out.digest})")
    return out


def spec_of_status(body: Any) -> FeatureSpec:
    """The spec a service computes with, from its `/status` body; ValueError while it has none."""
    if not isinstance(body, dict):
        raise ValueError(f"/status answered {type(body).__name__}, not an object")
    if body.get("spec") is None:
        state = (body.get("service") or {}).get("state")
        raise ValueError(f"the service has no model loaded yet (state {state})")
    return as_spec(body["spec"])


def resolve_token(given: str | None = None) -> str | None:
    """The bearer token: `given`, else `$VGGT_CACHE_API_TOKEN`; empty means none."""
    return (given if given is not None else os.environ.get(TOKEN_ENV)) or None


def read_token_file(path: str) -> str:
    """The token in `path` (surrounding whitespace stripped); a file that is not regular, too large or holds no
    token is a ValueError. A file others may read is allowed (docker secrets are 0444) but logged."""
    from vggt_cache.client.safeopen import open_regular

    with open_regular(path, max_bytes=MAX_TOKEN_FILE_BYTES) as f:
        mode = os.fstat(f.fileno()).st_mode
        token = f.read().decode("utf-8").strip()
    if not token:
        raise ValueError("the file holds no token (it is empty or blank)")
    if mode & stat.S_IROTH:
        logging.getLogger("vggt_cache").warning("the API token file %s is readable by every user: chmod 600 it", path)
    return token


def features_payload(
    clips: Sequence[Sequence[str]], as_images: bool, wait: bool = True, skip_existing: bool = True
) -> dict:
    """`POST /features` body: the clips' last frames as images (frame mode), or the clips themselves."""
    if as_images:
        return {"images": [c[-1] for c in clips], "skip_existing": skip_existing, "wait": wait}
    return {"clips": [list(c) for c in clips], "skip_existing": skip_existing, "wait": wait}


class _Base:
    def __init__(
        self,
        service_url: str | Sequence[str] | None,
        api_token: str | None = None,
        timeout: float = 30.0,
        retries: int = 3,
        down_s: float = DOWN_S,
    ) -> None:
        self._transport = self._transport_class(service_url, resolve_token(api_token), timeout, retries, down_s)

    _transport_class: type = Transport

    @property
    def urls(self) -> tuple[str, ...]:
        return self._transport.urls

    @staticmethod
    def _features(response: httpx.Response, expected_digest: str | None) -> Features:
        return decode_features(response.content, expected_digest)


class ServiceClient(_Base):
    """Blocking calls; `with ServiceClient(url) as service: service.status()`."""

    def request(
        self,
        method: str,
        path: str,
        key: str | None = None,
        json: Any = None,
        retries: int | None = None,
        timeout: float | object | None = DEFAULT_TIMEOUT,
    ) -> httpx.Response:
        """One call, failing over between URLs and retrying; ServiceError when none answers 2xx."""
        return self._transport.request(method, path, key=key, json=json, retries=retries, timeout=timeout)

    def status(self) -> dict:
        return self.request("GET", "/status", retries=0).json()

    def spec(self) -> FeatureSpec:
        return spec_of_status(self.status())

    def features(self, payload: dict, expected_digest: str | None = None, key: str | None = None) -> Features:
        return self._features(self.request("POST", "/features", key=key, json=payload), expected_digest)

    def precompute(self, data_root: str, timeout: float | object | None = DEFAULT_TIMEOUT, **options: Any) -> dict:
        """A job view (`202`), or the plan of a dry run (`"dry_run": True`, which may take long: `timeout`)."""
        return self.request(
            "POST", "/precompute", json={"data_root": data_root, **options}, retries=0, timeout=timeout
        ).json()

    def job(self, job_id: str) -> dict:
        return self.request("GET", f"/jobs/{job_id}", retries=0).json()

    def cancel(self, job_id: str) -> dict:
        return self.request("DELETE", f"/jobs/{job_id}", retries=0).json()

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncServiceClient(_Base):
    """The same calls for asyncio code."""

    _transport_class = AsyncTransport

    async def request(
        self,
        method: str,
        path: str,
        key: str | None = None,
        json: Any = None,
        retries: int | None = None,
        timeout: float | object | None = DEFAULT_TIMEOUT,
    ) -> httpx.Response:
        return await self._transport.request(method, path, key=key, json=json, retries=retries, timeout=timeout)

    async def status(self) -> dict:
        return (await self.request("GET", "/status", retries=0)).json()

    async def spec(self) -> FeatureSpec:
        return spec_of_status(await self.status())

    async def features(self, payload: dict, expected_digest: str | None = None, key: str | None = None) -> Features:
        return self._features(await self.request("POST", "/features", key=key, json=payload), expected_digest)

    async def aclose(self) -> None:
        await self._transport.aclose()


__all__ = [
    "TOKEN_ENV",
    "AsyncServiceClient",
    "ServiceClient",
    "ServiceError",
    "as_spec",
    "features_payload",
    "read_token_file",
    "resolve_token",
    "spec_of_status",
]

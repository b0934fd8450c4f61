"""``serve.colocate_model``: the ingress holds the query model in its own process, and answers
exactly what the two-deployment layout answers (the shared session index and service)."""

from __future__ import annotations

import base64

import httpx
import pytest

from tests.conftest import draw_product, encode_image_bytes

pytestmark = pytest.mark.ray

APP = "colocated"
VOLATILE = {"request_id", "timings_ms"}  # per request, never equal


def _comparable(body):
    """A response without what differs between any two requests (ids, timings)."""
    if isinstance(body, dict):
        return {k: _comparable(v) for k, v in body.items() if k not in VOLATILE}
    if isinstance(body, list):
        return [_comparable(v) for v in body]
    if isinstance(body, float):
        return round(body, 4)  # one float32 pass vs another: the same up to float noise
    return body


def _requests() -> list[tuple[str, str, dict | None]]:
    image = base64.b64encode(encode_image_bytes(draw_product(7))).decode()
    searches = [
        {"text": "red striped lamp"},
        {"text": "hong se tai deng", "k": 5, "rerank_k": 8},
        {"image": image, "k": 4},
        {"text": "blue", "image": image, "k": 6},
        {"text": "lamp", "filter": "price < 100", "k": 3},
        {"text": ""},  # a 400, worded the same
        {"text": "lamp", "k": 10_000},  # a 400
    ]
    return [("POST", "/search", body) for body in searches] + [
        ("GET", "/healthz", None),
        ("GET", "/facets", None),
        ("GET", "/products/nope", None),  # a 404
    ]


def test_the_colocated_app_answers_as_the_two_deployment_app(search_index, search_url):
    from ray import serve

    from pipelines.serve_search import build_app

    cfg, _ = search_index
    colocated = cfg.model_copy(
        update={"serve": cfg.serve.model_copy(update={"colocate_model": True})}
    )
    serve.run(build_app(colocated), name=APP, route_prefix=f"/{APP}")
    try:
        with httpx.Client(timeout=120) as client:
            for method, path, body in _requests():
                two = client.request(method, search_url + path, json=body)
                one = client.request(method, f"{search_url}/{APP}{path}", json=body)
                assert one.status_code == two.status_code, (path, body, one.text, two.text)
                assert _comparable(one.json()) == _comparable(two.json()), (path, body)
        apps = serve.status().applications
        assert set(apps[APP].deployments) == {"SearchIngress"}  # the ingress alone
    finally:
        serve.delete(APP)

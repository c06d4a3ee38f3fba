"""Fuzz the live server with hypothesis: request bodies built from the server's own OpenAPI schema
for the stream routes (right field names, any JSON values) and random ``mm_processor_kwargs`` for
the processor. Nothing may answer 5xx, and the engine stays up."""

import json

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_plugin.client import open_stream

FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,  # nothing written into the repo
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


def _body_schema(openapi: dict, path: str, method: str = "post") -> dict:
    ref = openapi["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    return openapi["components"]["schemas"][ref.rsplit("/", 1)[1]]


def _bodies(schema: dict):
    """Dicts over the schema's field names (each present or not) with arbitrary JSON values, plus
    anything at all at the top level."""
    fields = {name: json_values for name in schema.get("properties", {})}
    return st.fixed_dictionaries({}, optional=fields) | json_values


@pytest.fixture(scope="module")
def openapi(dtd_server):
    return requests.get(dtd_server.base_url + "/openapi.json", timeout=30).json()


@pytest.fixture(scope="module")
def fuzz_stream(dtd_server, synthetic_clip):
    s = open_stream(dtd_server.base_url, fps=2.0)
    s.push(synthetic_clip.frames[:4])
    yield s
    s.close()


def _post(url, body):
    return requests.post(url, data=json.dumps(body), headers={"content-type": "application/json"}, timeout=120)


def test_fuzz_open_stream(dtd_server, openapi):
    opened = []

    @FUZZ
    @given(_bodies(_body_schema(openapi, "/v1/streams")))
    def run(body):
        r = _post(dtd_server.base_url + "/v1/streams", body)
        assert r.status_code < 500, (body, r.status_code, r.text[:300])
        if r.status_code == 200:
            opened.append(r.json()["id"])
            requests.delete(f"{dtd_server.base_url}/v1/streams/{opened[-1]}", timeout=30)

    run()
    assert requests.get(dtd_server.base_url + "/health", timeout=10).status_code == 200


def test_fuzz_append_and_ask(dtd_server, openapi, fuzz_stream):
    frames_schema = _body_schema(openapi, "/v1/streams/{stream_id}/frames")
    chat_schema = _body_schema(openapi, "/v1/streams/{stream_id}/chat/completions")

    @FUZZ
    @given(_bodies(frames_schema), _bodies(chat_schema))
    def run(frames_body, chat_body):
        r = _post(f"{fuzz_stream.url}/frames", frames_body)
        assert r.status_code < 500, (frames_body, r.status_code, r.text[:300])
        if isinstance(chat_body, dict):
            chat_body["max_tokens"] = 1  # keep each request short; the other fields stay fuzzed
            chat_body.pop("stream", None)
        r = _post(f"{fuzz_stream.url}/chat/completions", chat_body)
        assert r.status_code < 500, (chat_body, r.status_code, r.text[:300])

    run()
    assert fuzz_stream.status()["frames"] == 4  # no fuzzed append got in
    assert fuzz_stream.ask("still fine?", max_tokens=1)["usage"]["completion_tokens"] == 1


dtd_keys = st.sampled_from(["dtd_enabled", "dtd_threshold", "dtd_metric", "dtd_reference", "dtd_criterion", "dtd_x"])
dtd_values = (
    st.floats(-2, 2, allow_nan=False)
    | st.sampled_from(["l1", "cosine", "previous", "last_kept", "pixel", "feature", ""])
    | st.booleans()
    | json_values
)


def test_fuzz_processor_kwargs(dtd_server, synthetic_mp4):
    seen = set()

    @FUZZ
    @given(st.dictionaries(dtd_keys, dtd_values, max_size=4))
    def run(mm):
        r = _post(
            dtd_server.base_url + "/v1/chat/completions",
            {
                "model": dtd_server.model,
                "max_tokens": 1,
                "mm_processor_kwargs": mm,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "video_url", "video_url": {"url": f"file://{synthetic_mp4}"}},
                            {"type": "text", "text": "q"},
                        ],
                    }
                ],
            },
        )
        assert r.status_code in (200, 400), (mm, r.status_code, r.text[:300])
        seen.add(r.status_code)

    run()
    assert seen == {200, 400}  # the fuzzer reached both sides
    assert dtd_server.alive()


_fps = st.floats(1e-6, 60.0).map(lambda x: float(f"{x:.3g}"))
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(1, 48), st.one_of(st.none(), st.floats(1e-3, 1e5))),
        st.tuples(st.just("ask"), st.integers(1, 3), st.booleans()),
    ),
    min_size=1,
    max_size=6,
)


def test_random_legal_stream_sequences_never_take_the_engine_down(dtd_server, synthetic_clip):
    """Legal stream use with hypothesis picking the values (fps from 1e-6 to 60, frames up to 100,000 s
    apart, eager or lazy, questions that are remembered or not): whatever the server answers, the
    engine and /health survive every sequence."""
    frames = synthetic_clip.frames

    @settings(
        max_examples=12,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(_fps, st.sampled_from(["eager", "lazy"]), st.floats(0.0, 1.0), _ops)
    def run(fps, prefill, threshold, ops):
        r = _post(dtd_server.base_url + "/v1/streams", {"fps": fps, "prefill": prefill, "dtd_threshold": threshold})
        if r.status_code != 200:
            assert r.status_code < 500, r.text[:300]
            return
        url, t, i = f"{dtd_server.base_url}/v1/streams/{r.json()['id']}", 0.0, 0
        try:
            for op in ops:
                if op[0] == "append":
                    n, gap = op[1], op[2]
                    body = {"frames": [{"image": _png(frames[(i + k) % len(frames)])} for k in range(n)]}
                    if gap is not None:
                        for k, f in enumerate(body["frames"]):
                            f["timestamp"] = t + (k + 1) * gap
                        t += n * gap
                    i += n
                    _post(url + "/frames", body)
                else:
                    _post(
                        url + "/chat/completions",
                        {
                            "messages": [{"role": "user", "content": "what now?"}],
                            "max_tokens": op[1],
                            "remember": op[2],
                        },
                    )
        finally:
            requests.delete(url, timeout=60)
        assert requests.get(dtd_server.base_url + "/health", timeout=60).status_code == 200

    run()
    assert dtd_server.alive()
    assert dtd_server.client().completions.create(model=dtd_server.model, prompt="hi", max_tokens=1).choices


def _png(frame) -> str:
    import base64

    from vllm_plugin.media import encode_png

    return base64.b64encode(encode_png(frame)).decode()

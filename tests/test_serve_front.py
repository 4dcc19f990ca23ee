"""What protects `bertforge serve` from its requests, without a tritonserver: the HTTP front's
checks (serve/front.py) on the requests that killed tritonserver 2.51 and on the good
requests tritonclient builds, the checks on a JSON skeleton against the same checks on the
whole parsed body, the front as a proxy (byte-for-byte forwarding, keep-alive, concurrent
connections, 411/413/502, Expect: 100-continue) in front of a small stand-in upstream, and
the queue budget written into the served models' config.pbtxt. The same requests against a
real server: tests/test_serve.py. Runs in about a second.
"""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from bertforge.serve import front
from bertforge.serve.front import (MAX_JSON_DEPTH, HttpFront, Rejected, check_inputs,
                                   check_request, listen_socket)

LIMIT = 1 << 20


def tritonclient_body(arrays: dict, binary: bool) -> tuple[bytes, dict]:
    """Body and headers as tritonclient.http builds them."""
    httpclient = pytest.importorskip("tritonclient.http")
    inputs = []
    for name, array in arrays.items():
        t = httpclient.InferInput(name, list(array.shape),
                                  "BYTES" if array.dtype == object else "INT32")
        t.set_data_from_numpy(array, binary_data=binary)
        inputs.append(t)
    body, json_size = httpclient.InferenceServerClient.generate_request_body(inputs)
    return body, ({} if json_size is None
                  else {"inference-header-content-length": str(json_size)})


def bert_rows(batch: int, seq: int = 384) -> dict:
    rng = np.random.default_rng(batch)
    return {"input_ids": rng.integers(0, 30522, (batch, seq)).astype(np.int32),
            "attention_mask": np.ones((batch, seq), np.int32),
            "token_type_ids": np.zeros((batch, seq), np.int32)}


def qa_rows(context: str) -> dict:
    return {"question": np.array([[b"Who?"]], dtype=object),
            "context": np.array([[context.encode()]], dtype=object)}


def rejected(headers: dict, body: bytes, limit: int = LIMIT) -> Rejected:
    with pytest.raises(Rejected) as caught:
        check_request(headers, body, limit)
    message = str(caught.value)
    assert "\n" not in message and message.isascii() and len(message) < 300, message
    return caught.value


# ---------------------------------------------------------------- the checks
@pytest.mark.parametrize("binary", [False, True])
def test_requests_tritonclient_builds_pass(binary):
    for arrays in (bert_rows(1), bert_rows(32), qa_rows("Rollo led the Norse. " * 5000),
                   qa_rows("\U0001f600" * 1000)):
        body, headers = tritonclient_body(arrays, binary)
        check_request(headers, body, 16 << 20)
        check_request({**headers, "content-encoding": "gzip"}, gzip.compress(body), 16 << 20)
        check_request({**headers, "content-encoding": "deflate"}, zlib.compress(body), 16 << 20)
    check_request({}, b"", LIMIT)  # GET-like: no body
    check_request({}, b'{"log_info": true}', LIMIT)  # another endpoint's JSON


def test_the_requests_that_killed_tritonserver_are_rejected():
    huge = json.dumps({"inputs": [{"name": "input_ids", "shape": [1000000000, 128],
                                   "datatype": "INT32", "data": [1, 2, 3]}]}).encode()
    assert len(huge) < 1500  # 1.4 KB in the original report, with all three inputs
    err = rejected({}, huge)
    assert err.status == 400 and "'input_ids' declares shape [1000000000, 128]" in str(err)
    assert "declare the shape of the data sent" in str(err)
    assert "declares shape" in str(rejected({"content-encoding": "gzip"}, gzip.compress(huge)))
    nested = ('{"inputs":[{"name":"input_ids","shape":[1,64],"datatype":"INT32","data":'
              + "[" * 50_000 + "1" + "]" * 50_000 + "}]}").encode()
    err = rejected({}, nested)
    assert err.status == 400 and f"nests deeper than {MAX_JSON_DEPTH} levels" in str(err)
    # Just past the limit, at the top level and in "data", in a binary request's header.
    assert "nests deeper" in str(rejected({}, b"[" * 33 + b"]" * 33))
    deep_data = json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "INT32",
                                        "data": json.loads("[" * 40 + "1" + "]" * 40)}]})
    assert "nests deeper" in str(rejected({}, deep_data.encode()))
    assert "nests deeper" in str(rejected({"inference-header-content-length": "66"},
                                          b"[" * 33 + b"]" * 33 + b"\0" * 8))
    check_request({}, b"[" * 32 + b"]" * 32, LIMIT)


def test_shapes_are_bounded_by_what_the_request_holds():
    def inputs(**tensor):
        return [{"name": "x", "datatype": "INT32", **tensor}]

    # JSON: n elements need 2n - 1 bytes; an element more than the body can hold is refused.
    check_inputs(inputs(shape=[1, 50], data=[0] * 50), 99, 0)
    with pytest.raises(Rejected, match=r"\(51 elements\), more than the 100 bytes of JSON"):
        check_inputs(inputs(shape=[1, 51], data=[0] * 50), 100, 0)
    # Binary data: 4 bytes an INT32, within its binary_data_size and the body.
    check_inputs(inputs(shape=[2, 2], parameters={"binary_data_size": 16}), 50, 16)
    with pytest.raises(Rejected, match="more than its binary_data_size of 12 bytes"):
        check_inputs(inputs(shape=[2, 2], parameters={"binary_data_size": 12}), 50, 16)
    with pytest.raises(Rejected, match="add up to 32 bytes, more than the 16"):
        check_inputs(inputs(shape=[2, 4], parameters={"binary_data_size": 32}), 50, 16)
    # Shared memory: within its shared_memory_byte_size (Triton checks the region itself).
    shm = {"shared_memory_region": "r", "shared_memory_byte_size": 400}
    check_inputs(inputs(shape=[1, 100], parameters=shm), 50, 0)
    with pytest.raises(Rejected, match="shared_memory_byte_size of 400 bytes"):
        check_inputs(inputs(shape=[1, 101], parameters=shm), 50, 0)
    # Declaring binary data does not lift the JSON bound of a "data" also sent.
    with pytest.raises(Rejected, match="bytes of JSON"):
        check_inputs(inputs(shape=[1000, 1000], data=[1],
                            parameters={"binary_data_size": 4_000_000}), 100, 4_000_000)
    for shape in ([-5, 64], [1.5, 64], [True, 64], "1,64", [1] * 17, None):
        with pytest.raises(Rejected, match="must be a list of at most 16 non-negative"):
            check_inputs(inputs(shape=shape, data=[1]), 100, 0)
    with pytest.raises(Rejected, match='"inputs" must be a list'):
        check_inputs({"x": 1}, 100, 0)


def test_malformed_bodies_and_encodings():
    assert "twice" in str(rejected({}, b'{"inputs": [{"shape": [1000000000, 128], '
                                       b'"shape": [1, 1]}]}'))  # Triton reads the first
    assert "not valid JSON" in str(rejected({}, b"{not json"))
    assert rejected({"content-encoding": "br"}, b"{}").status == 415
    assert "not valid gzip" in str(rejected({"content-encoding": "gzip"}, b"plain"))
    # A second gzip member would reach Triton unchecked.
    two = gzip.compress(b'{"a": 1}') + gzip.compress(b"[" * 100 + b"]" * 100)
    assert "exactly one" in str(rejected({"content-encoding": "gzip"}, two))
    bomb = gzip.compress(b" " * (LIMIT + 1))
    err = rejected({"content-encoding": "gzip"}, bomb)
    assert err.status == 413 and "--max-request-bytes" in str(err)
    for length in ("0", "abc", "999999", "\u00b2"):  # (a superscript 2 passes isdigit)
        assert "Inference-Header-Content-Length" in str(
            rejected({"inference-header-content-length": length}, b"{}"))


def test_skeleton_checks_agree_with_checks_on_the_whole_parsed_body():
    """The reference path: json.loads of the whole body, the same check_inputs."""
    rng = np.random.default_rng(0)
    cases = []
    for batch, declared in ((1, 1), (32, 32), (2, 400_000)):
        rows = rng.integers(0, 30522, (batch, 384)).tolist()
        cases.append({"inputs": [{"name": "input_ids", "shape": [declared, 384],
                                  "datatype": "INT32", "data": rows}]})
    cases.append({"inputs": [{"name": "c", "shape": [1, 1], "datatype": "BYTES",
                              "data": ["[" + "1, " * 500 + "1]"]}]})  # a data-like string
    cases.append({"inputs": [{"name": "x", "shape": [2] * 40, "datatype": "INT32",
                              "data": [1] * 300}]})
    for case in cases:
        body = json.dumps(case).encode()
        try:
            check_inputs(json.loads(body)["inputs"], len(body), 0)
            want = None
        except Rejected as err:
            want = str(err)
        try:
            check_request({}, body, 16 << 20)
            got = None
        except Rejected as err:
            got = str(err)
        assert (got is None) == (want is None), (got, want)


# ---------------------------------------------------------------- the proxy
class Upstream(BaseHTTPRequestHandler):
    """A stand-in tritonserver: answers each request with what it received."""

    protocol_version = "HTTP/1.1"
    seen: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        Upstream.seen.append((self.command, self.path, dict(self.headers), body))
        reply = json.dumps({"path": self.path, "bytes": len(body),
                            "crc": zlib.crc32(body)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    do_GET = do_POST

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("Content-Length", "42")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def proxy():
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=upstream.serve_forever, args=(0.05,), daemon=True).start()
    Upstream.seen = []
    running = HttpFront(listen_socket("127.0.0.1", 0), upstream.server_address, LIMIT)
    running.start()
    yield running.listener.getsockname()[1], upstream
    running.stop()
    upstream.shutdown()
    upstream.server_close()
    assert running.failure is None


def test_good_requests_are_forwarded_unchanged_on_kept_alive_connections(proxy):
    port, _ = proxy
    body, headers = tritonclient_body(bert_rows(4), binary=True)
    headers = {"Inference-Header-Content-Length": headers["inference-header-content-length"]}
    conn = http.client.HTTPConnection("127.0.0.1", port)
    for path, body, headers in (("/v2/models/bert/infer", body, headers),
                                ("/v2/models/bert/versions/1/infer", body, headers),
                                ("/v2/logging", b'{"log_info": true}', {})):
        conn.request("POST", path, body=body, headers=headers)
        reply = conn.getresponse()
        assert reply.status == 200
        assert json.loads(reply.read()) == {"path": path, "bytes": len(body),
                                            "crc": zlib.crc32(body)}
    conn.request("GET", "/v2/health/ready")
    assert conn.getresponse().read()
    conn.request("HEAD", "/v2/health/ready")
    reply = conn.getresponse()
    assert reply.status == 200 and reply.read() == b""
    first = conn.sock
    conn.request("GET", "/v2")
    conn.getresponse().read()
    assert conn.sock is first  # one connection all along: keep-alive
    assert len(Upstream.seen) == 5  # (the stand-in does not record HEAD)


def test_concurrent_clients(proxy):
    port, _ = proxy

    def client(i):
        conn = http.client.HTTPConnection("127.0.0.1", port)
        bodies = [json.dumps({"inputs": [{"name": "x", "shape": [1, i + k + 1],
                                          "datatype": "INT32", "data": [1] * (i + k + 1)}]
                              }).encode() for k in range(20)]
        for body in bodies:
            conn.request("POST", "/v2/models/bert/infer", body=body)
            assert json.loads(conn.getresponse().read())["crc"] == zlib.crc32(body)
        conn.close()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(client, range(8)))
    assert len(Upstream.seen) == 160


def raw_exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


def test_rejections_answer_in_tritons_error_shape_and_keep_the_connection(proxy):
    port, _ = proxy
    conn = http.client.HTTPConnection("127.0.0.1", port)
    bad = json.dumps({"inputs": [{"name": "input_ids", "shape": [1000000000, 128],
                                  "datatype": "INT32", "data": [1]}]}).encode()
    conn.request("POST", "/v2/models/bert/infer", body=bad)
    reply = conn.getresponse()
    assert reply.status == 400 and reply.getheader("Content-Type") == "application/json"
    assert "declares shape" in json.loads(reply.read())["error"]
    conn.request("POST", "/v2/models/bert/infer", body=b"{}")  # the same connection goes on
    assert conn.getresponse().status == 200
    assert [s[3] for s in Upstream.seen] == [b"{}"]  # the bad one never reached upstream


def test_oversize_chunked_and_expect(proxy):
    port, _ = proxy
    # Refused from its Content-Length alone, before the body is sent; the connection closes.
    reply = raw_exchange(port, b"POST /v2/models/bert/infer HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: %d\r\n\r\n" % (LIMIT + 1))
    assert reply.startswith(b"HTTP/1.1 413 ") and b"Connection: close" in reply
    assert f"{LIMIT + 1:,} bytes is over the limit of {LIMIT:,}".encode() in reply
    assert b"--max-request-bytes" in reply
    reply = raw_exchange(port, b"POST /v2/models/bert/infer HTTP/1.1\r\nHost: x\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 411 ") and b"Content-Length" in reply
    reply = raw_exchange(port, b"POST /v2/models/bert/infer HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: 2\r\nContent-Length: 2\r\n\r\n{}")
    assert reply.startswith(b"HTTP/1.1 400 ") and b"sent twice" in reply
    reply = raw_exchange(port, b"POST / HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n{}")
    assert reply.startswith(b"HTTP/1.1 400 ") and b"not a byte count" in reply
    reply = raw_exchange(port, b"POST /v2/models/bert/infer HTTP/1.1\r\nHost: x\r\n"
                         b"Expect: 100-continue\r\nContent-Length: 2\r\n\r\n{}")
    assert reply.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK")
    assert "Expect" not in Upstream.seen[-1][2]  # answered by the front, not forwarded
    reply = raw_exchange(port, b"GET / HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 431 ")
    assert raw_exchange(port, b"nonsense\r\n\r\n").startswith(b"HTTP/1.1 400 ")


def test_upstream_down_is_a_502_and_a_taken_port_a_one_line_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=f"port {port} \\(--http-port\\) on 127.0.0.1 is not "
                                             "available"):
            listen_socket("127.0.0.1", port)
    running = HttpFront(listen_socket("127.0.0.1", 0), ("127.0.0.1", front.free_loopback_port()),
                        LIMIT)
    running.start()
    try:
        reply = raw_exchange(running.listener.getsockname()[1],
                             b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 502 ") and b"tritonserver is not reachable" in reply
    finally:
        running.stop()


def test_a_front_that_cannot_serve_says_why():
    listener = listen_socket("127.0.0.1", 0)
    listener.close()  # what serve would see if its socket were gone
    broken = HttpFront(listener, ("127.0.0.1", 1), LIMIT)
    with pytest.raises(ValueError, match="the HTTP front could not start: "):
        broken.start()
    assert broken.failure  # serve's watch loop exits 1 with this line
    broken.stop()


# ---------------------------------------------------------------- the queue budget
@pytest.mark.parametrize("dynamic_batching", [True, False])
def test_the_request_budget_is_a_queue_policy_of_both_models(dynamic_batching):
    pytest.importorskip("tritonclient.grpc")
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from bertforge.serve.server import QA_INPUT_TENSORS, QA_OUTPUT_TENSORS, python_model_config
    for timeout_us in (0, 250_000):
        delay = 2000 if dynamic_batching else None
        max_batch = 8 if dynamic_batching else 1
        parsed = text_format.Parse(python_model_config(
            "bert_qa", max_batch, QA_INPUT_TENSORS, QA_OUTPUT_TENSORS, delay, {},
            request_timeout_us=timeout_us), model_config_pb2.ModelConfig())
        assert parsed.max_batch_size == max_batch
        policy = parsed.dynamic_batching.default_queue_policy
        if timeout_us:
            assert parsed.HasField("dynamic_batching")
            assert policy.default_timeout_microseconds == timeout_us
            assert policy.timeout_action == model_config_pb2.ModelQueuePolicy.REJECT
            assert policy.allow_timeout_override
            # Without dynamic batching: no queue delay, a 1-row batch: one request each.
            assert parsed.dynamic_batching.max_queue_delay_microseconds == (delay or 0)
        else:
            assert parsed.HasField("dynamic_batching") == dynamic_batching
            assert not parsed.dynamic_batching.HasField("default_queue_policy")


def test_serve_writes_its_request_timeout_into_bert():
    from bertforge.serve.server import ServeConfig, bert_config
    for batching in (True, False):
        config = bert_config(ServeConfig(checkpoint_input_dir="model", request_timeout_ms=250,
                                         dynamic_batching=batching, model_instances=2))
        assert "default_timeout_microseconds: 250000" in config
    # No budget: asked for none, or one instance (Triton stalls its queue policy then).
    for settings in ({"request_timeout_ms": 0, "model_instances": 2}, {"model_instances": 1}):
        config = bert_config(ServeConfig(checkpoint_input_dir="model", **settings))
        assert "queue_policy" not in config

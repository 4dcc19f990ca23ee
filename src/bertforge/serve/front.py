"""The HTTP front of `bertforge serve`: checks each request before tritonserver parses it.

Why. tritonserver 2.51 has no request size option and its HTTP front end trusts what a JSON
request declares; measured against `bertforge serve` (tiny model, 2 cores, 23 GB):
- an input declaring shape [1000000000, 128] (or [100000000, 64]) with 3 values of "data" (a
  ~100-byte body) makes Triton allocate the declared tensor before it compares it with the data:
  SIGABRT, the server is gone. [10000000, 64] allocates 2.5 GB and then answers 500.
- "data" nested 50,000 levels deep (100 KB) overflows the stack of its recursive reader:
  SIGSEGV (20,000 levels still parse; nesting at the top level of the body is harmless).
- a gzip body is inflated without a limit: 1 MB of gzip becomes 1 GB in Triton's memory, and
  the huge-shape request above kills it just as well when gzipped.
What does *not* crash it (Triton checks these before allocating): inputs sent as binary data
(Inference-Header-Content-Length) or in shared memory, whatever shape they declare; negative
or non-integer shape entries (500 "non-unsigned-integer"); a bad header length. gRPC checks
batch size and byte sizes before allocating too: huge shapes over raw or typed contents, and
a 1.1 GB message (Triton sets gRPC's limit to 2 GB, no option), are answered
INVALID_ARGUMENT; so gRPC goes to tritonserver directly.

What. `HttpFront` serves the public --http-port and forwards each request, unchanged, to
tritonserver's HTTP endpoint on an internal loopback port; `check_request` runs first on
every request that has a body, whatever its path (a check keyed on URL patterns could be
dodged by one Triton matches differently):
- the body, and a gzip/deflate body once inflated, is at most --max-request-bytes (413;
  Content-Length is read first, so a too-large body is refused before it is received; a
  chunked body gets 411: send Content-Length);
- it is JSON (for the binary extension, the header part), with no duplicate keys (Triton
  reads the first of duplicates, Python the last) and nested at most MAX_JSON_DEPTH deep;
- every input in "inputs" declares a shape of at most MAX_RANK non-negative integers whose
  element count the request can hold: 2 bytes of JSON per element (a digit and a comma), or
  the item size per element of its binary_data_size (which must fit in the body) or of its
  shared_memory_byte_size. So the largest tensor Triton can be made to allocate is ~4x the
  body (INT64 from JSON).
A rejected request gets Triton's JSON error shape, {"error": "<one line: what, what to do>"},
400 (413/411/415/431 as above); a good one is answered by Triton, byte for byte.

Cost, measured with benchmarks/bench_front.py (batch-1 `bert` requests as tritonclient.http
builds them, keep-alive, 2 cores shared by the clients, the front and tritonserver): +0.24 ms
p50 at 1 client on the tiny model at S 64 (1.07 -> 1.30 ms), 0.84x the direct throughput at
8 clients (1,645 vs 1,979 requests/s: the front's Python competes for the 2 cores); on the
mini model at S 128, +0.28 ms (6.6 -> 6.9 ms) and 1.02x at 8 clients. The checks parse a
JSON skeleton, not the data: arrays of 256+ characters of literals (a tensor's "data") are
replaced by 0 before json.loads, so a [32, 384] x 3 JSON body (245 KB) checks in 0.26 ms
where json.loads of all of it takes 2.5 ms, and a 100k-character context in 0.09 ms.
It runs in the `bertforge serve` process on one asyncio loop in its own thread: HTTP/1.1
keep-alive, one tritonserver connection per client connection, requests of a connection in
order. Each connection holds at most one body (--max-request-bytes) in memory.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import socket
import sys
import threading
import traceback
import zlib

MAX_JSON_DEPTH = 32  # an inference request needs ~3 + the tensor rank; Triton died at 50,000
MAX_RANK = 16
MAX_HEAD_BYTES = 64 * 1024  # request line + headers
# Bytes per element an input's declared bytes must hold (BYTES: its 4-byte length prefix).
ITEM_SIZE = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2,
             "UINT32": 4, "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8, "BYTES": 4}
# A long array of JSON literals (numbers, true/false/null): a tensor's data, never needed by
# the checks. It holds no quote, so a match lies wholly inside or wholly outside a string.
_LITERAL_ARRAY = re.compile(rb"\[[-+.,0-9aeEflnrstu \t\r\n]{256,}\]")
_DIGITS = re.compile(r"[0-9]{1,15}")  # str.isdigit() also takes other scripts' digits
_REASONS = {400: "Bad Request", 411: "Length Required", 413: "Content Too Large",
            415: "Unsupported Media Type", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 502: "Bad Gateway"}


class Rejected(Exception):
    """A request the front answers itself: HTTP `status` and a one-line `message`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------- the checks
def check_request(headers: dict[str, str], body: bytes, max_request_bytes: int) -> None:
    """Raise Rejected unless `body` (with its lower-cased `headers`) is safe to hand to
    tritonserver (module docstring); an empty body always is."""
    if not body:
        return
    encoding = headers.get("content-encoding", "").strip()
    if encoding in ("", "identity"):
        content = body
    elif encoding in ("gzip", "deflate"):  # exactly what Triton accepts (others: its 501)
        content = _inflate(body, max_request_bytes)
    else:
        raise Rejected(415, f"Content-Encoding {ascii(encoding[:40])} is not supported; send "
                       "the body plain, gzip or deflate")
    document, binary_bytes = content, 0
    if "inference-header-content-length" in headers:  # binary extension: JSON, then tensors
        length = headers["inference-header-content-length"].strip()
        if not _DIGITS.fullmatch(length) or not 0 < int(length) <= len(content):
            raise Rejected(400, f"Inference-Header-Content-Length {ascii(length[:20])} must be "
                           f"a number of bytes from 1 to the body's {len(content):,}")
        document, binary_bytes = content[:int(length)], len(content) - int(length)
    request = parse_json(document)
    if isinstance(request, dict) and "inputs" in request:
        check_inputs(request["inputs"], len(document), binary_bytes)


def _inflate(body: bytes, max_request_bytes: int) -> bytes:
    """The gzip or zlib (Triton takes either under both names) content of `body`, at most
    `max_request_bytes` of it."""
    inflater = zlib.decompressobj(wbits=47)  # 32 + 15: gzip or zlib header, detected
    try:
        content = inflater.decompress(body, max_request_bytes + 1)
    except zlib.error as err:
        raise Rejected(400, f"the body is not valid gzip/deflate data ({err})") from None
    if len(content) > max_request_bytes:
        raise Rejected(413, f"the body inflates to over {max_request_bytes:,} bytes, the limit "
                       "(--max-request-bytes); send fewer rows per request")
    if not inflater.eof or inflater.unused_data:
        # A second gzip member would be inflated by Triton but not checked here.
        raise Rejected(400, "the compressed body must be exactly one complete gzip/deflate "
                       "stream")
    return content


def _unique_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicate = next(k for k in keys if keys.count(k) > 1)
        raise Rejected(400, f"JSON key {ascii(duplicate[:40])} appears twice in one object; send "
                       "each key once")
    return dict(pairs)


def parse_json(document: bytes):
    """The JSON value of `document` with tensor data arrays replaced by 0; Rejected when it is
    not JSON, has duplicate keys or nests deeper than MAX_JSON_DEPTH."""
    skeleton = _LITERAL_ARRAY.sub(b"0", document)
    try:
        value = json.loads(skeleton, object_pairs_hook=_unique_keys)
    except RecursionError:  # ~1000 levels: json's own guard (below, the exact limit)
        raise Rejected(400, f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels; send "
                       "tensor data flat or as nested as its shape") from None
    except ValueError as err:
        raise Rejected(400, f"the request body is not valid JSON ({err})") from None
    todo = [(value, 1)]
    while todo:
        node, depth = todo.pop()
        if depth > MAX_JSON_DEPTH:
            raise Rejected(400, f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels; "
                           "send tensor data flat or as nested as its shape")
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, (dict, list)):
                todo.append((child, depth + 1))
    return value


def _number(value, what: str) -> int:
    if type(value) is not int or value < 0:
        raise Rejected(400, f"{what} must be a non-negative integer; got {ascii(value)[:40]}")
    return value


def check_inputs(inputs, json_bytes: int, binary_bytes: int) -> None:
    """Rejected unless each input of a (skeleton) "inputs" list declares a shape whose element
    count fits in what the request provides for it: its JSON (`json_bytes`, 2 bytes an
    element), its binary data (within `binary_bytes`) or its shared memory region."""
    if not isinstance(inputs, list) or not all(isinstance(t, dict) for t in inputs):
        raise Rejected(400, '"inputs" must be a list of tensors ({"name", "shape", '
                       '"datatype", "data" or "parameters"})')
    declared_binary = 0
    for i, tensor in enumerate(inputs):
        name = tensor.get("name")
        label = ascii(name[:40]) if isinstance(name, str) else f"#{i}"
        shape = tensor.get("shape")
        if (not isinstance(shape, list) or len(shape) > MAX_RANK
                or not all(type(d) is int and d >= 0 for d in shape)):
            raise Rejected(400, f"the shape of input {label} must be a list of at most "
                           f"{MAX_RANK} non-negative integers; got {ascii(shape)[:60]}")
        elements = math.prod(shape)
        size = ITEM_SIZE.get(tensor.get("datatype"), 1)
        parameters = tensor.get("parameters", {})
        if not isinstance(parameters, dict):
            raise Rejected(400, f'"parameters" of input {label} must be an object')
        # Every source the tensor names must hold it: Triton picks one, either must be safe.
        rooms = []
        if "shared_memory_region" in parameters:
            room = _number(parameters.get("shared_memory_byte_size"),
                           f"shared_memory_byte_size of input {label}")
            rooms.append((room, size, f"its shared_memory_byte_size of {room:,} bytes"))
        if "binary_data_size" in parameters:
            declared = _number(parameters["binary_data_size"],
                               f"binary_data_size of input {label}")
            declared_binary += declared
            rooms.append((declared, size, f"its binary_data_size of {declared:,} bytes"))
        if "data" in tensor or not rooms:
            # n elements take at least 2n - 1 bytes: a digit (or "") and a comma each.
            rooms.append((json_bytes + 1, 2, f"the {json_bytes:,} bytes of JSON"))
        for room, per_element, what in rooms:
            if elements * per_element > room:
                raise Rejected(400, f"input {label} declares shape {shape} ({elements:,} "
                               f"elements), more than {what} can hold; declare the shape of "
                               "the data sent")
    if declared_binary > binary_bytes:
        raise Rejected(400, f"the inputs' binary_data_size add up to {declared_binary:,} "
                       f"bytes, more than the {binary_bytes:,} after the inference header")


# ---------------------------------------------------------------- the proxy
def error_response(status: int, message: str, close: bool) -> bytes:
    """Triton's error shape, {"error": message}, as a whole HTTP/1.1 response."""
    body = json.dumps({"error": message}).encode()
    head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
            "Content-Type: application/json", f"Content-Length: {len(body)}"]
    if close:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def _headers(lines: list[bytes]) -> dict[str, str]:
    """Lower-cased header names -> values; Rejected on a malformed line or a repeated header
    whose meaning the front and Triton could read differently."""
    found: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise Rejected(400, "malformed HTTP header line")
        key = name.decode("latin-1").lower()
        if key in found and key in ("content-length", "transfer-encoding", "content-encoding",
                                    "inference-header-content-length", "expect"):
            raise Rejected(400, f"the {ascii(key)[1:-1]} header is sent twice")
        found[key] = value.decode("latin-1").strip()
    return found


async def read_request(head: bytes, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter, max_request_bytes: int
                       ) -> tuple[bytes, bytes, dict[str, str], bytes, bool]:
    """(method, head to forward, headers, body, close after it) of the request whose head is
    `head`, its body read. Rejected here means the body was not read: close after answering."""
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise Rejected(400, "malformed HTTP request line")
    headers = _headers(lines[1:])
    if "transfer-encoding" in headers:
        raise Rejected(411, "send the request body with a Content-Length header (chunked "
                       "bodies are not accepted)")
    length = headers.get("content-length", "0")
    if not _DIGITS.fullmatch(length):
        raise Rejected(400, f"Content-Length {ascii(length[:20])} is not a byte count")
    if int(length) > max_request_bytes:
        raise Rejected(413, f"the request body of {int(length):,} bytes is over the limit of "
                       f"{max_request_bytes:,} (--max-request-bytes); send fewer rows per "
                       "request")
    if "expect" in headers:
        # Answered here and not forwarded (curl waits for it before sending a body > 1 KB).
        if headers["expect"].lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        lines = [ln for ln in lines if not ln.lower().startswith(b"expect:")]
    body = await reader.readexactly(int(length)) if int(length) else b""
    connection = headers.get("connection", "").lower()
    close = "close" in connection or (parts[2] == b"HTTP/1.0" and
                                      "keep-alive" not in connection)
    return parts[0], b"\r\n".join(lines) + b"\r\n\r\n", headers, body, close


async def relay_response(method: bytes, up_reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> bool:
    """Copy one response from tritonserver to the client; False when the connections must
    close after it."""
    while True:
        try:
            head = await up_reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.write(error_response(502, "tritonserver closed the connection without an "
                                        "answer; it may be stopping or have failed", True))
            return False
        lines = head[:-4].split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        writer.write(head)
        if status >= 200:
            break  # 1xx: an interim answer, the response follows
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip().lower()
    keep = b"close" not in headers.get(b"connection", b"")
    if method == b"HEAD" or status in (204, 304):
        pass
    elif headers.get(b"transfer-encoding") == b"chunked":  # Triton's streaming responses
        while True:
            size_line = await up_reader.readuntil(b"\r\n")
            writer.write(size_line)
            size = int(size_line.split(b";", 1)[0], 16)
            if size == 0:
                while (trailer := await up_reader.readuntil(b"\r\n")) != b"\r\n":
                    writer.write(trailer)
                writer.write(trailer)
                break
            writer.write(await up_reader.readexactly(size + 2))
            await writer.drain()
    elif b"content-length" in headers:
        writer.write(await up_reader.readexactly(int(headers[b"content-length"])))
    else:  # the body runs to the end of the connection
        while chunk := await up_reader.read(1 << 16):
            writer.write(chunk)
        keep = False
    return keep


class HttpFront:
    """The front on `listener` (a bound socket), forwarding to tritonserver at `upstream`
    (host, port); `start` serves from a thread of its own, `stop` ends it, `failure` says
    why it stopped if it did on its own."""

    def __init__(self, listener: socket.socket, upstream: tuple[str, int],
                 max_request_bytes: int):
        self.listener, self.upstream = listener, upstream
        self.max_request_bytes = max_request_bytes
        self.failure: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._listening = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bertforge-http-front",
                                        daemon=True)

    def start(self) -> None:
        """Listen and serve; returns once connections are accepted (ValueError if not)."""
        self._thread.start()
        self._listening.wait()
        if self.failure:
            raise ValueError(f"the HTTP front could not start: {self.failure}")

    def stop(self) -> None:
        """Close the listener and every connection; a no-op before `start`."""
        if self._thread.ident is None:
            return
        if self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as err:  # noqa: BLE001 - reported by serve, which exits 1
            self.failure = f"{type(err).__name__}: {err}"
            traceback.print_exc(file=sys.stderr)
        else:
            if not self._stopping.is_set():
                self.failure = "its event loop ended"
        finally:
            self._listening.set()

    async def _main(self) -> None:
        self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
        connections: set[asyncio.Task] = set()

        async def on_connection(reader, writer):
            # asyncio sets TCP_NODELAY only on sockets made with proto IPPROTO_TCP, which an
            # accepted socket of a plain socket() is not: with Nagle on, a response written as
            # head then body waited ~40 ms for the client's delayed ACK (measured: 44 ms p50).
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connections.add(asyncio.current_task())
            try:
                await self._connection(reader, writer)
            except asyncio.CancelledError:
                pass  # stopped by `stop` (a cancelled handler task gets logged as an error)
            finally:
                connections.discard(asyncio.current_task())

        server = await asyncio.start_server(on_connection, sock=self.listener,
                                            limit=MAX_HEAD_BYTES, backlog=512)
        self._listening.set()
        await self._stopping.wait()
        server.close()
        for task in list(connections):
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        """One client connection: its requests in order, each checked, then forwarded on this
        connection's own tritonserver connection and its response relayed."""
        up: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return  # the client closed between requests
                except asyncio.LimitOverrunError:
                    writer.write(error_response(431, f"request headers over {MAX_HEAD_BYTES:,} "
                                                "bytes; send fewer or shorter headers", True))
                    return
                try:
                    method, forward, headers, body, close = await read_request(
                        head, reader, writer, self.max_request_bytes)
                except Rejected as rejected:  # its body is unread: the connection ends
                    writer.write(error_response(rejected.status, str(rejected), True))
                    return
                try:
                    check_request(headers, body, self.max_request_bytes)
                except Rejected as rejected:
                    writer.write(error_response(rejected.status, str(rejected), close))
                    if close:
                        return
                    continue
                if up is None:
                    try:
                        up = await asyncio.open_connection(*self.upstream)
                    except OSError as err:
                        writer.write(error_response(502, f"tritonserver is not reachable "
                                                    f"({err.strerror}); it is starting, "
                                                    "stopping or has failed", True))
                        return
                up[1].writelines((forward, body))  # one send: no delayed-ACK stall
                if not await relay_response(method, up[0], writer) or close:
                    return
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return  # the client or tritonserver went away mid-request
        except Exception:  # noqa: BLE001 - never a traceback to the client
            traceback.print_exc(file=sys.stderr)
            writer.write(error_response(500, "internal error in the HTTP front", True))
        finally:
            try:
                await writer.drain()  # the last answer, before the connection closes
            except ConnectionError:
                pass
            writer.close()
            if up is not None:
                up[1].close()


def listen_socket(host: str, port: int, flag: str = "--http-port") -> socket.socket:
    """A socket bound to (host, port), not yet listening (the front's: the port is held from
    start-up, connections are accepted once the models are ready); ValueError naming `flag`
    when the port cannot be bound."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    # As tritonserver binds: SO_REUSEADDR, so a port in TIME_WAIT counts as free.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ValueError(f"port {port} ({flag}) on {host} is not available "
                         f"({err.strerror}); stop what holds it or choose another "
                         f"{flag}") from None
    return sock


def free_loopback_port() -> int:
    """A port free on 127.0.0.1 now: tritonserver's internal HTTP port (if another process
    takes it before tritonserver binds, tritonserver exits naming it and serve exits 2)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

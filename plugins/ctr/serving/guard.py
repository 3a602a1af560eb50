"""Header limits for uvicorn's httptools protocol: 431 and close past a size or count limit.

uvicorn offers a header-size limit only for its pure-Python h11 protocol
(`h11_max_incomplete_event_size`) and none for the number of headers; httptools buffers a header
value until it ends, so a never-ending header grows memory and costs a parse per packet for ever.
This subclass counts the bytes of each request's head (request line + headers) as they arrive,
before the parser sees them, and the headers as the parser reports them; past either limit the
client gets `431 Request Header Fields Too Large` and the connection is closed.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ctr.serving.metrics import Metrics


class _TooMany(Exception):
    pass


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    max_header_bytes = 32 * 1024
    max_headers = 100
    metrics: Metrics | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True
        self._head_bytes = 0
        self._n_headers = 0
        self._refused = ""

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_head:
            end = data.find(b"\r\n\r\n")
            self._head_bytes += len(data) if end < 0 else end + 4
            if self._head_bytes > self.max_header_bytes:
                self._refuse(f"request header section exceeds {self.max_header_bytes} bytes")
                return
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._n_headers = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._n_headers += 1
        if self._n_headers > self.max_headers:
            raise _TooMany  # httptools stops parsing; send_400_response below answers 431
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True
        self._head_bytes = 0

    def send_400_response(self, msg: str) -> None:
        if self._n_headers > self.max_headers:
            self._refuse(f"more than {self.max_headers} request headers")
            return
        super().send_400_response(msg)

    def _refuse(self, why: str) -> None:
        self._refused = why
        body = f'{{"error":"{why}"}}'.encode()
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                             b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)
        self.transport.close()
        if self.metrics is not None:
            self.metrics.observe_request("(headers)", 431, 0.0)


def guarded_protocol(max_header_bytes: int, max_headers: int, metrics: Metrics | None = None) -> type[HttpToolsProtocol]:
    """A GuardedHttpToolsProtocol class with these limits (uvicorn takes the class as `http=`)."""
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,),
                {"max_header_bytes": max_header_bytes, "max_headers": max_headers, "metrics": metrics})

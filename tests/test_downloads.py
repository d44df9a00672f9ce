"""download_file under stress: concurrent fetches, silent hosts, stalls, web pages, offline mode.

Every server here is local: a file:// URL, an http.server or a bare socket on
127.0.0.1. Nothing touches the network.
"""

import hashlib
import http.server
import multiprocessing
import socket
import sys
import threading
import time

import pytest

from minilib import datasets as D
from minilib.datasets import DownloadError, download_file

PAYLOAD = bytes(range(256)) * 4096          # 1 MiB, every byte value


@pytest.fixture(autouse=True)
def online(monkeypatch):
    monkeypatch.delenv(D.OFFLINE_ENV, raising=False)


class Server(http.server.ThreadingHTTPServer):
    """A local HTTP server that counts its requests; ``handler_class`` decides the answer."""

    daemon_threads = True

    def __init__(self, handler_class):
        super().__init__(("127.0.0.1", 0), handler_class)
        self.requests = 0
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def url(self, name):
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


class Quiet(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass


class SlowFile(Quiet):
    """Sends PAYLOAD in 16 pieces, 40 ms apart, so that two downloads overlap."""

    def do_GET(self):
        self.server.requests += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        step = len(PAYLOAD) // 16
        for start in range(0, len(PAYLOAD), step):
            self.wfile.write(PAYLOAD[start:start + step])
            self.wfile.flush()
            time.sleep(0.04)


@pytest.fixture
def serve():
    servers = []

    def _serve(handler_class):
        servers.append(Server(handler_class))
        return servers[-1]

    yield _serve
    for server in servers:
        server.shutdown()
        server.server_close()


def _fetch_in_child(url, path, results):
    start = time.time()
    try:
        download_file(url, path, sha256=hashlib.sha256(PAYLOAD).hexdigest())
        results.put(("ok", start, time.time()))
    except BaseException as error:  # report anything to the parent
        results.put((f"{type(error).__name__}: {error}", start, time.time()))


@pytest.mark.skipif(sys.platform == "win32", reason="uses fork")
def test_two_processes_fetching_one_file_take_turns(tmp_path, serve):
    server = serve(SlowFile)
    path = tmp_path / "cache" / "weights.pt"
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    children = [context.Process(target=_fetch_in_child, args=(server.url("w.pt"), path, results))
                for _ in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=60)
    outcomes = [results.get(timeout=5) for _ in children]
    assert [outcome for outcome, _, _ in outcomes] == ["ok", "ok"]
    assert max(start for _, start, _ in outcomes) < min(end for _, _, end in outcomes)   # they overlapped
    assert path.read_bytes() == PAYLOAD
    assert server.requests == 1                 # the second process waited, then used the first's file
    assert not list(path.parent.glob("*.part"))


def test_leftovers_of_an_interrupted_download_are_cleared(tmp_path, serve):
    server = serve(SlowFile)
    stale = tmp_path / "weights.pt.x1y2z3.part"
    stale.write_bytes(b"half a file from a process that was killed")
    download_file(server.url("w.pt"), tmp_path / "weights.pt")
    assert (tmp_path / "weights.pt").read_bytes() == PAYLOAD
    assert not stale.exists()


def test_a_host_that_accepts_and_never_answers_fails_within_seconds(tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)                          # the kernel accepts connections; nobody answers
    try:
        start = time.perf_counter()
        with pytest.raises(DownloadError, match=r"127\.0\.0\.1:\d+ did not answer within 5 s") as error:
            download_file(f"http://127.0.0.1:{listener.getsockname()[1]}/w.pt", tmp_path / "w.pt")
        elapsed = time.perf_counter() - start
    finally:
        listener.close()
    assert elapsed < 8, elapsed                # the default timeout, not 20-30 s
    assert "put the file at" in str(error.value) and not (tmp_path / "w.pt").exists()


class Stalls(Quiet):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"x" * 10)
        self.wfile.flush()
        time.sleep(3)


def test_a_stalled_download_is_abandoned_after_read_timeout(tmp_path, serve):
    server = serve(Stalls)
    start = time.perf_counter()
    with pytest.raises(DownloadError, match="no data arrived for 1 s"):
        download_file(server.url("w.pt"), tmp_path / "w.pt", read_timeout=1)
    assert time.perf_counter() - start < 2.5
    assert not list(tmp_path.glob("w.pt*"))


class ClosesEarly(Quiet):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"x" * 10)             # then the connection closes


def test_a_connection_that_closes_early_saves_nothing(tmp_path, serve):
    server = serve(ClosesEarly)
    with pytest.raises(DownloadError, match=r"IncompleteRead|stopped after 10 of 1,000 bytes"):
        download_file(server.url("w.pt"), tmp_path / "w.pt")
    assert not list(tmp_path.glob("w.pt*"))


class LoginPage(Quiet):
    def do_GET(self):
        body = b"<!DOCTYPE html><html><body>Please sign in</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_a_web_page_instead_of_the_file_is_refused(tmp_path, serve):
    server = serve(LoginPage)
    with pytest.raises(DownloadError, match=r"answered with a web page \(text/html\)"):
        download_file(server.url("w.pt"), tmp_path / "w.pt")
    page = tmp_path / "page.html"               # a file:// URL says text/html too
    page.write_text("<html>404</html>")
    with pytest.raises(DownloadError, match="web page"):
        download_file(page.as_uri(), tmp_path / "w.pt")
    assert not list(tmp_path.glob("w.pt*"))


def test_a_wrong_size_is_refused_and_deleted(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(PAYLOAD)
    with pytest.raises(DownloadError, match=r"gave 1,048,576 bytes, but the file has 1,000.*download was deleted"):
        download_file(source.as_uri(), tmp_path / "w.pt", size=1000)
    assert not list(tmp_path.glob("w.pt*"))
    assert download_file(source.as_uri(), tmp_path / "w.pt", size=len(PAYLOAD)).read_bytes() == PAYLOAD


def test_a_folder_that_cannot_be_written_is_named(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(PAYLOAD)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    with pytest.raises(DownloadError, match=rf"cannot write into the folder {blocker / 'cache'}.*pick another"):
        download_file(source.as_uri(), blocker / "cache" / "w.pt", folder_hint=" (pick another)")


def test_offline_mode_stops_the_dataset_loaders_at_once(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the network was used although MINILIB_OFFLINE is set")

    monkeypatch.setattr(D.urllib.request, "urlopen", no_network)
    monkeypatch.setenv(D.OFFLINE_ENV, "1")
    with pytest.raises(DownloadError, match="MINILIB_OFFLINE is set, so nothing is downloaded") as error:
        D.load_mnist(tmp_path / "mnist", download=True)
    assert D.MNIST_URL in str(error.value) and str(tmp_path / "mnist") in str(error.value)
    with pytest.raises(DownloadError, match="MINILIB_OFFLINE is set") as error:
        D.load_cifar10(tmp_path / "cifar", download=True)
    assert D.CIFAR10_URL in str(error.value)
    assert not list(tmp_path.iterdir())
    monkeypatch.setenv(D.OFFLINE_ENV, "0")     # "0" means online
    assert not D.is_offline()


def test_an_http_error_status_is_reported(tmp_path, serve):
    class Missing(Quiet):
        def do_GET(self):
            self.send_error(404)

    server = serve(Missing)
    with pytest.raises(DownloadError, match="answered 404"):
        download_file(server.url("w.pt"), tmp_path / "w.pt")
    assert not list(tmp_path.glob("w.pt*"))

"""`sparse-eqv convert NAME`: foundation models by name, downloaded from a local HTTP server (loopback
only, `$SPARSE_EQV_FOUNDATIONS_URL`) that serves a small model written by mace-torch, cached, and
refused when the download is truncated, corrupt or impossible."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from pathlib import Path

import pytest

from sparse_eqv.cli import main
from sparse_eqv.errors import CheckpointError, DownloadError, UnsupportedModelError
from weights_convert.convert import resolve_checkpoint
from weights_convert.foundations import BASE_URL_ENV, MACE_FOUNDATIONS, resolve

NAME = "mace-off23-small"
FILE = MACE_FOUNDATIONS[NAME].file_name  # MACE-OFF23_small.model, as the release names it


class Server:
    """A loopback HTTP server holding one file; `mode` says how it answers, `hits` counts GET requests."""

    def __init__(self, body: bytes):
        self.body, self.mode, self.hits = body, "whole", 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.hits += 1
                if self.path != f"/{FILE}":
                    self.send_error(404)
                    return
                body = server.body
                if server.mode == "corrupt":  # right length, one byte changed in the middle
                    middle = len(body) // 2
                    body = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :]
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if server.mode == "truncated" else body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server(small_mace_model):
    served = Server(small_mace_model.read_bytes())
    yield served
    served.close()


@pytest.fixture
def caches(tmp_path, monkeypatch, server):
    """Fresh caches under tmp_path ($XDG_CACHE_HOME: ours in sparse_eqv/, mace-torch's in mace/)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("SPARSE_EQV_CACHE", raising=False)
    monkeypatch.setenv(BASE_URL_ENV, server.url)
    server.mode, server.hits = "whole", 0
    return tmp_path / "xdg" / "sparse_eqv", tmp_path / "xdg" / "mace"


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_convert_by_name_downloads_once_and_converts(tmp_path, caches, server, small_mace_model, capsys):
    ours, _ = caches
    assert main(["convert", NAME, "-o", str(tmp_path / "first")]) == 0
    cached = ours / f"{NAME}.model"
    assert cached.read_bytes() == small_mace_model.read_bytes()
    assert server.hits == 1 and not list(ours.glob("*.part"))
    config = json.loads((tmp_path / "first" / "config.json").read_text())
    assert config["source"]["kind"] == "mace" and config["source"]["path"] == str(cached.resolve())
    assert config["atomic_numbers"] == [1, 6, 7, 8, 9, 15, 16, 17, 35, 53]
    out = capsys.readouterr()
    assert f"downloading {NAME} from {server.url}/{FILE}" in out.err and f"{NAME} ({cached})" in out.out

    assert main(["convert", NAME, "-o", str(tmp_path / "second")]) == 0  # from the cache
    assert server.hits == 1
    assert (tmp_path / "second" / "config.json").read_text() == (tmp_path / "first" / "config.json").read_text()


def test_a_file_in_mace_torch_cache_is_used(caches, server, small_mace_model, monkeypatch):
    _, mace_cache = caches
    mace_cache.mkdir(parents=True)
    theirs = mace_cache / FILE  # where mace_off(model="small") keeps it
    theirs.write_bytes(small_mace_model.read_bytes())
    monkeypatch.setenv(BASE_URL_ENV, f"http://127.0.0.1:{_closed_port()}")
    assert resolve(NAME) == theirs
    # mace_mp() strips all but letters, digits and "_" from its file names
    assert MACE_FOUNDATIONS["mace-mp-0-medium"].mace_cache_file == "20231203mace128L1_epoch199model"


@pytest.mark.parametrize("mode, reason", [("truncated", "truncated"), ("corrupt", "CRC-32")])
def test_bad_download_is_deleted_never_converted(tmp_path, caches, server, mode, reason, capsys):
    ours, _ = caches
    server.mode = mode
    with pytest.raises(DownloadError, match=reason) as error:
        resolve(NAME, progress=False)
    assert f"put it at {ours / f'{NAME}.model'}" in str(error.value)
    assert not ours.exists() or not list(ours.iterdir())  # neither the file nor its .part is left
    assert main(["convert", NAME, "-o", str(tmp_path / "out")]) == 2
    assert reason in capsys.readouterr().err and not (tmp_path / "out").exists()
    server.mode = "whole"  # a later call starts over and succeeds
    assert resolve(NAME, progress=False).read_bytes() == server.body


def test_offline_fails_at_once_saying_where_to_put_the_file(caches, monkeypatch):
    ours, mace_cache = caches
    url = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv(BASE_URL_ENV, url)
    started = time.perf_counter()
    with pytest.raises(DownloadError) as error:
        resolve(NAME)
    assert time.perf_counter() - started < 5.0
    message = str(error.value)
    assert f"{url}/{FILE}: cannot connect" in message
    assert f"download {url}/{FILE} and put it at {ours / f'{NAME}.model'}" in message
    assert str(mace_cache / FILE) in message


def test_unknown_names_list_the_known_ones(caches, capsys):
    with pytest.raises(CheckpointError, match=r"not a model name we know \(closest: mace-mp-0b3-medium\)") as error:
        resolve_checkpoint("mace-mp-0b3-meduim")
    assert "mace-off23-small" in str(error.value) and "7net-0" in str(error.value)
    assert main(["convert", "MACE-OFF24-small", "-o", "unused"]) == 2
    assert "closest: mace-off23-small" in capsys.readouterr().err
    with pytest.raises(UnsupportedModelError, match="charge and spin"):
        resolve("mace-omol-0-extra-large")
    # bundled SevenNet names resolve as before, paths stay paths
    assert resolve_checkpoint("7net-0").is_file()
    assert resolve_checkpoint("missing.model") == Path("missing.model")


def test_http_error_names_the_status_and_our_cache_can_move(tmp_path, caches, server, monkeypatch):
    monkeypatch.setenv("SPARSE_EQV_CACHE", str(tmp_path / "elsewhere"))
    monkeypatch.setenv(BASE_URL_ENV, f"{server.url}/moved")
    with pytest.raises(DownloadError, match=r"moved/MACE-OFF23_small.model: the server answered HTTP 404") as error:
        resolve(NAME)
    assert f"put it at {tmp_path / 'elsewhere' / f'{NAME}.model'}" in str(error.value)

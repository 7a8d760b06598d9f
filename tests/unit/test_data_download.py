import dataclasses
import functools
import gzip
import io
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from helpers import write_cifar
from tasprune.cli import main
from tasprune.data import DataError, load_data
from tasprune.data import download as dl
from tasprune.data.cifar import load_cifar
from tasprune.data.idx import write_idx
from tasprune.data.integrity import md5_file


class _Handler(SimpleHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        type(self).requests.append(self.path)
        if self.path.endswith("/short.bin"):  # promises 1000 bytes, sends 10, hangs up
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"0123456789")
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A local HTTP server on 127.0.0.1 serving tmp_path/www; stopped after the test."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    www = tmp_path / "www"
    www.mkdir()
    handler = type("Handler", (_Handler,), {"requests": []})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield www, f"http://127.0.0.1:{httpd.server_address[1]}/files", handler.requests
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _serve_fashion_mnist(directory):
    directory.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for stem, array in (("train-images-idx3-ubyte", rng.integers(0, 256, (5, 28, 28))),
                        ("train-labels-idx1-ubyte", np.arange(5)),
                        ("t10k-images-idx3-ubyte", rng.integers(0, 256, (3, 28, 28))),
                        ("t10k-labels-idx1-ubyte", np.arange(3))):
        write_idx(directory / f"{stem}.gz", array.astype(np.uint8))
    return {p.name: md5_file(p) for p in directory.iterdir()}


def test_download_fashion_mnist_then_skip(server, tmp_path, monkeypatch):
    www, url, requests = server
    sums = _serve_fashion_mnist(www / "files")
    monkeypatch.setitem(dl.REMOTES, "fashion-mnist",
                        dataclasses.replace(dl.REMOTES["fashion-mnist"], files=sums))
    root = tmp_path / "data"
    assert main(["data", "download", "fashion-mnist", "--root", str(root), "--mirror", url,
                 "--quiet"]) == 0
    assert len(requests) == 4
    assert sorted(p.name for p in (root / "fashion-mnist").iterdir()) == sorted(sums)
    bundle = load_data(f"fashion-mnist:{root}")
    assert len(bundle.train) == 5 and bundle.test.labels.tolist() == [0, 1, 2]
    dl.download("fashion-mnist", root, mirror=url, quiet=True)  # verified copy: no request
    assert len(requests) == 4


def test_download_rejects_wrong_checksum_and_leaves_nothing(server, tmp_path, capsys):
    www, url, _ = server
    _serve_fashion_mnist(www / "files")  # not the official files: checksums differ
    root = tmp_path / "data"
    assert main(["data", "download", "fashion-mnist", "--root", str(root), "--mirror", url,
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte.gz: wrong checksum" in err
    assert "expected 8d4fb7e6c68d591d4c3dfef9ec88bf0d" in err and len(err.splitlines()) == 1
    assert list((root / "fashion-mnist").iterdir()) == []  # no temp or partial file


def test_download_cifar_tarball_is_extracted(server, tmp_path, monkeypatch):
    www, url, _ = server
    sums = write_cifar(tmp_path / "src", "cifar10")
    (www / "files").mkdir()
    archive = www / "files" / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setitem(dl.REMOTES, "cifar10", dataclasses.replace(
        dl.REMOTES["cifar10"], files={archive.name: md5_file(archive)}))
    root = tmp_path / "data"
    (root / "cifar-10-batches-py").mkdir(parents=True)  # a damaged earlier copy is replaced
    (root / "cifar-10-batches-py" / "junk").write_text("x")
    target = dl.download("cifar10", root, mirror=url, quiet=True, timeout=10)
    assert target == root / "cifar-10-batches-py"
    assert [p.name for p in root.iterdir()] == ["cifar-10-batches-py"]  # archive, temps gone
    assert not (target / "junk").exists()
    assert len(load_cifar(root, md5=sums).train) == 20


def test_download_errors(server, tmp_path):
    _, url, _ = server
    with pytest.raises(DataError, match=r"missing.tar.gz: download failed \(HTTP 404"):
        dl.fetch(f"{url}/missing.tar.gz", tmp_path / "m", "0" * 32, quiet=True, timeout=10)
    with pytest.raises(DataError, match=r"download truncated \(10 of 1000 bytes\)"):
        dl.fetch(f"{url}/short.bin", tmp_path / "s", "0" * 32, quiet=True, timeout=10)
    assert list(tmp_path.iterdir()) == [tmp_path / "www"]
    with pytest.raises(DataError, match="cannot download 'imagenet'"):
        dl.download("imagenet", tmp_path)


def _tar(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, kind in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = 3
                tar.addfile(info, io.BytesIO(b"abc"))
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)


@pytest.mark.parametrize("name, kind, message", [
    ("top/../../evil.txt", "file", "outside top/"),
    ("/tmp/evil.txt", "file", "outside top/"),
    ("other/evil.txt", "file", "outside top/"),
    ("top/link", "symlink", "a link or special file"),
])
def test_safe_extract_refuses_escapes(tmp_path, name, kind, message):
    archive = tmp_path / "a.tar.gz"
    _tar(archive, [("top/ok.txt", "file"), (name, kind)])
    (tmp_path / "root").mkdir()
    with pytest.raises(DataError, match=message):
        dl.safe_extract(archive, tmp_path / "root", "top")
    assert list((tmp_path / "root").iterdir()) == []
    assert not (tmp_path / "evil.txt").exists()


def test_safe_extract_rejects_corrupt_archive(tmp_path):
    archive = tmp_path / "a.tar.gz"
    _tar(archive, [("top/ok.txt", "file")])
    archive.write_bytes(gzip.compress(b"not a tar file at all" * 40))
    (tmp_path / "root").mkdir()
    with pytest.raises(DataError, match="cannot extract"):
        dl.safe_extract(archive, tmp_path / "root", "top")

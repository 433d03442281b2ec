"""The store server against the real clients: huggingface_hub in-process, transformers in a subprocess.

One small store is built per module and served on a free port; each test talks to it the way a compute
node would, and compares what arrives with the files that were imported.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from huggingface_hub import (
    HfApi,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.hf_api import RepoFile, RepoFolder

from hfhpc.errors import UsageError
from hfhpc.store.importer import import_folder
from hfhpc.store.layout import git_blob_sha1, repo_dir, sha256_file, snapshot_dir
from hfhpc.store.server import HubError, StoreServer, parse_range

SECRET = b"root:x:0:0:this must never be served\n"


@dataclass
class Served:
    url: str
    store: Path
    model_src: Path
    model_commit: str
    pr_src: Path
    pr_commit: str
    dataset_src: Path
    dataset_commit: str
    secret: Path


def _write_model(folder: Path, layers: int) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    (folder / "sub").mkdir(parents=True)
    config = {"model_type": "gpt2", "n_layer": layers, "n_head": 2, "n_embd": 8, "vocab_size": 16}
    (folder / "config.json").write_text(json.dumps(config))
    save_file({"w": np.arange(64, dtype=np.float32).reshape(8, 8) * layers}, str(folder / "model.safetensors"))
    (folder / "sub" / "notes.txt").write_text(f"a file in a subfolder, {layers} layers\n")


def _write_dataset(folder: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "data").mkdir(parents=True)
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    for i in range(2):
        table = pa.table({"text": [f"row {i}-{j}" for j in range(5)], "label": list(range(5))})
        pq.write_table(table, folder / "data" / f"train-0000{i}-of-00002.parquet")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("served")
    store = root / "store"
    model_src, pr_src, dataset_src = root / "model", root / "model-pr", root / "dataset"
    _write_model(model_src, layers=2)
    _write_model(pr_src, layers=3)
    _write_dataset(dataset_src)
    model_commit, _ = import_folder(store, "model", "org/tiny", model_src)
    pr_commit, _ = import_folder(store, "model", "org/tiny", pr_src, revision="refs/pr/1")
    dataset_commit, _ = import_folder(store, "dataset", "org/data", dataset_src)
    import_folder(store, "model", "solo", model_src)
    metric_src = root / "metric"
    metric_src.mkdir()
    (metric_src / "metric.py").write_text("VALUE = 1\n")
    import_folder(store, "space", "org/metric", metric_src)

    # Files outside the store that crafted links point at: none may ever be served or listed.
    secret = root / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_bytes(SECRET)
    evil_commit, _ = import_folder(store, "model", "org/evil", model_src)
    evil = snapshot_dir(store, "model", "org/evil", evil_commit)
    os.symlink(secret, evil / "absolute.txt")
    os.symlink(os.path.relpath(secret, evil), evil / "relative.txt")
    os.symlink(secret.parent, evil / "linked-dir")

    with StoreServer(store) as server:
        yield Served(
            server.url, store, model_src, model_commit, pr_src, pr_commit, dataset_src, dataset_commit, secret
        )


def _raw(url: str, method: str, path: str, headers: dict[str, str] | None = None, body: bytes | None = None):
    """One request with the path sent exactly as given (no client normalises ``..`` away)."""
    host_port = url.removeprefix("http://")
    conn = http.client.HTTPConnection(host_port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- downloads with the real client -----------------------------------------------------------------


def test_snapshot_download_model_matches_source(served: Served, tmp_path: Path) -> None:
    folder = snapshot_download("org/tiny", cache_dir=tmp_path, endpoint=served.url)
    assert Path(folder).name == served.model_commit
    assert _files(Path(folder)) == _files(served.model_src)
    # The client cached the listing we answered, and named the LFS blob by its sha256.
    blob = os.path.basename(os.readlink(Path(folder) / "model.safetensors"))
    assert blob == sha256_file(served.model_src / "model.safetensors")


def test_snapshot_download_dataset_matches_source(served: Served, tmp_path: Path) -> None:
    folder = snapshot_download("org/data", repo_type="dataset", cache_dir=tmp_path, endpoint=served.url)
    assert Path(folder).name == served.dataset_commit
    assert _files(Path(folder)) == _files(served.dataset_src)


def test_hf_hub_download_by_branch_sha_and_one_part_id(served: Served, tmp_path: Path) -> None:
    expected = (served.model_src / "sub" / "notes.txt").read_bytes()
    by_branch = hf_hub_download(
        "org/tiny", "sub/notes.txt", revision="main", cache_dir=tmp_path, endpoint=served.url
    )
    by_sha = hf_hub_download(
        "org/tiny", "notes.txt", subfolder="sub", revision=served.model_commit, cache_dir=tmp_path / "b",
        endpoint=served.url,
    )
    solo = hf_hub_download("solo", "config.json", cache_dir=tmp_path, endpoint=served.url)
    space = hf_hub_download("org/metric", "metric.py", repo_type="space", cache_dir=tmp_path, endpoint=served.url)
    assert Path(by_branch).read_bytes() == expected == Path(by_sha).read_bytes()
    assert Path(solo).read_bytes() == (served.model_src / "config.json").read_bytes()
    assert Path(space).read_text() == "VALUE = 1\n"
    # The branch resolved to the commit the store holds.
    assert (tmp_path / "models--org--tiny" / "refs" / "main").read_text() == served.model_commit


def test_percent_encoded_pr_revision(served: Served, tmp_path: Path) -> None:
    status, headers, body = _raw(served.url, "GET", "/api/models/org/tiny/revision/refs%2Fpr%2F1")
    assert status == 200 and json.loads(body)["sha"] == served.pr_commit
    path = hf_hub_download("org/tiny", "config.json", revision="refs/pr/1", cache_dir=tmp_path, endpoint=served.url)
    assert json.loads(Path(path).read_text())["n_layer"] == 3
    # Typed by hand, unencoded, it still resolves.
    status, headers, body = _raw(served.url, "GET", "/org/tiny/resolve/refs/pr/1/config.json")
    assert status == 200 and headers["X-Repo-Commit"] == served.pr_commit and json.loads(body)["n_layer"] == 3


def test_autoconfig_in_a_fresh_process(served: Served, tmp_path: Path) -> None:
    # transformers and huggingface_hub read HF_ENDPOINT at import, hence a subprocess.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=served.url, HF_HOME=str(tmp_path), HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1")
    code = (
        "from transformers import AutoConfig\n"
        "c = AutoConfig.from_pretrained('org/tiny')\n"
        "print(c.model_type, c.n_layer)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-2:] == ["gpt2", "2"]


# -- metadata -------------------------------------------------------------------------------------


def test_repo_info_model_and_dataset(served: Served) -> None:
    api = HfApi(endpoint=served.url)
    model = api.model_info("org/tiny")
    assert model.sha == served.model_commit and model.private is False and model.last_modified is not None
    assert {s.rfilename for s in model.siblings or []} == {"config.json", "model.safetensors", "sub/notes.txt"}
    weights = next(s for s in model.siblings or [] if s.rfilename == "model.safetensors")
    assert weights.lfs is not None and weights.lfs.sha256 == sha256_file(served.model_src / "model.safetensors")
    assert api.repo_info("org/tiny", revision="refs/pr/1").sha == served.pr_commit
    assert api.model_info("org/tiny", revision=served.model_commit, expand=["sha"]).sha == served.model_commit
    dataset = api.dataset_info("org/data")
    assert dataset.sha == served.dataset_commit
    assert {s.rfilename for s in dataset.siblings or []} == set(_files(served.dataset_src))


def test_list_repo_tree(served: Served) -> None:
    api = HfApi(endpoint=served.url)
    top = {e.path: e for e in api.list_repo_tree("org/tiny")}
    assert set(top) == {"config.json", "model.safetensors", "sub"}
    assert isinstance(top["sub"], RepoFolder)
    everything = {e.path: e for e in api.list_repo_tree("org/tiny", recursive=True)}
    assert {p for p, e in everything.items() if isinstance(e, RepoFile)} == set(_files(served.model_src))

    config = everything["config.json"]
    assert isinstance(config, RepoFile) and config.lfs is None
    assert config.blob_id == git_blob_sha1((served.model_src / "config.json").read_bytes())
    weights = everything["model.safetensors"]
    assert isinstance(weights, RepoFile) and weights.lfs is not None
    assert weights.lfs.sha256 == sha256_file(served.model_src / "model.safetensors")
    assert weights.size == weights.lfs.size == (served.model_src / "model.safetensors").stat().st_size

    inside = list(api.list_repo_tree("org/tiny", path_in_repo="sub", expand=True))
    assert [e.path for e in inside] == ["sub/notes.txt"] and inside[0].last_commit is not None
    data = [e.path for e in api.list_repo_tree("org/data", path_in_repo="data", repo_type="dataset")]
    assert data == ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree("org/tiny", path_in_repo="nope"))


def test_paths_info(served: Served) -> None:
    infos = HfApi(endpoint=served.url).get_paths_info("org/tiny", ["sub", "config.json", "missing.txt", "../x"])
    assert [(type(i).__name__, i.path) for i in infos] == [("RepoFolder", "sub"), ("RepoFile", "config.json")]
    # Other clients send JSON; the answer is the same.
    body = json.dumps({"paths": ["model.safetensors"], "expand": True}).encode()
    path = "/api/models/org/tiny/paths-info/main"
    status, _, answer = _raw(served.url, "POST", path, {"Content-Type": "application/json"}, body)
    (entry,) = json.loads(answer)
    assert status == 200 and entry["path"] == "model.safetensors" and entry["lfs"]["size"] == entry["size"]
    assert entry["lastCommit"]["id"] == served.model_commit


@pytest.mark.parametrize(
    "body",
    [b"[" * 100_000 + b"]" * 100_000, b'{"paths": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b'{"paths": {"a": 1}}',
     b'{"paths": [1, 2]}', b'{"paths": 7}', b"{not json"],
    ids=["deep-array", "deep-paths", "paths-object", "paths-numbers", "paths-number", "not-json"],
)
def test_a_malformed_paths_info_body_is_a_400_not_a_500(served: Served, body: bytes) -> None:
    path = "/api/models/org/tiny/paths-info/main"
    status, headers, answer = _raw(served.url, "POST", path, {"Content-Type": "application/json"}, body)
    assert status == 400, answer
    assert "error" in json.loads(answer)


def test_server_refuses_a_port_that_is_not_a_port(served: Served) -> None:
    for port in (99999, -1):
        with pytest.raises(UsageError, match="is not a TCP port"):
            StoreServer(served.store, port=port)


def test_file_metadata_has_etag_commit_and_size(served: Served) -> None:
    url = hf_hub_url("org/tiny", "model.safetensors", endpoint=served.url)
    meta = get_hf_file_metadata(url)
    weights = served.model_src / "model.safetensors"
    assert meta.commit_hash == served.model_commit
    assert meta.etag == sha256_file(weights) and meta.size == weights.stat().st_size
    meta = get_hf_file_metadata(hf_hub_url("org/tiny", "config.json", endpoint=served.url))
    assert meta.etag == git_blob_sha1((served.model_src / "config.json").read_bytes())


def test_subset_and_plain_copies(served: Served, tmp_path: Path) -> None:
    # A store may hold part of a repository, and a snapshot file may be a plain copy with no tree listing.
    store = tmp_path / "store"
    commit, _ = import_folder(store, "model", "org/part", served.model_src)
    snap = snapshot_dir(store, "model", "org/part", commit)
    (snap / "sub" / "notes.txt").unlink()
    config = snap / "config.json"
    data = config.read_bytes()
    config.unlink()
    config.write_bytes(data)
    (repo_dir(store, "model", "org/part") / "trees" / f"{commit}.json").unlink()
    with StoreServer(store) as server:
        api = HfApi(endpoint=server.url)
        listed = [e.path for e in api.list_repo_tree("org/part", recursive=True)]
        assert listed == ["config.json", "model.safetensors"]
        meta = get_hf_file_metadata(hf_hub_url("org/part", "config.json", endpoint=server.url))
        assert meta.etag == git_blob_sha1(data)
        weights = get_hf_file_metadata(hf_hub_url("org/part", "model.safetensors", endpoint=server.url))
        assert weights.etag == sha256_file(served.model_src / "model.safetensors")
        folder = snapshot_download("org/part", cache_dir=tmp_path / "cache", endpoint=server.url)
        assert sorted(_files(Path(folder))) == ["config.json", "model.safetensors"]
        with pytest.raises(EntryNotFoundError):
            hf_hub_download("org/part", "sub/notes.txt", cache_dir=tmp_path / "cache", endpoint=server.url)


# -- HTTP details -----------------------------------------------------------------------------------


def test_range_requests(served: Served) -> None:
    data = (served.model_src / "model.safetensors").read_bytes()
    n = len(data)
    path = "/org/tiny/resolve/main/model.safetensors"
    status, headers, body = _raw(served.url, "GET", path, {"Range": "bytes=10-"})
    assert (status, body, headers["Content-Range"]) == (206, data[10:], f"bytes 10-{n - 1}/{n}")
    status, headers, body = _raw(served.url, "GET", path, {"Range": "bytes=2-5"})
    assert (status, body, headers["Content-Length"]) == (206, data[2:6], "4")
    status, _, body = _raw(served.url, "GET", path, {"Range": "bytes=-4"})
    assert (status, body) == (206, data[-4:])
    status, headers, _ = _raw(served.url, "GET", path, {"Range": f"bytes={n}-"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{n}"
    status, headers, body = _raw(served.url, "HEAD", path)
    assert status == 200 and body == b"" and headers["Content-Length"] == str(n)
    assert headers["Accept-Ranges"] == "bytes" and headers["X-Linked-Size"] == str(n)
    assert headers["X-Linked-Etag"] == f'"{sha256_file(served.model_src / "model.safetensors")}"'


def test_parse_range_edge_cases() -> None:
    assert parse_range(None, 10) is None
    assert parse_range("bytes=0-0", 10) == (0, 0)
    assert parse_range("bytes=5-100", 10) == (5, 9)
    assert parse_range("bytes=-100", 10) == (0, 9)
    assert parse_range("bytes=0-1,4-5", 10) is None  # several ranges: whole file
    assert parse_range("items=0-1", 10) is None
    assert parse_range("bytes=5-2", 10) is None
    with pytest.raises(HubError) as e:
        parse_range("bytes=0-", 0)
    assert e.value.status == 416


def test_keep_alive_serves_several_requests_on_one_connection(served: Served) -> None:
    conn = http.client.HTTPConnection(served.url.removeprefix("http://"), timeout=10)
    try:
        sockets = []
        for path in ("/api/models/org/tiny", "/org/tiny/resolve/main/config.json", "/org/tiny/resolve/main/nope"):
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            assert response.getheader("Content-Length") is not None
            sockets.append(conn.sock)
        assert sockets[0] is sockets[1] is sockets[2] is not None
    finally:
        conn.close()


def test_not_found_codes(served: Served, tmp_path: Path) -> None:
    cases = [
        ("/api/models/org/nope", "RepoNotFound"),
        ("/api/datasets/org/tiny", "RepoNotFound"),  # a model is not a dataset
        ("/api/models/org/tiny/revision/nope", "RevisionNotFound"),
        ("/api/models/org/tiny/revision/" + "0" * 40, "RevisionNotFound"),
        ("/org/nope/resolve/main/config.json", "RepoNotFound"),
        ("/org/tiny/resolve/nope/config.json", "RevisionNotFound"),
        ("/org/tiny/resolve/main/missing.json", "EntryNotFound"),
        ("/org/tiny/resolve/main/sub", "EntryNotFound"),  # a folder is not a file
        ("/api/models/org/tiny/tree/main/missing", "EntryNotFound"),
    ]
    for path, code in cases:
        status, headers, body = _raw(served.url, "GET", path)
        assert (status, headers.get("X-Error-Code")) == (404, code), path
        assert "error" in json.loads(body)
    # The client caches a missing file per commit, which needs the commit on the 404.
    _, headers, _ = _raw(served.url, "HEAD", "/org/tiny/resolve/main/missing.json")
    assert headers["X-Repo-Commit"] == served.model_commit

    api = HfApi(endpoint=served.url)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/nope")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("org/tiny", revision="nope")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/nope", "config.json", cache_dir=tmp_path, endpoint=served.url)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("org/tiny", "config.json", revision="nope", cache_dir=tmp_path, endpoint=served.url)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("org/tiny", "missing.json", cache_dir=tmp_path, endpoint=served.url)


def test_writes_and_whoami_are_refused(served: Served) -> None:
    for method, path in [
        ("POST", "/api/repos/create"),
        ("POST", "/api/models/org/tiny/commit/main"),
        ("PUT", "/org/tiny/resolve/main/config.json"),
        ("DELETE", "/api/models/org/tiny"),
        ("PATCH", "/api/models/org/tiny"),
        ("POST", "/api/whoami-v2"),
        ("POST", "/api/datasets/org/data/paths-infox/main"),
    ]:
        status, headers, body = _raw(served.url, method, path, body=b"{}")
        assert status == 405 and "error" in json.loads(body), (method, path)
    status, _, body = _raw(served.url, "GET", "/api/whoami-v2")
    assert status == 401 and "error" in json.loads(body)
    # Still serving afterwards.
    assert _raw(served.url, "GET", "/api/models/org/tiny")[0] == 200


@pytest.mark.parametrize(
    "path",
    [
        "/org/tiny/resolve/main/../../../../../../etc/passwd",
        "/org/tiny/resolve/main/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/org/tiny/resolve/main/..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
        "/org/tiny/resolve/main/%2Fetc%2Fpasswd",
        "/org/tiny/resolve/main/..%5c..%5c..%5cetc%5cpasswd",
        "/org/tiny/resolve/..%2f..%2f..%2f..%2fetc/passwd",
        "/org/tiny/resolve/main/sub/%00notes.txt",
        "/api/models/org/tiny/tree/main/..%2F..%2F..",
        "/api/models/org/tiny/tree/main/%2e%2e",
        "/org/%2e%2e/resolve/main/config.json",
        "/org/evil/resolve/main/absolute.txt",
        "/org/evil/resolve/main/relative.txt",
        "/org/evil/resolve/main/linked-dir/secret.txt",
        "/org/tiny/resolve/main/%ff%fe",
    ],
)
def test_traversal_is_refused(served: Served, path: str) -> None:
    status, _, body = _raw(served.url, "GET", path)
    assert status in (400, 404), path
    assert b"root:" not in body and SECRET not in body


def test_links_out_of_the_repo_are_not_listed(served: Served) -> None:
    api = HfApi(endpoint=served.url)
    listed = {e.path for e in api.list_repo_tree("org/evil", recursive=True)}
    assert listed == {"config.json", "model.safetensors", "sub", "sub/notes.txt"}
    assert {s.rfilename for s in api.model_info("org/evil").siblings or []} == set(_files(served.model_src))


def test_server_refuses_a_missing_store(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        StoreServer(tmp_path / "nope")


def test_serve_prints_its_url_and_stops_on_sigterm(served: Served) -> None:
    code = "import sys; from hfhpc.store.server import serve; serve(sys.argv[1], '127.0.0.1', 0)"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(served.store)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith(f"serving {served.store} at http://127.0.0.1:")
        url = line.rsplit(" ", 1)[-1]
        status, headers, _ = _raw(url, "HEAD", "/org/tiny/resolve/main/config.json")
        assert status == 200 and headers["X-Repo-Commit"] == served.model_commit
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert proc.stderr is not None and proc.stderr.read() == ""  # quiet: no per-request log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

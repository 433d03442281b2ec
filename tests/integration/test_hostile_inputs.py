"""Nothing from a Hub, a lockfile or a folder writes outside the store.

The hostile Hub is a loopback HTTP server whose answers each test chooses (a ``sha`` or tree path
that climbs out of the store, a body cut short); ``hfhpc stage`` talks to it as to any endpoint.
Every test looks at the files around the store afterwards, not only at the exit code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from hfhpc.store.importer import import_folder
from hfhpc.store.layout import git_blob_sha1, sha256_file
from hfhpc.store.server import StoreServer
from tests.conftest import hfhpc
from tests.helpers import tree_digest, write_spec

GOOD_SHA = "a" * 40
PAYLOAD = b"pwned\n"


class HostileHub(ThreadingHTTPServer):
    """Answers like a Hub, with whatever ``sha``, tree listing and file bytes the test gives it.

    ``cut_at``: every file answer promises the whole body (``Content-Length``) but the connection
    closes once the file's byte ``cut_at`` would be sent (a dropped server or a truncating proxy);
    ``cut_once`` does that to the first answer only. ``Range: bytes=N-`` is honoured with 206.
    """

    daemon_threads = True

    def __init__(self, sha: str, listing: list[dict], body: bytes = PAYLOAD, cut_at: int | None = None,
                 cut_once: bool = False):
        self.sha, self.listing, self.body = sha, listing, body
        self.cut_at, self.cut_once = cut_at, cut_once
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header) of every request
        super().__init__(("127.0.0.1", 0), _HostileHandler)
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> HostileHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()


class _HostileHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: HostileHub

    def log_message(self, *args: object) -> None:
        pass

    def _json(self, payload: object) -> None:
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        hub = self.server
        hub.requests.append((self.path, self.headers.get("Range")))
        if self.path.startswith("/api/") and "/revision/" in self.path:
            return self._json({"sha": hub.sha})
        if self.path.startswith("/api/") and "/tree/" in self.path:
            return self._json(hub.listing)
        start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
        body = hub.body[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(hub.body) - 1}/{len(hub.body)}")
        self.end_headers()
        cut = hub.cut_at
        if cut is not None and hub.cut_once and len(hub.requests) > 3:
            cut = None  # revision, tree, first file answer: only that one is cut
        if cut is not None:
            self.wfile.write(body[: max(0, cut - start)])
            self.close_connection = True
            return
        self.wfile.write(body)


def _file(path: str, body: bytes = PAYLOAD, oid: str | None = None) -> dict:
    return {"type": "file", "path": path, "size": len(body), "oid": oid or git_blob_sha1(body)}


def _outside(tmp_path: Path, store: Path) -> dict[str, str]:
    """Every file around the store (the store itself left out)."""
    return {k: v for k, v in tree_digest(tmp_path).items() if not k.startswith(store.name + os.sep)}


def _stage_evil(store: Path, hub_url: str, lock: Path) -> subprocess.CompletedProcess:
    return hfhpc("--store", str(store), "stage", "--model", "evil/x", "--lock", str(lock),
                 env=dict(os.environ, HF_ENDPOINT=hub_url))


# -- 1. a hostile or tampered endpoint ----------------------------------------------------------------


@pytest.mark.parametrize(
    "sha, path, what",
    [
        (GOOD_SHA, "{victim}", "unsafe file path"),  # absolute: would replace the victim with a link
        (GOOD_SHA, "../../../../../victim", "unsafe file path"),
        (GOOD_SHA, "a/../../../../../../victim", "unsafe file path"),
        (GOOD_SHA, "a//b", "unsafe file path"),
        (GOOD_SHA, "a\\..\\..\\victim", "unsafe file path"),
        ("../../../../PWNED" + "0" * 23, "config.json", "unsafe commit"),
        ("../../../../victim", "config.json", "unsafe commit"),
    ],
    ids=["absolute-path", "dotdot-path", "dotdot-inside-path", "empty-part", "backslash", "sha-dotdot", "sha-victim"],
)
def test_a_hostile_hub_cannot_write_outside_the_store(tmp_path: Path, sha: str, path: str, what: str):
    store, lock = tmp_path / "store", tmp_path / "x.lock"
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    before = _outside(tmp_path, store)
    with HostileHub(sha, [_file(path.format(victim=victim))]) as hub:
        out = _stage_evil(store, hub.url, lock)
    assert out.returncode == 1, out.stdout + out.stderr
    assert what in out.stderr and "nothing was written" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not victim.is_symlink() and victim.read_text() == "precious\n"
    assert _outside(tmp_path, store) == before  # nothing created, replaced or removed around the store
    assert not list(store.rglob("PWNED*")) and not list(Path("/").glob("PWNED*"))
    assert not list((store / "hub").rglob("config.json")) and not list((store / "hub").rglob("victim"))


@pytest.mark.parametrize(
    "entry, what",
    [
        ({"type": "file", "path": "config.json", "size": 6, "oid": "../../../../victim"}, "unsafe oid"),
        ({"type": "file", "path": "w.safetensors", "size": 6, "oid": "b" * 40,
          "lfs": {"oid": "../../../../../victim", "size": 6}}, "unsafe lfs.oid"),
        ({"type": "file", "path": "config.json", "size": "6", "oid": "b" * 40}, "unsafe size"),
        ({"type": "file", "path": "config.json", "size": -1, "oid": "b" * 40}, "unsafe size"),
        ({"type": "file", "path": None, "size": 6, "oid": "b" * 40}, "unsafe file path"),
    ],
    ids=["oid", "lfs-oid", "size-string", "size-negative", "path-null"],
)
def test_every_field_of_a_tree_entry_is_checked(tmp_path: Path, entry: dict, what: str):
    store = tmp_path / "store"
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    before = _outside(tmp_path, store)
    with HostileHub(GOOD_SHA, [entry]) as hub:
        out = _stage_evil(store, hub.url, tmp_path / "x.lock")
    assert out.returncode == 1, out.stderr
    assert what in out.stderr, out.stderr
    assert _outside(tmp_path, store) == before


def test_a_listing_with_a_file_where_a_folder_must_be_is_refused(tmp_path: Path):
    store = tmp_path / "store"
    with HostileHub(GOOD_SHA, [_file("a"), _file("a/b")]) as hub:
        out = _stage_evil(store, hub.url, tmp_path / "x.lock")
    assert out.returncode == 1 and "a file is listed where it needs a folder" in out.stderr, out.stderr


def test_a_link_planted_in_the_store_cannot_redirect_a_write(tmp_path: Path):
    """Valid values, but a snapshot sub-folder of the store is a link out: the final check refuses."""
    store = tmp_path / "store"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    snap = store / "hub" / "models--evil--x" / "snapshots" / GOOD_SHA
    snap.mkdir(parents=True)
    os.symlink(elsewhere, snap / "sub")
    with HostileHub(GOOD_SHA, [_file("sub/config.json")]) as hub:
        out = _stage_evil(store, hub.url, tmp_path / "x.lock")
    assert out.returncode == 1 and "resolves outside" in out.stderr, out.stderr
    assert list(elsewhere.iterdir()) == []


def test_a_next_page_link_to_another_host_is_not_followed(tmp_path: Path):
    """The token goes with every page request: a listing may not send it to another host."""
    store = tmp_path / "store"
    with HostileHub(GOOD_SHA, [_file("config.json")]) as other, HostileHub(GOOD_SHA, [_file("config.json")]) as hub:
        original = _HostileHandler._json

        def with_link(self, payload):
            if "/tree/" in self.path and self.server is hub:
                data = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Link", f'<{other.url}/api/models/evil/x/tree/{GOOD_SHA}?cursor=2>; rel="next"')
                self.end_headers()
                self.wfile.write(data)
                return None
            return original(self, payload)

        _HostileHandler._json = with_link
        try:
            out = hfhpc("--store", str(store), "stage", "--model", "evil/x", "--lock", str(tmp_path / "x.lock"),
                        env=dict(os.environ, HF_ENDPOINT=hub.url, HF_TOKEN="hf_secret"))
        finally:
            _HostileHandler._json = original
    assert out.returncode == 1 and "it leads to another host" in out.stderr, out.stderr
    assert other.requests == []


# -- 2. a tampered lockfile ---------------------------------------------------------------------------


@pytest.fixture
def staged_lock(tmp_path: Path) -> tuple[Path, Path, str]:
    """A small model staged from a loopback store server: (store, lockfile, endpoint url)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text('{"model_type": "bert"}\n')
    (src / "notes.txt").write_text("hello\n")
    upstream = tmp_path / "upstream"
    import_folder(upstream, "model", "org/m", src)
    server = StoreServer(upstream).start()
    store, lock = tmp_path / "store", tmp_path / "m.lock"
    out = hfhpc("--store", str(store), "stage", "--model", "org/m", "--lock", str(lock), env=dict(os.environ, HF_ENDPOINT=server.url))
    assert out.returncode == 0, out.stderr
    yield store, lock, server.url
    server.stop()


def _tamper(lock: Path, **changes: object) -> None:
    data = json.loads(lock.read_text())
    f = next(f for f in data["assets"][0]["files"] if f["path"] == "notes.txt")
    for key, value in changes.items():
        if key in ("commit", "revision", "id", "kind"):
            data["assets"][0][key] = value
        else:
            f[key] = value
    lock.write_text(json.dumps(data))


def test_repair_with_a_tampered_blob_id_deletes_nothing_outside_the_store(staged_lock, tmp_path: Path):
    store, lock, url = staged_lock
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    # blobs/ → repo → hub → store → tmp_path: the victim, with a wrong size so that --repair removes it.
    _tamper(lock, blob_id="../../../../victim", size=1)
    out = hfhpc("--store", str(store), "stage", "--model", "org/m", "--lock", str(lock), "--repair",
                env=dict(os.environ, HF_ENDPOINT=url))
    assert out.returncode == 2, out.stderr
    assert "malformed lockfile" in out.stderr and "blob_id" in out.stderr
    assert victim.read_text() == "precious\n"


def test_stage_with_an_absolute_lockfile_path_does_not_replace_that_file(staged_lock, tmp_path: Path):
    store, lock, url = staged_lock
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    _tamper(lock, path=str(victim))
    out = hfhpc("--store", str(store), "stage", "--model", "org/m", "--lock", str(lock), env=dict(os.environ, HF_ENDPOINT=url))
    assert out.returncode == 2, out.stderr
    assert "malformed lockfile" in out.stderr and "the path is absolute" in out.stderr
    assert not victim.is_symlink() and victim.read_text() == "precious\n"


@pytest.mark.parametrize(
    "changes, says",
    [
        ({"size": "abc"}, "a size must be an integer"),
        ({"size": True}, "a size must be an integer"),
        ({"path": "../../etc/passwd"}, "the path has a '..' part"),
        ({"path": "a\x00b"}, "control character"),
        ({"sha256": "x" * 64}, "sha256"),
        ({"lfs": "yes"}, "not true or false"),
        ({"commit": "../../../../x"}, "commit"),
        ({"revision": "../../x"}, "revision"),
        ({"id": "../x"}, "id"),
    ],
    ids=["size-abc", "size-bool", "path-dotdot", "path-nul", "sha256", "lfs", "commit", "revision", "id"],
)
def test_every_lockfile_field_is_checked_with_a_one_line_error(staged_lock, changes: dict, says: str):
    store, lock, url = staged_lock
    _tamper(lock, **changes)
    before = tree_digest(store)
    out = hfhpc("--store", str(store), "stage", "--model", "org/m", "--lock", str(lock), env=dict(os.environ, HF_ENDPOINT=url))
    assert out.returncode == 2, out.stderr
    assert "malformed lockfile" in out.stderr and says in out.stderr, out.stderr
    assert "internal error" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert {k: v for k, v in tree_digest(store).items() if not k.startswith("hfhpc")} == {
        k: v for k, v in before.items() if not k.startswith("hfhpc")
    }


def test_check_does_not_hash_a_file_outside_the_store_named_by_the_lockfile(staged_lock, tmp_path: Path):
    store, lock, _ = staged_lock
    (tmp_path / "train.py").write_text("print('hello')\n")
    spec = write_spec(tmp_path / "m.yaml", "name: m\nrecipe: script\nscript: train.py\nmodel: org/m\nresources: {gpus_per_node: 0}\n")
    assert lock == spec.with_suffix(".lock")
    _tamper(lock, path="../../../../../../../../etc/passwd", size=os.path.getsize("/etc/passwd"))
    out = hfhpc("--store", str(store), "check", "--no-probe", str(spec))
    assert out.returncode == 2, out.stdout + out.stderr
    assert "malformed lockfile" in out.stderr and "'..' part" in out.stderr
    verified = store / "hfhpc" / "verified.json"
    assert not verified.exists() or "passwd" not in verified.read_text()


# -- 3. stage --from and links ------------------------------------------------------------------------


def test_stage_from_refuses_a_link_out_of_the_folder_naming_it(tmp_path: Path):
    secret = tmp_path / "home" / "secret"
    secret.parent.mkdir()
    secret.write_text("API_KEY=hunter2\n")
    clone = tmp_path / "clone"
    clone.mkdir()
    (clone / "config.json").write_text("{}")
    os.symlink(secret, clone / "tokenizer_config.json")
    store = tmp_path / "store"
    out = hfhpc("--store", str(store), "stage", "--model", "org/m", "--from", str(clone), "--lock", str(tmp_path / "x.lock"))
    assert out.returncode == 1, out.stderr
    assert "unsafe link 'tokenizer_config.json'" in out.stderr and "leads out of the folder" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    for p in store.rglob("*"):
        if p.is_file():
            assert b"hunter2" not in p.read_bytes(), p
    assert not (tmp_path / "x.lock").exists()


def test_stage_from_keeps_links_that_stay_inside_the_folder(tmp_path: Path):
    clone = tmp_path / "clone"
    (clone / "sub").mkdir(parents=True)
    (clone / "config.json").write_text('{"a": 1}')
    os.symlink("../config.json", clone / "sub" / "same.json")
    store = tmp_path / "store"
    out = hfhpc("--store", str(store), "stage", "--model", "org/m", "--from", str(clone), "--lock", str(tmp_path / "x.lock"))
    assert out.returncode == 0, out.stderr
    files = {f["path"] for f in json.loads((tmp_path / "x.lock").read_text())["assets"][0]["files"]}
    assert files == {"config.json", "sub/same.json"}


# -- 4. a body cut short ------------------------------------------------------------------------------


BIG = os.urandom(400_000)


def test_a_body_cut_short_once_is_resumed_with_range(tmp_path: Path):
    store = tmp_path / "store"
    with HostileHub(GOOD_SHA, [_file("model.bin", BIG)], body=BIG, cut_at=197_640, cut_once=True) as hub:
        out = _stage_evil(store, hub.url, tmp_path / "x.lock")
    assert out.returncode == 0, out.stderr
    files = [(p, r) for p, r in hub.requests if "/resolve/" in p]
    assert files == [(files[0][0], None), (files[0][0], "bytes=197640-")]
    snap = store / "hub" / "models--evil--x" / "snapshots" / GOOD_SHA / "model.bin"
    assert snap.read_bytes() == BIG


def test_a_body_always_cut_short_gives_up_after_bounded_attempts_without_a_checksum_error(tmp_path: Path):
    store = tmp_path / "store"
    with HostileHub(GOOD_SHA, [_file("model.bin", BIG)], body=BIG, cut_at=197_640) as hub:
        out = _stage_evil(store, hub.url, tmp_path / "x.lock")
    assert out.returncode == 1, out.stderr
    assert "checksum" not in out.stderr
    assert "the connection closed early on model.bin after 197640 of 400000 bytes, 6 attempts)" in out.stderr
    from hfhpc.store.fetch import RETRIES

    assert sum("/resolve/" in p for p, _ in hub.requests) == 1 + RETRIES  # one that progressed, then RETRIES that did not
    assert not list((store / "hub" / "models--evil--x" / "blobs").glob("[0-9a-f]*"))


def test_a_body_longer_than_listed_is_a_checksum_error_that_names_the_sizes(tmp_path: Path):
    store = tmp_path / "store"
    listed = _file("model.bin", BIG[:1000])
    with HostileHub(GOOD_SHA, [listed], body=BIG) as hub:
        out = _stage_evil(store, hub.url, tmp_path / "x.lock")
    assert out.returncode == 1, out.stderr
    assert "checksum mismatch for evil/x/model.bin: expected 1000 bytes, got more than 1000 bytes;" in out.stderr


# -- 5. one lockfile, several stages at once ----------------------------------------------------------


def test_concurrent_stages_of_different_assets_into_one_lockfile_keep_them_all(tmp_path: Path):
    upstream = tmp_path / "upstream"
    for i in range(3):
        src = tmp_path / f"src{i}"
        src.mkdir()
        (src / "config.json").write_text(json.dumps({"i": i}))
        (src / "weights.bin").write_bytes(os.urandom(200_000))
        import_folder(upstream, "model", f"org/m{i}", src)
    lock = tmp_path / "same.lock"
    with StoreServer(upstream) as server:
        procs = [
            subprocess.Popen([sys.executable, "-m", "hfhpc", "--store", str(tmp_path / "store"), "stage", "--model", f"org/m{i}",
                              "--lock", str(lock)], env=dict(os.environ, HF_ENDPOINT=server.url),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(3)
        ]
        results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], results
    assert sorted(a["id"] for a in json.loads(lock.read_text())["assets"]) == ["org/m0", "org/m1", "org/m2"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".same.lock")] == []  # the lock is gone


# -- 6. free space ------------------------------------------------------------------------------------


def _tmpfs(folder: Path, size: str):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)


def test_a_small_model_stages_on_a_small_filesystem_and_a_big_one_says_real_numbers(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "model.safetensors").write_bytes(os.urandom(401 * 1024))
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "config.json").write_text("{}")
    (tmp_path / "big" / "model.safetensors").write_bytes(os.urandom(6 * 1024 * 1024))
    upstream = tmp_path / "upstream"
    import_folder(upstream, "model", "org/small", src)
    import_folder(upstream, "model", "org/big", tmp_path / "big")
    small = tmp_path / "fs"
    _tmpfs(small, "5m")
    try:
        with StoreServer(upstream) as server:
            env = dict(os.environ, HF_ENDPOINT=server.url)
            ok = hfhpc("--store", str(small / "store"), "stage", "--model", "org/small", "--lock", str(tmp_path / "a.lock"), env=env)
            assert ok.returncode == 0, ok.stderr
            no = hfhpc("--store", str(small / "store"), "stage", "--model", "org/big", "--lock", str(tmp_path / "b.lock"), env=env)
        assert no.returncode == 1
        assert "no space left on the device holding" in no.stderr
        assert "7.0 MiB needed: 6.0 MiB of files and 1.0 MiB to spare;" in no.stderr and "MiB free" in no.stderr
        assert "0.00 GiB" not in no.stderr
    finally:
        subprocess.run(["umount", str(small)], check=False)


# -- 7. check --full ----------------------------------------------------------------------------------


def test_check_full_finds_bytes_changed_in_place_with_the_same_mtime(staged_lock, tmp_path: Path):
    store, lock, _ = staged_lock
    (tmp_path / "train.py").write_text("print('hello')\n")
    spec = write_spec(tmp_path / "m.yaml", "name: m\nrecipe: script\nscript: train.py\nmodel: org/m\nresources: {gpus_per_node: 0}\n")
    first = hfhpc("--store", str(store), "check", "--no-probe", str(spec))
    assert first.returncode == 0, first.stdout + first.stderr
    blob = next((store / "hub" / "models--org--m" / "snapshots").glob("*/notes.txt")).resolve()
    st = blob.stat()
    with open(blob, "r+b") as f:  # same inode, same size
        f.write(b"J")
    os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime: the remembered hash still matches the stamp
    quick = hfhpc("--store", str(store), "check", "--no-probe", str(spec))
    assert quick.returncode == 0, quick.stdout  # what --full exists for
    full = hfhpc("--store", str(store), "check", "--no-probe", "--full", str(spec))
    assert full.returncode == 1, full.stdout
    assert "notes.txt: corrupt (sha256 mismatch)" in full.stdout
    assert sha256_file(blob) != json.loads(lock.read_text())["assets"][0]["files"][1]["sha256"]


def test_stage_refuses_a_run_whose_model_links_out_of_it(tmp_path: Path):
    """``model: {from_run: …}`` imports the run's model/ as ``--from`` does: the same links are refused,
    before anything is staged."""
    secret = tmp_path / "home" / "secret"
    secret.parent.mkdir()
    secret.write_text("API_KEY=hunter2\n")
    model = tmp_path / "runs" / "sft" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    os.symlink(secret, model / "tokenizer_config.json")
    (model.parent / "summary.json").write_text("{}")
    spec = write_spec(tmp_path / "dpo.yaml", "name: d\nrecipe: dpo\nmodel: {from_run: runs/sft}\ndataset: org/prefs\n")
    store = tmp_path / "store"
    out = hfhpc("--store", str(store), "stage", str(spec), env=dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9"))
    assert out.returncode == 2, out.stderr
    assert "its model/ holds an unsafe link 'tokenizer_config.json': it leads out of the folder" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not store.exists() and not spec.with_suffix(".lock").exists()

    # Turned into a link out of the run, model/ itself is refused too.
    os.unlink(model / "tokenizer_config.json")
    os.rename(model, tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", model)
    out = hfhpc("--store", str(store), "stage", str(spec), env=dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9"))
    assert out.returncode == 2 and "holds no model/ folder" in out.stderr, out.stderr

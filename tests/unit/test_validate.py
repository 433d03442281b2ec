"""The validators every untrusted value passes through, the containment check, the free-space
decision, and the typed one-line errors for a bad endpoint or port."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hfhpc import env as hfenv
from hfhpc.errors import ChecksumError, UsageError
from hfhpc.store.fetch import space_margin, space_shortfall
from hfhpc.store.validate import (
    UnsafeInputError,
    blob_id_problem,
    commit_problem,
    contained,
    repo_path_problem,
    size_problem,
)
from tests.conftest import hfhpc

MiB = 1024 * 1024


@pytest.mark.parametrize(
    "path",
    ["config.json", "sub/model.safetensors", "a/b/c.txt", ".gitattributes", "a..b", "..a", "名前.txt", "a b.txt"],
)
def test_ordinary_repository_paths_are_accepted(path: str):
    assert repo_path_problem(path) is None


@pytest.mark.parametrize(
    "path",
    [
        "", "/etc/passwd", "../x", "../../../../x", "a/../../x", "a/./b", ".", "..", "a//b", "a/", "/",
        "a\\..\\x", "a\x00b", "a\nb", "．．/x", "a/．．/x",
        "x" * 5000, "a/" + "b" * 300, None, 5, ["a"],
    ],
)
def test_paths_that_could_leave_a_folder_are_refused(path: object):
    assert repo_path_problem(path) is not None


@pytest.mark.parametrize("value", ["a" * 40, "0123456789abcdef0123456789abcdef01234567"])
def test_commit_ids_are_40_lowercase_hex(value: str):
    assert commit_problem(value) is None


@pytest.mark.parametrize("value", ["A" * 40, "a" * 39, "a" * 41, "a" * 64, "../../../../PWNED" + "0" * 23, "", None, 1])
def test_other_commit_ids_are_refused(value: object):
    assert commit_problem(value) is not None


def test_blob_ids_are_git_sha1_or_sha256():
    assert blob_id_problem("b" * 40) is None and blob_id_problem("c" * 64) is None
    assert blob_id_problem("b" * 41) and blob_id_problem("../../../../tmp/x") and blob_id_problem(None)


@pytest.mark.parametrize("value, ok", [(0, True), (10, True), (-1, False), ("1", False), (True, False), (1.0, False), (None, False)])
def test_sizes_are_non_negative_integers(value: object, ok: bool):
    assert (size_problem(value) is None) == ok


def test_contained_refuses_a_target_whose_folder_is_a_link_out(tmp_path: Path):
    repo = tmp_path / "repo"
    (repo / "snapshots").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, repo / "snapshots" / "sub")
    assert contained(repo / "snapshots" / "new" / "file", repo) == repo / "snapshots" / "new" / "file"
    with pytest.raises(UnsafeInputError, match="resolves outside"):
        contained(repo / "snapshots" / "sub" / "file", repo)
    with pytest.raises(UnsafeInputError):
        contained(repo / ".." / "x", repo)
    with pytest.raises(UnsafeInputError):
        contained(Path("/etc/passwd"), repo)


def test_a_link_itself_may_be_replaced_even_when_it_points_out(tmp_path: Path):
    """Replacing or removing a link never follows it: only the folder above it must be inside."""
    repo = tmp_path / "repo"
    repo.mkdir()
    os.symlink("/etc/passwd", repo / "link")
    assert contained(repo / "link", repo) == repo / "link"


def test_the_free_space_margin_grows_with_the_download_and_stays_sane():
    assert space_margin(401 * 1024) == MiB
    assert space_margin(10 * 1024**3) == 512 * MiB
    assert space_margin(1024**4) == 1024**3
    assert space_shortfall(401 * 1024, 5 * MiB) == 0  # a 401 KiB model fits on 5 MiB
    assert space_shortfall(6 * MiB, 5 * MiB) == 2 * MiB
    assert space_shortfall(0, 0) == 0


def test_a_checksum_error_is_never_cut_mid_word():
    sizes = ChecksumError("org/m", "w.bin", "400000 bytes", "more than 400000 bytes").message
    assert sizes.endswith("expected 400000 bytes, got more than 400000 bytes")
    hashes = ChecksumError("org/m", "w.bin", "a" * 64, "b" * 64).message
    assert hashes.endswith("expected aaaaaaaaaaaa…, got bbbbbbbbbbbb…")


@pytest.mark.parametrize(
    "url", ["not a url", "ftp://mirror", "http://", "http://x:99999", "https://x/?a=1", "file:///etc/passwd", "huggingface.co"]
)
def test_a_bad_endpoint_is_a_usage_error_naming_the_variable(url: str):
    with pytest.raises(UsageError, match="HF_ENDPOINT .* is not a URL"):
        hfenv.endpoint({"HF_ENDPOINT": url})
    with pytest.raises(UsageError, match="--endpoint .* is not a URL"):
        hfenv.endpoint({}, given=url)


def test_good_endpoints_are_kept():
    assert hfenv.endpoint({}) == "https://huggingface.co"
    assert hfenv.endpoint({"HF_ENDPOINT": "http://10.0.0.1:8080/"}) == "http://10.0.0.1:8080"
    assert hfenv.endpoint({}, given="https://mirror.lab/hf") == "https://mirror.lab/hf"


def test_stage_and_serve_give_one_line_errors_for_a_bad_endpoint_and_port(tmp_path: Path):
    store = tmp_path / "store"
    store.mkdir()
    bad_env = hfhpc("--store", str(store), "stage", "--model", "a/b", "--lock", str(tmp_path / "x.lock"),
                    env=dict(os.environ, HF_ENDPOINT="not a url"))
    assert bad_env.returncode == 2
    assert bad_env.stderr.startswith("hfhpc: error: HF_ENDPOINT 'not a url' is not a URL")
    port = hfhpc("--store", str(store), "serve", "--port", "99999")
    assert port.returncode == 2
    assert port.stderr.strip() == "hfhpc: error: port 99999 is not a TCP port; choose a port from 0 (any free one) to 65535"
    assert not (tmp_path / "x.lock").exists()

"""The login-node path stays light, and the small commands do what they say."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from hfhpc.demo.build import MODEL_ID
from tests.conftest import hfhpc

HEAVY = ("torch", "transformers", "trl", "accelerate", "datasets", "evaluate")


def _imports_after(argv: list[str], env: dict[str, str]) -> tuple[int, list[str]]:
    code = (
        "import sys\nfrom hfhpc.cli.main import main\n"
        "try:\n"
        f"    rc = main({argv!r})\n"
        "except SystemExit as e:\n"
        "    rc = e.code\n"
        f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules])\n"
        "sys.exit(rc)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("HEAVY")][-1]
    return out.returncode, eval(line[len("HEAVY "):])


def test_help_and_stage_import_no_ml_library(hub, tmp_path: Path):
    env = dict(os.environ, HF_ENDPOINT=hub.url)
    assert _imports_after(["--help"], env) == (0, [])
    assert _imports_after([], env) == (2, [])  # bare `hfhpc` prints help, exits 2
    rc, heavy = _imports_after(["--store", str(tmp_path / "s"), "stage", "--model", MODEL_ID, "--lock", str(tmp_path / "l.lock"), "-q"], env)
    assert rc == 0 and heavy == []
    spec = tmp_path / "job.yaml"
    spec.write_text(f"name: x\nrecipe: script\nscript: t.py\nmodel: {MODEL_ID}\n")
    (tmp_path / "t.py").write_text("print('hi')\n")
    rc, heavy = _imports_after(["--store", str(tmp_path / "s"), "check", "--no-probe", str(spec)], env)
    assert heavy == []


def test_every_command_has_help():
    from hfhpc.cli.main import _available

    for name in _available():
        out = hfhpc(name, "--help")
        assert out.returncode == 0, (name, out.stderr)
        assert "usage: hfhpc" in out.stdout


def test_env_lines_eval_in_bash(tmp_path: Path):
    store = tmp_path / "store dir with 'quotes'"
    out = hfhpc("--store", str(store), "env", env=dict(os.environ, HF_TOKEN="hf_secret", PYTHONPATH="/site/x"))
    assert out.returncode == 0, out.stderr
    assert "hf_secret" not in out.stdout
    script = out.stdout + '\necho "HOME=$HF_HOME"; echo "OFF=$HF_HUB_OFFLINE"; echo "PP=$PYTHONPATH"; echo "TOK=${HF_TOKEN:-none}"\n'
    res = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=dict(os.environ, HF_TOKEN="hf_secret", PYTHONPATH="/site/x"))
    assert f"HOME={store}" in res.stdout
    assert "OFF=1" in res.stdout and "TOK=none" in res.stdout
    assert res.stdout.split("PP=")[1].split("\n")[0].endswith(":/site/x")


def test_doctor_reports_store_and_never_the_token(tmp_path: Path):
    out = hfhpc("--store", str(tmp_path / "s"), "doctor", "--json", env=dict(os.environ, HF_TOKEN="hf_secret"))
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["store"]["path"] == str(tmp_path / "s")
    assert info["libraries"]["huggingface_hub"]
    assert info["token"] == "set (HF_TOKEN)"
    assert "hf_secret" not in out.stdout


def test_serve_command_answers_like_the_hub(upstream_store: Path):
    proc = subprocess.Popen([sys.executable, "-m", "hfhpc", "--store", str(upstream_store), "serve", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving ")
        url = line.strip().rsplit(" at ", 1)[1]
        with urllib.request.urlopen(f"{url}/api/models/{MODEL_ID}") as r:
            assert len(json.loads(r.read())["sha"]) == 40
        req = urllib.request.Request(f"{url}/api/models/{MODEL_ID}", method="DELETE")
        try:
            urllib.request.urlopen(req)
            raise AssertionError("DELETE was accepted")
        except urllib.error.HTTPError as e:
            assert e.code == 405
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_store_location_precedence(tmp_path: Path):
    base = {k: v for k, v in os.environ.items() if k not in ("HFHPC_STORE", "HF_HOME")}
    def where(env: dict[str, str], *args: str) -> str:
        out = hfhpc(*args, "doctor", "--json", env=env)
        return json.loads(out.stdout)["store"]["path"]
    assert where(dict(base, HF_HOME=str(tmp_path / "h"))) == str(tmp_path / "h")
    assert where(dict(base, HF_HOME=str(tmp_path / "h"), HFHPC_STORE=str(tmp_path / "s"))) == str(tmp_path / "s")
    assert where(dict(base, HFHPC_STORE=str(tmp_path / "s")), "--store", str(tmp_path / "c")) == str(tmp_path / "c")
    assert where(dict(base, HOME=str(tmp_path))) == str(tmp_path / ".cache" / "huggingface")


def test_malformed_lockfile_is_one_line_error_and_debug_shows_traceback(tmp_path: Path):
    (tmp_path / "bad.lock").write_text('{"version": 1, "assets": [{"kind": "model"}]}')
    spec = tmp_path / "bad.yaml"
    spec.write_text(f"name: x\nrecipe: sft\nmodel: {MODEL_ID}\ndataset: org/d\n")
    out = hfhpc("--store", str(tmp_path / "s"), "check", str(spec), "--no-probe")
    assert out.returncode == 2
    assert out.stderr.strip() == f"hfhpc: error: {tmp_path / 'bad.lock'}: malformed lockfile (missing 'commit'); run `hfhpc stage` on the spec to write it again"
    debug = hfhpc("--store", str(tmp_path / "s"), "--debug", "check", str(spec), "--no-probe")
    assert "Traceback" in debug.stderr

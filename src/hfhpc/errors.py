"""Typed errors. Library code raises them; only the CLI turns them into a message and an exit code.

Each error carries the data it is about and the fix, so the CLI never matches on message text.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # a check or run failed for a reason the user can fix
EXIT_USAGE = 2  # bad usage or spec
EXIT_INTERRUPTED = 3  # stopped on a signal after writing a checkpoint: run again to resume


class HfhpcError(Exception):
    """Base class: ``message`` says what is wrong, ``fix`` what to do next."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.fix = fix

    def render(self) -> str:
        return f"{self.message}; {self.fix}" if self.fix else self.message

    def __reduce__(self):
        # Raised in a worker process (data preparation forks a pool), it is pickled back to the parent:
        # rebuilt from its fields, since the subclasses' constructors take other arguments than ``args``.
        return _rebuild, (type(self), self.args, self.__dict__)


def _rebuild(cls: type[HfhpcError], args: tuple, fields: dict) -> HfhpcError:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(fields)
    return error


class UsageError(HfhpcError):
    exit_code = EXIT_USAGE


class SpecError(UsageError):
    """A job spec that does not validate: the file, the key path and the fix."""

    def __init__(self, path: str, key: str, problem: str, fix: str | None = None):
        self.path = path
        self.key = key
        self.problem = problem
        where = f"{path}: {key}" if key else path
        super().__init__(f"{where}: {problem}", fix)


class InvalidRepoIdError(UsageError):
    def __init__(self, repo_id: str, reason: str):
        self.repo_id = repo_id
        super().__init__(
            f"invalid repository id {repo_id!r}: {reason}",
            "use the form 'name' or 'org/name' with letters, digits, '-', '_' and '.'",
        )


class RepoNotFoundError(HfhpcError):
    def __init__(self, kind: str, repo_id: str, endpoint: str):
        self.kind, self.repo_id, self.endpoint = kind, repo_id, endpoint
        super().__init__(
            f"{kind} {repo_id!r} was not found on {endpoint}",
            "check the id (and HF_TOKEN for a gated or private repository)",
        )


class RevisionNotFoundError(HfhpcError):
    def __init__(self, kind: str, repo_id: str, revision: str):
        self.kind, self.repo_id, self.revision = kind, repo_id, revision
        super().__init__(
            f"revision {revision!r} of {kind} {repo_id!r} was not found",
            "use a branch, tag or commit sha that exists",
        )


class EntryNotFoundError(HfhpcError):
    def __init__(self, kind: str, repo_id: str, revision: str, pattern: str):
        self.kind, self.repo_id, self.revision, self.pattern = kind, repo_id, revision, pattern
        super().__init__(
            f"no file of {kind} {repo_id!r}@{revision} matches {pattern!r}",
            "list the repository's files and fix --include",
        )


class EndpointUnreachableError(HfhpcError):
    def __init__(self, endpoint: str, detail: str):
        self.endpoint, self.detail = endpoint, detail
        super().__init__(
            f"cannot reach {endpoint} ({detail})",
            "run this on a login node with network access, or set HF_ENDPOINT to a reachable mirror",
        )


class AuthError(HfhpcError):
    def __init__(self, kind: str, repo_id: str):
        self.kind, self.repo_id = kind, repo_id
        super().__init__(
            f"access to {kind} {repo_id!r} was refused",
            "accept the model's terms on the Hub and export HF_TOKEN with a token that may read it",
        )


class ChecksumError(HfhpcError):
    def __init__(self, repo_id: str, filename: str, expected: str, actual: str):
        self.repo_id, self.filename, self.expected, self.actual = repo_id, filename, expected, actual
        super().__init__(
            f"checksum mismatch for {repo_id}/{filename}: expected {_short(expected)}, got {_short(actual)}",
            "the file was not kept; run the stage command again",
        )


def _short(value: str) -> str:
    """A hash cut to 12 digits (enough to tell two apart); anything else whole, never mid-word."""
    if len(value) > 12 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "…"
    return value


class DiskFullError(HfhpcError):
    def __init__(self, path: str, needed: int | None = None, detail: str | None = None):
        self.path, self.needed = path, needed
        need = f" ({detail})" if detail else f" ({needed / 2**30:.2f} GiB needed)" if needed else ""
        super().__init__(
            f"no space left on the device holding {path}{need}",
            "free space or point --store / HFHPC_STORE at a larger filesystem",
        )


class StoreLockedError(HfhpcError):
    def __init__(self, path: str, owner: str):
        self.path, self.owner = path, owner
        super().__init__(
            f"{path} is locked by {owner}",
            "wait for that stage to finish, or remove the lock if that process is gone",
        )


class LockfileError(UsageError):
    def __init__(self, path: str, problem: str, fix: str | None = None):
        self.path = path
        super().__init__(f"{path}: {problem}", fix or "run `hfhpc stage` on the spec to write it again")


class RunModelError(UsageError):
    """A spec's ``model: {from_run: …}`` names a folder whose model cannot be staged."""

    def __init__(self, run_dir: str, problem: str, fix: str):
        self.run_dir, self.problem = run_dir, problem
        super().__init__(f"model.from_run {run_dir}: {problem}", fix)


class SealNotActiveError(HfhpcError):
    """A process that must run sealed (``HFHPC_SEAL=1``) runs without the guard, or the guard's
    files are missing: running on would leave the network open without a word."""


class SlurmError(HfhpcError):
    def __init__(self, command: str, detail: str, fix: str | None = None):
        self.command, self.detail = command, detail
        super().__init__(f"{command} failed: {detail}", fix)


class NonFiniteLossError(HfhpcError):
    """Training produced a NaN or infinite loss (or gradient norm): stopped before saving such weights."""

    def __init__(self, step: int, what: str = "loss"):
        self.step, self.what = step, what
        super().__init__(
            f"the {what} became NaN or infinite at step {step}: training stopped, nothing from this step on was saved",
            "lower train.learning_rate (or set train.max_grad_norm), then start over with `hfhpc run SPEC --fresh` "
            "or resume from the last checkpoint with `hfhpc run SPEC`",
        )


class RunLockedError(HfhpcError):
    """Another process is using the run folder."""

    def __init__(self, run_dir: str, owner: str):
        self.run_dir, self.owner = run_dir, owner
        super().__init__(f"{run_dir} is in use by {owner}",
                         "wait for that run to finish, or give the spec another output_dir")


class RunDiffersError(UsageError):
    """The spec or lockfile no longer matches the job the run folder holds."""

    def __init__(self, run_dir: str, keys: list[str], command: str):
        self.run_dir, self.keys = run_dir, keys
        super().__init__(
            f"{run_dir} holds a run of a different job ({', '.join(keys)} changed since its job.json)",
            f"`{command} --fresh` starts over in a new folder, or restore the spec and lockfile to resume this run",
        )

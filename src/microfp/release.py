"""Publishing and fetching the pipeline's outputs through DVC remotes.

``microfp release OUTDIR`` packs DVC-tracked outputs (checkpoints, fingerprint tables, metrics, and
optionally the VE datasets) into a folder that *is* a DVC remote: DVC itself pushes them there
(``dvc push`` to a temporary remote, so the folder has DVC 3's cache layout, ``files/md5/xx/yyy...``
with directories as ``.dir`` JSON objects), and a ``manifest.json`` beside it lists every file's path,
size and md5, the DVC object it is stored as, and the git revision whose ``dvc.lock`` points to them.
Upload the folder to any static web host (or a Zenodo-style record that keeps paths); readers then
``dvc remote add --local -d release https://host/path`` and ``dvc pull`` (or ``microfp pull``).

``microfp pull [TARGETS]`` is ``dvc pull`` with the checks DVC leaves out (measured with DVC 3.67):

* an unreachable HTTP remote (closed port, DNS failure) makes ``dvc pull`` report "Some of the cache
  files do not exist neither locally nor on remote ... Is your cache up to date?", which blames the
  cache; ``microfp pull`` probes the remote first and says that it cannot be reached;
* an object whose content was corrupted on the remote is written to the workspace by ``dvc pull``
  with exit code 0 unless the remote has ``verify = true``; ``microfp pull`` always pulls with
  ``verify``, and when objects are rejected it names the files and the objects;
* a checkout at another git revision than the release's gets "missing cache files" from DVC;
  ``microfp pull`` compares ``dvc.lock`` with the release's manifest and names the revision;
* without targets, ``dvc pull`` tries every output of the project, also those the release does not
  hold; ``microfp pull`` pulls what the remote's manifest lists.

On failure nothing is left half-done: DVC does not check out an output whose objects are missing,
and an output that did not exist before the pull and is incomplete after it is removed.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from microfp.atomic import write_json
from microfp.errors import MicrofpError

#: What a release holds by default: checkpoints, fingerprint tables and metrics. Patterns match DVC
#: outputs by path (an output inside a matching folder, or matching the glob, is selected), so the
#: outputs of stages added later are released without changing this list.
DEFAULT_TARGETS: tuple[str, ...] = ("models", "data/fingerprints*", "metrics")
#: Added by ``--with-data``: the generated VE datasets (large).
DATA_TARGETS: tuple[str, ...] = ("data/ves",)
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "microfp-release/1"
_TMP_REMOTE = "microfp-release-tmp"


@dataclass(frozen=True)
class Output:
    """A DVC-tracked output (a file or a directory) and the md5 that dvc.lock or a .dvc file records."""

    path: str  # relative to the repository root, posix
    md5: str  # "" when not built yet; directories end in ".dir"
    stage: str
    dvcfile: str  # dvc.yaml (whose lock is dvc.lock) or the .dvc file

    @property
    def isdir(self) -> bool:
        return self.md5.endswith(".dir")


# --------------------------------------------------------------------------------------------------
# Selecting outputs


def _matches(path: str, pattern: str) -> bool:
    """Whether output ``path`` is selected by ``pattern`` (a path, a folder, or a glob)."""
    pattern = pattern.strip().rstrip("/")
    if pattern.startswith("./"):
        pattern = pattern[2:]
    if not pattern:
        return False
    parts = path.split("/")
    ancestors = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    if any(fnmatch.fnmatchcase(a, pattern) for a in ancestors):
        return True  # the output, or a folder that holds it
    return pattern.startswith(path + "/")  # a file inside a directory output: the whole output


def list_outputs(repo: Any) -> list[Output]:
    """Every cached output of the project (``cache: false`` outputs live in git, not in remotes)."""
    outs = []
    for out in repo.index.outs:
        if not out.use_cache:
            continue
        path = Path(os.path.relpath(out.fs_path, repo.root_dir)).as_posix()
        md5 = out.hash_info.value if out.hash_info and out.hash_info.value else ""
        dvcfile = Path(os.path.relpath(out.stage.dvcfile.path, repo.root_dir)).as_posix()
        outs.append(Output(path, md5, out.stage.addressing, dvcfile))
    return sorted(outs, key=lambda o: o.path)


def select_outputs(
    outputs: Sequence[Output], targets: Sequence[str] | None, with_data: bool = False
) -> list[Output]:
    """Outputs selected by ``targets`` (default: :data:`DEFAULT_TARGETS`, plus the datasets).

    Explicit targets must each select at least one built output; default patterns that select
    nothing (stages not added or not run yet) are skipped.
    """
    explicit = bool(targets)
    patterns = list(targets) if explicit else list(DEFAULT_TARGETS)
    if with_data:
        patterns += [p for p in DATA_TARGETS if p not in patterns]
    chosen: dict[str, Output] = {}
    for pattern in patterns:
        hits = [o for o in outputs if _matches(o.path, pattern)]
        built = [o for o in hits if o.md5]
        if explicit and not built:
            if hits:
                raise MicrofpError(
                    f"{pattern}: not built yet ({', '.join(o.path for o in hits)} not in dvc.lock); "
                    "run `dvc repro` first"
                )
            raise MicrofpError(f"{pattern}: not a DVC-tracked output of this project (see dvc.yaml)")
        chosen.update((o.path, o) for o in built)
    if not chosen:
        raise MicrofpError(
            f"nothing to release: no built output matches {', '.join(patterns)} (run `dvc repro`, or "
            "name outputs with --targets)"
        )
    return sorted(chosen.values(), key=lambda o: o.path)


# --------------------------------------------------------------------------------------------------
# Helpers


def _open_repo(root: Path, config: dict | None = None) -> Any:
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        return Repo(str(root), config=config)
    except NotDvcRepoError as err:
        raise MicrofpError(f"{root}: not a DVC repository (run it in the project's folder)") from err


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _object_relpath(md5: str) -> str:
    """Where DVC 3 stores an object in a remote or cache (relative to its root)."""
    return f"files/md5/{md5[:2]}/{md5[2:]}"


def _git(root: Path, *args: str) -> str | None:
    """Output of a git command (trailing whitespace removed), None when it fails."""
    try:
        result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.rstrip() if result.returncode == 0 else None


def _files_of(out: Output, read_object) -> list[dict]:  # noqa: ANN001 - callable(md5) -> bytes
    """The files of an output: [{path, md5}] (a directory's entries from its .dir object)."""
    if not out.isdir:
        return [{"path": out.path, "md5": out.md5}]
    entries = json.loads(read_object(out.md5))
    return [{"path": f"{out.path}/{e['relpath']}", "md5": e["md5"]} for e in entries]


# --------------------------------------------------------------------------------------------------
# Release


def release(
    outdir: Path,
    targets: Sequence[str] | None = None,
    with_data: bool = False,
    allow_dirty: bool = False,
    root: Path = Path("."),
) -> dict:
    """Push the selected outputs into ``outdir`` (a DVC remote layout) and write its manifest."""
    from dvc.exceptions import DvcException

    root = Path(root).resolve()
    outdir = Path(outdir).resolve()
    if outdir.exists() and not outdir.is_dir():
        raise MicrofpError(f"{outdir}: exists and is not a directory")

    with _open_repo(root) as repo:
        outputs = select_outputs(list_outputs(repo), targets, with_data)

    revision = _git(root, "rev-parse", "HEAD")
    if revision is not None and not allow_dirty:
        dvcfiles = sorted(
            {o.dvcfile for o in outputs} | {o.dvcfile[: -len("yaml")] + "lock" for o in outputs if o.dvcfile.endswith("dvc.yaml")}
        )
        dirty = _git(root, "status", "--porcelain", "--untracked-files=all", "--", *dvcfiles)
        if dirty:
            raise MicrofpError(
                f"{', '.join(line[3:] for line in dirty.splitlines())}: not committed; readers pull the "
                f"outputs that the committed dvc.lock names, so commit first (or pass --allow-dirty)"
            )

    outdir.mkdir(parents=True, exist_ok=True)
    paths = [o.path for o in outputs]
    try:
        with _open_repo(root, {"remote": {_TMP_REMOTE: {"url": str(outdir)}}}) as repo:
            repo.push(targets=paths, remote=_TMP_REMOTE)
    except DvcException as err:
        raise MicrofpError(f"dvc push to {outdir} failed: {_one_line(err)}") from err

    # Check what DVC pushed, object by object, and describe it.
    def read_object(md5: str) -> bytes:
        return (outdir / _object_relpath(md5)).read_bytes()

    files, missing = [], []
    for out in outputs:
        if not (outdir / _object_relpath(out.md5)).is_file():
            missing.append(out.path)
            continue
        for entry in _files_of(out, read_object):
            obj = outdir / _object_relpath(entry["md5"])
            if not obj.is_file():
                missing.append(entry["path"])
                continue
            files.append({**entry, "size": obj.stat().st_size, "object": _object_relpath(entry["md5"])})
    if missing:
        raise MicrofpError(
            f"not in the local DVC cache, so not released: {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''} (run `dvc pull` or `dvc repro` first)"
        )

    from dvc import __version__ as dvc_version

    manifest = {
        "format": MANIFEST_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git": {
            "revision": revision,
            "remote": _git(root, "config", "--get", "remote.origin.url"),
            "dirty": bool(revision) and bool(_git(root, "status", "--porcelain", "--untracked-files=no")),
        },
        "dvc_version": dvc_version,
        "targets": list(targets) if targets else list(DEFAULT_TARGETS) + (list(DATA_TARGETS) if with_data else []),
        "outputs": [
            {
                "path": o.path,
                "md5": o.md5,
                "stage": o.stage,
                "object": _object_relpath(o.md5),
                "nfiles": sum(1 for f in files if f["path"] == o.path or f["path"].startswith(o.path + "/")),
                "size": sum(f["size"] for f in files if f["path"] == o.path or f["path"].startswith(o.path + "/")),
            }
            for o in outputs
        ],
        "files": sorted(files, key=lambda f: f["path"]),
        "total_size": sum(f["size"] for f in files),
    }
    write_json(outdir / MANIFEST, manifest)
    return manifest


# --------------------------------------------------------------------------------------------------
# Pull


def _probe(remote: Any) -> None:
    """Raise a one-line error when the remote cannot be reached at all."""
    url = str(remote.path)
    protocol = getattr(remote.fs, "protocol", "")
    protocol = protocol[0] if isinstance(protocol, (tuple, list)) else protocol
    if url.startswith(("http://", "https://")):
        request = urllib.request.Request(url.rstrip("/") + "/" + MANIFEST, method="HEAD")
        try:
            urllib.request.urlopen(request, timeout=20).close()
        except urllib.error.HTTPError:
            return  # it answers (a host may refuse HEAD or have no manifest): reachable
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise MicrofpError(
                f"remote '{remote.name}' ({url}) is unreachable: {_one_line(reason)}; nothing was pulled"
            ) from err
        return
    try:
        exists = remote.fs.exists(remote.path)
    except Exception as err:  # noqa: BLE001 - any transport error means: cannot reach it
        raise MicrofpError(
            f"remote '{remote.name}' ({url}) is unreachable: {_one_line(err)}; nothing was pulled"
        ) from err
    if not exists and protocol in ("local", "file", ""):
        raise MicrofpError(f"remote '{remote.name}' ({url}) does not exist; nothing was pulled")


def _read_manifest(remote: Any) -> dict | None:
    path = remote.fs.join(remote.path, MANIFEST)
    try:
        with remote.fs.open(path, mode="rb") as f:
            data = json.loads(f.read())
    except Exception:  # noqa: BLE001 - no manifest: a plain DVC remote
        return None
    return data if isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT else None


def _local_has(cache_root: Path, md5: str) -> bool:
    return (cache_root / _object_relpath(md5)).is_file()


def _missing_objects(cache_root: Path, out: Output) -> list[tuple[str, str]]:
    """(file path, md5) of the output's objects absent from the local cache."""
    if not _local_has(cache_root, out.md5):
        return [(out.path, out.md5)]
    entries = _files_of(out, lambda md5: (cache_root / _object_relpath(md5)).read_bytes())
    return [(e["path"], e["md5"]) for e in entries if not _local_has(cache_root, e["md5"])]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def pull(targets: Sequence[str] | None = None, remote_name: str | None = None, root: Path = Path(".")) -> list[str]:
    """``dvc pull`` of the targets with verification and one-line errors; returns the paths pulled."""
    from dvc.exceptions import DvcException

    root = Path(root).resolve()
    with _open_repo(root) as repo:
        name = remote_name or repo.config["core"].get("remote")
        if not name:
            raise MicrofpError("no DVC remote configured: `dvc remote add --local -d release URL` first")
        if name not in repo.config["remote"]:
            raise MicrofpError(f"no DVC remote named '{name}' (see `dvc remote list`)")
        outputs = list_outputs(repo)
        cache_root = Path(repo.cache.local.path).parents[1]  # .dvc/cache (path is .../files/md5)
        remote = repo.cloud.get_remote(name)
        _probe(remote)
        manifest = _read_manifest(remote)

    if targets:
        selected: dict[str, Output] = {}
        for pattern in targets:
            hits = [o for o in outputs if _matches(o.path, pattern)]
            if not hits:
                raise MicrofpError(f"{pattern}: not a DVC-tracked output of this project (see dvc.yaml)")
            selected.update((o.path, o) for o in hits)
        chosen = list(selected.values())
    elif manifest is not None:
        released = {o["path"] for o in manifest.get("outputs", [])}
        chosen = [o for o in outputs if o.path in released]
        if not chosen:
            raise MicrofpError(f"remote '{name}': none of its released outputs belongs to this project")
    else:
        chosen = [o for o in outputs if o.md5]
    unbuilt = [o.path for o in chosen if not o.md5]
    if unbuilt:
        raise MicrofpError(f"{', '.join(unbuilt)}: no md5 in dvc.lock (never built at this revision); nothing to pull")

    if manifest is not None:
        released = {o["path"]: o["md5"] for o in manifest.get("outputs", [])}
        rev = (manifest.get("git") or {}).get("revision") or "?"
        other = [o.path for o in chosen if o.path in released and released[o.path] != o.md5]
        absent = [o.path for o in chosen if o.path not in released]
        if other:
            raise MicrofpError(
                f"{', '.join(other)}: this checkout's dvc.lock names other data than release '{name}' "
                f"(made at git revision {rev[:12]}): `git checkout {rev[:12]}` first; nothing was pulled"
            )
        if absent:
            raise MicrofpError(f"{', '.join(absent)}: not in release '{name}' (see its {MANIFEST}); nothing was pulled")

    existed = {o.path: (root / o.path).exists() for o in chosen}
    paths = [o.path for o in chosen]
    error: BaseException | None = None
    try:
        with _open_repo(root, {"remote": {name: {"verify": True}}}) as repo:
            repo.pull(targets=paths, remote=name)
    except DvcException as err:
        error = err

    # Whatever DVC said, check each output's objects and the workspace ourselves.
    bad = [(o, _missing_objects(cache_root, o)) for o in chosen]
    bad = [(o, objs) for o, objs in bad if objs]
    if bad:
        for out, _ in bad:
            if not existed[out.path]:
                _remove(root / out.path)  # never leave a partial output behind
        with _open_repo(root) as repo:
            remote = repo.cloud.get_remote(name)
            problems = []
            for out, objs in bad:
                for path, md5 in objs[:3]:
                    obj = remote.fs.join(remote.path, _object_relpath(md5))
                    try:
                        present = remote.fs.exists(obj)
                    except Exception:  # noqa: BLE001
                        present = False
                    what = "corrupt (content does not match its md5)" if present else "missing on the remote"
                    problems.append(f"{path} ({_object_relpath(md5)}) {what}")
                if len(objs) > 3:
                    problems.append(f"{len(objs) - 3} more in {out.path}")
        raise MicrofpError(
            f"pull from remote '{name}' failed: {'; '.join(problems)}; not checked out: "
            f"{', '.join(o.path for o, _ in bad)} (the workspace keeps what it had)"
        )
    if error is not None:
        raise MicrofpError(f"dvc pull from remote '{name}' failed: {_one_line(error)}")
    missing = [o.path for o in chosen if not (root / o.path).exists()]
    if missing:
        raise MicrofpError(f"dvc pull reported success but {', '.join(missing)} is not in the workspace")
    return paths


# --------------------------------------------------------------------------------------------------
# Commands (registered in microfp.cli)


def release_command(
    outdir: Annotated[Path, typer.Argument(help="Folder to write the release into (created; earlier releases there are kept).")],
    targets: Annotated[
        Optional[list[str]],
        typer.Option(
            "--targets",
            "-t",
            help="DVC outputs to publish: paths, folders or globs (repeat the option) "
            f"(default: {', '.join(DEFAULT_TARGETS)}).",
        ),
    ] = None,
    with_data: Annotated[bool, typer.Option("--with-data", help=f"Also publish the datasets ({', '.join(DATA_TARGETS)}).")] = False,
    allow_dirty: Annotated[
        bool, typer.Option("--allow-dirty", help="Release even if dvc.lock has uncommitted changes.")
    ] = False,
) -> None:
    """Pack DVC-tracked outputs as a static DVC remote (DVC's cache layout) plus manifest.json.

    Upload OUTDIR to any static host; readers run `dvc remote add --local -d release URL` and
    `dvc pull` (or `microfp pull`) in a clone of the git revision recorded in the manifest.
    """
    manifest = release(outdir, targets, with_data, allow_dirty)
    rev = manifest["git"]["revision"] or "no git revision"
    typer.echo(
        f"{outdir}: {len(manifest['outputs'])} outputs, {len(manifest['files'])} files, "
        f"{manifest['total_size'] / 1e6:.1f} MB, git {rev[:12]} ({MANIFEST} lists them)"
    )
    for out in manifest["outputs"]:
        typer.echo(f"  {out['path']}  {out['md5']}")


def pull_command(
    targets: Annotated[
        Optional[list[str]],
        typer.Argument(help="Outputs to pull: paths, folders or globs (default: all in the remote's manifest.json, else all)."),
    ] = None,
    remote: Annotated[Optional[str], typer.Option("--remote", "-r", help="DVC remote (default: the project's default remote).")] = None,
) -> None:
    """`dvc pull` with verified downloads and one-line errors; the workspace is unchanged on failure.

    Unlike plain `dvc pull` it says when the remote cannot be reached, rejects (and names) corrupt
    objects even without `verify = true` on the remote, and pulls what a release holds.
    """
    paths = pull(targets, remote)
    typer.echo(f"pulled {len(paths)} outputs: {', '.join(paths)}")


def main(argv: Iterable[str] | None = None) -> int:
    """``python -m microfp.release {release,pull} ...``: the CLI's commands before they are wired in."""
    from microfp import cli

    cli.LAZY_COMMANDS.setdefault("release", ("microfp.release", "release_command"))
    cli.LAZY_COMMANDS.setdefault("pull", ("microfp.release", "pull_command"))
    return cli.main(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

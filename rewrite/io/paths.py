"""Output paths checked before any work, and written all together at the end (or not at all).

Every file the run reads (the model, each of its external-data files, the ``--inputs`` file or
folder) is read-only to us. ``plan_outputs`` refuses, up front, an output that is one of them
(through symlinks, hardlinks or ``..``), that collides with another output, that is a folder,
or whose folder is missing or not writable. ``OutputPlan.transaction()`` stages each output as a
temporary file beside its target (fsynced) and renames them all into place only when the run
succeeds; a failed or interrupted run removes what it staged and leaves the targets as they were.

Registering an output (CLI code)::

    plan = plan_outputs(inputs=[args.model, args.inputs],
                        outputs={"--output": args.output, "--report": args.report, "--html": args.html})
    ...work...
    with plan.transaction() as tx:
        tx.write_model("--output", model)         # + <output>.data when external data is used
        tx.write_text("--report", json_text)
        write_html(report, tx.stage("--html"))   # any writer that wants a path
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from onnx_fp16_rewrite.errors import BadInputError

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike


def _identity(p: Path) -> tuple:
    """What makes two paths the same file: the resolved path, and (dev, inode) when it exists."""
    resolved = Path(os.path.realpath(p))
    try:
        st = os.stat(resolved)
        return (str(resolved), (st.st_dev, st.st_ino))
    except OSError:
        return (str(resolved), None)


def _same(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] or (a[1] is not None and a[1] == b[1])


def _flat(inputs) -> list[Path]:
    """Paths given as items or (``--inputs a.npz b.npz``) lists of them; None skipped."""
    out: list[Path] = []
    for item in inputs:
        if isinstance(item, (list, tuple)):
            out += _flat(item)
        elif item is not None and str(item) != "":
            out.append(Path(item))
    return out


def input_files(inputs: Iterable) -> list[Path]:
    """Every file the run reads: each path given, plus the external-data files of ONNX models."""
    files: list[Path] = []
    for p in _flat(inputs):
        files.append(p)
        if p.is_file() and p.suffix.lower() == ".onnx":
            from onnx_fp16_rewrite.io.model_io import external_data_files

            files.extend(external_data_files(p))
    return files


@dataclass
class OutputPlan:
    """Outputs by option name, checked; ``transaction()`` writes them."""

    outputs: dict[str, Path]
    reserved: dict[str, Path] = field(default_factory=dict)  # e.g. <output>.data, written only if needed

    def path(self, option: str) -> Path | None:
        return self.outputs.get(option)

    def begin(self) -> _Transaction:
        """A transaction to ``commit()`` or ``discard()`` by hand (``transaction()`` does both)."""
        return _Transaction(self)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[_Transaction]:
        tx = _Transaction(self)
        try:
            yield tx
        except BaseException:
            tx.discard()
            raise
        tx.commit()


def plan_outputs(
    inputs: Iterable, outputs: Mapping[str, PathLike | None], *, model_outputs: Iterable[str] = ("--output",)
) -> OutputPlan:
    """Check every output before any work (see the module docstring); ``None`` outputs are skipped.

    An output named in ``model_outputs`` also reserves ``<output>.data`` (external data)."""
    read = [(_identity(p), p) for p in input_files(inputs)]
    inputs = _flat(inputs)
    read_dirs = [Path(os.path.realpath(p)) for p in inputs if p.is_dir()]
    chosen = {opt: Path(p) for opt, p in outputs.items() if p is not None and str(p) != ""}
    reserved = {f"{opt} (external data)": chosen[opt].with_name(chosen[opt].name + ".data")
                for opt in model_outputs if opt in chosen}
    seen: list[tuple[tuple, str]] = []
    for opt, out in list(chosen.items()) + list(reserved.items()):
        _check_target(opt, out)
        ident = _identity(out)
        for in_ident, in_path in read:
            if _same(ident, in_ident):
                raise BadInputError(f"{opt} {out} is an input file ({in_path}); refusing to overwrite it")
        for folder in read_dirs:
            if Path(ident[0]).is_relative_to(folder):
                raise BadInputError(f"{opt} {out} is inside the --inputs folder {folder}; refusing to write there")
        for other_ident, other_opt in seen:
            if _same(ident, other_ident):
                raise BadInputError(f"{opt} {out} is the same file as {other_opt}; give them different paths")
        seen.append((ident, opt))
    return OutputPlan(chosen, reserved)


def _check_target(opt: str, out: Path) -> None:
    if out.name in ("", ".", ".."):
        raise BadInputError(f"{opt} {out} is not a file name")
    if out.is_dir():
        raise BadInputError(f"{opt} {out} is a folder; give a file path")
    parent = out.parent
    if not parent.exists():
        raise BadInputError(f"{opt}: folder {parent} does not exist")
    if not parent.is_dir():
        raise BadInputError(f"{opt}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInputError(f"{opt}: folder {parent} is not writable")
    if out.exists() and not out.is_file():
        raise BadInputError(f"{opt} {out} exists and is not a regular file")


class _Transaction:
    """Staged temporaries, renamed onto their targets at commit, removed on failure."""

    def __init__(self, plan: OutputPlan):
        self.plan = plan
        self.staged: list[tuple[Path, Path]] = []  # (temporary, target), committed in order

    def target(self, option: str) -> Path:
        if option in self.plan.outputs:
            return self.plan.outputs[option]
        if option in self.plan.reserved:
            return self.plan.reserved[option]
        raise KeyError(f"output {option!r} was not planned (plan_outputs(outputs={{{option!r}: ...}}))")

    def stage(self, option: str) -> Path:
        """A fresh temporary path beside ``option``'s target; write it, it lands at commit."""
        target = self.target(option)
        # The target's suffix is kept: writers such as np.savez choose the format by it.
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".partial{target.suffix}", dir=target.parent)
        os.close(fd)
        self.staged.append((Path(tmp), target))
        return Path(tmp)

    def write_bytes(self, option: str, data: bytes) -> Path:
        tmp = self.stage(option)
        with _writing(option, self.target(option)), open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return self.target(option)

    def write_with(self, option: str, writer) -> Path:
        """Stage ``option`` by calling ``writer(temp_path)`` (a library's own save function); an
        OSError there is one line, exit 2, like any other staged write."""
        tmp = self.stage(option)
        with _writing(option, self.target(option)):
            writer(tmp)
        return self.target(option)

    def write_text(self, option: str, text: str) -> Path:
        return self.write_bytes(option, text.encode("utf-8"))

    def write_model(self, option: str, model, *, external_data: bool | None = None) -> Path:
        """Stage an ONNX model (and ``<target>.data`` when it uses external data)."""
        from onnx_fp16_rewrite.io.model_io import write_model_files

        target = self.target(option)
        data_opt = f"{option} (external data)"
        with _writing(option, target):
            write_model_files(model, target, lambda: self.stage(option),
                              lambda: self.stage(data_opt) if data_opt in self.plan.reserved else None,
                              external_data=external_data)
        return target

    def discard(self) -> None:
        for tmp, _ in self.staged:
            with contextlib.suppress(OSError):
                tmp.unlink()
        self.staged.clear()

    def commit(self) -> None:
        mode = 0o666 & ~_umask()
        done: list[tuple[Path, Path | None]] = []  # (target, backup of what it held)
        target = None
        try:
            for tmp, target in self.staged:
                _fsync_file(tmp)
                os.chmod(tmp, mode)
                backup = _backup(target)
                os.replace(tmp, target)
                done.append((target, backup))
        except BaseException:
            for target, backup in reversed(done):  # put back what the targets held
                with contextlib.suppress(OSError):
                    if backup is not None:
                        os.replace(backup, target)
                    else:
                        target.unlink()
            self.discard()
            exc = sys.exc_info()[1]
            if isinstance(exc, OSError):
                raise BadInputError(f"cannot write {target}: {exc.strerror or exc}; nothing was written") from None
            raise
        for target, backup in done:
            if backup is not None:
                with contextlib.suppress(OSError):
                    backup.unlink()
            _fsync_dir(target.parent)
            logger.info("wrote %s", target)
        self.staged.clear()


@contextlib.contextmanager
def _writing(option: str, target: Path) -> Iterator[None]:
    """A full disk or a vanished folder while staging an output is the environment's doing:
    one line, exit 2 (the transaction then removes everything staged)."""
    try:
        yield
    except OSError as exc:
        raise BadInputError(f"cannot write {option} {target}: {exc.strerror or exc}; nothing was written") from None


def _backup(target: Path) -> Path | None:
    """A hardlink to the file ``target`` holds now, so a failed commit can restore it."""
    if not target.exists():
        return None
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent)
    os.close(fd)
    os.unlink(name)
    try:
        os.link(target, name)
    except OSError:
        return None
    return Path(name)


def _fsync_file(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(p: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask

"""Dataset discovery and verification for the nnU-Net v2 raw layout.

A dataset is a folder (conventionally ``DatasetXXX_Name``) holding::

    dataset.json          channel_names, labels, numTraining, file_ending
    imagesTr/             {case}_{XXXX}{file_ending}, XXXX the 4-digit channel index
    labelsTr/             {case}{file_ending}: 0 background, 1.. classes
    imagesTs/, labelsTs/  optional test cases (labels optional)

:func:`load_dataset` reads ``dataset.json`` and the file names only (no image headers), so it is
fast; it raises :class:`~segmenter.errors.InputError` on the first layout problem (a missing
channel, an image without its label, ...), so training fails before any work starts.
:func:`segmenter.data.verify.verify_dataset` reports every problem instead, one :class:`Problem`
per line, and also opens each file. The layout problems found here read ``file not found``,
``folder not found``, ``invalid JSON``, ``missing key``, ``invalid '<key>'``,
``numTraining mismatch``, ``stray file``, ``stray folder``, ``undeclared channel``,
``missing channel``, ``missing label``, ``label without images``.

Hidden files (a leading ``.``, e.g. ``.DS_Store``) are ignored, as are the data files that sit
beside detached ``.mhd``/``.nhdr`` headers. Files that do not end with ``file_ending`` are
reported by :func:`segmenter.data.verify.verify_dataset` as stray but do not stop
:func:`load_dataset` (nnU-Net ignores them too); a file that ends with ``file_ending`` but does
not parse as ``{case}_{XXXX}`` does.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segmenter import io
from segmenter.errors import InputError

logger = logging.getLogger(__name__)

#: Keys that ``dataset.json`` must hold.
REQUIRED_KEYS = ("channel_names", "labels", "numTraining", "file_ending")

_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
# Data files written beside a detached header (.mhd/.nhdr); never reported as stray.
_DETACHED_HEADERS = (".mhd", ".nhdr")


@dataclass(frozen=True)
class Case:
    """One case: its channel files and, when there is one, its label file.

    Attributes:
        case_id: the ``{case}`` part of the file names.
        images: one file per channel, in channel order (``_0000`` first).
        label: the label file, None for an unlabelled (test or prediction) case.
        label_values: the values ``dataset.json`` declares (``labels``), which the label file
            may hold; None when no dataset says (a case named on the command line).
    """

    case_id: str
    images: tuple[Path, ...]
    label: Path | None = None
    label_values: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Dataset:
    """A dataset in the nnU-Net v2 raw layout.

    Attributes:
        root: the dataset folder.
        name: the folder's name (``DatasetXXX_Name``), which identifies the dataset.
        channel_names: channel index -> name (``{0: "FLAIR", 1: "T1"}``), in index order.
        labels: label name -> integer value; 0 is background, values are 0..N.
        file_ending: image extension, e.g. ``.nii.gz``.
        num_training: ``numTraining`` (equal to ``len(training)`` once loaded).
        training: the ``imagesTr``/``labelsTr`` cases, sorted by case id; every one has a label.
        test: the ``imagesTs`` cases, sorted by case id, with labels from ``labelsTs`` when present.
    """

    root: Path
    name: str
    channel_names: dict[int, str]
    labels: dict[str, int]
    file_ending: str
    num_training: int
    training: tuple[Case, ...]
    test: tuple[Case, ...] = ()

    @property
    def n_channels(self) -> int:
        """Number of input channels."""
        return len(self.channel_names)

    @property
    def label_values(self) -> tuple[int, ...]:
        """Declared label values, ascending (0 first)."""
        return tuple(sorted(self.labels.values()))


@dataclass(frozen=True)
class Problem:
    """One problem found in a dataset.

    Attributes:
        path: the file (or folder) concerned; for a missing file, where it was expected.
        message: what is wrong, one line, starting with a fixed phrase (see the module docstring).
    """

    path: Path
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


# --------------------------------------------------------------------------------------------
# dataset.json


@dataclass(frozen=True)
class _Meta:
    """What ``dataset.json`` says; a field is None when missing or invalid."""

    channel_names: dict[int, str] | None
    labels: dict[str, int] | None
    num_training: int | None
    file_ending: str | None


# Each parser returns (value, None) or (None, error message).


def _parse_channel_names(value: Any) -> tuple[dict[int, str] | None, str | None]:
    if not isinstance(value, Mapping) or not value:
        return None, 'expected a non-empty mapping of channel index to name, e.g. {"0": "FLAIR"}'
    channels: dict[int, str] = {}
    for key, name in value.items():
        if not str(key).isdigit():
            return None, f"key {key!r} is not a channel index (0, 1, ...)"
        if not isinstance(name, str):
            return None, f"name of channel {key} must be a string, got {name!r}"
        channels[int(key)] = name
    if sorted(channels) != list(range(len(channels))):
        found = ", ".join(str(c) for c in sorted(channels))
        return None, f"channel indices must be 0..{len(channels) - 1}, got {found}"
    return dict(sorted(channels.items())), None


def _parse_labels(value: Any) -> tuple[dict[str, int] | None, str | None]:
    if not isinstance(value, Mapping) or not value:
        return None, 'expected a non-empty mapping of label name to value, e.g. {"background": 0}'
    labels: dict[str, int] = {}
    for name, v in value.items():
        if isinstance(v, list | tuple):
            return None, f"region-based labels are not supported ({name!r} is {v!r})"
        if isinstance(v, bool) or not isinstance(v, int):
            return None, f"value of {name!r} must be an integer, got {v!r}"
        labels[str(name)] = v
    values = sorted(labels.values())
    if len(set(values)) != len(values):
        return None, f"duplicate label values ({', '.join(map(str, values))})"
    if values != list(range(len(values))):
        got = ", ".join(map(str, values))
        return None, f"values must be consecutive integers 0, 1, 2, ... (got {got})"
    if len(values) < 2:
        return None, "needs background (0) and at least one foreground label (1)"
    return labels, None


def _parse_num_training(value: Any) -> tuple[int | None, str | None]:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None, f"expected a non-negative integer, got {value!r}"
    return value, None


def _parse_file_ending(value: Any) -> tuple[str | None, str | None]:
    if not isinstance(value, str) or value not in io.SUPPORTED_SUFFIXES:
        return None, f"expected one of {', '.join(io.SUPPORTED_SUFFIXES)}, got {value!r}"
    return value, None


_PARSERS = {
    "channel_names": _parse_channel_names,
    "labels": _parse_labels,
    "numTraining": _parse_num_training,
    "file_ending": _parse_file_ending,
}


def _read_meta(root: Path) -> tuple[_Meta, list[Problem]]:
    path = root / "dataset.json"
    empty = _Meta(None, None, None, None)
    if not path.is_file():
        return empty, [Problem(path, "file not found")]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        return empty, [Problem(path, f"invalid JSON: {exc.msg} ({where})")]
    except (UnicodeDecodeError, OSError) as exc:
        return empty, [Problem(path, f"invalid JSON: cannot read as UTF-8 text ({exc})")]
    if not isinstance(data, dict):
        return empty, [Problem(path, "invalid JSON: expected an object at the top level")]

    problems: list[Problem] = []
    parsed: dict[str, Any] = {}
    for key in REQUIRED_KEYS:
        if key not in data:
            hint = ""
            if key == "channel_names" and "modality" in data:
                hint = " (an nnU-Net v1 dataset.json with 'modality'? convert it to v2)"
            problems.append(Problem(path, f"missing key '{key}'{hint}"))
            continue
        value, error = _PARSERS[key](data[key])
        if error is None:
            parsed[key] = value
        else:
            problems.append(Problem(path, f"invalid '{key}': {error}"))
    meta = _Meta(
        channel_names=parsed.get("channel_names"),
        labels=parsed.get("labels"),
        num_training=parsed.get("numTraining"),
        file_ending=parsed.get("file_ending"),
    )
    return meta, problems


# --------------------------------------------------------------------------------------------
# layout


@dataclass
class _Entry:
    """A case as found on disk, possibly incomplete (verify checks whatever is there)."""

    case_id: str
    images: dict[int, Path]
    label: Path | None
    problems: list[Problem] = field(default_factory=list)  # layout problems of this case


@dataclass
class _Layout:
    problems: list[Problem]  # folder-level, blocking
    strays: list[Problem]  # files load_dataset ignores
    train: list[_Entry]
    test: list[_Entry]


def _visible_entries(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)


def _is_detached_data(path: Path, file_ending: str) -> bool:
    """Whether ``path`` is the data file of a detached header (``x.raw`` beside ``x.mhd``)."""
    if file_ending not in _DETACHED_HEADERS:
        return False
    name = path.name
    stems = (name[:i] for i in range(1, len(name)) if name[i] == ".")
    return any(path.with_name(stem + file_ending).is_file() for stem in stems)


def _scan_images(
    folder: Path, channel_names: Mapping[int, str] | int, file_ending: str
) -> tuple[dict[str, dict[int, Path]], list[Problem], list[Problem]]:
    """Group ``{case}_{XXXX}{file_ending}`` files by case.

    Returns:
        ``(cases, problems, strays)``: case id -> channel -> file; blocking problems (bad names,
        undeclared channels); files and folders that do not end with ``file_ending``.
    """
    n_channels = channel_names if isinstance(channel_names, int) else len(channel_names)
    pattern = f"{{case}}_{{XXXX}}{file_ending}"
    cases: dict[str, dict[int, Path]] = {}
    problems: list[Problem] = []
    strays: list[Problem] = []
    for path in _visible_entries(folder):
        if path.is_dir():
            if not _named_like_a_file(path, file_ending):  # else: a missing channel, said so
                strays.append(
                    Problem(path, f"stray folder: {folder.name} holds only {pattern} files")
                )
            continue
        if not path.name.endswith(file_ending):
            if not _is_detached_data(path, file_ending):
                strays.append(Problem(path, f"stray file: name does not match {pattern}"))
            continue
        match = _CHANNEL_RE.match(path.name[: -len(file_ending)])
        if match is None:
            problems.append(
                Problem(path, f"stray file: name does not match {pattern} (4-digit channel)")
            )
            continue
        channel = int(match["channel"])
        if channel >= n_channels:
            problems.append(
                Problem(
                    path,
                    f"undeclared channel {channel}: dataset.json channel_names has "
                    f"{n_channels} (0-{n_channels - 1})",
                )
            )
            continue
        cases.setdefault(match["case"], {})[channel] = path
    return cases, problems, strays


def _named_like_a_file(path: Path, file_ending: str) -> bool:
    """Whether ``path`` has the name of a channel file ``{case}_{XXXX}{file_ending}``."""
    name = path.name
    return name.endswith(file_ending) and bool(_CHANNEL_RE.match(name[: -len(file_ending)]))


def _folder_note(path: Path) -> str:
    """`` (a folder has its name)`` when the missing file's name is taken by a folder."""
    return " (a folder has its name)" if path.is_dir() else ""


def _missing_channels(
    folder: Path,
    case_id: str,
    images: Mapping[int, Path],
    channel_names: Mapping[int, str] | int,
    file_ending: str,
) -> list[Problem]:
    if isinstance(channel_names, int):
        names: Mapping[int, str] = {c: "" for c in range(channel_names)}
    else:
        names = channel_names
    return [
        Problem(
            path,
            f"missing channel {c}{f' ({name})' if name else ''} of case {case_id}"
            + _folder_note(path),
        )
        for c, name in names.items()
        if c not in images
        for path in [folder / f"{case_id}_{c:04d}{file_ending}"]
    ]


def _scan_labels(folder: Path, file_ending: str) -> tuple[dict[str, Path], list[Problem]]:
    labels: dict[str, Path] = {}
    strays: list[Problem] = []
    pattern = f"{{case}}{file_ending}"
    for path in _visible_entries(folder):
        if path.is_dir():
            if not path.name.endswith(file_ending):  # else: a missing label, said so
                strays.append(
                    Problem(path, f"stray folder: {folder.name} holds only {pattern} files")
                )
        elif path.name.endswith(file_ending) and len(path.name) > len(file_ending):
            labels[path.name[: -len(file_ending)]] = path
        elif not _is_detached_data(path, file_ending):
            strays.append(Problem(path, f"stray file: name does not match {pattern}"))
    return labels, strays


def _pair(
    images_dir: Path,
    labels_dir: Path,
    channel_names: Mapping[int, str],
    file_ending: str,
    *,
    labels_required: bool,
) -> tuple[list[_Entry], list[Problem], list[Problem]]:
    """Scan an images folder and its labels folder (either may be absent when not required)."""
    cases: dict[str, dict[int, Path]] = {}
    problems: list[Problem] = []
    strays: list[Problem] = []
    if images_dir.is_dir():
        cases, problems, strays = _scan_images(images_dir, channel_names, file_ending)
    labels: dict[str, Path] = {}
    if labels_dir.is_dir():
        labels, label_strays = _scan_labels(labels_dir, file_ending)
        strays += label_strays
    entries: list[_Entry] = []
    for case_id in sorted(set(cases) | set(labels)):
        images = cases.get(case_id, {})
        entry = _Entry(case_id, dict(sorted(images.items())), labels.get(case_id))
        if images:
            entry.problems += _missing_channels(
                images_dir, case_id, images, channel_names, file_ending
            )
        else:
            entry.problems.append(
                Problem(
                    labels[case_id],
                    f"label without images: no {case_id}_XXXX{file_ending} in {images_dir.name}",
                )
            )
        if entry.label is None and labels_required:
            path = labels_dir / f"{case_id}{file_ending}"
            entry.problems.append(
                Problem(path, f"missing label of case {case_id}{_folder_note(path)}")
            )
        entries.append(entry)
    return entries, problems, strays


def _scan_dataset(root: Path, meta: _Meta) -> _Layout:
    assert meta.channel_names is not None and meta.file_ending is not None
    problems: list[Problem] = []
    for sub in ("imagesTr", "labelsTr"):
        if not (root / sub).is_dir():
            problems.append(Problem(root / sub, "folder not found"))
    train, tr_problems, tr_strays = _pair(
        root / "imagesTr",
        root / "labelsTr",
        meta.channel_names,
        meta.file_ending,
        labels_required=(root / "labelsTr").is_dir(),
    )
    test, ts_problems, ts_strays = _pair(
        root / "imagesTs",
        root / "labelsTs",
        meta.channel_names,
        meta.file_ending,
        labels_required=False,
    )
    if meta.num_training is not None and (root / "imagesTr").is_dir():
        n_found = sum(1 for e in train if e.images)
        if n_found != meta.num_training:
            problems.append(
                Problem(
                    root / "dataset.json",
                    f"numTraining mismatch: dataset.json says {meta.num_training}, "
                    f"imagesTr has {n_found} cases",
                )
            )
    return _Layout(problems + tr_problems + ts_problems, tr_strays + ts_strays, train, test)


def _resolve_root(root: str | Path) -> Path:
    path = Path(root)
    if path.is_file() and path.name == "dataset.json":
        return path.parent
    if not path.exists():
        raise InputError(f"{path}: dataset folder not found")
    if not path.is_dir():
        raise InputError(f"{path}: not a folder (expected a dataset folder with dataset.json)")
    return path


def _raise_first(problems: Sequence[Problem], root: Path) -> None:
    if not problems:
        return
    more = len(problems) - 1
    tail = f" (and {more} more problem{'s' * (more > 1)}: run `segmenter verify {root}`)"
    raise InputError(str(problems[0]) + (tail if more else ""))


def _to_case(entry: _Entry, n_channels: int, labels: Mapping[str, int]) -> Case:
    images = tuple(entry.images[c] for c in range(n_channels))
    return Case(entry.case_id, images, entry.label, tuple(sorted(labels.values())))


def find_cases(folder: str | Path, n_channels: int, file_ending: str) -> tuple[Case, ...]:
    """Find the cases of an ``imagesTr``/``imagesTs``-style folder (``{case}_{XXXX}{ending}``).

    Files that do not end with ``file_ending`` (and hidden files) are ignored.

    Args:
        folder: the folder to scan.
        n_channels: number of channels each case must have (``_0000`` .. ``_{n-1:04d}``).
        file_ending: image extension, e.g. ``.nii.gz``.

    Returns:
        The cases sorted by case id, ``label`` None.

    Raises:
        InputError: the folder is missing, a case lacks a channel, a channel index is beyond
            ``n_channels``, or a ``file_ending`` file does not parse as ``{case}_{XXXX}``.
    """
    path = Path(folder)
    if not path.is_dir():
        raise InputError(f"{path}: folder not found")
    cases, problems, _ = _scan_images(path, n_channels, file_ending)
    for case_id, images in sorted(cases.items()):
        problems += _missing_channels(path, case_id, images, n_channels, file_ending)
    _raise_first(problems, path)
    return tuple(
        Case(case_id, tuple(images[c] for c in range(n_channels)))
        for case_id, images in sorted(cases.items())
    )


def load_dataset(root: str | Path) -> Dataset:
    """Read ``dataset.json`` and discover the cases (file names only, no image is opened).

    Args:
        root: the dataset folder (or its ``dataset.json``).

    Returns:
        The :class:`Dataset`.

    Raises:
        InputError: the folder or ``dataset.json`` is missing or invalid, or the layout is broken
            (a missing channel or label, a label without images, an unparsable image name, a
            ``numTraining`` that does not match). The one-line message names the first problem
            and how many more :func:`segmenter.data.verify.verify_dataset` would list.
    """
    path = _resolve_root(root)
    meta, problems = _read_meta(path)
    _raise_first(problems, path)
    assert meta.channel_names is not None and meta.labels is not None
    assert meta.file_ending is not None and meta.num_training is not None
    layout = _scan_dataset(path, meta)
    blocking = layout.problems + [p for e in layout.train + layout.test for p in e.problems]
    _raise_first(blocking, path)
    n = len(meta.channel_names)
    return Dataset(
        root=path,
        name=path.resolve().name,
        channel_names=meta.channel_names,
        labels=meta.labels,
        file_ending=meta.file_ending,
        num_training=meta.num_training,
        training=tuple(_to_case(e, n, meta.labels) for e in layout.train),
        test=tuple(_to_case(e, n, meta.labels) for e in layout.test),
    )


__all__ = [
    "REQUIRED_KEYS",
    "Case",
    "Dataset",
    "Problem",
    "find_cases",
    "load_dataset",
]

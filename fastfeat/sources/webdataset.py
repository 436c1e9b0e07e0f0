"""WebDataset tar shards: `--data 'DIR/train-{000000..000099}.tar'`, `--train-data`/`--test-data`, or `DIR/<split>/*.tar`.

A sample is the members of a shard that share a key (the member name up to the first dot of its file
name, as WebDataset and DALI group them): its image is its jpg/jpeg/png/webp member, its label its `cls`
member (an integer or a class name) or that field of its `json` member (`--label-key`). Rows keep shard
order, then member order, and are named `shard.tar/key` (relative to the shards' common folder).

Each shard's member offsets come from an index in DALI's wds2idx format (v1.2), made on first use with
the standard library's `tarfile` (it only walks the tar headers: no extra dependency, and the same file
DALI's `fn.readers.webdataset` reads) and kept beside the shard, or in ~/.cache/fastfeat/webdataset where
that folder is read-only; an index older than its shard, or pointing past its end, is made again. The
loaders then read each image with one positioned read, so no split is ever held in memory.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import InputError
from .base import SPLITS, Dataset, SourceInputs, SourceKind, Split, TarMembers
from .filelist import class_names

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
NAMES_FILES = ("classes.txt", "classnames.txt")
INDEX_VERSION = "v1.2"
TAR_END = 1024  # the two zero blocks that end a tar: a shard cut short lacks them
_MAGIC = re.compile(r"[*?[{]")
_BRACE = re.compile(r"\{([^{}]*)\}")


@dataclass(frozen=True)
class Member:
    ext: str  # the name after the key's first dot: "jpg", "cls", "seg.png"
    offset: int  # of its data in the shard
    size: int
    name: str


Sample = list[Member]


def is_pattern(data: str) -> bool:
    """Whether --data names shards (a .tar file, a glob or a brace pattern) rather than a folder."""
    return data.endswith(".tar") or bool(_MAGIC.search(data))


def expand_braces(pattern: str) -> list[str]:
    """`{000..099}` (zero-padded when both ends have one width) and `{a,b}`, left to right, as the shell does."""
    found = _BRACE.search(pattern)
    if found is None:
        return [pattern]
    body, head, tail = found.group(1), pattern[: found.start()], pattern[found.end():]
    numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numbers:
        first, last = numbers.groups()
        width = len(first) if len(first) == len(last) else 0
        items = [f"{i:0{width}d}" for i in range(int(first), int(last) + 1)]
    else:
        items = body.split(",")
    return [name for item in items for name in expand_braces(head + item + tail)]


def shard_paths(pattern: str) -> list[Path]:
    """The shards `pattern` names, in its order (a glob's matches sorted); missing ones refused."""
    shards = []
    for name in expand_braces(pattern):
        matches = sorted(glob.glob(name)) if _MAGIC.search(name) else [name]
        if not matches:
            raise InputError(f"no shards match {name}")
        shards += map(Path, matches)
    missing = [shard for shard in shards if not shard.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more of the {len(shards)} that {pattern} names)" if len(missing) > 1 else ""
        raise InputError(f"missing shard: {missing[0]}{more}")
    other = next((shard for shard in shards if shard.suffix != ".tar"), None)
    if other is not None:
        raise InputError(f"{other} is not a .tar shard (compressed shards are not read)")
    return shards


def input_root(data: str, inputs: SourceInputs) -> tuple[Path, SourceInputs]:
    """The folder that holds every shard named (--data as the train pattern when it is one), and the inputs."""
    if is_pattern(data) and "train" not in dict(inputs.split_data):
        inputs = replace(inputs, split_data=(("train", data), *inputs.split_data))
    if not inputs.split_data:
        return Path(data), inputs
    folders = [_fixed_folder(os.path.abspath(pattern)) for _, pattern in inputs.split_data]
    return Path(os.path.commonpath(folders)), inputs


def _fixed_folder(pattern: str) -> str:
    """The leading folders of `pattern` that hold no wildcard or brace."""
    parts = Path(pattern).parts[:-1]
    fixed = next((i for i, part in enumerate(parts) if _MAGIC.search(part)), len(parts))
    return str(Path(*parts[:fixed]))


def split_patterns(root: Path, inputs: SourceInputs) -> dict[str, str]:
    """split -> shard pattern: the ones given, else `root/<split>/*.tar` or `root/<split>-*.tar` where they match."""
    if inputs.split_data:
        return {split: os.path.abspath(pattern) for split, pattern in inputs.split_data}
    patterns = {}
    for split in SPLITS:
        pattern = next((str(root / p) for p in (f"{split}/*.tar", f"{split}-*.tar") if glob.glob(str(root / p))), None)
        if pattern is not None:
            patterns[split] = pattern
    return patterns


# ---- the index: DALI's wds2idx format ------------------------------------------------------------------


def split_name(name: str) -> tuple[str, str]:
    """(key, extension): the name up to the first dot of its file name, as wds2idx splits it."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


def group_samples(members: list[Member], keys: list[str]) -> list[Sample]:
    """Consecutive members with one key are one sample; hidden files (no key before the dot) are skipped."""
    samples, last = [], None
    for member, key in zip(members, keys):
        if not key or key.endswith("/"):
            continue
        if key != last:
            samples.append([])
            last = key
        samples[-1].append(member)
    return samples


def scan_tar(shard: Path) -> list[Sample]:
    """Every sample of `shard`, read from its tar headers (the data is seeked over, not read)."""
    try:
        with tarfile.open(shard, mode="r:") as tar:
            members = [Member(split_name(m.name)[1], m.offset_data, m.size, m.name) for m in tar if m.isreg()]
            end = tar.offset
    except (tarfile.TarError, OSError) as exc:
        if "end of data" in str(exc) or isinstance(exc, tarfile.TruncatedHeaderError):
            raise InputError(f"{shard}: truncated tar (it ends inside a member)") from None
        raise InputError(f"{shard}: not a readable tar ({exc})") from None
    with shard.open("rb") as file:
        file.seek(end)
        tail = file.read(TAR_END)
    if len(tail) < TAR_END or any(tail) or any(m.offset + m.size > end for m in members):
        raise InputError(f"{shard}: truncated tar (it ends without the end-of-archive blocks)")
    samples = group_samples(members, [split_name(m.name)[0] for m in members])
    if not samples:
        raise InputError(f"{shard}: empty shard (no samples)")
    return samples


def format_index(samples: list[Sample]) -> str:
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    lines += [" ".join(f"{m.ext} {m.offset} {m.size} {m.name}" for m in sample) for sample in samples]
    return "\n".join(lines) + "\n"


def parse_index(index: Path, shard_size: int) -> list[Sample] | None:
    """The samples an index lists; None when it is malformed or points past the end of its shard."""
    try:
        header, *lines = index.read_text(encoding="utf-8").splitlines()
        version, count = header.split()
        samples = []
        for line in lines:
            fields = line.split()
            samples.append([Member(ext, int(offset), int(size), name)
                            for ext, offset, size, name in zip(*[iter(fields)] * 4, strict=True)])
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    fits = all(m.offset >= 0 and m.offset + m.size <= shard_size for sample in samples for m in sample)
    return samples if version == INDEX_VERSION and int(count) == len(samples) and fits and samples else None


def index_paths(shard: Path) -> tuple[Path, Path]:
    """Where a shard's index is kept: beside it (named as wds2idx names it), else in the user's cache."""
    name = shard.name[: shard.name.find(".", 1)] + ".idx"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastfeat" / "webdataset"
    return shard.with_name(name), cache / f"{hashlib.sha256(str(shard.resolve()).encode()).hexdigest()[:16]}-{name}"


def shard_index(shard: Path) -> tuple[Path, list[Sample]]:
    """The kept index of `shard` and its samples; made (and kept) when absent, stale or malformed."""
    stat = shard.stat()
    places = index_paths(shard)
    for index in places:
        if index.is_file() and index.stat().st_mtime_ns >= stat.st_mtime_ns:
            samples = parse_index(index, stat.st_size)
            if samples is not None:
                return index, samples
    samples = scan_tar(shard)
    text = format_index(samples)
    for index in places:
        temp = index.with_name(f".{index.name}.{os.getpid()}.tmp")
        try:
            index.parent.mkdir(parents=True, exist_ok=True)
            temp.write_text(text, encoding="utf-8")
            os.replace(temp, index)
            return index, samples
        except OSError:
            temp.unlink(missing_ok=True)
    raise InputError(f"cannot keep an index of {shard}: neither {places[0].parent} nor {places[1].parent} is writable")


def dali_indexes(members: TarMembers, folder: Path) -> tuple[list[str], list[str], list[str]]:
    """(shards, index files, image extensions) for DALI's webdataset reader to read exactly `members`, which
    are in shard order: a shard's kept index when every sample of it is read, else an index of the samples
    that are (written into `folder`, named by its content)."""
    shards, indexes = [], []
    for shard in dict.fromkeys(members.shard.tolist()):
        rows = np.flatnonzero(members.shard == shard)
        shards.append(members.shards[shard])
        if len(rows) == members.samples[shard]:
            indexes.append(members.indexes[shard])
            continue
        samples = [[Member(split_name(members.names[r])[1], int(members.offset[r]), int(members.size[r]),
                           members.names[r])] for r in rows]
        text = format_index(samples)
        index = folder / f"{hashlib.sha256((members.shards[shard] + text).encode()).hexdigest()[:24]}.idx"
        if not index.is_file():
            temp = index.with_name(index.name + ".tmp")
            temp.write_text(text, encoding="utf-8")
            os.replace(temp, index)
        indexes.append(str(index))
    return shards, indexes, sorted({split_name(name)[1] for name in members.names})


# ---- rows and labels -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardRows:
    """One shard's rows: where each image is, and its raw label (a class name or an integer, as text)."""

    index: Path
    images: list[Member]
    labels: list[str]


def shard_rows(shard: Path, label_key: str) -> ShardRows:
    index, samples = shard_index(shard)
    images, labels = [], []
    fd = os.open(shard, os.O_RDONLY)
    try:
        for sample in samples:
            key = split_name(sample[0].name)[0]
            image = next((m for m in sample if m.ext.lower() in IMAGE_EXTS), None)
            if image is None:
                raise InputError(f"{shard}/{key}: no {'/'.join(IMAGE_EXTS)} image")
            images.append(image)
            labels.append(_label(fd, sample, label_key, f"{shard}/{key}"))
    finally:
        os.close(fd)
    return ShardRows(index, images, labels)


def _label(fd: int, sample: Sample, label_key: str, where: str) -> str:
    """The `label_key` member's text, else the `label_key` field of the json member."""
    by_ext = {m.ext: m for m in sample}
    member = by_ext.get(label_key) or by_ext.get("json")
    if member is None:
        raise InputError(f"{where}: no label (neither a .{label_key} member nor a .json one)")
    text = os.pread(fd, member.size, member.offset).decode("utf-8", errors="replace").strip()
    if member.ext == label_key:
        return text
    try:
        value = json.loads(text)[label_key]
    except (ValueError, KeyError, TypeError):
        raise InputError(f"{where}.json: no {label_key!r} field (--label-key names the label's field)") from None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InputError(f"{where}.json: label {value!r} is neither an integer nor a class name")
    return str(value)


def names_folder(root: Path, shards: list[Path]) -> Path:
    """The folder whose classes.txt or classnames.txt names the classes: beside the shards, else the root."""
    for folder in (shards[0].parent, root):
        if any((folder / name).is_file() for name in NAMES_FILES):
            return folder
    return root


def read_shards(root: Path, splits: tuple[str, ...], inputs: SourceInputs) -> Dataset:
    """The splits asked for, rows in shard then member order; with no names file, every split's labels name
    the classes (so that they do not depend on which splits are asked for)."""
    patterns = split_patterns(root, inputs)
    missing = [s for s in splits if s not in patterns]
    if missing:
        raise InputError(f"{root} has no shards for split {missing[0]!r} (--{missing[0]}-data PATTERN, or "
                         f"{missing[0]}/*.tar)")
    shards = {s: shard_paths(p) for s, p in patterns.items()}
    folder = names_folder(root, shards[splits[0]])
    named = any((folder / name).is_file() for name in NAMES_FILES)
    read = {s: [shard_rows(path, inputs.label_key) for path in shards[s]] for s in (splits if named else patterns)}
    all_labels = [label for rows in read.values() for shard in rows for label in shard.labels]
    classes = class_names(folder, all_labels, NAMES_FILES)
    out = {s: _split(s, shards[s], read[s], classes, folder if named else None) for s in splits}
    source = ";".join(f"{s}={os.path.relpath(patterns[s], root)}" for s in splits)
    return Dataset("webdataset", root, classes, out, source=source)


def _split(name: str, shards: list[Path], rows: list[ShardRows], classes: tuple[str, ...],
           names_from: Path | None) -> Split:
    index = {c: i for i, c in enumerate(classes)}
    labels = []
    for shard, found in zip(shards, rows):
        for image, label in zip(found.images, found.labels):
            value = index.get(label, int(label) if label.isdigit() else -1)
            if not 0 <= value < len(classes):
                where = f"the {len(classes)} classes of {names_from}" if names_from else f"{len(classes)} classes"
                raise InputError(f"{shard}/{split_name(image.name)[0]}: label {label!r} is not one of {where}")
            labels.append(value)
    images = [image for r in rows for image in r.images]
    members = TarMembers(
        shards=tuple(map(str, shards)), indexes=tuple(str(r.index) for r in rows),
        samples=np.asarray([len(r.images) for r in rows], dtype=np.int64),
        shard=np.repeat(np.arange(len(rows)), [len(r.images) for r in rows]),
        offset=np.asarray([m.offset for m in images], dtype=np.int64),
        size=np.asarray([m.size for m in images], dtype=np.int64), names=tuple(m.name for m in images),
    )
    files = tuple(f"{shards[s]}/{split_name(m.name)[0]}" for s, m in zip(members.shard.tolist(), images))
    return Split(name, np.asarray(labels, dtype=np.int64), files=files, members=members)


def shard_kind(inputs: SourceInputs) -> SourceKind:
    return SourceKind(
        "webdataset", "<split>/*.tar or <split>-*.tar WebDataset shards (or --data/--train-data/--test-data "
                      "patterns); classes.txt optional",
        detect=lambda root: bool(split_patterns(root, inputs)),
        splits=lambda root: tuple(split_patterns(root, inputs)),
        read=lambda root, splits: read_shards(root, splits, inputs),
        bind=shard_kind,
    )


KIND = shard_kind(SourceInputs())

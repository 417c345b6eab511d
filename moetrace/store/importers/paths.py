"""Model name and dataset tags from the folder layout of a trace set."""

from __future__ import annotations

from pathlib import Path

from moetrace.store.importers.known_models import find_known_model, normalize


def known_model_folder(folder: Path) -> str | None:
    """The name of ``folder`` or of its nearest parent that names a known model, or None."""
    folder = folder.resolve()
    for parent in (folder, *folder.parents):
        if parent.name and find_known_model(parent.name) is not None:
            return parent.name
    return None


def model_name_hint(first_file: Path) -> str:
    """The folder naming a known model among the file's parents, else its grandparent."""
    folder = first_file.resolve().parent
    return known_model_folder(folder) or folder.parent.name or folder.name


def model_dir(file: Path, model_name: str) -> Path | None:
    """The parent folder of ``file`` that names ``model_name`` (or the same known model)."""
    want = normalize(model_name)
    known = find_known_model(model_name)
    for parent in file.resolve().parents:
        if not parent.name:
            continue
        if normalize(parent.name) == want:
            return parent
        if known is not None and find_known_model(parent.name) is known:
            return parent
    return None


def dataset_of(file: Path, model_name: str) -> str:
    """The file's folder relative to the model folder (``mmlu/abstract_algebra``), or its
    own folder name when no parent folder names the model."""
    folder = file.resolve().parent
    root = model_dir(file, model_name)
    if root is not None and root != folder:
        return folder.relative_to(root).as_posix()
    return folder.name


def model_name_of_folder(src: Path) -> str | None:
    """For formats whose files name no model: the folder among SRC and its parents that
    names a known model, else SRC's folder name (SRC's parent's when SRC is a file)."""
    folder = src.resolve() if src.is_dir() else src.resolve().parent
    return known_model_folder(folder) or folder.name or None

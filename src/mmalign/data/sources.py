"""User data sources -> raw train/val/test splits with columns id, image (undecoded), captions.

`hf`: a hub id, a save_to_disk directory or a parquet file/directory, loaded with `datasets`;
`imagefolder`: see imagefolder.py; `webdataset`: img2dataset tar shards, see webdataset.py. Rows sharing an id are one image (one row per caption, as in
COCO's annotation files); a source with one split is divided by `prepare.split_ratios`. Images are
not decoded here: samples.py checks them.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..config import HFSourceConfig, PrepareConfig, SplitNames
from ..hub import datasets_offline_if_unreachable, hub_unreachable, offline_flag
from .imagefolder import read_imagefolder
from .webdataset import read_webdataset

log = logging.getLogger(__name__)

ROLES = ("train", "val", "test")


def _load_hub(hf: HFSourceConfig) -> Any:
    import datasets

    try:
        with datasets_offline_if_unreachable():
            return datasets.load_dataset(hf.path, hf.name, revision=hf.revision)
    except (ConnectionError, FileNotFoundError) as e:  # DatasetNotFoundError is a FileNotFoundError
        reason = ("HF_HUB_OFFLINE is set" if offline_flag() else "the hub is unreachable" if hub_unreachable()
                  else str(e).splitlines()[0])
        raise ValueError(
            f"cannot load dataset '{hf.path}': not a local path, and not on the hub or in the local datasets cache "
            f"({reason}). Fix: load it once where the hub is reachable, point HF_HOME at a cache that has it, or "
            "set prepare.hf.path to a save_to_disk directory or parquet files") from None


def _load_local(path: Path, name: str | None) -> Any:
    import datasets

    try:
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return datasets.load_from_disk(str(path))
        if path.is_file() and path.suffix == ".parquet":
            return datasets.load_dataset("parquet", data_files=str(path))
        if path.is_dir():
            return datasets.load_dataset(str(path), name)  # parquet (or csv/json) files; splits from file names
        raise ValueError("a file must be .parquet; or give a directory or a hub id")
    except ValueError as e:  # e.g. 'Instruction "validation" corresponds to no data!' for an empty split file
        holds = ", ".join(sorted(p.name for p in path.iterdir())[:10]) if path.is_dir() else path.name
        raise ValueError(f"cannot load dataset {path} (prepare.hf.path): {e}; it holds: {holds}") from None


def load_hf(hf: HFSourceConfig) -> dict[str, Any]:
    """{split name: Dataset} from a save_to_disk dir, a parquet file or directory, or a hub id (a local path wins)."""
    import datasets

    path = Path(hf.path).expanduser()
    ds = _load_local(path, hf.name) if path.exists() else _load_hub(hf)
    return dict(ds) if isinstance(ds, datasets.DatasetDict) else {"train": ds}


def _check_columns(ds: Any, hf: HFSourceConfig, where: str) -> None:
    import datasets

    wanted = {"image_column": hf.image_column, "caption_column": hf.caption_column, "id_column": hf.id_column,
              "split_column": hf.split_column}
    for key, column in wanted.items():
        if column and column not in ds.column_names:
            raise ValueError(f"{where} has no column '{column}' (prepare.hf.{key}); its columns: "
                             f"{', '.join(ds.column_names)}")
    feature = ds.features[hf.caption_column]
    inner = getattr(feature, "feature", feature)  # List(Value) -> Value
    if not (isinstance(inner, datasets.Value) and inner.dtype in ("string", "large_string")):
        raise ValueError(f"column '{hf.caption_column}' of {where} holds {feature}, not a string or a list of strings "
                         "(prepare.hf.caption_column)")
    image = ds.features[hf.image_column]
    if not isinstance(image, datasets.Image) and getattr(image, "dtype", None) not in ("string", "large_string"):
        raise ValueError(f"column '{hf.image_column}' of {where} holds {image}, not images or file paths "
                         "(prepare.hf.image_column)")


def group_by_id(ds: Any, ids: list[str], image_column: str, caption_column: str) -> Any:
    """One row per image: rows sharing an id are merged, their captions concatenated in row order."""
    import datasets

    first: dict[str, int] = {}
    captions: dict[str, list] = {}
    for i, (key, value) in enumerate(zip(ids, ds[caption_column])):
        first.setdefault(key, i)
        captions.setdefault(key, []).extend(value if isinstance(value, list) else [value])
    if len(first) < len(ds):  # select() adds an index mapping that add_column() would copy out: only when grouping
        ds = ds.select(list(first.values()))
    out = ds.select_columns([image_column])
    if image_column != "image":
        out = out.rename_column(image_column, "image")
    if isinstance(out.features["image"], datasets.Image):
        out = out.cast_column("image", datasets.Image(decode=False))  # bytes/path: samples.py decodes and checks
    string = datasets.Value("string")
    return out.add_column("id", list(first), feature=string).add_column(
        "captions", list(captions.values()), feature=datasets.List(string))


def standardize(ds: Any, hf: HFSourceConfig, split: str, where: str) -> Any:
    _check_columns(ds, hf, where)
    ids = [str(v) for v in ds[hf.id_column]] if hf.id_column else [f"{split}/{i}" for i in range(len(ds))]
    return group_by_id(ds, ids, hf.image_column, hf.caption_column)


def by_column(found: dict[str, Any], column: str) -> dict[str, Any]:
    """Re-split rows by the value of `column` (e.g. Karpathy's `split`: train / val / test / restval)."""
    import datasets

    ds = datasets.concatenate_datasets(list(found.values()))
    values = np.asarray(ds[column], dtype=object)
    return {str(v): ds.select(np.flatnonzero(values == v)) for v in dict.fromkeys(values)}


def ratio_split(ds: Any, ratios: list[float], seed: int) -> dict[str, Any]:
    order = np.random.default_rng(seed).permutation(len(ds))
    n_val, n_test = round(len(ds) * ratios[1]), round(len(ds) * ratios[2])
    n_train = len(ds) - n_val - n_test
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, len(ds))}
    return {role: ds.select(order[a:b]) for role, (a, b) in bounds.items()}


def pick_splits(found: dict[str, Any], names: SplitNames, where: str) -> dict[str, Any] | None:
    """The source's splits named by prepare.splits; None when it has one split (to divide by ratio)."""
    wanted = {role: getattr(names, role) for role in ROLES}
    if all(name in found for name in wanted.values()):
        return {role: found[name] for role, name in wanted.items()}
    if len(found) == 1:
        return None
    missing = ", ".join(f"prepare.splits.{r}={n!r}" for r, n in wanted.items() if n not in found)
    raise ValueError(f"{where} has splits {split_sizes(found)}; not found: {missing}. Fix: map prepare.splits."
                     "train/val/test to existing splits (or prepare.hf.split_column values), or use a source with "
                     "one split")


def split_sizes(splits: dict[str, Any]) -> str:
    return ", ".join(f"{name}={len(ds)}" for name, ds in splits.items())


def check_not_empty(splits: dict[str, Any], where: str, after: str = "") -> None:
    """A split with zero rows stops the stage, listing what each split holds."""
    for role, ds in splits.items():
        if len(ds) == 0:
            raise ValueError(f"split '{role}' of {where} has no rows{after} (rows per split: {split_sizes(splits)}); "
                             "add data, or change prepare.splits / prepare.split_ratios")


def load_source(cfg: PrepareConfig, clean: Callable[[Any, str], Any] | None = None,
                work_dir: Path | None = None) -> tuple[dict[str, Any], str]:
    """(raw {train, val, test} splits with columns id, image, captions; a description of the source).

    `clean(split, role)` drops bad samples; a source with a single split is cleaned before it is divided
    by prepare.split_ratios, so every split gets its share of good samples. The caller checks that no
    split is left empty (it knows what was skipped).
    """
    clean = clean or (lambda ds, role: ds)
    if cfg.source == "imagefolder":
        where = f"image folder {cfg.imagefolder.path}"
        found = read_imagefolder(Path(cfg.imagefolder.path).expanduser(), cfg.imagefolder.caption_column)
    elif cfg.source == "webdataset":
        wds = cfg.webdataset
        where = f"webdataset shards {wds.path}"
        found = read_webdataset(wds.path, wds.image_exts, wds.caption_ext.strip(". ").lower(),
                                work_dir or Path(tempfile.mkdtemp(prefix="mmalign-wds-")))
    else:
        hf = cfg.hf
        where = f"dataset {hf.path}" + (f" ({hf.name})" if hf.name else "")
        found = load_hf(hf)
        if hf.split_column:
            _check_columns(next(iter(found.values())), hf, where)
            found = by_column(found, hf.split_column)
            where += f" split by column '{hf.split_column}'"
        found = {name: standardize(ds, hf, name, f"{where}, split '{name}'") for name, ds in found.items()}
    limit = (lambda ds: ds.select(range(min(cfg.max_samples, len(ds))))) if cfg.max_samples else (lambda ds: ds)
    splits = pick_splits(found, cfg.splits, where)
    if splits is not None:
        splits = {role: limit(ds) for role, ds in splits.items()}
        check_not_empty(splits, where)
        splits = {role: clean(ds, role) for role, ds in splits.items()}
    else:
        (name, ds), = found.items()
        check_not_empty(found, where)
        ds = clean(ds, "all")
        log.info("%s has one split ('%s', %d good images): dividing it %s into train/val/test "
                 "(prepare.split_ratios)", where, name, len(ds), cfg.split_ratios)
        splits = {role: limit(part) for role, part in ratio_split(ds, cfg.split_ratios, cfg.seed).items()}
    return splits, where

"""The data of the applications: text files read with clear errors, calibration draws, and where the default texts
are. Library layers never look for files; these defaults are arguments of every function that uses them.

Default data directory: `$JQ_DATA_DIR`, else `../shared/data/austen` beside a source checkout (five Austen novels:
persuasion.txt to evaluate on, the others to calibrate and train on).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CALIB_SAMPLINGS", "read_text", "check_window", "bos_of", "text_ids", "add_calib_args", "calibration_tokens",
           "calibration_draw",
           "data_dir", "default_eval_text", "default_calib_files"]

_REPO = Path(__file__).resolve().parents[2]
EVAL_NAME = "persuasion.txt"


CALIB_SAMPLINGS = ("windows", "stream")


def read_text(path: str | Path, what: str = "text file") -> str:
    """The UTF-8 text of `path`; errors name `what` (e.g. "--calib"), the file, and the fix: a missing file, or
    bytes that are not UTF-8 (with the first bad byte and its offset)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} {p}: no such file" + (" (it is a directory)" if p.is_dir() else ""))
    data = p.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {p}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); convert it "
                         "to UTF-8 (e.g. `iconv -f latin1 -t utf-8`) or pass another file") from None


def check_window(cfg: Any, window: int, what: str = "window") -> None:
    """Refuse a window longer than the model's context (`cfg.max_seq_len`): positions beyond it were never
    trained, so a perplexity there means nothing."""
    ctx = getattr(cfg, "max_seq_len", None)
    if ctx is not None and window > ctx:
        raise ValueError(f"{what} {window} is longer than the model's context of {ctx} tokens (max_seq_len); use "
                         f"{what} {ctx} or less")


def bos_of(tokenizer: Any) -> int | None:
    """The BOS id when the tokenizer puts one before every text (Gemma), else None (SmolLM2). Such a model saw
    BOS at the start of every training sequence, so each evaluation and calibration window starts with it."""
    bos = getattr(tokenizer, "bos_id", None)
    if bos is None:
        return None
    return bos if list(tokenizer.encode("a"))[:1] == [bos] else None


def text_ids(tokenizer: Any, text: str) -> tuple[np.ndarray, int | None]:
    """(token ids int32 [N] of `text`, BOS id or None): without special tokens when the model wants BOS per window
    (`bos_of`); the caller puts BOS at the start of each window (`jq.apps.perplexity.make_windows(bos=...)`)."""
    bos = bos_of(tokenizer)
    ids = tokenizer.encode(text, add_special_tokens=False) if bos is not None else tokenizer.encode(text)
    return np.asarray(ids, np.int32), bos


def add_calib_args(parser: argparse.ArgumentParser, what: str = "calibration") -> None:
    """The flags of a calibration draw (`calibration_draw`'s arguments, with its defaults) on an argparse parser:
    --calib-samples, --calib-len, --calib-seed, --calib-sampling. `what` names the windows in the help text."""
    parser.add_argument("--calib-samples", type=int, default=128, help=f"{what} windows (default 128)")
    parser.add_argument("--calib-len", type=int, default=512, help=f"tokens per {what} window (default 512)")
    parser.add_argument("--calib-seed", type=int, default=0, help=f"seed for drawing the {what} windows")
    parser.add_argument("--calib-sampling", choices=CALIB_SAMPLINGS, default=CALIB_SAMPLINGS[0],
                        help="windows: distinct aligned windows per file (default); stream: random starts anywhere "
                             "in the concatenated text, with replacement (the published GPTQ code's draw)")


def calibration_tokens(tokenizer: Any, files: list[Path], samples: int = 128, length: int = 512, seed: int = 0,
                       sampling: str = "windows") -> np.ndarray:
    """`samples` windows of `length` tokens drawn at random (seeded) from the files' token streams → int32
    [samples, length]. `sampling="windows"`: distinct non-overlapping windows aligned within each file;
    `"stream"`: a uniformly random start anywhere in the files' concatenated stream, with replacement (windows may
    overlap or straddle two files) — how the published GPTQ code draws its calibration set. Errors name the files,
    the tokens they hold and what was asked."""
    if samples < 1 or length < 2:
        raise ValueError(f"calibration needs samples >= 1 and length >= 2, got {samples} x {length}")
    if sampling not in CALIB_SAMPLINGS:
        raise ValueError(f"calibration sampling {sampling!r}: expected one of {', '.join(CALIB_SAMPLINGS)}")
    streams = [text_ids(tokenizer, read_text(f, "calibration file"))[0] for f in files]
    bos = bos_of(tokenizer)
    if bos is None:
        return _draw(streams, files, samples, length, seed, sampling)
    # each window is BOS + length - 1 text tokens, as the model was trained and is evaluated
    return np.concatenate([np.full((samples, 1), bos, np.int32),
                           _draw(streams, files, samples, length - 1, seed, sampling)], 1)


def _draw(streams: list[np.ndarray], files: list[Path], samples: int, length: int, seed: int,
          sampling: str) -> np.ndarray:
    """`samples` windows of `length` tokens from the files' token `streams` -> int32 [samples, length] (the draw
    `calibration_tokens` describes)."""
    total = sum(len(s_) for s_ in streams)
    rng = np.random.default_rng(seed)
    if sampling == "stream":
        if total < length:
            raise ValueError(f"calibration text too short: {', '.join(str(f) for f in files)} hold {total} tokens, "
                             f"fewer than one window of {length}. Pass more text (--calib) or a shorter --calib-len")
        stream = np.concatenate(streams)
        starts = rng.integers(0, total - length + 1, size=samples)
        return np.stack([stream[i : i + length] for i in starts])
    slots = [(i, j * length) for i, st in enumerate(streams) for j in range(len(st) // length)]
    if len(slots) < samples:
        raise ValueError(
            f"calibration text too short: {', '.join(str(f) for f in files)} hold {total} tokens, {len(slots)} "
            f"windows of {length}; {samples} were asked. Pass more text (--calib) or fewer/shorter samples "
            "(--calib-samples / --calib-len), or --calib-sampling stream (windows may overlap)"
        )
    pick = rng.choice(len(slots), size=samples, replace=False)
    return np.stack([streams[slots[k][0]][slots[k][1] : slots[k][1] + length] for k in sorted(pick)])


def calibration_draw(tokenizer: Any, files: list[Path], samples: int = 128, length: int = 512, seed: int = 0,
                     sampling: str = "windows") -> tuple[np.ndarray, dict]:
    """`calibration_tokens(...)` (int32 [samples, length]) and the record of the draw (files, samples, length, seed,
    sampling) that results and checkpoints carry, so a figure names the calibration it came from."""
    tokens = calibration_tokens(tokenizer, files, samples, length, seed, sampling)
    return tokens, {"files": [str(f) for f in files], "samples": samples, "length": length, "seed": seed,
                    "sampling": sampling}


def data_dir() -> Path | None:
    """The directory of default texts: `$JQ_DATA_DIR`, else `../shared/data/austen` beside a source checkout, else
    None (an installed package: pass the files)."""
    env = os.environ.get("JQ_DATA_DIR")
    if env:
        return Path(env).expanduser()
    d = _REPO.parent / "shared" / "data" / "austen"
    return d if d.is_dir() else None


def default_eval_text(directory: Path | None = None) -> Path:
    """persuasion.txt in `directory` (default `data_dir()`), else the excerpt a source checkout ships in data/."""
    directory = directory if directory is not None else data_dir()
    for p in ((directory / EVAL_NAME) if directory else None, _REPO / "data" / "persuasion_excerpt.txt"):
        if p is not None and p.exists():
            return p
    raise FileNotFoundError("no default evaluation text: pass --text FILE (or set JQ_DATA_DIR)")


def default_calib_files(eval_text: Path | None = None, directory: Path | None = None) -> list[Path]:
    """The texts in `directory` (default `data_dir()`) other than the evaluation text; empty when there are none."""
    directory = directory if directory is not None else data_dir()
    if directory is None or not directory.is_dir():
        return []
    name = Path(eval_text).name if eval_text else EVAL_NAME
    return sorted(p for p in directory.glob("*.txt") if p.name != name)


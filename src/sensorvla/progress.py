"""Progress reporting with one rule for every loop: a bar on a terminal, plain periodic log lines otherwise.

`--train.progress` (and the `progress` argument of the library functions) picks: "on" = a tqdm bar, "off" =
plain lines, "auto" (the default, also `True`) = a bar only when stdout and stderr are both terminals, so a
redirected log (`sensorvla demo > log.txt 2>&1`) never gets the `\\r` frames of a bar; `False` = silent (the
caller reports by itself, e.g. a rank other than 0). Plain lines go to the `sensorvla.progress` logger while
the loop runs, `interval_s` (15 s) apart and at least a fifth of the time elapsed (a long loop gets about 20
lines, not hundreds), and one when it ends. `quiet_library_bars()` turns the bars of
transformers and huggingface_hub ("Loading weights", downloads) off under the same rule.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

logger = logging.getLogger("sensorvla.progress")

Mode = bool | str  # True = "auto", False = silent, or "auto" / "on" / "off"
MODES = ("auto", "on", "off")


def use_progress_bar(setting: Mode = "auto", allowed: bool = True) -> bool:
    """Whether to draw a bar: `setting` "on" yes, "off" / False no, "auto" / True only when stdout and stderr
    are terminals; never when not `allowed`."""
    if setting is True:
        setting = "auto"
    if setting is False or not allowed or setting == "off":
        return False
    if setting not in MODES:
        raise ValueError(f"progress mode {setting!r}: choose one of {MODES}, True or False")
    return setting == "on" or (sys.stdout.isatty() and sys.stderr.isatty())


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)} min {seconds % 60:02.0f} s"


class Progress:
    """A loop's progress: a tqdm bar, plain periodic lines, or nothing (see the module docstring).

    Iterate over it like tqdm (`for x in progress(items, desc=...)`) or call `update(n)`; `close()` (or the end
    of the iteration, or the `with` block) writes the final line. `set_postfix` shows on the bar and in the lines.
    """

    def __init__(
        self,
        iterable: Iterable | None = None,
        *,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        mode: Mode = True,
        initial: int = 0,
        interval_s: float = 15.0,
    ):
        self.iterable, self.desc, self.unit, self.interval_s = iterable, desc, unit, interval_s
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.start_n = total, initial, initial
        self.lines = mode is not False and not use_progress_bar(mode)
        self.postfix: dict[str, Any] = {}
        self._bar = None
        if use_progress_bar(mode):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit)
        self._t0 = self._last = time.perf_counter()
        self._closed = False

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        except GeneratorExit:  # the loop stopped early (break, an error): end the bar without a "done" line
            self.close(final_line=False)
            raise
        self.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """Count `n` more units done; a plain line when `interval_s` (and a fifth of the time elapsed) has passed
        since the last one."""
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.lines:
            now = time.perf_counter()
            if now - self._last >= max(self.interval_s, (now - self._t0) / 5):
                self._line()

    def set_postfix(self, **values: Any) -> None:
        """Values shown after the count (the bar's postfix; appended to the plain lines)."""
        self.postfix = values
        if self._bar is not None:
            self._bar.set_postfix(**values)

    def _line(self, final: bool = False) -> None:
        self._last = now = time.perf_counter()
        elapsed, done = now - self._t0, self.n - self.start_n
        count = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        parts = [f"{self.desc}: {count} {self.unit}" if self.desc else f"{count} {self.unit}"]
        if final:
            parts.append(f"done in {_duration(elapsed)}")
        else:
            parts.append(f"{_duration(elapsed)} elapsed")
            if self.total and done > 0:
                parts.append(f"eta {_duration(elapsed / done * (self.total - self.n))}")
        parts += [f"{k} {v}" for k, v in self.postfix.items()]
        logger.info(" | ".join(parts))

    def close(self, final_line: bool = True) -> None:
        """End the bar, or write the final plain line (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.lines and final_line:
            self._line(final=True)


def progress(iterable: Iterable | None = None, **kwargs: Any) -> Progress:
    """`Progress(iterable, **kwargs)`: the one progress helper of the package (see `Progress`)."""
    return Progress(iterable, **kwargs)


def quiet_library_bars(mode: Mode = True) -> bool:
    """Turn transformers' and huggingface_hub's progress bars off unless `use_progress_bar(mode)`; returns
    whether they stay on. Process-wide (call it at the start of a command): before those libraries are
    imported it sets `HF_HUB_DISABLE_PROGRESS_BARS=1` (unless already set), which both read on import and
    child processes inherit; after, it calls their switches."""
    on = use_progress_bar(mode)
    if not on:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if "transformers" not in sys.modules and "huggingface_hub" not in sys.modules:
            return on
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            pass
        try:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        except ImportError:
            pass
    return on

"""Progress bars for the long steps outside training (mining, guide-cache prefill, evaluation encoding),
in the style of Lightning's training bar, and quiet when the output is not a terminal (logs, CI, sbatch).

    with progress(len(texts), "guide cache", unit="text") as bar:
        for batch in batches:
            ...
            bar.update(len(batch))
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

# Lightning's TQDMProgressBar format (lightning.pytorch.callbacks.progress.tqdm_progress).
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"


def progress(total: int, desc: str, unit: str = "text", file=None, leave: bool = False) -> tqdm:
    """A tqdm bar on `file` (stderr), disabled unless `file` is a terminal."""
    file = file if file is not None else sys.stderr
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        bar_format=BAR_FORMAT,
        dynamic_ncols=True,
        file=file,
        leave=leave,
        disable=not getattr(file, "isatty", lambda: False)(),
    )


def quiet_library_bars(file=None) -> None:
    """Turn off transformers', huggingface_hub's and datasets' own bars (weight loading, downloads, the
    `map`s mteb runs over a corpus) when `file` (stderr) is not a terminal: in logs they are carriage-
    return noise."""
    file = file if file is not None else sys.stderr
    if getattr(file, "isatty", lambda: False)():
        return
    import datasets
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    disable_progress_bars()
    transformers_logging.disable_progress_bar()
    datasets.disable_progress_bars()

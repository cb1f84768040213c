"""Which config samples a run asks for (``--config``): kinds and sample names → an entry's samples.

The samples themselves are built by ``moeconf.hf.configs`` (tiny, default, published) and
``moeconf.strategies`` (hypothesis).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from moeconf.hf.configs import DEFAULT_HYPOTHESIS_EXAMPLES, default_sample, invalid_samples, published_samples
from moeconf.registry.config_space import CONFIG_KINDS, TINY, ConfigSample
from moeconf.registry.entry import ArchEntry


class UnknownConfig(ValueError):
    """A ``--config`` name that is no kind and no sample of the entry."""


def samples(
    entry: ArchEntry, selectors: Sequence[str], hypothesis_examples: int = DEFAULT_HYPOTHESIS_EXAMPLES
) -> list[ConfigSample]:
    """The entry's samples that ``selectors`` (kinds or sample names) choose, in kind order, each once.

    A name that no sample of this entry has is skipped (``published:qwen3-30b-a3b`` names another
    entry's checkpoint); ``check_selectors`` rejects names no entry has.
    """
    chosen: list[ConfigSample] = []
    for kind in CONFIG_KINDS:
        wanted_kind = kind in selectors
        named = [s for s in selectors if s.startswith(kind)]
        if not wanted_kind and not named:
            continue
        if kind == "tiny":
            pool = [TINY]
        elif kind == "default":
            pool = [default_sample(entry)]
        elif kind == "published":
            pool = list(published_samples(entry))
        elif kind == "invalid":
            pool = list(invalid_samples(entry))
        else:  # hypothesis
            from moeconf.strategies import hypothesis_samples  # imports hypothesis only when asked

            count = hypothesis_examples
            indices = [int(s.split(":", 1)[1]) for s in named if ":" in s]
            count = max([count if wanted_kind else 0] + [i + 1 for i in indices])
            pool = list(hypothesis_samples(entry, count))
        chosen += [s for s in pool if wanted_kind or s.name in selectors]
    return chosen


_SELECTOR = re.compile(r"^(tiny|default|published|hypothesis|invalid)$|^(published|invalid):[A-Za-z0-9._-]+$|^hypothesis:\d+$")


def check_selectors(selectors: Sequence[str]) -> None:
    """Raise ``UnknownConfig`` (one line) for a selector that is no kind and no sample name's form."""
    bad = [s for s in selectors if not _SELECTOR.match(s)]
    if bad:
        raise UnknownConfig(
            f"unknown --config {', '.join(bad)}; valid: {', '.join(CONFIG_KINDS)}, published:<checkpoint>, "
            "hypothesis:<i>, invalid:<what>"
        )

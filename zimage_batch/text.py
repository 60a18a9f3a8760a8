"""Error text for one-line messages: the one place that turns an exception into a line."""

from __future__ import annotations


def first_line(exc: BaseException | str, limit: int | None = None) -> str:
    """The first non-empty line of an exception's message (its class name if it has none),
    with unprintable characters escaped (so a message stays one printable line), cut at `limit`."""
    text = exc if isinstance(exc, str) else str(exc)
    lines = [line for line in text.strip().splitlines() if line.strip()]
    line = lines[0] if lines else ("" if isinstance(exc, str) else type(exc).__name__)
    line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in line)
    return line[:limit] if limit else line


def plural(count: int, word: str, many: str | None = None) -> str:
    """'1 shard', '2 shards', '0 shards' (`many` for words that do not just take an s)."""
    return f"{count:,} {word if count == 1 else (many or word + 's')}"

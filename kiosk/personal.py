"""Personal text in memory: a wrapper whose ``repr`` and ``str`` never show what it holds.

A visitor's words, or an agent's summary of them (the note ``take_message`` stores beside a recording), are
personal data: they may be stored only sealed to the operator's key, and never reach a log line, a metric or
``/status``. Events, effects and states are logged by their ``repr``; holding such text in a ``PersonalText``
keeps it out of every one of those lines by construction (they show ``PersonalText(<42 characters>)``). The
text itself is read only where it is sealed: ``.text``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class PersonalText:
    """A piece of personal text; only ``.text`` gives it out (to be sealed), never ``repr`` or ``str``."""

    text: str = field(repr=False)

    def __repr__(self) -> str:
        return f"PersonalText(<{len(self.text)} characters>)"

    __str__ = __repr__

    def __len__(self) -> int:
        return len(self.text)

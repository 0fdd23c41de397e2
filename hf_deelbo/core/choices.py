"""The string choices of the package's arguments: each is one `Choice` enum whose members carry
what they mean (`description`), read by the argument's type and help, its validation, the config
entry's schema and the docs, so that a choice is written in one place."""

from __future__ import annotations

import enum


class Choice(str, enum.Enum):
    """A string choice; members are defined as `NAME = "value", "what it means"`. A member is the
    string itself (`Choice.X == "x"`, JSON and f-strings give the value)."""

    def __new__(cls, value: str, description: str):
        member = str.__new__(cls, value)
        member._value_ = value
        member.description = description
        return member

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(member.value for member in cls)

    @classmethod
    def described(cls) -> str:
        """ "'a' (what a means) or 'b' (what b means)": each choice with its meaning."""
        return " or ".join(f"{member.value!r} ({member.description})" for member in cls)

    @classmethod
    def check(cls, name: str, value) -> Choice:
        """The member `value` names; a ValueError naming the argument, every choice with its meaning
        and the value given when it names none."""
        try:
            return cls(value)
        except (ValueError, TypeError):
            raise ValueError(f"{name} must be {cls.described()}; got {value!r}") from None

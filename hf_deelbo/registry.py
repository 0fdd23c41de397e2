"""The methods the package knows, each registered once by its own module under `methods/`.

A method's `MethodSpec` is everything the shared layers need to know about it: the entry of
config.json its trainer writes (`key`, with the typed schema and format version that the one
reader, `hub.config.read_config_entry`, checks), and the model card's title, tag and citation.
Nothing outside a method's module names the method by a string literal; the hub and the card
read these specs (peft's `register_peft_method` plays the same part).
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields

# Kinds of value an entry's schema names (checked by `hub.config.read_config_entry`):
# "positive" a finite float > 0; "nonnegative" a finite float >= 0; "strengths" a nonnegative
# float or a dict of them (per-tensor values); "variances" a dict of finite floats > 0 by name
# (per-tensor variances); "radii" None or a dict of floats >= 0; "count" an
# int >= 0; "names" a list of non-empty strings; "text" a string; "flag" a bool; "version" the
# entry's format version, an int from 1 to the version this package writes.
VALUE_KINDS = (
    "positive",
    "nonnegative",
    "strengths",
    "variances",
    "radii",
    "count",
    "names",
    "text",
    "flag",
    "version",
)


def entry_field(kind: str, *, default=MISSING, name: str | None = None, choices: tuple[str, ...] | None = None):
    """A field of a method's typed config entry (a `hub.config.MethodConfig` dataclass): its value
    `kind` (`VALUE_KINDS`), its name in config.json when the Python name differs (`lambda` is a
    keyword), the values a "text" field may take, and its default (none: the key is required)."""
    if kind not in VALUE_KINDS:
        raise ValueError(f"entry_field(kind={kind!r}): use one of {VALUE_KINDS}")
    metadata = {"kind": kind, "name": name, "choices": choices}
    if default is None or isinstance(default, (int, float, str, bool)) or default is MISSING:
        return field(default=default, metadata=metadata)
    raise ValueError(f"entry_field(default={default!r}): give a number, a string, a bool or None")


def entry_schema(config_class: type) -> tuple[dict, dict]:
    """The schema (JSON name -> (kind, required)) and choices of a typed config entry's dataclass."""
    schema, choices = {}, {}
    for item in fields(config_class):
        name = item.metadata.get("name") or item.name
        schema[name] = (item.metadata["kind"], item.default is MISSING)
        if item.metadata.get("choices") is not None:
            choices[name] = tuple(item.metadata["choices"])
    return schema, choices


@dataclass(frozen=True)
class MethodSpec:
    """One fine-tuning method.

    Attributes:
        key: the entry of config.json holding the method's hyperparameters (`config.<key>`; raw
            timm models: `model.<key>_config`).
        title: the method's name in the model card ("L2-SP").
        tags: the model card's tags for the method, its own first ("l2-sp").
        citation: BibTeX entry of the method's paper.
        schema: name -> (kind, required) of every value the entry may hold (`VALUE_KINDS`).
        format_version: the entry's format version this package writes; None for an entry
            without one.
        choices: name -> the values a "text" entry may take (checked on read).
        companions: (name, value) -> the entry that must be present when `name` holds `value`
            (e.g. a layer-wise prior's variances).
        contract_arguments: arguments beyond the defaults with which the contract test
            (tests/test_contract.py) trains the method, e.g. to make a hyper-step happen in 2 steps.
        config_class: the typed entry (a `hub.config.MethodConfig` dataclass of `entry_field`s);
            when given, the schema and choices are read off its fields. Registering the spec sets
            the class's `method` to it.

    With a `format_version`, the schema takes `format_version` (kind "version") whether it names
    it or not.
    """

    key: str
    title: str
    tags: tuple[str, ...]
    citation: str
    schema: dict = field(default_factory=dict)
    format_version: int | None = None
    choices: dict = field(default_factory=dict)
    companions: dict = field(default_factory=dict)
    contract_arguments: dict = field(default_factory=dict)
    config_class: type | None = None

    def __post_init__(self):
        if self.config_class is not None:
            if self.schema or self.choices:
                raise ValueError(f"{self.key}: give a config_class or a schema and choices, not both")
            schema, choices = entry_schema(self.config_class)
            object.__setattr__(self, "schema", schema)
            object.__setattr__(self, "choices", choices)
        if self.format_version is not None and "format_version" not in self.schema:
            object.__setattr__(self, "schema", {**self.schema, "format_version": ("version", False)})
        unknown = {kind for kind, _ in self.schema.values()} - set(VALUE_KINDS)
        if unknown:
            raise ValueError(f"{self.key}: unknown value kinds {sorted(unknown)} in the schema; use {VALUE_KINDS}")

    def config_entry(self, values: dict) -> dict:
        """The JSON dict stored as `config.<key>`: `values`, the format version, keys sorted."""
        if self.format_version is not None:
            values = {**values, "format_version": self.format_version}
        return dict(sorted(values.items()))


_METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add `spec` to the registry (once per key) and return it."""
    if spec.key in _METHODS and _METHODS[spec.key] != spec:
        raise ValueError(f"a method with config key {spec.key!r} is already registered: {_METHODS[spec.key].title}")
    _METHODS[spec.key] = spec
    if spec.config_class is not None:
        spec.config_class.method = spec
    return spec


def registered_methods() -> tuple[MethodSpec, ...]:
    """Every registered method, in registration order."""
    return tuple(_METHODS.values())


def method_spec(key: str) -> MethodSpec:
    """The registered method whose config entry is `key`."""
    try:
        return _METHODS[key]
    except KeyError:
        raise KeyError(f"no method with config key {key!r}; registered: {sorted(_METHODS)}") from None


def config_keys() -> tuple[str, ...]:
    """The config.json entries the package writes, one per registered method."""
    return tuple(_METHODS)

"""The params dialect, on pydantic (v2): typed scalars, the `@config` decorator, and one place that turns
pydantic's ValidationError into one ValueError line naming the full key (`align.lr`, `prepare.hf.path`)
and what is allowed, with a did-you-mean for an unknown key. config.py declares the sections with it.

Cross-field checks are `model_validator`s that call `fail(key, value, allowed)` with the key relative to
the config they check; the section and the path to it are added here.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
from typing import Annotated, Any, TypeVar

from pydantic import BeforeValidator, ConfigDict, Field, Strict, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass
from pydantic_core import PydanticCustomError

T = TypeVar("T")


def _number(value: Any) -> Any:
    """Floats come as floats, ints, or strings: YAML 1.1 (PyYAML) reads `3e-4` (no dot) as a string."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise PydanticCustomError("float_type", "expected float")
    return value


Int = Annotated[int, Strict()]  # a bool, a float or a string is no int
Str = Annotated[str, Strict()]
Bool = Annotated[bool, Strict()]
Float = Annotated[float, BeforeValidator(_number), Field(allow_inf_nan=False)]  # nan/inf: no training step uses them
PositiveInt = Annotated[Int, Field(ge=1)]
NonNegativeInt = Annotated[Int, Field(ge=0)]
PositiveFloat = Annotated[Float, Field(gt=0)]
NonNegativeFloat = Annotated[Float, Field(ge=0)]
Fraction = Annotated[Float, Field(ge=0, lt=1)]


# -- pydantic errors -> one line -------------------------------------------------------------------------
_EXPECTED = {"int_type": "expected int", "float_type": "expected float", "string_type": "expected str",
             "float_parsing": "expected float (a number such as 3e-4)", "bool_type": "expected bool",
             "finite_number": "expected a finite float (not nan or inf)", "list_type": "expected a list",
             "dataclass_type": "expected a mapping", "dataclass_args_type": "expected a mapping",
             "greater_than": "must be > {gt}", "greater_than_equal": "must be >= {ge}",
             "less_than": "must be < {lt}", "less_than_equal": "must be <= {le}"}


def unknown_key(section: str, key: Any, allowed: list[str]) -> str:
    close = difflib.get_close_matches(str(key), allowed, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f"; allowed keys: {', '.join(allowed)}"
    return f"unknown key '{section}.{key}'{hint}"


def fail(key: str, value: Any, allowed: str) -> None:
    """A cross-field check failed: `key` is relative to the config checked (the section is added)."""
    raise ValueError(f"{key}={value!r} is invalid: {allowed}")


def _config_at(cls: Any, loc: tuple) -> Any:
    """The config class at `loc` below `cls` (None when `loc` leads elsewhere)."""
    for name in loc:
        fields = getattr(cls, "__pydantic_fields__", {})
        if name not in fields:
            return None
        cls = fields[name].annotation
    return cls if dataclasses.is_dataclass(cls) else None


def _one_line(error: ValidationError, cls: type, section: str, exclude: tuple[str, ...] = ()) -> str:
    err = error.errors(include_url=False)[0]
    loc = tuple(p for p in err["loc"] if p != "[key]")  # a mapping's bad key: the key itself ends the path
    where = section + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)
    if err["type"] == "value_error":  # a cross-field validator (fail): its message starts with the key
        return f"{where}.{err['ctx']['error']}"
    if err["type"] == "unexpected_keyword_argument":
        owner = _config_at(cls, loc[:-1])
        allowed = [f.name for f in dataclasses.fields(owner)] if owner else []
        return unknown_key(where.rsplit(".", 1)[0], loc[-1], [k for k in allowed if loc[:-1] or k not in exclude])
    if err["type"] == "literal_error":
        explain = "allowed: " + ", ".join(re.findall(r"'([^']*)'", err["ctx"]["expected"]))
    else:
        explain = _EXPECTED.get(err["type"], err["msg"]).format(**err.get("ctx", {}))
    return f"{where}={err['input']!r} is invalid: {explain}"


def config(section: str) -> Any:
    """Class decorator: a pydantic dataclass (unknown keys forbidden) for params section `section`,
    whose constructor raises the one-line ValueError instead of pydantic's report."""
    def wrap(cls: type[T]) -> type[T]:
        cls = pydantic_dataclass(cls, config=ConfigDict(extra="forbid"))
        validate = cls.__init__

        @functools.wraps(validate)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            try:
                validate(self, *args, **kwargs)
            except ValidationError as e:
                raise ValueError(_one_line(e, type(self), section)) from None
        cls.__init__ = __init__  # type: ignore[method-assign]
        cls.SECTION = section  # type: ignore[attr-defined]
        return cls
    return wrap


def from_dict(cls: type[T], data: dict[str, Any] | None, section: str | None = None,
              exclude: tuple[str, ...] = (), **overrides: Any) -> T:
    """Validate a params mapping as `cls`. `exclude`: fields this mapping may not set (`overrides` does)."""
    section = section or cls.SECTION  # type: ignore[attr-defined]
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(f"{section}={data!r} is invalid: expected a mapping of keys")
    allowed = [f.name for f in dataclasses.fields(cls) if f.name not in exclude]  # type: ignore[arg-type]
    for key in data:
        if key in exclude:
            raise ValueError(unknown_key(section, key, allowed))
    try:
        return cls.__pydantic_validator__.validate_python({**data, **overrides})  # type: ignore[attr-defined]
    except ValidationError as e:
        raise ValueError(_one_line(e, cls, section, exclude)) from None


def part(cfg: Any, cls: type[T]) -> T:
    """The `cls` part of a config that extends it, e.g. the AlignerConfig of an AlignmentConfig."""
    return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})  # type: ignore[arg-type]


def fields_of(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def heads_divide(width: str, heads: str = "num_heads") -> Any:
    """A model validator: config.<width> must be a multiple of config.<heads> (attention head size)."""
    def check(self: Any) -> Any:
        if getattr(self, width) % getattr(self, heads):
            fail(width, getattr(self, width), f"must be divisible by {heads}={getattr(self, heads)}")
        return self
    return check

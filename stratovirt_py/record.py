"""Plain records: the part of ``dataclasses`` this project uses, at none of its cost.

``dataclasses`` imports ``inspect`` (and with it ast, dis, tokenize) and compiles
an ``__init__`` per class with ``exec``: together several milliseconds before a
restored vCPU may run.  A record is declared the same way (annotations with
defaults, ``field(default_factory=...)``, ``frozen=True``) and gets ``__init__``,
``__eq__``, ``__repr__`` (and ``__hash__`` when frozen) from shared functions.
Annotations are never evaluated (modules use ``from __future__ import
annotations``); one that starts with ``ClassVar`` is a class attribute, not a field.
"""

from __future__ import annotations

_MISSING = object()


class FrozenInstanceError(AttributeError):
    pass


class field:  # noqa: N801 - spelled as dataclasses spells it
    __slots__ = ("default", "default_factory", "repr")

    def __init__(self, *, default=_MISSING, default_factory=_MISSING, repr: bool = True):
        self.default = default
        self.default_factory = default_factory
        self.repr = repr


def _init(self, *args, **kwargs) -> None:
    spec = self.__record_fields__
    if len(args) > len(spec):
        raise TypeError(f"{type(self).__name__}() takes {len(spec)} arguments, {len(args)} given")
    put = object.__setattr__
    for i, (name, default, factory) in enumerate(spec):
        if i < len(args):
            if name in kwargs:
                raise TypeError(f"{type(self).__name__}() got multiple values for '{name}'")
            value = args[i]
        elif name in kwargs:
            value = kwargs.pop(name)
        elif factory is not _MISSING:
            value = factory()
        elif default is not _MISSING:
            value = default
        else:
            raise TypeError(f"{type(self).__name__}() missing required argument '{name}'")
        put(self, name, value)
    if kwargs:
        raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument "
                        f"'{next(iter(kwargs))}'")
    post = getattr(self, "__post_init__", None)
    if post is not None:
        post()


def _values(self) -> tuple:
    return tuple(getattr(self, name) for name, _d, _f in self.__record_fields__)


def _eq(self, other):
    if other.__class__ is not self.__class__:
        return NotImplemented
    return _values(self) == _values(other)


def _repr(self) -> str:
    hidden = self.__record_hidden__
    inner = ", ".join(f"{name}={getattr(self, name)!r}" for name, _d, _f in self.__record_fields__
                      if name not in hidden)
    return f"{type(self).__qualname__}({inner})"


def _hash(self) -> int:
    return hash(_values(self))


def _frozen_setattr(self, name, value):
    raise FrozenInstanceError(f"cannot assign to field '{name}'")


def _frozen_delattr(self, name):
    raise FrozenInstanceError(f"cannot delete field '{name}'")


def record(cls=None, *, frozen: bool = False):
    """Class decorator: make ``cls`` a record (usable as ``@record`` or ``@record(frozen=True)``)."""
    def wrap(cls):
        spec = []
        hidden = set()
        for base in reversed(cls.__mro__[1:]):
            spec.extend(getattr(base, "__record_fields__", ()))
            hidden.update(getattr(base, "__record_hidden__", ()))
        for name, note in cls.__dict__.get("__annotations__", {}).items():
            if isinstance(note, str) and note.startswith(("ClassVar", "typing.ClassVar")):
                continue
            value = cls.__dict__.get(name, _MISSING)
            default = factory = _MISSING
            if isinstance(value, field):
                default, factory = value.default, value.default_factory
                if not value.repr:
                    hidden.add(name)
                if default is _MISSING:
                    delattr(cls, name)
                else:
                    setattr(cls, name, default)
            else:
                default = value
            spec = [s for s in spec if s[0] != name]
            spec.append((name, default, factory))
        cls.__record_fields__ = tuple(spec)
        cls.__record_hidden__ = frozenset(hidden)
        cls.__init__ = _init
        cls.__eq__ = _eq
        cls.__repr__ = _repr
        if frozen:
            cls.__hash__ = _hash
            cls.__setattr__ = _frozen_setattr
            cls.__delattr__ = _frozen_delattr
        else:
            cls.__hash__ = None
        return cls
    return wrap if cls is None else wrap(cls)


def is_record(value) -> bool:
    return hasattr(type(value), "__record_fields__")


def asdict(value):
    """A record as a dict, records inside it too (lists, tuples and dicts are copied)."""
    if is_record(value):
        return {name: asdict(getattr(value, name)) for name, _d, _f in value.__record_fields__}
    if isinstance(value, list):
        return [asdict(v) for v in value]
    if isinstance(value, tuple):
        return tuple(asdict(v) for v in value)
    if isinstance(value, dict):
        return {k: asdict(v) for k, v in value.items()}
    return value



def replace(value, **changes):
    """A copy of the record ``value`` with ``changes`` (as ``dataclasses.replace``)."""
    current = {name: getattr(value, name) for name, _d, _f in value.__record_fields__}
    return type(value)(**{**current, **changes})

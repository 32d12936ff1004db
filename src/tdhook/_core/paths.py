"""Module-path grammar and regex selection: the only place that turns strings into submodules.

Grammar (declarative, no ``eval``)::

    path    := [step] ( "." step | "[" index "]" )*
    step    := name | "<" any-characters ">"
    index   := integer | "-" integer | quoted-string

Examples: ``"linear1"``, ``"layers[0]"``, ``"layers[-1]"``, ``"layers.0"``, ``"[2]"``, ``"2"``,
``"blocks['attn']"``, ``"module.<block0/conv2>.relu"``. An empty path is the root.

Selection by pattern uses :func:`re.match` (anchored at the start, as tdhook 0.1 did) over
``named_modules()`` names relative to a root, excluding the root itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any, Union

from tensordict.nn import TensorDictModule
from torch import nn

from ..errors import ModulePathError, NoMatchError, nearest

__all__ = [
    "PathStep",
    "chain_holds",
    "compile_pattern",
    "join_paths",
    "parse_path",
    "resolution_chain",
    "resolve_path",
    "select_modules",
]

_TOKEN = re.compile(
    r"""
    \s*(?:
        (?P<dot>\.)
      | \[\s*(?P<int>-?\d+)\s*\]
      | \[\s*(?P<q>['"])(?P<str>.*?)(?P=q)\s*\]
      | <(?P<esc>[^>]*)>
      | (?P<name>[^.\[\]<>\s]+)
    )
    """,
    re.VERBOSE,
)

PathStep = Union[str, int]  # noqa: UP007 - runtime alias; `str | int` needs Python 3.10+ at runtime
"""One step of a parsed path: an attribute/child name (``str``) or a container index (``int``)."""


_cache: dict[str, tuple[PathStep, ...]] = {}


def parse_path(path: str) -> tuple[PathStep, ...]:
    """Parse a module path into steps.

    Args:
        path: A path in the grammar of this module.

    Returns:
        A tuple of names (``str``) and indices (``int``).

    Raises:
        ModulePathError: If the path is not in the grammar (unbalanced brackets, a slice...).

    Examples:
        >>> parse_path("layers[-1].fc")
        ('layers', -1, 'fc')
        >>> parse_path("module.<a/b>.0")
        ('module', 'a/b', '0')
    """
    if not isinstance(path, str):
        raise ModulePathError(
            f"Invalid submodule path {path!r}: expected a string such as 'layers[0].fc', got {type(path).__name__}"
        )
    cached = _cache.get(path)
    if cached is not None:
        return cached
    steps: list[PathStep] = []
    pos = 0
    text = path.strip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            if "<" in text[pos:] and ">" not in text[pos:]:
                hint = "missing closing '>'"
            elif ":" in text[pos:]:
                hint = "slices are not supported, a slice is a new container that never runs; hook its items"
            else:
                hint = f"unexpected text {text[pos:]!r}"
            raise ModulePathError(
                f"Invalid submodule path {path!r}: {hint}. Use names separated by dots, "
                "integer indices in brackets ('layers[-1]') or <escaped names>."
            )
        pos = match.end()
        if match.group("dot"):
            continue
        if match.group("int") is not None:
            steps.append(int(match.group("int")))
        elif match.group("q") is not None:
            steps.append(match.group("str"))
        elif match.group("esc") is not None:
            steps.append(match.group("esc"))
        else:
            steps.append(match.group("name"))
    result = tuple(steps)
    if len(_cache) < 4096:
        _cache[path] = result
    return result


def _step(obj: nn.Module, step: PathStep) -> object:
    if isinstance(step, int):
        if isinstance(obj, TensorDictModule):  # like attribute access, indexing reaches the wrapped module
            obj = obj.module
        if type(obj) is nn.ModuleList:  # ModuleList's own __getitem__, without its index helpers
            children = obj._modules
            index = step + len(children) if step < 0 else step
            if not 0 <= index < len(children):
                raise IndexError(f"index {step} is out of range")
            return children[str(index)]  # a ModuleList keeps its keys "0".."n-1"
        if isinstance(obj, (nn.Sequential, nn.ModuleList)):
            return obj[step]
        return list(obj.children())[step]
    if isinstance(obj, nn.ModuleDict) and step in obj:
        return obj[step]
    registry = obj._modules  # nn.Module's child registry (read-only), skips the slow __getattr__ chain
    if step in registry:
        return registry[step]
    if isinstance(obj, TensorDictModule):  # attribute access falls through to the wrapped module
        inner = registry.get("module")
        if inner is not None and step in inner._modules:
            return inner._modules[step]
    return getattr(obj, step)


def resolve_path(root: nn.Module, path: str | Sequence[PathStep]) -> nn.Module:
    """Return the submodule of ``root`` at ``path``.

    Args:
        root: The module paths are relative to.
        path: A path string (see the module docstring) or already parsed steps.

    Returns:
        The submodule.

    Raises:
        ModulePathError: If a step does not exist or does not lead to an ``nn.Module``; the
            message lists the nearest existing module names.
    """
    steps = parse_path(path) if isinstance(path, str) else tuple(path)
    obj: object = root
    for i, step in enumerate(steps):
        try:
            obj = _step(obj, step)  # type: ignore[arg-type]
        except (AttributeError, IndexError, KeyError, TypeError) as err:
            done = _format(steps[:i])
            names = [n for n, _ in root.named_modules() if n]
            raise ModulePathError(
                f"Invalid submodule path {path!r}: {'the root' if not done else repr(done)} has no "
                f"submodule {step!r} ({type(err).__name__}: {err}). Nearest existing module names: "
                f"{nearest(_format(steps), names)}"
            ) from None
        if not isinstance(obj, nn.Module):
            raise ModulePathError(
                f"Invalid submodule path {path!r}: {_format(steps[: i + 1])!r} is a {type(obj).__name__}, "
                "not an nn.Module. Point the path at a submodule."
            )
    return obj  # type: ignore[return-value]


#: The checks that replay a resolution by child names: (parent's child registry, name, child or None).
Chain = tuple[tuple[dict[str, Any], str, Union[nn.Module, None]], ...]  # noqa: UP007 - runtime alias


def resolution_chain(root: nn.Module, path: str) -> Chain | None:
    """What resolving ``path`` from ``root`` looked at, when it only named children; else None.

    Each check is (parent's child registry, name, child), or child ``None`` for "no such child"
    on a ``TensorDictModule`` whose wrapped ``module`` has it (the fall-through of :func:`_step`).
    Paths with indices or attributes give None (an index may point elsewhere once a container
    changes length). :func:`chain_holds` tells whether the resolution still gives the same
    module. The chain holds the registries and children strongly: keep it no longer than ``root``.
    """
    chain: list[tuple[dict[str, Any], str, nn.Module | None]] = []
    obj = root
    for step in parse_path(path):
        if not isinstance(step, str):
            return None
        child = obj._modules.get(step)
        if child is None and isinstance(obj, TensorDictModule):
            inner = obj._modules.get("module")
            if inner is None or inner._modules.get(step) is None:
                return None
            chain.append((obj._modules, step, None))
            chain.append((obj._modules, "module", inner))
            obj, child = inner, inner._modules[step]
        if not isinstance(child, nn.Module):
            return None
        chain.append((obj._modules, step, child))
        obj = child
    return tuple(chain) or None


def chain_holds(chain: Chain) -> bool:
    """True when every step of a :func:`resolution_chain` still holds the same child (a dict look-up each)."""
    for registry, name, child in chain:  # noqa: SIM110 - a loop is twice as fast as all(genexpr) here
        if registry.get(name) is not child:
            return False
    return True


def _format(steps: Sequence[PathStep]) -> str:
    out = ""
    for s in steps:
        if isinstance(s, int):
            out += f"[{s}]"
        else:
            out += ("." if out else "") + (s if re.fullmatch(r"[^.\[\]<>\s]+", s) else f"<{s}>")
    return out


def join_paths(*parts: str | None) -> str:
    """Join non-empty path parts with dots (``join_paths("td_module", "", "module")``)."""
    return ".".join(p.strip(".") for p in parts if p and p.strip("."))


def iter_named_modules(
    root: nn.Module,
    classes_to_hook: tuple[type, ...] = (nn.Module,),
    classes_to_skip: tuple[type, ...] = (),
) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(name, module)`` for submodules of ``root`` (root excluded) passing the class filters."""
    filtered = classes_to_hook != (nn.Module,) or bool(classes_to_skip)
    for name, module in root.named_modules():
        if not name:
            continue
        if not filtered or (isinstance(module, classes_to_hook) and not isinstance(module, classes_to_skip)):
            yield name, module  # type: ignore[misc]


def compile_pattern(pattern: str | re.Pattern[str] | Sequence[str]) -> re.Pattern[str]:
    """Compile a module pattern; a list or tuple of patterns matches a name matching any of them.

    Raises:
        NoMatchError: For an invalid regular expression, or a value that is neither a string nor
            a list of strings (the message names it).
    """
    if isinstance(pattern, re.Pattern):
        return pattern
    if isinstance(pattern, (list, tuple)):
        if not pattern or not all(isinstance(p, str) for p in pattern):
            raise NoMatchError(
                f"Invalid module pattern {pattern!r}: expected a regular expression (str) or a non-empty "
                "list of them, e.g. [r'layers\\.0$', r'fc\\d'] (a module matching any is selected)."
            )
        source = "|".join(f"(?:{p})" for p in pattern)
    elif isinstance(pattern, str):
        source = pattern
    else:
        raise NoMatchError(
            f"Invalid module pattern {pattern!r}: expected a regular expression (str) or a list of them, got "
            f"{type(pattern).__name__}."
        )
    try:
        return re.compile(source)
    except re.error as err:
        raise NoMatchError(f"Invalid module pattern {pattern!r}: {err}") from None


def select_modules(
    root: nn.Module,
    pattern: str | re.Pattern[str] | Sequence[str] | None,
    *,
    classes_to_hook: tuple[type, ...] = (nn.Module,),
    classes_to_skip: tuple[type, ...] = (),
    prefix: str = "",
    strict: bool = True,
) -> list[tuple[str, nn.Module]]:
    """Select submodules whose (optionally prefixed) name matches ``pattern`` with ``re.match``.

    Args:
        root: Module whose ``named_modules()`` are searched (the root itself is excluded).
        pattern: Regular expression, or a list of them (matching any); ``None`` matches nothing.
        classes_to_hook: Only instances of these classes are kept.
        classes_to_skip: Instances of these classes are dropped.
        prefix: Prepended (with a dot) to every name before matching, e.g. ``"td_module"`` for
            absolute names.
        strict: Raise :class:`NoMatchError` when nothing matches.

    Returns:
        ``(name, module)`` pairs in ``named_modules()`` order; names include ``prefix``.

    Raises:
        NoMatchError: If ``strict`` and nothing matches; the message lists real names.
    """
    if pattern is None:
        if strict:
            raise NoMatchError(
                "No module pattern given (None). Pass a regular expression such as r'layers\\.\\d+$'."
            )
        return []
    regex = compile_pattern(pattern)
    selected = []
    candidates = []
    head = join_paths(prefix)
    head = f"{head}." if head else ""  # join_paths(prefix, name), hoisted: torch's names have no edge dots
    for name, module in iter_named_modules(root, classes_to_hook, classes_to_skip):
        full = head + name
        candidates.append(full)
        if regex.match(full):
            selected.append((full, module))
    if strict and not selected:
        shown = candidates[:8]
        more = f" (and {len(candidates) - len(shown)} more)" if len(candidates) > len(shown) else ""
        mode = (
            "Names are absolute (they start with the prefix shown)"
            if prefix
            else "Names are relative to the model root"
        )
        raise NoMatchError(
            f"Pattern {regex.pattern!r} matched no module (re.match, anchored at the start). {mode}; "
            f"existing names: {shown}{more}. Check the pattern, or the `relative` flag."
        )
    return selected

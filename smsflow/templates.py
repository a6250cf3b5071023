"""Jinja2 rendering of SMS texts for CRM contacts (plain functions, no Prefect).

Template language
-----------------
* Jinja2 ``SandboxedEnvironment`` with ``StrictUndefined`` and autoescape off
  (SMS is plain text).  A variable that is missing for a contact is an error
  for that contact unless the template gives a fallback:
  ``{{ first_name | default("клиент") }}``.  Because of ``StrictUndefined``,
  test optional values with ``{% if promo_code is defined %}`` rather than
  ``{% if promo_code %}``.
* Sources are compiled once, when a :class:`MessageTemplate` is created (i.e.
  when it is loaded), and compiled code is cached by source text.  A syntax
  error raises :class:`TemplateCompileError` naming template, variant and line
  -- before any contact is rendered.

Context of one contact (later entries win)
------------------------------------------
Jinja globals < ``sender_name`` of the template < ``extra`` (campaign-wide
values) < keys of the nested ``attributes`` mapping < top-level contact keys.
``attributes`` itself stays available as a (cleaned) mapping.  Values that
are ``None``, NaN (float / numpy NaN, ``pandas.NA``, ``NaT``) or strings that
are empty after stripping are dropped, so they are *undefined* and
``default(...)`` applies; other strings are stripped of surrounding blanks.
A top-level key whose value is dropped does not hide an attribute of the
same name.

Variant and footer
------------------
The variant is the contact's language if the template has it (``ru-RU``,
``RU`` and ``ru_RU`` all match a ``ru`` variant), else the template's
``default_language``, else the first variant.  Marketing messages get the
opt-out footer of the chosen variant's language appended on a new line
(``FOOTER_SEPARATOR = "\\n"``, one septet / unit, same cost as a space);
transactional messages get none.  A body that already ends with the footer
is not given a second one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import yaml
from jinja2 import StrictUndefined, TemplateError, TemplateSyntaxError
from jinja2.exceptions import SecurityError, UndefinedError
from jinja2.sandbox import SandboxedEnvironment

from smsflow.sms_encoding import sms_info_batch
from smsflow.settings import PROJECT_ROOT

__all__ = [
    "DEFAULT_FOOTERS",
    "FOOTER_SEPARATOR",
    "KINDS",
    "MessageTemplate",
    "RenderError",
    "TemplateCompileError",
    "TemplateLoadError",
    "build_context",
    "load_template",
    "normalize_language",
    "render_batch",
    "render_contact",
]

KINDS = ("marketing", "transactional")
DEFAULT_FOOTERS: dict[str, str] = {
    "ru": "Для отказа ответьте СТОП",
    "en": "Reply STOP to opt out",
}
FOOTER_SEPARATOR = "\n"

YAML_SUFFIXES = (".yaml", ".yml")
JINJA_SUFFIXES = (".j2", ".jinja", ".jinja2", ".txt")
_YAML_KEYS = {"name", "kind", "default_language", "variants", "footer", "sender_name", "description"}
# "promo.ru" / "promo.pt-BR" -> base "promo", language "ru" / "pt-br"
_LANG_SUFFIX = re.compile(r"^(?P<base>.+)\.(?P<lang>[A-Za-z]{2}(?:[-_][A-Za-z0-9]{2,8})?)$")


# --------------------------------------------------------------------------
# errors


class TemplateLoadError(TemplateError):
    """A template file or definition is invalid (raised at load time)."""

    def __init__(self, message: str, *, template: str | None = None, path: str | None = None):
        super().__init__(message)
        self.template = template
        self.path = path


class TemplateCompileError(TemplateLoadError):
    """Jinja syntax error in one variant of a template."""

    def __init__(
        self,
        message: str,
        *,
        template: str | None = None,
        language: str | None = None,
        lineno: int | None = None,
        path: str | None = None,
    ):
        super().__init__(message, template=template, path=path)
        self.language = language
        self.lineno = lineno


class RenderError(Exception):
    """Rendering failed for one contact; ``str(err)`` is the human reason."""


# --------------------------------------------------------------------------
# environment and compilation

_ENV = SandboxedEnvironment(
    undefined=StrictUndefined,
    autoescape=False,
    keep_trailing_newline=False,
    auto_reload=False,
)


@lru_cache(maxsize=4096)
def _compile(source: str):
    return _ENV.from_string(source)


def normalize_language(value: Any) -> str | None:
    """``" RU_ru "`` -> ``"ru-ru"``; non-strings / blanks -> ``None``."""
    if not isinstance(value, str):
        return None
    value = value.strip().lower().replace("_", "-")
    return value or None


@dataclass(frozen=True)
class _Variant:
    language: str
    template: Any  # jinja2.Template
    suffix: str  # separator + footer, or ""
    footer: str  # footer text, or ""


@dataclass(frozen=True, kw_only=True, eq=False)
class MessageTemplate:
    """An SMS template: one Jinja2 source per language.

    ``footer`` overrides / extends :data:`DEFAULT_FOOTERS` per language; an
    empty string explicitly disables the footer for that language.  A
    marketing template must have a footer for every variant language.
    Compilation happens here, so constructing a broken template raises
    :class:`TemplateCompileError`.
    """

    name: str
    variants: dict[str, str]
    kind: str = "marketing"
    default_language: str = "ru"
    footer: dict[str, str] | None = None
    sender_name: str | None = None
    origin: str | None = field(default=None, compare=False)  # file it came from
    _compiled: dict[str, _Variant] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        where = f" ({self.origin})" if self.origin else ""
        if not isinstance(self.name, str) or not self.name.strip():
            raise TemplateLoadError(f"template name must be a non-empty string{where}", path=self.origin)
        name = self.name
        if self.kind not in KINDS:
            raise TemplateLoadError(
                f"template {name!r}{where}: kind must be one of {KINDS}, got {self.kind!r}",
                template=name, path=self.origin,
            )
        default_language = normalize_language(self.default_language)
        if default_language is None:
            raise TemplateLoadError(
                f"template {name!r}{where}: default_language must be a non-empty string",
                template=name, path=self.origin,
            )
        if not isinstance(self.variants, Mapping) or not self.variants:
            raise TemplateLoadError(
                f"template {name!r}{where}: 'variants' must be a non-empty mapping language -> text",
                template=name, path=self.origin,
            )
        variants: dict[str, str] = {}
        for lang, src in self.variants.items():
            key = normalize_language(lang)
            if key is None:
                raise TemplateLoadError(
                    f"template {name!r}{where}: invalid variant language {lang!r}",
                    template=name, path=self.origin,
                )
            if key in variants:
                raise TemplateLoadError(
                    f"template {name!r}{where}: variant {key!r} defined twice",
                    template=name, path=self.origin,
                )
            if not isinstance(src, str):
                raise TemplateLoadError(
                    f"template {name!r}{where}: variant {key!r} must be a string, got {type(src).__name__}",
                    template=name, path=self.origin,
                )
            variants[key] = src
        footers = dict(DEFAULT_FOOTERS)
        if self.footer is not None:
            if not isinstance(self.footer, Mapping):
                raise TemplateLoadError(
                    f"template {name!r}{where}: 'footer' must be a mapping language -> text",
                    template=name, path=self.origin,
                )
            for lang, text in self.footer.items():
                key = normalize_language(lang)
                if key is None or not isinstance(text, str):
                    raise TemplateLoadError(
                        f"template {name!r}{where}: invalid footer entry {lang!r}: {text!r}",
                        template=name, path=self.origin,
                    )
                footers[key] = text.strip()

        compiled: dict[str, _Variant] = {}
        for lang, src in variants.items():
            try:
                tmpl = _compile(src)
            except TemplateSyntaxError as exc:
                raise TemplateCompileError(
                    f"template {name!r} variant {lang!r}{where}: syntax error at line "
                    f"{exc.lineno}: {exc.message}",
                    template=name, language=lang, lineno=exc.lineno, path=self.origin,
                ) from exc
            footer_text = ""
            if self.kind == "marketing":
                footer_text = footers.get(lang)
                if footer_text is None:
                    footer_text = footers.get(lang.split("-", 1)[0])
                if footer_text is None:
                    raise TemplateLoadError(
                        f"template {name!r}{where}: marketing variant {lang!r} has no opt-out "
                        f"footer; add 'footer: {{{lang}: ...}}'",
                        template=name, path=self.origin,
                    )
            suffix = FOOTER_SEPARATOR + footer_text if footer_text else ""
            compiled[lang] = _Variant(lang, tmpl, suffix, footer_text)

        object.__setattr__(self, "variants", variants)
        object.__setattr__(self, "default_language", default_language)
        object.__setattr__(self, "_compiled", compiled)

    def __reduce__(self):
        # compiled Jinja code is not picklable: ship the definition and
        # recompile on the other side (ProcessPoolExecutor, Prefect caching)
        return (_rebuild_template, (self._definition(),))

    def _definition(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "variants": dict(self.variants),
            "kind": self.kind,
            "default_language": self.default_language,
            "footer": dict(self.footer) if self.footer is not None else None,
            "sender_name": self.sender_name,
            "origin": self.origin,
        }

    # ---------------------------------------------------------------- helpers
    @cached_property
    def variables(self) -> frozenset[str]:
        """Every name a variant reads from its context: Jinja's own analysis of the source (variables, filters'
        arguments, ``link`` ...; not the names a variant assigns itself), plus the Jinja globals it uses
        (``range`` ...: a contact's value of that name would hide them). Parsed once per template (the render
        asks for every page)."""
        from jinja2 import meta, nodes

        names: set[str] = set()
        for src in self.variants.values():
            ast = _ENV.parse(src)
            names |= meta.find_undeclared_variables(ast)
            names |= {n.name for n in ast.find_all(nodes.Name) if n.name in _ENV.globals}
        return frozenset(names)

    @cached_property
    def deterministic(self) -> bool:
        """Whether a variant's text is a function of the values of ``variables`` alone: no ``link(...)`` (a new
        code per recipient), no ``random`` filter, no ``lipsum``. Then a render may reuse the text of an earlier
        contact with the same values (``_Renderer``)."""
        from jinja2 import nodes

        if "link" in self.variables or self.uses_links or "lipsum" in self.variables:
            return False
        return not any(f.name == "random" for src in self.variants.values()
                       for f in _ENV.parse(src).find_all(nodes.Filter))

    @property
    def uses_links(self) -> bool:
        """Whether a variant calls ``link(...)`` (a tracked short link: smsflow/links.py)."""
        return any(re.search(r"\blink\s*\(", src) for src in self.variants.values())

    @property
    def languages(self) -> list[str]:
        return list(self.variants)

    def choose_language(self, language: Any) -> str:
        """Variant language used for a contact whose language is *language*."""
        lang = normalize_language(language)
        compiled = self._compiled
        if lang is not None:
            if lang in compiled:
                return lang
            primary = lang.split("-", 1)[0]
            if primary in compiled:
                return primary
        if self.default_language in compiled:
            return self.default_language
        return next(iter(compiled))

    def footer_for(self, language: str) -> str:
        """Footer appended to the variant *language* ("" for none)."""
        return self._compiled[self.choose_language(language)].footer

    @classmethod
    def from_string(cls, name: str, source: str, **kwargs: Any) -> "MessageTemplate":
        """Single-variant template (variant = ``default_language``)."""
        lang = kwargs.get("default_language", "ru")
        return cls(name=name, variants={lang: source}, **kwargs)


def _rebuild_template(definition: dict[str, Any]) -> MessageTemplate:
    return MessageTemplate(**definition)


# --------------------------------------------------------------------------
# loading


def _read_text(path: Path, name: str | None) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TemplateLoadError(
            f"template file {str(path)!r} is not valid UTF-8: {exc}", template=name, path=str(path)
        ) from exc
    except OSError as exc:
        raise TemplateLoadError(
            f"cannot read template file {str(path)!r}: {exc}", template=name, path=str(path)
        ) from exc


def _split_jinja_name(path: Path) -> tuple[str, str | None]:
    """``promo.ru.j2`` -> ("promo", "ru"); ``promo.j2`` -> ("promo", None)."""
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    m = _LANG_SUFFIX.match(stem)
    if m:
        return m.group("base"), normalize_language(m.group("lang"))
    return stem, None


def _load_yaml(path: Path) -> MessageTemplate:
    text = _read_text(path, None)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise TemplateLoadError(
            f"template file {str(path)!r}: invalid YAML at{line}: {problem}", path=str(path)
        ) from exc
    if not isinstance(data, dict):
        raise TemplateLoadError(
            f"template file {str(path)!r}: expected a YAML mapping with keys "
            f"{sorted(_YAML_KEYS - {'description'})}", path=str(path),
        )
    unknown = set(data) - _YAML_KEYS
    if unknown:
        raise TemplateLoadError(
            f"template file {str(path)!r}: unknown keys {sorted(map(str, unknown))}; "
            f"allowed: {sorted(_YAML_KEYS)}", path=str(path),
        )
    if "variants" not in data:
        raise TemplateLoadError(f"template file {str(path)!r}: missing 'variants'", path=str(path))
    name = data.get("name")
    if name is None:
        name = path.name[: -len(path.suffix)]
    kwargs = {k: data[k] for k in ("kind", "default_language", "footer", "sender_name") if data.get(k) is not None}
    return MessageTemplate(name=str(name), variants=data["variants"], origin=str(path), **kwargs)


def _load_jinja_group(base: str, files: list[tuple[Path, str | None]], *, default_language: str = "ru") -> MessageTemplate:
    """Template from ``base.j2`` and/or ``base.<lang>.j2`` files."""
    variants: dict[str, str] = {}
    paths: dict[str, Path] = {}
    default_language = normalize_language(default_language) or "ru"
    # explicit languages first, so a base file conflicts with them clearly
    for path, lang in sorted(files, key=lambda f: (f[1] is None, f[0].name)):
        key = lang or default_language
        if key in variants:
            raise TemplateLoadError(
                f"template {base!r}: both {paths[key].name!r} and {path.name!r} define the "
                f"{key!r} variant", template=base, path=str(path),
            )
        variants[key] = _read_text(path, base)
        paths[key] = path
    origin = str(next((p for p, lang in files if lang is None), files[0][0]))
    try:
        return MessageTemplate(
            name=base, variants=variants, kind="marketing",
            default_language=default_language, origin=origin,
        )
    except TemplateCompileError as exc:
        # point at the file of the broken variant
        path = paths.get(exc.language or "")
        if path is None or str(path) == origin:
            raise
        raise TemplateCompileError(
            str(exc).replace(f"({origin})", f"({path})"),
            template=exc.template, language=exc.language, lineno=exc.lineno, path=str(path),
        ) from exc.__cause__


def template_library(directory: str | Path | None = None) -> list[str]:
    """Names of the project's templates (``templates/*.yaml``): what the UI's campaign form offers."""

    d = Path(directory) if directory else PROJECT_ROOT / "templates"
    return sorted(p.stem for p in d.glob("*") if p.suffix.lower() in YAML_SUFFIXES) if d.is_dir() else []


def resolve_template(name_or_path: str | Path) -> Path:
    """A template name from the library (``demo_promo``) or a path, as a path."""

    p = Path(name_or_path)
    if p.suffix or p.is_file() or len(p.parts) > 1:
        return p
    return PROJECT_ROOT / "templates" / f"{p}.yaml"


def load_template(path: str | Path) -> MessageTemplate:
    """Load one template (a path, or the name of one in the project's ``templates/``).

    * ``*.yaml`` / ``*.yml``: mapping with ``name`` (default: file stem),
      ``kind``, ``default_language``, ``variants``, ``footer``, ``sender_name``
      (and an ignored ``description``).
    * ``*.j2`` / ``*.jinja`` / ``*.jinja2`` / ``*.txt``: plain Jinja source, a
      marketing template whose single variant serves every language.  Sibling
      files ``<name>.<lang>.<ext>`` (e.g. ``promo.ru.j2``, ``promo.en.j2``)
      add per-language variants; loading any file of the group loads the
      whole group.  The plain ``<name>.<ext>`` file, if present, is the
      ``default_language`` ("ru") variant.
    """
    path = resolve_template(path)
    suffix = path.suffix.lower()
    if suffix in YAML_SUFFIXES:
        return _load_yaml(path)
    if suffix in JINJA_SUFFIXES:
        if not path.is_file():
            raise TemplateLoadError(f"template file {str(path)!r} does not exist", path=str(path))
        base, _lang = _split_jinja_name(path)
        files = []
        for p in path.parent.iterdir():
            if p.is_file() and p.suffix.lower() in JINJA_SUFFIXES:
                b, lang = _split_jinja_name(p)
                if b == base:
                    files.append((p, lang))
        return _load_jinja_group(base, files)
    raise TemplateLoadError(
        f"unsupported template file {str(path)!r}; expected one of "
        f"{YAML_SUFFIXES + JINJA_SUFFIXES}", path=str(path),
    )


# --------------------------------------------------------------------------
# context


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()
_NA_TYPES = frozenset({"NAType", "NaTType"})


def _clean(v: Any) -> Any:
    """Value for the context, or ``_MISSING`` when it should be undefined."""
    if v is None:
        return _MISSING
    if isinstance(v, str):
        v = v.strip()
        return v if v else _MISSING
    if isinstance(v, (int, float)):  # bool, numpy float64 are subclasses
        return _MISSING if v != v else v
    if type(v).__name__ in _NA_TYPES:  # pandas.NA, pandas.NaT
        return _MISSING
    try:
        if bool(v != v):  # numpy.float32('nan'), Decimal('NaN'), numpy NaT
            return _MISSING
    except Exception:  # arrays, NA-like objects with ambiguous truth value
        pass
    return v


def _clean_mapping(m: Mapping) -> dict:
    out = {}
    for k, v in m.items():
        v = _clean(v)
        if v is not _MISSING:
            out[k] = v
    return out


def _attributes(value: Any) -> dict | None:
    if isinstance(value, Mapping):
        return _clean_mapping(value)
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:  # JSON column straight from a database / CSV
            decoded = json.loads(value)
        except ValueError:
            return None
        if isinstance(decoded, dict):
            return _clean_mapping(decoded)
    return None


def _fill(ctx: dict, contact: Mapping) -> None:
    """Add cleaned attributes, then cleaned top-level values of *contact*."""
    attrs = contact.get("attributes")
    cleaned = _attributes(attrs) if attrs is not None else None
    if cleaned is not None:
        ctx.update(cleaned)
    for k, v in contact.items():
        tv = type(v)
        if tv is str:
            v = v.strip()
            if not v:
                continue
        elif tv is int:
            pass
        elif v is None:
            continue
        elif tv is float:
            if v != v:
                continue
        else:
            v = _clean(v)
            if v is _MISSING:
                continue
        ctx[k] = v
    if cleaned is not None:
        ctx["attributes"] = cleaned


def _base_context(template: MessageTemplate, extra: Mapping | None) -> dict:
    base: dict[str, Any] = {}
    if template.sender_name:
        base["sender_name"] = template.sender_name
    if extra:
        base.update(_clean_mapping(extra))
    return base


def build_context(contact: Mapping, template: MessageTemplate | None = None, extra: Mapping | None = None) -> dict:
    """The variables a template sees for *contact* (without Jinja globals)."""
    ctx = _base_context(template, extra) if template is not None else (_clean_mapping(extra) if extra else {})
    _fill(ctx, contact)
    return ctx


# --------------------------------------------------------------------------
# rendering


def _template_lineno(exc: BaseException) -> int | None:
    tb = exc.__traceback__
    lineno = None
    while tb is not None:
        tmpl = tb.tb_frame.f_globals.get("__jinja_template__")
        if tmpl is not None:
            try:
                lineno = tmpl.get_corresponding_lineno(tb.tb_lineno)
            except Exception:  # pragma: no cover - defensive
                pass
        tb = tb.tb_next
    return lineno


def _reason(template: MessageTemplate, language: str, exc: BaseException) -> str:
    if isinstance(exc, UndefinedError):
        msg = str(exc)
    elif isinstance(exc, SecurityError):
        msg = f"blocked by sandbox: {exc}"
    else:
        msg = f"{type(exc).__name__}: {exc}"
    lineno = _template_lineno(exc)
    line = f" (line {lineno})" if lineno else ""
    return f"template {template.name!r} ({language}): {msg}{line}"


_MEMO_TRIAL = 20_000  # distinct value combinations a render keeps before it checks that reusing texts pays


class _Renderer:
    """Per-call state: base context and per-language render callables.

    A deterministic template (``MessageTemplate.deterministic``) rendered for a contact without CRM attributes
    (the page query leaves them out when the template cannot use them) gives the same text for every contact
    with the same variant and the same cleaned values of the template's names: that text is rendered once per
    call and reused (the demo promo over 1M contacts: a few hundred distinct first names). When the values are
    nearly all distinct (an order number), reusing stops after ``_MEMO_TRIAL`` of them."""

    __slots__ = ("template", "variants", "_lang_cache", "links", "_link_base", "_utm", "_memo", "_names", "_hits")

    def __init__(self, template: MessageTemplate, extra: Mapping | None):
        if not isinstance(template, MessageTemplate):
            raise TypeError(f"template must be a MessageTemplate, not {type(template).__name__}")
        self.template = template
        self.links: list[tuple[str, str]] = []  # (code, target) of the contact rendered last
        self._link_base = (extra or {}).get("link_base")
        self._utm = (extra or {}).get("utm") or None
        extra = {k: v for k, v in (extra or {}).items() if k not in ("link_base", "utm")}
        base = _base_context(template, extra)
        self.variants: dict[str, tuple] = {}
        for lang, var in template._compiled.items():
            tmpl = var.template
            start = dict(tmpl.globals)  # flatten Jinja's ChainMap once per call
            start.update(base)
            self.variants[lang] = (lang, tmpl.root_render_func, tmpl.new_context, start, var.suffix, var.footer)
        self._lang_cache: dict[Any, tuple] = {}
        self._memo: dict[tuple, tuple[str, str]] | None = {} if template.deterministic else None
        self._names = tuple(sorted(template.variables))
        self._hits = 0

    def variant(self, language: Any) -> tuple:
        if not isinstance(language, str):  # None / NaN / NA: one cache slot
            language = None
        try:
            return self._lang_cache[language]
        except KeyError:
            var = self.variants[self.template.choose_language(language)]
            self._lang_cache[language] = var
            return var

    def render(self, contact: Mapping) -> tuple[str, str]:
        """``(language, text)``; raises :class:`RenderError` with a human reason."""
        memo = self._memo
        if memo is None or contact.get("attributes") is not None:
            return self._render(contact)
        # the context's value of each name is the contact's cleaned value, or (missing) the call's constant one;
        # the type is part of the key (True == 1 == 1.0, but they render differently)
        values = [_clean(contact.get(n)) for n in self._names]
        try:
            key = (self.variant(contact.get("language"))[0], *values, *map(type, values))
            hit = memo.get(key)
        except TypeError:  # an unhashable value (a list): rendered as usual
            return self._render(contact)
        if hit is not None:
            self._hits += 1
            self.links = []
            return hit
        result = self._render(contact)
        memo[key] = result
        if len(memo) >= _MEMO_TRIAL and self._hits < len(memo):  # mostly distinct values: stop keeping them
            self._memo = None
        return result

    def _render(self, contact: Mapping) -> tuple[str, str]:
        lang, render_func, new_context, start, suffix, footer = self.variant(contact.get("language"))
        ctx = start.copy()
        self.links = []
        try:
            _fill(ctx, contact)
            ctx["link"] = self.link  # after the contact's keys: a CRM field named "link" cannot hide it
            # shared=True: ctx already holds the globals, no second dict copy
            body = "".join(render_func(new_context(ctx, True))).strip()
        except Exception as exc:
            raise RenderError(_reason(self.template, lang, exc)) from exc
        if not body:
            raise RenderError(f"template {self.template.name!r} ({lang}): rendered text is empty")
        if suffix and not body.endswith(footer):
            body += suffix
        sender = self.sender_for(lang)
        if sender and sender.casefold() not in body.casefold():
            body = f"{sender}: {body}"  # sender identity on every marketing message
        return lang, body

    def link(self, url, **utm) -> str:
        """``{{ link("https://...") }}``: this recipient's short link (smsflow/links.py)."""
        from smsflow.links import check_base, new_code, short_url, target_url

        target = target_url(url, {**(self._utm or {}), **utm})
        code = new_code()
        self.links.append((code, target))
        return short_url(check_base(self._link_base), code)

    def sender_for(self, lang: str) -> str | None:
        """The sender's name for a marketing message in ``lang`` (str, or a mapping per language)."""
        if self.template.kind != "marketing":
            return None
        sender = self.template.sender_name
        if isinstance(sender, Mapping):
            sender = sender.get(lang) or sender.get(self.template.default_language)
        return sender.strip() if isinstance(sender, str) and sender.strip() else None


def render_contact(contact: Mapping, template: MessageTemplate, extra: Mapping | None = None) -> tuple[str, str]:
    """Render one contact: ``(language, text)`` or :class:`RenderError`."""
    return render_contact_links(contact, template, extra)[:2]


def render_contact_links(contact: Mapping, template: MessageTemplate,
                         extra: Mapping | None = None) -> tuple[str, str, list[tuple[str, str]]]:
    """Render one contact: ``(language, text, short links as (code, target))`` or :class:`RenderError`."""
    if not isinstance(contact, Mapping):
        raise RenderError(f"contact must be a mapping, not {type(contact).__name__}")
    r = _Renderer(template, extra)
    lang, body = r.render(contact)
    return lang, body, r.links


def render_batch(
    contacts: list[dict],
    template: MessageTemplate,
    price_per_segment: float = 0.0,
    extra: dict | None = None,
) -> tuple[list[dict], list[dict]]:
    """Render *template* for every contact.

    Returns ``(rendered, failed)``:

    * rendered rows ``{contact_id, language, text, encoding, characters,
      units, segments, cost}`` (``cost = round(segments * price, 4)``),
    * failed rows ``{contact_id, reason}``.

    One failing contact never stops the batch; input order is preserved in
    both lists.
    """
    renderer = _Renderer(template, extra)
    render = renderer.render
    ids: list[Any] = []
    langs: list[str] = []
    texts: list[str] = []
    links: dict[int, list[tuple[str, str]]] = {}  # position -> the contact's short links
    failed: list[dict] = []
    for contact in contacts:
        if not isinstance(contact, Mapping):
            failed.append({
                "contact_id": None,
                "reason": f"contact must be a mapping, not {type(contact).__name__}",
            })
            continue
        try:
            lang, text = render(contact)
        except RenderError as exc:
            failed.append({"contact_id": contact.get("contact_id"), "reason": str(exc)})
            continue
        if renderer.links:
            links[len(ids)] = renderer.links
        ids.append(contact.get("contact_id"))
        langs.append(lang)
        texts.append(text)

    encodings, characters, units, segments = sms_info_batch(texts)
    price = float(price_per_segment or 0.0)
    rendered = [
        {
            "contact_id": cid,
            **({"links": links[i]} if i in links else {}),
            "language": lang,
            "text": text,
            "encoding": enc,
            "characters": nchar,
            "units": nunits,
            "segments": nseg,
            "cost": round(nseg * price, 4),
        }
        for i, (cid, lang, text, enc, nchar, nunits, nseg) in enumerate(zip(
            ids, langs, texts, encodings, characters, units, segments
        ))
    ]
    return rendered, failed


# --------------------------------------------------------------------------
# process-pool worker (a pure module: spawned workers import no Prefect)

_WORKER_STATE: dict[str, Any] = {}


def init_render_worker(template: MessageTemplate, price_per_segment: float, extra: dict | None) -> None:
    """Pool initializer: the template is unpickled (compiled) once per worker, not once per chunk."""
    _WORKER_STATE["args"] = (template, price_per_segment, extra)


def worker_args() -> tuple[MessageTemplate, float, dict | None]:
    """(template, price per segment, extra) set by :func:`init_render_worker` in this worker."""
    return _WORKER_STATE["args"]


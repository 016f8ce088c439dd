"""The DSR-Dataset vocabulary file (``configs/dsr_vocabulary.yaml``): loading and checking it.

The file's own comments say what each key is and how the generator uses it. `load_vocabulary` reads
it and refuses, with a message naming the file and the key, anything the generator could not use
as meant: a key other than ``animals``, ``objects`` and ``scenes``, an empty list, a name given twice
(YAML itself keeps the last of two equal mapping keys silently, so the loader checks for them), an
animal that is also an object, or a name with a comma, period or line break (it would break the
sentence the template builds).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

KEYS = ("animals", "objects", "scenes")
DEFAULT_VOCABULARY = Path(__file__).resolve().parents[2] / "configs" / "dsr_vocabulary.yaml"


class VocabularyError(ValueError):
    """A vocabulary file the generator cannot use; the message names the file and the key."""


@dataclass(frozen=True)
class Vocabulary:
    """Animals with their verbs (in file order), objects and scenes."""

    animals: dict[str, tuple[str, ...]]
    objects: tuple[str, ...]
    scenes: tuple[str, ...]

    def prompts_per_type(self) -> int:
        """Distinct prompts of one DSR type: (sum of the animals' verb counts) x objects x scenes."""
        return sum(len(v) for v in self.animals.values()) * len(self.objects) * len(self.scenes)


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses a mapping with the same key twice (PyYAML keeps the last one)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise VocabularyError(f"{loader.name}: key {key!r} appears twice (lines {seen[key]} and {line}); "
                                  "each name may appear once")
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _name(value: Any, where: str, what: str, *, scene: bool = False) -> str:
    if not isinstance(value, str) or not value.strip():
        raise VocabularyError(f"{where}: {what} must be a non-empty string, got {value!r}")
    text = " ".join(value.split())
    if value.strip() != value or "\n" in value:
        raise VocabularyError(f"{where}: {what} {value!r} has leading, trailing or line-break whitespace")
    if scene:
        if text.endswith((",", ".")):
            raise VocabularyError(f"{where}: scene {value!r} ends with {text[-1]!r}; write it without (the "
                                  "template adds ', ' after the scene)")
    elif "," in text or "." in text:
        raise VocabularyError(f"{where}: {what} {value!r} holds a comma or period, which would break the sentence")
    return text


def _unique_list(raw: Any, where: str, what: str, *, scene: bool = False) -> tuple[str, ...]:
    if not isinstance(raw, list):
        raise VocabularyError(f"{where} must be a list of {what}s, got {type(raw).__name__}")
    if not raw:
        raise VocabularyError(f"{where} is empty; it needs at least one {what}")
    out: list[str] = []
    for i, value in enumerate(raw):
        name = _name(value, f"{where}[{i}]", what, scene=scene)
        if name in out:
            raise VocabularyError(f"{where}[{i}]: {what} {name!r} appears twice (first at {where}[{out.index(name)}])")
        out.append(name)
    return tuple(out)


def parse_vocabulary(data: Any, source: str = "vocabulary") -> Vocabulary:
    """A `Vocabulary` from the file's parsed YAML ``data``; errors start with ``source``."""
    if not isinstance(data, dict):
        raise VocabularyError(f"{source}: the file must be a mapping with keys {list(KEYS)}, got "
                              f"{type(data).__name__}")
    unknown = [k for k in data if k not in KEYS]
    if unknown:
        raise VocabularyError(f"{source}: unknown key(s) {unknown}; the keys are {list(KEYS)}")
    missing = [k for k in KEYS if k not in data]
    if missing:
        raise VocabularyError(f"{source}: missing key(s) {missing}; the keys are {list(KEYS)}")
    raw_animals = data["animals"]
    if not isinstance(raw_animals, dict):
        raise VocabularyError(f"{source}: animals must be a mapping of animal name -> list of verbs, got "
                              f"{type(raw_animals).__name__}")
    if not raw_animals:
        raise VocabularyError(f"{source}: animals is empty; it needs at least one animal")
    animals: dict[str, tuple[str, ...]] = {}
    for key, verbs in raw_animals.items():
        name = _name(key, f"{source}: animals", "animal")
        if name in animals:
            raise VocabularyError(f"{source}: animals: {name!r} appears twice")
        animals[name] = _unique_list(verbs, f"{source}: animals.{name}", "verb")
    objects = _unique_list(data["objects"], f"{source}: objects", "object")
    both = [a for a in animals if a in objects]
    if both:
        raise VocabularyError(f"{source}: {both} are both animals and objects; the detector is asked for the "
                              "animal and the object by name, so they must differ")
    scenes = _unique_list(data["scenes"], f"{source}: scenes", "scene", scene=True)
    return Vocabulary(animals=animals, objects=objects, scenes=scenes)


def load_vocabulary(path: str | os.PathLike | None = None) -> Vocabulary:
    """Reads and checks a vocabulary file (default ``configs/dsr_vocabulary.yaml``)."""
    path = Path(DEFAULT_VOCABULARY if path is None else path)
    if not path.is_file():
        raise VocabularyError(f"vocabulary file {str(path)!r} does not exist"
                              + (" or is a folder" if path.exists() else ""))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise VocabularyError(f"vocabulary file {str(path)!r} is not UTF-8 text ({e.reason})") from None
    loader = _UniqueKeyLoader(text)
    loader.name = str(path)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as e:
        raise VocabularyError(f"vocabulary file {str(path)!r} is not valid YAML: {e}") from None
    finally:
        loader.dispose()
    return parse_vocabulary(data, str(path))
